//! End-to-end tests of `qcowx create` (sizes, cluster sizes, raw and qcow2 backing
//! files, overwriting, bad arguments), with QEMU's `qemu-img` as the oracle.

mod common;
use common::qemu_info;

use qcowx_tests::cli::*;

#[test]
fn create_with_suffixed_sizes_agrees_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&str, Option<&str>, u64, u64)] = &[
        ("64M", None, 64 << 20, 65536),
        ("1.5G", Some("4K"), 3 << 29, 4096),
        ("8g", Some("64k"), 8 << 30, 65536),
        ("1T", Some("2M"), 1 << 40, 2 << 20),
        ("100000", Some("512"), 100_352, 512),
        ("3m", Some("1m"), 3 << 20, 1 << 20),
        ("2097152B", Some("16384"), 2 << 20, 16384),
        ("0x400000", None, 4 << 20, 65536),
        ("0X200000", Some("0x10000"), 2 << 20, 65536),
    ];
    for (i, (size, cs, want_size, want_cs)) in cases.iter().enumerate() {
        let name = format!("img{i}.qcow2");
        let mut args = vec!["create"];
        if let Some(cs) = cs {
            args.extend(["--cluster-size", cs]);
        }
        args.extend([name.as_str(), size]);
        let out = qcowx(d, &args);
        assert_ok(&out, &format!("qcowx {args:?}"));
        let line = stdout(&out);
        assert!(
            line.starts_with(&format!(
                "Formatting '{name}', fmt=qcow2 cluster_size={want_cs} "
            )),
            "{line}"
        );
        assert!(line.contains(&format!(" size={want_size} ")), "{line}");
        let info = qemu_info(d, &name);
        assert_eq!(info["virtual-size"], *want_size, "{args:?}");
        assert_eq!(info["cluster-size"], *want_cs, "{args:?}");
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
        assert_qemu_check_clean(d, &name);
    }
}

#[test]
fn create_over_raw_and_qcow2_backing_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(
        &qemu_img(d, &["create", "-f", "raw", "base.raw", "4M"]),
        "create raw",
    );
    qemu_io(d, "raw", "base.raw", &["write -P 0x5a 64k 128k"]);
    assert_ok(
        &qemu_img(d, &["create", "-f", "qcow2", "base.qcow2", "6M"]),
        "create qcow2",
    );
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 0xa5 1M 64k"]);

    // Raw backing with an explicit format.
    let out = qcowx(
        d,
        &[
            "create",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "ov-raw.qcow2",
            "4M",
        ],
    );
    assert_ok(&out, "create -b raw");
    assert!(
        stdout(&out).contains(" backing_file=base.raw backing_fmt=raw "),
        "{}",
        stdout(&out)
    );
    let info = qemu_info(d, "ov-raw.qcow2");
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(info["virtual-size"], 4 << 20);
    assert_qemu_check_clean(d, "ov-raw.qcow2");
    let cmp = qemu_img(d, &["compare", "ov-raw.qcow2", "base.raw"]);
    assert_code(&cmp, 0, "qemu-img compare ov-raw base.raw");

    // qcow2 backing: -F given, then probed, then with the size taken from the backing file.
    for (name, args) in [
        (
            "ov-q1.qcow2",
            vec![
                "create",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "ov-q1.qcow2",
                "6M",
            ],
        ),
        (
            "ov-q2.qcow2",
            vec!["create", "-b", "base.qcow2", "ov-q2.qcow2", "6M"],
        ),
        (
            "ov-q3.qcow2",
            vec!["create", "--backing", "base.qcow2", "ov-q3.qcow2"],
        ),
    ] {
        assert_ok(&qcowx(d, &args), &format!("{args:?}"));
        let info = qemu_info(d, name);
        assert_eq!(info["backing-filename"], "base.qcow2", "{args:?}");
        assert_eq!(info["backing-filename-format"], "qcow2", "{args:?}");
        assert_eq!(info["virtual-size"], 6 << 20, "{args:?}");
        assert_qemu_check_clean(d, name);
        let cmp = qemu_img(d, &["compare", name, "base.qcow2"]);
        assert_code(&cmp, 0, &format!("qemu-img compare {name} base.qcow2"));
    }

    // A backing file in another folder, named relative to the new image.
    std::fs::create_dir(d.join("sub")).unwrap();
    let out = qcowx(
        d,
        &[
            "create",
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            "sub/ov.qcow2",
        ],
    );
    assert_ok(&out, "create sub/ov.qcow2");
    let cmp = qemu_img(d, &["compare", "sub/ov.qcow2", "base.qcow2"]);
    assert_code(&cmp, 0, "qemu-img compare sub/ov.qcow2 base.qcow2");
}

#[test]
fn create_refuses_an_existing_file_unless_told_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("x.qcow2"), b"not an image").unwrap();
    let out = qcowx(d, &["create", "x.qcow2", "1M"]);
    assert_code(&out, 1, "create over an existing file");
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert_eq!(std::fs::read(d.join("x.qcow2")).unwrap(), b"not an image");
    assert_ok(
        &qcowx(d, &["create", "--overwrite", "x.qcow2", "1M"]),
        "create --overwrite",
    );
    assert_qemu_check_clean(d, "x.qcow2");
    // An image is refused too: qemu-img create would replace it.
    let out = qcowx(d, &["create", "x.qcow2", "2M"]);
    assert_code(&out, 1, "create over an image");
}

#[test]
fn create_rejects_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (size, why) in [
        ("12Q", "unknown suffix 'Q'"),
        ("-1", "negative"),
        ("", "empty"),
        ("1.5", "fraction needs a suffix"),
        ("1KiB", "unknown suffix 'KiB'"),
        ("0x10M", "hexadecimal"),
    ] {
        let out = qcowx(d, &["create", "x.qcow2", size]);
        assert_code(&out, 2, &format!("create with size {size:?}"));
        let err = stderr(&out);
        assert!(
            err.contains("invalid value") && err.contains(why),
            "{size:?}: {err}"
        );
        assert!(!d.join("x.qcow2").exists(), "{size:?} created a file");
    }
    // Usage errors: -F without -b, no size and no backing file, an unknown format.
    for args in [
        &["create", "-F", "raw", "x.qcow2", "1M"][..],
        &["create", "x.qcow2"][..],
        &["create", "-b", "b", "-F", "vmdk", "x.qcow2", "1M"][..],
        &["create", "--cluster-size", "12Q", "x.qcow2", "1M"][..],
    ] {
        let out = qcowx(d, args);
        assert_code(&out, 2, &format!("{args:?}"));
        assert!(!d.join("x.qcow2").exists(), "{args:?} created a file");
    }
    // Values the library refuses: exit 1 with the reason.
    let out = qcowx(d, &["create", "--cluster-size", "3000", "x.qcow2", "1M"]);
    assert_code(&out, 1, "cluster size 3000");
    assert!(stderr(&out).starts_with("qcowx: "), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cluster size 3000"),
        "{}",
        stderr(&out)
    );
    let out = qcowx(d, &["create", "x.qcow2", "1E"]);
    assert_code(&out, 1, "size 1E");
    assert!(
        stderr(&out).contains("larger than the maximum"),
        "{}",
        stderr(&out)
    );
    // QEMU's options for features qcowx does not have are refused by name.
    for (o, why) in [
        ("data_file=x.raw", "external data files"),
        ("data_file_raw=on", "external data files"),
        ("encrypt.format=luks", "encryption"),
        ("encryption=on", "encryption"),
    ] {
        let out = qcowx(d, &["create", "-o", o, "x.qcow2", "1M"]);
        assert_code(&out, 1, o);
        assert!(stderr(&out).contains(why), "{o}: {}", stderr(&out));
        assert!(!d.join("x.qcow2").exists(), "{o} created a file");
    }
    // A missing backing file is named.
    let out = qcowx(d, &["create", "-b", "nope.qcow2", "y.qcow2", "1M"]);
    assert_code(&out, 1, "missing backing file");
    assert!(stderr(&out).contains("nope.qcow2"), "{}", stderr(&out));
}

#[test]
fn an_empty_disk_has_no_l1_table_and_grows_clean() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["create", "zero.qcow2", "0"]);
    qemu_ok(d, &["create", "-f", "qcow2", "qemu.qcow2", "0"]);
    // No cluster for an empty L1 table: nothing leaks, and the file is QEMU's length.
    assert_qemu_check_clean(d, "zero.qcow2");
    let len = |f: &str| std::fs::metadata(d.join(f)).unwrap().len();
    assert_eq!(len("zero.qcow2"), len("qemu.qcow2"));
    ok(d, &["snapshot", "zero.qcow2", "empty"]);
    ok(d, &["resize", "zero.qcow2", "1M"]);
    ok(d, &["io", "zero.qcow2", "-c", "write -P 0x5a 0 4k"]);
    assert_qemu_check_clean(d, "zero.qcow2");
    let bytes = qemu_raw(d, "zero.qcow2", None);
    assert_eq!(bytes.len(), 1 << 20);
    assert!(bytes[..4096].iter().all(|&b| b == 0x5a));
}

#[test]
fn preallocation_lays_out_the_image_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let len = |f: &str| std::fs::metadata(d.join(f)).unwrap().len();
    let used = |f: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(d.join(f)).unwrap().blocks() * 512
    };
    let map = |f: &str| qemu_ok(d, &["map", "--output=json", f]).stdout;
    for mode in ["metadata", "falloc", "full"] {
        for ext in ["off", "on"] {
            let o = format!("preallocation={mode},extended_l2={ext},refcount_bits=16");
            let (q, x) = (
                format!("q-{mode}-{ext}.qcow2"),
                format!("x-{mode}-{ext}.qcow2"),
            );
            let said = stdout(&qemu_ok(d, &["create", "-f", "qcow2", "-o", &o, &q, "5M"]));
            let line = stdout(&ok(d, &["create", "-o", &o, &x, "5M"]));
            assert_eq!(line, said.replace(&q, &x), "{o}: the Formatting line");
            assert_qemu_check_clean(d, &x);
            // The same file length and the same map: every cluster allocated, reading
            // as zeros.
            assert_eq!(len(&x), len(&q), "{o}");
            assert_eq!(map(&x), map(&q), "{o}");
            // falloc and full reserve the data area; metadata leaves it a hole.
            if mode == "metadata" {
                assert!(used(&x) < 1 << 20, "{o}: {} bytes used", used(&x));
            } else {
                assert!(used(&x) >= 5 << 20, "{o}: {} bytes used", used(&x));
            }
        }
    }
    // The preallocated clusters are written in place, and snapshots still copy.
    let x = "x-metadata-off.qcow2";
    ok(d, &["io", x, "-c", "write -P 5 100k 8k"]);
    ok(d, &["snapshot", x, "s1"]);
    ok(d, &["io", x, "-c", "write -P 6 100k 4k"]);
    assert_qemu_check_clean(d, x);
    let now = qemu_raw(d, x, None);
    let then = qemu_raw(d, x, Some("s1"));
    assert!(now[100 << 10..104 << 10].iter().all(|&b| b == 6));
    assert!(now[104 << 10..108 << 10].iter().all(|&b| b == 5));
    assert!(then[100 << 10..108 << 10].iter().all(|&b| b == 5));

    // With a backing file only on extended L2 entries, whose subclusters read
    // through until written (QEMU's rule).
    qemu_ok(d, &["create", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 9 0 1M"]);
    let refused = qcowx(
        d,
        &[
            "create",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "o.qcow2",
            "4M",
        ],
    );
    assert_code(
        &refused,
        1,
        "preallocation over a backing file without extended_l2",
    );
    assert!(!d.join("o.qcow2").exists());
    ok(
        d,
        &[
            "create",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "preallocation=falloc,extended_l2=on",
            "o.qcow2",
            "4M",
        ],
    );
    ok(d, &["io", "o.qcow2", "-c", "write -P 3 4k 4k"]);
    assert_qemu_check_clean(d, "o.qcow2");
    let o = qemu_raw(d, "o.qcow2", None);
    assert!(o[..4096].iter().all(|&b| b == 9));
    assert!(o[4096..8192].iter().all(|&b| b == 3));
    assert!(o[8192..1 << 20].iter().all(|&b| b == 9));
    assert!(o[1 << 20..].iter().all(|&b| b == 0));
}

#[test]
fn lazy_refcounts_is_a_creation_option_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lazy = |f: &str| {
        json(&qemu_ok(d, &["info", "--output=json", f]))["format-specific"]["data"]
            ["lazy-refcounts"]
            .clone()
    };
    for on in ["on", "off"] {
        let (q, x) = (format!("q-{on}.qcow2"), format!("x-{on}.qcow2"));
        let o = format!("lazy_refcounts={on}");
        qemu_ok(d, &["create", "-f", "qcow2", "-o", &o, &q, "1M"]);
        ok(d, &["create", "-o", &o, &x, "1M"]);
        assert_eq!(lazy(&x), lazy(&q), "{o}");
        assert_eq!(lazy(&x), on == "on", "{o}");
        ok(d, &["io", &x, "-c", "write -P 1 0 64k"]);
        assert_qemu_check_clean(d, &x);
    }
    usage_or_error(
        d,
        &["create", "-o", "lazy_refcounts=maybe", "bad.qcow2", "1M"],
    );
    assert!(!d.join("bad.qcow2").exists());
}

/// `args` fail.
fn usage_or_error(d: &std::path::Path, args: &[&str]) {
    assert!(!qcowx(d, args).status.success(), "{args:?} succeeded");
}
