//! Crash consistency: run random workloads on a storage layer that records writes and
//! syncs, cut the history at every point (dropping, tearing and reordering unsynced
//! writes), and check that each crash image opens, reads every write that was
//! acknowledged before a completed flush, and repairs to a clean check. Workloads with
//! snapshots and refcount checkpoints cut across the refcount writes too: a cut there
//! must open (recovered from a scan if dirty) as well as any other.

use std::sync::Arc;

use qcowx_core::storage::crashsim::CrashStorage;
use qcowx_core::storage::{MemStorage, Storage};
use qcowx_core::{CreateOptions, Image, OpenOptions};
use qcowx_tests::Rng;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        len: u64,
        seed: u8,
    },
    Zero {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
    /// `Image::checkpoint`: exact refcounts written, dirty bit cleared, image open.
    Checkpoint,
    Snapshot,
}

fn pattern(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(((offset + i) / 512) as u8) | 1)
        .collect()
}

/// A flush that completed: the history length when it returned and the model then.
struct Durable {
    at: usize,
    model: Vec<u8>,
}

/// A change issued after some flush: the history length when it started, and the
/// bytes it could leave (`None`: any value, for discards of partial ranges).
struct Change {
    started: usize,
    offset: u64,
    data: Vec<u8>,
}

fn random_ops(rng: &mut Rng, size: u64, cs: u64, n: usize, structural: bool) -> Vec<Op> {
    (0..n)
        .map(|_| {
            if structural {
                match rng.below(12) {
                    0 => return Op::Checkpoint,
                    1 => return Op::Snapshot,
                    _ => {}
                }
            }
            let offset = rng.below(size / 512) * 512;
            let len = (1 + rng.below((3 * cs / 512).max(1))) * 512;
            let len = len.min(size - offset);
            match rng.below(10) {
                0..=5 => Op::Write {
                    offset,
                    len,
                    seed: rng.below(250) as u8,
                },
                6 => Op::Zero {
                    offset,
                    len,
                    unmap: rng.below(2) == 0,
                },
                7 => Op::Discard { offset, len },
                _ => Op::Flush,
            }
        })
        .collect()
}

fn run_workload(cs: u64, extended: bool, seed: u64, structural: bool) {
    let size = 256 * 1024;
    let storage = Arc::new(CrashStorage::new());
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cs;
    opts.extended_l2 = extended;
    let img = Image::create_in(storage.clone(), &opts).unwrap();
    // Some flushed data first, so later writes overwrite and copy.
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::new(seed);
    let base = pattern(7, 0, size / 2);
    img.write_at(&base, 0).unwrap();
    model[..base.len()].copy_from_slice(&base);
    img.flush().unwrap();
    let mut durable = vec![Durable {
        at: storage.cut_points(),
        model: model.clone(),
    }];
    let mut changes: Vec<Change> = Vec::new();
    let mut snapshots = 0;
    for op in random_ops(&mut rng, size, cs, 40, structural) {
        let started = storage.cut_points();
        match op {
            Op::Write { offset, len, seed } => {
                let data = pattern(seed, offset, len);
                img.write_at(&data, offset).unwrap();
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                changes.push(Change {
                    started,
                    offset,
                    data,
                });
            }
            Op::Zero { offset, len, unmap } => {
                img.write_zeroes(offset, len, unmap).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
                changes.push(Change {
                    started,
                    offset,
                    data: vec![0; len as usize],
                });
            }
            Op::Discard { offset, len } => {
                img.discard(offset, len).unwrap();
                // Whole clusters inside the range read as zeros.
                let first = offset.next_multiple_of(cs);
                let end = ((offset + len) / cs * cs).max(first);
                let end = if offset + len == size { size } else { end };
                if end > first {
                    model[first as usize..end as usize].fill(0);
                    changes.push(Change {
                        started,
                        offset: first,
                        data: vec![0; (end - first) as usize],
                    });
                }
            }
            Op::Flush => {
                img.flush().unwrap();
                durable.push(Durable {
                    at: storage.cut_points(),
                    model: model.clone(),
                });
            }
            Op::Checkpoint => {
                img.checkpoint().unwrap();
                durable.push(Durable {
                    at: storage.cut_points(),
                    model: model.clone(),
                });
            }
            Op::Snapshot => {
                snapshots += 1;
                img.snapshot("default", &format!("s{snapshots}")).unwrap();
            }
        }
    }
    drop(img); // clean close is part of the history too
    durable.push(Durable {
        at: storage.cut_points(),
        model: model.clone(),
    });

    let cuts = storage.cut_points();
    let step = (cuts / if structural { 160 } else { 80 }).max(1);
    for (n, cut) in (0..=cuts).step_by(step).enumerate() {
        let Some(last) = durable.iter().rev().find(|d| d.at <= cut) else {
            continue; // before the image was created and synced
        };
        for s in 0..2u64 {
            let bytes = storage.image_at(cut, seed * 1000 + s);
            verify_crash_image(
                bytes,
                last,
                &changes,
                cut,
                size,
                &format!("cs={cs} ext={extended} seed={seed} cut={cut}/{cuts} s={s}"),
                // QEMU's check on some of them (it costs a process each).
                structural && n % 16 == 0 && s == 0,
            );
        }
    }
}

fn verify_crash_image(
    bytes: Vec<u8>,
    last: &Durable,
    changes: &[Change],
    cut: usize,
    size: u64,
    what: &str,
    qemu: bool,
) {
    let mem = Arc::new(MemStorage::from_vec(bytes));
    let img = Image::from_storage(
        mem.clone() as Arc<dyn Storage>,
        &OpenOptions::new().write(true),
    )
    .unwrap_or_else(|e| panic!("{what}: crash image does not open: {e}"));
    let mut content = vec![0u8; size as usize];
    img.read_at(&mut content, 0)
        .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
    // Each byte holds the value at the last completed flush, or a value some later
    // change (issued before the cut) wrote.
    let later: Vec<&Change> = changes
        .iter()
        .filter(|c| c.started >= last.at && c.started < cut)
        .collect();
    for (i, (&got, &want)) in content.iter().zip(&last.model).enumerate() {
        if got == want {
            continue;
        }
        let i = i as u64;
        let explained = later.iter().any(|c| {
            i >= c.offset
                && i < c.offset + c.data.len() as u64
                && c.data[(i - c.offset) as usize] == got
        });
        assert!(
            explained,
            "{what}: byte {i} is {got:#x}, flushed value {want:#x}, and no later write explains it"
        );
    }
    let report = img
        .repair()
        .unwrap_or_else(|e| panic!("{what}: repair failed: {e}"));
    assert_eq!(report.corruptions, 0, "{what}: {:?}", report.messages);
    assert_eq!(report.leaks, 0, "{what}: {:?}", report.messages);
    img.close().unwrap();
    drop(img);
    let img = Image::from_storage(mem.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
    let mut again = vec![0u8; size as usize];
    img.read_at(&mut again, 0).unwrap();
    assert_eq!(again, content, "{what}: content changed by repair");
    let report = img.check().unwrap();
    assert_eq!(report.exit_code(), 0, "{what}: {:?}", report.messages);
    drop(img);
    if qemu {
        qcowx_tests::assert_qemu_check_clean_bytes(&mem.to_vec(), what);
    }
}

#[test]
fn crash_cuts_4k_clusters() {
    for seed in 1..=4 {
        run_workload(4096, false, seed, false);
    }
}

#[test]
fn crash_cuts_512_byte_clusters() {
    for seed in 11..=13 {
        run_workload(512, false, seed, false);
    }
}

#[test]
fn crash_cuts_extended_l2() {
    for seed in 21..=23 {
        run_workload(16384, true, seed, false);
    }
}

/// About 2,000 cuts across snapshots, refcount checkpoints and clean closes.
#[test]
fn crash_cuts_across_checkpoints_and_snapshots() {
    for seed in 31..=36 {
        let cs = if seed % 2 == 0 { 4096 } else { 512 };
        run_workload(cs, false, seed, true);
    }
}
