//! Faults under a served image: a full file system, and storage that fails.
//!
//! What is real and what is simulated:
//!
//! * **Disk full, for real.** The image lives on a small tmpfs ([`SmallFs`]: `mount -t
//!   tmpfs -o size=…`, or, where mounting is not allowed, a private mount namespace
//!   from `unshare --user --map-root-user --mount` whose files are reached through
//!   `/proc/PID/root`). The real `qcowx-nbd` serves it; a real client (libnbd from
//!   Python) fills the file system with a filler file. A write that needs a new cluster
//!   fails with `ENOSPC` as the client sees it; in-place writes, reads, flushes and
//!   other connections carry on; after the filler is deleted the same connection
//!   writes again; `qemu-img check` is clean after a clean shutdown. A shutdown while
//!   the file system is still full fails cleanly and `qemu-img check -r all` repairs
//!   the image without losing a flushed byte. The `qcowx` command line reports
//!   `ENOSPC` naming the file and the offset.
//! * **I/O errors, through a storage wrapper.** A real `EIO` cannot be caused on a
//!   regular file without a faulty device, so the server (the `qcowx-nbd` library, in
//!   this process) serves an image whose [`Storage`] fails writes with a chosen
//!   errno on demand. The client (libnbd) sees `EIO` for `EIO`, `ENOSPC` for `ENOSPC`
//!   and `EDQUOT`, `EPERM` for `EROFS`; its connection, and the others, carry on; once
//!   the fault is gone the same connection writes again.
//!
//! Tools: `qemu-img`/`qemu-io` (Debian `qemu-utils`), Python's `nbd` module
//! (`python3-libnbd`), `mount`/`umount` (`mount`) or `unshare` (`util-linux`); a
//! missing one fails the test naming it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use qcowx_core::storage::{MemStorage, Storage};
use qcowx_core::{CreateOptions, Image, OpenOptions};
use qcowx_nbd::config::Settings;
use qcowx_nbd::exports::{ExportPlan, Exports};
use qcowx_nbd::server::{ListenAddr, Server, ServerConfig};
use qcowx_tests::*;

/// Linux errno values the tests inject and expect.
const EPERM: i32 = 1;
const EIO: i32 = 5;
const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EDQUOT: i32 = 122;

const STEP_WAIT: Duration = Duration::from_secs(120);

// ---- a small file system -------------------------------------------------------------------

/// How [`SmallFs`] got its tmpfs.
#[derive(Debug)]
enum Via {
    /// Mounted in this mount namespace (root).
    Mount,
    /// Mounted in a private mount namespace held by this process (`unshare`).
    Namespace(Child),
}

/// A tmpfs of a few MiB, unmounted (or its namespace ended) when dropped.
#[derive(Debug)]
struct SmallFs {
    mnt: PathBuf,
    root: PathBuf,
    via: Via,
    _dir: TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `mib` MiB: with `mount` when allowed, else in a private mount
    /// namespace (`QCOWX_TEST_TMPFS=namespace` forces the latter). Panics, saying
    /// why each way failed, when neither works.
    fn new(mib: u64) -> SmallFs {
        let dir = tempdir();
        let mnt = dir.path().join("fs");
        std::fs::create_dir(&mnt).expect("mount point");
        let size = format!("size={mib}m");
        let force_ns = std::env::var("QCOWX_TEST_TMPFS").as_deref() == Ok("namespace");
        let mount_err = if force_ns {
            "skipped (QCOWX_TEST_TMPFS=namespace)".to_string()
        } else {
            match Command::new("mount")
                .args(["-t", "tmpfs", "-o", &size, "qcowx-test"])
                .arg(&mnt)
                .stdin(Stdio::null())
                .output()
            {
                Ok(o) if o.status.success() => {
                    return SmallFs {
                        root: mnt.clone(),
                        mnt,
                        via: Via::Mount,
                        _dir: dir,
                    }
                }
                Ok(o) => describe(&o),
                Err(e) => format!("cannot run mount (package mount): {e}"),
            }
        };
        // A namespace that mounts the tmpfs, says so, and sleeps until killed.
        let child = Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
            .arg("mount -t tmpfs -o \"$1\" qcowx-test \"$2\" && echo mounted && exec sleep 86400")
            .args(["sh", &size])
            .arg(&mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot mount a tmpfs: mount failed ({mount_err}); unshare cannot run \
                 (package util-linux): {e}"
            ),
        };
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        let _ = BufReader::new(stdout).read_line(&mut line);
        if line.trim() != "mounted" {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait for unshare");
            panic!(
                "cannot mount a tmpfs: mount failed ({mount_err}); in a user and mount \
                 namespace it failed too ({}); run the tests as root or allow \
                 unprivileged user namespaces",
                describe(&out)
            );
        }
        let root = PathBuf::from(format!("/proc/{}/root", child.id()))
            .join(mnt.strip_prefix("/").expect("an absolute mount point"));
        SmallFs {
            mnt,
            root,
            via: Via::Namespace(child),
            _dir: dir,
        }
    }

    /// Where files on the tmpfs are reached from this process.
    fn path(&self) -> &Path {
        &self.root
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        match &mut self.via {
            Via::Mount => {
                // Lazy: a server that still has the image open must not keep the
                // mount (or the test directory) alive.
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
            Via::Namespace(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

// ---- a Python script driven step by step ------------------------------------------------------

/// A Python (libnbd) script that prints a line when it reaches a step and waits for
/// a line on stdin before going on. Dropping it kills the script.
struct StepScript {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    out: Vec<String>,
}

/// Python helpers for every script: `step(name)` announces a step and waits for the
/// test; `fails(errno_name, f, *args)` asserts that an NBD call fails with that errno.
const PY_PRELUDE: &str = r#"
import errno, os, sys, nbd
def step(name):
    print(name, flush=True)
    if sys.stdin.readline() == "":
        sys.exit("the test went away")
def fails(name, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        assert e.errno == name and e.errnum == getattr(errno, name), \
            "%s: expected %s, got %s (%s): %s" % (f.__name__, name, e.errno, e.errnum, e.string)
        return
    raise AssertionError("%s succeeded; expected %s" % (f.__name__, name))
"#;

impl StepScript {
    fn start(script: &str, args: &[&str]) -> StepScript {
        let mut child = python3_libnbd()
            .arg("-c")
            .arg(format!("{PY_PRELUDE}\n{script}"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start python3");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        StepScript {
            child: Some(child),
            stdin,
            lines: rx,
            out: Vec::new(),
        }
    }

    /// Kills the script and returns what it wrote to stderr.
    fn kill(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if let Some(mut e) = c.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
        }
        err
    }

    /// Waits for the script to print `step`.
    fn reached(&mut self, step: &str) {
        loop {
            match self.lines.recv_timeout(STEP_WAIT) {
                Ok(l) => {
                    let done = l.trim() == step;
                    self.out.push(l);
                    if done {
                        return;
                    }
                }
                Err(_) => {
                    let err = self.kill();
                    panic!(
                        "the script did not reach '{step}' within {STEP_WAIT:?}\nstdout: {:?}\nstderr: {err}",
                        self.out
                    );
                }
            }
        }
    }

    /// Lets the script go on.
    fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("write to the script");
        stdin.flush().expect("flush");
    }

    /// Waits (bounded) for the script to end and asserts that it succeeded.
    fn finish(mut self) {
        self.stdin = None;
        let deadline = std::time::Instant::now() + STEP_WAIT;
        let status = loop {
            let c = self.child.as_mut().expect("running");
            if let Some(s) = c.try_wait().expect("wait for python3") {
                break Some(s);
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.out.push(l);
        }
        let err = self.kill();
        match status {
            Some(s) if s.success() => {}
            Some(s) => panic!(
                "the script failed: {s}\nstdout: {:?}\nstderr: {err}",
                self.out
            ),
            None => panic!(
                "the script did not end within {STEP_WAIT:?}\nstdout: {:?}\nstderr: {err}",
                self.out
            ),
        }
    }
}

impl Drop for StepScript {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---- disk full, for real ---------------------------------------------------------------------

/// A qcowx image of `size` bytes at `path` holding `data` at offset 0, closed.
fn image_with(path: &Path, size: u64, data: &[u8]) {
    let img = Image::create(path, &CreateOptions::new(size)).expect("create image");
    img.write_at(data, 0).expect("write");
    img.close().expect("close");
}

/// Python: fills the file system holding argv path with a filler file (1 MiB writes,
/// then 4 KiB ones, until ENOSPC).
const PY_FILL: &str = r#"
def fill(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    for size in (1 << 20, 4096, 512):
        chunk = b"\xff" * size
        while True:
            try:
                os.write(fd, chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
    os.fsync(fd)
    os.close(fd)
"#;

/// The served image's file system fills up: a write needing a new cluster fails with
/// ENOSPC; in-place writes, reads and flushes on that connection and another carry
/// on; after the filler is removed the same connection writes again; after a clean
/// shutdown `qemu-img check` is clean and every write acknowledged is there.
#[test]
fn a_full_file_system_fails_nbd_writes_with_enospc_and_recovers_when_space_returns() {
    let dir = tempdir();
    let fs = SmallFs::new(16);
    let image = fs.path().join("disk.qcow2");
    let before = pattern(1, 1 << 20);
    image_with(&image, 64 << 20, &before);
    let server = QcowxNbd::in_dir(dir.path(), &image, &["-t"]);
    let filler = fs.path().join("filler");
    let mut py = StepScript::start(
        &format!(
            "{PY_FILL}\n{}",
            r#"
uri, filler, before = sys.argv[1], sys.argv[2], open(sys.argv[3], "rb").read()
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
assert a.pread(len(before), 0) == before
a.pwrite(b"\x11" * 65536, 1 << 20)
a.flush()
fill(filler)
step("full")
# A write that needs a new data cluster.
fails("ENOSPC", a.pwrite, b"\x22" * 65536, 32 << 20)
fails("ENOSPC", a.pwrite, b"\x23" * 4096, 40 << 20)
# In-place writes, reads and flushes carry on, on this connection and the other.
a.pwrite(b"\x33" * 4096, 0)
a.flush()
assert a.pread(65536, 1 << 20) == b"\x11" * 65536
assert b.pread(4096, 0) == b"\x33" * 4096
assert b.pread(len(before) - 4096, 4096) == before[4096:]
assert b.pread(65536, 32 << 20) == bytes(65536), "the failed write left nothing"
b.flush()
step("checked")
os.unlink(filler)
# Space is back: the same connection writes.
a.pwrite(b"\x22" * 65536, 32 << 20)
a.flush()
assert b.pread(65536, 32 << 20) == b"\x22" * 65536
a.shutdown(); b.shutdown()
print("ok")
"#
        ),
        &[
            &server.uri("default"),
            filler.to_str().expect("UTF-8 path"),
            write_scratch(dir.path(), "before.bin", &before)
                .to_str()
                .expect("UTF-8 path"),
        ],
    );
    py.reached("full");
    // The file system really is full.
    let probe = fs.path().join("probe");
    let err = std::fs::write(&probe, [0u8; 4096]).expect_err("a full file system");
    assert_eq!(err.raw_os_error(), Some(ENOSPC), "{err}");
    let _ = std::fs::remove_file(&probe);
    py.go();
    py.reached("checked");
    py.go();
    py.finish();
    server.stop();

    assert_qemu_check_clean(&image);
    let mut expect = before.clone();
    expect[..4096].fill(0x33);
    let img = open_ro(&image);
    let mut buf = vec![0u8; expect.len()];
    img.read_at(&mut buf, 0).expect("read");
    assert!(buf == expect, "data written before the disk filled");
    for (off, byte) in [(1u64 << 20, 0x11u8), (32 << 20, 0x22)] {
        let mut b = vec![0u8; 65536];
        img.read_at(&mut b, off).expect("read");
        assert!(b.iter().all(|&x| x == byte), "data at {off}");
    }
}

fn write_scratch(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write scratch file");
    p
}

/// The server is stopped while the file system is still full and a new L2 table
/// waits to be written: the shutdown fails, saying so; once space returns, `qemu-img
/// check -r all` repairs the image and nothing flushed is lost.
#[test]
fn a_shutdown_on_a_full_file_system_fails_cleanly_and_repair_loses_nothing() {
    let dir = tempdir();
    let fs = SmallFs::new(12);
    let image = fs.path().join("disk.qcow2");
    let before = pattern(2, 1 << 20);
    // 1 GiB: offset 768 MiB lies under a second L2 table (each maps 512 MiB).
    image_with(&image, 1 << 30, &before);
    let mut server = QcowxNbd::in_dir(dir.path(), &image, &["-t"]);
    let filler = fs.path().join("filler");
    let py = StepScript::start(
        &format!(
            "{PY_FILL}\n{}",
            r#"
uri, filler = sys.argv[1], sys.argv[2]
a = nbd.NBD(); a.connect_uri(uri)
a.pwrite(b"\x44" * 65536, 2 << 20)
a.flush()
fill(filler)
fails("ENOSPC", a.pwrite, b"\x55" * 65536, 768 << 20)
a.shutdown()
print("ok")
"#
        ),
        &[&server.uri("default"), filler.to_str().expect("UTF-8 path")],
    );
    py.finish();
    send_signal(server.pid(), "TERM");
    let status = server.wait_exit();
    let stderr = server.stderr();
    assert!(
        !status.success(),
        "the shutdown cannot write the new L2 table; it succeeded:\n{stderr}"
    );
    assert!(
        stderr.contains("No space left on device") && stderr.contains("disk.qcow2"),
        "the failure names the file and the cause:\n{stderr}"
    );
    std::fs::remove_file(&filler).expect("remove the filler");

    let out = run_ok(
        qemu_img()
            .args(["check", "-r", "all", "-f", "qcow2"])
            .arg(&image),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Data may be corrupted"),
        "{}",
        describe(&out)
    );
    assert_qemu_check_clean(&image);
    let img = open_ro(&image);
    let mut buf = vec![0u8; before.len()];
    img.read_at(&mut buf, 0).expect("read");
    assert!(buf == before, "data written before");
    let mut b = vec![0u8; 65536];
    img.read_at(&mut b, 2 << 20).expect("read");
    assert!(b.iter().all(|&x| x == 0x44), "the flushed write");
    img.read_at(&mut b, 768 << 20).expect("read");
    assert!(b.iter().all(|&x| x == 0), "the failed write left nothing");
}

/// `qcowx io` and `qcowx create` on a full file system fail with a message naming
/// the file, the offset and the cause; the failed create leaves no file.
#[test]
fn the_cli_reports_enospc_with_the_file_and_offset() {
    let fs = SmallFs::new(4);
    let image = fs.path().join("disk.qcow2");
    image_with(&image, 64 << 20, &pattern(3, 4096));
    let filler = fs.path().join("filler");
    let f = std::fs::File::create(&filler).expect("filler");
    let mut f = std::io::BufWriter::new(f);
    loop {
        if let Err(e) = f.write_all(&[0xffu8; 4096]).and_then(|_| f.flush()) {
            assert_eq!(e.raw_os_error(), Some(ENOSPC), "{e}");
            break;
        }
    }
    drop(f);
    let out = run(Command::new(qcowx_cli_bin())
        .args(["io", "-c", "write -P 0x5a 8M 64k"])
        .arg(&image));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "qcowx io on a full disk: {}",
        describe(&out)
    );
    assert!(
        stderr.contains(&image.display().to_string())
            && stderr.contains("offset")
            && stderr.contains("No space left on device"),
        "qcowx io: {}",
        describe(&out)
    );
    let other = fs.path().join("new.qcow2");
    let out = run(Command::new(qcowx_cli_bin())
        .arg("create")
        .arg(&other)
        .arg("64M"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "qcowx create on a full disk: {}",
        describe(&out)
    );
    assert!(
        stderr.contains(&other.display().to_string()) && stderr.contains("No space left on device"),
        "qcowx create: {}",
        describe(&out)
    );
    assert!(
        !other.exists(),
        "a failed create leaves no partial image behind"
    );
    std::fs::remove_file(&filler).expect("remove the filler");
    assert_qemu_check_clean(&image);
}

// ---- I/O errors through a storage wrapper --------------------------------------------------------

/// An in-memory image file whose writes fail with a chosen errno while one is set.
#[derive(Debug, Default)]
struct Switch {
    inner: MemStorage,
    errno: AtomicI32,
}

impl Switch {
    fn fail(&self, errno: i32) {
        self.errno.store(errno, Ordering::SeqCst);
    }
    fn check(&self) -> std::io::Result<()> {
        match self.errno.load(Ordering::SeqCst) {
            0 => Ok(()),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

impl Storage for Switch {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.punch_hole(offset, len)
    }
    fn path(&self) -> Option<&Path> {
        None
    }
}

/// The server's storage fails writes with EIO, then ENOSPC, EDQUOT and EROFS: libnbd
/// sees EIO, ENOSPC, ENOSPC and EPERM; reads, flushes, this connection and another
/// carry on; once the storage works again the same connection writes.
#[test]
fn storage_errors_reach_nbd_clients_as_their_errno_and_the_connection_carries_on() {
    let dir = tempdir();
    let storage = Arc::new(Switch::default());
    let img = Image::create_in(storage.clone(), &CreateOptions::new(64 << 20)).expect("create");
    let before = pattern(4, 1 << 20);
    img.write_at(&before, 0).expect("write");
    img.flush().expect("flush");
    let image = Arc::new(img);
    let plan = ExportPlan::Auto {
        main_name: "default".into(),
        main_description: None,
    };
    let exports = Arc::new(Exports::new(image, plan, false).expect("exports"));
    let sock = dir.path().join("nbd.sock");
    let server = Server::bind(
        exports,
        ServerConfig {
            listen: vec![ListenAddr::Unix(sock.clone())],
            socket_activation: false,
            max_clients: 0,
            persistent: true,
            settings: Settings::default(),
            control: None,
        },
    )
    .expect("bind");
    let handle = server.shutdown_handle();
    let running = thread::spawn(move || server.run());
    struct Stop(qcowx_nbd::ShutdownHandle);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.shutdown();
        }
    }
    let stop = Stop(handle);

    let before_file = write_scratch(dir.path(), "before.bin", &before);
    let mut py = StepScript::start(
        r#"
uri, before = sys.argv[1], open(sys.argv[2], "rb").read()
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.set_request_structured_replies(False); b.connect_uri(uri)
for name in ("EIO", "ENOSPC", "ENOSPC", "EPERM"):
    step("fault " + name)
    fails(name, a.pwrite, b"\x66" * 65536, 8 << 20)   # a new cluster
    fails(name, a.pwrite, b"\x77" * 4096, 0)          # in place
    fails(name, b.pwrite, b"\x77" * 4096, 4096)       # simple replies
    a.flush()
    assert a.pread(len(before), 0) == before
    assert b.pread(len(before), 0) == before
step("healed")
a.pwrite(b"\x66" * 65536, 8 << 20)
a.pwrite(b"\x77" * 4096, 0)
a.flush()
assert b.pread(65536, 8 << 20) == b"\x66" * 65536
assert b.pread(4096, 0) == b"\x77" * 4096
a.shutdown(); b.shutdown()
print("ok")
"#,
        &[
            &format!("nbd+unix:///default?socket={}", sock.display()),
            before_file.to_str().expect("UTF-8 path"),
        ],
    );
    for (step, errno) in [
        ("fault EIO", EIO),
        ("fault ENOSPC", ENOSPC),
        ("fault ENOSPC", EDQUOT),
        ("fault EPERM", EROFS),
    ] {
        // The script waits at the step: the fault is set before it goes on.
        py.reached(step);
        storage.fail(errno);
        py.go();
    }
    py.reached("healed");
    storage.fail(0);
    py.go();
    py.finish();
    drop(stop);
    let ran = run_bounded("server shutdown", Duration::from_secs(60), move || {
        running.join()
    });
    ran.result
        .expect("shutdown finished")
        .expect("server thread")
        .expect("the server closed the image cleanly");

    let bytes = storage.inner.to_vec();
    let img = Image::from_storage(
        Arc::new(MemStorage::from_vec(bytes.clone())),
        &OpenOptions::new(),
    )
    .expect("reopen");
    let report = img.check().expect("check");
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
    let mut expect = before.clone();
    expect[..4096].fill(0x77);
    let mut buf = vec![0u8; expect.len()];
    img.read_at(&mut buf, 0).expect("read");
    assert!(buf == expect, "data after the faults");
    let qcow = write_scratch(dir.path(), "image.qcow2", &bytes);
    assert_qemu_check_clean(&qcow);
}

/// The errno mapping itself (`qcowx_nbd::error::nbd_errno`), for the OS errors the
/// tests above cannot all cause for real.
#[test]
fn os_errors_map_to_the_nbd_errors_the_protocol_names() {
    use qcowx_nbd::error::nbd_errno;
    let io = |code| qcowx_core::Error::Io {
        file: "x".into(),
        op: "write data",
        offset: 0,
        source: std::io::Error::from_raw_os_error(code),
    };
    for (code, nbd) in [
        (EIO, 5),
        (ENOSPC, 28),
        (EDQUOT, 28),
        (27 /* EFBIG */, 28),
        (EPERM, 1),
        (13 /* EACCES */, 1),
        (EROFS, 1),
        (22 /* EINVAL */, 22),
        (2 /* ENOENT */, 5),
    ] {
        assert_eq!(nbd_errno(&io(code), true), nbd, "OS error {code}");
    }
    let limit = qcowx_core::Error::Limit {
        file: "x".into(),
        what: "the snapshot table holds at most 65536 roots".into(),
    };
    assert_eq!(nbd_errno(&limit, true), 28);
}
