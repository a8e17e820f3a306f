//! How large a new image would be, as `qemu-img measure` answers: for a virtual size,
//! or for the content of a disk (a VDI or snapshot of an image, read through its
//! backing chain, or a raw file) converted into a new file.
//!
//! Two numbers: the *fully allocated* size (every cluster of the disk allocated: the
//! most the file can grow to) and the *required* size (the same metadata, but data
//! clusters only for what the source holds: ranges that read as zeros are not
//! counted, as a conversion does not write them). For a qcow2 source, the space its
//! persistent bitmaps would take in the new image is the third.

use std::path::Path;

use crate::engine::chain::raw_extents;
use crate::engine::{CreateOptions, Extent, ExtentStatus, STATUS_WINDOW};
use crate::error::{Error, Result};
use crate::format::header::MAX_VIRTUAL_SIZE;
use crate::format::measure::{bitmap_bytes, fully_allocated_bytes};
use crate::vdi::Disk;

/// The format of the file being measured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MeasureFormat {
    /// A QCOW2 image, as `qcowx create` (or `convert -O qcow2`) writes it.
    #[default]
    Qcow2,
    /// A raw file: every byte of the disk.
    Raw,
}

pub use crate::engine::Preallocation;

/// What the new file would be: its format and creation options. The defaults are
/// `qcowx create`'s (64 KiB clusters, 32-bit refcounts), which `qemu-img` would
/// create with 16-bit refcounts: pass `refcount_bits=16` to measure for that.
///
/// ```
/// use qcowx_core::measure::{MeasureOptions, Preallocation};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let mut opts = MeasureOptions::default();
/// opts.apply_qemu_options("cluster_size=2M,refcount_bits=16,preallocation=full")?;
/// assert_eq!((opts.cluster_size, opts.refcount_bits), (2 << 20, 16));
/// assert_eq!(opts.preallocation, Preallocation::Full);
/// assert!(opts.apply_qemu_options("cluster_size=3k").is_err());
/// assert!(opts.apply_qemu_options("encryption=on").is_err());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MeasureOptions {
    /// The new file's format.
    pub format: MeasureFormat,
    /// Cluster size of a qcow2 file.
    pub cluster_size: u64,
    /// Refcount width of a qcow2 file.
    pub refcount_bits: u32,
    /// 128-bit L2 entries.
    pub extended_l2: bool,
    /// What the new file allocates up front.
    pub preallocation: Preallocation,
    /// The new file will have a backing file: nothing of the source is assumed to be
    /// in it, so every cluster is counted as required.
    pub backing_file: bool,
}

impl Default for MeasureOptions {
    fn default() -> MeasureOptions {
        let create = CreateOptions::new(0);
        MeasureOptions {
            format: MeasureFormat::Qcow2,
            cluster_size: create.cluster_size,
            refcount_bits: create.refcount_bits,
            extended_l2: create.extended_l2,
            preallocation: Preallocation::Off,
            backing_file: false,
        }
    }
}

impl MeasureOptions {
    /// Applies `qemu-img measure -o` options: the creation options of
    /// [`CreateOptions::apply_qemu_options`] for a qcow2 file, and `preallocation`
    /// (`off`, `metadata`, `falloc`, `full`) and `compat` (`1.1`) for either format.
    /// The values are checked as creating the file would check them.
    pub fn apply_qemu_options(&mut self, options: &str) -> Result<()> {
        let bad = |what: String| Error::InvalidArgument(format!("-o {options}: {what}"));
        let mut create = CreateOptions::new(0);
        create.cluster_size = self.cluster_size;
        create.refcount_bits = self.refcount_bits;
        create.extended_l2 = self.extended_l2;
        let mut rest: Vec<&str> = Vec::new();
        for item in options.split(',').filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some(("preallocation", v)) => {
                    self.preallocation = Preallocation::parse(v).ok_or_else(|| {
                        bad(format!(
                            "preallocation '{v}' is not off, metadata, falloc or full"
                        ))
                    })?
                }
                Some(("compat", "1.1" | "v3")) => {}
                Some(("compat", v)) => {
                    return Err(bad(format!(
                        "compat '{v}': qcowx writes version 3 (1.1) images"
                    )))
                }
                _ if self.format == MeasureFormat::Raw => {
                    return Err(bad(format!("'{item}' is not an option of a raw file")))
                }
                _ => rest.push(item),
            }
        }
        create.apply_qemu_options(&rest.join(","))?;
        if !create.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&create.cluster_size)
        {
            return Err(bad(format!(
                "cluster size {} is not a power of two from 512 to 2M",
                create.cluster_size
            )));
        }
        if !create.refcount_bits.is_power_of_two() || create.refcount_bits > 64 {
            return Err(bad(format!(
                "refcount_bits {} is not a power of two up to 64",
                create.refcount_bits
            )));
        }
        self.cluster_size = create.cluster_size;
        self.refcount_bits = create.refcount_bits;
        self.extended_l2 = create.extended_l2;
        self.backing_file |= create.backing_file.is_some();
        Ok(())
    }
}

/// The answer of a measure, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// What the new file needs for the source's content.
    pub required: u64,
    /// What it needs with every cluster allocated.
    pub fully_allocated: u64,
    /// What the source's persistent bitmaps would add (a qcow2 source measured for a
    /// qcow2 file; `None` otherwise).
    pub bitmaps: Option<u64>,
}

/// The measure of a new, empty disk of `size` bytes.
///
/// ```
/// use qcowx_core::measure::{measure_size, MeasureOptions};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let mut opts = MeasureOptions::default();
/// opts.apply_qemu_options("refcount_bits=16")?;
/// let m = measure_size(16 << 30, &opts)?;
/// // What `qemu-img measure --size 16G -O qcow2` prints.
/// assert_eq!((m.required, m.fully_allocated), (2_883_584, 17_182_752_768));
/// assert!(measure_size(1 << 62, &opts).is_err(), "too large for 64 KiB clusters");
/// # Ok(()) }
/// ```
pub fn measure_size(size: u64, opts: &MeasureOptions) -> Result<Measurement> {
    measure_extents(size, opts, None, None)
}

/// The measure of `disk`'s content (a VDI or snapshot, read through the image's
/// backing chain) converted into a new file, with the space of the image's persistent
/// bitmaps for a qcow2 file.
///
/// ```
/// use std::sync::Arc;
/// use qcowx_core::measure::{measure_disk, MeasureOptions};
/// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 30))?);
/// img.write_at(&[1; 4096], 0)?; // one cluster of data
/// img.write_zeroes(1 << 20, 1 << 20, false)?; // zeros: not counted
/// let m = measure_disk(&img.open_root(DEFAULT_VDI)?, &MeasureOptions::default())?;
/// assert_eq!(m.required, m.fully_allocated - (1 << 30) + 65536);
/// assert_eq!(m.bitmaps, Some(0));
/// # Ok(()) }
/// ```
pub fn measure_disk(disk: &Disk, opts: &MeasureOptions) -> Result<Measurement> {
    let size = disk.size();
    let bitmaps: Vec<(usize, u64, u64)> = disk
        .image()
        .bitmaps()?
        .iter()
        .map(|b| (b.name.len(), size, b.granularity))
        .collect();
    let bitmaps =
        (opts.format == MeasureFormat::Qcow2).then(|| bitmap_bytes(&bitmaps, opts.cluster_size));
    let mut windows = (0..size.div_ceil(STATUS_WINDOW)).map(|w| {
        let at = w * STATUS_WINDOW;
        disk.block_status(at, STATUS_WINDOW.min(size - at))
    });
    measure_extents(size, opts, bitmaps, Some(&mut windows))
}

/// The measure of the raw file at `path` converted into a new file: what the file
/// system holds as data (`SEEK_DATA`) is counted, holes are not.
///
/// ```
/// use qcowx_core::measure::{measure_raw, MeasureOptions};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.raw");
/// std::fs::write(&path, vec![7u8; 100_000]).unwrap();
/// let m = measure_raw(&path, &MeasureOptions::default())?;
/// assert_eq!(m.required, m.fully_allocated); // two clusters, both data
/// assert_eq!(m.bitmaps, None);
/// # Ok(()) }
/// ```
pub fn measure_raw(path: &Path, opts: &MeasureOptions) -> Result<Measurement> {
    let io = |source| Error::Io {
        file: path.display().to_string(),
        op: "open",
        offset: 0,
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut windows = (0..size.div_ceil(STATUS_WINDOW)).map(|w| {
        let at = w * STATUS_WINDOW;
        Ok(raw_extents(&file, size, at, STATUS_WINDOW.min(size - at)))
    });
    measure_extents(size, opts, None, Some(&mut windows))
}

/// The measure of a disk of `size` bytes whose extents `windows` yields in order
/// (`None`: a new, empty disk).
fn measure_extents(
    size: u64,
    opts: &MeasureOptions,
    bitmaps: Option<u64>,
    windows: Option<&mut dyn Iterator<Item = Result<Vec<Extent>>>>,
) -> Result<Measurement> {
    if opts.format == MeasureFormat::Raw {
        let bytes = size.next_multiple_of(512);
        return Ok(Measurement {
            required: bytes,
            fully_allocated: bytes,
            bitmaps: None,
        });
    }
    let cs = opts.cluster_size;
    let virtual_size = size.next_multiple_of(cs);
    let l2_entry = if opts.extended_l2 { 16 } else { 8 };
    let l1_bytes = (virtual_size / cs).div_ceil(cs / l2_entry) * 8;
    if size > MAX_VIRTUAL_SIZE || l1_bytes > 32 << 20 {
        return Err(Error::InvalidArgument(format!(
            "a disk of {size} bytes is too large for {cs}-byte clusters (try larger clusters)"
        )));
    }
    let fully = fully_allocated_bytes(virtual_size, cs, opts.refcount_bits, opts.extended_l2);
    // Data clusters: every cluster a data extent touches, each once.
    let mut data = 0u64;
    let mut counted_to = 0u64;
    let from_source = windows.is_some();
    for window in windows.into_iter().flatten() {
        for e in window? {
            if e.status != ExtentStatus::Data {
                continue;
            }
            let start = (e.offset - e.offset % cs).max(counted_to);
            let end = (e.offset + e.length).next_multiple_of(cs);
            if end > start {
                data += end - start;
                counted_to = end;
            }
        }
    }
    // A source measured for a file with a backing file: none of it is assumed to be
    // there already.
    let all = (from_source && opts.backing_file)
        || matches!(
            opts.preallocation,
            Preallocation::Falloc | Preallocation::Full
        );
    let required = if all {
        fully
    } else {
        fully - virtual_size + data
    };
    Ok(Measurement {
        required,
        fully_allocated: fully,
        bitmaps,
    })
}
