//! Host clusters that block status does not report: a zero cluster that keeps a
//! preallocated host cluster (QCOW2's "zero, allocated") and the unallocated
//! subclusters of an allocated cluster (extended L2 entries) have a host offset that
//! `qemu-img map` prints, but [`Image::block_status`] reports them as zeros or
//! unallocated without one. [`KeptHosts`] reads them from a root's tables; `qcowx
//! map` (the command line's `qemu-img map` emulation) asks it for exactly those
//! ranges. It stays in the library because it reads the tables, which the library
//! does not expose.

use std::sync::Arc;

use crate::engine::Image;
use crate::error::Result;
use crate::format::addr::GuestOffset;
use crate::format::tables::{ClusterKind, L1Entry, L2Entry};

/// The tables of one root of a qcow2 image, for the host offsets block status does
/// not give: zero clusters and unallocated subclusters that keep a host cluster.
///
/// ```
/// use std::sync::Arc;
/// use qcowx_core::vdi::kept_hosts::KeptHosts;
/// use qcowx_core::{CreateOptions, ExtentStatus, Image, DEFAULT_VDI};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?);
/// img.write_at(&[1; 65536], 0)?;
/// img.write_zeroes(0, 65536, false)?; // zero, but the host cluster stays allocated
/// let status = img.block_status(0, 65536)?;
/// assert_eq!((status[0].status, status[0].host_offset), (ExtentStatus::Zero, None));
///
/// let mut kept = KeptHosts::new(Arc::clone(&img), DEFAULT_VDI)?;
/// let (host, covers) = kept.host_of(0)?;
/// assert!(host.is_some());
/// assert_eq!(covers, 65536);
/// // An unallocated cluster keeps nothing.
/// assert_eq!(kept.host_of(65536)?.0, None);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct KeptHosts {
    img: Arc<Image>,
    l1: Vec<u64>,
    /// The last L2 table read: its L1 index and words.
    table: Option<(usize, Option<Vec<u64>>)>,
}

impl KeptHosts {
    /// The tables of root `root` (a VDI or snapshot name) of `img`.
    pub fn new(img: Arc<Image>, root: &str) -> Result<KeptHosts> {
        let l1 = img.root_l1(root)?.0;
        Ok(KeptHosts {
            img,
            l1,
            table: None,
        })
    }

    /// The host offset the root keeps for guest offset `guest` (in a range block
    /// status reports as zeros or unallocated), and how many bytes from `guest` the
    /// answer covers: to the end of its cluster when it keeps one; when it keeps
    /// none, to the end of the clusters after it in the same L2 table that keep none
    /// either (or of its L1 entry's range when that has no L2 table).
    pub fn host_of(&mut self, guest: u64) -> Result<(Option<u64>, u64)> {
        let geo = self.img.geo;
        let cs = geo.cluster_size();
        let (l1i, l2i) = geo.split(GuestOffset::new(guest));
        let cluster_left = cs - guest % cs;
        if self.table.as_ref().is_none_or(|(i, _)| *i != l1i) {
            let off = L1Entry::from_raw(self.l1.get(l1i).copied().unwrap_or(0))
                .link(&geo)
                .table();
            self.table = Some((l1i, self.img.l2_words(off)?));
        }
        let Some((_, Some(words))) = &self.table else {
            // No L2 table: nothing kept up to the end of this L1 entry's range.
            let per = geo.bytes_per_l1_entry();
            return Ok((None, per - guest % per));
        };
        let kept = |i: usize| match L2Entry::get(words, i, &geo).kind(&geo) {
            Ok(ClusterKind::Zero { host: Some(h) })
            | Ok(ClusterKind::Subclusters { host: Some(h), .. }) => Some(h),
            _ => None,
        };
        match kept(l2i) {
            Some(h) => Ok((Some((h + guest % cs).get()), cluster_left)),
            None => {
                // The clusters after it that keep nothing either: one answer for all.
                let per_table = (geo.bytes_per_l1_entry() / cs) as usize;
                let more = (l2i + 1..per_table)
                    .take_while(|&i| kept(i).is_none())
                    .count();
                Ok((None, cluster_left + more as u64 * cs))
            }
        }
    }
}
