//! Persistent dirty bitmaps judged by QEMU: what qcowx writes through the library keeps
//! the bitmaps consistent and marks exactly the ranges written; what QEMU dirtied reads
//! the same in qcowx; a handle that never closes leaves them in use (inconsistent).

use std::path::{Path, PathBuf};

use qcowx_core::Image;
use qcowx_tests::{
    assert_qemu_check_clean, qemu_bitmaps, qemu_img_create, qemu_img_ok, qemu_io_ok,
    qemu_nbd_dirty, require_qemu_tools, tempdir, QemuBitmap,
};

const MIB: u64 = 1 << 20;

/// A 64 MiB image with `b0` (enabled, 64 KiB granularity) and `b1` (disabled), made by
/// qemu-img.
fn image_with_bitmaps(dir: &Path) -> PathBuf {
    require_qemu_tools();
    let path = dir.join("disk.qcow2");
    qemu_img_create(&path, 64 * MIB, "");
    let p = path.to_str().unwrap();
    qemu_img_ok(&["bitmap", "--add", "-g", "65536", p, "b0"]);
    qemu_img_ok(&["bitmap", "--add", "--disable", "-g", "65536", p, "b1"]);
    path
}

fn bm(name: &str, flags: &[&str]) -> QemuBitmap {
    QemuBitmap {
        name: name.into(),
        flags: flags.iter().map(|s| s.to_string()).collect(),
        granularity: 65536,
    }
}

#[test]
fn library_writes_keep_bitmaps_consistent_and_mark_exactly_what_was_written() {
    let dir = tempdir();
    let path = image_with_bitmaps(dir.path());
    let img = Image::open_rw(&path).unwrap();
    img.write_at(&[7u8; 4096], 0).unwrap(); // granule 0
    img.write_at(&vec![9u8; 70000], 3 * MIB + 100).unwrap(); // granules 48..=49
    img.write_zeroes(10 * MIB, 128 * 1024, true).unwrap(); // 160..=161
    img.discard(20 * MIB + 4096, 512).unwrap(); // 320 (a partial discard counts)
    img.close().unwrap();

    assert_eq!(
        qemu_bitmaps(&path, false),
        vec![bm("b0", &["auto"]), bm("b1", &[])]
    );
    assert_qemu_check_clean(&path);
    let g = 65536;
    assert_eq!(
        qemu_nbd_dirty(&path, "b0", dir.path()),
        vec![(0, g), (48 * g, 2 * g), (160 * g, 2 * g), (320 * g, g)]
    );
    assert_eq!(qemu_nbd_dirty(&path, "b1", dir.path()), vec![]);
    // qcowx reads back what it stored.
    let img = Image::open(&path).unwrap();
    assert_eq!(
        img.bitmap_dirty("b0").unwrap(),
        qemu_nbd_dirty(&path, "b0", dir.path())
    );
}

#[test]
fn a_bitmap_qemu_dirtied_reads_the_same_in_qcowx() {
    let dir = tempdir();
    let path = image_with_bitmaps(dir.path());
    qemu_io_ok(
        "qcow2",
        &path,
        &[
            "write 0 1k",
            "write 5M 300k",
            "write -z 40M 64k",
            "discard 60M 1M",
        ],
    );
    let theirs = qemu_nbd_dirty(&path, "b0", dir.path());
    assert_eq!(theirs.len(), 4, "{theirs:?}");
    let img = Image::open(&path).unwrap();
    assert_eq!(img.bitmap_dirty("b0").unwrap(), theirs);
    assert_eq!(img.bitmap_dirty("b1").unwrap(), vec![]);
    let names: Vec<_> = img.bitmaps().unwrap().into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["b0", "b1"]);
    // A writable session that writes elsewhere keeps QEMU's bits and adds its own.
    drop(img);
    let img = Image::open_rw(&path).unwrap();
    img.write_at(&[1u8; 512], 30 * MIB).unwrap();
    img.close().unwrap();
    let mut want = theirs.clone();
    want.push((30 * MIB, 65536));
    want.sort();
    assert_eq!(qemu_nbd_dirty(&path, "b0", dir.path()), want);
    assert_qemu_check_clean(&path);
}

#[test]
fn a_handle_that_never_closes_leaves_the_bitmaps_in_use() {
    let dir = tempdir();
    let path = image_with_bitmaps(dir.path());
    let img = Image::open_rw(&path).unwrap();
    img.write_at(&[7u8; 4096], 0).unwrap();
    img.flush().unwrap();
    // As after a crash: no close runs (the lock goes with the process's descriptor).
    std::mem::forget(img);
    let flags = qemu_bitmaps(&path, true);
    assert_eq!(
        flags,
        vec![bm("b0", &["in-use", "auto"]), bm("b1", &["in-use"])]
    );
}

#[test]
fn bitmaps_added_removed_and_changed_through_the_library() {
    let dir = tempdir();
    require_qemu_tools();
    let path = dir.path().join("plain.qcow2");
    qemu_img_create(&path, 16 * MIB, "");
    let img = Image::open_rw(&path).unwrap();
    img.bitmap_add("new", Some(4096), false).unwrap();
    img.bitmap_add("off", None, true).unwrap();
    assert!(img.bitmap_add("new", None, false).is_err());
    assert!(img.bitmap_add("bad", Some(1000), false).is_err());
    img.write_at(&[1u8; 100], MIB).unwrap();
    img.close().unwrap();
    assert_eq!(
        qemu_bitmaps(&path, false),
        vec![
            QemuBitmap {
                name: "new".into(),
                flags: vec!["auto".into()],
                granularity: 4096
            },
            bm("off", &[])
        ]
    );
    assert_qemu_check_clean(&path);
    assert_eq!(qemu_nbd_dirty(&path, "new", dir.path()), vec![(MIB, 4096)]);

    let img = Image::open_rw(&path).unwrap();
    img.bitmap_merge("new", "off").unwrap();
    img.bitmap_clear("new").unwrap();
    img.bitmap_enable("off", true).unwrap();
    img.bitmap_enable("new", false).unwrap();
    img.close().unwrap();
    assert_eq!(qemu_nbd_dirty(&path, "off", dir.path()), vec![(MIB, 65536)]);
    assert_eq!(qemu_nbd_dirty(&path, "new", dir.path()), vec![]);
    assert_qemu_check_clean(&path);

    let img = Image::open_rw(&path).unwrap();
    img.bitmap_remove("new").unwrap();
    img.bitmap_remove("off").unwrap();
    img.close().unwrap();
    assert_eq!(qemu_bitmaps(&path, false), vec![]);
    assert_qemu_check_clean(&path);
    let info = qcowx_tests::qemu_info(&path, false);
    assert!(
        info["format-specific"]["data"]["bitmaps"].is_null(),
        "{info}"
    );
}

#[test]
fn a_damaged_bitmap_table_is_refused_read_only_and_dropped_by_a_writer() {
    let dir = tempdir();
    let path = image_with_bitmaps(dir.path());
    let ext = {
        let img = Image::open(&path).unwrap();
        img.header()
            .extensions
            .get(qcowx_core::format::extensions::EXT_BITMAPS)
            .unwrap()
            .data
            .clone()
    };
    let dir_off = u64::from_be_bytes(ext[16..24].try_into().unwrap());
    let table = qcowx_tests::be64(&path, dir_off);
    // b0's first table entry points far past the end of the file.
    qcowx_tests::patch(&path, table, &0x00ff_0000_0000_0000u64.to_be_bytes());

    let img = Image::open(&path).unwrap();
    assert_eq!(img.bitmaps().unwrap().len(), 2);
    let err = img.bitmap_dirty("b0").unwrap_err();
    assert!(err.to_string().contains("bitmap table"), "{err}");
    drop(img);

    let img = Image::open_rw(&path).unwrap();
    assert!(img.bitmaps().unwrap().is_empty());
    assert_eq!(img.header().autoclear & 1, 0);
    img.write_at(&[5u8; 512], 0).unwrap();
    img.close().unwrap();
    assert_qemu_check_clean(&path);
    assert!(qemu_bitmaps(&path, false).is_empty());
}

#[test]
fn a_revert_of_the_default_vdi_marks_the_whole_disk() {
    let dir = tempdir();
    let path = image_with_bitmaps(dir.path());
    let img = Image::open_rw(&path).unwrap();
    img.snapshot(qcowx_core::DEFAULT_VDI, "s").unwrap();
    img.close().unwrap();
    // A clean start: b0 saw nothing yet.
    assert_eq!(qemu_nbd_dirty(&path, "b0", dir.path()), vec![]);
    let img = Image::open_rw(&path).unwrap();
    img.revert(qcowx_core::DEFAULT_VDI, "s").unwrap();
    img.close().unwrap();
    assert_eq!(qemu_nbd_dirty(&path, "b0", dir.path()), vec![(0, 64 * MIB)]);
    assert_eq!(qemu_nbd_dirty(&path, "b1", dir.path()), vec![]);
    assert_qemu_check_clean(&path);
}
