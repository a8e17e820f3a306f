//! `qcowx resize` and `qcowx rename`: growing images (and refusing to shrink them),
//! renaming snapshots and VDIs with their identity and lineage kept, and both refused
//! on a read-only file.

use std::path::Path;
use std::process::{Command, Output};

use qcowx_tests::cli::*;
use serde_json::Value;

mod common;
use common::{CS, QCOWX};

/// Whether the tests run as root (chmod does not stop root).
fn is_root(d: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let p = d.join("root-probe");
    std::fs::write(&p, b"x").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
    let writable = std::fs::OpenOptions::new().write(true).open(&p).is_ok();
    std::fs::remove_file(&p).unwrap();
    writable
}

fn virtual_size(d: &Path, file: &str) -> u64 {
    json(&qemu_ok(d, &["info", "-U", "--output=json", file]))["virtual-size"]
        .as_u64()
        .unwrap()
}

#[test]
fn resize_grows_and_refuses_to_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_quiet(d, &["create", "r.qcow2", "1M"]);
    ok_quiet(d, &["io", "r.qcow2", "-c", "write -P 5 0 64k"]);
    ok_quiet(d, &["snapshot", "r.qcow2", "small"]);
    let out = ok_quiet(d, &["resize", "r.qcow2", "2M"]);
    assert_eq!(stdout(&out), "Image resized.\n");
    assert_eq!(virtual_size(d, "r.qcow2"), 2 << 20);
    let v = json(&ok_quiet(
        d,
        &["resize", "--output=json", "r.qcow2", "+1.5M"],
    ));
    assert_eq!(v["old-size"], 2 << 20);
    assert_eq!(v["new-size"], (7 << 20) / 2);
    assert_eq!(v["filename"], "r.qcow2");
    let raw = qemu_raw(d, "r.qcow2", Some("small"));
    assert!(raw[..CS as usize].iter().all(|&b| b == 5));
    // Large sizes need a bigger L1 table.
    ok_quiet(d, &["resize", "r.qcow2", "+100G"]);
    assert_eq!(virtual_size(d, "r.qcow2"), (100 << 30) + (7 << 20) / 2);
    // Rounded up to 512.
    ok_quiet(d, &["-q", "resize", "r.qcow2", "+1000"]);
    assert_eq!(virtual_size(d, "r.qcow2") % 512, 0);
    assert_qemu_check_clean(d, "r.qcow2");
    let list = json(&ok_quiet(d, &["list", "--output=json", "r.qcow2"]));
    assert_eq!(
        list["roots"][1]["virtual-size"],
        1 << 20,
        "the snapshot keeps its size"
    );
    // Shrinking is refused with a reason, and changes nothing.
    let size = virtual_size(d, "r.qcow2");
    for args in [
        &["resize", "r.qcow2", "-1M"][..],
        &["resize", "r.qcow2", "1M"][..],
    ] {
        fails_quiet(d, 1, args, &["r.qcow2", "shrinking", "only grows"]);
    }
    assert_eq!(virtual_size(d, "r.qcow2"), size);
    // Bad sizes are usage errors.
    for bad in ["12Q", "+", "abc", "--1M", "99999E"] {
        let err = usage_error(d, &["resize", "r.qcow2", bad]);
        assert!(err.contains(bad), "{bad}: {err}");
    }
    fails_quiet(d, 1, &["resize", "missing.qcow2", "1G"], &["missing.qcow2"]);
    let held = qcowx_core::Image::open(d.join("r.qcow2")).unwrap();
    let err = fails_quiet(d, 1, &["resize", "r.qcow2", "+1M"], &["r.qcow2", "locked"]);
    assert!(!err.contains("-U"), "{err}");
    drop(held);
}

#[test]
fn resize_over_a_longer_backing_file_reads_zeros_past_the_old_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_ok(d, &["create", "-f", "qcow2", "long.qcow2", "4M"]);
    qemu_io(d, "qcow2", "long.qcow2", &["write -P 0x44 0 4M"]);
    ok_quiet(
        d,
        &["create", "-b", "long.qcow2", "-F", "qcow2", "o.qcow2", "1M"],
    );
    ok_quiet(d, &["resize", "o.qcow2", "3M"]);
    qemu_io(
        d,
        "qcow2",
        "o.qcow2",
        &["read -P 0x44 0 1M", "read -P 0 1M 2M"],
    );
    assert_qemu_check_clean(d, "o.qcow2");
}

#[test]
fn resize_and_rename_refuse_a_read_only_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("ro")).unwrap();
    ok_quiet(d, &["create", "ro/r.qcow2", "1M"]);
    ok_quiet(d, &["snapshot", "ro/r.qcow2", "s"]);
    let before = std::fs::read(d.join("ro/r.qcow2")).unwrap();
    let run_ro = |args: &[&str]| -> Output {
        if is_root(d) {
            let script =
                r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@""#;
            Command::new("unshare")
                .args(["-m", "sh", "-c", script, "sh"])
                .arg(d.join("ro"))
                .arg(QCOWX)
                .args(args)
                .current_dir(d)
                .output()
                .unwrap()
        } else {
            use std::os::unix::fs::PermissionsExt;
            let p = d.join("ro/r.qcow2");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
            qcowx(d, args)
        }
    };
    // Probe: when mount namespaces are not available to root, say so and stop.
    let probe = run_ro(&["list", "ro/r.qcow2"]);
    if !probe.status.success() && stderr(&probe).contains("mount") {
        eprintln!("NOTE: no mount namespaces here: the read-only case is not tested");
        return;
    }
    for args in [
        &["resize", "ro/r.qcow2", "2M"][..],
        &["rename", "ro/r.qcow2", "--snapshot", "s", "t"][..],
    ] {
        let out = run_ro(args);
        assert_code(&out, 1, &format!("{args:?}"));
        let err = stderr(&out);
        assert!(err.contains("ro/r.qcow2"), "{err}");
        assert!(err.contains("needs write access"), "{err}");
    }
    assert!(std::fs::read(d.join("ro/r.qcow2")).unwrap() == before);
    // Readers still work.
    let out = run_ro(&["map", "--output=json", "--snapshot", "s", "ro/r.qcow2"]);
    assert_code(&out, 0, "map of a read-only image");
}

#[test]
fn rename_snapshots_and_vdis() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_quiet(d, &["create", "n.qcow2", "1M"]);
    ok_quiet(d, &["io", "n.qcow2", "-c", "write -P 1 0 64k"]);
    ok_quiet(d, &["snapshot", "n.qcow2", "s1"]);
    ok_quiet(d, &["fork", "n.qcow2", "s1", "dev"]);
    ok_quiet(d, &["snapshot", "n.qcow2", "--vdi", "dev", "d1"]);
    // A snapshot QEMU made, then one of ours on top of it.
    qemu_ok(d, &["snapshot", "-c", "qemu-snap", "n.qcow2"]);
    ok_quiet(d, &["snapshot", "n.qcow2", "after"]);
    let before = json(&ok_quiet(d, &["list", "--output=json", "n.qcow2"]));
    let out = ok_quiet(
        d,
        &["rename", "n.qcow2", "--snapshot", "s1", "golden-image"],
    );
    assert!(out.stdout.is_empty());
    ok_quiet(d, &["rename", "n.qcow2", "--vdi", "dev", "develop"]);
    ok_quiet(d, &["rename", "n.qcow2", "--snapshot", "qemu-snap", "q2"]);
    let after = json(&ok_quiet(d, &["list", "--output=json", "n.qcow2"]));
    let find = |v: &Value, n: &str| -> Value {
        v["roots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} not in {v:#}"))
    };
    assert_eq!(
        find(&after, "golden-image")["uid"],
        find(&before, "s1")["uid"]
    );
    assert_eq!(
        find(&after, "golden-image")["id"],
        find(&before, "s1")["id"]
    );
    assert_eq!(find(&after, "develop")["uid"], find(&before, "dev")["uid"]);
    assert_eq!(find(&after, "d1")["vdi"], "develop");
    assert_eq!(find(&after, "d1")["parent"], "golden-image");
    assert_eq!(find(&after, "q2")["uid"], find(&before, "qemu-snap")["uid"]);
    assert_eq!(
        find(&after, "after")["parent"],
        "q2",
        "lineage through QEMU's snapshot"
    );
    let mut names: Vec<String> = stdout(&qemu_ok(d, &["snapshot", "-l", "n.qcow2"]))
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
        .collect();
    names.sort();
    assert_eq!(names, ["after", "d1", "golden-image", "q2", "vdi:develop"]);
    assert_qemu_check_clean(d, "n.qcow2");
    let raw = qemu_raw(d, "n.qcow2", Some("golden-image"));
    assert!(raw[..CS as usize].iter().all(|&b| b == 1));
    // Errors.
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--snapshot", "s1", "x"],
        &["n.qcow2", "snapshot 's1' not found", "qcowx list n.qcow2"],
    );
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--vdi", "d1", "x"],
        &["VDI 'd1' not found"],
    );
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--snapshot", "d1", "develop"],
        &["'develop' already exists"],
    );
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--snapshot", "d1", "default"],
        &["'default' already exists"],
    );
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--vdi", "default", "x"],
        &["default VDI cannot be renamed"],
    );
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--snapshot", "d1", "bad name"],
        &["invalid name 'bad name'"],
    );
    fails_quiet(
        d,
        1,
        &["rename", "nope.qcow2", "--snapshot", "a", "b"],
        &["nope.qcow2"],
    );
    usage_error(d, &["rename", "n.qcow2", "d1", "x"]);
    usage_error(d, &["rename", "n.qcow2", "--snapshot", "--vdi", "d1", "x"]);
    usage_error(d, &["rename", "n.qcow2", "--snapshot", "d1"]);
    let held = qcowx_core::Image::open(d.join("n.qcow2")).unwrap();
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--snapshot", "d1", "x"],
        &["n.qcow2", "locked"],
    );
    drop(held);
    assert_eq!(
        json(&ok_quiet(d, &["list", "--output=json", "n.qcow2"])),
        after,
        "failed renames change nothing"
    );
}
