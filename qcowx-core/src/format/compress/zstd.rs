//! Zstd: frames checked before decoding, so a hostile frame cannot make the decoder
//! allocate past one cluster.

use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use ruzstd::encoding::CompressionLevel;
use std::fmt;
use std::io::Read;

use super::*;

pub(super) fn zstd_compress_cluster(input: &[u8]) -> Result<Option<Vec<u8>>, CompressError> {
    let compressed = ruzstd::encoding::compress_to_vec(input, CompressionLevel::Fastest);
    if compressed.len() >= input.len() {
        return Ok(None);
    }
    // The encoder is young; never hand out a frame that does not decode back
    // to the cluster.
    let mut check = vec![0u8; input.len()];
    match zstd_decompress_cluster(&compressed, &mut check) {
        Ok(()) if check == input => Ok(Some(compressed)),
        Ok(()) => Err(CompressError::Compressor {
            kind: CompressionType::Zstd,
            detail: "frame decodes to different data".into(),
        }),
        Err(e) => Err(CompressError::Compressor {
            kind: CompressionType::Zstd,
            detail: format!("frame does not decode: {e}"),
        }),
    }
}

/// The parts of a zstd frame header this module checks itself.
pub(super) struct ZstdFrameHeader {
    /// Header length in bytes, magic included.
    len: usize,
    /// Declared window size; `None` for single-segment frames, whose window
    /// is their content size.
    window: Option<u64>,
    /// Declared content size, if present.
    content_size: Option<u64>,
    /// Whether a 4-byte content checksum follows the last block.
    checksum: bool,
}

/// Offset of the window descriptor byte in a frame header.
pub(super) const ZSTD_WINDOW_BYTE: usize = 5;

pub(super) fn parse_zstd_header(src: &[u8]) -> Result<ZstdFrameHeader, ZstdProblem> {
    let descriptor = *src.get(4).ok_or(ZstdProblem::InputEnded)?;
    let content_size_flag = descriptor >> 6;
    let single_segment = descriptor & 0x20 != 0;
    if descriptor & 0x08 != 0 {
        return Err(ZstdProblem::ReservedBit);
    }
    let checksum = descriptor & 0x04 != 0;
    let dict_id_len = [0usize, 1, 2, 4][usize::from(descriptor & 0x03)];
    let mut pos = 5;

    let window = if single_segment {
        None
    } else {
        let byte = *src.get(ZSTD_WINDOW_BYTE).ok_or(ZstdProblem::InputEnded)?;
        pos += 1;
        let base = 1u64 << (10 + u32::from(byte >> 3));
        let size = base + (base / 8) * u64::from(byte & 0x07);
        if size > ZSTD_MAX_WINDOW {
            return Err(ZstdProblem::WindowTooLarge(size));
        }
        Some(size)
    };

    let dict_id = read_le(src, pos, dict_id_len)?;
    pos += dict_id_len;
    if dict_id != 0 {
        // At most four bytes were read, so this fits.
        return Err(ZstdProblem::DictionaryRequired(
            u32::try_from(dict_id).unwrap_or(u32::MAX),
        ));
    }

    let content_size_len = match content_size_flag {
        0 if single_segment => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let content_size = if content_size_len == 0 {
        None
    } else {
        let raw = read_le(src, pos, content_size_len)?;
        pos += content_size_len;
        // The two-byte form is stored minus 256.
        Some(if content_size_len == 2 {
            raw + 256
        } else {
            raw
        })
    };

    Ok(ZstdFrameHeader {
        len: pos,
        window,
        content_size,
        checksum,
    })
}

/// Reads a little-endian integer of `len` (at most 8) bytes at `pos`.
pub(super) fn read_le(src: &[u8], pos: usize, len: usize) -> Result<u64, ZstdProblem> {
    let bytes = src
        .get(pos..pos.saturating_add(len))
        .ok_or(ZstdProblem::InputEnded)?;
    Ok(bytes
        .iter()
        .rev()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

/// Smallest power-of-two window (at least the 1 KiB zstd minimum) that holds
/// `room` bytes, as a window descriptor byte and a size.
pub(super) fn zstd_window_for(room: usize) -> (u8, u64) {
    let size = room.max(1024).next_power_of_two();
    let log = size.trailing_zeros();
    // room <= MAX_CLUSTER_SIZE, so log is between 10 and 21.
    let exponent = u8::try_from(log.saturating_sub(10)).unwrap_or(0);
    (exponent << 3, 1u64 << (10 + u32::from(exponent)))
}

pub(super) fn zstd_decompress_cluster(input: &[u8], out: &mut [u8]) -> Result<(), CompressError> {
    let expected = out.len();
    let mut produced = 0usize;
    let mut src = input;
    let mut decoder = FrameDecoder::new();
    while produced < expected {
        let fail = |problem: ZstdProblem, produced: usize| CompressError::Zstd {
            produced,
            expected,
            problem,
        };
        let magic = match src.get(..4) {
            Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]),
            _ => return Err(fail(ZstdProblem::InputEnded, produced)),
        };
        if magic & ZSTD_SKIPPABLE_MASK == ZSTD_SKIPPABLE_MAGIC {
            let length = match src.get(4..8) {
                Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]),
                _ => return Err(fail(ZstdProblem::InputEnded, produced)),
            };
            let end = usize::try_from(length)
                .ok()
                .and_then(|l| l.checked_add(8))
                .filter(|&end| end <= src.len())
                .ok_or_else(|| fail(ZstdProblem::SkippableFrameTruncated(length), produced))?;
            src = src.get(end..).unwrap_or_default();
            continue;
        }
        if magic != ZSTD_MAGIC {
            return Err(fail(ZstdProblem::BadMagic(magic), produced));
        }
        let frame_out = out.get_mut(produced..).unwrap_or_default();
        let n = zstd_frame(&mut decoder, &mut src, frame_out)
            .map_err(|(problem, n)| fail(problem, produced + n))?;
        produced += n;
    }
    Ok(())
}

/// Decodes the frame at the start of `src` into `out`, advancing `src` past
/// it. Returns the number of bytes produced, or the problem and the number of
/// bytes produced before it.
pub(super) fn zstd_frame(
    decoder: &mut FrameDecoder,
    src: &mut &[u8],
    out: &mut [u8],
) -> Result<usize, (ZstdProblem, usize)> {
    let room = out.len();
    let header = parse_zstd_header(src).map_err(|p| (p, 0))?;
    if let Some(declared) = header.content_size {
        if declared > room as u64 {
            return Err((ZstdProblem::ContentSizeTooLarge { declared, room }, 0));
        }
    }

    // ruzstd reserves the declared window up front. Output beyond `room`
    // bytes is an error anyway, so no back-reference can legitimately reach
    // further than that: cap the window by rewriting the descriptor in a
    // private copy of the header.
    let mut header_bytes = [0u8; ZSTD_MAX_HEADER];
    let original = src.get(..header.len).ok_or((ZstdProblem::InputEnded, 0))?;
    let copy = header_bytes
        .get_mut(..header.len)
        .ok_or((ZstdProblem::InputEnded, 0))?;
    copy.copy_from_slice(original);
    if let Some(window) = header.window {
        let (descriptor, capped) = zstd_window_for(room);
        if window > capped {
            copy[ZSTD_WINDOW_BYTE] = descriptor;
        }
    }
    let corrupt = |e: &dyn fmt::Display| ZstdProblem::Corrupt(e.to_string());
    decoder.reset(&copy[..]).map_err(|e| (corrupt(&e), 0))?;
    *src = src.get(header.len..).unwrap_or_default();

    let mut produced = 0usize;
    loop {
        if !decoder.is_finished() {
            // One block (at most 128 KiB of output) at a time keeps the
            // decoder's buffer within window + one block.
            decoder
                .decode_blocks(&mut *src, BlockDecodingStrategy::UptoBlocks(1))
                .map_err(|e| (corrupt(&e), produced))?;
        }
        let finished = decoder.is_finished();
        // While unfinished, `read` hands out only what lies beyond the
        // window; once finished it drains everything.
        loop {
            let target = out.get_mut(produced..).unwrap_or_default();
            if target.is_empty() {
                break;
            }
            let n = decoder.read(target).map_err(|e| (corrupt(&e), produced))?;
            if n == 0 {
                break;
            }
            produced = produced.saturating_add(n).min(room);
        }
        if decoder.can_collect() > 0 {
            return Err((ZstdProblem::FrameTooLong { room }, produced));
        }
        if finished {
            break;
        }
    }

    if header.checksum {
        if let (Some(stored), Some(computed)) = (
            decoder.get_checksum_from_data(),
            decoder.get_calculated_checksum(),
        ) {
            if stored != computed {
                return Err((ZstdProblem::ChecksumMismatch { stored, computed }, produced));
            }
        }
    }
    if let Some(declared) = header.content_size {
        if declared != produced as u64 {
            return Err((
                ZstdProblem::ContentSizeMismatch {
                    declared,
                    actual: produced as u64,
                },
                produced,
            ));
        }
    }
    Ok(produced)
}
