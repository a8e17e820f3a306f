//! Export: an image's current content, backing chain included, flattened into a new
//! raw or qcow2 file (what `qemu-img convert` does for a single source).
//!
//! The export walks [`Image::block_status`] in large windows and copies only ranges
//! that hold data, in buffers of at most [`COPY_CHUNK`] bytes. Zero and unallocated
//! ranges are never written, and neither are data blocks that happen to read as all
//! zeros, so the output is as sparse as the content allows: a raw output is a sparse
//! file of the virtual size, a qcow2 output allocates only clusters that hold non-zero
//! data.
//!
//! ```
//! use qcowx_core::convert::{export, OutputFormat};
//! use qcowx_core::{CreateOptions, Image};
//!
//! # fn main() -> Result<(), qcowx_core::Error> {
//! let dir = tempfile::tempdir().unwrap();
//! let src = Image::create(dir.path().join("src.qcow2"), &CreateOptions::new(8 << 20))?;
//! src.write_at(b"hello", 1 << 20)?;
//! let out = dir.path().join("flat.raw");
//! let stats = export(&src, &out, OutputFormat::Raw)?;
//! assert_eq!(stats.virtual_size, 8 << 20);
//! let raw = std::fs::read(&out).unwrap();
//! assert_eq!(&raw[1 << 20..(1 << 20) + 5], b"hello");
//! # Ok(()) }
//! ```

use std::path::Path;

use crate::error::{Error, Result};
use crate::image::{CreateOptions, ExtentStatus, Image};
use crate::lock::LockMode;
use crate::storage::{FileStorage, Storage};

/// The largest buffer an export reads and writes at once.
pub const COPY_CHUNK: usize = 4 << 20;

/// How much of the disk one [`Image::block_status`] call covers.
const STATUS_WINDOW: u64 = 1 << 30;

/// Granularity of zero detection in a raw output (qcow2 outputs use the cluster size).
const RAW_ZERO_GRANULE: u64 = 4096;

/// The format of an export's output file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    /// A raw disk image: a sparse file of the virtual size.
    Raw,
    /// A new qcow2 image with the source's virtual size and cluster size and no
    /// backing file.
    Qcow2,
}

impl OutputFormat {
    /// The format's name as `qemu-img` spells it (`raw`, `qcow2`).
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Raw => "raw",
            OutputFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for OutputFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<OutputFormat> {
        match s {
            "raw" => Ok(OutputFormat::Raw),
            "qcow2" => Ok(OutputFormat::Qcow2),
            other => Err(Error::InvalidArgument(format!(
                "unknown output format '{other}' (raw and qcow2 are supported)"
            ))),
        }
    }
}

/// What an [`export`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Virtual size of the source, and of the output.
    pub virtual_size: u64,
    /// Bytes the source reported as data (read and inspected).
    pub data_bytes: u64,
    /// Bytes written to the output (data bytes that are not all zeros).
    pub written_bytes: u64,
}

/// Where the copied bytes go.
trait Sink {
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()>;
}

struct RawSink {
    storage: FileStorage,
    name: String,
}

impl Sink for RawSink {
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.storage
            .write_at(buf, offset)
            .map_err(|source| io_error(&self.name, "write", offset, source))
    }
}

impl Sink for Image {
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_at(buf, offset)
    }
}

fn io_error(name: &str, op: &'static str, offset: u64, source: std::io::Error) -> Error {
    Error::Io {
        file: name.to_string(),
        op,
        offset,
        source,
    }
}

/// Writes the current content of `src` (its active layer over its backing chain) to a
/// new file at `output` in `format`, overwriting an existing file as `qemu-img
/// convert` does.
///
/// The output is locked exclusively (with QEMU's image locks) before an existing file
/// is truncated, so an image that is open elsewhere — including `src` itself and the
/// files of its backing chain when they are open with a lock — is refused and left
/// untouched. Exporting onto the source's own path is refused in any case.
///
/// A raw output is a sparse file of `src.size()` bytes; a qcow2 output is created with
/// [`Image::create`] using the source's virtual size and cluster size (other options
/// at their defaults) and closed cleanly, so it passes `qemu-img check`. Only ranges
/// that hold non-zero data are written, in buffers of at most [`COPY_CHUNK`] bytes.
///
/// On error the output may be left partly written.
pub fn export(src: &Image, output: &Path, format: OutputFormat) -> Result<ExportStats> {
    let out_name = output.display().to_string();
    if let Some(src_path) = src.path() {
        let same = match (
            std::fs::canonicalize(src_path),
            std::fs::canonicalize(output),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            return Err(Error::InvalidArgument(format!(
                "{out_name}: the output is the source image itself"
            )));
        }
    }
    let size = src.size();
    match format {
        OutputFormat::Raw => {
            let storage =
                FileStorage::create(output, LockMode::Exclusive).map_err(|e| match e {
                    crate::storage::OpenError::Lock { source, .. } => Error::Locked {
                        file: out_name.clone(),
                        source,
                    },
                    other => io_error(&out_name, "create", 0, other.into()),
                })?;
            storage
                .set_len(size)
                .map_err(|e| io_error(&out_name, "truncate", size, e))?;
            let mut sink = RawSink {
                storage,
                name: out_name.clone(),
            };
            let stats = copy(src, &mut sink, RAW_ZERO_GRANULE)?;
            sink.storage
                .sync_data()
                .map_err(|e| io_error(&out_name, "fdatasync", 0, e))?;
            Ok(stats)
        }
        OutputFormat::Qcow2 => {
            let mut opts = CreateOptions::new(size);
            opts.cluster_size = src.cluster_size();
            let mut dst = Image::create(output, &opts)?;
            let stats = copy(src, &mut dst, src.cluster_size())?;
            dst.close()?;
            Ok(stats)
        }
    }
}

/// Copies every data range of `src` to `sink`, skipping zero `granule`-sized blocks.
fn copy(src: &Image, sink: &mut dyn Sink, granule: u64) -> Result<ExportStats> {
    let size = src.size();
    let mut stats = ExportStats {
        virtual_size: size,
        ..ExportStats::default()
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut window = 0u64;
    while window < size {
        let wlen = STATUS_WINDOW.min(size - window);
        for ext in src.block_status(window, wlen)? {
            if ext.status != ExtentStatus::Data {
                continue;
            }
            let end = ext.offset + ext.length;
            let mut pos = ext.offset;
            while pos < end {
                let n = (end - pos).min(COPY_CHUNK as u64);
                buf.resize(n as usize, 0);
                src.read_at(&mut buf, pos)?;
                stats.data_bytes += n;
                stats.written_bytes += write_nonzero(sink, &buf, pos, granule)?;
                pos += n;
            }
        }
        window += wlen;
    }
    Ok(stats)
}

/// Writes the runs of `buf` (which holds the disk at `offset`) that are not all zeros,
/// judged in `granule`-aligned blocks. Returns the number of bytes written.
fn write_nonzero(sink: &mut dyn Sink, buf: &[u8], offset: u64, granule: u64) -> Result<u64> {
    let end = offset + buf.len() as u64;
    let mut written = 0u64;
    let mut run: Option<u64> = None; // start of the current non-zero run
    let mut pos = offset;
    while pos < end {
        let next = ((pos / granule) + 1).saturating_mul(granule).min(end);
        let block = &buf[(pos - offset) as usize..(next - offset) as usize];
        let zero = block.iter().all(|&b| b == 0);
        match (zero, run) {
            (false, None) => run = Some(pos),
            (true, Some(start)) => {
                sink.write(
                    &buf[(start - offset) as usize..(pos - offset) as usize],
                    start,
                )?;
                written += pos - start;
                run = None;
            }
            _ => {}
        }
        pos = next;
    }
    if let Some(start) = run {
        sink.write(&buf[(start - offset) as usize..], start)?;
        written += end - start;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, usize)>);

    impl Sink for Recorder {
        fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
            self.0.push((offset, buf.len()));
            Ok(())
        }
    }

    #[test]
    fn write_nonzero_skips_zero_granules_and_merges_runs() {
        let mut buf = vec![0u8; 10 * 512];
        buf[0] = 1; // granule 0
        buf[512 + 7] = 1; // granule 1
        buf[4 * 512] = 1; // granule 4
        buf[10 * 512 - 1] = 1; // granule 9
        let mut rec = Recorder::default();
        let n = write_nonzero(&mut rec, &buf, 1 << 20, 512).unwrap();
        assert_eq!(
            rec.0,
            vec![
                ((1 << 20), 1024),
                ((1 << 20) + 4 * 512, 512),
                ((1 << 20) + 9 * 512, 512)
            ]
        );
        assert_eq!(n, 2048);
    }

    #[test]
    fn write_nonzero_aligns_granules_to_absolute_offsets() {
        // The buffer starts mid-granule: the first partial granule is judged alone.
        let mut buf = vec![0u8; 1024];
        buf[100] = 9; // absolute 356: inside granule [0, 512)
        let mut rec = Recorder::default();
        let n = write_nonzero(&mut rec, &buf, 256, 512).unwrap();
        assert_eq!(rec.0, vec![(256, 256)]);
        assert_eq!(n, 256);
        let mut rec = Recorder::default();
        assert_eq!(write_nonzero(&mut rec, &[0u8; 4096], 0, 512).unwrap(), 0);
        assert!(rec.0.is_empty());
    }

    #[test]
    fn output_format_parses_qemu_names() {
        assert_eq!("raw".parse::<OutputFormat>().unwrap(), OutputFormat::Raw);
        assert_eq!(
            "qcow2".parse::<OutputFormat>().unwrap(),
            OutputFormat::Qcow2
        );
        assert!("vmdk".parse::<OutputFormat>().is_err());
        assert_eq!(OutputFormat::Qcow2.name(), "qcow2");
    }

    #[test]
    fn export_refuses_the_source_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.qcow2");
        let img = Image::create(&path, &CreateOptions::new(1 << 20)).unwrap();
        img.write_at(b"keep", 0).unwrap();
        img.flush().unwrap();
        let err = export(&img, &path, OutputFormat::Raw).unwrap_err();
        assert!(err.to_string().contains("source image itself"), "{err}");
        let mut b = [0u8; 4];
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"keep");
    }
}
