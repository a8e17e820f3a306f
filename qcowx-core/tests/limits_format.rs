//! Limits of the image's size and its on-disk structures, at the limit and one past it
//! (spec/limits.md): the L1 table, the virtual size, the refcount table, the number
//! of header extensions, and a header field deep in a 2 MiB first cluster; block status
//! over the largest disk.
//!
//! At the limit the operation works (and QEMU, the oracle, accepts the result); one
//! past it qcowx refuses with a typed error that names the limit, and QEMU refuses
//! the same input. Images that would be huge are made cheap: 512-byte clusters,
//! header fields written directly.
//!
//! The QEMU tools come from the Debian package `qemu-utils`; a missing tool fails the
//! test with a message naming it.

mod limits_common;

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileExt;

use qcowx_core::format::header::{HeaderError, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_VIRTUAL_SIZE};
use qcowx_core::{CreateOptions, Error, Image, OpenOptions};
use qcowx_tests::{
    assert_qemu_check_clean, be32, be64, patch, qemu_img_fails, qemu_img_ok, read_at, tempdir,
};

use limits_common::{create, file_len, p, set_dirty};

// Header field offsets (QCOW2 specification).
const HDR_SIZE: u64 = 24;
const HDR_L1_SIZE: u64 = 36;
const HDR_REFTABLE_OFFSET: u64 = 48;
const HDR_REFTABLE_CLUSTERS: u64 = 56;

// ---- the L1 table ------------------------------------------------------------------------

/// With 512-byte clusters an L1 entry maps 32 KiB, so the 32 MiB L1 limit is a
/// 128 GiB disk: that size is created, written at its last byte, checked clean by
/// QEMU; 512 bytes more is refused by both. A header naming one entry more than the
/// limit does not open; resize stops at the limit too.
#[test]
fn l1_table_at_the_limit_works_and_one_entry_more_is_refused() {
    let dir = tempdir();
    let max_entries = MAX_L1_BYTES / 8;
    let per_entry = 512 / 8 * 512;
    let max_size = max_entries * per_entry;
    assert_eq!(max_size, 128 << 30);

    let at = dir.path().join("at.qcow2");
    let mut opts = CreateOptions::new(max_size);
    opts.cluster_size = 512;
    let img = Image::create(&at, &opts).expect("create at the L1 limit");
    assert_eq!(u64::from(img.header().l1_size), max_entries);
    img.write_at(b"last sector", max_size - 512).expect("write");
    img.close().expect("close");
    assert_qemu_check_clean(&at);
    let img = Image::open(&at).expect("open at the limit");
    let mut buf = [0u8; 11];
    img.read_at(&mut buf, max_size - 512).expect("read");
    assert_eq!(&buf, b"last sector");
    drop(img);
    let qemu_at = dir.path().join("qemu-at.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        &p(&qemu_at),
        &max_size.to_string(),
    ]);

    // One sector more needs one more L1 entry.
    let past = dir.path().join("past.qcow2");
    opts.size = max_size + 512;
    let err = Image::create(&past, &opts).expect_err("one entry past the L1 limit");
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("L1 table larger than 32 MiB")),
        "{err:?}"
    );
    let qemu_past = dir.path().join("qemu-past.qcow2");
    let msg = qemu_img_fails(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        &p(&qemu_past),
        &(max_size + 512).to_string(),
    ]);
    assert!(msg.contains("too large"), "{msg}");

    // A header whose l1_size is one past the limit (the file is long enough for it).
    let hostile = dir.path().join("hostile.qcow2");
    std::fs::copy(&at, &hostile).expect("copy");
    File::options()
        .write(true)
        .open(&hostile)
        .and_then(|f| f.set_len(file_len(&at) + 1024))
        .expect("extend");
    patch(
        &hostile,
        HDR_L1_SIZE,
        &((max_entries + 1) as u32).to_be_bytes(),
    );
    let err = Image::open(&hostile).expect_err("l1_size past the limit");
    assert!(
        matches!(
            &err,
            Error::Header {
                source: HeaderError::Field {
                    field: "l1_size",
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    qemu_img_fails(&["info", "-f", "qcow2", &p(&hostile)]);

    // Resize: up to the limit works, one sector more is refused.
    let grow = dir.path().join("grow.qcow2");
    opts.size = max_size - per_entry;
    Image::create(&grow, &opts)
        .and_then(|img| img.close())
        .expect("create");
    let img = Image::open_rw(&grow).expect("open");
    let err = img
        .resize(max_size + 512)
        .expect_err("resize past the limit");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    img.resize(max_size).expect("resize to the limit");
    assert_eq!(img.size(), max_size);
    img.close().expect("close");
    assert_qemu_check_clean(&grow);
}

/// The virtual size cap, 2^56 bytes (56-bit host offsets), binds with 2 MiB
/// clusters: 2^56 bytes are created and written at the last sector; 512 bytes more
/// are refused, at create, resize and open.
#[test]
fn virtual_size_at_the_limit_works_and_one_sector_more_is_refused() {
    let dir = tempdir();
    let max = MAX_VIRTUAL_SIZE;
    let path = dir.path().join("huge.qcow2");
    let mut opts = CreateOptions::new(max);
    opts.cluster_size = 2 << 20;
    let img = Image::create(&path, &opts).expect("create at 2^56 bytes");
    img.write_at(b"the end", max - 512)
        .expect("write the last sector");
    let err = img.resize(max + 512).expect_err("resize past 2^56");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    img.close().expect("close");
    assert_qemu_check_clean(&path);
    let img = Image::open(&path).expect("open");
    let mut buf = [0u8; 7];
    img.read_at(&mut buf, max - 512).expect("read");
    assert_eq!(&buf, b"the end");
    drop(img);

    opts.size = max + 512;
    let err = Image::create(dir.path().join("past.qcow2"), &opts).expect_err("2^56 + 512");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let hostile = dir.path().join("hostile.qcow2");
    std::fs::copy(&path, &hostile).expect("copy");
    patch(&hostile, HDR_SIZE, &(max + 512).to_be_bytes());
    let err = Image::open(&hostile).expect_err("a header past 2^56");
    assert!(
        matches!(
            &err,
            Error::Header {
                source: HeaderError::Field { field: "size", .. },
                ..
            }
        ),
        "{err:?}"
    );
}

/// Block status over the whole of the largest disk (2^56 bytes, 2 MiB clusters: 2^35
/// clusters behind 131,072 L1 entries) in one call: the answer is the three extents
/// the disk holds, and the call costs what the disk's tables hold, not its length.
/// Planned cluster by cluster (about 20 ns each here) the call took over ten
/// minutes; an L1 entry without an L2 table is one step, so it takes milliseconds.
/// The bound below is a hang guard two orders of magnitude from either.
#[test]
fn block_status_of_the_largest_disk_follows_its_tables_not_its_length() {
    use qcowx_core::{Extent, ExtentStatus};
    let dir = tempdir();
    let max = MAX_VIRTUAL_SIZE;
    let path = dir.path().join("huge.qcow2");
    let mut opts = CreateOptions::new(max);
    opts.cluster_size = 2 << 20;
    let img = Image::create(&path, &opts).expect("create at 2^56 bytes");
    let at = max / 3 - (max / 3) % (2 << 20);
    img.write_at(&[7u8; 4096], at).expect("write");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(img.block_status(0, max));
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("block status of the whole disk did not answer within 120 s")
        .expect("block status");
    let shape: Vec<(u64, u64, ExtentStatus)> = got
        .iter()
        .map(|e: &Extent| (e.offset, e.length, e.status))
        .collect();
    assert_eq!(
        shape,
        [
            (0, at, ExtentStatus::Unallocated),
            (at, 2 << 20, ExtentStatus::Data),
            (
                at + (2 << 20),
                max - at - (2 << 20),
                ExtentStatus::Unallocated
            ),
        ]
    );
}

// ---- the refcount table --------------------------------------------------------------------

/// A refcount table of 8 MiB opens (in qcowx and QEMU); one cluster more does not.
#[test]
fn refcount_table_at_the_limit_opens_and_one_cluster_more_is_refused() {
    let dir = tempdir();
    let cs = 65536u64;
    for (clusters, ok) in [
        (MAX_REFTABLE_BYTES / cs, true),
        (MAX_REFTABLE_BYTES / cs + 1, false),
    ] {
        let path = dir.path().join(format!("reftable-{clusters}.qcow2"));
        create(&path, 16 << 20, cs);
        {
            let img = Image::open_rw(&path).expect("open");
            img.write_at(&[7u8; 4096], 65536).expect("write");
            img.close().expect("close");
        }
        // Move the table to the end of the file and make it `clusters` long.
        let old = be64(&path, HDR_REFTABLE_OFFSET);
        let old_clusters = u64::from(be32(&path, HDR_REFTABLE_CLUSTERS));
        let table = read_at(&path, old, (old_clusters * cs) as usize);
        let at = file_len(&path).next_multiple_of(cs);
        patch(&path, at, &table);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(at + clusters * cs))
            .expect("extend (sparse)");
        patch(&path, HDR_REFTABLE_OFFSET, &at.to_be_bytes());
        patch(
            &path,
            HDR_REFTABLE_CLUSTERS,
            &(clusters as u32).to_be_bytes(),
        );
        set_dirty(&path);
        if ok {
            let img = Image::open_rw(&path).expect("an 8 MiB refcount table");
            let mut buf = [0u8; 4096];
            img.read_at(&mut buf, 65536).expect("read");
            assert_eq!(buf, [7u8; 4096]);
            img.close().expect("close (rebuilds the refcounts)");
            assert_qemu_check_clean(&path);
        } else {
            let err = Image::open(&path).expect_err("a refcount table past 8 MiB");
            assert!(
                matches!(
                    &err,
                    Error::Header {
                        source: HeaderError::Field {
                            field: "refcount_table_clusters",
                            ..
                        },
                        ..
                    }
                ),
                "{err:?}"
            );
            qemu_img_fails(&["info", "-f", "qcow2", &p(&path)]);
        }
    }
}

// ---- header extensions -------------------------------------------------------------------------

/// 4,096 header extensions parse; a 4,097th is refused with an error naming it.
#[test]
fn at_most_4096_header_extensions() {
    use qcowx_core::format::extensions::{Extension, Extensions};
    let area = |n: u32| {
        let mut out = Vec::new();
        for i in 0..n {
            // Unknown types, kept as they are; a little data each.
            Extension {
                kind: 0x7100_0000 + i,
                data: i.to_be_bytes().to_vec(),
            }
            .write_to(&mut out);
        }
        Extension::end().write_to(&mut out);
        out
    };
    let at_limit = area(4096);
    let parsed = Extensions::parse(&at_limit, 0, at_limit.len() as u64).expect("4,096 parse");
    assert_eq!(parsed.iter().count(), 4096);
    assert_eq!(
        parsed.get(0x7100_0000 + 4095).map(|e| e.data.clone()),
        Some(4095u32.to_be_bytes().to_vec())
    );
    let past = area(4097);
    match Extensions::parse(&past, 0, past.len() as u64) {
        Err(HeaderError::Extension { kind, offset, why }) => {
            assert_eq!(kind, 0x7100_0000 + 4096);
            assert_eq!(offset, 4096 * 16, "the 4,097th extension's offset");
            assert!(why.contains("too many"), "{why}");
        }
        other => panic!("4,097 extensions: {other:?}"),
    }
}

/// The first cluster is read in two steps (a probe, then the rest of a cluster larger
/// than the probe): a backing name QEMU accepts 1 MiB into a 2 MiB first cluster must
/// be read from the second step, not left as the zeros of the buffer.
#[test]
fn a_header_field_deep_in_a_2_mib_first_cluster_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img_ok(&["create", "-q", "-f", "qcow2", b, "4M"]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        "-b",
        b,
        "-F",
        "qcow2",
        t,
    ]);
    // Move the backing name to 1 MiB into the first cluster; no extension ends there.
    let f = FsOpenOptions::new()
        .read(true)
        .write(true)
        .open(&top)
        .unwrap();
    let mut raw = [0u8; 12];
    f.read_exact_at(&mut raw, 8).unwrap();
    let off = u64::from_be_bytes(raw[..8].try_into().unwrap());
    let len = u32::from_be_bytes(raw[8..].try_into().unwrap()) as usize;
    let mut name = vec![0u8; len];
    f.read_exact_at(&mut name, off).unwrap();
    let deep = 1u64 << 20;
    f.write_all_at(&name, deep).unwrap();
    f.write_all_at(&deep.to_be_bytes(), 8).unwrap();
    drop(f);
    let info = String::from_utf8(qemu_img_ok(&["info", "-U", t]).stdout).unwrap();
    assert!(info.contains(&format!("backing file: {b}")), "{info}");
    let img = OpenOptions::new()
        .write(false)
        .open_backing(false)
        .open(&top)
        .unwrap();
    assert_eq!(img.header().backing_file.as_deref(), Some(b));
}
