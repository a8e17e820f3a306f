//! What several of this folder's test files share: the `qcowx` binary under test, the
//! cluster size of the images the tests make, and small helpers that run `qcowx` and
//! `qemu-img` on them.

// Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;

use qcowx_tests::cli::*;
use serde_json::Value;

pub const QCOWX: &str = env!("CARGO_BIN_EXE_qcowx");
pub const CS: u64 = 65536;

// ---- snapshots, VDIs and io ---------------------------------------------------------

pub fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// `qcowx export [ROOT_ARGS] -O raw FILE`.
pub fn qcowx_raw(dir: &Path, file: &str, root_args: &[&str]) -> Vec<u8> {
    let mut args = vec!["export"];
    args.extend_from_slice(root_args);
    args.extend(["-O", "raw", file, "qcowx-export.raw"]);
    ok(dir, &args);
    let bytes = std::fs::read(dir.join("qcowx-export.raw")).unwrap();
    std::fs::remove_file(dir.join("qcowx-export.raw")).unwrap();
    bytes
}

/// `qcowx io [--vdi VDI] FILE -c CMD...`, expecting success.
pub fn io(dir: &Path, file: &str, vdi: Option<&str>, cmds: &[&str]) -> Output {
    let mut args = vec!["io"];
    if let Some(v) = vdi {
        args.extend(["--vdi", v]);
    }
    args.push(file);
    for c in cmds {
        args.extend(["-c", c]);
    }
    ok(dir, &args)
}

pub fn create(dir: &Path, file: &str, size: &str) {
    ok(dir, &["create", file, size]);
}

pub fn list(dir: &Path, file: &str) -> Vec<Value> {
    let v = json(&ok(dir, &["list", "--output=json", file]));
    v["roots"].as_array().unwrap().clone()
}

// ---- qemu-img info and file sizes ---------------------------------------------------

pub fn qemu_info(dir: &Path, file: &str) -> Value {
    let out = qemu_img(dir, &["info", "-U", "--output=json", file]);
    assert_ok(&out, "qemu-img info");
    json(&out)
}

pub fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}
