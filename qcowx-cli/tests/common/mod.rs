//! What several of this folder's test files share: the `qcowx` binary under test and
//! the cluster size of the images the tests make.

// Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

pub const QCOWX: &str = env!("CARGO_BIN_EXE_qcowx");
pub const CS: u64 = 65536;
