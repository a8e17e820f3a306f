//! Room in the refcounts: operations that add a root are refused before they write
//! anything when a count would not fit the image's refcount width, and the width can
//! be changed (as `qemu-img amend -o refcount_bits=` changes it).

use std::collections::HashMap;

use crate::engine::{host_range, walk_tree, Image, IoGate, State, Step};
use crate::error::{Error, Result};

use super::apply::write_refcounts_gated;
use super::rebuild::rebuild;
use crate::engine::DiskRefcounts;
use crate::format::refblock::get_entry;

/// The largest count a refcount of `order` holds.
pub(crate) fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    }
}

/// Refuses counts (`counts.get(c)`: the references to cluster `c`) that a refcount
/// of `order` cannot hold, naming the first cluster that overflows.
pub(crate) fn refuse_overflow(img: &Image, counts: &super::Counts, order: u32) -> Result<()> {
    let max = max_refcount(order);
    match counts.iter().enumerate().find(|&(_, n)| n > max) {
        Some((c, count)) => Err(Error::RefcountOverflow {
            file: img.name.clone(),
            offset: (c as u64) << img.geo.cluster_bits,
            count,
            bits: 1 << order,
        }),
        None => Ok(()),
    }
}

/// Refuses, before anything is written, a new root that links what `l1` links when a
/// cluster it reaches would then have more references than the refcounts hold.
///
/// Cheap in the common case. A root reaches a cluster at most once, except a host
/// cluster of compressed data (see [`crate::engine::RefDeltas::per_root_multiplicity`]),
/// so when every root doing that still fits the width, nothing is read. Otherwise an
/// upper bound on the counts is kept for the session — the largest count on disk,
/// read once, plus what each root created since can add — and only when even that
/// does not fit are the session's changes written out and the tree's own clusters
/// looked up.
pub(crate) fn check_room_for_root(
    img: &Image,
    st: &mut State,
    gate: &IoGate<'_>,
    l1: &[u64],
) -> Result<()> {
    let order = st.header.refcount_order;
    let max = max_refcount(order);
    let geo = img.geo;
    let cs = geo.cluster_size();
    let m = st.deltas.per_root_multiplicity();
    let roots_after = st.registry.len() as u64 + 2;
    if roots_after.saturating_mul(m) <= max {
        return Ok(());
    }
    let bound = match st.deltas.max_bound() {
        Some(b) => b,
        None => {
            refresh_max_bound(img, st, gate)?;
            st.deltas.max_bound().unwrap_or(u64::MAX)
        }
    };
    if bound.saturating_add(m) <= max {
        return Ok(());
    }
    // The bound may be stale by the roots created since it was read: read it again.
    refresh_max_bound(img, st, gate)?;
    if st.deltas.max_bound().unwrap_or(u64::MAX).saturating_add(m) <= max {
        return Ok(());
    }
    let file_len = img.storage.len().map_err(|e| img.io_err("stat", 0u64, e))?;
    let mut disk = DiskRefcounts::new(img, st, file_len.div_ceil(cs))?;
    let overflow = |offset: u64, count: u64| Error::RefcountOverflow {
        file: img.name.clone(),
        offset,
        count,
        bits: 1 << order,
    };
    // Clusters this tree reaches more than once (compressed data shares clusters).
    let mut seen: HashMap<u64, u64> = HashMap::new();
    walk_tree(img, l1, |step| {
        match step {
            Step::Link { table, .. } => {
                let now = disk.get(img, table.cluster(&geo).get())?;
                if now >= max {
                    return Err(overflow(table.get(), now.saturating_add(1)));
                }
            }
            Step::Entry { entry, .. } => {
                let Some((h, len)) = entry.kind(&geo).ok().and_then(|k| host_range(&geo, k)) else {
                    return Ok(true);
                };
                for hc in h.cluster(&geo).get()..=(h + (len - 1)).cluster(&geo).get() {
                    let times = seen.entry(hc).or_insert(0);
                    *times += 1;
                    let now = disk.get(img, hc)?;
                    if now.saturating_add(*times) > max {
                        return Err(overflow(hc * cs, now.saturating_add(*times)));
                    }
                }
            }
        }
        Ok(true)
    })
}

/// Writes the session's changes out (if any) and reads the largest refcount on disk
/// into the record's bound. O(refcount blocks).
fn refresh_max_bound(img: &Image, st: &mut State, gate: &IoGate<'_>) -> Result<()> {
    img.flush_metadata(st)?;
    if st.stale {
        write_refcounts_gated(img, st, gate)?;
    }
    let order = st.header.refcount_order;
    let cs = img.geo.cluster_size();
    let per_block = (cs * 8) >> order;
    let file_len = img.storage.len().map_err(|e| img.io_err("stat", 0u64, e))?;
    let mut block = vec![0u8; cs as usize];
    let mut largest = 0;
    for at in img.read_reftable(&st.header)? {
        if at == 0 || at % cs != 0 || at + cs > file_len {
            continue;
        }
        img.storage
            .read_at(&mut block, at)
            .map_err(|e| img.io_err("read refcount block", at, e))?;
        for i in 0..per_block as usize {
            largest = largest.max(get_entry(&block, order, i));
        }
    }
    st.deltas.set_max_bound(largest);
    Ok(())
}

impl Image {
    /// Changes the width of the refcounts to `bits` (1, 2, 4, 8, 16, 32 or 64), as
    /// `qemu-img amend -o refcount_bits=` does: every refcount is rewritten, from a
    /// scan, into new refcount structures, and one header write switches to them.
    /// Refused, with nothing changed, when a count does not fit the new width.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Error, Image};
    ///
    /// # fn main() -> Result<(), Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[1; 4096], 0)?;
    /// img.set_refcount_bits(16)?;
    /// assert_eq!(img.info()?.refcount_bits, 16);
    /// assert_eq!(img.check()?.exit_code(), 0);
    /// assert!(matches!(img.set_refcount_bits(3), Err(Error::InvalidArgument(_))));
    /// # Ok(()) }
    /// ```
    pub fn set_refcount_bits(&self, bits: u32) -> Result<()> {
        if !bits.is_power_of_two() || bits > 64 {
            return Err(Error::InvalidArgument(format!(
                "refcount width {bits} is not one of 1, 2, 4, 8, 16, 32, 64"
            )));
        }
        self.check_writable()?;
        let _structure = self.lock_structure();
        let mut st = self.lock_state()?;
        let order = bits.trailing_zeros();
        if st.header.refcount_order == order {
            return Ok(());
        }
        self.flush_locked(&mut st)?;
        // What the rebuild would refuse is refused before anything is written: damage
        // it cannot resolve, or a count the new width cannot hold.
        let probe = super::scan::scan(self, &st, false)?.checked(self, "cannot amend: ")?;
        refuse_overflow(self, &probe.counts, order)?;
        drop(probe);
        self.mark_stale(&mut st)?;
        let old = st.header.refcount_order;
        st.header.refcount_order = order;
        let r = rebuild(self, &mut st);
        if r.is_err() {
            // The header on disk still names the old structures and width.
            st.header.refcount_order = old;
            st.deltas.lose_exactness();
        }
        r.map(|_| ())
    }
}
