//! Interoperability of qcowx image locks with real QEMU tools (`qemu-img`, `qemu-io`).
//!
//! A missing QEMU tool fails the test, naming its package.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use qcowx_core::storage::lock::{
    self, LockError, LockHolder, LockMode, LockStatus, Permission, Permissions,
};
use qcowx_core::storage::{FileStorage, OpenMode, Storage};
use qcowx_tests::{describe, require_qemu_tools, run};

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
const WAIT_LIMIT: Duration = Duration::from_secs(20);

/// Creates a 1 MiB qcow2 image with `qemu-img create` in a fresh directory.
fn qemu_image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("disk.qcow2");
    let out = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("1M"));
    assert!(out.status.success(), "qemu-img create: {}", describe(&out));
    (dir, path)
}

fn qemu_io_write(path: &Path) -> Output {
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 512"])
        .arg(path))
}

fn qemu_img_info(path: &Path, force_share: bool) -> Output {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("info");
    if force_share {
        cmd.arg("-U");
    }
    run(cmd.arg(path))
}

/// Asserts that a QEMU tool failed because of the image lock.
fn assert_lock_failure(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("lock"),
        "{what} should fail with a lock error: {}",
        describe(out)
    );
    println!("{what} refused as expected: {}", stderr.trim());
}

fn assert_magic(s: &dyn Storage) {
    let mut magic = [0u8; 4];
    s.read_at(&mut magic, 0).expect("read header");
    assert_eq!(&magic, QCOW2_MAGIC);
}

/// A `qemu-io` process holding an image open, killed if the test ends early.
struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl QemuIo {
    /// Starts `qemu-io` on `path` reading commands from a pipe we keep open, and waits
    /// until a lock on `perm` by another process is observable.
    fn spawn(path: &Path, read_only: bool, perm: Permission) -> QemuIo {
        let log = path.with_extension("qemu-io.log");
        let log_file = File::create(&log).expect("create log");
        let mut cmd = Command::new("qemu-io");
        if read_only {
            cmd.arg("-r");
        }
        let mut child = cmd
            .args(["-f", "qcow2"])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().expect("clone log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn qemu-io");
        let stdin = child.stdin.take();
        let mut qemu = QemuIo { child, stdin, log };

        let probe = File::open(path).expect("open image for probing");
        let start = Instant::now();
        loop {
            let status = lock::held_by_others(&probe).expect("query locks");
            if status.held.has(perm) {
                println!("qemu-io (read_only={read_only}) holds {status:?}");
                break;
            }
            if let Some(exit) = qemu.child.try_wait().expect("poll qemu-io") {
                panic!("qemu-io exited early ({exit}): {}", qemu.log_text());
            }
            assert!(
                start.elapsed() < WAIT_LIMIT,
                "qemu-io never locked the image: {}",
                qemu.log_text()
            );
            sleep(Duration::from_millis(20));
        }
        qemu
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Closes qemu-io's stdin so that it quits, and waits for it (bounded).
    fn finish(mut self) {
        drop(self.stdin.take());
        let start = Instant::now();
        loop {
            match self.child.try_wait().expect("poll qemu-io") {
                Some(status) => {
                    assert!(status.success(), "qemu-io: {status}: {}", self.log_text());
                    return;
                }
                None if start.elapsed() > WAIT_LIMIT => {
                    panic!("qemu-io did not exit after EOF: {}", self.log_text())
                }
                None => sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn qcowx_writer_locks_out_qemu() {
    require_qemu_tools();
    let (_dir, path) = qemu_image();

    let storage = FileStorage::open(&path, OpenMode::read_write()).expect("open exclusive");
    assert_magic(&storage);

    assert_lock_failure("qemu-io write", &qemu_io_write(&path));
    assert_lock_failure(
        "qemu-io -r read",
        &run(Command::new("qemu-io")
            .args(["-r", "-f", "qcow2", "-c", "read 0 512"])
            .arg(&path)),
    );
    assert_lock_failure("qemu-img info", &qemu_img_info(&path, false));
    let out = qemu_img_info(&path, true);
    assert!(out.status.success(), "qemu-img info -U: {}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("qcow2"));

    drop(storage);
    let out = qemu_io_write(&path);
    assert!(
        out.status.success(),
        "qemu-io after unlock: {}",
        describe(&out)
    );
    let out = qemu_img_info(&path, false);
    assert!(
        out.status.success(),
        "qemu-img info after unlock: {}",
        describe(&out)
    );
}

#[test]
fn qcowx_reader_shares_with_qemu_readers_only() {
    require_qemu_tools();
    let (_dir, path) = qemu_image();

    let storage = FileStorage::open(&path, OpenMode::read_only()).expect("open shared");
    assert_magic(&storage);
    let out = qemu_img_info(&path, false);
    assert!(out.status.success(), "qemu-img info: {}", describe(&out));
    assert_lock_failure("qemu-io write", &qemu_io_write(&path));

    drop(storage);
    let out = qemu_io_write(&path);
    assert!(
        out.status.success(),
        "qemu-io after unlock: {}",
        describe(&out)
    );
}

#[test]
fn qemu_writer_locks_out_qcowx() {
    require_qemu_tools();
    let (_dir, path) = qemu_image();
    let qemu = QemuIo::spawn(&path, false, Permission::Write);

    // The bytes a QEMU qcow2 writer holds, read back through our query.
    let probe = File::open(&path).unwrap();
    let status = lock::held_by_others(&probe).unwrap();
    assert!(status
        .held
        .contains(Permissions::CONSISTENT_READ | Permissions::WRITE | Permissions::RESIZE));
    assert!(status
        .unshared
        .contains(Permissions::WRITE | Permissions::RESIZE));
    assert!(!status.unshared.has(Permission::ConsistentRead));

    let err = FileStorage::open(&path, OpenMode::read_write()).unwrap_err();
    println!("exclusive open refused: {err}");
    let lock_err = err.lock_error().expect("a lock conflict");
    assert_eq!(lock_err.permission(), Some(Permission::Write));
    assert!(err.to_string().contains("\"write\""), "{err}");
    assert!(err.to_string().contains("disk.qcow2"), "{err}");

    let err = FileStorage::open(&path, OpenMode::read_only()).unwrap_err();
    println!("shared open refused: {err}");
    assert!(
        matches!(
            err.lock_error(),
            Some(LockError::Held {
                permission: Permission::Write,
                holder: LockHolder::Process { name, .. },
            }) if name == "qemu-io"
        ),
        "{err}"
    );
    assert!(err.to_string().contains("(qemu-io)"), "{err}");

    let forced = FileStorage::open(&path, OpenMode::read_only().with_lock(LockMode::ForceShare))
        .expect("force-share open");
    assert_magic(&forced);

    qemu.finish();
    assert_eq!(lock::held_by_others(&probe).unwrap(), LockStatus::default());
    let storage = FileStorage::open(&path, OpenMode::read_write()).expect("open after qemu-io");
    assert_magic(&storage);
    drop(forced);
}

#[test]
fn qemu_reader_blocks_only_qcowx_writers() {
    require_qemu_tools();
    let (_dir, path) = qemu_image();
    let qemu = QemuIo::spawn(&path, true, Permission::ConsistentRead);

    let err = FileStorage::open(&path, OpenMode::read_write()).unwrap_err();
    println!("exclusive open refused: {err}");
    assert_eq!(
        err.lock_error().and_then(LockError::permission),
        Some(Permission::Write)
    );
    let reader = FileStorage::open(&path, OpenMode::read_only()).expect("shared open");
    assert_magic(&reader);

    qemu.finish();
    drop(reader);
    FileStorage::open(&path, OpenMode::read_write()).expect("open after qemu-io");
}

#[test]
fn two_storages_in_one_process_conflict() {
    require_qemu_tools();
    let (_dir, path) = qemu_image();

    let first = FileStorage::open(&path, OpenMode::read_write()).expect("first open");
    let err = FileStorage::open(&path, OpenMode::read_write()).unwrap_err();
    assert!(
        err.lock_error().is_some_and(LockError::is_conflict),
        "{err}"
    );
    assert!(FileStorage::open(&path, OpenMode::read_only()).is_err());
    // QEMU sees the lock of the first one only.
    assert_lock_failure("qemu-img info", &qemu_img_info(&path, false));

    drop(first);
    let a = FileStorage::open(&path, OpenMode::read_only()).expect("reader a");
    let b = FileStorage::open(&path, OpenMode::read_only()).expect("reader b");
    assert!(FileStorage::open(&path, OpenMode::read_write()).is_err());
    drop((a, b));
    let out = qemu_io_write(&path);
    assert!(
        out.status.success(),
        "qemu-io after unlock: {}",
        describe(&out)
    );
}
