//! Mark-and-sweep garbage collection, concurrent with reads and writes.
//!
//! Deleting a snapshot or VDI only flags its snapshot table entry. [`Image::gc`] then
//! compacts the table (dropping deleted roots and superseded VDI heads, re-linking the
//! lineage around them), counts references from the live roots while I/O goes on,
//! and frees every cluster that existed when it began and that nothing references:
//! hole-punched, durably, before the allocator may hand any of them out again. When
//! no link changed while it counted, it also writes exact refcounts, clears the dirty
//! bit and truncates the free tail of the file; otherwise the refcounts stay stale
//! (dirty bit set) until the next clean close.
//!
//! Why the concurrent count is safe (the argument behind every step):
//! - The set of roots is fixed while gc runs: operations that add, remove or move
//!   roots and tables take the image's structure lock, which gc holds throughout.
//! - Writes link only clusters allocated after gc began (ready clusters are held back
//!   while it runs) or links copied out of a read-only table (copy-on-write). A
//!   read-only table is never changed in place (invariant W), so whichever version of
//!   the L1 link gc saw — the old table or its copy — it counts the old clusters.
//! - A cluster a write unlinks is freed through the allocator's pending list, never
//!   by gc (gc skips every pending or ready cluster).
//! - gc punches only after writing every dirty table and L1 entry, so nothing on disk
//!   links what it punches either.

use std::collections::{HashMap, HashSet};

use crate::engine::alloc::runs;
use crate::engine::{Image, State};
use crate::error::Result;
use crate::format::roots::{extra_with_record, RootKind};
use crate::format::snapshot::SnapshotEntry;
use crate::refcount::{self, ScanInput, Source};

/// What a collection did. With the `control` feature it is also the JSON of a gc
/// report (kebab-case keys), in the control protocol and `qcowx gc --output=json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "control",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
pub struct GcReport {
    /// Roots removed from the snapshot table (deleted ones, superseded VDI heads).
    pub roots_removed: u64,
    /// Clusters that only the removed roots referenced (data, L2 and L1 tables): the
    /// space their removal gave back. The same count whether the image stayed open
    /// since the roots were deleted or was reopened. Other clusters gc gives back
    /// (the old snapshot table and refcount structures, leaked clusters) are not
    /// counted here; they show in the allocated bytes.
    pub clusters_freed: u64,
    /// Bytes those clusters held.
    pub bytes_freed: u64,
    /// Image file length before.
    pub file_size_before: u64,
    /// Image file length after. Freed clusters inside the file are hole-punched, not
    /// moved, so the length shrinks only when the tail is free; it can grow a little
    /// when the compacted snapshot table (or rewritten refcount structures) find no
    /// room below the end — what the file occupies is then still smaller: see
    /// `allocated_before` and `allocated_after`.
    pub file_size_after: u64,
    /// Bytes the file occupied on its file system before (`st_blocks` × 512); `None`
    /// for storage that is not a file.
    pub allocated_before: Option<u64>,
    /// Bytes it occupies after, once the freed clusters are hole-punched.
    pub allocated_after: Option<u64>,
    /// Exact refcounts were written and the dirty bit cleared. False when links
    /// changed while gc counted (the image was being written): the refcounts are then
    /// rewritten at the next clean close.
    pub refcounts_exact: bool,
}

/// What the first, locked step of a collection hands to the unlocked count.
struct Start {
    live: ScanInput,
    removed: ScanInput,
    roots_removed: u64,
    generation: crate::engine::Generation,
    /// Clusters below this index existed when gc began: only they can be freed.
    end_cluster: u64,
}

impl Image {
    /// Reclaims the space of deleted roots and frees every unreferenced cluster.
    ///
    /// Cost: O(metadata) — a walk of every distinct table, never of the data. Reads
    /// and writes go on while it counts; snapshot, fork, delete, revert, rename,
    /// resize and close wait for it. The state lock and the I/O gate are held twice
    /// briefly: to compact the table at the start, and to punch (and, when nothing
    /// changed meanwhile, write refcounts) at the end.
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[1u8; 65536], 0)?;
    /// img.snapshot(DEFAULT_VDI, "s1")?;
    /// img.write_at(&[2u8; 65536], 0)?; // copies the cluster s1 shares
    /// img.delete_snapshot("s1")?;
    /// let report = img.gc()?;
    /// assert_eq!(report.roots_removed, 1);
    /// # Ok(()) }
    /// ```
    pub fn gc(&self) -> Result<GcReport> {
        self.check_writable()?;
        let _structure = self.lock_structure();
        let file_size_before = self
            .storage
            .len()
            .map_err(|e| self.io_err("stat", 0u64, e))?;
        let allocated_before = self.allocated_bytes();
        let start = self.gc_start().inspect_err(|_| {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.deltas.lose_exactness();
        })?;
        let result = self.gc_count_and_sweep(&start);
        // Ready clusters may be handed out again, whatever happened.
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .alloc
            .hold_ready(false);
        let (clusters_freed, refcounts_exact) = result.inspect_err(|_| {
            // A gc cut short may have freed clusters its count never reached.
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.deltas.lose_exactness();
        })?;
        let file_size_after = self
            .storage
            .len()
            .map_err(|e| self.io_err("stat", 0u64, e))?;
        Ok(GcReport {
            roots_removed: start.roots_removed,
            clusters_freed,
            bytes_freed: clusters_freed * self.geo.cluster_size(),
            file_size_before,
            file_size_after,
            allocated_before,
            allocated_after: self.allocated_bytes(),
            refcounts_exact,
        })
    }

    /// Bytes the image file occupies on its file system: `None` when the storage is
    /// not a file or its path no longer names it (a report is not worth an error).
    fn allocated_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(self.storage.path()?).ok()?;
        Some(m.blocks() * 512)
    }

    /// Step 1, locked: flush, dirty bit, compact the table, hold ready clusters back.
    fn gc_start(&self) -> Result<Start> {
        let mut st = self.lock_state()?;
        let _gate = self.io_gate_write();
        let st = &mut *st;
        self.flush_metadata(st)?;
        self.promote_pending(st)?;
        self.mark_stale(st)?;
        let removed = self.compact_table(st)?;
        if !removed.is_empty() {
            // Their trees lose their references: the rebuild at the end counts that
            // (or, if links change meanwhile, the next clean close does).
            st.deltas.lose_exactness();
        }
        refcount::give_up_table_room(self, st);
        st.alloc.hold_ready(true);
        Ok(Start {
            live: ScanInput::of(st),
            removed: ScanInput::entries_only(st, &removed),
            roots_removed: removed.len() as u64,
            generation: st.generation(),
            end_cluster: st.alloc.end() >> self.geo.cluster_bits,
        })
    }

    /// Steps 2 and 3: count without the lock, then sweep with it. Returns the clusters
    /// freed that the removed roots referenced, and whether refcounts are exact.
    fn gc_count_and_sweep(&self, start: &Start) -> Result<(u64, bool)> {
        let cs = self.geo.cluster_size();
        let live =
            refcount::scan_from(self, &start.live, false, Source::Live)?.checked(self, "")?;
        // Removed roots are never written: their tables are read from the file.
        let dead = refcount::scan_from(self, &start.removed, false, Source::File)?;

        let mut st = self.lock_state()?;
        let gate = self.io_gate_write();
        let st = &mut *st;
        let exact = st.generation() == start.generation;
        // What the removed roots referenced and no live root does: freed, even where
        // the rebuild below puts new refcount structures.
        let freed = (1..dead.clusters())
            .filter(|&c| dead.count(c) > 0 && (c >= live.clusters() || live.count(c) == 0))
            .count() as u64;
        let free: Vec<u64> = if exact {
            // Nothing changed since the count: it is exact now.
            let after = refcount::rebuild_with(self, st, live, &gate)?;
            (1..after.len()).filter(|&c| after.get(c) == 0).collect()
        } else {
            // Clusters freed here may have carried stale counts: recount at close.
            st.deltas.lose_exactness();
            self.flush_metadata(st)?;
            let mut keep: HashSet<u64> = refcount::refcount_clusters(self, &st.header)?;
            keep.extend(st.alloc.unused().map(|o| o >> self.geo.cluster_bits));
            (1..start.end_cluster.min(live.clusters()))
                .filter(|&c| live.count(c) == 0 && !keep.contains(&c))
                .collect()
        };
        let offsets: Vec<u64> = free.iter().map(|c| c * cs).collect();
        for (at, len) in runs(&offsets, cs) {
            self.storage
                .punch_hole(at, len)
                .map_err(|e| self.io_err("punch hole", at, e))?;
        }
        if !offsets.is_empty() {
            self.sync()?;
            // A clean cached copy of a freed table must not outlive it.
            st.cache.clear_clean();
            st.alloc.make_ready(offsets);
        }
        Ok((freed, exact))
    }

    /// Drops every entry that is not live, re-linking the lineage of the kept ones
    /// around them, and commits the table. Returns the removed entries.
    fn compact_table(&self, st: &mut State) -> Result<Vec<SnapshotEntry>> {
        let live: Vec<bool> = (0..st.registry.len())
            .map(|i| st.registry.is_live(i))
            .collect();
        if live.iter().all(|l| *l) {
            return Ok(Vec::new());
        }
        let parent_of: HashMap<u64, u64> = st
            .registry
            .records()
            .iter()
            .map(|r| (r.uid, r.parent))
            .collect();
        let live_uids: HashSet<u64> = st
            .registry
            .records()
            .iter()
            .zip(&live)
            .filter(|(_, l)| **l)
            .map(|(r, _)| r.uid)
            .collect();
        let mut snapshots = Vec::new();
        let mut records = Vec::new();
        let mut removed = Vec::new();
        let mut unloaded = Vec::new();
        for (i, keep) in live.iter().enumerate() {
            if !keep {
                // A superseded head shares its VDI's id with the live head.
                if st.registry.record(i).kind == RootKind::Snapshot {
                    unloaded.push(st.registry.record(i).uid);
                }
                removed.push(st.registry.entry(i).clone());
                continue;
            }
            let mut rec = st.registry.record(i).clone();
            let mut entry = st.registry.entry(i).clone();
            let mut p = rec.parent;
            let mut hops = 0;
            while p != 0 && !live_uids.contains(&p) && hops < st.registry.len() {
                p = parent_of.get(&p).copied().unwrap_or(0);
                hops += 1;
            }
            if !live_uids.contains(&p) {
                p = 0;
            }
            if p != rec.parent && rec.native {
                rec.parent = p;
                entry.extra = extra_with_record(&entry, &rec, st.header.size);
            }
            snapshots.push(entry);
            records.push(rec);
        }
        // The state takes the compacted table only once it is durable: a failed write
        // leaves the state describing the file.
        self.replace_table(st, snapshots, records)?;
        for uid in unloaded {
            st.roots.remove(&uid);
        }
        Ok(removed)
    }
}
