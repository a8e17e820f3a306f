//! What the workspace's `soak_*.rs` test targets share: the libnbd client script of the
//! soak test of `qcowx-nbd` (tests/soak_server.rs, whose doc comment describes the test)
//! and the Rust helpers that make and check the data of its requests, which
//! tests/soak_model.rs checks against the script; and the soak test's stand-alone
//! helpers: the request [`Counts`], [`StopOnPanic`], the region checks
//! ([`assert_bytes_eq`], [`verify_through_nbd`]), [`rss_kib`] and [`env_u64`]. They use
//! it as `qcowx_tests::soak_tools`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;

use crate::libnbd_read_ranges;

/// A libnbd client. argv: URI, window. Prints `r CAN_CACHE` once connected; then for
/// each stdin line `plan PATH` runs the plan in PATH and prints `done`; `quit` ends it.
///
/// Plan lines: `W OFF LEN SEED FUA`, `Z OFF LEN NO_HOLE`, `T OFF LEN`, `C OFF LEN`
/// (cache), `R OFF LEN CRC32`, `F`. Write data is [`pattern_at`]'s. It never sends a
/// request overlapping one in flight. A failed request or a read whose CRC-32 differs
/// prints `fail ...` and exits with status 1.
pub const CLIENT_PY: &str = r#"
import nbd, struct, sys, zlib
uri, window = sys.argv[1], int(sys.argv[2])

def pat(seed, off, ln):
    w0 = off >> 4
    w1 = (off + ln + 15) >> 4
    n = w1 - w0
    vals = [0] * (2 * n)
    vals[0::2] = [seed] * n
    vals[1::2] = range(w0, w1)
    b = struct.pack(">%dQ" % (2 * n), *vals)
    s = off - (w0 << 4)
    return b[s:s + ln]

def fail(msg):
    sys.stdout.write("fail %s\n" % msg.replace("\n", " "))
    sys.stdout.flush()
    sys.exit(1)

h = nbd.NBD()
h.connect_uri(uri)
can_cache = h.can_cache()
print("r %d" % can_cache, flush=True)

def run(path):
    ops = [l.split() for l in open(path)]
    inflight = {}
    def reap():
        for c in list(inflight):
            i, lo, hi, buf, want = inflight[c]
            try:
                done = h.aio_command_completed(c)
            except nbd.Error as e:
                fail("request %d (%s): %s %s" % (i, " ".join(ops[i]), e.errno, e.string))
            if done:
                del inflight[c]
                if want is not None:
                    got = zlib.crc32(bytes(buf.to_bytearray()))
                    if got != want:
                        fail("request %d (%s): read data with CRC-32 %d" % (i, " ".join(ops[i]), got))
    i = 0
    while i < len(ops) or inflight:
        if i < len(ops):
            o = ops[i]
            off = int(o[1]) if len(o) > 1 else -1
            ln = int(o[2]) if len(o) > 2 else 0
            if len(inflight) >= window or (o[0] != "F" and any(
                    lo < off + ln and off < hi for (_, lo, hi, _, _) in inflight.values())):
                h.poll(1000)
                reap()
                continue
            buf, want = None, None
            try:
                if o[0] == "W":
                    buf = nbd.Buffer.from_bytearray(bytearray(pat(int(o[3]), off, ln)))
                    c = h.aio_pwrite(buf, off, flags=(nbd.CMD_FLAG_FUA if o[4] == "1" else 0))
                elif o[0] == "Z":
                    c = h.aio_zero(ln, off, flags=(nbd.CMD_FLAG_NO_HOLE if o[3] == "1" else 0))
                elif o[0] == "T":
                    c = h.aio_trim(ln, off)
                elif o[0] == "C":
                    c = h.aio_cache(ln, off)
                elif o[0] == "R":
                    buf = nbd.Buffer(ln)
                    want = int(o[3])
                    c = h.aio_pread(buf, off)
                else:
                    c = h.aio_flush()
            except nbd.Error as e:
                fail("sending request %d (%s): %s %s" % (i, " ".join(o), e.errno, e.string))
            inflight[c] = (i, off, off + ln, buf, want)
            i += 1
        else:
            h.poll(1000)
            reap()

for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
        break
    try:
        run(cmd[1])
    except nbd.Error as e:
        fail("%s %s" % (e.errno, e.string))
    print("done", flush=True)
h.shutdown()
"#;

/// The bytes `[off, off + len)` of the stream seed `seed` names: 16-byte words, each
/// the seed and the word's guest index (big-endian), so misplaced data is visible.
pub fn pattern_at(seed: u64, off: u64, len: u64) -> Vec<u8> {
    let w0 = off / 16;
    let w1 = (off + len).div_ceil(16);
    let mut v = Vec::with_capacity(((w1 - w0) * 16) as usize);
    for w in w0..w1 {
        v.extend_from_slice(&seed.to_be_bytes());
        v.extend_from_slice(&w.to_be_bytes());
    }
    let s = (off - w0 * 16) as usize;
    v[s..s + len as usize].to_vec()
}

/// CRC-32 (IEEE, as Python's `zlib.crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

// ---- counts --------------------------------------------------------------------------------

/// Requests by kind, over all clients.
#[derive(Debug, Default)]
pub struct Counts {
    /// Writes.
    pub writes: AtomicU64,
    /// Zero writes.
    pub zeroes: AtomicU64,
    /// Trims (discards).
    pub trims: AtomicU64,
    /// Reads.
    pub reads: AtomicU64,
    /// Flushes.
    pub flushes: AtomicU64,
    /// `CACHE` requests.
    pub caches: AtomicU64,
    /// `qemu-io` runs (one per batch).
    pub qemu_io_runs: AtomicU64,
    /// Plans the libnbd clients ran (one per batch).
    pub libnbd_batches: AtomicU64,
}

impl Counts {
    /// All requests (every kind above but the runs and batches).
    pub fn total(&self) -> u64 {
        [
            &self.writes,
            &self.zeroes,
            &self.trims,
            &self.reads,
            &self.flushes,
            &self.caches,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// Adds one to the count `c`.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

// ---- threads, checks, the environment ------------------------------------------------------

/// Sets `stop` when the thread holding it panics, so the others end early.
pub struct StopOnPanic(pub Arc<AtomicBool>);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Asserts that `got` equals `want` (both starting at guest offset `base`), naming the
/// first guest byte that differs.
pub fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8], base: u64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        let end = (at + 16).min(got.len());
        panic!(
            "{what}: guest byte {:#x} differs: got {:02x?}, want {:02x?}",
            base + at as u64,
            &got[at..end],
            &want[at..end]
        );
    }
}

/// The content of some regions of an export: (region base, bytes).
pub type Regions = Vec<(u64, Vec<u8>)>;

/// Reads `(what, uri, regions)` through libnbd and compares each with its content.
pub fn verify_through_nbd(checks: &[(String, String, Regions)], scratch: &Path) {
    let reads: Vec<(String, Vec<(u64, u64)>)> = checks
        .iter()
        .map(|(_, uri, regions)| {
            (
                uri.clone(),
                regions.iter().map(|(b, c)| (*b, c.len() as u64)).collect(),
            )
        })
        .collect();
    let got = libnbd_read_ranges(&reads, scratch);
    for ((what, _, regions), bytes) in checks.iter().zip(&got) {
        let mut at = 0;
        for (base, want) in regions {
            assert_bytes_eq(what, &bytes[at..at + want.len()], want, *base);
            at += want.len();
        }
    }
}

/// The value of the line `key` (such as `VmRSS:`, in KiB) of `/proc/PID/status`, if the
/// process and the line exist.
pub fn rss_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The environment variable `name` as a number, if it is set; panics if it is not one.
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}
