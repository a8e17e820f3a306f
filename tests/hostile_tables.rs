//! Hostile images, the tables: valid `qemu-img` images whose snapshot table, L1 and L2
//! entries or compressed cluster descriptors are patched to break one thing each.
//! Every case must give a typed [`qcowx_core::Error`] (the variant is
//! matched), never panic, never hang (each open, full read and check runs under a 30 s
//! watchdog) and never make an absurd allocation (the binary's global allocator records
//! the largest single allocation of each case; see [`qcowx_tests::alloc_limit`]).
//!
//! The base images and the way a case runs are in `qcowx_tests::hostile_tools`
//! (tests/src/hostile_tools.rs), with the header field offsets the cases patch.

use std::path::Path;

use qcowx_core::format::snapshot::SnapshotError;
use qcowx_core::{Error, Image};
use qcowx_tests::hostile_tools::*;
use qcowx_tests::{alloc_limit, be32, be64, patch, qemu_img, run_ok, tempdir};

#[global_allocator]
static ALLOC: alloc_limit::LimitAlloc = alloc_limit::LimitAlloc;

/// The compressed flag of L2 entries.
const COMPRESSED: u64 = 1 << 62;

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
