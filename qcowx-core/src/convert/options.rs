//! How a conversion writes: [`ConvertOptions`], qemu-img's `-o` options for it, and
//! the check that refuses options which contradict each other.

use crate::engine::CreateOptions;
use crate::error::{Error, Result};
use crate::format::compress::CompressionType;

use crate::engine::backing::ImageFormat;

/// How [`convert`](super::convert) writes its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOptions {
    /// The output format.
    pub format: ImageFormat,
    /// Store clusters compressed (qcow2 outputs only), as `qemu-img convert -c` does:
    /// each cluster that holds non-zero data is compressed with the image's
    /// compression type and stored compressed when that makes it smaller.
    pub compress: bool,
    /// Cluster size of a qcow2 output (default: [`CreateOptions::new`]'s, 64 KiB, as
    /// qemu-img's whatever the source's).
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
    /// Sync the output to the disk before returning (default): one fdatasync at the
    /// end (a new qcow2 output defers the ones of its commit points to it). `false`
    /// is `qemu-img convert -t unsafe`: the output is left to the kernel to write
    /// back (an existing qcow2 output, `-n`, is still synced by its close).
    pub sync: bool,
    /// At most this many bytes written per second on average (`-r`).
    pub rate_limit: Option<u64>,
    /// Copy what cannot be read as zeros instead of failing (`--salvage`): a read that
    /// fails is done again sector by sector, and each 512-byte sector that still fails
    /// reads as zeros; a range whose block status cannot be read is read as data.
    /// [`convert_reporting`](super::convert_reporting) tells each part given up on.
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
    /// assert_eq!(opts.cluster_size, None); // 64 KiB, as qemu-img's
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

/// Refuses options that contradict each other, before anything is opened.
pub(super) fn check_options(opts: &ConvertOptions, out_name: &str) -> Result<()> {
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
