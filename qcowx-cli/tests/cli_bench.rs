//! `qcowx bench` against `qemu-img bench`: the same command lines print the same
//! description of what they send, leave the same data behind (writes), and refuse the
//! same bad options. (How fast either runs is for `benches/`, not for tests.)

use qcowx_tests::cli::*;

/// The first line (what is sent) of a bench's output.
fn sending(out: &std::process::Output) -> String {
    stdout(out).lines().next().unwrap_or_default().to_string()
}

#[test]
fn bench_sends_what_qemu_img_bench_sends() {
    let t = Twins::new();
    t.prepare(&["create", "-f", "qcow2", "disk.qcow2", "8M"]);
    let runs: [&[&str]; 4] = [
        &["bench", "-c", "500", "disk.qcow2"],
        &[
            "bench",
            "-w",
            "-c",
            "300",
            "-s",
            "4k",
            "-d",
            "4",
            "-S",
            "12k",
            "-o",
            "1M",
            "--pattern",
            "7",
            "disk.qcow2",
        ],
        &[
            "bench",
            "-w",
            "-c",
            "1000",
            "-s",
            "8k",
            "-d",
            "2",
            "--flush-interval",
            "4",
            "--pattern",
            "9",
            "disk.qcow2",
        ],
        &[
            "bench",
            "-f",
            "qcow2",
            "-c",
            "100",
            "-n",
            "-t",
            "none",
            "-i",
            "threads",
            "disk.qcow2",
        ],
    ];
    for args in runs {
        let (q, x) = t.both(args, Some(0));
        assert_eq!(sending(&x), sending(&q), "{args:?}");
        assert!(stdout(&x)
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("Run completed in "));
        let (qd, xd) = t.contents("disk.qcow2");
        assert!(qd == xd, "{args:?}: the disks differ");
    }
    // (The runs stop short of the disk's end: there qemu-img 10.0 wraps modulo the
    // disk size, which lets a request run past the end, and later versions modulo
    // the disk size less one request, as qcowx does.)
    let (_, disk) = t.contents("disk.qcow2");
    assert!(disk[(1 << 20)..(1 << 20) + 4096].iter().all(|&b| b == 9));
    assert!(disk[8000 << 10..].iter().all(|&b| b == 0));
    assert_qemu_check_clean(&t.qcowx, "disk.qcow2");
    for bad in [
        &[
            "bench",
            "-w",
            "-c",
            "10",
            "--flush-interval",
            "2",
            "disk.qcow2",
        ][..],
        &["bench", "-s", "16M", "disk.qcow2"][..],
        &["bench", "-d", "0", "disk.qcow2"][..],
    ] {
        t.both(bad, None);
    }
}
