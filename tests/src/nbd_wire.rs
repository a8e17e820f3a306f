//! The NBD protocol written by hand, for the cases real clients cannot produce, and
//! `qcowx-nbd` servers run in the test process.
//!
//! [`WireClient`] sends options and requests byte by byte over any stream (a Unix
//! socket, or a TLS stream after `STARTTLS`); [`InProcessServer`] runs a bound
//! [`Server`] on a thread and shuts it down when stopped or dropped.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use qcowx_nbd::config::Settings;
use qcowx_nbd::exports::Exports;
use qcowx_nbd::server::{ListenAddr, Server, ServerConfig, ShutdownHandle};
use qcowx_nbd::wire::*;

/// The big-endian u16 at the start of `b`.
pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

/// The big-endian u32 at the start of `b`.
pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// The big-endian u64 at the start of `b`.
pub fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Option data of NBD_OPT_INFO / NBD_OPT_GO: export `name` and the info `requests`.
pub fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// Option data of NBD_OPT_{LIST,SET}_META_CONTEXT.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    /// The option it answers.
    pub option: u32,
    /// Its type (`REP_*`).
    pub kind: u32,
    /// Its data.
    pub data: Vec<u8>,
}

/// A client that writes the protocol's bytes by hand over stream `s`.
#[derive(Debug)]
pub struct WireClient<S: Read + Write = UnixStream> {
    /// The connection.
    pub s: S,
}

impl WireClient<UnixStream> {
    /// Connects to the Unix socket `path` and does the greeting with client `flags`.
    pub fn connect(path: &Path, flags: u32) -> WireClient {
        WireClient::over(UnixStream::connect(path).expect("connect"), flags)
    }

    /// The greeting on `s` (a 20 s read timeout): checks the server's magic and
    /// handshake flags (fixed newstyle, no zeroes), sends client `flags`.
    pub fn over(s: UnixStream, flags: u32) -> WireClient {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = WireClient { s };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be_u16(&g[16..]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c.s.write_all(&flags.to_be_bytes()).unwrap();
        c
    }
}

impl<S: Read + Write> WireClient<S> {
    /// Sends option `opt` with `data`.
    pub fn try_send_opt(&mut self, opt: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)?;
        self.s.flush()
    }

    /// [`WireClient::try_send_opt`], which must succeed.
    pub fn send_opt(&mut self, opt: u32, data: &[u8]) {
        self.try_send_opt(opt, data).expect("send option");
    }

    /// One option reply (its magic must be right).
    pub fn try_opt_reply(&mut self) -> std::io::Result<OptReply> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        assert_eq!(be_u64(&h), OPTION_REPLY_MAGIC);
        let mut data = vec![0u8; be_u32(&h[16..]) as usize];
        self.s.read_exact(&mut data)?;
        Ok(OptReply {
            option: be_u32(&h[8..]),
            kind: be_u32(&h[12..]),
            data,
        })
    }

    /// [`WireClient::try_opt_reply`], which must succeed.
    pub fn opt_reply(&mut self) -> OptReply {
        self.try_opt_reply().expect("option reply")
    }

    /// Sends an option and collects replies up to the final one.
    pub fn opt(&mut self, opt: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_opt(opt, data);
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, opt);
            let last = r.kind == REP_ACK || r.kind & (1 << 31) != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// The type of the final reply to an option.
    pub fn final_kind(&mut self, opt: u32, data: &[u8]) -> u32 {
        self.opt(opt, data).last().unwrap().kind
    }

    /// The export names NBD_OPT_LIST gives.
    pub fn export_names(&mut self) -> Vec<String> {
        self.opt(OPT_LIST, &[])
            .into_iter()
            .filter(|r| r.kind == REP_SERVER)
            .map(|r| String::from_utf8(r.data[4..4 + be_u32(&r.data) as usize].to_vec()).unwrap())
            .collect()
    }

    /// GO to `name`; returns (size, transmission flags).
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self.opt(OPT_GO, &info_data(name, &[INFO_BLOCK_SIZE]));
        assert_eq!(replies.last().unwrap().kind, REP_ACK);
        let e = replies
            .iter()
            .find(|r| r.kind == REP_INFO && be_u16(&r.data) == INFO_EXPORT)
            .expect("INFO_EXPORT");
        (be_u64(&e.data[2..]), be_u16(&e.data[10..]))
    }

    /// Whether the server closed the connection (or reading failed).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// Sends a transmission request.
    pub fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).expect("send request");
        self.s.flush().unwrap();
    }

    /// A simple reply: (error, cookie).
    pub fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("simple reply");
        assert_eq!(be_u32(&h), SIMPLE_REPLY_MAGIC);
        (be_u32(&h[4..]), be_u64(&h[8..]))
    }

    /// A reply of either kind with its payload: (magic, flags, type or error, cookie,
    /// payload). Simple replies to reads carry `read_len` bytes when successful.
    pub fn any_reply(&mut self, read_len: usize) -> (u32, u16, u32, u64, Vec<u8>) {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).expect("reply magic");
        match be_u32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                let err = be_u32(&h);
                let mut p = vec![0u8; if err == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut p).unwrap();
                (SIMPLE_REPLY_MAGIC, 0, err, be_u64(&h[4..]), p)
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).unwrap();
                let mut p = vec![0u8; be_u32(&h[12..]) as usize];
                self.s.read_exact(&mut p).unwrap();
                (
                    STRUCTURED_REPLY_MAGIC,
                    be_u16(&h),
                    u32::from(be_u16(&h[2..])),
                    be_u64(&h[4..]),
                    p,
                )
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    /// All chunks of one structured reply: (type, payload).
    pub fn chunks(&mut self, cookie: u64) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (magic, flags, ty, c, p) = self.any_reply(0);
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
            assert_eq!(c, cookie);
            out.push((ty as u16, p));
            if flags & REPLY_FLAG_DONE != 0 {
                return out;
            }
        }
    }

    /// A block status request for one context: its descriptors (length, flags).
    pub fn status(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<(u64, u32)> {
        self.request(0, CMD_BLOCK_STATUS, cookie, offset, len, &[]);
        let ch = self.chunks(cookie);
        assert_eq!(ch.len(), 1, "one context, one chunk");
        ch[0].1[4..]
            .chunks(8)
            .map(|d| (u64::from(be_u32(d)), be_u32(&d[4..])))
            .collect()
    }

    /// Reads with a structured reply and puts its chunks together: data chunks
    /// where they say, zeros for holes. Every byte must be covered once.
    pub fn structured_read(&mut self, cookie: u64, flags: u16, offset: u64, len: u32) -> Vec<u8> {
        self.request(flags, CMD_READ, cookie, offset, len, &[]);
        let mut out = vec![0u8; len as usize];
        let mut covered = 0u64;
        for (ty, p) in self.chunks(cookie) {
            let at = (be_u64(&p) - offset) as usize;
            match ty {
                REPLY_TYPE_OFFSET_DATA => {
                    out[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                    covered += p.len() as u64 - 8;
                }
                REPLY_TYPE_OFFSET_HOLE => covered += u64::from(be_u32(&p[8..])),
                t => panic!("read at {offset}: chunk type {t}"),
            }
        }
        assert_eq!(covered, u64::from(len), "read at {offset}: bytes covered");
        out
    }
}

/// The configuration of a server listening on the Unix socket `path` only: persistent,
/// no client limit, no control socket, no socket activation.
pub fn unix_config(path: PathBuf, settings: Settings) -> ServerConfig {
    ServerConfig {
        listen: vec![ListenAddr::Unix(path)],
        socket_activation: false,
        max_clients: 0,
        persistent: true,
        settings,
        control: None,
    }
}

/// A `qcowx-nbd` server running on a thread of the test process. Dropping it shuts the
/// server down and waits for it.
#[derive(Debug)]
pub struct InProcessServer {
    handle: ShutdownHandle,
    thread: Option<JoinHandle<qcowx_nbd::Result<()>>>,
}

impl InProcessServer {
    /// Binds a server of `exports` as `config` says and runs it.
    pub fn bind(exports: Arc<Exports>, config: ServerConfig) -> InProcessServer {
        InProcessServer::run(Server::bind(exports, config).expect("bind"))
    }

    /// Runs a bound `server` on a new thread.
    pub fn run(server: Server) -> InProcessServer {
        let handle = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        InProcessServer {
            handle,
            thread: Some(thread),
        }
    }

    /// Shuts the server down, waits for it and asserts that it ran without error.
    pub fn stop(mut self) {
        self.handle.shutdown();
        let r = self.thread.take().expect("thread").join().expect("join");
        r.expect("server run");
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown();
            let _ = t.join();
        }
    }
}
