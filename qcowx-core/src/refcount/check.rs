//! Check: the scan compared with the refcounts on disk and with invariant W, reported
//! with `qemu-img check`'s counters.

use crate::engine::{Image, State, DEFAULT_ROOT};
use crate::error::Result;
use crate::format::tables::{decode_words, L1Entry, L2Entry};
use crate::vdi::RootKind;

use super::scan::*;
use super::*;
use crate::format::refblock::get_entry;

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
pub(super) fn check_copied(img: &Image, st: &mut State, s: &mut Scan) -> Result<()> {
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
pub(super) fn check_head(
    img: &Image,
    s: &mut Scan,
    label: &str,
    l1: &[u64],
    qemu_rules: bool,
) -> Result<()> {
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
