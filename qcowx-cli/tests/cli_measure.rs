//! `qcowx measure` against `qemu-img measure` on the same arguments: sizes, creation
//! options, qcow2 sources written by QEMU (data, zeros, a backing chain, a persistent
//! bitmap, a snapshot), raw sources with holes, and what is refused.

use std::path::Path;

use qcowx_tests::cli::*;
use serde_json::Value;

/// `qemu-img measure --output=json ARGS` and `qcowx measure --output=json ARGS`.
fn both(dir: &Path, args: &[&str]) -> (Value, Value) {
    let mut q = vec!["measure", "--output=json"];
    q.extend_from_slice(args);
    let qemu = json(&qemu_ok(dir, &q));
    let ours = json(&ok(dir, &q));
    (qemu, ours)
}

/// Both agree on `args` (refcounts of QEMU's default width).
fn agree(dir: &Path, args: &[&str]) {
    let (qemu, ours) = both(dir, args);
    assert_eq!(ours, qemu, "qcowx measure {args:?}");
}

#[test]
fn sizes_and_options_agree_with_qemu_img() {
    let d = qcowx_tests::tempdir();
    let d = d.path();
    for args in [
        &["--size", "16G", "-O", "qcow2", "-o", "refcount_bits=16"][..],
        &["--size", "1000", "-O", "qcow2", "-o", "refcount_bits=16"],
        &["--size", "0", "-O", "qcow2", "-o", "refcount_bits=16"],
        &[
            "--size",
            "1T",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=16,cluster_size=2M",
        ],
        &[
            "--size",
            "16G",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,refcount_bits=64",
        ],
        &[
            "--size",
            "3G",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=1,cluster_size=512",
        ],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=16,extended_l2=on",
        ],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=16,preallocation=full",
        ],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=16,preallocation=metadata",
        ],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=16,backing_file=x",
        ],
        &["--size", "1000", "-O", "raw"],
        &["--size", "5G", "-O", "raw", "-o", "preallocation=falloc"],
    ] {
        agree(d, args);
    }
    // The default is what `qcowx create` makes: 32-bit refcounts (16 TiB: QEMU's
    // numbers with refcount_bits=32).
    let (qemu, ours) = (
        json(&qemu_ok(
            d,
            &[
                "measure",
                "--output=json",
                "--size",
                "16T",
                "-O",
                "qcow2",
                "-o",
                "refcount_bits=32",
            ],
        )),
        json(&ok(d, &["measure", "--output=json", "--size", "16T"])),
    );
    assert_eq!(ours, qemu);
}

#[test]
fn images_qemu_wrote_measure_as_qemu_img_measures_them() {
    let d = qcowx_tests::tempdir();
    let d = d.path();
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "1G"]);
    qemu_io(
        d,
        "qcow2",
        "base.qcow2",
        &["write -P 1 0 1M", "write -P 2 100M 4k"],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "1G",
        ],
    );
    // Data over the base's, zeros over it, a write straddling two clusters.
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 3 512k 1M",
            "write -z 100M 64k",
            "write -P 4 300M 100k",
            "write -z 600M 2M",
        ],
    );
    for opts in [
        "refcount_bits=16",
        "refcount_bits=16,cluster_size=4k",
        "refcount_bits=16,cluster_size=1M",
    ] {
        agree(d, &["-O", "qcow2", "-o", opts, "top.qcow2"]);
        agree(d, &["-O", "qcow2", "-o", opts, "base.qcow2"]);
    }
    agree(d, &["-O", "raw", "top.qcow2"]);
    // A persistent bitmap adds its clusters; a snapshot is measured as it was.
    qemu_ok(
        d,
        &["bitmap", "--add", "-g", "4k", "top.qcow2", "dirty-tracking"],
    );
    qemu_ok(d, &["snapshot", "-c", "s1", "top.qcow2"]);
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 5 700M 3M"]);
    agree(d, &["-O", "qcow2", "-o", "refcount_bits=16", "top.qcow2"]);
    agree(
        d,
        &[
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=16",
            "-l",
            "snapshot.name=s1",
            "top.qcow2",
        ],
    );
    let (_, ours) = both(d, &["-O", "qcow2", "-o", "refcount_bits=16", "top.qcow2"]);
    assert!(ours["bitmaps"].as_u64().unwrap() > 0, "{ours}");
    // The human form has QEMU's lines.
    let human = stdout(&ok(d, &["measure", "-o", "refcount_bits=16", "top.qcow2"]));
    let qemu = stdout(&qemu_ok(d, &["measure", "-O", "qcow2", "top.qcow2"]));
    assert_eq!(human, qemu);
}

#[test]
fn raw_files_count_their_data_not_their_holes() {
    let d = qcowx_tests::tempdir();
    let d = d.path();
    let f = std::fs::File::create(d.join("disk.raw")).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    qemu_io(
        d,
        "raw",
        "disk.raw",
        &["write -P 9 1M 1M", "write -P 9 40M 4k"],
    );
    agree(
        d,
        &[
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=16",
            "-f",
            "raw",
            "disk.raw",
        ],
    );
    agree(d, &["-O", "qcow2", "-o", "refcount_bits=16", "disk.raw"]);
    let (_, ours) = both(d, &["-O", "qcow2", "-o", "refcount_bits=16", "disk.raw"]);
    assert!(ours.get("bitmaps").is_none(), "{ours}");
}

#[test]
fn what_cannot_be_measured_is_refused() {
    let d = qcowx_tests::tempdir();
    let d = d.path();
    // Too large for the clusters: QEMU refuses it too.
    fails(
        d,
        &["measure", "--size", "1P", "-o", "cluster_size=512"],
        &["too large"],
    );
    assert!(!qemu_img(
        d,
        &[
            "measure",
            "--size",
            "1P",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512"
        ]
    )
    .status
    .success());
    fails(
        d,
        &["measure", "--size", "1G", "-o", "cluster_size=3k"],
        &["cluster"],
    );
    fails(
        d,
        &["measure", "--size", "1G", "-o", "preallocation=some"],
        &["preallocation"],
    );
    fails(
        d,
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "raw",
            "-o",
            "cluster_size=64k",
        ],
        &["raw"],
    );
    fails(d, &["measure", "missing.qcow2"], &["missing.qcow2"]);
    usage_error(d, &["measure"]);
    usage_error(d, &["measure", "--size", "1G", "x.qcow2"]);
}

/// A metadata-preallocated image (every cluster has a host cluster, none was
/// written: the file holds holes there) measures as QEMU measures it: QEMU asks the
/// file system, and only the clusters written since count as data.
#[test]
fn metadata_preallocated_images_measure_as_qemu_img_measures_them() {
    let d = qcowx_tests::tempdir();
    let d = d.path();
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "pm.qcow2",
            "256M",
        ],
    );
    agree(d, &["-O", "qcow2", "-o", "refcount_bits=16", "pm.qcow2"]);
    qemu_io(
        d,
        "qcow2",
        "pm.qcow2",
        &["write -P 1 1M 64k", "write -P 2 9M 4k"],
    );
    agree(d, &["-O", "qcow2", "-o", "refcount_bits=16", "pm.qcow2"]);
    agree(d, &["-O", "raw", "pm.qcow2"]);
    let (_, ours) = both(d, &["-O", "qcow2", "-o", "refcount_bits=16", "pm.qcow2"]);
    // The two written clusters and the metadata, far from the 256 MiB of clusters.
    assert!(ours["required"].as_u64().unwrap() < 8 << 20, "{ours:#}");
}
