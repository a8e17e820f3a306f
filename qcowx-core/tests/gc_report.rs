//! What `Image::gc` reports: what it did to the file, and the same count whether the
//! image stayed open since the deletion or was reopened.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use qcowx_core::{CreateOptions, GcReport, Image, DEFAULT_VDI};

const MIB: u64 = 1 << 20;

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// A 4 MiB image written whole, snapshot `golden`, and VDI `clone` forked from it with
/// one 4 KiB write (a new data cluster and a copied L2 table); stays open.
fn build(path: &Path) -> Arc<Image> {
    let img = Arc::new(Image::create(path, &CreateOptions::new(4 * MIB)).unwrap());
    let mut vdi = img.open_root(DEFAULT_VDI).unwrap().cursor();
    vdi.write_all(&vec![0x11; 4 * MIB as usize]).unwrap();
    vdi.flush().unwrap();
    img.snapshot(DEFAULT_VDI, "golden").unwrap();
    img.fork("golden", "clone").unwrap();
    let mut clone = img.open_root("clone").unwrap().cursor();
    clone.seek(SeekFrom::Start(MIB)).unwrap();
    clone.write_all(&[0xee; 4096]).unwrap();
    img
}

fn close(img: Arc<Image>) {
    Arc::try_unwrap(img)
        .unwrap_or_else(|_| panic!("another handle is open"))
        .close()
        .unwrap();
}

/// Deletes `clone` and collects; returns the report and the bytes the file occupied
/// before and after, measured here.
fn delete_and_collect(img: &Image, path: &Path) -> (GcReport, u64, u64) {
    img.delete_vdi("clone").unwrap();
    let before = allocated(path);
    let r = img.gc().unwrap();
    (r, before, allocated(path))
}

#[test]
fn gc_reports_what_it_did_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let img = build(&path);
    let (r, before, after) = delete_and_collect(&img, &path);
    close(img);
    assert_eq!(r.roots_removed, 1, "{r:?}");
    // The clone's data cluster, its L2 copy and its L1 table.
    assert_eq!(r.clusters_freed, 3, "{r:?}");
    assert_eq!(r.bytes_freed, 3 << 16, "{r:?}");
    assert!(r.refcounts_exact, "{r:?}");
    // The file length does not tell: the compacted snapshot table went past the end
    // while the freed clusters were punched in place. What it occupies does.
    assert!(r.file_size_after >= r.file_size_before, "{r:?}");
    assert_eq!(r.allocated_before, Some(before), "{r:?}");
    assert_eq!(r.allocated_after, Some(after), "{r:?}");
    assert!(after + r.bytes_freed <= before, "{r:?}");
}

#[test]
fn gc_counts_the_same_whether_the_image_stayed_open_or_was_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let open_path = dir.path().join("open.qcow2");
    let img = build(&open_path);
    let (open, ..) = delete_and_collect(&img, &open_path);
    close(img);

    let re_path = dir.path().join("reopened.qcow2");
    close(build(&re_path));
    let img = Image::open_rw(&re_path).unwrap();
    let (re, ..) = delete_and_collect(&img, &re_path);
    img.close().unwrap();
    assert_eq!(
        (open.roots_removed, open.clusters_freed),
        (re.roots_removed, re.clusters_freed),
        "open: {open:?}\nreopened: {re:?}"
    );
    // And a second collection after a reopen finds nothing left.
    for p in [&open_path, &re_path] {
        let img = Image::open_rw(p).unwrap();
        let again = img.gc().unwrap();
        img.close().unwrap();
        assert_eq!(
            (again.roots_removed, again.clusters_freed),
            (0, 0),
            "{again:?}"
        );
    }
}
