//! Reconciliation: restoring invariant W, and qcowx's facts, after a foreign writer.

use std::collections::HashMap;

use crate::engine::{Image, OpenState, State, TableReader};
use crate::error::Result;
use crate::format::addr::HostOffset;
use crate::format::tables::{l2_entries, l2_tables, L2Entry};

use super::*;

/// What a writable open of a damaged image says.
const OPEN: Option<&str> = Some("cannot open for writing until it is repaired: ");

impl Image {
    /// What a writable open does about the state it finds the image in:
    /// - dirty (a crash, or a writer with lazy refcounts): restore invariant W and
    ///   rebuild every refcount from a scan now, so the session starts exact;
    /// - clean, with a clean-close stamp that matches (see [`crate::format::stamp`]):
    ///   nothing — qcowx closed it and nothing that matters changed since;
    /// - clean otherwise (QEMU or another program wrote it last): restore
    ///   invariant W with one scan (O(metadata)); refcounts are trusted as exact.
    ///
    /// Restoring W clears bit 63 on every VDI-head link whose target is reachable
    /// more than once: only writable→read-only flips, safe at any point of a crash.
    pub(crate) fn settle_after_open(&self) -> Result<OpenState> {
        let mut st = self.lock_state()?;
        if st.stale {
            self.reconcile_locked(&mut st, OPEN)?;
            crate::refcount::rebuild(self, &mut st)?;
            return Ok(OpenState::Recovered);
        }
        if self.stamp_matches(&st) {
            return Ok(OpenState::Clean);
        }
        let counts = crate::refcount::reference_counts(self, &st, OPEN)?;
        // The refcounts are trusted from here on: a damaged refcount table or block
        // (a count below the references) would stay damaged through every apply, so
        // they are rebuilt — unless a count cannot fit the width, which is refused
        // before anything is written.
        let rebuild = !crate::refcount::refcounts_cover(self, &st, &counts)?;
        if rebuild {
            crate::refcount::refuse_overflow(self, &counts, st.header.refcount_order)?;
        }
        self.reconcile_with(&mut st, &counts)?;
        if rebuild {
            self.mark_stale(&mut st)?;
            crate::refcount::rebuild(self, &mut st)?;
            return Ok(OpenState::Rebuilt);
        }
        Ok(OpenState::Reconciled)
    }

    /// Problems with qcowx's facts in the snapshot table, for `check`: damaged or
    /// untrusted qcowx blocks, VDIs with several unflagged heads (an interrupted
    /// revert), names carried by several live roots.
    pub(crate) fn registry_problems(st: &State) -> Vec<String> {
        let mut out = Vec::new();
        let mut heads: HashMap<u64, usize> = HashMap::new();
        let mut names: HashMap<String, (usize, bool)> = HashMap::new();
        for (i, (e, r)) in st
            .registry
            .entries()
            .iter()
            .zip(st.registry.records())
            .enumerate()
        {
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
            if st.registry.is_live(i) {
                let n = names
                    .entry(crate::format::registry::display(e, r))
                    .or_insert((0, false));
                n.0 += 1;
                n.1 |= r.native;
            }
        }
        for (vdi, n) in heads {
            if n > 1 {
                out.push(format!(
                    "VDI {vdi:x} has {n} unflagged heads (an interrupted revert); repair flags the older ones"
                ));
            }
        }
        // Snapshots QEMU made may share a name (QEMU tells them apart by ID): only a
        // name a qcowx root carries must be unique.
        for (name, (n, native)) in names {
            if n > 1 && native {
                out.push(format!("{n} live roots are named '{name}'"));
            }
        }
        out
    }

    /// Repairs qcowx's facts: flags superseded VDI heads and restores invariant W on
    /// every head.
    pub(crate) fn repair_registry(&self, st: &mut State) -> Result<()> {
        for i in 0..st.registry.len() {
            let r = st.registry.record(i);
            if r.kind == RootKind::Vdi && !r.deleted && r.native && !st.registry.is_live(i) {
                st.registry.set_deleted(i, true);
                self.write_flags(st, i)?;
            }
        }
        // The refcount structures are about to be rebuilt elsewhere: data that
        // overlaps them is not damage the repair must refuse.
        self.reconcile_locked(st, None)
    }

    /// Restores invariant W on every head. `refuse`: scan the refcount structures
    /// too and refuse any damage, saying this (else the refcount structures are left
    /// out of the scan).
    fn reconcile_locked(&self, st: &mut State, refuse: Option<&str>) -> Result<()> {
        let counts = crate::refcount::reference_counts(self, st, refuse)?;
        self.reconcile_with(st, &counts)
    }

    /// Restores invariant W on every head, given every cluster's references.
    fn reconcile_with(&self, st: &mut State, counts: &crate::refcount::Counts) -> Result<()> {
        let bits = self.geo.cluster_bits;
        let count = |off: HostOffset| counts.get(off.get() >> bits);
        let mut heads = vec![Target::Default];
        heads.extend(
            (0..st.registry.len())
                .filter(|&i| st.registry.record(i).kind == RootKind::Vdi && st.registry.is_live(i))
                .map(Target::Entry),
        );
        let mut reader = TableReader::new(self)?;
        for t in heads {
            let id = self.load_root(st, t)?;
            let l1 = self.root(st, id)?.l1.clone();
            let geo = self.geo;
            for (i, e, off) in l2_tables(&l1, &geo).filter(|(_, e, _)| e.writable()) {
                if count(off) > 1 {
                    self.set_l1_entry(st, id, i, e.read_only())?;
                    continue;
                }
                // A table that is not cached is read past the cache: only the tables
                // this changes need a place in it (the scan walks every one).
                let words = match st.cache.get(off) {
                    Some(words) => words.to_vec(),
                    None => reader.read(off)?.unwrap_or_default(),
                };
                let shared: Vec<(usize, L2Entry)> = l2_entries(&words, &geo)
                    .filter(|(_, e)| e.writable() && e.host().is_some_and(|h| count(h) > 1))
                    .collect();
                if shared.is_empty() {
                    continue;
                }
                self.load_l2(st, off)?;
                if let Some(t) = st.cache.get_mut(off) {
                    for (j, e) in shared {
                        e.read_only().put(t, j, &geo);
                    }
                }
            }
        }
        self.flush_locked(st)
    }
}
