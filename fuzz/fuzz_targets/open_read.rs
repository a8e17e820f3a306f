//! Opens an image from fuzzed bytes (in memory), reads all of it, checks it, and, when
//! it opens writable, writes and closes it. Nothing may panic, hang or allocate
//! without bound.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qcowx_core::storage::MemStorage;
use qcowx_core::{Image, OpenOptions};

fuzz_target!(|data: &[u8]| {
    let storage = Arc::new(MemStorage::from_vec(data.to_vec()));
    let opts = OpenOptions::new().write(true).open_backing(false);
    let Ok(img) = Image::from_storage(storage, &opts) else {
        return;
    };
    let size = img.size().min(64 << 20);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = img.read_at(&mut buf[..n], off);
        off += n as u64;
    }
    let _ = img.check();
    let _ = img.write_at(&[0xa5; 4096], 0);
    let _ = img.close();
});
