//! Operations an image's refcounts cannot represent are refused before anything is
//! written, with a way out (`qcowx amend -o refcount_bits=`), as QEMU refuses them.

use qcowx_tests::cli::*;

/// A 16 MiB `a.qcow2` with `bits`-bit refcounts, made by QEMU.
fn create(d: &std::path::Path, bits: u32) {
    let opt = format!("refcount_bits={bits}");
    qemu_ok(d, &["create", "-f", "qcow2", "-o", &opt, "a.qcow2", "16M"]);
}

fn snapshot_names(dir: &std::path::Path, file: &str) -> usize {
    let out = qemu_img(dir, &["snapshot", "-l", file]);
    assert_ok(&out, "qemu-img snapshot -l");
    stdout(&out).lines().skip(2).count()
}

#[test]
fn a_snapshot_that_would_overflow_1_bit_refcounts_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, 1);
    qemu_io(d, "qcow2", "a.qcow2", &["write -P 0x5a 0 1M"]);
    let before = std::fs::read(d.join("a.qcow2")).unwrap();

    let err = fails(d, &["snapshot", "a.qcow2", "s1"], &["1-bit refcounts"]);
    assert!(
        err.contains("qcowx amend -o refcount_bits=16 a.qcow2"),
        "the way out is named: {err}"
    );
    assert_eq!(snapshot_names(d, "a.qcow2"), 0, "no snapshot was added");
    assert_qemu_check_clean(d, "a.qcow2");
    assert_eq!(
        std::fs::read(d.join("a.qcow2")).unwrap(),
        before,
        "the file is as it was"
    );
    // Widened, the same operations work.
    ok(d, &["amend", "-o", "refcount_bits=16", "a.qcow2"]);
    let info = json(&qemu_img(d, &["info", "--output=json", "a.qcow2"]));
    assert_eq!(info["format-specific"]["data"]["refcount-bits"], 16);
    ok(d, &["snapshot", "a.qcow2", "s1"]);
    ok(d, &["fork", "a.qcow2", "s1", "dev"]);
    assert_qemu_check_clean(d, "a.qcow2");
    assert_eq!(snapshot_names(d, "a.qcow2"), 2);

    // Narrowing back is refused while counts of 2 exist; the image stays as it was.
    fails(
        d,
        &["amend", "-o", "refcount_bits=1", "a.qcow2"],
        &["1-bit refcounts"],
    );
    assert_qemu_check_clean(d, "a.qcow2");
    let info = json(&qemu_img(d, &["info", "--output=json", "a.qcow2"]));
    assert_eq!(info["format-specific"]["data"]["refcount-bits"], 16);
    assert_eq!(info["dirty-flag"], false);
}

#[test]
fn amend_refuses_what_it_does_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["create", "a.qcow2", "1M"]);
    fails(
        d,
        &["amend", "-o", "refcount_bits=3", "a.qcow2"],
        &["1, 2, 4, 8, 16, 32 or 64"],
    );
    fails(
        d,
        &["amend", "-o", "compat=0.10", "a.qcow2"],
        &["compat=0.10"],
    );
    assert_qemu_check_clean(d, "a.qcow2");
}

#[test]
fn a_repair_that_cannot_succeed_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, 16);
    qemu_io(d, "qcow2", "a.qcow2", &["write -P 0x5a 0 1M"]);
    ok(d, &["snapshot", "a.qcow2", "s1"]);
    // Damage: the header now says 1-bit refcounts, which cannot count the clusters
    // the snapshot shares (2 references each).
    let path = d.join("a.qcow2");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[96..100].copy_from_slice(&0u32.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();

    // The check before the repair lists what it finds; then the repair is refused.
    let out = qcowx(d, &["check", "--repair", "a.qcow2"]);
    assert_code(&out, 1, "check --repair");
    assert!(
        stderr(&out).contains("qcowx: a.qcow2: cluster at offset")
            && stderr(&out).contains("more than 1-bit refcounts hold"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "a repair that cannot succeed leaves the image as it was"
    );
}
