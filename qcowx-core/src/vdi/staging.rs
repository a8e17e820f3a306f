//! The roots a receive works in: a hidden VDI that collects a stream's records (its
//! name starts with '.', which no user name may, and [`Image::list`] leaves it out),
//! and the snapshot taken of it with the sender's identity once the stream verified.

use super::*;

/// The identity a received snapshot takes from its stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Given {
    /// The sender's uid of the snapshot.
    pub(crate) uid: u64,
    /// The base snapshot's uid (0 for a full stream).
    pub(crate) parent: u64,
    /// The sender's creation time.
    pub(crate) created_ns: u64,
}

/// Prefix of a staging VDI's name.
pub(crate) const STAGING_PREFIX: &str = ".recv-";

/// Whether a display name is a staging VDI's.
pub(crate) fn is_staging(name: &str) -> bool {
    name.starts_with(STAGING_PREFIX)
}

/// The staging VDI's name for a stream of snapshot `to_uid`.
pub(crate) fn staging_name(to_uid: u64) -> String {
    format!("{STAGING_PREFIX}{to_uid:016x}")
}

impl Image {
    /// Creates staging VDI `name`: a fork of the live snapshot whose uid is `base`,
    /// or (no base) an empty VDI of `size` bytes.
    pub(crate) fn create_staging(&self, name: &str, base: Option<u64>, size: u64) -> Result<()> {
        self.check_writable()?;
        if !is_staging(name) {
            return Err(Error::InvalidArgument(format!(
                "'{name}' is not a staging VDI name"
            )));
        }
        self.quiesced_gated(|st, gate| {
            if Image::name_taken(st, name) {
                return Err(self.exists(name));
            }
            let (l1, parent) = match base {
                Some(uid) => {
                    let i = st
                        .registry
                        .by_uid(uid)
                        .filter(|&i| {
                            st.registry.is_live(i)
                                && st.registry.record(i).kind == RootKind::Snapshot
                        })
                        .ok_or_else(|| self.not_found("snapshot", &format!("uid {uid:016x}")))?;
                    let loc = Image::l1_loc(st, Target::Entry(i));
                    (self.head_l1(loc)?, uid)
                }
                None => {
                    let entries = self.geo.l1_entries_for(size);
                    if entries * 8 > crate::format::header::MAX_L1_BYTES {
                        return Err(Error::InvalidArgument(format!(
                            "{}: a disk of {size} bytes needs an L1 table of {entries} entries, \
                             more than an image may have with its cluster size",
                            self.name
                        )));
                    }
                    (vec![0u64; entries as usize], 0)
                }
            };
            self.add_vdi_head(st, gate, name, &l1, size, parent)?;
            Ok(())
        })
    }

    /// The live snapshot whose identity is `uid`, if any.
    ///
    /// A snapshot keeps its uid when renamed: a receiver finds a base by it.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image, RootKind, DEFAULT_VDI};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// let snap = img.snapshot(DEFAULT_VDI, "nightly")?;
    /// img.rename(RootKind::Snapshot, "nightly", "kept")?;
    /// assert_eq!(img.snapshot_by_uid(snap.uid)?.map(|r| r.name), Some("kept".to_string()));
    /// img.delete_snapshot("kept")?;
    /// assert_eq!(img.snapshot_by_uid(snap.uid)?, None);
    /// # Ok(()) }
    /// ```
    pub fn snapshot_by_uid(&self, uid: u64) -> Result<Option<RootInfo>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|r| r.kind == RootKind::Snapshot && r.uid == uid))
    }

    /// Whether any root, live or deleted (until gc), has identity `uid`.
    pub(crate) fn uid_taken(&self, uid: u64) -> Result<bool> {
        let st = self.lock_state()?;
        Ok(st.registry.by_uid(uid).is_some())
    }

    /// Whether a new root may not take `name`: a live root has it, or a deleted one
    /// that gc has not yet removed.
    pub(crate) fn name_in_use(&self, name: &str) -> Result<bool> {
        let st = self.lock_state()?;
        Ok(Image::name_taken(&st, name))
    }

    /// Whether VDI `name` exists (hidden ones included).
    pub(crate) fn has_vdi(&self, name: &str) -> Result<bool> {
        let st = self.lock_state()?;
        Ok(self.find_vdi(&st, name).is_ok())
    }
}

impl Image {
    /// Turns staging VDI `staging` into snapshot `name` with identity `given`, in one
    /// commit of the snapshot table: its links become read-only (as a snapshot's are)
    /// and its entry is rewritten as the snapshot's. Nothing is copied and nothing is
    /// left behind for gc.
    pub(crate) fn commit_staging(
        &self,
        staging: &str,
        name: &str,
        given: Given,
    ) -> Result<RootInfo> {
        self.creating(name, |st, _gate| {
            if given.uid < 2 || st.registry.by_uid(given.uid).is_some() {
                return Err(self.exists(&format!("{name} (uid {:016x})", given.uid)));
            }
            let Target::Entry(i) = self.find_vdi(st, staging)? else {
                return Err(self.not_found("VDI", staging));
            };
            let id = self.load_root(st, Target::Entry(i))?;
            self.flush_metadata(st)?;
            self.promote_pending(st)?;
            self.mark_stale(st)?;
            self.make_root_read_only(st, id)?;
            let rec = Record {
                kind: RootKind::Snapshot,
                uid: given.uid,
                vdi: 0,
                parent: given.parent,
                generation: 0,
                created_ns: given.created_ns,
                deleted: false,
                native: true,
            };
            let mut snapshots = st.registry.entries().to_vec();
            let mut records = st.registry.records().to_vec();
            let e = &mut snapshots[i];
            e.name = name.to_string();
            e.date_sec = (given.created_ns / 1_000_000_000) as u32;
            e.date_nsec = (given.created_ns % 1_000_000_000) as u32;
            e.extra = extra_with_record(e, &rec, st.header.size);
            records[i] = rec;
            self.replace_table(st, snapshots, records)?;
            st.roots.remove(&id);
            Ok(self.info_of(st, Target::Entry(i)))
        })
    }
}
