//! The copy loops of a conversion, and the reader they read through: with `--salvage`
//! it turns what cannot be read into zeros, as `qemu-img convert --salvage` does,
//! reporting each part it gave up on.

use std::sync::mpsc;
use std::thread;

use super::compressed::CompressedWriter;
use super::content::{Content, ExportStats, Progress, COPY_CHUNK};
use super::target::{write_sparse, RateLimit, Sink, Sparse};
use crate::engine::{Extent, ExtentStatus, Image, STATUS_WINDOW};
use crate::error::{Error, Result};
use crate::storage::{io_buf, IoBuf};

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

/// Chunks of data read ahead of the writes: while the writer writes one chunk, a
/// second thread reads up to this many more (each [`COPY_CHUNK`] bytes at most).
const READ_AHEAD: usize = 2;

/// Copies the source (`size` bytes) to `sink`: data ranges are read and written as
/// `sparse` says; the other ranges read as zeros, so they are left out (zeroed in the
/// sink when `sparse` asks), or written as zeros when `sparse` leaves nothing out.
///
/// `overlay` is the length of the output's backing file when it has one: then only
/// the source's own layer is copied (what it reads from its backing chain is left to
/// the output's backing file), and zeros past that length are not written.
///
/// Data is read on a second thread, [`READ_AHEAD`] chunks ahead of the writes, so
/// reading the source and writing the output use two cores; everything reaches
/// `sink` in the source's order, from this thread.
pub(super) fn copy(
    src: &mut Reader<'_>,
    size: u64,
    sink: &mut dyn Sink,
    sparse: Sparse,
    overlay: Option<u64>,
    progress: Progress<'_>,
) -> Result<ExportStats> {
    let content = src.src;
    let (ask, asked) = mpsc::sync_channel::<(u64, IoBuf)>(READ_AHEAD);
    let (done, got) = mpsc::sync_channel::<(u64, IoBuf, Result<()>)>(READ_AHEAD);
    let mut stats = thread::scope(|scope| {
        scope.spawn(move || {
            for (pos, mut buf) in asked {
                let r = content.read_at(&mut buf, pos);
                if done.send((pos, buf, r)).is_err() {
                    break;
                }
            }
        });
        let mut out = Writer {
            ask,
            got,
            in_flight: 0,
            spare: Vec::new(),
            sink,
            sparse,
            stats: ExportStats {
                virtual_size: size,
                ..ExportStats::default()
            },
        };
        src.for_each_extent(size, progress, |src, ext, progress| {
            // The layer that answered (for an unallocated range: how many backing
            // layers the source has) is below the source's own.
            if overlay.is_some() && ext.depth > 0 {
                return Ok(());
            }
            let data = ext.status == ExtentStatus::Data;
            let end = ext.offset + ext.length;
            if data {
                let mut pos = ext.offset;
                while pos < end {
                    let n = (end - pos).min(COPY_CHUNK as u64);
                    out.read_ahead(src, pos, n as usize, size, progress)?;
                    pos += n;
                }
                return Ok(());
            }
            // Zeros: written here, after the data asked for before them.
            out.drain(src, size, progress)?;
            if sparse.min_gap > 0 {
                let end = match overlay {
                    Some(backing_len) => end.min(backing_len.max(ext.offset)),
                    None => end,
                };
                if sparse.zero_gaps && end > ext.offset {
                    out.sink.zero(ext.offset, end - ext.offset)?;
                }
                return Ok(());
            }
            let mut buf = out.spare.pop().unwrap_or_else(|| io_buf(0));
            let mut pos = ext.offset;
            while pos < end {
                let n = (end - pos).min(COPY_CHUNK as u64);
                buf.clear();
                buf.resize(n as usize, 0);
                out.stats.written_bytes += write_sparse(out.sink, &buf, pos, sparse)?;
                pos += n;
                progress(pos, size);
            }
            out.spare.push(buf);
            Ok(())
        })?;
        out.drain(src, size, progress)?;
        Ok::<_, Error>(out.stats)
    })?;
    stats.unreadable_bytes = src.unreadable;
    Ok(stats)
}

/// The writing side of [`copy`]: the chunks asked of the reading thread, written in
/// the order they were asked for.
struct Writer<'s> {
    ask: mpsc::SyncSender<(u64, IoBuf)>,
    got: mpsc::Receiver<(u64, IoBuf, Result<()>)>,
    /// Chunks asked for and not yet written (at most [`READ_AHEAD`]).
    in_flight: usize,
    /// Buffers to reuse.
    spare: Vec<IoBuf>,
    sink: &'s mut dyn Sink,
    sparse: Sparse,
    stats: ExportStats,
}

impl Writer<'_> {
    /// Asks for the `n` bytes at `pos`, first writing the oldest chunk asked for when
    /// [`READ_AHEAD`] are.
    fn read_ahead(
        &mut self,
        src: &mut Reader<'_>,
        pos: u64,
        n: usize,
        size: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let mut buf = if self.in_flight >= READ_AHEAD {
            self.write_oldest(src, size, progress)?
        } else {
            self.spare.pop().unwrap_or_else(|| io_buf(0))
        };
        buf.resize(n, 0);
        self.ask
            .send((pos, buf))
            .map_err(|_| reading_stopped(src))?;
        self.in_flight += 1;
        Ok(())
    }

    /// Writes every chunk asked for.
    fn drain(
        &mut self,
        src: &mut Reader<'_>,
        size: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        while self.in_flight > 0 {
            let buf = self.write_oldest(src, size, progress)?;
            self.spare.push(buf);
        }
        Ok(())
    }

    /// Waits for the oldest chunk asked for and writes it; returns its buffer. With
    /// `--salvage`, a read that failed is done again here through `src`, which reads
    /// around what fails.
    fn write_oldest(
        &mut self,
        src: &mut Reader<'_>,
        size: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<IoBuf> {
        let (pos, mut buf, r) = self.got.recv().map_err(|_| reading_stopped(src))?;
        self.in_flight -= 1;
        match r {
            Ok(()) => {}
            Err(e) if !src.salvage => return Err(e),
            Err(_) => src.read(&mut buf, pos)?,
        }
        let n = buf.len() as u64;
        self.stats.data_bytes += n;
        self.stats.written_bytes += write_sparse(self.sink, &buf, pos, self.sparse)?;
        progress(pos + n, size);
        Ok(buf)
    }
}

/// The reading thread stopped without an answer (it panicked: the scope reports it).
fn reading_stopped(src: &Reader<'_>) -> Error {
    Error::io(
        src.src.name(),
        "read",
        0u64,
        std::io::Error::other("the reading thread stopped"),
    )
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
    let mut buf = io_buf(cs as usize);
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{convert_reporting, ConvertOptions, ImageFormat};
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A disk whose byte at `o` is `(o / 4093) as u8 | 1` inside the data ranges
    /// and zero elsewhere; reads touching `bad` fail.
    struct Striped {
        size: u64,
        data: Vec<(u64, u64)>,
        bad: Option<u64>,
    }

    impl Striped {
        fn byte(&self, o: u64) -> u8 {
            if self.byte_is_data(o) {
                (o / 4093) as u8 | 1
            } else {
                0
            }
        }

        fn byte_is_data(&self, o: u64) -> bool {
            self.data.iter().any(|&(a, b)| (a..b).contains(&o))
        }

        /// Data runs longer than the read-ahead window, short ones, and zeros
        /// between them.
        fn new(bad: Option<u64>) -> Striped {
            let chunk = COPY_CHUNK as u64;
            Striped {
                size: 64 * MIB,
                data: vec![
                    (0, 3 * chunk + 12345),
                    (14 * MIB, 14 * MIB + 4096),
                    (15 * MIB, 40 * MIB),
                    (41 * MIB + 512, 41 * MIB + 1024),
                    (63 * MIB, 64 * MIB),
                ],
                bad,
            }
        }
    }

    impl Content for Striped {
        fn name(&self) -> &str {
            "striped"
        }
        fn path(&self) -> Option<&Path> {
            None
        }
        fn size(&self) -> Result<u64> {
            Ok(self.size)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            if let Some(bad) = self.bad {
                if (offset..offset + buf.len() as u64).contains(&bad) {
                    return Err(Error::InvalidArgument(format!("unreadable at {bad}")));
                }
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.byte(offset + i as u64);
            }
            Ok(())
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            // The data ranges and the gaps between them, cut to the range asked.
            let mut cuts = vec![offset, offset + len];
            for &(a, b) in &self.data {
                cuts.extend(
                    [a, b]
                        .into_iter()
                        .filter(|c| (offset..offset + len).contains(c)),
                );
            }
            cuts.sort_unstable();
            cuts.dedup();
            Ok(cuts
                .windows(2)
                .map(|w| Extent {
                    offset: w[0],
                    length: w[1] - w[0],
                    status: if self.byte_is_data(w[0]) {
                        ExtentStatus::Data
                    } else {
                        ExtentStatus::Zero
                    },
                    depth: 0,
                    host_offset: None,
                })
                .collect())
        }
    }

    fn convert_raw(src: &Striped, salvage: bool, sparse: u64) -> (Result<ExportStats>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.raw");
        let mut opts = ConvertOptions::new(ImageFormat::Raw);
        opts.salvage = salvage;
        opts.sparse_size = sparse;
        let mut last = 0;
        let r = convert_reporting(
            src,
            &out,
            &opts,
            &mut |done, _| {
                assert!(done >= last, "progress went back from {last} to {done}");
                last = done;
            },
            &mut |_| {},
        );
        if r.is_ok() {
            assert_eq!(last, src.size, "progress reached the end");
        }
        (r, std::fs::read(&out).unwrap_or_default())
    }

    /// Many chunks read ahead, zeros between them, sparse or not: every byte lands.
    #[test]
    fn read_ahead_copies_every_byte_in_order() {
        let src = Striped::new(None);
        let data: u64 = src.data.iter().map(|(a, b)| b - a).sum();
        for sparse in [0, 4096] {
            let (r, bytes) = convert_raw(&src, false, sparse);
            let stats = r.unwrap();
            assert_eq!(stats.data_bytes, data);
            assert_eq!(bytes.len() as u64, src.size);
            let wrong = (0..src.size).find(|&o| bytes[o as usize] != src.byte(o));
            assert_eq!(wrong, None, "sparse {sparse}: first wrong byte");
        }
    }

    /// A read that fails on the reading thread fails the copy (no hang); with
    /// `salvage` the sector reads as zeros and the rest is copied.
    #[test]
    fn a_failed_read_ahead_fails_the_copy_or_is_salvaged() {
        let bad = 20 * MIB + 700;
        let src = Striped::new(Some(bad));
        let (r, _) = convert_raw(&src, false, 4096);
        let e = r.unwrap_err();
        assert!(e.to_string().contains("unreadable at"), "{e}");

        let (r, bytes) = convert_raw(&src, true, 4096);
        assert_eq!(r.unwrap().unreadable_bytes, SECTOR);
        let sector = bad / SECTOR * SECTOR..(bad / SECTOR + 1) * SECTOR;
        let wrong = (0..src.size).find(|&o| {
            let want = if sector.contains(&o) { 0 } else { src.byte(o) };
            bytes[o as usize] != want
        });
        assert_eq!(wrong, None, "first wrong byte");
    }
}
