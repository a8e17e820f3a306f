//! Roots and the snapshot table: loading a root's L1 table, writing read-only copies,
//! appending, flagging and replacing snapshot-table entries, each change committed by
//! one header write. The narrow API through which the VDI layer changes the file.

use zerocopy::IntoBytes;

use crate::engine::{Image, IoGate, Root, RootId, State, DEFAULT_ROOT};
use crate::error::{Error, Result};
use crate::format::addr::HostOffset;
use crate::format::header::MAX_SNAPSHOTS;
use crate::format::roots::*;
use crate::format::snapshot::{RawSnapshotHeader, SnapshotEntry, MAX_SNAPSHOT_TABLE_BYTES};
use crate::format::tables::{decode_words, encode_words, read_only_l1};

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
pub(crate) struct L1Loc {
    pub(crate) offset: u64,
    pub(crate) entries: u32,
    pub(crate) size: u64,
    /// What is wrong with a snapshot entry's L1 reference (`SnapshotEntry::l1_problem`).
    pub(crate) problem: Option<&'static str>,
}

impl Image {
    /// The in-memory root id of a target.
    pub(crate) fn root_id(st: &State, t: Target) -> RootId {
        match t {
            Target::Default => DEFAULT_ROOT,
            Target::Entry(i) => match st.registry.record(i).kind {
                RootKind::Vdi => st.registry.record(i).vdi,
                RootKind::Snapshot => st.registry.record(i).uid,
            },
        }
    }

    pub(crate) fn l1_loc(st: &State, t: Target) -> L1Loc {
        match t {
            Target::Default => L1Loc {
                offset: st.header.l1_table_offset,
                entries: st.header.l1_size,
                size: st.header.size,
                problem: None,
            },
            Target::Entry(i) => {
                let e = st.registry.entry(i);
                L1Loc {
                    offset: e.l1_table_offset,
                    entries: e.l1_size,
                    size: e.disk_size().unwrap_or(st.header.size),
                    problem: e.l1_problem(1 << st.header.cluster_bits),
                }
            }
        }
    }

    /// Makes sure the root of `t` is loaded and returns its id.
    pub(crate) fn load_root(&self, st: &mut State, t: Target) -> Result<RootId> {
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
            Target::Entry(i) => st.registry.record(i).kind == RootKind::Vdi,
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

    pub(crate) fn read_l1(&self, loc: L1Loc) -> Result<Vec<u64>> {
        if let Some(why) = loc.problem {
            return Err(self.corrupt("snapshot table entry's L1 table", loc.offset, why));
        }
        let len = u64::from(loc.entries) * 8;
        let file_len = self
            .storage
            .len()
            .map_err(|e| self.io_err("stat", 0u64, e))?;
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
    pub(crate) fn head_l1(&self, loc: L1Loc) -> Result<Vec<u64>> {
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

    /// Makes every link of root `id`'s L1 table read-only, in place in the file and in
    /// memory: the step before a second root may reach its tables. Writable→read-only
    /// flips are safe to persist at any time.
    pub(crate) fn make_root_read_only(&self, st: &mut State, id: RootId) -> Result<()> {
        let (ro, at) = {
            let r = self.root(st, id)?;
            (read_only_l1(&r.l1), r.l1_offset)
        };
        self.storage
            .write_at(&encode_words(&ro), at)
            .map_err(|e| self.io_err("write L1 table", at, e))?;
        if let Some(r) = st.roots.get_mut(&id) {
            r.l1 = ro;
            r.dirty.clear();
        }
        Ok(())
    }

    /// Writes `l1` with every link read-only to new clusters; returns the offset.
    pub(crate) fn write_read_only_copy(&self, st: &mut State, l1: &[u64]) -> Result<u64> {
        let copy = read_only_l1(l1);
        let clusters = self.geo.clusters_for(copy.len() as u64 * 8).max(1);
        let at = st.alloc.contiguous(clusters).get();
        let mut bytes = encode_words(&copy);
        bytes.resize((clusters * self.geo.cluster_size()) as usize, 0);
        self.storage
            .write_at(&bytes, at)
            .map_err(|e| self.io_err("write L1 table", at, e))?;
        Ok(at)
    }

    /// Bytes the table's entries occupy.
    pub(crate) fn table_bytes(st: &State) -> u64 {
        st.registry.used_bytes()
    }

    /// Appends `entry` to the snapshot table and commits it with one header write.
    ///
    /// The entry goes into the table's spare room when it fits (no rewrite of the
    /// table); otherwise the table moves to new clusters with twice the room. Either
    /// way everything is written and synced before the single-sector header write
    /// (`nb_snapshots`, `snapshots_offset`) that makes the new root count.
    pub(crate) fn append_entry(
        &self,
        st: &mut State,
        entry: SnapshotEntry,
        rec: Record,
    ) -> Result<()> {
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
        let (offset, moved) = if st.header.snapshots_offset != 0 && need <= st.registry.capacity() {
            let mut bytes = Vec::new();
            entry.write_to(&mut bytes);
            let at = st.header.snapshots_offset + used;
            self.storage
                .write_at(&bytes, at)
                .map_err(|e| self.io_err("write snapshot table", at, e))?;
            (st.header.snapshots_offset, None)
        } else {
            let capacity = (need * 2)
                .next_multiple_of(cs)
                .min(MAX_SNAPSHOT_TABLE_BYTES.next_multiple_of(cs));
            let at = st.alloc.contiguous(capacity / cs).get();
            let mut bytes = Vec::with_capacity(need as usize);
            for e in st.registry.entries() {
                e.write_to(&mut bytes);
            }
            entry.write_to(&mut bytes);
            self.storage
                .write_at(&bytes, at)
                .map_err(|e| self.io_err("write snapshot table", at, e))?;
            (at, Some(capacity))
        };
        self.sync()?;
        let before = (st.header.snapshots_offset, st.registry.capacity());
        st.header.nb_snapshots += 1;
        st.header.snapshots_offset = offset;
        if let Some(capacity) = moved {
            st.registry.set_capacity(capacity);
        }
        st.registry.push(entry, rec);
        let committed = self.write_header_fields(st).and_then(|_| self.sync());
        if committed.is_err() {
            // The commit failed: the entry does not count. The state goes back to the
            // table the file had, so no later header write (a close) commits it.
            st.header.nb_snapshots -= 1;
            st.header.snapshots_offset = before.0;
            st.registry.set_capacity(before.1);
            st.registry.pop();
        } else {
            st.deltas.range(HostOffset::new(before.0), used, -1);
            st.deltas.range(HostOffset::new(offset), need, 1);
        }
        committed
    }

    /// Counts a root committed at `l1_offset` whose table was written as a read-only
    /// copy of `l1`: its L1 table gains a reference, and every cluster its tree
    /// reaches one more (walked when the refcounts are next written).
    pub(crate) fn count_new_root(&self, st: &mut State, l1_offset: u64, l1: &[u64]) {
        st.deltas
            .range(HostOffset::new(l1_offset), l1.len() as u64 * 8, 1);
        st.deltas.tree(l1.to_vec(), 1);
    }

    /// Rewrites the flags of entry `i` in place: one aligned 8-byte write (flags and
    /// crc), synced.
    ///
    /// A table the entries do not write back byte for byte (room 0, see
    /// `Registry::capacity`) is rewritten whole instead, under the dirty bit: its
    /// offsets are not the file's.
    pub(crate) fn write_flags(&self, st: &mut State, i: usize) -> Result<()> {
        let block = raw_block(st.registry.record(i));
        // The in-memory entry's extra data carries the flags the record now has.
        let extra = st.registry.extra_mut(i);
        if extra.len() >= QEMU_EXTRA_BYTES + ROOT_EXTRA_BYTES {
            extra[QEMU_EXTRA_BYTES..QEMU_EXTRA_BYTES + ROOT_EXTRA_BYTES]
                .copy_from_slice(block.as_bytes());
        }
        if st.registry.capacity() == 0 {
            let snapshots = st.registry.entries().to_vec();
            let records = st.registry.records().to_vec();
            self.flush_locked(st)?;
            self.mark_stale(st)?;
            return self.replace_table(st, snapshots, records);
        }
        // The flags and the crc: the last aligned 8-byte word of the qcowx block, after
        // the entry's fixed head and QEMU's extra data.
        let word = std::mem::offset_of!(RawRootExtra, flags);
        let head = std::mem::size_of::<RawSnapshotHeader>();
        let at = st.header.snapshots_offset
            + st.registry.offset_of(i)
            + (head + QEMU_EXTRA_BYTES + word) as u64;
        self.storage
            .write_at(&block.as_bytes()[word..ROOT_EXTRA_BYTES], at)
            .map_err(|e| self.io_err("write snapshot flags", at, e))?;
        self.sync()
    }

    /// Waits for data I/O in flight, then runs `f` with the metadata locked.
    ///
    /// An operation that fails part-way may leave links flipped read-only for a root
    /// that was never committed, or similar changes no refcount delta describes: the
    /// next refcount write then rebuilds from a scan (which also sets every link's
    /// bit 63 as the counts say).
    pub(crate) fn quiesced<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        self.quiesced_gated(|st, _| f(st))
    }

    /// [`Image::quiesced`], handing `f` the I/O gate it holds (for work that needs
    /// the proof, such as writing refcounts, which may shrink the file).
    pub(crate) fn quiesced_gated<T>(
        &self,
        f: impl FnOnce(&mut State, &IoGate<'_>) -> Result<T>,
    ) -> Result<T> {
        let _structure = self.lock_structure();
        let mut st = self.lock_state()?;
        let gate = self.io_gate_write();
        let r = f(&mut st, &gate);
        if r.is_err() && st.stale {
            st.deltas.lose_exactness();
        }
        r
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
        let old_table = (st.header.snapshots_offset, Image::table_bytes(st));
        let old = st.registry.replace(snapshots, records, capacity);
        let old_place = (st.header.nb_snapshots, st.header.snapshots_offset);
        let committed = self.switch_table(st, offset);
        if committed.is_err() {
            st.registry.restore(old);
            (st.header.nb_snapshots, st.header.snapshots_offset) = old_place;
        } else {
            st.deltas
                .range(HostOffset::new(old_table.0), old_table.1, -1);
            st.deltas
                .range(HostOffset::new(offset), Image::table_bytes(st), 1);
        }
        committed
    }

    /// Writes `entries` to new clusters, synced;
    /// returns where and the room taken (`(0, 0)` for an empty table).
    pub(crate) fn write_table(
        &self,
        st: &mut State,
        entries: &[SnapshotEntry],
    ) -> Result<(u64, u64)> {
        let cs = self.geo.cluster_size();
        let mut bytes = Vec::new();
        for e in entries {
            e.write_to(&mut bytes);
        }
        if bytes.is_empty() {
            return Ok((0, 0));
        }
        let capacity = (bytes.len() as u64).next_multiple_of(cs);
        let at = st.alloc.contiguous(capacity / cs).get();
        self.storage
            .write_at(&bytes, at)
            .map_err(|e| self.io_err("write snapshot table", at, e))?;
        self.sync()?;
        Ok((at, capacity))
    }

    /// Points the header at the state's table, written at `offset`: the commit (one
    /// header write, synced).
    pub(crate) fn switch_table(&self, st: &mut State, offset: u64) -> Result<()> {
        st.header.nb_snapshots = st.registry.len() as u32;
        st.header.snapshots_offset = offset;
        self.write_header_fields(st)?;
        self.sync()
    }
}
