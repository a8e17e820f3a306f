//! Every limit of the library, at the limit and one past it (spec/limits.md).
//!
//! At the limit the operation works (and QEMU, the oracle, accepts the result); one
//! past it qcowx refuses with a typed error that names the limit, and QEMU refuses
//! the same input. Images that would be huge are made cheap: 512-byte clusters,
//! snapshot tables whose entries share one L1 table, header fields written directly.
//!
//! The QEMU tools come from the Debian package `qemu-utils`; a missing tool fails the
//! test with a message naming it.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use qcowx_core::engine::backing::MAX_BACKING_DEPTH;
use qcowx_core::engine::cache::{L2Cache, DEFAULT_CACHE_BYTES, MIN_CACHED_TABLES};
use qcowx_core::engine::chain::backing_chain;
use qcowx_core::format::addr::HostOffset;
use qcowx_core::format::header::{
    HeaderError, MAX_BACKING_NAME, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS,
    MAX_VIRTUAL_SIZE,
};
use qcowx_core::format::snapshot::{
    parse_table, SnapshotEntry, SnapshotError, MAX_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES,
};
use qcowx_core::storage::{Access, MemStorage, Storage, Watched};
use qcowx_core::vdi::MAX_NAME_LEN;
use qcowx_core::{CreateOptions, Error, Image, LockMode, OpenOptions};
use qcowx_tests::{
    assert_qemu_check_clean, be32, be64, describe, error_text, patch, qemu_img, qemu_img_fails,
    qemu_img_ok, read_at, run, tempdir,
};

// ---- helpers ----------------------------------------------------------------------------

fn p(path: &Path) -> String {
    path.display().to_string()
}

// Header field offsets (QCOW2 specification).
const HDR_SIZE: u64 = 24;
const HDR_L1_SIZE: u64 = 36;
const HDR_REFTABLE_OFFSET: u64 = 48;
const HDR_REFTABLE_CLUSTERS: u64 = 56;
const HDR_NB_SNAPSHOTS: u64 = 60;
const HDR_SNAPSHOTS_OFFSET: u64 = 64;
const HDR_INCOMPATIBLE: u64 = 72;

/// Sets the dirty bit, so that qcowx and QEMU rebuild the refcounts a hand edit made
/// stale.
fn set_dirty(path: &Path) {
    let bits = be64(path, HDR_INCOMPATIBLE) | 1;
    patch(path, HDR_INCOMPATIBLE, &bits.to_be_bytes());
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").len()
}

/// A new image at `path`, closed.
fn create(path: &Path, size: u64, cluster_size: u64) {
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cluster_size;
    Image::create(path, &opts)
        .and_then(|img| img.close())
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

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

/// A backing file name of 1,023 bytes is stored and followed; 1,024 is refused, by
/// qcowx and by QEMU.
#[test]
fn backing_file_name_at_the_limit_works_and_one_byte_more_is_refused() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    create(&base, 1 << 20, 65536);
    {
        let img = Image::open_rw(&base).expect("open");
        img.write_at(b"from the base", 0).expect("write");
        img.close().expect("close");
    }
    // "././...//base.qcow2" names the base at any length: "./" pairs, and one
    // doubled "/" for odd lengths.
    let name = |len: usize| {
        let pad = len - "base.qcow2".len();
        format!("{}{}base.qcow2", "./".repeat(pad / 2), "/".repeat(pad % 2))
    };
    let at_name = name(MAX_BACKING_NAME as usize);
    assert_eq!(at_name.len(), MAX_BACKING_NAME as usize);
    let top = dir.path().join("top.qcow2");
    let mut opts = CreateOptions::new(1 << 20);
    opts.backing_file = Some(at_name.clone());
    opts.backing_format = Some("qcow2".into());
    let img = Image::create(&top, &opts).expect("a 1,023-byte backing name");
    let mut buf = [0u8; 13];
    img.read_at(&mut buf, 0)
        .expect("read through the backing file");
    assert_eq!(&buf, b"from the base");
    assert_eq!(img.header().backing_file.as_deref(), Some(at_name.as_str()));
    img.close().expect("close");
    assert_qemu_check_clean(&top);

    let longer = name(MAX_BACKING_NAME as usize + 1);
    assert_eq!(longer.len(), MAX_BACKING_NAME as usize + 1);
    opts.backing_file = Some(longer.clone());
    let err =
        Image::create(dir.path().join("past.qcow2"), &opts).expect_err("a 1,024-byte backing name");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let msg = qemu_img_fails(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        &longer,
        "-F",
        "qcow2",
        &p(&dir.path().join("qemu-past.qcow2")),
        "1M",
    ]);
    assert!(msg.contains("backing file"), "{msg}");
    // QEMU stores the 1,023-byte name.
    let qemu_at = dir.path().join("qemu-at.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        &at_name,
        "-F",
        "qcow2",
        &p(&qemu_at),
        "1M",
    ]);
}

// ---- the backing chain ---------------------------------------------------------------------

/// A top image over 256 backing layers opens and reads the base's data through all
/// of them (so does QEMU); over 257 layers qcowx refuses with `Error::Backing`, both
/// when opening and when listing the chain.
#[test]
fn backing_chain_at_the_limit_opens_and_one_layer_more_is_refused() {
    let dir = tempdir();
    let name = |i: usize| format!("L{i:04}.qcow2");
    let path = |i: usize| dir.path().join(name(i));
    // L0000 is the base; L0001 its overlay, copied byte for byte to every later layer
    // with the backing name patched (all names have the same length).
    let mut opts = CreateOptions::new(64 << 10);
    opts.cluster_size = 512;
    let base = Image::create(path(0), &opts).expect("base");
    base.write_at(b"deep data", 4096).expect("write");
    base.close().expect("close");
    opts.backing_file = Some(name(0));
    opts.backing_format = Some("qcow2".into());
    Image::create(path(1), &opts)
        .and_then(|i| i.close())
        .expect("overlay");
    let template = std::fs::read(path(1)).expect("read overlay");
    let name_at = template
        .windows(name(0).len())
        .position(|w| w == name(0).as_bytes())
        .expect("backing name in the header");
    let layers = MAX_BACKING_DEPTH + 1; // one past the limit below the top
    for i in 2..=layers {
        let mut bytes = template.clone();
        bytes[name_at..name_at + name(0).len()].copy_from_slice(name(i - 1).as_bytes());
        std::fs::write(path(i), &bytes).expect("write layer");
    }

    // Top L0256: 256 layers below it.
    let at_limit = path(MAX_BACKING_DEPTH);
    let img = Image::open(&at_limit).expect("256 backing layers");
    let mut buf = [0u8; 9];
    img.read_at(&mut buf, 4096)
        .expect("read through 256 layers");
    assert_eq!(&buf, b"deep data");
    drop(img);
    let chain = backing_chain(&at_limit, None, LockMode::Shared).expect("chain of 257 images");
    assert_eq!(chain.len(), MAX_BACKING_DEPTH + 1);
    let out = run(Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "read -P 0x64 4096 1"])
        .arg(&at_limit));
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"),
        "qemu-io over 256 layers: {}",
        describe(&out)
    );

    // Top L0257: 257 layers below it.
    let past = path(layers);
    let err = Image::open(&past).expect_err("257 backing layers");
    assert!(matches!(err, Error::Backing { .. }), "{err:?}");
    assert!(
        error_text(&err).contains(&format!("deeper than {MAX_BACKING_DEPTH} layers")),
        "{}",
        error_text(&err)
    );
    let err = backing_chain(&past, None, LockMode::Shared).expect_err("chain of 258 images");
    assert!(
        err.to_string()
            .contains(&format!("deeper than {MAX_BACKING_DEPTH} layers")),
        "{err}"
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

// ---- the L2 cache -----------------------------------------------------------------------------

/// Reads at the offsets it is told are L2 tables, counted.
#[derive(Debug, Clone, Default)]
struct TableReads {
    tables: Arc<Mutex<Vec<u64>>>,
    count: Arc<AtomicU64>,
}

/// A storage in memory whose reads of L2 tables `TableReads` counts.
fn counting() -> (TableReads, Arc<Watched<MemStorage>>) {
    let reads = TableReads::default();
    let r = reads.clone();
    let storage = Watched::new(MemStorage::new(), move |a| {
        if let Access::Read { offset, .. } = a {
            if r.tables.lock().unwrap().contains(&offset) {
                r.count.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(())
    });
    (reads, Arc::new(storage))
}

/// Reads, in `passes` rounds, one unallocated cluster of each of the first `tables`
/// L2 tables (only the table lookup touches the file); returns the table reads of the
/// rounds after the first.
fn table_reads_cycling(
    (reads, storage): &(TableReads, Arc<Watched<MemStorage>>),
    opts: &OpenOptions,
    tables: u64,
) -> u64 {
    let img = Image::from_storage(storage.clone(), opts).expect("open");
    let span = 512u64 << 20; // guest bytes one 64 KiB L2 table maps
    let mut buf = [0u8; 512];
    for t in 0..tables {
        img.read_at(&mut buf, t * span + 65536)
            .expect("warm-up read");
    }
    let before = reads.count.load(Ordering::SeqCst);
    for _ in 0..3 {
        for t in 0..tables {
            img.read_at(&mut buf, t * span + 65536).expect("read");
            assert_eq!(buf, [0u8; 512]);
        }
    }
    reads.count.load(Ordering::SeqCst) - before
}

/// The L2 cache holds `cache_bytes / table size` tables (at least
/// `MIN_CACHED_TABLES`): cycling over exactly that many tables reads none of them
/// again; over one more, every lookup misses (LRU). The default holds 128 tables of
/// 64 KiB.
#[test]
fn l2_cache_holds_its_capacity_and_not_one_table_more() {
    let tables = DEFAULT_CACHE_BYTES as u64 / 65536 + 1;
    assert_eq!(tables - 1, 128);
    let span = 512u64 << 20;
    let counted = counting();
    let storage = &counted.1;
    let img =
        Image::create_in(storage.clone(), &CreateOptions::new(tables * span)).expect("create");
    for t in 0..tables {
        img.write_at(&[1u8; 512], t * span).expect("write");
    }
    img.close().expect("close");
    // The tables' offsets, from the L1 table.
    {
        let img = Image::from_storage(storage.clone(), &OpenOptions::new()).expect("open");
        let h = img.header();
        let mut l1 = vec![0u8; h.l1_size as usize * 8];
        storage
            .read_at(&mut l1, h.l1_table_offset)
            .expect("read L1");
        let offsets: Vec<u64> = l1
            .chunks(8)
            .map(|w| u64::from_be_bytes(w.try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
            .filter(|&o| o != 0)
            .collect();
        assert_eq!(offsets.len() as u64, tables);
        *counted.0.tables.lock().unwrap() = offsets;
    }

    let default = OpenOptions::new();
    assert_eq!(table_reads_cycling(&counted, &default, tables - 1), 0);
    assert_eq!(table_reads_cycling(&counted, &default, tables), 3 * tables);

    let four = OpenOptions::new().cache_bytes(4 * 65536 + 65535);
    assert_eq!(table_reads_cycling(&counted, &four, 4), 0);
    assert_eq!(table_reads_cycling(&counted, &four, 5), 15);
    // Below the minimum the cache still holds MIN_CACHED_TABLES.
    let tiny = OpenOptions::new().cache_bytes(1);
    assert_eq!(
        table_reads_cycling(&counted, &tiny, MIN_CACHED_TABLES as u64),
        0
    );

    // The structure itself: at capacity nothing is evicted; one more evicts one.
    let mut c = L2Cache::new(4 * 64, 64);
    assert_eq!(c.capacity(), 4);
    for o in 0..4 {
        assert!(c.insert(HostOffset::new(o), vec![o], true).is_none());
    }
    let ev = c
        .insert(HostOffset::new(4), vec![4], true)
        .expect("a dirty table evicted");
    assert_eq!(ev.offset, HostOffset::new(0), "the least recently used one");
}

// ---- check report ---------------------------------------------------------------------------

/// A check lists at most `MAX_MESSAGES` problems, and counts every one: 1,500 L2
/// entries pointing past the end of the file are 1,500 corruptions, 1,000 messages.
#[test]
fn a_check_describes_at_most_max_messages_problems_and_counts_them_all() {
    use qcowx_core::refcount::MAX_MESSAGES;
    const CS: u64 = 4096;
    let bad = MAX_MESSAGES as u64 * 3 / 2;
    let mem = Arc::new(MemStorage::new());
    let mut opts = CreateOptions::new(bad * CS);
    opts.cluster_size = CS;
    let img = Image::create_in(mem.clone(), &opts).expect("create");
    for k in 0..bad {
        img.write_at(&[0x11; 512], k * CS).expect("write");
    }
    img.close().expect("close");
    drop(img);
    let mut bytes = mem.to_vec();
    let file_len = bytes.len() as u64;
    let be64 =
        |b: &[u8], at: u64| u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap());
    // Every L1 entry's L2 table: its used entries get a host offset past the file's end.
    let (l1_at, l1_len) = (
        be64(&bytes, 40),
        u64::from(u32::from_be_bytes(bytes[36..40].try_into().unwrap())),
    );
    let mut patched = 0u64;
    for i in 0..l1_len {
        let l2 = be64(&bytes, l1_at + i * 8) & 0x00ff_ffff_ffff_fe00;
        if l2 == 0 {
            continue;
        }
        for j in 0..CS / 8 {
            let at = l2 + j * 8;
            let word = be64(&bytes, at);
            if word & 0x00ff_ffff_ffff_fe00 != 0 && patched < bad {
                let far = (word & !0x00ff_ffff_ffff_fe00)
                    | ((file_len + (j + 1) * CS) & 0x00ff_ffff_ffff_fe00);
                bytes[at as usize..at as usize + 8].copy_from_slice(&far.to_be_bytes());
                patched += 1;
            }
        }
    }
    assert_eq!(patched, bad, "every written cluster's L2 entry was patched");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.qcow2");
    std::fs::write(&path, &bytes).expect("write image");
    let img = Image::from_storage(Arc::new(MemStorage::from_vec(bytes)), &OpenOptions::new())
        .expect("open read-only");
    let report = img.check().expect("check");
    // Each patched entry is past the end of the file and, flagged COPIED, points at a
    // cluster whose refcount is 0: two corruptions, as qemu-img check counts them.
    let out = qemu_img()
        .args(["check", "-f", "qcow2"])
        .arg(&path)
        .output()
        .expect("qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout);
    let qemu_errors: u64 = text
        .lines()
        .find_map(|l| l.strip_suffix(" errors were found on the image."))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("qemu-img check output: {text}"));
    assert!(report.corruptions >= bad, "every bad entry counted");
    assert_eq!(report.corruptions, qemu_errors, "qemu-img check:\n{text}");
    assert_eq!(
        report.messages.len(),
        MAX_MESSAGES,
        "the first MAX_MESSAGES described"
    );
    assert!(
        report.messages[0].contains("past the end of the file"),
        "{}",
        report.messages[0]
    );
    assert_eq!(report.exit_code(), 2);
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
