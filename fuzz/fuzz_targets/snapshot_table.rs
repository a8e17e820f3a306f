//! Parses fuzzed bytes as a snapshot table, directly and as the table of a real
//! image, then uses that image; see [`qcowx_fuzz_harness::snapshot_table`].
#![no_main]

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: qcowx_fuzz_harness::alloc_cap::CapAlloc = qcowx_fuzz_harness::alloc_cap::CapAlloc;

fuzz_target!(|data: &[u8]| {
    qcowx_fuzz_harness::snapshot_table::run(data);
});
