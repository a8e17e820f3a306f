//! End-to-end tests of `qcowx check` and `check --repair` against `qemu-img check` on
//! clean, leaked and corrupted images.

mod common;
use common::file_len;
use std::path::Path;

use qcowx_tests::cli::*;
use qcowx_tests::patch;
use serde_json::Value;

fn qemu_check_code(dir: &Path, file: &str) -> i32 {
    let out = qemu_img(dir, &["check", file]);
    out.status.code().unwrap_or(-1)
}

/// A qemu-img image with 128 KiB of data: header, refcount table, refcount block, L1,
/// L2 and two data clusters (clusters 0..=6, 16-bit refcounts in the block at 0x20000).
fn make_checked_image(d: &Path, name: &str) {
    assert_ok(
        &qemu_img(d, &["create", "-f", "qcow2", name, "16M"]),
        "qemu-img create",
    );
    qemu_io(d, "qcow2", name, &["write -P 7 0 128k"]);
    let map = qemu_img(d, &["map", "--output=json", name]);
    assert!(
        stdout(&map).contains("\"offset\": 327680"),
        "unexpected layout: {}",
        stdout(&map)
    );
    assert_eq!(file_len(&d.join(name)), 7 * 65536);
}

const REFBLOCK: u64 = 0x20000;

/// Adds a leak: cluster 7 (a new cluster at the end of the file) gets refcount 1.
fn make_leak(path: &Path) {
    patch(path, REFBLOCK + 2 * 7, &[0, 1]);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(8 * 65536).unwrap();
}

/// Adds a corruption: data cluster 5 (referenced) gets refcount 0.
fn make_corruption(path: &Path) {
    patch(path, REFBLOCK + 2 * 5, &[0, 0]);
}

fn qcowx_check_json(d: &Path, args: &[&str], code: i32) -> Value {
    let out = qcowx(d, args);
    assert_code(&out, code, &format!("{args:?}"));
    json(&out)
}

#[test]
fn check_clean_and_leaked_images_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_checked_image(d, "clean.qcow2");
    let ours = qcowx(d, &["check", "clean.qcow2"]);
    assert_code(&ours, 0, "check clean");
    let theirs = qemu_img(d, &["check", "clean.qcow2"]);
    assert_eq!(stdout(&ours), stdout(&theirs));
    let theirs = qemu_img(d, &["check", "--output=json", "clean.qcow2"]);
    assert_eq!(
        qcowx_check_json(d, &["check", "--output=json", "clean.qcow2"], 0),
        json(&theirs)
    );

    std::fs::copy(d.join("clean.qcow2"), d.join("leak.qcow2")).unwrap();
    make_leak(&d.join("leak.qcow2"));
    assert_eq!(
        qemu_check_code(d, "leak.qcow2"),
        3,
        "qemu-img sees the leak"
    );
    let ours = qcowx(d, &["check", "leak.qcow2"]);
    assert_code(&ours, 3, "check leak");
    let theirs = qemu_img(d, &["check", "leak.qcow2"]);
    assert_eq!(stdout(&ours), stdout(&theirs));
    assert!(stdout(&ours).contains("1 leaked clusters were found"));
    assert!(!stderr(&ours).is_empty(), "the leak is described on stderr");
    let theirs = qemu_img(d, &["check", "--output=json", "leak.qcow2"]);
    let ours = qcowx_check_json(d, &["check", "--output=json", "leak.qcow2"], 3);
    assert_eq!(ours, json(&theirs));
    assert_eq!(ours["leaks"], 1);

    // Repair, as JSON: leaks-fixed, then qemu-img finds nothing.
    std::fs::copy(d.join("leak.qcow2"), d.join("leak2.qcow2")).unwrap();
    let fixed = qcowx_check_json(d, &["check", "--repair", "--output=json", "leak.qcow2"], 0);
    assert_eq!(fixed["leaks-fixed"], 1);
    assert!(fixed.get("leaks").is_none(), "{fixed:#}");
    assert_qemu_check_clean(d, "leak.qcow2");
    assert_code(&qcowx(d, &["check", "leak.qcow2"]), 0, "check after repair");
    let cmp = qemu_img(d, &["compare", "leak.qcow2", "clean.qcow2"]);
    assert_code(&cmp, 0, "content after repair");

    // Repair, human: qemu-img's summary.
    let out = qcowx(d, &["check", "-r", "leak2.qcow2"]);
    assert_code(&out, 0, "check -r leak2");
    let text = stdout(&out);
    assert!(
        text.starts_with(
            "The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n    \
             0 corruptions\n\nDouble checking the fixed image now...\nNo errors were found"
        ),
        "{text}"
    );
    assert_qemu_check_clean(d, "leak2.qcow2");

    // --repair on a clean image changes nothing qemu-img can see.
    let before = std::fs::read(d.join("clean.qcow2")).unwrap();
    let out = qcowx_check_json(d, &["check", "--repair", "--output=json", "clean.qcow2"], 0);
    assert!(out.get("leaks-fixed").is_none() && out.get("corruptions-fixed").is_none());
    assert_eq!(std::fs::read(d.join("clean.qcow2")).unwrap(), before);
}

#[test]
fn check_and_repair_a_corrupted_refcount() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_checked_image(d, "orig.qcow2");
    std::fs::copy(d.join("orig.qcow2"), d.join("bad.qcow2")).unwrap();
    make_corruption(&d.join("bad.qcow2"));
    assert_eq!(
        qemu_check_code(d, "bad.qcow2"),
        2,
        "qemu-img sees the corruption"
    );

    let out = qcowx(d, &["check", "bad.qcow2"]);
    assert_code(&out, 2, "check bad");
    assert!(
        stdout(&out).contains("errors were found on the image.\nData may be corrupted"),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("0x50000"), "{}", stderr(&out));
    let ours = qcowx_check_json(d, &["check", "--output=json", "bad.qcow2"], 2);
    let theirs = json(&qemu_img(d, &["check", "--output=json", "bad.qcow2"]));
    assert!(ours["corruptions"].as_u64().unwrap() >= 1, "{ours:#}");
    for key in [
        "filename",
        "format",
        "check-errors",
        "total-clusters",
        "allocated-clusters",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    // A read-only check changes nothing.
    assert_eq!(qemu_check_code(d, "bad.qcow2"), 2);

    std::fs::copy(d.join("bad.qcow2"), d.join("bad2.qcow2")).unwrap();
    let fixed = qcowx_check_json(d, &["check", "--repair", "--output=json", "bad.qcow2"], 0);
    assert!(
        fixed["corruptions-fixed"].as_u64().unwrap() >= 1,
        "{fixed:#}"
    );
    assert!(fixed.get("corruptions").is_none(), "{fixed:#}");
    assert_qemu_check_clean(d, "bad.qcow2");
    let cmp = qemu_img(d, &["compare", "bad.qcow2", "orig.qcow2"]);
    assert_code(&cmp, 0, "content after repair");

    let out = qcowx(d, &["check", "--repair", "bad2.qcow2"]);
    assert_code(&out, 0, "check --repair bad2");
    assert!(
        stdout(&out).contains("corruptions\n\nDouble checking the fixed image now...\nNo errors")
    );
    assert_qemu_check_clean(d, "bad2.qcow2");
}

/// qemu-img's repair modes: `-r all` and `-r leaks` (a separate word after -r, as
/// qemu-img takes it) and `--repair=MODE`. On a leaked image both repair it, as
/// `qemu-img check -r leaks` does; on a corrupted one `-r leaks` changes nothing and
/// reports the corruption (exit 2), where `-r all` repairs it.
#[test]
fn check_takes_qemu_img_repair_modes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_checked_image(d, "clean.qcow2");
    for (i, args) in [
        &["-r", "leaks"][..],
        &["-r", "all"],
        &["--repair=leaks"],
        &["--repair", "all"],
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("leak{i}.qcow2");
        std::fs::copy(d.join("clean.qcow2"), d.join(&name)).unwrap();
        make_leak(&d.join(&name));
        let mut all = vec!["check", "--output=json"];
        all.extend(args);
        all.push(&name);
        let fixed = qcowx_check_json(d, &all, 0);
        assert_eq!(fixed["leaks-fixed"], 1, "{args:?}: {fixed:#}");
        assert_qemu_check_clean(d, &name);
    }

    std::fs::copy(d.join("clean.qcow2"), d.join("bad.qcow2")).unwrap();
    make_corruption(&d.join("bad.qcow2"));
    make_leak(&d.join("bad.qcow2"));
    let before = std::fs::read(d.join("bad.qcow2")).unwrap();
    let out = qcowx(d, &["check", "-r", "leaks", "bad.qcow2"]);
    assert_code(&out, 2, "check -r leaks of a corrupted image");
    assert!(
        stderr(&out).contains("-r leaks repairs leaks only"),
        "{}",
        stderr(&out)
    );
    assert!(
        std::fs::read(d.join("bad.qcow2")).unwrap() == before,
        "-r leaks changed a corrupted image"
    );
    assert_eq!(qemu_check_code(d, "bad.qcow2"), 2, "qemu-img still sees it");
    let fixed = qcowx_check_json(d, &["check", "-r", "all", "--output=json", "bad.qcow2"], 0);
    assert!(
        fixed["corruptions-fixed"].as_u64().unwrap() >= 1,
        "{fixed:#}"
    );
    assert_qemu_check_clean(d, "bad.qcow2");

    // A mode is one of the two; -r before the file still means a full repair.
    let err = usage_error(d, &["check", "--repair=some", "clean.qcow2"]);
    assert!(err.contains("leaks") && err.contains("all"), "{err}");
    assert_code(
        &qcowx(d, &["check", "-r", "clean.qcow2"]),
        0,
        "check -r FILE",
    );
}

/// QEMU's iotest 039: an image QEMU left dirty (lazy refcounts, killed after a write).
/// `check` finds what `qemu-img check` finds; `check -r all` (run on a copy beside
/// qemu-img's on another) repairs it, clears the dirty bit and reports what it fixed
/// as qemu-img does — the OFLAG_COPIED error judged on the stale count goes with the
/// count, not on its own — and the data reads as written.
#[test]
fn a_dirty_image_qemu_left_is_repaired_and_counted_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let opts = "compat=1.1,lazy_refcounts=on";
    qemu_ok(
        d,
        &["create", "-q", "-f", "qcow2", "-o", opts, "d.qcow2", "128M"],
    );
    let args = ["-c", "write -P 0x5a 0 512", "-c", "sigraise 9", "d.qcow2"];
    let killed = run("qemu-io", &args, d);
    assert!(!killed.status.success(), "qemu-io was killed: {killed:?}");
    let dirty = |file: &str| std::fs::read(d.join(file)).unwrap()[79] & 1 == 1;
    assert!(dirty("d.qcow2"), "oracle: QEMU left the dirty bit set");

    let theirs = json(&qemu_img(d, &["check", "--output=json", "d.qcow2"]));
    let ours = qcowx_check_json(d, &["check", "--output=json", "d.qcow2"], 2);
    assert_eq!(
        ours["corruptions"], theirs["corruptions"],
        "{ours:#} {theirs:#}"
    );
    assert!(dirty("d.qcow2"), "a check changes nothing");

    for f in ["by-qemu.qcow2", "by-qcowx.qcow2"] {
        std::fs::copy(d.join("d.qcow2"), d.join(f)).unwrap();
    }
    let theirs = json(&qemu_img(
        d,
        &["check", "-r", "all", "--output=json", "by-qemu.qcow2"],
    ));
    let args = ["check", "-r", "all", "--output=json", "by-qcowx.qcow2"];
    let ours = qcowx_check_json(d, &args, 0);
    assert!(
        theirs["corruptions-fixed"].as_u64() >= Some(1),
        "{theirs:#}"
    );
    for key in ["corruptions-fixed", "leaks-fixed", "corruptions", "leaks"] {
        assert_eq!(ours.get(key), theirs.get(key), "{key}: {ours:#} {theirs:#}");
    }
    assert!(!dirty("by-qcowx.qcow2"), "the repair clears the dirty bit");
    assert_qemu_check_clean(d, "by-qcowx.qcow2");
    qemu_io(d, "qcow2", "by-qcowx.qcow2", &["read -P 0x5a 0 512"]);
}
