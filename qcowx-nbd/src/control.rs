//! The control socket: live snapshot, fork, delete, revert, gc, list and diff on the
//! image a running server owns (DESIGN.md §6).
//!
//! A `qcowx-nbd` serving an image writable holds its exclusive lock, so no other
//! process can open it to take a snapshot. Instead the server listens on a Unix
//! control socket and runs those operations itself, on the image it has open: the
//! [`Image`] methods are `&self` and thread-safe, and a live snapshot waits only for
//! the writes already in flight — clients keep reading and writing throughout. New
//! VDIs and snapshots are exports at once (exports are looked up per connection).
//!
//! # Where the socket is
//!
//! The path follows from the image file alone, so that a tool that finds the image
//! locked can find its server: the socket is named after the image file's device and
//! inode numbers (`img-DEV-INO.sock`, lower-case hexadecimal, from `stat(2)`; the same
//! for every path that names the file: symbolic links, hard links, bind mounts) and
//! lies in the first usable directory of:
//!
//! 1. `$QCOWX_RUNTIME_DIR`, when set and not empty;
//! 2. `/run/qcowx`, for a server running as root;
//! 3. `$XDG_RUNTIME_DIR/qcowx`, when `XDG_RUNTIME_DIR` is set;
//! 4. `/tmp/qcowx-UID` (created with mode 0700, and refused if another user owns it
//!    or others may write it).
//!
//! A client ([`request`]) tries every one of them, in that order. The socket file has
//! mode 0600: only the server's user (and root) may use it. `qcowx-nbd --control PATH`
//! puts the socket somewhere else ([`request_at`] reaches it there) and
//! `--no-control` turns it off; a read-only server (`-r`, `-l`) has no control socket
//! unless `--control` asks for one.
//!
//! # The protocol
//!
//! Line-delimited JSON over the stream socket: the client sends one request object
//! per line (at most [`MAX_LINE`] bytes) and reads one response line per request; it
//! may send several requests on one connection, one after the other. Requests:
//!
//! | request | what it runs |
//! |---|---|
//! | `{"op": "snapshot", "vdi": VDI, "name": NAME}` | [`Image::snapshot`] (`vdi` may be left out: `"default"`) |
//! | `{"op": "fork", "snapshot": SNAPSHOT, "name": NEW_VDI}` | [`Image::fork`] |
//! | `{"op": "delete", "snapshot": NAME}` or `{"op": "delete", "vdi": NAME}` | [`Image::delete_snapshot`], [`Image::delete_vdi`] |
//! | `{"op": "revert", "vdi": VDI, "snapshot": SNAPSHOT}` | [`Image::revert`] |
//! | `{"op": "gc"}` | [`Image::gc`] |
//! | `{"op": "list"}` | [`Image::list`] |
//! | `{"op": "diff", "from": ROOT, "to": ROOT}` | [`Image::diff`] |
//!
//! Every request may carry `"image": PATH`: the server then refuses it (kind
//! `wrong-image`) unless PATH names the file it serves — [`request`] always sends it.
//!
//! A success is `{"ok": true, ...}` with, by operation: `snapshot` and `fork`:
//! `"root"` (the new root) and `"export"` (the NBD export name it is served under, or
//! `null`); `list`: `"roots"`; `gc`: `"gc"`; `diff`: `"ranges"` and `"bytes"`;
//! `delete` and `revert`: nothing more. Roots, gc reports and ranges have the keys of
//! `qcowx list|gc|diff --output=json` (`spec/cli-json.md`): a root is `{"name",
//! "kind": "vdi"|"snapshot", "uid": HEX, "vdi", "parent", "date-sec", "date-nsec",
//! "virtual-size", "id"}`; a gc report `{"roots-removed", "clusters-freed",
//! "bytes-freed", "file-size-before", "file-size-after"}`; a range `{"offset",
//! "length"}`.
//!
//! A failure is `{"ok": false, "error": MESSAGE, "kind": KIND}`: MESSAGE is the
//! library's own message (what `qcowx` would print had it opened the image itself);
//! KIND is the library's error kind (`qcowx_core::ErrorKind::as_str`: `not-found`,
//! `invalid-argument`, `read-only`, `out-of-range`, `no-space`, `io`, `corrupt`,
//! `locked`, `unsupported`, `closed`, `image`) or one of the protocol's own:
//! `invalid-request` (the line is not a valid request), `wrong-image`,
//! `shutting-down`, `busy`. A bad request
//! changes nothing and the connection stays usable (except after a line longer than
//! [`MAX_LINE`], which closes it).
//!
//! # From the command line tool
//!
//! ```no_run
//! use std::path::Path;
//! use qcowx_nbd::control::{self, ControlError, Request, Response};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let image = Path::new("disk.qcow2");
//! // After `Image::open_rw(image)` failed with `qcowx_core::Error::Locked`:
//! let req = Request::Snapshot { vdi: "default".into(), name: "before-upgrade".into() };
//! match control::request(image, &req) {
//!     Ok(Response::Root { root, export }) => println!("{} (export {export:?})", root.name),
//!     Ok(other) => println!("{other:?}"),
//!     // Nobody serves it: report the lock error the open gave.
//!     Err(ControlError::NoServer { .. }) => {}
//!     // The server's answer: the library's message, as the CLI prints its errors.
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use qcowx_core::{GcReport, Image, Range, RootInfo, RootKind};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::exports::Exports;

/// The environment variable naming the directory for control sockets (first choice
/// of servers and clients alike).
pub const ENV_RUNTIME_DIR: &str = "QCOWX_RUNTIME_DIR";

/// The longest request or response line.
pub const MAX_LINE: usize = 64 << 10;

/// The most control connections served at once; more are answered `busy`.
pub const MAX_CONNECTIONS: usize = 16;

/// How long a control connection may sit idle between requests, by default
/// (`Settings::control_idle_timeout`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Take snapshot `name` of VDI `vdi`.
    Snapshot {
        /// The VDI (`"default"` for the default VDI).
        vdi: String,
        /// The new snapshot's name.
        name: String,
    },
    /// Create VDI `name` from snapshot `snapshot`.
    Fork {
        /// The snapshot.
        snapshot: String,
        /// The new VDI's name.
        name: String,
    },
    /// Delete a snapshot.
    DeleteSnapshot {
        /// Its name.
        name: String,
    },
    /// Delete a VDI (not the default one).
    DeleteVdi {
        /// Its name.
        name: String,
    },
    /// Make VDI `vdi`'s content that of snapshot `snapshot`.
    Revert {
        /// The VDI.
        vdi: String,
        /// The snapshot.
        snapshot: String,
    },
    /// Reclaim the space of deleted roots and write exact refcounts.
    Gc,
    /// List the live roots.
    List,
    /// The guest ranges where two roots may differ.
    Diff {
        /// One root.
        from: String,
        /// The other.
        to: String,
    },
}

/// The answer to a successful request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Done (`delete`, `revert`).
    Done,
    /// The root a `snapshot` or `fork` created.
    Root {
        /// The new root.
        root: RootInfo,
        /// The NBD export serving it, if any (with `--export` lists, new roots are
        /// not exported).
        export: Option<String>,
    },
    /// The live roots (`list`).
    Roots(Vec<RootInfo>),
    /// What `gc` did.
    Gc(GcReport),
    /// The ranges that differ (`diff`).
    Ranges(Vec<Range>),
}

/// Why a control request did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No server answers on any control socket of this image (none runs, or it was
    /// started with `--no-control` or `--control PATH`).
    #[error("{}: no qcowx-nbd control socket answers (tried {})", image.display(), list_paths(tried))]
    NoServer {
        /// The image.
        image: PathBuf,
        /// The socket paths tried.
        tried: Vec<PathBuf>,
    },
    /// The server refused or failed the request; `message` is the library's message.
    #[error("{message}")]
    Refused {
        /// The error message (the library's, for image errors).
        message: String,
        /// The error kind (see the module documentation).
        kind: String,
    },
    /// Talking to the socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server's answer is not valid.
    #[error("control socket: {0}")]
    Protocol(String),
}

fn list_paths(p: &[PathBuf]) -> String {
    if p.is_empty() {
        return "none".into();
    }
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- JSON ---------------------------------------------------------------------------------

fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> std::result::Result<&'a str, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("\"{key}\" must be a string")),
        None => Err(format!("\"{key}\" is missing")),
    }
}

fn check_keys(
    obj: &Map<String, Value>,
    op: &str,
    allowed: &[&str],
) -> std::result::Result<(), String> {
    for k in obj.keys() {
        if k != "op" && k != "image" && !allowed.contains(&k.as_str()) {
            return Err(format!("\"{op}\" takes no \"{k}\""));
        }
    }
    Ok(())
}

impl Request {
    /// The operation's name on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Snapshot { .. } => "snapshot",
            Request::Fork { .. } => "fork",
            Request::DeleteSnapshot { .. } | Request::DeleteVdi { .. } => "delete",
            Request::Revert { .. } => "revert",
            Request::Gc => "gc",
            Request::List => "list",
            Request::Diff { .. } => "diff",
        }
    }

    /// Whether the request changes the image.
    pub fn modifies(&self) -> bool {
        !matches!(self, Request::List | Request::Diff { .. })
    }

    /// The request as a JSON object, with `"image": PATH` when given.
    pub fn to_json(&self, image: Option<&Path>) -> Value {
        let mut v = match self {
            Request::Snapshot { vdi, name } => json!({"vdi": vdi, "name": name}),
            Request::Fork { snapshot, name } => json!({"snapshot": snapshot, "name": name}),
            Request::DeleteSnapshot { name } => json!({"snapshot": name}),
            Request::DeleteVdi { name } => json!({"vdi": name}),
            Request::Revert { vdi, snapshot } => json!({"vdi": vdi, "snapshot": snapshot}),
            Request::Gc | Request::List => json!({}),
            Request::Diff { from, to } => json!({"from": from, "to": to}),
        };
        if let Value::Object(m) = &mut v {
            m.insert("op".into(), self.op().into());
            if let Some(p) = image {
                m.insert("image".into(), p.to_string_lossy().into_owned().into());
            }
        }
        v
    }

    /// Parses a request object; returns it and its `"image"`, if any. The error says
    /// what is wrong, for the `invalid-request` answer.
    pub fn from_json(v: &Value) -> std::result::Result<(Request, Option<PathBuf>), String> {
        let obj = v.as_object().ok_or("a request must be a JSON object")?;
        let op = field(obj, "op")?;
        let image = match obj.get("image") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(PathBuf::from(s)),
            Some(_) => return Err("\"image\" must be a string".into()),
        };
        let req = match op {
            "snapshot" => {
                check_keys(obj, op, &["vdi", "name"])?;
                let vdi = match obj.get("vdi") {
                    None => qcowx_core::vdi::DEFAULT_VDI.to_string(),
                    Some(_) => field(obj, "vdi")?.to_string(),
                };
                Request::Snapshot {
                    vdi,
                    name: field(obj, "name")?.to_string(),
                }
            }
            "fork" => {
                check_keys(obj, op, &["snapshot", "name"])?;
                Request::Fork {
                    snapshot: field(obj, "snapshot")?.to_string(),
                    name: field(obj, "name")?.to_string(),
                }
            }
            "delete" => {
                check_keys(obj, op, &["snapshot", "vdi"])?;
                match (obj.contains_key("snapshot"), obj.contains_key("vdi")) {
                    (true, false) => Request::DeleteSnapshot {
                        name: field(obj, "snapshot")?.to_string(),
                    },
                    (false, true) => Request::DeleteVdi {
                        name: field(obj, "vdi")?.to_string(),
                    },
                    _ => {
                        return Err(
                            "\"delete\" takes exactly one of \"snapshot\" and \"vdi\"".into()
                        )
                    }
                }
            }
            "revert" => {
                check_keys(obj, op, &["vdi", "snapshot"])?;
                Request::Revert {
                    vdi: field(obj, "vdi")?.to_string(),
                    snapshot: field(obj, "snapshot")?.to_string(),
                }
            }
            "gc" => {
                check_keys(obj, op, &[])?;
                Request::Gc
            }
            "list" => {
                check_keys(obj, op, &[])?;
                Request::List
            }
            "diff" => {
                check_keys(obj, op, &["from", "to"])?;
                Request::Diff {
                    from: field(obj, "from")?.to_string(),
                    to: field(obj, "to")?.to_string(),
                }
            }
            other => {
                return Err(format!(
                    "unknown op \"{other}\" (snapshot, fork, delete, revert, gc, list, diff)"
                ))
            }
        };
        Ok((req, image))
    }
}

/// A root as JSON (the keys of `qcowx list --output=json`).
pub fn root_json(r: &RootInfo) -> Value {
    json!({
        "name": r.name,
        "kind": match r.kind { RootKind::Vdi => "vdi", RootKind::Snapshot => "snapshot" },
        "uid": format!("{:x}", r.uid),
        "vdi": r.vdi,
        "parent": r.parent,
        "date-sec": r.created_ns / 1_000_000_000,
        "date-nsec": r.created_ns % 1_000_000_000,
        "virtual-size": r.size,
        "id": r.id,
    })
}

fn u64_field(v: &Value, key: &str) -> std::result::Result<u64, String> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("\"{key}\" missing or not an unsigned integer"))
}

fn str_field(v: &Value, key: &str) -> std::result::Result<String, String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| format!("\"{key}\" missing or not a string"))
}

fn opt_str_field(v: &Value, key: &str) -> std::result::Result<Option<String>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("\"{key}\" is not a string")),
    }
}

/// Parses [`root_json`]'s output.
pub fn root_from_json(v: &Value) -> std::result::Result<RootInfo, String> {
    let kind = match str_field(v, "kind")?.as_str() {
        "vdi" => RootKind::Vdi,
        "snapshot" => RootKind::Snapshot,
        k => return Err(format!("unknown root kind \"{k}\"")),
    };
    let uid = u64::from_str_radix(&str_field(v, "uid")?, 16)
        .map_err(|_| "\"uid\" is not hexadecimal".to_string())?;
    let sec = u64_field(v, "date-sec")?;
    let nsec = u64_field(v, "date-nsec")?;
    Ok(RootInfo {
        kind,
        name: str_field(v, "name")?,
        uid,
        vdi: str_field(v, "vdi")?,
        parent: opt_str_field(v, "parent")?,
        created_ns: sec.saturating_mul(1_000_000_000).saturating_add(nsec),
        size: u64_field(v, "virtual-size")?,
        id: opt_str_field(v, "id")?,
    })
}

fn gc_json(r: &GcReport) -> Value {
    json!({
        "roots-removed": r.roots_removed,
        "clusters-freed": r.clusters_freed,
        "bytes-freed": r.bytes_freed,
        "file-size-before": r.file_size_before,
        "file-size-after": r.file_size_after,
        "refcounts-exact": r.refcounts_exact,
    })
}

impl Response {
    /// The success line's object.
    pub fn to_json(&self) -> Value {
        let mut v = match self {
            Response::Done => json!({}),
            Response::Root { root, export } => json!({"root": root_json(root), "export": export}),
            Response::Roots(r) => json!({"roots": r.iter().map(root_json).collect::<Vec<_>>()}),
            Response::Gc(r) => json!({ "gc": gc_json(r) }),
            Response::Ranges(r) => json!({
                "ranges": r.iter().map(|x| json!({"offset": x.offset, "length": x.length})).collect::<Vec<_>>(),
                "bytes": r.iter().map(|x| x.length).sum::<u64>(),
            }),
        };
        if let Value::Object(m) = &mut v {
            m.insert("ok".into(), true.into());
        }
        v
    }

    /// Parses the answer to `req` (an `"ok": true` object).
    pub fn from_json(req: &Request, v: &Value) -> std::result::Result<Response, String> {
        Ok(match req {
            Request::Snapshot { .. } | Request::Fork { .. } => Response::Root {
                root: root_from_json(v.get("root").ok_or("\"root\" is missing")?)?,
                export: opt_str_field(v, "export")?,
            },
            Request::DeleteSnapshot { .. } | Request::DeleteVdi { .. } | Request::Revert { .. } => {
                Response::Done
            }
            Request::List => Response::Roots(
                v.get("roots")
                    .and_then(Value::as_array)
                    .ok_or("\"roots\" is missing")?
                    .iter()
                    .map(root_from_json)
                    .collect::<std::result::Result<_, _>>()?,
            ),
            Request::Gc => {
                let g = v.get("gc").ok_or("\"gc\" is missing")?;
                Response::Gc(GcReport {
                    roots_removed: u64_field(g, "roots-removed")?,
                    clusters_freed: u64_field(g, "clusters-freed")?,
                    bytes_freed: u64_field(g, "bytes-freed")?,
                    file_size_before: u64_field(g, "file-size-before")?,
                    file_size_after: u64_field(g, "file-size-after")?,
                    refcounts_exact: g
                        .get("refcounts-exact")
                        .and_then(Value::as_bool)
                        .ok_or("\"refcounts-exact\" is missing or not a boolean")?,
                })
            }
            Request::Diff { .. } => Response::Ranges(
                v.get("ranges")
                    .and_then(Value::as_array)
                    .ok_or("\"ranges\" is missing")?
                    .iter()
                    .map(|r| {
                        Ok(Range {
                            offset: u64_field(r, "offset")?,
                            length: u64_field(r, "length")?,
                        })
                    })
                    .collect::<std::result::Result<_, String>>()?,
            ),
        })
    }
}

fn error_json(message: &str, kind: &str) -> Value {
    json!({"ok": false, "error": message, "kind": kind})
}

// ---- where the socket is ----------------------------------------------------------------

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The socket's file name for an image: from the file's device and inode numbers.
pub fn socket_name(image: &Path) -> io::Result<String> {
    let m = std::fs::metadata(image)?;
    Ok(format!("img-{:x}-{:x}.sock", m.dev(), m.ino()))
}

/// The directories control sockets may be in, in the order clients try them (see the
/// module documentation).
pub fn runtime_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os(ENV_RUNTIME_DIR).filter(|d| !d.is_empty()) {
        v.push(PathBuf::from(d));
    }
    v.push(PathBuf::from("/run/qcowx"));
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        v.push(Path::new(&d).join("qcowx"));
    }
    v.push(PathBuf::from(format!("/tmp/qcowx-{}", euid())));
    v
}

/// Every path where a control socket for `image` may be, in the order [`request`]
/// tries them. Fails only if the image cannot be `stat`ed.
pub fn socket_candidates(image: &Path) -> io::Result<Vec<PathBuf>> {
    let name = socket_name(image)?;
    Ok(runtime_dirs().into_iter().map(|d| d.join(&name)).collect())
}

/// The control socket of the server serving `image`: the first candidate where a
/// socket file exists, else the path a server started now would use (without
/// creating anything).
pub fn socket_path_for(image: &Path) -> io::Result<PathBuf> {
    let c = socket_candidates(image)?;
    if let Some(p) = c.iter().find(|p| is_socket(p)) {
        return Ok(p.clone());
    }
    let name = socket_name(image)?;
    Ok(server_dir_choice(false)
        .map(|d| d.join(&name))
        .unwrap_or_else(|_| c[c.len() - 1].clone()))
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Makes sure `dir` exists and is safe for a socket: created with `mode`; when
/// `private`, it must be a real directory owned by this user that nobody else may
/// write.
fn prepare_dir(dir: &Path, mode: u32, private: bool) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if private && (m.uid() != euid() || m.mode() & 0o022 != 0) {
        return Err(io::Error::other(format!(
            "{} is owned by another user or writable by others",
            dir.display()
        )));
    }
    Ok(())
}

/// The directory a server uses: the first of [`runtime_dirs`] it can use (creating
/// it when `create`).
fn server_dir_choice(create: bool) -> io::Result<PathBuf> {
    let mut errors = Vec::new();
    let env = std::env::var_os(ENV_RUNTIME_DIR).filter(|d| !d.is_empty());
    for d in runtime_dirs() {
        let (mode, private) = if env.as_deref() == Some(d.as_os_str()) {
            (0o700, false)
        } else if d == Path::new("/run/qcowx") {
            if euid() != 0 {
                continue;
            }
            (0o755, false)
        } else {
            (0o700, true)
        };
        if !create {
            return Ok(d);
        }
        match prepare_dir(&d, mode, private) {
            Ok(()) => return Ok(d),
            Err(e) => errors.push(format!("{}: {e}", d.display())),
        }
    }
    Err(io::Error::other(format!(
        "no usable directory for the control socket ({})",
        errors.join("; ")
    )))
}

/// The default control socket path of a server for `image`, creating its directory
/// (see the module documentation).
pub fn default_socket_path(image: &Path) -> Result<PathBuf> {
    let name = socket_name(image).map_err(|e| Error::io(format!("stat {}", image.display()), e))?;
    let dir = server_dir_choice(true).map_err(|e| Error::io("control socket", e))?;
    Ok(dir.join(name))
}

// ---- client --------------------------------------------------------------------------------

/// Sends `req` to the server of `image`, found as the module documentation says, and
/// returns its answer. [`ControlError::NoServer`] when no server answers (the caller
/// then reports its own lock error); [`ControlError::Refused`] carries the library's
/// message when the operation failed.
///
/// This is what `qcowx snapshot|fork|delete|revert|gc|list|diff` call when opening the
/// image fails with [`qcowx_core::Error::Locked`].
pub fn request(image: &Path, req: &Request) -> std::result::Result<Response, ControlError> {
    let candidates = socket_candidates(image).map_err(|e| ControlError::Io {
        context: format!("stat {}", image.display()),
        source: e,
    })?;
    let canonical = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let mut tried = Vec::new();
    let mut denied = None;
    for sock in candidates {
        if !is_socket(&sock) {
            continue;
        }
        match UnixStream::connect(&sock) {
            Ok(s) => return exchange(s, &sock, Some(&canonical), req),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                denied = Some(ControlError::Io {
                    context: format!("connect to {}", sock.display()),
                    source: e,
                });
            }
            // A socket left behind by a server that died: try the next place.
            Err(_) => {}
        }
        tried.push(sock);
    }
    Err(denied.unwrap_or(ControlError::NoServer {
        image: image.to_path_buf(),
        tried,
    }))
}

/// Sends `req` to the control socket at `socket` (a server started with `--control
/// PATH`). With `image`, the server checks that it serves that file.
pub fn request_at(
    socket: &Path,
    image: Option<&Path>,
    req: &Request,
) -> std::result::Result<Response, ControlError> {
    let s = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ControlError::NoServer {
            image: image.map(Path::to_path_buf).unwrap_or_default(),
            tried: vec![socket.to_path_buf()],
        },
        _ => ControlError::Io {
            context: format!("connect to {}", socket.display()),
            source: e,
        },
    })?;
    let canonical = image.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
    exchange(s, socket, canonical.as_deref(), req)
}

fn exchange(
    mut s: UnixStream,
    sock: &Path,
    image: Option<&Path>,
    req: &Request,
) -> std::result::Result<Response, ControlError> {
    let io = |what: &str| {
        let context = format!("{what} {}", sock.display());
        move |source| ControlError::Io { context, source }
    };
    let mut line = req.to_json(image).to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io("send to"))?;
    let mut answer = Vec::new();
    BufReader::new(&mut s)
        .take(MAX_LINE as u64 * 64)
        .read_until(b'\n', &mut answer)
        .map_err(io("read from"))?;
    if answer.last() != Some(&b'\n') {
        return Err(ControlError::Protocol(format!(
            "{}: the server closed the connection without answering",
            sock.display()
        )));
    }
    let v: Value = serde_json::from_slice(&answer)
        .map_err(|e| ControlError::Protocol(format!("the answer is not JSON: {e}")))?;
    match v.get("ok") {
        Some(Value::Bool(true)) => Response::from_json(req, &v).map_err(ControlError::Protocol),
        _ => Err(ControlError::Refused {
            message: v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("the server gave no reason")
                .to_string(),
            kind: v
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
        }),
    }
}

// ---- server --------------------------------------------------------------------------------

/// A bound control socket; [`crate::Server`] accepts on it and serves each
/// connection on a thread of its own.
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the served image file.
    identity: Option<(u64, u64)>,
}

/// Binds a Unix socket at `path` with mode 0600 (bound under a temporary name,
/// restricted, then renamed into place, so it is never open to others). A stale
/// socket file there is replaced; a live one is an error.
pub fn bind_private(path: &Path) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::Config(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Config(format!(
                "{}: another server is listening there",
                path.display()
            )));
        }
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)
        .map_err(|e| Error::io(format!("listen on {}", tmp.display()), e))?;
    let done = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("listen on {}", path.display()), e));
    }
    Ok(l)
}

impl ControlListener {
    /// Listens at `path` for requests about `image`.
    pub fn bind(path: &Path, image: &Image) -> Result<ControlListener> {
        let identity = match image.path() {
            Some(p) => {
                let m = std::fs::metadata(p)
                    .map_err(|e| Error::io(format!("stat {}", p.display()), e))?;
                Some((m.dev(), m.ino()))
            }
            None => None,
        };
        let listener = bind_private(path)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("set control socket non-blocking", e))?;
        Ok(ControlListener {
            listener,
            path: path.to_path_buf(),
            identity,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Accepts every pending connection and starts a thread for each.
    /// A connection silent for `idle` is closed.
    pub(crate) fn accept_all(
        &self,
        exports: &Arc<Exports>,
        state: &Arc<ControlState>,
        idle: Duration,
    ) {
        loop {
            let s = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    eprintln!("qcowx-nbd: control socket: accept failed: {e}");
                    return;
                }
            };
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(idle));
            let _ = s.set_write_timeout(Some(idle));
            {
                let mut n = state.active.lock().unwrap_or_else(|p| p.into_inner());
                if *n >= MAX_CONNECTIONS {
                    drop(n);
                    let mut s = s;
                    let _ = writeln!(
                        s,
                        "{}",
                        error_json("too many control connections; try again", "busy")
                    );
                    continue;
                }
                *n += 1;
            }
            let exports = Arc::clone(exports);
            let st = Arc::clone(state);
            let identity = self.identity;
            let r = thread::Builder::new()
                .name("nbd-control".into())
                .spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        serve_connection(s, &exports, identity, &st)
                    }));
                    if r.is_err() {
                        eprintln!("qcowx-nbd: control: a request handler panicked");
                    }
                    st.done();
                });
            if let Err(e) = r {
                eprintln!("qcowx-nbd: control: cannot start a thread: {e}");
                state.done();
            }
        }
    }

    /// Removes the socket file.
    pub(crate) fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Shared by the control connections of one server.
#[derive(Debug, Default)]
pub(crate) struct ControlState {
    /// Connections being served.
    active: Mutex<usize>,
    /// Requests running, and whether the server shuts down (then no more start).
    running: Mutex<(usize, bool)>,
    cv: Condvar,
    /// Serializes requests that change the image (each is atomic in the library; this
    /// keeps their log lines and answers in one order).
    order: Mutex<()>,
}

impl ControlState {
    fn done(&self) {
        let mut n = self.active.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
    }

    /// Registers a request about to run; `false` once the server shuts down.
    fn begin(&self) -> bool {
        let mut r = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if r.1 {
            return false;
        }
        r.0 += 1;
        true
    }

    fn end(&self) {
        let mut r = self.running.lock().unwrap_or_else(|p| p.into_inner());
        r.0 = r.0.saturating_sub(1);
        self.cv.notify_all();
    }

    /// Refuses new requests, then waits until none runs (or `timeout` passes). Idle
    /// connections are not waited for: their requests will be refused.
    pub(crate) fn shut_down(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut n = self.running.lock().unwrap_or_else(|p| p.into_inner());
        n.1 = true;
        while n.0 > 0 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            n = self
                .cv
                .wait_timeout(n, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes; `Ok(None)` at EOF; `Err` with
/// `InvalidData` when the line is too long.
fn read_line<R: BufRead>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    // A line cut short by EOF is answered as it is.
    if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
    }
    Ok(Some(buf))
}

fn serve_connection(
    s: UnixStream,
    exports: &Exports,
    identity: Option<(u64, u64)>,
    state: &ControlState,
) {
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    loop {
        let line = match read_line(&mut r) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let _ = writeln!(
                    w,
                    "{}",
                    error_json(
                        &format!("request line longer than {MAX_LINE} bytes"),
                        "invalid-request"
                    )
                );
                return;
            }
            Err(_) => return,
        };
        let answer = answer(&line, exports, identity, state);
        let mut out = answer.to_string();
        out.push('\n');
        if w.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

/// Whether `path` names the file with `identity`.
fn same_file(path: &Path, identity: (u64, u64)) -> bool {
    std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == identity)
}

/// The answer to one request line.
fn answer(
    line: &[u8],
    exports: &Exports,
    identity: Option<(u64, u64)>,
    state: &ControlState,
) -> Value {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t.trim(),
        Err(_) => return error_json("the request is not UTF-8", "invalid-request"),
    };
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return error_json(&format!("the request is not JSON: {e}"), "invalid-request"),
    };
    let (req, image) = match Request::from_json(&v) {
        Ok(r) => r,
        Err(why) => return error_json(&why, "invalid-request"),
    };
    let served = exports.image();
    if let (Some(p), Some(id)) = (&image, identity) {
        if !same_file(p, id) {
            return error_json(
                &format!(
                    "this control socket serves {}, not {}",
                    served.path().map_or_else(
                        || served.file_name().to_string(),
                        |p| p.display().to_string()
                    ),
                    p.display()
                ),
                "wrong-image",
            );
        }
    }
    if !state.begin() {
        return error_json("the server is shutting down", "shutting-down");
    }
    let v = run_request(&req, exports, state);
    state.end();
    v
}

fn run_request(req: &Request, exports: &Exports, state: &ControlState) -> Value {
    let _order = req
        .modifies()
        .then(|| state.order.lock().unwrap_or_else(|p| p.into_inner()));
    let started = Instant::now();
    let r = execute(exports, req);
    if req.modifies() {
        let what = describe(req);
        match &r {
            Ok(_) => eprintln!(
                "qcowx-nbd: control: {what}: done in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => eprintln!("qcowx-nbd: control: {what}: {e}"),
        }
    }
    match r {
        Ok(resp) => resp.to_json(),
        Err(e) => error_json(&e.to_string(), e.kind().as_str()),
    }
}

fn describe(req: &Request) -> String {
    match req {
        Request::Snapshot { vdi, name } => format!("snapshot of '{vdi}' as '{name}'"),
        Request::Fork { snapshot, name } => format!("fork of '{snapshot}' as '{name}'"),
        Request::DeleteSnapshot { name } => format!("delete snapshot '{name}'"),
        Request::DeleteVdi { name } => format!("delete VDI '{name}'"),
        Request::Revert { vdi, snapshot } => format!("revert '{vdi}' to '{snapshot}'"),
        Request::Gc => "gc".into(),
        Request::List => "list".into(),
        Request::Diff { from, to } => format!("diff '{from}' '{to}'"),
    }
}

/// Runs a request on the served image.
pub fn execute(exports: &Exports, req: &Request) -> qcowx_core::Result<Response> {
    let img = exports.image();
    let export_of = |root: &str| -> Option<String> {
        exports
            .list()
            .ok()?
            .into_iter()
            .find(|e| e.root == root)
            .map(|e| e.name)
    };
    Ok(match req {
        Request::Snapshot { vdi, name } => {
            let root = img.snapshot(vdi, name)?;
            let export = export_of(&root.name);
            Response::Root { root, export }
        }
        Request::Fork { snapshot, name } => {
            let root = img.fork(snapshot, name)?;
            let export = export_of(&root.name);
            Response::Root { root, export }
        }
        Request::DeleteSnapshot { name } => {
            img.delete_snapshot(name)?;
            Response::Done
        }
        Request::DeleteVdi { name } => {
            img.delete_vdi(name)?;
            Response::Done
        }
        Request::Revert { vdi, snapshot } => {
            img.revert(vdi, snapshot)?;
            Response::Done
        }
        Request::Gc => Response::Gc(img.gc()?),
        Request::List => Response::Roots(img.list()?),
        Request::Diff { from, to } => Response::Ranges(img.diff(from, to)?),
    })
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_json() {
        let all = [
            Request::Snapshot {
                vdi: "web".into(),
                name: "s1".into(),
            },
            Request::Fork {
                snapshot: "s1".into(),
                name: "db".into(),
            },
            Request::DeleteSnapshot { name: "s1".into() },
            Request::DeleteVdi { name: "db".into() },
            Request::Revert {
                vdi: "web".into(),
                snapshot: "s1".into(),
            },
            Request::Gc,
            Request::List,
            Request::Diff {
                from: "s1".into(),
                to: "default".into(),
            },
        ];
        for r in all {
            let v = r.to_json(Some(Path::new("/x/y.qcow2")));
            let (back, image) = Request::from_json(&v).expect("parse");
            assert_eq!(back, r);
            assert_eq!(image.as_deref(), Some(Path::new("/x/y.qcow2")));
            let (back, image) = Request::from_json(&r.to_json(None)).expect("parse");
            assert_eq!(back, r);
            assert!(image.is_none());
        }
        let (r, _) = Request::from_json(&json!({"op": "snapshot", "name": "a"})).unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                vdi: "default".into(),
                name: "a".into()
            }
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases = [
            (json!([1, 2]), "JSON object"),
            (json!({"name": "x"}), "\"op\" is missing"),
            (json!({"op": 7}), "\"op\" must be a string"),
            (json!({"op": "explode"}), "unknown op \"explode\""),
            (json!({"op": "snapshot"}), "\"name\" is missing"),
            (
                json!({"op": "snapshot", "name": 3}),
                "\"name\" must be a string",
            ),
            (
                json!({"op": "fork", "name": "x"}),
                "\"snapshot\" is missing",
            ),
            (json!({"op": "delete"}), "exactly one"),
            (
                json!({"op": "delete", "vdi": "a", "snapshot": "b"}),
                "exactly one",
            ),
            (json!({"op": "gc", "force": true}), "takes no \"force\""),
            (
                json!({"op": "list", "image": 5}),
                "\"image\" must be a string",
            ),
        ];
        for (v, want) in cases {
            let e = Request::from_json(&v).expect_err(&v.to_string());
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn responses_round_trip_through_json() {
        let root = RootInfo {
            kind: RootKind::Snapshot,
            name: "s1".into(),
            uid: 0x939d_26cf_d54e_091b,
            vdi: "default".into(),
            parent: Some("s0".into()),
            created_ns: 1_795_316_367_208_163_929,
            size: 8 << 20,
            id: Some("3".into()),
        };
        let snap = Request::Snapshot {
            vdi: "default".into(),
            name: "s1".into(),
        };
        let r = Response::Root {
            root: root.clone(),
            export: Some("default@s1".into()),
        };
        let v = r.to_json();
        assert_eq!(v["root"]["uid"], "939d26cfd54e091b");
        assert_eq!(v["root"]["date-sec"], 1_795_316_367u64);
        assert_eq!(v["root"]["date-nsec"], 208_163_929u64);
        assert_eq!(Response::from_json(&snap, &v).unwrap(), r);
        let list = Response::Roots(vec![root]);
        assert_eq!(
            Response::from_json(&Request::List, &list.to_json()).unwrap(),
            list
        );
        let gc = Response::Gc(GcReport {
            roots_removed: 1,
            clusters_freed: 2,
            bytes_freed: 131072,
            file_size_before: 10,
            file_size_after: 5,
            refcounts_exact: true,
        });
        assert_eq!(
            Response::from_json(&Request::Gc, &gc.to_json()).unwrap(),
            gc
        );
        let d = Request::Diff {
            from: "a".into(),
            to: "b".into(),
        };
        let ranges = Response::Ranges(vec![Range {
            offset: 65536,
            length: 65536,
        }]);
        assert_eq!(ranges.to_json()["bytes"], 65536);
        assert_eq!(Response::from_json(&d, &ranges.to_json()).unwrap(), ranges);
        assert!(Response::from_json(&Request::List, &json!({"ok": true})).is_err());
    }

    #[test]
    fn socket_names_follow_the_file_not_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.qcow2");
        std::fs::write(&a, b"x").unwrap();
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let hard = dir.path().join("hard.qcow2");
        std::fs::hard_link(&a, &hard).unwrap();
        let n = socket_name(&a).unwrap();
        assert!(n.starts_with("img-") && n.ends_with(".sock"), "{n}");
        assert_eq!(socket_name(&link).unwrap(), n);
        assert_eq!(socket_name(&hard).unwrap(), n);
        let b = dir.path().join("b.qcow2");
        std::fs::write(&b, b"y").unwrap();
        assert_ne!(socket_name(&b).unwrap(), n);
        assert!(socket_name(&dir.path().join("missing")).is_err());
        let c = socket_candidates(&a).unwrap();
        assert!(c.iter().all(|p| p.file_name().unwrap() == n.as_str()));
        assert_eq!(
            c.last().unwrap().parent().unwrap(),
            Path::new(&format!("/tmp/qcowx-{}", euid()))
        );
    }

    #[test]
    fn private_dirs_must_belong_to_us() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("ctl");
        prepare_dir(&d, 0o700, true).expect("create");
        prepare_dir(&d, 0o700, true).expect("exists");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(prepare_dir(&d, 0o700, true).is_err());
        let f = dir.path().join("file");
        std::fs::write(&f, b"").unwrap();
        assert!(prepare_dir(&f, 0o700, false).is_err());
    }
}
