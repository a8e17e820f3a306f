//! What the workspace's `interop_*.rs` test targets (the interoperability matrix against
//! QEMU's own tools) share: the odd disk size, `qemu-io` commands clamped to the disk,
//! the expected-content model of an image QEMU wrote, and the random writes through qcowx
//! that `qemu-img check` and `qemu-img compare` then judge. They use it as
//! `qcowx_tests::interop_tools`.

use std::path::Path;

use crate::{
    apply_random_ops, assert_image_eq_bytes, assert_qemu_check_clean, assert_qemu_compare_eq,
    convert_to_raw, open_ro, open_rw, ExpectedDisk, OpMix, Rng,
};

/// A disk size that is not a multiple of any cluster size used (5 MiB + 3 sectors).
pub const ODD_SIZE: u64 = 5 * 1024 * 1024 + 3 * 512;

/// A kibibyte.
pub const KIB: u64 = 1024;
/// A mebibyte.
pub const MIB: u64 = 1024 * 1024;

/// `(off, len)` moved and shortened to lie inside a disk of `size` bytes.
fn clamp(off: u64, len: u64, size: u64) -> (u64, u64) {
    let off = off.min(size - 1);
    (off, len.min(size - off).max(1))
}

/// `write -P` clamped to the disk.
pub fn w(pat: u8, off: u64, len: u64, size: u64) -> String {
    let (off, len) = clamp(off, len, size);
    format!("write -P {pat:#04x} {off} {len}")
}

/// `write -z [-u]` clamped to the disk.
pub fn z(off: u64, len: u64, unmap: bool, size: u64) -> String {
    let (off, len) = clamp(off, len, size);
    let u = if unmap { " -u" } else { "" };
    format!("write -z{u} {off} {len}")
}

/// `discard` clamped to the disk.
pub fn d(off: u64, len: u64, size: u64) -> String {
    let (off, len) = clamp(off, len, size);
    format!("discard {off} {len}")
}
/// Converts `img_path` with qemu-img and returns the expected-content model.
pub fn model_from_qemu(img_path: &Path, scratch: &Path, cluster: u64) -> ExpectedDisk {
    let raw = scratch.join("model-src.raw");
    let _ = std::fs::remove_file(&raw);
    convert_to_raw(img_path, &raw);
    let m = ExpectedDisk::from_raw_file(&raw, cluster);
    let _ = std::fs::remove_file(&raw);
    m
}

/// qcowx opens `path` read-write, issues `ops` random operations, closes it; then
/// `qemu-img check` must be clean, `qemu-img compare` must find the expected content,
/// and qcowx must read it back.
pub fn qcowx_random_writes(path: &Path, scratch: &Path, cluster: u64, seed: u64, ops: usize) {
    let mut model = model_from_qemu(path, scratch, cluster);
    let img = open_rw(path);
    let mut rng = Rng::new(seed);
    apply_random_ops(&img, &mut model, &mut rng, ops, OpMix::default());
    img.close()
        .unwrap_or_else(|e| panic!("close {}: {e}", path.display()));
    drop(img);
    assert_qemu_check_clean(path);
    let expected = scratch.join("expected.raw");
    model.save_raw(&expected);
    assert_qemu_compare_eq(path, "qcow2", &expected, "raw");
    let img = open_ro(path);
    assert_image_eq_bytes(&img, model.as_bytes());
    let report = img.check().expect("qcowx check");
    assert_eq!(
        report.exit_code(),
        0,
        "qcowx check after writes: {report:?}"
    );
}
