//! Limits of the snapshot table and of root names, at the limit and one past it
//! (spec/limits.md): the number of snapshots, the table's bytes, a snapshot's extra
//! data, and the length of snapshot and VDI names.
//!
//! At the limit the operation works (and QEMU, the oracle, accepts the result); one
//! past it qcowx refuses with a typed error that names the limit, and QEMU refuses
//! the same input. Images that would be huge are made cheap: 512-byte clusters,
//! snapshot tables whose entries share one L1 table, header fields written directly.
//!
//! The QEMU tools come from the Debian package `qemu-utils`; a missing tool fails the
//! test with a message naming it.

mod limits_common;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use qcowx_core::format::header::{HeaderError, MAX_SNAPSHOTS};
use qcowx_core::format::snapshot::{
    parse_table, SnapshotEntry, SnapshotError, MAX_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES,
};
use qcowx_core::storage::MemStorage;
use qcowx_core::vdi::MAX_NAME_LEN;
use qcowx_core::{CreateOptions, Error, Image};
use qcowx_tests::{
    assert_qemu_check_clean, be32, be64, patch, qemu_img_fails, qemu_img_ok, read_at, tempdir,
};

use limits_common::{file_len, p, set_dirty};

// ---- helpers ----------------------------------------------------------------------------

// Header field offsets (QCOW2 specification).
const HDR_NB_SNAPSHOTS: u64 = 60;
const HDR_SNAPSHOTS_OFFSET: u64 = 64;

/// The snapshot table of the image at `path`.
fn read_table(path: &Path) -> Vec<SnapshotEntry> {
    let n = be32(path, HDR_NB_SNAPSHOTS);
    let off = be64(path, HDR_SNAPSHOTS_OFFSET);
    let bytes = read_at(path, off, (file_len(path) - off) as usize);
    parse_table(&bytes, off, n).expect("parse the snapshot table")
}

/// Writes `entries` as the snapshot table at the end of the file (cluster-aligned)
/// and points the header at it, with the dirty bit set.
fn install_table(path: &Path, entries: &[SnapshotEntry], cluster_size: u64) -> u64 {
    let mut bytes = Vec::new();
    for e in entries {
        e.write_to(&mut bytes);
    }
    let at = file_len(path).next_multiple_of(cluster_size);
    patch(path, at, &bytes);
    let end = (at + bytes.len() as u64).next_multiple_of(cluster_size);
    File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(end))
        .expect("pad the file");
    patch(
        path,
        HDR_NB_SNAPSHOTS,
        &(entries.len() as u32).to_be_bytes(),
    );
    patch(path, HDR_SNAPSHOTS_OFFSET, &at.to_be_bytes());
    set_dirty(path);
    bytes.len() as u64
}

/// A snapshot entry as QEMU writes one (24 bytes of extra data, no qcowx block)
/// naming the L1 table of `like`.
fn foreign_entry(like: &SnapshotEntry, id: u64, name: String, extra_len: usize) -> SnapshotEntry {
    let mut extra = vec![0u8; extra_len];
    if extra_len >= 16 {
        let size = like.disk_size().expect("disk size in the extra data");
        extra[8..16].copy_from_slice(&size.to_be_bytes());
    }
    SnapshotEntry {
        l1_table_offset: like.l1_table_offset,
        l1_size: like.l1_size,
        id: id.to_string(),
        name,
        date_sec: 1_700_000_000,
        date_nsec: 0,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        extra,
    }
}

/// An image with one snapshot `base` (of a 32 KiB disk with 512-byte clusters) whose
/// L1 table the crafted entries share; `data` is the content of both.
fn image_with_base(path: &Path) -> Vec<u8> {
    let mut opts = CreateOptions::new(32 << 10);
    opts.cluster_size = 512;
    let img = Image::create(path, &opts).expect("create");
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    img.write_at(&data, 1024).expect("write");
    img.snapshot("default", "base").expect("snapshot");
    img.close().expect("close");
    data
}

fn is_limit(e: &Error) -> bool {
    matches!(e, Error::Limit { .. })
}

// ---- the snapshot table --------------------------------------------------------------------

/// 65,535 entries are crafted (sharing one L1 table); qcowx takes the 65,536th
/// snapshot, then refuses the next snapshot and fork with `Error::Limit`, as QEMU
/// refuses a 65,537th. A header with 65,537 entries does not open, in qcowx or QEMU.
#[test]
fn snapshot_count_at_the_limit_works_and_one_more_is_refused() {
    let dir = tempdir();
    let path = dir.path().join("many.qcow2");
    let data = image_with_base(&path);
    let base = read_table(&path).remove(0);
    let mut entries = vec![base.clone()];
    for i in 1..MAX_SNAPSHOTS - 1 {
        entries.push(foreign_entry(&base, u64::from(i) + 1, format!("s{i}"), 24));
    }
    install_table(&path, &entries, 512);

    let img = Image::open_rw(&path).expect("open with 65,535 snapshots");
    assert_eq!(img.list().expect("list").len(), MAX_SNAPSHOTS as usize);
    img.snapshot("default", "last")
        .expect("the 65,536th snapshot");
    let err = img.snapshot("default", "one-more").expect_err("65,537th");
    assert!(is_limit(&err), "{err:?}");
    assert!(err.to_string().contains("65536"), "{err}");
    let err = img.fork("base", "vdi").expect_err("fork past the limit");
    assert!(is_limit(&err), "{err:?}");
    img.close().expect("close");

    let img = Image::open(&path).expect("reopen");
    assert_eq!(img.header().nb_snapshots, MAX_SNAPSHOTS);
    let last = Arc::new(img).open_root("last").expect("open 'last'");
    let mut back = vec![0u8; data.len()];
    last.read_at(&mut back, 1024).expect("read");
    assert_eq!(back, data);
    drop(last);

    assert_qemu_check_clean(&path);
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&path, &copy).expect("copy");
    let msg = qemu_img_fails(&["snapshot", "-c", "qemu-one-more", &p(&copy)]);
    assert!(
        msg.to_lowercase().contains("snapshot"),
        "QEMU's refusal: {msg}"
    );

    // One entry past the limit in the header.
    patch(&copy, HDR_NB_SNAPSHOTS, &(MAX_SNAPSHOTS + 1).to_be_bytes());
    let err = Image::open(&copy).expect_err("65,537 snapshots");
    assert!(
        matches!(
            &err,
            Error::Header {
                source: HeaderError::Field {
                    field: "nb_snapshots",
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    qemu_img_fails(&["info", "-f", "qcow2", &p(&copy)]);
}

/// Entries with long names (as QEMU allows) fill the table to 64 MiB less one qcowx
/// entry; qcowx appends that entry (the table is then exactly 64 MiB, which QEMU
/// opens), and refuses the next snapshot with `Error::Limit`. A table whose last entry
/// ends one byte past 64 MiB does not open, in qcowx or QEMU.
#[test]
fn snapshot_table_bytes_at_the_limit_work_and_one_byte_more_is_refused() {
    let dir = tempdir();
    let path = dir.path().join("big-table.qcow2");
    let data = image_with_base(&path);
    let base = read_table(&path).remove(0);
    // qcowx's next entry: 40 bytes, 80 bytes of extra data, a 4-digit ID and the
    // 1-byte name "x", padded to 8.
    let qcowx_entry = 128;
    let target = MAX_SNAPSHOT_TABLE_BYTES - qcowx_entry;
    let entries = big_entries(&base, target);
    let used: u64 = entries.iter().map(|e| e.encoded_len() as u64).sum();
    assert_eq!(used, target);
    let next_id = (entries.len() + 1).to_string();
    assert_eq!(
        (40 + 80 + next_id.len() + 1).next_multiple_of(8) as u64,
        qcowx_entry,
        "the crafted table leaves room for exactly one entry"
    );
    install_table(&path, &entries, 512);

    let img = Image::open_rw(&path).expect("open a table of 64 MiB less one entry");
    img.snapshot("default", "x")
        .expect("the entry that fills the table to 64 MiB");
    let err = img.snapshot("default", "y").expect_err("past 64 MiB");
    assert!(is_limit(&err), "{err:?}");
    assert!(err.to_string().contains("bytes"), "{err}");
    img.close().expect("close");

    let img = Arc::new(Image::open(&path).expect("reopen a 64 MiB table"));
    let table: u64 = read_table(&path)
        .iter()
        .map(|e| e.encoded_len() as u64)
        .sum();
    assert_eq!(table, MAX_SNAPSHOT_TABLE_BYTES);
    let x = img.open_root("x").expect("open 'x'");
    let mut back = vec![0u8; data.len()];
    x.read_at(&mut back, 1024).expect("read");
    assert_eq!(back, data);
    drop((x, img));
    assert_qemu_check_clean(&path);

    // The last entry's name one byte longer: it ends one byte past 64 MiB.
    let past = dir.path().join("past.qcow2");
    image_with_base(&past);
    let mut entries = big_entries(&read_table(&past).remove(0), MAX_SNAPSHOT_TABLE_BYTES);
    let last = entries.last_mut().expect("entries");
    assert_eq!(
        40 + last.extra.len() + last.id.len() + last.name.len(),
        last.encoded_len(),
        "the last entry has no padding"
    );
    last.name.push('z');
    install_table(&past, &entries, 512);
    let err = Image::open(&past).expect_err("a table one byte past 64 MiB");
    assert!(
        matches!(
            &err,
            Error::Snapshot {
                source: SnapshotError::Invalid { why, .. },
                ..
            } if why.contains("64 MiB")
        ),
        "{err:?}"
    );
    let msg = qemu_img_fails(&["info", "-f", "qcow2", &p(&past)]);
    assert!(msg.contains("Snapshot table"), "{msg}");
}

/// `base` followed by entries with long names whose padded lengths add up to
/// exactly `total` bytes (each entry 64 KiB but the last; no entry needs padding).
fn big_entries(base: &SnapshotEntry, total: u64) -> Vec<SnapshotEntry> {
    let mut entries = vec![base.clone()];
    let mut used = base.encoded_len() as u64;
    let mut id = 2u64;
    while used < total {
        let len = (total - used).min(65_536);
        let fixed = 40 + 24 + id.to_string().len() as u64;
        assert!(len > fixed, "room for a name");
        let name: String = format!("n{id}-")
            .chars()
            .chain(std::iter::repeat('x'))
            .take((len - fixed) as usize)
            .collect();
        let e = foreign_entry(base, id, name, 24);
        assert_eq!(e.encoded_len() as u64, len);
        used += len;
        entries.push(e);
        id += 1;
    }
    entries
}

/// Extra data of 1,024 bytes opens; 1,025 does not, in qcowx or QEMU.
#[test]
fn snapshot_extra_data_at_the_limit_opens_and_one_byte_more_is_refused() {
    let dir = tempdir();
    for (extra, ok) in [
        (MAX_EXTRA_DATA as usize, true),
        (MAX_EXTRA_DATA as usize + 1, false),
    ] {
        let path = dir.path().join(format!("extra-{extra}.qcow2"));
        let data = image_with_base(&path);
        let base = read_table(&path).remove(0);
        let entries = vec![base.clone(), foreign_entry(&base, 2, "big".into(), extra)];
        install_table(&path, &entries, 512);
        let opened = Image::open(&path);
        if ok {
            let img = Arc::new(opened.expect("1,024 bytes of extra data"));
            let big = img.open_root("big").expect("open 'big'");
            let mut back = vec![0u8; data.len()];
            big.read_at(&mut back, 1024).expect("read");
            assert_eq!(back, data);
            drop((big, img));
            qemu_img_ok(&["info", "-f", "qcow2", &p(&path)]);
        } else {
            let err = opened.expect_err("1,025 bytes of extra data");
            assert!(
                matches!(&err, Error::Snapshot { source: SnapshotError::Invalid { why, .. }, .. }
                    if why.contains("1024")),
                "{err:?}"
            );
            qemu_img_fails(&["info", "-f", "qcow2", &p(&path)]);
        }
    }
}

// ---- names -------------------------------------------------------------------------------

/// Snapshot and VDI names: 128 bytes work, 129 are refused before anything is written.
#[test]
fn names_at_the_limit_work_and_one_byte_more_is_refused() {
    let img = Image::create_in(Arc::new(MemStorage::new()), &CreateOptions::new(1 << 20))
        .expect("create");
    let long = "n".repeat(MAX_NAME_LEN);
    let longer = "n".repeat(MAX_NAME_LEN + 1);
    img.snapshot("default", &long)
        .expect("128-byte snapshot name");
    let err = img.snapshot("default", &longer).expect_err("129 bytes");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    img.fork(&long, &"v".repeat(MAX_NAME_LEN))
        .expect("128-byte VDI name");
    let err = img
        .fork(&long, &"w".repeat(MAX_NAME_LEN + 1))
        .expect_err("129 bytes");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert_eq!(img.list().expect("list").len(), 3);
}
