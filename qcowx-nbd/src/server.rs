//! Listeners, the accept loop, connection threads and clean shutdown.
//!
//! A [`Server`] listens on Unix sockets, TCP addresses, or sockets handed over by
//! systemd (`LISTEN_FDS`/`LISTEN_PID`). Each client gets a thread that runs the
//! handshake (bounded by the handshake timeout) and then the transmission phase.
//! At most `max_clients` clients are served at once; further clients wait in the
//! listen backlog until one leaves. Without `persistent` the server stops when its
//! last client has gone.
//!
//! Shutdown ([`ShutdownHandle::shutdown`], or SIGTERM/SIGINT once
//! [`install_signal_handlers`] ran): stop accepting and remove Unix socket files;
//! new options get `NBD_REP_ERR_SHUTDOWN`; every connection stops reading requests,
//! finishes and answers those it already read, and closes; then the image is flushed
//! and closed, which writes exact refcounts and releases the lock.

mod client;
mod listen;

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use crate::config::Settings;
use crate::control::{ControlListener, ControlState};
use crate::error::{Error, Result};
use crate::exports::Exports;
use crate::socket::Socket;

pub use crate::config::DRAIN_TIMEOUT;
pub use client::serve_client;
pub use listen::{Bound, ListenAddr};

use listen::{activated_listeners, bind_tcp, bind_unix, Listener};

/// How a server listens and admits clients.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Addresses to listen on (ignored when socket activation provides listeners).
    pub listen: Vec<ListenAddr>,
    /// Use sockets passed by systemd (`LISTEN_FDS`) when present.
    pub socket_activation: bool,
    /// The most clients served at once (0: no limit).
    pub max_clients: usize,
    /// Keep running after the last client leaves.
    pub persistent: bool,
    /// Protocol settings.
    pub settings: Settings,
    /// Where to listen for control requests (snapshot, fork, gc, …; see
    /// [`crate::control`]); `None`: no control socket.
    pub control: Option<PathBuf>,
}

/// A wake-up pipe plus a flag: how signals and other threads stop the accept loop.
#[derive(Debug)]
struct Wake {
    requested: AtomicBool,
    read: OwnedFd,
    write: OwnedFd,
}

/// Stops a running server (from another thread or a signal handler).
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    wake: Arc<Wake>,
}

impl ShutdownHandle {
    fn new() -> Result<ShutdownHandle> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if r != 0 {
            return Err(Error::io("create wake-up pipe", io::Error::last_os_error()));
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(ShutdownHandle {
            wake: Arc::new(Wake {
                requested: AtomicBool::new(false),
                read,
                write,
            }),
        })
    }

    /// Asks the server to shut down cleanly.
    pub fn shutdown(&self) {
        self.wake.requested.store(true, Ordering::SeqCst);
        self.notify();
    }

    /// Whether shutdown was asked for (here or by a signal).
    pub fn requested(&self) -> bool {
        self.wake.requested.load(Ordering::SeqCst) || SIGNALLED.load(Ordering::SeqCst)
    }

    fn notify(&self) {
        let b = 1u8;
        // SAFETY: writes one byte from a valid buffer to a descriptor we own; a full
        // pipe (EAGAIN) already guarantees a wake-up.
        unsafe {
            libc::write(self.wake.write.as_raw_fd(), (&b as *const u8).cast(), 1);
        }
    }

    fn drain(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a valid buffer from a non-blocking descriptor we own.
        while unsafe {
            libc::read(
                self.wake.read.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        } > 0
        {}
    }
}

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is valid.
        unsafe {
            libc::write(fd, (&b as *const u8).cast(), 1);
        }
    }
}

/// Makes SIGTERM and SIGINT shut `handle`'s server down cleanly.
pub fn install_signal_handlers(handle: &ShutdownHandle) -> Result<()> {
    SIGNAL_FD.store(handle.wake.write.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction with a handler that only touches atomics and
        // calls write(2) is valid to install.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(Error::io(
                "install signal handler",
                io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Clients being served: their sockets (to stop them at shutdown) and the count.
#[derive(Default)]
struct Clients {
    sockets: Mutex<HashMap<u64, Socket>>,
    count: Mutex<usize>,
    cv: Condvar,
}

/// An NBD server for the exports of one image.
pub struct Server {
    exports: Arc<Exports>,
    listeners: Vec<Listener>,
    control: Option<ControlListener>,
    config: ServerConfig,
    handle: ShutdownHandle,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("bound", &self.bound())
            .field("config", &self.config)
            .finish()
    }
}

impl Server {
    /// Creates the listeners. Nothing is accepted until [`Server::run`].
    pub fn bind(exports: Arc<Exports>, config: ServerConfig) -> Result<Server> {
        config.settings.validate()?;
        let activated = if config.socket_activation {
            activated_listeners()?
        } else {
            None
        };
        let listeners = match activated {
            Some(l) => {
                if !config.listen.is_empty() {
                    return Err(Error::Config(
                        "socket activation (LISTEN_FDS) cannot be combined with -k, -p or -b"
                            .into(),
                    ));
                }
                l
            }
            None => {
                if config.listen.is_empty() {
                    return Err(Error::Config("nowhere to listen".into()));
                }
                let mut v = Vec::new();
                for a in &config.listen {
                    v.push(match a {
                        ListenAddr::Unix(p) => Listener::Unix {
                            listener: bind_unix(p)?,
                            path: Some(p.clone()),
                        },
                        ListenAddr::Tcp { host, port } => Listener::Tcp(bind_tcp(host, *port)?),
                    });
                }
                v
            }
        };
        for l in &listeners {
            let r = match l {
                Listener::Tcp(t) => t.set_nonblocking(true),
                Listener::Unix { listener, .. } => listener.set_nonblocking(true),
            };
            r.map_err(|e| Error::io("set listener non-blocking", e))?;
        }
        let control = match &config.control {
            Some(p) => Some(ControlListener::bind(p, exports.image())?),
            None => None,
        };
        Ok(Server {
            exports,
            listeners,
            control,
            config,
            handle: ShutdownHandle::new()?,
        })
    }

    /// Where the server listens.
    pub fn bound(&self) -> Vec<Bound> {
        self.listeners
            .iter()
            .filter_map(|l| l.bound().ok())
            .collect()
    }

    /// A handle that stops [`Server::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// The control socket's path, if there is one.
    pub fn control_path(&self) -> Option<&Path> {
        self.control.as_ref().map(ControlListener::path)
    }

    /// The exports.
    pub fn exports(&self) -> &Arc<Exports> {
        &self.exports
    }

    /// Serves clients until shutdown is asked for (or, without `persistent`, until
    /// the last client has gone), then drains the connections and closes the image.
    pub fn run(mut self) -> Result<()> {
        let settings = Arc::new(self.config.settings.clone());
        let shutting_down = Arc::new(AtomicBool::new(false));
        let clients = Arc::new(Clients::default());
        let control_state = Arc::new(ControlState::default());
        let (stop_checkpoints, checkpoints_stopped) = mpsc::channel::<()>();
        let checkpointer = spawn_checkpointer(
            Arc::clone(self.exports.image()),
            settings.checkpoint_interval,
            checkpoints_stopped,
        );
        let max = self.config.max_clients;
        let mut had_client = false;
        let mut next_id = 0u64;

        loop {
            if self.handle.requested() {
                break;
            }
            let active = *clients.count.lock().unwrap_or_else(|p| p.into_inner());
            if !self.config.persistent && had_client && active == 0 {
                break;
            }
            let accepting = max == 0 || active < max;
            let mut fds = vec![libc::pollfd {
                fd: self.handle.wake.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if let Some(c) = &self.control {
                fds.push(libc::pollfd {
                    fd: c.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let first_listener = fds.len();
            if accepting {
                fds.extend(self.listeners.iter().map(|l| libc::pollfd {
                    fd: l.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }));
            }
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("poll", e));
            }
            if fds[0].revents != 0 {
                self.handle.drain();
            }
            if let Some(c) = &self.control {
                if fds[1].revents != 0 {
                    c.accept_all(&self.exports, &control_state, settings.control_idle_timeout);
                }
            }
            for (i, l) in self.listeners.iter().enumerate() {
                if !accepting || fds[first_listener + i].revents == 0 {
                    continue;
                }
                let sock = match l.accept() {
                    Ok(s) => s,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue
                    }
                    Err(e) => {
                        // EMFILE, ECONNABORTED…: keep serving the others.
                        eprintln!("qcowx-nbd: accept failed: {e}");
                        thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                had_client = true;
                next_id += 1;
                self.start_client(sock, next_id, &settings, &shutting_down, &clients);
                let active = *clients.count.lock().unwrap_or_else(|p| p.into_inner());
                if max != 0 && active >= max {
                    break;
                }
            }
        }

        // ---- shutdown ----
        shutting_down.store(true, Ordering::SeqCst);
        if let Some(c) = self.control.take() {
            c.remove();
        }
        for l in self.listeners.drain(..) {
            if let Listener::Unix {
                path: Some(path), ..
            } = &l
            {
                let _ = std::fs::remove_file(path);
            }
        }
        {
            let socks = clients.sockets.lock().unwrap_or_else(|p| p.into_inner());
            for s in socks.values() {
                // Stop reading requests; replies to those already read still go out,
                // unless the client stops reading them for this long.
                let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                let _ = s.shutdown(Shutdown::Read);
            }
        }
        let drain = settings.drain_timeout;
        let count = clients.count.lock().unwrap_or_else(|p| p.into_inner());
        let (count, waited) = clients
            .cv
            .wait_timeout_while(count, drain, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        if waited.timed_out() {
            eprintln!(
                "qcowx-nbd: {} connection(s) still busy after {drain:?}; closing the image anyway",
                *count
            );
        }
        drop(count);
        // A control request already running (a gc, say) finishes first; later ones
        // are refused.
        control_state.shut_down(drain);
        // Wakes the checkpointer at once: the close writes what it would have.
        drop(stop_checkpoints);
        let _ = checkpointer.join();
        // The close flushes first.
        self.exports.image().close()?;
        Ok(())
    }

    fn start_client(
        &self,
        sock: Socket,
        id: u64,
        settings: &Arc<Settings>,
        shutting_down: &Arc<AtomicBool>,
        clients: &Arc<Clients>,
    ) {
        let label = format!("client {id} ({})", sock.peer());
        if let Ok(c) = sock.try_clone() {
            clients
                .sockets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, c);
        }
        *clients.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let exports = Arc::clone(&self.exports);
        let settings = Arc::clone(settings);
        let shutting_down = Arc::clone(shutting_down);
        let clients2 = Arc::clone(clients);
        let handle = self.handle.clone();
        let spawned = thread::Builder::new()
            .name(format!("nbd-client-{id}"))
            .spawn(move || {
                if settings.verbose {
                    eprintln!("qcowx-nbd: {label}: connected");
                }
                // A panic (a bug) ends this client only; the count stays right.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    serve_client(sock, &exports, &settings, &shutting_down, &label)
                }))
                .unwrap_or_else(|_| Err(Error::Internal("the connection handler panicked".into())));
                match r {
                    Ok(()) => {
                        if settings.verbose {
                            eprintln!("qcowx-nbd: {label}: disconnected");
                        }
                    }
                    Err(e) if e.is_disconnect() && !settings.verbose => {}
                    Err(e) => eprintln!("qcowx-nbd: {label}: {e}"),
                }
                client_done(&clients2, id, &handle);
            });
        if let Err(e) = spawned {
            eprintln!("qcowx-nbd: cannot start a thread for {id}: {e}");
            client_done(clients, id, &self.handle);
        }
    }
}

fn client_done(clients: &Clients, id: u64, handle: &ShutdownHandle) {
    clients
        .sockets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    let mut c = clients.count.lock().unwrap_or_else(|p| p.into_inner());
    *c = c.saturating_sub(1);
    clients.cv.notify_all();
    drop(c);
    handle.notify();
}

/// Refcount changes held in memory past which the server checkpoints early (about
/// 32 bytes each: 8 MiB).
const MAX_PENDING_REFCOUNT_CHANGES: usize = 1 << 18;

/// Checkpoints `image` every `interval`, or sooner when its in-memory record of
/// refcount changes grows past [`MAX_PENDING_REFCOUNT_CHANGES`], until `stop`'s sender
/// is dropped (a long-running server keeps its image's refcounts exact on disk, so a
/// crash costs a scan at most since the last checkpoint, never hours of changes). The
/// shutdown drops the sender, which wakes the thread at once rather than after its
/// next tick.
fn spawn_checkpointer(
    image: Arc<qcowx_core::Image>,
    interval: Duration,
    stop: mpsc::Receiver<()>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let tick = Duration::from_millis(100).min(interval);
        let mut waited = Duration::ZERO;
        while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(tick) {
            waited += tick;
            if waited < interval && image.pending_refcount_changes() < MAX_PENDING_REFCOUNT_CHANGES
            {
                continue;
            }
            waited = Duration::ZERO;
            if let Err(e) = image.checkpoint() {
                eprintln!("qcowx-nbd: refcount checkpoint failed (retried later): {e}");
            }
        }
    })
}
