//! QEMU's `preallocation` creation option: a new image whose every guest cluster is
//! mapped up front. The L2 tables follow the L1 table, one per L1 entry, and the data
//! clusters follow them, guest cluster `i` at the `i`-th data cluster; every table
//! entry is writable in place (refcount 1). `metadata` leaves the data area a hole
//! (it reads as zeros), `falloc` reserves it, `full` writes its zeros.
//!
//! On an image with extended L2 entries the data clusters are linked with no
//! subcluster allocated, as QEMU links them: the subclusters read from the backing
//! file (or as zeros without one) until they are written, which is what lets such an
//! image have a backing file.

use crate::error::{Error, Result};
use crate::format::addr::HostOffset;

use crate::format::tables::{encode_words, Geometry, L1Entry, L2Entry};
use crate::storage::Storage;

/// QEMU's `preallocation` creation option: what the new file allocates up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Preallocation {
    /// Nothing beyond what is written.
    #[default]
    Off,
    /// The tables of a fully allocated image, over a data area left as a hole.
    Metadata,
    /// Every cluster, with `fallocate`.
    Falloc,
    /// Every cluster, written.
    Full,
}

impl Preallocation {
    /// QEMU's name: `off`, `metadata`, `falloc` or `full`.
    ///
    /// ```
    /// use qcowx_core::Preallocation;
    /// assert_eq!(Preallocation::parse("falloc"), Some(Preallocation::Falloc));
    /// assert_eq!(Preallocation::parse("sparse"), None);
    /// ```
    pub fn parse(name: &str) -> Option<Preallocation> {
        Some(match name {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => return None,
        })
    }

    /// The option's value as QEMU spells it (what [`Preallocation::parse`] takes).
    ///
    /// ```
    /// use qcowx_core::Preallocation;
    /// assert_eq!(Preallocation::Metadata.name(), "metadata");
    /// assert_eq!(Preallocation::parse(Preallocation::Full.name()), Some(Preallocation::Full));
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// Where a preallocated image's L2 tables and data clusters go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct PreallocLayout {
    /// The first L2 table (the rest follow it, one per L1 entry).
    pub(super) l2: u64,
    /// How many L2 tables.
    pub(super) l2_clusters: u64,
    /// The first data cluster.
    pub(super) data: u64,
    /// How many data clusters: one per guest cluster.
    pub(super) data_clusters: u64,
}

impl PreallocLayout {
    /// The tables and data clusters of a disk of `size` bytes whose L1 table has
    /// `l1_entries` entries, placed from `at`; empty when `mode` is
    /// [`Preallocation::Off`].
    pub(super) fn plan(
        mode: Preallocation,
        geo: &Geometry,
        size: u64,
        l1_entries: u64,
        at: u64,
    ) -> PreallocLayout {
        if mode == Preallocation::Off || size == 0 {
            return PreallocLayout::default();
        }
        let cs = geo.cluster_size();
        PreallocLayout {
            l2: at,
            l2_clusters: l1_entries,
            data: at + l1_entries * cs,
            data_clusters: geo.clusters_for(size),
        }
    }

    /// Clusters the layout takes.
    pub(super) fn clusters(&self) -> u64 {
        self.l2_clusters + self.data_clusters
    }

    /// The L1 table: entry `i` links the `i`-th L2 table, writable.
    pub(super) fn l1(&self, geo: &Geometry, l1_entries: u64) -> Vec<u64> {
        let cs = geo.cluster_size();
        (0..l1_entries)
            .map(|i| {
                if i < self.l2_clusters {
                    L1Entry::new(HostOffset::new(self.l2 + i * cs), true).raw()
                } else {
                    0
                }
            })
            .collect()
    }

    /// Writes the L2 tables, then allocates the data area as `mode` says (`metadata`
    /// leaves it to the file's final length, a hole).
    pub(super) fn write(
        &self,
        storage: &dyn Storage,
        name: &str,
        geo: &Geometry,
        mode: Preallocation,
    ) -> Result<()> {
        let io = |op, offset, source| Error::io(name, op, offset, source);
        let cs = geo.cluster_size();
        let per_table = geo.l2_entries();
        let words_per_entry = (geo.l2_entry_bytes() / 8) as usize;
        let mut words = vec![0u64; per_table as usize * words_per_entry];
        for t in 0..self.l2_clusters {
            words.fill(0);
            for j in 0..per_table {
                let cluster = t * per_table + j;
                if cluster >= self.data_clusters {
                    break;
                }
                let host = HostOffset::new(self.data + cluster * cs);
                let entry = if geo.extended {
                    L2Entry::subclusters(host, 0, 0)
                } else {
                    L2Entry::data(host, geo)
                };
                entry.put(&mut words, j as usize, geo);
            }
            let off = self.l2 + t * cs;
            storage
                .write_at(&encode_words(&words), off)
                .map_err(|e| io("write L2 table", off, e))?;
        }
        let len = self.data_clusters * cs;
        match mode {
            Preallocation::Off | Preallocation::Metadata => Ok(()),
            Preallocation::Falloc => storage
                .allocate(self.data, len)
                .map_err(|e| io("allocate data clusters", self.data, e)),
            Preallocation::Full => crate::storage::write_zeros(storage, self.data, len)
                .map_err(|e| io("write data clusters", self.data, e)),
        }
    }
}
