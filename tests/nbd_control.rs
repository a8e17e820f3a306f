//! `qcowx-nbd`'s control socket and the `qcowx` CLI against a served image: live
//! snapshots of a busy export, fork/revert/delete/gc/list/diff requests, bad requests,
//! when a control socket exists, the CLI forwarding to the server of a locked image,
//! and refcount checkpoints keeping a killed server's image clean.
//!
//! Every test starts its own server process and checks the image afterwards with
//! qcowx and `qemu-img check`; the shared helpers and the conventions (tools, the
//! server binary, `QCOWX_NBD`) are in `qcowx_tests::nbd_tools` (tests/src/nbd_tools.rs).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use qcowx_tests::nbd_tools::*;
use qcowx_tests::*;

// ---- the control socket -------------------------------------------------------------------

/// A connection to a server's control socket (line-delimited JSON).
struct Control {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Control {
    fn connect(server: &QcowxNbd) -> Control {
        let path = server.control().expect("the server has a control socket");
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        s.set_read_timeout(Some(SERVER_WAIT)).unwrap();
        Control {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    /// Sends one line, returns the answer.
    fn line(&mut self, line: &str) -> serde_json::Value {
        self.w.write_all(line.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        let mut a = String::new();
        self.r.read_line(&mut a).expect("control answer");
        serde_json::from_str(&a).unwrap_or_else(|e| panic!("answer {a:?} is not JSON: {e}"))
    }

    fn send(&mut self, req: serde_json::Value) -> serde_json::Value {
        self.line(&req.to_string())
    }

    /// Sends a request that must succeed.
    fn ok(&mut self, req: serde_json::Value) -> serde_json::Value {
        let a = self.send(req.clone());
        assert_eq!(a["ok"], true, "{req} failed: {a}");
        a
    }
}

/// The export names `nbdinfo --list --json` shows.
fn export_names(server: &QcowxNbd) -> Vec<String> {
    let list = cli::json(&run_ok(
        nbdinfo().args(["--list", "--json"]).arg(server.uri("")),
    ));
    list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect()
}

/// A client writing a stream of 4 KiB blocks to one export through libnbd: write
/// `seq` (0, 1, 2, …) goes to block `(seq * 97) % 256` of a 1 MiB region and holds
/// `seq + 1` as a big-endian u64 repeated, so any copy of the region tells exactly
/// which writes it holds. Each write waits for its reply before the next is sent
/// (one ordered stream). The count of acknowledged writes is printed every 64.
struct StreamWriter {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    acked: Arc<std::sync::atomic::AtomicU64>,
    done: mpsc::Receiver<u64>,
    base: u64,
}

const STREAM_BLOCKS: u64 = 256;
const STREAM_BLOCK: usize = 4096;

impl StreamWriter {
    fn start(uri: &str, base: u64) -> StreamWriter {
        let script = format!(
            r#"
import sys, select, struct, time
h.connect_uri("{uri}")
seq = 0
end = time.time() + 300
while seq < 2000000 and time.time() < end:
    h.pwrite(struct.pack(">Q", seq + 1) * 512, {base} + ((seq * 97) % 256) * 4096)
    seq += 1
    if seq % 64 == 0:
        print(seq, flush=True)
        r, _, _ = select.select([sys.stdin], [], [], 0)
        if r and sys.stdin.readline().strip() == "stop":
            break
print("done", seq, flush=True)
"#
        );
        let mut child = nbdsh()
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nbdsh");
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (tx, done) = mpsc::channel();
        let a = Arc::clone(&acked);
        thread::spawn(move || {
            for l in out.lines() {
                let Ok(l) = l else { break };
                if let Some(n) = l.strip_prefix("done ") {
                    let _ = tx.send(n.trim().parse().expect("count"));
                } else if let Ok(n) = l.trim().parse::<u64>() {
                    a.store(n, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        StreamWriter {
            child,
            stdin,
            acked,
            done,
            base,
        }
    }

    /// Writes acknowledged so far (a lower bound: replies may be on their way).
    fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops the writer; returns how many writes it made.
    fn stop(mut self) -> u64 {
        let mut stdin = self.stdin.take().expect("stdin");
        writeln!(stdin, "stop").expect("tell the writer to stop");
        let n = self
            .done
            .recv_timeout(SERVER_WAIT)
            .expect("the writer did not finish");
        let status = self.child.wait().expect("wait for nbdsh");
        assert!(status.success(), "writer failed: {status}");
        n
    }
}

/// Checks that `region` (one writer's 1 MiB) holds exactly writes `0..=k` of its
/// stream for some `k` — every block the last of those writes that targets it — and
/// returns `k + 1` (the number of writes it holds).
fn writes_held(region: &[u8]) -> u64 {
    let mut seen = vec![0u64; STREAM_BLOCKS as usize];
    for (b, block) in region.chunks(STREAM_BLOCK).enumerate() {
        let v = u64::from_be_bytes(block[..8].try_into().unwrap());
        assert!(
            block
                .chunks(8)
                .all(|w| u64::from_be_bytes(w.try_into().unwrap()) == v),
            "block {b} is torn"
        );
        seen[b] = v;
    }
    let held = seen.iter().copied().max().unwrap_or(0);
    let mut want = vec![0u64; STREAM_BLOCKS as usize];
    for s in 0..held {
        want[((s * 97) % STREAM_BLOCKS) as usize] = s + 1;
    }
    for b in 0..STREAM_BLOCKS as usize {
        assert_eq!(
            seen[b], want[b],
            "block {b}: not a prefix of the stream (the newest write held is #{held})"
        );
    }
    held
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn live_snapshots_of_a_busy_export_are_consistent_points_in_each_write_stream() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t", "-e", "8"]);
    // Two clients, each its own ordered stream in its own region of one VDI.
    let writers = [
        StreamWriter::start(&server.uri("default"), 0),
        StreamWriter::start(&server.uri("default"), 4 << 20),
    ];
    let mut ctl = Control::connect(&server);
    let mut snaps: Vec<(String, Vec<u64>)> = Vec::new();
    for i in 1..=3u64 {
        let target = i * 1024;
        wait_for("the writers to make progress", || {
            writers.iter().all(|w| w.acked() >= target)
        });
        let acked: Vec<u64> = writers.iter().map(StreamWriter::acked).collect();
        let name = format!("live{i}");
        let a = ctl.ok(serde_json::json!({"op": "snapshot", "vdi": "default", "name": name}));
        assert_eq!(a["root"]["name"], name.as_str());
        assert_eq!(a["root"]["kind"], "snapshot");
        // Served at once.
        assert_eq!(a["export"], format!("default@{name}").as_str());
        snaps.push((name, acked));
    }
    // The clients were never stopped: they go on writing after the last snapshot.
    let after: Vec<u64> = writers.iter().map(StreamWriter::acked).collect();
    wait_for("writes after the last snapshot", || {
        writers
            .iter()
            .zip(&after)
            .all(|(w, &a)| w.acked() >= a + 1024)
    });
    let bases: Vec<u64> = writers.iter().map(|w| w.base).collect();
    let totals: Vec<u64> = writers.into_iter().map(StreamWriter::stop).collect();

    let names = export_names(&server);
    let mut held_before = vec![0u64; bases.len()];
    for (name, acked) in &snaps {
        let export = format!("default@{name}");
        assert!(names.contains(&export), "{export} not in {names:?}");
        let bytes = export_bytes(&server, &export, &dir.path().join("snap.raw"));
        for (j, &base) in bases.iter().enumerate() {
            let region = &bytes[base as usize..(base + (1 << 20)) as usize];
            let held = writes_held(region);
            assert!(
                held >= acked[j],
                "{name}, writer {j}: holds {held} writes, but {} were acknowledged before the snapshot was asked for",
                acked[j]
            );
            eprintln!(
                "{name}, writer {j}: {} writes acknowledged before the request, {held} held, {} in all",
                acked[j], totals[j]
            );
            assert!(held < totals[j], "{name}, writer {j}: holds every write");
            assert!(held >= held_before[j], "snapshots out of order");
            held_before[j] = held;
        }
    }
    // The live export holds every write.
    let live = export_bytes(&server, "default", &dir.path().join("live.raw"));
    for (j, &base) in bases.iter().enumerate() {
        assert_eq!(
            writes_held(&live[base as usize..(base + (1 << 20)) as usize]),
            totals[j]
        );
    }
    server.stop();
    let image = open_ro(&img);
    let roots: Vec<String> = image.list().unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(roots, vec!["default", "live1", "live2", "live3"]);
    drop(image);
    assert_qemu_check_clean(&img);
}

#[test]
fn fork_revert_delete_gc_and_list_over_the_control_socket() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t"]);
    // QEMU cannot open the served image for writing: that is why the socket exists.
    let out = run(qemu_img().args(["snapshot", "-c", "x"]).arg(&img));
    assert!(!out.status.success(), "qemu-img wrote a served image");
    let mut ctl = Control::connect(&server);
    let list = ctl.ok(serde_json::json!({"op": "list"}));
    let names: Vec<&str> = list["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["default", "s1", "web", "w1"]);

    // A snapshot of web while a client has it open, then a fork of that snapshot.
    qemu_io_nbd(&server.uri("web"), &["write -P 0x44 2M 64k"]);
    let a = ctl.ok(serde_json::json!({"op": "snapshot", "vdi": "web", "name": "w2"}));
    assert_eq!(a["export"], "web@w2");
    qemu_io_nbd(&server.uri("web"), &["write -P 0x45 2M 64k"]);
    let a = ctl.ok(serde_json::json!({"op": "fork", "snapshot": "w2", "name": "db"}));
    assert_eq!(a["export"], "db");
    assert_eq!(a["root"]["parent"], "w2");
    let names = export_names(&server);
    for e in ["web@w2", "db"] {
        assert!(names.iter().any(|n| n == e), "{e} missing from {names:?}");
    }
    // A snapshot export is read-only: qemu-io opens it with -r.
    let out = run_ok(
        qemu_io()
            .args(["-r", "-f", "raw", "-c", "read -P 0x44 2M 64k"])
            .arg(server.uri("web@w2")),
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("verification failed"),
        "{}",
        describe(&out)
    );
    qemu_io_nbd(
        &server.uri("db"),
        &[
            "read -P 0x44 2M 64k",
            "write -P 0x46 3M 4k",
            "read -P 0x03 1M 64k",
        ],
    );
    qemu_io_nbd(
        &server.uri("web"),
        &["read -P 0x45 2M 64k", "read -P 0 3M 4k"],
    );

    let d = ctl.ok(serde_json::json!({"op": "diff", "from": "w2", "to": "web"}));
    assert_eq!(d["bytes"], 65536, "{d}");
    assert_eq!(d["ranges"][0]["offset"], 2 << 20);

    // Revert web to w1 (before both writes).
    ctl.ok(serde_json::json!({"op": "revert", "vdi": "web", "snapshot": "w1"}));
    qemu_io_nbd(
        &server.uri("web"),
        &["read -P 0 2M 64k", "read -P 0x03 1M 64k"],
    );

    // Delete the fork and the snapshot: the exports go; gc returns the space.
    ctl.ok(serde_json::json!({"op": "delete", "vdi": "db"}));
    ctl.ok(serde_json::json!({"op": "delete", "snapshot": "w2"}));
    let names = export_names(&server);
    assert!(
        !names.iter().any(|n| n == "db" || n == "web@w2"),
        "{names:?}"
    );
    let out = run(qemu_io()
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(server.uri("db")));
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stderr).contains("export"),
        "a deleted VDI is still served: {}",
        describe(&out)
    );
    let g = ctl.ok(serde_json::json!({"op": "gc"}));
    assert!(g["gc"]["roots-removed"].as_u64().unwrap() >= 2, "{g}");
    assert!(g["gc"]["clusters-freed"].as_u64().unwrap() >= 2, "{g}");
    server.stop();

    let out = run_ok(qemu_img().args(["snapshot", "-l"]).arg(&img));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("s1") && text.contains("w1") && text.contains("vdi:web"));
    assert!(!text.contains("w2") && !text.contains("vdi:db"), "{text}");
    assert_qemu_check_clean(&img);
}

#[test]
fn bad_control_requests_get_errors_and_affect_nothing() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t"]);
    let mut ctl = Control::connect(&server);
    let cases: Vec<(&str, &str, &str)> = vec![
        ("not json at all", "invalid-request", "not JSON"),
        (
            "{\"op\": \"format-disk\"}",
            "invalid-request",
            "format-disk",
        ),
        (
            "{\"op\": \"fork\", \"name\": \"x\"}",
            "invalid-request",
            "snapshot",
        ),
        (
            "{\"op\": \"snapshot\", \"vdi\": \"nope\", \"name\": \"x\"}",
            "not-found",
            "nope",
        ),
        (
            "{\"op\": \"snapshot\", \"name\": \"web\"}",
            "already-exists",
            "already exists",
        ),
        (
            "{\"op\": \"fork\", \"snapshot\": \"s1\", \"name\": \"a b\"}",
            "invalid-argument",
            "",
        ),
        (
            "{\"op\": \"delete\", \"vdi\": \"default\"}",
            "invalid-argument",
            "default",
        ),
        (
            "{\"op\": \"revert\", \"vdi\": \"web\", \"snapshot\": \"ghost\"}",
            "not-found",
            "ghost",
        ),
        (
            "{\"op\": \"list\", \"image\": \"/etc/hostname\"}",
            "wrong-image",
            "/etc/hostname",
        ),
    ];
    for (line, kind, text) in &cases {
        let a = ctl.line(line);
        assert_eq!(a["ok"], false, "{line}: {a}");
        assert_eq!(a["kind"].as_str().unwrap(), *kind, "{line}: {a}");
        assert!(a["error"].as_str().unwrap().contains(text), "{line}: {a}");
    }
    // The same connection still works, the image is unchanged, and clients are served.
    let list = ctl.ok(serde_json::json!({"op": "list", "image": img.to_str().unwrap()}));
    assert_eq!(list["roots"].as_array().unwrap().len(), 4);
    qemu_io_nbd(&server.uri("default"), &["read -P 0x02 0 64k"]);
    // A client that connects and goes away mid-line changes nothing either.
    let mut s = UnixStream::connect(server.control().unwrap()).unwrap();
    s.write_all(b"{\"op\": \"snapshot\", \"na").unwrap();
    drop(s);
    let list = ctl.ok(serde_json::json!({"op": "list"}));
    assert_eq!(list["roots"].as_array().unwrap().len(), 4);
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn a_read_only_server_has_no_control_socket_unless_asked() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t", "-r"]);
    assert!(server.control().is_none(), "{}", server.banner());
    server.stop();
    let ctl = dir.path().join("ctl.sock");
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock_in(&dir)),
        &["-t", "-r", "--control", ctl.to_str().unwrap()],
    );
    assert_eq!(server.control(), Some(ctl.as_path()));
    let mut c = Control::connect(&server);
    assert_eq!(
        c.ok(serde_json::json!({"op": "list"}))["roots"][1]["name"],
        "s1"
    );
    let a = c.send(serde_json::json!({"op": "snapshot", "name": "x"}));
    assert_eq!(a["kind"], "read-only", "{a}");
    server.stop();
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t", "--no-control"]);
    assert!(server.control().is_none());
    server.stop();
}

// ---- the qcowx CLI against a served image ------------------------------------------------

#[test]
fn the_cli_forwards_to_the_server_of_a_locked_image() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t"]);
    let runtime = server
        .control()
        .and_then(|c| c.parent())
        .expect("the server has a control socket")
        .to_path_buf();
    let qcowx = |args: &[&str]| {
        let mut cmd = Command::new(qcowx_cli_bin());
        cmd.env("QCOWX_RUNTIME_DIR", &runtime).args(args);
        run(&mut cmd)
    };
    let p = img.to_str().unwrap();
    qemu_io_nbd(&server.uri("default"), &["write -P 0x61 0 64k"]);
    // The image is locked by the server: these go through its control socket.
    let out = qcowx(&["snapshot", p, "live1"]);
    assert!(out.status.success(), "{}", describe(&out));
    qemu_io_nbd(&server.uri("default"), &["write -P 0x62 0 64k"]);
    let out = qcowx(&["fork", p, "live1", "copy"]);
    assert!(out.status.success(), "{}", describe(&out));
    // The new roots are served at once.
    let out = run_ok(
        qemu_io()
            .args(["-r", "-f", "raw", "-c", "read -P 0x61 0 64k"])
            .arg(server.uri("default@live1")),
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "{}",
        describe(&out)
    );
    qemu_io_nbd(&server.uri("copy"), &["read -P 0x61 0 64k"]);
    let out = qcowx(&["list", "--output=json", p]);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"live1") && names.contains(&"copy"),
        "{names:?}"
    );
    let out = qcowx(&["delete", p, "--vdi", "copy"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = qcowx(&["gc", "--output=json", p]);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["roots-removed"], 1, "{v}");
    // Errors come back with the library's message and exit code 1.
    let out = qcowx(&["snapshot", p, "live1"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        describe(&out)
    );
    let out = qcowx(&["revert", p, "--vdi", "default", "live1"]);
    assert!(out.status.success(), "{}", describe(&out));
    qemu_io_nbd(&server.uri("default"), &["read -P 0x61 0 64k"]);
    server.stop();
    // Without a server, a locked image is an error, not a silent success.
    let _held = qcowx_core::Image::open_rw(&img).unwrap();
    let out = qcowx(&["snapshot", p, "offline"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked"),
        "{}",
        describe(&out)
    );
}

/// A server killed after a refcount checkpoint leaves an image that is clean on disk
/// (the checkpoint wrote exact refcounts and cleared the dirty bit); restarted on an
/// image killed before any checkpoint, the server says it recovered it.
#[test]
fn checkpoints_keep_a_killed_servers_image_clean_and_recovery_is_reported() {
    require_qemu_tools();
    let dir = tempdir();
    let img = dir.path().join("a.qcow2");
    new_image(&img, 64 << 20);

    // No checkpoint before the kill: the image is dirty, and the restart says so.
    let server = QcowxNbd::in_dir(dir.path(), &img, &["-t", "--checkpoint-interval", "3600"]);
    qemu_io_nbd(&server.uri("default"), &["write -P 0x31 0 1M", "flush"]);
    server.kill9();
    let info = qemu_info(&img, true);
    assert_eq!(info["dirty-flag"], true, "no checkpoint ran: {info:#}");
    let server = QcowxNbd::in_dir(
        dir.path(),
        &img,
        &["-t", "--checkpoint-interval", "1", "--l2-cache-size", "1M"],
    );
    assert!(
        server.stderr_shows("was not closed cleanly"),
        "the restart reports the unclean shutdown: {}",
        server.stderr()
    );
    qemu_io_nbd(&server.uri("default"), &["read -P 0x31 0 1M"]);

    // With checkpoints every second: after a write and a checkpoint, a kill leaves a
    // clean image that QEMU checks clean.
    qemu_io_nbd(&server.uri("default"), &["write -P 0x32 8M 1M", "flush"]);
    wait_for("a checkpoint to clear the dirty bit", || {
        qemu_info(&img, true)["dirty-flag"] == false
    });
    server.kill9();
    assert_qemu_check_clean(&img);
    qemu_io_ok("qcow2", &img, &["read -P 0x31 0 1M", "read -P 0x32 8M 1M"]);
}
