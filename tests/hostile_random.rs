//! Hostile images, at random: a randomized robustness loop flips bytes in the metadata
//! of valid images (deterministic seed; `QCOWX_HOSTILE_SEED` sets it and
//! `QCOWX_HOSTILE_ITERATIONS` the count) and asserts only that open, read, block
//! status, check and a few writes neither panic nor hang nor allocate absurdly (the
//! binary's global allocator records the largest single allocation of each case; see
//! [`qcowx_tests::alloc_limit`]).
//!
//! The hand-made cases are in tests/hostile_headers.rs, tests/hostile_tables.rs and
//! tests/hostile_backing.rs; what they share, with the header field offsets, is in
//! `qcowx_tests::hostile_tools` (tests/src/hostile_tools.rs).

use std::sync::Arc;

use qcowx_core::{Image, OpenOptions};
use qcowx_tests::hostile_tools::*;
use qcowx_tests::{
    alloc_limit, qemu_img, qemu_img_create, qemu_io_ok, run_bounded, run_ok, tempdir,
    CappedStorage, Rng,
};

#[global_allocator]
static ALLOC: alloc_limit::LimitAlloc = alloc_limit::LimitAlloc;

// ---- randomized robustness ------------------------------------------------------------------

/// Regions of metadata worth mutating in `img`: the header cluster's first 512 bytes,
/// the L1 table, the first L2 tables, the refcount table and first refcount block, the
/// snapshot table.
fn metadata_regions(img: &[u8]) -> Vec<(usize, usize)> {
    let b64 = |o: usize| u64::from_be_bytes(img[o..o + 8].try_into().expect("8 bytes"));
    let b32 = |o: usize| u32::from_be_bytes(img[o..o + 4].try_into().expect("4 bytes"));
    let cs = 1usize << b32(20);
    let mut r = vec![(0, 512)];
    let l1 = b64(40) as usize;
    let l1_size = b32(36) as usize;
    r.push((l1, (l1_size * 8).max(8)));
    for i in 0..l1_size.min(4) {
        let l2 = (b64(l1 + 8 * i) & OFFSET_MASK) as usize;
        if l2 != 0 {
            r.push((l2, cs.min(2048)));
        }
    }
    let rt = b64(48) as usize;
    r.push((rt, 64));
    let rb = (b64(rt) & !(cs as u64 - 1)) as usize;
    if rb != 0 {
        r.push((rb, cs.min(512)));
    }
    if b32(60) > 0 {
        r.push((b64(64) as usize, 256));
    }
    r.retain(|&(o, l)| o + l <= img.len());
    r
}

/// Open (read-only or for writing), read, block status, check and — when writable —
/// write, zero, discard, flush and close, ignoring errors. Returns `None` when the open
/// failed, else the number of failed chunk reads.
fn robustness_pass(bytes: Vec<u8>, write: bool) -> Option<usize> {
    let storage = Arc::new(CappedStorage::new(bytes, 64 << 20));
    let opts = OpenOptions::new().write(write).open_backing(false);
    let Ok(img) = Image::from_storage(storage, &opts) else {
        return None;
    };
    let size = img.size().min(4 << 20);
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0;
    let mut errors = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        if img.read_at(&mut buf[..n], off).is_err() {
            errors += 1;
        }
        off += n as u64;
    }
    let _ = img.block_status(0, size);
    let _ = img.check();
    if write && size > 0 {
        let _ = img.write_at(&[0xa5; 3000], size / 3);
        let _ = img.write_at(&[0x5a; 512], 0);
        let _ = img.write_zeroes(0, size.min(1 << 20), true);
        let _ = img.discard(size / 2, size / 2);
        let _ = img.flush();
        let _ = img.check();
        let _ = img.close();
    }
    Some(errors)
}

#[test]
fn random_mutations() {
    // Three shapes of valid image, small so that mutations land in metadata.
    let dir = tempdir();
    let mut bases = Vec::new();
    let a = dir.path().join("a.qcow2");
    qemu_img_create(&a, 256 << 10, "cluster_size=512");
    qemu_io_ok(
        "qcow2",
        &a,
        &[
            "write -P 1 0 5000",
            "write -P 2 100000 70000",
            "write -z 180000 4096",
        ],
    );
    let b = dir.path().join("b.qcow2");
    qemu_img_create(&b, 4 << 20, "cluster_size=4096");
    qemu_io_ok(
        "qcow2",
        &b,
        &["write -P 3 0 9000", "write -P 4 2200000 5000"],
    );
    run_ok(qemu_img().args(["snapshot", "-c", "s"]).arg(&b));
    qemu_io_ok("qcow2", &b, &["write -P 5 0 4096"]);
    let c = dir.path().join("c.qcow2");
    qemu_img_create(&c, 2 << 20, "cluster_size=16384,extended_l2=on");
    qemu_io_ok(
        "qcow2",
        &c,
        &[
            "write -P 6 0 1000",
            "write -P 7 70000 40000",
            "write -z -u 300000 16384",
        ],
    );
    let d = dir.path().join("d.qcow2");
    let src = dir.path().join("d.raw");
    std::fs::write(&src, qcowx_tests::compressible(9, 1 << 20)).expect("write raw");
    run_ok(
        qemu_img()
            .args([
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4096,compression_type=zstd",
            ])
            .arg(&src)
            .arg(&d),
    );
    for p in [a, b, c, d] {
        bases.push(std::fs::read(&p).expect("read base"));
    }

    let seed = std::env::var("QCOWX_HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x0bad_c0de);
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    let (mut refused, mut opened, mut read_failed) = (0, 0, 0);
    // QCOWX_HOSTILE_ITERATIONS raises the count for a longer local search.
    let iterations: usize = std::env::var("QCOWX_HOSTILE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    for (bi, base) in bases.iter().enumerate() {
        let regions = metadata_regions(base);
        for it in 0..iterations {
            let mut bytes = base.clone();
            let mut muts = Vec::new();
            for _ in 0..rng.range(1, 5) {
                let (o, l) = regions[rng.below(regions.len() as u64) as usize];
                let at = o + rng.below(l as u64) as usize;
                match rng.below(3) {
                    // Flip one bit, or set one byte.
                    0 | 1 => {
                        let v = if rng.chance(1, 2) {
                            bytes[at] ^ (1 << rng.below(8))
                        } else {
                            rng.below(256) as u8
                        };
                        bytes[at] = v;
                        muts.push((at, u64::from(v)));
                    }
                    // Replace an aligned 64-bit word (a table entry or header field)
                    // with an offset near the end of the file, a huge value, or noise.
                    _ => {
                        let at = at & !7;
                        if at + 8 > bytes.len() {
                            continue;
                        }
                        let len = bytes.len() as u64;
                        let v = match rng.below(4) {
                            0 => ((len + rng.below(1 << 20)) & !511) | COPIED,
                            1 => u64::MAX >> rng.below(8),
                            2 => rng.next_u64(),
                            _ => (len.next_multiple_of(512) - 512) | COPIED,
                        };
                        bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
                        muts.push((at, v));
                    }
                }
            }
            let write = it % 3 == 0;
            let what = format!("base {bi} iteration {it} (write {write}) mutations {muts:x?}");
            let b = run_bounded(&what, WATCHDOG, move || robustness_pass(bytes, write));
            match &b.result {
                Ok(None) => refused += 1,
                Ok(Some(0)) => opened += 1,
                Ok(Some(_)) => read_failed += 1,
                Err(p) => failures.push(format!("{what}: panicked: {p}")),
            }
            if b.largest_alloc > ALLOC_BUDGET {
                failures.push(format!(
                    "{what}: allocated {} bytes at once",
                    b.largest_alloc
                ));
            }
        }
    }
    println!(
        "mutated images: {refused} refused at open, {opened} read fine, \
         {read_failed} opened with read errors"
    );
    // The mutations must exercise both the header checks and the table walks.
    assert!(refused > 0 && opened + read_failed > 0);
    assert!(
        failures.is_empty(),
        "{} of {} mutated images broke the library:\n{}",
        failures.len(),
        bases.len() * iterations,
        failures[..failures.len().min(20)].join("\n")
    );
}
