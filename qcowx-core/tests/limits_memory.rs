//! Limits of what qcowx holds in memory, at the limit and one past it
//! (spec/limits.md): the L2 cache's capacity, and the number of problems a check
//! describes.
//!
//! The QEMU tools come from the Debian package `qemu-utils`; a missing tool fails the
//! test with a message naming it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use qcowx_core::engine::cache::{L2Cache, DEFAULT_CACHE_BYTES, MIN_CACHED_TABLES};
use qcowx_core::format::addr::HostOffset;
use qcowx_core::storage::{Access, MemStorage, Storage, Watched};
use qcowx_core::{CreateOptions, Image, OpenOptions};
use qcowx_tests::qemu_img;

// ---- the L2 cache -----------------------------------------------------------------------------

/// Reads at the offsets it is told are L2 tables, counted.
#[derive(Debug, Clone, Default)]
struct TableReads {
    tables: Arc<Mutex<Vec<u64>>>,
    count: Arc<AtomicU64>,
}

/// A storage in memory whose reads of L2 tables `TableReads` counts.
fn counting() -> (TableReads, Arc<Watched<MemStorage>>) {
    let reads = TableReads::default();
    let r = reads.clone();
    let storage = Watched::new(MemStorage::new(), move |a| {
        if let Access::Read { offset, .. } = a {
            if r.tables.lock().unwrap().contains(&offset) {
                r.count.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(())
    });
    (reads, Arc::new(storage))
}

/// Reads, in `passes` rounds, one unallocated cluster of each of the first `tables`
/// L2 tables (only the table lookup touches the file); returns the table reads of the
/// rounds after the first.
fn table_reads_cycling(
    (reads, storage): &(TableReads, Arc<Watched<MemStorage>>),
    opts: &OpenOptions,
    tables: u64,
) -> u64 {
    let img = Image::from_storage(storage.clone(), opts).expect("open");
    let span = 512u64 << 20; // guest bytes one 64 KiB L2 table maps
    let mut buf = [0u8; 512];
    for t in 0..tables {
        img.read_at(&mut buf, t * span + 65536)
            .expect("warm-up read");
    }
    let before = reads.count.load(Ordering::SeqCst);
    for _ in 0..3 {
        for t in 0..tables {
            img.read_at(&mut buf, t * span + 65536).expect("read");
            assert_eq!(buf, [0u8; 512]);
        }
    }
    reads.count.load(Ordering::SeqCst) - before
}

/// The L2 cache holds `cache_bytes / table size` tables (at least
/// `MIN_CACHED_TABLES`): cycling over exactly that many tables reads none of them
/// again; over one more, every lookup misses (LRU). The default holds 128 tables of
/// 64 KiB.
#[test]
fn l2_cache_holds_its_capacity_and_not_one_table_more() {
    let tables = DEFAULT_CACHE_BYTES as u64 / 65536 + 1;
    assert_eq!(tables - 1, 128);
    let span = 512u64 << 20;
    let counted = counting();
    let storage = &counted.1;
    let img =
        Image::create_in(storage.clone(), &CreateOptions::new(tables * span)).expect("create");
    for t in 0..tables {
        img.write_at(&[1u8; 512], t * span).expect("write");
    }
    img.close().expect("close");
    // The tables' offsets, from the L1 table.
    {
        let img = Image::from_storage(storage.clone(), &OpenOptions::new()).expect("open");
        let h = img.header();
        let mut l1 = vec![0u8; h.l1_size as usize * 8];
        storage
            .read_at(&mut l1, h.l1_table_offset)
            .expect("read L1");
        let offsets: Vec<u64> = l1
            .chunks(8)
            .map(|w| u64::from_be_bytes(w.try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
            .filter(|&o| o != 0)
            .collect();
        assert_eq!(offsets.len() as u64, tables);
        *counted.0.tables.lock().unwrap() = offsets;
    }

    let default = OpenOptions::new();
    assert_eq!(table_reads_cycling(&counted, &default, tables - 1), 0);
    assert_eq!(table_reads_cycling(&counted, &default, tables), 3 * tables);

    let four = OpenOptions::new().cache_bytes(4 * 65536 + 65535);
    assert_eq!(table_reads_cycling(&counted, &four, 4), 0);
    assert_eq!(table_reads_cycling(&counted, &four, 5), 15);
    // Below the minimum the cache still holds MIN_CACHED_TABLES.
    let tiny = OpenOptions::new().cache_bytes(1);
    assert_eq!(
        table_reads_cycling(&counted, &tiny, MIN_CACHED_TABLES as u64),
        0
    );

    // The structure itself: at capacity nothing is evicted; one more evicts one.
    let mut c = L2Cache::new(4 * 64, 64);
    assert_eq!(c.capacity(), 4);
    for o in 0..4 {
        assert!(c.insert(HostOffset::new(o), vec![o], true).is_none());
    }
    let ev = c
        .insert(HostOffset::new(4), vec![4], true)
        .expect("a dirty table evicted");
    assert_eq!(ev.offset, HostOffset::new(0), "the least recently used one");
}

// ---- check report ---------------------------------------------------------------------------

/// A check lists at most `MAX_MESSAGES` problems, and counts every one: 1,500 L2
/// entries pointing past the end of the file are 1,500 corruptions, 1,000 messages.
#[test]
fn a_check_describes_at_most_max_messages_problems_and_counts_them_all() {
    use qcowx_core::refcount::MAX_MESSAGES;
    const CS: u64 = 4096;
    let bad = MAX_MESSAGES as u64 * 3 / 2;
    let mem = Arc::new(MemStorage::new());
    let mut opts = CreateOptions::new(bad * CS);
    opts.cluster_size = CS;
    let img = Image::create_in(mem.clone(), &opts).expect("create");
    for k in 0..bad {
        img.write_at(&[0x11; 512], k * CS).expect("write");
    }
    img.close().expect("close");
    drop(img);
    let mut bytes = mem.to_vec();
    let file_len = bytes.len() as u64;
    let be64 =
        |b: &[u8], at: u64| u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap());
    // Every L1 entry's L2 table: its used entries get a host offset past the file's end.
    let (l1_at, l1_len) = (
        be64(&bytes, 40),
        u64::from(u32::from_be_bytes(bytes[36..40].try_into().unwrap())),
    );
    let mut patched = 0u64;
    for i in 0..l1_len {
        let l2 = be64(&bytes, l1_at + i * 8) & 0x00ff_ffff_ffff_fe00;
        if l2 == 0 {
            continue;
        }
        for j in 0..CS / 8 {
            let at = l2 + j * 8;
            let word = be64(&bytes, at);
            if word & 0x00ff_ffff_ffff_fe00 != 0 && patched < bad {
                let far = (word & !0x00ff_ffff_ffff_fe00)
                    | ((file_len + (j + 1) * CS) & 0x00ff_ffff_ffff_fe00);
                bytes[at as usize..at as usize + 8].copy_from_slice(&far.to_be_bytes());
                patched += 1;
            }
        }
    }
    assert_eq!(patched, bad, "every written cluster's L2 entry was patched");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.qcow2");
    std::fs::write(&path, &bytes).expect("write image");
    let img = Image::from_storage(Arc::new(MemStorage::from_vec(bytes)), &OpenOptions::new())
        .expect("open read-only");
    let report = img.check().expect("check");
    // Each patched entry is past the end of the file and, flagged COPIED, points at a
    // cluster whose refcount is 0: two corruptions, as qemu-img check counts them.
    let out = qemu_img()
        .args(["check", "-f", "qcow2"])
        .arg(&path)
        .output()
        .expect("qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout);
    let qemu_errors: u64 = text
        .lines()
        .find_map(|l| l.strip_suffix(" errors were found on the image."))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("qemu-img check output: {text}"));
    assert!(report.corruptions >= bad, "every bad entry counted");
    assert_eq!(report.corruptions, qemu_errors, "qemu-img check:\n{text}");
    assert_eq!(
        report.messages.len(),
        MAX_MESSAGES,
        "the first MAX_MESSAGES described"
    );
    assert!(
        report.messages[0].contains("past the end of the file"),
        "{}",
        report.messages[0]
    );
    assert_eq!(report.exit_code(), 2);
}
