//! Zeroing and discard: zero clusters, unmapping clusters a root owns exclusively.

use crate::error::Result;
use crate::format::addr::GuestOffset;
use crate::format::tables::{
    for_each_piece, subcluster_runs, ClusterKind, L2Entry, Source, ALL_SUBCLUSTERS,
};
use crate::storage::Storage;

use super::image::*;

pub(crate) enum ZeroMode {
    Zero {
        unmap: bool,
    },
    Discard,
    /// Whole clusters become unallocated, reading through the backing file (what
    /// `qemu-img commit` leaves in the top image).
    Unallocate,
}

impl Image {
    /// Makes `[offset, offset+len)` read as zeros. With `may_unmap`, clusters the
    /// active layer owns are released; without it they stay allocated.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, ExtentStatus, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[1; 65536], 0)?;
    /// img.write_zeroes(0, 65536, true)?;
    /// let mut buf = [1u8; 512];
    /// img.read_at(&mut buf, 0)?;
    /// assert_eq!(buf, [0; 512]);
    /// assert_eq!(img.block_status(0, 65536)?[0].status, ExtentStatus::Zero);
    /// # Ok(()) }
    /// ```
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.zero_range(
            DEFAULT_ROOT,
            offset,
            len,
            ZeroMode::Zero { unmap: may_unmap },
        )
    }

    /// Discards `[offset, offset+len)`: whole clusters in the range are released and
    /// read as zeros afterwards; partial clusters at the edges are left alone.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[1; 2 * 65536], 0)?;
    /// // The first whole cluster is released; the half cluster after it is left alone.
    /// img.discard(0, 65536 + 32768)?;
    /// let mut buf = [9u8; 2];
    /// img.read_at(&mut buf, 65535)?;
    /// assert_eq!(buf, [0, 1]);
    /// # Ok(()) }
    /// ```
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(DEFAULT_ROOT, offset, len, ZeroMode::Discard)
    }

    /// Makes the whole clusters of `[offset, offset+len)` in the default VDI
    /// unallocated, so they read through the backing file (whether or not it is open);
    /// partial clusters at the edges are left alone.
    pub(crate) fn unallocate(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(DEFAULT_ROOT, offset, len, ZeroMode::Unallocate)
    }

    pub(crate) fn zero_range(
        &self,
        root: RootId,
        offset: u64,
        len: u64,
        mode: ZeroMode,
    ) -> Result<()> {
        self.wrote.store(true, std::sync::atomic::Ordering::Relaxed);
        let cs = self.geo.cluster_size();
        let (size, v3) = {
            let mut st = self.lock_state()?;
            self.check_root_writable(&st, root)?;
            self.check_range(&st, root, offset, len)?;
            self.mark_bitmaps(&mut st, root, offset, len);
            (self.root(&st, root)?.size, st.header.version >= 3)
        };
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let in_off = pos % cs;
            let n = (cs - in_off).min(end - pos);
            // The last cluster of a disk whose size is not a cluster multiple counts as
            // whole when the range reaches the end of the disk.
            let whole = in_off == 0 && (n == cs || pos + n == size);
            let mut st = self.lock_state()?;
            // An unallocated entry is valid in every version.
            let by_entry = v3 || matches!(mode, ZeroMode::Unallocate);
            match (&mode, whole && by_entry) {
                (_, true) => self.zero_cluster(&mut st, root, GuestOffset::new(pos), &mode)?,
                (ZeroMode::Discard, false) if !v3 && whole => {
                    // Version 2 has no zero flag: a discard must write zeros so the
                    // backing file does not show through.
                    drop(st);
                    self.write_root(root, &vec![0u8; n as usize], pos)?;
                }
                (ZeroMode::Discard | ZeroMode::Unallocate, false) => {}
                (ZeroMode::Zero { .. }, false) => {
                    let cg = GuestOffset::new(pos - in_off);
                    let covered = if self.geo.extended {
                        self.geo.subclusters_covered(in_off, n)
                    } else {
                        0
                    };
                    if covered != 0 && self.zero_subclusters(&mut st, root, cg, covered)? {
                        // The whole subclusters read as zeros now; the bytes around them
                        // are written.
                        let sub = self.geo.subcluster_size();
                        let lo = u64::from(covered.trailing_zeros()) * sub;
                        let hi = u64::from(32 - covered.leading_zeros()) * sub;
                        drop(st);
                        self.zero_by_writing(root, pos, lo - in_off)?;
                        self.zero_by_writing(root, cg.get() + hi, in_off + n - hi)?;
                    } else {
                        drop(st);
                        self.zero_by_writing(root, pos, n)?;
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Makes `[at, at + len)` (inside one cluster) read as zeros by writing zeros,
    /// unless it reads as zeros already.
    fn zero_by_writing(&self, root: RootId, at: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut st = self.lock_state()?;
        let g = GuestOffset::new(at);
        let (kind, _) = self.lookup(&mut st, root, g)?;
        let has_backing = self.backing.is_some();
        let mut zero = true;
        for_each_piece(&self.geo, kind, g.in_cluster(&self.geo), len, |_, src| {
            zero &= matches!(src, Source::Zero) || (src == Source::Backing && !has_backing);
        });
        if zero {
            return Ok(());
        }
        drop(st);
        self.write_root(root, &vec![0u8; len as usize], at)
    }

    /// Makes the subclusters `covered` of the guest cluster at `cg` (an extended-L2
    /// image) read as zeros by setting their zero bits, as QCOW2 allows; false when
    /// that cannot be done without copying the cluster (it is shared and holds other
    /// allocated subclusters, or compressed): the caller writes zeros instead.
    fn zero_subclusters(
        &self,
        st: &mut State,
        root: RootId,
        cg: GuestOffset,
        covered: u32,
    ) -> Result<bool> {
        let (kind, _) = self.lookup(st, root, cg)?;
        let (host, alloc, zero) = match kind {
            ClusterKind::Unallocated => (None, 0, 0),
            ClusterKind::Zero { host } => (host, 0, ALL_SUBCLUSTERS),
            ClusterKind::Subclusters { host, alloc, zero } => (host, alloc, zero),
            ClusterKind::Data { host } => (Some(host), ALL_SUBCLUSTERS, 0),
            ClusterKind::Compressed { .. } => return Ok(false),
        };
        if alloc & covered == 0 && (zero & covered == covered || self.backing.is_none()) {
            return Ok(true); // every one of them reads as zeros already
        }
        self.mark_stale(st)?;
        let (l1i, l2i) = self.geo.split(cg);
        let l2_off = self.writable_l2(st, root, l1i)?;
        let entry = self.l2_entry(st, l2_off, l2i)?;
        let new = match host {
            Some(h) if entry.writable() => {
                L2Entry::subclusters(h, alloc & !covered, zero | covered)
            }
            // No host cluster, or a shared one nothing else of is allocated here: the
            // link goes, the zero bits stay.
            _ if alloc & !covered == 0 => L2Entry::zero_subclusters(zero | covered),
            // A shared cluster holding other subclusters: those are copied to a new
            // cluster of this root's own (copy-on-write of what the cluster holds).
            _ => {
                let keep = alloc & !covered;
                let new_host = st.alloc.cluster();
                self.guard_write(st, super::Writing::Data, new_host, self.geo.cluster_size())?;
                let sub = self.geo.subcluster_size();
                for (first, end) in subcluster_runs(keep) {
                    let (lo, hi) = (u64::from(first) * sub, u64::from(end) * sub);
                    let mut buf = vec![0u8; (hi - lo) as usize];
                    self.read_cluster_range(kind, cg, lo, &mut buf)?;
                    let at = new_host + lo;
                    self.storage
                        .write_at(&buf, at.get())
                        .map_err(|e| self.io_err("write data", at, e))?;
                }
                L2Entry::subclusters(new_host, keep, zero | covered)
            }
        };
        self.note_release(st, root, cg, kind, new.host());
        self.set_l2_entry(st, l2_off, l2i, new)?;
        Ok(true)
    }

    /// Makes one whole guest cluster read as zeros (or discards it).
    pub(super) fn zero_cluster(
        &self,
        st: &mut State,
        root: RootId,
        cg: GuestOffset,
        mode: &ZeroMode,
    ) -> Result<()> {
        let has_backing = self.backing.is_some();
        let (kind, _) = self.lookup(st, root, cg)?;
        let target_unallocated = match mode {
            ZeroMode::Discard => !has_backing,
            ZeroMode::Unallocate => true,
            ZeroMode::Zero { .. } => false,
        };
        match kind {
            ClusterKind::Unallocated if !has_backing || target_unallocated => return Ok(()),
            ClusterKind::Zero { host: None } if !target_unallocated => return Ok(()),
            _ => {}
        }
        self.mark_stale(st)?;
        let (l1i, l2i) = self.geo.split(cg);
        let l2_off = self.writable_l2(st, root, l1i)?;
        let entry = self.l2_entry(st, l2_off, l2i)?;
        let owned_host = if entry.writable() {
            match kind {
                ClusterKind::Data { host }
                | ClusterKind::Zero { host: Some(host) }
                | ClusterKind::Subclusters {
                    host: Some(host), ..
                } => Some(host),
                _ => None,
            }
        } else {
            None
        };
        let new = match (mode, owned_host) {
            (ZeroMode::Zero { unmap: false }, Some(host)) => {
                L2Entry::zero_allocated(host, &self.geo)
            }
            _ => {
                if let Some(h) = owned_host {
                    // Freeing punches the cluster: never one that is metadata.
                    self.guard_write(st, super::Writing::Data, h, self.geo.cluster_size())?;
                    st.alloc.free(h);
                }
                if target_unallocated {
                    L2Entry::UNALLOCATED
                } else {
                    L2Entry::zero(&self.geo)
                }
            }
        };
        let new_host = new.host();
        self.note_release(st, root, cg, kind, new_host);
        self.set_l2_entry(st, l2_off, l2i, new)
    }
}
