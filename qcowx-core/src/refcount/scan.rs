//! The reachability scan: every root's L1 table, every distinct L2 table once, the
//! refcount structures, the snapshot table and bitmaps; references counted per path.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::engine::{Image, State, DEFAULT_ROOT};
use crate::error::Result;
use crate::format::addr::HostOffset;
use crate::format::extensions::EXT_BITMAPS;
use crate::format::header::{Autoclear, Header, Incompatible};
use crate::format::roots::RootKind;
use crate::format::snapshot::SnapshotEntry;
use crate::format::tables::{decode_words, l2_entries, ClusterKind, L1Entry, Link};

use super::counts::Counts;
use super::*;

pub(super) const META: u8 = 1;

pub(super) const DATA: u8 = 2;

/// The metadata structures a scan tells apart (index + 1 is kept per cluster, so that
/// a cluster claimed by two of them is reported by name).
const STRUCTURES: [&str; 10] = [
    "image header",
    "active L1 table",
    "snapshot table",
    "refcount table",
    "refcount block",
    "snapshot L1 table",
    "L2 table",
    "bitmap directory",
    "bitmap table",
    "bitmap data",
];

/// The claim of guest data (structures are numbered 1..=15).
const CLAIM_DATA: u8 = 1 << 4;

/// A metadata structure's claim on a cluster: which structure claimed it first, and
/// how many of the cluster's references are metadata references (the rest, if any,
/// are guest data: a clash).
#[derive(Clone, Copy)]
struct MetaClaim {
    id: u8,
    refs: u64,
}

fn structure_id(what: &str) -> u8 {
    // Two roots may share one L1 table for a moment (a revert interrupted between
    // its header write and its snapshot-table write): a refcount matter, not damage.
    let what = if what == "snapshot L1 table" {
        "active L1 table"
    } else {
        what
    };
    STRUCTURES
        .iter()
        .position(|s| *s == what)
        .map_or(15, |i| i as u8 + 1)
}

fn structure_name(id: u8) -> &'static str {
    STRUCTURES
        .get(usize::from(id).wrapping_sub(1))
        .copied()
        .unwrap_or("metadata")
}

/// Reference counts per host cluster, from a walk of every root.
pub(crate) struct Scan {
    pub(crate) cluster_bits: u32,
    pub(crate) file_clusters: u64,
    file_len: u64,
    pub(crate) counts: Counts,
    /// The clusters metadata structures claim (few: tables and blocks, not data).
    /// A cluster with more references than its metadata claims is used by data.
    meta: HashMap<u64, MetaClaim>,
    /// One bit per cluster: compressed data uses it (allocated at the first one).
    compressed: Option<Vec<u64>>,
    pub(crate) report: CheckReport,
    /// Clusters used both by a metadata structure and as guest data, and how many of
    /// the reported problems are those clashes: a repair can move such data away
    /// (`relocate.rs`).
    pub(crate) data_on_metadata: BTreeSet<u64>,
    pub(crate) data_on_metadata_problems: u64,
    /// Clusters past `file_clusters` were allocated after the scan began (a scan of
    /// [`Source::Live`]): they are neither counted nor reported.
    pub(crate) past_end_is_new: bool,
}

impl Scan {
    pub(crate) fn new(cluster_bits: u32, file_len: u64) -> Scan {
        let file_clusters = file_len.div_ceil(1 << cluster_bits);
        Scan {
            cluster_bits,
            file_clusters,
            file_len,
            counts: Counts::new(file_clusters),
            meta: HashMap::new(),
            compressed: None,
            report: CheckReport::default(),
            data_on_metadata: BTreeSet::new(),
            data_on_metadata_problems: 0,
            past_end_is_new: false,
        }
    }

    /// Counts `k` references to the clusters covering `[offset, offset+len)`, used as
    /// `kind` ([`META`]: the structure `what`; [`DATA`]: guest data). A cluster used
    /// by two different structures, or as metadata and data, is reported.
    pub(crate) fn add(&mut self, offset: u64, len: u64, k: u64, kind: u8, what: &str) -> bool {
        if len == 0 {
            return true;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset.saturating_add(len) - 1) >> self.cluster_bits;
        if first >= self.file_clusters && self.past_end_is_new {
            return true;
        }
        if first >= self.file_clusters {
            self.report.problem(
                true,
                format!(
                    "{what} at offset {offset:#x} is past the end of the file ({:#x})",
                    self.file_len
                ),
            );
            return false;
        }
        // As QEMU counts it: a region may end inside the last cluster past the end of
        // the file (a compressed cluster's sector count is an upper bound), but not a
        // whole cluster or more beyond it.
        let cs = 1u64 << self.cluster_bits;
        if !self.past_end_is_new && offset.saturating_add(len).saturating_sub(self.file_len) >= cs {
            self.report.problem(
                true,
                format!(
                    "{what} at offset {offset:#x} (length {len:#x}) runs past the end of \
                     the file ({:#x})",
                    self.file_len
                ),
            );
        }
        let last = last.min(self.file_clusters - 1);
        let claim = if kind == META {
            structure_id(what)
        } else {
            CLAIM_DATA
        };
        for c in first..=last {
            let meta = self.meta.get(&c).copied();
            let had_meta = meta.map_or(0, |m| m.id);
            let had_data = self.counts.get(c) > meta.map_or(0, |m| m.refs);
            let clash = if claim == CLAIM_DATA {
                had_meta != 0
            } else {
                had_data || (had_meta != 0 && had_meta != claim)
            };
            if clash {
                let first_use = if had_meta != 0 && had_meta != claim {
                    structure_name(had_meta)
                } else {
                    "data"
                };
                let second = what;
                // Data (not compressed) against one structure: a repair can move it.
                let two_structures = claim != CLAIM_DATA && had_meta != 0 && had_meta != claim;
                let compressed = what == "compressed cluster" || self.is_compressed(c);
                if !two_structures && !compressed {
                    self.data_on_metadata.insert(c);
                    self.data_on_metadata_problems += 1;
                }
                self.report.problem(
                    true,
                    format!(
                        "cluster {:#x} is used both as {first_use} and as {second}",
                        c << self.cluster_bits
                    ),
                );
            }
            if claim == CLAIM_DATA {
                if what == "compressed cluster" {
                    let words = (self.file_clusters as usize).div_ceil(64);
                    let bits = self.compressed.get_or_insert_with(|| vec![0; words]);
                    bits[c as usize / 64] |= 1 << (c % 64);
                }
            } else {
                let m = self
                    .meta
                    .entry(c)
                    .or_insert(MetaClaim { id: claim, refs: 0 });
                m.refs = m.refs.saturating_add(k);
            }
            self.counts.add(c, k);
        }
        true
    }

    /// Whether compressed data uses cluster `c`.
    fn is_compressed(&self, c: u64) -> bool {
        self.compressed
            .as_ref()
            .is_some_and(|bits| bits[c as usize / 64] & (1 << (c % 64)) != 0)
    }

    /// References counted to cluster index `cluster`.
    pub(crate) fn count(&self, cluster: u64) -> u64 {
        self.counts.get(cluster)
    }

    /// Clusters the scan covers (the file's length when it began).
    pub(crate) fn clusters(&self) -> u64 {
        self.file_clusters
    }

    /// The scan, or a corruption error naming the first structural problem it found
    /// (after `context`, what could not be done because of it, when given).
    pub(crate) fn checked(self, img: &Image, context: &str) -> Result<Scan> {
        if self.report.corruptions > 0 {
            return Err(crate::Error::Damaged {
                file: img.file_name().to_string(),
                doing: context.to_string(),
                errors: self.report.corruptions,
                first: self.report.messages.first().cloned().unwrap_or_default(),
            });
        }
        Ok(self)
    }
}

/// What a scan walks, copied out of the state so that a scan can also run while the
/// state is unlocked (gc).
pub(crate) struct ScanInput {
    pub(crate) header: Header,
    /// Each snapshot-table entry to walk.
    pub(crate) entries: Vec<EntryRoot>,
    /// Bytes the snapshot table's entries take.
    pub(crate) table_len: u64,
    /// The active L1 table (empty: not walked).
    default_l1: Vec<u64>,
    /// Count the header, the active and snapshot tables and bitmaps; without it only
    /// the listed entries' trees are walked.
    pub(crate) fixed: bool,
}

impl ScanInput {
    /// Every root of the image as the state holds it.
    pub(crate) fn of(st: &State) -> ScanInput {
        ScanInput {
            header: st.header.clone(),
            entries: st
                .registry
                .entries()
                .iter()
                .zip(st.registry.records())
                .map(|(e, r)| EntryRoot::of(e, r.kind == RootKind::Vdi, &st.header))
                .collect(),
            table_len: st
                .registry
                .entries()
                .iter()
                .map(|e| e.encoded_len() as u64)
                .sum(),
            default_l1: st
                .roots
                .get(&DEFAULT_ROOT)
                .map(|r| r.l1.clone())
                .unwrap_or_default(),
            fixed: true,
        }
    }

    /// Only the trees of `entries` (their L1 tables, L2 tables and data).
    pub(crate) fn entries_only(st: &State, entries: &[SnapshotEntry]) -> ScanInput {
        ScanInput {
            header: st.header.clone(),
            entries: entries
                .iter()
                .map(|e| EntryRoot::of(e, false, &st.header))
                .collect(),
            table_len: 0,
            default_l1: Vec::new(),
            fixed: false,
        }
    }
}

/// A snapshot-table entry's tree, as a scan needs it.
pub(crate) struct EntryRoot {
    pub(crate) name: String,
    l1_offset: u64,
    l1_size: u32,
    /// A VDI head: its L1 table may change (in memory first) while a live scan runs.
    /// A snapshot's never does.
    pub(crate) mutable: bool,
    /// What is wrong with the entry's L1 reference (`SnapshotEntry::l1_problem`).
    problem: Option<&'static str>,
}

impl EntryRoot {
    pub(crate) fn of(e: &SnapshotEntry, mutable: bool, h: &Header) -> EntryRoot {
        EntryRoot {
            name: e.name.clone(),
            l1_offset: e.l1_table_offset,
            l1_size: e.l1_size,
            mutable,
            problem: e.l1_problem(1 << h.cluster_bits),
        }
    }
}

/// Where a scan reads tables from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The file, as is (the caller holds the state and flushed when it matters).
    File,
    /// The newest version while I/O goes on. A table that may change (a VDI head's L1,
    /// an L2 table linked writable) is copied under the state lock — a loaded root's
    /// in-memory L1, a cached L2 table, else the file — so the lock is held for one
    /// table at a time. A table that cannot change while the set of roots is fixed (a
    /// snapshot's L1; an L2 table linked only read-only, which invariant W keeps
    /// unchanged) is read from the file without the lock.
    Live,
}

impl Source {
    pub(crate) fn l1(self, img: &Image, off: u64, entries: u32, mutable: bool) -> Result<Vec<u64>> {
        let read = || -> Result<Vec<u64>> {
            let mut raw = vec![0u8; entries as usize * 8];
            img.storage
                .read_at(&mut raw, off)
                .map_err(|e| img.io_err("read snapshot L1 table", off, e))?;
            Ok(decode_words(&raw))
        };
        if self == Source::File || !mutable {
            return read();
        }
        let st = img.lock_state()?;
        match st.roots.values().find(|r| r.l1_offset == off) {
            Some(r) => {
                let mut l1 = r.l1.clone();
                l1.resize(entries as usize, 0);
                Ok(l1)
            }
            None => read(),
        }
    }

    pub(crate) fn l2(
        self,
        img: &Image,
        off: HostOffset,
        raw: &mut [u8],
        mutable: bool,
    ) -> Result<Vec<u64>> {
        let read = |raw: &mut [u8]| -> Result<Vec<u64>> {
            img.storage
                .read_at(raw, off.get())
                .map_err(|e| img.io_err("read L2 table", off, e))?;
            Ok(decode_words(raw))
        };
        if self == Source::File || !mutable {
            return read(raw);
        }
        let mut st = img.lock_state()?;
        match st.cache.get(off) {
            Some(words) => Ok(words.to_vec()),
            None => read(raw),
        }
    }
}

/// Walks every root of the image and counts references. Refcount structures are
/// counted only when `with_refcounts`.
pub(super) fn scan(img: &Image, st: &State, with_refcounts: bool) -> Result<Scan> {
    scan_from(img, &ScanInput::of(st), with_refcounts, Source::File)
}

/// Counts references from the roots `input` lists, reading tables from `src`.
pub(crate) fn scan_from(
    img: &Image,
    input: &ScanInput,
    with_refcounts: bool,
    src: Source,
) -> Result<Scan> {
    let geo = img.geo;
    let cs = geo.cluster_size();
    let mut file_len = img.storage.len().map_err(|e| img.io_err("stat", 0u64, e))?;
    if src == Source::Live {
        // Clusters allocated but not written yet are inside the scan too.
        file_len = file_len.max(img.lock_state()?.alloc.end());
    }
    let mut s = Scan::new(geo.cluster_bits, file_len);
    s.past_end_is_new = src == Source::Live;
    let h = &input.header;
    s.report.dirty = h.incompatible.contains(Incompatible::DIRTY);
    s.report.marked_corrupt = h.incompatible.contains(Incompatible::CORRUPT);
    s.report.total_clusters = h.size.div_ceil(cs);

    if input.fixed {
        s.add(0, cs, 1, META, "image header");
        s.add(
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            1,
            META,
            "active L1 table",
        );
        if h.nb_snapshots > 0 {
            s.add(
                h.snapshots_offset,
                input.table_len,
                1,
                META,
                "snapshot table",
            );
        }
        if with_refcounts {
            let table_len = u64::from(h.refcount_table_clusters) * cs;
            s.add(
                h.refcount_table_offset,
                table_len,
                1,
                META,
                "refcount table",
            );
            for (i, block) in img.read_reftable(h)?.into_iter().enumerate() {
                if block == 0 {
                    continue;
                }
                if block % cs != 0 {
                    s.report.problem(
                        true,
                        format!("refcount table entry {i} is not cluster-aligned: {block:#x}"),
                    );
                    continue;
                }
                s.add(block, cs, 1, META, "refcount block");
            }
        }
        if h.autoclear & Autoclear::BITMAPS.bits() != 0 {
            scan_bitmaps(img, h, &mut s)?;
        }
    }

    // Every root: the active L1 (in memory) and each snapshot's L1 (on disk).
    // Per L2 table: the links to it, and whether one of them is writable.
    let mut l2_refs: HashMap<HostOffset, (u64, bool)> = HashMap::new();
    let mut link = |off: HostOffset, writable: bool| {
        let r = l2_refs.entry(off).or_insert((0, false));
        r.0 += 1;
        r.1 |= writable;
    };
    let mut active_l2: Vec<HostOffset> = Vec::new();
    for (i, &w) in input.default_l1.iter().enumerate() {
        match L1Entry::from_raw(w).link(&geo) {
            Link::Malformed => s
                .report
                .problem(true, format!("active L1 entry {i} is malformed: {w:#x}")),
            Link::Table { table, writable } => {
                link(table, writable);
                active_l2.push(table);
            }
            Link::None => {}
        }
    }
    for root in &input.entries {
        let (name, l1_off, l1_size) = (&root.name, root.l1_offset, root.l1_size);
        if let Some(why) = root.problem {
            s.report.problem(
                true,
                format!(
                    "snapshot '{name}': {why} (L1 table offset {l1_off:#x}, {l1_size} entries)"
                ),
            );
            continue;
        }
        let len = u64::from(l1_size) * 8;
        if !s.add(l1_off, len, 1, META, "snapshot L1 table") {
            continue;
        }
        if l1_off + len > file_len {
            s.report.problem(
                true,
                format!("snapshot '{name}' L1 table runs past the end of the file"),
            );
            continue;
        }
        for (i, w) in src
            .l1(img, l1_off, l1_size, root.mutable)?
            .into_iter()
            .enumerate()
        {
            match L1Entry::from_raw(w).link(&geo) {
                Link::Malformed => s.report.problem(
                    true,
                    format!("L1 entry {i} of snapshot '{name}' is malformed: {w:#x}"),
                ),
                Link::Table { table, writable } => link(table, writable),
                Link::None => {}
            }
        }
    }

    let active: HashSet<HostOffset> = active_l2.iter().copied().collect();
    let mut tables: Vec<(HostOffset, (u64, bool))> = l2_refs.into_iter().collect();
    tables.sort_unstable();
    let mut raw = vec![0u8; cs as usize];
    let mut last_host: Option<HostOffset> = None;
    for (off, (k, writable)) in tables {
        if !s.add(off.get(), cs, k, META, "L2 table") {
            continue;
        }
        let words = src.l2(img, off, &mut raw, writable)?;
        let is_active = active.contains(&off);
        // Entries of all zero bits link nothing and are valid: skipped.
        let linked = l2_entries(&words, &geo).filter(|(_, e)| e.word() != 0 || e.bitmap() != 0);
        for (idx, entry) in linked {
            let entry_off = off + idx as u64 * geo.l2_entry_bytes();
            let kind = match entry.kind(&geo) {
                Ok(kind) => kind,
                Err(why) => {
                    s.report
                        .problem(true, format!("L2 entry at offset {entry_off:#x}: {why}"));
                    continue;
                }
            };
            match kind {
                ClusterKind::Data { host }
                | ClusterKind::Zero { host: Some(host) }
                | ClusterKind::Subclusters {
                    host: Some(host), ..
                } => {
                    s.add(host.get(), cs, k, DATA, "data cluster");
                    if is_active {
                        s.report.allocated_clusters += 1;
                        if last_host.is_some_and(|l| l + cs != host) {
                            s.report.fragmented_clusters += 1;
                        }
                        last_host = Some(host);
                    }
                }
                ClusterKind::Compressed { offset, len } => {
                    if geo.extended && entry.bitmap() != 0 {
                        s.report.problem(
                            true,
                            format!(
                                "L2 entry at offset {entry_off:#x}: compressed cluster with a \
                                 non-zero subcluster bitmap {:#018x}",
                                entry.bitmap()
                            ),
                        );
                    }
                    s.add(offset.get(), len, k, DATA, "compressed cluster");
                    if is_active {
                        s.report.allocated_clusters += 1;
                        s.report.compressed_clusters += 1;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(s)
}

/// Counts the clusters of persistent bitmaps (directory, tables, data).
pub(super) fn scan_bitmaps(img: &Image, h: &Header, s: &mut Scan) -> Result<()> {
    let Some(ext) = h.extensions.get(EXT_BITMAPS) else {
        return Ok(());
    };
    let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
    let be32 = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap_or([0; 4]));
    let nb = be32(&ext.data[0..4]);
    let dir_size = be64(&ext.data[8..16]);
    let dir_off = be64(&ext.data[16..24]);
    if dir_size > 64 << 20 || !s.add(dir_off, dir_size, 1, META, "bitmap directory") {
        s.report.problem(true, "bitmap directory is invalid".into());
        return Ok(());
    }
    let mut dir = vec![0u8; dir_size as usize];
    img.storage
        .read_at(&mut dir, dir_off)
        .map_err(|e| img.io_err("read bitmap directory", dir_off, e))?;
    let mut pos = 0usize;
    for _ in 0..nb {
        let Some(e) = dir.get(pos..pos + 24) else {
            s.report
                .problem(true, "bitmap directory is truncated".into());
            break;
        };
        let table_off = be64(&e[0..8]);
        let table_size = u64::from(be32(&e[8..12]));
        let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra = be32(&e[20..24]) as usize;
        pos += (24 + name_size + extra).next_multiple_of(8);
        let len = table_size * 8;
        if len > 64 << 20 || !s.add(table_off, len, 1, META, "bitmap table") {
            continue;
        }
        let mut raw = vec![0u8; len as usize];
        img.storage
            .read_at(&mut raw, table_off)
            .map_err(|e| img.io_err("read bitmap table", table_off, e))?;
        for w in decode_words(&raw) {
            let off = w & 0x00ff_ffff_ffff_fe00;
            if off != 0 {
                s.add(off, img.geo.cluster_size(), 1, META, "bitmap data");
            }
        }
    }
    Ok(())
}

/// The clusters (indexes) of the refcount table and blocks the header points at.
pub(crate) fn refcount_clusters(img: &Image, h: &Header) -> Result<HashSet<u64>> {
    let geo = img.geo;
    let mut set: HashSet<u64> = HashSet::new();
    for i in 0..u64::from(h.refcount_table_clusters) {
        set.insert((h.refcount_table_offset >> geo.cluster_bits) + i);
    }
    for b in img.read_reftable(h)? {
        if b != 0 && b % geo.cluster_size() == 0 {
            set.insert(b >> geo.cluster_bits);
        }
    }
    Ok(set)
}

/// Reference counts per host cluster from every root, refused with
/// [`crate::Error::Damaged`] on structural damage. With `refuse` (what to say before
/// the damage), the refcount structures are scanned too, so that data overlapping
/// them is damage; without, they are left out (a repair is about to rebuild them).
pub(crate) fn reference_counts(img: &Image, st: &State, refuse: Option<&str>) -> Result<Counts> {
    Ok(scan(img, st, refuse.is_some())?
        .checked(img, refuse.unwrap_or(""))?
        .counts)
}
