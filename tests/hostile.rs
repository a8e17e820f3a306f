//! A corpus of hostile images: valid `qemu-img` images with bytes patched to break one
//! thing each. Every case must give a typed [`qcowx_core::Error`] (the variant is
//! matched), never panic, never hang (each open, full read and check runs under a 30 s
//! watchdog) and never make an absurd allocation (the binary's global allocator records
//! the largest single allocation of each case; see [`qcowx_tests::alloc_limit`]).
//!
//! A randomized robustness loop at the end flips bytes in the metadata of valid images
//! (deterministic seed) and asserts only that open, read, block status, check and a few
//! writes neither panic nor hang nor allocate absurdly.
//!
//! Header field offsets used below (QCOW2 specification):
//! 0 magic, 4 version, 8 backing_file_offset, 16 backing_file_size, 20 cluster_bits,
//! 24 size, 32 crypt_method, 36 l1_size, 40 l1_table_offset, 48 refcount_table_offset,
//! 56 refcount_table_clusters, 60 nb_snapshots, 64 snapshots_offset,
//! 72 incompatible_features, 80 compatible_features, 88 autoclear_features,
//! 96 refcount_order, 100 header_length, 104 compression_type.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qcowx_core::engine::backing::MAX_BACKING_DEPTH;
use qcowx_core::format::header::HeaderError;
use qcowx_core::format::snapshot::SnapshotError;
use qcowx_core::{CheckReport, Error, Image, OpenOptions};
use qcowx_tests::{
    alloc_limit, be32, be64, convert_to_raw, error_text, open_retry, patch, qemu_img,
    qemu_img_create, qemu_io_ok, read_at, run_bounded, run_ok, tempdir, Bounded, CappedStorage,
    Rng, TempDir,
};

#[global_allocator]
static ALLOC: alloc_limit::LimitAlloc = alloc_limit::LimitAlloc;

/// Per-operation watchdog.
const WATCHDOG: Duration = Duration::from_secs(30);
/// Largest single allocation a case may make (the biggest legitimate buffers are an
/// L1 table or snapshot table, bounded by the file, and 2 MiB clusters).
const ALLOC_BUDGET: usize = 256 << 20;
/// Disk bytes the full-read pass reads at most.
const READ_CAP: u64 = 64 << 20;
const CHUNK: u64 = 64 << 10;

/// The offset mask of L1/L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

// ---- base images ------------------------------------------------------------------------

/// A valid image and the raw content QEMU reads from it.
struct Base {
    dir: TempDir,
    path: PathBuf,
    raw: Vec<u8>,
}

impl Base {
    /// A copy of the image to patch, named `name`.
    fn copy(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::copy(&self.path, &p).expect("copy base image");
        p
    }
}

/// 4 KiB clusters, 8 MiB, data under each of the four L1 entries (an L1 entry covers
/// 2 MiB with 4 KiB clusters).
fn plain() -> Base {
    let dir = tempdir();
    let path = dir.path().join("plain.qcow2");
    qemu_img_create(&path, 8 << 20, "cluster_size=4096");
    qemu_io_ok(
        "qcow2",
        &path,
        &[
            "write -P 0x11 0 65536",
            "write -P 0x22 2097252 9000",
            "write -P 0x33 4198400 4096",
            "write -P 0x44 6299648 12288",
        ],
    );
    finish_base(dir, path)
}

fn finish_base(dir: TempDir, path: PathBuf) -> Base {
    let raw_path = dir.path().join("base.raw");
    convert_to_raw(&path, &raw_path);
    let raw = std::fs::read(&raw_path).expect("read raw");
    Base { dir, path, raw }
}

/// 64 KiB clusters, compressed by `qemu-img convert -c`.
fn compressed() -> Base {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let mut data = Vec::new();
    while data.len() < 1 << 20 {
        data.extend_from_slice(b"hostile compressed cluster content ");
    }
    data.truncate(1 << 20);
    std::fs::write(&src, &data).expect("write source");
    let path = dir.path().join("c.qcow2");
    run_ok(
        qemu_img()
            .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
            .arg(&src)
            .arg(&path),
    );
    finish_base(dir, path)
}

/// [`plain`] with an internal snapshot.
fn with_snapshot() -> Base {
    let b = plain();
    run_ok(qemu_img().args(["snapshot", "-c", "s1"]).arg(&b.path));
    b
}

/// Host offset of the L2 table of L1 entry `i`.
fn l2_of(path: &Path, i: u64) -> u64 {
    let l1 = be64(path, 40);
    be64(path, l1 + 8 * i) & OFFSET_MASK
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").len()
}

// ---- running a case -----------------------------------------------------------------------

fn check_alloc<T>(what: &str, b: &Bounded<T>) {
    assert!(
        b.largest_alloc <= ALLOC_BUDGET,
        "{what}: the library made a single allocation of {} bytes (budget {ALLOC_BUDGET})",
        b.largest_alloc
    );
}

/// Opens `path` read-only under the watchdog and returns the error it must give.
fn open_error(path: &Path) -> Error {
    open_error_with(path, OpenOptions::new())
}

fn open_error_with(path: &Path, opts: OpenOptions) -> Error {
    let p = path.to_path_buf();
    let what = format!("open {}", path.display());
    let b = run_bounded(&what, WATCHDOG, move || {
        open_retry(&opts, &p).err().map(|e| (error_text(&e), e))
    });
    check_alloc(&what, &b);
    match b.result {
        Ok(Some((text, e))) => {
            println!("{what}: {text}");
            e
        }
        Ok(None) => panic!("{what}: opened, but it should have been refused"),
        Err(p) => panic!("{what}: panicked: {p}"),
    }
}

/// What reading a whole opened image and checking it gave.
struct Exercise {
    /// Results per [`CHUNK`]-sized chunk of the disk (up to [`READ_CAP`]).
    chunks: Vec<(u64, Result<Vec<u8>, Error>)>,
    check: Result<CheckReport, Error>,
}

impl Exercise {
    fn failing(&self) -> Vec<u64> {
        self.chunks
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(o, _)| *o)
            .collect()
    }

    fn error_at(&self, off: u64) -> &Error {
        match &self.chunks[(off / CHUNK) as usize] {
            (_, Err(e)) => e,
            (o, Ok(_)) => panic!("chunk at {o} read fine; expected an error"),
        }
    }

    /// Every chunk except those in `bad` reads fine and equals `raw`.
    fn others_match(&self, raw: &[u8], bad: std::ops::Range<u64>) {
        for (off, r) in &self.chunks {
            if bad.contains(off) {
                continue;
            }
            match r {
                Ok(data) => {
                    let s = *off as usize;
                    assert!(
                        data[..] == raw[s..s + data.len()],
                        "chunk at {off} reads different content than QEMU's"
                    );
                }
                Err(e) => panic!("chunk at {off} outside the broken range failed: {e}"),
            }
        }
    }

    /// The check must not call the image clean.
    fn check_not_clean(&self) {
        match &self.check {
            Ok(r) => assert!(
                r.exit_code() != 0,
                "check calls a broken image clean: {r:?}"
            ),
            Err(e) => println!("check failed with {e}"),
        }
    }
}

/// Opens `path` read-only (it must open), reads the whole disk in chunks and checks it,
/// each step under the watchdog.
fn exercise(path: &Path) -> Exercise {
    let p = path.to_path_buf();
    let what = format!("open+read+check {}", path.display());
    let b = run_bounded(&what, WATCHDOG, move || {
        let img = open_retry(&OpenOptions::new(), &p)
            .unwrap_or_else(|e| panic!("open {}: {}", p.display(), error_text(&e)));
        let size = img.size().min(READ_CAP);
        let mut chunks = Vec::new();
        let mut off = 0;
        while off < size {
            let n = CHUNK.min(size - off);
            let mut buf = vec![0u8; n as usize];
            chunks.push((off, img.read_at(&mut buf, off).map(|_| buf)));
            off += n;
        }
        let check = img.check();
        Exercise { chunks, check }
    });
    check_alloc(&what, &b);
    b.result.unwrap_or_else(|p| panic!("{what}: panicked: {p}"))
}

fn header_field(e: &Error, want: &str) {
    match e {
        Error::Header {
            source: HeaderError::Field { field, .. },
            ..
        } => assert_eq!(*field, want, "wrong field blamed: {e}"),
        other => panic!("expected a header error about `{want}`, got {other:?}"),
    }
}

// ---- header cases -------------------------------------------------------------------------

/// The file ends inside the header: 10 bytes (inside the magic/version), 71 bytes (one
/// short of the version 2 header), 100 bytes (inside the version 3 fields).
#[test]
fn truncated_header() {
    let b = plain();
    for len in [10u64, 71, 100] {
        let p = b.copy(&format!("trunc{len}.qcow2"));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(len))
            .expect("truncate");
        match open_error(&p) {
            Error::Header {
                source: HeaderError::Truncated { .. },
                ..
            } => {}
            other => panic!("{len} bytes: expected a truncated-header error, got {other:?}"),
        }
    }
}

/// The magic is not `QFI\xfb`.
#[test]
fn bad_magic() {
    let b = plain();
    let p = b.copy("magic.qcow2");
    patch(&p, 0, b"QFI\x00");
    match open_error(&p) {
        Error::Header {
            source: HeaderError::BadMagic(m),
            ..
        } => assert_eq!(m, 0x5146_4900),
        other => panic!("expected BadMagic, got {other:?}"),
    }
}

/// Versions 1 and 4.
#[test]
fn bad_version() {
    let b = plain();
    for v in [1u32, 4] {
        let p = b.copy(&format!("v{v}.qcow2"));
        patch(&p, 4, &v.to_be_bytes());
        header_field(&open_error(&p), "version");
    }
}

/// cluster_bits 8 (256 B) and 22 (4 MiB) are outside 9..=21.
#[test]
fn bad_cluster_bits() {
    let b = plain();
    for bits in [8u32, 22] {
        let p = b.copy(&format!("cb{bits}.qcow2"));
        patch(&p, 20, &bits.to_be_bytes());
        header_field(&open_error(&p), "cluster_bits");
    }
}

/// l1_size 0x7fffffff: a 16 GiB L1 table. Must be refused before any allocation.
#[test]
fn huge_l1_size() {
    let b = plain();
    let p = b.copy("l1size.qcow2");
    patch(&p, 36, &0x7fff_ffffu32.to_be_bytes());
    header_field(&open_error(&p), "l1_size");
}

/// l1_size 1 while the disk needs four entries.
#[test]
fn l1_too_small() {
    let b = plain();
    let p = b.copy("l1small.qcow2");
    patch(&p, 36, &1u32.to_be_bytes());
    header_field(&open_error(&p), "l1_size");
}

/// l1_table_offset past the end of the file, and not cluster-aligned.
#[test]
fn bad_l1_table_offset() {
    let b = plain();
    let p = b.copy("l1past.qcow2");
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    header_field(&open_error(&p), "l1_table_offset");
    let p = b.copy("l1unaligned.qcow2");
    let l1 = be64(&p, 40);
    patch(&p, 40, &(l1 + 512).to_be_bytes());
    header_field(&open_error(&p), "l1_table_offset");
}

/// A virtual size far beyond what any L1 table can address.
#[test]
fn huge_virtual_size() {
    let b = plain();
    let p = b.copy("size.qcow2");
    patch(&p, 24, &(1u64 << 62).to_be_bytes());
    header_field(&open_error(&p), "size");
}

/// refcount_table_clusters 0xffffffff (and 0).
#[test]
fn absurd_refcount_table_clusters() {
    let b = plain();
    for n in [0xffff_ffffu32, 0] {
        let p = b.copy(&format!("rtc{n}.qcow2"));
        patch(&p, 56, &n.to_be_bytes());
        header_field(&open_error(&p), "refcount_table_clusters");
    }
}

/// refcount_table_offset past the end of the file.
#[test]
fn refcount_table_past_end() {
    let b = plain();
    let p = b.copy("rtpast.qcow2");
    patch(&p, 48, &(1u64 << 40).to_be_bytes());
    header_field(&open_error(&p), "refcount_table_offset");
}

/// refcount_order 7 (128-bit refcounts do not exist).
#[test]
fn bad_refcount_order() {
    let b = plain();
    let p = b.copy("ro.qcow2");
    patch(&p, 96, &7u32.to_be_bytes());
    header_field(&open_error(&p), "refcount_order");
}

/// header_length below 104, not a multiple of 8, and larger than the cluster.
#[test]
fn bad_header_length() {
    let b = plain();
    for hl in [50u32, 106, 8192] {
        let p = b.copy(&format!("hl{hl}.qcow2"));
        patch(&p, 100, &hl.to_be_bytes());
        header_field(&open_error(&p), "header_length");
    }
}

/// crypt_method 1 (AES) and 2 (LUKS).
#[test]
fn encrypted() {
    let b = plain();
    for m in [1u32, 2] {
        let p = b.copy(&format!("crypt{m}.qcow2"));
        patch(&p, 32, &m.to_be_bytes());
        let e = open_error(&p);
        assert!(
            matches!(
                e,
                Error::Header {
                    source: HeaderError::Encrypted(x),
                    ..
                } if x == m
            ),
            "expected Encrypted({m}), got {e:?}"
        );
        assert!(
            e.to_string().contains("encrypted images are not supported"),
            "{e}"
        );
    }
}

/// An unknown incompatible bit without a feature-name-table entry: the error names
/// the bit.
#[test]
fn unknown_incompatible_bit() {
    let b = plain();
    let p = b.copy("incompat40.qcow2");
    patch(&p, 72, &(1u64 << 40).to_be_bytes());
    match open_error(&p) {
        Error::Header {
            source: HeaderError::UnknownIncompatible(s),
            ..
        } => assert!(s.contains("bit 40"), "{s}"),
        other => panic!("expected UnknownIncompatible, got {other:?}"),
    }
}

/// An unknown incompatible bit named in a feature name table (written after the
/// header by this test: QEMU 10 writes none): the error gives the name.
#[test]
fn unknown_incompatible_bit_named() {
    let b = plain();
    let p = b.copy("incompat9.qcow2");
    let hl = u64::from(be32(&p, 100));
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x6803_f857u32.to_be_bytes());
    ext.extend_from_slice(&48u32.to_be_bytes());
    let mut entry = [0u8; 48];
    entry[0] = 0; // incompatible
    entry[1] = 9;
    entry[2..2 + 11].copy_from_slice(b"frobnicator");
    ext.extend_from_slice(&entry);
    ext.extend_from_slice(&[0u8; 8]); // end of extensions
    patch(&p, hl, &ext);
    patch(&p, 72, &(1u64 << 9).to_be_bytes());
    match open_error(&p) {
        Error::Header {
            source: HeaderError::UnknownIncompatible(s),
            ..
        } => assert!(s.contains("bit 9") && s.contains("frobnicator"), "{s}"),
        other => panic!("expected UnknownIncompatible, got {other:?}"),
    }
}

/// Unknown compatible and autoclear bits are harmless: the image opens and reads.
#[test]
fn unknown_compatible_bits_are_fine() {
    let b = plain();
    let p = b.copy("compat.qcow2");
    patch(&p, 80, &(1u64 << 33).to_be_bytes());
    patch(&p, 88, &(1u64 << 34).to_be_bytes());
    let ex = exercise(&p);
    ex.others_match(&b.raw, 0..0);
}

/// The corrupt bit: opening for writing is refused, read-only opening works.
#[test]
fn corrupt_bit() {
    let b = plain();
    let p = b.copy("corrupt.qcow2");
    patch(&p, 72, &2u64.to_be_bytes());
    let e = open_error_with(&p, OpenOptions::new().write(true));
    assert!(
        matches!(e, Error::ReadOnly { .. }),
        "expected ReadOnly, got {e:?}"
    );
    let ex = exercise(&p);
    ex.others_match(&b.raw, 0..0);
}

/// Extended L2 entries with 4 KiB clusters (QCOW2 requires at least 16 KiB).
#[test]
fn extended_l2_small_clusters() {
    let b = plain();
    let p = b.copy("ext.qcow2");
    patch(&p, 72, &16u64.to_be_bytes());
    header_field(&open_error(&p), "cluster_bits");
}

/// A backing file name that runs past the first cluster, and one that is too long.
#[test]
fn backing_name_past_cluster() {
    let b = plain();
    let p = b.copy("bname.qcow2");
    patch(&p, 8, &4090u64.to_be_bytes());
    patch(&p, 16, &20u32.to_be_bytes());
    header_field(&open_error(&p), "backing_file_offset");
    let p = b.copy("bsize.qcow2");
    patch(&p, 8, &512u64.to_be_bytes());
    patch(&p, 16, &5000u32.to_be_bytes());
    header_field(&open_error(&p), "backing_file_size");
}

// ---- snapshot table ---------------------------------------------------------------------

/// The snapshot table starts past the end of the file.
#[test]
fn snapshot_table_past_end() {
    let b = with_snapshot();
    let p = b.copy("snappast.qcow2");
    let end = file_len(&p).next_multiple_of(4096);
    patch(&p, 64, &(end + (1 << 20)).to_be_bytes());
    header_field(&open_error(&p), "snapshots_offset");
}

/// nb_snapshots 0xffffffff (beyond QEMU's limit), and 65536 (allowed, but the file
/// holds one entry).
#[test]
fn nb_snapshots_huge() {
    let b = with_snapshot();
    let p = b.copy("nbsnap.qcow2");
    patch(&p, 60, &0xffff_ffffu32.to_be_bytes());
    header_field(&open_error(&p), "nb_snapshots");
    let p = b.copy("nbsnap64k.qcow2");
    patch(&p, 60, &65536u32.to_be_bytes());
    match open_error(&p) {
        Error::Snapshot {
            source: SnapshotError::Truncated { .. } | SnapshotError::Invalid { .. },
            ..
        } => {}
        other => panic!("expected a snapshot table error, got {other:?}"),
    }
}

/// A snapshot entry whose L1 table offset is unaligned: the image opens and its
/// active layer reads (as in QEMU); check reports the entry; the snapshot itself is
/// refused with a corruption error naming its L1 table.
#[test]
fn snapshot_entry_bad_l1() {
    let b = with_snapshot();
    let p = b.copy("snapl1.qcow2");
    let table = be64(&p, 64);
    let l1 = be64(&p, table);
    patch(&p, table, &(l1 + 8).to_be_bytes());
    let img = std::sync::Arc::new(Image::open(&p).expect("the image opens"));
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, 0).expect("the active layer reads");
    let report = img.check().expect("check runs");
    assert!(
        report.corruptions > 0
            && report
                .messages
                .iter()
                .any(|m| m.contains("L1 table offset is not")
                    && m.contains(&format!("{:#x}", l1 + 8))),
        "{:?}",
        report.messages
    );
    let e = img
        .open_root("s1")
        .and_then(|d| d.read_at(&mut buf, 0).map(|_| ()))
        .expect_err("the snapshot's L1 table is refused");
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    assert!(e.to_string().contains("L1"), "{e}");
}

// ---- tables -------------------------------------------------------------------------------

/// L1 entry 1 links an L2 table past the end of the file: reads of its 2 MiB fail with
/// a corruption error; everything else reads as QEMU reads it.
#[test]
fn l2_table_past_end() {
    let b = plain();
    let p = b.copy("l2past.qcow2");
    let l1 = be64(&p, 40);
    let past = file_len(&p).next_multiple_of(4096) + (64 << 20);
    patch(&p, l1 + 8, &(past | COPIED).to_be_bytes());
    let ex = exercise(&p);
    let bad = (2 << 20)..(4 << 20);
    assert_eq!(
        ex.failing(),
        bad.clone().step_by(CHUNK as usize).collect::<Vec<_>>()
    );
    assert!(
        matches!(ex.error_at(2 << 20), Error::Corrupt { .. }),
        "{:?}",
        ex.error_at(2 << 20)
    );
    ex.others_match(&b.raw, bad);
    ex.check_not_clean();
}

/// L1 entry 2 links an unaligned L2 table.
#[test]
fn l2_table_unaligned() {
    let b = plain();
    let p = b.copy("l2unaligned.qcow2");
    let l1 = be64(&p, 40);
    let l2 = l2_of(&p, 2);
    patch(&p, l1 + 16, &((l2 + 512) | COPIED).to_be_bytes());
    let ex = exercise(&p);
    let bad = (4 << 20)..(6 << 20);
    assert_eq!(
        ex.failing(),
        bad.clone().step_by(CHUNK as usize).collect::<Vec<_>>()
    );
    assert!(matches!(ex.error_at(4 << 20), Error::Corrupt { .. }));
    ex.others_match(&b.raw, bad);
    ex.check_not_clean();
}

/// L1 entry 3 links the refcount table as its L2 table (metadata overlap): reading must
/// not panic and check must not call the image clean.
#[test]
fn l2_table_is_header() {
    let b = plain();
    let p = b.copy("l2header.qcow2");
    let l1 = be64(&p, 40);
    patch(&p, l1 + 24, &(4096u64 | COPIED).to_be_bytes());
    let ex = exercise(&p);
    // Entries of the "table" are header bytes: whatever they decode to, the rest of
    // the disk is unaffected.
    ex.others_match(&b.raw, (6 << 20)..(8 << 20));
    ex.check_not_clean();
}

/// A data cluster offset that is not cluster-aligned: reading that cluster fails.
#[test]
fn data_cluster_unaligned() {
    let b = plain();
    let p = b.copy("dataunaligned.qcow2");
    let l2 = l2_of(&p, 0);
    let e = be64(&p, l2 + 8); // guest cluster 1 (4096..8192)
    assert_ne!(e & OFFSET_MASK, 0, "guest cluster 1 should be allocated");
    patch(&p, l2 + 8, &(e + 512).to_be_bytes());
    let ex = exercise(&p);
    assert_eq!(ex.failing(), vec![0]);
    assert!(
        matches!(ex.error_at(0), Error::Corrupt { .. }),
        "{:?}",
        ex.error_at(0)
    );
    ex.others_match(&b.raw, 0..CHUNK);
    ex.check_not_clean();
}

/// A compressed cluster whose descriptor points past the end of the file.
#[test]
fn compressed_past_end() {
    let b = compressed();
    let p = b.copy("cpast.qcow2");
    let cs = 1u64 << be32(&p, 20);
    let l2 = l2_of(&p, 0);
    let e = be64(&p, l2 + 8); // guest cluster 1
    assert!(
        e & COMPRESSED != 0,
        "guest cluster 1 should be compressed: {e:#x}"
    );
    let shift = 62 - (be32(&p, 20) - 8);
    let offset_mask = (1u64 << shift) - 1;
    let past = file_len(&p) + (16 << 20);
    patch(&p, l2 + 8, &((e & !offset_mask) | past).to_be_bytes());
    let ex = exercise(&p);
    assert_eq!(ex.failing(), vec![cs]);
    assert!(
        matches!(
            ex.error_at(cs),
            Error::Corrupt { .. } | Error::Compressed { .. }
        ),
        "{:?}",
        ex.error_at(cs)
    );
    ex.others_match(&b.raw, cs..2 * cs);
    ex.check_not_clean();
}

/// A compressed descriptor pointing at the header: decompression fails cleanly.
#[test]
fn compressed_garbage() {
    let b = compressed();
    let p = b.copy("cgarbage.qcow2");
    let cs = 1u64 << be32(&p, 20);
    let l2 = l2_of(&p, 0);
    let e = be64(&p, l2 + 16); // guest cluster 2
    assert!(e & COMPRESSED != 0);
    let shift = 62 - (be32(&p, 20) - 8);
    let offset_mask = (1u64 << shift) - 1;
    patch(&p, l2 + 16, &((e & !offset_mask) | 8).to_be_bytes());
    let ex = exercise(&p);
    assert_eq!(ex.failing(), vec![2 * cs]);
    assert!(
        matches!(ex.error_at(2 * cs), Error::Compressed { .. }),
        "{:?}",
        ex.error_at(2 * cs)
    );
    ex.others_match(&b.raw, 2 * cs..3 * cs);
}

// ---- backing chains -----------------------------------------------------------------------

fn create_overlay(dir: &Path, name: &str, backing: &str) {
    run_ok(
        qemu_img()
            .current_dir(dir)
            .args([
                "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2",
            ])
            .args([name, "1M"]),
    );
}

/// a -> b -> a.
#[test]
fn backing_loop_two() {
    let dir = tempdir();
    qemu_img_create(&dir.path().join("a.qcow2"), 1 << 20, "");
    create_overlay(dir.path(), "b.qcow2", "a.qcow2");
    create_overlay(dir.path(), "a.qcow2", "b.qcow2");
    let e = open_error(&dir.path().join("a.qcow2"));
    assert!(matches!(e, Error::Backing { .. }), "{e:?}");
    let text = error_text(&e);
    assert!(
        text.contains("loop") && text.contains("a.qcow2") && text.contains("b.qcow2"),
        "the error should name the loop: {text}"
    );
}

/// a -> a.
#[test]
fn backing_loop_self() {
    let dir = tempdir();
    // qemu-img refuses to name the image itself: name another file of the same length
    // and patch the name.
    let a = dir.path().join("a.qcow2");
    create_overlay(dir.path(), "a.qcow2", "x.qcow2");
    let off = be64(&a, 8);
    assert_eq!(read_at(&a, off, 7), b"x.qcow2");
    patch(&a, off, b"a.qcow2");
    let e = open_error(&a);
    assert!(matches!(e, Error::Backing { .. }), "{e:?}");
    let text = error_text(&e);
    assert!(
        text.contains("loop") && text.contains("a.qcow2"),
        "the error should name the loop: {text}"
    );
}

/// A backing file that does not exist.
#[test]
fn backing_missing() {
    let dir = tempdir();
    create_overlay(dir.path(), "a.qcow2", "nowhere.qcow2");
    let e = open_error(&dir.path().join("a.qcow2"));
    assert!(matches!(e, Error::Backing { .. }), "{e:?}");
    assert!(
        error_text(&e).contains("nowhere.qcow2"),
        "{}",
        error_text(&e)
    );
}

/// Chains of [`MAX_BACKING_DEPTH`] layers below the top open (and read the base's
/// data through every layer); one more is refused.
#[test]
fn backing_chain_too_deep() {
    let dir = tempdir();
    let d = dir.path();
    let name = |i: usize| format!("l{i:03}.qcow2");
    qemu_img_create(&d.join(name(0)), 1 << 20, "");
    qemu_io_ok("qcow2", &d.join(name(0)), &["write -P 0x5d 4096 512"]);
    // One overlay made by qemu-img, copied with only the backing name changed.
    create_overlay(d, "template.qcow2", &name(0));
    let template = std::fs::read(d.join("template.qcow2")).expect("read template");
    let off = be64(&d.join("template.qcow2"), 8) as usize;
    let len = be32(&d.join("template.qcow2"), 16) as usize;
    assert_eq!(len, name(0).len());
    let top = MAX_BACKING_DEPTH + 1;
    for i in 1..=top {
        let mut bytes = template.clone();
        bytes[off..off + len].copy_from_slice(name(i - 1).as_bytes());
        std::fs::write(d.join(name(i)), bytes).expect("write layer");
    }

    let ok = d.join(name(MAX_BACKING_DEPTH));
    // On half the stack a spawned thread gets by default (2 MiB): opening and
    // reading recurse once per layer, and must keep a margin.
    let b = run_bounded("deepest allowed chain", WATCHDOG, move || {
        std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || {
                let img = open_retry(&OpenOptions::new(), &ok)
                    .unwrap_or_else(|e| panic!("open: {}", error_text(&e)));
                let mut buf = [0u8; 512];
                img.read_at(&mut buf, 4096).expect("read through the chain");
                buf
            })
            .expect("spawn")
            .join()
            .unwrap_or_else(|_| panic!("the chain's open or read panicked"))
    });
    check_alloc("deepest allowed chain", &b);
    let buf = b
        .result
        .unwrap_or_else(|p| panic!("deepest allowed chain panicked: {p}"));
    assert_eq!(buf, [0x5d; 512]);

    let e = open_error(&d.join(name(top)));
    assert!(matches!(e, Error::Backing { .. }), "{e:?}");
    assert!(error_text(&e).contains("deeper"), "{}", error_text(&e));
}

// ---- randomized robustness ------------------------------------------------------------------

/// Regions of metadata worth mutating in `img`: the header cluster's first 512 bytes,
/// the L1 table, the first L2 tables, the refcount table and first refcount block, the
/// snapshot table.
fn metadata_regions(img: &[u8]) -> Vec<(usize, usize)> {
    let b64 = |o: usize| u64::from_be_bytes(img[o..o + 8].try_into().expect("8 bytes"));
    let b32 = |o: usize| u32::from_be_bytes(img[o..o + 4].try_into().expect("4 bytes"));
    let cs = 1usize << b32(20);
    let mut r = vec![(0, 512)];
    let l1 = b64(40) as usize;
    let l1_size = b32(36) as usize;
    r.push((l1, (l1_size * 8).max(8)));
    for i in 0..l1_size.min(4) {
        let l2 = (b64(l1 + 8 * i) & OFFSET_MASK) as usize;
        if l2 != 0 {
            r.push((l2, cs.min(2048)));
        }
    }
    let rt = b64(48) as usize;
    r.push((rt, 64));
    let rb = (b64(rt) & !(cs as u64 - 1)) as usize;
    if rb != 0 {
        r.push((rb, cs.min(512)));
    }
    if b32(60) > 0 {
        r.push((b64(64) as usize, 256));
    }
    r.retain(|&(o, l)| o + l <= img.len());
    r
}

/// Open (read-only or for writing), read, block status, check and — when writable —
/// write, zero, discard, flush and close, ignoring errors. Returns `None` when the open
/// failed, else the number of failed chunk reads.
fn robustness_pass(bytes: Vec<u8>, write: bool) -> Option<usize> {
    let storage = Arc::new(CappedStorage::new(bytes, 64 << 20));
    let opts = OpenOptions::new().write(write).open_backing(false);
    let Ok(img) = Image::from_storage(storage, &opts) else {
        return None;
    };
    let size = img.size().min(4 << 20);
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0;
    let mut errors = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        if img.read_at(&mut buf[..n], off).is_err() {
            errors += 1;
        }
        off += n as u64;
    }
    let _ = img.block_status(0, size);
    let _ = img.check();
    if write && size > 0 {
        let _ = img.write_at(&[0xa5; 3000], size / 3);
        let _ = img.write_at(&[0x5a; 512], 0);
        let _ = img.write_zeroes(0, size.min(1 << 20), true);
        let _ = img.discard(size / 2, size / 2);
        let _ = img.flush();
        let _ = img.check();
        let _ = img.close();
    }
    Some(errors)
}

#[test]
fn random_mutations() {
    // Three shapes of valid image, small so that mutations land in metadata.
    let dir = tempdir();
    let mut bases = Vec::new();
    let a = dir.path().join("a.qcow2");
    qemu_img_create(&a, 256 << 10, "cluster_size=512");
    qemu_io_ok(
        "qcow2",
        &a,
        &[
            "write -P 1 0 5000",
            "write -P 2 100000 70000",
            "write -z 180000 4096",
        ],
    );
    let b = dir.path().join("b.qcow2");
    qemu_img_create(&b, 4 << 20, "cluster_size=4096");
    qemu_io_ok(
        "qcow2",
        &b,
        &["write -P 3 0 9000", "write -P 4 2200000 5000"],
    );
    run_ok(qemu_img().args(["snapshot", "-c", "s"]).arg(&b));
    qemu_io_ok("qcow2", &b, &["write -P 5 0 4096"]);
    let c = dir.path().join("c.qcow2");
    qemu_img_create(&c, 2 << 20, "cluster_size=16384,extended_l2=on");
    qemu_io_ok(
        "qcow2",
        &c,
        &[
            "write -P 6 0 1000",
            "write -P 7 70000 40000",
            "write -z -u 300000 16384",
        ],
    );
    let d = dir.path().join("d.qcow2");
    let src = dir.path().join("d.raw");
    std::fs::write(&src, qcowx_tests::compressible(9, 1 << 20)).expect("write raw");
    run_ok(
        qemu_img()
            .args([
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4096,compression_type=zstd",
            ])
            .arg(&src)
            .arg(&d),
    );
    for p in [a, b, c, d] {
        bases.push(std::fs::read(&p).expect("read base"));
    }

    let seed = std::env::var("QCOWX_HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x0bad_c0de);
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    let (mut refused, mut opened, mut read_failed) = (0, 0, 0);
    // QCOWX_HOSTILE_ITERATIONS raises the count for a longer local search.
    let iterations: usize = std::env::var("QCOWX_HOSTILE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    for (bi, base) in bases.iter().enumerate() {
        let regions = metadata_regions(base);
        for it in 0..iterations {
            let mut bytes = base.clone();
            let mut muts = Vec::new();
            for _ in 0..rng.range(1, 5) {
                let (o, l) = regions[rng.below(regions.len() as u64) as usize];
                let at = o + rng.below(l as u64) as usize;
                match rng.below(3) {
                    // Flip one bit, or set one byte.
                    0 | 1 => {
                        let v = if rng.chance(1, 2) {
                            bytes[at] ^ (1 << rng.below(8))
                        } else {
                            rng.below(256) as u8
                        };
                        bytes[at] = v;
                        muts.push((at, u64::from(v)));
                    }
                    // Replace an aligned 64-bit word (a table entry or header field)
                    // with an offset near the end of the file, a huge value, or noise.
                    _ => {
                        let at = at & !7;
                        if at + 8 > bytes.len() {
                            continue;
                        }
                        let len = bytes.len() as u64;
                        let v = match rng.below(4) {
                            0 => ((len + rng.below(1 << 20)) & !511) | COPIED,
                            1 => u64::MAX >> rng.below(8),
                            2 => rng.next_u64(),
                            _ => (len.next_multiple_of(512) - 512) | COPIED,
                        };
                        bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
                        muts.push((at, v));
                    }
                }
            }
            let write = it % 3 == 0;
            let what = format!("base {bi} iteration {it} (write {write}) mutations {muts:x?}");
            let b = run_bounded(&what, WATCHDOG, move || robustness_pass(bytes, write));
            match &b.result {
                Ok(None) => refused += 1,
                Ok(Some(0)) => opened += 1,
                Ok(Some(_)) => read_failed += 1,
                Err(p) => failures.push(format!("{what}: panicked: {p}")),
            }
            if b.largest_alloc > ALLOC_BUDGET {
                failures.push(format!(
                    "{what}: allocated {} bytes at once",
                    b.largest_alloc
                ));
            }
        }
    }
    println!(
        "mutated images: {refused} refused at open, {opened} read fine, \
         {read_failed} opened with read errors"
    );
    // The mutations must exercise both the header checks and the table walks.
    assert!(refused > 0 && opened + read_failed > 0);
    assert!(
        failures.is_empty(),
        "{} of {} mutated images broke the library:\n{}",
        failures.len(),
        bases.len() * iterations,
        failures[..failures.len().min(20)].join("\n")
    );
}
