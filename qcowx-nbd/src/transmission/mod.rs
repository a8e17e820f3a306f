//! The transmission phase: requests in, replies out, pipelined.
//!
//! One reader (the connection's thread) parses requests from its own input buffer.
//! Small reads and writes (at most [`INLINE_MAX`] bytes, no FUA) run right there on
//! the reader thread while such requests are fast — page-cache hits take a few
//! microseconds, less than handing a request to another thread costs — and their
//! replies are gathered and sent together: one `write` for every [`REPLY_EVERY`]
//! requests, or for what the last socket read brought in if that is fewer — or, while
//! the server has at least as many connections in transmission as the process has
//! cores ([`gathers_whole_input`]), only for what the last socket read brought in.
//! When they
//! turn slow (a smoothed service time above
//! [`INLINE_LIMIT`]: the disk is being read), they go to the worker pool like every
//! other request until they are fast again, so one connection keeps several disk
//! requests in flight.
//!
//! The bounded pool of worker threads runs the other requests; each worker sends its
//! whole reply under one writer lock, so replies go out in completion order
//! (answered out of order, never interleaved mid-message). A large read whose data
//! sits in the page cache goes from the image file's mapping straight into the
//! socket ([`qcowx_core::Disk::read_mapped`]): one copy instead of two (the mapping
//! gives its pages back every [`qcowx_core::storage::MAP_RELEASE_BYTES`], so the
//! server's RSS does not grow with the bytes it sends). The image
//! cannot free clusters while their bytes are lent, so such a send waits at most
//! [`LEND_WAIT`] for a slow client; what is left then is copied and sent after.
//!
//! The payload of a write the workers run is read straight into its buffer; while
//! the rest of it has not arrived the reader polls for it for up to [`PAYLOAD_SPIN`]
//! before sleeping, so the pieces a client's socket lets through do not each cost
//! a sleep and a wake-up.
//!
//! The reader stops taking requests for the workers while too many — or too many
//! payload bytes — are in flight, which pushes back on the client through the socket. Reply buffers and
//! write payload buffers are reused, not allocated and zeroed per request.
//!
//! Every rule of the protocol about requests is checked before any I/O: unknown
//! commands and flags not valid for a command get `NBD_EINVAL`; writes, trims and
//! write-zeroes on a read-only export `NBD_EPERM`; requests past the end of the
//! export `NBD_ENOSPC` for writes and write-zeroes and `NBD_EINVAL` otherwise;
//! requests not aligned to the advertised minimum block size, and reads and writes
//! longer than the maximum block size, `NBD_EINVAL` (the payload of an oversized
//! write is read and dropped, up to [`MAX_SKIPPED_WRITE`]; beyond that the
//! connection is closed). Write-zeroes, trim and cache carry no payload and are
//! accepted at any length (real clients send them larger than the maximum).
//!
//! # Where things are
//!
//! * `mod.rs`: [`serve`], the per-connection state (`Conn`) and the parsed `Request`;
//! * `input.rs`: the reader's buffer over the connection's [`RequestStream`];
//! * `dispatch.rs`: the reader loop (inline or to the workers) and `Conn::handle`;
//! * `workers.rs`: the worker threads, the in-flight budget, payload buffers;
//! * `validate.rs`: `Conn::check`, the protocol's rules about requests;
//! * `handlers.rs`: one handler per command;
//! * `block_status.rs`: read runs and block status descriptors from extents;
//! * `reply.rs`: reply buffers, simple and error replies, sending;
//! * `lend.rs`: large reads sent from the image's mapping.
//!
//! # One WRITE, from the socket to the image
//!
//! 1. [`serve`] starts the workers and runs the reader, `Conn::read_requests` →
//!    `Conn::read_loop`, over an `Input` wrapping the connection (a
//!    [`crate::socket::Socket`], or the TLS thread's end of a socket pair).
//! 2. `Input::fill` reads until the 28-byte header is buffered;
//!    [`crate::wire::read_header`] parses it and checks its magic. A payload longer
//!    than the maximum block size is skipped (`Input::skip`) and the request failed.
//! 3. `Conn::runs_inline` decides where the write runs. Small and fast (at most
//!    [`INLINE_MAX`] bytes, no FUA, page-cache speed): `Input::fill` buffers the
//!    payload and the reader calls `Conn::handle` on `Input::peek`; the reply waits
//!    in a `ReplyBuf` for `Conn::send`. Otherwise: `Budget::acquire`,
//!    `Conn::take_buffer`, `Input::read_exact` into it, and the request goes down
//!    the channel to a worker, `Conn::work`, which calls `Conn::handle`.
//! 4. `Conn::handle` runs `Conn::check` (validate.rs), then `Conn::write`
//!    (handlers.rs): all-zero data with zero detection on goes to
//!    `qcowx_core::Disk::write_zeroes`, anything else to `qcowx_core::Disk::write_at`,
//!    the export's handle on its VDI, which writes through the shared
//!    `qcowx_core::Image`.
//! 5. `Conn::finish_write` makes the write durable when FUA or write-through caching
//!    asks (`Conn::make_durable`), and appends the reply: `Conn::simple`, or
//!    `Conn::image_error`, whose errno comes from [`crate::error::nbd_errno`].
//! 6. The reply goes out with `Conn::send` under the writer lock, in completion
//!    order; a worker then gives back its budget and payload buffer
//!    (`Conn::return_buffer`).

mod block_status;
mod dispatch;
mod handlers;
mod input;
mod lend;
mod reply;
mod validate;
mod workers;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread;

use crate::config::Settings;
use crate::error::Result;
use crate::exports::Export;
use crate::handshake::{MetaContext, Negotiated};

pub use crate::config::INLINE_LIMIT;
pub use crate::socket::{ReplyWriter, RequestStream};
pub use block_status::{
    status_query_limit, MAX_DESCRIPTORS, MAX_STATUS_CLUSTERS, MAX_STATUS_QUERY,
};
pub use dispatch::{INLINE_MAX, MAX_SKIPPED_WRITE};
pub use input::PAYLOAD_SPIN;
pub use lend::LEND_WAIT;
pub use reply::{gathers_whole_input, REPLY_EVERY};

use input::Input;
use qcowx_core::storage::IoBuf;
use workers::Budget;

/// One parsed request.
#[derive(Debug)]
struct Request {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    /// Write data (None for other commands and for oversized writes).
    payload: Option<IoBuf>,
    /// A write whose payload was larger than the maximum block size (dropped).
    oversized: bool,
    /// Bytes charged to the in-flight budget.
    cost: usize,
}

/// State shared by the reader and the workers of one connection.
struct Conn<'a, W> {
    export: &'a Export,
    structured: bool,
    contexts: &'a [MetaContext],
    settings: &'a Settings,
    writer: Mutex<W>,
    budget: Budget,
    /// Write payload buffers for reuse, and the bytes they hold.
    pool: Mutex<(Vec<IoBuf>, usize)>,
    /// Smoothed service time of small reads and writes, in nanoseconds.
    small_ns: AtomicU64,
    /// Set when a reply could not be sent: the connection is finished.
    dead: AtomicBool,
    /// Set once anything was written.
    wrote: AtomicBool,
    /// Connections of this server in their transmission phase, this one included.
    serving: &'a AtomicUsize,
    /// Called once when the connection must end at once (unblocks the reader).
    kill: &'a (dyn Fn() + Sync),
    label: &'a str,
}

/// Serves the transmission phase of one connection until the client disconnects
/// (`NBD_CMD_DISC` or EOF), breaks the protocol, or a reply cannot be sent. Requests
/// already read are always finished (and answered, if the client still listens)
/// before this returns. `reader` needs no buffering of its own.
///
/// `kill` must make blocked reads of `reader` return (for a socket: shut it down).
pub fn serve<R: RequestStream, W: ReplyWriter>(
    reader: R,
    writer: W,
    negotiated: &Negotiated,
    settings: &Settings,
    kill: &(dyn Fn() + Sync),
    label: &str,
) -> Result<()> {
    let _serving = Serving::enter(&negotiated.export.serving);
    let conn = Conn {
        export: &negotiated.export,
        structured: negotiated.structured,
        contexts: &negotiated.contexts,
        settings,
        writer: Mutex::new(writer),
        budget: Budget::new(settings.max_in_flight, settings.max_in_flight_bytes),
        pool: Mutex::new((Vec::new(), 0)),
        small_ns: AtomicU64::new(0),
        dead: AtomicBool::new(false),
        wrote: AtomicBool::new(false),
        serving: &negotiated.export.serving,
        kill,
        label,
    };
    let (tx, rx) = mpsc::sync_channel::<Request>(settings.max_in_flight);
    let rx = Mutex::new(rx);
    let result = thread::scope(|scope| {
        for _ in 0..settings.workers {
            scope.spawn(|| conn.work(&rx));
        }
        let r = conn.read_requests(Input::new(reader), &tx);
        drop(tx);
        r
    });
    if conn.wrote.load(Ordering::SeqCst) {
        if let Err(e) = conn.make_durable() {
            eprintln!("qcowx-nbd: {label}: flush at disconnect failed: {e}");
        }
    }
    result
}

/// One connection counted in its server's connections in transmission for as long
/// as this lives.
struct Serving<'a>(&'a AtomicUsize);

impl<'a> Serving<'a> {
    fn enter(count: &'a AtomicUsize) -> Serving<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        Serving(count)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{self, Write};
    use std::time::Duration;

    use zerocopy::{FromBytes, IntoBytes};

    use crate::wire::*;
    use input::INPUT_BUFFER;

    /// The default export of a new in-memory image of `size` bytes, negotiated with
    /// simple replies.
    fn memory_export(size: u64) -> Negotiated {
        use crate::exports::{ExportPlan, Exports};
        use qcowx_core::storage::MemStorage;
        use qcowx_core::{CreateOptions, Image};
        use std::sync::Arc;

        let image = Image::create_in(Arc::new(MemStorage::new()), &CreateOptions::new(size))
            .expect("create");
        let plan = ExportPlan::Auto {
            main_name: "default".into(),
            main_description: None,
        };
        let exports = Exports::new(Arc::new(image), plan, false).expect("exports");
        let info = exports.find("default").expect("find").expect("default");
        Negotiated {
            export: exports.open(&info).expect("open"),
            flags: 0,
            structured: false,
            contexts: Vec::new(),
        }
    }

    fn request(out: &mut Vec<u8>, command: u16, cookie: u64, offset: u64, len: u32) {
        let h = RequestHeader {
            magic: REQUEST_MAGIC.into(),
            flags: 0.into(),
            command: command.into(),
            cookie: cookie.into(),
            offset: offset.into(),
            length: len.into(),
        };
        out.extend_from_slice(h.as_bytes());
    }

    /// Small requests (run on the reader thread, replies sent in batches) and large
    /// ones (run by the workers), pipelined in one stream: every request gets exactly
    /// one reply, a read pipelined behind a write of the same range sees all of it or
    /// none of it (NBD does not order requests in flight; small requests go to the
    /// workers too when the machine is slow), and every write lands.
    #[test]
    fn reader_and_worker_requests_interleave() {
        use std::collections::HashMap;

        let n = memory_export(4 << 20);
        let settings = Settings::default();
        let big = INLINE_MAX * 4;
        let mut input = Vec::new();
        // cookie -> bytes a successful reply carries after its 16-byte header, and
        // the byte they must all hold.
        let mut expect: HashMap<u64, (usize, u8)> = HashMap::new();
        for i in 0..40u64 {
            let small_at = i * 4096;
            let big_at = (1 << 20) + (i % 8) * u64::from(big);
            let b = i as u8 + 1;
            request(&mut input, CMD_WRITE, 4 * i, small_at, 4096);
            input.resize(input.len() + 4096, b);
            expect.insert(4 * i, (0, 0));
            request(&mut input, CMD_WRITE, 4 * i + 1, big_at, big);
            input.resize(input.len() + big as usize, 0xee);
            expect.insert(4 * i + 1, (0, 0));
            request(&mut input, CMD_READ, 4 * i + 2, small_at, 4096);
            expect.insert(4 * i + 2, (4096, b));
            request(&mut input, CMD_FLUSH, 4 * i + 3, 0, 0);
            expect.insert(4 * i + 3, (0, 0));
        }
        let mut replies = Vec::new();
        serve(&input[..], &mut replies, &n, &settings, &|| {}, "test").expect("serve");
        let mut rest = &replies[..];
        while !rest.is_empty() {
            let r = SimpleReply::read_from_bytes(&rest[..16]).expect("reply header");
            assert_eq!(r.magic.get(), SIMPLE_REPLY_MAGIC);
            assert_eq!(r.error.get(), 0, "cookie {}", r.cookie.get());
            let (len, byte) = expect
                .remove(&r.cookie.get())
                .unwrap_or_else(|| panic!("unexpected reply for cookie {}", r.cookie.get()));
            let data = &rest[16..16 + len];
            assert!(
                data.iter().all(|&x| x == byte) || data.iter().all(|&x| x == 0),
                "cookie {}: a torn read",
                r.cookie.get()
            );
            rest = &rest[16 + len..];
        }
        assert!(expect.is_empty(), "no reply for {:?}", expect.keys());
        for i in 0..40u64 {
            let mut small = vec![0u8; 4096];
            n.export
                .disk
                .read_at(&mut small, i * 4096)
                .expect("read back");
            assert!(small.iter().all(|&x| x == i as u8 + 1), "small write {i}");
        }
        let mut buf = vec![0u8; big as usize];
        n.export.disk.read_at(&mut buf, 1 << 20).expect("read back");
        assert!(buf.iter().all(|&x| x == 0xee));
    }

    /// A peer that records the length of every write.
    #[derive(Default)]
    struct Writes(Vec<usize>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl ReplyWriter for Writes {}

    /// `count` pipelined 4 KiB writes (write `i` at `i * 4096`, all bytes `i`), and
    /// settings under which every one runs on the reading thread however slow this
    /// machine is at the moment (with the default limit, a loaded machine sends them
    /// to the workers).
    fn pipelined_writes(count: u64) -> (Vec<u8>, Settings) {
        let mut input = Vec::new();
        for i in 0..count {
            request(&mut input, CMD_WRITE, i, i * 4096, 4096);
            input.resize(input.len() + 4096, i as u8);
        }
        let settings = Settings {
            inline_limit: Duration::from_secs(3600),
            ..Settings::default()
        };
        (input, settings)
    }

    /// Replies to small pipelined requests go out every [`REPLY_EVERY`] requests, not
    /// only when the input buffer runs dry.
    #[test]
    fn replies_to_pipelined_small_writes_go_out_in_groups() {
        let n = memory_export(4 << 20);
        let count = 4 * REPLY_EVERY as u64;
        let (input, settings) = pipelined_writes(count);
        assert!(input.len() <= INPUT_BUFFER, "all of it in one socket read");
        let mut writes = Writes::default();
        serve(&input[..], &mut writes, &n, &settings, &|| {}, "test").expect("serve");
        // Simple replies, 16 bytes each, REPLY_EVERY to a write.
        assert_eq!(writes.0, vec![16 * REPLY_EVERY; 4], "{:?}", writes.0);
        let mut back = vec![0u8; 4096];
        n.export
            .disk
            .read_at(&mut back, (count - 1) * 4096)
            .expect("read back");
        assert!(back.iter().all(|&b| b == (count - 1) as u8));
    }

    /// While the server has a connection in transmission for every core (and at
    /// least two), the replies of all the requests one socket read brought in go out
    /// in one write; with this connection alone again, every REPLY_EVERY.
    #[test]
    fn replies_gather_for_the_whole_input_while_every_core_has_a_connection() {
        let n = memory_export(4 << 20);
        let count = 4 * REPLY_EVERY as u64;
        let (input, settings) = pipelined_writes(count);
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        // The other connections: with this one, as many as the cores, at least two.
        let others = cores.max(2) - 1;
        n.export.serving.fetch_add(others, Ordering::Relaxed);
        let mut writes = Writes::default();
        serve(&input[..], &mut writes, &n, &settings, &|| {}, "test").expect("serve");
        assert_eq!(writes.0, vec![16 * count as usize], "{:?}", writes.0);
        assert_eq!(
            n.export.serving.load(Ordering::Relaxed),
            others,
            "this one left"
        );
        n.export.serving.fetch_sub(others, Ordering::Relaxed);
        let mut writes = Writes::default();
        serve(&input[..], &mut writes, &n, &settings, &|| {}, "test").expect("serve");
        assert_eq!(writes.0, vec![16 * REPLY_EVERY; 4], "{:?}", writes.0);
    }
}
