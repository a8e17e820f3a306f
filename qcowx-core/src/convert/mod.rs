//! Export: an image's current content, backing chain included, flattened into a new
//! raw or qcow2 file (what `qemu-img convert` does for a single source). [`export`]
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
mod copy;
mod input;
mod target;
mod window;
pub use compare::{compare, CompareOptions, CompareReport, Mismatch};
pub use compressed::CompressedWriter;
pub use copy::{UnreadableKind, Warning};
pub use input::{open_input, RawFile};
pub use window::{dd_range, Window};

use std::path::Path;
use std::sync::Arc;

use crate::engine::{CreateOptions, Extent, Image};
use crate::error::{Error, Result};
use crate::format::compress::CompressionType;
use crate::vdi::Disk;
use target::{Sparse, Target, Throttled};

/// The largest buffer an export reads and writes at once.
pub const COPY_CHUNK: usize = 4 << 20;

pub use crate::engine::backing::ImageFormat;

/// What an [`export`] or [`convert`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Virtual size of the source, and of the output.
    pub virtual_size: u64,
    /// Bytes the source reported as data (read and inspected).
    pub data_bytes: u64,
    /// Bytes written to the output (data bytes that are not all zeros; for a
    /// compressed output, the guest bytes of the clusters written).
    pub written_bytes: u64,
    /// Clusters stored compressed (compressed qcow2 outputs only).
    pub compressed_clusters: u64,
    /// Bytes that could not be read and were copied as zeros
    /// ([`ConvertOptions::salvage`] only).
    pub unreadable_bytes: u64,
}

/// A readable disk: what [`convert`] copies and `compare` compares. Implemented by
/// [`Image`] (its default VDI, backing chain included), [`Disk`] (any VDI or
/// snapshot) and [`RawFile`]; an embedder implements it to convert from anything else.
///
/// ```
/// use std::path::Path;
/// use qcowx_core::convert::{convert, Content, ConvertOptions, ImageFormat};
/// use qcowx_core::{Extent, ExtentStatus, Image};
///
/// /// A disk of `size` bytes that holds `0xab` in its first MiB and nothing after.
/// struct Pattern {
///     size: u64,
/// }
///
/// impl Content for Pattern {
///     fn name(&self) -> &str {
///         "pattern"
///     }
///     fn path(&self) -> Option<&Path> {
///         None
///     }
///     fn size(&self) -> qcowx_core::Result<u64> {
///         Ok(self.size)
///     }
///     fn cluster_size(&self) -> Option<u64> {
///         None
///     }
///     fn read_at(&self, buf: &mut [u8], offset: u64) -> qcowx_core::Result<()> {
///         for (i, b) in buf.iter_mut().enumerate() {
///             *b = if offset + (i as u64) < 1 << 20 { 0xab } else { 0 };
///         }
///         Ok(())
///     }
///     fn block_status(&self, offset: u64, len: u64) -> qcowx_core::Result<Vec<Extent>> {
///         let data_end = (1u64 << 20).clamp(offset, offset + len);
///         let mut out = Vec::new();
///         for (start, end, status) in [
///             (offset, data_end, ExtentStatus::Data),
///             (data_end, offset + len, ExtentStatus::Zero),
///         ] {
///             if end > start {
///                 out.push(Extent { offset: start, length: end - start, status, depth: 0, host_offset: None });
///             }
///         }
///         Ok(out)
///     }
/// }
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let out = dir.path().join("pattern.qcow2");
/// let stats = convert(&Pattern { size: 8 << 20 }, &out, &ConvertOptions::new(ImageFormat::Qcow2), &mut |_, _| {})?;
/// assert_eq!(stats.written_bytes, 1 << 20, "only the data range is written");
/// let img = Image::open(&out)?;
/// let mut b = [0u8; 2];
/// img.read_at(&mut b, (1 << 20) - 1)?;
/// assert_eq!(b, [0xab, 0]);
/// # Ok(()) }
/// ```
pub trait Content: Send + Sync {
    /// A name for messages (the file name).
    fn name(&self) -> &str;
    /// The file holding the content, when it is a file.
    fn path(&self) -> Option<&Path>;
    /// Virtual size in bytes.
    fn size(&self) -> Result<u64>;
    /// The cluster size of a qcow2 source (`None` for raw files).
    fn cluster_size(&self) -> Option<u64>;
    /// Reads `buf.len()` bytes at `offset` (inside the virtual size).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// The allocation status of `[offset, offset+len)` (inside the virtual size):
    /// ranges that are not [`ExtentStatus::Data`](crate::ExtentStatus::Data) read as zeros.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// The image whose active layer this is, when it is one: where
    /// [`ConvertOptions::bitmaps`] finds the bitmaps to copy (default: none).
    fn image(&self) -> Option<&Image> {
        None
    }
}

impl Content for Image {
    fn name(&self) -> &str {
        self.file_name()
    }
    fn path(&self) -> Option<&Path> {
        Image::path(self)
    }
    fn size(&self) -> Result<u64> {
        Ok(Image::size(self))
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(Image::cluster_size(self))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Image::read_at(self, buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Image::block_status(self, offset, len)
    }
    fn image(&self) -> Option<&Image> {
        Some(self)
    }
}

impl Content for Disk {
    fn name(&self) -> &str {
        self.image().file_name()
    }
    fn path(&self) -> Option<&Path> {
        self.image().path()
    }
    fn size(&self) -> Result<u64> {
        Ok(Disk::size(self))
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.image().cluster_size())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Disk::read_at(self, buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Disk::block_status(self, offset, len)
    }
}

/// How [`convert`] writes its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOptions {
    /// The output format.
    pub format: ImageFormat,
    /// Store clusters compressed (qcow2 outputs only), as `qemu-img convert -c` does:
    /// each cluster that holds non-zero data is compressed with the image's
    /// compression type and stored compressed when that makes it smaller.
    pub compress: bool,
    /// Cluster size of a qcow2 output (default: the source's, or 64 KiB for a raw
    /// source).
    pub cluster_size: Option<u64>,
    /// Refcount width of a qcow2 output (default: [`CreateOptions::new`]'s).
    pub refcount_bits: Option<u32>,
    /// Compression type of a qcow2 output (default: zlib, QEMU's).
    pub compression_type: Option<CompressionType>,
    /// Extended L2 entries in a qcow2 output (default: off).
    pub extended_l2: Option<bool>,
    /// Write into the existing `output` instead of creating it (`qemu-img convert -n`):
    /// it is opened as [`format`](Self::format), must hold at least the source's size,
    /// and keeps what it holds past that size. The source's zero ranges are zeroed in
    /// it unless [`target_is_zero`](Self::target_is_zero) says they read as zeros
    /// already. The creation options above must be unset.
    pub existing_target: bool,
    /// With [`existing_target`](Self::existing_target): the output reads as zeros
    /// already (`--target-is-zero`), so zero ranges are not written to it.
    pub target_is_zero: bool,
    /// Runs of zeros at least this long are left out of the output (`-S`, default
    /// [`DEFAULT_SPARSE_SIZE`]): a raw output holds holes there, a qcow2 output no
    /// clusters. 0 writes every byte, zeros included, so the output is fully
    /// allocated. A multiple of 512 up to [`MAX_SPARSE_SIZE`].
    pub sparse_size: u64,
    /// Sync the output to the disk before returning (default). `false` is `qemu-img
    /// convert -t unsafe`: a raw output is left to the kernel to write back (a qcow2
    /// output is closed cleanly, which syncs it, either way).
    pub sync: bool,
    /// At most this many bytes written per second on average (`-r`).
    pub rate_limit: Option<u64>,
    /// Copy what cannot be read as zeros instead of failing (`--salvage`): a read that
    /// fails is done again sector by sector, and each 512-byte sector that still fails
    /// reads as zeros; a range whose block status cannot be read is read as data.
    /// [`convert_reporting`] tells each part given up on.
    pub salvage: bool,
    /// Copy the source's persistent bitmaps to the (qcow2) output (`--bitmaps`), as
    /// they are: granularity, enabled or not, dirty bits. An inconsistent bitmap (in
    /// use: a crash) refuses the conversion before anything is written, unless
    /// [`skip_broken_bitmaps`](Self::skip_broken_bitmaps).
    pub bitmaps: bool,
    /// With [`bitmaps`](Self::bitmaps): leave inconsistent bitmaps out (each is
    /// reported) instead of refusing.
    pub skip_broken_bitmaps: bool,
    /// Make the (qcow2) output an overlay of this backing file (`-B`, with
    /// [`backing_format`](Self::backing_format) required, as qemu-img requires it):
    /// what the source's own layer stores is copied, its zeros are written as zero
    /// clusters (so the backing file's data does not show through), and what the
    /// source reads from its backing chain is left to the output's backing file.
    pub backing_file: Option<String>,
    /// The format of [`backing_file`](Self::backing_file): `qcow2` or `raw`.
    pub backing_format: Option<ImageFormat>,
}

/// The default [`ConvertOptions::sparse_size`]: 4 KiB, as `qemu-img convert`'s.
pub const DEFAULT_SPARSE_SIZE: u64 = 4096;

/// The largest [`ConvertOptions::sparse_size`]: 16 MiB, as `qemu-img convert`'s.
pub const MAX_SPARSE_SIZE: u64 = 16 << 20;

impl ConvertOptions {
    /// Options for an uncompressed output of `format` with the default cluster size.
    ///
    /// ```
    /// use qcowx_core::convert::{ConvertOptions, ImageFormat};
    ///
    /// let opts = ConvertOptions::new(ImageFormat::Qcow2);
    /// assert!(!opts.compress);
    /// assert_eq!(opts.cluster_size, None); // the source's
    /// let small = ConvertOptions { cluster_size: Some(4096), ..ConvertOptions::new(ImageFormat::Qcow2) };
    /// assert_eq!(small.format, ImageFormat::Qcow2);
    /// ```
    pub fn new(format: ImageFormat) -> ConvertOptions {
        ConvertOptions {
            format,
            compress: false,
            cluster_size: None,
            refcount_bits: None,
            compression_type: None,
            extended_l2: None,
            existing_target: false,
            target_is_zero: false,
            sparse_size: DEFAULT_SPARSE_SIZE,
            sync: true,
            rate_limit: None,
            salvage: false,
            bitmaps: false,
            skip_broken_bitmaps: false,
            backing_file: None,
            backing_format: None,
        }
    }

    /// Applies `qemu-img convert -o` options for a qcow2 output: `cluster_size`,
    /// `refcount_bits`, `compression_type`, `extended_l2` and `compat` (`1.1`), parsed
    /// as [`CreateOptions::apply_qemu_options`] parses them. The output's size and
    /// backing file are the conversion's (`size`, `backing_file` and `backing_fmt` are
    /// refused), and so is every key `create` refuses.
    ///
    /// ```
    /// use qcowx_core::convert::{ConvertOptions, ImageFormat};
    ///
    /// let mut opts = ConvertOptions::new(ImageFormat::Qcow2);
    /// opts.apply_qemu_options("cluster_size=4k,refcount_bits=16,compat=1.1").unwrap();
    /// assert_eq!((opts.cluster_size, opts.refcount_bits), (Some(4096), Some(16)));
    /// assert!(opts.apply_qemu_options("size=1G").is_err());
    /// ```
    pub fn apply_qemu_options(&mut self, options: &str) -> Result<()> {
        let mut parsed = CreateOptions::new(0);
        parsed.apply_qemu_options(options)?;
        for item in options.split(',').filter(|s| !s.is_empty()) {
            let key = item.split_once('=').map_or(item, |(k, _)| k);
            match key {
                "cluster_size" => self.cluster_size = Some(parsed.cluster_size),
                "refcount_bits" => self.refcount_bits = Some(parsed.refcount_bits),
                "compression_type" => self.compression_type = Some(parsed.compression),
                "extended_l2" => self.extended_l2 = Some(parsed.extended_l2),
                "compat" => {}
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "-o {options}: {key} is set by the conversion, not an option of it"
                    )))
                }
            }
        }
        Ok(())
    }
}

/// What a progress callback is told: bytes of the virtual disk walked so far, and
/// the total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

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
///     fn cluster_size(&self) -> Option<u64> { None }
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
    let size = src.size()?;
    let bitmaps = if opts.bitmaps {
        bitmaps::to_copy(src, opts.skip_broken_bitmaps, &mut *report)?
    } else {
        Vec::new()
    };
    let mut target = if opts.existing_target {
        Target::open_existing(output, opts.format, size)?
    } else {
        Target::create(output, opts, size, src.cluster_size())?
    };
    let mut reader = copy::Reader::new(src, opts.salvage, report);
    let stats = match &target {
        Target::Qcow2(dst) if opts.compress => {
            copy::copy_compressed(&mut reader, size, dst, opts.rate_limit, progress)?
        }
        _ => {
            // Over a backing file the zeros must be written, or its data shows
            // through; past its end they read as zeros anyway.
            let overlay = match &target {
                Target::Qcow2(img) if opts.backing_file.is_some() => {
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
    if let (Target::Qcow2(dst), Some(img)) = (&target, src.image()) {
        bitmaps::copy(img, dst, &bitmaps)?;
    }
    target.finish(opts.sync)?;
    Ok(stats)
}

/// Refuses options that contradict each other, before anything is opened.
fn check_options(opts: &ConvertOptions, out_name: &str) -> Result<()> {
    let refuse = |why: &str| Err(Error::InvalidArgument(format!("{out_name}: {why}")));
    if opts.compress && opts.format != ImageFormat::Qcow2 {
        return refuse("compression needs a qcow2 output (-O qcow2)");
    }
    if !opts.sparse_size.is_multiple_of(512) || opts.sparse_size > MAX_SPARSE_SIZE {
        return refuse(&format!(
            "invalid sparse size {}: valid sizes are multiples of 512 up to {MAX_SPARSE_SIZE}, \
             or 0 to disable sparse detection (fully allocates the output)",
            opts.sparse_size
        ));
    }
    if opts.target_is_zero && !opts.existing_target {
        return refuse("--target-is-zero requires use of -n flag");
    }
    if opts.bitmaps && opts.format != ImageFormat::Qcow2 {
        return refuse("--bitmaps needs a qcow2 output (-O qcow2)");
    }
    if opts.skip_broken_bitmaps && !opts.bitmaps {
        return refuse("use of --skip-broken-bitmaps requires --bitmaps");
    }
    if opts.backing_file.is_some() {
        if opts.format != ImageFormat::Qcow2 {
            return refuse("a backing file needs a qcow2 output (-O qcow2)");
        }
        if opts.backing_format.is_none() {
            return refuse("use of backing file requires explicit backing format (-F)");
        }
        if opts.existing_target || opts.compress {
            return refuse("a backing file is for a new, uncompressed output: drop -n and -c");
        }
    } else if opts.backing_format.is_some() {
        return refuse("-F names the format of a backing file: add -B");
    }
    if opts.existing_target {
        if opts.cluster_size.is_some()
            || opts.refcount_bits.is_some()
            || opts.compression_type.is_some()
            || opts.extended_l2.is_some()
        {
            return refuse("-o has no effect when skipping image creation");
        }
        if opts.compress {
            return refuse("-c writes compressed clusters only into a new image: drop -n");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
