//! `qcowx rebase -u` and `qcowx amend`'s header options (backing file, backing format,
//! lazy refcounts, size), judged by `qemu-img info`, `check` and the content QEMU
//! reads; what cannot be done is refused with the image as it was.

use std::path::Path;

use qcowx_tests::cli::*;
use serde_json::Value;

fn qemu_info(d: &Path, file: &str) -> Value {
    json(&qemu_ok(d, &["info", "--output=json", file]))
}

/// A 4 MiB raw base `base1.raw` (a pattern in its first MiB) and `top.qcow2` over it
/// with a cluster of its own.
fn overlay(d: &Path) {
    qemu_ok(d, &["create", "-q", "-f", "raw", "base1.raw", "4M"]);
    qemu_io(d, "raw", "base1.raw", &["write -P 0x11 0 1M"]);
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base1.raw",
            "-F",
            "raw",
            "top.qcow2",
            "4M",
        ],
    );
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 0x22 512k 64k"]);
}

/// [`overlay`], a copy of its base (`base2.raw`), and a snapshot of the top.
fn chain(d: &Path) {
    overlay(d);
    std::fs::copy(d.join("base1.raw"), d.join("base2.raw")).unwrap();
    ok(d, &["snapshot", "top.qcow2", "s1"]);
}

#[test]
fn rebase_unsafe_names_the_new_backing_file_and_reads_through_it() {
    let dir = qcowx_tests::tempdir();
    let d = dir.path();
    chain(d);
    let before = qemu_raw(d, "top.qcow2", None);
    let snap_before = qemu_raw(d, "top.qcow2", Some("s1"));
    ok(
        d,
        &["rebase", "-u", "-b", "base2.raw", "-F", "raw", "top.qcow2"],
    );
    let info = qemu_info(d, "top.qcow2");
    assert_eq!(info["backing-filename"], "base2.raw", "{info}");
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    assert_qemu_check_clean(d, "top.qcow2");
    // The old base is gone: everything reads through the new one, snapshots too.
    std::fs::remove_file(d.join("base1.raw")).unwrap();
    assert!(qemu_raw(d, "top.qcow2", None) == before);
    assert!(qemu_raw(d, "top.qcow2", Some("s1")) == snap_before);
    let ours = json(&ok(d, &["info", "--output=json", "top.qcow2"]));
    assert_eq!(ours["backing-filename"], "base2.raw", "{ours}");

    // -b "" removes the backing file: what the image does not hold reads as zeros.
    ok(d, &["rebase", "-u", "-b", "", "top.qcow2"]);
    let info = qemu_info(d, "top.qcow2");
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert_qemu_check_clean(d, "top.qcow2");
    let now = qemu_raw(d, "top.qcow2", None);
    assert!(now[..512 << 10].iter().all(|&b| b == 0));
    assert!(now[512 << 10..576 << 10].iter().all(|&b| b == 0x22));
}

#[test]
fn what_rebase_and_amend_cannot_do_is_refused_and_changes_nothing() {
    let dir = qcowx_tests::tempdir();
    let d = dir.path();
    chain(d);
    let file = || std::fs::read(d.join("top.qcow2")).unwrap();
    let before = file();
    // A name QEMU would not accept.
    let long = "b".repeat(1024);
    fails(d, &["rebase", "-u", "-b", &long, "top.qcow2"], &["1023"]);
    fails(
        d,
        &["amend", "-o", "backing_fmt=vmdk", "top.qcow2"],
        &["vmdk"],
    );
    fails(d, &["amend", "-o", "size=1M", "top.qcow2"], &["shrinking"]);
    assert!(file() == before, "a refused change wrote to the image");
    usage_error(d, &["rebase", "-u", "top.qcow2"]);

    // A name that does not fit in a 512-byte header cluster.
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "small.qcow2",
            "1M",
        ],
    );
    let small = std::fs::read(d.join("small.qcow2")).unwrap();
    let name = "n".repeat(600);
    fails(
        d,
        &["rebase", "-u", "-b", &name, "small.qcow2"],
        &["do not fit"],
    );
    assert!(std::fs::read(d.join("small.qcow2")).unwrap() == small);
    assert_qemu_check_clean(d, "small.qcow2");
}

#[test]
fn amend_changes_backing_lazy_refcounts_and_size_as_qemu_img_amend_does() {
    let dir = qcowx_tests::tempdir();
    let d = dir.path();
    chain(d);
    ok(
        d,
        &[
            "amend",
            "-o",
            "backing_file=base2.raw,backing_fmt=raw",
            "top.qcow2",
        ],
    );
    assert_eq!(qemu_info(d, "top.qcow2")["backing-filename"], "base2.raw");
    // The format alone: the name stays.
    ok(d, &["amend", "-o", "backing_fmt=qcow2", "top.qcow2"]);
    let info = qemu_info(d, "top.qcow2");
    assert_eq!(info["backing-filename"], "base2.raw", "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    ok(d, &["amend", "-o", "backing_fmt=raw", "top.qcow2"]);

    ok(d, &["amend", "-o", "lazy_refcounts=on", "top.qcow2"]);
    let info = qemu_info(d, "top.qcow2");
    assert_eq!(
        info["format-specific"]["data"]["lazy-refcounts"], true,
        "{info}"
    );
    assert_qemu_check_clean(d, "top.qcow2");
    // QEMU writes to it and closes it; qcowx still opens, writes and checks it.
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 0x33 2M 64k"]);
    ok(d, &["io", "top.qcow2", "-c", "write -P 0x44 3M 64k"]);
    assert_qemu_check_clean(d, "top.qcow2");
    ok(
        d,
        &["amend", "-o", "lazy_refcounts=off,compat=1.1", "top.qcow2"],
    );
    let info = qemu_info(d, "top.qcow2");
    assert_eq!(
        info["format-specific"]["data"]["lazy-refcounts"], false,
        "{info}"
    );

    ok(d, &["amend", "-o", "size=8M", "top.qcow2"]);
    assert_eq!(qemu_info(d, "top.qcow2")["virtual-size"], 8 << 20);
    assert_qemu_check_clean(d, "top.qcow2");
    let data = qemu_raw(d, "top.qcow2", None);
    assert!(data[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0x33));
    assert!(data[3 << 20..(3 << 20) + 65536].iter().all(|&b| b == 0x44));
    assert!(data[..512 << 10].iter().all(|&b| b == 0x11));
}

/// `qcowx export [--vdi V] FILE OUT` read back.
fn export(d: &Path, args: &[&str]) -> Vec<u8> {
    let mut a = vec!["export"];
    a.extend_from_slice(args);
    a.extend(["top.qcow2", "out.raw"]);
    ok(d, &a);
    std::fs::read(d.join("out.raw")).unwrap()
}

#[test]
fn rebase_keeps_what_every_vdi_reads_and_never_changes_a_snapshot() {
    let dir = qcowx_tests::tempdir();
    let d = dir.path();
    overlay(d);
    // base3 differs from base1 in its first MiB; base4 from base3 at 2 MiB.
    qemu_ok(d, &["create", "-q", "-f", "raw", "base3.raw", "4M"]);
    qemu_io(d, "raw", "base3.raw", &["write -P 0x99 0 256k"]);
    std::fs::copy(d.join("base3.raw"), d.join("base4.raw")).unwrap();
    qemu_io(d, "raw", "base4.raw", &["write -P 0x77 2M 64k"]);
    // A second VDI whose snapshot is gone: both VDIs read through the backing file.
    ok(d, &["snapshot", "top.qcow2", "s0"]);
    ok(d, &["fork", "top.qcow2", "s0", "dev"]);
    ok(d, &["delete", "top.qcow2", "--snapshot", "s0"]);
    ok(
        d,
        &[
            "io",
            "--vdi",
            "dev",
            "top.qcow2",
            "-c",
            "write -P 0x33 3M 64k",
        ],
    );
    let default_before = export(d, &[]);
    let dev_before = export(d, &["--vdi", "dev"]);

    ok(d, &["rebase", "-b", "base3.raw", "-F", "raw", "top.qcow2"]);
    assert_eq!(qemu_info(d, "top.qcow2")["backing-filename"], "base3.raw");
    assert_qemu_check_clean(d, "top.qcow2");
    std::fs::remove_file(d.join("base1.raw")).unwrap();
    assert!(
        export(d, &[]) == default_before,
        "the default VDI reads otherwise"
    );
    assert!(
        export(d, &["--vdi", "dev"]) == dev_before,
        "VDI dev reads otherwise"
    );
    assert!(qemu_raw(d, "top.qcow2", None) == default_before);

    // A snapshot reading the range where base4 differs: refused, nothing written.
    ok(d, &["snapshot", "top.qcow2", "s1"]);
    let bytes = std::fs::read(d.join("top.qcow2")).unwrap();
    fails(
        d,
        &["rebase", "-b", "base4.raw", "top.qcow2"],
        &["snapshot 's1'", "0x200000"],
    );
    assert!(std::fs::read(d.join("top.qcow2")).unwrap() == bytes);
    // Without a backing file: everything the VDIs read from it is copied in.
    ok(d, &["delete", "top.qcow2", "--snapshot", "s1"]);
    ok(d, &["rebase", "-b", "", "top.qcow2"]);
    assert!(qemu_info(d, "top.qcow2").get("backing-filename").is_none());
    std::fs::remove_file(d.join("base3.raw")).unwrap();
    assert_qemu_check_clean(d, "top.qcow2");
    assert!(export(d, &[]) == default_before);
    assert!(export(d, &["--vdi", "dev"]) == dev_before);
}
