//! Persistent dirty bitmaps: the bitmaps header extension, the bitmap directory and
//! bitmap tables, as QCOW2 lays them out. Bytes ⇄ types only; loading and storing
//! live in `engine::bitmaps`.
//!
//! - The extension (type `0x23852875`, 24 bytes): `nb_bitmaps: u32, reserved: u32,
//!   bitmap_directory_size: u64, bitmap_directory_offset: u64`.
//! - The directory: one entry per bitmap, each a 24-byte fixed part, extra data, the
//!   name (not NUL-terminated), padded to 8 bytes.
//! - A bitmap table: one u64 per cluster of bitmap data; bits 9–55 are the data
//!   cluster's offset, 0 with bit 0 clear reads as all zeros, 0 with bit 0 set as all
//!   ones.
//! - Bitmap data: bit `i` (byte `i / 8`, bit `i % 8` from the least significant)
//!   covers guest bytes `[i << granularity_bits, (i + 1) << granularity_bits)`.

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::format::extensions::{Extension, EXT_BITMAPS};

/// Bitmap flag bit 0: the bitmap is in use (open for writing by a program that
/// maintains it, or left so by a crash): its data cannot be trusted.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap flag bit 1: the bitmap is enabled (tracks writes).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Bitmap flag bit 2: extra data may be ignored by programs that do not know it.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Every flag bit QCOW2 defines.
pub const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// The one bitmap type QCOW2 defines: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// The most bitmaps an image may have.
pub const MAX_BITMAPS: u32 = 65535;
/// The largest bitmap directory.
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// The longest bitmap name, in bytes.
pub const MAX_NAME_BYTES: usize = 1023;
/// Smallest and largest granularity (log2 of bytes per bit).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// See [`MIN_GRANULARITY_BITS`].
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// The most bitmap data qcowx keeps in memory for one bitmap (a bitmap larger than
/// this is refused: e.g. a 512 TiB disk at 4 KiB granularity).
pub const MAX_DATA_BYTES: u64 = 512 << 20;
/// The most bitmap data of all the bitmaps of an image together (what a writable open
/// holds in memory).
pub const MAX_TOTAL_DATA_BYTES: u64 = 1 << 30;
/// Table entry bits holding the data cluster's offset.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Table entry bit 0: with offset 0, the cluster reads as all ones.
pub const TABLE_ALL_ONES: u64 = 1;

/// The bitmaps extension's data.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawBitmapsExt {
    /// Bitmaps in the directory.
    pub nb_bitmaps: U32,
    /// Must be zero.
    pub reserved: U32,
    /// Bytes of the directory.
    pub directory_size: U64,
    /// Offset of the directory (cluster aligned).
    pub directory_offset: U64,
}

/// The fixed part of a bitmap directory entry.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawDirEntry {
    /// Offset of the bitmap table (cluster aligned).
    pub table_offset: U64,
    /// Entries of the bitmap table.
    pub table_size: U32,
    /// [`FLAG_IN_USE`], [`FLAG_AUTO`], [`FLAG_EXTRA_DATA_COMPATIBLE`].
    pub flags: U32,
    /// [`TYPE_DIRTY_TRACKING`].
    pub kind: u8,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// Bytes of the name.
    pub name_size: U16,
    /// Bytes of extra data before the name.
    pub extra_data_size: U32,
}

const ENTRY_FIXED: usize = std::mem::size_of::<RawDirEntry>();

/// What is wrong with a bitmaps extension or directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The extension is not 24 bytes, or its reserved field is not zero.
    #[error("bitmaps extension: {0}")]
    Extension(String),
    /// The directory is too large, misaligned or truncated.
    #[error("bitmap directory at {offset:#x}: {why}")]
    Directory {
        /// Directory offset.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// One entry is invalid.
    #[error("bitmap '{name}' (directory entry {index}): {why}")]
    Entry {
        /// Entry index.
        index: usize,
        /// Its name (lossy).
        name: String,
        /// What is wrong.
        why: String,
    },
}

/// The extension's fields.
///
/// ```
/// use qcowx_core::format::bitmap::BitmapsExt;
/// use qcowx_core::format::extensions::EXT_BITMAPS;
///
/// let ext = BitmapsExt { nb_bitmaps: 1, directory_size: 32, directory_offset: 0x4_0000 };
/// let raw = ext.to_extension();
/// assert_eq!((raw.kind, raw.data.len()), (EXT_BITMAPS, 24));
/// assert_eq!(BitmapsExt::parse(&raw.data, 65536).unwrap(), ext);
/// // A directory that is not cluster-aligned is refused.
/// let bad = BitmapsExt { directory_offset: 0x4_0200, ..ext }.to_extension();
/// assert!(BitmapsExt::parse(&bad.data, 65536).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitmapsExt {
    /// Bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Bytes of the directory.
    pub directory_size: u64,
    /// Offset of the directory.
    pub directory_offset: u64,
}

impl BitmapsExt {
    /// Parses and bounds-checks the extension's data.
    pub fn parse(data: &[u8], cluster_size: u64) -> Result<BitmapsExt, BitmapError> {
        let raw = RawBitmapsExt::read_from_bytes(data)
            .map_err(|_| BitmapError::Extension(format!("{} bytes, not 24", data.len())))?;
        let ext = BitmapsExt {
            nb_bitmaps: raw.nb_bitmaps.get(),
            directory_size: raw.directory_size.get(),
            directory_offset: raw.directory_offset.get(),
        };
        let bad = |why: String| Err(BitmapError::Extension(why));
        if raw.reserved.get() != 0 {
            return bad("reserved field is not zero".into());
        }
        if ext.nb_bitmaps == 0 || ext.nb_bitmaps > MAX_BITMAPS {
            return bad(format!("{} bitmaps (1 to {MAX_BITMAPS})", ext.nb_bitmaps));
        }
        if ext.directory_size > MAX_DIRECTORY_BYTES
            || ext.directory_size < u64::from(ext.nb_bitmaps) * ENTRY_FIXED as u64
        {
            return bad(format!(
                "directory of {} bytes for {} bitmaps",
                ext.directory_size, ext.nb_bitmaps
            ));
        }
        if ext.directory_offset == 0 || !ext.directory_offset.is_multiple_of(cluster_size) {
            return bad(format!(
                "directory offset {:#x} is not a nonzero cluster-aligned offset",
                ext.directory_offset
            ));
        }
        Ok(ext)
    }

    /// The extension holding these fields.
    pub fn to_extension(self) -> Extension {
        let raw = RawBitmapsExt {
            nb_bitmaps: self.nb_bitmaps.into(),
            reserved: 0.into(),
            directory_size: self.directory_size.into(),
            directory_offset: self.directory_offset.into(),
        };
        Extension {
            kind: EXT_BITMAPS,
            data: raw.as_bytes().to_vec(),
        }
    }
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    /// Flag bits.
    pub flags: u32,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// The name.
    pub name: String,
    /// Extra data, kept as read.
    pub extra: Vec<u8>,
}

/// Entries of the table of a bitmap of `disk_size` bytes at `granularity_bits`, with
/// `cluster_size` bytes of data per entry.
///
/// ```
/// use qcowx_core::format::bitmap::table_entries;
///
/// // 1 TiB at 64 KiB a bit: 2 MiB of bitmap, 32 clusters of 64 KiB.
/// assert_eq!(table_entries(1 << 40, 16, 65536), 32);
/// ```
pub fn table_entries(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    data_bytes(disk_size, granularity_bits).div_ceil(cluster_size)
}

/// Bytes of data of a bitmap of `disk_size` bytes at `granularity_bits`.
///
/// ```
/// use qcowx_core::format::bitmap::data_bytes;
///
/// assert_eq!(data_bytes(1 << 30, 16), 2048); // 16384 bits
/// assert_eq!(data_bytes(1, 16), 1);
/// ```
pub fn data_bytes(disk_size: u64, granularity_bits: u8) -> u64 {
    disk_size
        .div_ceil(1u64 << granularity_bits.min(63))
        .div_ceil(8)
}

/// Why `name` cannot name a bitmap, if it cannot.
///
/// ```
/// use qcowx_core::format::bitmap::check_name;
///
/// assert!(check_name("backup-1").is_ok());
/// assert!(check_name("").is_err());
/// assert!(check_name(&"x".repeat(1024)).is_err());
/// ```
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a bitmap name cannot be empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "a bitmap name is at most {MAX_NAME_BYTES} bytes, not {}",
            name.len()
        ));
    }
    Ok(())
}

/// Parses a directory of `ext.nb_bitmaps` entries from `dir`, checking each against
/// the image (`disk_size`, `cluster_size`, `file_len`).
///
/// ```
/// use qcowx_core::format::bitmap::{encode_directory, parse_directory, table_entries, BitmapsExt, DirEntry};
///
/// let disk = 1u64 << 30;
/// let entry = DirEntry {
///     table_offset: 0x5_0000,
///     table_size: table_entries(disk, 16, 65536) as u32,
///     flags: 2, // auto: tracks writes
///     granularity_bits: 16,
///     name: "backup".into(),
///     extra: Vec::new(),
/// };
/// let dir = encode_directory(&[entry.clone()]);
/// let ext = BitmapsExt { nb_bitmaps: 1, directory_size: dir.len() as u64, directory_offset: 0x4_0000 };
/// let parsed = parse_directory(&dir, &ext, disk, 65536, 1 << 20).unwrap();
/// assert_eq!(parsed, [entry]);
/// // A table past the end of the file is refused.
/// assert!(parse_directory(&dir, &ext, disk, 65536, 0x5_0000).is_err());
/// ```
pub fn parse_directory(
    dir: &[u8],
    ext: &BitmapsExt,
    disk_size: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<Vec<DirEntry>, BitmapError> {
    let dir_err = |why: String| BitmapError::Directory {
        offset: ext.directory_offset,
        why,
    };
    let mut out: Vec<DirEntry> = Vec::new();
    let mut pos = 0usize;
    let mut total = 0u64;
    for index in 0..ext.nb_bitmaps as usize {
        let fixed = dir
            .get(pos..pos + ENTRY_FIXED)
            .ok_or_else(|| dir_err(format!("entry {index} runs past the directory")))?;
        let raw = RawDirEntry::read_from_bytes(fixed)
            .map_err(|_| dir_err(format!("entry {index} is truncated")))?;
        let extra_len = raw.extra_data_size.get() as usize;
        let name_len = usize::from(raw.name_size.get());
        let body = pos + ENTRY_FIXED;
        let end = body
            .checked_add(extra_len)
            .and_then(|e| e.checked_add(name_len))
            .filter(|e| *e <= dir.len())
            .ok_or_else(|| dir_err(format!("entry {index} runs past the directory")))?;
        let extra = dir[body..body + extra_len].to_vec();
        let name = String::from_utf8_lossy(&dir[body + extra_len..end]).into_owned();
        let entry = DirEntry {
            table_offset: raw.table_offset.get(),
            table_size: raw.table_size.get(),
            flags: raw.flags.get(),
            granularity_bits: raw.granularity_bits,
            name,
            extra,
        };
        let bad = |why: String| BitmapError::Entry {
            index,
            name: entry.name.clone(),
            why,
        };
        if raw.kind != TYPE_DIRTY_TRACKING {
            return Err(bad(format!("type {} is not dirty tracking (1)", raw.kind)));
        }
        if entry.flags & !KNOWN_FLAGS != 0 {
            return Err(bad(format!("unknown flags {:#x}", entry.flags)));
        }
        if !entry.extra.is_empty() && entry.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return Err(bad("extra data that must be understood".into()));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&entry.granularity_bits) {
            return Err(bad(format!(
                "granularity bits {} (9 to 31)",
                entry.granularity_bits
            )));
        }
        check_name(&entry.name).map_err(bad)?;
        if out.iter().any(|e| e.name == entry.name) {
            return Err(bad("the name is used twice".into()));
        }
        let want = table_entries(disk_size, entry.granularity_bits, cluster_size);
        if u64::from(entry.table_size) != want {
            return Err(bad(format!(
                "table of {} entries, the disk needs {want}",
                entry.table_size
            )));
        }
        let bytes = data_bytes(disk_size, entry.granularity_bits);
        total += bytes;
        if bytes > MAX_DATA_BYTES || total > MAX_TOTAL_DATA_BYTES {
            return Err(bad(format!(
                "more than {MAX_DATA_BYTES} bytes of bitmap data, or more than \
                 {MAX_TOTAL_DATA_BYTES} for all bitmaps together"
            )));
        }
        let table_end = entry
            .table_offset
            .checked_add(u64::from(entry.table_size) * 8);
        if entry.table_offset == 0
            || !entry.table_offset.is_multiple_of(cluster_size)
            || table_end.is_none_or(|e| e > file_len.next_multiple_of(cluster_size))
        {
            return Err(bad(format!(
                "table offset {:#x} is not a cluster-aligned offset in the file",
                entry.table_offset
            )));
        }
        pos = end.next_multiple_of(8);
        out.push(entry);
    }
    Ok(out)
}

/// The directory holding `entries`, laid out as [`parse_directory`] reads it.
///
/// ```
/// use qcowx_core::format::bitmap::{encode_directory, DirEntry};
///
/// let e = DirEntry { table_offset: 0, table_size: 1, flags: 0, granularity_bits: 16, name: "abc".into(), extra: vec![] };
/// let dir = encode_directory(&[e.clone(), e]);
/// assert_eq!(dir.len(), 2 * 32, "24 fixed bytes, the name, padding to 8");
/// ```
pub fn encode_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let raw = RawDirEntry {
            table_offset: e.table_offset.into(),
            table_size: e.table_size.into(),
            flags: e.flags.into(),
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: e.granularity_bits,
            name_size: (e.name.len() as u16).into(),
            extra_data_size: (e.extra.len() as u32).into(),
        };
        out.extend_from_slice(raw.as_bytes());
        out.extend_from_slice(&e.extra);
        out.extend_from_slice(e.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

/// Byte offset of the flags field of every entry of a directory laid out as
/// [`encode_directory`] lays out `entries`.
///
/// ```
/// use qcowx_core::format::bitmap::{encode_directory, flag_offsets, DirEntry};
///
/// let e = DirEntry { table_offset: 0, table_size: 1, flags: 0x0102_0304, granularity_bits: 16, name: "a".into(), extra: vec![] };
/// let entries = [e.clone(), e];
/// let dir = encode_directory(&entries);
/// for at in flag_offsets(&entries) {
///     assert_eq!(&dir[at..at + 4], &[1, 2, 3, 4]); // big-endian flags
/// }
/// ```
pub fn flag_offsets(entries: &[DirEntry]) -> Vec<usize> {
    let mut out = Vec::with_capacity(entries.len());
    let mut pos = 0usize;
    for e in entries {
        out.push(pos + std::mem::offset_of!(RawDirEntry, flags));
        pos = (pos + ENTRY_FIXED + e.extra.len() + e.name.len()).next_multiple_of(8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> DirEntry {
        DirEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags: FLAG_AUTO,
            granularity_bits: 16,
            name: name.into(),
            extra: Vec::new(),
        }
    }

    #[test]
    fn directory_round_trips_and_flags_are_found() {
        let entries = vec![entry("b0"), entry("a-longer-name")];
        let dir = encode_directory(&entries);
        let ext = BitmapsExt {
            nb_bitmaps: 2,
            directory_size: dir.len() as u64,
            directory_offset: 0x10000,
        };
        let back = parse_directory(&dir, &ext, 1 << 30, 65536, 1 << 20).unwrap();
        assert_eq!(back, entries);
        for off in flag_offsets(&entries) {
            assert_eq!(dir[off..off + 4], FLAG_AUTO.to_be_bytes());
        }
        let parsed = BitmapsExt::parse(&ext.to_extension().data, 65536).unwrap();
        assert_eq!(parsed, ext);
    }

    #[test]
    fn hostile_entries_are_refused() {
        let mut e = entry("x");
        e.table_size = 99;
        let dir = encode_directory(&[e]);
        let ext = BitmapsExt {
            nb_bitmaps: 1,
            directory_size: dir.len() as u64,
            directory_offset: 0x10000,
        };
        let err = parse_directory(&dir, &ext, 1 << 30, 65536, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("table of 99 entries"), "{err}");
        // A directory claiming more entries than it holds.
        let ext2 = BitmapsExt {
            nb_bitmaps: 5,
            ..ext
        };
        assert!(parse_directory(&dir, &ext2, 1 << 30, 65536, 1 << 20).is_err());
        assert!(BitmapsExt::parse(&[0u8; 23], 65536).is_err());
    }
}
