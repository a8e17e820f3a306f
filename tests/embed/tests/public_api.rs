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
