//! Version 2 (compat 0.10) images: the header extensions QEMU writes into them are read,
//! and `qcowx amend -o compat=1.1` upgrades them to version 3 as `qemu-img amend` does
//! (QEMU's iotest 261 upgrades images whose snapshot entries carry too little extra
//! data for version 3). Each upgrade is judged against QEMU's own on a copy of the same
//! image: `qemu-img check` clean, the same snapshots, the same bytes in every layer.

use qcowx_tests::cli::stderr;
use qcowx_tests::damaged::{snapshot_table, Case, IMAGE};
use qcowx_tests::{qemu_check, qemu_img_create, qemu_info, qemu_io_ok, require_qemu_tools};

const M4: u64 = 4 << 20;

/// `qcowx amend -o compat=1.1` on `x` and `qemu-img amend -o compat=1.1` on `q`.
fn upgrade_both(c: &Case, x: &str, q: &str) {
    let out = c.qcowx(&["amend", "-o", "compat=1.1", x]);
    qcowx_tests::cli::assert_ok(&out, &format!("{}: qcowx amend -o compat=1.1", c.name));
    let out = c.qemu_img(&["amend", "-o", "compat=1.1", q]);
    assert!(
        out.status.success(),
        "oracle: qemu-img amend: {}",
        stderr(&out)
    );
}

/// `x` (upgraded by qcowx) against `q` (upgraded by QEMU): version 3 with 16-bit
/// refcounts, checked clean, the same backing file and format, the same snapshots,
/// the same bytes in every layer as QEMU reads them, and qcowx reading what QEMU reads.
fn assert_upgraded_like_qemu(c: &Case, x: &str, q: &str, snapshots: &[&str]) {
    qemu_check(&c.path().join(x)).assert_clean(&format!("{}: qcowx's upgrade", c.name));
    let (xi, qi) = (
        qemu_info(&c.path().join(x), false),
        qemu_info(&c.path().join(q), false),
    );
    assert_eq!(xi["format-specific"]["data"]["compat"], "1.1", "{}", c.name);
    for key in ["refcount-bits", "compression-type", "lazy-refcounts"] {
        assert_eq!(
            xi["format-specific"]["data"][key], qi["format-specific"]["data"][key],
            "{}: {key}",
            c.name
        );
    }
    for key in [
        "backing-filename",
        "backing-filename-format",
        "virtual-size",
    ] {
        assert_eq!(xi[key], qi[key], "{}: {key}", c.name);
    }
    let names = |i: &serde_json::Value| -> Vec<String> {
        i["snapshots"]
            .as_array()
            .map(|a| a.iter().map(|s| s["name"].to_string()).collect())
            .unwrap_or_default()
    };
    assert_eq!(names(&xi), names(&qi), "{}: snapshots", c.name);
    let layers = std::iter::once(None).chain(snapshots.iter().map(|s| Some(*s)));
    for layer in layers {
        assert!(
            c.qemu_reads(x, layer) == c.qemu_reads(q, layer),
            "{}: QEMU reads {layer:?} differently after qcowx's upgrade than after its own",
            c.name
        );
    }
    c.reads_like_qemu(x, snapshots);
}

/// A version 2 image names its backing file's format in a header extension, as QEMU
/// writes it. A raw backing file whose first bytes look like a qcow2 header must still
/// read as raw: QEMU reads the extension, and so must qcowx.
#[test]
fn v2_header_extensions_are_read() {
    require_qemu_tools();
    let c = Case::create("v2-backing-format", M4, "");
    // The raw base: a qcow2 image's bytes, padded out to 4 MiB, with data after them.
    let fake = c.path().join("fake.qcow2");
    qemu_img_create(&fake, M4, "");
    let mut raw = std::fs::read(&fake).unwrap();
    raw.resize(M4 as usize, 0x6b);
    std::fs::write(c.path().join("base.raw"), &raw).unwrap();
    qemu_img_create(
        &c.img,
        M4,
        "compat=0.10,backing_file=base.raw,backing_fmt=raw",
    );
    qemu_io_ok("qcow2", &c.img, &["write -P 0x11 1M 64k"]);
    let info = qemu_info(&c.img, false);
    assert_eq!(info["backing-filename-format"], "raw", "oracle");
    assert!(
        c.qemu_reads(IMAGE, None)[..4] == *b"QFI\xfb",
        "oracle: the base reads raw"
    );
    c.reads_like_qemu(IMAGE, &[]);
    let out = c.qcowx(&["info", "--output", "json", IMAGE]);
    let x: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qcowx info JSON");
    assert_eq!(x["backing-filename-format"], "raw", "qcowx info: {x}");
}

/// A version 2 image with data, two snapshots and a backing file named with its
/// format: qcowx refuses to write it, naming the upgrade; `qcowx amend -o compat=1.1`
/// upgrades it as QEMU does; qcowx then writes and snapshots it, and QEMU checks it
/// clean.
#[test]
fn amend_compat_upgrades_like_qemu() {
    require_qemu_tools();
    let c = Case::create("v2-upgrade", M4, "");
    let base = c.path().join("base.qcow2");
    qemu_img_create(&base, M4, "");
    qemu_io_ok("qcow2", &base, &["write -P 0xbb 0 4M"]);
    qemu_img_create(
        &c.img,
        M4,
        "compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2",
    );
    c.qemu_io(&["write -P 0x01 0 256k"]);
    c.qemu_img(&["snapshot", "-c", "sn0", IMAGE]);
    c.qemu_io(&["write -P 0x02 128k 256k", "write -z 1M 64k"]);
    c.qemu_img(&["snapshot", "-c", "sn1", IMAGE]);
    c.qemu_io(&["write -P 0x03 2M 64k"]);
    let (x, q) = (c.copy("x"), c.copy("q"));

    let before = std::fs::read(c.path().join(&x)).unwrap();
    let out = c.qcowx_io(&x, &["write -P 0x04 0 64k"]);
    assert!(!out.status.success(), "qcowx wrote a version 2 image");
    assert!(
        stderr(&out).contains("qcowx amend -o compat=1.1"),
        "the refusal does not name the upgrade: {}",
        stderr(&out)
    );
    assert!(std::fs::read(c.path().join(&x)).unwrap() == before);

    upgrade_both(&c, &x, &q);
    assert_upgraded_like_qemu(&c, &x, &q, &["sn0", "sn1"]);

    // A version 3 image now: qcowx writes and snapshots it, and upgrading again
    // changes nothing.
    let out = c.qcowx_io(&x, &["write -P 0x05 3M 64k"]);
    qcowx_tests::cli::assert_ok(&out, "qcowx io after the upgrade");
    let out = c.qcowx(&["snapshot", &x, "sn2"]);
    qcowx_tests::cli::assert_ok(&out, "qcowx snapshot after the upgrade");
    qemu_check(&c.path().join(&x)).assert_clean("after qcowx wrote the upgraded image");
    let reads = c.qemu_reads(&x, None);
    let out = c.qcowx(&["amend", "-o", "compat=1.1", &x]);
    qcowx_tests::cli::assert_ok(&out, "a second upgrade");
    assert!(
        c.qemu_reads(&x, None) == reads,
        "a second upgrade changed what QEMU reads"
    );
    qemu_check(&c.path().join(&x)).assert_clean("after a second upgrade");
    assert!(
        c.qemu_reads(&x, Some("sn2")) == c.qemu_reads(&x, None),
        "the snapshot qcowx took after the upgrade"
    );
}

/// iotest 261's upgrade: a version 2 image whose snapshot entries carry no extra data,
/// 42 bytes of it (unknown to QEMU past the first 16) and 8 bytes (valid in version 2).
/// Version 3 wants at least 16 bytes (the 64-bit VM state size and the disk size) in
/// every entry: the upgrade completes the short entries with the values QEMU gives
/// them and keeps the long one byte for byte.
#[test]
fn amend_compat_completes_short_snapshot_entries() {
    require_qemu_tools();
    let c = Case::v2_uneven_snapshot_extra("261-upgrade", M4);
    let long = c.snapshot_table().1[1].extra.clone();
    assert_eq!(long.len(), 42);
    assert_eq!(qemu_check(&c.img).code, 0, "oracle: the v2 image is valid");
    let (x, q) = (c.copy("x"), c.copy("q"));

    upgrade_both(&c, &x, &q);
    assert_upgraded_like_qemu(&c, &x, &q, &["sn0", "sn1", "sn2"]);
    let (_, xe) = snapshot_table(&c.path().join(&x));
    let (_, qe) = snapshot_table(&c.path().join(&q));
    assert_eq!((xe.len(), qe.len()), (3, 3));
    for (i, (xs, qs)) in xe.iter().zip(&qe).enumerate() {
        assert!(xs.extra.len() >= 16, "entry {i}: {} bytes", xs.extra.len());
        assert_eq!(
            xs.extra[..16],
            qs.extra[..16],
            "entry {i}: VM state size and disk size"
        );
        assert_eq!(xs.id_name, qs.id_name, "entry {i}: ID and name");
    }
    assert_eq!(xe[1].extra, long, "the long entry's extra data");
}

/// An upgrade of a version 3 image changes nothing QEMU reads (the downgrade, and
/// what it refuses, is `tests/downgrade_v2.rs`).
#[test]
fn amend_compat_1_1_of_a_version_3_image_changes_nothing() {
    require_qemu_tools();
    let c = Case::create("v3-upgrade", M4, "");
    c.qemu_io(&["write -P 0x07 0 64k"]);
    let q = c.qemu_reads(IMAGE, None);
    let out = c.qcowx(&["amend", "-o", "compat=1.1", IMAGE]);
    qcowx_tests::cli::assert_ok(&out, "upgrading a version 3 image");
    assert!(c.qemu_reads(IMAGE, None) == q);
    qemu_check(&c.img).assert_clean("after upgrading a version 3 image");
}
