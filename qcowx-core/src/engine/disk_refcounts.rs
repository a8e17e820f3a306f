//! The refcounts stored in the file, read one block at a time (for a check, which
//! compares them with a scan, and for telling whether an image is metadata
//! preallocated), and that detection.

use crate::error::Result;
use crate::format::refblock::get_entry;

use super::image::*;

/// The refcounts on disk, read one block at a time.
pub(crate) struct DiskRefcounts {
    pub(crate) table: Vec<u64>,
    order: u32,
    per_block: u64,
    cluster_size: u64,
    file_clusters: u64,
    block: Vec<u8>,
    loaded: Option<u64>,
}

impl DiskRefcounts {
    pub(crate) fn new(img: &Image, st: &State, file_clusters: u64) -> Result<DiskRefcounts> {
        let cs = img.geo.cluster_size();
        Ok(DiskRefcounts {
            table: img.read_reftable(&st.header)?,
            order: st.header.refcount_order,
            per_block: (cs * 8) >> st.header.refcount_order,
            cluster_size: cs,
            file_clusters,
            block: vec![0u8; cs as usize],
            loaded: None,
        })
    }

    /// The refcount of cluster index `c` (0 where no valid block covers it).
    pub(crate) fn get(&mut self, img: &Image, c: u64) -> Result<u64> {
        let cs = self.cluster_size;
        let block_off = self
            .table
            .get((c / self.per_block) as usize)
            .copied()
            .unwrap_or(0);
        if block_off == 0 || block_off % cs != 0 || block_off >= self.file_clusters * cs {
            return Ok(0);
        }
        if self.loaded != Some(block_off) {
            img.storage
                .read_at(&mut self.block, block_off)
                .map_err(|e| img.io_err("read refcount block", block_off, e))?;
            self.loaded = Some(block_off);
        }
        Ok(get_entry(
            &self.block,
            self.order,
            (c % self.per_block) as usize,
        ))
    }
}

impl Image {
    /// Whether the image looks metadata-preallocated, by QEMU's rule: more clusters
    /// have a refcount than the file has clusters of storage (by more than a ninth, and
    /// by more than two). Its data clusters may then be holes in the file, which
    /// block status asks the file system about, as QEMU does. Computed once, on the
    /// first block status that asks; reads refcount blocks until the answer is known.
    pub(crate) fn metadata_preallocated(&self, st: &mut State) -> Result<bool> {
        if let Some(known) = st.metadata_preallocated {
            return Ok(known);
        }
        let known = match self.storage.allocated_bytes() {
            None => false,
            Some(real) => {
                let cs = self.geo.cluster_size();
                let real_clusters = real / cs;
                let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
                let file_len = self
                    .storage
                    .len()
                    .map_err(|e| self.io_err("stat", 0u64, e))?;
                let file_clusters = file_len.div_ceil(cs);
                if file_clusters <= threshold {
                    // Not even every cluster of the file could be over the threshold:
                    // a file about as long as its storage (every image but a sparse
                    // one) needs no refcount read.
                    st.metadata_preallocated = Some(false);
                    return Ok(false);
                }
                let mut disk = DiskRefcounts::new(self, st, file_clusters)?;
                let mut allocated = 0u64;
                let mut found = false;
                for c in 0..file_clusters {
                    if disk.get(self, c)? > 0 {
                        allocated += 1;
                        if allocated > threshold {
                            found = true;
                            break;
                        }
                    }
                }
                found
            }
        };
        st.metadata_preallocated = Some(known);
        Ok(known)
    }
}
