//! The arguments of the commands that copy or compare whole disks: `compare`,
//! `convert`, `dd` and `bench`, with QEMU's cache mode names.

use std::path::PathBuf;

use clap::Args;

use super::{size_arg, DiskFormat, OutputKind, Qcow2Only};

#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// Format of FILE_A (probed when absent).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub(crate) format_a: Option<DiskFormat>,
    /// Format of FILE_B (probed when absent).
    #[arg(short = 'F', value_enum, value_name = "FMT")]
    pub(crate) format_b: Option<DiskFormat>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    pub(crate) output: OutputKind,
    /// Open the images without locking them, even while another process writes them.
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// Strict mode: images of different sizes, or whose allocation differs (data
    /// against zeros, a zero cluster against an unallocated one), differ.
    #[arg(short = 's', long = "strict")]
    pub(crate) strict: bool,
    /// Show progress, as qemu-img's -p asks (qcowx shows a progress bar on a terminal
    /// whether or not it is given).
    #[arg(short = 'p', long = "progress")]
    pub(crate) progress: bool,
    /// Cache mode for both images (accepted and checked; qcowx reads through the page
    /// cache).
    #[arg(short = 'T', long = "source-cache", value_name = "CACHE", value_parser = cache_arg)]
    pub(crate) source_cache: Option<CacheMode>,
    /// The first image.
    #[arg(value_name = "FILE_A")]
    pub(crate) file_a: PathBuf,
    /// The second image.
    #[arg(value_name = "FILE_B")]
    pub(crate) file_b: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct ConvertArgs {
    /// Store clusters compressed (needs -O qcow2).
    #[arg(short = 'c')]
    pub(crate) compress: bool,
    /// Output format.
    #[arg(short = 'O', value_enum, value_name = "FMT", default_value_t = DiskFormat::Raw)]
    pub(crate) out_format: DiskFormat,
    /// Input format (probed when absent).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub(crate) in_format: Option<DiskFormat>,
    /// Cluster size of a qcow2 output (default: 64 KiB, as qemu-img's, whatever the
    /// input's).
    #[arg(long = "cluster-size", value_name = "SIZE", value_parser = size_arg)]
    pub(crate) cluster_size: Option<u64>,
    /// qemu-img's options for a qcow2 output, comma-separated key=value:
    /// cluster_size, refcount_bits, compression_type, extended_l2, compat=1.1.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub(crate) options: Vec<String>,
    /// Show progress, as qemu-img's -p asks (qcowx shows a progress bar on a terminal
    /// whether or not it is given).
    #[arg(short = 'p')]
    pub(crate) progress: bool,
    /// Read the input without locking it, even while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// Convert this snapshot of a qcow2 input: ID-or-NAME, snapshot.id=ID or
    /// snapshot.name=NAME (qemu-img's forms).
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    pub(crate) snapshot: Option<String>,
    /// Write into the existing OUTPUT (opened as -O says) instead of creating it; it
    /// must be at least the input's size.
    #[arg(short = 'n', long = "no-create")]
    pub(crate) no_create: bool,
    /// With -n: OUTPUT reads as zeros already, so the input's zeros are not written.
    #[arg(long = "target-is-zero", requires = "no_create")]
    pub(crate) target_is_zero: bool,
    /// Runs of zeros at least this long become holes in the output (default 4k; a
    /// multiple of 512 up to 16M); 0 writes every byte (a fully allocated output).
    #[arg(short = 'S', long = "sparse-size", value_name = "SIZE", value_parser = size_arg)]
    pub(crate) sparse_size: Option<u64>,
    /// Output cache mode (none, writeback, writethrough, directsync, unsafe): qcowx
    /// writes through the page cache and syncs the output at the end, except with
    /// unsafe.
    #[arg(short = 't', long = "target-cache", value_name = "CACHE", value_parser = cache_arg)]
    pub(crate) target_cache: Option<CacheMode>,
    /// Input cache mode (accepted and checked; qcowx reads through the page cache).
    #[arg(short = 'T', long = "source-cache", value_name = "CACHE", value_parser = cache_arg)]
    pub(crate) source_cache: Option<CacheMode>,
    /// Write at most this many bytes per second.
    #[arg(short = 'r', long = "rate-limit", value_name = "RATE", value_parser = size_arg)]
    pub(crate) rate_limit: Option<u64>,
    /// qemu-img's parallel requests, 1 to 16 (accepted; qcowx reads 4 MiB at a time
    /// on one thread, up to two reads ahead of the writes on another).
    #[arg(short = 'm', long = "parallel", value_name = "N",
          value_parser = clap::value_parser!(u8).range(1..=16))]
    pub(crate) parallel: Option<u8>,
    /// qemu-img's out-of-order writes (accepted; qcowx writes in order).
    #[arg(short = 'W', long = "oob-writes")]
    pub(crate) oob_writes: bool,
    /// qemu-img's copy offloading (accepted; qcowx copies through its own buffers).
    #[arg(short = 'C', long = "copy-range-offloading", conflicts_with_all = ["compress", "sparse_size", "salvage"])]
    pub(crate) copy_range: bool,
    /// Copy what cannot be read as zeros instead of failing, warning about each
    /// 512-byte sector given up on (unless -q).
    #[arg(long = "salvage")]
    pub(crate) salvage: bool,
    /// Copy INPUT's persistent bitmaps to the qcow2 output.
    #[arg(long = "bitmaps")]
    pub(crate) bitmaps: bool,
    /// With --bitmaps: leave inconsistent bitmaps out instead of failing.
    #[arg(long = "skip-broken-bitmaps", requires = "bitmaps")]
    pub(crate) skip_broken_bitmaps: bool,
    /// Make the qcow2 output an overlay of BACKING (needs -F): only what INPUT's own
    /// layer holds is copied (-b in qemu-img 10.1, -B before).
    #[arg(
        short = 'B',
        long = "backing",
        visible_short_alias = 'b',
        value_name = "BACKING",
        requires = "backing_format"
    )]
    pub(crate) backing: Option<String>,
    /// The format of BACKING.
    #[arg(short = 'F', long = "backing-format", value_enum, value_name = "FMT")]
    pub(crate) backing_format: Option<DiskFormat>,
    /// The input images (a qcow2 image is read with its backing chain); several are
    /// written one after the other, as qemu-img concatenates them.
    #[arg(value_name = "INPUT", required = true, num_args = 1..)]
    pub(crate) inputs: Vec<PathBuf>,
    /// The file to write (overwritten if it exists, unless -n).
    #[arg(value_name = "OUTPUT", required = true)]
    pub(crate) dest: PathBuf,
}

/// A QEMU cache mode (`-t`, `-T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheMode {
    /// `none` (or `off`): O_DIRECT in QEMU.
    None,
    Writeback,
    Writethrough,
    Directsync,
    /// No flush at all.
    Unsafe,
}

/// Parses a cache mode as QEMU names them.
pub(crate) fn cache_arg(s: &str) -> Result<CacheMode, String> {
    Ok(match s {
        "none" | "off" => CacheMode::None,
        "writeback" => CacheMode::Writeback,
        "writethrough" => CacheMode::Writethrough,
        "directsync" => CacheMode::Directsync,
        "unsafe" => CacheMode::Unsafe,
        _ => {
            return Err(format!(
            "invalid cache option {s:?}: one of none, writeback, writethrough, directsync, unsafe"
        ))
        }
    })
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) image_format: Qcow2Only,
    /// Requests to send.
    #[arg(
        short = 'c',
        long = "count",
        value_name = "COUNT",
        default_value_t = 75000
    )]
    pub(crate) count: u64,
    /// Requests in flight at once.
    #[arg(short = 'd', long = "depth", value_name = "DEPTH", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub(crate) depth: u64,
    /// The first request's offset.
    #[arg(short = 'o', long = "offset", value_name = "OFFSET", value_parser = size_arg, default_value = "0")]
    pub(crate) offset: u64,
    /// Bytes per request.
    #[arg(short = 's', long = "buffer-size", value_name = "SIZE", value_parser = size_arg, default_value = "4096")]
    pub(crate) buffer_size: u64,
    /// From one request's offset to the next (default: the buffer size).
    #[arg(short = 'S', long = "step-size", value_name = "STEP", value_parser = size_arg)]
    pub(crate) step: Option<u64>,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    pub(crate) write: bool,
    /// The byte written (with -w).
    #[arg(
        long = "pattern",
        value_name = "BYTE",
        requires = "write",
        default_value_t = 0
    )]
    pub(crate) pattern: u8,
    /// Flush after every this many requests (with -w; at least DEPTH).
    #[arg(long = "flush-interval", value_name = "N", requires = "write")]
    pub(crate) flush_interval: Option<u64>,
    /// qemu-img's --no-drain (accepted: qcowx's flushes never drain the queue).
    #[arg(long = "no-drain", requires = "flush_interval")]
    pub(crate) no_drain: bool,
    /// Cache mode (accepted and checked; qcowx goes through the page cache).
    #[arg(short = 't', long = "cache", value_name = "CACHE", value_parser = cache_arg)]
    pub(crate) cache: Option<CacheMode>,
    /// AIO mode (threads, native, io_uring: accepted; qcowx uses threads).
    #[arg(short = 'i', long = "aio", value_name = "AIO", value_parser = ["threads", "native", "io_uring"])]
    pub(crate) aio: Option<String>,
    /// The same as -i native (accepted).
    #[arg(short = 'n', long = "native")]
    pub(crate) native: bool,
    /// Open the image without locking it (reads only).
    #[arg(short = 'U', long = "force-share", conflicts_with = "write")]
    pub(crate) force_share: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct DdArgs {
    /// Input format (probed when absent).
    #[arg(short = 'f', long = "format", value_enum, value_name = "FMT")]
    pub(crate) in_format: Option<DiskFormat>,
    /// Output format.
    #[arg(short = 'O', long = "output-format", value_enum, value_name = "FMT", default_value_t = DiskFormat::Raw)]
    pub(crate) out_format: DiskFormat,
    /// Read the input without locking it, even while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// dd's operands: if=INPUT of=OUTPUT [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS].
    /// bs defaults to 512; the output (replaced if it exists) holds the input from
    /// skip×bs to count×bs (or its end), every byte written.
    #[arg(value_name = "OPERAND", required = true)]
    pub(crate) operands: Vec<String>,
}
