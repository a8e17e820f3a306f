//! `qcowx-nbd`: serve a qcowx image over NBD. Options follow qemu-nbd's where they
//! mean the same.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use qcowx_core::size::{parse_size, size_to_str};
use qcowx_core::{CreateOptions, Image, OpenOptions, RootKind};
use qcowx_nbd::config::{
    CacheMode, DetectZeroes, DiscardMode, Settings, DEFAULT_MAX_CLIENTS, DEFAULT_WORKERS,
    MAX_BLOCK_SIZE,
};
use qcowx_nbd::exports::{ExportPlan, ExportSpec, Exports};
use qcowx_nbd::overlay::TemporaryOverlay;
use qcowx_nbd::server::{install_signal_handlers, Bound, ListenAddr, Server, ServerConfig};
use qcowx_nbd::tls::{Tls, TlsFiles, TlsMode};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DiscardArg {
    /// Trim requests succeed and do nothing (default, as in qemu-nbd).
    #[value(alias = "off")]
    Ignore,
    /// Trim releases clusters.
    #[value(alias = "on")]
    Unmap,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DetectZeroesArg {
    Off,
    On,
    Unmap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TlsArg {
    /// No TLS: STARTTLS is refused.
    Off,
    /// Clients may use TLS or not.
    Allow,
    /// Clients must negotiate TLS before anything else.
    Require,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum YesNo {
    #[value(alias = "on")]
    Yes,
    #[value(alias = "off")]
    No,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AioArg {
    Threads,
    Native,
    #[value(name = "io_uring")]
    IoUring,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CacheArg {
    None,
    Writeback,
    Writethrough,
    Directsync,
    Unsafe,
}

/// Serve a qcowx (QCOW2) image over NBD: every VDI as a writable export named after
/// it ("default" for the default VDI, also the default export ""), every snapshot
/// as a read-only export "VDI@SNAPSHOT".
#[derive(Debug, Parser)]
#[command(name = "qcowx-nbd", version)]
struct Args {
    /// The image file.
    file: PathBuf,

    /// Export everything read-only (the image is opened read-only, shared lock).
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,

    /// Export the persistent dirty bitmap NAME as the metadata context
    /// `qemu:dirty-bitmap:NAME` of the default VDI's export (repeatable), as qemu-nbd
    /// does. The name means the persistent bitmap: a snapshot of the same name loses
    /// its snapshot-diff context. An enabled bitmap needs -r.
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmaps: Vec<String>,

    /// Name of the default VDI's export (or of the -l snapshot's export).
    #[arg(short = 'x', long = "export-name", value_name = "NAME")]
    export_name: Option<String>,

    /// Description of that export.
    #[arg(short = 'D', long = "description", value_name = "DESC")]
    description: Option<String>,

    /// Listen on a Unix socket at PATH.
    #[arg(short = 'k', long = "socket", value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Listen on TCP port PORT (default 10809; 0 picks a free port).
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    port: Option<u16>,

    /// Address to bind for TCP (default 127.0.0.1: pass 0.0.0.0 or :: to listen on
    /// every interface).
    #[arg(short = 'b', long = "bind", value_name = "ADDR")]
    bind: Option<String>,

    /// Serve at most N clients at once (0: no limit); others wait in the listen
    /// backlog. qemu-nbd's default is 1; qcowx-nbd's is 16, since one process serves
    /// every VDI and snapshot, and advertises multi-connection unless N is 1.
    #[arg(short = 'e', long = "shared", value_name = "N", default_value_t = DEFAULT_MAX_CLIENTS)]
    shared: usize,

    /// Keep running after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,

    /// Fork off the server once it listens; the parent exits.
    #[arg(long = "fork")]
    fork: bool,

    /// Write the server's process id to PATH (removed at exit).
    #[arg(long = "pid-file", value_name = "PATH")]
    pid_file: Option<PathBuf>,

    /// Serve only this snapshot, read-only (NAME, ID, snapshot.name=NAME or
    /// snapshot.id=ID).
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT")]
    load_snapshot: Option<String>,

    /// Serve a temporary overlay of the image: writes go to a new qcow2 file in
    /// $TMPDIR (else /var/tmp) backed by the image, which is left untouched; the file
    /// is removed at exit. Only the default VDI is served.
    #[arg(short = 's', long = "snapshot", conflicts_with_all = ["load_snapshot", "create", "export"])]
    snapshot: bool,

    /// qemu-nbd's switch for the `qemu:allocation-depth` context (accepted: qcowx-nbd
    /// always offers it).
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,

    /// The same as --cache=none.
    #[arg(short = 'n', long = "nocache", conflicts_with = "cache")]
    nocache: bool,

    /// qemu-nbd's AIO mode (threads, native, io_uring: accepted; qcowx-nbd serves
    /// with its own threads).
    #[arg(long = "aio", value_enum, value_name = "MODE")]
    aio: Option<AioArg>,

    /// What trim requests do.
    #[arg(long = "discard", value_enum, default_value = "ignore")]
    discard: DiscardArg,

    /// Turn all-zero writes into zero writes (unmap: may release clusters with
    /// --discard=unmap).
    #[arg(long = "detect-zeroes", value_enum, default_value = "off")]
    detect_zeroes: DetectZeroesArg,

    /// Cache mode: none and writeback complete writes in the page cache (durable at
    /// FLUSH/FUA); writethrough and directsync flush every write; unsafe ignores
    /// flushes. qcowx never uses O_DIRECT.
    #[arg(long = "cache", value_enum, default_value = "writeback")]
    cache: CacheArg,

    /// Image format: only qcow2 (accepted for qemu-nbd compatibility).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,

    /// Serve root ROOT (a VDI, a snapshot, or VDI@SNAPSHOT) as export NAME; repeat
    /// for more exports. Replaces the default export list; the first is the default
    /// export "".
    #[arg(long = "export", value_name = "NAME=ROOT")]
    export: Vec<String>,

    /// Create the image with this virtual size (K, M, G, T suffixes) if it does not
    /// exist.
    #[arg(long = "create", value_name = "SIZE")]
    create: Option<String>,

    /// Seconds a client may take to finish the handshake.
    #[arg(long = "handshake-timeout", value_name = "SECS", default_value_t = 10)]
    handshake_timeout: u64,

    /// Bytes of L2 tables cached in memory (K, M, G suffixes; as QEMU's
    /// `l2-cache-size`): with the record of refcount changes, what bounds the server's
    /// memory whatever the image's size. Default 8 MiB.
    #[arg(long = "l2-cache-size", value_name = "SIZE")]
    l2_cache_size: Option<String>,

    /// Seconds between refcount checkpoints of a written image: each makes its
    /// refcounts exact on disk and clears its dirty bit, so that after a crash the
    /// next open rebuilds (scans) only if something changed since the last one.
    #[arg(
        long = "checkpoint-interval",
        value_name = "SECS",
        default_value_t = 60
    )]
    checkpoint_interval: u64,

    /// Advertised minimum block size (power of two, at most the cluster size):
    /// requests not aligned to it fail with EINVAL.
    #[arg(long = "min-block-size", value_name = "BYTES", default_value_t = 1)]
    min_block_size: u32,

    /// Worker threads per connection.
    #[arg(long = "workers", value_name = "N", default_value_t = DEFAULT_WORKERS)]
    workers: usize,

    /// TLS credentials in QEMU's layout: DIR/server-cert.pem, DIR/server-key.pem and
    /// (to verify client certificates) DIR/ca-cert.pem. Turns TLS on (--tls=require
    /// unless --tls says otherwise).
    #[arg(long = "tls-creds", value_name = "DIR")]
    tls_creds: Option<PathBuf>,

    /// The server certificate (PEM; a chain, leaf first), instead of the one in
    /// --tls-creds.
    #[arg(long = "tls-cert", value_name = "FILE")]
    tls_cert: Option<PathBuf>,

    /// The server's private key (PEM).
    #[arg(long = "tls-key", value_name = "FILE")]
    tls_key: Option<PathBuf>,

    /// The CA certificate(s) that sign client certificates (PEM).
    #[arg(long = "tls-ca", value_name = "FILE")]
    tls_ca: Option<PathBuf>,

    /// TLS mode: require (the default with credentials: every option before
    /// STARTTLS gets NBD_REP_ERR_TLS_REQD), allow (clients choose), off.
    #[arg(long = "tls", value_enum, value_name = "MODE")]
    tls: Option<TlsArg>,

    /// With a CA: whether clients must present a certificate it signed (as QEMU's
    /// verify-peer).
    #[arg(long = "tls-verify-peer", value_enum, default_value = "yes")]
    tls_verify_peer: YesNo,

    /// Admit only client certificates with this subject common name (repeatable;
    /// needs a CA).
    #[arg(long = "tls-allow-cn", value_name = "CN")]
    tls_allow_cn: Vec<String>,

    /// Listen for control requests (`qcowx snapshot|fork|delete|revert|gc|list|diff|
    /// tree|check` on the served image) at PATH instead of the place derived from the image file
    /// ($QCOWX_RUNTIME_DIR, /run/qcowx, $XDG_RUNTIME_DIR/qcowx or /tmp/qcowx-UID, file
    /// img-DEV-INO.sock). Without this option a read-only server has no control socket.
    #[arg(long = "control", value_name = "PATH", conflicts_with = "no_control")]
    control: Option<PathBuf>,

    /// Do not listen for control requests.
    #[arg(long = "no-control")]
    no_control: bool,

    /// Log connections and failed requests to stderr.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
}

/// The image to serve: with -s a new temporary overlay of it (and the guard that
/// removes the overlay's file), else the image itself.
fn open_served(args: &Args) -> Result<(Image, Option<TemporaryOverlay>), String> {
    if !args.snapshot {
        return open_image(args).map(|img| (img, None));
    }
    check_format(args)?;
    let dir = TemporaryOverlay::default_dir();
    let (img, file) = TemporaryOverlay::create(&args.file, &dir).map_err(|e| {
        format!(
            "cannot make a temporary overlay of {} in {}: {e}",
            args.file.display(),
            dir.display()
        )
    })?;
    Ok((img, Some(file)))
}

fn check_format(args: &Args) -> Result<(), String> {
    match &args.format {
        Some(f) if f != "qcow2" => Err(format!(
            "format '{f}' is not supported: qcowx-nbd serves qcow2 images"
        )),
        _ => Ok(()),
    }
}

fn open_image(args: &Args) -> Result<Image, String> {
    let read_only = args.read_only || args.load_snapshot.is_some();
    check_format(args)?;
    let path = &args.file;
    if let Some(size) = &args.create {
        if !path.exists() {
            let size = match parse_size(size) {
                Ok(0) => return Err(format!("invalid size '{size}': an image needs a size")),
                Ok(n) => n,
                Err(e) => return Err(format!("invalid size '{size}': {e}")),
            };
            let img = Image::create(path, &CreateOptions::new(size))
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            eprintln!(
                "qcowx-nbd: created {} ({})",
                path.display(),
                size_to_str(img.size())
            );
            if !read_only {
                return Ok(img);
            }
            img.close()
                .map_err(|e| format!("cannot close {}: {e}", path.display()))?;
        }
    }
    let mut opts = OpenOptions::new().write(!read_only);
    if let Some(s) = &args.l2_cache_size {
        let bytes = parse_size(s).map_err(|e| format!("invalid --l2-cache-size '{s}': {e}"))?;
        opts = opts.cache_bytes(usize::try_from(bytes).unwrap_or(usize::MAX));
    }
    let img = opts
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    if let Some(what) = img.open_state().describe() {
        eprintln!("qcowx-nbd: {} {what}", path.display());
    }
    Ok(img)
}

/// The root `-l` names (see [`Image::resolve_snapshot`]); the error lists the image's
/// snapshots.
fn resolve_snapshot(image: &Image, spec: &str) -> Result<String, String> {
    image.resolve_snapshot(spec).map_err(|e| {
        let names: Vec<String> = image
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.kind == RootKind::Snapshot)
            .map(|r| r.name)
            .collect();
        let names = if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        };
        format!("{e} (snapshots: {names})")
    })
}

fn plan(args: &Args, image: &Image) -> Result<ExportPlan, String> {
    if let Some(snap) = &args.load_snapshot {
        if !args.export.is_empty() {
            return Err("-l cannot be combined with --export".into());
        }
        let root = resolve_snapshot(image, snap)?;
        return Ok(ExportPlan::Fixed(vec![ExportSpec {
            name: args.export_name.clone().unwrap_or_else(|| root.clone()),
            root,
            description: args.description.clone(),
            read_only: true,
        }]));
    }
    if !args.export.is_empty() {
        let mut specs = Vec::new();
        for (i, e) in args.export.iter().enumerate() {
            let mut s = ExportSpec::parse(e).map_err(|e| e.to_string())?;
            if i == 0 {
                s.description = args.description.clone();
            }
            s.read_only = args.read_only;
            specs.push(s);
        }
        return Ok(ExportPlan::Fixed(specs));
    }
    Ok(ExportPlan::Auto {
        main_name: args
            .export_name
            .clone()
            .unwrap_or_else(|| qcowx_core::vdi::DEFAULT_VDI.to_string()),
        main_description: args.description.clone(),
    })
}

fn print_banner(
    path: &Path,
    exports: &Exports,
    bound: &[Bound],
    control: Option<&Path>,
    tls: Option<&Tls>,
) -> Result<(), String> {
    let list = exports.list().map_err(|e| e.to_string())?;
    let mut out = String::new();
    out.push_str(&format!("qcowx-nbd: serving {}\n", path.display()));
    out.push_str("exports:\n");
    for (i, e) in list.iter().enumerate() {
        out.push_str(&format!(
            "  {:<24} {}, {}, {}{}\n",
            e.name,
            e.description,
            if e.read_only { "read-only" } else { "writable" },
            size_to_str(e.size),
            if i == 0 { " (default export)" } else { "" }
        ));
    }
    for b in bound {
        out.push_str(&format!("listening on {b}\n"));
    }
    if let Some(c) = control {
        out.push_str(&format!("control socket {}\n", c.display()));
    }
    if let Some(t) = tls {
        out.push_str(match t.mode {
            TlsMode::Require => "TLS required (STARTTLS)\n",
            TlsMode::Allow => "TLS allowed (STARTTLS)\n",
        });
    }
    if let (Some(b), Some(first), Some(_)) = (bound.first(), list.first(), tls) {
        // QEMU and libnbd take the client's files (ca-cert.pem, client-cert.pem,
        // client-key.pem) from a directory.
        let (server, nbds) = match b {
            Bound::Unix(p) => (
                format!("server.type=unix,server.path={}", p.display()),
                format!(
                    "nbds+unix:///?socket={}&tls-certificates=CLIENT_DIR",
                    p.display()
                ),
            ),
            Bound::Tcp(a) => (
                format!(
                    "server.type=inet,server.host={},server.port={}",
                    a.ip(),
                    a.port()
                ),
                format!("nbds://{a}/?tls-certificates=CLIENT_DIR"),
            ),
        };
        out.push_str(
            "connect QEMU with (CLIENT_DIR: ca-cert.pem, client-cert.pem, client-key.pem):\n",
        );
        out.push_str(&format!(
            "  qemu-system-x86_64 -object tls-creds-x509,id=tls0,dir=CLIENT_DIR,endpoint=client \\\n      -drive driver=nbd,{server},export={},tls-creds=tls0\n",
            first.name
        ));
        out.push_str(&format!("  nbdinfo --list '{nbds}'\n"));
    } else if let (Some(b), Some(first)) = (bound.first(), list.first()) {
        let uri = b.uri(&first.name);
        out.push_str("connect QEMU with:\n");
        out.push_str(&format!(
            "  qemu-system-x86_64 -drive file={uri},format=raw\n"
        ));
        out.push_str(&format!("  qemu-io -f raw {uri}\n"));
        out.push_str(&format!("  nbdinfo --list '{}'\n", b.uri("")));
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|_| stdout.flush())
        .map_err(|e| format!("stdout: {e}"))
}

/// Forks; the parent writes the pid file (if any) and exits, the child detaches.
fn daemonize(pid_file: Option<&Path>) -> Result<(), String> {
    // SAFETY: called while this process has one thread; the child continues with a
    // copy of it.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        if let Some(p) = pid_file {
            if let Err(e) = std::fs::write(p, format!("{pid}\n")) {
                eprintln!("qcowx-nbd: cannot write {}: {e}", p.display());
            }
        }
        // The child owns the image now: leave without running destructors (which
        // would close it).
        std::process::exit(0);
    }
    // SAFETY: setsid and dup2 on descriptors this process owns.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
    }
    Ok(())
}

/// The TLS settings the options ask for.
fn tls_settings(args: &Args) -> Result<Option<Tls>, String> {
    let have_files = args.tls_creds.is_some()
        || args.tls_cert.is_some()
        || args.tls_key.is_some()
        || args.tls_ca.is_some();
    let mode = match args.tls {
        Some(TlsArg::Off) => {
            if have_files || !args.tls_allow_cn.is_empty() {
                return Err("--tls=off cannot be combined with TLS credentials".into());
            }
            return Ok(None);
        }
        Some(TlsArg::Allow) => TlsMode::Allow,
        Some(TlsArg::Require) => TlsMode::Require,
        None if have_files => TlsMode::Require,
        None => {
            if !args.tls_allow_cn.is_empty() {
                return Err("--tls-allow-cn needs TLS credentials (--tls-creds)".into());
            }
            return Ok(None);
        }
    };
    let mut files = match &args.tls_creds {
        Some(dir) => {
            if !dir.is_dir() {
                return Err(format!("--tls-creds {}: not a directory", dir.display()));
            }
            TlsFiles::in_dir(dir)
        }
        None => {
            let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
                return Err(
                    "TLS needs a certificate and a key: --tls-creds DIR, or --tls-cert and --tls-key"
                        .into(),
                );
            };
            TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: None,
                verify_peer: true,
                allowed_cns: Vec::new(),
            }
        }
    };
    if let Some(c) = &args.tls_cert {
        files.cert = c.clone();
    }
    if let Some(k) = &args.tls_key {
        files.key = k.clone();
    }
    if let Some(ca) = &args.tls_ca {
        files.ca = Some(ca.clone());
    }
    files.verify_peer = args.tls_verify_peer == YesNo::Yes;
    files.allowed_cns = args.tls_allow_cn.clone();
    let config = files.server_config().map_err(|e| e.to_string())?;
    Ok(Some(Tls { mode, config }))
}

fn run(args: Args) -> Result<(), String> {
    let min = args.min_block_size;
    let tls = tls_settings(&args)?;
    let settings = Settings {
        min_block_size: min,
        max_block_size: MAX_BLOCK_SIZE,
        multi_conn: args.shared != 1,
        discard: match args.discard {
            DiscardArg::Ignore => DiscardMode::Ignore,
            DiscardArg::Unmap => DiscardMode::Unmap,
        },
        detect_zeroes: match args.detect_zeroes {
            DetectZeroesArg::Off => DetectZeroes::Off,
            DetectZeroesArg::On => DetectZeroes::On,
            DetectZeroesArg::Unmap => DetectZeroes::Unmap,
        },
        cache: match if args.nocache {
            CacheArg::None
        } else {
            args.cache
        } {
            CacheArg::None => CacheMode::None,
            CacheArg::Writeback => CacheMode::Writeback,
            CacheArg::Writethrough => CacheMode::Writethrough,
            CacheArg::Directsync => CacheMode::Directsync,
            CacheArg::Unsafe => CacheMode::Unsafe,
        },
        workers: args.workers,
        handshake_timeout: Duration::from_secs(args.handshake_timeout.max(1)),
        checkpoint_interval: Duration::from_secs(args.checkpoint_interval.max(1)),
        verbose: args.verbose,
        tls,
        ..Settings::default()
    };
    settings.validate().map_err(|e| e.to_string())?;

    // Declared before the server, so the overlay's file outlives the image in it.
    let (image, overlay) = open_served(&args)?;
    if let Some(o) = &overlay {
        eprintln!(
            "qcowx-nbd: writes go to the temporary overlay {}",
            o.path().display()
        );
    }
    if u64::from(min) > image.cluster_size() {
        return Err(format!(
            "--min-block-size {min} is larger than the cluster size {}",
            image.cluster_size()
        ));
    }
    let plan = plan(&args, &image)?;
    let image = Arc::new(image);
    let exports = Exports::new(Arc::clone(&image), plan, args.read_only)
        .and_then(|e| e.with_bitmaps(args.bitmaps.clone()))
        .map_err(|e| e.to_string())?;

    let mut listen = Vec::new();
    if let Some(p) = &args.socket {
        listen.push(ListenAddr::Unix(p.clone()));
    }
    if args.socket.is_none() || args.port.is_some() || args.bind.is_some() {
        listen.push(ListenAddr::Tcp {
            host: args.bind.clone().unwrap_or_else(|| "127.0.0.1".into()),
            port: args.port.unwrap_or(10809),
        });
    }
    let control = if args.no_control {
        None
    } else if let Some(p) = &args.control {
        Some(p.clone())
    } else if image.is_writable() && !args.read_only && !args.snapshot {
        match qcowx_core::control::default_socket_path(&args.file) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("qcowx-nbd: no control socket: {e}");
                None
            }
        }
    } else {
        None
    };
    let activated = std::env::var_os("LISTEN_FDS").is_some();
    let explicit = args.socket.is_some() || args.port.is_some() || args.bind.is_some();
    let config = ServerConfig {
        listen: if activated && !explicit {
            Vec::new()
        } else {
            listen
        },
        socket_activation: true,
        max_clients: args.shared,
        persistent: args.persistent,
        settings,
        control,
    };
    let tls_banner = config.settings.tls.clone();
    let server = Server::bind(Arc::new(exports), config).map_err(|e| e.to_string())?;
    // Before the banner: a script may send SIGTERM as soon as it has read it. (The
    // handlers survive --fork's fork.)
    install_signal_handlers(&server.shutdown_handle()).map_err(|e| e.to_string())?;
    // The banner tells scripts the server is ready: the pid file exists by then (with
    // --fork, once the parent has exited).
    if !args.fork {
        if let Some(p) = &args.pid_file {
            std::fs::write(p, format!("{}\n", std::process::id()))
                .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        }
    }
    print_banner(
        &args.file,
        server.exports(),
        &server.bound(),
        server.control_path(),
        tls_banner.as_ref(),
    )?;
    if args.fork {
        daemonize(args.pid_file.as_deref())?;
    }
    let r = server.run().map_err(|e| e.to_string());
    if let Some(p) = &args.pid_file {
        let _ = std::fs::remove_file(p);
    }
    r
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qcowx-nbd: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_qemu_nbd_style_options() {
        let a = Args::try_parse_from([
            "qcowx-nbd",
            "-r",
            "-x",
            "disk",
            "-k",
            "/tmp/s",
            "-e",
            "2",
            "-t",
            "--discard=unmap",
            "--export",
            "a=default",
            "--export",
            "b=web",
            "img.qcow2",
        ])
        .expect("parse");
        assert!(a.read_only && a.persistent);
        assert_eq!(a.export, vec!["a=default", "b=web"]);
        assert_eq!(a.shared, 2);
        assert!(matches!(a.discard, DiscardArg::Unmap));
        assert!(Args::try_parse_from(["qcowx-nbd", "--discard=on", "x"]).is_ok());
        assert!(Args::try_parse_from(["qcowx-nbd", "--discard=maybe", "x"]).is_err());
    }
}
