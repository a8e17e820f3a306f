//! Where a conversion writes — a raw file or a qcow2 image, made new or opened as it is
//! (`qemu-img convert -n`) — and how a buffer is split into the data written and the
//! zero runs left out (`-S`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::engine::{CreateOptions, Image, OpenOptions};
use crate::error::{Error, Result};
use crate::storage::lock::LockMode;
use crate::storage::{FileStorage, OpenMode, Storage, WriteBehind};

use super::options::ConvertOptions;
use crate::engine::backing::ImageFormat;

/// Where the copied bytes go.
pub(super) trait Sink {
    /// Writes `buf` at `offset`.
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes `[offset, offset + len)` read as zeros.
    fn zero(&mut self, offset: u64, len: u64) -> Result<()>;
}

/// The output of a conversion.
pub(super) enum Target {
    /// A raw file.
    Raw { storage: FileStorage, name: String },
    /// A qcow2 image, written through its default VDI; `new` names a new one (its
    /// fdatasyncs deferred to [`Target::finish`]).
    Qcow2 {
        img: Box<Image>,
        new: Option<PathBuf>,
    },
}

impl Target {
    /// A new output at `output` for a source of `size` bytes; an existing file is
    /// replaced (under an exclusive lock, so a file
    /// in use elsewhere is refused and left untouched).
    pub(super) fn create(output: &Path, opts: &ConvertOptions, size: u64) -> Result<Target> {
        let name = output.display().to_string();
        match opts.format {
            ImageFormat::Raw => {
                let storage = FileStorage::create(output, LockMode::Exclusive)
                    .map_err(|e| Error::from_open(&name, e))?;
                storage
                    .set_len(size)
                    .map_err(|e| Error::io(&name, "truncate", size, e))?;
                Ok(Target::Raw { storage, name })
            }
            ImageFormat::Qcow2 => {
                let mut create = CreateOptions::new(size).if_exists(crate::IfExists::Replace);
                // qemu-img's default whatever the source's: 64 KiB.
                create.cluster_size = opts.cluster_size.unwrap_or(create.cluster_size);
                create.refcount_bits = opts.refcount_bits.unwrap_or(create.refcount_bits);
                create.compression = opts.compression_type.unwrap_or(create.compression);
                create.extended_l2 = opts.extended_l2.unwrap_or(create.extended_l2);
                create.backing_file = opts.backing_file.clone();
                create.backing_format = opts.backing_format.map(|f| f.name().to_string());
                // Useless until complete: no fdatasync on the way (writeback started
                // as it goes when the end syncs), one at the end with `sync`.
                create.deferred_sync = Some(if opts.sync {
                    WriteBehind::Background
                } else {
                    WriteBehind::Off
                });
                let img = Image::create(output, &create)?;
                Ok(Target::Qcow2 {
                    img: Box::new(img),
                    new: Some(output.to_path_buf()),
                })
            }
        }
    }

    /// The existing output at `output`, opened as `format` for writing, refused unless
    /// it holds at least `size` bytes (as `qemu-img convert -n` refuses it).
    pub(super) fn open_existing(output: &Path, format: ImageFormat, size: u64) -> Result<Target> {
        let name = output.display().to_string();
        let (target, len) = match format {
            ImageFormat::Raw => {
                let storage = FileStorage::open(output, OpenMode::read_write())
                    .map_err(|e| Error::from_open(&name, e))?;
                let len = storage.len().map_err(|e| Error::io(&name, "stat", 0, e))?;
                (
                    Target::Raw {
                        storage,
                        name: name.clone(),
                    },
                    len,
                )
            }
            ImageFormat::Qcow2 => {
                let img = OpenOptions::new().write(true).open(output)?;
                let len = img.size();
                (
                    Target::Qcow2 {
                        img: Box::new(img),
                        new: None,
                    },
                    len,
                )
            }
        };
        if len < size {
            return Err(Error::InvalidArgument(format!(
                "{name}: output file is smaller than input file ({len} < {size} bytes)"
            )));
        }
        Ok(target)
    }

    /// The cluster size of a qcow2 output.
    pub(super) fn cluster_size(&self) -> Option<u64> {
        match self {
            Target::Raw { .. } => None,
            Target::Qcow2 { img, .. } => Some(img.cluster_size()),
        }
    }

    /// Ends the conversion: the output is synced to the disk when `sync` is set (one
    /// fdatasync; an existing qcow2 output `-n` names is synced by its close either
    /// way), and a qcow2 output closed cleanly.
    pub(super) fn finish(self, sync: bool) -> Result<()> {
        match self {
            Target::Raw { storage, name } => {
                if sync {
                    storage
                        .sync_data()
                        .map_err(|e| Error::io(&name, "fdatasync", 0, e))?;
                }
                Ok(())
            }
            Target::Qcow2 { img, new } => {
                img.close()?;
                match new {
                    Some(path) if sync => std::fs::File::open(&path)
                        .and_then(|f| f.sync_data())
                        .map_err(|e| Error::io(path.display().to_string(), "fdatasync", 0, e)),
                    _ => Ok(()),
                }
            }
        }
    }
}

impl Sink for Target {
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Target::Raw { storage, name } => storage
                .write_at(buf, offset)
                .map_err(|e| Error::io(name.as_str(), "write", offset, e)),
            Target::Qcow2 { img, .. } => img.write_at(buf, offset),
        }
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            // A hole reads as zeros (and the storage writes zeros where the file
            // system cannot punch one).
            Target::Raw { storage, name } => storage
                .punch_hole(offset, len)
                .map_err(|e| Error::io(name.as_str(), "punch hole", offset, e)),
            Target::Qcow2 { img, .. } => img.write_zeroes(offset, len, true),
        }
    }
}

/// At most `rate` bytes per second on average (`qemu-img convert -r`).
pub(super) struct RateLimit {
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl RateLimit {
    /// No limit when `rate` is `None` (or 0).
    pub(super) fn new(rate: Option<u64>) -> RateLimit {
        RateLimit {
            rate: rate.filter(|&r| r > 0),
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Counts `n` bytes about to be written, first sleeping until the bytes counted
    /// before are due.
    pub(super) fn account(&mut self, n: u64) {
        let Some(rate) = self.rate else {
            return;
        };
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
        self.bytes += n;
    }
}

/// A sink whose writes keep to a [`RateLimit`].
pub(super) struct Throttled<'a> {
    inner: &'a mut dyn Sink,
    limit: RateLimit,
}

impl<'a> Throttled<'a> {
    pub(super) fn new(inner: &'a mut dyn Sink, rate: Option<u64>) -> Throttled<'a> {
        Throttled {
            inner,
            limit: RateLimit::new(rate),
        }
    }
}

impl Sink for Throttled<'_> {
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.limit.account(buf.len() as u64);
        self.inner.write(buf, offset)
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.inner.zero(offset, len)
    }
}

/// How a buffer's zero runs are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sparse {
    /// The blocks zeros are looked for in, aligned to disk offsets.
    pub(super) granule: u64,
    /// Zero runs (of whole blocks) at least this long are left out; shorter ones are
    /// written when data lie on both sides of them in the buffer. 0: nothing is left
    /// out, every byte is written.
    pub(super) min_gap: u64,
    /// Zero the runs left out in the output (which does not read as zeros already).
    pub(super) zero_gaps: bool,
}

impl Sparse {
    /// QEMU's `-S size` for an output of cluster size `cluster` (`None`: raw). A qcow2
    /// output allocates whole clusters, so zeros are looked for cluster by cluster; a
    /// raw one in blocks of `size` rounded down to a power of two, 512 B to 4 KiB.
    pub(super) fn new(size: u64, cluster: Option<u64>, zero_gaps: bool) -> Sparse {
        let granule = match cluster {
            Some(c) => c,
            None if size == 0 => 4096,
            None => (1u64 << (63 - size.leading_zeros())).clamp(512, 4096),
        };
        Sparse {
            granule,
            min_gap: if size == 0 { 0 } else { size.max(granule) },
            zero_gaps,
        }
    }
}

/// Writes `buf` (the disk at `offset`) to `sink`, leaving out its zero runs as `sparse`
/// says (and zeroing them in the sink when it asks): runs at the start or end of `buf`
/// and runs of at least `sparse.min_gap` bytes. Returns the bytes written as data.
pub(super) fn write_sparse(
    sink: &mut dyn Sink,
    buf: &[u8],
    offset: u64,
    sparse: Sparse,
) -> Result<u64> {
    let end = offset + buf.len() as u64;
    if sparse.min_gap == 0 {
        sink.write(buf, offset)?;
        return Ok(buf.len() as u64);
    }
    let slice = |from: u64, to: u64| &buf[(from - offset) as usize..(to - offset) as usize];
    // Runs of blocks that are all zeros or not: (start, end, zero).
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let next = ((pos / sparse.granule) + 1)
            .saturating_mul(sparse.granule)
            .min(end);
        let zero = slice(pos, next).iter().all(|&b| b == 0);
        match runs.last_mut() {
            Some(run) if run.2 == zero => run.1 = next,
            _ => runs.push((pos, next, zero)),
        }
        pos = next;
    }
    let mut written = 0u64;
    let mut data_from: Option<u64> = None;
    let last = runs.len().saturating_sub(1);
    for (i, (start, stop, zero)) in runs.into_iter().enumerate() {
        // Zeros at the start or end of the buffer are left out whatever their length:
        // only a short run between data is written (as qemu-img judges them).
        let edge = i == 0 || i == last;
        if !(zero && (edge || stop - start >= sparse.min_gap)) {
            data_from.get_or_insert(start);
            continue;
        }
        if let Some(from) = data_from.take() {
            sink.write(slice(from, start), from)?;
            written += start - from;
        }
        if sparse.zero_gaps {
            sink.zero(start, stop - start)?;
        }
    }
    if let Some(from) = data_from {
        sink.write(slice(from, end), from)?;
        written += end - from;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what it is asked to do: (offset, length, zeroed).
    #[derive(Default)]
    struct Recorder(Vec<(u64, usize, bool)>);

    impl Sink for Recorder {
        fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
            self.0.push((offset, buf.len(), false));
            Ok(())
        }
        fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
            self.0.push((offset, len as usize, true));
            Ok(())
        }
    }

    const BLOCKS: Sparse = Sparse {
        granule: 512,
        min_gap: 512,
        zero_gaps: false,
    };

    #[test]
    fn zero_blocks_are_left_out_and_data_runs_merged() {
        let mut buf = vec![0u8; 10 * 512];
        buf[0] = 1; // block 0
        buf[512 + 7] = 1; // block 1
        buf[4 * 512] = 1; // block 4
        buf[10 * 512 - 1] = 1; // block 9
        let mut rec = Recorder::default();
        let n = write_sparse(&mut rec, &buf, 1 << 20, BLOCKS).unwrap();
        assert_eq!(
            rec.0,
            vec![
                ((1 << 20), 1024, false),
                ((1 << 20) + 4 * 512, 512, false),
                ((1 << 20) + 9 * 512, 512, false)
            ]
        );
        assert_eq!(n, 2048);
    }

    #[test]
    fn blocks_align_to_disk_offsets() {
        // The buffer starts mid-block: the first partial block is judged alone.
        let mut buf = vec![0u8; 1024];
        buf[100] = 9; // disk offset 356: inside block [0, 512)
        let mut rec = Recorder::default();
        let n = write_sparse(&mut rec, &buf, 256, BLOCKS).unwrap();
        assert_eq!(rec.0, vec![(256, 256, false)]);
        assert_eq!(n, 256);
        let mut rec = Recorder::default();
        assert_eq!(write_sparse(&mut rec, &[0u8; 4096], 0, BLOCKS).unwrap(), 0);
        assert!(rec.0.is_empty());
    }

    #[test]
    fn zero_runs_shorter_than_the_gap_are_written_and_longer_ones_zeroed_on_request() {
        // data, 2 zero blocks, data, 4 zero blocks, data
        let mut buf = vec![0u8; 9 * 512];
        for b in [0, 3, 8] {
            buf[b * 512] = 1;
        }
        // Zeros at either end are left out even when shorter than the gap.
        let mut edges = vec![0u8; 3 * 512];
        edges[512] = 1;
        let mut rec = Recorder::default();
        let gap4 = Sparse {
            granule: 512,
            min_gap: 4 * 512,
            zero_gaps: false,
        };
        assert_eq!(write_sparse(&mut rec, &edges, 0, gap4).unwrap(), 512);
        assert_eq!(rec.0, vec![(512, 512, false)]);
        let sparse = Sparse {
            granule: 512,
            min_gap: 4 * 512,
            zero_gaps: true,
        };
        let mut rec = Recorder::default();
        let n = write_sparse(&mut rec, &buf, 0, sparse).unwrap();
        assert_eq!(
            rec.0,
            vec![
                (0, 4 * 512, false),
                (4 * 512, 4 * 512, true),
                (8 * 512, 512, false)
            ]
        );
        assert_eq!(n, 5 * 512);
        // No sparse detection: one write of everything.
        let mut rec = Recorder::default();
        let all = Sparse::new(0, None, true);
        assert_eq!(write_sparse(&mut rec, &buf, 0, all).unwrap(), 9 * 512);
        assert_eq!(rec.0, vec![(0, 9 * 512, false)]);
    }

    #[test]
    fn sparse_sizes_map_to_blocks_as_qemu_rounds_them() {
        assert_eq!(Sparse::new(4096, None, false).granule, 4096);
        assert_eq!(Sparse::new(512, None, false).granule, 512);
        assert_eq!(Sparse::new(1536, None, false).granule, 1024);
        let big = Sparse::new(1 << 20, None, false);
        assert_eq!((big.granule, big.min_gap), (4096, 1 << 20));
        let q = Sparse::new(4096, Some(65536), false);
        assert_eq!((q.granule, q.min_gap), (65536, 65536));
        assert_eq!(Sparse::new(0, Some(65536), false).min_gap, 0);
    }
}
