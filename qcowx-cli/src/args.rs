//! The command line's arguments: one struct per command (those of `compare`,
//! `convert`, `dd` and `bench` in `args/copy.rs`; those of `amend`, `rebase`,
//! `measure`, `push` and `pull` beside their commands), and the value parsers they
//! share. `main.rs` holds the command enum that names them.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgGroup, Args, ValueEnum};
use qcowx_core::engine::chain::ImageFormat;
use qcowx_core::size::parse_size;
use qcowx_core::vdi::DEFAULT_VDI;

use crate::iocmd::IoCommand;

mod copy;
pub(crate) use copy::*;

/// `-f FMT`, as `qemu-img` takes it on every command: commands that work on qcow2
/// images only accept `-f qcow2` (the format is read from the file either way), so
/// command lines written for `qemu-img` run unchanged; any other format is refused as
/// a usage error that names the one accepted.
#[derive(Debug, Args)]
pub(crate) struct Qcow2Only {
    /// The image's format, as qemu-img takes it: only qcow2 (read from the file anyway).
    #[arg(id = "image-format", short = 'f', value_name = "FMT", value_parser = ["qcow2"])]
    #[allow(dead_code)] // Accepted, never needed: clap refuses every other value.
    pub(crate) format: Option<String>,
}

/// Rewrites `qemu-img`'s `check -r leaks` / `check -r all` (a separate value after
/// `-r`) as `--repair=leaks` / `--repair=all`, the form clap parses: `-r` alone keeps
/// meaning a full repair, so a value may follow it only when attached. Other command
/// lines pass unchanged.
pub(crate) fn qemu_img_forms(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    // The command is the first argument after the program that is not an option
    // (`-q` is the only global one).
    let Some(cmd) = args
        .iter()
        .skip(1)
        .position(|a| !a.to_string_lossy().starts_with('-'))
    else {
        return args;
    };
    if args[cmd + 1] != "check" {
        return args;
    }
    let mut i = cmd + 2;
    while i + 1 < args.len() {
        let mode = args[i + 1].to_string_lossy();
        if (args[i] == "-r" || args[i] == "--repair") && (mode == "leaks" || mode == "all") {
            let merged = OsString::from(format!("--repair={mode}"));
            args.splice(i..i + 2, [merged]);
        }
        i += 1;
    }
    args
}

/// `info`: [`ReadArgs`] and `--backing-chain`.
#[derive(Debug, Args)]
pub(crate) struct InfoArgs {
    /// Show every image of the backing chain, top first (as `qemu-img info
    /// --backing-chain`: a JSON array with --output=json).
    #[arg(long = "backing-chain")]
    pub(crate) backing_chain: bool,
    #[command(flatten)]
    pub(crate) image: ReadArgs,
}

/// What a command that reads one image takes: the output format, -U and FILE.
#[derive(Debug, Args)]
pub(crate) struct ReadArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    pub(crate) output: OutputKind,
    /// Open the image without locking it, even while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    #[command(flatten)]
    pub(crate) image_format: Qcow2Only,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    #[command(flatten)]
    pub(crate) image_format: Qcow2Only,
    /// Cluster size (512 to 2M, a power of two; K/M suffixes allowed).
    #[arg(long = "cluster-size", value_name = "SIZE", value_parser = size_arg)]
    pub(crate) cluster_size: Option<u64>,
    /// Backing file name, stored as given (relative names resolve against FILE's folder).
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    pub(crate) backing: Option<String>,
    /// Format of the backing file (probed when absent).
    #[arg(
        short = 'F',
        long = "backing-format",
        value_name = "FORMAT",
        requires = "backing",
        value_parser = ["raw", "qcow2"]
    )]
    pub(crate) backing_format: Option<String>,
    /// 128-bit L2 entries with subcluster bitmaps (`-o extended_l2=on`): a first
    /// write smaller than a cluster allocates only the 1/32-cluster subclusters it
    /// touches, the rest reading from the backing file.
    #[arg(long = "extended-l2")]
    pub(crate) extended_l2: bool,
    /// qemu-img's creation options, comma-separated key=value: size, cluster_size,
    /// extended_l2, refcount_bits, compression_type, backing_file, backing_fmt,
    /// compat (1.1 only).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub(crate) options: Vec<String>,
    /// Unsafe: name the backing file without opening it (it need not exist yet; SIZE
    /// must then be given), as `qemu-img create -u` does.
    #[arg(short = 'u')]
    pub(crate) unsafe_: bool,
    /// Replace FILE if it exists, whatever it holds (as `qemu-img create` does).
    /// Without it an existing FILE is refused and left untouched.
    #[arg(long = "overwrite")]
    pub(crate) overwrite: bool,
    /// The image file to create (refused if it exists, unless --overwrite).
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// Virtual size: bytes, or with a K, M, G, T, P or E suffix (powers of 1024).
    /// Defaults to the backing file's size.
    #[arg(
        value_name = "SIZE",
        value_parser = size_arg,
        required_unless_present_any = ["backing", "options"]
    )]
    pub(crate) size: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputKind {
    Human,
    Json,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Rewrite the refcounts from a reachability scan (fixes leaks and refcount
    /// errors). qemu-img's `-r all` and `-r leaks` are taken too: `all` is this repair;
    /// `leaks` repairs an image whose check finds leaks and nothing worse, and leaves
    /// one with corruptions as it is (reported, exit 2).
    #[arg(
        long,
        short = 'r',
        value_enum,
        value_name = "MODE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "all"
    )]
    pub(crate) repair: Option<RepairMode>,
    #[command(flatten)]
    pub(crate) image_format: Qcow2Only,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    pub(crate) output: OutputKind,
    /// Open the image without locking it, even while another process writes it.
    #[arg(short = 'U', long = "force-share", conflicts_with = "repair")]
    pub(crate) force_share: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
}

/// What `check --repair` may fix (qemu-img's `-r` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RepairMode {
    /// Only an image whose problems are leaks.
    Leaks,
    /// Leaks and refcount errors.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ExportFormat {
    Raw,
    Qcow2,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("root").args(["snapshot", "vdi"])))]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    pub(crate) image_format: Qcow2Only,
    /// Export this snapshot.
    #[arg(long, value_name = "NAME")]
    pub(crate) snapshot: Option<String>,
    /// Export this VDI (default: the default VDI).
    #[arg(long, value_name = "NAME")]
    pub(crate) vdi: Option<String>,
    /// Output format (a qcow2 output has the image's cluster size).
    #[arg(short = 'O', value_enum, default_value_t = ExportFormat::Raw)]
    pub(crate) format: ExportFormat,
    /// Read the source without locking it, even while another process writes it.
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// The source image.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// The file to write (overwritten if it exists).
    #[arg(value_name = "OUTPUT")]
    pub(crate) output: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct SendArgs {
    /// Send only what changed since this snapshot (an incremental stream).
    #[arg(long, value_name = "SNAPSHOT")]
    pub(crate) from: Option<String>,
    /// Write the stream to this file instead of stdout.
    #[arg(short = 'o', long = "output-file", value_name = "OUT")]
    pub(crate) output_file: Option<PathBuf>,
    /// Start where a stopped receive needs it (the token `qcowx receive --token`
    /// prints).
    #[arg(long = "resume-from", value_name = "TOKEN")]
    pub(crate) resume_from: Option<String>,
    /// Read the image without locking it (a served image's snapshots).
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// With -o: do not wait for the disk (no fdatasync of OUT; the kernel writes it
    /// back when it chooses, as `qemu-img convert` does by default). By default OUT is
    /// on the disk when the command returns.
    #[arg(long = "no-sync", requires = "output_file")]
    pub(crate) no_sync: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// The snapshot to send.
    #[arg(value_name = "SNAPSHOT")]
    pub(crate) snapshot: String,
}

#[derive(Debug, Args)]
pub(crate) struct ReceiveArgs {
    /// Read the stream from this file instead of stdin.
    #[arg(short = 'i', long = "input-file", value_name = "IN")]
    pub(crate) input_file: Option<PathBuf>,
    /// Name the snapshot this instead of the sender's name.
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,
    /// Print the resume token of the receive stopped in FILE, and exit.
    #[arg(long)]
    pub(crate) token: bool,
    /// Drop the receive stopped in FILE (its hidden VDI and progress), and exit.
    #[arg(long)]
    pub(crate) abort: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    pub(crate) output: OutputKind,
    /// The image file (created by a full stream when missing).
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("qemu").args(["list", "create", "delete", "apply"])))]
pub(crate) struct SnapshotArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    pub(crate) output: OutputKind,
    /// The VDI to snapshot.
    #[arg(long, value_name = "VDI", default_value = DEFAULT_VDI)]
    pub(crate) vdi: String,
    /// qemu-img's form: list the snapshots (the table `qemu-img snapshot -l` prints).
    #[arg(short = 'l', conflicts_with_all = ["name", "vdi"])]
    pub(crate) list: bool,
    /// qemu-img's form: take snapshot NAME of the VDI (`qcowx snapshot FILE NAME`).
    #[arg(short = 'c', value_name = "NAME", conflicts_with = "name")]
    pub(crate) create: Option<String>,
    /// qemu-img's form: delete snapshot NAME (`qcowx delete --snapshot NAME FILE`).
    #[arg(short = 'd', value_name = "NAME", conflicts_with_all = ["name", "vdi"])]
    pub(crate) delete: Option<String>,
    /// qemu-img's form: give the VDI snapshot NAME's content (`qcowx revert --vdi VDI
    /// FILE NAME`).
    #[arg(short = 'a', value_name = "NAME", conflicts_with = "name")]
    pub(crate) apply: Option<String>,
    #[command(flatten)]
    pub(crate) image_format: Qcow2Only,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// The new snapshot's name (unique among snapshots and VDIs).
    #[arg(value_name = "NAME", required_unless_present = "qemu")]
    pub(crate) name: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ForkArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    pub(crate) output: OutputKind,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// The snapshot the new VDI starts from.
    #[arg(value_name = "SNAPSHOT")]
    pub(crate) snapshot: String,
    /// The new VDI's name (unique among snapshots and VDIs).
    #[arg(value_name = "NEW_VDI")]
    pub(crate) new_vdi: String,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["snapshot", "vdi"])))]
pub(crate) struct DeleteArgs {
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// Delete this snapshot.
    #[arg(long, value_name = "NAME")]
    pub(crate) snapshot: Option<String>,
    /// Delete this VDI (not the default VDI); its snapshots stay.
    #[arg(long, value_name = "NAME")]
    pub(crate) vdi: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct RevertArgs {
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// The VDI to revert.
    #[arg(long, value_name = "VDI", required = true)]
    pub(crate) vdi: String,
    /// The snapshot whose content the VDI gets.
    #[arg(value_name = "SNAPSHOT")]
    pub(crate) snapshot: String,
}

#[derive(Debug, Args)]
pub(crate) struct GcArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    pub(crate) output: OutputKind,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct DiffArgs {
    #[command(flatten)]
    pub(crate) image: ReadArgs,
    /// A snapshot or VDI.
    #[arg(value_name = "FROM")]
    pub(crate) from: String,
    /// Another snapshot or VDI.
    #[arg(value_name = "TO")]
    pub(crate) to: String,
}

#[derive(Debug, Args)]
pub(crate) struct IoArgs {
    #[command(flatten)]
    pub(crate) image_format: Qcow2Only,
    /// The VDI to read and write (a snapshot can be read).
    #[arg(long, value_name = "VDI", default_value = DEFAULT_VDI)]
    pub(crate) vdi: String,
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
    pub(crate) commands: Vec<IoCommand>,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t = OutputKind::Human)]
    pub(crate) format: OutputKind,
    /// The top of the chain (it becomes the default VDI).
    #[arg(value_name = "TOP")]
    pub(crate) top: PathBuf,
    /// The image to write (overwritten if it exists; never one of the chain's files).
    #[arg(value_name = "OUTPUT")]
    pub(crate) dest: PathBuf,
    /// Do not wait for the disk: no fdatasync; the kernel writes the output back when
    /// it chooses (as `qemu-img convert` does by default). OUTPUT still appears only
    /// once complete, but a power failure soon after may lose it or part of its data.
    #[arg(long = "no-sync")]
    pub(crate) no_sync: bool,
}

#[derive(Debug, Args)]
pub(crate) struct TreeArgs {
    /// Print the forest as a Graphviz digraph.
    #[arg(long, conflicts_with = "output")]
    pub(crate) dot: bool,
    /// Write an SVG picture to OUT (with Graphviz's `dot` when it is installed, else
    /// with a built-in renderer; the QCOWX_DOT variable names another `dot` program,
    /// or none when empty).
    #[arg(long, value_name = "OUT")]
    pub(crate) svg: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) image: ReadArgs,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("root").args(["snapshot", "vdi"])))]
pub(crate) struct MapArgs {
    /// Map from this guest offset on (as qemu-img's --start-offset; K, M, G suffixes).
    #[arg(long = "start-offset", value_name = "OFFSET", value_parser = size_arg, default_value = "0")]
    pub(crate) start_offset: u64,
    /// Map at most this many bytes (as qemu-img's --max-length).
    #[arg(long = "max-length", value_name = "LEN", value_parser = size_arg)]
    pub(crate) max_length: Option<u64>,
    /// Map this snapshot.
    #[arg(long, value_name = "NAME")]
    pub(crate) snapshot: Option<String>,
    /// Map this VDI (default: the default VDI).
    #[arg(long, value_name = "NAME")]
    pub(crate) vdi: Option<String>,
    #[command(flatten)]
    pub(crate) image: ReadArgs,
}

#[derive(Debug, Args)]
pub(crate) struct AmendArgs {
    #[command(flatten)]
    pub(crate) image_format: Qcow2Only,
    /// Options, comma-separated: `refcount_bits=N` (1, 2, 4, 8, 16, 32 or 64),
    /// `backing_file=NAME` and `backing_fmt=raw|qcow2` (as `rebase -u`),
    /// `lazy_refcounts=on|off`, `size=SIZE` (grow), `compat=1.1` (a version 2 image
    /// becomes version 3, as `qemu-img amend` upgrades it) or `compat=0.10` (version
    /// 3 becomes version 2, last: zero clusters become zeros and persistent bitmaps
    /// are removed, each named; needs 16-bit refcounts and no subclusters or
    /// zstd-compressed clusters; qcowx then opens the image read-only until
    /// `compat=1.1`).
    #[arg(short = 'o', value_name = "OPTIONS", required = true)]
    pub(crate) options: String,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct ResizeArgs {
    /// qemu-img's permission to shrink. qcowx resize never shrinks the default VDI
    /// (its snapshots keep their sizes; data past the end would be lost): with or
    /// without it, a smaller size is refused, saying how to make a smaller copy.
    #[arg(long)]
    pub(crate) shrink: bool,
    #[command(flatten)]
    pub(crate) image_format: Qcow2Only,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputKind::Human)]
    pub(crate) output: OutputKind,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// The new size (K, M, G, T, P, E suffixes), or +SIZE to grow by SIZE. Shrinking
    /// (-SIZE, or a smaller size) is refused.
    #[arg(value_name = "[+]SIZE", allow_hyphen_values = true)]
    pub(crate) size: String,
}

#[derive(Args, Debug)]
pub(crate) struct BitmapArgs {
    #[command(flatten)]
    pub(crate) image_format: Qcow2Only,
    /// Add the bitmap (empty; enabled unless --disable).
    #[arg(long)]
    pub(crate) add: bool,
    /// Remove the bitmap (an inconsistent one too).
    #[arg(long)]
    pub(crate) remove: bool,
    /// Clear every bit of the bitmap.
    #[arg(long)]
    pub(crate) clear: bool,
    /// Enable the bitmap: writes to the default VDI mark it.
    #[arg(long, conflicts_with = "disable")]
    pub(crate) enable: bool,
    /// Disable the bitmap: it keeps its bits and no longer tracks writes.
    #[arg(long)]
    pub(crate) disable: bool,
    /// Mark dirty in the bitmap everything dirty in bitmap SOURCE (repeatable).
    #[arg(long, value_name = "SOURCE")]
    pub(crate) merge: Vec<String>,
    /// The image the --merge bitmaps are in (default: FILE itself).
    #[arg(
        short = 'b',
        long = "source-file",
        value_name = "SRC_FILE",
        requires = "merge"
    )]
    pub(crate) source_file: Option<PathBuf>,
    /// The format of SRC_FILE: qcow2 only (bitmaps live in qcow2 images).
    #[arg(short = 'F', long = "source-format", value_name = "FMT", value_parser = ["qcow2"], requires = "source_file")]
    #[allow(dead_code)] // Accepted, never needed: clap refuses every other value.
    pub(crate) source_format: Option<String>,
    /// Bytes per bit of a new bitmap (512 to 2G, a power of two; K/M/G suffixes;
    /// default: the cluster size).
    #[arg(short = 'g', long, value_name = "SIZE", value_parser = size_arg)]
    pub(crate) granularity: Option<u64>,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// The bitmap's name.
    #[arg(value_name = "BITMAP")]
    pub(crate) bitmap: String,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("kind").required(true).args(["snapshot", "vdi"])))]
pub(crate) struct RenameArgs {
    /// The image file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// Rename a snapshot.
    #[arg(long)]
    pub(crate) snapshot: bool,
    /// Rename a VDI (not the default VDI).
    #[arg(long)]
    pub(crate) vdi: bool,
    /// Its current name.
    #[arg(value_name = "OLD")]
    pub(crate) old: String,
    /// Its new name (unique among snapshots and VDIs).
    #[arg(value_name = "NEW")]
    pub(crate) new: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub(crate) fn layer(self) -> ImageFormat {
        match self {
            DiskFormat::Raw => ImageFormat::Raw,
            DiskFormat::Qcow2 => ImageFormat::Qcow2,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct CommitArgs {
    #[command(flatten)]
    pub(crate) image_format: Qcow2Only,
    /// Keep the image's contents after the commit (by default it is emptied, so it
    /// reads through to its backing file).
    #[arg(short = 'd')]
    pub(crate) keep: bool,
    /// Show progress, as qemu-img's -p asks (qcowx shows a progress bar on a terminal
    /// whether or not it is given).
    #[arg(short = 'p')]
    pub(crate) progress: bool,
    /// The file to commit into: only the image's immediate backing file is accepted.
    #[arg(short = 'b', value_name = "BASE")]
    pub(crate) base: Option<PathBuf>,
    /// The image whose changes are written into its backing file.
    #[arg(value_name = "FILE")]
    pub(crate) file: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum, value_name = "SHELL")]
    pub(crate) shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub(crate) struct ManArgs {
    /// A command whose page to print (default: the page of qcowx itself).
    #[arg(value_name = "COMMAND")]
    pub(crate) command: Option<String>,
}

pub(crate) fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

pub(crate) fn io_cmd_arg(s: &str) -> Result<IoCommand, String> {
    IoCommand::parse(s).map_err(|e| e.to_string())
}
