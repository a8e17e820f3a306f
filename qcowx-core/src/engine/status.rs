//! Block status: the allocation state of guest ranges, as NBD and `qemu-img map` report it.

use crate::error::Result;
use crate::format::tables::Source;

use super::image::*;

/// The longest range one block-status query should cover: callers that walk a whole
/// disk ask window by window, so that the extents of one window bound their memory.
pub const STATUS_WINDOW: u64 = 1 << 30;

/// The allocation state of a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentStatus {
    /// Data is stored (here or in a backing layer).
    Data,
    /// Reads as zeros, recorded explicitly.
    Zero,
    /// Stored in this layer, in a host range the file system reports as a hole, so it
    /// reads as zeros: a data cluster never written (as metadata preallocation leaves
    /// them), or the unwritten part of one. `qemu-img map` reports it as `data: true,
    /// zero: true`, NBD's `base:allocation` as zero but not a hole.
    AllocatedZero,
    /// Not allocated anywhere in the chain: reads as zeros.
    Unallocated,
}

/// One extent of [`Image::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What the range holds.
    pub status: ExtentStatus,
    /// Which layer answered: 0 this image, 1 its backing file, and so on. For
    /// [`ExtentStatus::Unallocated`] it is the number of backing layers below this image
    /// (as `qemu-img map` reports it).
    pub depth: u32,
    /// Host offset of the data in that layer's file, when it is stored uncompressed.
    pub host_offset: Option<u64>,
}

pub(super) fn push_extent(
    out: &mut Vec<Extent>,
    offset: u64,
    length: u64,
    status: ExtentStatus,
    depth: u32,
    host_offset: Option<u64>,
) {
    if let Some(last) = out.last_mut() {
        let host_ok = match (last.host_offset, host_offset) {
            (Some(a), Some(b)) => a + last.length == b,
            (None, None) => true,
            _ => false,
        };
        if last.status == status
            && last.depth == depth
            && host_ok
            && last.offset + last.length == offset
        {
            last.length += length;
            return;
        }
    }
    out.push(Extent {
        offset,
        length,
        status,
        depth,
        host_offset,
    });
}

impl Image {
    /// Allocation status of `[offset, offset+len)`.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, ExtentStatus, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[1; 512], 65536)?;
    /// let extents = img.block_status(0, 1 << 20)?;
    /// let summary: Vec<_> = extents.iter().map(|e| (e.offset, e.length, e.status)).collect();
    /// assert_eq!(
    ///     summary,
    ///     [
    ///         (0, 65536, ExtentStatus::Unallocated),
    ///         (65536, 65536, ExtentStatus::Data),
    ///         (2 * 65536, (1 << 20) - 2 * 65536, ExtentStatus::Unallocated),
    ///     ]
    /// );
    /// assert!(extents[1].host_offset.is_some());
    /// # Ok(()) }
    /// ```
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.block_status_root(DEFAULT_ROOT, offset, len)
    }

    pub(crate) fn block_status_root(
        &self,
        root: RootId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>> {
        self.status_root(root, offset, len, true)
    }

    /// Block status from the image's tables alone: data clusters are
    /// [`ExtentStatus::Data`] whatever the file system holds under them (no lseek per
    /// extent, and no wait on the file's inode lock, which writes hold). For readers
    /// that only use it to skip what reads as zeros.
    pub(crate) fn table_status_root(
        &self,
        root: RootId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>> {
        self.status_root(root, offset, len, false)
    }

    /// Block status of `[offset, offset+len)` of `root`; with `probe`, data clusters
    /// of a metadata-preallocated image whose host range is a hole in the file are
    /// [`ExtentStatus::AllocatedZero`].
    fn status_root(&self, root: RootId, offset: u64, len: u64, probe: bool) -> Result<Vec<Extent>> {
        let (pieces, probe) = {
            let mut st = self.lock_state()?;
            self.check_range(&st, root, offset, len)?;
            // As QEMU: only a metadata-preallocated image has its data clusters looked
            // up in the file (elsewhere an unwritten part of a cluster is data too).
            let probe = probe && self.metadata_preallocated(&mut st)?;
            (self.plan(&mut st, root, offset, len)?, probe)
        };
        let mut out: Vec<Extent> = Vec::new();
        for p in pieces {
            match p.src {
                Source::Host(h) if probe => {
                    // What the file system says of the host range (one or two lseeks).
                    match self.storage.data_runs(h.get(), p.len) {
                        Some(runs) => {
                            for (start, end, data) in runs {
                                let status = if data {
                                    ExtentStatus::Data
                                } else {
                                    ExtentStatus::AllocatedZero
                                };
                                let guest = p.guest + (start - h.get());
                                push_extent(&mut out, guest, end - start, status, 0, Some(start));
                            }
                        }
                        None => push_extent(
                            &mut out,
                            p.guest,
                            p.len,
                            ExtentStatus::Data,
                            0,
                            Some(h.get()),
                        ),
                    }
                }
                Source::Host(h) => push_extent(
                    &mut out,
                    p.guest,
                    p.len,
                    ExtentStatus::Data,
                    0,
                    Some(h.get()),
                ),
                Source::Compressed { .. } => {
                    push_extent(&mut out, p.guest, p.len, ExtentStatus::Data, 0, None)
                }
                Source::Zero => push_extent(&mut out, p.guest, p.len, ExtentStatus::Zero, 0, None),
                Source::Backing => match &self.backing {
                    None => {
                        push_extent(&mut out, p.guest, p.len, ExtentStatus::Unallocated, 0, None)
                    }
                    Some(b) => {
                        for e in b.layer_status(p.guest, p.len)? {
                            push_extent(
                                &mut out,
                                e.offset,
                                e.length,
                                e.status,
                                e.depth + 1,
                                e.host_offset,
                            );
                        }
                    }
                },
            }
        }
        Ok(out)
    }
}
