//! What a program embedding qcowx-core does, through the public API only.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use qcowx_core::{
    CreateOptions, Error, ErrorKind, IfExists, Image, OpenOptions, Range, RootKind, DEFAULT_VDI,
};

const MIB: u64 = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn copy_in_snapshot_fork_diff_gc_and_copy_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.qcow2");
    let opts = CreateOptions::new(4 * MIB).if_exists(IfExists::Fail);
    let img = Arc::new(Image::create(&path, &opts).unwrap());

    // std::io::copy a whole disk's worth into the default VDI.
    let data = pattern(4 * MIB as usize, 1);
    let mut vdi = img.open_root(DEFAULT_VDI).unwrap().cursor();
    assert_eq!(std::io::copy(&mut &data[..], &mut vdi).unwrap(), 4 * MIB);
    vdi.flush().unwrap();

    // A snapshot, then a fork of it that diverges in one cluster.
    let snap = img.snapshot(DEFAULT_VDI, "golden").unwrap();
    assert_eq!(snap.kind, RootKind::Snapshot);
    let fork = img.fork("golden", "clone").unwrap();
    assert_eq!(fork.kind, RootKind::Vdi);
    let mut clone = img.open_root("clone").unwrap().cursor();
    clone.seek(SeekFrom::Start(MIB)).unwrap();
    clone.write_all(&[0xee; 4096]).unwrap();

    // diff names exactly the cluster written.
    let cs = img.cluster_size();
    assert_eq!(
        img.diff("golden", "clone").unwrap(),
        [Range {
            offset: MIB,
            length: cs
        }]
    );
    assert!(img.diff("golden", DEFAULT_VDI).unwrap().is_empty());

    // std::io::copy out of the snapshot, read-only.
    let mut out = Vec::new();
    let mut golden = img.open_root("golden").unwrap().reader();
    assert_eq!(std::io::copy(&mut golden, &mut out).unwrap(), 4 * MIB);
    assert_eq!(out, data);
    let mut changed = vec![0u8; 4096];
    clone.seek(SeekFrom::Start(MIB)).unwrap();
    clone.read_exact(&mut changed).unwrap();
    assert_eq!(changed, [0xee; 4096]);
    // And out of the VDI, whole: the snapshot's data with the one cluster changed.
    let mut clone_out = Vec::new();
    clone.rewind().unwrap();
    assert_eq!(std::io::copy(&mut clone, &mut clone_out).unwrap(), 4 * MIB);
    let mut expected = data.clone();
    expected[MIB as usize..MIB as usize + 4096].fill(0xee);
    assert_eq!(clone_out, expected);

    // Deleting the clone and collecting garbage frees its one cluster.
    drop(clone);
    img.delete_vdi("clone").unwrap();
    let report = img.gc().unwrap();
    assert!(report.roots_removed >= 1, "{report:?}");
    img.close().unwrap();

    let img = Arc::new(Image::open(&path).unwrap());
    let names: Vec<String> = img.list().unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, [DEFAULT_VDI, "golden"]);
}

#[test]
fn errors_are_matched_by_variant_and_kind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");

    // A missing file: the OS error survives, also through io::Error.
    let e = Image::open(&path).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.raw_os_error(), Some(2));
    assert_eq!(std::io::Error::from(e).raw_os_error(), Some(2));

    let img = Arc::new(Image::create(&path, &CreateOptions::new(MIB)).unwrap());
    // Create-new refuses the existing file.
    let again = Image::create(&path, &CreateOptions::new(MIB).if_exists(IfExists::Fail));
    assert!(matches!(again, Err(Error::AlreadyExists { .. })));
    // A taken name.
    img.snapshot(DEFAULT_VDI, "s").unwrap();
    match img.snapshot(DEFAULT_VDI, "s") {
        Err(Error::AlreadyExists { name, .. }) => assert_eq!(name, "s"),
        other => panic!("{other:?}"),
    }
    // An unknown name.
    assert!(matches!(img.open_root("nope"), Err(Error::NotFound { .. })));
    // A snapshot is read-only.
    let snap = img.open_root("s").unwrap();
    assert!(matches!(
        snap.write_at(&[1], 0),
        Err(Error::ReadOnly { .. })
    ));
    // Past the end of the disk.
    assert!(matches!(
        img.write_at(&[1], MIB),
        Err(Error::OutOfRange { .. })
    ));
    // A second handle in this process is refused, and says so.
    let e = OpenOptions::new().write(true).open(&path).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    assert!(e.lock_holder().is_some());
    assert_eq!(
        std::io::Error::from(e).kind(),
        std::io::ErrorKind::ResourceBusy
    );
    // Writing with a shared lock is a contradiction, not an I/O error.
    drop(snap);
    img.close().unwrap();
    drop(img);
    let e = OpenOptions::new()
        .write(true)
        .lock(qcowx_core::LockMode::Shared)
        .open(&path)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

/// A storage an embedder plugs in: memory that holds at most `cap` bytes and then
/// fails writes as a full disk does (ENOSPC).
#[derive(Debug)]
struct Capped {
    inner: qcowx_core::storage::MemStorage,
    cap: u64,
}

impl qcowx_core::storage::Storage for Capped {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.cap {
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len > self.cap {
            return Err(std::io::Error::from_raw_os_error(28));
        }
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn path(&self) -> Option<&std::path::Path> {
        None
    }
}

#[test]
fn a_full_disk_is_no_space_and_what_was_flushed_stays() {
    let storage = Arc::new(Capped {
        inner: qcowx_core::storage::MemStorage::new(),
        cap: 2 * MIB,
    });
    let img = Image::create_in(storage, &CreateOptions::new(64 * MIB)).unwrap();
    img.write_at(&pattern(4096, 3), 0).unwrap();
    img.flush().unwrap();
    // Fill until the storage refuses.
    let chunk = pattern(MIB as usize, 4);
    let e = (1..64)
        .map(|i| img.write_at(&chunk, i * MIB))
        .find_map(|r| r.err())
        .expect("a 2 MiB storage fills up");
    assert!(matches!(e, Error::NoSpace { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::NoSpace);
    assert_eq!(e.raw_os_error(), Some(28));
    assert_eq!(
        std::io::Error::from(e).kind(),
        std::io::ErrorKind::StorageFull
    );
    // The same through the std::io adapter.
    let mut vdi = Arc::new(img).open_root(DEFAULT_VDI).unwrap().cursor();
    vdi.seek(SeekFrom::Start(40 * MIB)).unwrap();
    let e = vdi.write_all(&chunk).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
    let mut head = vec![0u8; 4096];
    vdi.rewind().unwrap();
    vdi.read_exact(&mut head).unwrap();
    assert_eq!(head, pattern(4096, 3));
}

#[test]
fn damaged_metadata_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let img = Image::create(&path, &CreateOptions::new(MIB)).unwrap();
    img.write_at(&[1; 512], 0).unwrap();
    img.close().unwrap();
    // Point the first L1 entry at an L2 table that is not cluster-aligned (the
    // header's l1_table_offset is the big-endian u64 at byte 40).
    let mut bytes = std::fs::read(&path).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let entry = u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap());
    bytes[l1..l1 + 8].copy_from_slice(&(entry | 0x200).to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();

    let img = Image::open(&path).unwrap();
    let e = img.read_at(&mut [0u8; 512], 0).unwrap_err();
    assert!(
        matches!(e, Error::Corrupt { .. } | Error::Damaged { .. }),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    // check names it too.
    let report = img.check().unwrap();
    assert!(report.corruptions > 0, "{report:?}");
}

#[test]
fn what_the_library_does_not_do_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(4 * MIB)).unwrap();
    let e = img.resize(MIB).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert_eq!(
        std::io::Error::from(e).kind(),
        std::io::ErrorKind::Unsupported
    );
    assert_eq!(img.size(), 4 * MIB, "nothing changed");
}
