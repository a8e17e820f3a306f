//! The expected content of a disk, kept in memory, and random operations that drive an image and the model alike.

use std::path::Path;

use qcowx_core::Image;

use crate::{pattern, Rng};

/// The expected content of a virtual disk, kept in memory, with qcowx's semantics for
/// write-zeroes and discard. Meant for disks of a few MiB to a few hundred MiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedDisk {
    bytes: Vec<u8>,
    cluster_size: u64,
}

impl ExpectedDisk {
    /// A disk of `size` zero bytes with clusters of `cluster_size` (for discard).
    pub fn zeroed(size: u64, cluster_size: u64) -> ExpectedDisk {
        ExpectedDisk {
            bytes: vec![0; size as usize],
            cluster_size,
        }
    }
    /// A disk holding `bytes` (for example a raw file's content).
    pub fn from_bytes(bytes: Vec<u8>, cluster_size: u64) -> ExpectedDisk {
        ExpectedDisk {
            bytes,
            cluster_size,
        }
    }
    /// A disk holding the content of the raw file at `path`.
    pub fn from_raw_file(path: &Path, cluster_size: u64) -> ExpectedDisk {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        ExpectedDisk::from_bytes(bytes, cluster_size)
    }
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    /// Cluster size used by [`ExpectedDisk::discard`].
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }
    /// The whole content.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// Records a write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.bytes[o..o + data.len()].copy_from_slice(data);
    }
    /// Records that `[offset, offset+len)` reads as zeros (write-zeroes).
    pub fn zero(&mut self, offset: u64, len: u64) {
        self.bytes[offset as usize..(offset + len) as usize].fill(0);
    }
    /// Records a qcowx discard of `[offset, offset+len)`: every whole cluster in the
    /// range reads as zeros, the partial clusters at its edges are unchanged. The last
    /// cluster of a disk whose size is not a cluster multiple counts as whole when the
    /// range reaches the end of the disk.
    pub fn discard(&mut self, offset: u64, len: u64) {
        let cs = self.cluster_size;
        let size = self.size();
        let end = offset + len;
        let mut c = offset.next_multiple_of(cs);
        while c < end {
            let cend = (c + cs).min(size);
            if cend <= end {
                self.zero(c, cend - c);
            }
            c += cs;
        }
    }
    /// Writes the content to a raw file at `path`.
    pub fn save_raw(&self, path: &Path) {
        std::fs::write(path, &self.bytes)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// The kinds of operations [`apply_random_ops`] issues, with their weights.
#[derive(Debug, Clone, Copy)]
pub struct OpMix {
    /// Weight of `write_at` (random data, unaligned offsets and lengths).
    pub write: u64,
    /// Weight of `write_zeroes` (random `may_unmap`).
    pub zero: u64,
    /// Weight of `discard`.
    pub discard: u64,
}

impl Default for OpMix {
    fn default() -> Self {
        OpMix {
            write: 6,
            zero: 2,
            discard: 2,
        }
    }
}

/// Issues `count` random operations on `img` and records them in `model`.
///
/// Lengths are up to about three clusters (capped at 256 KiB), offsets are anywhere in
/// the disk; about a third of the operations are cluster-aligned. Panics on the first
/// failing operation, naming it.
pub fn apply_random_ops(
    img: &Image,
    model: &mut ExpectedDisk,
    rng: &mut Rng,
    count: usize,
    mix: OpMix,
) {
    let size = model.size();
    let cs = model.cluster_size();
    let max_len = (3 * cs).min(256 << 10).min(size);
    let total = mix.write + mix.zero + mix.discard;
    for i in 0..count {
        let aligned = rng.chance(1, 3);
        let (off, len) = if aligned {
            let clusters = size.div_ceil(cs);
            let c = rng.below(clusters);
            let off = c * cs;
            let n = rng.range(1, 4);
            (off, (n * cs).min(size - off))
        } else {
            let len = rng.range(1, max_len + 1);
            let off = rng.below(size - len + 1);
            (off, len)
        };
        let pick = rng.below(total);
        let name = img.file_name().to_string();
        if pick < mix.write {
            let data = pattern(rng.next_u64(), len as usize);
            img.write_at(&data, off)
                .unwrap_or_else(|e| panic!("{name}: op {i}: write_at({off}, {len}): {e}"));
            model.write(off, &data);
        } else if pick < mix.write + mix.zero {
            let unmap = rng.chance(1, 2);
            img.write_zeroes(off, len, unmap).unwrap_or_else(|e| {
                panic!("{name}: op {i}: write_zeroes({off}, {len}, {unmap}): {e}")
            });
            model.zero(off, len);
        } else {
            img.discard(off, len)
                .unwrap_or_else(|e| panic!("{name}: op {i}: discard({off}, {len}): {e}"));
            model.discard(off, len);
        }
    }
}
