//! The `qcowx-nbd` program and its options: read-only serving that shares the image
//! with QEMU, `--load-snapshot`/`--export-name`/`--export`, exiting after the last
//! client, `--fork` and `--pid-file`, systemd socket activation, `kill -9` during
//! writes, `--detect-zeroes` and `--cache`, and the `qemu:dirty-bitmap:` contexts.
//!
//! Every test starts its own server process and checks the image afterwards with
//! qcowx and `qemu-img check`; the shared helpers and the conventions (tools, the
//! server binary, `QCOWX_NBD`) are in `qcowx_tests::nbd_tools` (tests/src/nbd_tools.rs).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use qcowx_tests::nbd_tools::*;
use qcowx_tests::*;

// ---- the program --------------------------------------------------------------------------

#[test]
fn read_only_serving_shares_the_image_with_qemu() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t", "-r"]);
    // QEMU can read the file while it is served read-only (shared lock).
    run_ok(qemu_img().arg("info").arg(&img));
    let script = format!(
        r#"
h.set_strict_mode(0)
h.connect_uri("{uri}")
assert h.is_read_only()
expect_err("EPERM", h.pwrite, b"a" * 512, 0)
assert h.pread(2, 0) == b"\x01\x01"
print("ok")
"#,
        uri = server.uri("web")
    );
    assert!(nbdsh_ok(&script).contains("ok"));
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn load_snapshot_and_export_options_choose_what_is_served() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock_in(&dir)),
        &["-t", "-l", "snapshot.name=s1", "-x", "old"],
    );
    let list = cli::json(&run_ok(
        nbdinfo().args(["--list", "--json"]).arg(server.uri("")),
    ));
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["old"]);
    assert_eq!(list["exports"][0]["is_read_only"], true);
    let b = export_bytes(&server, "old", &dir.path().join("old.raw"));
    assert!(b[..65536].iter().all(|&x| x == 0x01));
    server.stop();

    let sock = dir.path().join("nbd2.sock");
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock),
        &["-t", "--export", "a=web", "--export", "b=web@w1"],
    );
    let list = cli::json(&run_ok(
        nbdinfo().args(["--list", "--json"]).arg(server.uri("")),
    ));
    let got: Vec<(&str, bool)> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap(),
                e["is_read_only"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, vec![("a", false), ("b", true)]);
    qemu_io_nbd(&server.uri("a"), &["write -P 0x66 2M 4k"]);
    qemu_io_nbd(
        &server.uri(""),
        &["read -P 0x66 2M 4k", "read -P 0x03 1M 64k"],
    );
    server.stop();

    // An unknown root is refused at start.
    let out = run(Command::new(qcowx_nbd_bin())
        .args(["-k"])
        .arg(dir.path().join("nbd3.sock"))
        .args(["--export", "x=nope"])
        .arg(&img));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{}",
        describe(&out)
    );
}

#[test]
fn snapshot_option_serves_a_throwaway_overlay() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let before = std::fs::read(&img).unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut cmd = Command::new(qcowx_nbd_bin());
    cmd.arg("-k")
        .arg(sock_in(&dir))
        .args(["-t", "-s", "-A", "-n", "--aio", "threads"])
        .arg(&img)
        .env("TMPDIR", &tmp);
    let server = QcowxNbd::spawn(cmd);
    // The overlay is in $TMPDIR; the image stays readable by others (shared lock).
    let overlays: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert_eq!(overlays.len(), 1, "one temporary overlay");
    run_ok(qemu_img().arg("info").arg(&img));
    // Writes land in the overlay and read back; unwritten ranges read the image.
    // (The default VDI holds 0x02 in its first 64 KiB: the rest of that cluster is
    // copied up from the image.)
    qemu_io_nbd(&server.uri(""), &["write -P 0x5e 0 4k"]);
    qemu_io_nbd(
        &server.uri(""),
        &[
            "read -P 0x5e 0 4k",
            "read -P 0x02 4k 60k",
            "read -P 0 64k 64k",
        ],
    );
    server.stop();
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "overlay removed"
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the image was written"
    );
    assert_qemu_check_clean(&img);

    // -s serves the image's content, not a snapshot of it, and makes no image.
    for extra in [&["-l", "s1"][..], &["--create", "1M"][..]] {
        let out = run(Command::new(qcowx_nbd_bin())
            .arg("-s")
            .args(extra)
            .arg("-k")
            .arg(dir.path().join("x.sock"))
            .arg(&img));
        assert!(!out.status.success(), "-s {extra:?}: {}", describe(&out));
    }
}

#[test]
fn without_persistent_the_server_exits_after_its_last_client() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    let mut server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["--create", "16M"]);
    assert!(img.exists(), "--create made no image");
    qemu_io_nbd(&server.uri(""), &["write -P 0x12 0 64k"]);
    let status = server.wait_exit();
    assert!(status.success(), "exit {status}: {}", server.stderr());
    assert!(!sock_in(&dir).exists());
    let image = open_ro(&img);
    assert_eq!(image.size(), 16 << 20);
    let mut b = [0u8; 4];
    image.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x12; 4]);
    drop(image);
    assert_qemu_check_clean(&img);
}

#[test]
fn fork_detaches_and_the_pid_file_names_the_server() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let sock = sock_in(&dir);
    let pidfile = dir.path().join("pid");
    let out = run(Command::new(qcowx_nbd_bin())
        .arg("-k")
        .arg(&sock)
        .args(["-t", "--fork", "--pid-file"])
        .arg(&pidfile)
        .arg(&img));
    assert!(out.status.success(), "{}", describe(&out));
    let pid = std::fs::read_to_string(&pidfile).expect("pid file");
    let pid = pid.trim().to_string();
    let alive = || Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive(), "forked server not running");
    let uri = format!("nbd+unix:///default?socket={}", sock.display());
    qemu_io_nbd(&uri, &["write -P 0x31 0 4k", "read -P 0x31 0 4k"]);
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    let deadline = Instant::now() + SERVER_WAIT;
    while alive() {
        // A zombie is gone for our purposes once its state is Z.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        assert!(Instant::now() < deadline, "forked server did not stop");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !sock.exists() && !pidfile.exists(),
        "socket or pid file left behind"
    );
    assert_qemu_check_clean(&img);
}

#[test]
fn systemd_socket_activation() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let sock = sock_in(&dir);
    // What systemd does: a listening socket as descriptor 3, LISTEN_FDS and LISTEN_PID
    // naming the process that execs the server.
    let py = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(16)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], [sys.argv[2]] + sys.argv[3:])
"#;
    require_command(
        "python3",
        "python3",
        tool_command("python3").args(["-c", "import socket"]),
    );
    let mut cmd = tool_command("python3");
    cmd.args(["-c", py])
        .arg(&sock)
        .arg(qcowx_nbd_bin())
        .args(["-t"])
        .arg(&img);
    let mut server = QcowxNbd::spawn(cmd);
    assert!(server
        .banner()
        .contains(&format!("listening on unix {}", sock.display())));
    qemu_io_nbd(
        &server.uri("default"),
        &["write -P 0x71 0 4k", "read -P 0x71 0 4k"],
    );
    let pid = server.pid().to_string();
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    let status = server.wait_exit();
    assert!(status.success(), "{}", server.stderr());
    assert_qemu_check_clean(&img);
}

#[test]
fn kill_9_during_writes_keeps_everything_flushed() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 32 << 20);
    let sock = sock_in(&dir);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock), &["-t"]);
    // Acknowledged and flushed: must survive. Then more writes, unflushed, in flight.
    let script = format!(
        r#"
h.connect_uri("{uri}")
for i in range(64):
    h.pwrite(bytes([i + 1]) * 65536, i * 65536)
h.pwrite(b"F" * 4096, 20 << 20, nbd.CMD_FLAG_FUA)
h.flush()
for i in range(64):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"u" * 65536)), (8 << 20) + i * 65536)
print("flushed", flush=True)
"#,
        uri = server.uri("")
    );
    let mut child = nbdsh()
        .args(["-c", &format!("{PY_PRELUDE}\n{script}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdsh");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("nbdsh output");
    assert_eq!(line.trim(), "flushed");
    server.kill9();
    let _ = child.kill();
    let _ = child.wait();

    // Restart on the crashed image: the flushed data is all there.
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock), &["-t"]);
    let mut cmds: Vec<String> = (0..64)
        .map(|i| format!("read -P {} {} 64k", i + 1, i * 65536))
        .collect();
    cmds.push(format!("read -P 0x46 {} 4k", 20 << 20));
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_nbd(&server.uri(""), &refs);
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn detect_zeroes_and_cache_modes() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock_in(&dir)),
        &[
            "-t",
            "--detect-zeroes=unmap",
            "--discard=unmap",
            "--cache=writethrough",
        ],
    );
    let uri = server.uri("");
    qemu_io_nbd(
        &uri,
        &[
            "write -P 0xaa 0 1M",
            "write -P 0 0 512k",
            "read -P 0 0 512k",
            "read -P 0xaa 512k 512k",
        ],
    );
    // The all-zero write released its clusters.
    let v = cli::json(&run_ok(nbdinfo().args(["--map", "--json"]).arg(&uri)));
    let data = merge_runs(
        map_entries(&v)
            .into_iter()
            .map(|(s, l, e)| (s, s + l, e["type"].as_u64().unwrap() & 1 == 0)),
    );
    assert_eq!(
        data,
        vec![
            (0, 512 << 10, false),
            (512 << 10, 1 << 20, true),
            (1 << 20, 8 << 20, false)
        ]
    );
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn dirty_bitmap_contexts_give_backup_tools_the_changes_since_a_snapshot() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let sock = sock_in(&dir);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock), &["-t"]);
    qemu_io_nbd(&server.uri("default"), &["write -P 0x09 3M 100"]);
    let dirty = |export: &str, snap: &str| {
        let v = cli::json(&run_ok(
            nbdinfo()
                .arg(format!("--map=qemu:dirty-bitmap:{snap}"))
                .arg("--json")
                .arg(server.uri(export)),
        ));
        merge_runs(
            map_entries(&v)
                .into_iter()
                .map(|(s, l, e)| (s, s + l, e["type"].as_u64().unwrap() & 1 == 1)),
        )
    };
    let m = 1u64 << 20;
    // default changed [0, 64K) after s1 (0x02) and [3M, 3M+64K) now.
    let want = vec![
        (0, 65536, true),
        (65536, 3 * m, false),
        (3 * m, 3 * m + 65536, true),
        (3 * m + 65536, 4 * m, false),
    ];
    assert_eq!(dirty("default", "s1"), want);
    // Nothing changed in web since w1; web against s1 is the fork's own write.
    assert_eq!(dirty("web", "w1"), vec![(0, 4 * m, false)]);
    assert_eq!(
        dirty("web", "s1"),
        vec![
            (0, m, false),
            (m, m + 65536, true),
            (m + 65536, 4 * m, false)
        ]
    );
    // QEMU's own client, as incremental backup tools use it: x-dirty-bitmap reports
    // dirty ranges as "data": false.
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=default,x-dirty-bitmap=qemu:dirty-bitmap:s1",
        sock.display()
    );
    let v = cli::json(&run_ok(
        qemu_img()
            .args(["map", "--output=json", "--image-opts"])
            .arg(&opts),
    ));
    let qemu_dirty = merge_runs(
        map_entries(&v)
            .into_iter()
            .map(|(s, l, e)| (s, s + l, !e["data"].as_bool().unwrap())),
    );
    assert_eq!(qemu_dirty, want, "qemu-img map with x-dirty-bitmap");
    server.stop();
}
