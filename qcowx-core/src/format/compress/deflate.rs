//! Deflate: raw streams (no zlib header), as QEMU writes them.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::*;

pub(super) fn inflate_cluster(input: &[u8], out: &mut [u8]) -> Result<(), CompressError> {
    let expected = out.len();
    // Raw deflate, no zlib header. A single call with `Finish` decodes
    // straight into `out`, like QEMU's single `inflate(&strm, Z_FINISH)`.
    let mut inflater = Decompress::new(false);
    let result = inflater.decompress(input, out, FlushDecompress::Finish);
    let produced = counter(inflater.total_out()).min(expected);
    match result {
        Err(e) => Err(CompressError::DeflateCorrupt {
            produced,
            expected,
            detail: e.to_string(),
        }),
        Ok(_) if produced == expected => Ok(()),
        Ok(Status::StreamEnd) => Err(CompressError::DeflateEndedEarly { produced, expected }),
        Ok(_) => Err(CompressError::DeflateTruncated { produced, expected }),
    }
}

pub(super) fn deflate_cluster(input: &[u8]) -> Result<Option<Vec<u8>>, CompressError> {
    // QEMU: qcow2_co_compress(bs, out_buf, s->cluster_size - 1, ...), and
    // -ENOMEM (does not fit) means "write the cluster uncompressed".
    let mut out = vec![0u8; input.len() - 1];
    let mut written = 0usize;
    let mut deflater = Compress::new(Compression::default(), false);
    let mut chunks = input.chunks(DEFLATE_WINDOW).peekable();
    while let Some(chunk) = chunks.next() {
        // A full flush empties the compressor's dictionary, so no match in
        // the next chunk can refer back more than DEFLATE_WINDOW bytes.
        let flush = if chunks.peek().is_some() {
            FlushCompress::Full
        } else {
            FlushCompress::Finish
        };
        if !deflate_step(&mut deflater, chunk, &mut out, &mut written, flush)? {
            return Ok(None);
        }
    }
    out.truncate(written);
    Ok(Some(out))
}

/// Feeds `data` to the compressor with `flush`, appending to `out[*written..]`.
/// Returns `Ok(false)` when `out` fills up before the flush completes.
pub(super) fn deflate_step(
    deflater: &mut Compress,
    mut data: &[u8],
    out: &mut [u8],
    written: &mut usize,
    flush: FlushCompress,
) -> Result<bool, CompressError> {
    let failed = |detail: String| CompressError::Compressor {
        kind: CompressionType::Deflate,
        detail,
    };
    loop {
        let Some(room) = out.get_mut(*written..) else {
            return Err(failed("output position out of range".into()));
        };
        let (in_before, out_before) = (deflater.total_in(), deflater.total_out());
        let status = deflater
            .compress(data, room, flush)
            .map_err(|e| failed(e.to_string()))?;
        let consumed = counter(deflater.total_in().saturating_sub(in_before));
        let produced = counter(deflater.total_out().saturating_sub(out_before));
        data = data.get(consumed..).unwrap_or_default();
        *written = written.saturating_add(produced).min(out.len());
        if flush == FlushCompress::Finish {
            if status == Status::StreamEnd {
                return Ok(true);
            }
        } else if data.is_empty() && *written < out.len() {
            // Everything consumed and the flush fit with room to spare.
            return Ok(true);
        }
        if *written == out.len() {
            return Ok(false);
        }
        if consumed == 0 && produced == 0 {
            return Err(failed(format!("no progress ({status:?})")));
        }
    }
}
