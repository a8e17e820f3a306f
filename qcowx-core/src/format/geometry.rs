//! The address geometry of an image ([`Geometry`], from its header: cluster size and
//! L2 entry width), and the conversions between typed addresses that need it.

use super::addr::{GuestCluster, GuestOffset, HostCluster, HostOffset};
use super::tables::{ALL_SUBCLUSTERS, SUBCLUSTERS};

/// Address geometry derived from the header.
///
/// ```
/// use qcowx_core::format::addr::GuestOffset;
/// use qcowx_core::format::tables::Geometry;
///
/// let geo = Geometry { cluster_bits: 16, extended: false }; // 64 KiB clusters
/// assert_eq!(geo.cluster_size(), 65536);
/// assert_eq!((geo.l2_entry_bytes(), geo.l2_entries(), geo.l2_bits()), (8, 8192, 13));
/// assert_eq!(geo.bytes_per_l1_entry(), 512 << 20); // one L2 table maps 512 MiB
/// assert_eq!(geo.l1_entries_for(1 << 30), 2);
/// assert_eq!(geo.split(GuestOffset::new((512 << 20) + 3 * 65536)), (1, 3));
/// assert_eq!(geo.clusters_for(65537), 2);
/// assert_eq!(geo.csize_shift(), 54); // where a compressed entry's sector count starts
///
/// // Extended L2 entries: 16 bytes, 32 subclusters of 2 KiB.
/// let ext = Geometry { cluster_bits: 16, extended: true };
/// assert_eq!((ext.l2_entry_bytes(), ext.subcluster_size()), (16, 2048));
/// assert_eq!(ext.subclusters_touched(2047, 2), 0b11); // two subclusters touched
/// assert_eq!(ext.subclusters_covered(2047, 4098), 0b110); // two covered whole
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Whether L2 entries are 128 bits with subcluster bitmaps.
    pub extended: bool,
}

impl Geometry {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Bytes per L2 entry (8, or 16 when extended).
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended {
            16
        } else {
            8
        }
    }
    /// Number of entries in an L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }
    /// log2 of [`Geometry::l2_entries`].
    pub fn l2_bits(&self) -> u32 {
        self.l2_entries().trailing_zeros()
    }
    /// Guest bytes covered by one L1 entry.
    pub fn bytes_per_l1_entry(&self) -> u64 {
        self.cluster_size() << self.l2_bits()
    }
    /// L1 entries needed for a disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.bytes_per_l1_entry())
    }
    /// (L1 index, L2 index) of the guest cluster holding `offset`.
    pub fn split(&self, offset: GuestOffset) -> (usize, usize) {
        let cluster = offset.cluster(self).get();
        (
            (cluster >> self.l2_bits()) as usize,
            (cluster & (self.l2_entries() - 1)) as usize,
        )
    }
    /// Subcluster size in bytes (only meaningful when extended).
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / u64::from(SUBCLUSTERS)
    }
    /// The subclusters `[in_off, in_off + len)` of a cluster touches, as a bitmap
    /// (`len` > 0).
    pub fn subclusters_touched(&self, in_off: u64, len: u64) -> u32 {
        let sub = self.subcluster_size();
        let (first, last) = (in_off / sub, (in_off + len - 1) / sub);
        let upto = |n: u64| {
            if n >= 31 {
                ALL_SUBCLUSTERS
            } else {
                (2u32 << n) - 1
            }
        };
        upto(last) & !((1u32 << first) - 1)
    }
    /// The subclusters `[in_off, in_off + len)` of a cluster covers whole.
    pub fn subclusters_covered(&self, in_off: u64, len: u64) -> u32 {
        let sub = self.subcluster_size();
        let first = in_off.div_ceil(sub);
        let end = (in_off + len) / sub;
        if first >= end {
            return 0;
        }
        self.subclusters_touched(first * sub, (end - first) * sub)
    }
    /// The bit position where a compressed descriptor's sector count starts.
    pub fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
    /// Clusters needed to hold `bytes`.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }
}

// ---- typed addresses converted through the geometry ----------------------------

impl HostOffset {
    /// The host cluster holding this byte.
    pub fn cluster(self, geo: &Geometry) -> HostCluster {
        HostCluster::new(self.get() >> geo.cluster_bits)
    }
    /// Whether the offset starts a cluster.
    pub fn is_cluster_aligned(self, geo: &Geometry) -> bool {
        self.get() & (geo.cluster_size() - 1) == 0
    }
}

impl HostCluster {
    /// The offset of the cluster's first byte.
    pub fn offset(self, geo: &Geometry) -> HostOffset {
        HostOffset::new(self.get() << geo.cluster_bits)
    }
}

impl GuestOffset {
    /// The guest cluster holding this byte.
    pub fn cluster(self, geo: &Geometry) -> GuestCluster {
        GuestCluster::new(self.get() >> geo.cluster_bits)
    }
    /// The byte's offset inside its cluster.
    pub fn in_cluster(self, geo: &Geometry) -> u64 {
        self.get() & (geo.cluster_size() - 1)
    }
    /// The first byte of the cluster holding this byte.
    pub fn cluster_start(self, geo: &Geometry) -> GuestOffset {
        GuestOffset::new(self.get() & !(geo.cluster_size() - 1))
    }
}

impl GuestCluster {
    /// The offset of the cluster's first byte.
    pub fn offset(self, geo: &Geometry) -> GuestOffset {
        GuestOffset::new(self.get() << geo.cluster_bits)
    }
}
