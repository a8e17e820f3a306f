//! Helpers of the limit tests (spec/limits.md) that several targets share
//! (`limits_format.rs`, `limits_snapshots.rs`, `limits_backing.rs`): header fields
//! written directly, and new images.

#![allow(dead_code)]

use std::path::Path;

use qcowx_core::{CreateOptions, Image};
use qcowx_tests::{be64, patch};

pub fn p(path: &Path) -> String {
    path.display().to_string()
}

// Header field offsets (QCOW2 specification).
const HDR_INCOMPATIBLE: u64 = 72;

/// Sets the dirty bit, so that qcowx and QEMU rebuild the refcounts a hand edit made
/// stale.
pub fn set_dirty(path: &Path) {
    let bits = be64(path, HDR_INCOMPATIBLE) | 1;
    patch(path, HDR_INCOMPATIBLE, &bits.to_be_bytes());
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").len()
}

/// A new image at `path`, closed.
pub fn create(path: &Path, size: u64, cluster_size: u64) {
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cluster_size;
    Image::create(path, &opts)
        .and_then(|img| img.close())
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}
