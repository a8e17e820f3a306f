//! Refcount changes recorded as they happen, in memory.
//!
//! The hot path does no refcount I/O: while an image is open for writing its on-disk
//! refcounts are stale (the header's dirty bit says so) and every change to the
//! references is recorded here instead. The refcount layer applies the record at a
//! clean close or a checkpoint (`crate::refcount::apply`), with I/O proportional to
//! the refcount blocks that change, and then clears the dirty bit.
//!
//! References are counted per path, as QEMU counts them: a cluster reached from k
//! roots has refcount k. So:
//! - an L2 entry that changes in a table only one root reaches (every table the
//!   engine changes in place: invariant W) moves one reference from its old host
//!   cluster(s) to its new one(s);
//! - an L1 entry that moves from a shared table to a copy of it moves one reference
//!   from the table to the copy (the copy links the same clusters);
//! - a new root adds one reference to every cluster its tree reaches. Its tables are
//!   immutable (read-only links), so the walk is deferred to the apply ([`TreeDelta`]);
//! - metadata that moves (an L1 table, the snapshot table) moves its own references.
//!
//! Anything that changes references in another way (a gc that raced with writes, a
//! repair, features qcowx drops) calls [`RefDeltas::lose_exactness`]: the apply then
//! rebuilds every refcount from a full scan, as it always did before deltas existed.

use crate::format::addr::{GuestOffset, HostOffset};
use std::collections::HashMap;

use crate::format::tables::{ClusterKind, Geometry};

/// A whole tree gaining (`sign` 1) or losing (-1) one reference per path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TreeDelta {
    /// The root's L1 entries as it was created (a new head's own table changes
    /// with its writes, which are recorded as they happen; the tables these entries
    /// link read-only never change). The L1 table itself is counted separately.
    pub(crate) l1: Vec<u64>,
    /// +1 or -1.
    pub(crate) sign: i64,
}

/// The refcount changes since the on-disk refcounts were last exact.
#[derive(Debug)]
pub(crate) struct RefDeltas {
    exact: bool,
    cluster_bits: u32,
    clusters: HashMap<u64, i64>,
    trees: Vec<TreeDelta>,
    /// An upper bound on every cluster's refcount once the record is applied, when
    /// known (see [`RefDeltas::max_bound`]).
    max_bound: Option<u64>,
    /// Links another head than the default VDI gave up (see [`Released`]).
    released: Vec<Released>,
    /// Clusters the file had when the on-disk refcounts were last known exact: a
    /// refcount past them must be 0 (nothing was there), else the counts on disk
    /// were not what the record assumes and the apply falls back to a rebuild.
    base_clusters: u64,
}

/// A link a VDI head other than the default one gave up: the cluster it linked may
/// now be reached by the default VDI alone, whose link to it must then say so (bit
/// 63, as QEMU's COPIED rule requires of the active layer). Roots share clusters only
/// by sharing tables, so the default VDI can only reach it at the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Released {
    /// A data cluster `host` at guest offset `guest`.
    Data {
        guest: GuestOffset,
        host: HostOffset,
    },
    /// An L2 table `table` at L1 index `l1i`.
    Table { l1i: usize, table: HostOffset },
}

impl RefDeltas {
    /// No change yet. `exact` says whether the on-disk refcounts were exact to begin
    /// with (false: the next apply rebuilds from a scan).
    pub(crate) fn new(cluster_bits: u32, exact: bool) -> RefDeltas {
        RefDeltas {
            exact,
            cluster_bits,
            clusters: HashMap::new(),
            trees: Vec::new(),
            max_bound: None,
            released: Vec::new(),
            base_clusters: u64::MAX,
        }
    }

    /// Records how many clusters the file has while the record is empty and exact.
    pub(crate) fn set_base_clusters(&mut self, clusters: u64) {
        self.base_clusters = clusters;
    }

    /// See [`RefDeltas::set_base_clusters`].
    pub(crate) fn base_clusters(&self) -> u64 {
        self.base_clusters
    }

    /// Clusters with a recorded change (what the record costs in memory, about 32
    /// bytes each, plus the L1 entries of the roots created).
    pub(crate) fn len(&self) -> usize {
        self.clusters.len() + self.released.len()
    }

    /// Whether a whole root's tree was added or dropped since the last apply (its
    /// apply walks the tree).
    pub(crate) fn has_trees(&self) -> bool {
        !self.trees.is_empty()
    }

    /// Records a link a head other than the default VDI gave up.
    pub(crate) fn released(&mut self, r: Released) {
        if self.exact {
            self.released.push(r);
        }
    }

    /// Takes the links given up since the last apply.
    pub(crate) fn take_released(&mut self) -> Vec<Released> {
        std::mem::take(&mut self.released)
    }

    /// The most references one root can add to one cluster: one, except a host
    /// cluster of compressed data, which every compressed cluster starting in it
    /// (at most one per 512-byte sector) or running into it references.
    pub(crate) fn per_root_multiplicity(&self) -> u64 {
        (1u64 << self.cluster_bits.saturating_sub(9)) + 1
    }

    /// An upper bound on every cluster's refcount once the record is applied: the
    /// largest count on disk when it was last read (or written by a rebuild), plus the
    /// most each root created since can add. Changes to links only ever make counts of
    /// new clusters, at most [`RefDeltas::per_root_multiplicity`].
    pub(crate) fn max_bound(&self) -> Option<u64> {
        self.max_bound.map(|b| b.max(self.per_root_multiplicity()))
    }

    /// Records the largest refcount on disk, read when the record is empty.
    pub(crate) fn set_max_bound(&mut self, max: u64) {
        self.max_bound = Some(max);
    }

    /// Whether on-disk refcounts plus this record are the exact references.
    pub(crate) fn is_exact(&self) -> bool {
        self.exact
    }

    /// Something changed references without being recorded: only a full scan can
    /// tell the refcounts now. Also drops what was recorded (a scan counts it).
    pub(crate) fn lose_exactness(&mut self) {
        self.exact = false;
        self.clusters = HashMap::new();
        self.trees.clear();
        self.max_bound = None;
        self.released = Vec::new();
    }

    /// Adds `d` to the refcount of every cluster covering `[offset, offset + len)`.
    pub(crate) fn range(&mut self, offset: HostOffset, len: u64, d: i64) {
        add_range(&mut self.clusters, self.cluster_bits, offset, len, d);
    }

    /// One reference moves from what `old` links to, to what `new` links to.
    pub(crate) fn relink(&mut self, geo: &Geometry, old: ClusterKind, new: ClusterKind) {
        let (a, b) = (host_range(geo, old), host_range(geo, new));
        if a == b {
            return;
        }
        if let Some((off, len)) = a {
            self.range(off, len, -1);
        }
        if let Some((off, len)) = b {
            self.range(off, len, 1);
        }
    }

    /// A root whose tree (linked read-only from `l1`) gains or loses one reference
    /// per path.
    pub(crate) fn tree(&mut self, l1: Vec<u64>, sign: i64) {
        if l1.iter().any(|&w| w != 0) {
            if sign > 0 {
                let m = self.per_root_multiplicity();
                self.max_bound = self.max_bound.map(|b| b.saturating_add(m));
            }
            self.trees.push(TreeDelta { l1, sign });
        }
    }

    /// Takes the record, leaving an empty exact one.
    pub(crate) fn take(&mut self) -> (HashMap<u64, i64>, Vec<TreeDelta>) {
        self.exact = true;
        (
            std::mem::take(&mut self.clusters),
            std::mem::take(&mut self.trees),
        )
    }

    /// Starts over from exact on-disk refcounts (after a rebuild wrote them).
    pub(crate) fn reset_exact(&mut self, max_on_disk: u64) {
        self.exact = true;
        self.clusters = HashMap::new();
        self.trees.clear();
        self.max_bound = Some(max_on_disk);
        self.released = Vec::new();
    }
}

/// Adds `d` to the change of every cluster covering `[offset, offset + len)` in
/// `changes` (cluster index → change; zero changes are dropped).
pub(crate) fn add_range(
    changes: &mut HashMap<u64, i64>,
    cluster_bits: u32,
    offset: HostOffset,
    len: u64,
    d: i64,
) {
    if len == 0 || d == 0 {
        return;
    }
    for c in clusters_of(cluster_bits, offset, len) {
        let v = changes.entry(c).or_insert(0);
        *v += d;
        if *v == 0 {
            changes.remove(&c);
        }
    }
}

/// The clusters covering `[offset, offset + len)` (`len` > 0).
pub(crate) fn clusters_of(
    cluster_bits: u32,
    offset: HostOffset,
    len: u64,
) -> std::ops::RangeInclusive<u64> {
    let offset = offset.get();
    (offset >> cluster_bits)..=((offset.saturating_add(len) - 1) >> cluster_bits)
}

/// The host bytes an entry of kind `kind` references, if any.
pub(crate) fn host_range(geo: &Geometry, kind: ClusterKind) -> Option<(HostOffset, u64)> {
    match kind {
        ClusterKind::Data { host }
        | ClusterKind::Zero { host: Some(host) }
        | ClusterKind::Subclusters {
            host: Some(host), ..
        } => Some((host, geo.cluster_size())),
        ClusterKind::Compressed { offset, len } => Some((offset, len)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relinks_cancel_and_ranges_cover_clusters() {
        let geo = Geometry {
            cluster_bits: 16,
            extended: false,
        };
        let mut d = RefDeltas::new(16, true);
        d.relink(
            &geo,
            ClusterKind::Unallocated,
            ClusterKind::Data {
                host: HostOffset::new(0x30000),
            },
        );
        d.relink(
            &geo,
            ClusterKind::Data {
                host: HostOffset::new(0x30000),
            },
            ClusterKind::Data {
                host: HostOffset::new(0x30000),
            },
        );
        assert_eq!(d.clusters.len(), 1);
        d.relink(
            &geo,
            ClusterKind::Data {
                host: HostOffset::new(0x30000),
            },
            ClusterKind::Compressed {
                offset: HostOffset::new(0x4fe00),
                len: 0x400,
            },
        );
        let (m, _) = d.take();
        assert_eq!(m.get(&3), None, "the +1 and -1 on cluster 3 cancel");
        assert_eq!((m.get(&4), m.get(&5)), (Some(&1), Some(&1)));
    }
}
