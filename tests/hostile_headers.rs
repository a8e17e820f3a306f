//! Hostile images, the header: valid `qemu-img` images with one header field (or the
//! header's length, an extension, a backing file name) patched to break one thing each.
//! Every case must give a typed [`qcowx_core::Error`] (the variant is
//! matched), never panic, never hang (each open, full read and check runs under a 30 s
//! watchdog) and never make an absurd allocation (the binary's global allocator records
//! the largest single allocation of each case; see [`qcowx_tests::alloc_limit`]).
//!
//! The base images and the way a case runs are in `qcowx_tests::hostile_tools`
//! (tests/src/hostile_tools.rs).
//!
//! Header field offsets used below (QCOW2 specification):
//! 0 magic, 4 version, 8 backing_file_offset, 16 backing_file_size, 20 cluster_bits,
//! 24 size, 32 crypt_method, 36 l1_size, 40 l1_table_offset, 48 refcount_table_offset,
//! 56 refcount_table_clusters, 60 nb_snapshots, 64 snapshots_offset,
//! 72 incompatible_features, 80 compatible_features, 88 autoclear_features,
//! 96 refcount_order, 100 header_length, 104 compression_type.

use qcowx_core::format::header::HeaderError;
use qcowx_core::{Error, OpenOptions};
use qcowx_tests::hostile_tools::*;
use qcowx_tests::{alloc_limit, be32, be64, patch};

#[global_allocator]
static ALLOC: alloc_limit::LimitAlloc = alloc_limit::LimitAlloc;

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
