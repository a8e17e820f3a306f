//! `qcowx`: create, inspect, check, map, resize, compare, convert and export QCOW2
//! images; import backing chains; take snapshots, fork, revert, rename and delete
//! VDIs, show their lineage tree, collect garbage, compare roots, send and receive
//! snapshots as streams, push and pull them to and from an S3 bucket, and write
//! through `io`.
//!
//! The binary is thin: this file defines the command line (its commands here, their
//! arguments in [`args`]) and dispatches to [`commands`], which call `qcowx-core`
//! and print. Output and exit codes follow `qemu-img` (`info`, `check`, `create`, `convert`, `map`,
//! `resize`, `compare`) and `qemu-io` (`io`) where the commands overlap: errors print
//! `qcowx: <error>` on stderr and exit 1, usage errors exit 2, `check` exits 0
//! (clean), 2 (corruptions) or 3 (leaks only), and `compare` exits 0 (identical), 1
//! (different) or 2 (error). The JSON outputs are specified in `spec/cli-json.md`.
//!
//! `qcowx completions SHELL` prints shell completions and `qcowx man [COMMAND]` a
//! roff man page, both generated at run time from the same clap definitions as the
//! parser (`qcowx man > qcowx.1`, `qcowx man import > qcowx-import.1`).

mod args;
mod commands;
mod iocmd;
mod map;
mod progress;
mod report;
mod tree;

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

pub(crate) use args::*;
use clap::{ArgGroup, Parser, Subcommand};
use commands::{docs, hints, image, io as io_cmd, roots, stream, Failure};

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
    ///
    /// An image a qcowx-nbd serves is locked: as with `qemu-img info`, -U reads it
    /// anyway, as it is on disk (the snapshot table is current; the dirty flag is set
    /// while it is served).
    Info(InfoArgs),
    /// Check an image's metadata and refcounts (like `qemu-img check`).
    ///
    /// An image a qcowx-nbd serves is checked by that server, on the image it has
    /// open (its own changes written out first, so only damage is reported). With -U
    /// the file is read as it is on disk instead: a served image then shows the stale
    /// refcounts of an image in use. --repair needs the image to itself.
    Check(CheckArgs),
    /// Write the content of a VDI or snapshot, backing chain included, to a new file
    /// (like `qemu-img convert`).
    ///
    /// An image a qcowx-nbd serves is locked: as with `qemu-img convert`, -U reads it
    /// anyway, as it is on disk. A served VDI changes as it is read and its latest
    /// writes may not be on disk yet; for a consistent copy take a snapshot (`qcowx
    /// snapshot` goes to the server) and export that: `qcowx export -U --snapshot NAME`.
    Export(ExportArgs),
    /// Take a snapshot of a VDI.
    Snapshot(SnapshotArgs),
    /// List VDIs and snapshots with their lineage and times.
    List(ReadArgs),
    /// Create a writable VDI from a snapshot.
    Fork(ForkArgs),
    /// Delete a snapshot or a VDI (its space comes back at `gc`).
    Delete(DeleteArgs),
    /// Make a VDI's content that of a snapshot (what it wrote since becomes garbage).
    Revert(RevertArgs),
    /// Give back the space of deleted snapshots and VDIs.
    Gc(GcArgs),
    /// List the guest ranges that differ between two snapshots or VDIs.
    ///
    /// An image a qcowx-nbd serves is asked of that server (its current view); -U
    /// reads the file as it is on disk instead.
    Diff(DiffArgs),
    /// Read and write a VDI with `qemu-io` commands (`-c 'write -P 0x5a 0 64k'`).
    Io(IoArgs),
    /// Turn a backing chain into one image: the base becomes the first snapshot, each
    /// layer above it a snapshot, the top the default VDI.
    #[command(long_about = IMPORT_ABOUT)]
    Import(ImportArgs),
    /// Show the lineage forest of VDIs and snapshots with their exclusive sizes.
    ///
    /// Each VDI heads its snapshots, and a VDI forked from a snapshot hangs under
    /// it. An image a qcowx-nbd serves is asked of that server (its current view); -U
    /// reads the file as it is on disk instead.
    Tree(TreeArgs),
    /// Show where each guest range comes from (like `qemu-img map`).
    Map(MapArgs),
    /// Grow the virtual disk of the default VDI (like `qemu-img resize`).
    #[command(allow_negative_numbers = true)]
    Resize(ResizeArgs),
    /// Rename a snapshot or a VDI.
    Rename(RenameArgs),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps (like
    /// `qemu-img bitmap`). The image must not be served.
    Bitmap(BitmapArgs),
    /// Change an image's options (like `qemu-img amend`): `-o refcount_bits=N` widens
    /// or narrows the refcounts; backing_file, backing_fmt, lazy_refcounts, size;
    /// `compat=1.1` upgrades a version 2 image, `compat=0.10` downgrades to one.
    Amend(AmendArgs),
    /// Change an image's backing file (like `qemu-img rebase`): with -u only the
    /// name; without, what its VDIs read is kept.
    Rebase(commands::amend::RebaseArgs),
    /// Write what an image stores itself into its backing file, qcow2 or raw (like
    /// `qemu-img commit`); then empty it, so it reads through to the backing file,
    /// unless -d.
    Commit(CommitArgs),
    /// Time COUNT reads or writes of an image (like `qemu-img bench`).
    Bench(BenchArgs),
    /// Compare the contents of two images, qcow2 or raw (like `qemu-img compare`).
    Compare(CompareArgs),
    /// Copy part of an image to a new raw or qcow2 file, with dd's operands (like
    /// `qemu-img dd`).
    Dd(DdArgs),
    /// Convert between raw and qcow2, optionally compressed (like `qemu-img convert`).
    Convert(ConvertArgs),
    /// Write a snapshot, or what changed since another (--from), as a stream.
    ///
    /// The stream (spec/stream.md) goes to stdout, or to -o FILE; `qcowx receive`
    /// reads it. A VDI is sent by taking a snapshot of it first. An image a qcowx-nbd
    /// serves is locked: take the snapshot through the server (`qcowx snapshot`) and
    /// send it with -U (a snapshot never changes once taken).
    Send(SendArgs),
    /// Receive a stream from `qcowx send` as a new snapshot of FILE.
    ///
    /// The stream comes from stdin, or from -i FILE. A full stream creates FILE when it
    /// is missing; an incremental one needs its base snapshot in FILE (the same
    /// snapshot, whatever its name now). The snapshot appears only once the whole
    /// stream arrived and verified; a damaged or mismatched stream changes nothing
    /// visible. A receive that stopped keeps what it verified in a hidden VDI and
    /// resumes when run again with the stream, or with `qcowx send --resume-from
    /// TOKEN` where `qcowx receive --token FILE` prints TOKEN; --abort drops it.
    #[command(group(ArgGroup::new("mode").args(["token", "abort"])))]
    Receive(ReceiveArgs),
    /// Store a snapshot's stream (or what changed since --from) in an S3 bucket.
    ///
    /// URL is s3://BUCKET/PREFIX (spec/remote.md). The stream object, its index and
    /// the prefix's manifest are written; an incremental stream needs its base there.
    #[cfg(feature = "s3")]
    Push(commands::remote::PushArgs),
    /// Fetch snapshots from an S3 bucket into FILE, or (--lazy) make FILE an image
    /// whose base is a snapshot there, read on demand.
    ///
    /// Without --lazy, each stream of SNAPSHOT's chain that FILE lacks is received as
    /// `qcowx receive` does. With --lazy, FILE is a new image that reads what it does
    /// not hold from the store (each record once, then from its cache); its writes
    /// stay local.
    #[cfg(feature = "s3")]
    Pull(commands::remote::PullArgs),
    /// How large a new image would be, for a size or for FILE's content (like
    /// `qemu-img measure`).
    ///
    /// The required size counts the metadata of a fully allocated image and the
    /// clusters FILE holds data in (ranges that read as zeros are not counted); the
    /// fully allocated size, every cluster. The defaults are `qcowx create`'s: 64 KiB
    /// clusters and 32-bit refcounts (`-o refcount_bits=16` measures for QEMU's).
    Measure(commands::measure::MeasureArgs),
    /// Print shell completions for SHELL.
    Completions(CompletionsArgs),
    /// Print the man page (roff) of qcowx or of one of its commands.
    Man(ManArgs),
}

impl Command {
    /// Whether the command could have read the image with -U (for a hint when it is
    /// locked).
    fn could_share(&self) -> bool {
        match self {
            Command::Info(InfoArgs { image: a, .. }) | Command::List(a) => !a.force_share,
            Command::Diff(DiffArgs { image: a, .. })
            | Command::Tree(TreeArgs { image: a, .. })
            | Command::Map(MapArgs { image: a, .. }) => !a.force_share,
            Command::Check(a) => !a.force_share && a.repair.is_none(),
            Command::Export(a) => !a.force_share,
            Command::Send(a) => !a.force_share,
            Command::Compare(a) => !a.force_share,
            Command::Convert(a) => !a.force_share,
            Command::Dd(a) => !a.force_share,
            Command::Measure(a) => a.file.is_some() && !a.force_share,
            _ => false,
        }
    }

    /// Whether the command opens the image for writing (for a hint when it cannot).
    fn writes(&self) -> bool {
        matches!(
            self,
            Command::Snapshot(_)
                | Command::Fork(_)
                | Command::Delete(_)
                | Command::Revert(_)
                | Command::Gc(_)
                | Command::Io(_)
                | Command::Resize(_)
                | Command::Rename(_)
                | Command::Amend(_)
                | Command::Rebase(_)
                | Command::Commit(_)
                | Command::Bench(BenchArgs { write: true, .. })
                | Command::Receive(_)
                | Command::Bitmap(_)
        )
    }

    /// The image file, when the command names snapshots or VDIs in it (for a hint when
    /// a name is unknown or taken).
    fn names_roots(&self) -> Option<&Path> {
        Some(match self {
            Command::Snapshot(a) => &a.file,
            Command::Fork(a) => &a.file,
            Command::Delete(a) => &a.file,
            Command::Revert(a) => &a.file,
            Command::Diff(a) => &a.image.file,
            Command::Export(a) => &a.file,
            Command::Io(a) => &a.file,
            Command::Map(a) => &a.image.file,
            Command::Rename(a) => &a.file,
            Command::Send(a) => &a.file,
            _ => return None,
        })
    }
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

fn main() -> ExitCode {
    let cli = Cli::parse_from(qemu_img_forms(std::env::args_os()));
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let quiet = cli.quiet;
    let could_share = cli.command.could_share();
    let writes = cli.command.writes();
    let names_roots = cli.command.names_roots().map(Path::to_path_buf);
    // `compare` reports errors with 2, as `qemu-img compare` does (1 means "differ").
    let error_code = if matches!(&cli.command, Command::Compare(_)) {
        2
    } else {
        1
    };
    let out: &mut dyn Write = &mut out;
    let result = match cli.command {
        Command::Create(a) => image::create(&a, quiet, out),
        Command::Info(a) => image::info(&a, quiet, out),
        Command::Check(a) => image::check(&a, quiet, out),
        Command::Export(a) => image::export(&a, quiet),
        Command::Snapshot(a) => roots::snapshot(&a, quiet, out),
        Command::List(a) => roots::list(&a, quiet, out),
        Command::Fork(a) => roots::fork(&a, quiet, out),
        Command::Delete(a) => roots::delete(&a),
        Command::Revert(a) => roots::revert(&a),
        Command::Gc(a) => roots::gc(&a, quiet, out),
        Command::Diff(a) => roots::diff(&a, quiet, out),
        Command::Io(a) => io_cmd::io(&a, quiet, out),
        Command::Import(a) => image::import(&a, quiet, out),
        Command::Tree(a) => roots::tree(&a, quiet, out),
        Command::Map(a) => roots::map(&a, quiet, out),
        Command::Resize(a) => image::resize(&a, quiet, out),
        Command::Rename(a) => roots::rename(&a),
        Command::Bitmap(a) => commands::bitmap::bitmap(&a),
        Command::Amend(a) => commands::amend::amend(&a),
        Command::Rebase(a) => commands::amend::rebase(&a),
        Command::Commit(a) => image::commit(&a, quiet, out),
        Command::Compare(a) => image::compare(&a, quiet, out),
        Command::Convert(a) => image::convert(&a, quiet),
        Command::Dd(a) => image::dd(&a),
        Command::Bench(a) => commands::io::bench(&a, out),
        Command::Send(a) => stream::send(&a, quiet, out),
        Command::Receive(a) => stream::receive(&a, quiet, out),
        #[cfg(feature = "s3")]
        Command::Push(a) => commands::remote::push(&a, quiet, out),
        #[cfg(feature = "s3")]
        Command::Pull(a) => commands::remote::pull(&a, quiet, out),
        Command::Measure(a) => commands::measure::measure(&a, quiet, out),
        Command::Completions(a) => docs::completions(&a, out),
        Command::Man(a) => docs::man(&a, out),
    }
    .and_then(|code| {
        out.flush()?;
        Ok(code)
    });
    match result {
        Ok(code) => ExitCode::from(code),
        // Whoever read our output stopped reading: not an error of ours.
        Err(Failure::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
