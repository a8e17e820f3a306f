//! Opens an image from fuzzed bytes (in memory), reads, writes, snapshots, forks,
//! reverts, deletes, collects and checks it as the trailing op script says; see
//! [`qcowx_fuzz_harness::image_ops`].
#![no_main]

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: qcowx_fuzz_harness::alloc_cap::CapAlloc = qcowx_fuzz_harness::alloc_cap::CapAlloc;

fuzz_target!(|data: &[u8]| {
    qcowx_fuzz_harness::image_ops::run(data);
});
