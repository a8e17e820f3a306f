//! One client's connection: the handshake under its deadline (with STARTTLS when
//! configured), then the transmission phase on the socket or through the TLS thread.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::thread;
use std::time::{Duration, Instant};

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::exports::Exports;
use crate::handshake::{self, HandshakeContext, Negotiated, Outcome};
use crate::socket::Socket;
use crate::tls;
use crate::transmission;

/// A socket whose reads fail once a deadline has passed (each read may block only
/// until then), so a client cannot stretch the handshake by trickling bytes.
struct DeadlineSocket<'a> {
    sock: &'a mut Socket,
    deadline: Instant,
}

impl Read for DeadlineSocket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.sock.set_read_timeout(Some(left))?;
        self.sock.read(buf)
    }
}

impl Write for DeadlineSocket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

/// Maps read timeouts during the handshake to [`Error::HandshakeTimeout`].
fn timeout_error(timeout: Duration) -> impl Fn(Error) -> Error {
    move |e| match e {
        Error::Io { source, .. }
            if matches!(
                source.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Error::HandshakeTimeout(timeout)
        }
        e => e,
    }
}

/// Runs one client: handshake (with STARTTLS when configured), then transmission.
pub fn serve_client(
    mut sock: Socket,
    exports: &Exports,
    settings: &Settings,
    shutting_down: &AtomicBool,
    label: &str,
) -> Result<()> {
    sock.set_blocking()
        .and_then(|_| sock.set_nodelay())
        .map_err(|e| Error::io("configure socket", e))?;
    let timeout = settings.handshake_timeout;
    let deadline = Instant::now() + timeout;
    let ctx = HandshakeContext {
        exports,
        settings,
        shutting_down,
    };
    let mut bounded = DeadlineSocket {
        sock: &mut sock,
        deadline,
    };
    let tmo = timeout_error(timeout);
    let no_zeroes = handshake::greet(&mut bounded).map_err(&tmo)?;
    let outcome = handshake::haggle(&mut bounded, ctx, no_zeroes, false, Some(deadline), timeout)
        .map_err(&tmo)?;
    let negotiated = match outcome {
        Outcome::Closed => return Ok(()),
        Outcome::Transmission(n) => n,
        Outcome::StartTls => {
            let tls = settings
                .tls
                .as_ref()
                .ok_or_else(|| Error::Internal("STARTTLS accepted without TLS settings".into()))?;
            let mut conn = tls::accept(&tls.config, &mut bounded).map_err(&tmo)?;
            if settings.verbose {
                let cns = tls::peer_common_names(&conn);
                eprintln!(
                    "qcowx-nbd: {label}: TLS established{}",
                    if cns.is_empty() {
                        String::new()
                    } else {
                        format!(" (client certificate CN {})", cns.join(", "))
                    }
                );
            }
            let outcome = {
                let mut stream = rustls::Stream::new(&mut conn, &mut bounded);
                handshake::haggle(&mut stream, ctx, no_zeroes, true, Some(deadline), timeout)
                    .map_err(&tmo)?
            };
            let negotiated = match outcome {
                Outcome::Transmission(n) => n,
                Outcome::Closed => {
                    conn.send_close_notify();
                    let _ = conn.complete_io(&mut bounded);
                    return Ok(());
                }
                Outcome::StartTls => {
                    return Err(Error::Internal("STARTTLS accepted twice".into()));
                }
            };
            log_negotiated(settings, label, &negotiated);
            sock.set_read_timeout(None)
                .map_err(|e| Error::io("clear timeout", e))?;
            let (plain, pump_end) =
                UnixStream::pair().map_err(|e| Error::io("create a socket pair", e))?;
            // As for a plaintext client (see `transmit`); best effort.
            let _ = sock.enlarge_send_buffer();
            let pump_label = label.to_string();
            let verbose = settings.verbose;
            let pump = thread::Builder::new()
                .name("nbd-tls".into())
                .spawn(move || {
                    if let Err(e) = tls::pump(conn, sock, pump_end) {
                        if verbose
                            || !matches!(
                                e.kind(),
                                io::ErrorKind::BrokenPipe
                                    | io::ErrorKind::ConnectionReset
                                    | io::ErrorKind::UnexpectedEof
                            )
                        {
                            eprintln!("qcowx-nbd: {pump_label}: TLS: {e}");
                        }
                    }
                })
                .map_err(|e| Error::io("start the TLS thread", e))?;
            let r = transmit(Socket::Unix(plain), &negotiated, settings, label);
            let _ = pump.join();
            return r;
        }
    };
    log_negotiated(settings, label, &negotiated);
    sock.set_read_timeout(None)
        .map_err(|e| Error::io("clear timeout", e))?;
    transmit(sock, &negotiated, settings, label)
}

fn log_negotiated(settings: &Settings, label: &str, negotiated: &Negotiated) {
    if settings.verbose {
        eprintln!(
            "qcowx-nbd: {label}: export '{}' ({}, structured replies {}, contexts {:?})",
            negotiated.export.info.name,
            if negotiated.export.writable {
                "read-write"
            } else {
                "read-only"
            },
            if negotiated.structured { "on" } else { "off" },
            negotiated.contexts
        );
    }
}

/// The transmission phase on a (plaintext) socket; the socket is closed on return.
fn transmit(sock: Socket, negotiated: &Negotiated, settings: &Settings, label: &str) -> Result<()> {
    // Best effort: a smaller buffer only costs speed.
    let _ = sock.enlarge_send_buffer();
    let writer = sock.try_clone().map_err(|e| Error::io("clone socket", e))?;
    let killer = sock.try_clone().map_err(|e| Error::io("clone socket", e))?;
    let kill = move || {
        let _ = killer.shutdown(Shutdown::Both);
    };
    // transmission::serve buffers its input itself.
    transmission::serve(sock, writer, negotiated, settings, &kill, label)
}
