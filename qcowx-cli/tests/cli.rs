//! End-to-end tests of the `qcowx` binary, with QEMU's `qemu-img` and `qemu-io` as the
//! oracle.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use qcowx_tests::cli::*;
use qcowx_tests::patch;
use serde_json::Value;

fn qemu_info(dir: &Path, file: &str) -> Value {
    let out = qemu_img(dir, &["info", "-U", "--output=json", file]);
    assert_ok(&out, "qemu-img info");
    json(&out)
}

fn qemu_check_code(dir: &Path, file: &str) -> i32 {
    let out = qemu_img(dir, &["check", file]);
    out.status.code().unwrap_or(-1)
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

// ---- create ------------------------------------------------------------------------

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
    // A missing backing file is named.
    let out = qcowx(d, &["create", "-b", "nope.qcow2", "y.qcow2", "1M"]);
    assert_code(&out, 1, "missing backing file");
    assert!(stderr(&out).contains("nope.qcow2"), "{}", stderr(&out));
}

#[test]
fn missing_files_are_named_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["info", "missing.qcow2"][..],
        &["info", "--output=json", "missing.qcow2"][..],
        &["check", "missing.qcow2"][..],
        &["check", "--repair", "missing.qcow2"][..],
        &["export", "missing.qcow2", "out.raw"][..],
    ] {
        let out = qcowx(d, args);
        assert_code(&out, 1, &format!("{args:?}"));
        let err = stderr(&out);
        assert!(err.starts_with("qcowx: "), "{args:?}: {err}");
        assert!(err.contains("missing.qcow2"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", stdout(&out));
    }
    assert!(!d.join("out.raw").exists());
    // Not a qcow2 image: the header error names the file.
    std::fs::write(d.join("junk.img"), vec![7u8; 4096]).unwrap();
    let out = qcowx(d, &["info", "junk.img"]);
    assert_code(&out, 1, "info junk.img");
    assert!(stderr(&out).contains("junk.img"), "{}", stderr(&out));
}

// ---- info --------------------------------------------------------------------------

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
            }
        } else {
            assert_eq!(*v, theirs[key], "{file}: field {key}");
        }
    }
}

/// qemu-img's human `info` output up to its protocol child node, with the snapshot
/// table's ICOUNT column cut off (qcowx does not show it).
fn human_info_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_snapshots = false;
    for line in text.lines() {
        if line.starts_with("Child node") {
            break;
        }
        if line == "Snapshot list:" {
            in_snapshots = true;
        } else if line.starts_with("Format specific information:") {
            in_snapshots = false;
        }
        let line = if in_snapshots && line.len() > 69 {
            &line[..69]
        } else {
            line
        };
        lines.push(line.trim_end().to_string());
    }
    lines
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

// ---- check -------------------------------------------------------------------------

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

// ---- export ------------------------------------------------------------------------

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

// ---- process behaviour --------------------------------------------------------------

#[test]
fn a_closed_stdout_is_a_clean_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(
        &qemu_img(d, &["create", "-f", "qcow2", "p.qcow2", "1M"]),
        "create",
    );
    for args in [
        &["info", "p.qcow2"][..],
        &["info", "--output=json", "p.qcow2"][..],
        &["check", "p.qcow2"][..],
    ] {
        ok_into_closed_stdout(d, args);
    }
}

#[test]
fn help_and_version_exit_0_and_unknown_commands_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = qcowx(d, &["--help"]);
    assert_code(&out, 0, "--help");
    for cmd in ["create", "info", "check", "export"] {
        assert!(stdout(&out).contains(cmd), "{}", stdout(&out));
    }
    assert_code(&qcowx(d, &["--version"]), 0, "--version");
    assert_code(&qcowx(d, &["frobnicate"]), 2, "unknown command");
    assert_code(&qcowx(d, &[]), 2, "no command");
    assert_code(&qcowx(d, &["info", "--output=xml", "x"]), 2, "bad --output");
}
