//! `qcowx`: create, inspect, check and export QCOW2 images.
//!
//! The binary is thin: it parses arguments, calls `qcowx-core` and prints. Output and
//! exit codes follow `qemu-img` (`info`, `check`, `create`, `convert`) where the
//! commands overlap: errors print `qcowx: <error>` on stderr and exit 1, usage errors
//! exit 2, and `check` exits 0 (clean), 2 (corruptions) or 3 (leaks only).

mod report;
mod size;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use qcowx_core::convert::{self, OutputFormat};
use qcowx_core::{CheckReport, CreateOptions, Image, LockMode, OpenOptions};

/// Create, inspect, check and export QCOW2 images.
#[derive(Debug, Parser)]
#[command(name = "qcowx", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new qcow2 image (like `qemu-img create -f qcow2`).
    #[command(allow_negative_numbers = true)]
    Create(CreateArgs),
    /// Show facts about an image (like `qemu-img info`).
    Info(InfoArgs),
    /// Check an image's metadata and refcounts (like `qemu-img check`).
    Check(CheckArgs),
    /// Write the image's content, backing chain included, to a new file (like
    /// `qemu-img convert`).
    Export(ExportArgs),
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Cluster size (512 to 2M, a power of two; K/M suffixes allowed).
    #[arg(long = "cluster-size", value_name = "SIZE", value_parser = size_arg)]
    cluster_size: Option<u64>,
    /// Backing file name, stored as given (relative names resolve against FILE's folder).
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file (probed when absent).
    #[arg(
        short = 'F',
        long = "backing-format",
        value_name = "FORMAT",
        requires = "backing",
        value_parser = ["raw", "qcow2"]
    )]
    backing_format: Option<String>,
    /// The image file to create (an existing file is overwritten).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Virtual size: bytes, or with a K, M, G, T, P or E suffix (powers of 1024).
    /// Defaults to the backing file's size.
    #[arg(value_name = "SIZE", value_parser = size_arg, required_unless_present = "backing")]
    size: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputKind {
    Human,
    Json,
}

#[derive(Debug, Args)]
struct InfoArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    output: OutputKind,
    /// Open the image without locking it, even while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Rewrite the refcounts from a reachability scan (fixes leaks and refcount errors).
    #[arg(long, short = 'r')]
    repair: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    output: OutputKind,
    /// Open the image without locking it, even while another process writes it.
    #[arg(short = 'U', long = "force-share", conflicts_with = "repair")]
    force_share: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportFormat {
    Raw,
    Qcow2,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Output format.
    #[arg(short = 'O', value_enum, default_value_t = ExportFormat::Raw)]
    format: ExportFormat,
    /// Read the source without locking it, even while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The source image.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The file to write (overwritten if it exists).
    #[arg(value_name = "OUTPUT")]
    output: PathBuf,
}

fn size_arg(s: &str) -> Result<u64, String> {
    size::parse_size(s)
}

/// Why a command failed.
#[derive(Debug)]
enum Failure {
    /// The image library reported an error.
    Image(qcowx_core::Error),
    /// Writing the command's output failed.
    Output(io::Error),
}

impl From<qcowx_core::Error> for Failure {
    fn from(e: qcowx_core::Error) -> Self {
        Failure::Image(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Output(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let result = match cli.command {
        Command::Create(a) => create(&a, &mut out),
        Command::Info(a) => info(&a, &mut out),
        Command::Check(a) => check(&a, &mut out),
        Command::Export(a) => export(&a),
    }
    .and_then(|code| {
        out.flush()?;
        Ok(code)
    });
    match result {
        Ok(code) => ExitCode::from(code),
        // Whoever read our output stopped reading: not an error of ours.
        Err(Failure::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Failure::Output(e)) => {
            let _ = writeln!(io::stderr(), "qcowx: error writing output: {e}");
            ExitCode::from(1)
        }
        Err(Failure::Image(e)) => {
            let _ = writeln!(io::stderr(), "qcowx: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and the causes its message does not already include.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !msg.contains(&s) {
            msg.push_str(": ");
            msg.push_str(&s);
        }
        cause = c.source();
    }
    msg
}

fn lock_mode(force_share: bool) -> LockMode {
    if force_share {
        LockMode::ForceShare
    } else {
        LockMode::Shared
    }
}

fn create(a: &CreateArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let size = match a.size {
        Some(s) => s,
        None => backing_size(&a.file, a.backing.as_deref(), a.backing_format.as_deref())?,
    };
    let mut opts = CreateOptions::new(size);
    if let Some(cs) = a.cluster_size {
        opts.cluster_size = cs;
    }
    opts.backing_file = a.backing.clone();
    opts.backing_format = a.backing_format.clone();
    let img = Image::create(&a.file, &opts)?;
    let info = img.info()?;
    img.close()?;
    report::formatting_line(out, &a.file, &info)?;
    Ok(0)
}

/// The virtual size of the backing file named `backing` of a new image at `file`.
fn backing_size(
    file: &Path,
    backing: Option<&str>,
    format: Option<&str>,
) -> Result<u64, qcowx_core::Error> {
    let Some(backing) = backing else {
        return Err(qcowx_core::Error::InvalidArgument(
            "a size is needed when there is no backing file".into(),
        ));
    };
    let path = qcowx_core::backing::resolve(Some(file), backing);
    let name = path.display().to_string();
    let io_err = |source| qcowx_core::Error::Io {
        file: name.clone(),
        op: "open",
        offset: 0,
        source,
    };
    let format = match format {
        Some(f) => f,
        None => qcowx_core::backing::probe_format(&path).map_err(io_err)?,
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

fn info(a: &InfoArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let img = OpenOptions::new()
        .lock(lock_mode(a.force_share))
        .open_backing(false)
        .open(&a.file)?;
    let info = img.info()?;
    let actual = actual_size(&a.file)?;
    let name = a.file.display().to_string();
    match a.output {
        OutputKind::Json => report::write_json(out, &report::info_json(&name, &info, actual))?,
        OutputKind::Human => report::info_human(out, &name, &info, actual)?,
    }
    Ok(0)
}

/// Bytes the file occupies on its file system.
fn actual_size(path: &Path) -> Result<u64, qcowx_core::Error> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).map_err(|source| qcowx_core::Error::Io {
        file: path.display().to_string(),
        op: "stat",
        offset: 0,
        source,
    })?;
    Ok(md.blocks() * 512)
}

fn check(a: &CheckArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let opts = OpenOptions::new().open_backing(false);
    let opts = if a.repair {
        opts.write(true)
    } else {
        opts.lock(lock_mode(a.force_share))
    };
    let img = opts.open(&a.file)?;
    let first = img.check()?;
    for m in &first.messages {
        let _ = writeln!(io::stderr(), "{m}");
    }
    let needs_repair = first.corruptions > 0 || first.leaks > 0 || first.dirty;
    let (last, fixed) = if a.repair && needs_repair {
        let after = img.repair()?;
        for m in &after.messages {
            let _ = writeln!(io::stderr(), "{m}");
        }
        let fixed = report::Fixed {
            corruptions: first.corruptions.saturating_sub(after.corruptions),
            leaks: first.leaks.saturating_sub(after.leaks),
        };
        (after, Some(fixed))
    } else {
        (first, None)
    };
    img.close()?;
    let name = a.file.display().to_string();
    match a.output {
        OutputKind::Json => {
            report::write_json(out, &report::check_json(&name, &last, fixed.as_ref()))?
        }
        OutputKind::Human => report::check_human(out, &last, fixed.as_ref())?,
    }
    Ok(check_exit_code(&last))
}

/// `qemu-img check`'s exit code: 1 when the check itself hit errors, else 0, 2 or 3.
fn check_exit_code(r: &CheckReport) -> u8 {
    if r.check_errors > 0 {
        1
    } else {
        u8::try_from(r.exit_code()).unwrap_or(1)
    }
}

fn export(a: &ExportArgs) -> Result<u8, Failure> {
    let img = OpenOptions::new()
        .lock(lock_mode(a.force_share))
        .open(&a.file)?;
    let format = match a.format {
        ExportFormat::Raw => OutputFormat::Raw,
        ExportFormat::Qcow2 => OutputFormat::Qcow2,
    };
    convert::export(&img, &a.output, format)?;
    img.close()?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
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

    #[test]
    fn error_chain_adds_missing_causes_once() {
        let inner = io::Error::other("disk on fire");
        let e = qcowx_core::Error::Io {
            file: "a.qcow2".into(),
            op: "read",
            offset: 0,
            source: inner,
        };
        let s = error_chain(&e);
        assert_eq!(s.matches("disk on fire").count(), 1, "{s}");
        assert!(s.starts_with("a.qcow2: "), "{s}");
    }
}
