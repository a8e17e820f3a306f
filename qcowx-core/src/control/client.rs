//! The client: what `qcowx` calls when the image it should change is locked.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::proto::{ErrorReply, Request, Response};
use super::socket::{is_socket, socket_candidates};
use super::MAX_LINE;
use crate::ErrorKind;

/// Why a control request did not succeed.
///
/// ```
/// use qcowx_core::control::ControlError;
/// use qcowx_core::ErrorKind;
///
/// // A refusal carries the library's error kind, by name.
/// let refused = ControlError::Refused { message: "a.qcow2: snapshot 'x' not found".into(), kind: "not-found".into() };
/// assert_eq!(refused.kind(), Some(ErrorKind::NotFound));
/// // The protocol's own kinds have no library kind.
/// let busy = ControlError::Refused { message: "busy".into(), kind: "busy".into() };
/// assert_eq!(busy.kind(), None);
/// ```
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

impl ControlError {
    /// The library's error kind behind a refusal (`None` for the protocol's own kinds
    /// and for failures to reach the server).
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ControlError::Refused { kind, .. } => ErrorKind::from_name(kind),
            _ => None,
        }
    }
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

/// Sends `req` to the server of `image`, found as the module documentation says, and
/// returns its answer. [`ControlError::NoServer`] when no server answers (the caller
/// then reports its own lock error); [`ControlError::Refused`] carries the library's
/// message when the operation failed.
///
/// This is what `qcowx snapshot|fork|delete|revert|gc|list` call when opening the
/// image fails with [`crate::Error::Locked`].
///
/// With no server running, the answer is [`ControlError::NoServer`]; see the module
/// documentation for a client that falls back on it.
///
/// ```
/// use qcowx_core::control::{request, ControlError, Request};
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("a.qcow2");
/// Image::create(&path, &CreateOptions::new(1 << 20))?.close()?;
/// std::env::set_var("QCOWX_RUNTIME_DIR", dir.path());
/// match request(&path, &Request::List) {
///     Err(ControlError::NoServer { image, .. }) => assert_eq!(image, path),
///     other => panic!("nobody serves it: {other:?}"),
/// }
/// # Ok(()) }
/// ```
pub fn request(image: &Path, req: &Request) -> Result<Response, ControlError> {
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
///
/// ```
/// use std::path::Path;
/// use qcowx_core::control::{request_at, ControlError, Request};
///
/// let socket = Path::new("/nonexistent/qcowx-ctl.sock");
/// let e = request_at(socket, None, &Request::Gc).unwrap_err();
/// assert!(matches!(e, ControlError::NoServer { ref tried, .. } if tried == &[socket]));
/// assert_eq!(e.kind(), None); // not the library's refusal: nothing was asked
/// ```
pub fn request_at(
    socket: &Path,
    image: Option<&Path>,
    req: &Request,
) -> Result<Response, ControlError> {
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
) -> Result<Response, ControlError> {
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
        Some(Value::Bool(true)) => Response::from_json(&v).map_err(ControlError::Protocol),
        _ => {
            let e: ErrorReply = serde_json::from_value(v)
                .map_err(|e| ControlError::Protocol(format!("the answer is not valid: {e}")))?;
            Err(ControlError::Refused {
                message: e.error,
                kind: e.kind,
            })
        }
    }
}
