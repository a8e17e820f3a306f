//! `qcowx io`: `qemu-io` commands on a VDI; `qcowx bench`: `qemu-img bench`.

use std::io::{self, Write};
use std::sync::Arc;

use qcowx_core::{OpenOptions, RootKind};

use super::lock_mode;
use super::{error_chain, Failure};
use crate::iocmd::IoCommand;
use crate::{BenchArgs, IoArgs};

/// Runs every command in order, as `qemu-io` does: a failed command is reported and
/// the next one runs; the exit code is 1 if any failed.
pub(crate) fn io(a: &IoArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    // Only commands that write need the image writable (and its exclusive lock): reads
    // alone work on an image in use read-only, marked corrupt or damaged.
    let writes = a.commands.iter().any(IoCommand::writes);
    let img = Arc::new(OpenOptions::new().write(writes).open(&a.file)?);
    if writes
        && img
            .list()?
            .iter()
            .any(|r| r.kind == RootKind::Snapshot && r.name == a.vdi)
    {
        return Err(Failure::Image(qcowx_core::Error::ReadOnly {
            file: img.file_name().to_string(),
            why: format!(
                "'{}' is a snapshot, which is read-only; `qcowx fork {} {} NEW_VDI` makes a \
                 writable VDI from it",
                a.vdi,
                a.file.display(),
                a.vdi
            ),
        }));
    }
    let disk = img.open_root(&a.vdi)?;
    let mut failed = false;
    let mut out_err: Option<io::Error> = None;
    for cmd in &a.commands {
        match cmd.execute(&disk) {
            Ok(o) => {
                if out_err.is_none() && !quiet {
                    if let Err(e) = o.lines().iter().try_for_each(|l| writeln!(out, "{l}")) {
                        out_err = Some(e);
                    }
                }
                if o.failed() {
                    failed = true;
                }
                if let (
                    Some(at),
                    IoCommand::Read {
                        pattern: Some(p), ..
                    },
                ) = (o.mismatch, cmd)
                {
                    let _ = writeln!(
                        io::stderr(),
                        "qcowx: {}: pattern verification failed: the byte at offset {at} of \
                         '{}' is not {p:#04x}",
                        img.file_name(),
                        a.vdi
                    );
                }
            }
            Err(e) => {
                failed = true;
                let _ = writeln!(io::stderr(), "qcowx: {}", error_chain(&e));
            }
        }
    }
    drop(disk);
    img.close()?;
    match out_err {
        _ if failed => Ok(1),
        Some(e) => Err(Failure::Output(e)),
        None => Ok(0),
    }
}

/// Runs the benchmark and prints what it sent and how long it took, as `qemu-img
/// bench` prints it.
pub(crate) fn bench(a: &BenchArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let opts = qcowx_core::bench::BenchOptions {
        count: a.count,
        depth: a.depth,
        offset: a.offset,
        buffer_size: a.buffer_size,
        step: a.step,
        write: a.write,
        pattern: a.pattern,
        flush_interval: a.flush_interval,
    };
    let img = if a.write {
        OpenOptions::new().write(true).open(&a.file)?
    } else {
        OpenOptions::new()
            .lock(lock_mode(a.force_share))
            .open(&a.file)?
    };
    opts.check(img.size())?;
    writeln!(
        out,
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        a.count,
        if a.write { "write" } else { "read" },
        a.buffer_size,
        a.depth,
        a.offset,
        a.step.unwrap_or(a.buffer_size)
    )?;
    let took = qcowx_core::bench::run(&img, &opts)?;
    img.close()?;
    writeln!(out, "Run completed in {:.3} seconds.", took.as_secs_f64())?;
    Ok(0)
}
