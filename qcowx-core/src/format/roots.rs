//! qcowx's facts about roots, kept in snapshot-table extra data: the qcowx block
//! ([`RawRootExtra`], after the 24 bytes QEMU defines, protected by a crc32c), its
//! decoded form (`Record`), and the in-memory `Index` of names and VDI heads over
//! the table. Bytes and types only; no I/O.

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub use crate::format::snapshot::QEMU_EXTRA_BYTES;
use crate::format::snapshot::{RawQemuExtra, SnapshotEntry};

/// Magic of the qcowx block in snapshot extra data (`qcwx`).
pub const ROOT_EXTRA_MAGIC: u32 = 0x7163_7778;

/// Version of the qcowx block.
pub const ROOT_EXTRA_VERSION: u8 = 1;

/// Prefix of the snapshot-table name of a VDI head, so QEMU users see what it is.
pub const VDI_NAME_PREFIX: &str = "vdi:";

/// The name of the default VDI (QCOW2's active layer).
pub const DEFAULT_VDI: &str = "default";

/// Longest snapshot or VDI name.
pub const MAX_NAME_LEN: usize = 128;

/// Flag bit: the root is deleted; GC removes it.
pub const FLAG_DELETED: u32 = 1;

/// The qcowx block of a snapshot entry's extra data (56 bytes, big-endian).
///
/// Every field is 8-byte aligned within the block, and the block starts 8-byte aligned
/// in the file (snapshot entries are 8-aligned; the block follows the entry's 40-byte
/// head and QEMU's 24 bytes), so `flags` and `crc` share one aligned 8-byte word that a
/// single write updates atomically.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRootExtra {
    /// [`ROOT_EXTRA_MAGIC`].
    pub magic: U32,
    /// [`ROOT_EXTRA_VERSION`].
    pub version: u8,
    /// 1 snapshot, 2 VDI head.
    pub kind: u8,
    /// Zero.
    pub reserved: U16,
    /// Unique id of this root (never 0).
    pub uid: U64,
    /// The VDI: for a head, the VDI's id; for a snapshot, the VDI it was taken from
    /// (0 = the default VDI).
    pub vdi: U64,
    /// The root this one's first content came from (0 = none).
    pub parent: U64,
    /// For heads: increases when the VDI is reverted (the highest live one wins).
    pub generation: U64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: U64,
    /// [`FLAG_DELETED`].
    pub flags: U32,
    /// crc32c of the 52 bytes before it.
    pub crc: U32,
}

/// Bytes of [`RawRootExtra`].
pub const ROOT_EXTRA_BYTES: usize = 56;
/// Bytes of the qcowx block the crc covers: everything before the crc.
const CRC_COVERS: usize = std::mem::offset_of!(RawRootExtra, crc);

const _: () = assert!(std::mem::size_of::<RawRootExtra>() == ROOT_EXTRA_BYTES);

/// What a root is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    /// An immutable snapshot.
    Snapshot,
    /// The head of a writable VDI.
    Vdi,
}

/// qcowx's facts about one snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) kind: RootKind,
    pub(crate) uid: u64,
    pub(crate) vdi: u64,
    pub(crate) parent: u64,
    pub(crate) generation: u64,
    pub(crate) created_ns: u64,
    pub(crate) deleted: bool,
    /// The entry carries a valid qcowx block (else: a snapshot QEMU made).
    pub(crate) native: bool,
}

impl RawRootExtra {
    pub(crate) fn seal(mut self) -> RawRootExtra {
        self.crc = crc32c::crc32c(&self.as_bytes()[..CRC_COVERS]).into();
        self
    }
}

/// Parses the qcowx block of an entry's extra data; `None` if absent or damaged.
pub(crate) fn parse_record(extra: &[u8]) -> Option<Record> {
    let block = extra.get(QEMU_EXTRA_BYTES..QEMU_EXTRA_BYTES + ROOT_EXTRA_BYTES)?;
    let raw = RawRootExtra::read_from_bytes(block).ok()?;
    if raw.magic.get() != ROOT_EXTRA_MAGIC
        || raw.version != ROOT_EXTRA_VERSION
        || crc32c::crc32c(&block[..CRC_COVERS]) != raw.crc.get()
        || raw.uid.get() == 0
    {
        return None;
    }
    let kind = match raw.kind {
        1 => RootKind::Snapshot,
        2 => RootKind::Vdi,
        _ => return None,
    };
    Some(Record {
        kind,
        uid: raw.uid.get(),
        vdi: raw.vdi.get(),
        parent: raw.parent.get(),
        generation: raw.generation.get(),
        created_ns: raw.created_ns.get(),
        deleted: raw.flags.get() & FLAG_DELETED != 0,
        native: true,
    })
}

/// The extra data for an entry: QEMU's 24 bytes then the qcowx block.
pub(crate) fn encode_extra(rec: &Record, disk_size: u64, vm_state: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(QEMU_EXTRA_BYTES + ROOT_EXTRA_BYTES);
    out.extend_from_slice(RawQemuExtra::new(disk_size, vm_state).as_bytes());
    out.extend_from_slice(raw_block(rec).as_bytes());
    out
}

/// `entry`'s extra data rewritten to carry `rec`, keeping QEMU's disk and VM-state
/// sizes (`default_size` for an entry that records no disk size).
pub(crate) fn extra_with_record(entry: &SnapshotEntry, rec: &Record, default_size: u64) -> Vec<u8> {
    encode_extra(
        rec,
        entry.disk_size().unwrap_or(default_size),
        entry.vm_state_size(),
    )
}

pub(crate) fn raw_block(rec: &Record) -> RawRootExtra {
    RawRootExtra {
        magic: ROOT_EXTRA_MAGIC.into(),
        version: ROOT_EXTRA_VERSION,
        kind: match rec.kind {
            RootKind::Snapshot => 1,
            RootKind::Vdi => 2,
        },
        reserved: 0.into(),
        uid: rec.uid.into(),
        vdi: rec.vdi.into(),
        parent: rec.parent.into(),
        generation: rec.generation.into(),
        created_ns: rec.created_ns.into(),
        flags: (if rec.deleted { FLAG_DELETED } else { 0 }).into(),
        crc: 0.into(),
    }
    .seal()
}

/// Builds the records of a snapshot table: entries without a valid qcowx block are
/// snapshots of the default VDI (QEMU made them) and get a session-local id.
pub(crate) fn records_for(entries: &[SnapshotEntry]) -> Vec<Record> {
    use std::collections::HashSet;
    let mut uids: HashSet<u64> = HashSet::new();
    let mut snapshot_ids: HashSet<u64> = HashSet::new();
    let mut vdi_ids: HashSet<u64> = HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        // A block that would make two roots share an in-memory id (a duplicate uid, a
        // VDI head claiming the default VDI, a VDI id equal to a snapshot uid) is not
        // trusted: the entry is then treated as a snapshot QEMU made.
        let parsed = parse_record(&e.extra).filter(|r| {
            !uids.contains(&r.uid)
                && match r.kind {
                    RootKind::Snapshot => !vdi_ids.contains(&r.uid),
                    RootKind::Vdi => r.vdi > 1 && !snapshot_ids.contains(&r.vdi),
                }
        });
        let rec = parsed.unwrap_or_else(|| {
            let mut uid = foreign_uid(e);
            while uids.contains(&uid) || vdi_ids.contains(&uid) {
                uid = uid.wrapping_add(1).max(2);
            }
            Record {
                kind: RootKind::Snapshot,
                uid,
                vdi: 0,
                parent: 0,
                generation: 0,
                created_ns: u64::from(e.date_sec) * 1_000_000_000 + u64::from(e.date_nsec),
                deleted: false,
                native: false,
            }
        });
        uids.insert(rec.uid);
        match rec.kind {
            RootKind::Snapshot => snapshot_ids.insert(rec.uid),
            RootKind::Vdi => vdi_ids.insert(rec.vdi),
        };
        out.push(rec);
    }
    out
}

/// A stable id for a snapshot QEMU made (no qcowx block): the same entry gets the
/// same id at every open, so lineage recorded against it survives.
pub(crate) fn foreign_uid(e: &SnapshotEntry) -> u64 {
    let mut bytes = Vec::with_capacity(64 + e.id.len() + e.name.len());
    bytes.extend_from_slice(&e.l1_table_offset.to_be_bytes());
    bytes.extend_from_slice(&e.date_sec.to_be_bytes());
    bytes.extend_from_slice(&e.date_nsec.to_be_bytes());
    bytes.extend_from_slice(e.id.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(e.name.as_bytes());
    let lo = u64::from(crc32c::crc32c(&bytes));
    let hi = u64::from(crc32c::crc32c_append(0x5157_4358, &bytes));
    ((hi << 32) | lo).max(2)
}
