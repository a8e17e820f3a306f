//! A small write through a `FileStorage` splits the large page-cache folio it lands
//! in into 4 KiB pages first (so the kernel's per-write walk over the folio's blocks
//! stays short), leaves the file's bytes as they were written, and leaves folios
//! elsewhere in the file alone.
//!
//! Folio sizes are read from `/proc/self/pagemap` and `/proc/kpageflags`, which
//! need root; where they cannot be read, or where the kernel caches the test file
//! in 4 KiB pages to begin with (no large folios on its file system), there is
//! nothing to show and the test says so.
#![cfg(target_os = "linux")]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use memmap2::{Mmap, UncheckedAdvice};
use qcowx_core::storage::{FileStorage, OpenMode, Storage};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Whether the page at `offset` of the file at `path` belongs to a large folio
/// (None: the kernel does not tell this process).
fn in_large_folio(path: &Path, offset: u64) -> Option<bool> {
    let f = File::open(path).expect("open");
    // SAFETY: a read-only shared mapping of a file no one shrinks during the test.
    let map = unsafe { Mmap::map(&f) }.expect("map");
    // Fault the page in so the page table names it.
    let _ = std::hint::black_box(map[offset as usize]);
    let vpage = (map.as_ptr() as u64 + offset) / 4096;
    let mut entry = [0u8; 8];
    File::open("/proc/self/pagemap")
        .ok()?
        .read_exact_at(&mut entry, vpage * 8)
        .ok()?;
    let entry = u64::from_ne_bytes(entry);
    let pfn = entry & ((1 << 55) - 1);
    // SAFETY: shared file mapping: dropping its page table entries loses nothing.
    unsafe { map.unchecked_advise(UncheckedAdvice::DontNeed) }.expect("madvise");
    if entry >> 63 == 0 || pfn == 0 {
        return None;
    }
    let mut flags = [0u8; 8];
    File::open("/proc/kpageflags")
        .ok()?
        .read_exact_at(&mut flags, pfn * 8)
        .ok()?;
    let flags = u64::from_ne_bytes(flags);
    // KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL.
    Some(flags & (1 << 15 | 1 << 16) != 0)
}

#[test]
fn a_small_write_splits_the_large_folio_under_it_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big-folios.img");
    // Written in one large write and synced: cached in large folios where the file
    // system supports them.
    {
        let f = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&vec![0x5a; 8 * MIB as usize], 0).unwrap();
        f.sync_all().unwrap();
    }
    let (target, unaligned, elsewhere) = (2 * MIB + 20 * KIB, 4 * MIB + 4093, 6 * MIB + 20 * KIB);
    match (
        in_large_folio(&path, target),
        in_large_folio(&path, unaligned),
        in_large_folio(&path, elsewhere),
    ) {
        (Some(true), Some(true), Some(true)) => {}
        other => {
            eprintln!(
                "nothing to show here: folio sizes unreadable or no large folios ({other:?})"
            );
            return;
        }
    }

    let s = FileStorage::open(&path, OpenMode::read_write()).unwrap();
    s.write_at(&[0x11; 4096], target).unwrap();
    // An unaligned write of a few bytes, across a page boundary, splits too.
    s.write_at(b"tail", unaligned).unwrap();

    assert_eq!(
        in_large_folio(&path, target),
        Some(false),
        "the written page is a 4 KiB page of its own now"
    );
    assert_eq!(
        in_large_folio(&path, target + 64 * KIB),
        Some(false),
        "the whole folio around it was split, not only the page"
    );
    assert_eq!(in_large_folio(&path, unaligned), Some(false));
    assert_eq!(in_large_folio(&path, unaligned + 4), Some(false));
    assert_eq!(
        in_large_folio(&path, elsewhere),
        Some(true),
        "a folio no small write touched stays large"
    );

    // The bytes are what was written, the rest as before.
    let mut back = vec![0u8; 8 * MIB as usize];
    s.read_at(&mut back, 0).unwrap();
    let t = target as usize;
    assert!(back[t..t + 4096].iter().all(|&b| b == 0x11));
    assert!(back[..t].iter().all(|&b| b == 0x5a));
    let u = unaligned as usize;
    assert!(back[t + 4096..u].iter().all(|&b| b == 0x5a));
    assert_eq!(&back[u..u + 4], b"tail");
    assert!(back[u + 4..].iter().all(|&b| b == 0x5a));
}
