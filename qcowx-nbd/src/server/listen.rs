//! Where the server listens: Unix sockets, TCP addresses, or sockets handed over by
//! systemd socket activation (`LISTEN_FDS`/`LISTEN_PID`).

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::socket::{stale_unix_socket, Socket};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket at this path (created; removed at shutdown).
    Unix(PathBuf),
    /// A TCP address: host name or IP address, and port (0 picks a free port).
    Tcp {
        /// Host or address to bind.
        host: String,
        /// Port.
        port: u16,
    },
}

/// An address the server ended up listening on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// A Unix socket.
    Unix(PathBuf),
    /// A TCP socket (with the real port when 0 was asked for).
    Tcp(SocketAddr),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Unix(p) => write!(f, "unix {}", p.display()),
            Bound::Tcp(a) => write!(f, "tcp {a}"),
        }
    }
}

impl Bound {
    /// The NBD URI of export `name` at this address (for QEMU and libnbd tools).
    pub fn uri(&self, name: &str) -> String {
        match self {
            Bound::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            Bound::Tcp(SocketAddr::V4(a)) => format!("nbd://{}:{}/{name}", a.ip(), a.port()),
            Bound::Tcp(SocketAddr::V6(a)) => format!("nbd://[{}]:{}/{name}", a.ip(), a.port()),
        }
    }
}

pub(super) enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        /// The socket file to remove at shutdown (not for activated sockets).
        path: Option<PathBuf>,
    },
}

impl Listener {
    pub(super) fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix { listener, .. } => listener.as_raw_fd(),
        }
    }

    pub(super) fn accept(&self) -> io::Result<Socket> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Socket::Tcp(s)),
            Listener::Unix { listener, .. } => listener.accept().map(|(s, _)| Socket::Unix(s)),
        }
    }

    pub(super) fn bound(&self) -> io::Result<Bound> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(Bound::Tcp),
            Listener::Unix { listener, path } => {
                let p = match path {
                    Some(p) => p.clone(),
                    None => listener
                        .local_addr()?
                        .as_pathname()
                        .map(Path::to_path_buf)
                        .unwrap_or_default(),
                };
                Ok(Bound::Unix(p))
            }
        }
    }
}

/// Listeners passed by systemd socket activation, if this process is their target.
pub(super) fn activated_listeners() -> Result<Option<Vec<Listener>>> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    if !pid_ok {
        return Ok(None);
    }
    let n: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    if n <= 0 {
        return Ok(None);
    }
    let mut out = Vec::new();
    for fd in 3..3 + n {
        // SAFETY: getsockname/fcntl on a descriptor systemd passed; storage is valid.
        let family = unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            let mut ss: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            if libc::getsockname(
                fd,
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            ) != 0
            {
                return Err(Error::Config(format!(
                    "LISTEN_FDS: descriptor {fd} is not a socket"
                )));
            }
            libc::c_int::from(ss.ss_family)
        };
        // SAFETY: systemd hands these descriptors to this process to own.
        let l = unsafe {
            if family == libc::AF_UNIX {
                Listener::Unix {
                    listener: UnixListener::from_raw_fd(fd),
                    path: None,
                }
            } else {
                Listener::Tcp(TcpListener::from_raw_fd(fd))
            }
        };
        out.push(l);
    }
    Ok(Some(out))
}

pub(super) fn bind_unix(path: &Path) -> Result<UnixListener> {
    if stale_unix_socket(path)? {
        // A stale socket from a server that did not clean up.
        std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
    }
    UnixListener::bind(path).map_err(|e| Error::io(format!("listen on {}", path.display()), e))
}

pub(super) fn bind_tcp(host: &str, port: u16) -> Result<TcpListener> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::io(format!("resolve {host}"), e))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpListener::bind(a) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(Error::io(format!("listen on {a}"), e)),
        }
    }
    Err(last.unwrap_or_else(|| Error::Config(format!("{host}: no address to listen on"))))
}
