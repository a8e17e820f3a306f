//! The compressed writer behind `convert -c`: compressed clusters packed byte-granular,
//! linked through the engine's table path.

use crate::engine::Image;
use crate::error::{Error, Result};
use crate::format::addr::{GuestOffset, HostOffset};
use crate::format::compress::{compress_cluster, CompressionType};
use crate::storage::Storage;

/// Writes compressed clusters into the default VDI of an image being filled, as
/// `qemu-img convert -c` does.
///
/// Compressed data is packed byte-granular, the way QEMU allocates it: each
/// compressed cluster goes right after the previous one, in the same host cluster
/// when it fits; when it does not, new clusters are taken from the end of the file,
/// and the data runs on into them if they directly follow (else it starts at the new
/// cluster). The L2 entry records the host byte offset and the number of 512-byte
/// sectors the data touches. Compressed clusters are never writable in place (bit 63
/// clear); refcounts are rewritten from a reachability scan when the image is closed,
/// each host cluster counting one reference per compressed cluster it holds a part
/// of, as QEMU counts them.
///
/// Only clusters that are unallocated (or zero, without a preallocated host cluster)
/// in the default VDI can be written: the writer fills clusters, it does not replace
/// data. An L2 table shared with a snapshot is copied first, as for any write.
///
/// ```
/// use qcowx_core::convert::CompressedWriter;
/// use qcowx_core::{CreateOptions, ExtentStatus, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("packed.qcow2");
/// let img = Image::create(&path, &CreateOptions::new(1 << 20))?;
/// let cs = img.cluster_size();
/// let mut w = CompressedWriter::new(&img)?;
/// assert!(w.write_cluster(0, &vec![b'a'; cs as usize])?, "repetitive data compresses");
/// let noise: Vec<u8> = (0..cs).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
/// let _stored_as_is = w.write_cluster(cs, &noise)?;
/// w.finish()?;
/// img.close()?;
///
/// let img = Image::open(&path)?;
/// let mut buf = vec![0u8; 2 * cs as usize];
/// img.read_at(&mut buf, 0)?;
/// assert!(buf[..cs as usize].iter().all(|&b| b == b'a'));
/// assert_eq!(&buf[cs as usize..], &noise[..]);
/// assert_eq!(img.block_status(0, cs)?[0].status, ExtentStatus::Data);
/// assert_eq!(img.check()?.exit_code(), 0);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CompressedWriter<'a> {
    img: &'a Image,
    kind: CompressionType,
    /// Where the next compressed bytes go (0: start a new host cluster).
    cursor: u64,
}

impl<'a> CompressedWriter<'a> {
    /// A writer for `img`, which must be open for writing.
    pub fn new(img: &'a Image) -> Result<CompressedWriter<'a>> {
        img.check_writable()?;
        let kind = match img.info()?.compression_type {
            "zstd" => CompressionType::Zstd,
            _ => CompressionType::Deflate,
        };
        Ok(CompressedWriter {
            img,
            kind,
            cursor: 0,
        })
    }

    /// Stores `data` (one whole cluster) as the guest cluster at `guest`
    /// (cluster-aligned, inside the disk). Returns `true` when it was stored
    /// compressed, `false` when it did not compress and was written as is (only the
    /// part inside the virtual disk, for a last partial cluster).
    pub fn write_cluster(&mut self, guest: u64, data: &[u8]) -> Result<bool> {
        let img = self.img;
        let cs = img.cluster_size();
        let size = img.size();
        if !guest.is_multiple_of(cs) || data.len() as u64 != cs || guest >= size {
            return Err(Error::InvalidArgument(format!(
                "{}: a compressed write takes one whole cluster ({cs} bytes) at a cluster \
                 boundary inside the disk, not {} bytes at {guest}",
                img.file_name(),
                data.len()
            )));
        }
        let compressed = compress_cluster(self.kind, data).map_err(|source| Error::Compressed {
            file: img.file_name().to_string(),
            offset: guest,
            source,
        })?;
        let Some(bytes) = compressed else {
            let n = cs.min(size - guest) as usize;
            img.write_at(&data[..n], guest)?;
            return Ok(false);
        };
        let mut st = img.lock_state()?;
        img.mark_stale(&mut st)?;
        let cursor = self.cursor;
        let at = img.link_compressed(&mut st, GuestOffset::new(guest), &bytes, |st| {
            // Byte-granular placement: right after the previous compressed cluster
            // when it fits (or the next host cluster follows), else in new clusters.
            let len = bytes.len() as u64;
            if cursor != 0 && !cursor.is_multiple_of(cs) {
                let room = cs - cursor % cs;
                if len <= room {
                    HostOffset::new(cursor)
                } else {
                    let extra = (len - room).div_ceil(cs);
                    let new = st.alloc.contiguous(extra);
                    if new.get() == cursor.next_multiple_of(cs) {
                        HostOffset::new(cursor)
                    } else {
                        new
                    }
                }
            } else {
                st.alloc.contiguous(len.div_ceil(cs))
            }
        })?;
        self.cursor = at.get() + bytes.len() as u64;
        Ok(true)
    }

    /// Makes everything written durable and linked (the image's refcounts are
    /// rewritten when it is closed).
    pub fn finish(self) -> Result<()> {
        let img = self.img;
        let mut st = img.lock_state()?;
        // The last compressed bytes may end inside a cluster: extend the file to
        // whole clusters, so the sectors an entry names are all inside the file.
        let end = st.alloc.end();
        let len = img.storage.len().map_err(|e| img.io_err("stat", 0u64, e))?;
        if len < end {
            img.storage
                .set_len(end)
                .map_err(|e| img.io_err("truncate", end, e))?;
        }
        img.flush_locked(&mut st)
    }
}
