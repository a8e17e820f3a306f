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
mod disk;
pub mod gc;
pub mod kept_hosts;
pub mod rebase;
mod reconcile;
pub mod rename;
pub(crate) mod staging;
mod stdio;
pub mod usage;

use crate::engine::{Extent, Image, IoGate, RootId, State, Target, ZeroMode, DEFAULT_ROOT};
use crate::error::{Error, Result};
use crate::format::addr::HostOffset;
use crate::format::roots::*;
pub use crate::format::roots::{
    RawRootExtra, RootKind, DEFAULT_VDI, FLAG_DELETED, MAX_NAME_LEN, QEMU_EXTRA_BYTES,
    ROOT_EXTRA_BYTES, ROOT_EXTRA_MAGIC, ROOT_EXTRA_VERSION, VDI_NAME_PREFIX,
};
use crate::format::snapshot::SnapshotEntry;
pub use disk::Disk;
pub use stdio::{DiskCursor, DiskReader};

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

/// The record of a VDI head that a revert replaced: a deleted root, kept in the table
/// until gc returns what only it reached.
fn grave_record() -> Record {
    Record {
        kind: RootKind::Snapshot,
        uid: new_uid(),
        vdi: 0,
        parent: 0,
        generation: 0,
        created_ns: now_ns(),
        deleted: true,
        native: true,
    }
}

/// Checks a user-chosen snapshot or VDI name.
///
/// ```
/// use qcowx_core::vdi::validate_name;
///
/// assert!(validate_name("nightly-2026.12.07").is_ok());
/// assert!(validate_name("user@host+1").is_ok());
/// assert!(validate_name("").is_err());
/// assert!(validate_name("-starts-with-dash").is_err());
/// assert!(validate_name("has space").is_err());
/// ```
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

impl Image {
    // ---- registry lookups -----------------------------------------------------

    fn not_found(&self, what: &str, name: &str) -> Error {
        Error::NotFound {
            file: self.name.clone(),
            what: what.to_string(),
            name: name.to_string(),
        }
    }

    fn find_snapshot(&self, st: &State, name: &str) -> Result<usize> {
        st.registry
            .by_name(name)
            .filter(|&i| st.registry.record(i).kind == RootKind::Snapshot)
            .ok_or_else(|| self.not_found("snapshot", name))
    }

    fn find_vdi(&self, st: &State, name: &str) -> Result<Target> {
        if name == DEFAULT_VDI {
            return Ok(Target::Default);
        }
        st.registry
            .by_name(name)
            .filter(|&i| st.registry.record(i).kind == RootKind::Vdi)
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
        name == DEFAULT_VDI || st.registry.name_taken(name)
    }

    // ---- operations -------------------------------------------------------------

    /// Runs `f` quiesced for an operation that creates a root named `name`: the image
    /// must be writable, the name valid and not taken.
    fn creating<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut State, &IoGate<'_>) -> Result<T>,
    ) -> Result<T> {
        self.check_writable()?;
        validate_name(name)?;
        self.quiesced_gated(|st, gate| {
            if Image::name_taken(st, name) {
                return Err(self.exists(name));
            }
            f(st, gate)
        })
    }

    /// Takes a snapshot named `name` of VDI `vdi` (`"default"` for the default VDI).
    ///
    /// Cost: O(L1) — independent of the data size and of the number of snapshots.
    /// Writes in flight are waited for; later writes to the VDI copy what they touch.
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(b"before", 0)?;
    /// let s = img.snapshot(DEFAULT_VDI, "s1")?;
    /// assert_eq!(s.name, "s1");
    /// img.write_at(b"after!", 0)?; // the snapshot keeps "before"
    /// # Ok(()) }
    /// ```
    pub fn snapshot(&self, vdi: &str, name: &str) -> Result<RootInfo> {
        self.creating(name, |st, gate| {
            let target = self.find_vdi(st, vdi)?;
            let vdi_uid = match target {
                Target::Default => 0,
                Target::Entry(i) => st.registry.record(i).vdi,
            };
            let id = self.load_root(st, target)?;
            // Links in memory must be durable before a copy of them is.
            self.flush_metadata(st)?;
            self.promote_pending(st)?;
            let (l1, size) = {
                let r = self.root(st, id)?;
                (r.l1.clone(), r.size)
            };
            crate::refcount::check_room_for_root(self, st, gate, &l1)?;
            self.mark_stale(st)?;
            let at = self.write_read_only_copy(st, &l1)?;
            // The VDI's own links become read-only before the snapshot counts: a crash
            // after this write but before the commit only costs copies later.
            self.make_root_read_only(st, id)?;
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
            self.count_new_root(st, at, &l1);
            Ok(self.info_of(st, Target::Entry(st.registry.len() - 1)))
        })
    }

    /// The newest snapshot of VDI `vdi`, or the snapshot the VDI was forked from.
    fn latest_snapshot_of(&self, st: &State, vdi: u64, target: Target) -> u64 {
        st.registry
            .latest(vdi)
            .map(|(_, uid)| uid)
            .unwrap_or_else(|| match target {
                Target::Entry(i) => st.registry.record(i).parent,
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
        let max_id = st.registry.max_id();
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
        Error::AlreadyExists {
            file: self.name.clone(),
            what: "snapshot or VDI".into(),
            name: name.to_string(),
        }
    }

    /// Creates VDI `new_vdi` whose first state is snapshot `snapshot`. Cost: one L1 copy.
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::sync::Arc;
    /// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
    /// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?);
    /// img.write_at(b"golden", 0)?;
    /// img.snapshot(DEFAULT_VDI, "golden")?;
    /// img.fork("golden", "vm1")?;
    /// let vm1 = img.open_root("vm1")?;
    /// vm1.write_at(b"vm1 data", 4096)?; // the default VDI does not see it
    /// let mut b = [0u8; 6];
    /// vm1.read_at(&mut b, 0)?;
    /// assert_eq!(&b, b"golden");
    /// # Ok(()) }
    /// ```
    pub fn fork(&self, snapshot: &str, new_vdi: &str) -> Result<RootInfo> {
        self.creating(new_vdi, |st, gate| {
            let i = self.find_snapshot(st, snapshot)?;
            let loc = Image::l1_loc(st, Target::Entry(i));
            let l1 = self.head_l1(loc)?;
            let parent = st.registry.record(i).uid;
            let j = self.add_vdi_head(st, gate, new_vdi, &l1, loc.size, parent)?;
            Ok(self.info_of(st, Target::Entry(j)))
        })
    }

    /// Commits a new VDI head `name` whose first state is `l1` (a disk of `size`
    /// bytes, forked from the snapshot with uid `parent`, 0 for none): the room check,
    /// a read-only copy of `l1`, its entry appended and its tree counted. Returns the
    /// entry's index.
    pub(crate) fn add_vdi_head(
        &self,
        st: &mut State,
        gate: &IoGate<'_>,
        name: &str,
        l1: &[u64],
        size: u64,
        parent: u64,
    ) -> Result<usize> {
        crate::refcount::check_room_for_root(self, st, gate, l1)?;
        self.mark_stale(st)?;
        let at = self.write_read_only_copy(st, l1)?;
        let uid = new_uid();
        let rec = Record {
            kind: RootKind::Vdi,
            uid,
            vdi: uid,
            parent,
            generation: 1,
            created_ns: now_ns(),
            deleted: false,
            native: true,
        };
        let entry = self.new_entry(
            st,
            format!("{VDI_NAME_PREFIX}{name}"),
            at,
            l1.len() as u32,
            size,
            &rec,
        );
        self.append_entry(st, entry, rec)?;
        self.count_new_root(st, at, l1);
        Ok(st.registry.len() - 1)
    }

    /// Deletes snapshot `name` in O(1): it disappears at once; [`Image::gc`] reclaims
    /// its space.
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.snapshot(DEFAULT_VDI, "old")?;
    /// img.delete_snapshot("old")?;
    /// assert!(img.list()?.iter().all(|r| r.name != "old"));
    /// img.gc()?; // reclaims what only "old" held
    /// # Ok(()) }
    /// ```
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        self.quiesced(|st| {
            let i = self.find_snapshot(st, name)?;
            self.delete_entry(st, i)
        })
    }

    /// Deletes VDI `name` (not the default VDI) in O(1); its snapshots stay.
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.snapshot(DEFAULT_VDI, "base")?;
    /// img.fork("base", "scratch")?;
    /// img.delete_vdi("scratch")?;
    /// assert!(img.list()?.iter().any(|r| r.name == "base"));
    /// # Ok(()) }
    /// ```
    pub fn delete_vdi(&self, name: &str) -> Result<()> {
        self.check_writable()?;
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
        if st.registry.record(i).kind == RootKind::Vdi {
            // Older heads a crash left unflagged (a revert cut between its two writes)
            // must not take over: flag them first.
            let vdi = st.registry.record(i).vdi;
            let older: Vec<usize> = (0..st.registry.len())
                .filter(|&j| {
                    j != i
                        && st.registry.record(j).kind == RootKind::Vdi
                        && st.registry.record(j).vdi == vdi
                        && !st.registry.record(j).deleted
                        && st.registry.record(j).native
                })
                .collect();
            for j in older {
                st.registry.set_deleted(j, true);
                self.write_flags(st, j)?;
            }
        }
        let table_at = st.header.snapshots_offset;
        st.registry.set_deleted(i, true);
        let flagged = if st.registry.record(i).native {
            self.write_flags(st, i)
        } else {
            // A snapshot QEMU made has no qcowx block to flag: give it one by
            // rewriting the table (rare; O(table)).
            let mut snapshots = st.registry.entries().to_vec();
            let mut records = st.registry.records().to_vec();
            records[i].native = true;
            snapshots[i].extra = extra_with_record(&snapshots[i], &records[i], st.header.size);
            self.replace_table(st, snapshots, records)
        };
        if let Err(e) = flagged {
            if st.header.snapshots_offset == table_at {
                // The file's table still holds the entry live: so does the state.
                st.registry.set_deleted(i, false);
            }
            return Err(e);
        }
        st.roots.remove(&id);
        Ok(())
    }

    /// Makes VDI `vdi`'s head a fresh fork of `snapshot` (one of any VDI's snapshots).
    /// Data written to the VDI since becomes garbage for [`Image::gc`].
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(b"good", 0)?;
    /// img.snapshot(DEFAULT_VDI, "good")?;
    /// img.write_at(b"oops", 0)?;
    /// img.revert(DEFAULT_VDI, "good")?;
    /// let mut b = [0u8; 4];
    /// img.read_at(&mut b, 0)?;
    /// assert_eq!(&b, b"good");
    /// # Ok(()) }
    /// ```
    pub fn revert(&self, vdi: &str, snapshot: &str) -> Result<()> {
        self.check_writable()?;
        self.quiesced_gated(|st, gate| {
            let s = self.find_snapshot(st, snapshot)?;
            let target = self.find_vdi(st, vdi)?;
            let loc = Image::l1_loc(st, Target::Entry(s));
            if matches!(target, Target::Default)
                && loc.size != st.header.size
                && !st.bitmaps.is_empty()
            {
                return Err(Error::Unsupported {
                    file: self.name.clone(),
                    what: "a revert that changes the disk size of an image with persistent \
                           bitmaps (remove them first)"
                        .into(),
                });
            }
            let l1 = self.head_l1(loc)?;
            crate::refcount::check_room_for_root(self, st, gate, &l1)?;
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
                    let rec = grave_record();
                    let (old_l1, old_entries, old_size) =
                        (st.header.l1_table_offset, st.header.l1_size, st.header.size);
                    // Its links become read-only first: from the entry's commit on,
                    // its tables are reachable from two roots.
                    self.make_root_read_only(st, DEFAULT_ROOT)?;
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
                        // The grave entry names the live head's L1 table: a second
                        // path to its tree that no delta describes.
                        st.deltas.lose_exactness();
                        return Err(e);
                    }
                    // Every byte of the disk may have changed: the bitmaps say so.
                    let size = st.header.size;
                    self.mark_bitmaps(st, DEFAULT_ROOT, 0, size);
                    Target::Default
                }
                Target::Entry(h) => {
                    let old = st.registry.record(h).clone();
                    let rec = Record {
                        uid: new_uid(),
                        parent: st.registry.record(s).uid,
                        generation: old.generation + 1,
                        created_ns: now_ns(),
                        ..old
                    };
                    let name = st.registry.entry(h).name.clone();
                    let entry = self.new_entry(st, name, at, l1.len() as u32, loc.size, &rec);
                    // The new head takes the old head's place in the table (QEMU
                    // resolves `vdi:NAME` to the first entry with that name), and the
                    // old head moves to the end as a deleted root so gc returns what
                    // only it reached. One table rewrite, one header commit: there is
                    // no moment where both heads count.
                    let grave = grave_record();
                    let mut grave_entry = st.registry.entry(h).clone();
                    grave_entry.name = format!("qcowx-reverted-{:016x}", grave.uid);
                    let size = grave_entry.disk_size().unwrap_or(st.header.size);
                    grave_entry.extra = encode_extra(&grave, size, 0);
                    grave_entry.id = (st.registry.max_id() + 1).to_string();
                    let mut entry = entry;
                    entry.id = st.registry.entry(h).id.clone();
                    let mut snapshots = st.registry.entries().to_vec();
                    let mut records = st.registry.records().to_vec();
                    snapshots[h] = entry;
                    records[h] = rec;
                    snapshots.push(grave_entry);
                    records.push(grave);
                    self.replace_table(st, snapshots, records)?;
                    Target::Entry(h)
                }
            };
            // The old head still counts (as a deleted root); the new one is counted.
            self.count_new_root(st, at, &l1);
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
                let r = st.registry.record(i);
                let vdi = if r.vdi == 0 {
                    DEFAULT_VDI.to_string()
                } else {
                    st.registry.head(r.vdi).map_or_else(
                        || format!("<deleted VDI {:x}>", r.vdi),
                        |h| st.registry.display_name(h).to_string(),
                    )
                };
                // The nearest live ancestor: deleted roots are skipped, as gc will
                // re-link them.
                let mut parent = None;
                let mut p = r.parent;
                for _ in 0..st.registry.len() {
                    let Some(j) = st.registry.by_uid(p).filter(|_| p != 0) else {
                        break;
                    };
                    if st.registry.record(j).kind == RootKind::Snapshot && st.registry.is_live(j) {
                        parent = Some(st.registry.display_name(j).to_string());
                        break;
                    }
                    p = st.registry.record(j).parent;
                }
                RootInfo {
                    kind: r.kind,
                    name: st.registry.display_name(i).to_string(),
                    uid: r.uid,
                    vdi,
                    parent,
                    created_ns: r.created_ns,
                    size: st.registry.entry(i).disk_size().unwrap_or(st.header.size),
                    id: Some(st.registry.entry(i).id.clone()),
                }
            }
        }
    }

    /// The name of the snapshot `spec` names in the forms QEMU's tools take (`qemu-img
    /// convert -l`, `qemu-nbd -l`): an ID or a name (IDs are tried first, as QEMU
    /// tries them), `snapshot.id=ID`, `snapshot.name=NAME`, or both comma-separated
    /// (then one snapshot must have both).
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.snapshot(DEFAULT_VDI, "before")?;
    /// let id = img.info()?.snapshots[0].id.clone();
    /// for spec in ["before".to_string(), id.clone(), format!("snapshot.id={id}"),
    ///              "snapshot.name=before".into(), format!("snapshot.id={id},snapshot.name=before")] {
    ///     assert_eq!(img.resolve_snapshot(&spec)?, "before");
    /// }
    /// assert!(img.resolve_snapshot("snapshot.name=after").is_err());
    /// assert!(img.resolve_snapshot("snapshot.size=1").is_err());
    /// # Ok(()) }
    /// ```
    pub fn resolve_snapshot(&self, spec: &str) -> Result<String> {
        let (mut id, mut name) = (None, None);
        if spec.starts_with("snapshot.") {
            for item in spec.split(',') {
                match item.split_once('=') {
                    Some(("snapshot.id", v)) => id = Some(v),
                    Some(("snapshot.name", v)) => name = Some(v),
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "{}: snapshot {spec:?}: {item:?} is not snapshot.id=ID or \
                             snapshot.name=NAME",
                            self.name
                        )))
                    }
                }
            }
        }
        let roots = self.list()?;
        let snaps = || roots.iter().filter(|r| r.kind == RootKind::Snapshot);
        let has_id = |r: &&RootInfo, i: &str| r.id.as_deref() == Some(i);
        let found = if id.is_none() && name.is_none() {
            snaps()
                .find(|r| has_id(r, spec))
                .or_else(|| snaps().find(|r| r.name == spec))
        } else {
            snaps().find(|r| id.is_none_or(|i| has_id(r, i)) && name.is_none_or(|n| r.name == n))
        };
        found
            .map(|r| r.name.clone())
            .ok_or_else(|| self.not_found("snapshot", spec))
    }

    /// Every live VDI (the default one first) and snapshot, in table order; the hidden
    /// VDI of a receive in progress is not listed.
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use qcowx_core::{CreateOptions, Image, RootKind, DEFAULT_VDI};
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.snapshot(DEFAULT_VDI, "s1")?;
    /// let roots = img.list()?;
    /// assert_eq!(roots[0].name, DEFAULT_VDI);
    /// assert!(roots.iter().any(|r| r.name == "s1" && r.kind == RootKind::Snapshot));
    /// # Ok(()) }
    /// ```
    pub fn list(&self) -> Result<Vec<RootInfo>> {
        let st = self.lock_state()?;
        let mut out = vec![self.info_of(&st, Target::Default)];
        for i in 0..st.registry.len() {
            if st.registry.is_live(i) && !staging::is_staging(st.registry.display_name(i)) {
                out.push(self.info_of(&st, Target::Entry(i)));
            }
        }
        Ok(out)
    }

    /// The words of the L2 table at `off` (through the cache, so links not yet
    /// written back are seen), or `None` for no table.
    pub(crate) fn l2_words(&self, off: Option<HostOffset>) -> Result<Option<Vec<u64>>> {
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
