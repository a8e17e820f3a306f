//! Mark-and-sweep garbage collection.
//!
//! Deleting a snapshot or VDI only flags its snapshot table entry. [`Image::gc`] then
//! compacts the table (dropping deleted roots and superseded VDI heads, re-linking the
//! lineage around them), counts references from the live roots, writes exact
//! refcounts, clears the dirty bit, truncates the free tail of the file, and
//! hole-punches every cluster that lost its last reference, durably, before the
//! allocator may hand it out again.

use std::collections::HashMap;

use crate::alloc::runs;
use crate::error::Result;
use crate::image::Image;
use crate::refcount;
use crate::vdi::{encode_extra, RootKind};

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Roots removed from the snapshot table (deleted ones, superseded VDI heads).
    pub roots_removed: u64,
    /// Clusters that lost their last reference.
    pub clusters_freed: u64,
    /// Bytes those clusters held.
    pub bytes_freed: u64,
    /// Image file length before.
    pub file_size_before: u64,
    /// Image file length after (the free tail is truncated).
    pub file_size_after: u64,
}

impl Image {
    /// Reclaims the space of deleted roots and writes exact refcounts.
    ///
    /// Cost: O(metadata) — a walk of every distinct table, never of the data. Writes
    /// in flight finish first; I/O waits while it runs.
    pub fn gc(&self) -> Result<GcReport> {
        if !self.is_writable() {
            return Err(crate::Error::ReadOnly {
                file: self.name.clone(),
                why: "gc needs the image open for writing".into(),
            });
        }
        let mut st = self.lock_state()?;
        let _gate = self.io_gate_write();
        let st = &mut *st;
        let cs = self.geo.cluster_size();
        let file_size_before = self.storage.len().map_err(|e| self.io_err("stat", 0, e))?;
        self.flush_metadata(st)?;
        self.promote_pending(st)?;
        self.mark_stale(st)?;
        let before = refcount::reference_counts(self, st)?;

        // Compact the table: keep live roots; a removed snapshot's children inherit
        // its parent so the lineage stays connected.
        let live: Vec<bool> = (0..st.snapshots.len())
            .map(|i| Image::entry_live(st, i))
            .collect();
        let removed = live.iter().filter(|l| !**l).count() as u64;
        if removed > 0 {
            let parent_of: HashMap<u64, u64> =
                st.records.iter().map(|r| (r.uid, r.parent)).collect();
            let live_uids: std::collections::HashSet<u64> = st
                .records
                .iter()
                .zip(&live)
                .filter(|(_, l)| **l)
                .map(|(r, _)| r.uid)
                .collect();
            let mut snapshots = Vec::new();
            let mut records = Vec::new();
            for (i, keep) in live.iter().enumerate() {
                if !keep {
                    let id = match st.records[i].kind {
                        RootKind::Vdi => st.records[i].vdi,
                        RootKind::Snapshot => st.records[i].uid,
                    };
                    // A superseded head shares its VDI's id with the live head.
                    if st.records[i].kind == RootKind::Snapshot {
                        st.roots.remove(&id);
                    }
                    continue;
                }
                let mut rec = st.records[i].clone();
                let mut entry = st.snapshots[i].clone();
                let mut p = rec.parent;
                let mut hops = 0;
                while p != 0 && !live_uids.contains(&p) && hops < st.records.len() {
                    p = parent_of.get(&p).copied().unwrap_or(0);
                    hops += 1;
                }
                if !live_uids.contains(&p) {
                    p = 0;
                }
                if p != rec.parent && rec.native {
                    rec.parent = p;
                    let size = entry.disk_size().unwrap_or(st.header.size);
                    let vm = entry
                        .extra
                        .get(0..8)
                        .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
                    entry.extra = encode_extra(&rec, size, vm);
                }
                snapshots.push(entry);
                records.push(rec);
            }
            st.snapshots = snapshots;
            st.records = records;
            self.rewrite_table(st)?;
        }

        let after = refcount::rebuild(self, st)?;
        let end = after.len() as u64;
        let freed: Vec<u64> = before
            .iter()
            .enumerate()
            .filter(|(c, &n)| n > 0 && after.get(*c).copied().unwrap_or(0) == 0)
            .map(|(c, _)| c as u64 * cs)
            .collect();
        // Every unreferenced cluster inside the file (freed now, or orphaned by a crash
        // or a revert earlier) is punched, and that is made durable before the
        // allocator may hand any of them out again.
        let free: Vec<u64> = (1..end)
            .filter(|&c| after[c as usize] == 0)
            .map(|c| c * cs)
            .collect();
        for (start, len) in runs(&free, cs) {
            self.storage
                .punch_hole(start, len)
                .map_err(|e| self.io_err("punch hole", start, e))?;
        }
        if !free.is_empty() {
            self.sync()?;
            st.alloc.make_ready(free);
        }
        let file_size_after = self.storage.len().map_err(|e| self.io_err("stat", 0, e))?;
        Ok(GcReport {
            roots_removed: removed,
            clusters_freed: freed.len() as u64,
            bytes_freed: freed.len() as u64 * cs,
            file_size_before,
            file_size_after,
        })
    }
}
