//! Hostile images, backing chains: loops (an image backed by itself, two images
//! backed by each other), a missing backing file, and a chain one layer deeper than
//! `MAX_BACKING_DEPTH`.
//! Every case must give a typed [`qcowx_core::Error`] (the variant is
//! matched), never panic, never hang (each open, full read and check runs under a 30 s
//! watchdog) and never make an absurd allocation (the binary's global allocator records
//! the largest single allocation of each case; see [`qcowx_tests::alloc_limit`]).
//!
//! The base images and the way a case runs are in `qcowx_tests::hostile_tools`
//! (tests/src/hostile_tools.rs), with the header field offsets the cases patch.

use std::path::Path;

use qcowx_core::engine::backing::MAX_BACKING_DEPTH;
use qcowx_core::{Error, OpenOptions};
use qcowx_tests::hostile_tools::*;
use qcowx_tests::{
    alloc_limit, be32, be64, error_text, open_retry, patch, qemu_img, qemu_img_create, qemu_io_ok,
    read_at, run_bounded, run_ok, tempdir,
};

#[global_allocator]
static ALLOC: alloc_limit::LimitAlloc = alloc_limit::LimitAlloc;

// ---- backing chains -----------------------------------------------------------------------

fn create_overlay(dir: &Path, name: &str, backing: &str) {
    run_ok(
        qemu_img()
            .current_dir(dir)
            .args([
                "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2",
            ])
            .args([name, "1M"]),
    );
}

/// a -> b -> a.
#[test]
fn backing_loop_two() {
    let dir = tempdir();
    qemu_img_create(&dir.path().join("a.qcow2"), 1 << 20, "");
    create_overlay(dir.path(), "b.qcow2", "a.qcow2");
    create_overlay(dir.path(), "a.qcow2", "b.qcow2");
    let e = open_error(&dir.path().join("a.qcow2"));
    assert!(matches!(e, Error::Backing { .. }), "{e:?}");
    let text = error_text(&e);
    assert!(
        text.contains("loop") && text.contains("a.qcow2") && text.contains("b.qcow2"),
        "the error should name the loop: {text}"
    );
}

/// a -> a.
#[test]
fn backing_loop_self() {
    let dir = tempdir();
    // qemu-img refuses to name the image itself: name another file of the same length
    // and patch the name.
    let a = dir.path().join("a.qcow2");
    create_overlay(dir.path(), "a.qcow2", "x.qcow2");
    let off = be64(&a, 8);
    assert_eq!(read_at(&a, off, 7), b"x.qcow2");
    patch(&a, off, b"a.qcow2");
    let e = open_error(&a);
    assert!(matches!(e, Error::Backing { .. }), "{e:?}");
    let text = error_text(&e);
    assert!(
        text.contains("loop") && text.contains("a.qcow2"),
        "the error should name the loop: {text}"
    );
}

/// A backing file that does not exist.
#[test]
fn backing_missing() {
    let dir = tempdir();
    create_overlay(dir.path(), "a.qcow2", "nowhere.qcow2");
    let e = open_error(&dir.path().join("a.qcow2"));
    assert!(matches!(e, Error::Backing { .. }), "{e:?}");
    assert!(
        error_text(&e).contains("nowhere.qcow2"),
        "{}",
        error_text(&e)
    );
}

/// Chains of [`MAX_BACKING_DEPTH`] layers below the top open (and read the base's
/// data through every layer); one more is refused.
#[test]
fn backing_chain_too_deep() {
    let dir = tempdir();
    let d = dir.path();
    let name = |i: usize| format!("l{i:03}.qcow2");
    qemu_img_create(&d.join(name(0)), 1 << 20, "");
    qemu_io_ok("qcow2", &d.join(name(0)), &["write -P 0x5d 4096 512"]);
    // One overlay made by qemu-img, copied with only the backing name changed.
    create_overlay(d, "template.qcow2", &name(0));
    let template = std::fs::read(d.join("template.qcow2")).expect("read template");
    let off = be64(&d.join("template.qcow2"), 8) as usize;
    let len = be32(&d.join("template.qcow2"), 16) as usize;
    assert_eq!(len, name(0).len());
    let top = MAX_BACKING_DEPTH + 1;
    for i in 1..=top {
        let mut bytes = template.clone();
        bytes[off..off + len].copy_from_slice(name(i - 1).as_bytes());
        std::fs::write(d.join(name(i)), bytes).expect("write layer");
    }

    let ok = d.join(name(MAX_BACKING_DEPTH));
    // On half the stack a spawned thread gets by default (2 MiB): opening and
    // reading recurse once per layer, and must keep a margin.
    let b = run_bounded("deepest allowed chain", WATCHDOG, move || {
        std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || {
                let img = open_retry(&OpenOptions::new(), &ok)
                    .unwrap_or_else(|e| panic!("open: {}", error_text(&e)));
                let mut buf = [0u8; 512];
                img.read_at(&mut buf, 4096).expect("read through the chain");
                buf
            })
            .expect("spawn")
            .join()
            .unwrap_or_else(|_| panic!("the chain's open or read panicked"))
    });
    check_alloc("deepest allowed chain", &b);
    let buf = b
        .result
        .unwrap_or_else(|p| panic!("deepest allowed chain panicked: {p}"));
    assert_eq!(buf, [0x5d; 512]);

    let e = open_error(&d.join(name(top)));
    assert!(matches!(e, Error::Backing { .. }), "{e:?}");
    assert!(error_text(&e).contains("deeper"), "{}", error_text(&e));
}
