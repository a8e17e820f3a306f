//! `qcowx`: create, inspect, check and export QCOW2 images; take snapshots, fork,
//! revert and delete VDIs, collect garbage, compare roots, and write through `io`.
//!
//! The binary is thin: it parses arguments, calls `qcowx-core` and prints. Output and
//! exit codes follow `qemu-img` (`info`, `check`, `create`, `convert`) and `qemu-io`
//! (`io`) where the commands overlap: errors print `qcowx: <error>` on stderr and exit
//! 1, usage errors exit 2, and `check` exits 0 (clean), 2 (corruptions) or 3 (leaks
//! only). The JSON outputs are specified in `spec/cli-json.md`.

mod report;
mod size;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::sync::Arc;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use qcowx_core::convert::{self, OutputFormat};
use qcowx_core::iocmd::IoCommand;
use qcowx_core::vdi::DEFAULT_VDI;
use qcowx_core::{CheckReport, CreateOptions, Image, LockMode, OpenOptions, RootKind};

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
    /// Write the content of a VDI or snapshot, backing chain included, to a new file
    /// (like `qemu-img convert`).
    Export(ExportArgs),
    /// Take a snapshot of a VDI.
    Snapshot(SnapshotArgs),
    /// List VDIs and snapshots with their lineage and times.
    List(ListArgs),
    /// Create a writable VDI from a snapshot.
    Fork(ForkArgs),
    /// Delete a snapshot or a VDI (its space comes back at `gc`).
    Delete(DeleteArgs),
    /// Make a VDI's content that of a snapshot (what it wrote since becomes garbage).
    Revert(RevertArgs),
    /// Give back the space of deleted snapshots and VDIs.
    Gc(GcArgs),
    /// List the guest ranges that differ between two snapshots or VDIs.
    Diff(DiffArgs),
    /// Read and write a VDI with `qemu-io` commands (`-c 'write -P 0x5a 0 64k'`).
    Io(IoArgs),
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
#[command(group(ArgGroup::new("root").args(["snapshot", "vdi"])))]
struct ExportArgs {
    /// Export this snapshot.
    #[arg(long, value_name = "NAME")]
    snapshot: Option<String>,
    /// Export this VDI (default: the default VDI).
    #[arg(long, value_name = "NAME")]
    vdi: Option<String>,
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

#[derive(Debug, Args)]
struct SnapshotArgs {
    /// The VDI to snapshot.
    #[arg(long, value_name = "VDI", default_value = DEFAULT_VDI)]
    vdi: String,
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The new snapshot's name (unique among snapshots and VDIs).
    #[arg(value_name = "NAME")]
    name: String,
}

#[derive(Debug, Args)]
struct ListArgs {
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
struct ForkArgs {
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The snapshot the new VDI starts from.
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,
    /// The new VDI's name (unique among snapshots and VDIs).
    #[arg(value_name = "NEW_VDI")]
    new_vdi: String,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["snapshot", "vdi"])))]
struct DeleteArgs {
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Delete this snapshot.
    #[arg(long, value_name = "NAME")]
    snapshot: Option<String>,
    /// Delete this VDI (not the default VDI); its snapshots stay.
    #[arg(long, value_name = "NAME")]
    vdi: Option<String>,
}

#[derive(Debug, Args)]
struct RevertArgs {
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The VDI to revert.
    #[arg(long, value_name = "VDI", required = true)]
    vdi: String,
    /// The snapshot whose content the VDI gets.
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,
}

#[derive(Debug, Args)]
struct GcArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    output: OutputKind,
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

#[derive(Debug, Args)]
struct DiffArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    output: OutputKind,
    /// Open the image without locking it, even while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// A snapshot or VDI.
    #[arg(value_name = "FROM")]
    from: String,
    /// Another snapshot or VDI.
    #[arg(value_name = "TO")]
    to: String,
}

#[derive(Debug, Args)]
struct IoArgs {
    /// The VDI to read and write (a snapshot can be read).
    #[arg(long, value_name = "VDI", default_value = DEFAULT_VDI)]
    vdi: String,
    /// A command, as `qemu-io -c` takes it: `write [-P PATTERN] OFFSET LEN`,
    /// `write -z [-u] OFFSET LEN`, `read [-P PATTERN] OFFSET LEN`, `discard OFFSET
    /// LEN`, `flush`. Repeat to run several, in order.
    #[arg(
        short = 'c',
        long = "cmd",
        value_name = "CMD",
        required = true,
        value_parser = io_cmd_arg
    )]
    commands: Vec<IoCommand>,
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

fn size_arg(s: &str) -> Result<u64, String> {
    size::parse_size(s)
}

fn io_cmd_arg(s: &str) -> Result<IoCommand, String> {
    IoCommand::parse(s).map_err(|e| e.to_string())
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
    // Whether the command could have read the image with -U (for a hint when locked).
    let could_share = match &cli.command {
        Command::Info(a) => !a.force_share,
        Command::Check(a) => !a.force_share && !a.repair,
        Command::Export(a) => !a.force_share,
        Command::List(a) => !a.force_share,
        Command::Diff(a) => !a.force_share,
        _ => false,
    };
    // Whether the command opens the image for writing (for a hint when it cannot).
    let writes = matches!(
        &cli.command,
        Command::Snapshot(_)
            | Command::Fork(_)
            | Command::Delete(_)
            | Command::Revert(_)
            | Command::Gc(_)
            | Command::Io(_)
    );
    let result = match cli.command {
        Command::Create(a) => create(&a, &mut out),
        Command::Info(a) => info(&a, &mut out),
        Command::Check(a) => check(&a, &mut out),
        Command::Export(a) => export(&a),
        Command::Snapshot(a) => snapshot(&a),
        Command::List(a) => list(&a, &mut out),
        Command::Fork(a) => fork(&a),
        Command::Delete(a) => delete(&a),
        Command::Revert(a) => revert(&a),
        Command::Gc(a) => gc(&a, &mut out),
        Command::Diff(a) => diff(&a, &mut out),
        Command::Io(a) => io_cmds(&a, &mut out),
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
            let mut err = io::stderr();
            let _ = writeln!(err, "qcowx: {}", error_chain(&e));
            if could_share && matches!(e, qcowx_core::Error::Locked { .. }) {
                let _ = writeln!(
                    err,
                    "qcowx: hint: -U (--force-share) reads an image in use, though what \
                     it reads may be changing"
                );
            }
            if writes && cannot_write(&e) {
                let _ = writeln!(
                    err,
                    "qcowx: hint: this command writes the image: it needs write access to \
                     the file (list, diff and export only read)"
                );
            }
            ExitCode::from(1)
        }
    }
}

/// Whether `e` says that the file cannot be opened for writing.
fn cannot_write(e: &qcowx_core::Error) -> bool {
    match e {
        qcowx_core::Error::Io {
            op: "open", source, ..
        } => {
            matches!(
                source.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
            )
        }
        _ => false,
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
    let root = match (&a.snapshot, &a.vdi) {
        (Some(s), _) => Some((RootKind::Snapshot, s.as_str())),
        (None, Some(v)) => Some((RootKind::Vdi, v.as_str())),
        (None, None) => None,
    };
    let img = Arc::new(img);
    match root {
        None => convert::export(&img, &a.output, format)?,
        Some((kind, name)) => {
            require_kind(&img, kind, name)?;
            convert::export_root(&img, name, &a.output, format)?
        }
    };
    img.close()?;
    Ok(0)
}

/// Fails with the library's not-found error unless `name` is a live root of `kind`.
fn require_kind(img: &Image, kind: RootKind, name: &str) -> Result<(), qcowx_core::Error> {
    if img.list()?.iter().any(|r| r.kind == kind && r.name == name) {
        return Ok(());
    }
    Err(qcowx_core::Error::NotFound {
        file: img.file_name().to_string(),
        what: match kind {
            RootKind::Snapshot => "snapshot",
            RootKind::Vdi => "VDI",
        }
        .to_string(),
        name: name.to_string(),
    })
}

/// Opens `file` for writing (exclusive lock) without its backing chain.
fn open_rw_meta(file: &Path) -> Result<Image, qcowx_core::Error> {
    OpenOptions::new()
        .write(true)
        .open_backing(false)
        .open(file)
}

fn snapshot(a: &SnapshotArgs) -> Result<u8, Failure> {
    let img = open_rw_meta(&a.file)?;
    img.snapshot(&a.vdi, &a.name)?;
    img.close()?;
    Ok(0)
}

fn list(a: &ListArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let img = OpenOptions::new()
        .lock(lock_mode(a.force_share))
        .open_backing(false)
        .open(&a.file)?;
    let roots = img.list()?;
    img.close()?;
    let name = a.file.display().to_string();
    match a.output {
        OutputKind::Json => report::write_json(out, &report::list_json(&name, &roots))?,
        OutputKind::Human => report::list_human(out, &roots)?,
    }
    Ok(0)
}

fn fork(a: &ForkArgs) -> Result<u8, Failure> {
    let img = open_rw_meta(&a.file)?;
    img.fork(&a.snapshot, &a.new_vdi)?;
    img.close()?;
    Ok(0)
}

fn delete(a: &DeleteArgs) -> Result<u8, Failure> {
    let img = open_rw_meta(&a.file)?;
    match (&a.snapshot, &a.vdi) {
        (Some(s), _) => img.delete_snapshot(s)?,
        (None, Some(v)) => img.delete_vdi(v)?,
        // clap requires exactly one of them.
        (None, None) => {
            return Err(Failure::Image(qcowx_core::Error::InvalidArgument(
                "delete needs --snapshot NAME or --vdi NAME".into(),
            )))
        }
    }
    img.close()?;
    Ok(0)
}

fn revert(a: &RevertArgs) -> Result<u8, Failure> {
    let img = open_rw_meta(&a.file)?;
    img.revert(&a.vdi, &a.snapshot)?;
    img.close()?;
    Ok(0)
}

fn gc(a: &GcArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let img = open_rw_meta(&a.file)?;
    let r = img.gc()?;
    img.close()?;
    let name = a.file.display().to_string();
    match a.output {
        OutputKind::Json => report::write_json(out, &report::gc_json(&name, &r))?,
        OutputKind::Human => report::gc_human(out, &r)?,
    }
    Ok(0)
}

fn diff(a: &DiffArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let img = OpenOptions::new()
        .lock(lock_mode(a.force_share))
        .open(&a.file)?;
    let ranges = img.diff(&a.from, &a.to)?;
    img.close()?;
    let name = a.file.display().to_string();
    match a.output {
        OutputKind::Json => {
            report::write_json(out, &report::diff_json(&name, &a.from, &a.to, &ranges))?
        }
        OutputKind::Human => report::diff_human(out, &ranges)?,
    }
    Ok(0)
}

/// Runs every command in order, as `qemu-io` does: a failed command is reported and
/// the next one runs; the exit code is 1 if any failed.
fn io_cmds(a: &IoArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let img = Arc::new(OpenOptions::new().write(true).open(&a.file)?);
    if a.commands.iter().any(IoCommand::writes)
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
                if out_err.is_none() {
                    if let Err(e) = o.lines().iter().try_for_each(|l| writeln!(out, "{l}")) {
                        out_err = Some(e);
                    }
                }
                if let (
                    Some(at),
                    IoCommand::Read {
                        pattern: Some(p), ..
                    },
                ) = (o.mismatch, cmd)
                {
                    failed = true;
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
