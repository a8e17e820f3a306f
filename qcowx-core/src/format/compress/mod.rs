//! Compressed clusters: deflate (raw, as QEMU writes it) and zstd.
//!
//! A QCOW2 image names one compression method for all of its compressed
//! clusters in the header field `compression_type`: 0 is deflate (QEMU calls
//! it "zlib", but the data is a *raw* deflate stream with no zlib header or
//! checksum) and 1 is zstd.
//!
//! A compressed cluster's L2 descriptor only gives the compressed size rounded
//! up to whole 512-byte sectors, so the bytes handed to
//! [`decompress_cluster`] normally carry unrelated trailing bytes after the
//! end of the compressed stream. Decompression therefore stops as soon as one
//! full cluster has been produced, exactly like QEMU does.
//!
//! Everything here treats its input as hostile: no input makes these
//! functions panic, write outside the caller's buffer, or allocate more than
//! a bounded amount besides it: about 50 KiB of inflate state for deflate;
//! for zstd the decoder tables plus a history buffer of at most the cluster
//! size and one 128 KiB block, whatever window size a frame header claims.

use std::fmt;

use thiserror::Error;

/// Smallest cluster size QCOW2 allows (`cluster_bits` = 9).
pub const MIN_CLUSTER_SIZE: usize = 512;

/// Largest cluster size QCOW2 allows (`cluster_bits` = 21).
pub const MAX_CLUSTER_SIZE: usize = 2 * 1024 * 1024;

/// Deflate history QEMU uses: it compresses and decompresses with
/// `windowBits = -12`, a 4 KiB window.
const DEFLATE_WINDOW: usize = 4096;

/// Magic number that starts every zstd frame (little-endian on disk).
const ZSTD_MAGIC: u32 = 0xFD2F_B528;

/// Skippable zstd frames use the magic numbers `0x184D2A50..=0x184D2A5F`.
const ZSTD_SKIPPABLE_MASK: u32 = 0xFFFF_FFF0;
const ZSTD_SKIPPABLE_MAGIC: u32 = 0x184D_2A50;

/// Largest window a zstd frame may ask for. libzstd, and so QEMU, refuses
/// frames that need more than `1 << ZSTD_WINDOWLOG_LIMIT_DEFAULT` (2^27)
/// bytes unless told otherwise.
const ZSTD_MAX_WINDOW: u64 = 1 << 27;

/// Longest zstd frame header: magic (4), descriptor (1), window (1),
/// dictionary id (4), content size (8).
const ZSTD_MAX_HEADER: usize = 18;

/// The compression method of an image, from the header field
/// `compression_type`.
///
/// ```
/// use qcowx_core::CompressionType;
///
/// assert_eq!(CompressionType::from_header(1), Some(CompressionType::Zstd));
/// assert_eq!(CompressionType::from_header(7), None);
/// assert_eq!(CompressionType::Deflate.to_header(), 0);
/// assert_eq!(CompressionType::Zstd.to_string(), "zstd");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951) with a 4 KiB window; header value 0 ("zlib").
    Deflate,
    /// Zstandard (RFC 8878) frames; header value 1.
    Zstd,
}

impl CompressionType {
    /// Maps the header field `compression_type` to a method, or `None` for a
    /// value QCOW2 does not define.
    #[must_use]
    pub fn from_header(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Deflate),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }

    /// The value stored in the header field `compression_type` for this method.
    #[must_use]
    pub fn to_header(self) -> u8 {
        match self {
            Self::Deflate => 0,
            Self::Zstd => 1,
        }
    }
}

impl fmt::Display for CompressionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Deflate => "deflate",
            Self::Zstd => "zstd",
        })
    }
}

/// Why a cluster could not be compressed or decompressed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CompressError {
    /// The cluster buffer is not a power of two between
    /// [`MIN_CLUSTER_SIZE`] and [`MAX_CLUSTER_SIZE`] bytes.
    #[error("invalid cluster size {size}: must be a power of two from 512 to 2097152 bytes")]
    InvalidClusterSize {
        /// The length that was passed.
        size: usize,
    },

    /// The deflate stream reached its final block before filling the cluster.
    #[error("deflate stream ended after {produced} of {expected} bytes")]
    DeflateEndedEarly {
        /// Bytes the stream produced.
        produced: usize,
        /// Bytes in one cluster.
        expected: usize,
    },

    /// The compressed bytes ran out in the middle of the deflate stream.
    #[error("deflate data truncated: input ended after {produced} of {expected} bytes")]
    DeflateTruncated {
        /// Bytes produced before the input ran out.
        produced: usize,
        /// Bytes in one cluster.
        expected: usize,
    },

    /// The deflate stream is malformed.
    #[error("deflate data corrupt after {produced} of {expected} bytes: {detail}")]
    DeflateCorrupt {
        /// Bytes produced before the bad data.
        produced: usize,
        /// Bytes in one cluster.
        expected: usize,
        /// What the inflater reported.
        detail: String,
    },

    /// The zstd data is malformed or does not describe exactly one cluster.
    #[error("zstd: {problem} (after {produced} of {expected} bytes)")]
    Zstd {
        /// Bytes produced before the problem was found.
        produced: usize,
        /// Bytes in one cluster.
        expected: usize,
        /// What was wrong.
        problem: ZstdProblem,
    },

    /// The compressor failed internally, or its output did not decompress to
    /// the original data. Callers may store the cluster uncompressed instead.
    #[error("{kind} compressor failed: {detail}")]
    Compressor {
        /// Which method failed.
        kind: CompressionType,
        /// What went wrong.
        detail: String,
    },
}

/// The specific defect found in zstd data; carried by [`CompressError::Zstd`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ZstdProblem {
    /// The compressed bytes ended before the cluster was complete.
    #[error("input ended before the cluster was complete")]
    InputEnded,
    /// The next frame does not start with the zstd magic number.
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    /// A skippable frame claims more bytes than the input holds.
    #[error("skippable frame of {0} bytes runs past the end of the input")]
    SkippableFrameTruncated(u32),
    /// The frame header has its reserved bit set.
    #[error("frame header reserved bit is set")]
    ReservedBit,
    /// The frame needs a dictionary; QCOW2 has no way to supply one.
    #[error("frame needs dictionary {0:#x}")]
    DictionaryRequired(u32),
    /// The frame asks for a larger window than libzstd accepts by default.
    #[error("frame window of {0} bytes exceeds the 128 MiB limit")]
    WindowTooLarge(u64),
    /// The frame header declares more content than the cluster has room for.
    #[error("frame declares {declared} bytes but only {room} bytes of the cluster remain")]
    ContentSizeTooLarge {
        /// The frame's declared content size.
        declared: u64,
        /// Bytes left in the cluster.
        room: usize,
    },
    /// The frame decodes to more data than the cluster has room for.
    #[error("frame decodes to more than the {room} bytes left in the cluster")]
    FrameTooLong {
        /// Bytes that were left in the cluster when the frame started.
        room: usize,
    },
    /// The frame decoded to a different length than its header declared.
    #[error("frame declares {declared} bytes but decoded to {actual}")]
    ContentSizeMismatch {
        /// The frame's declared content size.
        declared: u64,
        /// Bytes the frame actually produced.
        actual: u64,
    },
    /// The frame's content checksum does not match the decoded data.
    #[error("content checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// Checksum stored at the end of the frame.
        stored: u32,
        /// Low 32 bits of the XXH64 of the decoded data.
        computed: u32,
    },
    /// The frame is malformed; the text is the decoder's report.
    #[error("corrupt frame: {0}")]
    Corrupt(String),
}

/// Decompresses one cluster the way QEMU does.
///
/// `out` must be exactly one cluster (a power of two from 512 bytes to
/// 2 MiB); on success every byte of it has been written. `input` is the
/// compressed data as located by the cluster's L2 descriptor; bytes after the
/// end of the compressed stream are ignored.
///
/// * [`CompressionType::Deflate`]: `input` is a raw deflate stream. It must
///   fill `out`; a stream that ends early, runs out of input, or is malformed
///   is an error. A stream that would go on past the end of `out` is accepted
///   and cut at the cluster boundary, as QEMU's `qcow2_zlib_decompress`
///   accepts `Z_BUF_ERROR` once the output buffer is full.
/// * [`CompressionType::Zstd`]: `input` holds one or more zstd frames
///   (skippable frames are skipped) that together produce exactly `out.len()`
///   bytes; decoding stops once `out` is full, and anything after the last
///   frame is ignored. A frame that would produce more than fits is an error,
///   as it is in QEMU's `qcow2_zstd_decompress`. Declared content sizes and
///   content checksums are verified.
///
/// On error the contents of `out` are unspecified.
///
/// # Errors
///
/// [`CompressError::InvalidClusterSize`] if `out` has an invalid length;
/// otherwise a `Deflate*` variant or [`CompressError::Zstd`] describing what
/// was wrong with the data and how many bytes had been produced.
///
/// ```
/// use qcowx_core::format::compress::{compress_cluster, decompress_cluster, CompressionType};
///
/// let cluster = vec![0x42u8; 65536];
/// for kind in [CompressionType::Deflate, CompressionType::Zstd] {
///     let packed = compress_cluster(kind, &cluster).unwrap().expect("smaller");
///     assert!(packed.len() < 1024);
///     let mut out = vec![0u8; 65536];
///     decompress_cluster(kind, &packed, &mut out).unwrap();
///     assert_eq!(out, cluster);
/// }
/// // A cut-short zstd frame is an error, not a panic.
/// let packed = compress_cluster(CompressionType::Zstd, &cluster).unwrap().unwrap();
/// let mut out = vec![0u8; 65536];
/// assert!(decompress_cluster(CompressionType::Zstd, &packed[..packed.len() / 2], &mut out).is_err());
/// ```
pub fn decompress_cluster(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), CompressError> {
    check_cluster_size(out.len())?;
    match kind {
        CompressionType::Deflate => inflate_cluster(input, out),
        CompressionType::Zstd => zstd_decompress_cluster(input, out),
    }
}

/// Compresses one cluster the way QEMU does.
///
/// Returns `Ok(None)` when the compressed form would not be smaller than the
/// cluster (QEMU hands its compressor a buffer of `cluster_size - 1` bytes and
/// writes the cluster uncompressed when that is not enough), otherwise the
/// compressed bytes, which are at most `input.len() - 1` long. Callers that
/// want a larger saving before storing a cluster compressed can compare the
/// returned length themselves.
///
/// * [`CompressionType::Deflate`]: a raw deflate stream at the default level
///   (6) whose back-references never reach further than 4 KiB, so that it is
///   valid for QEMU's `windowBits = -12` (the stream is fully flushed every
///   4 KiB of input, which restarts match finding).
/// * [`CompressionType::Zstd`]: a single zstd frame with a content checksum,
///   from the pure-Rust encoder at its fastest level. The frame is decoded
///   again and compared with `input` before it is returned.
///
/// # Errors
///
/// [`CompressError::InvalidClusterSize`] if `input` is not one cluster long;
/// [`CompressError::Compressor`] if the compressor fails or its output does
/// not decode back to `input` (the cluster can then be stored uncompressed).
///
/// ```
/// use qcowx_core::format::compress::{compress_cluster, CompressionType};
///
/// // Data that does not shrink is not worth storing compressed.
/// let mut x = 0x9e37_79b9_7f4a_7c15u64;
/// let noise: Vec<u8> = (0..65536)
///     .map(|_| {
///         x ^= x << 13;
///         x ^= x >> 7;
///         x ^= x << 17;
///         x as u8
///     })
///     .collect();
/// assert_eq!(compress_cluster(CompressionType::Zstd, &noise).unwrap(), None);
/// assert!(compress_cluster(CompressionType::Deflate, &[0u8; 100]).is_err(), "not a cluster size");
/// ```
pub fn compress_cluster(
    kind: CompressionType,
    input: &[u8],
) -> Result<Option<Vec<u8>>, CompressError> {
    check_cluster_size(input.len())?;
    match kind {
        CompressionType::Deflate => deflate_cluster(input),
        CompressionType::Zstd => zstd_compress_cluster(input),
    }
}

/// Compresses `input` (any length) into one zstd frame as [`compress_cluster`] does
/// for zstd: `None` when the frame would not be smaller. For send/receive streams.
///
/// ```
/// use qcowx_core::format::compress::{compress_zstd, decompress_zstd};
///
/// let data = b"abc".repeat(1000);
/// let frame = compress_zstd(&data).expect("repetitive data shrinks");
/// let mut out = vec![0u8; data.len()];
/// decompress_zstd(&frame, &mut out).unwrap();
/// assert_eq!(out, data);
/// ```
pub fn compress_zstd(input: &[u8]) -> Option<Vec<u8>> {
    zstd_compress_cluster(input).ok().flatten()
}

/// Decodes zstd frames into exactly `out.len()` bytes, with the checks of
/// [`decompress_cluster`] (window cap, content size and checksum) but any length.
///
/// ```
/// use qcowx_core::format::compress::{compress_zstd, decompress_zstd};
///
/// let frame = compress_zstd(&[7u8; 4096]).unwrap();
/// let mut small = vec![0u8; 100];
/// assert!(decompress_zstd(&frame, &mut small).is_err(), "more data than fits");
/// ```
pub fn decompress_zstd(input: &[u8], out: &mut [u8]) -> Result<(), CompressError> {
    zstd_decompress_cluster(input, out)
}

fn check_cluster_size(size: usize) -> Result<(), CompressError> {
    if size.is_power_of_two() && (MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(CompressError::InvalidClusterSize { size })
    }
}

/// Converts a byte counter from flate2 or ruzstd into a `usize`, saturating
/// (the counters never exceed the buffer lengths, so this never saturates in
/// practice).
fn counter(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

pub use estimate::likely_compressible;
mod deflate;
mod estimate;
#[cfg(test)]
mod tests;
mod zstd;

use deflate::{deflate_cluster, inflate_cluster};
use zstd::{zstd_compress_cluster, zstd_decompress_cluster};
