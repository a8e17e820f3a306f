//! The copy loops of a conversion, and the reader they read through: with `--salvage`
//! it turns what cannot be read into zeros, as `qemu-img convert --salvage` does,
//! reporting each part it gave up on.

use super::compressed::CompressedWriter;
use super::content::{Content, ExportStats, Progress, COPY_CHUNK};
use super::target::{write_sparse, RateLimit, Sink, Sparse};
use crate::engine::{Extent, ExtentStatus, Image, STATUS_WINDOW};
use crate::error::{Error, Result};

/// The unit `--salvage` gives up on: one 512-byte sector.
const SECTOR: u64 = 512;

/// What failed where `--salvage` copied zeros instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnreadableKind {
    /// The block status of the range (it was then read as data).
    Status,
    /// The data of the sector (it was copied as zeros).
    Data,
}

/// What a conversion tells as it goes (see [`convert_reporting`](super::convert_reporting)).
#[derive(Debug)]
#[non_exhaustive]
pub enum Warning {
    /// [`ConvertOptions::salvage`](super::ConvertOptions::salvage): a part of the
    /// source could not be read.
    Unreadable {
        /// Block status or data.
        kind: UnreadableKind,
        /// Where: the start of the sector.
        offset: u64,
        /// Why.
        error: Error,
    },
    /// [`ConvertOptions::skip_broken_bitmaps`](super::ConvertOptions::skip_broken_bitmaps):
    /// an inconsistent bitmap was not copied.
    SkippedBitmap {
        /// Its name.
        name: String,
    },
}

/// Reads the source; with `salvage`, around what fails.
pub(super) struct Reader<'a> {
    src: &'a dyn Content,
    salvage: bool,
    report: &'a mut dyn FnMut(Warning),
    /// Bytes copied as zeros because they could not be read.
    unreadable: u64,
}

impl<'a> Reader<'a> {
    pub(super) fn new(
        src: &'a dyn Content,
        salvage: bool,
        report: &'a mut dyn FnMut(Warning),
    ) -> Reader<'a> {
        Reader {
            src,
            salvage,
            report,
            unreadable: 0,
        }
    }

    /// The block status of `[offset, offset + len)`. With `salvage`, a range whose
    /// status cannot be read is asked again in quarters, down to single sectors,
    /// which are then taken as data (and reported).
    fn block_status(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        match self.src.block_status(offset, len) {
            Ok(e) => Ok(e),
            Err(e) if !self.salvage => Err(e),
            Err(error) if len <= SECTOR => {
                (self.report)(Warning::Unreadable {
                    kind: UnreadableKind::Status,
                    offset,
                    error,
                });
                Ok(vec![Extent {
                    offset,
                    length: len,
                    status: ExtentStatus::Data,
                    depth: 0,
                    host_offset: None,
                }])
            }
            Err(_) => {
                let quarter = len.div_ceil(4).next_multiple_of(SECTOR);
                let mut out: Vec<Extent> = Vec::new();
                let mut pos = offset;
                while pos < offset + len {
                    let n = quarter.min(offset + len - pos);
                    for e in self.block_status(pos, n)? {
                        match out.last_mut() {
                            Some(l)
                                if l.status == e.status
                                    && l.depth == e.depth
                                    && l.host_offset.is_none()
                                    && e.host_offset.is_none() =>
                            {
                                l.length += e.length
                            }
                            _ => out.push(e),
                        }
                    }
                    pos += n;
                }
                Ok(out)
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset`. With `salvage`, a read that fails is done
    /// again sector by sector, and a sector that cannot be read reads as zeros (and is
    /// reported).
    pub(super) fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self.src.read_at(buf, offset) {
            Ok(()) => Ok(()),
            Err(e) if !self.salvage => Err(e),
            Err(_) => {
                for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
                    let at = offset + i as u64 * SECTOR;
                    if let Err(error) = self.src.read_at(sector, at) {
                        sector.fill(0);
                        self.unreadable += sector.len() as u64;
                        (self.report)(Warning::Unreadable {
                            kind: UnreadableKind::Data,
                            offset: at,
                            error,
                        });
                    }
                }
                Ok(())
            }
        }
    }

    /// Calls `f` with each extent of the source (of `size` bytes), in order, asking
    /// for block status one [`STATUS_WINDOW`] at a time; reports progress at the end
    /// of each window.
    fn for_each_extent(
        &mut self,
        size: u64,
        progress: Progress<'_>,
        mut f: impl FnMut(&mut Self, Extent, &mut dyn FnMut(u64, u64)) -> Result<()>,
    ) -> Result<()> {
        let mut window = 0u64;
        while window < size {
            let wlen = STATUS_WINDOW.min(size - window);
            for ext in self.block_status(window, wlen)? {
                f(self, ext, &mut *progress)?;
            }
            window += wlen;
            progress(window, size);
        }
        Ok(())
    }
}

/// Copies the source (`size` bytes) to `sink`: data ranges are read and written as
/// `sparse` says; the other ranges read as zeros, so they are left out (zeroed in the
/// sink when `sparse` asks), or written as zeros when `sparse` leaves nothing out.
///
/// `overlay` is the length of the output's backing file when it has one: then only
/// the source's own layer is copied (what it reads from its backing chain is left to
/// the output's backing file), and zeros past that length are not written.
pub(super) fn copy(
    src: &mut Reader<'_>,
    size: u64,
    sink: &mut dyn Sink,
    sparse: Sparse,
    overlay: Option<u64>,
    progress: Progress<'_>,
) -> Result<ExportStats> {
    let mut stats = ExportStats {
        virtual_size: size,
        ..ExportStats::default()
    };
    let mut buf: Vec<u8> = Vec::new();
    src.for_each_extent(size, progress, |src, ext, progress| {
        // The layer that answered (for an unallocated range: how many backing
        // layers the source has) is below the source's own.
        if overlay.is_some() && ext.depth > 0 {
            return Ok(());
        }
        let data = ext.status == ExtentStatus::Data;
        if !data && sparse.min_gap > 0 {
            let end = match overlay {
                Some(backing_len) => (ext.offset + ext.length).min(backing_len.max(ext.offset)),
                None => ext.offset + ext.length,
            };
            if sparse.zero_gaps && end > ext.offset {
                sink.zero(ext.offset, end - ext.offset)?;
            }
            return Ok(());
        }
        let end = ext.offset + ext.length;
        let mut pos = ext.offset;
        while pos < end {
            let n = (end - pos).min(COPY_CHUNK as u64);
            buf.resize(n as usize, 0);
            if data {
                src.read(&mut buf, pos)?;
                stats.data_bytes += n;
            } else {
                buf.fill(0);
            }
            stats.written_bytes += write_sparse(sink, &buf, pos, sparse)?;
            pos += n;
            progress(pos, size);
        }
        Ok(())
    })?;
    stats.unreadable_bytes = src.unreadable;
    Ok(stats)
}

/// Copies the source into the fresh image `dst`, cluster by cluster, compressed;
/// clusters of zeros are left out.
pub(super) fn copy_compressed(
    src: &mut Reader<'_>,
    size: u64,
    dst: &Image,
    rate_limit: Option<u64>,
    progress: Progress<'_>,
) -> Result<ExportStats> {
    let cs = dst.cluster_size();
    let mut stats = ExportStats {
        virtual_size: size,
        ..ExportStats::default()
    };
    let mut writer = CompressedWriter::new(dst)?;
    let mut limit = RateLimit::new(rate_limit);
    let mut buf = vec![0u8; cs as usize];
    // The next cluster index not yet looked at.
    let mut next = 0u64;
    src.for_each_extent(size, progress, |src, ext, progress| {
        if ext.status != ExtentStatus::Data {
            return Ok(());
        }
        stats.data_bytes += ext.length;
        let first = (ext.offset / cs).max(next);
        let last = (ext.offset + ext.length - 1) / cs;
        for c in first..=last {
            let at = c * cs;
            let n = cs.min(size - at) as usize;
            buf[n..].fill(0);
            src.read(&mut buf[..n], at)?;
            if buf.iter().any(|&b| b != 0) {
                limit.account(n as u64);
                if writer.write_cluster(at, &buf)? {
                    stats.compressed_clusters += 1;
                }
                stats.written_bytes += n as u64;
            }
            next = c + 1;
            progress(at + n as u64, size);
        }
        Ok(())
    })?;
    writer.finish()?;
    stats.unreadable_bytes = src.unreadable;
    Ok(stats)
}
