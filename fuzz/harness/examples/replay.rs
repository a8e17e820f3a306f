//! Runs one input file through one target: `replay TARGET FILE` (set
//! `QCOWX_FUZZ_TRACE=1` to see the ops of `image_ops` and `snapshot_table`).
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, file] = &args[..] else {
        eprintln!("usage: replay TARGET FILE");
        std::process::exit(2);
    };
    let data = std::fs::read(file).unwrap_or_else(|e| panic!("read {file}: {e}"));
    match target.as_str() {
        "image_ops" => qcowx_fuzz_harness::image_ops::run(&data),
        "snapshot_table" => qcowx_fuzz_harness::snapshot_table::run(&data),
        "nbd_handshake" => qcowx_fuzz_harness::nbd::handshake(&data),
        "nbd_transmission" => qcowx_fuzz_harness::nbd::transmission(&data),
        t => panic!("unknown target {t}"),
    }
}
