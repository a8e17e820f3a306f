//! The open image's persistent bitmaps in memory: the directory as read, each
//! bitmap's entry and data, and the clusters they occupy (no I/O; the
//! [`Image`](super::Image) methods that load, mark and store them are in `bitmaps`).

use crate::format::bitmap::{BitmapsExt, DirEntry, FLAG_AUTO};

/// One bitmap as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its name.
    pub name: String,
    /// Bytes one bit covers.
    pub granularity: u64,
    /// Enabled: tracks writes (QEMU's `auto` flag).
    pub enabled: bool,
    /// In use: not consistent (a crash, or a program holding it open for writing;
    /// this handle's own in-use marks are not reported).
    pub in_use: bool,
}

/// One bitmap of the open image.
#[derive(Debug, Clone)]
pub(crate) struct Bitmap {
    /// Its entry as the directory on disk holds it (a new bitmap: table offset 0).
    pub(super) entry: DirEntry,
    /// Its data, when loaded (one bit per `1 << granularity_bits` guest bytes).
    pub(super) data: Option<Vec<u8>>,
    /// In use on disk before this handle opened the image: kept as is.
    pub(super) inconsistent: bool,
}

/// The image's bitmaps, behind the state lock.
#[derive(Debug, Default)]
pub(crate) struct Bitmaps {
    pub(super) list: Vec<Bitmap>,
    /// The directory on disk, if any.
    pub(super) on_disk: Option<BitmapsExt>,
    /// This handle set the in-use flags on disk: a close must store and clear them.
    pub(super) in_use_set: bool,
    /// Clusters of bitmaps removed in this session, released when the removal is
    /// stored (offset, bytes).
    pub(super) released: Vec<(u64, u64)>,
    /// Every cluster the bitmaps on disk occupy (directory, tables, data), which
    /// guest data must never overwrite (offset, bytes).
    pub(super) metadata: Vec<(u64, u64)>,
}

impl Bitmaps {
    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(crate) fn metadata(&self) -> &[(u64, u64)] {
        &self.metadata
    }

    pub(crate) fn infos(&self) -> Vec<BitmapInfo> {
        self.list
            .iter()
            .map(|b| BitmapInfo {
                name: b.entry.name.clone(),
                granularity: 1 << b.entry.granularity_bits,
                enabled: b.entry.flags & FLAG_AUTO != 0,
                in_use: b.inconsistent,
            })
            .collect()
    }

    pub(super) fn find(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|b| b.entry.name == name)
    }
}

pub(super) fn set_bits(data: &mut [u8], first: u64, last: u64) {
    let mut i = first;
    while i <= last {
        let byte = (i / 8) as usize;
        if i.is_multiple_of(8) && i + 7 <= last && byte < data.len() {
            let whole = ((last + 1 - i) / 8) as usize;
            let end = (byte + whole).min(data.len());
            data[byte..end].fill(0xff);
            i += (end - byte) as u64 * 8;
            continue;
        }
        if let Some(b) = data.get_mut(byte) {
            *b |= 1 << (i % 8);
        } else {
            return;
        }
        i += 1;
    }
}

pub(super) fn bit(data: &[u8], i: u64) -> bool {
    data.get((i / 8) as usize)
        .is_some_and(|b| b & (1 << (i % 8)) != 0)
}
