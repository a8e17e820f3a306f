//! `qcowx commit` against `qemu-img commit`: the same chain (a qcow2 or raw base under
//! a qcow2 overlay holding data, zero writes and unwritten ranges) is built in two
//! folders, committed by each tool, and the results compared with QEMU's tools: the
//! bases read the same, both overlays read what they read before, qcowx's files
//! check clean and its overlay stores nothing afterwards (unless -d).

use std::path::Path;
use std::time::Duration;

use qcowx_tests::cli::*;
use qcowx_tests::QemuIoSession;
use serde_json::Value;

/// In `dir`: `base.FMT` (4 MiB of 0x01, written by qemu-io) under `top.qcow2`
/// (`top_size`, created by qemu-img) holding data, zero writes (whole and partial
/// clusters) and unwritten ranges. Returns the base's file name.
fn chain(dir: &Path, base_fmt: &str, top_size: &str) -> String {
    chain_with(dir, base_fmt, top_size, "compat=1.1")
}

/// [`chain`] with `-o TOP_OPTS` for the top.
fn chain_with(dir: &Path, base_fmt: &str, top_size: &str, top_opts: &str) -> String {
    let base = format!("base.{base_fmt}");
    qemu_ok(dir, &["create", "-q", "-f", base_fmt, &base, "4M"]);
    qemu_io(dir, base_fmt, &base, &["write -P 1 0 4M"]);
    qemu_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            top_opts,
            "-b",
            &base,
            "-F",
            base_fmt,
            "top.qcow2",
            top_size,
        ],
    );
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 5 64k 128k",
            "write -z 1M 64k",
            "write -z 2052k 4k",
            "write -P 7 3M 1k",
            "write -z 3584k 512k",
        ],
    );
    base
}

/// `qemu-img map --output=json FILE`.
fn map(dir: &Path, file: &str) -> Vec<Value> {
    json(&qemu_ok(dir, &["map", "--output=json", file]))
        .as_array()
        .unwrap()
        .clone()
}

fn virtual_size(dir: &Path, file: &str) -> u64 {
    json(&qemu_ok(dir, &["info", "--output=json", file]))["virtual-size"]
        .as_u64()
        .unwrap()
}

/// Commits `top.qcow2` over a `base_fmt` base with both tools (`extra` before the
/// file name) and checks what both left.
fn commit_like_qemu(base_fmt: &str, top_size: &str, extra: &[&str]) -> Twins {
    commit_like_qemu_with(base_fmt, top_size, extra, "compat=1.1")
}

/// [`commit_like_qemu`] with `-o TOP_OPTS` for the top.
fn commit_like_qemu_with(base_fmt: &str, top_size: &str, extra: &[&str], top_opts: &str) -> Twins {
    let t = Twins::new();
    let mut base = String::new();
    for d in t.dirs() {
        base = chain_with(d, base_fmt, top_size, top_opts);
    }
    let before = qemu_raw(&t.qcowx, "top.qcow2", None);
    let map_before = map(&t.qcowx, "top.qcow2");
    assert!(
        map_before.iter().any(|e| e["depth"] == 0),
        "the top stores something"
    );
    let mut args = vec!["commit"];
    args.extend_from_slice(extra);
    args.push("top.qcow2");
    assert_ok(&qemu_img(&t.qemu, &args), "qemu-img commit");
    let out = ok(&t.qcowx, &args);
    assert_eq!(stdout(&out), "Image committed.\n");

    // The bases read the same, and have the same size.
    let (q, x) = (t.qemu.join(&base), t.qcowx.join(&base));
    let cmp = qemu_img(
        &t.qcowx,
        &[
            "compare",
            "-f",
            base_fmt,
            "-F",
            base_fmt,
            q.to_str().unwrap(),
            x.to_str().unwrap(),
        ],
    );
    assert_code(&cmp, 0, "qemu-img compare of the two bases");
    assert_eq!(virtual_size(&t.qemu, &base), virtual_size(&t.qcowx, &base));
    // Both tops read what they read before.
    for d in t.dirs() {
        assert_eq!(qemu_raw(d, "top.qcow2", None), before, "{}", d.display());
    }
    if base_fmt == "qcow2" {
        assert_qemu_check_clean(&t.qcowx, &base);
    }
    assert_qemu_check_clean(&t.qcowx, "top.qcow2");
    let map_after = map(&t.qcowx, "top.qcow2");
    if extra.contains(&"-d") {
        assert_eq!(map_after, map_before, "-d keeps the top as it was");
    } else {
        assert!(
            map_after.iter().all(|e| e["depth"] != 0),
            "the top stores nothing: {map_after:?}"
        );
    }
    t
}

#[test]
fn commit_into_a_qcow2_base_matches_qemu_img() {
    commit_like_qemu("qcow2", "4M", &[]);
}

#[test]
fn commit_into_a_raw_base_matches_qemu_img() {
    commit_like_qemu("raw", "4M", &[]);
}

#[test]
fn commit_with_dash_f_and_dash_p_matches_qemu_img() {
    commit_like_qemu("qcow2", "4M", &["-f", "qcow2", "-p"]);
}

#[test]
fn commit_of_an_extended_l2_top_matches_qemu_img() {
    commit_like_qemu_with("raw", "4M", &[], "extended_l2=on");
    commit_like_qemu_with("qcow2", "4M", &[], "extended_l2=on");
}

#[test]
fn commit_of_a_version_2_top_needs_dash_d() {
    // qcowx writes no version 2 image: emptying the top is refused before the base is
    // written; with -d the top is only read.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    chain_with(d, "qcow2", "4M", "compat=0.10");
    let files = ["base.qcow2", "top.qcow2"];
    let before = bytes(d, &files);
    fails(d, &["commit", "top.qcow2"], &["top.qcow2", "version 2"]);
    assert_eq!(bytes(d, &files), before);
    commit_like_qemu_with("qcow2", "4M", &["-d"], "compat=0.10");
}

#[test]
fn commit_dash_d_keeps_the_top() {
    commit_like_qemu("qcow2", "4M", &["-d"]);
    commit_like_qemu("raw", "4M", &["-d"]);
}

#[test]
fn commit_dash_b_naming_the_backing_file_is_accepted() {
    let t = commit_like_qemu("qcow2", "4M", &["-b", "base.qcow2"]);
    // Spelled another way, it is still the same file.
    ok(&t.qcowx, &["commit", "-b", "./base.qcow2", "top.qcow2"]);
}

#[test]
fn commit_grows_a_smaller_base_as_qemu_img_does() {
    for fmt in ["qcow2", "raw"] {
        let t = commit_like_qemu(fmt, "8M", &[]);
        let base = format!("base.{fmt}");
        assert_eq!(virtual_size(&t.qemu, &base), 8 << 20);
        assert_eq!(virtual_size(&t.qcowx, &base), 8 << 20);
    }
}

#[test]
fn quiet_commit_prints_nothing() {
    let dir = tempfile::tempdir().unwrap();
    chain(dir.path(), "qcow2", "4M");
    let out = ok_quiet(dir.path(), &["-q", "commit", "top.qcow2"]);
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
}

/// The bytes of `files` in `dir`.
fn bytes(dir: &Path, files: &[&str]) -> Vec<Vec<u8>> {
    files
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect()
}

#[test]
fn commit_without_a_backing_file_fails_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    chain(d, "qcow2", "4M");
    let before = bytes(d, &["base.qcow2"]);
    assert!(!qemu_img(d, &["commit", "base.qcow2"]).status.success());
    let err = fails(
        d,
        &["commit", "base.qcow2"],
        &["base.qcow2", "no backing file"],
    );
    assert!(!err.contains("Image committed"));
    assert_eq!(bytes(d, &["base.qcow2"]), before);
}

#[test]
fn commit_dash_b_naming_another_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    chain(d, "qcow2", "4M");
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "other.qcow2", "4M"]);
    let files = ["base.qcow2", "top.qcow2", "other.qcow2"];
    let before = bytes(d, &files);
    assert!(!qemu_img(d, &["commit", "-b", "other.qcow2", "top.qcow2"])
        .status
        .success());
    fails(
        d,
        &["commit", "-b", "other.qcow2", "top.qcow2"],
        &["other.qcow2", "not the backing file", "base.qcow2"],
    );
    // A -b naming the top itself, or nothing at all, is refused too.
    fails(
        d,
        &["commit", "-b", "top.qcow2", "top.qcow2"],
        &["top.qcow2"],
    );
    fails(
        d,
        &["commit", "-b", "missing.qcow2", "top.qcow2"],
        &["missing.qcow2"],
    );
    assert_eq!(bytes(d, &files), before);
    // Formats other than qcow2 are a usage error.
    usage_error(d, &["commit", "-f", "raw", "top.qcow2"]);
}

#[test]
fn commit_into_a_locked_base_fails_and_changes_nothing() {
    for fmt in ["qcow2", "raw"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let base = chain(d, fmt, "8M");
        let files = [base.as_str(), "top.qcow2"];
        let before = bytes(d, &files);
        // qemu-io holds the base open for writing (QEMU's image locks).
        let mut holder = QemuIoSession::start(
            fmt,
            &d.join(&base),
            false,
            &d.join("qemu-io.log"),
            Duration::from_secs(10),
        );
        fails(d, &["commit", "top.qcow2"], &[base.as_str(), "locked"]);
        assert!(holder.finish(Duration::from_secs(10)));
        assert_eq!(bytes(d, &files), before, "{fmt}");
        // Once released, the commit goes through.
        ok(d, &["commit", "top.qcow2"]);
    }
}
