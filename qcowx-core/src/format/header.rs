//! The QCOW2 header: its on-disk layout, validation and serialization.
//!
//! The fixed part of the header is declared once, as big-endian structs ([`RawHeaderV2`]
//! and [`RawHeaderV3Tail`]); everything else in the crate works with the validated
//! [`Header`].

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::format::extensions::{Extension, Extensions, FeatureKind};

/// The QCOW2 magic, `QFI\xfb`.
pub const QCOW_MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size QCOW2 allows (`cluster_bits` = 9).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QCOW2 allows (`cluster_bits` = 21, 2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table QEMU opens, in bytes (QEMU's `QCOW_MAX_L1_SIZE`).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU opens, in bytes (QEMU's `QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest number of snapshots QEMU opens (QEMU's `QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u32 = 65_536;
/// Longest backing file name QEMU accepts, in bytes.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest virtual disk size accepted: 2^56 bytes, the reach of the 56-bit host offsets
/// in L1/L2 entries. (With clusters under 512 KiB, [`MAX_L1_BYTES`] limits it first.)
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// Bytes read first when a file is opened: the fixed header and, with clusters up to
/// the common 64 KiB, all of the first cluster; a larger `cluster_bits` says how much
/// more to read ([`Header::first_cluster_len`]).
pub const HEADER_PROBE_LEN: u64 = 65536;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header qcowx writes (with the `compression_type` byte).
pub const V3_HEADER_LEN: u32 = 112;

/// The first 72 bytes of every QCOW2 header (all of a version 2 header).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeaderV2 {
    /// `QFI\xfb`.
    pub magic: U32,
    /// 2 or 3.
    pub version: U32,
    /// Offset of the backing file name, 0 when there is none.
    pub backing_file_offset: U64,
    /// Length of the backing file name in bytes.
    pub backing_file_size: U32,
    /// log2 of the cluster size.
    pub cluster_bits: U32,
    /// Virtual disk size in bytes.
    pub size: U64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: U32,
    /// Number of entries in the active L1 table.
    pub l1_size: U32,
    /// Offset of the active L1 table.
    pub l1_table_offset: U64,
    /// Offset of the refcount table.
    pub refcount_table_offset: U64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: U32,
    /// Number of entries in the snapshot table.
    pub nb_snapshots: U32,
    /// Offset of the snapshot table.
    pub snapshots_offset: U64,
}

/// Bytes 72..112 of a version 3 header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeaderV3Tail {
    /// Incompatible feature bits.
    pub incompatible_features: U64,
    /// Compatible feature bits.
    pub compatible_features: U64,
    /// Auto-clear feature bits.
    pub autoclear_features: U64,
    /// log2 of the refcount width in bits.
    pub refcount_order: U32,
    /// Length of the header structure in bytes.
    pub header_length: U32,
    /// 0 deflate, 1 zstd (present when `header_length` >= 105).
    pub compression_type: u8,
    /// Padding to a multiple of 8.
    pub padding: [u8; 7],
}

bitflags::bitflags! {
    /// Incompatible feature bits (header offset 72).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Incompatible: u64 {
        /// Refcounts may be stale; a reader that writes must rebuild them.
        const DIRTY = 1 << 0;
        /// The image is corrupt; it must not be written.
        const CORRUPT = 1 << 1;
        /// Guest data lives in an external data file.
        const EXTERNAL_DATA = 1 << 2;
        /// The `compression_type` field is not deflate.
        const COMPRESSION_TYPE = 1 << 3;
        /// L2 entries are 128 bits with subcluster bitmaps.
        const EXTENDED_L2 = 1 << 4;
    }
}

bitflags::bitflags! {
    /// Compatible feature bits (header offset 80).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Compatible: u64 {
        /// Refcounts may be updated lazily (the dirty bit protects them).
        const LAZY_REFCOUNTS = 1 << 0;
    }
}

bitflags::bitflags! {
    /// Auto-clear feature bits (header offset 88).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Autoclear: u64 {
        /// The bitmaps extension is consistent.
        const BITMAPS = 1 << 0;
        /// The external data file is raw (guest offset = host offset).
        const RAW_EXTERNAL = 1 << 1;
    }
}

pub use super::header_error::HeaderError;

/// A validated QCOW2 header with its extensions and backing file name.
///
/// ```
/// use qcowx_core::format::extensions::EXT_BACKING_FORMAT;
/// use qcowx_core::format::header::{Header, HEADER_PROBE_LEN, V3_HEADER_LEN};
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// Image::create(dir.path().join("base.qcow2"), &CreateOptions::new(1 << 30))?.close()?;
/// let path = dir.path().join("top.qcow2");
/// let mut opts = CreateOptions::new(1 << 30);
/// opts.backing_file = Some("base.qcow2".into());
/// opts.backing_format = Some("qcow2".into());
/// let img = Image::create(&path, &opts)?;
/// let from_image = img.header();
/// img.close()?;
///
/// // Parse the file's first cluster, as the engine does.
/// let bytes = std::fs::read(&path)?;
/// let file_len = bytes.len() as u64;
/// let prefix = &bytes[..bytes.len().min(HEADER_PROBE_LEN as usize)];
/// let first = &bytes[..Header::first_cluster_len(prefix, file_len) as usize];
/// let h = Header::parse(first, file_len)?;
/// assert_eq!((h.version, h.size, h.cluster_size()), (3, 1 << 30, 65536));
/// assert!(!h.extended_l2());
/// assert_eq!((h.backing_file.as_deref(), h.backing_format()), (Some("base.qcow2"), Some("qcow2")));
/// assert_eq!(h.l1_table_offset, from_image.l1_table_offset);
///
/// // Bytes back: what a commit rewrites, the whole header structure, the first cluster.
/// assert_eq!(h.commit_bytes(), &bytes[..V3_HEADER_LEN as usize]);
/// assert_eq!(h.fixed_bytes(), &bytes[..h.fixed_len() as usize]);
/// let area = h.area_bytes().expect("fits in a cluster");
/// assert_eq!(&area[..], &bytes[..area.len()]);
/// let at = h.extension_data_offset(EXT_BACKING_FORMAT).expect("an extension") as usize;
/// assert_eq!(&bytes[at..at + 5], b"qcow2");
///
/// // A new header: lay out its backing name after the extensions, then write it out.
/// let mut fresh = h.clone();
/// fresh.layout_backing();
/// let cluster = fresh.to_cluster().expect("fits");
/// assert_eq!(cluster.len(), 65536);
/// assert_eq!(Header::parse(&cluster, file_len)?.backing_file, h.backing_file);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of snapshot table entries.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (unknown bits are rejected at parse time).
    pub incompatible: Incompatible,
    /// Compatible feature bits, unknown bits kept.
    pub compatible: u64,
    /// Auto-clear feature bits, unknown bits kept.
    pub autoclear: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Length of the header structure as found (v3) or 72 (v2).
    pub header_length: u32,
    /// 0 deflate, 1 zstd.
    pub compression_type: u8,
    /// Header extensions, in file order, unknown ones kept byte-for-byte.
    pub extensions: Extensions,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// Where the backing file name lives (0 without one), as read or as laid out by
    /// [`Header::layout_backing`].
    pub backing_file_offset: u64,
    /// Length of the backing file name in bytes (0 without one).
    pub backing_file_size: u32,
    /// Bytes 112..`header_length` of a version 3 header: fields this implementation
    /// does not know, written back unchanged.
    pub unknown_fields: Vec<u8>,
}

fn field(field: &'static str, value: u64, why: &'static str) -> HeaderError {
    HeaderError::Field {
        field,
        offset: field_offset(field),
        value,
        why,
    }
}

/// Where the fixed-header field `name` lies, as the raw header structs place it.
fn field_offset(name: &str) -> Option<u64> {
    use std::mem::offset_of;
    let tail = |at: usize| Some((std::mem::size_of::<RawHeaderV2>() + at) as u64);
    match name {
        "magic" => Some(offset_of!(RawHeaderV2, magic) as u64),
        "version" => Some(offset_of!(RawHeaderV2, version) as u64),
        "backing_file_offset" => Some(offset_of!(RawHeaderV2, backing_file_offset) as u64),
        "backing_file_size" => Some(offset_of!(RawHeaderV2, backing_file_size) as u64),
        "cluster_bits" => Some(offset_of!(RawHeaderV2, cluster_bits) as u64),
        "size" => Some(offset_of!(RawHeaderV2, size) as u64),
        "crypt_method" => Some(offset_of!(RawHeaderV2, crypt_method) as u64),
        "l1_size" => Some(offset_of!(RawHeaderV2, l1_size) as u64),
        "l1_table_offset" => Some(offset_of!(RawHeaderV2, l1_table_offset) as u64),
        "refcount_table_offset" => Some(offset_of!(RawHeaderV2, refcount_table_offset) as u64),
        "refcount_table_clusters" => Some(offset_of!(RawHeaderV2, refcount_table_clusters) as u64),
        "nb_snapshots" => Some(offset_of!(RawHeaderV2, nb_snapshots) as u64),
        "snapshots_offset" => Some(offset_of!(RawHeaderV2, snapshots_offset) as u64),
        "incompatible_features" => tail(offset_of!(RawHeaderV3Tail, incompatible_features)),
        "compatible_features" => tail(offset_of!(RawHeaderV3Tail, compatible_features)),
        "autoclear_features" => tail(offset_of!(RawHeaderV3Tail, autoclear_features)),
        "refcount_order" => tail(offset_of!(RawHeaderV3Tail, refcount_order)),
        "header_length" => tail(offset_of!(RawHeaderV3Tail, header_length)),
        "compression_type" => tail(offset_of!(RawHeaderV3Tail, compression_type)),
        _ => None,
    }
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 128-bit extended entries.
    pub fn extended_l2(&self) -> bool {
        self.incompatible.contains(Incompatible::EXTENDED_L2)
    }

    /// How many bytes at the start of a file [`Header::parse`] needs: its first
    /// cluster, as the `cluster_bits` field of `prefix` (the file's first bytes, at
    /// least [`HEADER_PROBE_LEN`] of them or the whole file) gives it, at most
    /// `file_len`. A field out of range counts as the largest cluster size; `parse`
    /// then reports it.
    pub fn first_cluster_len(prefix: &[u8], file_len: u64) -> u64 {
        let bits = RawHeaderV2::read_from_prefix(prefix)
            .map(|(raw, _)| raw.cluster_bits.get())
            .ok()
            .filter(|b| (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(b))
            .unwrap_or(MAX_CLUSTER_BITS);
        file_len.min(1 << bits)
    }

    /// Parses and validates a header from the first cluster of a file.
    ///
    /// `first` holds at least the first `min(file_len, 2 MiB)` bytes; `file_len` is the
    /// length of the whole file.
    pub fn parse(first: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        let (raw, _) = RawHeaderV2::read_from_prefix(first)
            .map_err(|_| HeaderError::Truncated { len: file_len })?;
        if raw.magic.get() != QCOW_MAGIC {
            return Err(HeaderError::BadMagic(raw.magic.get()));
        }
        let version = raw.version.get();
        if version != 2 && version != 3 {
            return Err(field("version", version.into(), "must be 2 or 3"));
        }
        let cluster_bits = raw.cluster_bits.get();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(field(
                "cluster_bits",
                cluster_bits.into(),
                "must be between 9 (512 B) and 21 (2 MiB)",
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let crypt = raw.crypt_method.get();
        if crypt != 0 {
            return Err(HeaderError::Encrypted(crypt));
        }

        let (mut incompatible_raw, compatible, autoclear, refcount_order, header_length, ctype) =
            if version == 3 {
                let (tail, _) = RawHeaderV3Tail::read_from_prefix(&first[72.min(first.len())..])
                    .map_err(|_| HeaderError::Truncated { len: file_len })?;
                let hl = tail.header_length.get();
                if hl < 104 || hl % 8 != 0 || u64::from(hl) > cluster_size {
                    return Err(field(
                        "header_length",
                        hl.into(),
                        "must be at least 104, a multiple of 8 and within the first cluster",
                    ));
                }
                let ctype = if hl > 104 { tail.compression_type } else { 0 };
                (
                    tail.incompatible_features.get(),
                    tail.compatible_features.get(),
                    tail.autoclear_features.get(),
                    tail.refcount_order.get(),
                    hl,
                    ctype,
                )
            } else {
                (0, 0, 0, 4, V2_HEADER_LEN, 0)
            };
        if refcount_order > 6 {
            return Err(field(
                "refcount_order",
                refcount_order.into(),
                "must be at most 6 (64-bit refcounts)",
            ));
        }

        // Extensions follow the header; parse them before judging feature bits so the
        // feature name table can name unknown bits.
        let backing_offset = raw.backing_file_offset.get();
        let backing_size = raw.backing_file_size.get();
        let ext_end = if backing_offset != 0 {
            backing_offset
        } else {
            cluster_size
        };
        // Version 2 images carry extensions too (QEMU writes the backing format one
        // into them), right after the 72-byte header.
        let extensions =
            Extensions::parse(first, u64::from(header_length), ext_end.min(cluster_size))?;

        let unknown = incompatible_raw & !Incompatible::all().bits();
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1 << b) != 0)
                .map(
                    |b| match extensions.feature_name(FeatureKind::Incompatible, b) {
                        Some(n) => format!("bit {b} ({n})"),
                        None => format!("bit {b}"),
                    },
                )
                .collect();
            return Err(HeaderError::UnknownIncompatible(names.join(", ")));
        }
        let incompatible = Incompatible::from_bits_truncate(incompatible_raw);
        incompatible_raw = incompatible.bits();
        let _ = incompatible_raw;

        match ctype {
            0 => {}
            1 => {
                if !incompatible.contains(Incompatible::COMPRESSION_TYPE) {
                    return Err(field(
                        "compression_type",
                        1,
                        "zstd requires the compression type incompatible bit (3)",
                    ));
                }
            }
            other => {
                return Err(field(
                    "compression_type",
                    other.into(),
                    "must be 0 (deflate) or 1 (zstd)",
                ))
            }
        }
        if incompatible.contains(Incompatible::EXTENDED_L2) && cluster_bits < 14 {
            return Err(field(
                "cluster_bits",
                cluster_bits.into(),
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }

        let size = raw.size.get();
        if size > MAX_VIRTUAL_SIZE {
            return Err(field("size", size, "is larger than 2^56 bytes"));
        }
        let l1_size = raw.l1_size.get();
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(field(
                "l1_size",
                l1_size.into(),
                "L1 table larger than 32 MiB",
            ));
        }
        let entry_bytes: u64 = if incompatible.contains(Incompatible::EXTENDED_L2) {
            16
        } else {
            8
        };
        let bytes_per_l1 = cluster_size * (cluster_size / entry_bytes);
        let needed = size.div_ceil(bytes_per_l1);
        if u64::from(l1_size) < needed {
            return Err(field(
                "l1_size",
                l1_size.into(),
                "L1 table too small for the virtual size",
            ));
        }
        let l1_table_offset = raw.l1_table_offset.get();
        if l1_table_offset % cluster_size != 0 || (l1_size > 0 && l1_table_offset == 0) {
            return Err(field(
                "l1_table_offset",
                l1_table_offset,
                "must be a nonzero multiple of the cluster size",
            ));
        }
        if l1_size > 0 && l1_table_offset.saturating_add(u64::from(l1_size) * 8) > file_len {
            return Err(field(
                "l1_table_offset",
                l1_table_offset,
                "L1 table extends past the end of the file",
            ));
        }
        let refcount_table_offset = raw.refcount_table_offset.get();
        let refcount_table_clusters = raw.refcount_table_clusters.get();
        if refcount_table_offset % cluster_size != 0 || refcount_table_offset == 0 {
            return Err(field(
                "refcount_table_offset",
                refcount_table_offset,
                "must be a nonzero multiple of the cluster size",
            ));
        }
        if u64::from(refcount_table_clusters) * cluster_size > MAX_REFTABLE_BYTES
            || refcount_table_clusters == 0
        {
            return Err(field(
                "refcount_table_clusters",
                refcount_table_clusters.into(),
                "must be between 1 and 8 MiB worth of clusters",
            ));
        }
        if refcount_table_offset.saturating_add(u64::from(refcount_table_clusters) * cluster_size)
            > file_len.next_multiple_of(cluster_size)
        {
            return Err(field(
                "refcount_table_offset",
                refcount_table_offset,
                "refcount table extends past the end of the file",
            ));
        }
        let nb_snapshots = raw.nb_snapshots.get();
        if nb_snapshots > MAX_SNAPSHOTS {
            return Err(field(
                "nb_snapshots",
                nb_snapshots.into(),
                "more than 65536 snapshots",
            ));
        }
        let snapshots_offset = raw.snapshots_offset.get();
        // Alignment is required even of an empty table, as QEMU requires it.
        if snapshots_offset % cluster_size != 0
            || (nb_snapshots > 0 && (snapshots_offset == 0 || snapshots_offset >= file_len))
        {
            return Err(field(
                "snapshots_offset",
                snapshots_offset,
                "must be a nonzero cluster-aligned offset inside the file",
            ));
        }

        let backing_file = if backing_offset != 0 {
            if backing_size == 0 || backing_size > MAX_BACKING_NAME {
                return Err(field(
                    "backing_file_size",
                    backing_size.into(),
                    "must be between 1 and 1023",
                ));
            }
            let end = backing_offset + u64::from(backing_size);
            if backing_offset < u64::from(header_length) || end > cluster_size {
                return Err(field(
                    "backing_file_offset",
                    backing_offset,
                    "backing file name must lie in the first cluster, after the header",
                ));
            }
            if end > first.len() as u64 {
                return Err(HeaderError::Truncated { len: file_len });
            }
            let bytes = &first[backing_offset as usize..end as usize];
            Some(String::from_utf8_lossy(bytes).into_owned())
        } else {
            None
        };

        let unknown_fields = if version == 3 && header_length > V3_HEADER_LEN {
            first
                .get(V3_HEADER_LEN as usize..header_length as usize)
                .ok_or(HeaderError::Truncated { len: file_len })?
                .to_vec()
        } else {
            Vec::new()
        };
        Ok(Header {
            backing_file_offset: if backing_file.is_some() {
                backing_offset
            } else {
                0
            },
            backing_file_size: if backing_file.is_some() {
                backing_size
            } else {
                0
            },
            unknown_fields,
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            compression_type: ctype,
            extensions,
            backing_file,
        })
    }

    /// The header fields this implementation knows: the first 72 bytes (version 2) or
    /// the first `min(header_length, 112)` bytes (version 3).
    ///
    /// Every field that changes at a commit point lies in these bytes, which fit in the
    /// first 512-byte sector, so writing them is a single-sector write. Bytes past them
    /// (unknown fields, extensions, the backing file name) are never rewritten after
    /// the image is created.
    pub fn commit_bytes(&self) -> Vec<u8> {
        let mut out = self.fixed_bytes();
        let n = if self.version == 3 {
            (self.header_length as usize).min(V3_HEADER_LEN as usize)
        } else {
            V2_HEADER_LEN as usize
        };
        out.truncate(n);
        out
    }

    /// Bytes of the header structure: `header_length` (version 3) or 72 (version 2).
    /// The extensions start there.
    pub fn fixed_len(&self) -> u32 {
        if self.version == 3 {
            self.header_length
        } else {
            V2_HEADER_LEN
        }
    }

    /// The whole header structure (`header_length` bytes; 72 for version 2), unknown
    /// fields included.
    pub fn fixed_bytes(&self) -> Vec<u8> {
        let raw = RawHeaderV2 {
            magic: QCOW_MAGIC.into(),
            version: self.version.into(),
            backing_file_offset: self.backing_file_offset.into(),
            backing_file_size: self.backing_file_size.into(),
            cluster_bits: self.cluster_bits.into(),
            size: self.size.into(),
            crypt_method: 0.into(),
            l1_size: self.l1_size.into(),
            l1_table_offset: self.l1_table_offset.into(),
            refcount_table_offset: self.refcount_table_offset.into(),
            refcount_table_clusters: self.refcount_table_clusters.into(),
            nb_snapshots: self.nb_snapshots.into(),
            snapshots_offset: self.snapshots_offset.into(),
        };
        let mut out = raw.as_bytes().to_vec();
        if self.version == 3 {
            let tail = RawHeaderV3Tail {
                incompatible_features: self.incompatible.bits().into(),
                compatible_features: self.compatible.into(),
                autoclear_features: self.autoclear.into(),
                refcount_order: self.refcount_order.into(),
                header_length: self.header_length.into(),
                compression_type: self.compression_type,
                padding: [0; 7],
            };
            out.extend_from_slice(tail.as_bytes());
            out.truncate(self.header_length as usize);
            out.extend_from_slice(&self.unknown_fields);
            out.resize(self.header_length as usize, 0);
        }
        out
    }

    /// Places the backing file name right after the extensions (for a new header).
    pub fn layout_backing(&mut self) {
        let Some(b) = &self.backing_file else {
            self.backing_file_offset = 0;
            self.backing_file_size = 0;
            return;
        };
        let mut tail = Vec::new();
        for ext in self.extensions.iter() {
            ext.write_to(&mut tail);
        }
        Extension::end().write_to(&mut tail);
        self.backing_file_offset = (self.fixed_len() as usize + tail.len()) as u64;
        self.backing_file_size = b.len() as u32;
    }

    /// The whole first cluster of a new image: header, extensions, end marker, and the
    /// backing file name where [`Header::layout_backing`] placed it.
    ///
    /// Returns `None` when it does not fit in one cluster.
    pub fn to_cluster(&self) -> Option<Vec<u8>> {
        let mut out = self.area_bytes()?;
        out.resize(self.cluster_size() as usize, 0);
        Some(out)
    }

    /// Where the data of the extension of type `kind` lies in the file, with the extensions laid out as [`Header::to_cluster`] writes them and as
    /// [`Extensions::parse`] read them.
    pub fn extension_data_offset(&self, kind: u32) -> Option<u64> {
        let mut pos = u64::from(self.fixed_len());
        for ext in self.extensions.iter() {
            if ext.kind == kind {
                return Some(pos + 8);
            }
            pos += 8 + (ext.data.len() as u64).next_multiple_of(8);
        }
        None
    }

    /// The header area [`Header::to_cluster`] writes, without the padding after the
    /// backing file name (or the end marker). `None` when it does not fit.
    pub fn area_bytes(&self) -> Option<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut out = self.fixed_bytes();
        for ext in self.extensions.iter() {
            ext.write_to(&mut out);
        }
        Extension::end().write_to(&mut out);
        if let Some(b) = &self.backing_file {
            let at = self.backing_file_offset as usize;
            if at < out.len() || b.len() != self.backing_file_size as usize {
                return None;
            }
            out.resize(at, 0);
            out.extend_from_slice(b.as_bytes());
        }
        if out.len() > cs {
            return None;
        }
        Some(out)
    }

    /// The backing format named by the backing-format extension, if any.
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.backing_format()
    }
}
