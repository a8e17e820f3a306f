//! Snapshots, forks, deletes and reverts, judged by reading back and by QEMU's tools.

use std::process::Command;
use std::sync::Arc;

use qcowx_core::{CreateOptions, Error, Image, RootKind};
use qcowx_tests::{assert_qemu_check_clean as qemu_check_clean, qemu_img_run as qemu_img};

fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    img.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn snapshot_fork_revert_delete_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.qcow2");
    let img = Arc::new(Image::create(&path, &CreateOptions::new(8 << 20)).unwrap());
    img.write_at(&[1u8; 70000], 10000).unwrap();
    img.snapshot("default", "s1").unwrap();
    img.write_at(&[2u8; 5000], 12000).unwrap();
    assert_eq!(read(&img, 12000, 5000), vec![2u8; 5000]);

    let s1 = img.open_root("s1").unwrap();
    assert!(!s1.is_writable());
    let mut b = vec![0u8; 5000];
    s1.read_at(&mut b, 12000).unwrap();
    assert_eq!(b, vec![1u8; 5000], "snapshot keeps the old data");
    assert!(matches!(s1.write_at(&[0], 0), Err(Error::ReadOnly { .. })));

    let web = img.fork("s1", "web").unwrap();
    assert_eq!(web.kind, RootKind::Vdi);
    let web = img.open_root("web").unwrap();
    web.write_at(&[3u8; 100], 10000).unwrap();
    let mut b = vec![0u8; 100];
    web.read_at(&mut b, 10000).unwrap();
    assert_eq!(b, vec![3u8; 100]);
    assert_eq!(
        read(&img, 10000, 100),
        vec![1u8; 100],
        "default untouched by web"
    );
    s1.read_at(&mut b, 10000).unwrap();
    assert_eq!(b, vec![1u8; 100], "s1 untouched by web");

    web.flush().unwrap();
    img.snapshot("web", "web-s1").unwrap();
    web.write_at(&[4u8; 100], 10000).unwrap();
    img.revert("web", "web-s1").unwrap();
    let web = img.open_root("web").unwrap();
    web.read_at(&mut b, 10000).unwrap();
    assert_eq!(b, vec![3u8; 100], "revert restores the snapshot");

    img.revert("default", "s1").unwrap();
    assert_eq!(read(&img, 12000, 5000), vec![1u8; 5000]);

    let mut names: Vec<String> = img.list().unwrap().into_iter().map(|r| r.name).collect();
    names.sort();
    assert_eq!(names, ["default", "s1", "web", "web-s1"]);
    assert!(matches!(
        img.snapshot("default", "s1"),
        Err(Error::AlreadyExists { .. })
    ));
    assert!(matches!(
        img.delete_snapshot("nope"),
        Err(Error::NotFound { .. })
    ));
    img.delete_snapshot("web-s1").unwrap();
    img.delete_vdi("web").unwrap();
    let names: Vec<String> = img.list().unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["default", "s1"]);
    let report = img.check().unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    img.close().unwrap();
    drop(img);
    qemu_check_clean(&path);

    let out = qemu_img(&["snapshot", "-l", path.to_str().unwrap()]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("s1"), "{list}");
    // QEMU reads snapshot s1 exactly as qcowx does.
    let raw = dir.path().join("s1.raw");
    let out = qemu_img(&[
        "convert",
        "-l",
        "snapshot.name=s1",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let qemu = std::fs::read(&raw).unwrap();
    assert_eq!(&qemu[10000..80000], &vec![1u8; 70000][..]);
    assert!(qemu[..10000].iter().all(|&b| b == 0));
}

#[test]
fn gc_returns_the_space_of_deleted_roots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gc.qcow2");
    let img = Image::create(&path, &CreateOptions::new(64 << 20)).unwrap();
    img.write_at(&vec![1u8; 8 << 20], 0).unwrap();
    img.snapshot("default", "keep").unwrap();
    img.write_at(&vec![2u8; 8 << 20], 0).unwrap();
    img.snapshot("default", "drop").unwrap();
    img.write_at(&vec![3u8; 8 << 20], 0).unwrap();
    use std::os::unix::fs::MetadataExt;
    img.flush().unwrap();
    let blocks_before = std::fs::metadata(&path).unwrap().blocks() * 512;
    img.delete_snapshot("drop").unwrap();
    let report = img.gc().unwrap();
    assert_eq!(report.roots_removed, 1);
    // The deleted snapshot held 8 MiB of its own data (128 clusters) plus its tables.
    assert!(report.clusters_freed >= 128, "{report:?}");
    let blocks_after = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        blocks_after + (8 << 20) <= blocks_before + (1 << 20),
        "space returned to the file system: {blocks_before} -> {blocks_after}"
    );
    let keep = Arc::new(img);
    let k = keep.open_root("keep").unwrap();
    let mut b = vec![0u8; 4096];
    k.read_at(&mut b, 4 << 20).unwrap();
    assert_eq!(b, vec![1u8; 4096]);
    assert_eq!(read(&keep, 4 << 20, 4096), vec![3u8; 4096]);
    // Freed space is reused: new writes do not grow the file past its old size.
    let len_after_gc = std::fs::metadata(&path).unwrap().len();
    keep.write_at(&vec![4u8; 4 << 20], 16 << 20).unwrap();
    keep.flush().unwrap();
    let report = keep.check().unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    drop(k);
    keep.close().unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() <= len_after_gc + (5 << 20));
    drop(keep);
    qemu_check_clean(&path);
}

#[test]
fn diff_reports_changed_clusters_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("diff.qcow2");
    let img = Image::create(&path, &CreateOptions::new(1 << 30)).unwrap();
    img.write_at(&vec![1u8; 1 << 20], 0).unwrap();
    img.snapshot("default", "a").unwrap();
    img.write_at(&[9u8; 10], 200_000).unwrap(); // cluster 3
    img.write_at(&[9u8; 10], 700 << 20).unwrap(); // far away
    img.snapshot("default", "b").unwrap();
    let d = img.diff("a", "b").unwrap();
    assert_eq!(
        d,
        vec![
            qcowx_core::Range {
                offset: 3 * 65536,
                length: 65536
            },
            qcowx_core::Range {
                offset: 700 << 20,
                length: 65536
            },
        ]
    );
    assert!(img.diff("a", "a").unwrap().is_empty());
    assert_eq!(img.diff("b", "default").unwrap(), vec![]);
    img.write_zeroes(0, 65536, true).unwrap();
    assert_eq!(
        img.diff("b", "default").unwrap(),
        vec![qcowx_core::Range {
            offset: 0,
            length: 65536
        }]
    );
}

#[test]
fn qemu_snapshot_commands_on_a_qcowx_image_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.qcow2");
    let p = path.to_str().unwrap();
    {
        let img = Arc::new(Image::create(&path, &CreateOptions::new(16 << 20)).unwrap());
        img.write_at(&vec![1u8; 1 << 20], 0).unwrap();
        img.snapshot("default", "s1").unwrap();
        img.fork("s1", "web").unwrap();
        let web = img.open_root("web").unwrap();
        web.write_at(&vec![5u8; 65536], 0).unwrap();
        img.close().unwrap();
    }
    qemu_check_clean(&path);
    // QEMU writes the default VDI, takes, applies and deletes snapshots.
    let io = Command::new("qemu-io")
        .args(["-c", "write -P 7 65536 65536", p])
        .output()
        .unwrap();
    assert!(
        io.status.success(),
        "{}",
        String::from_utf8_lossy(&io.stderr)
    );
    assert!(qemu_img(&["snapshot", "-c", "q1", p]).status.success());
    assert!(qemu_img(&["snapshot", "-a", "vdi:web", p]).status.success());
    assert!(qemu_img(&["snapshot", "-d", "q1", p]).status.success());
    qemu_check_clean(&path);

    let img = Arc::new(Image::open_rw(&path).unwrap());
    assert_eq!(
        img.header().autoclear,
        0,
        "no auto-clear bit is kept at rest"
    );
    let report = img.check().unwrap();
    assert_eq!(report.corruptions, 0, "W restored: {:?}", report.messages);
    // The default VDI is now a copy of web; writing it must not change web or s1.
    assert_eq!(read(&img, 0, 65536), vec![5u8; 65536]);
    img.write_at(&vec![8u8; 65536], 0).unwrap();
    let web = img.open_root("web").unwrap();
    let s1 = img.open_root("s1").unwrap();
    let mut b = vec![0u8; 65536];
    web.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![5u8; 65536]);
    s1.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![1u8; 65536]);
    web.write_at(&vec![6u8; 65536], 0).unwrap();
    assert_eq!(read(&img, 0, 65536), vec![8u8; 65536]);
    let report = img.check().unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    drop((web, s1));
    img.close().unwrap();
    drop(img);
    qemu_check_clean(&path);
}

#[test]
fn qemu_img_check_repair_keeps_qcowx_snapshots() {
    // QEMU 10's `check -r` opens without reading the snapshot table and rewrites the
    // header when an unknown auto-clear bit is set, dropping every snapshot: qcowx
    // must never leave such a bit set at rest.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.qcow2");
    let p = path.to_str().unwrap();
    let img = Arc::new(Image::create(&path, &CreateOptions::new(8 << 20)).unwrap());
    img.write_at(&[1u8; 65536], 0).unwrap();
    img.snapshot("default", "keep").unwrap();
    img.fork("keep", "web").unwrap();
    img.write_at(&[2u8; 65536], 0).unwrap();
    img.close().unwrap();
    drop(img);
    let out = qemu_img(&["check", "-r", "all", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = qemu_img(&["snapshot", "-l", p]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("keep") && list.contains("vdi:web"), "{list}");
    let img = Arc::new(Image::open(&path).unwrap());
    let keep = img.open_root("keep").unwrap();
    let mut b = vec![0u8; 65536];
    keep.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![1u8; 65536]);
    assert_eq!(read(&img, 0, 65536), vec![2u8; 65536]);
}
