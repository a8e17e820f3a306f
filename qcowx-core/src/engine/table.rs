//! Table access: the one path by which every reader and writer reaches L1 and L2 entries and the L2 cache, and makes an L2 table writable (copying a shared one).

use crate::error::{Error, Result};
use crate::format::addr::{GuestOffset, HostOffset};
use crate::format::tables::{
    decode_words, encode_words, make_l2_read_only, ClusterKind, L1Entry, L2Entry,
};
use crate::storage::Storage;

use super::image::*;
use super::Writing;

impl Image {
    /// Makes sure the L2 table at `off` is in the cache.
    pub(crate) fn load_l2(&self, st: &mut State, off: HostOffset) -> Result<()> {
        if st.cache.get(off).is_some() {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let file_len = self
            .storage
            .len()
            .map_err(|e| self.io_err("stat", 0u64, e))?;
        if !off.is_cluster_aligned(&self.geo)
            || off.get().saturating_add(cs) > file_len.next_multiple_of(cs)
        {
            return Err(self.corrupt(
                "L2 table",
                off,
                "table offset is unaligned or past the end of the file",
            ));
        }
        let mut raw = crate::storage::io_buf(cs as usize);
        self.storage
            .read_at(&mut raw, off.get())
            .map_err(|e| self.io_err("read L2 table", off, e))?;
        let words = decode_words(&raw);
        self.cache_insert(st, off, words, false)
    }

    /// Inserts a table, writing back a dirty table the cache evicts (after the data it
    /// links to is durable).
    pub(super) fn cache_insert(
        &self,
        st: &mut State,
        off: HostOffset,
        words: Vec<u64>,
        dirty: bool,
    ) -> Result<()> {
        if let Some(ev) = st.cache.insert(off, words, dirty) {
            let written = self.sync().and_then(|_| {
                self.storage
                    .write_at(&encode_words(&ev.words), ev.offset.get())
                    .map_err(|e| self.io_err("write L2 table", ev.offset, e))
            });
            if let Err(e) = written {
                // Keep the table (over capacity) rather than lose links to it.
                st.cache.restore(ev);
                return Err(e);
            }
        }
        Ok(())
    }

    pub(super) fn l2_entry(
        &self,
        st: &mut State,
        l2_off: HostOffset,
        idx: usize,
    ) -> Result<L2Entry> {
        self.load_l2(st, l2_off)?;
        let words = st
            .cache
            .get(l2_off)
            .ok_or_else(|| self.corrupt("L2 table", l2_off, "vanished from the cache"))?;
        Ok(L2Entry::get(words, idx, &self.geo))
    }

    /// Notes that `root` gives up the cluster `old` linked at guest offset `guest` (it
    /// is relinking it to `new_host`), for the default VDI's bit 63 (see
    /// [`super::Released`]).
    pub(super) fn note_release(
        &self,
        st: &mut State,
        root: RootId,
        guest: GuestOffset,
        old: ClusterKind,
        new_host: Option<HostOffset>,
    ) {
        if root == DEFAULT_ROOT {
            return;
        }
        if let Some((host, _)) = super::host_range(&self.geo, old) {
            if !old_is_compressed(old) && Some(host) != new_host {
                st.deltas.released(super::Released::Data { guest, host });
            }
        }
    }

    pub(super) fn set_l2_entry(
        &self,
        st: &mut State,
        l2_off: HostOffset,
        idx: usize,
        e: L2Entry,
    ) -> Result<()> {
        self.load_l2(st, l2_off)?;
        let words = st
            .cache
            .get_mut(l2_off)
            .ok_or_else(|| self.corrupt("L2 table", l2_off, "vanished from the cache"))?;
        let old = L2Entry::get(words, idx, &self.geo);
        e.put(words, idx, &self.geo);
        // The table is reached by one path (invariant W: only writable tables change),
        // so one reference moves from the old target to the new one.
        match (old.kind(&self.geo), e.kind(&self.geo)) {
            (Ok(a), Ok(b)) => st.deltas.relink(&self.geo, a, b),
            _ => st.deltas.lose_exactness(),
        }
        Ok(())
    }

    pub(super) fn l1_entry(&self, st: &State, root: RootId, l1i: usize) -> Result<L1Entry> {
        let r = self.root(st, root)?;
        let e = L1Entry::from_raw(r.l1.get(l1i).copied().unwrap_or(0));
        if e.is_malformed(&self.geo) {
            return Err(self.corrupt(
                "L1 table",
                r.l1_offset + l1i as u64 * 8,
                format!("malformed entry {:#x}", e.raw()),
            ));
        }
        Ok(e)
    }

    pub(crate) fn set_l1_entry(
        &self,
        st: &mut State,
        root: RootId,
        l1i: usize,
        e: L1Entry,
    ) -> Result<()> {
        let r = self.root_mut(st, root)?;
        let slot = r.l1.get_mut(l1i).ok_or_else(|| {
            Error::InvalidArgument(format!("L1 index {l1i} past the end of root {root}"))
        })?;
        *slot = e.raw();
        r.dirty.insert(l1i / 64);
        st.l1_changes += 1;
        Ok(())
    }

    /// What the guest cluster containing `guest` maps to, and whether both links to it
    /// are writable.
    pub(super) fn lookup(
        &self,
        st: &mut State,
        root: RootId,
        guest: GuestOffset,
    ) -> Result<(ClusterKind, bool)> {
        let (l1i, l2i) = self.geo.split(guest);
        let l1e = self.l1_entry(st, root, l1i)?;
        let Some(l2_off) = l1e.l2_offset() else {
            return Ok((ClusterKind::Unallocated, false));
        };
        let mut found = (ClusterKind::Unallocated, false);
        self.l2_kinds(st, l2_off, l2i, 1, |kind, writable| {
            found = (kind, l1e.writable() && writable)
        })?;
        Ok(found)
    }

    /// What entries `first..first + count` of the L2 table at `l2_off` map to, in
    /// order: `f(kind, writable)` for each (`writable`: the entry's own bit 63). The
    /// table is looked up once, so a range of clusters costs one cache lookup, not
    /// one per cluster. A malformed entry fails with where it is.
    pub(super) fn l2_kinds(
        &self,
        st: &mut State,
        l2_off: HostOffset,
        first: usize,
        count: usize,
        mut f: impl FnMut(ClusterKind, bool),
    ) -> Result<()> {
        self.load_l2(st, l2_off)?;
        let words = st
            .cache
            .get(l2_off)
            .ok_or_else(|| self.corrupt("L2 table", l2_off, "vanished from the cache"))?;
        for l2i in first..first + count {
            let e = L2Entry::get(words, l2i, &self.geo);
            let kind = e.kind(&self.geo).map_err(|why| {
                let entry_off = l2_off + l2i as u64 * self.geo.l2_entry_bytes();
                self.corrupt("L2 entry", entry_off, why)
            })?;
            f(kind, e.writable());
        }
        Ok(())
    }

    /// Makes sure the L1 entry `l1i` links to an L2 table this root owns, copying a
    /// shared table (every entry of the copy read-only) or allocating a new one.
    pub(super) fn writable_l2(
        &self,
        st: &mut State,
        root: RootId,
        l1i: usize,
    ) -> Result<HostOffset> {
        let e = self.l1_entry(st, root, l1i)?;
        match e.l2_offset() {
            Some(off) if e.writable() => {
                self.load_l2(st, off)?;
                self.guard_write(st, Writing::L2Table, off, self.geo.cluster_size())?;
                Ok(off)
            }
            Some(off) => {
                self.load_l2(st, off)?;
                let mut words = st
                    .cache
                    .get(off)
                    .ok_or_else(|| self.corrupt("L2 table", off, "vanished from the cache"))?
                    .to_vec();
                make_l2_read_only(&mut words, &self.geo);
                let new = st.alloc.cluster();
                self.cache_insert(st, new, words, true)?;
                self.set_l1_entry(st, root, l1i, L1Entry::new(new, true))?;
                // The copy links what the table links: only the table's reference moves.
                let cs = self.geo.cluster_size();
                st.deltas.range(off, cs, -1);
                st.deltas.range(new, cs, 1);
                if root != DEFAULT_ROOT {
                    st.deltas
                        .released(super::Released::Table { l1i, table: off });
                }
                Ok(new)
            }
            None => {
                let new = st.alloc.cluster();
                let words = vec![0u64; (self.geo.cluster_size() / 8) as usize];
                self.cache_insert(st, new, words, true)?;
                self.set_l1_entry(st, root, l1i, L1Entry::new(new, true))?;
                st.deltas.range(new, self.geo.cluster_size(), 1);
                Ok(new)
            }
        }
    }

    /// Writes the compressed cluster `bytes` where `place` says (a host byte offset)
    /// and links guest cluster `guest` of the default VDI to it; returns the offset.
    /// The cluster must read as unallocated (or zero with no host cluster): compressed
    /// output fills clusters, it does not replace data. The L2 table is made writable
    /// through the same path every write takes ([`Image::writable_l2`]), so a shared
    /// table is copied and a dirty table evicted on the way is kept if its write-back
    /// fails; the data is guarded as every data write is ([`Image::guard_write`]).
    pub(crate) fn link_compressed(
        &self,
        st: &mut State,
        guest: GuestOffset,
        bytes: &[u8],
        place: impl FnOnce(&mut State) -> HostOffset,
    ) -> Result<HostOffset> {
        let (l1i, l2i) = self.geo.split(guest);
        let l2_off = self.writable_l2(st, DEFAULT_ROOT, l1i)?;
        let current = self.l2_entry(st, l2_off, l2i)?;
        match current.kind(&self.geo) {
            Ok(ClusterKind::Unallocated) | Ok(ClusterKind::Zero { host: None }) => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{}: guest cluster at {guest} is already allocated; compressed writes \
                     fill unallocated clusters only",
                    self.name
                )))
            }
        }
        let at = place(st);
        let len = bytes.len() as u64;
        self.guard_write(st, Writing::Data, at, len)?;
        self.storage
            .write_at(bytes, at.get())
            .map_err(|e| self.io_err("write compressed cluster", at, e))?;
        self.set_l2_entry(st, l2_off, l2i, L2Entry::compressed(at, len, &self.geo))?;
        Ok(at)
    }
}

/// Compressed clusters carry no bit 63 in QEMU's rule.
fn old_is_compressed(k: ClusterKind) -> bool {
    matches!(k, ClusterKind::Compressed { .. })
}
