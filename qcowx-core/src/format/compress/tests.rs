use super::*;
use ruzstd::encoding::CompressionLevel;

const SIZES: [usize; 4] = [512, 4096, 65536, MAX_CLUSTER_SIZE];
const KINDS: [CompressionType; 2] = [CompressionType::Deflate, CompressionType::Zstd];

/// SplitMix64: a small deterministic generator for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Text-like data with repeats near and far, some zero runs.
fn compressible(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut data = Vec::with_capacity(len);
    let mut line = 0u64;
    while data.len() < len {
        match rng.below(4) {
            0 => data.extend(std::iter::repeat_n(0u8, rng.below(300))),
            1 if data.len() > 5000 => {
                // Copy from far back (beyond the 4 KiB deflate window).
                let start = rng.below(data.len() - 4096);
                let n = rng.below(200) + 20;
                let chunk: Vec<u8> = data[start..(start + n).min(data.len())].to_vec();
                data.extend(chunk);
            }
            _ => {
                line += 1;
                data.extend(format!("qcowx line {line}: value={}\n", rng.below(1000)).bytes());
            }
        }
    }
    data.truncate(len);
    data
}

fn round_trip(kind: CompressionType, data: &[u8]) -> Vec<u8> {
    let compressed = compress_cluster(kind, data)
        .expect("compress")
        .unwrap_or_else(|| panic!("{kind} did not compress {} bytes", data.len()));
    assert!(compressed.len() < data.len());
    let mut out = vec![0xAAu8; data.len()];
    decompress_cluster(kind, &compressed, &mut out).expect("decompress");
    assert!(out == data, "{kind} round trip differs at {}", data.len());
    compressed
}

#[test]
fn header_values() {
    assert_eq!(
        CompressionType::from_header(0),
        Some(CompressionType::Deflate)
    );
    assert_eq!(CompressionType::from_header(1), Some(CompressionType::Zstd));
    for v in 2..=255u8 {
        assert_eq!(CompressionType::from_header(v), None);
    }
    for kind in KINDS {
        assert_eq!(CompressionType::from_header(kind.to_header()), Some(kind));
    }
    assert_eq!(CompressionType::Deflate.to_string(), "deflate");
    assert_eq!(CompressionType::Zstd.to_string(), "zstd");
}

#[test]
fn round_trip_compressible_all_sizes() {
    for kind in KINDS {
        for size in SIZES {
            round_trip(kind, &compressible(size, size as u64));
            round_trip(kind, &vec![0u8; size]);
            round_trip(kind, &vec![0x5Au8; size]);
        }
    }
}

#[test]
fn incompressible_is_stored_uncompressed() {
    for kind in KINDS {
        for size in SIZES {
            let data = Rng(size as u64 + 7).bytes(size);
            assert_eq!(compress_cluster(kind, &data), Ok(None), "{kind} {size}");
        }
    }
}

#[test]
fn half_random_half_zero_compresses() {
    for size in SIZES {
        let mut data = Rng(99).bytes(size / 2);
        data.resize(size, 0);
        round_trip(CompressionType::Deflate, &data);
        // ruzstd's fastest matcher can miss the zero run when random
        // data fills its hash table first; it must still be correct.
        if let Some(z) = compress_cluster(CompressionType::Zstd, &data).unwrap() {
            let mut out = vec![0u8; size];
            decompress_cluster(CompressionType::Zstd, &z, &mut out).unwrap();
            assert!(out == data);
        }
    }
}

#[test]
fn trailing_garbage_is_ignored() {
    for kind in KINDS {
        for size in SIZES {
            let data = compressible(size, 3);
            let mut stream = compress_cluster(kind, &data).unwrap().unwrap();
            // Round up to the next sector and beyond, like an L2
            // descriptor's sector count does, with hostile filler.
            let mut rng = Rng(size as u64);
            let pad = 512 - stream.len() % 512 + 512;
            stream.extend(rng.bytes(pad));
            let mut out = vec![0u8; size];
            decompress_cluster(kind, &stream, &mut out).unwrap();
            assert!(out == data);
            for filler in [0x00u8, 0xFF] {
                let mut s = stream.clone();
                s.truncate(s.len() - pad);
                s.extend(std::iter::repeat_n(filler, 1000));
                decompress_cluster(kind, &s, &mut out).unwrap();
                assert!(out == data);
            }
        }
    }
}

#[test]
fn truncated_input_is_an_error() {
    for kind in KINDS {
        let data = compressible(65536, 11);
        let stream = compress_cluster(kind, &data).unwrap().unwrap();
        let mut out = vec![0u8; data.len()];
        for cut in 0..stream.len() {
            match (kind, decompress_cluster(kind, &stream[..cut], &mut out)) {
                // The last bytes of a deflate stream may hold only the
                // end-of-block code, which QEMU does not need either
                // once the cluster is full.
                (CompressionType::Deflate, Ok(())) if cut + 2 >= stream.len() => {
                    assert!(out == data);
                }
                (CompressionType::Deflate, Err(CompressError::DeflateTruncated { .. }))
                | (CompressionType::Deflate, Err(CompressError::DeflateCorrupt { .. }))
                | (CompressionType::Zstd, Err(CompressError::Zstd { .. })) => {}
                (_, other) => panic!("{kind} cut {cut}: unexpected {other:?}"),
            }
        }
    }
}

#[test]
fn deflate_short_stream_names_the_count() {
    let data = compressible(4096, 5);
    let stream = compress_cluster(CompressionType::Deflate, &data)
        .unwrap()
        .unwrap();
    let mut out = vec![0u8; 65536];
    let err = decompress_cluster(CompressionType::Deflate, &stream, &mut out).unwrap_err();
    assert_eq!(
        err,
        CompressError::DeflateEndedEarly {
            produced: 4096,
            expected: 65536
        }
    );
    assert_eq!(
        err.to_string(),
        "deflate stream ended after 4096 of 65536 bytes"
    );
}

#[test]
fn deflate_longer_stream_is_cut_at_cluster_end() {
    // QEMU accepts Z_BUF_ERROR once the output is full.
    let data = compressible(65536, 6);
    let stream = compress_cluster(CompressionType::Deflate, &data)
        .unwrap()
        .unwrap();
    let mut out = vec![0u8; 4096];
    decompress_cluster(CompressionType::Deflate, &stream, &mut out).unwrap();
    assert_eq!(out, data[..4096]);
}

#[test]
fn zstd_short_and_long_frames_are_errors() {
    let data = compressible(65536, 8);
    let stream = compress_cluster(CompressionType::Zstd, &data)
        .unwrap()
        .unwrap();
    let mut small = vec![0u8; 4096];
    let err = decompress_cluster(CompressionType::Zstd, &stream, &mut small).unwrap_err();
    assert!(
        matches!(
            err,
            CompressError::Zstd {
                problem: ZstdProblem::FrameTooLong { room: 4096 },
                ..
            }
        ),
        "{err:?}"
    );
    let mut big = vec![0u8; 131072];
    let err = decompress_cluster(CompressionType::Zstd, &stream, &mut big).unwrap_err();
    assert_eq!(
        err,
        CompressError::Zstd {
            produced: 65536,
            expected: 131072,
            problem: ZstdProblem::InputEnded
        }
    );
}

/// A zstd frame from raw and RLE blocks, built by hand.
fn zstd_frame(
    descriptor: u8,
    window: Option<u8>,
    fcs: &[u8],
    blocks: &[(u8, &[u8], usize)],
) -> Vec<u8> {
    let mut f = ZSTD_MAGIC.to_le_bytes().to_vec();
    f.push(descriptor);
    f.extend(window);
    f.extend_from_slice(fcs);
    for (i, &(kind, body, size)) in blocks.iter().enumerate() {
        let last = u32::from(i + 1 == blocks.len());
        let header = last | (u32::from(kind) << 1) | ((size as u32) << 3);
        f.extend_from_slice(&header.to_le_bytes()[..3]);
        f.extend_from_slice(body);
    }
    f
}

#[test]
fn zstd_multiple_frames_and_skippable_frames() {
    let data = compressible(65536, 12);
    let a = ruzstd::encoding::compress_to_vec(&data[..20000], CompressionLevel::Fastest);
    let b = ruzstd::encoding::compress_to_vec(&data[20000..], CompressionLevel::Uncompressed);
    let mut stream = a;
    stream.extend_from_slice(&0x184D_2A53u32.to_le_bytes());
    stream.extend_from_slice(&5u32.to_le_bytes());
    stream.extend_from_slice(b"hello");
    stream.extend(b);
    stream.extend_from_slice(b"trailing junk");
    let mut out = vec![0u8; 65536];
    decompress_cluster(CompressionType::Zstd, &stream, &mut out).unwrap();
    assert!(out == data);
}

#[test]
fn zstd_huge_declared_window_is_capped() {
    // 128 MiB window (exponent 17), one RLE block filling the cluster:
    // decodes without reserving the declared window.
    let frame = zstd_frame(0x00, Some(17 << 3), &[], &[(1, &[0x42], 4096)]);
    let mut out = vec![0u8; 4096];
    decompress_cluster(CompressionType::Zstd, &frame, &mut out).unwrap();
    assert!(out.iter().all(|&b| b == 0x42));

    // 256 MiB is past libzstd's default limit.
    let frame = zstd_frame(0x00, Some(18 << 3), &[], &[(1, &[0x42], 4096)]);
    let err = decompress_cluster(CompressionType::Zstd, &frame, &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            CompressError::Zstd {
                problem: ZstdProblem::WindowTooLarge(268_435_456),
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn zstd_header_checks() {
    let mut out = vec![0u8; 4096];
    let run = |frame: &[u8], out: &mut [u8]| match decompress_cluster(
        CompressionType::Zstd,
        frame,
        out,
    ) {
        Err(CompressError::Zstd { problem, .. }) => problem,
        other => panic!("unexpected {other:?}"),
    };
    // Single segment, 4-byte content size of 1 GiB.
    let frame = zstd_frame(0xA0, None, &(1u32 << 30).to_le_bytes(), &[(1, &[1], 4096)]);
    assert_eq!(
        run(&frame, &mut out),
        ZstdProblem::ContentSizeTooLarge {
            declared: 1 << 30,
            room: 4096
        }
    );
    // Declared 2048 (two-byte form: 2048 - 256) but the block makes 4096.
    let fcs = (2048u16 - 256).to_le_bytes();
    let frame = zstd_frame(0x60, None, &fcs, &[(1, &[1], 4096)]);
    assert_eq!(
        run(&frame, &mut out),
        ZstdProblem::ContentSizeMismatch {
            declared: 2048,
            actual: 4096
        }
    );
    // No declared size; two RLE blocks make 8192 bytes for a 4 KiB cluster.
    let frame = zstd_frame(0x00, Some(0), &[], &[(1, &[1], 4096), (1, &[2], 4096)]);
    assert_eq!(
        run(&frame, &mut out),
        ZstdProblem::FrameTooLong { room: 4096 }
    );
    // Declared 4096 but the frame makes 1024, then input ends.
    let fcs = (4096u16 - 256).to_le_bytes();
    let frame = zstd_frame(0x60, None, &fcs, &[(1, &[1], 1024)]);
    assert_eq!(
        run(&frame, &mut out),
        ZstdProblem::ContentSizeMismatch {
            declared: 4096,
            actual: 1024
        }
    );
    // Reserved bit.
    let frame = zstd_frame(0x08, Some(0), &[], &[(1, &[1], 4096)]);
    assert_eq!(run(&frame, &mut out), ZstdProblem::ReservedBit);
    // Dictionary id 7.
    let mut frame = zstd_frame(0x01, Some(0), &[], &[(1, &[1], 4096)]);
    frame.insert(6, 7);
    assert_eq!(run(&frame, &mut out), ZstdProblem::DictionaryRequired(7));
    // Not a zstd frame at all.
    assert_eq!(
        run(b"\x1f\x8b\x08\x00 gzip", &mut out),
        ZstdProblem::BadMagic(0x0008_8b1f)
    );
    // Skippable frame longer than the input.
    let mut frame = 0x184D_2A50u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&1000u32.to_le_bytes());
    assert_eq!(
        run(&frame, &mut out),
        ZstdProblem::SkippableFrameTruncated(1000)
    );
    // Empty input.
    assert_eq!(run(&[], &mut out), ZstdProblem::InputEnded);
    // Raw block, window 1 KiB, exactly filling a 512-byte cluster.
    let body = [7u8; 512];
    let frame = zstd_frame(0x00, Some(0), &[], &[(0, &body, 512)]);
    let mut small = vec![0u8; 512];
    decompress_cluster(CompressionType::Zstd, &frame, &mut small).unwrap();
    assert!(small.iter().all(|&b| b == 7));
}

#[test]
fn zstd_checksum_is_verified() {
    let data = compressible(4096, 13);
    let mut stream = compress_cluster(CompressionType::Zstd, &data)
        .unwrap()
        .unwrap();
    let last = stream.len() - 1;
    stream[last] ^= 0x01;
    let mut out = vec![0u8; 4096];
    let err = decompress_cluster(CompressionType::Zstd, &stream, &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            CompressError::Zstd {
                problem: ZstdProblem::ChecksumMismatch { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn invalid_cluster_sizes_are_rejected() {
    for kind in KINDS {
        for size in [0, 1, 256, 511, 513, 1000, 3 * 4096, 4 * 1024 * 1024] {
            let mut out = vec![0u8; size];
            assert_eq!(
                decompress_cluster(kind, &[0u8; 16], &mut out),
                Err(CompressError::InvalidClusterSize { size })
            );
            assert_eq!(
                compress_cluster(kind, &out),
                Err(CompressError::InvalidClusterSize { size })
            );
        }
    }
}

#[test]
fn random_input_never_panics() {
    let mut rng = Rng(0xC0FFEE);
    for kind in KINDS {
        for _ in 0..3000 {
            let size = [512, 4096, 65536][rng.below(3)];
            let len = rng.below(2048);
            let mut input = rng.bytes(len);
            // Make zstd inputs start with a frame magic now and then, so
            // the header and block parsers are reached.
            if kind == CompressionType::Zstd && len >= 4 && rng.below(2) == 0 {
                input[..4].copy_from_slice(&ZSTD_MAGIC.to_le_bytes());
            }
            let mut out = vec![0u8; size];
            let _ = decompress_cluster(kind, &input, &mut out);
        }
    }
}

#[test]
fn mutated_streams_never_panic() {
    let mut rng = Rng(0xBAD5EED);
    for kind in KINDS {
        for size in [512, 4096, 65536] {
            let data = compressible(size, size as u64 ^ 0x55);
            let stream = compress_cluster(kind, &data).unwrap().unwrap();
            for _ in 0..1500 {
                let mut s = stream.clone();
                for _ in 0..=rng.below(4) {
                    let i = rng.below(s.len());
                    match rng.below(3) {
                        0 => s[i] ^= 1 << rng.below(8),
                        1 => s[i] = rng.next() as u8,
                        _ => s.truncate(i.max(1)),
                    }
                }
                let mut out = vec![0u8; size];
                if decompress_cluster(kind, &s, &mut out).is_ok() && kind == CompressionType::Zstd {
                    // The checksum makes silent corruption very unlikely;
                    // an accepted stream must at least be self-consistent.
                    assert_eq!(out.len(), size);
                }
            }
        }
    }
}
