//! What the workspace's `kill_*.rs` test targets share: the model of the test that
//! kills `qcowx-nbd` with SIGKILL during a mixed workload (tests/kill_server.rs, whose
//! doc comment describes the test) and that tests/kill_model.rs checks. They use it as
//! `qcowx_tests::kill_tools`.
//!
//! * where the slots lie (three areas under three L2 tables, whole-cluster and
//!   quarter-cluster slots) and what each 4 KiB block written into them holds (the
//!   write's generation, the export and the block's address), so that a block read
//!   back tells exactly which write it came from;
//! * the requests of a client's plan;
//! * the libnbd client (a Python script, [`CLIENT_PY`]) and [`Client`], the process
//!   running it and its log;
//! * what a client's log allows an export to hold after a kill ([`allowed`]).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{ChildStdin, ExitStatus};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::*;

/// The cluster size of the image.
const CLUSTER: u64 = 64 << 10;
/// The unit of the content check: a write is never assumed atomic beyond a page.
pub const BLOCK: u64 = 4096;
/// Where the slots lie: under three different L2 tables (each maps 512 MiB), the last
/// one not at the start of its table.
pub const AREAS: [u64; 3] = [0, 512 << 20, (1 << 30) + (3 << 20)];
/// Per area: this many one-cluster slots, then...
const BIG_SLOTS: u64 = 8;
/// ...this many clusters split into quarter-cluster slots.
const SMALL_CLUSTERS: u64 = 4;
/// The length of a quarter-cluster slot.
const SMALL_SLOT: u64 = CLUSTER / 4;
/// The length of an area: its one-cluster slots and its quarter-cluster slots.
pub const AREA_LEN: u64 = (BIG_SLOTS + SMALL_CLUSTERS) * CLUSTER;
/// The blocks of an area.
const AREA_BLOCKS: usize = (AREA_LEN / BLOCK) as usize;
/// The used blocks: the blocks of every area, area after area.
pub const USED_BLOCKS: usize = AREA_BLOCKS * AREAS.len();
/// The generation of the content written before the first round (by the library,
/// into the default VDI, so `base` and both forks hold it).
pub const INIT_GEN: u64 = 1;
/// Requests each client may have in flight.
const WINDOW: usize = 8;
/// How long a client process may take to connect, pause or exit.
const CLIENT_WAIT: Duration = Duration::from_secs(60);
/// How the client reports errors of a connection that is gone (the server was
/// killed); any other error (an error reply) fails the test.
const DISCONNECTED: &str = "dead";

/// The libnbd client of one export. argv: URI, plan file, export index, window.
///
/// Plan lines: `W OFF LEN GEN FUA`, `Z OFF LEN NO_HOLE`, `T OFF LEN`, `F`. It prints
/// `r` once connected, `s I` before sending request I, `a I` when request I succeeded,
/// `p` when paused (stdin `pause`; nothing in flight), `done` when the plan is
/// exhausted, `e I WHY MSG` when request I failed and `x WHY MSG` when the handle
/// failed (then it exits with status 3); WHY is `dead` when the connection is gone,
/// else the errno. It never sends a request that overlaps one in
/// flight, so requests to one slot are answered in the order sent. Stdin `resume`
/// ends a pause; end of stdin ends the client.
pub const CLIENT_PY: &str = r#"
import nbd, struct, sys, threading, time
uri, plan_path, src, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def emit(s):
    sys.stdout.write(s + "\n")
    sys.stdout.flush()

def block(gen, blk):
    parts = []
    for s in range(8):
        parts.append(struct.pack(">QQ", gen, (src << 40) | (blk * 8 + s)))
        parts.append(bytes([(gen + s) % 251 + 1]) * 496)
    return b"".join(parts)

ops = []
for line in open(plan_path):
    f = line.split()
    if f[0] == "F":
        ops.append(("F", None, None, 0, 0))
    else:
        a = int(f[3]) if len(f) > 3 else 0
        b = int(f[4]) if len(f) > 4 else 0
        ops.append((f[0], int(f[1]), int(f[2]), a, b))

pause = threading.Event()
resume = threading.Event()
eof = threading.Event()
def stdin_reader():
    for line in sys.stdin:
        c = line.strip()
        if c == "pause":
            resume.clear()
            pause.set()
        elif c == "resume":
            pause.clear()
            resume.set()
    eof.set()
    resume.set()
threading.Thread(target=stdin_reader, daemon=True).start()

h = nbd.NBD()
inflight = {}

def why(e):
    # "dead": the connection is gone (the server was killed); else the error's errno.
    try:
        if h.aio_is_dead() or h.aio_is_closed():
            return "dead"
    except nbd.Error:
        pass
    return str(e.errno)

def reap():
    for c in list(inflight):
        i = inflight[c][0]
        try:
            done = h.aio_command_completed(c)
        except nbd.Error as e:
            emit("e %d %s %s" % (i, why(e), str(e.string).replace("\n", " ")))
            sys.exit(3)
        if done:
            del inflight[c]
            emit("a %d" % i)

def wait_some():
    h.poll(100)
    reap()

try:
    h.connect_uri(uri)
    emit("r")
    i = 0
    said_done = False
    while True:
        if eof.is_set() and not inflight:
            break
        if pause.is_set():
            while inflight:
                wait_some()
            emit("p")
            while pause.is_set() and not eof.is_set():
                resume.wait(0.05)
            continue
        if i < len(ops):
            kind, off, ln, a, b = ops[i]
            if len(inflight) >= window or (off is not None and any(
                    lo < off + ln and off < hi for (_, lo, hi, _) in inflight.values())):
                wait_some()
                continue
            emit("s %d" % i)
            buf = None
            if kind == "W":
                data = b"".join(block(a, (off >> 12) + k) for k in range(ln >> 12))
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                c = h.aio_pwrite(buf, off, flags=(nbd.CMD_FLAG_FUA if b else 0))
            elif kind == "Z":
                c = h.aio_zero(ln, off, flags=(nbd.CMD_FLAG_NO_HOLE if a else 0))
            elif kind == "T":
                c = h.aio_trim(ln, off)
            else:
                c = h.aio_flush()
            if off is None:
                inflight[c] = (i, -1, -1, buf)
            else:
                inflight[c] = (i, off, off + ln, buf)
            i += 1
        elif inflight:
            wait_some()
        else:
            if not said_done:
                emit("done")
                said_done = True
            time.sleep(0.01)
except nbd.Error as e:
    emit("x %s %s" % (why(e), str(e.string).replace("\n", " ")))
    sys.exit(3)
"#;

// ---- the slots and the content of a block ------------------------------------------------

/// A range of an export that every request of the plan covers exactly.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// Its guest offset.
    pub off: u64,
    /// Its length.
    pub len: u64,
    /// Index of its first block among the used blocks.
    pub first: usize,
    /// A whole cluster (trims are planned only on those).
    pub big: bool,
}

impl Slot {
    /// The indices of its blocks among the used blocks.
    pub fn blocks(&self) -> std::ops::Range<usize> {
        self.first..self.first + (self.len / BLOCK) as usize
    }
}

/// The slots of every area, area after area: the one-cluster slots, then the
/// quarter-cluster ones.
pub fn slots() -> Vec<Slot> {
    let mut v = Vec::new();
    for (a, &area) in AREAS.iter().enumerate() {
        let mut push = |off: u64, len: u64, big: bool| {
            let first = a * AREA_BLOCKS + ((off - area) / BLOCK) as usize;
            v.push(Slot {
                off,
                len,
                first,
                big,
            });
        };
        for c in 0..BIG_SLOTS {
            push(area + c * CLUSTER, CLUSTER, true);
        }
        for q in 0..SMALL_CLUSTERS * 4 {
            push(
                area + BIG_SLOTS * CLUSTER + q * SMALL_SLOT,
                SMALL_SLOT,
                false,
            );
        }
    }
    v
}

/// Guest offset of used block `u`.
pub fn block_offset(u: usize) -> u64 {
    AREAS[u / AREA_BLOCKS] + (u % AREA_BLOCKS) as u64 * BLOCK
}

/// The 4 KiB block that write generation `gen` (made on export `src`) puts at guest
/// block `blk`: eight 512-byte sectors, each starting with the generation and its own
/// address. Generation 0 is a block of zeros.
pub fn block_bytes(gen: u64, src: u64, blk: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK as usize);
    if gen == 0 {
        v.resize(BLOCK as usize, 0);
        return v;
    }
    for s in 0..8u64 {
        v.extend_from_slice(&gen.to_be_bytes());
        v.extend_from_slice(&((src << 40) | (blk * 8 + s)).to_be_bytes());
        v.extend(std::iter::repeat_n(((gen + s) % 251 + 1) as u8, 496));
    }
    v
}

/// Which export made each write generation.
pub type Sources = HashMap<u64, u64>;

/// The generation a block read back holds, after checking that it is exactly that
/// generation's block (not a torn or misplaced one).
pub fn identify(data: &[u8], u: usize, sources: &Sources) -> Result<u64, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let gen = u64::from_be_bytes(data[..8].try_into().expect("8 bytes"));
    let Some(&src) = sources.get(&gen) else {
        return Err(format!(
            "data of no write (first 16 bytes {:02x?})",
            &data[..16]
        ));
    };
    let want = block_bytes(gen, src, block_offset(u) / BLOCK);
    match data.iter().zip(&want).position(|(a, b)| a != b) {
        None => Ok(gen),
        Some(at) => Err(format!(
            "a damaged or misplaced block of generation {gen}: byte {at} differs \
             (sector header {:02x?})",
            &data[(at / 512) * 512..(at / 512) * 512 + 16]
        )),
    }
}

// ---- the plan of a client ----------------------------------------------------------------

/// What a request of a plan does.
#[derive(Debug, Clone, Copy)]
pub enum OpKind {
    /// A write of generation `gen`'s blocks, with FUA if `fua`.
    Write {
        /// The write's generation.
        gen: u64,
        /// Sent with the FUA flag.
        fua: bool,
    },
    /// A write of zeroes, with NO_HOLE if `no_hole`.
    Zero {
        /// Sent with the NO_HOLE flag.
        no_hole: bool,
    },
    /// A trim.
    Trim,
    /// A flush.
    Flush,
}

/// A request of a plan.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    /// What it does.
    pub kind: OpKind,
    /// The slot, for everything but flushes.
    pub slot: usize,
}

impl Op {
    /// What the blocks of its slot hold after it (`None` for a flush).
    pub fn value(&self) -> Option<u64> {
        match self.kind {
            OpKind::Write { gen, .. } => Some(gen),
            OpKind::Zero { .. } | OpKind::Trim => Some(0),
            OpKind::Flush => None,
        }
    }
}

// ---- a client process --------------------------------------------------------------------

/// One running client: its log lines (shared with a reader thread) and the events
/// `r`, `p`, `done`, `x` and `eof` with their line index.
pub struct Client {
    child: KillOnDrop,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    events: mpsc::Receiver<(String, usize)>,
    reader: Option<thread::JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
}

impl Client {
    /// Starts the client script `script` on export `export` (`uri`) with the plan in
    /// file `plan` and reads its output on a thread of its own.
    pub fn start(script: &Path, uri: &str, plan: &Path, export: usize) -> Client {
        let Piped {
            child,
            stdin,
            stdout: out,
            stderr,
        } = spawn_piped(
            python3_libnbd()
                .arg(script)
                .arg(uri)
                .arg(plan)
                .arg(export.to_string())
                .arg(WINDOW.to_string()),
            "start a libnbd client",
        );
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, events) = mpsc::channel();
        let l2 = Arc::clone(&lines);
        let reader = thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                let mut v = l2.lock().unwrap();
                let idx = v.len();
                let tag = l.split(' ').next().unwrap_or("").to_string();
                v.push(l);
                drop(v);
                if matches!(tag.as_str(), "r" | "p" | "done" | "x" | "e") {
                    let _ = tx.send((tag, idx));
                }
            }
            let _ = tx.send(("eof".to_string(), usize::MAX));
        });
        Client {
            child,
            stdin,
            lines,
            events,
            reader: Some(reader),
            stderr,
        }
    }

    /// Waits for event `tag`; `None` if the client failed or ended first.
    pub fn wait_event(&self, tag: &str) -> Option<usize> {
        let deadline = Instant::now() + CLIENT_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((t, i)) if t == tag => return Some(i),
                Ok((t, _)) if t == "x" || t == "e" || t == "eof" => return None,
                Ok(_) => {}
                Err(_) => panic!("a client did not report {tag:?} within {CLIENT_WAIT:?}"),
            }
        }
    }

    /// Writes `line` to the client's stdin (`pause`, `resume`); ignores a client
    /// that is gone.
    pub fn send(&mut self, line: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "{line}").and_then(|_| s.flush());
        }
    }

    /// Ends the client (closes its stdin), waits for it and returns its log.
    pub fn finish(mut self) -> (Vec<String>, ExitStatus, String) {
        self.stdin = None;
        let deadline = Instant::now() + CLIENT_WAIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for a client") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let s = self.child.wait().expect("wait for a client");
                panic!(
                    "a client did not exit within {CLIENT_WAIT:?} ({s}); stderr:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            thread::sleep(Duration::from_millis(5));
        };
        if let Some(r) = self.reader.take() {
            r.join().expect("client reader");
        }
        // stderr is drained by its own thread; give it a moment after the exit.
        thread::sleep(Duration::from_millis(10));
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        let err = self.stderr.lock().unwrap().clone();
        (lines, status, err)
    }
}

// ---- what a client's log allows ----------------------------------------------------------

/// Line positions of what one client did.
pub struct Log {
    /// Per request of the plan: the line that says it was sent.
    pub sent: Vec<Option<usize>>,
    /// Per request of the plan: the line that says it succeeded.
    pub acked: Vec<Option<usize>>,
    /// The line that says the client paused.
    pub pause: Option<usize>,
}

/// Reads the log `lines` of a client with a plan of `n` requests; fails the test (naming
/// `what`) on a request that failed other than by the kill, or on unexpected output.
pub fn parse_log(what: &str, lines: &[String], n: usize) -> Log {
    let mut log = Log {
        sent: vec![None; n],
        acked: vec![None; n],
        pause: None,
    };
    for (pos, l) in lines.iter().enumerate() {
        let f: Vec<&str> = l.split(' ').collect();
        let idx = || -> usize {
            f.get(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{what}: bad log line {l:?}"))
        };
        match f[0] {
            "s" => log.sent[idx()] = Some(pos),
            "a" => log.acked[idx()] = Some(pos),
            "p" => log.pause = Some(pos),
            "r" | "done" => {}
            "e" | "x" => {
                let errno = if f[0] == "e" { f.get(2) } else { f.get(1) };
                let errno = errno.copied().unwrap_or("None");
                assert!(
                    errno == DISCONNECTED,
                    "{what}: a request failed with {errno}, not because the server was killed: {l}"
                );
            }
            _ => panic!("{what}: unexpected client output {l:?}"),
        }
    }
    log
}

/// What one export may hold after the kill, block by block, and how many of its
/// requests were sent, acknowledged and durable.
pub struct Allowed {
    /// Per used block: the generations it may hold, the durable one first.
    pub candidates: Vec<Vec<u64>>,
    /// Requests sent.
    pub sent: usize,
    /// Requests acknowledged.
    pub acked: usize,
    /// Requests known durable: acknowledged with FUA or before a flush that completed.
    pub durable: usize,
    /// Flushes that completed.
    pub flushes: usize,
}

/// What an export may hold after the kill, block by block, given its `plan`, its client's
/// `log` and what it held when the round began (`base`): a request known durable is
/// present unless a later request to its slot was sent; otherwise a block holds its
/// `base` content or that of a request sent to its slot.
pub fn allowed(plan: &[Op], log: &Log, slots: &[Slot], base: &[u64]) -> Allowed {
    let cutoff = plan
        .iter()
        .enumerate()
        .filter(|(i, op)| matches!(op.kind, OpKind::Flush) && log.acked[*i].is_some())
        .filter_map(|(i, _)| log.sent[i])
        .max();
    let durable = |i: usize| -> bool {
        let Some(a) = log.acked[i] else { return false };
        matches!(plan[i].kind, OpKind::Write { fua: true, .. }) || cutoff.is_some_and(|c| a < c)
    };
    let mut order: Vec<usize> = (0..plan.len()).filter(|&i| log.sent[i].is_some()).collect();
    order.sort_by_key(|&i| log.sent[i]);
    let mut per_slot: Vec<Vec<usize>> = vec![Vec::new(); slots.len()];
    for &i in &order {
        if plan[i].value().is_some() {
            per_slot[plan[i].slot].push(i);
        }
    }
    let mut candidates: Vec<Vec<u64>> = base.iter().map(|&g| vec![g]).collect();
    for (s, ops) in per_slot.iter().enumerate() {
        let from = ops.iter().rposition(|&i| durable(i));
        for u in slots[s].blocks() {
            let c = &mut candidates[u];
            if from.is_some() {
                c.clear();
            }
            for &i in &ops[from.unwrap_or(0)..] {
                let v = plan[i].value().expect("not a flush");
                if !c.contains(&v) {
                    c.push(v);
                }
            }
        }
    }
    Allowed {
        candidates,
        sent: order.len(),
        acked: log.acked.iter().filter(|a| a.is_some()).count(),
        durable: (0..plan.len()).filter(|&i| durable(i)).count(),
        flushes: plan
            .iter()
            .enumerate()
            .filter(|(i, op)| matches!(op.kind, OpKind::Flush) && log.acked[*i].is_some())
            .count(),
    }
}
