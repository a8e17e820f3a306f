//! Snapshots, forks, deletes and reverts, judged by reading back and by QEMU's tools.

use std::process::Command;
use std::sync::Arc;

use qcowx_core::{CreateOptions, Error, Image, RootKind};

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img not found: install qemu-utils (scripts/test does)")
}

fn qemu_check_clean(path: &std::path::Path) {
    let out = qemu_img(&["check", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

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
        Err(Error::InvalidArgument(_))
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
