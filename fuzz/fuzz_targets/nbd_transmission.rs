//! Runs a valid NBD handshake, then the transmission phase with fuzzed bytes as the
//! client's requests; see [`qcowx_fuzz_harness::nbd`].
#![no_main]

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: qcowx_fuzz_harness::alloc_cap::CapAlloc = qcowx_fuzz_harness::alloc_cap::CapAlloc;

fuzz_target!(|data: &[u8]| {
    qcowx_fuzz_harness::nbd::transmission(data);
});
