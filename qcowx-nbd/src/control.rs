//! The control socket's listener: a Unix socket (mode 0600) on which the server runs
//! snapshot, fork, delete, revert, gc, list and diff on the image it serves.
//!
//! The protocol — requests, answers, where the socket is, the client `qcowx` uses and
//! the executor — is [`qcowx_core::control`], re-exported here; this module binds,
//! accepts (at most [`MAX_CONNECTIONS`] at once), closes connections idle for
//! `Settings::control_idle_timeout`, and stops taking requests at shutdown.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use qcowx_core::Image;
use serde_json::Value;

pub use qcowx_core::control::*;

use crate::error::{Error, Result};
use crate::exports::Exports;
use crate::socket::stale_unix_socket;

/// The most control connections served at once; more are answered `busy`.
pub const MAX_CONNECTIONS: usize = 16;

/// How long a control connection may sit idle between requests, by default
/// (`Settings::control_idle_timeout`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// New roots are served under the export names the server's plan gives them.
impl Host for Exports {
    fn export_of(&self, root: &str) -> Option<String> {
        self.list()
            .ok()?
            .into_iter()
            .find(|e| e.root == root)
            .map(|e| e.name)
    }
}

fn error_json(message: &str, kind: &str) -> Value {
    ErrorReply::new(message, kind).to_json()
}

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
    stale_unix_socket(path)?;
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
        let stale = stale_unix_socket(path)?;
        let listener = bind_private(path)?;
        if stale {
            eprintln!(
                "qcowx-nbd: {}: replaced a control socket left behind by a server that \
                 stopped without cleaning up (killed, or crashed)",
                path.display()
            );
        }
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
                        error_json("too many control connections; try again", ErrorReply::BUSY)
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
                        ErrorReply::INVALID_REQUEST
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
        Err(_) => return error_json("the request is not UTF-8", ErrorReply::INVALID_REQUEST),
    };
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return error_json(
                &format!("the request is not JSON: {e}"),
                ErrorReply::INVALID_REQUEST,
            )
        }
    };
    let (req, image) = match parse_request(&v) {
        Ok(r) => r,
        Err(why) => return error_json(&why, ErrorReply::INVALID_REQUEST),
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
                ErrorReply::WRONG_IMAGE,
            );
        }
    }
    if !state.begin() {
        return error_json("the server is shutting down", ErrorReply::SHUTTING_DOWN);
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
    let r = execute(exports.image(), req, exports);
    if req.modifies() {
        match &r {
            Ok(_) => eprintln!(
                "qcowx-nbd: control: {req}: done in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => eprintln!("qcowx-nbd: control: {req}: {e}"),
        }
    }
    match r {
        Ok(resp) => resp.to_json(),
        Err(e) => ErrorReply::from_error(&e).to_json(),
    }
}
