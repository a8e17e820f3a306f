//! Zeroing and discard: zero clusters, unmapping clusters a root owns exclusively.

use crate::error::Result;
use crate::format::addr::GuestOffset;
use crate::format::tables::{ClusterKind, L2Entry};

use super::image::*;

pub(crate) enum ZeroMode {
    Zero { unmap: bool },
    Discard,
}

pub(super) fn reads_zero(kind: ClusterKind, has_backing: bool) -> bool {
    match kind {
        ClusterKind::Zero { .. } => true,
        ClusterKind::Unallocated => !has_backing,
        _ => false,
    }
}

impl Image {
    /// Makes `[offset, offset+len)` read as zeros. With `may_unmap`, clusters the
    /// active layer owns are released; without it they stay allocated.
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
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(DEFAULT_ROOT, offset, len, ZeroMode::Discard)
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
            match (&mode, whole && v3) {
                (_, true) => self.zero_cluster(&mut st, root, GuestOffset::new(pos), &mode)?,
                (ZeroMode::Discard, false) if !v3 && whole => {
                    // Version 2 has no zero flag: a discard must write zeros so the
                    // backing file does not show through.
                    drop(st);
                    self.write_root(root, &vec![0u8; n as usize], pos)?;
                }
                (ZeroMode::Discard, false) => {}
                (ZeroMode::Zero { .. }, false) => {
                    let (kind, _) = self.lookup(&mut st, root, GuestOffset::new(pos))?;
                    if !reads_zero(kind, self.backing.is_some()) {
                        drop(st);
                        self.write_root(root, &vec![0u8; n as usize], pos)?;
                    }
                }
            }
            pos += n;
        }
        Ok(())
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
        let target_unallocated = matches!(mode, ZeroMode::Discard) && !has_backing;
        match kind {
            ClusterKind::Unallocated if !has_backing => return Ok(()),
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
