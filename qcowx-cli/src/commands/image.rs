//! Commands on whole images: create, info, check, export, convert, compare, resize,
//! commit and import.

use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use qcowx_core::convert::{self as conv, ConvertOptions, ImageFormat, Mismatch};
use qcowx_core::engine::chain::backing_chain;
use qcowx_core::{CheckReport, CreateOptions, IfExists, Image, LockMode, OpenOptions, RootKind};

use super::{emit, lock_mode, require_kind, run_request, unexpected, usage_error, Failure};
use crate::{
    progress, report, size_arg, CacheMode, CheckArgs, CommitArgs, CompareArgs, ConvertArgs,
    CreateArgs, DdArgs, DiskFormat, ExportArgs, ExportFormat, ImportArgs, InfoArgs, OutputKind,
    RepairMode, ResizeArgs,
};
use qcowx_core::control::{Request, Response};

pub(crate) fn create(a: &CreateArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let mut opts = CreateOptions::new(0).if_exists(if a.overwrite {
        IfExists::Replace
    } else {
        IfExists::Fail
    });
    for o in &a.options {
        opts.apply_qemu_options(o)?;
    }
    if let Some(cs) = a.cluster_size {
        opts.cluster_size = cs;
    }
    if a.backing.is_some() {
        opts.backing_file = a.backing.clone();
        opts.backing_format = a.backing_format.clone();
    }
    opts.extended_l2 |= a.extended_l2;
    opts.open_backing = !a.unsafe_;
    // A size given with -o (`size=`) stands unless SIZE is given too.
    let size_in_options = a
        .options
        .iter()
        .any(|o| o.split(',').any(|kv| kv.starts_with("size=")));
    opts.size = match a.size {
        Some(s) => s,
        None if size_in_options => opts.size,
        None if a.unsafe_ => usage_error(
            "create",
            clap::error::ErrorKind::MissingRequiredArgument,
            "-u needs SIZE: the backing file is not opened for its size".into(),
        ),
        None => backing_size(
            &a.file,
            opts.backing_file.as_deref(),
            opts.backing_format.as_deref(),
        )?,
    };
    let img = Image::create(&a.file, &opts)?;
    let info = img.info()?;
    img.close()?;
    if !quiet {
        report::formatting_line(out, &a.file, &info, opts.preallocation)?;
    }
    Ok(0)
}

/// The virtual size of the backing file named `backing` of a new image at `file`.
pub(crate) fn backing_size(
    file: &Path,
    backing: Option<&str>,
    format: Option<&str>,
) -> Result<u64, qcowx_core::Error> {
    let Some(backing) = backing else {
        return Err(qcowx_core::Error::InvalidArgument(
            "a size is needed when there is no backing file".into(),
        ));
    };
    let path = qcowx_core::engine::backing::resolve(Some(file), backing);
    let name = path.display().to_string();
    let io_err = |source| qcowx_core::Error::Io {
        file: name.clone(),
        op: "open",
        offset: 0,
        source,
    };
    let format = match format {
        Some(f) => f,
        None => qcowx_core::engine::backing::probe_format(&path).map_err(io_err)?,
    };
    if format == "qcow2" {
        let img = OpenOptions::new()
            .lock(LockMode::ForceShare)
            .open_backing(false)
            .open(&path)?;
        Ok(img.size())
    } else {
        Ok(std::fs::metadata(&path).map_err(io_err)?.len())
    }
}

pub(crate) fn info(a: &InfoArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let lock = lock_mode(a.image.force_share);
    if !a.backing_chain {
        let (json, human) = layer_info(&a.image.file, ImageFormat::Qcow2, 0, lock)?;
        emit(
            out,
            a.image.output,
            quiet,
            || json,
            |out| out.write_all(human.as_bytes()),
        )?;
        return Ok(0);
    }
    // Top first, each layer named as the one above resolves it (as qemu-img does).
    let chain = backing_chain(&a.image.file, Some(ImageFormat::Qcow2), lock)?;
    let mut jsons = Vec::new();
    let mut humans = Vec::new();
    for layer in &chain {
        let size = layer.virtual_size;
        let (json, human) = layer_info(&layer.path, layer.format, size, lock)?;
        jsons.push(json);
        humans.push(human);
    }
    emit(
        out,
        a.image.output,
        quiet,
        || jsons.into(),
        |out| out.write_all(humans.join("\n").as_bytes()),
    )?;
    Ok(0)
}

/// `info` of one image as (JSON, human text): a qcow2 image opened without its
/// backing file, or a raw file of `raw_size` bytes, each with its file as the child
/// node.
fn layer_info(
    path: &Path,
    format: ImageFormat,
    raw_size: u64,
    lock: LockMode,
) -> Result<(serde_json::Value, String), Failure> {
    let name = path.display().to_string();
    let (file_len, actual) = file_sizes(path)?;
    let mut human = Vec::new();
    let mut json = match format {
        ImageFormat::Qcow2 => {
            let img = OpenOptions::new()
                .lock(lock)
                .open_backing(false)
                .open(path)?;
            let info = img.info()?;
            report::info_human(&mut human, &name, &info, actual)?;
            report::info_json(&name, &info, actual)
        }
        ImageFormat::Raw => {
            report::raw_info_human(&mut human, &name, raw_size, actual)?;
            report::raw_info_json(&name, raw_size, actual)
        }
    };
    // The protocol layer under the format, as qemu-img reports it: the file itself,
    // its length in whole 512-byte sectors (QEMU's block layer rounds it up).
    let file_len = file_len.next_multiple_of(512);
    json["children"] = report::file_child_json(&name, file_len, actual);
    report::file_child_human(&mut human, &name, file_len, actual)?;
    Ok((json, String::from_utf8_lossy(&human).into_owned()))
}

/// The file's length and the bytes it occupies on its file system.
fn file_sizes(path: &Path) -> Result<(u64, u64), qcowx_core::Error> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).map_err(|source| qcowx_core::Error::Io {
        file: path.display().to_string(),
        op: "stat",
        offset: 0,
        source,
    })?;
    Ok((md.len(), md.blocks() * 512))
}

pub(crate) fn check(a: &CheckArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let spinner = progress::Spinner::start(
        progress::enabled(quiet, a.output == OutputKind::Json),
        "checking",
    );
    let report_only = |report: &CheckReport| {
        for m in &report.messages {
            let _ = writeln!(io::stderr(), "{m}");
        }
    };
    let Some(mode) = a.repair else {
        let report = check_report(a)?;
        drop(spinner);
        report_only(&report);
        return print_check(a, quiet, out, &report, None);
    };
    if mode == RepairMode::Leaks {
        // qemu-img's `-r leaks`: an image with worse than leaks is left as it is.
        let report = check_report(a)?;
        if report.corruptions > 0 || report.marked_corrupt {
            drop(spinner);
            report_only(&report);
            let _ = writeln!(
                io::stderr(),
                "qcowx: {}: -r leaks repairs leaks only; nothing was changed \
                 (-r all repairs the {} refcount error(s) too)",
                a.file.display(),
                report.corruptions
            );
            return print_check(a, quiet, out, &report, None);
        }
    }
    let img = OpenOptions::new()
        .open_backing(false)
        .repair(true)
        .open(&a.file)?;
    let first = img.check()?;
    for m in &first.messages {
        let _ = writeln!(io::stderr(), "{m}");
    }
    let needs_repair =
        first.corruptions > 0 || first.leaks > 0 || first.dirty || first.marked_corrupt;
    let (last, fixed) = if needs_repair {
        let after = img.repair()?;
        for m in &after.messages {
            let _ = writeln!(io::stderr(), "{m}");
        }
        // Counted as qemu-img counts them: bit-63 errors judged on a stale refcount
        // go with the refcount they follow from.
        let fixed = report::Fixed {
            corruptions: (first.corruptions - first.stale_copied).saturating_sub(after.corruptions),
            leaks: first.leaks.saturating_sub(after.leaks),
        };
        (after, Some(fixed))
    } else {
        (first, None)
    };
    img.close()?;
    drop(spinner);
    print_check(a, quiet, out, &last, fixed.as_ref())
}

/// The check of `a.file` without a repair: a served image is checked by its server
/// unless -U.
fn check_report(a: &CheckArgs) -> Result<CheckReport, Failure> {
    let opened = OpenOptions::new()
        .open_backing(false)
        .lock(lock_mode(a.force_share))
        .open(&a.file);
    match run_request(&a.file, opened, &Request::Check)? {
        Response::Check(r) => Ok(r),
        other => Err(unexpected(&Request::Check, &other)),
    }
}

/// Prints a check's report and returns `qemu-img check`'s exit code.
fn print_check(
    a: &CheckArgs,
    quiet: bool,
    out: &mut dyn Write,
    last: &CheckReport,
    fixed: Option<&report::Fixed>,
) -> Result<u8, Failure> {
    let name = a.file.display().to_string();
    let json = || report::check_json(&name, last, fixed);
    emit(out, a.output, quiet, json, |out| {
        report::check_human(out, last, fixed)
    })?;
    Ok(check_exit_code(last))
}

/// `qemu-img check`'s exit code: 1 when the check itself hit errors, else 0, 2 or 3.
pub(crate) fn check_exit_code(r: &CheckReport) -> u8 {
    if r.check_errors > 0 {
        1
    } else {
        u8::try_from(r.exit_code()).unwrap_or(1)
    }
}

pub(crate) fn export(a: &ExportArgs, quiet: bool) -> Result<u8, Failure> {
    let img = OpenOptions::new()
        .lock(lock_mode(a.force_share))
        .open(&a.file)?;
    let format = match a.format {
        ExportFormat::Raw => ImageFormat::Raw,
        ExportFormat::Qcow2 => ImageFormat::Qcow2,
    };
    let root = match (&a.snapshot, &a.vdi) {
        (Some(s), _) => Some((RootKind::Snapshot, s.as_str())),
        (None, Some(v)) => Some((RootKind::Vdi, v.as_str())),
        (None, None) => None,
    };
    let img = Arc::new(img);
    let bar = progress::Bar::new(progress::enabled(quiet, false), "exporting");
    // A flattened root keeps its image's geometry (convert takes qemu-img's default).
    let opts = ConvertOptions {
        cluster_size: Some(img.cluster_size()),
        ..ConvertOptions::new(format)
    };
    match root {
        None => conv::convert(img.as_ref(), &a.output, &opts, &mut bar.callback())?,
        Some((kind, name)) => {
            require_kind(&img, kind, name)?;
            let disk = img.open_root(name)?;
            conv::convert(&disk, &a.output, &opts, &mut bar.callback())?
        }
    };
    drop(bar);
    img.close()?;
    Ok(0)
}

/// A `resize` size: `SIZE`, `+SIZE` or `-SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResizeTo {
    Absolute(u64),
    Grow(u64),
    Shrink(u64),
}

pub(crate) fn resize_arg(s: &str) -> Result<ResizeTo, String> {
    if let Some(rest) = s.strip_prefix('+') {
        size_arg(rest).map(ResizeTo::Grow)
    } else if let Some(rest) = s.strip_prefix('-') {
        size_arg(rest).map(ResizeTo::Shrink)
    } else {
        size_arg(s).map(ResizeTo::Absolute)
    }
}

pub(crate) fn resize(a: &ResizeArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let to = match resize_arg(&a.size) {
        Ok(t) => t,
        Err(why) => usage_error(
            "resize",
            clap::error::ErrorKind::InvalidValue,
            format!("invalid value '{}' for '[+]SIZE': {why}", a.size),
        ),
    };
    // With the backing chain: growing must hide a longer backing file's data.
    let img = OpenOptions::new().write(true).open(&a.file)?;
    let old = img.size();
    let name = a.file.display().to_string();
    let new = match to {
        ResizeTo::Absolute(n) => Some(n),
        ResizeTo::Grow(n) => old.checked_add(n),
        ResizeTo::Shrink(n) => Some(old.saturating_sub(n)),
    };
    let Some(new) = new else {
        return Err(Failure::Image(qcowx_core::Error::InvalidArgument(format!(
            "{name}: {old} + {} bytes is too large",
            a.size
        ))));
    };
    if new < old {
        return Err(Failure::Image(qcowx_core::Error::InvalidArgument(format!(
            "{name}: shrinking the default VDI from {old} to {new} bytes is refused: data \
             past the new end would be lost, and snapshots keep their own size anyway; \
             qcowx resize only grows (`qemu-img resize --shrink` shrinks a copy made by \
             `qcowx export -O qcow2`)"
        ))));
    }
    img.resize(new)?;
    let after = img.size();
    img.close()?;
    let json = || report::resize_json(&name, old, after);
    emit(out, a.output, quiet, json, |out| {
        writeln!(out, "Image resized.")
    })?;
    Ok(0)
}

pub(crate) fn compare(a: &CompareArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let lock = lock_mode(a.force_share);
    let ia = conv::open_input(&a.file_a, a.format_a.map(DiskFormat::layer), lock)?;
    let ib = conv::open_input(&a.file_b, a.format_b.map(DiskFormat::layer), lock)?;
    let json = a.output == OutputKind::Json;
    let bar = progress::Bar::new(progress::enabled(quiet, json), "comparing");
    let opts = conv::CompareOptions { strict: a.strict };
    let r = conv::compare(ia.as_ref(), ib.as_ref(), opts, &mut bar.callback())?;
    drop(bar);
    drop(ia);
    drop(ib);
    let (name_a, name_b) = (
        a.file_a.display().to_string(),
        a.file_b.display().to_string(),
    );
    emit(
        out,
        a.output,
        quiet,
        || report::compare_json(&name_a, &name_b, &r),
        |out| {
            if r.size_a != r.size_b && !a.strict {
                writeln!(out, "Warning: Image size mismatch!")?;
            }
            match r.mismatch {
                None => writeln!(out, "Images are identical."),
                Some(Mismatch::Content(at)) => writeln!(out, "Content mismatch at offset {at}!"),
                Some(Mismatch::Size) => writeln!(out, "Strict mode: Image size mismatch!"),
                Some(Mismatch::Status(at)) => {
                    writeln!(out, "Strict mode: Offset {at} block status mismatch!")
                }
            }
        },
    )?;
    Ok(if r.identical() { 0 } else { 1 })
}

pub(crate) fn convert(a: &ConvertArgs, quiet: bool) -> Result<u8, Failure> {
    if a.compress && a.out_format != DiskFormat::Qcow2 {
        usage_error(
            "convert",
            clap::error::ErrorKind::ArgumentConflict,
            "-c (compressed output) needs a qcow2 output: add -O qcow2".into(),
        );
    }
    let mut opts = ConvertOptions::new(a.out_format.layer());
    opts.compress = a.compress;
    for o in &a.options {
        if a.out_format != DiskFormat::Qcow2 {
            usage_error(
                "convert",
                clap::error::ErrorKind::ArgumentConflict,
                format!("-o {o}: options are for a qcow2 output: add -O qcow2"),
            );
        }
        if a.no_create {
            usage_error(
                "convert",
                clap::error::ErrorKind::ArgumentConflict,
                format!("-o {o}: options have no effect when skipping image creation (-n)"),
            );
        }
        opts.apply_qemu_options(o)?;
    }
    if a.cluster_size.is_some() {
        opts.cluster_size = a.cluster_size;
    }
    opts.existing_target = a.no_create;
    opts.target_is_zero = a.target_is_zero;
    opts.sparse_size = a.sparse_size.unwrap_or(conv::DEFAULT_SPARSE_SIZE);
    opts.sync = a.target_cache != Some(CacheMode::Unsafe);
    opts.rate_limit = a.rate_limit;
    opts.salvage = a.salvage;
    opts.backing_file = a.backing.clone();
    opts.backing_format = a.backing_format.map(DiskFormat::layer);
    opts.bitmaps = a.bitmaps;
    opts.skip_broken_bitmaps = a.skip_broken_bitmaps;
    let bar = progress::Bar::new(progress::enabled(quiet, false), "converting");
    // Warnings go to stderr as they come; one that cannot be written is dropped.
    let mut warn = |w: conv::Warning| {
        if quiet {
            return;
        }
        let line = match w {
            conv::Warning::Unreadable {
                kind,
                offset,
                error,
            } => {
                let what = match kind {
                    conv::UnreadableKind::Status => "block status at offset",
                    conv::UnreadableKind::Data => "offset",
                };
                format!("error while reading {what} {offset}: {error}")
            }
            conv::Warning::SkippedBitmap { name } => {
                format!("skipping inconsistent bitmap '{name}'")
            }
            other => format!("{other:?}"),
        };
        let _ = writeln!(io::stderr(), "qcowx: warning: {line}");
    };
    if let [_, _, ..] = &a.inputs[..] {
        // What qemu-img refuses with several sources, for the same reasons: the
        // snapshot, bitmaps and backing layer of which source?
        let refused = [
            (a.snapshot.is_some(), "-l"),
            (a.bitmaps, "--bitmaps"),
            (a.backing.is_some(), "-B"),
        ];
        if let Some((_, what)) = refused.iter().find(|(on, _)| *on) {
            usage_error(
                "convert",
                clap::error::ErrorKind::ArgumentConflict,
                format!("{what} needs a single source, not {}", a.inputs.len()),
            );
        }
    }
    match &a.snapshot {
        None => {
            let mut inputs = Vec::new();
            for path in &a.inputs {
                inputs.push(conv::open_input(
                    path,
                    a.in_format.map(DiskFormat::layer),
                    lock_mode(a.force_share),
                )?);
            }
            let input = if inputs.len() == 1 {
                inputs.remove(0)
            } else {
                Box::new(conv::Concat::new(inputs)?)
            };
            conv::convert_reporting(
                input.as_ref(),
                &a.dest,
                &opts,
                &mut bar.callback(),
                &mut warn,
            )?;
        }
        Some(spec) => {
            if a.in_format == Some(DiskFormat::Raw) {
                usage_error(
                    "convert",
                    clap::error::ErrorKind::ArgumentConflict,
                    "-l: a raw input has no snapshots".into(),
                );
            }
            let img = Arc::new(
                OpenOptions::new()
                    .lock(lock_mode(a.force_share))
                    .open(&a.inputs[0])?,
            );
            let disk = img.open_root(&img.resolve_snapshot(spec)?)?;
            conv::convert_reporting(&disk, &a.dest, &opts, &mut bar.callback(), &mut warn)?;
        }
    }
    Ok(0)
}

pub(crate) fn dd(a: &DdArgs) -> Result<u8, Failure> {
    let usage = |msg: String| -> ! {
        usage_error("dd", clap::error::ErrorKind::InvalidValue, msg);
    };
    let (mut bs, mut count, mut skip) = (512u64, None, 0u64);
    let (mut input, mut output) = (None, None);
    for op in &a.operands {
        let Some((key, value)) = op.split_once('=') else {
            usage(format!("unrecognized operand {op}"));
        };
        let number = || size_arg(value).unwrap_or_else(|e| usage(format!("{key}: {e}")));
        match key {
            "bs" => {
                bs = number();
                if !(1..=i32::MAX as u64).contains(&bs) {
                    usage(format!("bs: {value} is not between 1 and {}", i32::MAX));
                }
            }
            "count" => count = Some(number()),
            "skip" => skip = number(),
            "if" => input = Some(Path::new(value)),
            "of" => output = Some(Path::new(value)),
            _ => usage(format!("unrecognized operand {op}")),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        usage("must specify both input and output files (if=INPUT of=OUTPUT)".into());
    };
    let src = conv::open_input(
        input,
        a.in_format.map(DiskFormat::layer),
        lock_mode(a.force_share),
    )?;
    let size = src.size()?;
    let (start, len) = conv::dd_range(size, bs, count, skip).unwrap_or_else(|| {
        eprintln!(
            "qcowx: {}: cannot skip to specified offset",
            input.display()
        );
        (size, 0)
    });
    let window = conv::Window::new(src.as_ref(), start, len)?;
    let mut opts = ConvertOptions::new(a.out_format.layer());
    // dd writes every byte it reads, zeros included.
    opts.sparse_size = 0;
    conv::convert(&window, output, &opts, &mut |_, _| {})?;
    Ok(0)
}

pub(crate) fn commit(a: &CommitArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let opts = qcowx_core::commit::CommitOptions {
        keep_top: a.keep,
        base: a.base.clone(),
    };
    let bar = progress::Bar::new(progress::enabled(quiet, false), "committing");
    qcowx_core::commit::commit(&a.file, &opts, &mut bar.callback())?;
    drop(bar);
    if !quiet {
        writeln!(out, "Image committed.")?;
    }
    Ok(0)
}

pub(crate) fn import(a: &ImportArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let json = a.format == OutputKind::Json;
    let bar = progress::Bar::new(progress::enabled(quiet, json), "importing");
    let options = qcowx_core::import::ImportOptions { sync: !a.no_sync };
    let r = qcowx_core::import::import_chain_with(&a.top, &a.dest, &options, &mut bar.callback())?;
    drop(bar);
    let top = a.top.display().to_string();
    let dest = a.dest.display().to_string();
    let json = || report::import_json(&top, &dest, &r);
    emit(out, a.format, quiet, json, |out| {
        report::import_human(out, &dest, &r)
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_sizes_take_a_sign() {
        assert_eq!(resize_arg("1G"), Ok(ResizeTo::Absolute(1 << 30)));
        assert_eq!(resize_arg("+64k"), Ok(ResizeTo::Grow(65536)));
        assert_eq!(resize_arg("-1M"), Ok(ResizeTo::Shrink(1 << 20)));
        assert!(resize_arg("+").is_err());
        assert!(resize_arg("1Q").is_err());
        assert!(resize_arg("--1M").is_err());
    }

    #[test]
    fn check_errors_exit_1_like_qemu_img() {
        let mut r = CheckReport {
            leaks: 1,
            ..CheckReport::default()
        };
        assert_eq!(check_exit_code(&r), 3);
        r.corruptions = 1;
        assert_eq!(check_exit_code(&r), 2);
        r.check_errors = 1;
        assert_eq!(check_exit_code(&r), 1);
    }
}
