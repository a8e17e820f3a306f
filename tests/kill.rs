//! `qcowx-nbd` killed with SIGKILL at random moments during a mixed workload on
//! several exports, restarted on the crashed image, again and again.
//!
//! The image holds three writable exports: the default VDI and two VDIs forked from a
//! snapshot of it (`base`), so the forks write through read-only links (copy on
//! write). Each round starts one libnbd client (Python `nbd`) per export, each with
//! several requests in flight, running a plan of writes (some with FUA), zero writes,
//! trims and flushes over fixed slots: whole clusters and quarter clusters (partial
//! copy-on-write). Every write fills its slot with blocks that name the write (a
//! globally unique generation number), the export and the block address, so any block
//! read back tells exactly which write it came from. The clients log every request
//! they send and every reply they get; in some rounds the test also pauses one
//! export's client, takes a live snapshot of that export through the control socket
//! (`qcowx snapshot`, forwarded to the server), deletes an older snapshot or runs
//! `qcowx gc`. At a random moment the server is killed with SIGKILL.
//!
//! After each kill:
//!
//! * `qcowx check` finds no damage in the crashed image (structure and invariant W;
//!   its errors, if any, are stale refcounts of a dirty image); every third round
//!   `qcowx check --repair` runs and `qemu-img check` must then find the image clean;
//! * the server restarts on the image and every export reads back, block by block,
//!   as the clients' logs allow: a write acknowledged before a flush that completed (or
//!   acknowledged with FUA) is present, unless a later request to the same slot was
//!   sent; otherwise a block holds the content it had when the round began or the
//!   content of a request sent to its slot during the round — never anything else;
//! * every snapshot reported created is listed and reads exactly as its export did when
//!   it was taken (the export's client was paused and all its requests answered); a
//!   snapshot reported deleted is gone; one whose command was cut by the kill either
//!   exists, exact, or does not.
//!
//! The last round ends with SIGTERM instead; then `qemu-img check` must report no error
//! and no leak, and QEMU's reader (`qemu-img convert`, the default VDI and every VDI
//! head and snapshot) must agree with the model.
//!
//! The random seed is printed; `QCOWX_KILL_SEED` replays a run and
//! `QCOWX_KILL_ROUNDS` (default 40) sets the number of rounds. Needs `qemu-utils` and
//! `python3-libnbd`.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{ChildStdin, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use qcowx_core::{CreateOptions, Image};
use qcowx_tests::*;

/// The writable exports: the default VDI and two forks of snapshot `base`.
const EXPORTS: [&str; 3] = ["default", "v1", "v2"];
const VIRTUAL_SIZE: u64 = 2 << 30;
const CLUSTER: u64 = 64 << 10;
/// The unit of the content check: a write is never assumed atomic beyond a page.
const BLOCK: u64 = 4096;
/// Where the slots lie: under three different L2 tables (each maps 512 MiB), the last
/// one not at the start of its table.
const AREAS: [u64; 3] = [0, 512 << 20, (1 << 30) + (3 << 20)];
/// Per area: this many one-cluster slots, then...
const BIG_SLOTS: u64 = 8;
/// ...this many clusters split into quarter-cluster slots.
const SMALL_CLUSTERS: u64 = 4;
const SMALL_SLOT: u64 = CLUSTER / 4;
const AREA_LEN: u64 = (BIG_SLOTS + SMALL_CLUSTERS) * CLUSTER;
const AREA_BLOCKS: usize = (AREA_LEN / BLOCK) as usize;
const USED_BLOCKS: usize = AREA_BLOCKS * AREAS.len();
/// The generation of the content written before the first round (by the library,
/// into the default VDI, so `base` and both forks hold it).
const INIT_GEN: u64 = 1;
/// Requests each client may have in flight.
const WINDOW: usize = 8;
/// Requests planned per client and round (more than a round has time for).
const PLAN_OPS: usize = 3000;
/// Kill delays, counted from the moment every client is connected.
const KILL_MIN_MS: u64 = 30;
const KILL_MAX_MS: u64 = 900;
/// Snapshots (besides `base`) kept: older ones are deleted in later rounds.
const MAX_SNAPSHOTS: usize = 5;
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
const CLIENT_PY: &str = r#"
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
struct Slot {
    off: u64,
    len: u64,
    /// Index of its first block among the used blocks.
    first: usize,
    /// A whole cluster (trims are planned only on those).
    big: bool,
}

impl Slot {
    fn blocks(&self) -> std::ops::Range<usize> {
        self.first..self.first + (self.len / BLOCK) as usize
    }
}

fn slots() -> Vec<Slot> {
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
fn block_offset(u: usize) -> u64 {
    AREAS[u / AREA_BLOCKS] + (u % AREA_BLOCKS) as u64 * BLOCK
}

/// The ranges that hold the used blocks, in used-block order.
fn used_ranges() -> Vec<(u64, u64)> {
    AREAS.iter().map(|&a| (a, AREA_LEN)).collect()
}

/// The 4 KiB block that write generation `gen` (made on export `src`) puts at guest
/// block `blk`: eight 512-byte sectors, each starting with the generation and its own
/// address. Generation 0 is a block of zeros.
fn block_bytes(gen: u64, src: u64, blk: u64) -> Vec<u8> {
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
type Sources = HashMap<u64, u64>;

/// The generation a block read back holds, after checking that it is exactly that
/// generation's block (not a torn or misplaced one).
fn identify(data: &[u8], u: usize, sources: &Sources) -> Result<u64, String> {
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

/// The bytes the used ranges of a disk hold under `model`.
fn model_bytes(model: &[u64], sources: &Sources) -> Vec<u8> {
    let mut v = Vec::with_capacity(USED_BLOCKS * BLOCK as usize);
    for (u, &g) in model.iter().enumerate() {
        let src = if g == 0 { 0 } else { sources[&g] };
        v.extend(block_bytes(g, src, block_offset(u) / BLOCK));
    }
    v
}

// ---- the plan of a client ----------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum OpKind {
    Write { gen: u64, fua: bool },
    Zero { no_hole: bool },
    Trim,
    Flush,
}

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: OpKind,
    /// The slot, for everything but flushes.
    slot: usize,
}

impl Op {
    /// What the blocks of its slot hold after it (`None` for a flush).
    fn value(&self) -> Option<u64> {
        match self.kind {
            OpKind::Write { gen, .. } => Some(gen),
            OpKind::Zero { .. } | OpKind::Trim => Some(0),
            OpKind::Flush => None,
        }
    }
}

/// A random plan. Flushes are frequent in some rounds and rare in others (per mille:
/// 2, 20 or 80), so that kills find both little and much unflushed data.
fn make_plan(
    rng: &mut Rng,
    slots: &[Slot],
    export: usize,
    next_gen: &mut u64,
    sources: &mut Sources,
) -> Vec<Op> {
    let flush = [2, 20, 80][rng.below(3) as usize];
    (0..PLAN_OPS)
        .map(|_| {
            let slot = rng.below(slots.len() as u64) as usize;
            let r = rng.below(1000);
            let kind = if r < flush {
                OpKind::Flush
            } else if r < 140 && slots[slot].big {
                OpKind::Trim
            } else if r < 240 {
                OpKind::Zero {
                    no_hole: rng.chance(1, 2),
                }
            } else {
                let gen = *next_gen;
                *next_gen += 1;
                sources.insert(gen, export as u64);
                OpKind::Write {
                    gen,
                    fua: rng.chance(1, 10),
                }
            };
            Op { kind, slot }
        })
        .collect()
}

fn plan_text(plan: &[Op], slots: &[Slot]) -> String {
    let mut s = String::new();
    for op in plan {
        let sl = &slots[op.slot];
        let line = match op.kind {
            OpKind::Write { gen, fua } => format!("W {} {} {gen} {}\n", sl.off, sl.len, fua as u8),
            OpKind::Zero { no_hole } => format!("Z {} {} {}\n", sl.off, sl.len, no_hole as u8),
            OpKind::Trim => format!("T {} {}\n", sl.off, sl.len),
            OpKind::Flush => "F\n".to_string(),
        };
        s.push_str(&line);
    }
    s
}

// ---- a client process --------------------------------------------------------------------

/// One running client: its log lines (shared with a reader thread) and the events
/// `r`, `p`, `done`, `x` and `eof` with their line index.
struct Client {
    child: KillOnDrop,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    events: mpsc::Receiver<(String, usize)>,
    reader: Option<thread::JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
}

impl Client {
    fn start(script: &Path, uri: &str, plan: &Path, export: usize) -> Client {
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
    fn wait_event(&self, tag: &str) -> Option<usize> {
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

    fn send(&mut self, line: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "{line}").and_then(|_| s.flush());
        }
    }

    /// Ends the client (closes its stdin), waits for it and returns its log.
    fn finish(mut self) -> (Vec<String>, ExitStatus, String) {
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
struct Log {
    sent: Vec<Option<usize>>,
    acked: Vec<Option<usize>>,
    pause: Option<usize>,
}

fn parse_log(what: &str, lines: &[String], n: usize) -> Log {
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
struct Allowed {
    candidates: Vec<Vec<u64>>,
    sent: usize,
    acked: usize,
    durable: usize,
    flushes: usize,
}

fn allowed(plan: &[Op], log: &Log, slots: &[Slot], base: &[u64]) -> Allowed {
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

/// The content of an export when its client reported itself paused at line `pause`:
/// every request sent before that was answered, in order per slot.
fn paused_model(
    what: &str,
    plan: &[Op],
    log: &Log,
    slots: &[Slot],
    base: &[u64],
    pause: usize,
) -> Vec<u64> {
    let mut order: Vec<usize> = (0..plan.len())
        .filter(|&i| log.sent[i].is_some_and(|s| s < pause))
        .collect();
    order.sort_by_key(|&i| log.sent[i]);
    let mut model = base.to_vec();
    for i in order {
        assert!(
            log.acked[i].is_some_and(|a| a < pause),
            "{what}: request {i} was not answered when the client said it was paused"
        );
        if let Some(v) = plan[i].value() {
            for u in slots[plan[i].slot].blocks() {
                model[u] = v;
            }
        }
    }
    model
}

// ---- snapshots ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapState {
    /// Reported created (or seen after a restart): must exist.
    Live,
    /// Its command was cut short by the kill: may or may not exist.
    MaybeCreated,
    /// Reported created, but the kill came while the command ran: the server may have
    /// taken it, exactly as the paused export was, or, if the kill came before the
    /// command reached the server, `qcowx` may have taken it itself on the crashed
    /// image (it opens an image nobody locks), as the export reads after the restart.
    CreatedAroundKill,
    /// Its deletion was cut short by the kill: may or may not exist.
    MaybeDeleted,
}

#[derive(Debug)]
struct Snap {
    name: String,
    export: usize,
    model: Vec<u64>,
    state: SnapState,
}

// ---- the test ----------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// Runs `qcowx ARGS` (`{}` in ARGS stands for the image); returns its output.
fn qcowx(server: &QcowxNbd, args: &[&str], image: &Path) -> std::process::Output {
    let image = image.to_str().expect("a UTF-8 path");
    run(server
        .qcowx()
        .args(args.iter().map(|&a| if a == "{}" { image } else { a })))
}

fn root_names(server: &QcowxNbd, image: &Path) -> Vec<(String, String)> {
    let out = qcowx(server, &["list", "--output=json", "{}"], image);
    assert!(out.status.success(), "qcowx list: {}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("qcowx list output is not JSON ({e}): {}", describe(&out)));
    v["roots"]
        .as_array()
        .expect("roots")
        .iter()
        .map(|r| {
            (
                r["name"].as_str().expect("name").to_string(),
                r["kind"].as_str().expect("kind").to_string(),
            )
        })
        .collect()
}

/// Asserts that `qcowx check` (no repair) finds no damage to the structure of the
/// crashed image: its errors, if any, are stale refcounts (the image is dirty); returns
/// the leaked clusters it reports (a crash may leave orphans, which are harmless).
fn check_crashed(image: &Path, what: &str) -> u64 {
    let out = run(Command::new(qcowx_cli_bin())
        .args(["check", "--output=json"])
        .arg(image));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let corruptions = v["corruptions"].as_u64().unwrap_or(0);
    let stale = v["stale-corruptions"].as_u64().unwrap_or(0);
    assert!(
        matches!(out.status.code(), Some(0) | Some(2) | Some(3))
            && v["check-errors"] == 0
            && corruptions == stale
            && (stale == 0 || v["dirty-flag"] == true),
        "{what}: qcowx check finds damage in the crashed image: {}",
        describe(&out)
    );
    v["leaks"].as_u64().unwrap_or(0)
}

/// `qcowx check --repair`, then `qemu-img check` must be clean.
fn repair_and_qemu_check(image: &Path, what: &str) {
    let out = run(Command::new(qcowx_cli_bin())
        .args(["check", "--repair", "--output=json"])
        .arg(image));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.code() == Some(0) && v["check-errors"] == 0 && v.get("corruptions").is_none(),
        "{what}: qcowx check --repair of the crashed image failed: {}",
        describe(&out)
    );
    assert_qemu_check_clean(image);
}

/// Compares the used blocks read back with what is allowed; returns what they hold.
fn check_blocks(what: &str, bytes: &[u8], allowed: &[Vec<u64>], sources: &Sources) -> Vec<u64> {
    assert_eq!(
        bytes.len(),
        USED_BLOCKS * BLOCK as usize,
        "{what}: short read"
    );
    (0..USED_BLOCKS)
        .map(|u| {
            let data = &bytes[u * BLOCK as usize..(u + 1) * BLOCK as usize];
            let g = identify(data, u, sources).unwrap_or_else(|e| {
                panic!(
                    "{what}: guest offset {:#x} holds {e}; allowed: generations {:?}",
                    block_offset(u),
                    allowed[u]
                )
            });
            assert!(
                allowed[u].contains(&g),
                "{what}: guest offset {:#x} holds generation {g}, allowed only {:?}",
                block_offset(u),
                allowed[u]
            );
            g
        })
        .collect()
}

/// Reads back the used blocks of every export and of every snapshot that exists,
/// checks them and settles the snapshots' states.
fn verify_after_restart(
    what: &str,
    server: &QcowxNbd,
    image: &Path,
    scratch: &Path,
    allowed: &[Vec<Vec<u64>>],
    snaps: &mut Vec<Snap>,
    sources: &Sources,
) -> Verified {
    let roots = root_names(server, image);
    let names: HashSet<&str> = roots.iter().map(|(n, _)| n.as_str()).collect();
    for e in EXPORTS {
        assert!(names.contains(e), "{what}: VDI {e} is gone: {roots:?}");
    }
    for (n, kind) in &roots {
        assert!(
            EXPORTS.contains(&n.as_str()) || snaps.iter().any(|s| &s.name == n),
            "{what}: unexpected {kind} {n} after the restart: {roots:?}"
        );
    }
    // Settle the snapshots whose commands the kill cut short; a reported deletion is
    // final (such snapshots are no longer tracked).
    snaps.retain_mut(|s| {
        let exists = names.contains(s.name.as_str());
        match s.state {
            SnapState::Live => {
                assert!(
                    exists,
                    "{what}: snapshot {} was reported created but is gone",
                    s.name
                );
                true
            }
            SnapState::CreatedAroundKill => {
                assert!(
                    exists,
                    "{what}: snapshot {} was reported created but is gone",
                    s.name
                );
                true
            }
            SnapState::MaybeCreated | SnapState::MaybeDeleted => {
                s.state = SnapState::Live;
                exists
            }
        }
    });
    let mut reads: Vec<(String, Vec<(u64, u64)>)> = EXPORTS
        .iter()
        .map(|e| (server.uri(e), used_ranges()))
        .collect();
    for s in snaps.iter() {
        reads.push((
            server.uri(&format!("{}@{}", EXPORTS[s.export], s.name)),
            used_ranges(),
        ));
    }
    let bytes = libnbd_read_ranges(&reads, scratch);
    let held: Vec<Vec<u64>> = (0..EXPORTS.len())
        .map(|e| {
            check_blocks(
                &format!("{what}: export {}", EXPORTS[e]),
                &bytes[e],
                &allowed[e],
                sources,
            )
        })
        .collect();
    // The first candidate is the durable state; others come from unflushed requests.
    let newer: usize = (0..EXPORTS.len())
        .map(|e| {
            (0..USED_BLOCKS)
                .filter(|&u| held[e][u] != allowed[e][u][0])
                .count()
        })
        .sum();
    let open: usize = (0..EXPORTS.len())
        .map(|e| {
            (0..USED_BLOCKS)
                .filter(|&u| allowed[e][u].len() > 1)
                .count()
        })
        .sum();
    for (s, b) in snaps.iter_mut().zip(&bytes[EXPORTS.len()..]) {
        let label = format!("{what}: snapshot {} of {}", s.name, EXPORTS[s.export]);
        if s.state == SnapState::CreatedAroundKill {
            let either: Vec<Vec<u64>> = s
                .model
                .iter()
                .zip(&held[s.export])
                .map(|(&a, &b)| vec![a, b])
                .collect();
            let got = check_blocks(&label, b, &either, sources);
            assert!(
                got == s.model || got == held[s.export],
                "{label}: neither the paused export nor the export after the restart"
            );
            s.model = got;
            s.state = SnapState::Live;
        } else {
            let exact: Vec<Vec<u64>> = s.model.iter().map(|&g| vec![g]).collect();
            check_blocks(&label, b, &exact, sources);
        }
    }
    Verified { held, open, newer }
}

/// What [`verify_after_restart`] found.
struct Verified {
    /// What each export holds.
    held: Vec<Vec<u64>>,
    /// Blocks that had requests not known to be durable.
    open: usize,
    /// Blocks that hold data of such requests.
    newer: usize,
}

/// How a `qcowx` control command of a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not run: the kill came first.
    Skipped,
    /// It succeeded; `after_kill`: the kill came while it ran.
    Done { after_kill: bool },
    /// It failed, after the kill.
    Cut,
}

/// Runs one `qcowx` control command during a round; panics if it fails while the
/// server runs.
fn control(
    server: &QcowxNbd,
    args: &[&str],
    image: &Path,
    killed: &AtomicBool,
    what: &str,
) -> Outcome {
    if killed.load(Ordering::SeqCst) {
        return Outcome::Skipped;
    }
    let out = qcowx(server, args, image);
    let after_kill = killed.load(Ordering::SeqCst);
    if out.status.success() {
        return Outcome::Done { after_kill };
    }
    assert!(
        after_kill,
        "{what}: `qcowx {}` failed while the server was running: {}\nserver stderr:\n{}",
        args.join(" "),
        describe(&out),
        server.stderr()
    );
    Outcome::Cut
}

#[test]
fn sigkill_at_random_moments_loses_no_flushed_write_and_no_snapshot() {
    let seed = env_u64("QCOWX_KILL_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let rounds = env_u64("QCOWX_KILL_ROUNDS").unwrap_or(40) as usize;
    eprintln!("kill test: seed {seed} (QCOWX_KILL_SEED={seed} replays it), {rounds} rounds");
    let mut rng = Rng::new(seed);
    // Build (or find) the binaries before the clock starts.
    qcowx_nbd_bin();
    qcowx_cli_bin();
    let started = Instant::now();

    let dir = tempdir();
    let image = dir.path().join("disk.qcow2");
    let sock = dir.path().join("nbd.sock");
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).expect("runtime dir");
    let script = dir.path().join("client.py");
    std::fs::write(&script, CLIENT_PY).expect("write the client script");
    let slots = slots();

    // The initial content, written by the library into the default VDI, then shared
    // by snapshot `base` and the two forks.
    let mut sources: Sources = HashMap::from([(INIT_GEN, 0)]);
    {
        let img = Image::create(&image, &CreateOptions::new(VIRTUAL_SIZE)).expect("create");
        let init: Vec<u64> = vec![INIT_GEN; USED_BLOCKS];
        let bytes = model_bytes(&init, &sources);
        for (a, &(off, len)) in used_ranges().iter().enumerate() {
            let from = a * AREA_LEN as usize;
            img.write_at(&bytes[from..from + len as usize], off)
                .expect("write the initial content");
        }
        img.snapshot("default", "base").expect("snapshot base");
        img.fork("base", "v1").expect("fork v1");
        img.fork("base", "v2").expect("fork v2");
        img.close().expect("close");
    }
    let mut held: Vec<Vec<u64>> = vec![vec![INIT_GEN; USED_BLOCKS]; EXPORTS.len()];
    let mut snaps: Vec<Snap> = vec![Snap {
        name: "base".into(),
        export: 0,
        model: vec![INIT_GEN; USED_BLOCKS],
        state: SnapState::Live,
    }];
    let mut next_gen = INIT_GEN + 1;
    let mut next_snap = 1;
    let server_args = ["-t", "--discard=unmap"];
    let mut server = QcowxNbd::start(&image, &sock, &runtime, &server_args);
    let (mut total_sent, mut total_durable, mut snapshots_taken, mut gcs, mut deletes) =
        (0, 0, 0, 0, 0);

    for round in 0..rounds {
        let what = format!("seed {seed}, round {round}");
        let plans: Vec<Vec<Op>> = (0..EXPORTS.len())
            .map(|e| make_plan(&mut rng, &slots, e, &mut next_gen, &mut sources))
            .collect();
        let mut clients: Vec<Client> = plans
            .iter()
            .enumerate()
            .map(|(e, plan)| {
                let p = dir.path().join(format!("plan-{e}.txt"));
                std::fs::write(&p, plan_text(plan, &slots)).expect("write a plan");
                Client::start(&script, &server.uri(EXPORTS[e]), &p, e)
            })
            .collect();
        for (e, c) in clients.iter().enumerate() {
            assert!(
                c.wait_event("r").is_some(),
                "{what}: the client of {} could not connect; server stderr:\n{}",
                EXPORTS[e],
                server.stderr()
            );
        }

        // The kill, on its own thread.
        let kill_ms = rng.range(KILL_MIN_MS, KILL_MAX_MS + 1);
        let killed = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let killer = {
            let killed = Arc::clone(&killed);
            let pid = server.pid();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(kill_ms));
                killed.store(true, Ordering::SeqCst);
                send_signal(pid, "KILL");
            })
        };
        // Maybe a gc, on its own thread.
        let gc = rng.chance(1, 3).then(|| {
            let at = rng.below(kill_ms + 50);
            let killed = Arc::clone(&killed);
            let cmd = server.qcowx();
            let image = image.clone();
            let what = what.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(at));
                if killed.load(Ordering::SeqCst) {
                    return false;
                }
                let mut cmd = cmd;
                let out = run(cmd.args(["gc", "--output=json"]).arg(&image));
                assert!(
                    out.status.success() || killed.load(Ordering::SeqCst),
                    "{what}: qcowx gc failed while the server was running: {}",
                    describe(&out)
                );
                out.status.success()
            })
        });
        // Maybe a deletion of an older snapshot, then maybe a live snapshot.
        let mut actions: Vec<(u64, bool)> = Vec::new(); // (at ms, is_snapshot)
        let deletable = snaps.iter().filter(|s| s.name != "base").count();
        if deletable >= MAX_SNAPSHOTS || (deletable > 1 && rng.chance(1, 5)) {
            actions.push((rng.below(kill_ms), false));
        }
        if rng.chance(2, 5) {
            actions.push((rng.below(kill_ms + 100), true));
        }
        actions.sort();
        let mut snap_note = String::new();
        for (at, is_snapshot) in actions {
            let due = t0 + Duration::from_millis(at);
            thread::sleep(due.saturating_duration_since(Instant::now()));
            if killed.load(Ordering::SeqCst) {
                break;
            }
            if !is_snapshot {
                let i = snaps
                    .iter()
                    .position(|s| s.name != "base")
                    .expect("a snapshot to delete");
                let name = snaps[i].name.clone();
                let args = ["delete", "--snapshot", name.as_str(), "{}"];
                match control(&server, &args, &image, &killed, &what) {
                    Outcome::Done { .. } => {
                        snaps.remove(i);
                        deletes += 1;
                    }
                    Outcome::Cut => snaps[i].state = SnapState::MaybeDeleted,
                    Outcome::Skipped => {}
                }
                continue;
            }
            let e = rng.below(EXPORTS.len() as u64) as usize;
            clients[e].send("pause");
            if clients[e].wait_event("p").is_none() {
                continue; // the kill came first
            }
            let name = format!("k{next_snap}");
            next_snap += 1;
            let args = ["snapshot", "--vdi", EXPORTS[e], "{}", name.as_str()];
            let outcome = control(&server, &args, &image, &killed, &what);
            clients[e].send("resume");
            let (state, note) = match outcome {
                Outcome::Skipped => continue,
                Outcome::Done { after_kill: false } => (SnapState::Live, "done"),
                Outcome::Done { after_kill: true } => {
                    (SnapState::CreatedAroundKill, "done as the kill came")
                }
                Outcome::Cut => (SnapState::MaybeCreated, "cut"),
            };
            if outcome != Outcome::Cut {
                snapshots_taken += 1;
            }
            // The model is filled in from the log once the round is over.
            snaps.push(Snap {
                name: name.clone(),
                export: e,
                model: Vec::new(),
                state,
            });
            snap_note = format!(", snapshot {name} of {} ({note})", EXPORTS[e]);
        }
        killer.join().expect("killer thread");
        let status = server.wait_exit();
        assert!(
            !status.success(),
            "{what}: the server survived SIGKILL ({status})"
        );
        let gc_note = match gc.map(|g| g.join().expect("gc thread")) {
            Some(true) => {
                gcs += 1;
                ", gc done"
            }
            Some(false) => ", gc cut",
            None => "",
        };

        // What the clients did.
        let mut allowed_all = Vec::new();
        let mut note = String::new();
        for (e, c) in clients.drain(..).enumerate() {
            let who = format!("{what}, client of {}", EXPORTS[e]);
            let (lines, status, stderr) = c.finish();
            assert!(
                matches!(status.code(), Some(0) | Some(3)),
                "{who}: exited with {status}; stderr:\n{stderr}"
            );
            let log = parse_log(&who, &lines, plans[e].len());
            let a = allowed(&plans[e], &log, &slots, &held[e]);
            note.push_str(&format!(
                " {}: {} sent, {} acked, {} durable, {} flushes;",
                EXPORTS[e], a.sent, a.acked, a.durable, a.flushes
            ));
            total_sent += a.sent;
            total_durable += a.durable;
            // A pause with no snapshot request (the kill came first) needs nothing.
            let pending = snaps
                .iter_mut()
                .find(|s| s.export == e && s.model.is_empty());
            if let (Some(p), Some(s)) = (log.pause, pending) {
                s.model = paused_model(&who, &plans[e], &log, &slots, &held[e], p);
            }
            allowed_all.push(a.candidates);
        }

        // The crashed image, before anything opens it for writing.
        let leaks = check_crashed(&image, &what);
        let leak_note = if leaks > 0 {
            format!(", {leaks} leaked clusters")
        } else {
            String::new()
        };
        let repair_note = if round % 3 == 2 {
            repair_and_qemu_check(&image, &what);
            ", repaired, qemu-img check clean"
        } else {
            ""
        };
        // Restart on it and read everything back.
        server = QcowxNbd::start(&image, &sock, &runtime, &server_args);
        let v = verify_after_restart(
            &what,
            &server,
            &image,
            dir.path(),
            &allowed_all,
            &mut snaps,
            &sources,
        );
        held = v.held;
        eprintln!(
            "round {round}: killed after {kill_ms} ms;{}{snap_note}{gc_note}{leak_note}{repair_note}; \
             {} blocks had requests not known durable, {} of them hold their data",
            note.trim_end_matches(';'),
            v.open,
            v.newer
        );
    }

    // A clean shutdown: exact refcounts, nothing leaked; QEMU reads what the model says.
    server.stop();
    assert_qemu_check_clean(&image);
    let raw = dir.path().join("qemu.raw");
    let mut qemu_views: Vec<(String, Vec<u64>)> = vec![("default".into(), held[0].clone())];
    for (e, name) in EXPORTS.iter().enumerate().skip(1) {
        qemu_views.push((format!("vdi:{name}"), held[e].clone()));
    }
    for s in &snaps {
        qemu_views.push((s.name.clone(), s.model.clone()));
    }
    for (name, model) in &qemu_views {
        let _ = std::fs::remove_file(&raw);
        if name == "default" {
            convert_to_raw(&image, &raw);
        } else {
            convert_snapshot_to_raw(&image, name, &raw);
        }
        let mut bytes = Vec::new();
        for (off, len) in used_ranges() {
            bytes.extend(read_at(&raw, off, len as usize));
        }
        let exact: Vec<Vec<u64>> = model.iter().map(|&g| vec![g]).collect();
        check_blocks(
            &format!("seed {seed}, after shutdown: qemu-img convert of {name}"),
            &bytes,
            &exact,
            &sources,
        );
    }
    let _ = std::fs::remove_file(&raw);
    eprintln!(
        "kill test: {rounds} kills, {total_sent} requests sent ({total_durable} durable when killed), \
         {snapshots_taken} live snapshots, {deletes} deletions, {gcs} gc runs, {} snapshots at the end, \
         {:.1} s",
        snaps.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The helpers agree with the client script on the content of a block.
#[test]
fn python_and_rust_blocks_agree() {
    let dir = tempdir();
    let script = dir.path().join("block.py");
    let body = CLIENT_PY
        .split("ops = []")
        .next()
        .expect("the script's helpers")
        .replace("uri, plan_path, src, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])", "src = 2");
    std::fs::write(
        &script,
        format!("{body}\nsys.stdout.buffer.write(block(77, 1234) + block(1 << 40, 5))\n"),
    )
    .expect("write script");
    let out = run(python3_libnbd().arg(&script));
    assert!(out.status.success(), "{}", describe(&out));
    let mut want = block_bytes(77, 2, 1234);
    want.extend(block_bytes(1 << 40, 2, 5));
    assert_eq!(out.stdout, want);
    let sources: Sources = HashMap::from([(77, 2)]);
    // Block 1234 is not a used block; use a used one to check `identify`.
    let u = 5;
    let b = block_bytes(77, 2, block_offset(u) / BLOCK);
    assert_eq!(identify(&b, u, &sources), Ok(77));
    let mut torn = b.clone();
    torn[600] ^= 1;
    assert!(identify(&torn, u, &sources).is_err());
    assert!(identify(
        &block_bytes(77, 2, block_offset(u + 1) / BLOCK),
        u,
        &sources
    )
    .is_err());
    assert_eq!(identify(&[0; BLOCK as usize], u, &sources), Ok(0));
    assert!(identify(&block_bytes(78, 2, block_offset(u) / BLOCK), u, &sources).is_err());
}

/// The rules of `allowed` on a hand-made log.
#[test]
fn allowed_follows_flushes_and_fua() {
    let slots = slots();
    let w = |gen, slot, fua| Op {
        kind: OpKind::Write { gen, fua },
        slot,
    };
    let plan = vec![
        w(10, 0, false), // 0: acked before the flush: durable
        w(11, 1, false), // 1: acked after the flush was sent: not durable
        Op {
            kind: OpKind::Flush,
            slot: 0,
        }, // 2
        w(12, 0, false), // 3: sent after 0: allowed
        w(13, 2, true),  // 4: FUA, acked: durable
        w(14, 3, false), // 5: never sent
        Op {
            kind: OpKind::Trim,
            slot: 4,
        }, // 6: sent, not acked
    ];
    let lines: Vec<String> = [
        "r", "s 0", "a 0", "s 1", "s 2", "a 1", "a 2", "s 3", "s 4", "a 4", "s 6",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = parse_log("test", &lines, plan.len());
    let base = vec![INIT_GEN; USED_BLOCKS];
    let a = allowed(&plan, &log, &slots, &base);
    let at = |s: usize| a.candidates[slots[s].first].clone();
    assert_eq!(at(0), vec![10, 12]);
    assert_eq!(at(1), vec![INIT_GEN, 11]);
    assert_eq!(at(2), vec![13]);
    assert_eq!(at(3), vec![INIT_GEN]);
    assert_eq!(at(4), vec![INIT_GEN, 0]);
    assert_eq!((a.sent, a.acked, a.durable, a.flushes), (6, 4, 2, 1));
}
