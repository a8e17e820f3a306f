//! `qcowx`: create, inspect, check, map, resize, compare, convert and export QCOW2
//! images; import backing chains; take snapshots, fork, revert, rename and delete
//! VDIs, show their lineage tree, collect garbage, compare roots, and write through
//! `io`.
//!
//! The binary is thin: it parses arguments, calls `qcowx-core` and prints. Output and
//! exit codes follow `qemu-img` (`info`, `check`, `create`, `convert`, `map`,
//! `resize`, `compare`) and `qemu-io` (`io`) where the commands overlap: errors print
//! `qcowx: <error>` on stderr and exit 1, usage errors exit 2, `check` exits 0
//! (clean), 2 (corruptions) or 3 (leaks only), and `compare` exits 0 (identical), 1
//! (different) or 2 (error). The JSON outputs are specified in `spec/cli-json.md`.
//!
//! `qcowx completions SHELL` prints shell completions and `qcowx man [COMMAND]` a
//! roff man page, both generated at run time from the same clap definitions as the
//! parser (`qcowx man > qcowx.1`, `qcowx man import > qcowx-import.1`).

mod compare;
mod iocmd;
mod map;
mod progress;
mod report;
mod tree;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::sync::Arc;

use clap::{ArgGroup, Args, CommandFactory, Parser, Subcommand, ValueEnum};
use iocmd::IoCommand;
use qcowx_core::chain::LayerFormat;
use qcowx_core::control::{self, ControlError, DeleteTarget, Request, Response};
use qcowx_core::convert::{self, ConvertOptions, OutputFormat};
use qcowx_core::size::parse_size;
use qcowx_core::vdi::DEFAULT_VDI;
use qcowx_core::{CheckReport, CreateOptions, ErrorKind, Image, LockMode, OpenOptions, RootKind};

/// Create, inspect, check and export QCOW2 images.
#[derive(Debug, Parser)]
#[command(name = "qcowx", version, about)]
struct Cli {
    /// Quiet: no progress bars and no human-readable output on stdout (errors still
    /// go to stderr; JSON, DOT, completions and man pages are still printed).
    #[arg(short = 'q', long = "quiet", global = true)]
    quiet: bool,
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
    /// Turn a backing chain into one image: the base becomes the first snapshot, each
    /// layer above it a snapshot, the top the default VDI.
    #[command(long_about = IMPORT_ABOUT)]
    Import(ImportArgs),
    /// Show the lineage forest of VDIs and snapshots with their exclusive sizes.
    Tree(TreeArgs),
    /// Show where each guest range comes from (like `qemu-img map`).
    Map(MapArgs),
    /// Grow the virtual disk of the default VDI (like `qemu-img resize`).
    #[command(allow_negative_numbers = true)]
    Resize(ResizeArgs),
    /// Rename a snapshot or a VDI.
    Rename(RenameArgs),
    /// Compare the contents of two images, qcow2 or raw (like `qemu-img compare`).
    Compare(CompareArgs),
    /// Convert between raw and qcow2, optionally compressed (like `qemu-img convert`).
    Convert(ConvertArgs),
    /// Print shell completions for SHELL.
    Completions(CompletionsArgs),
    /// Print the man page (roff) of qcowx or of one of its commands.
    Man(ManArgs),
}

const IMPORT_ABOUT: &str = "\
Turn the backing chain under TOP (TOP and every file below it: qcow2 layers over a qcow2
or raw base) into one new qcowx image at OUTPUT. The bottom layer becomes the first
snapshot, each layer above it a snapshot on top of the previous one, and TOP the default
VDI. Every snapshot reads exactly as its layer reads in the chain (what `qemu-img convert
-O raw LAYER` writes); only what each layer stores itself is copied.

Snapshot names come from the layer file names: the name without its last extension,
with every character other than a letter, digit, '.', '_', '+', '-' or '@' (and a
leading '.' or '-') replaced by '_', cut to 128 bytes ('layer' if empty); a name already
taken (or 'default') gets the first free suffix -2, -3, ...

The output has TOP's cluster size (64 KiB for a raw TOP) and no backing file. Layers may
grow up the chain but not shrink. Internal snapshots of the chain's files are not
imported.

The output is written under a temporary name beside OUTPUT and renamed over it once
complete; by default it is on the disk (fdatasync) before the rename, and --no-sync
leaves that to the kernel.";

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

#[derive(Debug, Args)]
struct ImportArgs {
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t = OutputKind::Human)]
    format: OutputKind,
    /// The top of the chain (it becomes the default VDI).
    #[arg(value_name = "TOP")]
    top: PathBuf,
    /// The image to write (overwritten if it exists; never one of the chain's files).
    #[arg(value_name = "OUTPUT")]
    dest: PathBuf,
    /// Do not wait for the disk: no fdatasync; the kernel writes the output back when
    /// it chooses (as `qemu-img convert` does by default). OUTPUT still appears only
    /// once complete, but a power failure soon after may lose it or part of its data.
    #[arg(long = "no-sync")]
    no_sync: bool,
}

#[derive(Debug, Args)]
struct TreeArgs {
    /// Print the forest as a Graphviz digraph.
    #[arg(long, conflicts_with = "output")]
    dot: bool,
    /// Write an SVG picture to OUT (with Graphviz's `dot` when it is installed, else
    /// with a built-in renderer; the QCOWX_DOT variable names another `dot` program,
    /// or none when empty).
    #[arg(long, value_name = "OUT")]
    svg: Option<PathBuf>,
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
#[command(group(ArgGroup::new("root").args(["snapshot", "vdi"])))]
struct MapArgs {
    /// Map this snapshot.
    #[arg(long, value_name = "NAME")]
    snapshot: Option<String>,
    /// Map this VDI (default: the default VDI).
    #[arg(long, value_name = "NAME")]
    vdi: Option<String>,
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
struct ResizeArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    output: OutputKind,
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The new size (K, M, G, T, P, E suffixes), or +SIZE to grow by SIZE. Shrinking
    /// (-SIZE, or a smaller size) is refused.
    #[arg(value_name = "[+]SIZE", allow_hyphen_values = true)]
    size: String,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("kind").required(true).args(["snapshot", "vdi"])))]
struct RenameArgs {
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Rename a snapshot.
    #[arg(long)]
    snapshot: bool,
    /// Rename a VDI (not the default VDI).
    #[arg(long)]
    vdi: bool,
    /// Its current name.
    #[arg(value_name = "OLD")]
    old: String,
    /// Its new name (unique among snapshots and VDIs).
    #[arg(value_name = "NEW")]
    new: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    fn layer(self) -> LayerFormat {
        match self {
            DiskFormat::Raw => LayerFormat::Raw,
            DiskFormat::Qcow2 => LayerFormat::Qcow2,
        }
    }
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Format of FILE_A (probed when absent).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    format_a: Option<DiskFormat>,
    /// Format of FILE_B (probed when absent).
    #[arg(short = 'F', value_enum, value_name = "FMT")]
    format_b: Option<DiskFormat>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    output: OutputKind,
    /// Open the images without locking them, even while another process writes them.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The first image.
    #[arg(value_name = "FILE_A")]
    file_a: PathBuf,
    /// The second image.
    #[arg(value_name = "FILE_B")]
    file_b: PathBuf,
}

#[derive(Debug, Args)]
struct ConvertArgs {
    /// Store clusters compressed (needs -O qcow2).
    #[arg(short = 'c')]
    compress: bool,
    /// Output format.
    #[arg(short = 'O', value_enum, value_name = "FMT", default_value_t = DiskFormat::Raw)]
    out_format: DiskFormat,
    /// Input format (probed when absent).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    in_format: Option<DiskFormat>,
    /// Cluster size of a qcow2 output (default: the input's, or 64 KiB).
    #[arg(long = "cluster-size", value_name = "SIZE", value_parser = size_arg)]
    cluster_size: Option<u64>,
    /// Read the input without locking it, even while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The input image (a qcow2 image is read with its backing chain).
    #[arg(value_name = "INPUT")]
    input: PathBuf,
    /// The file to write (overwritten if it exists).
    #[arg(value_name = "OUTPUT")]
    dest: PathBuf,
}

#[derive(Debug, Args)]
struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum, value_name = "SHELL")]
    shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
struct ManArgs {
    /// A command whose page to print (default: the page of qcowx itself).
    #[arg(value_name = "COMMAND")]
    command: Option<String>,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn io_cmd_arg(s: &str) -> Result<IoCommand, String> {
    IoCommand::parse(s).map_err(|e| e.to_string())
}

/// Why a command failed.
#[derive(Debug)]
enum Failure {
    /// The image library reported an error.
    Image(qcowx_core::Error),
    /// A running qcowx-nbd serving the image refused or failed a forwarded request.
    Control(ControlError),
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
    let quiet = cli.quiet;
    // Whether the command could have read the image with -U (for a hint when locked).
    let could_share = match &cli.command {
        Command::Info(a) => !a.force_share,
        Command::Check(a) => !a.force_share && !a.repair,
        Command::Export(a) => !a.force_share,
        Command::List(a) => !a.force_share,
        Command::Diff(a) => !a.force_share,
        Command::Tree(a) => !a.force_share,
        Command::Map(a) => !a.force_share,
        Command::Compare(a) => !a.force_share,
        Command::Convert(a) => !a.force_share,
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
            | Command::Resize(_)
            | Command::Rename(_)
    );
    // The image file, when the command names snapshots or VDIs in it (for a hint when
    // a name is unknown or taken).
    let names_roots = match &cli.command {
        Command::Snapshot(a) => Some(a.file.clone()),
        Command::Fork(a) => Some(a.file.clone()),
        Command::Delete(a) => Some(a.file.clone()),
        Command::Revert(a) => Some(a.file.clone()),
        Command::Diff(a) => Some(a.file.clone()),
        Command::Export(a) => Some(a.file.clone()),
        Command::Io(a) => Some(a.file.clone()),
        Command::Map(a) => Some(a.file.clone()),
        Command::Rename(a) => Some(a.file.clone()),
        _ => None,
    };
    // `compare` reports errors with 2, as `qemu-img compare` does (1 means "differ").
    let error_code = if matches!(&cli.command, Command::Compare(_)) {
        2
    } else {
        1
    };
    let result = match cli.command {
        Command::Create(a) => create(&a, quiet, &mut out),
        Command::Info(a) => info(&a, quiet, &mut out),
        Command::Check(a) => check(&a, quiet, &mut out),
        Command::Export(a) => export(&a, quiet),
        Command::Snapshot(a) => snapshot(&a),
        Command::List(a) => list(&a, quiet, &mut out),
        Command::Fork(a) => fork(&a),
        Command::Delete(a) => delete(&a),
        Command::Revert(a) => revert(&a),
        Command::Gc(a) => gc(&a, quiet, &mut out),
        Command::Diff(a) => diff(&a, quiet, &mut out),
        Command::Io(a) => io_cmds(&a, quiet, &mut out),
        Command::Import(a) => import(&a, quiet, &mut out),
        Command::Tree(a) => tree_cmd(&a, quiet, &mut out),
        Command::Map(a) => map(&a, quiet, &mut out),
        Command::Resize(a) => resize(&a, quiet, &mut out),
        Command::Rename(a) => rename(&a),
        Command::Compare(a) => compare(&a, quiet, &mut out),
        Command::Convert(a) => convert_cmd(&a, quiet),
        Command::Completions(a) => completions(&a, &mut out),
        Command::Man(a) => man(&a, &mut out),
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
            ExitCode::from(error_code)
        }
        Err(f) => {
            let mut err = io::stderr();
            let _ = writeln!(err, "qcowx: {}", f.message());
            for hint in hints(&f, could_share, writes, names_roots.as_deref()) {
                let _ = writeln!(err, "qcowx: hint: {hint}");
            }
            ExitCode::from(error_code)
        }
    }
}

impl Failure {
    /// The library's kind of the error (`None` for output errors and for failures to
    /// talk to a server).
    fn kind(&self) -> Option<ErrorKind> {
        match self {
            Failure::Image(e) => Some(e.kind()),
            Failure::Control(e) => e.kind(),
            Failure::Output(_) => None,
        }
    }

    /// What to print after `qcowx: `.
    fn message(&self) -> String {
        match self {
            Failure::Image(e) => error_chain(e),
            Failure::Control(e) => e.to_string(),
            Failure::Output(e) => format!("error writing output: {e}"),
        }
    }

    /// The OS error behind an image error, if any.
    fn os_error(&self) -> Option<&io::Error> {
        match self {
            Failure::Image(e) => {
                std::error::Error::source(e).and_then(|s| s.downcast_ref::<io::Error>())
            }
            Failure::Control(_) | Failure::Output(_) => None,
        }
    }

    /// Whether writing was refused: by the library, or by the OS (a permission, a
    /// read-only file system; the library reports the latter as an I/O error when the
    /// OS error comes wrapped in a message).
    fn write_refused(&self) -> bool {
        self.kind() == Some(ErrorKind::ReadOnly)
            || self.os_error().is_some_and(|e| {
                matches!(
                    e.kind(),
                    io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
                )
            })
    }
}

/// The hints that follow an error: `could_share` when the command could have read the
/// image with -U, `writes` when it writes the image, `names_roots` the image file when
/// the command names snapshots or VDIs of it.
fn hints(f: &Failure, could_share: bool, writes: bool, names_roots: Option<&Path>) -> Vec<String> {
    let mut v = Vec::new();
    let kind = f.kind();
    if could_share && kind == Some(ErrorKind::Locked) {
        v.push(
            "-U (--force-share) reads an image in use, though what it reads may be changing"
                .to_string(),
        );
    }
    if writes && f.write_refused() && f.os_error().is_some() {
        v.push(
            "this command writes the image: it needs write access to the file (list, diff \
             and export only read)"
                .to_string(),
        );
    }
    if let Some(file) = names_roots {
        // A name that is not there (not a file that is not there), or one already taken.
        let unknown_name = kind == Some(ErrorKind::NotFound) && f.os_error().is_none();
        let taken =
            kind == Some(ErrorKind::InvalidArgument) && f.message().contains("already exists");
        if unknown_name || taken {
            v.push(format!(
                "`qcowx list {}` lists the snapshots and VDIs",
                file.display()
            ));
        }
    }
    v
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

fn create(a: &CreateArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
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
    if !quiet {
        report::formatting_line(out, &a.file, &info)?;
    }
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

fn info(a: &InfoArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let img = OpenOptions::new()
        .lock(lock_mode(a.force_share))
        .open_backing(false)
        .open(&a.file)?;
    let info = img.info()?;
    let actual = actual_size(&a.file)?;
    let name = a.file.display().to_string();
    match a.output {
        OutputKind::Json => report::write_json(out, &report::info_json(&name, &info, actual))?,
        OutputKind::Human if quiet => {}
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

fn check(a: &CheckArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let opts = OpenOptions::new().open_backing(false);
    let opts = if a.repair {
        opts.write(true)
    } else {
        opts.lock(lock_mode(a.force_share))
    };
    let img = opts.open(&a.file)?;
    let spinner = progress::Spinner::start(
        progress::enabled(quiet, a.output == OutputKind::Json),
        "checking",
    );
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
    drop(spinner);
    let name = a.file.display().to_string();
    match a.output {
        OutputKind::Json => {
            report::write_json(out, &report::check_json(&name, &last, fixed.as_ref()))?
        }
        OutputKind::Human if quiet => {}
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

fn export(a: &ExportArgs, quiet: bool) -> Result<u8, Failure> {
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
    let bar = progress::Bar::new(progress::enabled(quiet, false), "exporting");
    let opts = ConvertOptions::new(format);
    match root {
        None => convert::convert(img.as_ref(), &a.output, &opts, &mut bar.callback())?,
        Some((kind, name)) => {
            require_kind(&img, kind, name)?;
            let disk = img.open_root(name)?;
            convert::convert(&disk, &a.output, &opts, &mut bar.callback())?
        }
    };
    drop(bar);
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

/// Runs `req` on the image `opened` gave (then closes it), or, when opening failed
/// because a qcowx-nbd serving the image holds its lock, sends `req` to that server:
/// scripts work the same on live and idle images. Any other error, or no server
/// answering, is reported as the open error.
fn run_request(
    file: &Path,
    opened: Result<Image, qcowx_core::Error>,
    req: &Request,
) -> Result<Response, Failure> {
    let open_error = match opened {
        Ok(img) => {
            let r = control::execute(&img, req, &control::Local)?;
            img.close()?;
            return Ok(r);
        }
        Err(e) => e,
    };
    if open_error.kind() != ErrorKind::Locked {
        return Err(Failure::Image(open_error));
    }
    match control::request(file, req) {
        Ok(r) => Ok(r),
        Err(ControlError::NoServer { .. }) => Err(Failure::Image(open_error)),
        Err(e) => Err(Failure::Control(e)),
    }
}

/// The failure for an answer of the wrong kind to `req`.
fn unexpected(req: &Request, r: &Response) -> Failure {
    Failure::Control(ControlError::Protocol(format!(
        "unexpected answer to {req}: {r:?}"
    )))
}

/// Opens `file` for writing (exclusive lock) without its backing chain.
fn open_rw_meta(file: &Path) -> Result<Image, qcowx_core::Error> {
    OpenOptions::new()
        .write(true)
        .open_backing(false)
        .open(file)
}

fn snapshot(a: &SnapshotArgs) -> Result<u8, Failure> {
    let req = Request::Snapshot {
        vdi: a.vdi.clone(),
        name: a.name.clone(),
    };
    run_request(&a.file, open_rw_meta(&a.file), &req)?;
    Ok(0)
}

fn list(a: &ListArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let opened = OpenOptions::new()
        .lock(lock_mode(a.force_share))
        .open_backing(false)
        .open(&a.file);
    let roots = match run_request(&a.file, opened, &Request::List)? {
        Response::Roots(roots) => roots,
        other => return Err(unexpected(&Request::List, &other)),
    };
    let name = a.file.display().to_string();
    match a.output {
        OutputKind::Json => report::write_json(out, &report::list_json(&name, &roots))?,
        OutputKind::Human if quiet => {}
        OutputKind::Human => report::list_human(out, &roots)?,
    }
    Ok(0)
}

fn fork(a: &ForkArgs) -> Result<u8, Failure> {
    let req = Request::Fork {
        snapshot: a.snapshot.clone(),
        name: a.new_vdi.clone(),
    };
    run_request(&a.file, open_rw_meta(&a.file), &req)?;
    Ok(0)
}

fn delete(a: &DeleteArgs) -> Result<u8, Failure> {
    // clap requires exactly one of --snapshot and --vdi.
    let target = match (&a.snapshot, &a.vdi) {
        (Some(s), _) => DeleteTarget::Snapshot(s.clone()),
        (None, Some(v)) => DeleteTarget::Vdi(v.clone()),
        (None, None) => {
            return Err(Failure::Image(qcowx_core::Error::InvalidArgument(
                "delete needs --snapshot NAME or --vdi NAME".into(),
            )))
        }
    };
    run_request(&a.file, open_rw_meta(&a.file), &Request::Delete(target))?;
    Ok(0)
}

fn revert(a: &RevertArgs) -> Result<u8, Failure> {
    let req = Request::Revert {
        vdi: a.vdi.clone(),
        snapshot: a.snapshot.clone(),
    };
    run_request(&a.file, open_rw_meta(&a.file), &req)?;
    Ok(0)
}

fn gc(a: &GcArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let spinner = progress::Spinner::start(
        progress::enabled(quiet, a.output == OutputKind::Json),
        "collecting garbage",
    );
    let r = match run_request(&a.file, open_rw_meta(&a.file), &Request::Gc)? {
        Response::Gc(r) => r,
        other => return Err(unexpected(&Request::Gc, &other)),
    };
    drop(spinner);
    let name = a.file.display().to_string();
    match a.output {
        OutputKind::Json => report::write_json(out, &report::gc_json(&name, &r))?,
        OutputKind::Human if quiet => {}
        OutputKind::Human => report::gc_human(out, &r)?,
    }
    Ok(0)
}

fn diff(a: &DiffArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
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
        OutputKind::Human if quiet => {}
        OutputKind::Human => report::diff_human(out, &ranges)?,
    }
    Ok(0)
}

/// Runs every command in order, as `qemu-io` does: a failed command is reported and
/// the next one runs; the exit code is 1 if any failed.
fn io_cmds(a: &IoArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
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

fn import(a: &ImportArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let json = a.format == OutputKind::Json;
    let bar = progress::Bar::new(progress::enabled(quiet, json), "importing");
    let options = qcowx_core::import::ImportOptions { sync: !a.no_sync };
    let r = qcowx_core::import::import_chain_with(&a.top, &a.dest, &options, &mut bar.callback())?;
    drop(bar);
    let top = a.top.display().to_string();
    let dest = a.dest.display().to_string();
    match a.format {
        OutputKind::Json => report::write_json(out, &report::import_json(&top, &dest, &r))?,
        OutputKind::Human if quiet => {}
        OutputKind::Human => report::import_human(out, &dest, &r)?,
    }
    Ok(0)
}

fn tree_cmd(a: &TreeArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let img = OpenOptions::new()
        .lock(lock_mode(a.force_share))
        .open_backing(false)
        .open(&a.file)?;
    let roots = img.list()?;
    let usage = img.root_usage()?;
    img.close()?;
    let forest = tree::Forest::build(&roots, &usage);
    if let Some(svg) = &a.svg {
        write_svg(&forest, svg)?;
    }
    let name = a.file.display().to_string();
    if a.dot {
        out.write_all(tree::dot(&forest).as_bytes())?;
    } else {
        match a.output {
            OutputKind::Json => report::write_json(out, &tree::json(&name, &forest))?,
            OutputKind::Human if quiet || a.svg.is_some() => {}
            OutputKind::Human => tree::human(out, &forest)?,
        }
    }
    Ok(0)
}

/// Writes the forest as SVG to `path`: with Graphviz's `dot` (or the program named by
/// `QCOWX_DOT`; none when it is empty) when it can be run, else with the built-in
/// renderer.
fn write_svg(forest: &tree::Forest, path: &Path) -> Result<(), qcowx_core::Error> {
    use std::process::{Command as Process, Stdio};
    let name = path.display().to_string();
    let io_err = |op: &'static str, source: io::Error| qcowx_core::Error::Io {
        file: name.clone(),
        op,
        offset: 0,
        source,
    };
    let program = std::env::var_os("QCOWX_DOT").unwrap_or_else(|| "dot".into());
    if !program.is_empty() {
        let spawned = Process::new(&program)
            .arg("-Tsvg")
            .arg("-o")
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(mut child) => {
                if let Some(mut stdin) = child.stdin.take() {
                    // An early exit of dot shows in its status below.
                    let _ = stdin.write_all(tree::dot(forest).as_bytes());
                }
                let done = child
                    .wait_with_output()
                    .map_err(|e| io_err("run dot for", e))?;
                if done.status.success() {
                    return Ok(());
                }
                return Err(qcowx_core::Error::InvalidArgument(format!(
                    "{name}: `{} -Tsvg` failed ({}): {}; unset QCOWX_DOT or set it empty to \
                     use the built-in renderer",
                    program.to_string_lossy(),
                    done.status,
                    String::from_utf8_lossy(&done.stderr).trim()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("run dot for", e)),
        }
    }
    std::fs::write(path, tree::svg(forest)).map_err(|e| io_err("write", e))
}

fn map(a: &MapArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let lock = lock_mode(a.force_share);
    let img = Arc::new(OpenOptions::new().lock(lock).open(&a.file)?);
    let root = match (&a.snapshot, &a.vdi) {
        (Some(s), _) => {
            require_kind(&img, RootKind::Snapshot, s)?;
            s.as_str()
        }
        (None, Some(v)) => {
            require_kind(&img, RootKind::Vdi, v)?;
            v.as_str()
        }
        (None, None) => DEFAULT_VDI,
    };
    let extents = map::map_root(&img, Some(root), lock)?;
    img.close()?;
    let name = a.file.display().to_string();
    match a.output {
        OutputKind::Json => report::write_json(out, &report::map_json(&name, root, &extents))?,
        OutputKind::Human if quiet => {}
        OutputKind::Human => report::map_human(out, &extents)?,
    }
    Ok(0)
}

/// A `resize` size: `SIZE`, `+SIZE` or `-SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResizeTo {
    Absolute(u64),
    Grow(u64),
    Shrink(u64),
}

fn resize_arg(s: &str) -> Result<ResizeTo, String> {
    if let Some(rest) = s.strip_prefix('+') {
        size_arg(rest).map(ResizeTo::Grow)
    } else if let Some(rest) = s.strip_prefix('-') {
        size_arg(rest).map(ResizeTo::Shrink)
    } else {
        size_arg(s).map(ResizeTo::Absolute)
    }
}

fn resize(a: &ResizeArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
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
    match a.output {
        OutputKind::Json => report::write_json(out, &report::resize_json(&name, old, after))?,
        OutputKind::Human if quiet => {}
        OutputKind::Human => writeln!(out, "Image resized.")?,
    }
    Ok(0)
}

fn rename(a: &RenameArgs) -> Result<u8, Failure> {
    let img = open_rw_meta(&a.file)?;
    let kind = if a.snapshot {
        RootKind::Snapshot
    } else {
        RootKind::Vdi
    };
    img.rename(kind, &a.old, &a.new)?;
    img.close()?;
    Ok(0)
}

fn compare(a: &CompareArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let lock = lock_mode(a.force_share);
    let ia = convert::open_input(&a.file_a, a.format_a.map(DiskFormat::layer), lock)?;
    let ib = convert::open_input(&a.file_b, a.format_b.map(DiskFormat::layer), lock)?;
    let json = a.output == OutputKind::Json;
    let bar = progress::Bar::new(progress::enabled(quiet, json), "comparing");
    let r = compare::compare(ia.as_ref(), ib.as_ref(), &mut bar.callback())?;
    drop(bar);
    drop(ia);
    drop(ib);
    let (name_a, name_b) = (
        a.file_a.display().to_string(),
        a.file_b.display().to_string(),
    );
    match a.output {
        OutputKind::Json => report::write_json(out, &report::compare_json(&name_a, &name_b, &r))?,
        OutputKind::Human if quiet => {}
        OutputKind::Human => {
            if r.size_a != r.size_b {
                writeln!(out, "Warning: Image size mismatch!")?;
            }
            match r.mismatch {
                None => writeln!(out, "Images are identical.")?,
                Some(at) => writeln!(out, "Content mismatch at offset {at}!")?,
            }
        }
    }
    Ok(if r.identical() { 0 } else { 1 })
}

fn convert_cmd(a: &ConvertArgs, quiet: bool) -> Result<u8, Failure> {
    if a.compress && a.out_format != DiskFormat::Qcow2 {
        usage_error(
            "convert",
            clap::error::ErrorKind::ArgumentConflict,
            "-c (compressed output) needs a qcow2 output: add -O qcow2".into(),
        );
    }
    let input = convert::open_input(
        &a.input,
        a.in_format.map(DiskFormat::layer),
        lock_mode(a.force_share),
    )?;
    let mut opts = ConvertOptions::new(match a.out_format {
        DiskFormat::Raw => OutputFormat::Raw,
        DiskFormat::Qcow2 => OutputFormat::Qcow2,
    });
    opts.compress = a.compress;
    opts.cluster_size = a.cluster_size;
    let bar = progress::Bar::new(progress::enabled(quiet, false), "converting");
    convert::convert(input.as_ref(), &a.dest, &opts, &mut bar.callback())?;
    Ok(0)
}

/// Exits with a usage error (exit code 2) in clap's format, with `sub`'s usage.
fn usage_error(sub: &str, kind: clap::error::ErrorKind, msg: String) -> ! {
    let mut cmd = Cli::command();
    cmd.build();
    match cmd.find_subcommand_mut(sub) {
        Some(s) => s.error(kind, msg).exit(),
        None => cmd.error(kind, msg).exit(),
    }
}

fn completions(a: &CompletionsArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut Cli::command(), "qcowx", &mut buf);
    out.write_all(&buf)?;
    Ok(0)
}

fn man(a: &ManArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let cmd = Cli::command();
    let page = match &a.command {
        None => cmd,
        Some(name) => match cmd.find_subcommand(name) {
            Some(sub) => sub
                .clone()
                .display_name(format!("qcowx-{name}"))
                .bin_name(format!("qcowx {name}")),
            None => usage_error(
                "man",
                clap::error::ErrorKind::InvalidValue,
                format!("'{name}' is not a qcowx command; `qcowx --help` lists them"),
            ),
        },
    };
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    out.write_all(&buf)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

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
