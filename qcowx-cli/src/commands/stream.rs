//! `send` and `receive`: argument handling and printing around `qcowx_core::stream`.

use std::io::{BufReader, BufWriter, Write};
use std::sync::Arc;

use qcowx_core::stream::{self, ReceiveOptions, ResumeToken, SendOptions};
use qcowx_core::OpenOptions;
use serde_json::json;

use super::{emit, lock_mode, Failure};
use crate::{report, ReceiveArgs, SendArgs};

pub(crate) fn send(a: &SendArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let resume = match &a.resume_from {
        Some(t) => Some(t.parse::<ResumeToken>()?),
        None => None,
    };
    let img = Arc::new(
        OpenOptions::new()
            .lock(lock_mode(a.force_share))
            .open(&a.file)?,
    );
    let opts = SendOptions {
        from: a.from.clone(),
        resume,
    };
    let report = match &a.output_file {
        Some(path) => {
            let f = std::fs::File::create(path)?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            let r = stream::send(&img, &a.snapshot, &opts, &mut w)?;
            let f = w.into_inner().map_err(|e| e.into_error())?;
            if !a.no_sync {
                f.sync_all()?;
            }
            r
        }
        None => {
            let mut w = BufWriter::with_capacity(1 << 20, out);
            stream::send(&img, &a.snapshot, &opts, &mut w)?
        }
    };
    img.close()?;
    if !quiet {
        // The stream may be on stdout: the summary goes to stderr.
        eprintln!(
            "qcowx: sent '{}': {} records, {} bytes of data, {} bytes of zeros, {} bytes of stream",
            a.snapshot, report.records, report.data_bytes, report.zero_bytes, report.stream_bytes
        );
    }
    Ok(0)
}

pub(crate) fn receive(a: &ReceiveArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    if a.token {
        match stream::resume_token(&a.file)? {
            Some(t) => writeln!(out, "{t}")?,
            None => {
                eprintln!("qcowx: no receive stopped in {}", a.file.display());
                return Ok(1);
            }
        }
        return Ok(0);
    }
    if a.abort {
        let dropped = stream::abort(&a.file)?;
        if !quiet {
            writeln!(
                out,
                "{}",
                if dropped {
                    "Dropped the stopped receive."
                } else {
                    "No receive was stopped."
                }
            )?;
        }
        return Ok(0);
    }
    let opts = ReceiveOptions {
        name: a.name.clone(),
        checkpoint_bytes: std::env::var("QCOWX_RECEIVE_CHECKPOINT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    };
    let result = match &a.input_file {
        Some(path) => {
            let f = std::fs::File::open(path).map_err(|e| qcowx_core::Error::Io {
                file: path.display().to_string(),
                op: "open stream",
                offset: 0,
                source: e,
            })?;
            stream::receive(&a.file, &mut BufReader::with_capacity(1 << 20, f), &opts)
        }
        None => {
            let stdin = std::io::stdin();
            let mut lock = stdin.lock();
            stream::receive(&a.file, &mut lock, &opts)
        }
    };
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            if let Ok(Some(t)) = stream::resume_token(&a.file) {
                eprintln!(
                    "qcowx: the verified part is kept: run the receive again, or send with \
                     --resume-from {t} (--abort drops it)"
                );
            }
            return Err(e.into());
        }
    };
    let name = a.file.display().to_string();
    let json = || {
        json!({
            "filename": name,
            "created": r.created,
            "incremental": r.incremental,
            "records-applied": r.applied,
            "records-skipped": r.skipped,
            "root": report::created_json(&name, &r.snapshot)["root"],
        })
    };
    emit(out, a.output, quiet, json, |out| {
        writeln!(
            out,
            "Received snapshot '{}' ({} stream, {} records applied{}).",
            r.snapshot.name,
            if r.incremental { "incremental" } else { "full" },
            r.applied,
            if r.skipped > 0 {
                format!(", {} already there", r.skipped)
            } else {
                String::new()
            }
        )
    })?;
    Ok(0)
}
