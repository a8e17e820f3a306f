//! `check` on images that were not closed cleanly: refcounts are compared as
//! `qemu-img check` compares them, so the counts of errors and leaks and the exit code
//! agree with it on the same file, and stale counts are told apart from damage.

use std::path::Path;
use std::sync::Arc;

use qcowx_core::{CreateOptions, Image};
use qcowx_tests::{qemu_check, qemu_img_ok, qemu_io_run, require_qemu_tools};

fn agrees_with_qemu(path: &Path, what: &str) -> qcowx_core::CheckReport {
    let ours = Image::open(path).unwrap().check().unwrap();
    let theirs = qemu_check(path);
    assert_eq!(
        (ours.corruptions, ours.leaks, ours.exit_code()),
        (
            theirs.count("corruptions"),
            theirs.count("leaks"),
            theirs.code
        ),
        "{what}: ours {:?}\nqemu-img: {}",
        ours.messages,
        String::from_utf8_lossy(&theirs.output.stderr)
    );
    ours
}

#[test]
fn a_crashed_qcowx_image_checks_as_qemu_img_checks_it() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let img = Arc::new(Image::create(&p, &CreateOptions::new(256 << 20)).unwrap());
    img.write_at(&[1; 1 << 20], 0).unwrap();
    img.close().unwrap();
    drop(img);
    let img = Arc::new(Image::open_rw(&p).unwrap());
    img.snapshot("default", "s").unwrap();
    img.write_at(&[2; 8192], 4096).unwrap();
    img.write_at(&[3; 1 << 20], 100 << 20).unwrap();
    img.flush().unwrap();
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&p, &crashed).unwrap();
    drop(img);

    let report = agrees_with_qemu(&crashed, "a qcowx image copied while open");
    assert!(report.dirty);
    assert!(
        report.corruptions > 0 && report.stale_corruptions == report.corruptions,
        "the stale refcounts are reported: {report:?}"
    );
    // Opening it for writing recovers it.
    Image::open_rw(&crashed).unwrap().close().unwrap();
    let report = agrees_with_qemu(&crashed, "after recovery");
    assert_eq!(report.exit_code(), 0);
}

#[test]
fn a_lazy_refcounts_image_qemu_left_dirty_checks_as_qemu_img_checks_it() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lazy.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,cluster_size=4096",
        p.to_str().unwrap(),
        "64M",
    ]);
    // qemu-io's `abort` ends the process as a crash would: the dirty bit stays.
    let out = qemu_io_run(
        "qcow2",
        &p,
        &["write -P 7 0 1M", "write -P 8 8M 64k", "abort"],
    );
    assert!(!out.status.success());
    let report = agrees_with_qemu(&p, "lazy refcounts, QEMU crashed");
    assert!(report.dirty, "QEMU left the dirty bit set");
    assert!(report.corruptions > 0, "{report:?}");
}
