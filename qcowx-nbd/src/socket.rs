//! A connected client socket: TCP or Unix, behind one type, and what the transmission
//! phase needs of a connection: a [`RequestStream`] to read requests from and a
//! [`ReplyWriter`] to send replies to.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A connection's request stream: a blocking reader that can also be asked, without
/// sleeping, for bytes that have already arrived.
pub trait RequestStream: Read {
    /// Reads what has arrived without waiting for more: `Err(WouldBlock)` when
    /// nothing has. The default is `read` itself, for inputs that never keep a reader
    /// waiting (byte slices, test streams).
    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }
}

impl RequestStream for &[u8] {}

/// Where a connection's replies go.
pub trait ReplyWriter: Write + Send {
    /// Writes a prefix of `bufs`, in order, waiting for the peer to make room only
    /// until `deadline`; returns how many bytes went. The default writes nothing, so
    /// every reply goes through [`Write`] (copied first).
    fn write_until(&mut self, _bufs: &[IoSlice<'_>], _deadline: Instant) -> io::Result<usize> {
        Ok(0)
    }
}

impl ReplyWriter for Vec<u8> {}

impl ReplyWriter for io::Sink {}

impl<W: ReplyWriter + ?Sized> ReplyWriter for &mut W {
    fn write_until(&mut self, bufs: &[IoSlice<'_>], deadline: Instant) -> io::Result<usize> {
        (**self).write_until(bufs, deadline)
    }
}

/// The send buffer a Unix connection asks for (see [`Socket::enlarge_send_buffer`]).
pub const UNIX_SEND_BUFFER: usize = 4 << 20;

/// A client connection.
#[derive(Debug)]
pub enum Socket {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix-domain connection.
    Unix(UnixStream),
}

impl Socket {
    /// Another handle to the same connection (for the reply writer).
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    /// Shuts down reading, writing or both.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.shutdown(how),
            Socket::Unix(s) => s.shutdown(how),
        }
    }

    /// Limits how long one read may block (`None`: forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(t),
            Socket::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Limits how long one write may block (`None`: forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_write_timeout(t),
            Socket::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Disables Nagle's algorithm on TCP (the protocol recommends it); no-op on Unix.
    pub fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_nodelay(true),
            Socket::Unix(_) => Ok(()),
        }
    }

    /// Switches non-blocking mode on or off.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_nonblocking(on),
            Socket::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// Makes the socket blocking.
    pub fn set_blocking(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_nonblocking(false),
            Socket::Unix(s) => s.set_nonblocking(false),
        }
    }

    /// Asks for a [`UNIX_SEND_BUFFER`]-byte send buffer on a Unix connection (the
    /// kernel caps it at `net.core.wmem_max`); no-op on TCP, whose buffers size
    /// themselves. Large read replies then go out in fewer, larger pieces, with fewer
    /// wake-ups of the client.
    pub fn enlarge_send_buffer(&self) -> io::Result<()> {
        let Socket::Unix(s) = self else {
            return Ok(());
        };
        let v = UNIX_SEND_BUFFER as libc::c_int;
        // SAFETY: a valid socket and a c_int option value of the size given.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The peer, for messages.
    pub fn peer(&self) -> String {
        match self {
            Socket::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp client".into(), |a| a.to_string()),
            Socket::Unix(_) => "unix client".into(),
        }
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl RequestStream for Socket {
    /// `recv` with `MSG_DONTWAIT`.
    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
        let n = unsafe {
            libc::recv(
                self.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write_vectored(bufs),
            Socket::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.flush(),
            Socket::Unix(s) => s.flush(),
        }
    }
}

/// The most buffers one `sendmsg` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

impl ReplyWriter for Socket {
    /// `sendmsg` with `MSG_DONTWAIT`, and `ppoll` for room until the deadline.
    fn write_until(&mut self, bufs: &[io::IoSlice<'_>], deadline: Instant) -> io::Result<usize> {
        let fd = self.as_raw_fd();
        let mut owned = bufs.to_vec();
        let mut rest = &mut owned[..];
        // Advancing by 0 drops leading empty buffers.
        io::IoSlice::advance_slices(&mut rest, 0);
        let mut sent = 0usize;
        while !rest.is_empty() {
            let count = rest.len().min(IOV_MAX);
            // SAFETY: an all-zero msghdr is valid; its iovec array points at `count`
            // live IoSlices, which have the layout of `struct iovec` on Unix.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = rest.as_mut_ptr().cast::<libc::iovec>();
                msg.msg_iovlen = count as _;
                libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if n > 0 {
                sent += n as usize;
                io::IoSlice::advance_slices(&mut rest, n as usize);
                continue;
            }
            if n == 0 {
                // No progress on a stream socket: leave the rest to the caller.
                break;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {}
                _ => return Err(e),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            // SAFETY: one valid pollfd, a valid timespec, no signal mask.
            let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
        Ok(sent)
    }
}

/// Checks a path a Unix socket is to be bound at: refuses anything there that is not a
/// socket, and a socket another server listens on; returns whether a stale socket file
/// (a server that did not clean up) is there to be replaced.
pub(crate) fn stale_unix_socket(path: &std::path::Path) -> crate::error::Result<bool> {
    use crate::error::Error;
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(false);
    };
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
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_buffer(s: &UnixStream) -> usize {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket, and a c_int with its length for the result.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "getsockopt");
        v as usize
    }

    #[test]
    fn unix_connections_get_the_larger_send_buffer_the_kernel_allows() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let before = send_buffer(&a);
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .expect("wmem_max")
            .trim()
            .parse()
            .expect("a number");
        let sock = Socket::Unix(a);
        sock.enlarge_send_buffer().expect("setsockopt");
        let Socket::Unix(a) = &sock else {
            unreachable!()
        };
        // Linux doubles the value asked for (bookkeeping), capped at wmem_max first.
        assert_eq!(
            send_buffer(a),
            2 * UNIX_SEND_BUFFER.min(max),
            "before: {before}"
        );
    }
}
