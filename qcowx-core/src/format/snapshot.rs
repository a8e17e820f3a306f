//! The QCOW2 snapshot table: every root other than the active L1 is listed here.

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Largest snapshot table QEMU opens, in bytes (QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data QEMU accepts per snapshot entry.
pub const MAX_EXTRA_DATA: u32 = 1024;

/// The fixed 40-byte head of a snapshot table entry.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSnapshotHeader {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: U64,
    /// Entries in that L1 table.
    pub l1_size: U32,
    /// Length of the ID string.
    pub id_str_size: U16,
    /// Length of the name.
    pub name_size: U16,
    /// Creation time, seconds.
    pub date_sec: U32,
    /// Creation time, nanoseconds.
    pub date_nsec: U32,
    /// Guest clock when taken.
    pub vm_clock_nsec: U64,
    /// VM state size (32-bit).
    pub vm_state_size: U32,
    /// Length of the extra data.
    pub extra_data_size: U32,
}

/// One parsed snapshot table entry.
///
/// ```
/// use qcowx_core::format::snapshot::{parse_table, RawQemuExtra, SnapshotEntry};
/// use zerocopy::IntoBytes;
///
/// let mut e = SnapshotEntry {
///     l1_table_offset: 0x5_0000,
///     l1_size: 2,
///     id: "1".into(),
///     name: "before".into(),
///     date_sec: 1_700_000_000,
///     date_nsec: 0,
///     vm_clock_nsec: 0,
///     vm_state_size: 0,
///     extra: Vec::new(), // as a version 2 image may leave it
/// };
/// assert!(e.is_incomplete(3) && !e.is_incomplete(2));
/// assert_eq!((e.disk_size(), e.vm_state_size()), (None, 0));
/// e.complete_extra(1 << 30);
/// assert_eq!(e.disk_size(), Some(1 << 30));
/// assert_eq!(e.extra, RawQemuExtra::new(1 << 30, 0).as_bytes()[..16]);
/// assert_eq!(e.icount(), None); // the 16 bytes a version 3 entry needs hold none
/// assert_eq!(e.l1_problem(65536), None);
///
/// let mut table = Vec::new();
/// e.write_to(&mut table);
/// assert_eq!(table.len(), e.encoded_len());
/// assert_eq!(parse_table(&table, 0x10_0000, 1).unwrap(), [e.clone()]);
/// e.l1_table_offset = 0x5_0200;
/// assert!(e.l1_problem(65536).is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// ID string (QEMU numbers them).
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock when taken.
    pub vm_clock_nsec: u64,
    /// VM state size (32-bit field).
    pub vm_state_size: u32,
    /// Extra data, kept byte-for-byte (QEMU defines the first 24 bytes).
    pub extra: Vec<u8>,
}

/// What is wrong with the snapshot table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// An entry runs past the end of the table or file.
    #[error("snapshot table entry {index} at offset {offset:#x} is truncated")]
    Truncated {
        /// Entry index.
        index: u32,
        /// Byte offset of the entry.
        offset: u64,
    },
    /// A field is out of range.
    #[error("snapshot table entry {index} at offset {offset:#x}: {why}")]
    Invalid {
        /// Entry index.
        index: u32,
        /// Byte offset of the entry.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
}

/// Extra data a version 3 entry must carry: the 64-bit VM state size and the disk size.
pub const V3_MIN_EXTRA: usize = 16;

/// Bytes QEMU defines at the start of snapshot extra data ([`RawQemuExtra`]).
pub const QEMU_EXTRA_BYTES: usize = 24;

/// The extra data QEMU defines, at the start of every entry's extra data (an entry
/// may carry less of it: only the fields that fit are present).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawQemuExtra {
    /// VM state size, 64-bit (supersedes the entry's 32-bit field).
    pub vm_state_size_large: U64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: U64,
    /// Instruction count of the guest.
    pub icount: U64,
}
const _: () = assert!(std::mem::size_of::<RawQemuExtra>() == QEMU_EXTRA_BYTES);

impl RawQemuExtra {
    /// QEMU's fields for a root of `disk_size` bytes with `vm_state_size` bytes of VM
    /// state.
    ///
    /// ```
    /// use qcowx_core::format::snapshot::{RawQemuExtra, QEMU_EXTRA_BYTES};
    /// use zerocopy::IntoBytes;
    ///
    /// let extra = RawQemuExtra::new(1 << 30, 0);
    /// assert_eq!(extra.disk_size.get(), 1 << 30);
    /// assert_eq!(extra.as_bytes().len(), QEMU_EXTRA_BYTES);
    /// ```
    pub fn new(disk_size: u64, vm_state_size: u64) -> RawQemuExtra {
        RawQemuExtra {
            vm_state_size_large: vm_state_size.into(),
            disk_size: disk_size.into(),
            icount: 0.into(),
        }
    }
}

impl SnapshotEntry {
    /// The 64-bit field at `at` of QEMU's extra data, when the entry carries it.
    fn qemu_field(&self, at: usize) -> Option<u64> {
        let bytes = self.extra.get(at..at + 8)?;
        U64::read_from_bytes(bytes).ok().map(U64::get)
    }

    /// The virtual disk size recorded in QEMU's extra data, if present.
    pub fn disk_size(&self) -> Option<u64> {
        self.qemu_field(std::mem::offset_of!(RawQemuExtra, disk_size))
    }

    /// The guest's instruction count recorded in QEMU's extra data: absent when the
    /// entry does not carry the field or holds QEMU's "none" (all ones).
    pub fn icount(&self) -> Option<u64> {
        self.qemu_field(std::mem::offset_of!(RawQemuExtra, icount))
            .filter(|&v| v != u64::MAX)
    }

    /// The VM state size: QEMU's 64-bit field in the extra data when present, else
    /// the entry's 32-bit field.
    pub fn vm_state_size(&self) -> u64 {
        self.qemu_field(std::mem::offset_of!(RawQemuExtra, vm_state_size_large))
            .unwrap_or(u64::from(self.vm_state_size))
    }

    /// What is wrong with the entry's L1 table reference, if anything: an offset that
    /// is not cluster-aligned (or 0 with entries: an entry with no L1 table at all,
    /// offset and size 0, is valid — a snapshot of an empty disk, as version 2 images
    /// may carry all-zero entries), or a size beyond `MAX_L1_BYTES`. The one rule every
    /// reader of a snapshot's L1 table applies.
    pub fn l1_problem(&self, cluster_size: u64) -> Option<&'static str> {
        let l1 = self.l1_table_offset;
        if !l1.is_multiple_of(cluster_size) || (l1 == 0 && self.l1_size != 0) {
            Some("L1 table offset is not a nonzero multiple of the cluster size")
        } else if u64::from(self.l1_size) * 8 > crate::format::header::MAX_L1_BYTES {
            Some("L1 table larger than 32 MiB")
        } else {
            None
        }
    }

    /// A version 3 entry that carries less extra data than version 3 requires (the
    /// 64-bit VM state size and the disk size, [`V3_MIN_EXTRA`] bytes): left by an
    /// upgrade from version 2 that did not rewrite the table.
    pub fn is_incomplete(&self, version: u32) -> bool {
        version >= 3 && self.extra.len() < V3_MIN_EXTRA
    }

    /// Completes an incomplete entry's extra data: the 64-bit VM state size from the
    /// entry's 32-bit field, and `disk_size` (the image's size, which the entry's
    /// snapshot had) where the entry lacks it. What the entry has is kept.
    pub fn complete_extra(&mut self, disk_size: u64) {
        if self.extra.len() >= V3_MIN_EXTRA {
            return;
        }
        let fields = RawQemuExtra::new(self.disk_size().unwrap_or(disk_size), self.vm_state_size());
        self.extra = fields.as_bytes()[..V3_MIN_EXTRA].to_vec();
    }

    /// Bytes this entry occupies in the table (padded to 8).
    pub fn encoded_len(&self) -> usize {
        (40 + self.extra.len() + fitted(&self.id).len() + fitted(&self.name).len())
            .next_multiple_of(8)
    }

    /// Appends the serialized entry to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let (id, name) = (fitted(&self.id), fitted(&self.name));
        let raw = RawSnapshotHeader {
            l1_table_offset: self.l1_table_offset.into(),
            l1_size: self.l1_size.into(),
            id_str_size: (id.len() as u16).into(),
            name_size: (name.len() as u16).into(),
            date_sec: self.date_sec.into(),
            date_nsec: self.date_nsec.into(),
            vm_clock_nsec: self.vm_clock_nsec.into(),
            vm_state_size: self.vm_state_size.into(),
            extra_data_size: (self.extra.len() as u32).into(),
        };
        let start = out.len();
        out.extend_from_slice(raw.as_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.resize(start + self.encoded_len(), 0);
    }
}

/// The longest prefix of `s`, cut at a character boundary, that an entry's 16-bit
/// length field can describe: what [`SnapshotEntry::write_to`] writes of an ID or a
/// name. Names are bounded when taken; this only shortens a field read from bytes
/// that were not UTF-8 (replacement characters write back longer than they were
/// read) and keeps the length field true whatever the struct holds.
fn fitted(s: &str) -> &str {
    let max = usize::from(u16::MAX);
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// An ID or name field as text: bytes that are not UTF-8 read as replacement
/// characters, and the result is cut to what the entry can write back
/// ([`fitted`]), so the entry in memory is the one written.
fn decode_field(bytes: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(bytes).into_owned();
    let keep = fitted(&s).len();
    s.truncate(keep);
    s
}

/// Whether `entries`, written back with [`SnapshotEntry::write_to`], are the bytes
/// `table` starts with: not when an ID or name was not UTF-8 (it is read with
/// replacement characters, which write back longer) or padding was not zeros. The
/// last entry's padding may lie past the end of `table`. Offsets computed from the
/// entries are the file's only when this holds.
pub(crate) fn encodes_as_read(entries: &[SnapshotEntry], table: &[u8]) -> bool {
    let mut bytes = Vec::new();
    for e in entries {
        e.write_to(&mut bytes);
    }
    let n = bytes.len().min(table.len());
    bytes[..n] == table[..n] && bytes.len() - n < 8 && bytes[n..].iter().all(|&b| b == 0)
}

/// Parses `count` entries from `table`, the bytes of the snapshot table starting at
/// file offset `base`.
///
/// ```
/// use qcowx_core::format::snapshot::{parse_table, SnapshotError};
///
/// // An entry cut short is refused, naming where it starts.
/// let e = parse_table(&[0u8; 20], 0x10_0000, 1).unwrap_err();
/// assert!(matches!(e, SnapshotError::Truncated { index: 0, offset: 0x10_0000 }));
/// assert!(parse_table(&[], 0, 0).unwrap().is_empty());
/// ```
pub fn parse_table(
    table: &[u8],
    base: u64,
    count: u32,
) -> Result<Vec<SnapshotEntry>, SnapshotError> {
    let mut out = Vec::with_capacity((count as usize).min(table.len() / 40 + 1));
    let mut pos = 0usize;
    let too_large = |index, offset| SnapshotError::Invalid {
        index,
        offset,
        why: "snapshot table larger than 64 MiB",
    };
    for index in 0..count {
        let offset = base + pos as u64;
        // Judged before truncation: callers read at most the limit, so an entry that
        // crosses it looks cut short.
        if (pos + 40) as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(too_large(index, offset));
        }
        let trunc = SnapshotError::Truncated { index, offset };
        let rest = table
            .get(pos..)
            .ok_or(SnapshotError::Truncated { index, offset })?;
        let (raw, _) = RawSnapshotHeader::read_from_prefix(rest).map_err(|_| trunc)?;
        let extra_len = raw.extra_data_size.get();
        if extra_len > MAX_EXTRA_DATA {
            return Err(SnapshotError::Invalid {
                index,
                offset,
                why: "extra data larger than 1024 bytes",
            });
        }
        let l1 = raw.l1_table_offset.get();
        // The entry's L1 table is judged where it is used (`SnapshotEntry::l1_problem`):
        // QEMU opens such an image, reads its active layer and reports the entry in
        // check, and so does qcowx.
        let id_len = usize::from(raw.id_str_size.get());
        let name_len = usize::from(raw.name_size.get());
        // QEMU pads entries to 8 bytes only between entries: the last entry's padding
        // may lie past the end of the file.
        let len = 40 + extra_len as usize + id_len + name_len;
        // QEMU's rule: no entry may end past the limit (padding excluded).
        if (pos + len) as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(too_large(index, offset));
        }
        let total = len.next_multiple_of(8);
        let Some(body) = rest.get(..len) else {
            return Err(SnapshotError::Truncated { index, offset });
        };
        let e0 = 40;
        let e1 = e0 + extra_len as usize;
        let i1 = e1 + id_len;
        let n1 = i1 + name_len;
        out.push(SnapshotEntry {
            l1_table_offset: l1,
            l1_size: raw.l1_size.get(),
            id: decode_field(&body[e1..i1]),
            name: decode_field(&body[i1..n1]),
            date_sec: raw.date_sec.get(),
            date_nsec: raw.date_nsec.get(),
            vm_clock_nsec: raw.vm_clock_nsec.get(),
            vm_state_size: raw.vm_state_size.get(),
            extra: body[e0..e1].to_vec(),
        });
        pos += total;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let e = SnapshotEntry {
            l1_table_offset: 0x30000,
            l1_size: 2,
            id: "1".into(),
            name: "base".into(),
            date_sec: 5,
            date_nsec: 6,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra: vec![0; 24],
        };
        let mut buf = vec![];
        e.write_to(&mut buf);
        e.write_to(&mut buf);
        let back = parse_table(&buf, 0, 2).unwrap();
        assert_eq!(back, vec![e.clone(), e]);
        assert!(parse_table(&buf[..30], 0, 1).is_err());
    }

    #[test]
    fn last_entry_padding_may_be_missing() {
        // QEMU does not write the padding after the last entry, so a table at the end
        // of the file can end mid-padding (40 + 24 + 1 + 10 = 75 bytes, padded to 80).
        let e = SnapshotEntry {
            l1_table_offset: 0x30000,
            l1_size: 1,
            id: "2".into(),
            name: "second one".into(),
            date_sec: 1,
            date_nsec: 2,
            vm_clock_nsec: 3,
            vm_state_size: 0,
            extra: vec![0; 24],
        };
        let mut buf = vec![];
        e.write_to(&mut buf);
        e.write_to(&mut buf);
        assert_eq!(buf.len(), 160);
        let back = parse_table(&buf[..155], 0, 2).unwrap();
        assert_eq!(back, vec![e.clone(), e]);
        assert!(parse_table(&buf[..154], 0, 2).is_err());
    }

    #[test]
    fn fields_not_utf8_write_back_within_their_length_fields() {
        // A name of 65 535 bytes, some not UTF-8: each invalid byte reads as a
        // three-byte replacement character, so the text is longer than the field
        // allows. It is cut where it fits, and the entry reads back as it was written.
        let mut name = vec![b'a'; 65_535];
        name[..100].fill(0xff);
        let mut raw = <RawSnapshotHeader as zerocopy::FromZeros>::new_zeroed();
        raw.name_size = 65_535.into();
        raw.id_str_size = 1.into();
        let mut table = raw.as_bytes().to_vec();
        table.push(b'7');
        table.extend_from_slice(&name);
        let e = parse_table(&table, 0, 1).unwrap().remove(0);
        assert!(e.name.len() <= 65_535 && e.name.starts_with('\u{fffd}'));
        assert!(!encodes_as_read(std::slice::from_ref(&e), &table));
        let mut out = Vec::new();
        e.write_to(&mut out);
        assert_eq!(out.len(), e.encoded_len());
        assert_eq!(parse_table(&out, 0, 1).unwrap(), std::slice::from_ref(&e));

        // A struct built with a longer name still writes a true length field.
        let long = SnapshotEntry {
            name: "é".repeat(40_000),
            ..e
        };
        let mut out = Vec::new();
        long.write_to(&mut out);
        let back = parse_table(&out, 0, 1).unwrap().remove(0);
        assert_eq!((back.name.len(), out.len()), (65_534, long.encoded_len()));
        assert!(long.name.starts_with(&back.name));
    }
}
