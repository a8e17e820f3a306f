//! Typed addresses: where in the guest's disk, and where in the image file. A guest
//! offset cannot be passed where a host offset is meant, nor a cluster number where a
//! byte offset is; conversions between them go through the image's geometry (the
//! methods that take one live beside it, in [`super::tables`]).
//!
//! Byte offsets in the public I/O API (`read_at`, `write_at`) stay `u64`, as in
//! `std::os::unix::fs::FileExt`; the engine turns them into [`GuestOffset`] at its
//! edge, and host offsets meet the storage (which knows nothing of QCOW2) as `u64`
//! through [`HostOffset::get`].
//!
//! ```
//! use qcowx_core::format::addr::HostOffset;
//! use qcowx_core::format::tables::{Geometry, L2Entry};
//! let geo = Geometry { cluster_bits: 16, extended: false };
//! let e = L2Entry::data(HostOffset::new(0x3_0000), &geo);
//! assert_eq!(e.host(), Some(HostOffset::new(0x3_0000)));
//! ```
//!
//! A guest offset is not accepted where a host offset is meant:
//!
//! ```compile_fail
//! use qcowx_core::format::addr::GuestOffset;
//! use qcowx_core::format::tables::{Geometry, L2Entry};
//! let geo = Geometry { cluster_bits: 16, extended: false };
//! let e = L2Entry::data(GuestOffset::new(0x3_0000), &geo);
//! ```

use std::fmt;
use std::ops::Add;

macro_rules! address {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            /// The address `value`.
            pub const fn new(value: u64) -> $name {
                $name(value)
            }
            /// The address as a number.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl From<$name> for u64 {
            fn from(a: $name) -> u64 {
                a.0
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

address!(
    /// A byte offset in the guest's disk.
    ///
    /// ```
    /// use qcowx_core::format::addr::{GuestCluster, GuestOffset};
    /// use qcowx_core::format::tables::Geometry;
    ///
    /// let geo = Geometry { cluster_bits: 16, extended: false };
    /// let g = GuestOffset::new(5 * 65536 + 7);
    /// assert_eq!(g.get(), 327687);
    /// assert_eq!(g.cluster(&geo), GuestCluster::new(5));
    /// assert_eq!((g.in_cluster(&geo), g.cluster_start(&geo)), (7, GuestOffset::new(5 * 65536)));
    /// assert_eq!(g + 1, GuestOffset::new(327688));
    /// ```
    GuestOffset
);
address!(
    /// The index of a guest cluster (a guest offset divided by the cluster size).
    ///
    /// ```
    /// use qcowx_core::format::addr::{GuestCluster, GuestOffset};
    /// use qcowx_core::format::tables::Geometry;
    ///
    /// let geo = Geometry { cluster_bits: 16, extended: false };
    /// let c = GuestCluster::new(5);
    /// assert_eq!((c.get(), c.offset(&geo)), (5, GuestOffset::new(5 * 65536)));
    /// ```
    GuestCluster
);
address!(
    /// A byte offset in the image file.
    ///
    /// ```
    /// use qcowx_core::format::addr::{HostCluster, HostOffset};
    /// use qcowx_core::format::tables::Geometry;
    ///
    /// let geo = Geometry { cluster_bits: 16, extended: false };
    /// let h = HostOffset::new(0x3_0010);
    /// assert_eq!((h.get(), h.to_string()), (0x3_0010, "0x30010".to_string()));
    /// assert_eq!(h.cluster(&geo), HostCluster::new(3));
    /// assert!(!h.is_cluster_aligned(&geo) && HostOffset::new(0x3_0000).is_cluster_aligned(&geo));
    /// assert_eq!(h + 0x10, HostOffset::new(0x3_0020));
    /// assert_eq!(HostOffset::new(u64::MAX).checked_add(1), None);
    /// ```
    HostOffset
);
address!(
    /// The index of a host cluster (a host offset divided by the cluster size).
    ///
    /// ```
    /// use qcowx_core::format::addr::{HostCluster, HostOffset};
    /// use qcowx_core::format::tables::Geometry;
    ///
    /// let geo = Geometry { cluster_bits: 16, extended: false };
    /// let c = HostCluster::new(3);
    /// assert_eq!((c.get(), c.offset(&geo)), (3, HostOffset::new(0x3_0000)));
    /// ```
    HostCluster
);

impl Add<u64> for HostOffset {
    type Output = HostOffset;
    fn add(self, bytes: u64) -> HostOffset {
        HostOffset(self.0 + bytes)
    }
}

impl HostOffset {
    /// The offset `bytes` further on, if it exists.
    pub fn checked_add(self, bytes: u64) -> Option<HostOffset> {
        self.0.checked_add(bytes).map(HostOffset)
    }
}

impl Add<u64> for GuestOffset {
    type Output = GuestOffset;
    fn add(self, bytes: u64) -> GuestOffset {
        GuestOffset(self.0 + bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tables::Geometry;

    #[test]
    fn conversions_go_through_the_geometry() {
        let geo = Geometry {
            cluster_bits: 16,
            extended: false,
        };
        let h = HostOffset::new(0x3_0010);
        assert_eq!(h.cluster(&geo), HostCluster::new(3));
        assert_eq!(h.cluster(&geo).offset(&geo), HostOffset::new(0x3_0000));
        assert!(!h.is_cluster_aligned(&geo));
        let g = GuestOffset::new(5 * 65536 + 7);
        assert_eq!(g.cluster(&geo), GuestCluster::new(5));
        assert_eq!(g.in_cluster(&geo), 7);
        assert_eq!(format!("{h}"), "0x30010");
        assert_eq!(format!("{h:#x}"), "0x30010");
    }
}
