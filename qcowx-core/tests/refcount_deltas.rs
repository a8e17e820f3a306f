//! Exact refcounts from the changes recorded while an image was open: every sequence
//! of writes, zeroing, discards, snapshots, forks, reverts, renames, deletes and
//! resizes closes to refcounts that `qemu-img check` and qcowx's own scan accept,
//! without the full rebuild (a walk of every root) the close used to do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use qcowx_core::storage::{Access, FileStorage, OpenMode, Watched};
use qcowx_core::{CreateOptions, Image, OpenOptions, RootKind};
use qcowx_tests::{assert_qemu_check_clean, pattern, require_qemu_tools, Rng};

const SIZE: u64 = 8 << 20;

fn closes_by_apply(img: &Image) {
    img.checkpoint().unwrap();
    assert_eq!(
        img.last_refcount_rebuild(),
        None,
        "the refcounts were rebuilt from a scan, not applied"
    );
}

fn random_session(seed: u64, path: &std::path::Path, opts: &CreateOptions) {
    let mut rng = Rng::new(seed);
    let img = Arc::new(Image::create(path, opts).unwrap());
    let cs = img.cluster_size();
    let mut snaps: Vec<String> = Vec::new();
    let mut vdis: Vec<String> = vec!["default".into()];
    let mut size = SIZE;
    for step in 0..60 {
        let op = rng.below(100);
        let disk = img
            .open_root(&vdis[rng.below(vdis.len() as u64) as usize])
            .unwrap();
        let dsize = disk.size();
        let off = rng.below(dsize / 512) * 512;
        let len = (rng.range(1, 3 * cs) / 512 * 512).clamp(512, dsize - off);
        match op {
            0..=39 => disk
                .write_at(&pattern(seed ^ step, len as usize), off)
                .unwrap(),
            40..=47 => disk.write_zeroes(off, len, rng.chance(1, 2)).unwrap(),
            48..=52 => disk.discard(off, len).unwrap(),
            53..=64 => {
                let vdi = vdis[rng.below(vdis.len() as u64) as usize].clone();
                let name = format!("s{step}");
                img.snapshot(&vdi, &name).unwrap();
                snaps.push(name);
            }
            65..=72 if !snaps.is_empty() => {
                let s = &snaps[rng.below(snaps.len() as u64) as usize];
                let name = format!("v{step}");
                img.fork(s, &name).unwrap();
                vdis.push(name);
            }
            73..=78 if !snaps.is_empty() => {
                let s = &snaps[rng.below(snaps.len() as u64) as usize];
                let vdi = &vdis[rng.below(vdis.len() as u64) as usize];
                img.revert(vdi, s).unwrap();
            }
            79..=82 if !snaps.is_empty() => {
                let i = rng.below(snaps.len() as u64) as usize;
                let new = format!("r{step}");
                img.rename(RootKind::Snapshot, &snaps[i], &new).unwrap();
                snaps[i] = new;
            }
            83..=87 if !snaps.is_empty() => {
                let i = rng.below(snaps.len() as u64) as usize;
                img.delete_snapshot(&snaps.remove(i)).unwrap();
            }
            88..=90 if vdis.len() > 1 => {
                let i = 1 + rng.below(vdis.len() as u64 - 1) as usize;
                img.delete_vdi(&vdis.remove(i)).unwrap();
            }
            91..=93 => {
                drop(disk);
                size += rng.range(1, 4) * (1 << 20);
                img.resize(size).unwrap();
            }
            94..=96 => closes_by_apply(&img),
            _ => img.flush().unwrap(),
        }
        if seed.is_multiple_of(2) {
            // Even seeds check after every step (odd ones let the record grow): after
            // a checkpoint the image is clean, so its refcounts must be exact.
            closes_by_apply(&img);
            let report = img.check().unwrap();
            assert_eq!(
                (report.corruptions, report.leaks),
                (0, 0),
                "seed {seed}, step {step} (op {op}): {:?}",
                report.messages
            );
        }
    }
    closes_by_apply(&img);
    img.close().unwrap();
    drop(img);
    let img = Image::open(path).unwrap();
    let report = img.check().unwrap();
    assert_eq!(
        (report.corruptions, report.leaks, report.dirty),
        (0, 0, false),
        "seed {seed}: {:?}",
        report.messages
    );
    drop(img);
    assert_qemu_check_clean(path);
}

#[test]
fn random_sessions_close_to_exact_refcounts_without_a_scan() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..24u64 {
        let path = dir.path().join(format!("r{seed}.qcow2"));
        let mut opts = CreateOptions::new(SIZE);
        opts.cluster_size = [512, 4096, 65536][seed as usize % 3];
        opts.extended_l2 = seed % 6 == 5;
        random_session(seed, &path, &opts);
    }
}

#[test]
fn reopened_sessions_keep_counting() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    Image::create(&path, &CreateOptions::new(SIZE)).unwrap();
    for round in 0..4u64 {
        let img = Image::open_rw(&path).unwrap();
        img.write_at(&pattern(round, 200_000), round * 70_000)
            .unwrap();
        img.snapshot("default", &format!("s{round}")).unwrap();
        img.write_at(&pattern(round + 9, 5000), round * 1000)
            .unwrap();
        closes_by_apply(&img);
        img.close().unwrap();
        drop(img);
        assert_qemu_check_clean(&path);
    }
    let img = OpenOptions::new().open(&path).unwrap();
    assert_eq!(img.check().unwrap().exit_code(), 0);
}

/// 8-bit refcounts hold 255 references: the active layer and 254 snapshots of it fit,
/// one more snapshot is refused before it writes anything, and every snapshot taken
/// on the way (through the free bound, the session bound and the exact check) leaves
/// counts QEMU agrees with.
#[test]
fn snapshots_fill_8_bit_refcounts_exactly_then_are_refused() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r8.qcow2");
    qcowx_tests::qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=8",
        path.to_str().unwrap(),
        "4M",
    ]);
    qcowx_tests::qemu_io_ok("qcow2", &path, &["write -P 0x11 0 256k"]);
    let img = Image::open_rw(&path).unwrap();
    let mut taken = 0;
    let refused = loop {
        match img.snapshot("default", &format!("s{taken}")) {
            Ok(_) => taken += 1,
            Err(e) => break e,
        }
        assert!(taken <= 300, "snapshots never refused");
    };
    assert_eq!(taken, 254, "refused after {taken}: {refused}");
    assert!(
        matches!(refused, qcowx_core::Error::RefcountOverflow { bits: 8, .. }),
        "{refused:?}"
    );
    assert_eq!(
        img.list().unwrap().len(),
        255,
        "the refused snapshot is not listed"
    );
    img.close().unwrap();
    drop(img);
    assert_qemu_check_clean(&path);
}

/// Two heads share a cluster through copies of one table; when the other head
/// overwrites it, the default VDI is its only holder, and its link must say so (bit
/// 63, QEMU's COPIED rule) once the refcounts are written — without a full rebuild.
#[test]
fn a_cluster_another_head_gives_up_becomes_the_default_vdis_own() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let img = Arc::new(Image::create(&path, &CreateOptions::new(SIZE)).unwrap());
    let cs = img.cluster_size();
    img.write_at(&pattern(1, 2 * cs as usize), 0).unwrap();
    img.snapshot("default", "s1").unwrap();
    img.fork("s1", "v2").unwrap();
    img.delete_snapshot("s1").unwrap();
    img.gc().unwrap();
    // Both heads copy the shared table, then v2 overwrites the first cluster.
    img.write_at(&pattern(2, 512), cs).unwrap();
    let v2 = img.open_root("v2").unwrap();
    v2.write_at(&pattern(3, cs as usize), 0).unwrap();
    drop(v2);
    closes_by_apply(&img);
    let report = img.check().unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
    img.close().unwrap();
    drop(img);
    assert_qemu_check_clean(&path);
}

/// A flush writes the refcount changes recorded since the last one when they are
/// few: the close after it writes the header sector and nothing else (no refcount
/// block), and the counts are exact — for qcowx's check and `qemu-img check`. The
/// copies of shared clusters (under a snapshot) and new tables all count.
#[test]
fn a_flush_writes_the_changes_so_the_close_after_it_writes_only_the_header() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let img = Image::create(&path, &CreateOptions::new(SIZE)).unwrap();
    let cs = img.cluster_size();
    img.write_at(&pattern(1, 4 * cs as usize), 0).unwrap();
    img.snapshot("default", "s").unwrap();
    img.close().unwrap();
    drop(img);

    let closing = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Vec::new()));
    let (c, w) = (Arc::clone(&closing), Arc::clone(&writes));
    let file = FileStorage::open(&path, OpenMode::read_write()).unwrap();
    let watched = Watched::new(file, move |a| {
        if let Access::Write { offset, len } = a {
            if c.load(Ordering::SeqCst) {
                w.lock().unwrap().push((offset, len));
            }
        }
        Ok(())
    });
    let img = Image::from_storage(Arc::new(watched), &OpenOptions::new().write(true)).unwrap();
    // Copy-on-write of two shared clusters (and of their L2 table), then new
    // clusters in the second half of the disk.
    img.write_at(&pattern(2, 512), 0).unwrap();
    img.write_at(&pattern(3, 512), 2 * cs).unwrap();
    for i in 0..8 {
        img.write_at(&pattern(4 + i, 4096), SIZE / 2 + i * 3 * cs)
            .unwrap();
    }
    img.flush().unwrap();
    closing.store(true, Ordering::SeqCst);
    img.close().unwrap();
    let at_close = writes.lock().unwrap().clone();
    assert!(
        !at_close.is_empty() && at_close.iter().all(|&(off, len)| off + len as u64 <= 512),
        "the close wrote more than the header sector: {at_close:?}"
    );
    drop(img);

    let img = Image::open(&path).unwrap();
    let report = img.check().unwrap();
    assert_eq!(
        (report.corruptions, report.leaks, report.dirty),
        (0, 0, false),
        "{:?}",
        report.messages
    );
    drop(img);
    assert_qemu_check_clean(&path);
}
