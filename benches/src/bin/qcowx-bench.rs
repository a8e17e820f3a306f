//! `qcowx-bench`: `qemu-img bench` for qcowx. See `qcowx_benches::USAGE`.

use std::process::ExitCode;

use qcowx_benches::{parse_args, run, Invocation, USAGE};

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Invocation::Run(o)) => o,
        Ok(Invocation::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("qcowx-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    match run(&opts, &mut out) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qcowx-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
