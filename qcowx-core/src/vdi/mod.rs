//! Snapshots and VDIs: radix-tree roots inside one image.
//!
//! Every root other than the default VDI (QCOW2's active L1 table) is an entry of the
//! QCOW2 snapshot table, so QEMU sees and counts it. qcowx's facts about a root live
//! in the entry's extra data, after the 24 bytes QEMU defines, as a [`RawRootExtra`]
//! block protected by a crc32c. See `spec/qcowx-format.md`, "Snapshots and VDIs".
//!
//! - [`Image::snapshot`] copies a VDI's L1 table into a new root whose links are all
//!   read-only, clears bit 63 on the VDI's own L1 entries, and appends the root to the
//!   snapshot table: O(L1), whatever the data size or the number of snapshots.
//! - [`Image::fork`] copies a snapshot's L1 into a new VDI head (every link read-only).
//! - Deleting a root sets a flag in place (O(1)); [`Image::gc`] reclaims its space.
//! - [`Image::revert`] makes a VDI's head a fresh fork of one of its snapshots.

pub mod diff;
pub mod gc;
pub mod rename;
pub mod usage;

use std::collections::HashMap;
use std::sync::Arc;

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::engine::image::{Extent, Image, Root, RootId, State, ZeroMode, DEFAULT_ROOT};
use crate::error::{Error, Result};
use crate::format::header::MAX_SNAPSHOTS;
use crate::format::snapshot::{SnapshotEntry, MAX_SNAPSHOT_TABLE_BYTES};
use crate::format::tables::{decode_words, encode_words, WRITABLE};

/// Magic of the qcowx block in snapshot extra data (`qcwx`).
pub const ROOT_EXTRA_MAGIC: u32 = 0x7163_7778;
/// Version of the qcowx block.
pub const ROOT_EXTRA_VERSION: u8 = 1;
/// Bytes QEMU defines at the start of snapshot extra data (vm_state_size_large,
/// disk_size, icount).
pub const QEMU_EXTRA_BYTES: usize = 24;
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
    fn seal(mut self) -> RawRootExtra {
        self.crc = crc32c::crc32c(&self.as_bytes()[..52]).into();
        self
    }
}

/// Parses the qcowx block of an entry's extra data; `None` if absent or damaged.
pub(crate) fn parse_record(extra: &[u8]) -> Option<Record> {
    let block = extra.get(QEMU_EXTRA_BYTES..QEMU_EXTRA_BYTES + ROOT_EXTRA_BYTES)?;
    let raw = RawRootExtra::read_from_bytes(block).ok()?;
    if raw.magic.get() != ROOT_EXTRA_MAGIC
        || raw.version != ROOT_EXTRA_VERSION
        || crc32c::crc32c(&block[..52]) != raw.crc.get()
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
    out.extend_from_slice(&vm_state.to_be_bytes());
    out.extend_from_slice(&disk_size.to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(raw_block(rec).as_bytes());
    out
}

fn raw_block(rec: &Record) -> RawRootExtra {
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
fn foreign_uid(e: &SnapshotEntry) -> u64 {
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

/// A fresh random root id (never 0).
pub(crate) fn new_uid() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(now_ns().into());
    h.finish().max(2)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Checks a user-chosen snapshot or VDI name.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-@".contains(&b))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid name '{name}': use 1 to {MAX_NAME_LEN} letters, digits, '.', '_', '+', '-', '@' \
             (not starting with '.' or '-')"
        )))
    }
}

/// A root as [`Image::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootInfo {
    /// Snapshot or VDI.
    pub kind: RootKind,
    /// Its name (VDIs without the `vdi:` prefix).
    pub name: String,
    /// Unique id.
    pub uid: u64,
    /// The VDI it belongs to (for a VDI, its own name).
    pub vdi: String,
    /// The root its content first came from: for a snapshot, the previous snapshot of
    /// its VDI (or the snapshot the VDI was forked from); for a forked VDI, the
    /// snapshot it was forked from.
    pub parent: Option<String>,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// Virtual disk size.
    pub size: u64,
    /// The QCOW2 snapshot ID string (`None` for the default VDI).
    pub id: Option<String>,
}

/// Lookups over the snapshot table kept in memory, so that snapshot and fork cost
/// O(L1) however many roots there are. Rebuilt (O(table)) when the table is rewritten;
/// updated in place when an entry is appended or flagged deleted.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// Live roots by display name.
    names: HashMap<String, usize>,
    /// Live head entry of each VDI.
    heads: HashMap<u64, usize>,
    /// Newest snapshot (creation time, uid) taken of each VDI.
    latest: HashMap<u64, (u64, u64)>,
    /// Bytes the entries occupy.
    pub(crate) used: u64,
    /// Byte offset of each entry inside the table.
    offsets: Vec<u64>,
    /// Entry index of each root uid.
    by_uid: HashMap<u64, usize>,
    /// How many entries, deleted ones included, carry each display name: QEMU resolves
    /// names to the first entry, so a name stays taken until gc removes them all.
    all_names: HashMap<String, usize>,
    /// Largest numeric QCOW2 snapshot ID.
    pub(crate) max_id: u64,
}

fn display(entry: &SnapshotEntry, rec: &Record) -> String {
    match rec.kind {
        RootKind::Vdi => entry
            .name
            .strip_prefix(VDI_NAME_PREFIX)
            .unwrap_or(&entry.name)
            .to_string(),
        RootKind::Snapshot => entry.name.clone(),
    }
}

impl Index {
    /// Builds the index of a whole table.
    pub(crate) fn build(entries: &[SnapshotEntry], records: &[Record]) -> Index {
        let mut ix = Index::default();
        for i in 0..entries.len() {
            ix.on_append(entries, records, i);
        }
        ix
    }

    /// Accounts for entry `i`, just appended.
    pub(crate) fn on_append(&mut self, entries: &[SnapshotEntry], records: &[Record], i: usize) {
        let (e, r) = (&entries[i], &records[i]);
        self.offsets.push(self.used);
        self.used += e.encoded_len() as u64;
        self.by_uid.insert(r.uid, i);
        *self.all_names.entry(display(e, r)).or_insert(0) += 1;
        if let Ok(id) = e.id.parse::<u64>() {
            self.max_id = self.max_id.max(id);
        }
        match r.kind {
            RootKind::Snapshot if !r.deleted => {
                let newest = self.latest.entry(r.vdi).or_insert((r.created_ns, r.uid));
                if r.created_ns >= newest.0 {
                    *newest = (r.created_ns, r.uid);
                }
                self.names.insert(display(e, r), i);
            }
            RootKind::Snapshot => {}
            RootKind::Vdi if !r.deleted => {
                let wins = match self.heads.get(&r.vdi) {
                    Some(&h) => records[h].generation <= r.generation,
                    None => true,
                };
                if wins {
                    if let Some(&h) = self.heads.get(&r.vdi) {
                        self.forget_name(&display(&entries[h], &records[h]), h);
                    }
                    self.heads.insert(r.vdi, i);
                    self.names.insert(display(e, r), i);
                }
            }
            RootKind::Vdi => {}
        }
    }

    fn forget_name(&mut self, name: &str, i: usize) {
        if self.names.get(name) == Some(&i) {
            self.names.remove(name);
        }
    }

    /// Accounts for entry `i`, just flagged deleted.
    pub(crate) fn on_delete(&mut self, entries: &[SnapshotEntry], records: &[Record], i: usize) {
        self.forget_name(&display(&entries[i], &records[i]), i);
        let r = &records[i];
        if r.kind == RootKind::Snapshot && self.latest.get(&r.vdi).map(|l| l.1) == Some(r.uid) {
            // The newest live snapshot of that VDI takes over as the next parent.
            self.latest.remove(&r.vdi);
            if let Some(n) = records
                .iter()
                .filter(|x| x.kind == RootKind::Snapshot && x.vdi == r.vdi && !x.deleted)
                .max_by_key(|x| x.created_ns)
            {
                self.latest.insert(r.vdi, (n.created_ns, n.uid));
            }
        }
        if r.kind == RootKind::Vdi && self.heads.get(&r.vdi) == Some(&i) {
            self.heads.remove(&r.vdi);
            // An older head left by a crash between a revert's two writes takes over.
            let next = records
                .iter()
                .enumerate()
                .filter(|(_, x)| x.kind == RootKind::Vdi && x.vdi == r.vdi && !x.deleted)
                .max_by_key(|(_, x)| x.generation)
                .map(|(j, _)| j);
            if let Some(j) = next {
                self.heads.insert(r.vdi, j);
                self.names.insert(display(&entries[j], &records[j]), j);
            }
        }
    }
}

/// A resolved reference to a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The default VDI.
    Default,
    /// Snapshot table entry `index`.
    Entry(usize),
}

/// Where a root's L1 table lives and how big it is.
#[derive(Debug, Clone, Copy)]
struct L1Loc {
    offset: u64,
    entries: u32,
    size: u64,
}

/// A writable VDI or read-only snapshot of an open image, for I/O.
///
/// It shares the image (`Arc<Image>`); many handles can be used at once from many
/// threads. A handle to a deleted root fails with an error; a handle to a VDI follows
/// a revert to the VDI's new head.
#[derive(Debug, Clone)]
pub struct Disk {
    image: Arc<Image>,
    root: RootId,
    name: String,
    writable: bool,
}

impl Disk {
    /// The image.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }
    /// The root's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Whether writes are allowed (VDIs on a writable image).
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    /// Virtual disk size in bytes.
    pub fn size(&self) -> Result<u64> {
        self.image.root_size(self.root)
    }
    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.image.read_root(self.root, buf, offset)
    }
    /// Lends `len` bytes at `offset` to `f` without copying them, or returns `None`
    /// (see [`Image::read_mapped`]).
    pub fn read_mapped<R>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&[std::io::IoSlice<'_>]) -> R,
    ) -> Result<Option<R>> {
        self.image.read_root_mapped(self.root, offset, len, f)
    }
    /// Writes `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.image.write_root(self.root, buf, offset)
    }
    /// Makes the range read as zeros (see [`Image::write_zeroes`]).
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.image
            .zero_range(self.root, offset, len, ZeroMode::Zero { unmap: may_unmap })
    }
    /// Discards whole clusters of the range (see [`Image::discard`]).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.image
            .zero_range(self.root, offset, len, ZeroMode::Discard)
    }
    /// Makes completed writes durable (for the whole image).
    pub fn flush(&self) -> Result<()> {
        self.image.flush()
    }
    /// Allocation status of a range.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.image.block_status_root(self.root, offset, len)
    }
}

impl Image {
    // ---- registry lookups -----------------------------------------------------

    fn not_found(&self, what: &str, name: &str) -> Error {
        Error::NotFound {
            file: self.name.clone(),
            what: what.to_string(),
            name: name.to_string(),
        }
    }

    /// The live head entry of VDI `vdi` (highest generation, not deleted).
    fn head_index(st: &State, vdi: u64) -> Option<usize> {
        st.index.heads.get(&vdi).copied()
    }

    /// Whether entry `i` is a live root (not deleted, not a superseded head).
    pub(crate) fn entry_live(st: &State, i: usize) -> bool {
        let r = &st.records[i];
        match r.kind {
            RootKind::Snapshot => !r.deleted,
            RootKind::Vdi => Image::head_index(st, r.vdi) == Some(i),
        }
    }

    fn display_name(st: &State, i: usize) -> &str {
        let n = &st.snapshots[i].name;
        match st.records[i].kind {
            RootKind::Vdi => n.strip_prefix(VDI_NAME_PREFIX).unwrap_or(n),
            RootKind::Snapshot => n,
        }
    }

    fn find_snapshot(&self, st: &State, name: &str) -> Result<usize> {
        st.index
            .names
            .get(name)
            .copied()
            .filter(|&i| st.records[i].kind == RootKind::Snapshot)
            .ok_or_else(|| self.not_found("snapshot", name))
    }

    fn find_vdi(&self, st: &State, name: &str) -> Result<Target> {
        if name == DEFAULT_VDI {
            return Ok(Target::Default);
        }
        st.index
            .names
            .get(name)
            .copied()
            .filter(|&i| st.records[i].kind == RootKind::Vdi)
            .map(Target::Entry)
            .ok_or_else(|| self.not_found("VDI", name))
    }

    /// Resolves a root name: a VDI or a snapshot (names are unique across both).
    fn find_root(&self, st: &State, name: &str) -> Result<Target> {
        self.find_vdi(st, name)
            .or_else(|_| self.find_snapshot(st, name).map(Target::Entry))
            .map_err(|_| self.not_found("snapshot or VDI", name))
    }

    fn name_taken(st: &State, name: &str) -> bool {
        name == DEFAULT_VDI || st.index.all_names.contains_key(name)
    }

    /// The in-memory root id of a target.
    fn root_id(st: &State, t: Target) -> RootId {
        match t {
            Target::Default => DEFAULT_ROOT,
            Target::Entry(i) => match st.records[i].kind {
                RootKind::Vdi => st.records[i].vdi,
                RootKind::Snapshot => st.records[i].uid,
            },
        }
    }

    fn l1_loc(st: &State, t: Target) -> L1Loc {
        match t {
            Target::Default => L1Loc {
                offset: st.header.l1_table_offset,
                entries: st.header.l1_size,
                size: st.header.size,
            },
            Target::Entry(i) => {
                let e = &st.snapshots[i];
                L1Loc {
                    offset: e.l1_table_offset,
                    entries: e.l1_size,
                    size: e.disk_size().unwrap_or(st.header.size),
                }
            }
        }
    }

    /// Makes sure the root of `t` is loaded and returns its id.
    fn load_root(&self, st: &mut State, t: Target) -> Result<RootId> {
        let id = Image::root_id(st, t);
        if let Some(r) = st.roots.get(&id) {
            // A reverted VDI keeps its id but moves: reload if stale.
            let loc = Image::l1_loc(st, t);
            if r.l1_offset == loc.offset {
                return Ok(id);
            }
        }
        let loc = Image::l1_loc(st, t);
        let l1 = self.read_l1(loc)?;
        let writable = match t {
            Target::Default => true,
            Target::Entry(i) => st.records[i].kind == RootKind::Vdi,
        } && self.is_writable();
        st.roots.insert(
            id,
            Root {
                l1,
                l1_offset: loc.offset,
                dirty: Default::default(),
                size: loc.size,
                writable,
            },
        );
        Ok(id)
    }

    fn read_l1(&self, loc: L1Loc) -> Result<Vec<u64>> {
        let len = u64::from(loc.entries) * 8;
        let file_len = self.storage.len().map_err(|e| self.io_err("stat", 0, e))?;
        if loc.offset.saturating_add(len) > file_len || loc.offset == 0 && len > 0 {
            return Err(self.corrupt(
                "snapshot L1 table",
                loc.offset,
                "runs past the end of the file",
            ));
        }
        let mut raw = vec![0u8; len as usize];
        self.storage
            .read_at(&mut raw, loc.offset)
            .map_err(|e| self.io_err("read L1 table", loc.offset, e))?;
        Ok(decode_words(&raw))
    }

    /// A snapshot's L1 table as the first state of a head: padded with unallocated
    /// entries up to what its disk size needs (a table QEMU or a damaged file left
    /// shorter reads as unallocated there, and a header must cover its size).
    fn head_l1(&self, loc: L1Loc) -> Result<Vec<u64>> {
        let needed = self.geo.l1_entries_for(loc.size);
        if loc.size > crate::format::header::MAX_VIRTUAL_SIZE
            || needed * 8 > crate::format::header::MAX_L1_BYTES
        {
            return Err(self.corrupt(
                "snapshot table entry",
                loc.offset,
                format!(
                    "disk size {} needs an L1 table of {needed} entries, more than a head may have",
                    loc.size
                ),
            ));
        }
        let mut l1 = self.read_l1(loc)?;
        if (l1.len() as u64) < needed {
            l1.resize(needed as usize, 0);
        }
        Ok(l1)
    }

    /// Writes `l1` with every link read-only to new clusters; returns the offset.
    fn write_read_only_copy(&self, st: &mut State, l1: &[u64]) -> Result<u64> {
        let copy: Vec<u64> = l1.iter().map(|w| w & !WRITABLE).collect();
        let clusters = self.geo.clusters_for(copy.len() as u64 * 8).max(1);
        let at = st.alloc.contiguous(clusters);
        let mut bytes = encode_words(&copy);
        bytes.resize((clusters * self.geo.cluster_size()) as usize, 0);
        self.storage
            .write_at(&bytes, at)
            .map_err(|e| self.io_err("write L1 table", at, e))?;
        Ok(at)
    }

    // ---- the snapshot table -----------------------------------------------------

    /// Bytes the table's entries occupy.
    fn table_bytes(st: &State) -> u64 {
        st.index.used
    }

    /// Appends `entry` to the snapshot table and commits it with one header write.
    ///
    /// The entry goes into the table's spare room when it fits (no rewrite of the
    /// table); otherwise the table moves to new clusters with twice the room. Either
    /// way everything is written and synced before the single-sector header write
    /// (`nb_snapshots`, `snapshots_offset`) that makes the new root count.
    fn append_entry(&self, st: &mut State, entry: SnapshotEntry, rec: Record) -> Result<()> {
        let cs = self.geo.cluster_size();
        if st.header.nb_snapshots >= MAX_SNAPSHOTS {
            return Err(Error::Limit {
                file: self.name.clone(),
                what: format!("the snapshot table holds at most {MAX_SNAPSHOTS} roots"),
            });
        }
        let used = Image::table_bytes(st);
        let need = used + entry.encoded_len() as u64;
        if need > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::Limit {
                file: self.name.clone(),
                what: format!("the snapshot table would exceed {MAX_SNAPSHOT_TABLE_BYTES} bytes"),
            });
        }
        let offset = if st.header.snapshots_offset != 0 && need <= st.table_capacity {
            let mut bytes = Vec::new();
            entry.write_to(&mut bytes);
            let at = st.header.snapshots_offset + used;
            self.storage
                .write_at(&bytes, at)
                .map_err(|e| self.io_err("write snapshot table", at, e))?;
            st.header.snapshots_offset
        } else {
            let capacity = (need * 2)
                .next_multiple_of(cs)
                .min(MAX_SNAPSHOT_TABLE_BYTES.next_multiple_of(cs));
            let at = st.alloc.contiguous(capacity / cs);
            let mut bytes = Vec::with_capacity(need as usize);
            for e in &st.snapshots {
                e.write_to(&mut bytes);
            }
            entry.write_to(&mut bytes);
            self.storage
                .write_at(&bytes, at)
                .map_err(|e| self.io_err("write snapshot table", at, e))?;
            st.table_capacity = capacity;
            at
        };
        self.sync()?;
        let before = (st.header.snapshots_offset, st.table_capacity);
        st.header.nb_snapshots += 1;
        st.header.snapshots_offset = offset;
        st.snapshots.push(entry);
        st.records.push(rec);
        let i = st.snapshots.len() - 1;
        st.index.on_append(&st.snapshots, &st.records, i);
        let committed = self.write_header_fields(st).and_then(|_| self.sync());
        if committed.is_err() {
            // The commit failed: the entry does not count. The state goes back to the
            // table the file had, so no later header write (a close) commits it.
            st.header.nb_snapshots -= 1;
            (st.header.snapshots_offset, st.table_capacity) = before;
            st.snapshots.pop();
            st.records.pop();
            st.index = Index::build(&st.snapshots, &st.records);
        }
        committed
    }

    /// Rewrites the flags of entry `i` in place: one aligned 8-byte write (flags and
    /// crc), synced.
    fn write_flags(&self, st: &mut State, i: usize) -> Result<()> {
        let rec = st.records[i].clone();
        let before = st.index.offsets[i];
        let at = st.header.snapshots_offset + before + 40 + QEMU_EXTRA_BYTES as u64 + 48;
        let block = raw_block(&rec);
        self.storage
            .write_at(&block.as_bytes()[48..56], at)
            .map_err(|e| self.io_err("write snapshot flags", at, e))?;
        // Keep the in-memory entry's extra data in step with the file.
        let extra = &mut st.snapshots[i].extra;
        if extra.len() >= QEMU_EXTRA_BYTES + ROOT_EXTRA_BYTES {
            extra[QEMU_EXTRA_BYTES..QEMU_EXTRA_BYTES + ROOT_EXTRA_BYTES]
                .copy_from_slice(block.as_bytes());
        }
        self.sync()
    }

    /// Waits for data I/O in flight, then runs `f` with the metadata locked.
    fn quiesced<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let _structure = self.lock_structure();
        let mut st = self.lock_state()?;
        let _gate = self.io_gate_write();
        f(&mut st)
    }

    fn require_writable(&self) -> Result<()> {
        if self.is_writable() {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                file: self.name.clone(),
                why: "image is open read-only".into(),
            })
        }
    }

    // ---- operations -------------------------------------------------------------

    /// Takes a snapshot named `name` of VDI `vdi` (`"default"` for the default VDI).
    ///
    /// Cost: O(L1) — independent of the data size and of the number of snapshots.
    /// Writes in flight are waited for; later writes to the VDI copy what they touch.
    pub fn snapshot(&self, vdi: &str, name: &str) -> Result<RootInfo> {
        self.require_writable()?;
        validate_name(name)?;
        self.quiesced(|st| {
            if Image::name_taken(st, name) {
                return Err(self.exists(name));
            }
            let target = self.find_vdi(st, vdi)?;
            let vdi_uid = match target {
                Target::Default => 0,
                Target::Entry(i) => st.records[i].vdi,
            };
            let id = self.load_root(st, target)?;
            // Links in memory must be durable before a copy of them is.
            self.flush_metadata(st)?;
            self.promote_pending(st)?;
            self.mark_stale(st)?;
            let (l1, l1_offset, size) = {
                let r = self.root(st, id)?;
                (r.l1.clone(), r.l1_offset, r.size)
            };
            let at = self.write_read_only_copy(st, &l1)?;
            // The VDI's own links become read-only before the snapshot counts: a crash
            // after this write but before the commit only costs copies later.
            let ro: Vec<u64> = l1.iter().map(|w| w & !WRITABLE).collect();
            self.storage
                .write_at(&encode_words(&ro), l1_offset)
                .map_err(|e| self.io_err("write L1 table", l1_offset, e))?;
            if let Some(r) = st.roots.get_mut(&id) {
                r.l1 = ro;
                r.dirty.clear();
            }
            let parent = self.latest_snapshot_of(st, vdi_uid, target);
            let rec = Record {
                kind: RootKind::Snapshot,
                uid: new_uid(),
                vdi: vdi_uid,
                parent,
                generation: 0,
                created_ns: now_ns(),
                deleted: false,
                native: true,
            };
            let entry = self.new_entry(st, name.to_string(), at, l1.len() as u32, size, &rec);
            self.append_entry(st, entry, rec)?;
            Ok(self.info_of(st, Target::Entry(st.snapshots.len() - 1)))
        })
    }

    /// The newest snapshot of VDI `vdi`, or the snapshot the VDI was forked from.
    fn latest_snapshot_of(&self, st: &State, vdi: u64, target: Target) -> u64 {
        st.index
            .latest
            .get(&vdi)
            .map(|&(_, uid)| uid)
            .unwrap_or_else(|| match target {
                Target::Entry(i) => st.records[i].parent,
                Target::Default => 0,
            })
    }

    fn new_entry(
        &self,
        st: &State,
        name: String,
        l1_offset: u64,
        l1_size: u32,
        disk_size: u64,
        rec: &Record,
    ) -> SnapshotEntry {
        let max_id = st.index.max_id;
        SnapshotEntry {
            l1_table_offset: l1_offset,
            l1_size,
            id: (max_id + 1).to_string(),
            name,
            date_sec: (rec.created_ns / 1_000_000_000) as u32,
            date_nsec: (rec.created_ns % 1_000_000_000) as u32,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra: encode_extra(rec, disk_size, 0),
        }
    }

    pub(crate) fn exists(&self, name: &str) -> Error {
        Error::InvalidArgument(format!(
            "{}: a snapshot or VDI named '{name}' already exists",
            self.name
        ))
    }

    /// Creates VDI `new_vdi` whose first state is snapshot `snapshot`. Cost: one L1 copy.
    pub fn fork(&self, snapshot: &str, new_vdi: &str) -> Result<RootInfo> {
        self.require_writable()?;
        validate_name(new_vdi)?;
        self.quiesced(|st| {
            if Image::name_taken(st, new_vdi) {
                return Err(self.exists(new_vdi));
            }
            let i = self.find_snapshot(st, snapshot)?;
            let loc = Image::l1_loc(st, Target::Entry(i));
            let l1 = self.head_l1(loc)?;
            self.mark_stale(st)?;
            let at = self.write_read_only_copy(st, &l1)?;
            let uid = new_uid();
            let rec = Record {
                kind: RootKind::Vdi,
                uid,
                vdi: uid,
                parent: st.records[i].uid,
                generation: 1,
                created_ns: now_ns(),
                deleted: false,
                native: true,
            };
            let entry = self.new_entry(
                st,
                format!("{VDI_NAME_PREFIX}{new_vdi}"),
                at,
                l1.len() as u32,
                loc.size,
                &rec,
            );
            self.append_entry(st, entry, rec)?;
            Ok(self.info_of(st, Target::Entry(st.snapshots.len() - 1)))
        })
    }

    /// Deletes snapshot `name` in O(1): it disappears at once; [`Image::gc`] reclaims
    /// its space.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.require_writable()?;
        self.quiesced(|st| {
            let i = self.find_snapshot(st, name)?;
            self.delete_entry(st, i)
        })
    }

    /// Deletes VDI `name` (not the default VDI) in O(1); its snapshots stay.
    pub fn delete_vdi(&self, name: &str) -> Result<()> {
        self.require_writable()?;
        if name == DEFAULT_VDI {
            return Err(Error::InvalidArgument(format!(
                "{}: the default VDI cannot be deleted",
                self.name
            )));
        }
        self.quiesced(|st| {
            // `find_vdi` gives `Target::Default` only for "default", refused above.
            let Target::Entry(i) = self.find_vdi(st, name)? else {
                return Err(self.not_found("VDI", name));
            };
            self.delete_entry(st, i)
        })
    }

    fn delete_entry(&self, st: &mut State, i: usize) -> Result<()> {
        self.flush_metadata(st)?;
        self.promote_pending(st)?;
        self.mark_stale(st)?;
        let id = Image::root_id(st, Target::Entry(i));
        if st.records[i].kind == RootKind::Vdi {
            // Older heads a crash left unflagged (a revert cut between its two writes)
            // must not take over: flag them first.
            let vdi = st.records[i].vdi;
            let older: Vec<usize> = (0..st.records.len())
                .filter(|&j| {
                    j != i
                        && st.records[j].kind == RootKind::Vdi
                        && st.records[j].vdi == vdi
                        && !st.records[j].deleted
                        && st.records[j].native
                })
                .collect();
            for j in older {
                st.records[j].deleted = true;
                self.write_flags(st, j)?;
            }
        }
        let table_at = st.header.snapshots_offset;
        st.records[i].deleted = true;
        st.index.on_delete(&st.snapshots, &st.records, i);
        let flagged = if st.records[i].native {
            self.write_flags(st, i)
        } else {
            // A snapshot QEMU made has no qcowx block to flag: give it one by
            // rewriting the table (rare; O(table)).
            let mut snapshots = st.snapshots.clone();
            let mut records = st.records.clone();
            let size = snapshots[i].disk_size().unwrap_or(st.header.size);
            let vm = snapshots[i]
                .extra
                .get(0..8)
                .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
            records[i].native = true;
            snapshots[i].extra = encode_extra(&records[i], size, vm);
            self.replace_table(st, snapshots, records)
        };
        if let Err(e) = flagged {
            if st.header.snapshots_offset == table_at {
                // The file's table still holds the entry live: so does the state.
                st.records[i].deleted = false;
                st.index = Index::build(&st.snapshots, &st.records);
            }
            return Err(e);
        }
        st.roots.remove(&id);
        Ok(())
    }

    /// Commits `snapshots` (with their `records`) as the new snapshot table. The state
    /// keeps them only once the header points at the new table, durably: if writing
    /// the table or the header fails, the state still describes the file's old table,
    /// so a later header write (a close) cannot commit a change reported as failed,
    /// nor entries the file's table lacks, nor count references it does not hold.
    pub(crate) fn replace_table(
        &self,
        st: &mut State,
        snapshots: Vec<SnapshotEntry>,
        records: Vec<Record>,
    ) -> Result<()> {
        let (offset, capacity) = self.write_table(st, &snapshots)?;
        let old_snapshots = std::mem::replace(&mut st.snapshots, snapshots);
        let old_records = std::mem::replace(&mut st.records, records);
        let old_place = (
            st.header.nb_snapshots,
            st.header.snapshots_offset,
            st.table_capacity,
        );
        let committed = self.switch_table(st, offset, capacity);
        if committed.is_err() {
            st.snapshots = old_snapshots;
            st.records = old_records;
            (
                st.header.nb_snapshots,
                st.header.snapshots_offset,
                st.table_capacity,
            ) = old_place;
            st.index = Index::build(&st.snapshots, &st.records);
        }
        committed
    }

    /// Writes `entries` to new clusters, synced;
    /// returns where and the room taken (`(0, 0)` for an empty table).
    fn write_table(&self, st: &mut State, entries: &[SnapshotEntry]) -> Result<(u64, u64)> {
        let cs = self.geo.cluster_size();
        let mut bytes = Vec::new();
        for e in entries {
            e.write_to(&mut bytes);
        }
        if bytes.is_empty() {
            return Ok((0, 0));
        }
        let capacity = (bytes.len() as u64).next_multiple_of(cs);
        let at = st.alloc.contiguous(capacity / cs);
        self.storage
            .write_at(&bytes, at)
            .map_err(|e| self.io_err("write snapshot table", at, e))?;
        self.sync()?;
        Ok((at, capacity))
    }

    /// Points the header at the state's table, written at `offset`: the commit (one
    /// header write, synced).
    fn switch_table(&self, st: &mut State, offset: u64, capacity: u64) -> Result<()> {
        st.header.nb_snapshots = st.snapshots.len() as u32;
        st.header.snapshots_offset = offset;
        st.table_capacity = capacity;
        st.index = Index::build(&st.snapshots, &st.records);
        self.write_header_fields(st)?;
        self.sync()
    }

    /// Makes VDI `vdi`'s head a fresh fork of `snapshot` (one of any VDI's snapshots).
    /// Data written to the VDI since becomes garbage for [`Image::gc`].
    pub fn revert(&self, vdi: &str, snapshot: &str) -> Result<()> {
        self.require_writable()?;
        self.quiesced(|st| {
            let s = self.find_snapshot(st, snapshot)?;
            let target = self.find_vdi(st, vdi)?;
            let loc = Image::l1_loc(st, Target::Entry(s));
            let l1 = self.head_l1(loc)?;
            self.flush_metadata(st)?;
            self.promote_pending(st)?;
            self.mark_stale(st)?;
            let at = self.write_read_only_copy(st, &l1)?;
            // The head the VDI has after the revert (handles follow it).
            let target = match target {
                Target::Default => {
                    // The old head becomes a deleted root, so gc finds what only it
                    // reached and returns that space (punched). Committed first: a
                    // crash before the switch leaves a deleted entry naming the live
                    // head's L1, which gc never frees (it marks from live roots).
                    let rec = Record {
                        kind: RootKind::Snapshot,
                        uid: new_uid(),
                        vdi: 0,
                        parent: 0,
                        generation: 0,
                        created_ns: now_ns(),
                        deleted: true,
                        native: true,
                    };
                    let (old_l1, old_entries, old_size) =
                        (st.header.l1_table_offset, st.header.l1_size, st.header.size);
                    // Its links become read-only first: from the entry's commit on,
                    // its tables are reachable from two roots.
                    let cur = self.root(st, DEFAULT_ROOT)?.l1.clone();
                    let ro: Vec<u64> = cur.iter().map(|w| w & !WRITABLE).collect();
                    self.storage
                        .write_at(&encode_words(&ro), old_l1)
                        .map_err(|e| self.io_err("write L1 table", old_l1, e))?;
                    if let Some(r) = st.roots.get_mut(&DEFAULT_ROOT) {
                        r.l1 = ro;
                        r.dirty.clear();
                    }
                    let name = format!("qcowx-reverted-{:016x}", rec.uid);
                    let entry = self.new_entry(st, name, old_l1, old_entries, old_size, &rec);
                    self.append_entry(st, entry, rec)?;
                    self.sync()?;
                    st.header.l1_table_offset = at;
                    st.header.l1_size = l1.len() as u32;
                    st.header.size = loc.size;
                    if let Err(e) = self.write_header_fields(st).and_then(|_| self.sync()) {
                        // Not committed: the state keeps the old head, which the
                        // default root still is (a later header write, at close,
                        // must not switch to a head nothing was written through).
                        st.header.l1_table_offset = old_l1;
                        st.header.l1_size = old_entries;
                        st.header.size = old_size;
                        return Err(e);
                    }
                    Target::Default
                }
                Target::Entry(h) => {
                    let old = st.records[h].clone();
                    let rec = Record {
                        uid: new_uid(),
                        parent: st.records[s].uid,
                        generation: old.generation + 1,
                        created_ns: now_ns(),
                        ..old
                    };
                    let name = st.snapshots[h].name.clone();
                    let entry = self.new_entry(st, name, at, l1.len() as u32, loc.size, &rec);
                    // The new head takes the old head's place in the table (QEMU
                    // resolves `vdi:NAME` to the first entry with that name), and the
                    // old head moves to the end as a deleted root so gc returns what
                    // only it reached. One table rewrite, one header commit: there is
                    // no moment where both heads count.
                    let grave = Record {
                        kind: RootKind::Snapshot,
                        uid: new_uid(),
                        vdi: 0,
                        parent: 0,
                        generation: 0,
                        created_ns: now_ns(),
                        deleted: true,
                        native: true,
                    };
                    let mut grave_entry = st.snapshots[h].clone();
                    grave_entry.name = format!("qcowx-reverted-{:016x}", grave.uid);
                    let size = grave_entry.disk_size().unwrap_or(st.header.size);
                    grave_entry.extra = encode_extra(&grave, size, 0);
                    grave_entry.id = (st.index.max_id + 1).to_string();
                    let mut entry = entry;
                    entry.id = st.snapshots[h].id.clone();
                    let mut snapshots = st.snapshots.clone();
                    let mut records = st.records.clone();
                    snapshots[h] = entry;
                    records[h] = rec;
                    snapshots.push(grave_entry);
                    records.push(grave);
                    self.replace_table(st, snapshots, records)?;
                    Target::Entry(h)
                }
            };
            let id = Image::root_id(st, target);
            st.roots.remove(&id);
            self.load_root(st, target)?;
            Ok(())
        })
    }

    fn info_of(&self, st: &State, t: Target) -> RootInfo {
        match t {
            Target::Default => RootInfo {
                kind: RootKind::Vdi,
                name: DEFAULT_VDI.to_string(),
                uid: 0,
                vdi: DEFAULT_VDI.to_string(),
                parent: None,
                created_ns: 0,
                size: st.header.size,
                id: None,
            },
            Target::Entry(i) => {
                let r = &st.records[i];
                let vdi = if r.vdi == 0 {
                    DEFAULT_VDI.to_string()
                } else {
                    Image::head_index(st, r.vdi).map_or_else(
                        || format!("<deleted VDI {:x}>", r.vdi),
                        |h| Image::display_name(st, h).to_string(),
                    )
                };
                // The nearest live ancestor: deleted roots are skipped, as gc will
                // re-link them.
                let mut parent = None;
                let mut p = r.parent;
                for _ in 0..st.records.len() {
                    let Some(&j) = st.index.by_uid.get(&p).filter(|_| p != 0) else {
                        break;
                    };
                    if st.records[j].kind == RootKind::Snapshot && Image::entry_live(st, j) {
                        parent = Some(Image::display_name(st, j).to_string());
                        break;
                    }
                    p = st.records[j].parent;
                }
                RootInfo {
                    kind: r.kind,
                    name: Image::display_name(st, i).to_string(),
                    uid: r.uid,
                    vdi,
                    parent,
                    created_ns: r.created_ns,
                    size: st.snapshots[i].disk_size().unwrap_or(st.header.size),
                    id: Some(st.snapshots[i].id.clone()),
                }
            }
        }
    }

    /// Every live VDI (the default one first) and snapshot, in table order.
    pub fn list(&self) -> Result<Vec<RootInfo>> {
        let st = self.lock_state()?;
        let mut out = vec![self.info_of(&st, Target::Default)];
        for i in 0..st.snapshots.len() {
            if Image::entry_live(&st, i) {
                out.push(self.info_of(&st, Target::Entry(i)));
            }
        }
        Ok(out)
    }

    /// A handle for I/O on VDI `name` (writable when the image is) or snapshot `name`
    /// (read-only).
    pub fn open_root(self: &Arc<Self>, name: &str) -> Result<Disk> {
        let mut st = self.lock_state()?;
        let t = self.find_root(&st, name)?;
        let id = self.load_root(&mut st, t)?;
        let writable = self.root(&st, id)?.writable;
        Ok(Disk {
            image: Arc::clone(self),
            root: id,
            name: name.to_string(),
            writable,
        })
    }

    /// The words of the L2 table at `off` (through the cache, so links not yet
    /// written back are seen), or `None` for no table.
    pub(crate) fn l2_words(&self, off: Option<u64>) -> Result<Option<Vec<u64>>> {
        let Some(off) = off else { return Ok(None) };
        let mut st = self.lock_state()?;
        self.load_l2(&mut st, off)?;
        Ok(st.cache.get(off).map(<[u64]>::to_vec))
    }

    /// The L1 table of root `name` (loaded) with its size, for tree walks.
    pub(crate) fn root_l1(&self, name: &str) -> Result<(Vec<u64>, u64)> {
        let mut st = self.lock_state()?;
        let t = self.find_root(&st, name)?;
        let id = self.load_root(&mut st, t)?;
        let r = self.root(&st, id)?;
        Ok((r.l1.clone(), r.size))
    }
}

impl Image {
    /// Restores invariant W after a foreign writer (QEMU) may have written the image:
    /// counts references from every root and clears bit 63 on every VDI-head link
    /// whose target is reachable more than once. Only writable→read-only flips, so it
    /// is safe at any point of a crash. It runs at every writable open: no auto-clear
    /// bit records "qcowx was the last writer", because `qemu-img check -r` (QEMU 10)
    /// rewrites the header of an image with an unknown auto-clear bit without its
    /// snapshot table, dropping every snapshot.
    pub(crate) fn reconcile(&self) -> Result<()> {
        let mut guard = self.lock_state()?;
        self.reconcile_locked(&mut guard)
    }

    /// Problems with qcowx's facts in the snapshot table, for `check`: damaged or
    /// untrusted qcowx blocks, VDIs with several unflagged heads (an interrupted
    /// revert), names carried by several live roots.
    pub(crate) fn registry_problems(st: &State) -> Vec<String> {
        let mut out = Vec::new();
        let mut heads: HashMap<u64, usize> = HashMap::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, (e, r)) in st.snapshots.iter().zip(&st.records).enumerate() {
            let claims = e
                .extra
                .get(QEMU_EXTRA_BYTES..QEMU_EXTRA_BYTES + 4)
                .is_some_and(|m| m == ROOT_EXTRA_MAGIC.to_be_bytes());
            if claims && !r.native {
                out.push(format!(
                    "snapshot entry {i} ('{}'): qcowx block damaged or conflicting; treated as a snapshot QEMU made",
                    e.name
                ));
            }
            if r.kind == RootKind::Vdi && !r.deleted {
                *heads.entry(r.vdi).or_insert(0) += 1;
            }
            if Image::entry_live(st, i) {
                *names.entry(display(e, r)).or_insert(0) += 1;
            }
        }
        for (vdi, n) in heads {
            if n > 1 {
                out.push(format!(
                    "VDI {vdi:x} has {n} unflagged heads (an interrupted revert); repair flags the older ones"
                ));
            }
        }
        for (name, n) in names {
            if n > 1 {
                out.push(format!("{n} live roots are named '{name}'"));
            }
        }
        out
    }

    /// Repairs qcowx's facts: flags superseded VDI heads and restores invariant W on
    /// every head.
    pub(crate) fn repair_registry(&self, st: &mut State) -> Result<()> {
        for i in 0..st.records.len() {
            let r = &st.records[i];
            if r.kind == RootKind::Vdi && !r.deleted && r.native && !Image::entry_live(st, i) {
                st.records[i].deleted = true;
                self.write_flags(st, i)?;
            }
        }
        st.index = Index::build(&st.snapshots, &st.records);
        self.reconcile_locked(st)
    }

    fn reconcile_locked(&self, st: &mut State) -> Result<()> {
        let counts = crate::refcount::reference_counts(self, st)?;
        let bits = self.geo.cluster_bits;
        let count = |off: u64| counts.get((off >> bits) as usize).copied().unwrap_or(0);
        let mut heads = vec![Target::Default];
        heads.extend(
            (0..st.snapshots.len())
                .filter(|&i| st.records[i].kind == RootKind::Vdi && Image::entry_live(st, i))
                .map(Target::Entry),
        );
        let step = if self.geo.extended { 2 } else { 1 };
        for t in heads {
            let id = self.load_root(st, t)?;
            let l1 = self.root(st, id)?.l1.clone();
            for (i, &w) in l1.iter().enumerate() {
                let e = crate::format::tables::L1Entry(w);
                let Some(off) = e
                    .l2_offset()
                    .filter(|_| e.writable() && !e.is_malformed(&self.geo))
                else {
                    continue;
                };
                if count(off) > 1 {
                    self.set_l1_entry(st, id, i, e.read_only())?;
                    continue;
                }
                self.load_l2(st, off)?;
                let words = st.cache.get(off).map(<[u64]>::to_vec).unwrap_or_default();
                let shared: Vec<usize> = words
                    .iter()
                    .enumerate()
                    .step_by(step)
                    .filter(|(_, &word)| {
                        let entry = crate::format::tables::L2Entry { word, bitmap: 0 };
                        entry.writable() && entry.host().is_some_and(|h| count(h) > 1)
                    })
                    .map(|(j, _)| j)
                    .collect();
                if !shared.is_empty() {
                    if let Some(t) = st.cache.get_mut(off) {
                        for j in shared {
                            t[j] &= !WRITABLE;
                        }
                    }
                }
            }
        }
        self.flush_locked(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_round_trips_and_detects_damage() {
        let rec = Record {
            kind: RootKind::Vdi,
            uid: 42,
            vdi: 42,
            parent: 7,
            generation: 3,
            created_ns: 123,
            deleted: false,
            native: true,
        };
        let mut extra = encode_extra(&rec, 1 << 30, 0);
        assert_eq!(extra.len(), 80);
        assert_eq!(parse_record(&extra), Some(rec.clone()));
        extra[30] ^= 1;
        assert_eq!(parse_record(&extra), None);
    }

    #[test]
    fn names() {
        assert!(validate_name("base-2024.01_a+b@x").is_ok());
        for bad in ["", "-x", ".x", "a b", "a:b", "a/b", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
