//! Export: an image's current content, backing chain included, flattened into a new
//! raw or qcow2 file (what `qemu-img convert` does for a single source; [`Concat`]
//! reads several sources as one). [`export`]
//! copies the default VDI; [`export_root`] and [`export_disk`] copy any VDI or
//! snapshot (what `qemu-img convert -l snapshot.name=S` does for a snapshot).
//!
//! The export walks [`Image::block_status`] in large windows and copies only ranges
//! that hold data, in buffers of at most [`COPY_CHUNK`] bytes. Zero and unallocated
//! ranges are never written, and neither are data blocks that happen to read as all
//! zeros, so the output is as sparse as the content allows: a raw output is a sparse
//! file of the virtual size, a qcow2 output allocates only clusters that hold non-zero
//! data.
//!
//! ```
//! use qcowx_core::convert::{export, ImageFormat};
//! use qcowx_core::{CreateOptions, Image};
//!
//! # fn main() -> Result<(), qcowx_core::Error> {
//! let dir = tempfile::tempdir().unwrap();
//! let src = Image::create(dir.path().join("src.qcow2"), &CreateOptions::new(8 << 20))?;
//! src.write_at(b"hello", 1 << 20)?;
//! let out = dir.path().join("flat.raw");
//! let stats = export(&src, &out, ImageFormat::Raw)?;
//! assert_eq!(stats.virtual_size, 8 << 20);
//! let raw = std::fs::read(&out).unwrap();
//! assert_eq!(&raw[1 << 20..(1 << 20) + 5], b"hello");
//! # Ok(()) }
//! ```

mod bitmaps;
mod compare;
mod compressed;
mod concat;
mod content;
mod copy;
mod input;
mod options;
mod target;
mod window;
pub use compare::{compare, CompareOptions, CompareReport, Mismatch};
pub use compressed::CompressedWriter;
pub use concat::Concat;
pub use content::{Content, ExportStats, Progress, COPY_CHUNK};
pub use copy::{UnreadableKind, Warning};
pub use input::{open_input, RawFile};
pub use options::{ConvertOptions, DEFAULT_SPARSE_SIZE, MAX_SPARSE_SIZE};
pub use window::{dd_range, Window};

use std::path::Path;
use std::sync::Arc;

use crate::engine::Image;
use crate::error::{Error, Result};
use crate::vdi::Disk;
use options::check_options;
use target::{Sparse, Target, Throttled};

pub use crate::engine::backing::ImageFormat;

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
/// [`Image::create`] using the source's virtual size and `opts`' cluster size, refcount
/// width, compression type and subclusters (64 KiB clusters, and the rest as
/// [`CreateOptions::new`](crate::CreateOptions::new) has them, unless `opts` says
/// otherwise: as qemu-img, whatever the source has) and closed cleanly, so it passes `qemu-img check`. Only ranges
/// that hold non-zero data are written, in buffers of at most [`COPY_CHUNK`] bytes.
///
/// On error the output may be left partly written.
///
/// ```
/// use qcowx_core::convert::{export, ImageFormat};
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let src = Image::create(dir.path().join("src.qcow2"), &CreateOptions::new(4 << 20))?;
/// src.write_at(&[9; 4096], 2 << 20)?;
/// let out = dir.path().join("copy.qcow2");
/// let stats = export(&src, &out, ImageFormat::Qcow2)?;
/// // One cluster holds data: it is all the output stores.
/// assert_eq!((stats.virtual_size, stats.written_bytes), (4 << 20, 65536));
/// let copy = Image::open(&out)?;
/// let mut buf = [0u8; 4096];
/// copy.read_at(&mut buf, 2 << 20)?;
/// assert_eq!(buf, [9; 4096]);
/// assert_eq!(copy.check()?.exit_code(), 0);
/// # Ok(()) }
/// ```
pub fn export(src: &Image, output: &Path, format: ImageFormat) -> Result<ExportStats> {
    convert(src, output, &ConvertOptions::new(format), &mut |_, _| {})
}

/// Writes the content of root `root` of `img` — a VDI (`"default"` for the default
/// VDI) or a snapshot, looked up as [`Image::open_root`] does — to a new file at
/// `output` in `format`, like [`export`] does for the default VDI.
///
/// The output's virtual size is the root's (a snapshot keeps the size it was taken
/// at). Unallocated ranges of the root read through the image's backing chain, so the
/// output is the root's full guest-visible content.
///
/// ```
/// use std::sync::Arc;
/// use qcowx_core::convert::{export_root, ImageFormat};
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?);
/// img.write_at(b"before", 0)?;
/// img.snapshot("default", "s1")?;
/// img.write_at(b"after!", 0)?;
/// let out = dir.path().join("s1.raw");
/// export_root(&img, "s1", &out, ImageFormat::Raw)?;
/// assert_eq!(&std::fs::read(&out).unwrap()[..6], b"before");
/// # Ok(()) }
/// ```
pub fn export_root(
    img: &Arc<Image>,
    root: &str,
    output: &Path,
    format: ImageFormat,
) -> Result<ExportStats> {
    let disk = img.open_root(root)?;
    export_disk(&disk, output, format)
}

/// Writes the content of `disk` (any VDI or snapshot handle from
/// [`Image::open_root`]) to a new file at `output` in `format`; see [`export`] and
/// [`export_root`].
///
/// ```
/// use std::sync::Arc;
/// use qcowx_core::convert::{export_disk, ImageFormat};
/// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?);
/// img.write_at(b"base", 0)?;
/// img.snapshot(DEFAULT_VDI, "s")?;
/// img.fork("s", "clone")?;
/// let clone = img.open_root("clone")?;
/// clone.write_at(b"mine", 0)?;
/// let out = dir.path().join("clone.raw");
/// export_disk(&clone, &out, ImageFormat::Raw)?;
/// assert_eq!(&std::fs::read(&out).unwrap()[..4], b"mine");
/// # Ok(()) }
/// ```
pub fn export_disk(disk: &Disk, output: &Path, format: ImageFormat) -> Result<ExportStats> {
    convert(disk, output, &ConvertOptions::new(format), &mut |_, _| {})
}

/// Writes the content of `src` to a new file at `output` as `opts` say: what
/// [`export`] does, for any [`Content`] (a raw file too), optionally compressed.
///
/// `progress` is called with the bytes of the virtual disk walked so far and the
/// virtual size, from time to time and once at the end.
///
/// A compressed output (`opts.compress`, qcow2 only) is written through
/// [`CompressedWriter`]: every cluster that holds non-zero data is compressed and
/// packed byte-granular into the file, as QEMU packs them; a cluster that does not
/// compress is stored as is. The output passes `qemu-img check`.
///
/// ```
/// use qcowx_core::convert::{convert, ConvertOptions, ImageFormat};
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let src = Image::create(dir.path().join("src.qcow2"), &CreateOptions::new(4 << 20))?;
/// src.write_at(&vec![7u8; 1 << 20], 0)?;
/// let mut opts = ConvertOptions::new(ImageFormat::Qcow2);
/// opts.compress = true;
/// let out = dir.path().join("small.qcow2");
/// let stats = convert(&src, &out, &opts, &mut |_, _| {})?;
/// assert_eq!(stats.compressed_clusters, 16);
/// let copy = Image::open(&out)?;
/// let mut b = vec![0u8; 1 << 20];
/// copy.read_at(&mut b, 0)?;
/// assert!(b.iter().all(|&x| x == 7));
/// # Ok(()) }
/// ```
pub fn convert(
    src: &dyn Content,
    output: &Path,
    opts: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<ExportStats> {
    convert_reporting(src, output, opts, progress, &mut |_| {})
}

/// [`convert`], telling `report` what it gave up on as it goes: each part of the
/// source that [`ConvertOptions::salvage`] could not read (and copied as zeros), each
/// bitmap [`ConvertOptions::skip_broken_bitmaps`] left out.
///
/// ```
/// use std::path::Path;
/// use qcowx_core::convert::{convert_reporting, Content, ConvertOptions, ImageFormat, Warning};
/// use qcowx_core::{Error, Extent, ExtentStatus};
///
/// /// 4 KiB of 0x11 whose second sector cannot be read.
/// struct Scratched;
/// impl Content for Scratched {
///     fn name(&self) -> &str { "scratched" }
///     fn path(&self) -> Option<&Path> { None }
///     fn size(&self) -> qcowx_core::Result<u64> { Ok(4096) }
///     fn read_at(&self, buf: &mut [u8], offset: u64) -> qcowx_core::Result<()> {
///         if offset < 1024 && offset + buf.len() as u64 > 512 {
///             return Err(Error::InvalidArgument("bad sector".into()));
///         }
///         buf.fill(0x11);
///         Ok(())
///     }
///     fn block_status(&self, offset: u64, len: u64) -> qcowx_core::Result<Vec<Extent>> {
///         Ok(vec![Extent { offset, length: len, status: ExtentStatus::Data, depth: 0, host_offset: None }])
///     }
/// }
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let out = dir.path().join("saved.raw");
/// let mut opts = ConvertOptions::new(ImageFormat::Raw);
/// opts.salvage = true;
/// let mut lost = Vec::new();
/// let mut report = |w| {
///     if let Warning::Unreadable { offset, .. } = w {
///         lost.push(offset);
///     }
/// };
/// let stats = convert_reporting(&Scratched, &out, &opts, &mut |_, _| {}, &mut report)?;
/// assert_eq!((lost, stats.unreadable_bytes), (vec![512], 512));
/// let bytes = std::fs::read(&out).unwrap();
/// assert!(bytes[512..1024].iter().all(|&b| b == 0) && bytes[1024] == 0x11);
/// # Ok(()) }
/// ```
pub fn convert_reporting(
    src: &dyn Content,
    output: &Path,
    opts: &ConvertOptions,
    progress: Progress<'_>,
    report: &mut dyn FnMut(Warning),
) -> Result<ExportStats> {
    let out_name = output.display().to_string();
    check_options(opts, &out_name)?;
    for src_path in src.files() {
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
    let size = src.size()?;
    let bitmaps = if opts.bitmaps {
        bitmaps::to_copy(src, opts.skip_broken_bitmaps, &mut *report)?
    } else {
        Vec::new()
    };
    let mut target = if opts.existing_target {
        Target::open_existing(output, opts.format, size)?
    } else {
        Target::create(output, opts, size)?
    };
    let mut reader = copy::Reader::new(src, opts.salvage, report);
    let stats = match &target {
        Target::Qcow2 { img: dst, .. } if opts.compress => {
            copy::copy_compressed(&mut reader, size, dst, opts.rate_limit, progress)?
        }
        _ => {
            // Over a backing file the zeros must be written, or its data shows
            // through; past its end they read as zeros anyway.
            let overlay = match &target {
                Target::Qcow2 { img, .. } if opts.backing_file.is_some() => {
                    Some(img.backing().map_or(0, |b| b.size()))
                }
                _ => None,
            };
            let zero_gaps = (opts.existing_target && !opts.target_is_zero) || overlay.is_some();
            let sparse = Sparse::new(opts.sparse_size, target.cluster_size(), zero_gaps);
            let mut sink = Throttled::new(&mut target, opts.rate_limit);
            copy::copy(&mut reader, size, &mut sink, sparse, overlay, progress)?
        }
    };
    if let (Target::Qcow2 { img: dst, .. }, Some(img)) = (&target, src.image()) {
        bitmaps::copy(img, dst, &bitmaps)?;
    }
    target.finish(opts.sync)?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::CreateOptions;

    #[test]
    fn output_format_parses_qemu_names() {
        assert_eq!("raw".parse::<ImageFormat>().unwrap(), ImageFormat::Raw);
        assert_eq!("qcow2".parse::<ImageFormat>().unwrap(), ImageFormat::Qcow2);
        assert!("vmdk".parse::<ImageFormat>().is_err());
        assert_eq!(ImageFormat::Qcow2.name(), "qcow2");
    }

    #[test]
    fn export_root_copies_the_named_root_at_its_own_size() {
        let dir = tempfile::tempdir().unwrap();
        let img = Arc::new(
            Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20)).unwrap(),
        );
        img.write_at(&[1u8; 4096], 8192).unwrap();
        img.snapshot("default", "small").unwrap();
        img.resize(3 << 20).unwrap();
        img.write_at(&[2u8; 4096], 8192).unwrap();
        img.write_at(&[3u8; 4096], 2 << 20).unwrap();
        img.snapshot("default", "big").unwrap();
        img.fork("small", "dev").unwrap();
        img.open_root("dev")
            .unwrap()
            .write_at(&[4u8; 512], 0)
            .unwrap();

        let read = |name: &str, format: ImageFormat| {
            let out = dir.path().join(format!("{name}.{}", format.name()));
            let stats = export_root(&img, name, &out, format).unwrap();
            let raw = match format {
                ImageFormat::Raw => std::fs::read(&out).unwrap(),
                ImageFormat::Qcow2 => {
                    let e = Image::open(&out).unwrap();
                    let mut b = vec![0u8; e.size() as usize];
                    e.read_at(&mut b, 0).unwrap();
                    b
                }
            };
            assert_eq!(raw.len() as u64, stats.virtual_size, "{name}");
            raw
        };
        for format in [ImageFormat::Raw, ImageFormat::Qcow2] {
            let small = read("small", format);
            assert_eq!(small.len(), 1 << 20);
            assert!(small[8192..12288].iter().all(|&b| b == 1));
            assert_eq!(small.iter().filter(|&&b| b != 0).count(), 4096);
            let big = read("big", format);
            assert_eq!(big.len(), 3 << 20);
            assert!(big[8192..12288].iter().all(|&b| b == 2));
            assert!(big[2 << 20..(2 << 20) + 4096].iter().all(|&b| b == 3));
            let dev = read("dev", format);
            assert_eq!(dev.len(), 1 << 20);
            assert!(dev[..512].iter().all(|&b| b == 4));
            assert!(dev[8192..12288].iter().all(|&b| b == 1));
            let head = read("default", format);
            assert_eq!(head, big);
        }
        let err =
            export_root(&img, "nope", &dir.path().join("x.raw"), ImageFormat::Raw).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        assert!(!dir.path().join("x.raw").exists());
    }

    #[test]
    fn export_refuses_the_source_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.qcow2");
        let img = Image::create(&path, &CreateOptions::new(1 << 20)).unwrap();
        img.write_at(b"keep", 0).unwrap();
        img.flush().unwrap();
        let err = export(&img, &path, ImageFormat::Raw).unwrap_err();
        assert!(err.to_string().contains("source image itself"), "{err}");
        let mut b = [0u8; 4];
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"keep");
    }
}
