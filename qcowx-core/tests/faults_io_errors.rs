//! Faults of the storage under an image: failed writes and syncs during a sequence of
//! operations.
//!
//! The storage is `Faulty` (`faults_common`), an in-memory file whose k-th write or
//! sync of a run fails with `EIO`, either once (a transient error) or from then on (a
//! dead disk).
//!
//! * I/O errors: a fixed sequence of operations (write, flush, snapshot, fork, write
//!   through the new VDI, delete, revert, close) runs once per write index and once per
//!   sync index, failing exactly there. The caller gets `Error::Io` with `EIO`; the
//!   failed handle is dropped; the file then opens, `check` finds no corruption, every
//!   write acknowledged before a completed flush reads back, every snapshot the API
//!   reported reads exactly what its VDI held, and `qemu-img check` (Debian package
//!   `qemu-utils`) is clean once qcowx has closed the image again. With a transient
//!   error the sequence also goes on after the failure, and the final close must
//!   leave a clean image holding every acknowledged write.

mod faults_common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use qcowx_core::storage::MemStorage;
use qcowx_core::{Error, Image, OpenOptions};
use qcowx_tests::assert_qemu_check_clean_bytes;

use faults_common::{base_image, data, io_op, os_error, rw, sector, Faulty, Kind, Rule, SIZE};

/// The seed a sector read back carries, or `None` if it is not a sector any write
/// made at that offset.
fn seed_of(s: &[u8], offset: u64) -> Option<u8> {
    if s.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let seed = s[8];
    (s == sector(seed, offset)).then_some(seed)
}

// ---- injected I/O errors ------------------------------------------------------------------------

/// What the model expects of one root, per 512-byte sector: the seed durable at the
/// last completed flush, the seed of the last acknowledged write, the seeds written
/// since the flush, and the seeds of failed writes and operations that may or may not
/// have landed (kept until an acknowledged write replaces the sector).
#[derive(Debug, Clone)]
struct Disk {
    durable: Vec<u8>,
    current: Vec<u8>,
    since: Vec<BTreeSet<u8>>,
    failed: Vec<BTreeSet<u8>>,
}

impl Disk {
    fn new(sectors: usize) -> Disk {
        Disk {
            durable: vec![0; sectors],
            current: vec![0; sectors],
            since: vec![BTreeSet::new(); sectors],
            failed: vec![BTreeSet::new(); sectors],
        }
    }

    fn write(&mut self, offset: u64, len: u64, seed: u8, acknowledged: bool) {
        for s in offset / 512..(offset + len) / 512 {
            let s = s as usize;
            if acknowledged {
                self.since[s].insert(seed);
                self.current[s] = seed;
                self.failed[s].clear();
            } else {
                self.failed[s].insert(seed);
            }
        }
    }

    /// Either this disk or `other` (an operation that replaces the content failed).
    fn maybe_became(&mut self, other: &Disk) {
        for (i, &s) in other.current.iter().enumerate() {
            self.failed[i].insert(s);
            self.failed[i].extend(other.failed[i].iter().copied());
        }
    }

    /// Everything acknowledged is durable now.
    fn flushed(&mut self) {
        self.durable = self.current.clone();
        for s in &mut self.since {
            s.clear();
        }
    }

    /// Checks a root's content: each sector holds its durable seed, a seed written
    /// since, or the seed of a failed write.
    fn verify(&self, read: &dyn Fn(&mut [u8], u64), what: &str) {
        let mut buf = vec![0u8; 256 << 10];
        let total = self.durable.len() as u64 * 512;
        let mut off = 0;
        while off < total {
            let n = (buf.len() as u64).min(total - off);
            read(&mut buf[..n as usize], off);
            for (i, s) in buf[..n as usize].chunks(512).enumerate() {
                let at = off + i as u64 * 512;
                let idx = (at / 512) as usize;
                let got = seed_of(s, at);
                let ok = got.is_some_and(|g| {
                    g == self.durable[idx]
                        || self.since[idx].contains(&g)
                        || self.failed[idx].contains(&g)
                });
                assert!(
                    ok,
                    "{what}: sector at {at}: found seed {got:?}, expected {} or one of {:?} \
                     or {:?}",
                    self.durable[idx], self.since[idx], self.failed[idx]
                );
            }
            off += n;
        }
    }

    /// The content a snapshot taken now holds (immutable from then on).
    fn exact(&self) -> Disk {
        Disk {
            durable: self.current.clone(),
            current: self.current.clone(),
            since: vec![BTreeSet::new(); self.current.len()],
            failed: self.failed.clone(),
        }
    }
}

/// One step of the sequence.
#[derive(Debug, Clone, Copy)]
enum Step {
    Write {
        root: &'static str,
        offset: u64,
        len: u64,
        seed: u8,
    },
    Flush,
    Snapshot {
        vdi: &'static str,
        name: &'static str,
    },
    Fork {
        snapshot: &'static str,
        vdi: &'static str,
    },
    DeleteSnapshot(&'static str),
    Revert {
        vdi: &'static str,
        snapshot: &'static str,
    },
    Close,
}

impl Step {
    fn name(&self) -> &'static str {
        match self {
            Step::Write { .. } => "write",
            Step::Flush => "flush",
            Step::Snapshot { .. } => "snapshot",
            Step::Fork { .. } => "fork",
            Step::DeleteSnapshot(_) => "delete",
            Step::Revert { .. } => "revert",
            Step::Close => "close",
        }
    }
}

/// Write, flush, snapshot, copy-on-write, fork, write through the fork, a second L2
/// table, delete, revert, close: every kind of metadata write qcowx makes.
fn sequence() -> Vec<Step> {
    use Step::*;
    vec![
        Write {
            root: "default",
            offset: 0,
            len: 8192,
            seed: 10,
        },
        Write {
            root: "default",
            offset: 3 << 20,
            len: 4096,
            seed: 11,
        },
        Flush,
        Snapshot {
            vdi: "default",
            name: "s1",
        },
        Write {
            root: "default",
            offset: 4096,
            len: 512,
            seed: 12,
        },
        Fork {
            snapshot: "s1",
            vdi: "v1",
        },
        Write {
            root: "v1",
            offset: 0,
            len: 1024,
            seed: 13,
        },
        Write {
            root: "default",
            offset: 6 << 20,
            len: 4096,
            seed: 14,
        },
        Flush,
        Snapshot {
            vdi: "v1",
            name: "s2",
        },
        Write {
            root: "v1",
            offset: 2048,
            len: 512,
            seed: 15,
        },
        DeleteSnapshot("s2"),
        Snapshot {
            vdi: "default",
            name: "s3",
        },
        Write {
            root: "default",
            offset: 0,
            len: 512,
            seed: 16,
        },
        Revert {
            vdi: "v1",
            snapshot: "s3",
        },
        Write {
            root: "v1",
            offset: 512,
            len: 512,
            seed: 17,
        },
        Revert {
            vdi: "default",
            snapshot: "s1",
        },
        Write {
            root: "default",
            offset: 1024,
            len: 1024,
            seed: 18,
        },
        Flush,
        Close,
    ]
}

/// The model of every root.
#[derive(Debug, Clone)]
struct Model {
    vdis: BTreeMap<&'static str, Disk>,
    /// Snapshots the API reported created (and not deleted), exact content.
    snapshots: BTreeMap<&'static str, Disk>,
    /// Snapshots whose creation failed or whose deletion failed: if present after
    /// the failure, they read exactly this.
    maybe: BTreeMap<&'static str, Disk>,
    /// VDIs whose creation failed: may exist.
    maybe_vdis: BTreeMap<&'static str, Disk>,
}

impl Model {
    fn new() -> Model {
        let mut vdis = BTreeMap::new();
        vdis.insert("default", Disk::new((SIZE / 512) as usize));
        Model {
            vdis,
            snapshots: BTreeMap::new(),
            maybe: BTreeMap::new(),
            maybe_vdis: BTreeMap::new(),
        }
    }

    fn flushed(&mut self) {
        for d in self.vdis.values_mut().chain(self.maybe_vdis.values_mut()) {
            d.flushed();
        }
    }
}

/// How a run treats the failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Stop at the first error and drop the image.
    Stop,
    /// Go on with the rest of the sequence (the error was transient).
    Continue,
}

/// What a run saw.
struct Run {
    /// (step, error op) of every error the API returned.
    errors: Vec<(&'static str, String)>,
    model: Model,
    /// Whether the final close succeeded.
    closed: bool,
}

/// Runs the sequence on `storage` (which fails per its rule).
fn run_sequence(storage: &Arc<Faulty>, after: After, expect_errno: i32) -> Run {
    let mut model = Model::new();
    let mut errors = Vec::new();
    let mut closed = false;
    let img = match Image::from_storage(storage.clone(), &rw()) {
        Ok(i) => Arc::new(i),
        Err(e) => {
            assert_eq!(os_error(&e), Some(expect_errno), "open: {e:?}");
            errors.push(("open", io_op(&e)));
            return Run {
                errors,
                model,
                closed,
            };
        }
    };
    for step in sequence() {
        let r: Result<(), Error> = match step {
            Step::Write {
                root,
                offset,
                len,
                seed,
            } => {
                let r = img
                    .open_root(root)
                    .and_then(|d| d.write_at(&data(seed, offset, len), offset));
                if let Some(d) = model.vdis.get_mut(root) {
                    d.write(offset, len, seed, r.is_ok());
                } else {
                    // The VDI's creation failed (and was not retried); writes to it
                    // may fail with "not found" or reach the VDI memory kept.
                    if let Some(d) = model.maybe_vdis.get_mut(root) {
                        d.write(offset, len, seed, r.is_ok());
                    }
                    if matches!(r, Err(Error::NotFound { .. })) {
                        continue;
                    }
                }
                r
            }
            Step::Flush => {
                let r = img.flush();
                if r.is_ok() {
                    model.flushed();
                }
                r
            }
            Step::Snapshot { vdi, name } => {
                let Some(content) = model
                    .vdis
                    .get(vdi)
                    .or_else(|| model.maybe_vdis.get(vdi))
                    .map(Disk::exact)
                else {
                    continue;
                };
                let r = img.snapshot(vdi, name).map(|_| ());
                if matches!(r, Err(Error::NotFound { .. })) && !model.vdis.contains_key(vdi) {
                    continue;
                }
                if r.is_ok() {
                    model.maybe.remove(name);
                    model.snapshots.insert(name, content);
                } else {
                    model.maybe.insert(name, content);
                }
                // A snapshot makes everything written before it durable.
                if r.is_ok() {
                    model.flushed();
                }
                r
            }
            Step::Fork { snapshot, vdi } => {
                let Some(content) = model
                    .snapshots
                    .get(snapshot)
                    .or_else(|| model.maybe.get(snapshot))
                    .cloned()
                else {
                    continue;
                };
                let r = img.fork(snapshot, vdi).map(|_| ());
                match &r {
                    Ok(()) => {
                        model.maybe_vdis.remove(vdi);
                        model.vdis.insert(vdi, content);
                    }
                    Err(Error::NotFound { .. }) => continue,
                    Err(_) => {
                        model.maybe_vdis.insert(vdi, content);
                    }
                }
                r
            }
            Step::DeleteSnapshot(name) => {
                let r = img.delete_snapshot(name);
                if let Some(c) = model.snapshots.remove(name) {
                    if r.is_err() {
                        model.maybe.insert(name, c);
                    }
                } else {
                    model.maybe.remove(name);
                    if matches!(r, Err(Error::NotFound { .. })) {
                        continue;
                    }
                }
                r
            }
            Step::Revert { vdi, snapshot } => {
                let Some(content) = model
                    .snapshots
                    .get(snapshot)
                    .or_else(|| model.maybe.get(snapshot))
                    .cloned()
                else {
                    continue;
                };
                let r = img.revert(vdi, snapshot);
                match &r {
                    Ok(()) => {
                        model.maybe_vdis.remove(vdi);
                        model.vdis.insert(vdi, content);
                    }
                    Err(Error::NotFound { .. }) => continue,
                    Err(_) => {
                        // Either the old head or the snapshot's content.
                        if let Some(d) = model.vdis.get_mut(vdi) {
                            d.maybe_became(&content);
                        }
                        if let Some(d) = model.maybe_vdis.get_mut(vdi) {
                            d.maybe_became(&content);
                        }
                    }
                }
                r
            }
            Step::Close => {
                let r = img.close();
                if r.is_ok() {
                    model.flushed();
                    closed = true;
                }
                r
            }
        };
        if let Err(e) = r {
            assert_eq!(
                os_error(&e),
                Some(expect_errno),
                "{}: expected an I/O error with errno {expect_errno}, got {e:?}",
                step.name()
            );
            errors.push((step.name(), io_op(&e)));
            if after == After::Stop {
                break;
            }
        }
    }
    drop(img);
    Run {
        errors,
        model,
        closed,
    }
}

/// Opens the file a run left (with no faults) and checks it against the model.
fn verify(bytes: Vec<u8>, run: &Run, label: &str, qemu: bool) {
    let mem = Arc::new(MemStorage::from_vec(bytes));
    let img = Arc::new(
        Image::from_storage(mem.clone(), &OpenOptions::new())
            .unwrap_or_else(|e| panic!("{label}: the file does not open: {e}")),
    );
    let report = img
        .check()
        .unwrap_or_else(|e| panic!("{label}: check failed: {e}"));
    // A dirty file's refcounts are stale, and check reports them as `qemu-img check`
    // does; its structure is judged below, where a writable open must recover it.
    if !report.dirty {
        assert_eq!(
            report.corruptions, 0,
            "{label}: corruptions: {:?}",
            report.messages
        );
    }
    if run.closed {
        assert_eq!(report.leaks, 0, "{label}: leaks after a clean close");
        assert!(!report.dirty, "{label}: dirty after a clean close");
    }
    let names: BTreeSet<String> = img
        .list()
        .expect("list")
        .into_iter()
        .map(|r| r.name)
        .collect();
    let check_root = |name: &str, disk: &Disk| {
        let d = img
            .open_root(name)
            .unwrap_or_else(|e| panic!("{label}: '{name}' is missing: {e}"));
        disk.verify(
            &|buf, off| d.read_at(buf, off).expect("read"),
            &format!("{label}: {name}"),
        );
    };
    for (name, disk) in &run.model.vdis {
        check_root(name, disk);
    }
    for (name, disk) in &run.model.snapshots {
        check_root(name, disk);
    }
    for (name, disk) in run.model.maybe.iter().chain(&run.model.maybe_vdis) {
        if names.contains(*name) {
            check_root(name, disk);
        }
    }
    drop(img);
    // qcowx's own close rebuilds exact refcounts: QEMU must find the file clean.
    let img = Image::from_storage(mem.clone(), &rw())
        .unwrap_or_else(|e| panic!("{label}: read-write open failed: {e}"));
    img.close()
        .unwrap_or_else(|e| panic!("{label}: close failed: {e}"));
    let img = Image::from_storage(mem.clone(), &OpenOptions::new()).expect("reopen");
    let report = img.check().expect("check");
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{label}: after close: {:?}",
        report.messages
    );
    drop(img);
    if qemu {
        assert_qemu_check_clean_bytes(&mem.to_vec(), label);
    }
}

/// The image every run starts from: some data, flushed and closed.
fn start_bytes() -> Vec<u8> {
    base_image(&[])
}

/// Runs the sequence once without faults: the number of writes and syncs it makes.
fn calls_of_a_clean_run() -> (u64, u64) {
    let storage = Arc::new(Faulty::from_vec(start_bytes()));
    let run = run_sequence(&storage, After::Stop, libc::EIO);
    assert!(run.errors.is_empty() && run.closed, "{:?}", run.errors);
    verify(storage.inner.to_vec(), &run, "clean run", true);
    storage.counts()
}

fn sweep(kind: Kind, sticky: bool, after: After) -> BTreeSet<(String, String)> {
    let (writes, syncs) = calls_of_a_clean_run();
    let n = match kind {
        Kind::Write => writes,
        Kind::Sync => syncs,
    };
    assert!(n > 10, "the sequence makes {n} {kind:?} calls");
    let mut seen = BTreeSet::new();
    for k in 1..=n {
        let storage = Arc::new(Faulty::from_vec(start_bytes()));
        storage.set_rule(Some(Rule {
            kind,
            index: k,
            sticky,
            errno: libc::EIO,
        }));
        let run = run_sequence(&storage, after, libc::EIO);
        let label = format!(
            "{kind:?} #{k} of {n} fails (sticky {sticky}, {after:?}; errors {:?})",
            run.errors
        );
        assert!(
            !storage.failures().is_empty(),
            "{label}: the failure was never hit"
        );
        assert!(
            !run.errors.is_empty(),
            "{label}: an I/O error was hidden from the caller"
        );
        for (step, op) in &run.errors {
            seen.insert((step.to_string(), op.clone()));
        }
        if after == After::Continue && !sticky {
            // One transient error: the rest of the sequence, and the final close,
            // must have worked unless the close itself hit it.
            let failed_close = run
                .errors
                .iter()
                .any(|(s, _)| *s == "close" || *s == "open");
            assert!(
                run.closed || failed_close,
                "{label}: close failed after a transient error: {:?}",
                run.errors
            );
        }
        // QEMU's check on every fourth point keeps the run short.
        verify(storage.inner.to_vec(), &run, &label, k % 4 == 1);
    }
    seen
}

fn assert_covers(seen: &BTreeSet<(String, String)>, want: &[(&str, &str)]) {
    for (step, op) in want {
        assert!(
            seen.contains(&(step.to_string(), op.to_string())),
            "no failure of '{op}' during '{step}' was exercised; seen: {seen:?}"
        );
    }
}

/// Every write of the sequence fails once, and the run stops there.
#[test]
fn each_write_failing_once_leaves_a_consistent_image() {
    let seen = sweep(Kind::Write, false, After::Stop);
    assert_covers(
        &seen,
        &[
            ("write", "write data"),
            ("write", "write header"),
            ("flush", "write L2 table"),
            ("flush", "write L1 table"),
            ("snapshot", "write L1 table"),
            ("snapshot", "write snapshot table"),
            ("snapshot", "write header"),
            ("fork", "write L1 table"),
            ("fork", "write snapshot table"),
            ("delete", "write snapshot flags"),
            ("revert", "write snapshot table"),
            ("revert", "write L1 table"),
            ("revert", "write header"),
            ("fork", "write header"),
            // A clean close writes the refcount blocks that changed (the table
            // only when a block is added, which this sequence does not need).
            ("close", "write refcount block"),
            ("close", "write header"),
        ],
    );
}

/// From the k-th write on, every write and sync fails (a dead disk).
#[test]
fn a_disk_dying_at_each_write_leaves_a_consistent_image() {
    sweep(Kind::Write, true, After::Stop);
}

/// Every sync of the sequence fails once (the run stops there), and a disk dies at
/// each sync.
#[test]
fn each_sync_failing_leaves_a_consistent_image() {
    let seen = sweep(Kind::Sync, false, After::Stop);
    for step in ["flush", "snapshot", "fork", "delete", "revert", "close"] {
        assert!(
            seen.contains(&(step.to_string(), "fdatasync".to_string())),
            "no failed sync during '{step}': {seen:?}"
        );
    }
    sweep(Kind::Sync, true, After::Stop);
}

/// A transient error at each write and each sync, after which the caller goes on:
/// the rest of the sequence works and the final close leaves a clean image holding
/// every acknowledged write.
#[test]
fn a_transient_error_at_each_point_does_not_poison_the_handle() {
    sweep(Kind::Write, false, After::Continue);
    sweep(Kind::Sync, false, After::Continue);
}
