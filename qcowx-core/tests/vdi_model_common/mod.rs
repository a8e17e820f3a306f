//! The model, the system under test and the steps of the model-based tests of
//! snapshots, forks, deletes, reverts and GC (`vdi_model_random.rs`,
//! `vdi_model_fixed.rs`).
//!
//! Random sequences of writes, zero writes, discards, snapshots, forks, snapshot and
//! VDI deletes, reverts, GC runs, flushes and close/reopen cycles run against an image
//! held in a [`MemStorage`] and against a plain in-memory model: a map from each live
//! VDI's name to its content and from each live snapshot's name to the content it had
//! when it was taken (snapshots never change). Operations pick existing roots by index
//! so most of them are valid; some name roots that do not exist, names already taken,
//! malformed names, or the wrong kind of root, and must fail with the documented error
//! without changing anything.
//!
//! After every step: `list()` names exactly the model's roots (kind, owning VDI, and
//! the parent of a VDI whose origin snapshot still lives); every root reads exactly as
//! the model says over the whole disk; `diff` between two roots covers every byte
//! where they differ; block status never calls a byte holding data "zero". After every
//! GC, `check` finds no corruption and no leak with exact refcounts (dirty bit clear)
//! and the GC removed exactly the roots that were deleted or superseded; after every
//! close the reopened image checks clean with exact refcounts.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use qcowx_core::storage::{MemStorage, Storage};
use qcowx_core::{CreateOptions, Disk, Error, ExtentStatus, Image, OpenOptions, RootKind};
use qcowx_tests::Rng;

/// Disk geometries the cases run on: (cluster size, extended L2, virtual size).
/// Small disks keep a whole-disk comparison of every root after every step cheap;
/// several of them need more than one L2 table, two have a partial last cluster.
pub const GEOMETRIES: [(u64, bool, u64); 5] = [
    (512, false, 192 << 10),
    (4096, false, 3 << 20),
    (65536, false, 2 << 20),
    (16384, true, (1 << 20) + 1536),
    (4096, false, (1 << 20) + 2560),
];

/// Where an operation lands, resolved against the disk size when it runs.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// Any byte offset, up to about three clusters.
    Unaligned,
    /// Whole clusters.
    Clusters,
    /// A range that ends at the end of the disk.
    Tail,
}

#[derive(Debug, Clone, Copy)]
pub struct At {
    pub shape: Shape,
    pub off: u64,
    pub len: u64,
}

/// How a new root is named.
#[derive(Debug, Clone, Copy)]
pub enum NameChoice {
    /// A name never used before.
    Fresh,
    /// The name of a root that was deleted (names can be reused).
    Reused(usize),
    /// A name a live root has (must fail with `AlreadyExists`).
    Taken(usize),
    /// A malformed name (must fail with `InvalidArgument`).
    Malformed(usize),
}

#[derive(Debug, Clone)]
pub enum Op {
    Write {
        vdi: usize,
        at: At,
        seed: u64,
        via_image: bool,
    },
    Zeroes {
        vdi: usize,
        at: At,
        unmap: bool,
    },
    Discard {
        vdi: usize,
        at: At,
    },
    Snapshot {
        vdi: usize,
        name: NameChoice,
    },
    Fork {
        snap: usize,
        name: NameChoice,
    },
    DeleteSnapshot {
        snap: usize,
    },
    DeleteVdi {
        vdi: usize,
    },
    Revert {
        vdi: usize,
        snap: usize,
    },
    Gc,
    Flush,
    Reopen {
        small_cache: bool,
    },
    Invalid {
        which: u8,
        pick: usize,
    },
}

/// A live VDI of the model.
#[derive(Debug, Clone)]
struct VdiModel {
    /// Model-wide identity (a deleted VDI's name can come back as another VDI).
    id: u64,
    content: Vec<u8>,
    /// The snapshot this VDI's head was last forked or reverted from, as
    /// (name, snapshot identity).
    origin: Option<(String, u64)>,
}

/// A live snapshot of the model.
#[derive(Debug, Clone)]
struct SnapModel {
    id: u64,
    content: Vec<u8>,
    /// Identity of the VDI it was taken from.
    vdi: u64,
}

#[derive(Debug)]
struct Model {
    cluster_size: u64,
    vdis: BTreeMap<String, VdiModel>,
    snaps: BTreeMap<String, SnapModel>,
    /// Names of deleted roots (candidates for reuse).
    dead: Vec<String>,
    /// Names of roots deleted (or heads superseded) since the last GC: the flagged
    /// entries still carry them (QEMU resolves a name to its first entry), so they stay
    /// taken until GC removes those entries.
    tombstones: Vec<String>,
    next_name: u64,
    next_id: u64,
    /// Snapshot-table entries flagged for removal since the last GC (deleted roots and
    /// superseded VDI heads).
    pending_removals: u64,
}

impl Model {
    fn new(size: u64, cluster_size: u64) -> Model {
        let mut vdis = BTreeMap::new();
        vdis.insert(
            "default".to_string(),
            VdiModel {
                id: 0,
                content: vec![0; size as usize],
                origin: None,
            },
        );
        Model {
            cluster_size,
            vdis,
            snaps: BTreeMap::new(),
            dead: Vec::new(),
            tombstones: Vec::new(),
            next_name: 0,
            next_id: 1,
            pending_removals: 0,
        }
    }

    fn size(&self) -> u64 {
        self.vdis["default"].content.len() as u64
    }

    fn vdi_name(&self, pick: usize) -> String {
        self.vdis
            .keys()
            .nth(pick % self.vdis.len())
            .cloned()
            .unwrap()
    }

    fn snap_name(&self, pick: usize) -> Option<String> {
        (!self.snaps.is_empty()).then(|| {
            self.snaps
                .keys()
                .nth(pick % self.snaps.len())
                .cloned()
                .unwrap()
        })
    }

    fn taken(&self, name: &str) -> bool {
        self.vdis.contains_key(name)
            || self.snaps.contains_key(name)
            || self.tombstones.iter().any(|t| t == name)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A name for a new root and whether creating it must fail with
    /// `InvalidArgument`.
    fn new_name(&mut self, prefix: &str, choice: NameChoice) -> (String, bool) {
        match choice {
            NameChoice::Reused(i) if !self.dead.is_empty() => {
                let n = self.dead[i % self.dead.len()].clone();
                let bad = self.taken(&n);
                (n, bad)
            }
            NameChoice::Taken(i) => {
                let all: Vec<String> = self.vdis.keys().chain(self.snaps.keys()).cloned().collect();
                (all[i % all.len()].clone(), true)
            }
            NameChoice::Malformed(i) => {
                const BAD: [&str; 6] = ["", "-x", ".hidden", "a b", "vdi:x", "a/b"];
                (BAD[i % BAD.len()].to_string(), true)
            }
            _ => {
                self.next_name += 1;
                (format!("{prefix}{}", self.next_name), false)
            }
        }
    }

    /// Resolves a range selector: `(offset, len)` within the disk, len > 0.
    fn range(&self, at: At) -> (u64, u64) {
        let size = self.size();
        let cs = self.cluster_size;
        match at.shape {
            Shape::Unaligned => {
                let max = (3 * cs).min(size);
                let len = 1 + at.len % max;
                let off = at.off % (size - len + 1);
                (off, len)
            }
            Shape::Clusters => {
                let clusters = size.div_ceil(cs);
                let c = at.off % clusters;
                let n = 1 + at.len % 3;
                let off = c * cs;
                (off, (n * cs).min(size - off))
            }
            Shape::Tail => {
                let len = 1 + at.len % (2 * cs).min(size);
                (size - len, len)
            }
        }
    }

    /// What a qcowx discard of `[off, off+len)` zeroes: whole clusters only (the last
    /// partial cluster of the disk counts as whole when the range reaches the end).
    fn discard(content: &mut [u8], cs: u64, off: u64, len: u64) {
        let size = content.len() as u64;
        let end = off + len;
        let mut c = off.next_multiple_of(cs);
        while c < end {
            let cend = (c + cs).min(size);
            if cend <= end {
                content[c as usize..cend as usize].fill(0);
            }
            c += cs;
        }
    }
}

/// Deterministic, non-zero-heavy data for a write.
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next_u64() as u8 | 0x10).collect()
}

fn err_text(e: &Error) -> String {
    format!("{e} ({e:?})")
}

/// The system under test: the image and cached handles to its roots.
struct Sut {
    storage: Arc<MemStorage>,
    img: Arc<Image>,
    handles: BTreeMap<String, Disk>,
}

impl Sut {
    fn disk(&mut self, name: &str) -> Disk {
        if let Some(d) = self.handles.get(name) {
            return d.clone();
        }
        let d = self
            .img
            .open_root(name)
            .unwrap_or_else(|e| panic!("open_root({name}): {}", err_text(&e)));
        self.handles.insert(name.to_string(), d.clone());
        d
    }

    fn reopen(&mut self, small_cache: bool) {
        self.handles.clear();
        self.img
            .close()
            .unwrap_or_else(|e| panic!("close: {}", err_text(&e)));
        let storage = self.storage.clone() as Arc<dyn Storage>;
        // A clean close leaves exact refcounts: check them read-only first.
        let ro = Image::from_storage(storage.clone(), &OpenOptions::new())
            .unwrap_or_else(|e| panic!("read-only reopen: {}", err_text(&e)));
        let report = ro.check().unwrap();
        assert!(
            !report.dirty && report.corruptions == 0 && report.leaks == 0,
            "check after a clean close: {report:?}"
        );
        drop(ro);
        let mut opts = OpenOptions::new().write(true);
        if small_cache {
            opts = opts.cache_bytes(2 * self.img.cluster_size() as usize);
        }
        self.img = Arc::new(
            Image::from_storage(storage, &opts)
                .unwrap_or_else(|e| panic!("reopen: {}", err_text(&e))),
        );
    }
}

fn expect_err(what: &str, r: Result<impl std::fmt::Debug, Error>, ok: fn(&Error) -> bool) {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}) but must fail"),
        Err(e) => assert!(ok(&e), "{what}: wrong error: {}", err_text(&e)),
    }
}

fn not_found(e: &Error) -> bool {
    matches!(e, Error::NotFound { .. })
}

fn invalid(e: &Error) -> bool {
    matches!(e, Error::InvalidArgument(_))
}

/// A malformed name (`InvalidArgument`) or one a live root has (`AlreadyExists`).
fn refused_name(e: &Error) -> bool {
    matches!(e, Error::InvalidArgument(_) | Error::AlreadyExists { .. })
}

/// Runs one operation on the image and the model. Returns a description.
fn apply(sut: &mut Sut, m: &mut Model, op: &Op, log: &mut String) {
    let cs = m.cluster_size;
    match *op {
        Op::Write {
            vdi,
            at,
            seed,
            via_image,
        } => {
            let name = m.vdi_name(vdi);
            let (off, len) = m.range(at);
            let data = pattern(seed, len);
            let _ = writeln!(log, "write {name} {off}+{len}");
            let r = if via_image && name == "default" {
                sut.img.write_at(&data, off)
            } else {
                sut.disk(&name).write_at(&data, off)
            };
            r.unwrap_or_else(|e| panic!("write {name} {off}+{len}: {}", err_text(&e)));
            m.vdis.get_mut(&name).unwrap().content[off as usize..(off + len) as usize]
                .copy_from_slice(&data);
        }
        Op::Zeroes { vdi, at, unmap } => {
            let name = m.vdi_name(vdi);
            let (off, len) = m.range(at);
            let _ = writeln!(log, "write_zeroes {name} {off}+{len} unmap={unmap}");
            sut.disk(&name)
                .write_zeroes(off, len, unmap)
                .unwrap_or_else(|e| panic!("write_zeroes {name}: {}", err_text(&e)));
            m.vdis.get_mut(&name).unwrap().content[off as usize..(off + len) as usize].fill(0);
        }
        Op::Discard { vdi, at } => {
            let name = m.vdi_name(vdi);
            let (off, len) = m.range(at);
            let _ = writeln!(log, "discard {name} {off}+{len}");
            sut.disk(&name)
                .discard(off, len)
                .unwrap_or_else(|e| panic!("discard {name}: {}", err_text(&e)));
            Model::discard(&mut m.vdis.get_mut(&name).unwrap().content, cs, off, len);
        }
        Op::Snapshot { vdi, name } => {
            let v = m.vdi_name(vdi);
            let (n, bad) = m.new_name("s", name);
            let _ = writeln!(log, "snapshot {v} {n:?} (must fail: {bad})");
            let r = sut.img.snapshot(&v, &n);
            if bad {
                expect_err(&format!("snapshot({v}, {n:?})"), r, refused_name);
                return;
            }
            let info = r.unwrap_or_else(|e| panic!("snapshot({v}, {n}): {}", err_text(&e)));
            assert_eq!(info.kind, RootKind::Snapshot);
            assert_eq!(info.name, n);
            assert_eq!(info.vdi, v, "snapshot's VDI");
            let id = m.id();
            let content = m.vdis[&v].content.clone();
            let vdi_id = m.vdis[&v].id;
            m.dead.retain(|d| *d != n);
            m.snaps.insert(
                n,
                SnapModel {
                    id,
                    content,
                    vdi: vdi_id,
                },
            );
        }
        Op::Fork { snap, name } => {
            let (n, bad) = m.new_name("v", name);
            let Some(s) = m.snap_name(snap) else {
                let _ = writeln!(log, "fork of a missing snapshot");
                if bad {
                    return; // which error wins is not specified
                }
                expect_err("fork(nosuch)", sut.img.fork("nosuch", &n), not_found);
                return;
            };
            let _ = writeln!(log, "fork {s} -> {n:?} (must fail: {bad})");
            let r = sut.img.fork(&s, &n);
            if bad {
                expect_err(&format!("fork({s}, {n:?})"), r, refused_name);
                return;
            }
            let info = r.unwrap_or_else(|e| panic!("fork({s}, {n}): {}", err_text(&e)));
            assert_eq!(info.kind, RootKind::Vdi);
            assert_eq!(info.name, n);
            assert_eq!(info.parent.as_deref(), Some(s.as_str()), "fork's parent");
            let id = m.id();
            let snapshot = &m.snaps[&s];
            let v = VdiModel {
                id,
                content: snapshot.content.clone(),
                origin: Some((s.clone(), snapshot.id)),
            };
            m.dead.retain(|d| *d != n);
            m.vdis.insert(n, v);
        }
        Op::DeleteSnapshot { snap } => {
            let Some(s) = m.snap_name(snap) else {
                let _ = writeln!(log, "delete of a missing snapshot");
                expect_err(
                    "delete_snapshot(nosuch)",
                    sut.img.delete_snapshot("nosuch"),
                    not_found,
                );
                return;
            };
            let _ = writeln!(log, "delete snapshot {s}");
            let old = sut.handles.remove(&s);
            sut.img
                .delete_snapshot(&s)
                .unwrap_or_else(|e| panic!("delete_snapshot({s}): {}", err_text(&e)));
            if let Some(d) = old {
                let mut b = [0u8; 1];
                assert!(
                    d.read_at(&mut b, 0).is_err(),
                    "a handle to deleted snapshot {s} still reads"
                );
            }
            m.snaps.remove(&s);
            m.dead.push(s.clone());
            m.tombstones.push(s);
            m.pending_removals += 1;
        }
        Op::DeleteVdi { vdi } => {
            let v = m.vdi_name(vdi);
            let _ = writeln!(log, "delete VDI {v}");
            if v == "default" {
                expect_err("delete_vdi(default)", sut.img.delete_vdi(&v), invalid);
                return;
            }
            let old = sut.handles.remove(&v);
            sut.img
                .delete_vdi(&v)
                .unwrap_or_else(|e| panic!("delete_vdi({v}): {}", err_text(&e)));
            if let Some(d) = old {
                assert!(
                    d.write_at(&[0xee; 512], 0).is_err(),
                    "a handle to deleted VDI {v} still writes"
                );
            }
            m.vdis.remove(&v);
            m.dead.push(v.clone());
            m.tombstones.push(v);
            m.pending_removals += 1;
        }
        Op::Revert { vdi, snap } => {
            let v = m.vdi_name(vdi);
            let Some(s) = m.snap_name(snap) else {
                let _ = writeln!(log, "revert {v} to a missing snapshot");
                expect_err("revert(nosuch)", sut.img.revert(&v, "nosuch"), not_found);
                return;
            };
            let _ = writeln!(log, "revert {v} to {s}");
            sut.img
                .revert(&v, &s)
                .unwrap_or_else(|e| panic!("revert({v}, {s}): {}", err_text(&e)));
            let snapshot = m.snaps[&s].clone();
            let entry = m.vdis.get_mut(&v).unwrap();
            entry.content = snapshot.content;
            if v != "default" {
                entry.origin = Some((s, snapshot.id));
            }
            // The superseded head stays in the table, flagged, until gc.
            m.pending_removals += 1;
        }
        Op::Gc => {
            let _ = writeln!(log, "gc");
            let report = sut
                .img
                .gc()
                .unwrap_or_else(|e| panic!("gc: {}", err_text(&e)));
            assert_eq!(
                report.roots_removed, m.pending_removals,
                "gc removed {} roots, {} were deleted or superseded: {report:?}",
                report.roots_removed, m.pending_removals
            );
            m.pending_removals = 0;
            m.tombstones.clear();
            let check = sut.img.check().unwrap();
            assert!(
                !check.dirty && check.corruptions == 0 && check.leaks == 0,
                "check after gc: {check:?}"
            );
            // A second collection right away finds nothing.
            let again = sut.img.gc().unwrap();
            assert_eq!(
                (again.roots_removed, again.clusters_freed),
                (0, 0),
                "second gc: {again:?}"
            );
        }
        Op::Flush => {
            let _ = writeln!(log, "flush");
            sut.img.flush().unwrap();
        }
        Op::Reopen { small_cache } => {
            let _ = writeln!(log, "close + reopen (small cache {small_cache})");
            sut.reopen(small_cache);
        }
        Op::Invalid { which, pick } => invalid_op(sut, m, which, pick, log),
    }
}

/// Operations that must fail with a documented error and change nothing.
fn invalid_op(sut: &mut Sut, m: &Model, which: u8, pick: usize, log: &mut String) {
    let v = m.vdi_name(pick);
    let s = m.snap_name(pick);
    let img = sut.img.clone();
    let _ = writeln!(log, "invalid op {which} (vdi {v}, snapshot {s:?})");
    match which {
        0 => expect_err(
            "snapshot(nosuch vdi)",
            img.snapshot("nosuch", "fresh-x"),
            not_found,
        ),
        1 => expect_err("fork(nosuch)", img.fork("nosuch", "fresh-x"), not_found),
        2 => expect_err("fork(a VDI)", img.fork(&v, "fresh-x"), not_found),
        3 => expect_err(
            "delete_snapshot(nosuch)",
            img.delete_snapshot("nosuch"),
            not_found,
        ),
        4 => expect_err("delete_snapshot(a VDI)", img.delete_snapshot(&v), not_found),
        5 => {
            let target = s.clone().unwrap_or_else(|| "nosuch".into());
            expect_err("delete_vdi(a snapshot)", img.delete_vdi(&target), not_found);
        }
        6 => {
            let target = s.clone().unwrap_or_else(|| "nosuch".into());
            expect_err(
                "revert(nosuch vdi)",
                img.revert("nosuch", &target),
                not_found,
            );
        }
        7 => expect_err("revert(to a VDI)", img.revert(&v, &v), not_found),
        8 => expect_err(
            "open_root(nosuch)",
            img.open_root("nosuch").map(|_| ()),
            not_found,
        ),
        9 => {
            if let Some(s) = s {
                let d = sut.disk(&s);
                assert!(!d.is_writable());
                expect_err("write to a snapshot", d.write_at(&[1; 512], 0), |e| {
                    matches!(e, Error::ReadOnly { .. })
                });
                expect_err("discard of a snapshot", d.discard(0, m.size()), |e| {
                    matches!(e, Error::ReadOnly { .. })
                });
            }
        }
        10 => expect_err("delete_vdi(default)", img.delete_vdi("default"), invalid),
        _ => {
            let d = sut.disk(&v);
            let size = m.size();
            expect_err("read past the end", d.read_at(&mut [0; 2], size - 1), |e| {
                matches!(e, Error::OutOfRange { .. })
            });
            expect_err("write past the end", d.write_at(&[1; 2], size - 1), |e| {
                matches!(e, Error::OutOfRange { .. })
            });
        }
    }
}

/// Compares everything observable with the model.
fn verify(sut: &mut Sut, m: &Model, step: usize, log: &str) {
    let ctx = || format!("after step {step}; ops so far:\n{log}");
    // list() names exactly the model's roots.
    let listed = sut.img.list().unwrap();
    let mut got: Vec<(String, RootKind)> =
        listed.iter().map(|r| (r.name.clone(), r.kind)).collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want: Vec<(String, RootKind)> = m
        .vdis
        .keys()
        .map(|n| (n.clone(), RootKind::Vdi))
        .chain(m.snaps.keys().map(|n| (n.clone(), RootKind::Snapshot)))
        .collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, want, "list() {}", ctx());
    assert_eq!(listed[0].name, "default", "default VDI first {}", ctx());
    let vdi_by_id: BTreeMap<u64, &str> = m.vdis.iter().map(|(n, v)| (v.id, n.as_str())).collect();
    for r in &listed {
        match r.kind {
            RootKind::Snapshot => {
                let snap = &m.snaps[&r.name];
                match vdi_by_id.get(&snap.vdi) {
                    Some(owner) => assert_eq!(r.vdi, *owner, "VDI of {} {}", r.name, ctx()),
                    None => assert!(
                        !m.vdis.contains_key(&r.vdi) || m.vdis[&r.vdi].id == snap.vdi,
                        "snapshot {} claims VDI {} whose identity differs {}",
                        r.name,
                        r.vdi,
                        ctx()
                    ),
                }
            }
            RootKind::Vdi => {
                assert_eq!(r.vdi, r.name, "a VDI belongs to itself {}", ctx());
                let v = &m.vdis[&r.name];
                if let Some((s, id)) = &v.origin {
                    if m.snaps.get(s).is_some_and(|x| x.id == *id) {
                        assert_eq!(
                            r.parent.as_deref(),
                            Some(s.as_str()),
                            "parent of {} {}",
                            r.name,
                            ctx()
                        );
                    }
                }
            }
        }
        assert_eq!(r.size, m.size(), "size of {} {}", r.name, ctx());
    }
    // Every root reads exactly as the model says.
    let size = m.size() as usize;
    let mut buf = vec![0u8; size];
    let roots: Vec<(String, Vec<u8>)> = m
        .vdis
        .iter()
        .map(|(n, v)| (n.clone(), v.content.clone()))
        .chain(m.snaps.iter().map(|(n, s)| (n.clone(), s.content.clone())))
        .collect();
    for (name, want) in &roots {
        let d = sut.disk(name);
        d.read_at(&mut buf, 0)
            .unwrap_or_else(|e| panic!("read {name}: {} {}", err_text(&e), ctx()));
        if buf != *want {
            let at = buf.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "root {name} differs from the model at byte {at} (cluster {}): got {:#x}, want {:#x} {}",
                at as u64 / m.cluster_size,
                buf[at],
                want[at],
                ctx()
            );
        }
    }
    // diff covers every differing byte; block status never calls data zero.
    if roots.len() >= 2 {
        let (a, ca) = &roots[step % roots.len()];
        let (b, cb) = &roots[(step * 7 + 1) % roots.len()];
        let ranges = sut
            .img
            .diff(a, b)
            .unwrap_or_else(|e| panic!("diff({a}, {b}): {} {}", err_text(&e), ctx()));
        let mut covered = vec![false; size];
        for r in &ranges {
            assert_eq!(
                r.offset % m.cluster_size,
                0,
                "diff range not cluster-aligned {}",
                ctx()
            );
            covered[r.offset as usize..(r.offset + r.length) as usize].fill(true);
        }
        if let Some(i) = (0..size).find(|&i| ca[i] != cb[i] && !covered[i]) {
            panic!("diff({a}, {b}) = {ranges:?} misses byte {i} {}", ctx());
        }
        if a == b {
            assert!(ranges.is_empty(), "diff of a root with itself: {ranges:?}");
        }
        let extents = sut.disk(a).block_status(0, size as u64).unwrap();
        let mut pos = 0;
        for e in &extents {
            assert_eq!(e.offset, pos, "block status gap {extents:?} {}", ctx());
            pos += e.length;
            if e.status != ExtentStatus::Data {
                let range = &ca[e.offset as usize..(e.offset + e.length) as usize];
                assert!(
                    range.iter().all(|&x| x == 0),
                    "{a}: {e:?} is not data but holds non-zero bytes {}",
                    ctx()
                );
            }
        }
        assert_eq!(pos, size as u64, "block status end {}", ctx());
    }
}

pub fn run_case(geometry: usize, ops: &[Op]) {
    let (cs, extended, size) = GEOMETRIES[geometry];
    let storage = Arc::new(MemStorage::new());
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cs;
    opts.extended_l2 = extended;
    let img = Image::create_in(storage.clone() as Arc<dyn Storage>, &opts).unwrap();
    let mut sut = Sut {
        storage,
        img: Arc::new(img),
        handles: BTreeMap::new(),
    };
    let mut m = Model::new(size, cs);
    let mut log = format!("geometry cs={cs} extended={extended} size={size}\n");
    for (i, op) in ops.iter().enumerate() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            apply(&mut sut, &mut m, op, &mut log);
        }));
        if let Err(p) = r {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("step {i} failed: {msg}\nops so far:\n{log}");
        }
        verify(&mut sut, &m, i, &log);
    }
    // The end: collect, close, and check the image at rest.
    apply(&mut sut, &mut m, &Op::Gc, &mut log);
    verify(&mut sut, &m, ops.len(), &log);
    apply(
        &mut sut,
        &mut m,
        &Op::Reopen { small_cache: false },
        &mut log,
    );
    verify(&mut sut, &m, ops.len() + 1, &log);
    let report = sut.img.check().unwrap();
    assert!(
        report.corruptions == 0 && report.leaks == 0,
        "final check: {report:?}\n{log}"
    );
}
