//! Writes: in place when both links are writable, else through the slow path that copies or allocates the L2 table and the data cluster (data before links).

use crate::error::Result;
use crate::format::addr::{GuestOffset, HostOffset};
use crate::format::tables::{ClusterKind, Geometry, L2Entry, ALL_SUBCLUSTERS, SUBCLUSTERS};
use crate::storage::Storage;

use super::Writing;

use super::image::*;

/// Where a write of `[in_off, in_off+n)` can go in place, if it can.
/// The most bytes of whole clusters one write through the slow path allocates and
/// writes at once, under the state lock (other requests to the image wait for it).
pub(super) const MAX_SLOW_RUN: u64 = 4 << 20;

/// Where the slow path writes one guest cluster (see `Image::slow_target`).
pub(super) struct SlowTarget {
    l2_off: HostOffset,
    l2i: usize,
    kind: ClusterKind,
    host: HostOffset,
    /// `host` is the cluster the root owns there, not a new one.
    in_place: bool,
}

pub(super) fn in_place_target(
    geo: &Geometry,
    kind: ClusterKind,
    writable: bool,
    in_off: u64,
    n: u64,
) -> Option<HostOffset> {
    if !writable {
        return None;
    }
    match kind {
        ClusterKind::Data { host } => Some(host),
        ClusterKind::Subclusters {
            host: Some(host),
            alloc,
            ..
        } => {
            let sub = geo.subcluster_size();
            let first = in_off / sub;
            let last = (in_off + n - 1) / sub;
            (first..=last)
                .all(|i| alloc & (1 << i) != 0)
                .then_some(host)
        }
        _ => None,
    }
}

impl Image {
    /// Writes `buf` to the disk at `offset`.
    ///
    /// Writes to clusters owned by the active layer through writable links go in place;
    /// anything else (unallocated, zero, compressed, or under a read-only link) copies
    /// the path first: a new L2 table if the L1 link is read-only, a new data cluster
    /// filled with the old content around the written range.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Error, Image};
    ///
    /// # fn main() -> Result<(), Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("a.qcow2");
    /// let img = Image::create(&path, &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[0x5a; 1000], 65000)?; // across a cluster boundary
    /// img.close()?;
    ///
    /// let img = Image::open(&path)?;
    /// let mut buf = [0u8; 1000];
    /// img.read_at(&mut buf, 65000)?;
    /// assert_eq!(buf, [0x5a; 1000]);
    /// // A read-only handle refuses writes.
    /// assert!(matches!(img.write_at(&buf, 0), Err(Error::ReadOnly { .. })));
    /// # Ok(()) }
    /// ```
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_root(DEFAULT_ROOT, buf, offset)
    }

    pub(crate) fn write_root(&self, root: RootId, buf: &[u8], offset: u64) -> Result<()> {
        self.wrote.store(true, std::sync::atomic::Ordering::Relaxed);
        let cs = self.geo.cluster_size();
        let len = buf.len() as u64;
        {
            let mut st = self.lock_state()?;
            self.check_root_writable(&st, root)?;
            self.check_range(&st, root, offset, len)?;
            self.mark_bitmaps(&mut st, root, offset, len);
        }
        let mut pos = 0u64;
        while pos < len {
            let guest = GuestOffset::new(offset + pos);
            let in_off = guest.in_cluster(&self.geo);
            let n = (cs - in_off).min(len - pos);
            let chunk = &buf[pos as usize..(pos + n) as usize];
            let mut st = self.lock_state()?;
            let (kind, writable) = self.lookup(&mut st, root, guest)?;
            if let Some(host) = in_place_target(&self.geo, kind, writable, in_off, n) {
                // The clusters after this one that are written in place too, at the
                // next host offsets, go in the same write.
                let at = host + in_off;
                let mut run = n;
                while pos + run < len {
                    let m = cs.min(len - pos - run);
                    let (kind, writable) = self.lookup(&mut st, root, guest + run)?;
                    match in_place_target(&self.geo, kind, writable, 0, m) {
                        Some(h) if Some(h) == at.checked_add(run) => run += m,
                        _ => break,
                    }
                }
                self.guard_write(&mut st, Writing::Data, at, run)?;
                let _gate = self.gate_read();
                drop(st);
                self.storage
                    .write_at(&buf[pos as usize..(pos + run) as usize], at.get())
                    .map_err(|e| self.io_err("write data", at, e))?;
                pos += run;
                continue;
            }
            self.mark_stale(&mut st)?;
            if in_off == 0 && n == cs {
                pos += self.write_whole_clusters(&mut st, root, guest, &buf[pos as usize..])?;
                continue;
            }
            let cg = guest.cluster_start(&self.geo);
            self.write_partial_cluster(&mut st, root, cg, in_off, chunk)?;
            pos += n;
        }
        Ok(())
    }

    /// Where a write through the slow path puts guest cluster `cg` of `root`: makes
    /// the L2 table writable (copying or creating it) and picks the host cluster — the
    /// one the root owns there, or a new one. Nothing links to a new one until the
    /// caller has written it and set the entry.
    pub(super) fn slow_target(
        &self,
        st: &mut State,
        root: RootId,
        cg: GuestOffset,
    ) -> Result<SlowTarget> {
        let (l1i, l2i) = self.geo.split(cg);
        let l2_off = self.writable_l2(st, root, l1i)?;
        let entry = self.l2_entry(st, l2_off, l2i)?;
        let entry_off = l2_off + l2i as u64 * self.geo.l2_entry_bytes();
        let kind = entry
            .kind(&self.geo)
            .map_err(|why| self.corrupt("L2 entry", entry_off, why))?;
        let in_place = match kind {
            ClusterKind::Data { host }
            | ClusterKind::Zero { host: Some(host) }
            | ClusterKind::Subclusters {
                host: Some(host), ..
            } if entry.writable() => Some(host),
            _ => None,
        };
        Ok(SlowTarget {
            l2_off,
            l2i,
            kind,
            host: in_place.unwrap_or_else(|| st.alloc.cluster()),
            in_place: in_place.is_some(),
        })
    }

    /// Writes the whole clusters at the start of `data` (from the cluster-aligned
    /// `guest`) that the slow path takes, up to [`MAX_SLOW_RUN`] bytes and until a
    /// cluster written in place: each gets its target, clusters whose hosts follow
    /// each other go in one storage write, and only then are the L2 entries set.
    /// Returns the bytes written: at least the first cluster.
    pub(super) fn write_whole_clusters(
        &self,
        st: &mut State,
        root: RootId,
        guest: GuestOffset,
        data: &[u8],
    ) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let limit = (data.len() as u64).min(MAX_SLOW_RUN.max(cs)) / cs * cs;
        let mut targets: Vec<SlowTarget> = Vec::new();
        let mut done = 0u64;
        while done < limit {
            if done > 0 {
                let (kind, writable) = self.lookup(st, root, guest + done)?;
                if in_place_target(&self.geo, kind, writable, 0, cs).is_some() {
                    break;
                }
            }
            targets.push(self.slow_target(st, root, guest + done)?);
            done += cs;
        }
        let mut i = 0;
        while i < targets.len() {
            let mut j = i + 1;
            while j < targets.len() && Some(targets[j].host) == targets[j - 1].host.checked_add(cs)
            {
                j += 1;
            }
            let at = targets[i].host;
            let bytes = &data[i * cs as usize..j * cs as usize];
            self.guard_write(st, Writing::Data, at, bytes.len() as u64)?;
            self.storage
                .write_at(bytes, at.get())
                .map_err(|e| self.io_err("write data", at, e))?;
            i = j;
        }
        for (i, t) in targets.into_iter().enumerate() {
            let cg = guest + i as u64 * cs;
            self.note_release(st, root, cg, t.kind, Some(t.host));
            self.set_l2_entry(st, t.l2_off, t.l2i, L2Entry::data(t.host, &self.geo))?;
        }
        Ok(done)
    }

    /// Writes `data`, less than a whole cluster, at `in_off` of the guest cluster `cg`
    /// through the slow path. (Whole clusters go through `write_whole_clusters`.)
    ///
    /// On an extended-L2 image only subclusters are written: those the write touches
    /// (their bytes around `data` from the cluster's current content) and, when the
    /// cluster moves to a new host cluster, those the old one held; every other
    /// subcluster keeps reading from the backing file or as zeros, as QCOW2's
    /// subcluster bitmaps allow. On a standard image the whole cluster is written.
    pub(super) fn write_partial_cluster(
        &self,
        st: &mut State,
        root: RootId,
        cg: GuestOffset,
        in_off: u64,
        data: &[u8],
    ) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let SlowTarget {
            l2_off,
            l2i,
            kind,
            host,
            in_place,
        } = self.slow_target(st, root, cg)?;
        self.guard_write(st, Writing::Data, host, cs)?;
        let (old_alloc, old_zero) = match kind {
            ClusterKind::Data { .. } | ClusterKind::Compressed { .. } => (ALL_SUBCLUSTERS, 0),
            ClusterKind::Subclusters { alloc, zero, .. } => (alloc, zero),
            ClusterKind::Zero { .. } => (0, ALL_SUBCLUSTERS),
            ClusterKind::Unallocated => (0, 0),
        };
        let len = data.len() as u64;
        let touched = geo.subclusters_touched(in_off, len);
        // Subclusters already in `host` (in-place writes may be in flight there: only
        // the written bytes of them are rewritten), and the allocated set afterwards.
        let present = if in_place { old_alloc } else { 0 };
        let alloc = if geo.extended {
            old_alloc | touched
        } else {
            ALL_SUBCLUSTERS
        };
        let sub = geo.subcluster_size();
        let (start, end) = (in_off, in_off + len);
        let mut i = 0u64;
        while i < u64::from(SUBCLUSTERS) {
            let bit = 1u32 << i;
            if alloc & bit == 0 || (present & bit != 0 && touched & bit == 0) {
                i += 1;
                continue;
            }
            // A run of subclusters written the same way: whole (new to `host`), or
            // only the written bytes (already in `host`).
            let whole = present & bit == 0;
            let mut j = i + 1;
            while j < u64::from(SUBCLUSTERS) {
                let b = 1u32 << j;
                let next_whole = present & b == 0;
                if alloc & b == 0 || next_whole != whole || (!whole && touched & b == 0) {
                    break;
                }
                j += 1;
            }
            let (lo, hi) = if whole {
                (i * sub, j * sub)
            } else {
                ((i * sub).max(start), (j * sub).min(end))
            };
            let mut buf = vec![0u8; (hi - lo) as usize];
            if lo < start || hi > end {
                // Bytes of the run outside the write: the cluster's current content.
                self.read_cluster_range(kind, cg, lo, &mut buf)?;
            }
            let (from, to) = (start.max(lo), end.min(hi));
            if from < to {
                buf[(from - lo) as usize..(to - lo) as usize]
                    .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
            }
            let at = host + lo;
            self.storage
                .write_at(&buf, at.get())
                .map_err(|e| self.io_err("write data", at, e))?;
            i = j;
        }
        self.note_release(st, root, cg, kind, Some(host));
        let entry = if geo.extended && alloc != ALL_SUBCLUSTERS {
            L2Entry::subclusters(host, alloc, old_zero & !alloc)
        } else {
            L2Entry::data(host, &geo)
        };
        self.set_l2_entry(st, l2_off, l2i, entry)
    }
}
