//! Check: the scan compared with the refcounts on disk and with invariant W, reported
//! with `qemu-img check`'s counters.

use crate::engine::{walk_tree, DiskRefcounts, Image, State, Step, DEFAULT_ROOT};
use crate::error::Result;
use crate::format::addr::HostOffset;
use crate::format::refblock::get_entry;
use crate::format::roots::RootKind;
use crate::format::tables::decode_words;

use super::scan::*;
use super::*;

/// Whether no cluster's refcount on disk is below its references `counts` (from a
/// scan that counted the refcount structures). Leaks do not matter here.
pub(crate) fn refcounts_cover(img: &Image, st: &State, counts: &super::Counts) -> Result<bool> {
    let mut disk = DiskRefcounts::new(img, st, counts.len())?;
    for (c, refs) in counts.iter().enumerate() {
        if refs > 0 && disk.get(img, c as u64)? < refs {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Compares the on-disk refcounts with a reachability scan, as `qemu-img check`
/// does — on a dirty image too, where the differences are stale counts that a repair
/// rebuilds (counted in [`CheckReport::stale_corruptions`] as well).
pub(crate) fn check(img: &Image, st: &mut State) -> Result<CheckReport> {
    let mut s = scan(img, st, true)?;
    for msg in Image::registry_problems(st) {
        s.report.problem(true, msg);
    }
    let mut at = st.header.snapshots_offset;
    for (i, e) in st.registry.entries().iter().enumerate() {
        if e.is_incomplete(st.header.version) {
            s.report.problem(
                true,
                format!(
                    "snapshot table entry {i} ('{}') at offset {at:#x} is incomplete: a \
                     version 3 entry needs {} bytes of extra data, it has {}",
                    e.name,
                    crate::format::snapshot::V3_MIN_EXTRA,
                    e.extra.len()
                ),
            );
        }
        at += e.encoded_len() as u64;
    }
    let cs = img.geo.cluster_size();
    let order = st.header.refcount_order;
    let per_block = (cs * 8) >> order;
    let file_clusters = s.file_clusters;
    let mut disk = DiskRefcounts::new(img, st, file_clusters)?;
    let table = disk.table.clone();
    let mut block = vec![0u8; cs as usize];
    let mut end = 0;
    let mut visit = |s: &mut Scan, c: u64, refcount: u64| {
        let refs = s.count(c);
        if refs > 0 || refcount > 0 {
            end = c + 1;
        }
        if refcount < refs {
            s.report.stale_corruptions += 1;
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
        let refcount = disk.get(img, c)?;
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
    check_copied(img, st, &mut s, &mut disk)?;
    Ok(s.report)
}

/// Checks bit 63 on the active tree: a writable link to a shared cluster breaks
/// invariant W (judged by the references); and, as `qemu-img check` does, bit 63 must
/// say exactly "refcount on disk is 1" (OFLAG_COPIED errors, stale counts included).
pub(super) fn check_copied(
    img: &Image,
    st: &mut State,
    s: &mut Scan,
    disk: &mut DiskRefcounts,
) -> Result<()> {
    let default_l1 = st
        .roots
        .get(&DEFAULT_ROOT)
        .map(|r| r.l1.clone())
        .unwrap_or_default();
    check_head(img, s, "default VDI", &default_l1, Some(disk))?;
    // Named VDI heads: invariant W only (QEMU does not look at them).
    for i in 0..st.registry.len() {
        if st.registry.record(i).kind != RootKind::Vdi || !st.registry.is_live(i) {
            continue;
        }
        let e = st.registry.entry(i);
        let len = u64::from(e.l1_size) * 8;
        if e.l1_problem(img.geo.cluster_size()).is_some()
            || e.l1_table_offset.saturating_add(len) > s.file_clusters << s.cluster_bits
        {
            continue; // reported by the scan
        }
        let mut raw = vec![0u8; len as usize];
        img.storage
            .read_at(&mut raw, e.l1_table_offset)
            .map_err(|err| img.io_err("read L1 table", e.l1_table_offset, err))?;
        let label = format!("VDI head '{}'", e.name);
        check_head(img, s, &label, &decode_words(&raw), None)?;
    }
    Ok(())
}

/// Checks bit 63 along one VDI head. Invariant W: a cluster reached through writable
/// links only has exactly one reference. With `qemu_rules` (the default VDI: the
/// refcounts on disk), bit 63 must also be set exactly where the refcount on disk is
/// 1, as `qemu-img check` requires (OFLAG_COPIED).
pub(super) fn check_head(
    img: &Image,
    s: &mut Scan,
    label: &str,
    l1: &[u64],
    mut qemu_rules: Option<&mut DiskRefcounts>,
) -> Result<()> {
    // Whether the table being visited was reached through a writable link.
    let mut table_writable = false;
    walk_tree(img, l1, |step| {
        match step {
            Step::Link {
                index: i,
                entry: e,
                table: off,
            } => {
                let w = || format!("{label}: L1 entry {i} is writable but its L2 table");
                let copied = |refcount| {
                    format!(
                        "OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} refcount={refcount}",
                        e.raw()
                    )
                };
                let rules = qemu_rules.as_deref_mut();
                check_link(img, s, rules, off, e.writable(), e.writable(), w, copied)?;
                table_writable = e.writable();
                // A read-only table's entries' bits do not matter, but for QEMU's rules.
                Ok(table_writable || qemu_rules.is_some())
            }
            Step::Entry {
                table: off,
                index: j,
                entry,
            } => {
                let Some(host) = entry.host() else {
                    return Ok(true);
                };
                let w = || {
                    format!(
                        "{label}: L2 entry {j} of table {off:#x} is writable but cluster {host:#x}"
                    )
                };
                let copied = |refcount| {
                    format!(
                        "OFLAG_COPIED data cluster: l2_entry={:x} refcount={refcount}",
                        entry.word()
                    )
                };
                let path = table_writable && entry.writable();
                let rules = qemu_rules.as_deref_mut();
                check_link(img, s, rules, host, entry.writable(), path, w, copied)?;
                Ok(true)
            }
        }
    })
}

/// The bit-63 rules for one link to `target` whose own bit says `writable`:
/// invariant W (a path writable all the way, `path_writable`, reaches a cluster with
/// one reference) and, with the refcounts on disk (`qemu_rules`), QEMU's COPIED rule.
/// `w_message` names the link (the count is added), `copied_message` the link with the
/// refcount it was judged on.
#[allow(clippy::too_many_arguments)]
fn check_link(
    img: &Image,
    s: &mut Scan,
    qemu_rules: Option<&mut DiskRefcounts>,
    target: HostOffset,
    writable: bool,
    path_writable: bool,
    w_message: impl FnOnce() -> String,
    copied_message: impl FnOnce(u64) -> String,
) -> Result<()> {
    let cluster = target.cluster(&img.geo).get();
    let refs = s.count(cluster);
    if path_writable && refs > 1 {
        s.report
            .problem(true, format!("{} has {refs} references", w_message()));
    }
    if let Some(disk) = qemu_rules {
        let refcount = disk.get(img, cluster)?;
        copied_rule(s, writable, refcount, refs, || copied_message(refcount));
    }
    Ok(())
}

/// QEMU's COPIED rule for one link: bit 63 set exactly where the on-disk refcount is
/// one. A violation judged on a refcount that differs from the references (`refs`)
/// is a stale count, which a rebuild fixes; so is a clear bit 63 where the refcount is
/// one (always safe — a crash between a snapshot's read-only flips and its commit
/// leaves it — and a rebuild sets the bit).
fn copied_rule(
    s: &mut Scan,
    writable: bool,
    refcount: u64,
    refs: u64,
    msg: impl FnOnce() -> String,
) {
    if writable != (refcount == 1) {
        if refcount != refs {
            s.report.stale_copied += 1;
        }
        if refcount != refs || !writable {
            s.report.stale_corruptions += 1;
        }
        s.report.problem(true, msg());
    }
}
