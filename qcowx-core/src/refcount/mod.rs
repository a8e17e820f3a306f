//! Refcounts from reachability: the scan behind `check`, `repair` and clean close
//! ([`Image::check`], [`Image::repair`], [`Image::close`]).
//!
//! qcowx never updates refcounts on the hot path. While they are stale the header's
//! dirty bit is set; a clean close (or a repair) counts references from every root and
//! writes exact refcounts. References are counted per path, as QEMU counts them: an L2
//! table linked from k roots is read once and each cluster it links to gets k
//! references, so the scan costs O(distinct metadata), never O(roots × table size).

mod apply;
mod check;
mod counts;
mod downgrade;
mod rebuild;
mod relocate;
mod room;
mod scan;

pub(crate) use apply::{apply_at_flush, write_refcounts};
pub(crate) use check::{check, refcounts_cover};
pub(crate) use counts::Counts;
pub(crate) use rebuild::{give_up_table_room, rebuild, rebuild_with};
pub(crate) use room::{check_room_for_root, max_refcount, refuse_overflow};
pub(crate) use scan::{refcount_clusters, reference_counts, scan_from, ScanInput, Source};

use crate::engine::{Image, OpenState};
use crate::error::Result;
use crate::format::header::Incompatible;

/// The most problems a report lists individually (the counts are always complete).
pub const MAX_MESSAGES: usize = 1000;

/// The outcome of a check, with `qemu-img check`'s counters. With feature `control`
/// it is its own JSON (kebab-case keys), the answer to the control protocol's `check`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "control",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
pub struct CheckReport {
    /// Structural errors and refcounts lower than the references (data at risk).
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Errors that stopped part of the check (unreadable structures).
    pub check_errors: u64,
    /// Descriptions of the first [`MAX_MESSAGES`] problems.
    pub messages: Vec<String>,
    /// Guest clusters allocated in the active layer.
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters that are not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters in the active layer.
    pub compressed_clusters: u64,
    /// One past the last cluster in use in the file.
    pub image_end_offset: u64,
    /// The dirty bit was set when checked: the image was not closed cleanly, and its
    /// refcounts may be stale.
    pub dirty: bool,
    /// Of `corruptions`, those that are stale refcounts: a refcount lower than the
    /// references, or bit 63 judged on a refcount that differs from the references.
    /// A refcount rebuild (repair, or a writable open of a dirty image) fixes them;
    /// the rest of `corruptions` is damage to the structure. Expected on a dirty
    /// image.
    pub stale_corruptions: u64,
    /// Of `stale_corruptions`, the bit-63 violations judged on a refcount that
    /// differs from the references: consequences of a stale count rather than damage
    /// of their own. A rebuild leaves none, so `qemu-img check -r all`, which fixes
    /// refcounts before it judges bit 63, does not count them among the corruptions
    /// it fixed.
    #[cfg_attr(feature = "control", serde(default))]
    pub stale_copied: u64,
    /// The report follows a repair.
    pub repaired: bool,
    /// The header's corrupt bit is set: a write on metadata was refused (by qcowx or
    /// QEMU) and the image opens read-only until a repair clears it.
    pub marked_corrupt: bool,
}

impl CheckReport {
    /// `qemu-img check`'s exit code: 0 clean, 1 check not completed, 2 corruptions,
    /// 3 leaks only.
    ///
    /// ```
    /// use qcowx_core::CheckReport;
    ///
    /// let mut report = CheckReport::default();
    /// assert_eq!(report.exit_code(), 0);
    /// report.leaks = 3;
    /// assert_eq!(report.exit_code(), 3);
    /// report.corruptions = 1;
    /// assert_eq!(report.exit_code(), 2);
    /// ```
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    pub(crate) fn problem(&mut self, corruption: bool, msg: String) {
        if corruption {
            self.corruptions += 1;
        } else {
            self.leaks += 1;
        }
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        }
    }
}

/// Check, repair and close: the refcount layer's entry points on an [`Image`].
impl Image {
    /// Rewrites the snapshot table with every incomplete entry completed (see
    /// [`crate::format::snapshot::SnapshotEntry::is_incomplete`]), if there is one.
    fn complete_snapshot_entries(&self, st: &mut crate::engine::State) -> Result<()> {
        let version = st.header.version;
        if !Image::has_incomplete_entries(st) {
            return Ok(());
        }
        let size = st.header.size;
        let mut snapshots = st.registry.entries().to_vec();
        for e in &mut snapshots {
            if e.is_incomplete(version) {
                e.complete_extra(size);
            }
        }
        let records = st.registry.records().to_vec();
        self.replace_table(st, snapshots, records)
    }

    /// Completes the snapshot table's incomplete entries in a settled writable
    /// session: what an upgrade from version 2 leaves to do (see
    /// [`crate::OpenOptions::upgrade`]).
    pub(crate) fn complete_snapshot_entries_now(&self) -> Result<()> {
        self.quiesced(|st| {
            if !Image::has_incomplete_entries(st) {
                return Ok(());
            }
            self.flush_locked(st)?;
            // The table moves to new clusters: refcounts are stale until the next
            // rebuild.
            self.mark_stale(st)?;
            self.complete_snapshot_entries(st)
        })
    }

    /// Whether a snapshot table entry is incomplete for the image's version.
    fn has_incomplete_entries(st: &crate::engine::State) -> bool {
        let version = st.header.version;
        st.registry
            .entries()
            .iter()
            .any(|e| e.is_incomplete(version))
    }

    /// Flushes, writes exact refcounts if they are stale and clears the dirty bit.
    /// Further calls on this image return [`Error::Closed`](crate::Error::Closed).
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use qcowx_core::{CreateOptions, Error, Image};
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(b"data", 0)?;
    /// img.close()?;
    /// assert!(matches!(img.write_at(b"late", 0), Err(Error::Closed { .. })));
    /// # Ok(()) }
    /// ```
    pub fn close(&self) -> Result<()> {
        let _structure = self.lock_structure();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closed {
            return Ok(());
        }
        let r = if self.is_writable() {
            self.flush_locked(&mut st).and_then(|_| {
                // A session that changed nothing leaves the file as it was; one that
                // wrote data only (no metadata) after a scan at open stamps the image
                // so that the next open need not scan.
                if self.refused_why().is_some() {
                    // A write on metadata was refused: the image is damaged and marked
                    // corrupt. Links to data already written are flushed (they were
                    // checked), refcounts are left to a repair.
                    Ok(())
                } else if let Err(e) = self.store_bitmaps(&mut st) {
                    // The bitmaps stay in use on disk (inconsistent), as after a crash.
                    Err(e)
                } else if st.stale {
                    write_refcounts(self, &mut st)
                } else if st.open_state == OpenState::Reconciled
                    && st.deltas.is_exact()
                    && self.wrote.load(std::sync::atomic::Ordering::Relaxed)
                    && !self.stamp_matches(&st)
                {
                    self.write_clean_stamp(&mut st).and_then(|_| self.sync())
                } else {
                    Ok(())
                }
            })
        } else {
            Ok(())
        };
        st.closed = true;
        // Release the image lock now, not when the last handle is dropped.
        let released = self
            .storage
            .release()
            .map_err(|e| self.io_err("unlock", 0u64, e));
        r.and(released)
    }

    /// Makes every completed write durable, then writes metadata links in dependency
    /// order: data and new tables first, then the L2 tables that link to data, then the
    /// L1 entries that link to tables, with an fdatasync between each level. When the
    /// refcount changes recorded since the last one are few (no snapshot, fork or
    /// delete among them), they go out with it, so that a close after a flush has
    /// almost nothing left to write; the dirty bit stays set until the close.
    ///
    /// A write that has returned is durable once `flush` returns: a crash after it
    /// loses nothing, and the next open finds the data (rebuilding refcounts if the
    /// image was not closed).
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use qcowx_core::{CreateOptions, Image};
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(b"durable", 4096)?;
    /// img.flush()?;
    /// let mut back = [0u8; 7];
    /// img.read_at(&mut back, 4096)?;
    /// assert_eq!(&back, b"durable");
    /// assert!(img.info()?.dirty, "the dirty bit stays set until a close or checkpoint");
    /// # Ok(()) }
    /// ```
    pub fn flush(&self) -> Result<()> {
        if !self.is_writable() {
            return Ok(());
        }
        // A flush never waits for a gc or a snapshot: then the changes wait instead.
        let structure = self.try_lock_structure();
        let mut st = self.lock_state()?;
        if structure.is_some() {
            apply_at_flush(self, &mut st)?;
        }
        self.flush_locked(&mut st)
    }

    /// Makes the refcounts on disk exact and clears the dirty bit, as a clean close
    /// does, but keeps the image open: after a crash from here on, the next open finds
    /// a clean image with every flushed write. A long-running server takes one from
    /// time to time. Costs the refcount blocks changed since the last checkpoint and
    /// the trees of the roots created since (a full rebuild only if something the
    /// record cannot describe happened, such as a gc that raced with writes).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use qcowx_core::storage::MemStorage;
    /// use qcowx_core::{CreateOptions, Image, OpenOptions};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let mem = Arc::new(MemStorage::new());
    /// let img = Image::create_in(mem.clone(), &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[1; 65536], 0)?;
    /// assert!(img.pending_refcount_changes() > 0);
    /// img.checkpoint()?;
    /// assert_eq!(img.pending_refcount_changes(), 0);
    /// assert!(!img.info()?.dirty);
    ///
    /// // A crash now (the handle is never closed) leaves a clean image.
    /// let bytes = mem.to_vec();
    /// std::mem::forget(img);
    /// let after = Image::from_storage(Arc::new(MemStorage::from_vec(bytes)), &OpenOptions::new())?;
    /// assert!(!after.info()?.dirty);
    /// assert_eq!(after.check()?.exit_code(), 0);
    /// # Ok(()) }
    /// ```
    pub fn checkpoint(&self) -> Result<()> {
        if !self.is_writable() {
            return Ok(());
        }
        let _structure = self.lock_structure();
        let mut st = self.lock_state()?;
        if !st.stale {
            return Ok(());
        }
        self.flush_locked(&mut st)?;
        if self.refused_why().is_some() {
            return Ok(());
        }
        write_refcounts(self, &mut st)
    }

    /// Why the last refcount write (at a close or checkpoint) rebuilt every refcount
    /// from a full scan instead of applying the changes recorded since the image was
    /// opened; `None` when it applied them. For tests of the record's coverage.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[1; 4096], 0)?;
    /// img.snapshot(DEFAULT_VDI, "s")?;
    /// img.checkpoint()?;
    /// assert_eq!(img.last_refcount_rebuild(), None, "the recorded changes were applied");
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "testing")]
    pub fn last_refcount_rebuild(&self) -> Option<&'static str> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_rebuild
    }

    /// Checks the image's metadata and refcounts (as `qemu-img check` does). On a
    /// handle open for writing, the refcount changes of this session are written
    /// first (as [`Image::checkpoint`] writes them).
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use qcowx_core::{CreateOptions, Image};
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(b"data", 0)?;
    /// let report = img.check()?;
    /// assert_eq!((report.corruptions, report.leaks), (0, 0));
    /// assert_eq!(report.exit_code(), 0);
    /// # Ok(()) }
    /// ```
    pub fn check(&self) -> Result<CheckReport> {
        let _structure = self.lock_structure();
        let mut st = self.lock_state()?;
        if self.is_writable() {
            self.flush_locked(&mut st)?;
            // This handle's own changes are not damage: write them out first, so
            // that only what a crash or another program left is reported (a
            // repair-mode open of a dirty image has made none yet).
            if st.stale && !st.inherited_stale && self.refused_why().is_none() {
                write_refcounts(self, &mut st)?;
            }
        }
        check(self, &mut st)
    }

    /// Rebuilds the refcounts from a reachability scan and clears the dirty bit, then
    /// checks again. Needs a writable image. Either repairs the image or, when it
    /// cannot (structural damage a rebuild cannot resolve, a count the refcount width
    /// cannot hold), fails before writing anything.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use qcowx_core::storage::MemStorage;
    /// use qcowx_core::{CreateOptions, Image, OpenOptions};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// // An image whose writer crashed: data flushed, refcounts stale, dirty bit set.
    /// let mem = Arc::new(MemStorage::new());
    /// let img = Image::create_in(mem.clone(), &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[1; 65536], 0)?;
    /// img.flush()?;
    /// let crashed = mem.to_vec();
    /// std::mem::forget(img);
    ///
    /// let opts = OpenOptions::new().repair(true);
    /// let img = Image::from_storage(Arc::new(MemStorage::from_vec(crashed)), &opts)?;
    /// let report = img.repair()?;
    /// assert!(report.repaired);
    /// assert_eq!((report.corruptions, report.leaks, report.exit_code()), (0, 0, 0));
    /// assert!(!img.info()?.dirty);
    /// let mut buf = [0u8; 4];
    /// img.read_at(&mut buf, 0)?;
    /// assert_eq!(buf, [1; 4]);
    /// # Ok(()) }
    /// ```
    pub fn repair(&self) -> Result<CheckReport> {
        // Not `check_writable`: a repair is what lifts a refusal.
        self.check_open_for_writing()?;
        let _structure = self.lock_structure();
        let mut st = self.lock_state()?;
        self.flush_locked(&mut st)?;
        // What the rebuild would refuse is refused before anything is written: damage
        // a rebuild cannot resolve, or a count the refcount width cannot hold.
        // Either way the image is not as a clean close leaves one: no stamp for it.
        // Guest data that shares a cluster with a structure is the one kind of
        // structural damage a repair resolves (by moving the data); any other refuses.
        let probe = scan::scan(self, &st, false)
            .and_then(|s| {
                if s.report.corruptions > 0 && s.report.corruptions == s.data_on_metadata_problems {
                    Ok(s)
                } else {
                    s.checked(self, "cannot repair: ")
                }
            })
            .inspect_err(|_| st.deltas.lose_exactness())?;
        let relocate = probe.data_on_metadata.clone();
        refuse_overflow(self, &probe.counts, st.header.refcount_order)
            .inspect_err(|_| st.deltas.lose_exactness())?;
        drop(probe);
        // Repair rewrites links and refcounts: protect them with the dirty bit first.
        self.mark_stale(&mut st)?;
        if !relocate.is_empty() {
            self.relocate_data_on_metadata(&mut st, &relocate)?;
            self.flush_locked(&mut st)?;
        }
        self.complete_snapshot_entries(&mut st)?;
        self.repair_registry(&mut st)?;
        rebuild(self, &mut st)?;
        let mut report = check(self, &mut st)?;
        report.repaired = true;
        if report.corruptions == 0 && st.header.incompatible.contains(Incompatible::CORRUPT) {
            // Repaired: the image may be written again (QEMU clears the bit the same way).
            st.header.incompatible.remove(Incompatible::CORRUPT);
            self.write_header_fields(&st)?;
            self.sync()?;
            self.set_refused(None);
            report.marked_corrupt = false;
        }
        Ok(report)
    }
}
