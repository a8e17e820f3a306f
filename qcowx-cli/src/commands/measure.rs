//! `measure`: argument handling and printing around `qcowx_core::measure`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use qcowx_core::engine::chain::ImageFormat;
use qcowx_core::measure::{self, MeasureFormat, MeasureOptions, Measurement};
use qcowx_core::{OpenOptions, DEFAULT_VDI};
use serde_json::{json, Map, Value};

use super::{emit, lock_mode, Failure};
use crate::{size_arg, OutputKind};

/// The format of the file measured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Target {
    Qcow2,
    Raw,
}

/// The format of FILE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Source {
    Qcow2,
    Raw,
}

#[derive(Debug, Args)]
pub(crate) struct MeasureArgs {
    /// Format of the new file.
    #[arg(short = 'O', value_name = "FMT", default_value = "qcow2")]
    target: Target,
    /// Creation options of the new file, comma-separated key=value as `qcowx create
    /// -o` takes them (cluster_size, extended_l2, refcount_bits, backing_file, ...),
    /// and preallocation (off, metadata, falloc, full).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Measure a new, empty disk of this size instead of FILE.
    #[arg(
        long,
        value_name = "SIZE",
        value_parser = size_arg,
        conflicts_with_all = ["file", "snapshot", "vdi", "format"],
        required_unless_present = "file"
    )]
    size: Option<u64>,
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<Source>,
    /// Measure this snapshot of FILE: an ID or name, snapshot.id=ID or
    /// snapshot.name=NAME, as qemu-img's -l takes it.
    #[arg(
        short = 'l',
        long = "snapshot",
        value_name = "NAME",
        conflicts_with = "vdi"
    )]
    snapshot: Option<String>,
    /// Measure this VDI of FILE (default: the default VDI).
    #[arg(long, value_name = "NAME")]
    vdi: Option<String>,
    /// Read FILE without locking it, even while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputKind,
    /// The image whose content would go into the new file.
    #[arg(value_name = "FILE")]
    pub(crate) file: Option<PathBuf>,
}

/// `qcowx measure`.
pub(crate) fn measure(a: &MeasureArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let mut opts = MeasureOptions {
        format: match a.target {
            Target::Qcow2 => MeasureFormat::Qcow2,
            Target::Raw => MeasureFormat::Raw,
        },
        ..MeasureOptions::default()
    };
    for o in &a.options {
        opts.apply_qemu_options(o)?;
    }
    let m = match (&a.file, a.size) {
        (Some(file), _) => {
            let format = match a.format {
                Some(Source::Qcow2) => ImageFormat::Qcow2,
                Some(Source::Raw) => ImageFormat::Raw,
                None => ImageFormat::probe(file)?,
            };
            match format {
                ImageFormat::Raw => measure::measure_raw(file, &opts)?,
                _ => {
                    let img = Arc::new(
                        OpenOptions::new()
                            .lock(lock_mode(a.force_share))
                            .open(file)?,
                    );
                    let root = match (&a.snapshot, &a.vdi) {
                        (Some(s), _) => img.resolve_snapshot(s)?,
                        (None, Some(v)) => v.clone(),
                        (None, None) => DEFAULT_VDI.to_string(),
                    };
                    measure::measure_disk(&img.open_root(&root)?, &opts)?
                }
            }
        }
        (None, Some(size)) => measure::measure_size(size, &opts)?,
        (None, None) => {
            return Err(
                qcowx_core::Error::InvalidArgument("measure needs --size or FILE".into()).into(),
            )
        }
    };
    emit(
        out,
        a.output,
        quiet,
        || measure_json(&m),
        |out| {
            writeln!(out, "required size: {}", m.required)?;
            writeln!(out, "fully allocated size: {}", m.fully_allocated)?;
            if let Some(b) = m.bitmaps {
                writeln!(out, "bitmaps size: {b}")?;
            }
            Ok(())
        },
    )?;
    Ok(0)
}

/// `qcowx measure --output=json`'s object (see `spec/cli-json.md`).
fn measure_json(m: &Measurement) -> Value {
    let mut o = Map::new();
    o.insert("required".into(), json!(m.required));
    o.insert("fully-allocated".into(), json!(m.fully_allocated));
    if let Some(b) = m.bitmaps {
        o.insert("bitmaps".into(), json!(b));
    }
    Value::Object(o)
}
