//! Rebuild: exact refcounts written from a scan (at clean close and repair), and the
//! COPIED bits made to agree with them.

use std::collections::HashSet;

use crate::engine::{Image, IoGate, State, TableReader, DEFAULT_ROOT};
use crate::error::Result;
use crate::format::header::Incompatible;
use crate::format::tables::{encode_words, l2_entries, l2_tables, L1Entry, L2Entry};

use super::counts::Counts;
use super::scan::*;
use crate::format::refblock::set_entry;

/// Writes exact refcounts from a reachability scan, normalizes bit 63 on the active
/// tree, clears the dirty bit, and truncates free clusters at the end of the file.
///
/// Order: the caller has flushed; links are normalized and flushed; new refcount
/// blocks and table are written to clusters that neither hold live data nor belong to
/// the old refcount structures, and synced; then one header write switches to them and
/// clears the dirty bit (the commit point); then the file is truncated.
pub(crate) fn rebuild(img: &Image, st: &mut State) -> Result<Counts> {
    let gate = img.io_gate_write();
    rebuild_gated(img, st, &gate)
}

/// [`rebuild`] by a caller that holds the I/O gate.
pub(crate) fn rebuild_gated(img: &Image, st: &mut State, gate: &IoGate<'_>) -> Result<Counts> {
    give_up_table_room(img, st);
    let s = scan(img, st, false)?;
    rebuild_with(img, st, s, gate)
}

/// Gives up the spare room reserved after the snapshot table this session: a scan
/// counts only the clusters the entries cover, so that room would look free. Room 0
/// stays 0 (a table that may not be written in place, see `Registry::capacity`).
pub(crate) fn give_up_table_room(img: &Image, st: &mut State) {
    let capacity = if st.header.nb_snapshots > 0 {
        st.registry
            .used_bytes()
            .next_multiple_of(img.geo.cluster_size())
    } else {
        0
    };
    st.registry
        .set_capacity(capacity.min(st.registry.capacity()));
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
) -> Result<Counts> {
    let geo = img.geo;
    let cs = geo.cluster_size();
    let s = s.checked(img, "cannot rebuild refcounts: ")?;
    normalize_copied(img, st, &s)?;
    img.flush_metadata(st)?;

    // Old refcount structures stay untouched until the header stops pointing at them.
    let old = refcount_clusters(img, &st.header)?;
    let order = st.header.refcount_order;
    let per_block = (cs * 8) >> order;
    let mut counts = s.counts;
    let used_end = counts.used_end().max(1);
    let is_free = |c: u64, counts: &Counts, taken: &HashSet<u64>| {
        c > 0 && counts.get(c) == 0 && !old.contains(&c) && !taken.contains(&c)
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
    counts.resize(new_end);
    for c in (table_at..table_at + table_clusters).chain(blocks.iter().copied()) {
        counts.set(c, 1);
    }
    if table_clusters * cs > crate::format::header::MAX_REFTABLE_BYTES {
        return Err(img.corrupt(
            "refcount table",
            0u64,
            format!(
                "the file needs a refcount table of {} bytes, more than QEMU opens ({}); \
                 use larger clusters",
                table_clusters * cs,
                crate::format::header::MAX_REFTABLE_BYTES
            ),
        ));
    }
    super::refuse_overflow(img, &counts, order)?;
    let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
    let mut block = vec![0u8; cs as usize];
    for (bi, &bc) in blocks.iter().enumerate() {
        block.fill(0);
        let first = bi as u64 * per_block;
        for i in 0..per_block {
            let c = first + i;
            if c >= counts.len() {
                break;
            }
            set_entry(&mut block, order, i as usize, counts.get(c));
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
    img.write_clean_stamp(st)?;
    img.write_header_fields(st)?;
    img.sync()?;
    st.stale = false;
    st.inherited_stale = false;
    st.deltas.reset_exact(counts.max());
    st.deltas.set_base_clusters(new_end);

    let file_len = img.storage.len().map_err(|e| img.io_err("stat", 0u64, e))?;
    if file_len > new_end * cs {
        img.storage
            .set_len(new_end * cs)
            .map_err(|e| img.io_err("truncate", new_end * cs, e))?;
    }
    st.alloc.reset(new_end * cs);
    st.cache.clear_clean();
    Ok(counts)
}

/// Sets bit 63 on each active-tree link to exactly `references == 1`.
pub(super) fn normalize_copied(img: &Image, st: &mut State, s: &Scan) -> Result<()> {
    let geo = img.geo;
    let l1 = st
        .roots
        .get(&DEFAULT_ROOT)
        .map(|r| r.l1.clone())
        .unwrap_or_default();
    let mut reader = TableReader::new(img)?;
    for (i, e, off) in l2_tables(&l1, &geo) {
        let table_excl = s.count(off.cluster(&geo).get()) == 1;
        if e.writable() != table_excl {
            if let Some(r) = st.roots.get_mut(&DEFAULT_ROOT) {
                r.l1[i] = L1Entry::new(off, table_excl).raw();
                r.dirty.insert(i / 64);
            }
        }
        // A table that is not cached is read past the cache: a rebuild walks every
        // table once, and only the ones it changes need a place in it.
        let words: Vec<u64> = match st.cache.get(off) {
            Some(words) => words.to_vec(),
            None => reader.read(off)?.unwrap_or_default(),
        };
        let mut changed: Vec<(usize, L2Entry)> = Vec::new();
        for (j, entry) in l2_entries(&words, &geo) {
            let Some(host) = entry.host() else { continue };
            let want = table_excl && s.count(host.cluster(&geo).get()) == 1;
            if entry.writable() != want {
                changed.push((j, entry.with_writable(want)));
            }
        }
        if !changed.is_empty() {
            img.load_l2(st, off)?;
            if let Some(t) = st.cache.get_mut(off) {
                for (j, new) in changed {
                    new.put(t, j, &geo);
                }
            }
        }
    }
    Ok(())
}
