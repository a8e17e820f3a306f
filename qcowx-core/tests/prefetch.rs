//! `Image::prefetch` / `Disk::prefetch`: the host bytes behind a guest range come
//! into the page cache without a read, in this file and down the backing chain, and
//! a range the disk does not hold is refused as a read would be.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::Mmap;
use qcowx_core::storage::resident;
use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
use qcowx_tests::evict_page_cache;

const MIB: u64 = 1 << 20;

/// Whether `[offset, offset+len)` of the file at `path` is in the page cache.
fn cached(path: &Path, offset: u64, len: u64) -> bool {
    let f = File::open(path).expect("open");
    // SAFETY: a read-only mapping of a file no one shrinks during the test; only
    // mincore looks at it.
    let map = unsafe { Mmap::map(&f) }.expect("map");
    resident(&map, offset as usize, len as usize)
}

/// Waits (bounded) until the range is cached; whether it became so.
fn becomes_cached(path: &Path, offset: u64, len: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cached(path, offset, len) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The host range of the data at guest `offset` (one allocated extent).
fn host_of(img: &Image, offset: u64, len: u64) -> u64 {
    let e = img.block_status(offset, len).expect("block_status");
    assert_eq!(e.len(), 1, "{e:?}");
    e[0].host_offset.expect("stored uncompressed")
}

#[test]
fn prefetch_brings_evicted_data_into_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let img = Image::create(&path, &CreateOptions::new(64 * MIB)).unwrap();
    // Two runs of data far apart in the guest.
    img.write_at(&vec![0x11; 4 * MIB as usize], 8 * MIB)
        .unwrap();
    img.write_at(&vec![0x22; 2 * MIB as usize], 40 * MIB)
        .unwrap();
    img.flush().unwrap();
    let (h1, h2) = (
        host_of(&img, 8 * MIB, 4 * MIB),
        host_of(&img, 40 * MIB, 2 * MIB),
    );
    evict_page_cache(&path);
    assert!(
        !cached(&path, h1, 4 * MIB),
        "the eviction did not drop the pages"
    );
    assert!(!cached(&path, h2, 2 * MIB));

    img.prefetch(0, 64 * MIB).unwrap();
    assert!(
        becomes_cached(&path, h1, 4 * MIB),
        "first run not prefetched"
    );
    assert!(
        becomes_cached(&path, h2, 2 * MIB),
        "second run not prefetched"
    );
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 40 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));

    // Past the end: refused, as a read is.
    assert!(img.prefetch(63 * MIB, 2 * MIB).is_err());
}

#[test]
fn prefetch_of_a_snapshot_reaches_into_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let b = Image::create(&base, &CreateOptions::new(16 * MIB)).unwrap();
    b.write_at(&vec![0x33; 2 * MIB as usize], 4 * MIB).unwrap();
    let hb = host_of(&b, 4 * MIB, 2 * MIB);
    b.close().unwrap();

    let top = dir.path().join("top.qcow2");
    let mut opts = CreateOptions::new(16 * MIB);
    opts.backing_file = Some("base.qcow2".into());
    let img = Arc::new(Image::create(&top, &opts).unwrap());
    img.write_at(&vec![0x44; MIB as usize], 0).unwrap();
    img.snapshot(DEFAULT_VDI, "s").unwrap();
    img.flush().unwrap();
    let ht = host_of(&img, 0, MIB);
    evict_page_cache(&base);
    evict_page_cache(&top);
    assert!(
        !cached(&base, hb, 2 * MIB),
        "the eviction did not drop the pages"
    );
    assert!(!cached(&top, ht, MIB));

    let snap = img.open_root("s").unwrap();
    snap.prefetch(0, 16 * MIB).unwrap();
    assert!(
        becomes_cached(&top, ht, MIB),
        "this file's data not prefetched"
    );
    assert!(
        becomes_cached(&base, hb, 2 * MIB),
        "the backing file's data not prefetched"
    );
}
