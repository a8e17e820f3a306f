//! Faults of the storage under an image: a full disk and failed writes and syncs.
//!
//! [`Faulty`] is an in-memory file that fails on demand: once it is "full", writes
//! that need a block not yet allocated fail with `ENOSPC` (what fits is written, as a
//! real short write leaves it; punched holes give space back), and the k-th write or sync of a run fails with `EIO`,
//! either once (a transient error) or from then on (a dead disk).
//!
//! * Disk full: the caller sees an `Error::NoSpace` whose OS error is `ENOSPC` and that
//!   names the file and offset; the image stays consistent and readable; writes (and
//!   snapshots) succeed on the same handle once space returns.
//! * I/O errors: a fixed sequence of operations (write, flush, snapshot, fork, write
//!   through the new VDI, delete, revert, close) runs once per write index and once per
//!   sync index, failing exactly there. The caller gets `Error::Io` with `EIO`; the
//!   failed handle is dropped; the file then opens, `check` finds no corruption, every
//!   write acknowledged before a completed flush reads back, every snapshot the API
//!   reported reads exactly what its VDI held, and `qemu-img check` (Debian package
//!   `qemu-utils`) is clean once qcowx has closed the image again. With a transient
//!   error the sequence also goes on after the failure, and the final close must
//!   leave a clean image holding every acknowledged write.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use qcowx_core::storage::{MemStorage, Storage};
use qcowx_core::{CreateOptions, Error, Image, OpenOptions};
use qcowx_tests::assert_qemu_check_clean_bytes;

// ---- the failing storage -------------------------------------------------------------------

/// Which calls a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `write_at` (and `set_len`, `punch_hole`: every change of the file).
    Write,
    /// `sync_data`.
    Sync,
}

/// Fail the `index`-th call (1-based) of `kind` with `errno`; with `sticky`, fail
/// every later write and sync too.
#[derive(Debug, Clone, Copy)]
struct Rule {
    kind: Kind,
    index: u64,
    sticky: bool,
    errno: i32,
}

#[derive(Debug, Default)]
struct FaultState {
    writes: u64,
    syncs: u64,
    rule: Option<Rule>,
    dead: bool,
    /// 4 KiB blocks of the file that hold data (a sparse file's allocation).
    blocks: BTreeSet<u64>,
    /// At most this many blocks may be allocated (ENOSPC past it).
    budget: Option<usize>,
    /// The errors handed out, with the call index.
    failures: Vec<(Kind, u64)>,
}

/// The allocation unit of [`Faulty`]'s simulated file system.
const BLOCK: u64 = 4096;

#[derive(Debug, Default)]
struct Faulty {
    inner: MemStorage,
    state: Mutex<FaultState>,
}

impl Faulty {
    fn from_vec(data: Vec<u8>) -> Faulty {
        let blocks = (0..(data.len() as u64).div_ceil(BLOCK)).collect();
        Faulty {
            inner: MemStorage::from_vec(data),
            state: Mutex::new(FaultState {
                blocks,
                ..FaultState::default()
            }),
        }
    }

    /// Makes the file system full: no block beyond those allocated now.
    fn fill_up(&self) {
        let mut st = self.state.lock().unwrap();
        st.budget = Some(st.blocks.len());
    }

    fn set_rule(&self, rule: Option<Rule>) {
        let mut st = self.state.lock().unwrap();
        st.rule = rule;
        st.dead = false;
    }

    /// Space returns.
    fn free_up(&self) {
        self.state.lock().unwrap().budget = None;
    }

    fn counts(&self) -> (u64, u64) {
        let st = self.state.lock().unwrap();
        (st.writes, st.syncs)
    }

    fn failures(&self) -> Vec<(Kind, u64)> {
        self.state.lock().unwrap().failures.clone()
    }

    /// Counts a call of `kind`; `Err` if it must fail.
    fn enter(&self, kind: Kind) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        let n = match kind {
            Kind::Write => {
                st.writes += 1;
                st.writes
            }
            Kind::Sync => {
                st.syncs += 1;
                st.syncs
            }
        };
        if st.dead {
            st.failures.push((kind, n));
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if let Some(r) = st.rule {
            if r.kind == kind && r.index == n {
                st.dead = r.sticky;
                st.failures.push((kind, n));
                return Err(io::Error::from_raw_os_error(r.errno));
            }
        }
        Ok(())
    }
}

impl Storage for Faulty {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.enter(Kind::Write)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let mut st = self.state.lock().unwrap();
        // Allocate the blocks in order; on a full file system the write stops at the
        // first block that has no room (a short write), then fails with ENOSPC.
        let mut room_until = end;
        for b in offset / BLOCK..end.div_ceil(BLOCK) {
            if st.blocks.contains(&b) {
                continue;
            }
            if st.budget.is_some_and(|max| st.blocks.len() >= max) {
                room_until = (b * BLOCK).max(offset);
                break;
            }
            st.blocks.insert(b);
        }
        drop(st);
        if room_until > offset {
            self.inner
                .write_at(&buf[..(room_until - offset) as usize], offset)?;
        }
        if room_until < end {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.enter(Kind::Write)?;
        self.state
            .lock()
            .unwrap()
            .blocks
            .retain(|&b| b < len.div_ceil(BLOCK));
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.enter(Kind::Sync)?;
        self.inner.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.enter(Kind::Write)?;
        let whole = offset.div_ceil(BLOCK)..(offset + len) / BLOCK;
        self.state
            .lock()
            .unwrap()
            .blocks
            .retain(|b| !whole.contains(b));
        self.inner.punch_hole(offset, len)
    }

    fn path(&self) -> Option<&Path> {
        None
    }
}

// ---- helpers -------------------------------------------------------------------------------

fn rw() -> OpenOptions {
    OpenOptions::new().write(true)
}

fn os_error(e: &Error) -> Option<i32> {
    match e {
        Error::Io { source, .. } | Error::NoSpace { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

/// Content of a 512-byte sector written with `seed` at guest offset `offset`: the
/// offset, then the seed. Seed 0 is the never-written (zero) sector.
fn sector(seed: u8, offset: u64) -> [u8; 512] {
    let mut s = [0u8; 512];
    if seed != 0 {
        s[..8].copy_from_slice(&offset.to_le_bytes());
        s[8..].fill(seed);
    }
    s
}

fn data(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (0..len / 512)
        .flat_map(|i| sector(seed, offset + i * 512))
        .collect()
}

/// The seed a sector read back carries, or `None` if it is not a sector any write
/// made at that offset.
fn seed_of(s: &[u8], offset: u64) -> Option<u8> {
    if s.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let seed = s[8];
    (s == sector(seed, offset)).then_some(seed)
}

// ---- disk full -------------------------------------------------------------------------------

const CS: u64 = 4096;
const SIZE: u64 = 8 << 20;

/// A new image (4 KiB clusters, 8 MiB disk) with `before` written at 0, closed.
fn base_image(before: &[u8]) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    let mut opts = CreateOptions::new(SIZE);
    opts.cluster_size = CS;
    let img = Image::create_in(mem.clone(), &opts).expect("create");
    img.write_at(before, 0).expect("write");
    img.close().expect("close");
    mem.to_vec()
}

/// A full file system: writes to new clusters fail with ENOSPC (naming the file and
/// an offset); in-place writes and reads go on; the file stays consistent; once space
/// returns, the same handle writes, snapshots and closes cleanly and nothing written
/// before is lost.
#[test]
fn a_full_disk_fails_allocating_writes_with_enospc_and_recovers_when_space_returns() {
    let before = data(1, 0, 64 << 10);
    let storage = Arc::new(Faulty::from_vec(base_image(&before)));
    let img = Image::from_storage(storage.clone(), &rw()).expect("open");
    storage.fill_up();

    // A partial-cluster write into a new cluster (its L2 table exists).
    let err = img
        .write_at(&data(3, 70 << 10, 512), 70 << 10)
        .expect_err("partial allocating write on a full disk");
    assert_eq!(os_error(&err), Some(libc::ENOSPC), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("<memory>") && text.contains("offset") && text.contains("No space"),
        "the message names file, offset and cause: {text}"
    );
    match &err {
        Error::NoSpace { source, .. } => assert_eq!(source.kind(), io::ErrorKind::StorageFull),
        other => panic!("a full disk is Error::NoSpace: {other:?}"),
    }
    img.flush()
        .expect("nothing new to link: flush works on a full disk");
    let report = img.check().expect("check while full");
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);

    // A write that needs a new L2 table too; a snapshot.
    let far = 5 << 20;
    let err = img
        .write_at(&data(2, far, 8192), far)
        .expect_err("an allocating write on a full disk");
    assert_eq!(os_error(&err), Some(libc::ENOSPC), "{err:?}");
    let err = img.snapshot("default", "full").expect_err("snapshot");
    assert_eq!(os_error(&err), Some(libc::ENOSPC), "{err:?}");
    // The L2 table the failed write allocated is linked in memory and must be written
    // before its L1 entry: until space returns a flush may fail, with ENOSPC.
    if let Err(e) = img.flush() {
        assert_eq!(os_error(&e), Some(libc::ENOSPC), "{e:?}");
    }

    // Writes in place and reads carry on.
    img.write_at(&data(4, 4096, 4096), 4096)
        .expect("in-place write on a full disk");
    let mut expect = before.clone();
    expect[4096..8192].copy_from_slice(&data(4, 4096, 4096));
    let mut back = vec![0u8; expect.len()];
    img.read_at(&mut back, 0).expect("read");
    assert_eq!(back, expect);

    // The file as it is now (what a crash would leave) opens and holds `before`.
    {
        let now = Image::from_storage(
            Arc::new(MemStorage::from_vec(storage.inner.to_vec())),
            &OpenOptions::new(),
        )
        .expect("open the file of the full disk");
        let r = now.check().expect("check");
        assert_eq!(r.corruptions, 0, "{:?}", r.messages);
        let mut b = vec![0u8; 4096];
        now.read_at(&mut b, 0).expect("read");
        assert_eq!(b, before[..4096]);
    }

    // Space returns: the same handle writes, snapshots and closes.
    storage.free_up();
    img.write_at(&data(2, far, 8192), far)
        .expect("write after space returned");
    img.write_at(&data(3, 70 << 10, 512), 70 << 10)
        .expect("write");
    img.snapshot("default", "full")
        .expect("snapshot after space returned");
    img.close().expect("close");

    let bytes = storage.inner.to_vec();
    let img = Arc::new(
        Image::from_storage(
            Arc::new(MemStorage::from_vec(bytes.clone())),
            &OpenOptions::new(),
        )
        .expect("reopen"),
    );
    let report = img.check().expect("check");
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
    for (seed, off, len) in [(2u8, far, 8192u64), (3, 70 << 10, 512)] {
        let mut b = vec![0u8; len as usize];
        img.read_at(&mut b, off).expect("read");
        assert_eq!(b, data(seed, off, len));
    }
    let snap = img.open_root("full").expect("snapshot");
    let mut b = vec![0u8; expect.len()];
    snap.read_at(&mut b, 0).expect("read snapshot");
    assert_eq!(b, expect);
    assert_qemu_check_clean_bytes(&bytes, "after a full disk");
}

/// Flush and close on a full disk: a flush that must write a new L2 table fails with
/// ENOSPC (and again when retried); a close that cannot finish fails with ENOSPC and
/// leaves a file that opens and repairs without losing a flushed write.
#[test]
fn flush_and_close_on_a_full_disk_fail_cleanly_and_lose_nothing_flushed() {
    let before = data(1, 0, 64 << 10);
    let storage = Arc::new(Faulty::from_vec(base_image(&before)));
    let img = Image::from_storage(storage.clone(), &rw()).expect("open");
    // The data of an allocating write lands; its new L2 table is not written yet.
    img.write_at(&data(5, 3 << 20, 4096), 3 << 20)
        .expect("write");
    storage.fill_up();
    let err = img
        .flush()
        .expect_err("flush needs room for the new L2 table");
    assert_eq!(os_error(&err), Some(libc::ENOSPC), "{err:?}");
    let err = img.flush().expect_err("still full");
    assert_eq!(os_error(&err), Some(libc::ENOSPC), "{err:?}");
    let err = img.close().expect_err("close on a full disk");
    assert_eq!(os_error(&err), Some(libc::ENOSPC), "{err:?}");
    drop(img);

    let bytes = storage.inner.to_vec();
    let img = Image::from_storage(Arc::new(MemStorage::from_vec(bytes)), &rw())
        .expect("the file of a failed close opens");
    let report = img.check().expect("check");
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    let mut b = vec![0u8; before.len()];
    img.read_at(&mut b, 0).expect("read");
    assert_eq!(b, before, "flushed data survives");
    let report = img.repair().expect("repair");
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
    img.close().expect("close");
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

/// The `op` of an `Error::Io` ("write L2 table", "fdatasync", …).
fn io_op(e: &Error) -> String {
    match e {
        Error::Io { op, .. } | Error::NoSpace { op, .. } => (*op).to_string(),
        other => format!("{other:?}"),
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

/// An image with snapshots `s1` (deleted) and `s2`, for gc: the bytes and what the
/// default VDI and `s2` hold.
fn image_for_gc() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mem = Arc::new(MemStorage::new());
    let mut opts = CreateOptions::new(SIZE);
    opts.cluster_size = CS;
    let img = Image::create_in(mem.clone(), &opts).expect("create");
    img.write_at(&data(1, 0, 16384), 0).expect("write");
    img.snapshot("default", "s1").expect("s1");
    img.write_at(&data(2, 0, 8192), 0).expect("write");
    img.snapshot("default", "s2").expect("s2");
    let s2 = [data(2, 0, 8192), data(1, 8192, 8192)].concat();
    img.write_at(&data(3, 4096, 4096), 4096).expect("write");
    img.delete_snapshot("s1").expect("delete s1");
    img.close().expect("close");
    let head = [data(2, 0, 4096), data(3, 4096, 4096), data(1, 8192, 8192)].concat();
    (mem.to_vec(), head, s2)
}

/// gc with each of its writes and syncs failing once: the caller gets EIO, and the
/// file left once the handle is dropped has no corruption and loses nothing.
#[test]
fn gc_failing_at_each_write_and_sync_leaves_a_consistent_image() {
    let (bytes, head, s2) = image_for_gc();
    for kind in [Kind::Write, Kind::Sync] {
        let clean = Arc::new(Faulty::from_vec(bytes.clone()));
        let img = Image::from_storage(clean.clone(), &rw()).expect("open");
        let (w0, s0) = clean.counts();
        img.gc().expect("gc");
        let (w1, s1) = clean.counts();
        drop(img);
        let (first, last) = match kind {
            Kind::Write => (w0 + 1, w1),
            Kind::Sync => (s0 + 1, s1),
        };
        assert!(last >= first, "gc makes {kind:?} calls");
        for k in first..=last {
            let storage = Arc::new(Faulty::from_vec(bytes.clone()));
            let img = Image::from_storage(storage.clone(), &rw()).expect("open");
            storage.set_rule(Some(Rule {
                kind,
                index: k,
                sticky: false,
                errno: libc::EIO,
            }));
            let err = img.gc().expect_err("gc with a failing call");
            assert_eq!(os_error(&err), Some(libc::EIO), "{err:?}");
            drop(img);
            let label = format!("gc, {kind:?} #{k} fails");
            let img = Arc::new(
                Image::from_storage(
                    Arc::new(MemStorage::from_vec(storage.inner.to_vec())),
                    &OpenOptions::new(),
                )
                .expect("open"),
            );
            let report = img.check().expect("check");
            assert_eq!(report.corruptions, 0, "{label}: {:?}", report.messages);
            let mut b = vec![0u8; head.len()];
            img.read_at(&mut b, 0).expect("read");
            assert_eq!(b, head, "{label}: the default VDI");
            let d = img.open_root("s2").expect("s2");
            d.read_at(&mut b, 0).expect("read s2");
            assert_eq!(b, s2, "{label}: s2");
        }
    }
}

// ---- a failed commit of the snapshot table ------------------------------------------------------

/// The names of the image's roots, in table order.
fn root_names(img: &Image) -> Vec<String> {
    img.list()
        .expect("list")
        .into_iter()
        .map(|r| r.name)
        .collect()
}

/// A change of the snapshot table (a new snapshot, a delete, a rename) whose header
/// write fails did not happen: the handle lists the roots it had, a close commits
/// those, and the same change succeeds on the same handle once the disk works.
#[test]
fn a_table_change_whose_header_write_fails_does_not_happen() {
    type Change = fn(&Image) -> qcowx_core::Result<()>;
    let changes: [(&str, Change); 3] = [
        ("snapshot", |img| img.snapshot("default", "s3").map(|_| ())),
        ("delete", |img| img.delete_snapshot("s1")),
        ("rename", |img| {
            img.rename(qcowx_core::RootKind::Snapshot, "s1", "renamed")
        }),
    ];
    let mem = Arc::new(MemStorage::new());
    let img = Image::create_in(mem.clone(), &CreateOptions::new(SIZE)).expect("create");
    img.write_at(&data(1, 0, CS), 0).expect("write");
    img.snapshot("default", "s1").expect("s1");
    img.snapshot("default", "s2").expect("s2");
    img.close().expect("close");
    drop(img);
    let start = mem.to_vec();
    for (what, change) in changes {
        // The commit is the change's last header write (an earlier one may set the
        // dirty bit): found by failing the 1st, 2nd, ... write after the open.
        let fail_write = |k: u64| {
            let storage = Arc::new(Faulty::from_vec(start.clone()));
            let img = Image::from_storage(storage.clone(), &rw()).expect("open");
            let before = root_names(&img);
            let (writes, _) = storage.counts();
            storage.set_rule(Some(Rule {
                kind: Kind::Write,
                index: writes + k,
                sticky: false,
                errno: libc::EIO,
            }));
            let result = change(&img);
            (storage, img, before, result)
        };
        let commit = (1..=32)
            .map_while(|k| {
                let (_, _, _, result) = fail_write(k);
                result.err().map(|e| (k, io_op(&e)))
            })
            .filter(|(_, op)| op == "write header")
            .map(|(k, _)| k)
            .last()
            .unwrap_or_else(|| panic!("{what}: no header write among its first 32 writes"));

        let (storage, img, before, result) = fail_write(commit);
        let e = result.expect_err("the commit's write fails");
        assert_eq!(os_error(&e), Some(libc::EIO), "{what}: {e}");
        assert_eq!(root_names(&img), before, "{what}: the failed change shows");
        img.close().expect("close after the failed change");
        let bytes = storage.inner.to_vec();
        let reopened = Image::from_storage(
            Arc::new(MemStorage::from_vec(bytes.clone())),
            &OpenOptions::new(),
        )
        .expect("reopen");
        assert_eq!(
            root_names(&reopened),
            before,
            "{what}: the close committed the failed change"
        );
        assert_eq!(reopened.check().expect("check").corruptions, 0, "{what}");
        assert_qemu_check_clean_bytes(&bytes, what);

        // The same handle makes the change once the disk works again.
        let (storage, img, before, result) = fail_write(commit);
        assert!(result.is_err(), "{what}: the same write fails again");
        change(&img).unwrap_or_else(|e| panic!("{what} once the disk works: {e}"));
        let after = root_names(&img);
        assert_ne!(after, before, "{what}: the change took effect");
        img.close().expect("close");
        let reopened = Image::from_storage(
            Arc::new(MemStorage::from_vec(storage.inner.to_vec())),
            &OpenOptions::new(),
        )
        .expect("reopen");
        assert_eq!(root_names(&reopened), after, "{what}: committed once");
    }
}
