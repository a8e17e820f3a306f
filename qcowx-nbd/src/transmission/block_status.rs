//! Extent encoding: the runs of a sparse read reply and the descriptors of a block
//! status reply, from the extents the image reports.

use qcowx_core::{Extent, ExtentStatus};

use crate::handshake::MetaContext;
use crate::wire::*;

/// The fewest bytes one block status request looks at when asked for more (the reply
/// may cover less than asked, as the protocol allows); see [`status_query_limit`].
pub const MAX_STATUS_QUERY: u64 = 1 << 30;

/// The most clusters one block status request looks at, where that covers more than
/// [`MAX_STATUS_QUERY`] bytes.
pub const MAX_STATUS_CLUSTERS: u64 = 1 << 16;

/// How many bytes one block status request looks at on an image with `cluster_size`
/// clusters. The work of a query is a table lookup per cluster (less where an L1 entry
/// has no L2 table), so the bound is in clusters: 65,536 of them, 4 GiB with 64 KiB
/// clusters (any request, whose length is 32 bits), but never less than 1 GiB (32 MiB
/// with 512-byte clusters would make a client walking a disk ask 32 times as often).
/// A client walking a large disk with one query at a time (`nbdinfo --map`, `qemu-img
/// convert` and `map` over NBD) waits a round trip per query: four times fewer with
/// 64 KiB clusters than a 1 GiB bound.
pub fn status_query_limit(cluster_size: u64) -> u64 {
    MAX_STATUS_QUERY.max(MAX_STATUS_CLUSTERS.saturating_mul(cluster_size))
}

/// The most descriptors in one block status chunk.
pub const MAX_DESCRIPTORS: usize = 1 << 16;

/// Covers `[offset, offset+len)` with runs `(length, value)`: each piece `(start,
/// length, value)` where it lies in the range (pieces in order; the part of a piece
/// before the end of the previous one is ignored), `gap` before, between and after
/// them. Neighbours of the same value are merged; no run is empty.
fn cover<T: Copy + PartialEq>(
    offset: u64,
    len: u64,
    pieces: impl IntoIterator<Item = (u64, u64, T)>,
    gap: T,
) -> Vec<(u64, T)> {
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    for (start, length, value) in pieces {
        let s = start.max(pos);
        let t = (start + length).min(end);
        if t <= s {
            continue;
        }
        push_merged(&mut out, s - pos, gap);
        push_merged(&mut out, t - s, value);
        pos = t;
    }
    push_merged(&mut out, end - pos, gap);
    out
}

/// Appends a run of `len` bytes of `value`, merged into the last run if that has the
/// same value; an empty run is dropped.
fn push_merged<T: PartialEq>(out: &mut Vec<(u64, T)>, len: u64, value: T) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.1 == value => last.0 += len,
        _ => out.push((len, value)),
    }
}

/// Splits `[offset, offset+len)` into data runs and hole runs (`(offset, length,
/// is_data)`) from the extents of the range. Anything the extents do not describe
/// is data.
pub(super) fn read_runs(extents: &[Extent], offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let pieces = extents
        .iter()
        .map(|e| (e.offset, e.length, e.status == ExtentStatus::Data));
    runs(offset, len, pieces)
}

/// The same from the holes of the range (`(offset, length)`, in order): the rest is
/// data.
pub(super) fn hole_runs(holes: &[(u64, u64)], offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    runs(offset, len, holes.iter().map(|&(o, l)| (o, l, false)))
}

fn runs(
    offset: u64,
    len: u64,
    pieces: impl IntoIterator<Item = (u64, u64, bool)>,
) -> Vec<(u64, u64, bool)> {
    let mut at = offset;
    cover(offset, len, pieces, true)
        .into_iter()
        .map(|(l, data)| {
            at += l;
            (at - l, l, data)
        })
        .collect()
}

/// The status value of an extent in an allocation context.
fn status_of(e: &Extent, ctx: &MetaContext) -> u32 {
    match ctx {
        MetaContext::BaseAllocation => match e.status {
            ExtentStatus::Data => 0,
            // Allocated, but the file holds a hole there: zero, not a hole (qemu-nbd).
            ExtentStatus::AllocatedZero => STATE_ZERO,
            ExtentStatus::Zero | ExtentStatus::Unallocated => STATE_HOLE | STATE_ZERO,
        },
        MetaContext::AllocationDepth => match e.status {
            ExtentStatus::Unallocated => 0,
            ExtentStatus::Data | ExtentStatus::Zero | ExtentStatus::AllocatedZero => e.depth + 1,
        },
        // Computed from the tree diff, never from extents.
        MetaContext::DirtyBitmap(_) | MetaContext::PersistentBitmap(_) => 1,
    }
}

/// `qemu:dirty-bitmap:` descriptors for `[offset, offset+len)`: status 1 (dirty)
/// inside `ranges`, 0 elsewhere.
pub(super) fn dirty_descriptors(
    ranges: &[qcowx_core::Range],
    offset: u64,
    len: u64,
) -> Vec<(u64, u32)> {
    cover(
        offset,
        len,
        ranges.iter().map(|r| (r.offset, r.length, 1)),
        0,
    )
}

/// Block status descriptors `(length, status)` for `[offset, offset+len)`, merged
/// where the status repeats. Gaps in the extents are reported as status 0 / depth 1
/// (the safe answer).
pub(super) fn descriptors(
    extents: &[Extent],
    offset: u64,
    len: u64,
    ctx: &MetaContext,
) -> Vec<(u64, u32)> {
    let gap = match ctx {
        MetaContext::BaseAllocation => 0,
        MetaContext::AllocationDepth
        | MetaContext::DirtyBitmap(_)
        | MetaContext::PersistentBitmap(_) => 1,
    };
    let pieces = extents
        .iter()
        .map(|e| (e.offset, e.length, status_of(e, ctx)));
    cover(offset, len, pieces, gap)
}

/// Merges descriptors so every boundary lies on a multiple of `min` (or at the end of
/// the export), as the protocol requires when a minimum block size is advertised.
/// Merged hole/zero flags keep only what both sides have, merged depths the deepest,
/// merged dirty flags are dirty if either side is.
pub(super) fn align_descriptors(
    descs: Vec<(u64, u32)>,
    offset: u64,
    min: u64,
    size: u64,
    ctx: &MetaContext,
) -> Vec<(u64, u32)> {
    let combine = |a: u32, b: u32| match ctx {
        MetaContext::BaseAllocation => a & b,
        MetaContext::AllocationDepth => a.max(b),
        MetaContext::DirtyBitmap(_) | MetaContext::PersistentBitmap(_) => a | b,
    };
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut pos = offset;
    let mut pending: Option<(u64, u32)> = None;
    for (l, st) in descs {
        let cur = match pending.take() {
            Some((pl, pst)) => (pl + l, combine(pst, st)),
            None => (l, st),
        };
        let end = pos + cur.0;
        if end.is_multiple_of(min) || end == size {
            push_merged(&mut out, cur.0, cur.1);
            pos = end;
        } else {
            pending = Some(cur);
        }
    }
    if let Some(p) = pending {
        // The tail of a reduced-length query: drop the unaligned remainder unless it
        // is all there is.
        let keep = p.0 - (pos + p.0) % min;
        if keep > 0 {
            out.push((keep, p.1));
        } else if out.is_empty() {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use qcowx_core::ExtentStatus::{Data, Unallocated, Zero};

    /// Extents of `size` bytes each, one after the other from offset 0, with these
    /// statuses and depths.
    fn contiguous(size: u64, kinds: &[(ExtentStatus, u32)]) -> Vec<Extent> {
        (0u64..)
            .zip(kinds)
            .map(|(i, &(status, depth))| Extent {
                offset: i * size,
                length: size,
                status,
                depth,
                host_offset: None,
            })
            .collect()
    }

    #[test]
    fn read_runs_split_data_and_holes() {
        let e = contiguous(65536, &[(Data, 0), (Unallocated, 0), (Zero, 0), (Data, 0)]);
        let r = read_runs(&e, 1000, 200_000);
        assert_eq!(
            r,
            vec![
                (1000, 64536, true),
                (65536, 131072, false),
                (196608, 1000 + 200_000 - 196608, true)
            ]
        );
        // Nothing described: one data run.
        assert_eq!(read_runs(&[], 5, 10), vec![(5, 10, true)]);
    }

    #[test]
    fn hole_runs_fill_the_rest_with_data() {
        let r = hole_runs(&[(0, 100), (300, 50)], 50, 400);
        assert_eq!(
            r,
            vec![
                (50, 50, false),
                (100, 200, true),
                (300, 50, false),
                (350, 100, true)
            ]
        );
        assert_eq!(hole_runs(&[], 5, 10), vec![(5, 10, true)]);
        assert_eq!(hole_runs(&[(0, 4096)], 0, 4096), vec![(0, 4096, false)]);
    }

    #[test]
    fn descriptors_merge_and_map_contexts() {
        let e = contiguous(4096, &[(Data, 0), (Data, 1), (Zero, 0), (Unallocated, 1)]);
        assert_eq!(
            descriptors(&e, 0, 16384, &MetaContext::BaseAllocation),
            vec![(8192, 0), (8192, STATE_HOLE | STATE_ZERO)]
        );
        assert_eq!(
            descriptors(&e, 0, 16384, &MetaContext::AllocationDepth),
            vec![(4096, 1), (4096, 2), (4096, 1), (4096, 0)]
        );
    }

    #[test]
    fn descriptors_align_to_the_minimum_block_size() {
        let d = vec![(512, 0), (3584, 3), (4096, 3)];
        assert_eq!(
            align_descriptors(d, 0, 4096, 1 << 20, &MetaContext::BaseAllocation),
            vec![(4096, 0), (4096, 3)]
        );
        let d = vec![(4096, 3), (100, 0)];
        assert_eq!(
            align_descriptors(d, 0, 4096, 4196, &MetaContext::BaseAllocation),
            vec![(4096, 3), (100, 0)]
        );
    }

    #[test]
    fn dirty_descriptors_mark_changed_ranges() {
        let r = [
            qcowx_core::Range {
                offset: 65536,
                length: 65536,
            },
            qcowx_core::Range {
                offset: 262144,
                length: 131072,
            },
        ];
        assert_eq!(
            dirty_descriptors(&r, 0, 524288),
            vec![
                (65536, 0),
                (65536, 1),
                (131072, 0),
                (131072, 1),
                (131072, 0)
            ]
        );
        assert_eq!(dirty_descriptors(&r, 300000, 1000), vec![(1000, 1)]);
        assert_eq!(dirty_descriptors(&[], 5, 10), vec![(10, 0)]);
    }
}
