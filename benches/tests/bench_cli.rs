//! `qcowx-bench` against `qemu-img bench`: the same options must touch the same bytes.
//!
//! A write run leaves the request sequence on disk, so each case runs both programs
//! on two fresh images and asks `qemu-img compare -s` (strict: allocation must match
//! too) whether the results are the same.

use std::path::Path;
use std::process::{Command, Output};

use qcowx_benches::{qemu_img, run_tool};

fn qcowx_bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcowx-bench"))
        .args(args)
        .output()
        .expect("run qcowx-bench")
}

fn qemu_bench(args: &[&str]) -> Output {
    Command::new(qemu_img())
        .arg("bench")
        .args(args)
        .output()
        .expect("run qemu-img bench")
}

fn new_image(path: &Path, size: &str) {
    run_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            path.to_str().expect("utf-8"),
            size,
        ],
    );
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs the write case `args` with both programs and compares the images.
fn same_writes(size: &str, args: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    new_image(&ours, size);
    new_image(&theirs, size);
    let mut a: Vec<&str> = args.to_vec();
    a.push(ours.to_str().expect("utf-8"));
    let o = qcowx_bench(&a);
    assert!(o.status.success(), "qcowx-bench {a:?}: {o:?}");
    a.pop();
    a.push(theirs.to_str().expect("utf-8"));
    let q = qemu_bench(&a);
    assert!(q.status.success(), "qemu-img bench {a:?}: {q:?}");

    // Same report lines, apart from the time.
    let first = |s: String| s.lines().next().unwrap_or_default().to_string();
    assert_eq!(first(stdout(&o)), first(stdout(&q)));
    let last = stdout(&o).lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("Run completed in ") && last.ends_with(" seconds."),
        "{last:?}"
    );

    let cmp = Command::new(qemu_img())
        .args(["compare", "-s", "-f", "qcow2", "-F", "qcow2"])
        .arg(&ours)
        .arg(&theirs)
        .output()
        .expect("qemu-img compare");
    assert!(
        cmp.status.success(),
        "{args:?}: images differ: {}{}",
        stdout(&cmp),
        String::from_utf8_lossy(&cmp.stderr)
    );
    let check = Command::new(qemu_img())
        .args(["check", "-f", "qcow2"])
        .arg(&ours)
        .output()
        .expect("qemu-img check");
    assert!(check.status.success(), "check: {}", stdout(&check));
}

#[test]
fn misaligned_wrapping_writes_match_qemu() {
    // 49 is odd, so 300 steps of 49 * 4 KiB visit 300 distinct 4 KiB slots of the
    // 4 MiB disk, wrapping many times; offset 512 and 3584-byte requests make every
    // request a partial cluster.
    same_writes(
        "4M",
        &[
            "-w",
            "-c",
            "300",
            "-d",
            "4",
            "-o",
            "512",
            "-s",
            "3584",
            "-S",
            "200704",
            "--pattern=0x5a",
        ],
    );
}

#[test]
fn cluster_spanning_writes_match_qemu() {
    // 100000-byte requests straddle cluster boundaries; a step smaller than the
    // request makes neighbours overlap (same pattern, so the result is well defined).
    same_writes(
        "8M",
        &[
            "-w",
            "-c",
            "60",
            "-d",
            "8",
            "-s",
            "100000",
            "-S",
            "90000",
            "--pattern",
            "17",
        ],
    );
}

#[test]
fn reads_past_the_end_fail_like_qemu() {
    // QEMU 10.0 wraps modulo the disk size, so the 2nd request (offset 259968 + 4096 >
    // 256 KiB) is out of range and both programs fail.
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("small.qcow2");
    new_image(&img, "256K");
    let args = [
        "-c",
        "100",
        "-d",
        "1",
        "-S",
        "259968",
        img.to_str().expect("utf-8"),
    ];
    let q = qemu_bench(&args);
    let o = qcowx_bench(&args);
    assert!(!q.status.success(), "qemu-img bench succeeded: {q:?}");
    assert!(!o.status.success(), "qcowx-bench succeeded: {o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Failed request at offset 259968"),
        "{o:?}"
    );
    // A read run that stays inside the disk succeeds and reads every request.
    let ok = qcowx_bench(&[
        "-c",
        "1000",
        "-d",
        "3",
        "-S",
        "64k",
        img.to_str().expect("utf-8"),
    ]);
    assert!(ok.status.success(), "{ok:?}");
}

#[test]
fn flushing_writes_match_qemu() {
    // --flush-interval takes the draining path; --no-drain the concurrent one. Both
    // must finish and leave the same data as qemu-img bench.
    same_writes(
        "4M",
        &[
            "-w",
            "-c",
            "200",
            "-d",
            "4",
            "-S",
            "20k",
            "--flush-interval",
            "16",
            "--pattern",
            "7",
        ],
    );
    same_writes(
        "4M",
        &[
            "-w",
            "-c",
            "100",
            "-d",
            "4",
            "-S",
            "36k",
            "--flush-interval=8",
            "--no-drain",
            "--pattern=9",
        ],
    );
}
