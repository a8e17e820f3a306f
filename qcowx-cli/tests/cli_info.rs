//! End-to-end tests of `qcowx info`: its JSON and human output against `qemu-img info`
//! on qcowx and QEMU images, with snapshots, backing files and version 2, and image
//! locks with `-U`.

mod common;
use common::qemu_info;
use std::path::Path;

use qcowx_tests::cli::*;

const INFO_KEYS: &[&str] = &[
    "filename",
    "format",
    "virtual-size",
    "actual-size",
    "cluster-size",
    "dirty-flag",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "snapshots",
    "format-specific",
    "children",
];

const SNAPSHOT_KEYS: &[&str] = &[
    "id",
    "name",
    "vm-state-size",
    "date-sec",
    "date-nsec",
    "vm-clock-sec",
    "vm-clock-nsec",
];

/// Snapshot keys that both report exactly when the entry records them.
const OPTIONAL_SNAPSHOT_KEYS: &[&str] = &["icount"];

/// `qcowx info --output=json FILE` and `qemu-img info --output=json FILE` agree on
/// every field qcowx reports, and qcowx reports every field of [`INFO_KEYS`] that
/// qemu-img does.
fn assert_info_matches_qemu(d: &Path, file: &str) {
    let ours = qcowx(d, &["info", "--output=json", file]);
    assert_ok(&ours, &format!("qcowx info {file}"));
    let ours = json(&ours);
    let theirs = qemu_info(d, file);
    let ours_obj = ours.as_object().unwrap();
    for key in INFO_KEYS {
        assert_eq!(
            ours_obj.contains_key(*key),
            theirs.get(key).is_some(),
            "{file}: key {key} present in one output only\nours: {ours:#}\nqemu: {theirs:#}"
        );
    }
    for (key, v) in ours_obj {
        assert!(INFO_KEYS.contains(&key.as_str()), "unexpected key {key}");
        if key == "snapshots" {
            let ours_s = v.as_array().unwrap();
            let theirs_s = theirs["snapshots"].as_array().unwrap();
            assert_eq!(ours_s.len(), theirs_s.len(), "{file}: snapshot count");
            for (a, b) in ours_s.iter().zip(theirs_s) {
                for k in SNAPSHOT_KEYS {
                    assert!(a.get(k).is_some(), "{file}: snapshot key {k} missing");
                    assert_eq!(a[k], b[k], "{file}: snapshot field {k}");
                }
                for k in OPTIONAL_SNAPSHOT_KEYS {
                    assert_eq!(a.get(k), b.get(k), "{file}: snapshot field {k}");
                }
            }
        } else {
            assert_eq!(*v, theirs[key], "{file}: field {key}");
        }
    }
}

/// qemu-img's human `info` output, its protocol child node and the snapshot table's
/// ICOUNT column included.
fn human_info_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.trim_end().to_string())
        .collect()
}

fn assert_human_info_matches_qemu(d: &Path, file: &str) {
    let ours = qcowx(d, &["info", file]);
    assert_ok(&ours, &format!("qcowx info {file}"));
    let theirs = qemu_img(d, &["info", "-U", file]);
    assert_ok(&theirs, "qemu-img info");
    assert_eq!(
        human_info_lines(&stdout(&ours)),
        human_info_lines(&stdout(&theirs)),
        "{file}"
    );
}

#[test]
fn info_matches_qemu_img_on_a_qcowx_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(
        &qcowx(d, &["create", "--cluster-size", "4k", "a.qcow2", "96M"]),
        "create",
    );
    qemu_io(
        d,
        "qcow2",
        "a.qcow2",
        &["write -P 1 0 300k", "write -P 2 50M 1M"],
    );
    assert_info_matches_qemu(d, "a.qcow2");
    assert_human_info_matches_qemu(d, "a.qcow2");
    let ours = json(&qcowx(d, &["info", "--output=json", "a.qcow2"]));
    assert_eq!(ours["dirty-flag"], false);
    assert_eq!(ours["format-specific"]["type"], "qcow2");
    assert_eq!(ours["format-specific"]["data"]["refcount-bits"], 32);
    // The path as given is the filename, also when absolute.
    let abs = d.join("a.qcow2");
    assert_info_matches_qemu(d, abs.to_str().unwrap());
}

#[test]
fn info_matches_qemu_img_with_an_internal_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(
        &qemu_img(d, &["create", "-f", "qcow2", "s.qcow2", "32M"]),
        "qemu-img create",
    );
    qemu_io(d, "qcow2", "s.qcow2", &["write -P 3 0 1M"]);
    assert_ok(
        &qemu_img(d, &["snapshot", "-c", "s1", "s.qcow2"]),
        "snapshot s1",
    );
    qemu_io(d, "qcow2", "s.qcow2", &["write -P 4 512k 1M"]);
    assert_ok(
        &qemu_img(d, &["snapshot", "-c", "second one", "s.qcow2"]),
        "snapshot 2",
    );
    assert_info_matches_qemu(d, "s.qcow2");
    assert_human_info_matches_qemu(d, "s.qcow2");
    let ours = json(&qcowx(d, &["info", "--output=json", "s.qcow2"]));
    let snaps = ours["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[0]["name"], "s1");
    assert_eq!(snaps[0]["id"], "1");
    assert_eq!(snaps[1]["name"], "second one");
    let human = stdout(&qcowx(d, &["info", "s.qcow2"]));
    assert!(human.contains("Snapshot list:\nID      TAG"), "{human}");
}

#[test]
fn info_matches_qemu_img_with_backing_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    assert_ok(
        &qemu_img(d, &["create", "-f", "raw", "base.raw", "16M"]),
        "create base",
    );
    // A qemu-img overlay in a sub-folder: the full backing name differs from the stored
    // one.
    assert_ok(
        &qemu_img(
            d,
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "../base.raw",
                "-F",
                "raw",
                "sub/mid.qcow2",
            ],
        ),
        "create mid",
    );
    // A qcowx overlay over it, with a probed format.
    assert_ok(
        &qcowx(d, &["create", "-b", "sub/mid.qcow2", "top.qcow2", "16M"]),
        "create top",
    );
    for f in ["sub/mid.qcow2", "top.qcow2"] {
        assert_info_matches_qemu(d, f);
        assert_human_info_matches_qemu(d, f);
    }
    let mid = json(&qcowx(d, &["info", "--output=json", "sub/mid.qcow2"]));
    assert_eq!(mid["backing-filename"], "../base.raw");
    assert_eq!(mid["full-backing-filename"], "sub/../base.raw");
    assert_eq!(mid["backing-filename-format"], "raw");
    let abs = d.join("sub/mid.qcow2");
    assert_info_matches_qemu(d, abs.to_str().unwrap());
    // info does not open the backing chain: it works when the backing file is gone.
    std::fs::remove_file(d.join("base.raw")).unwrap();
    assert_info_matches_qemu(d, "sub/mid.qcow2");
}

#[test]
fn info_matches_qemu_img_on_a_version_2_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(
        &qemu_img(
            d,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "v2.qcow2",
                "8M",
            ],
        ),
        "create v2",
    );
    assert_info_matches_qemu(d, "v2.qcow2");
    assert_human_info_matches_qemu(d, "v2.qcow2");
}

#[test]
fn info_respects_image_locks_and_force_share() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(&qcowx(d, &["create", "busy.qcow2", "8M"]), "create");
    let path = d.join("busy.qcow2");
    let img = qcowx_core::Image::open_rw(&path).unwrap();
    img.write_at(&[9u8; 4096], 0).unwrap();
    for args in [
        &["info", "busy.qcow2"][..],
        &["info", "--output=json", "busy.qcow2"][..],
        &["check", "busy.qcow2"][..],
        &["check", "--repair", "busy.qcow2"][..],
        &["export", "busy.qcow2", "out.raw"][..],
    ] {
        let out = qcowx(d, args);
        assert_code(&out, 1, &format!("{args:?} on a locked image"));
        let err = stderr(&out);
        assert!(
            err.contains("busy.qcow2") && err.contains("locked"),
            "{args:?}: {err}"
        );
        // The holder is named: this test's process.
        assert!(
            err.contains(&format!("process {} (", std::process::id())),
            "{args:?}: {err}"
        );
    }
    // qemu-img agrees that the image is in use.
    let q = qemu_img(d, &["info", "busy.qcow2"]);
    assert_code(&q, 1, "qemu-img info on the locked image");
    for flag in ["-U", "--force-share"] {
        let out = qcowx(d, &["info", flag, "--output=json", "busy.qcow2"]);
        assert_ok(&out, &format!("info {flag}"));
        let v = json(&out);
        assert_eq!(v["virtual-size"], 8 << 20);
        assert_eq!(v["filename"], "busy.qcow2");
    }
    let out = qcowx(d, &["info", "-U", "busy.qcow2"]);
    assert_ok(&out, "human info -U");
    assert!(stdout(&out).contains("virtual size: 8 MiB (8388608 bytes)"));
    // -U cannot be combined with --repair.
    let out = qcowx(d, &["check", "-U", "--repair", "busy.qcow2"]);
    assert_code(&out, 2, "check -U --repair");
    img.close().unwrap();
    drop(img);
    assert_ok(&qcowx(d, &["info", "busy.qcow2"]), "info after close");
}

/// `info --backing-chain`: a qcowx image over a QEMU qcow2 layer in another folder
/// (named relatively) over a raw base. Each layer's JSON object and human section
/// agree with `qemu-img info --backing-chain`, top first, the layers named as QEMU
/// names them; without the option only the top is shown.
#[test]
fn info_backing_chain_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("lower")).unwrap();
    qemu_ok(d, &["create", "-q", "-f", "raw", "lower/base.raw", "8M"]);
    qemu_io(d, "raw", "lower/base.raw", &["write -P 3 1M 64k"]);
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "lower/mid.qcow2",
        ],
    );
    qemu_io(d, "qcow2", "lower/mid.qcow2", &["write -P 4 2M 64k"]);
    assert_ok(
        &qcowx(
            d,
            &[
                "create",
                "-b",
                "lower/mid.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        ),
        "qcowx create",
    );
    let ours = json(&qcowx(
        d,
        &["info", "--backing-chain", "--output=json", "top.qcow2"],
    ));
    let theirs = json(&qemu_ok(
        d,
        &["info", "--backing-chain", "--output=json", "top.qcow2"],
    ));
    let (ours, theirs) = (ours.as_array().unwrap(), theirs.as_array().unwrap());
    assert_eq!(ours.len(), 3, "{ours:#?}");
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(theirs) {
        for (key, v) in a.as_object().unwrap() {
            assert_eq!(*v, b[key], "layer {}: field {key}", a["filename"]);
        }
        for key in ["filename", "format", "virtual-size", "actual-size"] {
            assert!(a.get(key).is_some(), "layer {}: no {key}", a["filename"]);
        }
    }
    assert_eq!(ours[2]["filename"], "lower/base.raw");

    // Human: one section per layer, each as qemu-img's, its child node included.
    let sections = |text: &str| -> Vec<Vec<String>> {
        text.split("\n\n")
            .filter(|s| !s.trim().is_empty())
            .map(human_info_lines)
            .collect()
    };
    let ours = qcowx(d, &["info", "--backing-chain", "top.qcow2"]);
    assert_ok(&ours, "qcowx info --backing-chain");
    let theirs = qemu_ok(d, &["info", "--backing-chain", "top.qcow2"]);
    assert_eq!(sections(&stdout(&ours)), sections(&stdout(&theirs)));
    let single = json(&qcowx(d, &["info", "--output=json", "top.qcow2"]));
    assert_eq!(single["filename"], "top.qcow2");
}
