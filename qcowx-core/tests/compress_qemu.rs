//! Compressed clusters against real QEMU output and input.
//!
//! * QEMU writes: `qemu-img convert -c` compresses a raw file (deflate and
//!   zstd); the test walks the resulting image's L1/L2 tables by hand and
//!   decompresses every compressed cluster with
//!   [`qcowx_core::format::compress::decompress_cluster`].
//! * QEMU reads: the test hand-builds a qcow2 image whose clusters were
//!   compressed with [`qcowx_core::format::compress::compress_cluster`], and has
//!   `qemu-img check` and `qemu-img convert -O raw` read it back.
//! * Window: the deflate streams are inflated by CPython's zlib with a 4 KiB
//!   window (`wbits = -12`) one output byte at a time, which rejects any
//!   back-reference further than QEMU's window.
//!
//! A missing tool (`qemu-img`, `python3`) fails the test, naming its package.

use std::fs;
use std::path::Path;
use std::process::Command;

use qcowx_core::format::compress::{compress_cluster, decompress_cluster, CompressionType};
use qcowx_tests::{describe, require_tool, run, Rng};

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
const CLUSTER_BITS: u32 = 16;
const CLUSTER: usize = 1 << CLUSTER_BITS;
/// Offset bits of a standard L1/L2 entry (bits 9..=55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED_FLAG: u64 = 1 << 62;
const COPIED_FLAG: u64 = 1 << 63;

/// What a cluster of the source file holds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pattern {
    Zero,
    Text,
    SparseRandom,
    HalfRandom,
    FarRepeats,
    Random,
}

const PATTERNS: [Pattern; 12] = [
    Pattern::Text,
    Pattern::Zero,
    Pattern::SparseRandom,
    Pattern::HalfRandom,
    Pattern::FarRepeats,
    Pattern::Random,
    Pattern::Text,
    Pattern::FarRepeats,
    Pattern::SparseRandom,
    Pattern::Random,
    Pattern::HalfRandom,
    Pattern::Text,
];

fn fill_cluster(pattern: Pattern, index: usize, buf: &mut [u8]) {
    let mut rng = Rng::new(index as u64 * 7919 + 1);
    match pattern {
        Pattern::Zero => buf.fill(0),
        Pattern::Text => {
            let text: Vec<u8> = (0..)
                .flat_map(|i| {
                    format!("cluster {index} line {i}: the quick brown fox\n").into_bytes()
                })
                .take(buf.len())
                .collect();
            buf.copy_from_slice(&text);
        }
        Pattern::SparseRandom => {
            buf.fill(0);
            for _ in 0..16 {
                let at = (rng.next_u64() as usize) % (buf.len() - 64);
                rng.fill(&mut buf[at..at + 64]);
            }
        }
        Pattern::HalfRandom => {
            let half = buf.len() / 2;
            rng.fill(&mut buf[..half]);
            buf[half..].fill(0xEE);
        }
        Pattern::FarRepeats => {
            // A random 8 KiB block repeated: every match is 8 KiB back,
            // beyond QEMU's 4 KiB deflate window.
            let mut block = vec![0u8; 8192];
            rng.fill(&mut block);
            for chunk in buf.chunks_mut(8192) {
                chunk.copy_from_slice(&block[..chunk.len()]);
            }
        }
        Pattern::Random => rng.fill(buf),
    }
}

/// Source data: one cluster per pattern, the last one only half present.
fn source_data() -> Vec<u8> {
    let mut data = vec![0u8; PATTERNS.len() * CLUSTER];
    for (i, (pattern, chunk)) in PATTERNS.iter().zip(data.chunks_mut(CLUSTER)).enumerate() {
        fill_cluster(*pattern, i, chunk);
    }
    data.truncate(data.len() - CLUSTER / 2);
    data
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// How one guest cluster of an image is stored.
enum Mapping<'a> {
    Unallocated,
    Standard(&'a [u8]),
    Compressed(&'a [u8]),
}

/// A minimal qcow2 reader: header fields and L1/L2 lookups, nothing else.
struct Image {
    bytes: Vec<u8>,
    cluster_bits: u32,
    size: u64,
    l1_offset: usize,
    l1_size: usize,
    compression_type: u8,
}

impl Image {
    fn open(path: &Path) -> Self {
        let bytes = fs::read(path).expect("read image");
        assert_eq!(&bytes[..4], QCOW2_MAGIC);
        let version = be32(&bytes, 4);
        let header_length = if version >= 3 { be32(&bytes, 100) } else { 72 };
        let compression_type = if header_length > 104 { bytes[104] } else { 0 };
        Image {
            cluster_bits: be32(&bytes, 20),
            size: be64(&bytes, 24),
            l1_size: be32(&bytes, 36) as usize,
            l1_offset: be64(&bytes, 40) as usize,
            compression_type,
            bytes,
        }
    }

    fn cluster_size(&self) -> usize {
        1 << self.cluster_bits
    }

    fn mapping(&self, guest_cluster: usize) -> Mapping<'_> {
        let l2_entries = self.cluster_size() / 8;
        let l1_index = guest_cluster / l2_entries;
        assert!(l1_index < self.l1_size, "L1 index out of range");
        let l1 = be64(&self.bytes, self.l1_offset + 8 * l1_index);
        let l2_offset = (l1 & OFFSET_MASK) as usize;
        if l2_offset == 0 {
            return Mapping::Unallocated;
        }
        let l2 = be64(&self.bytes, l2_offset + 8 * (guest_cluster % l2_entries));
        if l2 & COMPRESSED_FLAG != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let offset = l2 & ((1u64 << x) - 1);
            let sectors = (l2 >> x) & ((1u64 << (self.cluster_bits - 8)) - 1);
            let size = (sectors + 1) * 512 - (offset & 511);
            let start = offset as usize;
            // The last sector may run past the end of the file.
            let end = (start + size as usize).min(self.bytes.len());
            return Mapping::Compressed(&self.bytes[start..end]);
        }
        let offset = (l2 & OFFSET_MASK) as usize;
        if offset == 0 {
            // Unallocated or the zero flag (bit 0): reads as zeros here.
            return Mapping::Unallocated;
        }
        Mapping::Standard(&self.bytes[offset..offset + self.cluster_size()])
    }
}

/// Converts the source with `qemu-img convert -c` and checks every cluster.
fn check_qemu_compressed(kind: CompressionType) {
    require_tool("qemu-img", "qemu-utils", &["--version"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let raw = dir.path().join("source.raw");
    let img = dir.path().join("compressed.qcow2");
    let data = source_data();
    fs::write(&raw, &data).expect("write source");

    let mut options = format!("cluster_size={CLUSTER}");
    if kind == CompressionType::Zstd {
        options.push_str(",compression_type=zstd");
    }
    let out = run(Command::new("qemu-img")
        .args(["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &options])
        .arg(&raw)
        .arg(&img));
    assert!(out.status.success(), "qemu-img convert: {}", describe(&out));

    let image = Image::open(&img);
    assert_eq!(image.cluster_bits, CLUSTER_BITS);
    assert_eq!(
        CompressionType::from_header(image.compression_type),
        Some(kind)
    );
    // qemu-img rounds the virtual size up to a whole sector only.
    assert_eq!(image.size, data.len() as u64);

    let mut compressed = 0;
    let mut standard = 0;
    let mut out = vec![0u8; CLUSTER];
    for (i, pattern) in PATTERNS.iter().enumerate() {
        // QEMU zero-pads the partial last cluster before compressing it.
        let mut expected = vec![0u8; CLUSTER];
        let src = &data[i * CLUSTER..data.len().min((i + 1) * CLUSTER)];
        expected[..src.len()].copy_from_slice(src);
        match image.mapping(i) {
            Mapping::Compressed(stream) => {
                decompress_cluster(kind, stream, &mut out)
                    .unwrap_or_else(|e| panic!("{kind} cluster {i} ({pattern:?}): {e}"));
                assert!(out == expected, "{kind} cluster {i} ({pattern:?}) differs");
                compressed += 1;
            }
            Mapping::Standard(stored) => {
                assert!(stored == &expected[..], "cluster {i} ({pattern:?}) differs");
                standard += 1;
            }
            Mapping::Unallocated => {
                assert!(expected.iter().all(|&b| b == 0), "cluster {i} missing");
                assert_eq!(*pattern, Pattern::Zero, "cluster {i} not written");
                continue;
            }
        }
        let stored_compressed = matches!(image.mapping(i), Mapping::Compressed(_));
        let should_compress = match pattern {
            Pattern::Random => false,
            // With its 4 KiB window zlib finds none of the 8 KiB repeats, so
            // QEMU stores the cluster uncompressed; zstd's window sees them.
            Pattern::FarRepeats => kind == CompressionType::Zstd,
            _ => true,
        };
        assert_eq!(
            stored_compressed, should_compress,
            "{kind} cluster {i} ({pattern:?})"
        );
    }
    println!("{kind}: {compressed} compressed, {standard} uncompressed clusters checked");
    assert!(compressed >= 7, "{kind}");
}

#[test]
fn qemu_deflate_clusters_decompress() {
    check_qemu_compressed(CompressionType::Deflate);
}

#[test]
fn qemu_zstd_clusters_decompress() {
    check_qemu_compressed(CompressionType::Zstd);
}

fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Builds a version 3 qcow2 image (64 KiB clusters, 16-bit refcounts) whose
/// data clusters are compressed with `compress_cluster` where that helps,
/// packed back to back the way QEMU packs them. Returns the image and how many
/// clusters were stored compressed.
fn build_image(kind: CompressionType, data: &[u8]) -> (Vec<u8>, usize) {
    let guest_clusters = data.len().div_ceil(CLUSTER);
    assert!(guest_clusters <= CLUSTER / 8, "one L2 table is enough");
    // Host layout: header, refcount table, refcount block, L1, L2, data.
    let (refcount_table, refcount_block, l1, l2) = (CLUSTER, 2 * CLUSTER, 3 * CLUSTER, 4 * CLUSTER);
    let mut image = vec![0u8; 5 * CLUSTER];
    let mut l2_entries = vec![0u64; guest_clusters];
    let mut compressed = 0;

    for (i, entry) in l2_entries.iter_mut().enumerate() {
        let mut cluster = vec![0u8; CLUSTER];
        let src = &data[i * CLUSTER..data.len().min((i + 1) * CLUSTER)];
        cluster[..src.len()].copy_from_slice(src);
        if cluster.iter().all(|&b| b == 0) {
            continue;
        }
        match compress_cluster(kind, &cluster).expect("compress") {
            Some(stream) => {
                let offset = image.len() as u64;
                let sectors = (offset + stream.len() as u64 - 1) / 512 - offset / 512;
                let x = 62 - (CLUSTER_BITS - 8);
                *entry = COMPRESSED_FLAG | (sectors << x) | offset;
                image.extend_from_slice(&stream);
                compressed += 1;
            }
            None => {
                let offset = image.len().next_multiple_of(CLUSTER);
                image.resize(offset, 0);
                image.extend_from_slice(&cluster);
                *entry = COPIED_FLAG | offset as u64;
            }
        }
    }
    image.resize(image.len().next_multiple_of(512), 0);

    // Refcounts: metadata clusters once; every host cluster a compressed
    // cluster's sectors touch, once per compressed cluster (as qemu-img check
    // counts them); standard clusters once.
    let host_clusters = image.len().div_ceil(CLUSTER);
    let mut refcounts = vec![0u16; host_clusters];
    refcounts[..5].fill(1);
    for &entry in &l2_entries {
        if entry & COMPRESSED_FLAG != 0 {
            let x = 62 - (CLUSTER_BITS - 8);
            let offset = entry & ((1 << x) - 1);
            let sectors = (entry >> x) & 0xff;
            let end = (offset & !511) + (sectors + 1) * 512;
            let touched = (offset as usize / CLUSTER)..=((end as usize - 1) / CLUSTER);
            for count in &mut refcounts[touched] {
                *count += 1;
            }
        } else if entry != 0 {
            refcounts[(entry & OFFSET_MASK) as usize / CLUSTER] += 1;
        }
    }
    assert!(host_clusters <= CLUSTER / 2, "one refcount block is enough");
    for (i, &r) in refcounts.iter().enumerate() {
        image[refcount_block + 2 * i..refcount_block + 2 * i + 2].copy_from_slice(&r.to_be_bytes());
    }
    put_be64(&mut image, refcount_table, refcount_block as u64);
    put_be64(&mut image, l1, COPIED_FLAG | l2 as u64);
    for (i, &entry) in l2_entries.iter().enumerate() {
        put_be64(&mut image, l2 + 8 * i, entry);
    }

    // Header (version 3, 112 bytes with the compression type byte).
    image[..4].copy_from_slice(QCOW2_MAGIC);
    put_be32(&mut image, 4, 3);
    put_be32(&mut image, 20, CLUSTER_BITS);
    put_be64(&mut image, 24, data.len() as u64);
    put_be32(&mut image, 36, 1); // l1_size
    put_be64(&mut image, 40, l1 as u64);
    put_be64(&mut image, 48, refcount_table as u64);
    put_be32(&mut image, 56, 1); // refcount_table_clusters
    let incompatible = if kind == CompressionType::Zstd {
        1 << 3
    } else {
        0
    };
    put_be64(&mut image, 72, incompatible);
    put_be32(&mut image, 96, 4); // refcount_order: 16-bit
    put_be32(&mut image, 100, 112); // header_length
    image[104] = kind.to_header();
    // Bytes 112.. stay zero: the end-of-extensions marker.
    (image, compressed)
}

fn check_qemu_reads_ours(kind: CompressionType) {
    require_tool("qemu-img", "qemu-utils", &["--version"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("ours.qcow2");
    let back = dir.path().join("back.raw");
    let data = source_data();
    let (image, compressed) = build_image(kind, &data);
    // Text, sparse, far-repeat and half-random clusters must all compress
    // (ruzstd may miss the half-random one).
    assert!(
        compressed >= 7,
        "{kind}: only {compressed} clusters compressed"
    );
    fs::write(&img, &image).expect("write image");

    let out = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&img));
    assert!(out.status.success(), "qemu-img check: {}", describe(&out));

    let out = run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&img)
        .arg(&back));
    assert!(out.status.success(), "qemu-img convert: {}", describe(&out));
    let read_back = fs::read(&back).expect("read back");
    assert_eq!(read_back.len(), data.len());
    assert!(read_back == data, "{kind}: QEMU read different data");
}

#[test]
fn qemu_reads_our_deflate_clusters() {
    check_qemu_reads_ours(CompressionType::Deflate);
}

#[test]
fn qemu_reads_our_zstd_clusters() {
    check_qemu_reads_ours(CompressionType::Zstd);
}

/// Inflates each file with zlib at `wbits = -12`, one output byte per call,
/// so that every back-reference is served from zlib's 4 KiB window; prints
/// one line per file: "ok" or the zlib error.
const WINDOW_CHECK: &str = r#"
import sys, zlib
for path in sys.argv[2:]:
    data = open(path, "rb").read()
    d = zlib.decompressobj(-12)
    want = int(sys.argv[1])
    got = 0
    try:
        while got < want:
            chunk = d.decompress(data, 1)
            if not chunk:
                raise Exception("stream ended after %d bytes" % got)
            got += len(chunk)
            data = d.unconsumed_tail
        print("ok")
    except Exception as e:
        print("error: %s" % e)
"#;

#[test]
fn our_deflate_streams_fit_qemus_4k_window() {
    require_tool("python3", "python3", &["--version"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let data = source_data();
    let mut files = Vec::new();
    for (i, chunk) in data.chunks(CLUSTER).enumerate() {
        let mut cluster = vec![0u8; CLUSTER];
        cluster[..chunk.len()].copy_from_slice(chunk);
        if let Some(stream) = compress_cluster(CompressionType::Deflate, &cluster).unwrap() {
            let path = dir.path().join(format!("cluster{i}.deflate"));
            fs::write(&path, &stream).unwrap();
            files.push(path);
        }
    }
    assert!(files.len() >= 7);

    // Control: zlib's own 32 KiB-window stream of the far-repeat cluster
    // must fail the same check, or the check proves nothing.
    let mut far = vec![0u8; CLUSTER];
    fill_cluster(Pattern::FarRepeats, 4, &mut far);
    let far_path = dir.path().join("far.bin");
    fs::write(&far_path, &far).unwrap();
    let control = dir.path().join("control.deflate");
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, zlib; c = zlib.compressobj(6, zlib.DEFLATED, -15); \
         open(sys.argv[2], 'wb').write(c.compress(open(sys.argv[1], 'rb').read()) + c.flush())",
        )
        .arg(&far_path)
        .arg(&control));
    assert!(out.status.success(), "python3: {}", describe(&out));

    let out = run(Command::new("python3")
        .arg("-c")
        .arg(WINDOW_CHECK)
        .arg(CLUSTER.to_string())
        .args(&files)
        .arg(&control));
    assert!(out.status.success(), "python3: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), files.len() + 1, "{text}");
    for (path, line) in files.iter().zip(&lines) {
        assert_eq!(*line, "ok", "{}", path.display());
    }
    assert!(
        lines[files.len()].contains("too far back"),
        "control stream passed the window check: {}",
        lines[files.len()]
    );
}
