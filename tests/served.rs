//! The `qcowx` command-line tool on an image a `qcowx-nbd` serves, and a server
//! restarted after SIGKILL.
//!
//! Every test starts its own server on a temporary Unix socket with its control
//! socket in a temporary runtime directory, waits for it with a time limit and stops
//! it (SIGTERM, or SIGKILL where the test is about a crash). `qemu-io` writes through
//! NBD; QEMU's tools are the oracle for the images left behind.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use qcowx_tests::*;
use serde_json::Value;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// `qcowx ARGS` in `dir`, run as the server's clients run it (finding its control
/// socket).
fn qcowx_at(server: &QcowxNbd, dir: &Path, args: &[&str]) -> Output {
    run(server.qcowx().args(args).current_dir(dir))
}

/// [`qcowx_at`], expecting exit 0.
fn qcowx_ok(server: &QcowxNbd, dir: &Path, args: &[&str]) -> Output {
    let out = qcowx_at(server, dir, args);
    assert!(out.status.success(), "qcowx {args:?}: {}", describe(&out));
    out
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(out)))
}

/// `qcowx ARGS` in `dir` with no server around, expecting exit 0.
fn offline_ok(dir: &Path, args: &[&str]) -> Output {
    let out = run(Command::new(qcowx_cli_bin()).args(args).current_dir(dir));
    assert!(out.status.success(), "qcowx {args:?}: {}", describe(&out));
    out
}

/// `qemu-io -f raw URI -c ...`, which must succeed.
fn qemu_io_nbd(uri: &str, cmds: &[&str]) {
    let mut c = qemu_io();
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run_ok(&mut c);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("failed"),
        "qemu-io {uri}: {}",
        describe(&out)
    );
}

/// Waits (up to a minute) for `cond`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `d/disk.qcow2`: 8 MiB, 1 MiB of 0x11 in snapshot `s1`, VDI `dev` forked from it.
fn image_with_a_fork(d: &Path) {
    offline_ok(d, &["create", "disk.qcow2", "8M"]);
    offline_ok(d, &["io", "disk.qcow2", "-c", "write -P 0x11 0 1M"]);
    offline_ok(d, &["snapshot", "disk.qcow2", "s1"]);
    offline_ok(d, &["fork", "disk.qcow2", "s1", "dev"]);
}

#[test]
fn info_check_tree_diff_and_export_work_while_the_image_is_served() {
    require_qemu_tools();
    let dir = tempdir();
    let d = dir.path();
    image_with_a_fork(d);
    let server = QcowxNbd::in_dir(d, &d.join("disk.qcow2"), &["-t"]);
    // Writes the server holds (no flush asked), then a live snapshot.
    qemu_io_nbd(&server.uri("default"), &["write -P 0x22 2M 512k"]);
    qemu_io_nbd(&server.uri("dev"), &["write -P 0x33 4M 64k"]);
    qcowx_ok(&server, d, &["snapshot", "disk.qcow2", "s2"]);

    // tree and diff are answered by the server: its view, with every write.
    let v = json_of(&qcowx_ok(
        &server,
        d,
        &["tree", "--output=json", "disk.qcow2"],
    ));
    let nodes = v["nodes"].as_array().unwrap();
    let node = |n: &str| nodes.iter().find(|x| x["name"] == n).unwrap().clone();
    assert_eq!(node("s2")["tree-parent"], "default", "{v:#}");
    assert_eq!(node("dev")["tree-parent"], "s1", "{v:#}");
    assert_eq!(
        node("dev")["mapped-bytes"],
        (MIB + 64 * KIB) as u64,
        "{v:#}"
    );
    let diff = |from: &str, to: &str| {
        json_of(&qcowx_ok(
            &server,
            d,
            &["diff", "--output=json", "disk.qcow2", from, to],
        ))
    };
    let v = diff("s1", "s2");
    assert_eq!(v["bytes"], 512 * KIB as u64, "{v:#}");
    assert_eq!(v["ranges"][0]["offset"], 2 * MIB as u64, "{v:#}");
    assert_eq!(diff("s1", "dev")["bytes"], 64 * KIB as u64);

    // check is run by the server on the image it has open: clean, although the
    // file on disk has the stale refcounts of an image in use.
    let out = qcowx_at(&server, d, &["check", "--output=json", "disk.qcow2"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v = json_of(&out);
    assert_eq!(v["check-errors"], 0, "{v:#}");
    assert!(
        v.get("corruptions").is_none() && v.get("leaks").is_none(),
        "{v:#}"
    );
    let human = qcowx_ok(&server, d, &["check", "disk.qcow2"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("No errors were found"),
        "{}",
        describe(&human)
    );

    // info and export read the file, as qemu-img does: refused without -U (with a
    // hint), read with it.
    let out = qcowx_at(&server, d, &["info", "disk.qcow2"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("locked") && err.contains("-U"), "{err}");
    let v = json_of(&qcowx_ok(
        &server,
        d,
        &["info", "-U", "--output=json", "disk.qcow2"],
    ));
    let snaps: Vec<&str> = v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(snaps.contains(&"s1") && snaps.contains(&"s2"), "{v:#}");
    // A live snapshot is on disk once taken: exporting it with -U is a consistent
    // copy of the served VDI at that point.
    qcowx_ok(
        &server,
        d,
        &["export", "-U", "--snapshot", "s2", "disk.qcow2", "s2.raw"],
    );
    let got = std::fs::read(d.join("s2.raw")).unwrap();
    let mut want = vec![0u8; 8 * MIB];
    want[..MIB].fill(0x11);
    want[2 * MIB..2 * MIB + 512 * KIB].fill(0x22);
    assert!(
        got == want,
        "the export of s2 differs from what was written"
    );
    // The help says what happens on a served image.
    let help = qcowx_ok(&server, d, &["help", "export"]);
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("qcowx-nbd"),
        "{}",
        describe(&help)
    );

    server.stop();
    assert_qemu_check_clean(&d.join("disk.qcow2"));
}

#[test]
fn a_server_killed_with_sigkill_is_taken_over_and_the_restart_says_so() {
    require_qemu_tools();
    let dir = tempdir();
    let d = dir.path();
    let img = d.join("disk.qcow2");
    image_with_a_fork(d);

    // Killed before any checkpoint: both sockets stay behind, the image is dirty.
    let server = QcowxNbd::in_dir(d, &img, &["-t", "--checkpoint-interval", "3600"]);
    let control = server.control().expect("a control socket").to_path_buf();
    qemu_io_nbd(&server.uri("default"), &["write -P 0x44 0 64k", "flush"]);
    server.kill9();
    assert!(control.exists(), "SIGKILL leaves {}", control.display());
    assert!(d.join("nbd.sock").exists());
    let server = QcowxNbd::in_dir(d, &img, &["-t", "--checkpoint-interval", "1"]);
    assert_eq!(server.control(), Some(control.as_path()), "the same socket");
    for said in [
        "replaced a control socket left behind",
        "was not closed cleanly",
    ] {
        assert!(server.stderr_shows(said), "{said:?}: {}", server.stderr());
    }
    // The socket taken over answers.
    let out = qcowx_ok(&server, d, &["snapshot", "disk.qcow2", "after-restart"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Created snapshot"));

    // Killed after a checkpoint: the image is clean, but the socket left behind
    // still tells the next server the shutdown was not clean.
    wait_for("a checkpoint to clear the dirty bit", || {
        qemu_info(&img, true)["dirty-flag"] == false
    });
    server.kill9();
    let server = QcowxNbd::in_dir(d, &img, &["-t"]);
    assert!(
        server.stderr_shows("replaced a control socket left behind"),
        "{}",
        server.stderr()
    );
    let v = json_of(&qcowx_ok(
        &server,
        d,
        &["list", "--output=json", "disk.qcow2"],
    ));
    assert!(v["roots"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "after-restart"));
    server.stop();
    // A clean stop leaves nothing for the next server to report.
    assert!(
        !server_said_unclean(d, &img),
        "a clean restart reports nothing"
    );
    assert_qemu_check_clean(&img);
}

/// Starts a server on `img`, says whether it reported an unclean shutdown, stops it.
fn server_said_unclean(d: &Path, img: &Path) -> bool {
    let server = QcowxNbd::in_dir(d, img, &["-t"]);
    // The banner is printed after the open and the socket setup: their messages
    // are on stderr by the time it is read (allow the reader thread a moment).
    std::thread::sleep(Duration::from_millis(200));
    let said = server.stderr();
    server.stop();
    said.contains("left behind") || said.contains("not closed cleanly")
}

#[test]
fn gc_of_a_served_image_reports_what_an_offline_gc_reports() {
    require_qemu_tools();
    let dir = tempdir();
    let d = dir.path();
    for f in ["offline.qcow2", "served.qcow2"] {
        offline_ok(d, &["create", f, "4M"]);
        offline_ok(d, &["io", f, "-c", "write -P 1 0 256k"]);
        offline_ok(d, &["snapshot", f, "s1"]);
        offline_ok(d, &["fork", f, "s1", "dev"]);
        offline_ok(d, &["io", f, "--vdi", "dev", "-c", "write -P 3 1M 128k"]);
    }
    offline_ok(d, &["delete", "offline.qcow2", "--vdi", "dev"]);
    let offline = json_of(&offline_ok(d, &["gc", "--output=json", "offline.qcow2"]));

    let served = d.join("served.qcow2");
    let server = QcowxNbd::in_dir(d, &served, &["-t"]);
    qcowx_ok(&server, d, &["delete", "served.qcow2", "--vdi", "dev"]);
    let live = json_of(&qcowx_ok(
        &server,
        d,
        &["gc", "--output=json", "served.qcow2"],
    ));
    for k in ["roots-removed", "clusters-freed", "bytes-freed"] {
        assert_eq!(
            live[k], offline[k],
            "{k}: served {live:#}\noffline {offline:#}"
        );
    }
    assert_eq!(live["clusters-freed"], 4, "{live:#}");
    let (before, after) = (
        live["allocated-before"].as_u64().unwrap(),
        live["allocated-after"].as_u64().unwrap(),
    );
    assert!(after + 4 * 65536 <= before, "{live:#}");
    server.stop();
    // Nothing was left for a collection after a reopen.
    let again = json_of(&offline_ok(d, &["gc", "--output=json", "served.qcow2"]));
    assert_eq!(
        (&again["roots-removed"], &again["clusters-freed"]),
        (&Value::from(0), &Value::from(0)),
        "{again:#}"
    );
    assert_qemu_check_clean(&served);
}

/// The raw content of snapshot `name` of `file`, as `qemu-img convert` reads it.
fn snapshot_bytes(d: &Path, file: &str, name: &str) -> Vec<u8> {
    let out = d.join(format!("{file}-{}.raw", name.replace(':', "_")));
    convert_snapshot_to_raw(&d.join(file), name, &out);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

#[test]
fn send_reads_live_snapshots_of_a_served_image_and_a_vdi_moves_between_hosts() {
    require_qemu_tools();
    let dir = tempdir();
    let d = dir.path();
    image_with_a_fork(d);
    let server = QcowxNbd::in_dir(d, &d.join("disk.qcow2"), &["-t"]);
    qemu_io_nbd(&server.uri("default"), &["write -P 0x22 2M 512k"]);
    qemu_io_nbd(&server.uri("dev"), &["write -P 0x33 4M 64k"]);
    // Live snapshots through the server: of the default VDI and of the fork.
    qcowx_ok(&server, d, &["snapshot", "disk.qcow2", "s2"]);
    qcowx_ok(
        &server,
        d,
        &["snapshot", "--vdi", "dev", "disk.qcow2", "d1"],
    );

    // send reads the file: refused without -U (with the hint), a snapshot with it.
    let out = qcowx_at(&server, d, &["send", "-o", "x.stream", "disk.qcow2", "s1"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("locked") && err.contains("-U"), "{err}");
    let send = |args: &[&str]| {
        let mut a = vec!["send", "-q", "-U", "-o", "x.stream"];
        a.extend_from_slice(args);
        qcowx_ok(&server, d, &a);
        offline_ok(d, &["receive", "-q", "-i", "x.stream", "far.qcow2"]);
    };
    send(&["disk.qcow2", "s1"]);
    send(&["--from", "s1", "disk.qcow2", "s2"]);
    send(&["--from", "s1", "disk.qcow2", "d1"]);
    // The VM keeps writing, then stops: a last small incremental.
    qemu_io_nbd(&server.uri("dev"), &["write -P 0x44 5M 64k"]);
    qcowx_ok(
        &server,
        d,
        &["snapshot", "--vdi", "dev", "disk.qcow2", "d2"],
    );
    server.stop();
    offline_ok(
        d,
        &[
            "send",
            "-q",
            "-o",
            "x.stream",
            "--from",
            "d1",
            "disk.qcow2",
            "d2",
        ],
    );
    offline_ok(d, &["receive", "-q", "-i", "x.stream", "far.qcow2"]);
    // The fork travels as its snapshot plus a fork on the receiving side.
    offline_ok(d, &["fork", "far.qcow2", "d2", "dev"]);

    assert_qemu_check_clean(&d.join("far.qcow2"));
    for s in ["s1", "s2", "d1", "d2"] {
        assert!(
            snapshot_bytes(d, "far.qcow2", s) == snapshot_bytes(d, "disk.qcow2", s),
            "snapshot {s} differs"
        );
    }
    assert!(
        snapshot_bytes(d, "far.qcow2", "vdi:dev") == snapshot_bytes(d, "disk.qcow2", "vdi:dev")
    );
}
