//! The map of host clusters that hold the image's own structures, which overlap
//! protection (`overlap`) consults before every write of guest data or an L2 table;
//! the types only (no I/O: `overlap` builds the map from the open image).

use std::collections::HashMap;

/// A structure of the image that guest data must never overwrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Structure {
    /// The header cluster (fixed fields, extensions, backing file name).
    Header,
    /// A loaded root's L1 table (the active one, or a VDI head's).
    L1Table,
    /// A snapshot's L1 table.
    SnapshotL1Table,
    /// An L2 table a loaded root links to.
    L2Table,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A persistent bitmap's directory, table or data cluster.
    Bitmap,
}

impl Structure {
    /// The structure's name, as messages use it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Structure::Header => "image header",
            Structure::L1Table => "L1 table",
            Structure::SnapshotL1Table => "snapshot L1 table",
            Structure::L2Table => "L2 table",
            Structure::RefcountTable => "refcount table",
            Structure::RefcountBlock => "refcount block",
            Structure::SnapshotTable => "snapshot table",
            Structure::Bitmap => "persistent bitmap",
        }
    }
}

/// What is about to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Writing {
    /// Guest data (in place, into a new or copied cluster, or compressed).
    Data,
    /// An L2 table that is about to change (it may overlap nothing but itself).
    L2Table,
}

impl Writing {
    pub(super) fn name(self) -> &'static str {
        match self {
            Writing::Data => "guest data",
            Writing::L2Table => "an L2 table",
        }
    }
}

/// What the map was built from: when this changes, the map is rebuilt. Cheap to
/// compute (it is compared before every guarded write). Tables and blocks created
/// during the session need no rebuild (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Key {
    pub(super) roots: usize,
    pub(super) root_l1s: u64,
    pub(super) snapshots: usize,
    pub(super) snapshots_offset: u64,
    pub(super) refcount_table: (u64, u32),
}

/// Host clusters holding metadata, by cluster index.
#[derive(Debug, Default)]
pub(crate) struct MetadataMap {
    pub(super) key: Option<Key>,
    /// Every structure but L2 tables (few clusters), with the structure's offset.
    pub(super) clusters: HashMap<u64, (Structure, u64)>,
    /// The loaded roots' L2 tables (host offsets), sorted: 8 bytes per L1 entry in use.
    pub(super) l2_tables: Vec<u64>,
    pub(super) cluster_bits: u32,
}

impl MetadataMap {
    /// The first cluster of `[first, last]` the map lists (ignoring `skip`), with the
    /// structure and the structure's own offset.
    pub(super) fn hit(
        &self,
        first: u64,
        last: u64,
        skip: Option<Structure>,
    ) -> Option<(u64, Structure, u64)> {
        let fixed = (first..=last).find_map(|c| {
            self.clusters
                .get(&c)
                .filter(|(s, _)| Some(*s) != skip)
                .map(|&(s, at)| (c, s, at))
        });
        if fixed.is_some() || skip == Some(Structure::L2Table) {
            return fixed;
        }
        let bits = self.cluster_bits;
        let i = self.l2_tables.partition_point(|&off| off >> bits < first);
        self.l2_tables
            .get(i)
            .filter(|&&off| off >> bits <= last)
            .map(|&off| (off >> bits, Structure::L2Table, off))
    }
}
