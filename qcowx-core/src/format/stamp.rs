//! The clean-close stamp: a header extension by which a writable open knows that the
//! image is as qcowx left it at its last clean close, so nothing needs a scan.
//!
//! The stamp is a CRC-32C over what a foreign writer would have to change to break
//! what qcowx relies on at open (exact refcounts, and invariant W: a writable link
//! reaches a cluster no other root reaches): the header fields that place and size
//! the metadata, the active L1 table and the snapshot table. QEMU keeps refcounts
//! and its COPIED flags (bit 63) exact on every write, and the writes that can make
//! a qcowx link wrong all change one of these: creating, applying or deleting a
//! snapshot rewrites the snapshot table or the active L1 table; an L2 table copied
//! or allocated changes the active L1 table; `amend` and `resize` change header
//! fields. A writer that sets the dirty bit (lazy refcounts, a crash) is caught by the
//! bit itself. QEMU keeps header extensions it does not know when it rewrites the
//! header, so a stale stamp stays in the file and simply stops matching.
//!
//! Layout: extension type [`EXT_CLEAN_STAMP`], 8 bytes of data (big-endian): the CRC
//! (u32) and the stamp version (u32, 1).

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::format::extensions::Extension;
use crate::format::header::{Header, Incompatible};
use crate::format::snapshot::SnapshotEntry;

/// Header extension type of the clean-close stamp ("qcxs").
pub const EXT_CLEAN_STAMP: u32 = 0x7163_7873;

/// The stamp version this code writes and trusts.
pub const STAMP_VERSION: u32 = 1;

/// The extension's data.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawCleanStamp {
    /// CRC-32C of the covered state.
    pub crc: U32,
    /// [`STAMP_VERSION`].
    pub version: U32,
}

/// The header fields a stamp covers, in the order they are hashed.
#[derive(IntoBytes, Immutable)]
#[repr(C)]
struct CoveredFields {
    size: U64,
    l1_table_offset: U64,
    refcount_table_offset: U64,
    snapshots_offset: U64,
    incompatible: U64,
    compatible: U64,
    autoclear: U64,
    version: U32,
    cluster_bits: U32,
    l1_size: U32,
    refcount_table_clusters: U32,
    nb_snapshots: U32,
    refcount_order: U32,
}

/// The stamp of an image whose header is `h` (its dirty bit ignored), whose active L1
/// table holds `l1` and whose snapshot table holds `snapshots`.
///
/// ```
/// use qcowx_core::format::stamp::{compute, extension, read, EXT_CLEAN_STAMP};
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
/// let h = img.header();
/// let crc = compute(&h, &[0u64; 1], &[]);
/// assert_ne!(crc, compute(&h, &[0x8000_0000_0005_0000], &[]), "the L1 table is covered");
/// let mut bigger = h.clone();
/// bigger.size *= 2;
/// assert_ne!(crc, compute(&bigger, &[0u64; 1], &[]), "the size is covered");
/// let ext = extension(crc);
/// assert_eq!(ext.kind, EXT_CLEAN_STAMP);
/// assert_eq!(read(&ext), Some(crc));
/// # Ok(()) }
/// ```
pub fn compute(h: &Header, l1: &[u64], snapshots: &[SnapshotEntry]) -> u32 {
    let fields = CoveredFields {
        size: h.size.into(),
        l1_table_offset: h.l1_table_offset.into(),
        refcount_table_offset: h.refcount_table_offset.into(),
        snapshots_offset: h.snapshots_offset.into(),
        incompatible: (h.incompatible - Incompatible::DIRTY).bits().into(),
        compatible: h.compatible.into(),
        autoclear: h.autoclear.into(),
        version: h.version.into(),
        cluster_bits: h.cluster_bits.into(),
        l1_size: h.l1_size.into(),
        refcount_table_clusters: h.refcount_table_clusters.into(),
        nb_snapshots: h.nb_snapshots.into(),
        refcount_order: h.refcount_order.into(),
    };
    let mut crc = crc32c::crc32c(fields.as_bytes());
    for w in l1 {
        crc = crc32c::crc32c_append(crc, &w.to_be_bytes());
    }
    let mut table = Vec::new();
    for e in snapshots {
        e.write_to(&mut table);
    }
    crc32c::crc32c_append(crc, &table)
}

/// The extension carrying `crc`.
///
/// ```
/// use qcowx_core::format::stamp::extension;
///
/// assert_eq!(extension(0xdead_beef).data, [0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1]);
/// ```
pub fn extension(crc: u32) -> Extension {
    let raw = RawCleanStamp {
        crc: crc.into(),
        version: STAMP_VERSION.into(),
    };
    Extension {
        kind: EXT_CLEAN_STAMP,
        data: raw.as_bytes().to_vec(),
    }
}

/// The CRC a stamp extension carries, if it is one this code trusts.
///
/// ```
/// use qcowx_core::format::extensions::Extension;
/// use qcowx_core::format::stamp::{read, EXT_CLEAN_STAMP};
///
/// let v2 = Extension { kind: EXT_CLEAN_STAMP, data: vec![0, 0, 0, 7, 0, 0, 0, 2] };
/// assert_eq!(read(&v2), None, "a stamp version this code does not know is not trusted");
/// ```
pub fn read(ext: &Extension) -> Option<u32> {
    let (raw, _) = RawCleanStamp::read_from_prefix(&ext.data).ok()?;
    (ext.kind == EXT_CLEAN_STAMP && ext.data.len() == 8 && raw.version.get() == STAMP_VERSION)
        .then_some(raw.crc.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_covers_the_l1_table() {
        let h = Header {
            backing_file_offset: 0,
            backing_file_size: 0,
            unknown_fields: Vec::new(),
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: Incompatible::empty(),
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: crate::format::header::V3_HEADER_LEN,
            compression_type: 0,
            extensions: Default::default(),
            backing_file: None,
        };
        let a = compute(&h, &[0, 0x8000_0000_0003_0000], &[]);
        let b = compute(&h, &[0, 0x0000_0000_0003_0000], &[]);
        assert_ne!(
            a, b,
            "a flipped bit 63 in the active L1 table changes the stamp"
        );
        let mut dirty = h.clone();
        dirty.incompatible |= Incompatible::DIRTY;
        assert_eq!(compute(&dirty, &[], &[]), compute(&h, &[], &[]));
        assert_eq!(read(&extension(a)), Some(a));
        let mut other = extension(a);
        other.data[7] = 2;
        assert_eq!(read(&other), None, "another stamp version is not trusted");
    }
}
