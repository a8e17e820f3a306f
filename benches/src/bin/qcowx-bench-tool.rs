//! `qcowx-bench-tool`: library-level measurements and fixtures for `benches/compare`.
//! See `qcowx_benches::snapshots::TOOL_USAGE`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(qcowx_benches::snapshots::tool_main(&args));
}
