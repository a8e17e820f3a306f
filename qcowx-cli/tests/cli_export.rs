//! End-to-end tests of `qcowx export` of a backing chain to raw and qcow2, judged by
//! `qemu-img convert` and `compare`, and its refusal to overwrite its own source.

mod common;
use common::{file_len, qemu_info};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use qcowx_tests::cli::*;

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// base.raw <- mid.qcow2 (qemu-img, 4 KiB clusters) <- top.qcow2 (qcowx), with data at
/// every level, zeroes over backing data and an odd virtual size.
fn make_chain(d: &Path) {
    let size = (48 << 20) + 3 * 512;
    let size = size.to_string();
    assert_ok(
        &qemu_img(d, &["create", "-f", "raw", "base.raw", &size]),
        "base",
    );
    qemu_io(
        d,
        "raw",
        "base.raw",
        &["write -P 0x11 0 2M", "write -P 0x12 40M 1M"],
    );
    assert_ok(
        &qemu_img(
            d,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "mid.qcow2",
                &size,
            ],
        ),
        "mid",
    );
    qemu_io(
        d,
        "qcow2",
        "mid.qcow2",
        &["write -P 0x21 1M 1M", "write -P 0x22 20M 333k"],
    );
    assert_ok(
        &qcowx(
            d,
            &[
                "create",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
                &size,
            ],
        ),
        "top",
    );
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x31 1536k 100k",
            "write -z 40M 64k",
            "write -P 0x32 30M 4k",
            "write -P 0 35M 1M",
            "write -P 0x33 48M 1536",
        ],
    );
}

#[test]
fn export_raw_flattens_the_chain_into_a_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_chain(d);
    let out = qcowx(d, &["export", "top.qcow2", "flat.raw"]);
    assert_code(&out, 0, "export raw");
    assert!(out.stdout.is_empty());
    assert_ok(
        &qemu_img(d, &["convert", "-O", "raw", "top.qcow2", "ref.raw"]),
        "qemu-img convert",
    );
    let ours = std::fs::read(d.join("flat.raw")).unwrap();
    let theirs = std::fs::read(d.join("ref.raw")).unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert!(ours == theirs, "raw export differs from qemu-img convert");
    let cmp = qemu_img(
        d,
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "top.qcow2",
            "flat.raw",
        ],
    );
    assert_code(&cmp, 0, "qemu-img compare");
    // About 4.4 MiB of data in a 48 MiB disk; the 1 MiB of written zeros stays a hole.
    let size = file_len(&d.join("flat.raw"));
    let used = allocated(&d.join("flat.raw"));
    assert!(
        used < 6 << 20,
        "raw export allocates {used} of {size} bytes"
    );

    // -O raw explicitly, over an existing larger file: it is replaced.
    std::fs::write(d.join("old.raw"), vec![0xeeu8; 60 << 20]).unwrap();
    let out = qcowx(d, &["export", "-O", "raw", "top.qcow2", "old.raw"]);
    assert_code(&out, 0, "export over an existing file");
    assert!(std::fs::read(d.join("old.raw")).unwrap() == theirs);
}

#[test]
fn export_qcow2_flattens_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_chain(d);
    let out = qcowx(d, &["export", "-O", "qcow2", "top.qcow2", "flat.qcow2"]);
    assert_code(&out, 0, "export qcow2");
    assert_qemu_check_clean(d, "flat.qcow2");
    let cmp = qemu_img(d, &["compare", "top.qcow2", "flat.qcow2"]);
    assert_code(&cmp, 0, "qemu-img compare top flat");
    let info = qemu_info(d, "flat.qcow2");
    assert!(info.get("backing-filename").is_none(), "{info:#}");
    let src = qemu_info(d, "top.qcow2");
    assert_eq!(info["virtual-size"], src["virtual-size"]);
    assert_eq!(info["cluster-size"], src["cluster-size"]);
    // Byte comparison through qemu-img's own flattening.
    assert_ok(
        &qemu_img(d, &["convert", "-O", "raw", "flat.qcow2", "a.raw"]),
        "convert flat",
    );
    assert_ok(
        &qemu_img(d, &["convert", "-O", "raw", "top.qcow2", "b.raw"]),
        "convert top",
    );
    assert!(std::fs::read(d.join("a.raw")).unwrap() == std::fs::read(d.join("b.raw")).unwrap());
    // Only data clusters are allocated: the written zeros are not.
    let used = file_len(&d.join("flat.qcow2"));
    assert!(used < 6 << 20, "qcow2 export is {used} bytes long");

    // A 4 KiB-cluster source gives a 4 KiB-cluster output.
    let out = qcowx(d, &["export", "-O", "qcow2", "mid.qcow2", "mid-flat.qcow2"]);
    assert_code(&out, 0, "export mid");
    assert_eq!(qemu_info(d, "mid-flat.qcow2")["cluster-size"], 4096);
    let cmp = qemu_img(d, &["compare", "mid.qcow2", "mid-flat.qcow2"]);
    assert_code(&cmp, 0, "qemu-img compare mid");
}

#[test]
fn export_refuses_to_destroy_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_chain(d);
    assert_ok(
        &qemu_img(d, &["convert", "-O", "raw", "top.qcow2", "ref.raw"]),
        "reference",
    );
    for args in [
        &["export", "top.qcow2", "top.qcow2"][..],
        &["export", "-O", "qcow2", "top.qcow2", "top.qcow2"][..],
        &["export", "top.qcow2", "mid.qcow2"][..],
        &["export", "-O", "qcow2", "top.qcow2", "base.raw"][..],
    ] {
        let out = qcowx(d, args);
        assert_code(&out, 1, &format!("{args:?}"));
        assert!(stderr(&out).starts_with("qcowx: "), "{}", stderr(&out));
    }
    assert_qemu_check_clean(d, "top.qcow2");
    let cmp = qemu_img(d, &["compare", "-F", "raw", "top.qcow2", "ref.raw"]);
    assert_code(&cmp, 0, "the chain is intact");
    // Bad output format: usage error.
    let out = qcowx(d, &["export", "-O", "vmdk", "top.qcow2", "x.vmdk"]);
    assert_code(&out, 2, "-O vmdk");
    // Output in a folder that does not exist: named.
    let out = qcowx(d, &["export", "top.qcow2", "no/such/dir/x.raw"]);
    assert_code(&out, 1, "missing output folder");
    assert!(
        stderr(&out).contains("no/such/dir/x.raw"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn export_of_an_empty_image_is_all_holes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&qcowx(d, &["create", "e.qcow2", "256M"]), "create");
    assert_code(&qcowx(d, &["export", "e.qcow2", "e.raw"]), 0, "export");
    let p: PathBuf = d.join("e.raw");
    assert_eq!(file_len(&p), 256 << 20);
    assert_eq!(allocated(&p), 0);
    let cmp = qemu_img(d, &["compare", "e.qcow2", "e.raw"]);
    assert_code(&cmp, 0, "compare");
}
