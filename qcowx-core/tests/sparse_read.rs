//! `Disk::read_sparse`: the bytes of `Disk::read_at` and, from the same look at the
//! tables, the holes `Disk::block_status_from_tables` reports (`Zero` and
//! `Unallocated` extents), on a disk with data, zero clusters, unallocated clusters
//! and a backing file with data and holes of its own, at every alignment tried.

use std::sync::Arc;

use qcowx_core::{CreateOptions, Disk, ExtentStatus, Image, DEFAULT_VDI};

const CS: u64 = 65536;

/// The holes of `[offset, offset+len)` by block status from the tables, merged.
fn status_holes(disk: &Disk, offset: u64, len: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in disk.block_status_from_tables(offset, len).expect("status") {
        if e.status == ExtentStatus::Data {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == e.offset => last.1 += e.length,
            _ => out.push((e.offset, e.length)),
        }
    }
    out
}

#[test]
fn sparse_reads_match_read_at_and_block_status() {
    let dir = tempfile::tempdir().unwrap();
    // The backing file: data in clusters 2 and 5, the rest unallocated.
    let base = dir.path().join("base.qcow2");
    let b = Image::create(&base, &CreateOptions::new(16 * CS)).unwrap();
    b.write_at(&vec![0x11; CS as usize], 2 * CS).unwrap();
    b.write_at(&vec![0x22; CS as usize], 5 * CS).unwrap();
    b.close().unwrap();
    // The top: data in clusters 0 and 3 (part of 3), cluster 5 zeroed over the
    // backing file's data, the rest left to the backing file.
    let mut opts = CreateOptions::new(16 * CS);
    opts.backing_file = Some("base.qcow2".into());
    let img = Arc::new(Image::create(dir.path().join("top.qcow2"), &opts).unwrap());
    img.write_at(&vec![0x33; CS as usize], 0).unwrap();
    img.write_at(&[0x44; 4096], 3 * CS + 8192).unwrap();
    img.write_zeroes(5 * CS, CS, false).unwrap();
    let disk = img.open_root(DEFAULT_VDI).unwrap();

    let mut checked_holes = 0;
    for (offset, len) in [
        (0, 16 * CS),
        (CS - 4096, 8192),
        (2 * CS - 512, 4096),
        (3 * CS + 4096, 16384),
        (4 * CS, 3 * CS),
        (6 * CS + 100, 1000),
        (0, 4096),
    ] {
        let mut want = vec![0u8; len as usize];
        disk.read_at(&mut want, offset).unwrap();
        let mut got = vec![0xeeu8; len as usize];
        let mut holes = Vec::new();
        disk.read_sparse(&mut got, offset, |o, l| holes.push((o, l)))
            .unwrap();
        assert!(got == want, "bytes of [{offset}, +{len})");
        assert_eq!(
            holes,
            status_holes(&disk, offset, len),
            "[{offset}, +{len})"
        );
        for &(o, l) in &holes {
            let at = (o - offset) as usize;
            assert!(got[at..at + l as usize].iter().all(|&b| b == 0));
        }
        checked_holes += holes.len();
    }
    assert!(checked_holes > 5, "the cases cross holes");
    // Whole-disk holes, spelled out: cluster 1 (nothing anywhere), 4, 5 (zeroed),
    // 6.. ; the backing file's cluster 2 and this file's 0 and 3 are data.
    let mut holes = Vec::new();
    let mut buf = vec![0u8; 16 * CS as usize];
    disk.read_sparse(&mut buf, 0, |o, l| holes.push((o, l)))
        .unwrap();
    assert_eq!(holes, [(CS, CS), (4 * CS, 12 * CS)]);
    assert!(buf[2 * CS as usize..3 * CS as usize]
        .iter()
        .all(|&b| b == 0x11));
    // Past the end: refused, as a read.
    assert!(disk
        .read_sparse(&mut [0u8; 512], 16 * CS, |_, _| {})
        .is_err());
}
