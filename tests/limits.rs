//! `qcowx-nbd`'s limits against real clients, at the limit and one past it
//! (spec/limits.md).
//!
//! * Request size ([`MAX_BLOCK_SIZE`], 32 MiB): libnbd (Python) reads and writes
//!   32 MiB, with structured and with simple replies; 32 MiB + 1 gets `EINVAL` and the
//!   connection, and another client, carry on. A raw client sends what libnbd will not:
//!   a write payload of [`MAX_SKIPPED_WRITE`] (read, dropped, `EINVAL`, the connection
//!   goes on) and one byte more (the connection is closed; the server serves others).
//! * Requests in flight per connection ([`DEFAULT_MAX_IN_FLIGHT`]) and their payload
//!   bytes ([`DEFAULT_MAX_IN_FLIGHT_BYTES`]): a raw client pipelines far more writes
//!   than the bounds without reading a reply; the server's resident memory grows by no
//!   more than the bound, and every write is answered and lands once the client reads.
//! * The mapping's resident pages ([`MAP_RELEASE_BYTES`]): a raw client reads a whole
//!   256 MiB image in 1 MiB reads; the server's peak resident memory grows by far
//!   less than that.
//! * Clients at once (`-e N`, default [`DEFAULT_MAX_CLIENTS`]): with `-e 2`, two
//!   `qemu-io` clients are served; a third connection gets no greeting until one of
//!   them leaves, then it is served.
//! * Control connections ([`MAX_CONNECTIONS`]): 16 are served; the 17th is answered
//!   `busy`; once one closes, a new one is served.
//!
//! Tools: `qemu-io` (Debian `qemu-utils`) and Python's `nbd` module (`python3-libnbd`);
//! a missing tool fails the test naming its package.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use qcowx_core::storage::MAP_RELEASE_BYTES;
use qcowx_core::{CreateOptions, Image};
use qcowx_nbd::config::{
    DEFAULT_MAX_CLIENTS, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_IN_FLIGHT_BYTES, MAX_BLOCK_SIZE,
};
use qcowx_nbd::control::MAX_CONNECTIONS;
use qcowx_nbd::transmission::MAX_SKIPPED_WRITE;
use qcowx_tests::*;

// ---- helpers -------------------------------------------------------------------------------

/// A new qcowx image of `size` bytes, closed.
fn new_image(path: &Path, size: u64) {
    Image::create(path, &CreateOptions::new(size))
        .and_then(|img| img.close())
        .expect("create image");
}

/// Runs a Python script with libnbd's `nbd` module; `URI` in the script is replaced
/// by `uri`. The script must print "ok" last.
fn libnbd_script(uri: &str, script: &str) {
    let text = script.replace("URI", &format!("{uri:?}"));
    let out = run(python3_libnbd().args(["-c", &text]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "libnbd script failed:\n{text}\n{}",
        describe(&out)
    );
}

/// Resident memory of process `pid` now and at its peak (kB), from /proc.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// ---- a raw NBD client, for requests well-behaved clients do not send ---------------------------

const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const NBD_CMD_READ: u16 = 0;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_DISC: u16 = 2;
const NBD_EINVAL: u32 = 22;

/// A client on a Unix socket that negotiated the default export with
/// `NBD_OPT_EXPORT_NAME` (so replies are simple replies).
struct RawClient {
    sock: UnixStream,
    size: u64,
}

impl RawClient {
    /// Connects and waits (up to `greeting`) for the server's greeting; `None` if
    /// none came in time.
    fn try_connect(path: &Path, greeting: Duration) -> Option<RawClient> {
        let mut sock = UnixStream::connect(path).expect("connect");
        sock.set_read_timeout(Some(greeting)).expect("timeout");
        let mut hello = [0u8; 18];
        match sock.read_exact(&mut hello) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(e) => panic!("reading the greeting: {e}"),
        }
        sock.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT", "newstyle greeting");
        // Fixed newstyle, no zeroes.
        sock.write_all(&3u32.to_be_bytes()).expect("client flags");
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&0u32.to_be_bytes()); // "" = the default export
        sock.write_all(&opt).expect("export name");
        let mut info = [0u8; 10];
        sock.read_exact(&mut info).expect("export info");
        let size = u64::from_be_bytes(info[..8].try_into().unwrap());
        Some(RawClient { sock, size })
    }

    fn connect(path: &Path) -> RawClient {
        RawClient::try_connect(path, Duration::from_secs(60)).expect("a greeting")
    }

    fn request(&mut self, command: u16, cookie: u64, offset: u64, length: u32) {
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&command.to_be_bytes());
        h.extend_from_slice(&cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&length.to_be_bytes());
        self.sock.write_all(&h).expect("send request");
    }

    /// Sends `len` bytes of `byte` as a write payload, in chunks.
    fn payload(&mut self, len: u64, byte: u8) -> std::io::Result<()> {
        let chunk = vec![byte; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            self.sock.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Reads one simple reply header: (error, cookie).
    fn reply(&mut self) -> std::io::Result<(u32, u64)> {
        let mut r = [0u8; 16];
        self.sock.read_exact(&mut r)?;
        let magic = u32::from_be_bytes(r[..4].try_into().unwrap());
        assert_eq!(magic, NBD_SIMPLE_REPLY_MAGIC, "simple reply magic");
        Ok((
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        ))
    }

    /// WRITE that must succeed.
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.request(NBD_CMD_WRITE, 8, offset, data.len() as u32);
        self.sock.write_all(data).expect("send payload");
        assert_eq!(
            self.reply().expect("write reply"),
            (0, 8),
            "write at {offset}"
        );
    }

    /// READ that must succeed: the data.
    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(NBD_CMD_READ, 7, offset, len);
        let (err, cookie) = self.reply().expect("read reply");
        assert_eq!((err, cookie), (0, 7), "read at {offset}");
        let mut data = vec![0u8; len as usize];
        self.sock.read_exact(&mut data).expect("read data");
        data
    }

    fn disconnect(mut self) {
        self.request(NBD_CMD_DISC, 0, 0, 0);
    }
}

// ---- request size -----------------------------------------------------------------------------

/// 32 MiB reads and writes work; 32 MiB + 1 gets EINVAL (structured and simple
/// replies), changes nothing, and the connection and another client carry on.
#[test]
fn requests_of_32_mib_work_and_one_byte_more_gets_einval() {
    assert_eq!(MAX_BLOCK_SIZE, 32 << 20);
    let dir = tempdir();
    let image = dir.path().join("disk.qcow2");
    new_image(&image, 128 << 20);
    let server = QcowxNbd::in_dir(dir.path(), &image, &["-t"]);
    libnbd_script(
        &server.uri("default"),
        r#"
import nbd
M = 32 << 20
a = nbd.NBD(); a.connect_uri(URI)
b = nbd.NBD(); b.connect_uri(URI)
s = nbd.NBD(); s.set_request_structured_replies(False); s.connect_uri(URI)
assert a.get_block_size(nbd.SIZE_MAXIMUM) == M, a.get_block_size(nbd.SIZE_MAXIMUM)
assert a.get_structured_replies_negotiated() and not s.get_structured_replies_negotiated()
data = bytes(range(251)) * (M // 251) + bytes(M % 251)
a.pwrite(data, 0)
assert a.pread(M, 0) == data, "32 MiB read, structured"
assert s.pread(M, 0) == data, "32 MiB read, simple replies"
s.pwrite(data, M)
def refused(f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        assert e.errno in ("EINVAL", "EOVERFLOW"), (f.__name__, e.errno, e.string)
        return
    raise AssertionError("%s of 32 MiB + 1 succeeded" % f.__name__)
for h in (a, s):
    refused(h.pread, M + 1, 0)
    refused(h.pwrite, b"\xee" * (M + 1), 2 * M)
    # The connection carries on, and the refused write changed nothing.
    assert h.pread(4096, 4096) == data[4096:8192]
    assert h.pread(M, 2 * M) == bytes(M)
assert b.pread(M, M) == data, "the other client carries on"
for h in (a, b, s):
    h.shutdown()
print("ok")
"#,
    );
    server.stop();
    assert_qemu_check_clean(&image);
}

/// A write payload of MAX_SKIPPED_WRITE bytes is read and dropped (EINVAL) and the
/// connection goes on; one byte more closes that connection, and the server keeps
/// serving other clients.
#[test]
fn oversized_write_payloads_are_skipped_up_to_their_limit_and_close_the_connection_past_it() {
    assert_eq!(MAX_SKIPPED_WRITE, 256 << 20);
    let dir = tempdir();
    let image = dir.path().join("disk.qcow2");
    new_image(&image, 64 << 20);
    let server = QcowxNbd::in_dir(dir.path(), &image, &["-t"]);
    let sock = dir.path().join("nbd.sock");
    let mut other = RawClient::connect(&sock);

    let mut c = RawClient::connect(&sock);
    c.request(NBD_CMD_WRITE, 1, 0, MAX_SKIPPED_WRITE);
    c.payload(u64::from(MAX_SKIPPED_WRITE), 0xab)
        .expect("send the payload");
    assert_eq!(c.reply().expect("reply"), (NBD_EINVAL, 1));
    assert_eq!(c.read(0, 4096), vec![0u8; 4096], "nothing was written");
    c.disconnect();

    let mut c = RawClient::connect(&sock);
    c.request(NBD_CMD_WRITE, 2, 0, MAX_SKIPPED_WRITE + 1);
    // The server closes the connection as soon as it sees the header.
    let sent = c.payload(u64::from(MAX_SKIPPED_WRITE) + 1, 0xcd);
    let reply = c.reply();
    assert!(
        sent.is_err() || reply.is_err(),
        "a payload past the limit must close the connection (reply {reply:?})"
    );
    assert_eq!(
        other.read(0, 4096),
        vec![0u8; 4096],
        "the server serves others"
    );
    other.disconnect();
    server.stop();
}

// ---- requests in flight ---------------------------------------------------------------------

/// Pipelines, on one connection, a 1 MiB read (whose reply fills the socket, so the
/// workers block until the client reads) and then `count` writes of `len` bytes, and
/// reads no reply until the server's memory has stopped growing. Returns the growth
/// of the server's peak resident memory (kB); then reads every reply and checks the
/// writes landed.
fn pipelined_writes_growth(dir: &Path, count: u64, len: u32) -> u64 {
    let image = dir.join(format!("disk-{count}.qcow2"));
    let span = count * u64::from(len);
    new_image(&image, span);
    let sub = dir.join(format!("srv-{count}"));
    std::fs::create_dir_all(&sub).expect("dir");
    let server = QcowxNbd::in_dir(&sub, &image, &["-t"]);
    let mut c = RawClient::connect(&sub.join("nbd.sock"));
    assert_eq!(c.size, span);
    // Warm up with one request of each kind, so allocator pools exist before the
    // baseline.
    c.write(0, &pattern(0, len as usize));
    let _ = c.read(0, 1 << 20);
    let (_, base) = memory_kb(server.pid());

    let mut raw = RawClient {
        sock: c.sock.try_clone().expect("clone socket"),
        size: span,
    };
    let sender = std::thread::spawn(move || {
        raw.request(NBD_CMD_READ, u64::MAX, 0, 1 << 20);
        for i in 0..count {
            raw.request(NBD_CMD_WRITE, i, i * u64::from(len), len);
            raw.sock
                .write_all(&pattern(i + 1, len as usize))
                .expect("send payload");
        }
    });
    // The server takes what its bounds let it; wait until its memory stops growing.
    let (mut last, mut stable) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stable < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let (rss, _) = memory_kb(server.pid());
        if rss == last {
            stable += 1;
        } else {
            (stable, last) = (0, rss);
        }
    }
    let (_, peak) = memory_kb(server.pid());
    let mut acked = 0;
    for _ in 0..=count {
        let (err, cookie) = c.reply().expect("reply");
        assert_eq!(err, 0, "request {cookie}");
        if cookie == u64::MAX {
            let mut data = vec![0u8; 1 << 20];
            c.sock.read_exact(&mut data).expect("read data");
        } else {
            acked += 1;
        }
    }
    assert_eq!(acked, count);
    sender.join().expect("sender thread");
    for i in [0, count / 2, count - 1] {
        assert!(
            c.read(i * u64::from(len), len) == pattern(i + 1, len as usize),
            "write {i} did not land"
        );
    }
    c.disconnect();
    server.stop();
    peak.saturating_sub(base)
}

/// 256 pipelined writes of 512 KiB (128 MiB): at most DEFAULT_MAX_IN_FLIGHT (64)
/// requests are taken, so the server holds about 32 MiB of payload, not 128 MiB. 8
/// pipelined writes of 32 MiB (256 MiB): the byte bound holds them to 128 MiB. Every
/// write is answered and lands once the client reads the replies.
#[test]
fn requests_in_flight_past_the_bounds_wait_and_the_server_memory_stays_bounded() {
    assert_eq!(DEFAULT_MAX_IN_FLIGHT, 64);
    assert_eq!(DEFAULT_MAX_IN_FLIGHT_BYTES, 128 << 20);
    let dir = tempdir();
    let slack_kb = 24 << 10;

    let len = 512 << 10;
    let grew = pipelined_writes_growth(dir.path(), 256, len);
    let bound = (DEFAULT_MAX_IN_FLIGHT as u64 * u64::from(len)) >> 10;
    println!("256 pipelined 512 KiB writes: peak memory grew {grew} kB (bound {bound} kB)");
    assert!(
        grew <= bound + slack_kb,
        "{grew} kB for 256 pipelined 512 KiB writes: more than {DEFAULT_MAX_IN_FLIGHT} requests in flight"
    );

    let grew = pipelined_writes_growth(dir.path(), 8, MAX_BLOCK_SIZE);
    let bound = DEFAULT_MAX_IN_FLIGHT_BYTES as u64 >> 10;
    println!("8 pipelined 32 MiB writes: peak memory grew {grew} kB (bound {bound} kB)");
    assert!(
        grew <= bound + slack_kb,
        "{grew} kB for 8 pipelined 32 MiB writes: more than {DEFAULT_MAX_IN_FLIGHT_BYTES} bytes in flight"
    );
}

// ---- memory of a server that reads its image --------------------------------------------------

/// Reading a whole image through the server (1 MiB reads: sent from the image file's
/// mapping) leaves its resident memory about where it was: the mapping gives its
/// pages back every [`MAP_RELEASE_BYTES`] read, so the server's peak does not grow
/// with the bytes served (before, it grew by the size of the disk). Every byte read
/// is right.
#[test]
fn reading_a_whole_image_does_not_make_the_server_grow_by_its_size() {
    assert_eq!(MAP_RELEASE_BYTES, 16 << 20);
    let dir = tempdir();
    let image = dir.path().join("disk.qcow2");
    let size: u64 = 256 << 20;
    let chunk: u32 = 1 << 20;
    // Every cluster allocated (fallocate: no data written, so nothing to write back),
    // and the file read once so its pages are in the page cache, which is what the
    // server sends from its mapping.
    qemu_img_create(&image, size, "preallocation=falloc");
    std::io::copy(
        &mut std::fs::File::open(&image).expect("open"),
        &mut std::io::sink(),
    )
    .expect("read the image");
    let server = QcowxNbd::in_dir(dir.path(), &image, &["-t"]);
    let mut c = RawClient::connect(&dir.path().join("nbd.sock"));
    assert_eq!(c.size, size);
    // Warm up: the first read of each kind sets up the worker's buffers.
    let _ = c.read(0, chunk);
    let (_, base) = memory_kb(server.pid());
    for i in 0..size / u64::from(chunk) {
        let data = c.read(i * u64::from(chunk), chunk);
        assert!(data.iter().all(|&b| b == 0), "read {i} differs");
    }
    let (_, peak) = memory_kb(server.pid());
    c.disconnect();
    server.stop();
    let grew = peak.saturating_sub(base);
    println!("reading {} MiB: peak memory grew {grew} kB", size >> 20);
    // The mapping's window, a reply buffer and slack; far below the 256 MiB read.
    let bound = (MAP_RELEASE_BYTES >> 10) + (32 << 10);
    assert!(
        grew <= bound,
        "the server grew by {grew} kB reading {} MiB (bound {bound} kB)",
        size >> 20
    );
}

// ---- clients at once ----------------------------------------------------------------------------

/// With `-e 2`, two qemu-io clients are served at once; a third connection waits in
/// the backlog without a greeting until one of them leaves, then it is served.
#[test]
fn clients_past_the_shared_limit_wait_until_one_leaves() {
    assert_eq!(DEFAULT_MAX_CLIENTS, 16);
    let dir = tempdir();
    let image = dir.path().join("disk.qcow2");
    new_image(&image, 16 << 20);
    let server = QcowxNbd::in_dir(dir.path(), &image, &["-t", "-e", "2"]);
    let uri = server.uri("default");
    let wait = Duration::from_secs(60);
    let mut first = QemuIoSession::start(
        "raw",
        Path::new(&uri),
        false,
        &dir.path().join("q1.log"),
        wait,
    );
    let second = QemuIoSession::start(
        "raw",
        Path::new(&uri),
        false,
        &dir.path().join("q2.log"),
        wait,
    );
    let sock = dir.path().join("nbd.sock");
    let third = RawClient::try_connect(&sock, Duration::from_secs(2));
    assert!(third.is_none(), "a third client was greeted past -e 2");
    // Keep a connection that is waiting in the backlog, then let the first leave.
    let waiting = UnixStream::connect(&sock).expect("connect");
    assert!(first.finish(wait), "qemu-io exits");
    waiting
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut hello = [0u8; 16];
    (&waiting)
        .read_exact(&mut hello)
        .expect("a greeting once a client left");
    assert_eq!(&hello, b"NBDMAGICIHAVEOPT");
    drop(waiting);
    drop(second);
    // Both slots free again: two clients are served.
    let mut a = RawClient::connect(&sock);
    let mut b = RawClient::connect(&sock);
    assert_eq!(a.read(0, 512), vec![0u8; 512]);
    assert_eq!(b.read(512, 512), vec![0u8; 512]);
    a.disconnect();
    b.disconnect();
    server.stop();
}

// ---- control connections ----------------------------------------------------------------------

fn control_request(s: &mut BufReader<UnixStream>, line: &str) -> serde_json::Value {
    // A connection answered `busy` may be closed before the request is sent: the
    // answer is read all the same.
    let _ = s.get_mut().write_all(format!("{line}\n").as_bytes());
    let mut answer = String::new();
    s.read_line(&mut answer).expect("answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("not JSON ({e}): {answer:?}"))
}

/// MAX_CONNECTIONS control connections are served at once; one more is answered
/// `busy` and closed; once one closes, a new connection is served.
#[test]
fn control_connections_past_the_limit_are_answered_busy() {
    assert_eq!(MAX_CONNECTIONS, 16);
    let dir = tempdir();
    let image = dir.path().join("disk.qcow2");
    new_image(&image, 16 << 20);
    let server = QcowxNbd::in_dir(dir.path(), &image, &["-t"]);
    let control = server.control().expect("a control socket").to_path_buf();
    let connect = || {
        let s = UnixStream::connect(&control).expect("connect to the control socket");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        BufReader::new(s)
    };
    let mut conns: Vec<_> = (0..MAX_CONNECTIONS).map(|_| connect()).collect();
    for c in &mut conns {
        let v = control_request(c, r#"{"op": "list"}"#);
        assert_eq!(v["ok"], true, "{v}");
    }
    let mut extra = connect();
    let mut answer = String::new();
    extra.read_line(&mut answer).expect("the busy answer");
    let v: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(
        (v["ok"].as_bool(), v["kind"].as_str()),
        (Some(false), Some("busy")),
        "{v}"
    );
    answer.clear();
    assert_eq!(
        extra.read_line(&mut answer).expect("EOF"),
        0,
        "closed after busy"
    );

    drop(conns.pop());
    // The server notices the close on its own thread: retry for a bounded time.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = connect();
        let v = control_request(&mut c, r#"{"op": "snapshot", "name": "after"}"#);
        if v["ok"] == true {
            break;
        }
        assert_eq!(v["kind"], "busy", "{v}");
        assert!(
            Instant::now() < deadline,
            "still busy after a connection closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(conns);
    server.stop();
    let img = Image::open(&image).expect("open");
    assert!(img.list().expect("list").iter().any(|r| r.name == "after"));
}
