//! Writes the seeds `fuzz/make-seeds` cannot make with QEMU's tools alone:
//!
//! * `qcowx-fuzz-seeds fixture OUT`: the fixture image (served by `qcowx-nbd` while
//!   client sessions are recorded);
//! * `qcowx-fuzz-seeds snapshot-table OUT`: the fixture's snapshot table as a
//!   `snapshot_table` input;
//! * `qcowx-fuzz-seeds image-ops IMAGE OUT`: IMAGE with the sample op script as an
//!   `image_ops` input;
//! * `qcowx-fuzz-seeds transmission SESSION OUT`: a recorded client session as an
//!   `nbd_transmission` input (exit status 3 when it has no usable transmission
//!   phase).

use std::process::ExitCode;

use qcowx_fuzz_harness::{fixture, image_ops, nbd, snapshot_table};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let read = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("read {p}: {e}"));
    let write =
        |p: &str, b: &[u8]| std::fs::write(p, b).unwrap_or_else(|e| panic!("write {p}: {e}"));
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["fixture", out] => write(out, fixture::image_bytes()),
        ["snapshot-table", out] => write(out, &snapshot_table::fixture_input()),
        ["image-ops", image, out] => write(
            out,
            &image_ops::join(&read(image), &image_ops::sample_script()),
        ),
        ["transmission", session, out] => match nbd::transmission_seed(&read(session)) {
            Some(seed) => write(out, &seed),
            None => return ExitCode::from(3),
        },
        _ => {
            eprintln!(
                "usage: qcowx-fuzz-seeds fixture OUT | snapshot-table OUT | \
                 image-ops IMAGE OUT | transmission SESSION OUT"
            );
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
