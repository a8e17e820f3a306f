//! Crash consistency across every snapshot/VDI operation, GC included.
//!
//! Random workloads of writes, zero writes and discards on several VDIs, flushes,
//! snapshots, forks, snapshot and VDI deletes, reverts and GC runs are recorded by a
//! [`CrashStorage`]; its history is then cut at sampled points (dropping, tearing and
//! reordering the writes not yet synced), and each crash image must:
//!
//! - open for writing;
//! - list exactly the roots that existed after the last root operation that returned
//!   before the cut (or after the one in flight): a snapshot that returned exists, a
//!   deleted one that returned is gone;
//! - read every snapshot exactly as it was when taken (gc runs either alone or with
//!   writes issued while it counts references);
//! - read every VDI as its last durable state (the last completed flush or snapshot of
//!   it, or the fork/revert that began its current content) plus, per byte, possibly
//!   a write issued after that and before the cut;
//! - show no byte of "secret" data (a pattern written only into VDIs that are later
//!   deleted and collected) through any root that is not one of those VDIs or their
//!   snapshots;
//! - have no structural error before repair, and check clean (no corruption, no leak)
//!   after `repair()`, with content unchanged by the repair and a clean close.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use qcowx_core::storage::crashsim::CrashStorage;
use qcowx_core::storage::{MemStorage, Storage};
use qcowx_core::{CreateOptions, Image, OpenOptions, RootKind};
use qcowx_tests::{Pause, Rng, Stopped};

/// Normal data bytes lie in `0x10..=0xef`; secret data bytes in `0xf0..=0xff`.
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len)
        .map(|_| 0x10 + (rng.next_u64() % 0xe0) as u8)
        .collect()
}

fn secret(seed: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| 0xf0 | ((seed + i / 512) & 0xf) as u8)
        .collect()
}

fn is_secret(b: u8) -> bool {
    b >= 0xf0
}

/// What a root name refers to in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RootRef {
    Vdi(u64),
    Snap(usize),
}

type Roots = BTreeMap<String, RootRef>;

/// A root operation (snapshot, fork, delete, revert, gc): the history span it ran in
/// and the roots after it returned.
struct RootOp {
    what: String,
    started: usize,
    ended: usize,
    after: Roots,
}

/// A change to a VDI's content issued at history position `started`.
struct Change {
    started: usize,
    offset: u64,
    data: Vec<u8>,
}

/// One stretch of a VDI's life that begins with a fork or revert (or the image's
/// creation, for the default VDI) that sets its content wholesale.
struct Epoch {
    started: usize,
    ended: usize,
    baseline: Vec<u8>,
    /// Content at points where it was durable: (history position, content).
    durable: Vec<(usize, Vec<u8>)>,
    changes: Vec<Change>,
}

struct Workload {
    storage: Arc<CrashStorage>,
    /// The image's storage: `storage` behind a pause point for concurrent gc runs.
    pause: Arc<Pause>,
    /// Bytes of an L1 table (gc reads snapshots' L1 tables while it counts).
    l1_bytes: usize,
    img: Arc<Image>,
    rng: Rng,
    cs: u64,
    size: u64,
    created: usize,
    roots: Roots,
    /// Current content of each live VDI.
    content: HashMap<u64, Vec<u8>>,
    epochs: HashMap<u64, Vec<Epoch>>,
    snaps: Vec<Vec<u8>>,
    /// Roots holding secret data (doomed VDIs and their snapshots).
    doomed: HashSet<String>,
    /// The roots when the image was created.
    initial: Roots,
    ops: Vec<RootOp>,
    next: u64,
    log: Vec<String>,
}

impl Workload {
    fn new(cs: u64, extended: bool, size: u64, seed: u64) -> Workload {
        let storage = Arc::new(CrashStorage::new());
        let mut opts = CreateOptions::new(size);
        opts.cluster_size = cs;
        opts.extended_l2 = extended;
        let (pause, paused) = Pause::new(storage.clone() as Arc<dyn Storage>);
        let img = Image::create_in(paused, &opts).unwrap();
        let per_table = cs / if extended { 16 } else { 8 };
        let l1_bytes = 8 * size.div_ceil(cs * per_table) as usize;
        let created = storage.cut_points();
        let mut roots = Roots::new();
        roots.insert("default".into(), RootRef::Vdi(0));
        let zero = vec![0u8; size as usize];
        let mut epochs = HashMap::new();
        epochs.insert(
            0,
            vec![Epoch {
                started: created,
                ended: created,
                baseline: zero.clone(),
                durable: Vec::new(),
                changes: Vec::new(),
            }],
        );
        Workload {
            storage,
            pause,
            l1_bytes,
            img: Arc::new(img),
            rng: Rng::new(seed),
            cs,
            size,
            created,
            roots: roots.clone(),
            content: HashMap::from([(0, zero)]),
            epochs,
            snaps: Vec::new(),
            doomed: HashSet::new(),
            initial: roots.clone(),
            ops: Vec::new(),
            next: 0,
            log: Vec::new(),
        }
    }

    fn pos(&self) -> usize {
        self.storage.cut_points()
    }

    fn name(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }

    /// Live roots of one kind, excluding doomed ones.
    fn pick(&mut self, vdi: bool) -> Option<String> {
        let names: Vec<String> = self
            .roots
            .iter()
            .filter(|(n, r)| matches!(r, RootRef::Vdi(_)) == vdi && !self.doomed.contains(*n))
            .map(|(n, _)| n.clone())
            .collect();
        (!names.is_empty()).then(|| names[self.rng.below(names.len() as u64) as usize].clone())
    }

    fn vdi_id(&self, name: &str) -> u64 {
        match self.roots[name] {
            RootRef::Vdi(id) => id,
            RootRef::Snap(_) => panic!("{name} is a snapshot"),
        }
    }

    fn record_root_op(&mut self, what: String, started: usize) {
        let ended = self.pos();
        self.log.push(format!("{started}..{ended}: {what}"));
        self.ops.push(RootOp {
            what,
            started,
            ended,
            after: self.roots.clone(),
        });
    }

    fn mark_durable(&mut self, id: u64, at: usize) {
        let c = self.content[&id].clone();
        self.epochs
            .get_mut(&id)
            .unwrap()
            .last_mut()
            .unwrap()
            .durable
            .push((at, c));
    }

    fn random_range(&mut self) -> (u64, u64) {
        let cs = self.cs;
        if self.rng.below(3) == 0 {
            let c = self.rng.below(self.size / cs);
            let n = 1 + self.rng.below(3);
            (c * cs, (n * cs).min(self.size - c * cs))
        } else {
            let off = self.rng.below(self.size / 512) * 512 + self.rng.below(2) * 100;
            let len = (1 + self.rng.below(3 * cs / 512 + 1)) * 512;
            let off = off.min(self.size - 1);
            (off, len.min(self.size - off))
        }
    }

    fn change(&mut self, vdi: &str, started: usize, offset: u64, data: Vec<u8>) {
        let id = self.vdi_id(vdi);
        self.content.get_mut(&id).unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(&data);
        self.epochs
            .get_mut(&id)
            .unwrap()
            .last_mut()
            .unwrap()
            .changes
            .push(Change {
                started,
                offset,
                data,
            });
    }

    fn write(&mut self, vdi: &str, data_secret: bool) {
        let (off, len) = self.random_range();
        let seed = self.rng.next_u64();
        let data = if data_secret {
            secret(seed, len)
        } else {
            pattern(seed, len)
        };
        let started = self.pos();
        let d = self.img.open_root(vdi).unwrap();
        d.write_at(&data, off).unwrap();
        self.log.push(format!("{started}: write {vdi} {off}+{len}"));
        self.change(vdi, started, off, data);
    }

    fn zero(&mut self, vdi: &str) {
        let (off, len) = self.random_range();
        let unmap = self.rng.below(2) == 0;
        let started = self.pos();
        self.img
            .open_root(vdi)
            .unwrap()
            .write_zeroes(off, len, unmap)
            .unwrap();
        self.log.push(format!("{started}: zero {vdi} {off}+{len}"));
        self.change(vdi, started, off, vec![0; len as usize]);
    }

    fn discard(&mut self, vdi: &str) {
        let (off, len) = self.random_range();
        let started = self.pos();
        self.img.open_root(vdi).unwrap().discard(off, len).unwrap();
        self.log
            .push(format!("{started}: discard {vdi} {off}+{len}"));
        let cs = self.cs;
        let end = off + len;
        let mut c = off.next_multiple_of(cs);
        while c < end {
            let cend = (c + cs).min(self.size);
            if cend <= end {
                self.change(vdi, started, c, vec![0; (cend - c) as usize]);
            }
            c += cs;
        }
    }

    fn flush(&mut self) {
        let started = self.pos();
        self.img.flush().unwrap();
        let at = self.pos();
        self.log.push(format!("{started}..{at}: flush"));
        let ids: Vec<u64> = self.content.keys().copied().collect();
        for id in ids {
            self.mark_durable(id, at);
        }
    }

    fn snapshot(&mut self, vdi: &str, name: &str) {
        let started = self.pos();
        self.img.snapshot(vdi, name).unwrap();
        let id = self.vdi_id(vdi);
        self.snaps.push(self.content[&id].clone());
        self.roots
            .insert(name.to_string(), RootRef::Snap(self.snaps.len() - 1));
        let at = self.pos();
        self.mark_durable(id, at);
        self.record_root_op(format!("snapshot {vdi} {name}"), started);
    }

    fn new_epoch(&mut self, id: u64, started: usize, baseline: Vec<u8>) {
        let ended = self.pos();
        self.content.insert(id, baseline.clone());
        self.epochs.entry(id).or_default().push(Epoch {
            started,
            ended,
            baseline,
            durable: Vec::new(),
            changes: Vec::new(),
        });
    }

    fn fork(&mut self, snap: &str, name: &str) {
        let started = self.pos();
        self.img.fork(snap, name).unwrap();
        let RootRef::Snap(s) = self.roots[snap] else {
            unreachable!()
        };
        self.next += 1;
        let id = 1000 + self.next;
        self.new_epoch(id, started, self.snaps[s].clone());
        self.roots.insert(name.to_string(), RootRef::Vdi(id));
        self.record_root_op(format!("fork {snap} {name}"), started);
    }

    fn revert(&mut self, vdi: &str, snap: &str) {
        let started = self.pos();
        self.img.revert(vdi, snap).unwrap();
        let RootRef::Snap(s) = self.roots[snap] else {
            unreachable!()
        };
        let id = self.vdi_id(vdi);
        self.new_epoch(id, started, self.snaps[s].clone());
        self.record_root_op(format!("revert {vdi} {snap}"), started);
    }

    fn delete(&mut self, name: &str) {
        let started = self.pos();
        match self.roots[name] {
            RootRef::Vdi(id) => {
                self.img.delete_vdi(name).unwrap();
                self.content.remove(&id);
            }
            RootRef::Snap(_) => self.img.delete_snapshot(name).unwrap(),
        }
        self.roots.remove(name);
        self.record_root_op(format!("delete {name}"), started);
    }

    fn gc(&mut self) {
        let started = self.pos();
        if self.rng.below(2) == 0 {
            let r = self.img.gc().unwrap();
            self.record_root_op(format!("gc ({} clusters freed)", r.clusters_freed), started);
            return;
        }
        // Writes while gc counts: it stops at its first read of a snapshot's L1.
        self.pause.reset();
        let gc = {
            let (img, pause, len) = (self.img.clone(), self.pause.clone(), self.l1_bytes);
            std::thread::spawn(move || {
                pause.arm(len);
                let r = img.gc();
                pause.finish();
                r
            })
        };
        let paused = self.pause.wait() == Stopped::Paused;
        if paused {
            for _ in 0..1 + self.rng.below(4) {
                let vdi = self.pick(true).unwrap_or_else(|| "default".into());
                match self.rng.below(4) {
                    0 => self.zero(&vdi),
                    1 => self.discard(&vdi),
                    _ => self.write(&vdi, false),
                }
            }
            if self.rng.below(2) == 0 {
                self.flush();
            }
            self.pause.release();
        }
        let r = gc.join().unwrap().unwrap();
        self.record_root_op(
            format!(
                "gc with writes {paused} ({} clusters freed, exact {})",
                r.clusters_freed, r.refcounts_exact
            ),
            started,
        );
    }

    /// A VDI that receives secret data, maybe a snapshot of it, and is deleted.
    fn doomed_vdi(&mut self) {
        let Some(from) = self.pick(false) else { return };
        let v = self.name("doom");
        self.doomed.insert(v.clone());
        self.fork(&from, &v);
        for _ in 0..1 + self.rng.below(3) {
            self.write(&v, true);
        }
        let snap = (self.rng.below(2) == 0).then(|| {
            let s = self.name("doomsnap");
            self.doomed.insert(s.clone());
            self.snapshot(&v, &s);
            self.write(&v, true);
            s
        });
        if self.rng.below(2) == 0 {
            self.flush();
        }
        self.delete(&v);
        if let Some(s) = snap {
            self.delete(&s);
        }
        if self.rng.below(2) == 0 {
            // Collect at once, then write elsewhere: the freed clusters get reused.
            self.gc();
            let vdi = self.pick(true).unwrap_or_else(|| "default".into());
            self.write(&vdi, false);
            self.write(&vdi, false);
        }
    }

    fn run(&mut self, steps: usize) {
        // Some durable data first, so later writes overwrite and copy.
        self.write("default", false);
        self.write("default", false);
        self.flush();
        for _ in 0..steps {
            let vdi = self.pick(true).unwrap_or_else(|| "default".into());
            match self.rng.below(20) {
                0..=5 => self.write(&vdi, false),
                6 => self.zero(&vdi),
                7 => self.discard(&vdi),
                8 | 9 => self.flush(),
                10 | 11 => {
                    let n = self.name("s");
                    self.snapshot(&vdi, &n);
                }
                12 => {
                    if let Some(s) = self.pick(false) {
                        let n = self.name("v");
                        self.fork(&s, &n);
                    }
                }
                13 => {
                    if let Some(s) = self.pick(false) {
                        self.delete(&s);
                    }
                }
                14 => {
                    if vdi != "default" {
                        self.delete(&vdi);
                    }
                }
                15 => {
                    if let Some(s) = self.pick(false) {
                        self.revert(&vdi, &s);
                    }
                }
                16 | 17 => self.gc(),
                _ => self.doomed_vdi(),
            }
        }
        // The image is closed cleanly at the end: that is part of the history too.
        let started = self.pos();
        self.img.close().unwrap();
        let ended = self.pos();
        self.log.push(format!("{started}..{ended}: close"));
        let ids: Vec<u64> = self.content.keys().copied().collect();
        for id in ids {
            self.mark_durable(id, ended);
        }
    }

    /// The root sets the image may show after a crash at `cut`.
    fn root_candidates(&self, cut: usize) -> Vec<(&Roots, String)> {
        let done = self.ops.iter().filter(|o| o.ended <= cut).count();
        let completed = match done {
            0 => &self.initial,
            n => &self.ops[n - 1].after,
        };
        let mut out = vec![(completed, "completed".to_string())];
        if let Some(o) = self.ops.get(done).filter(|o| o.started <= cut) {
            out.push((&o.after, format!("in flight: {}", o.what)));
        }
        out
    }

    /// Whether `got` is a state VDI `id` may be in after a crash at `cut`; else why not.
    fn vdi_explained(&self, id: u64, cut: usize, got: &[u8]) -> Result<(), String> {
        let epochs = &self.epochs[&id];
        let mut why = Vec::new();
        let done = epochs.iter().rposition(|e| e.ended <= cut);
        let in_flight = epochs
            .iter()
            .position(|e| e.started <= cut && cut < e.ended);
        for i in [done, in_flight].into_iter().flatten() {
            let e = &epochs[i];
            let (at, base) = if e.ended > cut {
                (cut, &e.baseline)
            } else {
                e.durable
                    .iter()
                    .rev()
                    .find(|(at, _)| *at <= cut)
                    .map_or((e.ended, &e.baseline), |(at, c)| (*at, c))
            };
            let later: Vec<&Change> = e
                .changes
                .iter()
                .filter(|c| c.started >= at && c.started < cut)
                .collect();
            let bad = got
                .iter()
                .zip(base.iter())
                .enumerate()
                .find(|&(i, (&g, &w))| {
                    g != w
                        && !later.iter().any(|c| {
                            let i = i as u64;
                            i >= c.offset
                                && i < c.offset + c.data.len() as u64
                                && c.data[(i - c.offset) as usize] == g
                        })
                });
            match bad {
                None => return Ok(()),
                Some((b, (&g, &w))) => why.push(format!(
                    "epoch {i} (ops {}..{}, durable at {at}): byte {b} is {g:#x}, durable value \
                     {w:#x}, and none of {} later changes explains it",
                    e.started,
                    e.ended,
                    later.len()
                )),
            }
        }
        Err(why.join("; "))
    }

    fn verify_cut(&self, cut: usize, seed: u64, what: &str) {
        let bytes = self.storage.image_at(cut, seed);
        let history = || self.log.join("\n");
        let mem = Arc::new(MemStorage::from_vec(bytes));
        let img = Arc::new(
            Image::from_storage(
                mem.clone() as Arc<dyn Storage>,
                &OpenOptions::new().write(true),
            )
            .unwrap_or_else(|e| panic!("{what}: crash image does not open: {e}\n{}", history())),
        );
        let listed = img
            .list()
            .unwrap_or_else(|e| panic!("{what}: list: {e}\n{}", history()));
        let mut names: Vec<(String, bool)> = listed
            .iter()
            .map(|r| (r.name.clone(), r.kind == RootKind::Vdi))
            .collect();
        names.sort();
        let candidates = self.root_candidates(cut);
        let roots = candidates
            .iter()
            .find(|(roots, _)| {
                let mut want: Vec<(String, bool)> = roots
                    .iter()
                    .map(|(n, r)| (n.clone(), matches!(r, RootRef::Vdi(_))))
                    .collect();
                want.sort();
                want == names
            })
            .map(|(r, _)| *r)
            .unwrap_or_else(|| {
                let c: Vec<String> = candidates
                    .iter()
                    .map(|(r, w)| format!("{w}: {:?}", r.keys().collect::<Vec<_>>()))
                    .collect();
                panic!(
                    "{what}: the image lists {names:?}, expected one of {c:?}\n{}",
                    history()
                )
            });
        let size = self.size as usize;
        let mut contents: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (name, r) in roots {
            let d = img
                .open_root(name)
                .unwrap_or_else(|e| panic!("{what}: open_root({name}): {e}\n{}", history()));
            let mut got = vec![0u8; size];
            d.read_at(&mut got, 0)
                .unwrap_or_else(|e| panic!("{what}: read {name}: {e}\n{}", history()));
            match *r {
                RootRef::Snap(s) => {
                    if got != self.snaps[s] {
                        let at = got.iter().zip(&self.snaps[s]).position(|(a, b)| a != b);
                        panic!(
                            "{what}: snapshot {name} differs from when it was taken at byte {at:?}\n{}",
                            history()
                        );
                    }
                }
                RootRef::Vdi(id) => {
                    if let Err(why) = self.vdi_explained(id, cut, &got) {
                        panic!("{what}: VDI {name}: {why}\n{}", history());
                    }
                }
            }
            if !self.doomed.contains(name) {
                if let Some(at) = got.iter().position(|&b| is_secret(b)) {
                    panic!(
                        "{what}: root {name} shows freed secret data at byte {at}\n{}",
                        history()
                    );
                }
            }
            contents.insert(name.clone(), got);
        }
        // Before repair the only structural finding a crash may leave is a revert
        // interrupted between its two commits (two unflagged heads of one VDI; the
        // newer one wins, repair flags the older).
        let before = img.check().unwrap();
        let unexpected: Vec<&String> = before
            .messages
            .iter()
            .filter(|m| !m.contains("interrupted revert"))
            .collect();
        assert!(
            before.corruptions == 0 || unexpected.is_empty(),
            "{what}: structural errors before repair: {unexpected:?}\n{}",
            history()
        );
        let report = img
            .repair()
            .unwrap_or_else(|e| panic!("{what}: repair failed: {e}\n{}", history()));
        assert!(
            report.corruptions == 0 && report.leaks == 0,
            "{what}: after repair: {:?}\n{}",
            report.messages,
            history()
        );
        img.close().unwrap();
        drop(img);
        let img =
            Arc::new(Image::from_storage(mem as Arc<dyn Storage>, &OpenOptions::new()).unwrap());
        let report = img.check().unwrap();
        assert_eq!(
            report.exit_code(),
            0,
            "{what}: after close: {:?}",
            report.messages
        );
        for (name, want) in &contents {
            let mut got = vec![0u8; size];
            img.open_root(name).unwrap().read_at(&mut got, 0).unwrap();
            assert!(
                got == *want,
                "{what}: {name} changed by repair and close\n{}",
                history()
            );
        }
    }
}

/// Runs one workload of `steps` random steps and verifies the crash images at every
/// `every`-th point of its history (and around every root operation), two seeds each.
/// Returns the number of crash images verified.
fn run(cs: u64, extended: bool, size: u64, seed: u64, steps: usize, every: usize) -> usize {
    let mut w = Workload::new(cs, extended, size, seed);
    w.run(steps);
    let total = w.pos();
    let mut points: Vec<usize> = (w.created..=total).step_by(every).collect();
    for o in &w.ops {
        points.extend(o.started..=o.ended.min(o.started + 3));
        points.extend(o.ended.saturating_sub(3).max(o.started)..=o.ended);
    }
    points.push(total);
    points.sort_unstable();
    points.dedup();
    eprintln!(
        "cs={cs} seed={seed}: {total} history events, {} cuts, {} root ops: {:?}",
        points.len(),
        w.ops.len(),
        w.ops
            .iter()
            .map(|o| o.what.split(' ').next().unwrap_or(""))
            .collect::<Vec<_>>()
    );
    let mut verified = 0;
    for &cut in &points {
        for s in 0..2u64 {
            let what = format!("cs={cs} ext={extended} seed={seed} cut={cut}/{total} s={s}");
            w.verify_cut(cut, seed * 1000 + s, &what);
            verified += 1;
        }
    }
    verified
}

/// Seeds per geometry: `default` unless QCOWX_CRASH_SEEDS=N asks for a longer run.
fn seeds(first: u64, default: u64) -> std::ops::RangeInclusive<u64> {
    let n = std::env::var("QCOWX_CRASH_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    first..=first + n - 1
}

#[test]
fn crash_cuts_vdi_ops_4k_clusters() {
    let n: usize = seeds(1, 4)
        .map(|seed| run(4096, false, 256 << 10, seed, 60, 1))
        .sum();
    eprintln!("{n} crash images verified");
}

#[test]
fn crash_cuts_vdi_ops_512_byte_clusters() {
    let n: usize = seeds(1001, 3)
        .map(|seed| run(512, false, 96 << 10, seed, 60, 1))
        .sum();
    eprintln!("{n} crash images verified");
}

#[test]
fn crash_cuts_vdi_ops_extended_l2() {
    let n: usize = seeds(2001, 3)
        .map(|seed| run(16384, true, 512 << 10, seed, 60, 1))
        .sum();
    eprintln!("{n} crash images verified");
}
