//! Refcounts from reachability: the scan behind `check`, `repair` and clean close.
//!
//! qcowx never updates refcounts on the hot path. While they are stale the header's
//! dirty bit is set; a clean close (or a repair) counts references from every root and
//! writes exact refcounts. References are counted per path, as QEMU counts them: an L2
//! table linked from k roots is read once and each cluster it links to gets k
//! references, so the scan costs O(distinct metadata), never O(roots × table size).

use std::collections::{HashMap, HashSet};

use crate::engine::image::{Image, State, DEFAULT_ROOT};
use crate::error::{Error, Result};
use crate::format::extensions::EXT_BITMAPS;
use crate::format::header::{Autoclear, Header, Incompatible};
use crate::format::snapshot::SnapshotEntry;
use crate::format::tables::{decode_words, encode_words, ClusterKind, L1Entry, L2Entry};
use crate::vdi::RootKind;

/// The most problems a report lists individually (the counts are always complete).
pub const MAX_MESSAGES: usize = 1000;

/// The outcome of a check, with `qemu-img check`'s counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Structural errors and refcounts lower than the references (data at risk).
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Errors that stopped part of the check (unreadable structures).
    pub check_errors: u64,
    /// Descriptions of the first [`MAX_MESSAGES`] problems.
    pub messages: Vec<String>,
    /// Guest clusters allocated in the active layer.
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters that are not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters in the active layer.
    pub compressed_clusters: u64,
    /// One past the last cluster in use in the file.
    pub image_end_offset: u64,
    /// The dirty bit was set (refcounts stale) when checked.
    pub dirty: bool,
    /// The report follows a repair.
    pub repaired: bool,
}

impl CheckReport {
    /// `qemu-img check`'s exit code: 0 clean, 1 check not completed, 2 corruptions,
    /// 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    fn problem(&mut self, corruption: bool, msg: String) {
        if corruption {
            self.corruptions += 1;
        } else {
            self.leaks += 1;
        }
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        }
    }
}

/// Reads refcount entry `index` of a refcount block.
pub fn get_entry(block: &[u8], order: u32, index: usize) -> u64 {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = index * bits;
        let byte = block.get(bit / 8).copied().unwrap_or(0);
        u64::from((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8)
    } else {
        let n = bits / 8;
        let start = index * n;
        block.get(start..start + n).map_or(0, |b| {
            b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
        })
    }
}

/// Writes refcount entry `index` of a refcount block (the value must fit).
pub fn set_entry(block: &mut [u8], order: u32, index: usize, value: u64) {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = index * bits;
        let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
        if let Some(b) = block.get_mut(bit / 8) {
            *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
    } else {
        let n = bits / 8;
        let start = index * n;
        if let Some(dst) = block.get_mut(start..start + n) {
            let be = value.to_be_bytes();
            dst.copy_from_slice(&be[8 - n..]);
        }
    }
}

const META: u8 = 1;
const DATA: u8 = 2;

/// Reference counts per host cluster, from a walk of every root.
pub(crate) struct Scan {
    cluster_bits: u32,
    file_clusters: u64,
    counts: Vec<u64>,
    kinds: Vec<u8>,
    report: CheckReport,
    /// Clusters past `file_clusters` were allocated after the scan began (a scan of
    /// [`Source::Live`]): they are neither counted nor reported.
    past_end_is_new: bool,
}

impl Scan {
    fn new(cluster_bits: u32, file_len: u64) -> Scan {
        let file_clusters = file_len.div_ceil(1 << cluster_bits);
        Scan {
            cluster_bits,
            file_clusters,
            counts: vec![0; file_clusters as usize],
            kinds: vec![0; file_clusters as usize],
            report: CheckReport::default(),
            past_end_is_new: false,
        }
    }

    /// Counts `k` references to the clusters covering `[offset, offset+len)`.
    fn add(&mut self, offset: u64, len: u64, k: u64, kind: u8, what: &str) -> bool {
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
                format!("{what} at offset {offset:#x} is past the end of the file"),
            );
            return false;
        }
        let last = last.min(self.file_clusters - 1);
        for c in first..=last {
            let i = c as usize;
            if self.kinds[i] != 0 && self.kinds[i] != kind {
                self.report.problem(
                    true,
                    format!(
                        "cluster {:#x} is used both as metadata and as data ({what})",
                        c << self.cluster_bits
                    ),
                );
            }
            self.kinds[i] |= kind;
            self.counts[i] = self.counts[i].saturating_add(k);
        }
        true
    }

    /// References counted to cluster index `cluster`.
    pub(crate) fn count(&self, cluster: u64) -> u64 {
        self.counts.get(cluster as usize).copied().unwrap_or(0)
    }

    /// Clusters the scan covers (the file's length when it began).
    pub(crate) fn clusters(&self) -> u64 {
        self.file_clusters
    }

    /// The scan, or a corruption error naming the first structural problem it found.
    pub(crate) fn checked(self, img: &Image) -> Result<Scan> {
        if self.report.corruptions > 0 {
            return Err(img.corrupt(
                "image metadata",
                0,
                format!(
                    "{} structural error(s), first: {}",
                    self.report.corruptions,
                    self.report.messages.first().cloned().unwrap_or_default()
                ),
            ));
        }
        Ok(self)
    }
}

/// What a scan walks, copied out of the state so that a scan can also run while the
/// state is unlocked (gc).
pub(crate) struct ScanInput {
    header: Header,
    /// Each snapshot-table entry to walk.
    entries: Vec<EntryRoot>,
    /// Bytes the snapshot table's entries take.
    table_len: u64,
    /// The active L1 table (empty: not walked).
    default_l1: Vec<u64>,
    /// Count the header, the active and snapshot tables and bitmaps; without it only
    /// the listed entries' trees are walked.
    fixed: bool,
}

impl ScanInput {
    /// Every root of the image as the state holds it.
    pub(crate) fn of(st: &State) -> ScanInput {
        ScanInput {
            header: st.header.clone(),
            entries: st
                .snapshots
                .iter()
                .zip(&st.records)
                .map(|(e, r)| EntryRoot::of(e, r.kind == RootKind::Vdi))
                .collect(),
            table_len: st.snapshots.iter().map(|e| e.encoded_len() as u64).sum(),
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
            entries: entries.iter().map(|e| EntryRoot::of(e, false)).collect(),
            table_len: 0,
            default_l1: Vec::new(),
            fixed: false,
        }
    }
}

/// A snapshot-table entry's tree, as a scan needs it.
struct EntryRoot {
    name: String,
    l1_offset: u64,
    l1_size: u32,
    /// A VDI head: its L1 table may change (in memory first) while a live scan runs.
    /// A snapshot's never does.
    mutable: bool,
}

impl EntryRoot {
    fn of(e: &SnapshotEntry, mutable: bool) -> EntryRoot {
        EntryRoot {
            name: e.name.clone(),
            l1_offset: e.l1_table_offset,
            l1_size: e.l1_size,
            mutable,
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
    fn l1(self, img: &Image, off: u64, entries: u32, mutable: bool) -> Result<Vec<u64>> {
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

    fn l2(self, img: &Image, off: u64, raw: &mut [u8], mutable: bool) -> Result<Vec<u64>> {
        let read = |raw: &mut [u8]| -> Result<Vec<u64>> {
            img.storage
                .read_at(raw, off)
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
fn scan(img: &Image, st: &State, with_refcounts: bool) -> Result<Scan> {
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
    let mut file_len = img.storage.len().map_err(|e| img.io_err("stat", 0, e))?;
    if src == Source::Live {
        // Clusters allocated but not written yet are inside the scan too.
        file_len = file_len.max(img.lock_state()?.alloc.end());
    }
    let mut s = Scan::new(geo.cluster_bits, file_len);
    s.past_end_is_new = src == Source::Live;
    let h = &input.header;
    s.report.dirty = h.incompatible.contains(Incompatible::DIRTY);
    s.report.total_clusters = h.size.div_ceil(cs);

    if input.fixed {
        s.add(0, cs, 1, META, "header");
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
            for (i, block) in read_reftable(img, h)?.into_iter().enumerate() {
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
    let mut l2_refs: HashMap<u64, (u64, bool)> = HashMap::new();
    let mut link = |off: u64, writable: bool| {
        let r = l2_refs.entry(off).or_insert((0, false));
        r.0 += 1;
        r.1 |= writable;
    };
    let mut active_l2: Vec<u64> = Vec::new();
    for (i, &w) in input.default_l1.iter().enumerate() {
        let e = L1Entry(w);
        if e.is_malformed(&geo) {
            s.report
                .problem(true, format!("active L1 entry {i} is malformed: {w:#x}"));
            continue;
        }
        if let Some(off) = e.l2_offset() {
            link(off, e.writable());
            active_l2.push(off);
        }
    }
    for root in &input.entries {
        let (name, l1_off, l1_size) = (&root.name, root.l1_offset, root.l1_size);
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
            let e = L1Entry(w);
            if e.is_malformed(&geo) {
                s.report.problem(
                    true,
                    format!("L1 entry {i} of snapshot '{name}' is malformed: {w:#x}"),
                );
                continue;
            }
            if let Some(off) = e.l2_offset() {
                link(off, e.writable());
            }
        }
    }

    let active: HashSet<u64> = active_l2.iter().copied().collect();
    let mut tables: Vec<(u64, (u64, bool))> = l2_refs.into_iter().collect();
    tables.sort_unstable();
    let mut raw = vec![0u8; cs as usize];
    let mut last_host: Option<u64> = None;
    for (off, (k, writable)) in tables {
        if !s.add(off, cs, k, META, "L2 table") {
            continue;
        }
        let words = src.l2(img, off, &mut raw, writable)?;
        let is_active = active.contains(&off);
        let step = if geo.extended { 2 } else { 1 };
        for (idx, chunk) in words.chunks(step).enumerate() {
            let entry = L2Entry {
                word: chunk[0],
                bitmap: chunk.get(1).copied().unwrap_or(0),
            };
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
                | ClusterKind::Subclusters { host, .. }
                    if host != 0 =>
                {
                    s.add(host, cs, k, DATA, "data cluster");
                    if is_active {
                        s.report.allocated_clusters += 1;
                        if last_host.is_some_and(|l| l + cs != host) {
                            s.report.fragmented_clusters += 1;
                        }
                        last_host = Some(host);
                    }
                }
                ClusterKind::Compressed { offset, len } => {
                    s.add(offset, len, k, DATA, "compressed cluster");
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

fn read_reftable(img: &Image, h: &Header) -> Result<Vec<u64>> {
    let len = u64::from(h.refcount_table_clusters) * img.geo.cluster_size();
    let mut raw = vec![0u8; len as usize];
    img.storage
        .read_at(&mut raw, h.refcount_table_offset)
        .map_err(|e| img.io_err("read refcount table", h.refcount_table_offset, e))?;
    Ok(decode_words(&raw))
}

/// Counts the clusters of persistent bitmaps (directory, tables, data).
fn scan_bitmaps(img: &Image, h: &Header, s: &mut Scan) -> Result<()> {
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

/// Compares the on-disk refcounts with a reachability scan.
pub(crate) fn check(img: &Image, st: &mut State) -> Result<CheckReport> {
    let mut s = scan(img, st, true)?;
    for msg in Image::registry_problems(st) {
        s.report.problem(true, msg);
    }
    let cs = img.geo.cluster_size();
    let order = st.header.refcount_order;
    let per_block = (cs * 8) >> order;
    let table = read_reftable(img, &st.header)?;
    let mut block = vec![0u8; cs as usize];
    let mut loaded: Option<u64> = None;
    let mut end = 0;
    let file_clusters = s.file_clusters;
    let mut refcount_of = |c: u64, block: &mut Vec<u8>| -> Result<u64> {
        let bi = c / per_block;
        let block_off = table.get(bi as usize).copied().unwrap_or(0);
        if block_off == 0 || block_off % cs != 0 || block_off >= file_clusters * cs {
            return Ok(0);
        }
        if loaded != Some(block_off) {
            img.storage
                .read_at(block, block_off)
                .map_err(|e| img.io_err("read refcount block", block_off, e))?;
            loaded = Some(block_off);
        }
        Ok(get_entry(block, order, (c % per_block) as usize))
    };
    let dirty = s.report.dirty;
    let mut visit = |s: &mut Scan, c: u64, refcount: u64| {
        let refs = s.count(c);
        if refs > 0 || refcount > 0 {
            end = c + 1;
        }
        if dirty {
            // Refcounts are stale by protocol while the dirty bit is set; the next
            // clean close or repair rewrites them. Only structure is checked.
            return;
        }
        if refcount < refs {
            s.report.problem(
                true,
                format!(
                    "cluster {:#x}: refcount={refcount} reference={refs}",
                    c * cs
                ),
            );
        } else if refcount > refs {
            s.report.problem(
                false,
                format!(
                    "leaked cluster {:#x}: refcount={refcount} reference={refs}",
                    c * cs
                ),
            );
        }
    };
    for c in 0..file_clusters {
        let refcount = refcount_of(c, &mut block)?;
        visit(&mut s, c, refcount);
    }
    // Past the end of the file nothing is referenced: only nonzero entries of the
    // refcount blocks that exist (leaks) matter. They are found byte by byte, so the
    // cost is the blocks' size, never the number of clusters they could address.
    let bits = 1u64 << order;
    for (bi, &b) in table.iter().enumerate() {
        let first = bi as u64 * per_block;
        if b == 0 || b % cs != 0 || b >= file_clusters * cs || first + per_block <= file_clusters {
            continue;
        }
        img.storage
            .read_at(&mut block, b)
            .map_err(|e| img.io_err("read refcount block", b, e))?;
        let skip = file_clusters.saturating_sub(first);
        let mut next = skip;
        for (j, _) in block.iter().enumerate().filter(|(_, &x)| x != 0) {
            let lo = (j as u64 * 8 / bits).max(next);
            let hi = (j as u64 * 8 + 7) / bits;
            for i in lo..=hi.min(per_block - 1) {
                let refcount = get_entry(&block, order, i as usize);
                if refcount > 0 {
                    visit(&mut s, first + i, refcount);
                }
            }
            next = next.max(hi + 1);
        }
    }
    s.report.image_end_offset = end * cs;
    check_copied(img, st, &mut s)?;
    Ok(s.report)
}

/// Checks bit 63 on the active tree against the reference counts: a writable link
/// to a shared cluster breaks invariant W; a read-only link to an exclusive cluster is
/// what QEMU calls an OFLAG_COPIED error (only reported when refcounts are exact).
fn check_copied(img: &Image, st: &mut State, s: &mut Scan) -> Result<()> {
    let exact = !s.report.dirty;
    let default_l1 = st
        .roots
        .get(&DEFAULT_ROOT)
        .map(|r| r.l1.clone())
        .unwrap_or_default();
    check_head(img, s, "default VDI", &default_l1, exact)?;
    // Named VDI heads: invariant W only (QEMU does not look at them).
    for i in 0..st.snapshots.len() {
        if st.records[i].kind != RootKind::Vdi || !Image::entry_live(st, i) {
            continue;
        }
        let e = &st.snapshots[i];
        let len = u64::from(e.l1_size) * 8;
        if e.l1_table_offset.saturating_add(len) > s.file_clusters << s.cluster_bits {
            continue; // reported by the scan
        }
        let mut raw = vec![0u8; len as usize];
        img.storage
            .read_at(&mut raw, e.l1_table_offset)
            .map_err(|err| img.io_err("read L1 table", e.l1_table_offset, err))?;
        let label = format!("VDI head '{}'", e.name);
        check_head(img, s, &label, &decode_words(&raw), false)?;
    }
    Ok(())
}

/// Checks bit 63 along one VDI head. Invariant W: a cluster reached through writable
/// links only has exactly one reference. With `qemu_rules` (the default VDI of an image
/// whose refcounts are exact), a read-only link to a cluster with one reference is
/// also reported, as `qemu-img check` reports it (OFLAG_COPIED).
fn check_head(img: &Image, s: &mut Scan, label: &str, l1: &[u64], qemu_rules: bool) -> Result<()> {
    let geo = img.geo;
    let cs = geo.cluster_size();
    let mut raw = vec![0u8; cs as usize];
    for (i, &w) in l1.iter().enumerate() {
        let e = L1Entry(w);
        let Some(off) = e.l2_offset().filter(|_| !e.is_malformed(&geo)) else {
            continue;
        };
        let refs = s.count(off >> geo.cluster_bits);
        if e.writable() && refs > 1 {
            s.report.problem(
                true,
                format!("{label}: L1 entry {i} is writable but its L2 table has {refs} references"),
            );
        } else if qemu_rules && !e.writable() && refs == 1 {
            s.report.problem(
                true,
                format!("OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={w:x} refcount=1"),
            );
        }
        if !e.writable() && !qemu_rules {
            continue; // a read-only table: its entries' bits do not matter
        }
        if off + cs > s.file_clusters * cs {
            continue;
        }
        img.storage
            .read_at(&mut raw, off)
            .map_err(|e| img.io_err("read L2 table", off, e))?;
        let words = decode_words(&raw);
        let step = if geo.extended { 2 } else { 1 };
        for (j, chunk) in words.chunks(step).enumerate() {
            let entry = L2Entry {
                word: chunk[0],
                bitmap: chunk.get(1).copied().unwrap_or(0),
            };
            let Some(host) = entry.host() else { continue };
            let refs = s.count(host >> geo.cluster_bits);
            if e.writable() && entry.writable() && refs > 1 {
                s.report.problem(
                    true,
                    format!(
                        "{label}: L2 entry {j} of table {off:#x} is writable but cluster {host:#x} has {refs} references"
                    ),
                );
            } else if qemu_rules && entry.writable() != (refs == 1) {
                s.report.problem(
                    true,
                    format!(
                        "OFLAG_COPIED data cluster: l2_entry={:x} refcount={refs}",
                        entry.word
                    ),
                );
            }
        }
    }
    Ok(())
}

/// Writes exact refcounts from a reachability scan, normalizes bit 63 on the active
/// tree, clears the dirty bit, and truncates free clusters at the end of the file.
///
/// Order: the caller has flushed; links are normalized and flushed; new refcount
/// blocks and table are written to clusters that neither hold live data nor belong to
/// the old refcount structures, and synced; then one header write switches to them and
/// clears the dirty bit (the commit point); then the file is truncated.
pub(crate) fn rebuild(img: &Image, st: &mut State) -> Result<Vec<u64>> {
    give_up_table_room(img, st);
    let s = scan(img, st, false)?;
    let gate = img.io_gate_write();
    rebuild_with(img, st, s, &gate)
}

/// Gives up the spare room reserved after the snapshot table this session: a scan
/// counts only the clusters the entries cover, so that room would look free.
pub(crate) fn give_up_table_room(img: &Image, st: &mut State) {
    st.table_capacity = if st.header.nb_snapshots > 0 {
        st.index.used.next_multiple_of(img.geo.cluster_size())
    } else {
        0
    };
}

/// [`rebuild`] from a scan of the current roots (refcount structures not counted)
/// that the caller made after [`give_up_table_room`], with no change since.
///
/// The caller holds the I/O gate (`_gate`): the file only shrinks while no data
/// I/O is in flight, so a mapped read (`Image::read_mapped`) never sees its bytes
/// cut off under it.
pub(crate) fn rebuild_with(
    img: &Image,
    st: &mut State,
    s: Scan,
    _gate: &std::sync::RwLockWriteGuard<'_, ()>,
) -> Result<Vec<u64>> {
    let geo = img.geo;
    let cs = geo.cluster_size();
    if s.report.corruptions > 0 {
        return Err(img.corrupt(
            "image metadata",
            0,
            format!(
                "cannot rebuild refcounts: {} structural error(s), first: {}",
                s.report.corruptions,
                s.report.messages.first().cloned().unwrap_or_default()
            ),
        ));
    }
    normalize_copied(img, st, &s)?;
    img.flush_metadata(st)?;

    // Old refcount structures stay untouched until the header stops pointing at them.
    let old = refcount_clusters(img, &st.header)?;
    let order = st.header.refcount_order;
    let per_block = (cs * 8) >> order;
    let mut counts = s.counts;
    let used_end = counts
        .iter()
        .rposition(|&c| c > 0)
        .map_or(1, |i| i as u64 + 1);
    let is_free = |c: u64, counts: &[u64], taken: &HashSet<u64>| {
        c > 0
            && counts.get(c as usize).copied().unwrap_or(0) == 0
            && !old.contains(&c)
            && !taken.contains(&c)
    };
    let (table_at, table_clusters, blocks) = {
        let mut total = used_end;
        loop {
            let nblocks = total.div_ceil(per_block);
            let ntable = geo.clusters_for(nblocks * 8);
            let mut taken: HashSet<u64> = HashSet::new();
            // The table needs a contiguous run.
            let mut start = 1;
            let table_at = loop {
                if (start..start + ntable).all(|c| is_free(c, &counts, &taken)) {
                    break start;
                }
                start += 1;
            };
            taken.extend(table_at..table_at + ntable);
            let mut blocks = Vec::with_capacity(nblocks as usize);
            let mut c = 1;
            while (blocks.len() as u64) < nblocks {
                if is_free(c, &counts, &taken) {
                    blocks.push(c);
                    taken.insert(c);
                }
                c += 1;
            }
            let highest = taken.iter().copied().max().unwrap_or(0) + 1;
            let new_total = total.max(highest);
            if new_total.div_ceil(per_block) == nblocks {
                break (table_at, ntable, blocks);
            }
            total = new_total;
        }
    };
    let new_end = blocks
        .iter()
        .copied()
        .chain([table_at + table_clusters - 1, used_end - 1])
        .max()
        .unwrap_or(0)
        + 1;
    counts.resize(new_end as usize, 0);
    for c in (table_at..table_at + table_clusters).chain(blocks.iter().copied()) {
        counts[c as usize] = 1;
    }
    if table_clusters * cs > crate::format::header::MAX_REFTABLE_BYTES {
        return Err(img.corrupt(
            "refcount table",
            0,
            format!(
                "the file needs a refcount table of {} bytes, more than QEMU opens ({}); \
                 use larger clusters",
                table_clusters * cs,
                crate::format::header::MAX_REFTABLE_BYTES
            ),
        ));
    }
    let max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    };
    if let Some((i, &c)) = counts.iter().enumerate().find(|(_, &c)| c > max) {
        return Err(Error::RefcountOverflow {
            file: img.name.clone(),
            offset: i as u64 * cs,
            count: c,
            bits: 1 << order,
        });
    }
    let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
    let mut block = vec![0u8; cs as usize];
    for (bi, &bc) in blocks.iter().enumerate() {
        block.fill(0);
        let first = bi as u64 * per_block;
        for i in 0..per_block {
            let c = (first + i) as usize;
            if c >= counts.len() {
                break;
            }
            set_entry(&mut block, order, i as usize, counts[c]);
        }
        let off = bc * cs;
        img.storage
            .write_at(&block, off)
            .map_err(|e| img.io_err("write refcount block", off, e))?;
        table[bi] = off;
    }
    let table_off = table_at * cs;
    img.storage
        .write_at(&encode_words(&table), table_off)
        .map_err(|e| img.io_err("write refcount table", table_off, e))?;
    img.sync()?;

    st.header.refcount_table_offset = table_off;
    st.header.refcount_table_clusters = table_clusters as u32;
    st.header.incompatible.remove(Incompatible::DIRTY);
    img.write_header_fields(st)?;
    img.sync()?;
    st.stale = false;

    let file_len = img.storage.len().map_err(|e| img.io_err("stat", 0, e))?;
    if file_len > new_end * cs {
        img.storage
            .set_len(new_end * cs)
            .map_err(|e| img.io_err("truncate", new_end * cs, e))?;
    }
    st.alloc.reset(new_end * cs);
    st.cache.clear_clean();
    Ok(counts)
}

/// The clusters (indexes) of the refcount table and blocks the header points at.
pub(crate) fn refcount_clusters(img: &Image, h: &Header) -> Result<HashSet<u64>> {
    let geo = img.geo;
    let mut set: HashSet<u64> = HashSet::new();
    for i in 0..u64::from(h.refcount_table_clusters) {
        set.insert((h.refcount_table_offset >> geo.cluster_bits) + i);
    }
    for b in read_reftable(img, h)? {
        if b != 0 && b % geo.cluster_size() == 0 {
            set.insert(b >> geo.cluster_bits);
        }
    }
    Ok(set)
}

/// Reference counts per host cluster from every root (refcount structures excluded).
pub(crate) fn reference_counts(img: &Image, st: &State) -> Result<Vec<u64>> {
    Ok(scan(img, st, false)?.checked(img)?.counts)
}

/// Sets bit 63 on each active-tree link to exactly `references == 1`.
fn normalize_copied(img: &Image, st: &mut State, s: &Scan) -> Result<()> {
    let geo = img.geo;
    let l1 = st
        .roots
        .get(&DEFAULT_ROOT)
        .map(|r| r.l1.clone())
        .unwrap_or_default();
    for (i, &w) in l1.iter().enumerate() {
        let e = L1Entry(w);
        let Some(off) = e.l2_offset() else { continue };
        let table_excl = s.count(off >> geo.cluster_bits) == 1;
        if e.writable() != table_excl {
            if let Some(r) = st.roots.get_mut(&DEFAULT_ROOT) {
                r.l1[i] = L1Entry::new(off, table_excl).0;
                r.dirty.insert(i / 64);
            }
        }
        img.load_l2(st, off)?;
        let words: Vec<u64> = st.cache.get(off).map(<[u64]>::to_vec).unwrap_or_default();
        let step = if geo.extended { 2 } else { 1 };
        let mut changed: Vec<(usize, u64)> = Vec::new();
        for (j, &word) in words.iter().enumerate().step_by(step) {
            let entry = L2Entry { word, bitmap: 0 };
            let Some(host) = entry.host() else { continue };
            let want = table_excl && s.count(host >> geo.cluster_bits) == 1;
            if entry.writable() != want {
                let new = if want {
                    word | crate::format::tables::WRITABLE
                } else {
                    word & !crate::format::tables::WRITABLE
                };
                changed.push((j, new));
            }
        }
        if !changed.is_empty() {
            if let Some(t) = st.cache.get_mut(off) {
                for (j, new) in changed {
                    t[j] = new;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_every_width() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..10 {
                set_entry(&mut block, order, i, (i as u64 * 7919) & max);
            }
            for i in 0..10 {
                assert_eq!(
                    get_entry(&block, order, i),
                    (i as u64 * 7919) & max,
                    "order {order}"
                );
            }
        }
        // 16-bit entries are big-endian.
        let mut block = vec![0u8; 4];
        set_entry(&mut block, 4, 1, 0x0102);
        assert_eq!(block, [0, 0, 1, 2]);
    }
}
