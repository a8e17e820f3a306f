//! `Image::read_mapped`: bytes lent from the image file's mapping are the bytes
//! `read_at` reads, it declines what it cannot lend cheaply, and the file never
//! shrinks under a lender.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use qcowx_core::convert::CompressedWriter;
use qcowx_core::storage::MemStorage;
use qcowx_core::{CreateOptions, Image};
use qcowx_tests::evict_page_cache;

const MIB: u64 = 1 << 20;

/// The lent bytes, gathered (or None when the image declined).
fn lent(img: &Image, offset: u64, len: u64) -> Option<Vec<u8>> {
    img.read_mapped(offset, len, |slices| {
        let mut v = Vec::new();
        for s in slices {
            v.extend_from_slice(s);
        }
        v
    })
    .expect("read_mapped")
}

fn read(img: &Image, offset: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    img.read_at(&mut v, offset).expect("read_at");
    v
}

/// Bytes that differ at every offset, so a slice from the wrong place shows.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 31 + seed * 7) ^ (i as u64 >> 9)) as u8)
        .collect()
}

#[test]
fn lent_bytes_are_the_bytes_read_at_reads() {
    let dir = tempfile::tempdir().unwrap();
    let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(8 * MIB)).unwrap();
    // Data in [1 MiB, 3 MiB) written out of order (so host clusters are not in guest
    // order), zeros written explicitly at [4 MiB, 4.5 MiB), the rest unallocated.
    img.write_at(&pattern(1, MIB as usize), 2 * MIB).unwrap();
    img.write_at(&pattern(2, MIB as usize), MIB).unwrap();
    img.write_zeroes(4 * MIB, MIB / 2, false).unwrap();
    // A snapshot makes the first cluster's link read-only; rewrite half of it.
    img.snapshot("default", "s").unwrap();
    img.write_at(&pattern(3, 4096), MIB + 8192).unwrap();
    for &(off, len) in &[
        (0, 8 * MIB),
        (MIB - 512, 2 * MIB + 1024),
        (MIB + 100, 70_000),
        (3 * MIB - 4096, MIB + 8192),
        (4 * MIB, MIB / 2),
        (7 * MIB, MIB),
        (MIB, 0),
    ] {
        let got = lent(&img, off, len).unwrap_or_else(|| panic!("{off}+{len} not lent"));
        assert!(
            got == read(&img, off, len),
            "{off}+{len}: lent bytes differ"
        );
    }
    // Past the end: the same error read_at gives.
    assert!(img.read_mapped(7 * MIB, 2 * MIB, |_| ()).is_err());
}

#[test]
fn what_cannot_be_lent_cheaply_is_declined() {
    // No file to map.
    let mem = Image::create_in(Arc::new(MemStorage::new()), &CreateOptions::new(MIB)).unwrap();
    mem.write_at(&[7; 4096], 0).unwrap();
    assert!(lent(&mem, 0, 4096).is_none(), "no mapping");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.qcow2");
    let img = Image::create(&path, &CreateOptions::new(4 * MIB)).unwrap();
    img.write_at(&pattern(4, MIB as usize), 0).unwrap();
    // A compressed cluster at 2 MiB.
    let mut w = CompressedWriter::new(&img).unwrap();
    assert!(w.write_cluster(2 * MIB, &[0x33; 65536]).unwrap());
    w.finish().unwrap();
    assert!(lent(&img, 2 * MIB - 4096, 8192).is_none(), "compressed");

    // Data that is not in the page cache: lending it would wait for the disk. (Pages
    // this process has touched through the mapping stay cached while mapped, so
    // this range is lent only after the eviction.)
    img.flush().unwrap();
    evict_page_cache(&path);
    assert!(
        lent(&img, 0, MIB).is_none(),
        "evicted pages must not be lent"
    );
    let expect = read(&img, 0, MIB);
    assert!(lent(&img, 0, MIB) == Some(expect), "lent again once cached");
    drop(img);

    // Clusters that come from a backing file.
    let top = dir.path().join("top.qcow2");
    let mut opts = CreateOptions::new(4 * MIB);
    opts.backing_file = Some("b.qcow2".into());
    opts.backing_format = Some("qcow2".into());
    let top = Image::create(&top, &opts).unwrap();
    assert!(lent(&top, 0, 4096).is_none(), "from the backing file");
    top.write_at(&[9; 65536], 0).unwrap();
    assert!(
        lent(&top, 0, 65536) == Some(vec![9; 65536]),
        "the top's own data"
    );
}

/// Repair shrinks the file past its last used cluster; it must wait while a reader
/// holds lent bytes (a mapping read past the end of the file would fault).
#[test]
fn the_file_does_not_shrink_under_a_lender() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.qcow2");
    let img = Arc::new(Image::create(&path, &CreateOptions::new(4 * MIB)).unwrap());
    img.write_at(&[1; 65536], 0).unwrap();
    img.write_at(&[2; 8 * 65536], MIB).unwrap();
    // The last clusters of the file become free (and reusable once flushed).
    img.discard(MIB, 8 * 65536).unwrap();
    img.flush().unwrap();
    let before = std::fs::metadata(&path).unwrap().len();

    let (held_tx, held_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let reader = {
        let img = Arc::clone(&img);
        std::thread::spawn(move || {
            img.read_mapped(0, 65536, |s| {
                held_tx.send(()).unwrap();
                go_rx.recv_timeout(Duration::from_secs(30)).unwrap();
                s.iter().map(|x| x.len()).sum::<usize>()
            })
            .unwrap()
        })
    };
    held_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let repairer = {
        let img = Arc::clone(&img);
        std::thread::spawn(move || {
            img.repair().unwrap();
            done_tx.send(()).unwrap();
        })
    };
    // While the bytes are lent, the repair cannot finish (it would cut the file).
    assert!(
        done_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "repair finished while bytes were lent"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
    go_tx.send(()).unwrap();
    assert_eq!(reader.join().unwrap(), Some(65536));
    done_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    repairer.join().unwrap();
    assert!(
        std::fs::metadata(&path).unwrap().len() < before,
        "repair was expected to shrink the file"
    );
}
