//! Apply: the refcount changes recorded since the image was opened (or last
//! checkpointed) written into the refcount blocks, with I/O proportional to the blocks
//! that change and the trees of the roots created — never a walk of every root.
//!
//! Crash safety: the header's dirty bit is set the whole time, so a crash anywhere
//! in here leaves an image whose next writable open rebuilds every refcount from a
//! scan. The bit is cleared last, after every block is durable.

use std::collections::HashMap;

use crate::engine::{
    clusters_of, host_range, Image, IoGate, Released, State, TableReader, TreeDelta, DEFAULT_ROOT,
};
use crate::error::{Error, Result};
use crate::format::addr::HostOffset;
use crate::format::header::Incompatible;
use crate::format::refblock::{get_entry, set_entry};
use crate::format::tables::{encode_words, l2_entries, L1Entry, L2Entry, Link};

use super::rebuild::{give_up_table_room, rebuild_gated};

/// Changes held in memory before they are written out while trees are walked (a
/// root of a large image reaches millions of clusters).
const MAX_PENDING: usize = 1 << 20;

/// Why the record cannot be applied; the caller falls back to a full rebuild.
#[derive(Debug)]
enum Fallback {
    /// The refcount table would have to grow, or points somewhere it must not; or a
    /// tree holds something only a scan can judge.
    Rebuild(&'static str),
    /// A count would drop below zero: the on-disk refcounts were not exact.
    Underflow,
    /// An error to report as is.
    Fatal(Error),
}

impl Fallback {
    fn why(&self) -> &'static str {
        match self {
            Fallback::Rebuild(why) => why,
            Fallback::Underflow => "a refcount on disk was lower than the references",
            Fallback::Fatal(_) => "error",
        }
    }
}

impl From<Error> for Fallback {
    fn from(e: Error) -> Fallback {
        Fallback::Fatal(e)
    }
}

/// Writes exact refcounts: the recorded changes when the record is exact, else a
/// full rebuild. Then clears the dirty bit. The caller holds the state (with every
/// table flushed) and the structure lock, not the I/O gate (waited for here: data
/// I/O stops while the refcounts are written).
pub(crate) fn write_refcounts(img: &Image, st: &mut State) -> Result<()> {
    let gate = img.io_gate_write();
    write_refcounts_gated(img, st, &gate)
}

/// [`write_refcounts`] by a caller that holds the I/O gate (no data I/O in flight:
/// the file may shrink).
pub(crate) fn write_refcounts_gated(img: &Image, st: &mut State, gate: &IoGate<'_>) -> Result<()> {
    if !st.deltas.is_exact() {
        st.last_rebuild = Some("changes the record does not describe");
        return rebuild_gated(img, st, gate).map(|_| ());
    }
    // An image whose refcounts were below its references at open (a cluster mapped
    // twice, say) is written from a scan all session: a copy-on-write can leave such a
    // cluster with one link the record cannot see, and only a scan sets that link's
    // bit 63 as QEMU's COPIED rule requires of the active layer.
    if st.open_state == crate::engine::OpenState::Rebuilt {
        st.last_rebuild = Some("the image's refcounts were below its references at open");
        return rebuild_gated(img, st, gate).map(|_| ());
    }
    give_up_table_room(img, st);
    match apply(img, st, gate) {
        Ok(()) => {
            st.last_rebuild = None;
            Ok(())
        }
        Err(Fallback::Fatal(e)) => {
            // What was taken from the record is lost: only a scan can tell now.
            st.deltas.lose_exactness();
            Err(e)
        }
        Err(f) => {
            st.last_rebuild = Some(f.why());
            rebuild_gated(img, st, gate).map(|_| ())
        }
    }
}

/// Most recorded changes a flush writes out itself (see [`apply_at_flush`]): each
/// costs at most one page of a refcount block read and written.
const FLUSH_APPLY_MAX: usize = 1 << 14;

/// At a flush: writes the recorded changes into the refcount blocks when the record
/// is small and names no whole trees (no root created or deleted since the last
/// apply), so that the flush's own fdatasync makes them durable and the close or
/// checkpoint that follows has little left to do — as QEMU's flush writes its
/// refcount cache. The dirty bit stays set: the counts on disk are exact only once
/// the flush is durable, and a crash before the next close is still recovered by a
/// scan. A record this cannot apply stays for the close (or, on a count that does not
/// add up, leaves a full rebuild to it). The caller holds the state and the
/// structure lock, not the I/O gate.
pub(crate) fn apply_at_flush(img: &Image, st: &mut State) -> Result<()> {
    if !st.stale
        || img.refused_why().is_some()
        || !st.deltas.is_exact()
        || st.deltas.has_trees()
        || st.deltas.len() == 0
        || st.deltas.len() > FLUSH_APPLY_MAX
    {
        return Ok(());
    }
    let _gate = img.io_gate_write();
    match write_record(img, st) {
        Ok(blocks) => {
            // Every cluster up to here now has its exact count on disk.
            let cs = img.geo.cluster_size();
            st.deltas
                .set_base_clusters(blocks.file_len.max(st.alloc.end()).div_ceil(cs));
            Ok(())
        }
        Err(Fallback::Fatal(e)) => {
            st.deltas.lose_exactness();
            Err(e)
        }
        Err(_) => {
            // Part of the record may be on disk: only a scan can tell now.
            st.deltas.lose_exactness();
            Ok(())
        }
    }
}

/// Steps 2–4 of the apply, without the sync: the record taken from the state and
/// written into the refcount blocks (walking the trees of created roots first), the
/// released links made the default VDI's own, the table written if blocks were added.
fn write_record(img: &Image, st: &mut State) -> std::result::Result<Blocks, Fallback> {
    let (recorded, trees) = st.deltas.take();
    let mut changes: Vec<(u64, i64)> = recorded.into_iter().collect();
    let mut blocks = Blocks::open(img, st)?;
    walk_trees(img, st, &trees, &mut changes, &mut blocks)?;
    blocks.apply(img, st, changes)?;
    let released = st.deltas.take_released();
    set_copied(img, st, &released, &mut blocks)?;
    blocks.write_table(img, st)?;
    Ok(blocks)
}

fn apply(img: &Image, st: &mut State, gate: &IoGate<'_>) -> std::result::Result<(), Fallback> {
    let mut blocks = write_record(img, st)?;
    // The callers flushed (and synced) before: with nothing written here (the record
    // went out with a flush), the blocks are durable already.
    if blocks.wrote {
        img.sync()?;
    }
    let end = truncate_free_tail(img, st, &mut blocks, gate)?;
    st.deltas.set_base_clusters(end);
    st.header.incompatible.remove(Incompatible::DIRTY);
    img.write_clean_stamp(st)?;
    img.write_header_fields(st)?;
    img.sync()?;
    st.stale = false;
    st.inherited_stale = false;
    Ok(())
}

/// Adds to every cluster the trees of `trees` reach their sign, per path: an L2 table
/// linked k times (over all the trees) gets k, and so does every cluster it links.
/// Each distinct table is read once, however many of the new roots share it (a
/// session that took a thousand snapshots of one disk reads its tables once). A new
/// root's tables are shared from now on, so every writable L2 entry in them becomes
/// read-only in place (writable→read-only flips are safe at any time), which is also
/// what QEMU's COPIED flag says of them.
fn walk_trees(
    img: &Image,
    st: &mut State,
    trees: &[TreeDelta],
    changes: &mut Vec<(u64, i64)>,
    blocks: &mut Blocks,
) -> std::result::Result<(), Fallback> {
    let geo = img.geo;
    let cs = geo.cluster_size();
    let mut links: HashMap<HostOffset, i64> = HashMap::new();
    for t in trees {
        for &w in &t.l1 {
            match L1Entry::from_raw(w).link(&geo) {
                Link::Malformed => return Err(Fallback::Rebuild("malformed L1 entry")),
                Link::Table { table, .. } => *links.entry(table).or_insert(0) += t.sign,
                Link::None => {}
            }
        }
    }
    let mut tables: Vec<(HostOffset, i64)> = links.into_iter().filter(|&(_, k)| k != 0).collect();
    tables.sort_unstable();
    let mut reader = TableReader::new(img)?;
    // Pushed, not merged: a tree reaches millions of clusters, which `Blocks::apply`
    // sorts and merges far faster than a map takes them one by one.
    let add = |changes: &mut Vec<(u64, i64)>, off: HostOffset, len: u64, k: i64| {
        if len > 0 {
            changes.extend(clusters_of(geo.cluster_bits, off, len).map(|c| (c, k)));
        }
    };
    for (off, k) in tables {
        let Some(mut words) = reader.read(off)? else {
            return Err(Fallback::Rebuild("L2 table past the end of the file"));
        };
        add(changes, off, cs, k);
        let mut flips = Vec::new();
        for (j, entry) in l2_entries(&words, &geo) {
            let kind = entry
                .kind(&geo)
                .map_err(|_| Fallback::Rebuild("malformed L2 entry"))?;
            if let Some((h, len)) = host_range(&geo, kind) {
                add(changes, h, len, k);
            }
            if k > 0 && entry.writable() {
                flips.push((j, entry.read_only()));
            }
        }
        if !flips.is_empty() {
            for (j, entry) in flips {
                entry.put(&mut words, j, &geo);
            }
            img.storage
                .write_at(&encode_words(&words), off.get())
                .map_err(|e| img.io_err("write L2 table", off, e))?;
            blocks.wrote = true;
            // A clean cached copy would still say writable.
            st.cache.forget(off);
        }
        if changes.len() > MAX_PENDING {
            blocks.apply(img, st, std::mem::take(changes))?;
        }
    }
    Ok(())
}

/// Sets bit 63 on the default VDI's links to what other heads gave up this session
/// (see [`Released`]) where the default VDI is now the only holder (refcount 1): what
/// QEMU's COPIED rule requires of the active layer, and what lets the default VDI
/// write there in place again. A refcount of 1, exact after the apply, proves the
/// single path (invariant W). Changed tables and L1 sectors are flushed here.
fn set_copied(
    img: &Image,
    st: &mut State,
    released: &[Released],
    blocks: &mut Blocks,
) -> std::result::Result<(), Fallback> {
    if released.is_empty() {
        return Ok(());
    }
    let geo = img.geo;
    let mut block = vec![0u8; geo.cluster_size() as usize];
    let mut loaded = None;
    let size = st.header.size;
    for &r in released {
        let l1i = match r {
            Released::Table { l1i, .. } => l1i,
            Released::Data { guest, .. } if guest.get() < size => geo.split(guest).0,
            Released::Data { .. } => continue,
        };
        let Some(&w) = st
            .roots
            .get(&DEFAULT_ROOT)
            .and_then(|root| root.l1.get(l1i))
        else {
            continue;
        };
        let Link::Table { table, writable } = L1Entry::from_raw(w).link(&geo) else {
            continue;
        };
        if let Released::Data { guest, host } = r {
            let l2i = geo.split(guest).1;
            img.load_l2(st, table)?;
            let entry = st
                .cache
                .get(table)
                .map(|words| L2Entry::get(words, l2i, &geo));
            let Some(entry) = entry.filter(|x| x.host() == Some(host) && !x.writable()) else {
                continue;
            };
            if blocks.get(img, host.cluster(&geo).get(), &mut block, &mut loaded)? != 1 {
                continue;
            }
            if let Some(words) = st.cache.get_mut(table) {
                entry.with_writable(true).put(words, l2i, &geo);
            }
        } else if !matches!(r, Released::Table { table: t, .. } if t == table) {
            continue;
        }
        if !writable && blocks.get(img, table.cluster(&geo).get(), &mut block, &mut loaded)? == 1 {
            img.set_l1_entry(st, DEFAULT_ROOT, l1i, L1Entry::new(table, true))?;
        }
    }
    img.flush_metadata(st)?;
    Ok(())
}

/// The refcount table, and the blocks it points at read and written one at a time.
struct Blocks {
    order: u32,
    per_block: u64,
    max: u64,
    table: Vec<u64>,
    /// Table entries changed (new blocks).
    table_dirty: bool,
    /// Something was written (blocks, the table, a walked tree's L2 flips) that the
    /// commit must sync first.
    wrote: bool,
    file_len: u64,
}

impl Blocks {
    fn open(img: &Image, st: &State) -> std::result::Result<Blocks, Fallback> {
        let order = st.header.refcount_order;
        let cs = img.geo.cluster_size();
        let file_len = img.storage.len().map_err(|e| img.io_err("stat", 0u64, e))?;
        let table = img.read_reftable(&st.header)?;
        if table
            .iter()
            .any(|&b| b % cs != 0 || (b != 0 && b + cs > file_len))
        {
            return Err(Fallback::Rebuild("a refcount table entry is invalid"));
        }
        Ok(Blocks {
            order,
            per_block: (cs * 8) >> order,
            max: super::max_refcount(order),
            table,
            table_dirty: false,
            wrote: false,
            file_len,
        })
    }

    /// Applies `changes` (cluster, change; a cluster may come several times: its
    /// changes add up) block by block, in order. A block that does not exist yet
    /// is allocated (at the end of the file) and counted in a further round. Of a
    /// block that exists, only the pages holding a changed count are read and
    /// written (a few changes in a large block cost a page each, not the cluster).
    fn apply(
        &mut self,
        img: &Image,
        st: &mut State,
        mut changes: Vec<(u64, i64)>,
    ) -> std::result::Result<(), Fallback> {
        let cs = img.geo.cluster_size();
        let page = cs.min(4096);
        let per_page = (page * 8) >> self.order;
        changes.sort_unstable_by_key(|&(c, _)| c);
        let mut pending: Vec<(u64, i64)> = Vec::with_capacity(changes.len());
        for (c, d) in changes {
            match pending.last_mut() {
                Some(last) if last.0 == c => last.1 += d,
                _ => pending.push((c, d)),
            }
        }
        pending.retain(|&(_, d)| d != 0);
        let mut buf = vec![0u8; cs as usize];
        let base_clusters = st.deltas.base_clusters();
        while !pending.is_empty() {
            let mut new_blocks: Vec<u64> = Vec::new();
            let mut i = 0;
            while i < pending.len() {
                let bi = pending[i].0 / self.per_block;
                let Some(&at) = self.table.get(bi as usize) else {
                    return Err(Fallback::Rebuild("the refcount table must grow"));
                };
                let fresh = at == 0;
                let at = if fresh {
                    let new = st.alloc.contiguous(1).get();
                    self.table[bi as usize] = new;
                    self.table_dirty = true;
                    new_blocks.push(new);
                    new
                } else {
                    at
                };
                // One run of pages at a time: consecutive touched pages of this block
                // (a fresh block is one run, the whole cluster, written from zeros).
                while i < pending.len() && pending[i].0 / self.per_block == bi {
                    let first_page = (pending[i].0 % self.per_block) / per_page;
                    let mut j = i;
                    let mut last_page = first_page;
                    while j < pending.len() && pending[j].0 / self.per_block == bi {
                        let p = (pending[j].0 % self.per_block) / per_page;
                        if !fresh && p > last_page + 1 {
                            break;
                        }
                        last_page = p;
                        j += 1;
                    }
                    let (from, len) = if fresh {
                        (0, cs)
                    } else {
                        (first_page * page, (last_page - first_page + 1) * page)
                    };
                    let run = &mut buf[..len as usize];
                    if fresh {
                        run.fill(0);
                    } else {
                        img.storage
                            .read_at(run, at + from)
                            .map_err(|e| img.io_err("read refcount block", at + from, e))?;
                    }
                    let first_entry = from / page * per_page;
                    for &(c, d) in &pending[i..j] {
                        let idx = (c % self.per_block - first_entry) as usize;
                        let old = get_entry(run, self.order, idx);
                        if c >= base_clusters && old != 0 && !fresh {
                            // Past the end of the file as it was, yet counted: the
                            // counts on disk were not exact (a leak another writer left).
                            return Err(Fallback::Rebuild(
                                "a refcount past the end of the file was not 0",
                            ));
                        }
                        let v = old as i128 + i128::from(d);
                        if v < 0 {
                            return Err(Fallback::Underflow);
                        }
                        if v as u128 > u128::from(self.max) {
                            // The room check before every new root keeps the references
                            // within the width, so the count on disk was above them (a
                            // leak another writer left): counting afresh fits, and a
                            // count that truly does not is refused by the rebuild.
                            return Err(Fallback::Rebuild(
                                "a count on disk plus the changes would overflow the width",
                            ));
                        }
                        set_entry(run, self.order, idx, v as u64);
                    }
                    img.storage
                        .write_at(run, at + from)
                        .map_err(|e| img.io_err("write refcount block", at + from, e))?;
                    self.wrote = true;
                    i = j;
                }
                self.file_len = self.file_len.max(at + cs);
            }
            // Counted in the next round, in order like the first.
            pending = new_blocks.iter().map(|&b| (b / cs, 1)).collect();
            pending.sort_unstable();
        }
        Ok(())
    }

    /// Writes the table if blocks were added.
    fn write_table(&mut self, img: &Image, st: &State) -> Result<()> {
        if !self.table_dirty {
            return Ok(());
        }
        let at = st.header.refcount_table_offset;
        img.storage
            .write_at(&encode_words(&self.table), at)
            .map_err(|e| img.io_err("write refcount table", at, e))?;
        self.table_dirty = false;
        self.wrote = true;
        Ok(())
    }

    /// The refcount of cluster `c`, reading its block into `block` (cached by offset).
    fn get(&self, img: &Image, c: u64, block: &mut [u8], loaded: &mut Option<u64>) -> Result<u64> {
        let Some(&at) = self.table.get((c / self.per_block) as usize) else {
            return Ok(0);
        };
        if at == 0 {
            return Ok(0);
        }
        if *loaded != Some(at) {
            img.storage
                .read_at(block, at)
                .map_err(|e| img.io_err("read refcount block", at, e))?;
            *loaded = Some(at);
        }
        Ok(get_entry(block, self.order, (c % self.per_block) as usize))
    }
}

/// Cuts the clusters at the end of the file that nothing references any more (the
/// caller has made every refcount durable, and holds the I/O gate: no data I/O is in
/// flight while the file shrinks). Returns the clusters the file now has.
fn truncate_free_tail(
    img: &Image,
    st: &mut State,
    blocks: &mut Blocks,
    _gate: &IoGate<'_>,
) -> Result<u64> {
    let cs = img.geo.cluster_size();
    let end_clusters = blocks.file_len.max(st.alloc.end()).div_ceil(cs);
    let mut block = vec![0u8; cs as usize];
    let mut loaded = None;
    let mut end = end_clusters;
    while end > 1 && blocks.get(img, end - 1, &mut block, &mut loaded)? == 0 {
        end -= 1;
    }
    let file_len = img.storage.len().map_err(|e| img.io_err("stat", 0u64, e))?;
    if file_len > end * cs {
        img.storage
            .set_len(end * cs)
            .map_err(|e| img.io_err("truncate", end * cs, e))?;
    }
    if end < end_clusters {
        st.alloc.reset(end * cs);
    }
    // What the file now holds: every cluster with a refcount lies below it.
    Ok(file_len.min(end * cs).div_ceil(cs))
}
