//! Simulated crashes: an image left dirty by a writer that never closed it.
//!
//! A crash is simulated by opening an image writable without a lock
//! ([`LockMode::None`]), writing, flushing, and then `std::mem::forget`ting the
//! [`Image`]: nothing closes it, so the refcounts stay stale and the header's dirty bit
//! stays set (the forgotten handle leaks one file descriptor, which is why each test
//! forgets only one image). Then:
//!
//! * QEMU sees the dirty bit, repairs the image when it opens it read-write (or with
//!   `qemu-img check -r all`), and the result passes `qemu-img check` with the data
//!   intact;
//! * qcowx reads the flushed data from the dirty image, and a writable qcowx open
//!   followed by a close leaves it clean;
//! * with writes (copy-on-write from a backing file, discards, cluster reuse) still in
//!   flight at the crash, every flushed write reads back, every other byte reads either
//!   its old or its new value, and [`Image::repair`] leaves a clean image.

use std::path::{Path, PathBuf};

use qcowx_core::{CreateOptions, Image, LockMode, OpenOptions};
use qcowx_tests::strategies::guest_pattern;
use qcowx_tests::{
    describe, qemu_check, qemu_img, qemu_img_create, qemu_info, qemu_io_run, run, Rng,
};

const MIB: u64 = 1 << 20;

/// Constant-byte writes QEMU can verify with `read -P`: (offset, length, byte).
const WRITES: &[(u64, u64, u8)] = &[
    (0, 256 << 10, 0xa1),
    (MIB + 4096, 3 * 65536 + 777, 0xb2),
    (5 * MIB, 65536, 0xc3),
    (9 * MIB + 100, 1000, 0xd4),
    (15 * MIB, MIB, 0xe5),
];

/// Runs `f` on an image opened writable without a lock, then abandons the image
/// without closing it, as a crash would.
fn crash_session(path: &Path, opts: OpenOptions, f: impl FnOnce(&Image)) {
    let img = opts
        .write(true)
        .lock(LockMode::None)
        .open(path)
        .expect("open for the crash session");
    f(&img);
    // The simulated crash: no close, no Drop. Refcounts stay stale, the dirty bit stays
    // set; the file descriptor leaks (no lock is held on it).
    std::mem::forget(img);
}

fn dirty_flag(path: &Path) -> bool {
    let info = qemu_info(path, false);
    info["dirty-flag"]
        .as_bool()
        .unwrap_or_else(|| panic!("qemu-img info has no dirty-flag: {info}"))
}

/// `qemu-io` with one `read -P` per entry of [`WRITES`] (read-write open unless
/// `read_only`); asserts that every pattern verifies.
fn qemu_verify_writes(path: &Path, read_only: bool) -> String {
    let cmds: Vec<String> = WRITES
        .iter()
        .map(|&(off, len, byte)| format!("read -P {byte:#x} {off} {len}"))
        .collect();
    let out = if read_only {
        let mut cmd = qcowx_tests::qemu_io();
        cmd.args(["-r", "-f", "qcow2"]);
        for c in &cmds {
            cmd.args(["-c", c]);
        }
        run(cmd.arg(path))
    } else {
        qemu_io_run("qcow2", path, &cmds)
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !stdout.contains("Pattern verification failed"),
        "qemu-io read -P (read_only {read_only}): {}",
        describe(&out)
    );
    stdout + &String::from_utf8_lossy(&out.stderr)
}

/// qcowx reads every entry of [`WRITES`] from `img`.
fn qcowx_verify_writes(img: &Image) {
    for &(off, len, byte) in WRITES {
        let mut buf = vec![0u8; len as usize];
        img.read_at(&mut buf, off).expect("read");
        if let Some(i) = buf.iter().position(|&b| b != byte) {
            panic!(
                "byte {} of the write at {off} reads {:#04x}, expected {byte:#04x}",
                off + i as u64,
                buf[i]
            );
        }
    }
}

/// A 16 MiB image created and closed by qcowx, then opened without a lock, written
/// (every entry of [`WRITES`]), snapshotted, flushed and abandoned. Returns the temp
/// dir and path. (A flush writes the refcount changes of plain writes itself; a new
/// root's go out only at a close or checkpoint, so the snapshot leaves them stale.)
fn crashed_image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("disk.qcow2");
    Image::create(&path, &CreateOptions::new(16 * MIB))
        .and_then(|img| img.close())
        .expect("create");
    assert!(!dirty_flag(&path), "a freshly closed image is clean");
    crash_session(&path, OpenOptions::new(), |img| {
        for &(off, len, byte) in WRITES {
            img.write_at(&vec![byte; len as usize], off).expect("write");
        }
        img.snapshot("default", "before-crash").expect("snapshot");
        img.flush().expect("flush");
    });
    assert!(
        dirty_flag(&path),
        "qemu-img info must report the dirty flag of an image abandoned mid-session"
    );
    // The refcounts really are stale: QEMU's check (which opens read-only and does not
    // repair) finds the clusters allocated in the session unaccounted for.
    let before = qemu_check(&path);
    assert_ne!(
        before.code,
        0,
        "qemu-img check of the abandoned image should find stale refcounts: {}",
        describe(&before.output)
    );
    // qcowx reads the flushed data from the dirty image, read-only.
    let ro = Image::open(&path).expect("qcowx opens the dirty image read-only");
    assert!(ro.info().expect("info").dirty);
    qcowx_verify_writes(&ro);
    drop(ro);
    assert!(
        dirty_flag(&path),
        "a read-only open leaves the dirty bit alone"
    );
    (dir, path)
}

/// Plain writes then a flush, then a crash: the flush wrote the session's refcount
/// changes with the data, so the abandoned image is dirty (the bit stays set until a
/// close) yet `qemu-img check` finds its refcounts exact, as after QEMU's own flush.
#[test]
fn a_crash_after_a_flush_leaves_exact_refcounts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("disk.qcow2");
    Image::create(&path, &CreateOptions::new(16 * MIB))
        .and_then(|img| img.close())
        .expect("create");
    crash_session(&path, OpenOptions::new(), |img| {
        for &(off, len, byte) in WRITES {
            img.write_at(&vec![byte; len as usize], off).expect("write");
        }
        img.flush().expect("flush");
    });
    assert!(dirty_flag(&path), "the dirty bit stays set until a close");
    qemu_check(&path).assert_clean("after a flush and a crash");
    qemu_verify_writes(&path, true);
}

#[test]
fn qemu_repairs_dirty_image_on_read_write_open() {
    let (_dir, path) = crashed_image();
    // qemu-io opens read-write by default: QEMU repairs a dirty image on such an open.
    let out = qemu_verify_writes(&path, false);
    assert!(
        !dirty_flag(&path),
        "the dirty flag is still set after a read-write qemu-io session: {out}"
    );
    qemu_check(&path).assert_clean("after QEMU's repair on open");
    qemu_verify_writes(&path, true);
    let img = Image::open(&path).expect("qcowx opens the repaired image");
    qcowx_verify_writes(&img);
    assert_eq!(img.check().expect("qcowx check").exit_code(), 0);
}

#[test]
fn qemu_img_check_repair_fixes_dirty_image() {
    let (_dir, path) = crashed_image();
    let out = run(qemu_img()
        .args(["check", "-r", "all", "-f", "qcow2"])
        .arg(&path));
    assert!(
        out.status.success(),
        "qemu-img check -r all: {}",
        describe(&out)
    );
    assert!(!dirty_flag(&path));
    qemu_check(&path).assert_clean("after qemu-img check -r all");
    qemu_verify_writes(&path, true);
}

#[test]
fn qcowx_read_write_open_and_close_cleans_dirty_image() {
    let (_dir, path) = crashed_image();
    let img = Image::open_rw(&path).expect("qcowx opens the dirty image read-write");
    qcowx_verify_writes(&img);
    img.close().expect("close");
    drop(img);
    assert!(!dirty_flag(&path), "qcowx's close clears the dirty flag");
    qemu_check(&path).assert_clean("after qcowx's close");
    qemu_verify_writes(&path, true);
}

// ---- writes in flight at the crash ----------------------------------------------------

/// One guest operation of the in-flight scenario, applied to the image and a model.
fn random_op(img: &Image, model: &mut [u8], rng: &mut Rng, cs: u64, discards: bool) {
    let size = model.len() as u64;
    match rng.below(if discards { 8 } else { 6 }) {
        0..=5 => {
            // A write, usually partial clusters (copy-on-write from the backing file).
            let off = rng.below(size);
            let len = (1 + rng.below(4 * cs)).min(size - off);
            let seed = 1 + rng.below(255) as u8;
            let data: Vec<u8> = guest_pattern(seed, off, len);
            img.write_at(&data, off).expect("write");
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        6 => {
            let off = rng.below(size / cs) * cs;
            let len = (cs * (1 + rng.below(8))).min(size - off);
            img.discard(off, len).expect("discard");
            model[off as usize..(off + len) as usize].fill(0);
        }
        _ => {
            let off = rng.below(size / cs) * cs;
            let len = (cs * (1 + rng.below(8))).min(size - off);
            img.write_zeroes(off, len, rng.below(2) == 0)
                .expect("write_zeroes");
            model[off as usize..(off + len) as usize].fill(0);
        }
    }
}

/// Writes, discards and zeroes over a qcow2 backing file with a tiny L2 cache (so
/// tables are evicted, and their links written, mid-session); a flush; then more of the
/// same (reusing the clusters the first phase freed), unflushed, and the crash.
///
/// After the crash every byte the second phase did not touch reads as flushed; every
/// 512-byte sector it touched reads either as flushed or as written (never anything
/// else: no zeros where the backing file shows, no other guest cluster's data). qcowx's
/// repair then leaves an image QEMU finds clean and identical to what qcowx read.
#[test]
fn crash_with_copy_on_write_in_flight() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = dir.path().join("base.qcow2");
    let size = 4 * MIB;
    qemu_img_create(&base, size, "cluster_size=65536");
    let out = qemu_io_run(
        "qcow2",
        &base,
        &[
            "write -P 0x5a 0 2M",
            "write -P 0x6b 2M 1M",
            "write -P 0x7c 3M 1M",
        ],
    );
    assert!(out.status.success(), "filling the base: {}", describe(&out));
    let mut base_content = vec![0x5au8; size as usize];
    base_content[2 * MIB as usize..3 * MIB as usize].fill(0x6b);
    base_content[3 * MIB as usize..].fill(0x7c);

    let path = dir.path().join("disk.qcow2");
    let cs = 512;
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cs;
    opts.backing_file = Some("base.qcow2".into());
    opts.backing_format = Some("qcow2".into());
    Image::create(&path, &opts)
        .and_then(|img| img.close())
        .expect("create the overlay");

    let mut flushed = base_content.clone();
    let mut written = Vec::new();
    let mut rng = Rng::new(0x5eed);
    // Two 512-byte L2 tables of cache: each covers 32 KiB of the disk, so writes all
    // over 4 MiB evict dirty tables constantly.
    crash_session(&path, OpenOptions::new().cache_bytes(1024), |img| {
        for _ in 0..300 {
            random_op(img, &mut flushed, &mut rng, cs, true);
        }
        img.flush().expect("flush");
        let mut model = flushed.clone();
        for _ in 0..300 {
            random_op(img, &mut model, &mut rng, cs, true);
        }
        written = model;
    });
    assert!(dirty_flag(&path));

    let check_state = |img: &Image, what: &str| -> Vec<u8> {
        let mut got = vec![0u8; size as usize];
        img.read_at(&mut got, 0).expect("read all");
        let (mut mixed, mut lost) = (0, 0);
        for s in (0..size as usize).step_by(512) {
            let (g, f, w) = (&got[s..s + 512], &flushed[s..s + 512], &written[s..s + 512]);
            if g != f && g == w {
                mixed += 1;
            } else if g == f && g != w {
                lost += 1;
            }
            assert!(
                g == f || g == w,
                "{what}: sector at {s} reads neither its flushed nor its written content \
                 (first bytes read {:02x?}, flushed {:02x?}, written {:02x?})",
                &g[..8],
                &f[..8],
                &w[..8]
            );
        }
        println!("{what}: {mixed} sectors show unflushed writes, {lost} do not (both are allowed)");
        got
    };
    let ro = Image::open(&path).expect("qcowx opens the crashed image read-only");
    let seen = check_state(&ro, "read-only after the crash");
    drop(ro);

    // A read-only check reports the stale refcounts as QEMU does, and no damage.
    let ro = Image::open(&path).expect("qcowx opens the crashed image read-only");
    let before = ro.check().expect("check");
    assert!(
        before.dirty && before.corruptions == before.stale_corruptions,
        "the check sees the dirty bit and only stale refcounts: {before:?}"
    );
    drop(ro);
    // A writable open recovers the image (rebuilds its refcounts) before anything else.
    let rw = Image::open_rw(&path).expect("qcowx opens the crashed image read-write");
    assert_eq!(rw.open_state(), qcowx_core::OpenState::Recovered);
    let report = rw.repair().expect("repair");
    assert!(
        report.repaired
            && report.corruptions == 0
            && report.leaks == 0
            && report.check_errors == 0
            && !report.dirty,
        "after repair: {report:?}"
    );
    let after = check_state(&rw, "after repair");
    assert_eq!(after, seen, "repair changed what the guest sees");
    rw.close().expect("close");
    drop(rw);

    assert!(!dirty_flag(&path));
    qemu_check(&path).assert_clean("after qcowx's repair");
    let raw = dir.path().join("seen.raw");
    std::fs::write(&raw, &seen).expect("write the expected content");
    let out = run(qemu_img()
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&path)
        .arg(&raw));
    assert!(
        out.status.success(),
        "QEMU reads the repaired image differently from qcowx: {}",
        describe(&out)
    );
}
