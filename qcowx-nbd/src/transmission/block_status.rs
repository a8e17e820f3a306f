//! Extent encoding: the runs of a sparse read reply and the descriptors of a block
//! status reply, from the extents the image reports.

use qcowx_core::{Extent, ExtentStatus};

use crate::handshake::MetaContext;
use crate::wire::*;

/// The most bytes one block status request looks at (the reply may cover less than
/// asked, as the protocol allows).
pub const MAX_STATUS_QUERY: u64 = 1 << 30;

/// The most descriptors in one block status chunk.
pub const MAX_DESCRIPTORS: usize = 1 << 16;

/// Splits `[offset, offset+len)` into data runs and hole runs (`(offset, length,
/// is_data)`) from the extents of the range. Anything the extents do not describe
/// is data.
pub(super) fn read_runs(extents: &[Extent], offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = offset + len;
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |start: u64, stop: u64, data: bool| {
        if stop <= start {
            return;
        }
        match runs.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == start => last.1 += stop - start,
            _ => runs.push((start, stop - start, data)),
        }
    };
    let mut pos = offset;
    for e in extents {
        let s = e.offset.max(pos);
        let t = (e.offset + e.length).min(end);
        if t <= s {
            continue;
        }
        push(pos, s, true);
        let data = e.status == ExtentStatus::Data;
        push(s, t, data);
        pos = t;
    }
    push(pos, end, true);
    runs
}

/// The status value of an extent in an allocation context.
fn status_of(e: &Extent, ctx: &MetaContext) -> u32 {
    match ctx {
        MetaContext::BaseAllocation => match e.status {
            ExtentStatus::Data => 0,
            ExtentStatus::Zero | ExtentStatus::Unallocated => STATE_HOLE | STATE_ZERO,
        },
        MetaContext::AllocationDepth => match e.status {
            ExtentStatus::Unallocated => 0,
            ExtentStatus::Data | ExtentStatus::Zero => e.depth + 1,
        },
        // Computed from the tree diff, never from extents.
        MetaContext::DirtyBitmap(_) => 1,
    }
}

/// `qemu:dirty-bitmap:` descriptors for `[offset, offset+len)`: status 1 (dirty)
/// inside `ranges`, 0 elsewhere.
pub(super) fn dirty_descriptors(
    ranges: &[qcowx_core::Range],
    offset: u64,
    len: u64,
) -> Vec<(u64, u32)> {
    let end = offset + len;
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut push = |l: u64, st: u32| {
        if l == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.1 == st => last.0 += l,
            _ => out.push((l, st)),
        }
    };
    let mut pos = offset;
    for r in ranges {
        let s = r.offset.max(pos);
        let t = (r.offset + r.length).min(end);
        if t <= s {
            continue;
        }
        push(s - pos, 0);
        push(t - s, 1);
        pos = t;
    }
    push(end - pos, 0);
    out
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
    let end = offset + len;
    let gap = match ctx {
        MetaContext::BaseAllocation => 0,
        MetaContext::AllocationDepth | MetaContext::DirtyBitmap(_) => 1,
    };
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut push = |l: u64, st: u32| {
        if l == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.1 == st => last.0 += l,
            _ => out.push((l, st)),
        }
    };
    let mut pos = offset;
    for e in extents {
        let s = e.offset.max(pos);
        let t = (e.offset + e.length).min(end);
        if t <= s {
            continue;
        }
        push(s - pos, gap);
        push(t - s, status_of(e, ctx));
        pos = t;
    }
    push(end - pos, gap);
    out
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
        MetaContext::DirtyBitmap(_) => a | b,
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
            match out.last_mut() {
                Some(last) if last.1 == cur.1 => last.0 += cur.0,
                _ => out.push(cur),
            }
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

    fn ext(offset: u64, length: u64, status: ExtentStatus, depth: u32) -> Extent {
        Extent {
            offset,
            length,
            status,
            depth,
            host_offset: None,
        }
    }

    #[test]
    fn read_runs_split_data_and_holes() {
        let e = [
            ext(0, 65536, ExtentStatus::Data, 0),
            ext(65536, 65536, ExtentStatus::Unallocated, 0),
            ext(131072, 65536, ExtentStatus::Zero, 0),
            ext(196608, 65536, ExtentStatus::Data, 0),
        ];
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
    fn descriptors_merge_and_map_contexts() {
        let e = [
            ext(0, 4096, ExtentStatus::Data, 0),
            ext(4096, 4096, ExtentStatus::Data, 1),
            ext(8192, 4096, ExtentStatus::Zero, 0),
            ext(12288, 4096, ExtentStatus::Unallocated, 1),
        ];
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
