//! GC runs while VDIs are read and written: I/O does not wait for its count, what is
//! written meanwhile survives, snapshots stay exact, and QEMU finds the image clean.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use qcowx_core::storage::FileStorage;
use qcowx_core::{CreateOptions, Image, LockMode, OpenOptions};
use qcowx_tests::{assert_qemu_check_clean as qemu_check_clean, Pause, Rng, Stopped};

const MIB: u64 = 1 << 20;

fn fill(seed: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| seed ^ (i / 512) as u8 | 1).collect()
}

fn read_disk(d: &qcowx_core::Disk, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    d.read_at(&mut b, 0).unwrap();
    b
}

/// Runs `f` on another thread and fails the test if it does not return within 30 s
/// (it would hang if it waited for something that waits for the test thread).
fn within_30s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("{what} did not finish while gc was counting"))
}

#[test]
fn io_goes_on_while_gc_counts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    let size = 64 * MIB;
    let file = FileStorage::create(&path, LockMode::Exclusive).unwrap();
    let (pause, storage) = Pause::new(Arc::new(file));
    let img = Arc::new(Image::create_in(storage, &CreateOptions::new(size)).unwrap());
    let mut model = vec![0u8; size as usize];
    let write = |img: &Image, model: &mut Vec<u8>, seed: u8, off: u64, len: u64| {
        let data = fill(seed, len);
        img.write_at(&data, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    };
    // s0 holds data the head overwrites and s1 does not share: gc frees it once s0
    // is deleted.
    write(&img, &mut model, 0x10, 0, MIB);
    img.snapshot("default", "s0").unwrap();
    write(&img, &mut model, 0x20, 0, MIB / 2);
    img.snapshot("default", "s1").unwrap();
    let s1 = model.clone();
    write(&img, &mut model, 0x30, MIB / 2, MIB / 2);
    img.fork("s1", "v").unwrap();
    img.delete_snapshot("s0").unwrap();
    img.flush().unwrap();

    // gc stops on its first read of a snapshot's L1 table (8 bytes here): after it
    // compacted the table, while it counts.
    let l1_bytes = 8;
    pause.reset();
    let gc = {
        let (img, pause) = (img.clone(), pause.clone());
        std::thread::spawn(move || {
            pause.arm(l1_bytes);
            let r = img.gc();
            pause.finish();
            r
        })
    };
    assert_eq!(pause.wait(), Stopped::Paused, "gc never read a snapshot L1");

    // Meanwhile: new clusters, in-place writes, copy-on-write on the fork, a zero
    // write that frees a cluster, a flush, reads.
    let (model, v_model) = within_30s("I/O", {
        let img = img.clone();
        let s1 = s1.clone();
        move || {
            let mut model = model;
            let mut write = |seed: u8, off: u64, len: u64| {
                let data = fill(seed, len);
                img.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            };
            write(0x40, 2 * MIB, 256 * 1024);
            write(0x50, MIB / 2 + 4096, 8192);
            img.write_zeroes(2 * MIB, 65536, true).unwrap();
            model[2 * MIB as usize..2 * MIB as usize + 65536].fill(0);
            let v = img.open_root("v").unwrap();
            let mut v_model = s1.clone();
            let data = fill(0x60, 100_000);
            v.write_at(&data, 300_000).unwrap();
            v_model[300_000..400_000].copy_from_slice(&data);
            img.flush().unwrap();
            let mut got = vec![0u8; 3 * MIB as usize];
            img.read_at(&mut got, 0).unwrap();
            assert!(
                got == model[..3 * MIB as usize],
                "default VDI read during gc"
            );
            assert!(read_disk(&v, size) == v_model, "VDI v read during gc");
            (model, v_model)
        }
    });
    pause.release();
    let report = gc.join().unwrap().unwrap();
    assert_eq!(report.roots_removed, 1, "{report:?}");
    assert!(
        report.clusters_freed >= 8,
        "s0's eight exclusive data clusters are freed: {report:?}"
    );
    assert!(
        !report.refcounts_exact,
        "links changed during the count: {report:?}"
    );

    let check = img.check().unwrap();
    assert_eq!(check.corruptions, 0, "{:?}", check.messages);
    let mut got = vec![0u8; size as usize];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == model, "default VDI after gc");
    assert!(read_disk(&img.open_root("v").unwrap(), size) == v_model);
    assert!(read_disk(&img.open_root("s1").unwrap(), size) == s1);

    // With nothing written during it, the next gc writes exact refcounts.
    let again = img.gc().unwrap();
    assert!(again.refcounts_exact, "{again:?}");
    let check = img.check().unwrap();
    assert_eq!(check.exit_code(), 0, "{:?}", check.messages);
    img.close().unwrap();
    drop(img);
    qemu_check_clean(&path);
    let img = Arc::new(OpenOptions::new().open(&path).unwrap());
    let mut got = vec![0u8; size as usize];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == model, "default VDI after reopening");
    assert!(read_disk(&img.open_root("v").unwrap(), size) == v_model);
    assert!(read_disk(&img.open_root("s1").unwrap(), size) == s1);
}

/// One writer's region and what it holds.
struct Region {
    vdi: &'static str,
    start: u64,
    len: u64,
    model: Vec<u8>,
}

fn writer(img: &Arc<Image>, mut r: Region, seed: u64, ops: usize, cs: u64) -> Region {
    let mut rng = Rng::new(seed);
    let d = img.open_root(r.vdi).unwrap();
    for _ in 0..ops {
        let off = rng.below(r.len / 512) * 512;
        let len = ((1 + rng.below(3 * cs / 512)) * 512).min(r.len - off);
        let at = (r.start + off) as usize;
        match rng.below(10) {
            0..=5 => {
                let data = fill(rng.below(255) as u8, len);
                d.write_at(&data, r.start + off).unwrap();
                r.model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            6 => {
                d.write_zeroes(r.start + off, len, rng.below(2) == 0)
                    .unwrap();
                r.model[off as usize..(off + len) as usize].fill(0);
            }
            7 => {
                // Whole clusters inside the range read as zeros afterwards.
                d.discard(r.start + off, len).unwrap();
                let first = (at as u64).next_multiple_of(cs);
                let mut c = first;
                while c + cs <= at as u64 + len {
                    let o = (c - r.start) as usize;
                    r.model[o..o + cs as usize].fill(0);
                    c += cs;
                }
            }
            8 => d.flush().unwrap(),
            _ => {
                let mut got = vec![0u8; len as usize];
                d.read_at(&mut got, r.start + off).unwrap();
                assert!(
                    got == r.model[off as usize..(off + len) as usize],
                    "{} read at {} during the race",
                    r.vdi,
                    r.start + off
                );
            }
        }
    }
    r
}

#[test]
fn writers_snapshots_and_gc_race() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.qcow2");
    let size = 16 * MIB;
    let cs = 4096;
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cs;
    let img = Arc::new(Image::create(&path, &opts).unwrap());
    let base = fill(0x11, size);
    img.write_at(&base, 0).unwrap();
    img.snapshot("default", "base").unwrap();
    img.fork("base", "v").unwrap();

    let half = size / 2;
    let regions = vec![
        Region {
            vdi: "default",
            start: 0,
            len: half,
            model: base[..half as usize].to_vec(),
        },
        Region {
            vdi: "default",
            start: half,
            len: half,
            model: base[half as usize..].to_vec(),
        },
        Region {
            vdi: "v",
            start: 0,
            len: size,
            model: base.clone(),
        },
    ];
    let done = Arc::new(AtomicBool::new(false));
    let gc_runs = Arc::new(AtomicU64::new(0));
    let seed = 0x5eed_0001;
    println!("seed {seed:#x}");

    let gc = {
        let (img, done, runs) = (img.clone(), done.clone(), gc_runs.clone());
        std::thread::spawn(move || {
            let mut freed = 0;
            while !done.load(Ordering::Relaxed) {
                freed += img.gc().unwrap().clusters_freed;
                runs.fetch_add(1, Ordering::Relaxed);
            }
            freed
        })
    };
    // Snapshots of the default VDI, each read back at once; older ones deleted.
    let snaps = {
        let (img, done) = (img.clone(), done.clone());
        std::thread::spawn(move || {
            let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
            let mut n = 0;
            while !done.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("s{n}");
                img.snapshot("default", &name).unwrap();
                let content = read_disk(&img.open_root(&name).unwrap(), size);
                kept.push((name, content));
                if kept.len() > 3 {
                    let (old, _) = kept.remove(0);
                    img.delete_snapshot(&old).unwrap();
                }
            }
            kept
        })
    };
    let writers: Vec<_> = regions
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let img = img.clone();
            std::thread::spawn(move || writer(&img, r, seed + i as u64, 1000, cs))
        })
        .collect();
    let regions: Vec<Region> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    let freed = gc.join().unwrap();
    let kept = snaps.join().unwrap();
    println!(
        "gc ran {} times ({freed} clusters freed); {} snapshots kept",
        gc_runs.load(Ordering::Relaxed),
        kept.len()
    );
    assert!(gc_runs.load(Ordering::Relaxed) > 0);

    let verify = |img: &Arc<Image>, when: &str| {
        for r in &regions {
            let d = img.open_root(r.vdi).unwrap();
            let mut got = vec![0u8; r.len as usize];
            d.read_at(&mut got, r.start).unwrap();
            assert!(got == r.model, "{} [{}, +{}) {when}", r.vdi, r.start, r.len);
        }
        for (name, content) in &kept {
            assert!(
                read_disk(&img.open_root(name).unwrap(), size) == *content,
                "snapshot {name} {when}"
            );
        }
        assert!(
            read_disk(&img.open_root("base").unwrap(), size) == base,
            "base {when}"
        );
    };
    verify(&img, "after the race");
    let check = img.check().unwrap();
    assert_eq!(check.corruptions, 0, "{:?}", check.messages);
    let last = img.gc().unwrap();
    assert!(last.refcounts_exact, "{last:?}");
    verify(&img, "after a quiet gc");
    img.close().unwrap();
    drop(img);
    qemu_check_clean(&path);
    let img = Arc::new(Image::open(&path).unwrap());
    verify(&img, "after reopening");
}
