//! A soak test of `qcowx-nbd`: many concurrent clients on several exports of one image,
//! live snapshots and repeated gc, for a bounded time, checked against a model.
//!
//! The image holds three writable exports: the default VDI and two VDIs forked from a
//! snapshot of it (`base`), so the forks start out sharing every cluster. Each export
//! has four clients, each owning a disjoint 2 MiB region of its export and keeping an
//! exact model of it ([`ExpectedDisk`], qcowx's discard semantics):
//!
//! * two QEMU clients: `qemu-io -f raw nbd+unix://…` processes, one per batch of
//!   commands (`write -P`, `write -z [-u]`, `discard`, `flush`, `read -P` where the
//!   model says the range holds one byte value, plain `read` elsewhere) — a new
//!   connection every batch;
//! * two libnbd clients: Python `nbd` processes that keep one connection for the whole
//!   run and keep up to 4–16 requests in flight (writes, some with FUA, zero writes with
//!   and without `NO_HOLE`, trims, `CACHE`, flushes, reads checked against the model's
//!   CRC-32), never sending a request that overlaps one in flight, so each region's
//!   content follows from the requests in the order sent.
//!
//! Meanwhile one thread takes live snapshots through the control socket (`qcowx
//! snapshot`, forwarded to the server) and deletes old ones (`qcowx delete`), and
//! another runs `qcowx gc` over and over. A snapshot of export E is taken while E's
//! clients are between batches (each export has a gate: clients hold it shared for a
//! batch, the snapshot thread exclusively), so the model of E at that moment is exact,
//! while the other exports stay under load; each snapshot is read back through NBD at
//! once and again before it is deleted, and the remaining ones at the end.
//!
//! At the end every region is read back through NBD and compared with its model, the
//! server is stopped with SIGTERM, `qemu-img check` must find no error and no leak, and
//! every region and snapshot is compared once more as `qcowx export` and `qemu-img
//! convert` read the image. The server's resident memory is sampled from
//! `/proc/PID/status` throughout and its peak (`VmHWM`) must stay under
//! [`RSS_BOUND_MIB`].
//!
//! `QCOWX_SOAK_SECS` sets the load time (default 60 s) and `QCOWX_SOAK_SEED` replays
//! a seed (printed). Needs `qemu-utils` and `python3-libnbd`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ChildStdin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use qcowx_core::{CreateOptions, Image};
use qcowx_tests::soak_tools::*;
use qcowx_tests::*;

/// The writable exports: the default VDI and two forks of snapshot `base`.
const EXPORTS: [&str; 3] = ["default", "v1", "v2"];
const VIRTUAL_SIZE: u64 = 64 << 20;
const CLUSTER: u64 = 64 << 10;
/// QEMU clients (qemu-io, a process per batch) per export.
const QEMU_CLIENTS: usize = 2;
/// libnbd clients (one Python process and connection each) per export.
const LIBNBD_CLIENTS: usize = 2;
const CLIENTS_PER_EXPORT: usize = QEMU_CLIENTS + LIBNBD_CLIENTS;
/// The size of each client's region.
const REGION: u64 = 2 << 20;
/// The longest request.
const MAX_REQUEST: u64 = 256 << 10;
/// Live snapshots kept (besides `base`); older ones are deleted.
const MAX_SNAPSHOTS: usize = 6;
/// Default load time.
const DEFAULT_SECS: u64 = 60;
/// Requests per libnbd batch and commands per qemu-io batch (ranges).
const LIBNBD_BATCH: u64 = 300;
const QEMU_BATCH: (u64, u64) = (20, 60);
/// How long one batch may take before the test calls it a hang.
const BATCH_WAIT: Duration = Duration::from_secs(120);
/// The bound on the server's peak resident memory.
///
/// What the server holds: the L2 cache (`qcowx_core::engine::cache::DEFAULT_CACHE_BYTES`,
/// 8 MiB); request payloads in flight, which this load keeps small — a libnbd client
/// has at most 16 requests of at most 256 KiB in flight (4 MiB), a qemu-io client one
/// (so about 6 × 4 + 6 × 0.25 = 26 MiB over all connections, far under the server's own
/// per-connection cap `max_in_flight_bytes`); per connection a few worker threads and
/// buffers; gc's reachability scan, which is O(metadata) (bitmaps over a file of a few
/// hundred MiB: kilobytes); and the executable itself (an unoptimized build maps some
/// tens of MiB of code). 256 MiB leaves room for all of it several times over, and a
/// leak of a few KiB per request (hundreds of thousands of requests) or of a cache that
/// does not evict would cross it.
const RSS_BOUND_MIB: u64 = 256;

// ---- ranges ------------------------------------------------------------------------------

/// A random range of a region: cluster-aligned, 4 KiB-aligned or anywhere.
fn random_range(rng: &mut Rng) -> (u64, u64) {
    let (off, len) = match rng.below(3) {
        0 => {
            let off = rng.below(REGION / CLUSTER) * CLUSTER;
            (off, rng.range(1, 4) * CLUSTER)
        }
        1 => {
            let off = rng.below(REGION / 4096) * 4096;
            (off, rng.range(1, 33) * 4096)
        }
        _ => {
            let len = rng.range(1, MAX_REQUEST + 1);
            (rng.below(REGION - len + 1), len)
        }
    };
    (off, len.min(REGION - off))
}

// ---- the plans of the two kinds of clients --------------------------------------------------

/// A libnbd batch over region `base..base + REGION`, applied to `model` as it is made.
fn libnbd_batch(
    rng: &mut Rng,
    model: &mut ExpectedDisk,
    base: u64,
    can_cache: bool,
    counts: &Counts,
) -> String {
    let mut s = String::new();
    for _ in 0..LIBNBD_BATCH {
        let (off, len) = random_range(rng);
        let r = rng.below(100);
        let line = if r < 40 {
            let seed = rng.next_u64() | 1;
            model.write(off, &pattern_at(seed, base + off, len));
            bump(&counts.writes);
            format!("W {} {len} {seed} {}", base + off, rng.chance(1, 8) as u8)
        } else if r < 50 {
            model.zero(off, len);
            bump(&counts.zeroes);
            format!("Z {} {len} {}", base + off, rng.chance(1, 2) as u8)
        } else if r < 58 {
            model.discard(off, len);
            bump(&counts.trims);
            format!("T {} {len}", base + off)
        } else if r < 62 && can_cache {
            bump(&counts.caches);
            format!("C {} {len}", base + off)
        } else if r < 93 {
            let crc = crc32(&model.as_bytes()[off as usize..(off + len) as usize]);
            bump(&counts.reads);
            format!("R {} {len} {crc}", base + off)
        } else {
            bump(&counts.flushes);
            "F".to_string()
        };
        s.push_str(&line);
        s.push('\n');
    }
    s
}

/// A qemu-io batch over region `base..base + REGION`, applied to `model` as it is made.
fn qemu_batch(rng: &mut Rng, model: &mut ExpectedDisk, base: u64, counts: &Counts) -> Vec<String> {
    let n = rng.range(QEMU_BATCH.0, QEMU_BATCH.1 + 1);
    let mut cmds = Vec::new();
    let mut last_write: Option<(u64, u64)> = None;
    for _ in 0..n {
        let r = rng.below(100);
        let (off, len) = random_range(rng);
        let cmd = if r < 40 {
            let b = rng.range(1, 256) as u8;
            model.write(off, &vec![b; len as usize]);
            last_write = Some((off, len));
            bump(&counts.writes);
            format!("write -P {b} {} {len}", base + off)
        } else if r < 50 {
            model.zero(off, len);
            bump(&counts.zeroes);
            let unmap = if rng.chance(1, 2) { "-u " } else { "" };
            format!("write -z {unmap}{} {len}", base + off)
        } else if r < 58 {
            model.discard(off, len);
            bump(&counts.trims);
            format!("discard {} {len}", base + off)
        } else if r < 92 {
            // Prefer part of the last write: a range of one byte value, checked with -P.
            let (off, len) = match last_write {
                Some((wo, wl)) if rng.chance(2, 3) => {
                    let o = wo + rng.below(wl);
                    (o, rng.range(1, wo + wl - o + 1))
                }
                _ => (off, len),
            };
            let bytes = &model.as_bytes()[off as usize..(off + len) as usize];
            bump(&counts.reads);
            if bytes.iter().all(|&b| b == bytes[0]) {
                format!("read -P {} {} {len}", bytes[0], base + off)
            } else {
                format!("read {} {len}", base + off)
            }
        } else {
            bump(&counts.flushes);
            "flush".to_string()
        };
        cmds.push(cmd);
    }
    cmds
}

// ---- a libnbd client process -------------------------------------------------------------

struct LibnbdClient {
    child: KillOnDrop,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    can_cache: bool,
}

impl LibnbdClient {
    fn start(script: &Path, uri: &str, window: u64) -> LibnbdClient {
        let Piped {
            child,
            stdin,
            stdout: out,
            stderr,
        } = spawn_piped(
            python3_libnbd()
                .arg(script)
                .arg(uri)
                .arg(window.to_string()),
            "start a libnbd client",
        );
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut c = LibnbdClient {
            child,
            stdin,
            lines,
            stderr,
            can_cache: false,
        };
        let first = c.line("connect");
        c.can_cache = match first.as_str() {
            "r 1" => true,
            "r 0" => false,
            _ => panic!("libnbd client on {uri}: {first}"),
        };
        c
    }

    fn line(&mut self, what: &str) -> String {
        match self.lines.recv_timeout(BATCH_WAIT) {
            Ok(l) => l,
            Err(_) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "libnbd client: no answer to {what} within {BATCH_WAIT:?}; stderr:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
        }
    }

    fn run_plan(&mut self, path: &Path, what: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "plan {}", path.display()).expect("send a plan");
        stdin.flush().expect("send a plan");
        let l = self.line(what);
        assert_eq!(
            l,
            "done",
            "{what}: {l}; stderr:\n{}",
            self.stderr.lock().unwrap()
        );
    }

    fn quit(mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = writeln!(s, "quit");
        }
        let deadline = Instant::now() + BATCH_WAIT;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    assert!(
                        st.success(),
                        "libnbd client exited with {st}: {}",
                        self.stderr.lock().unwrap()
                    );
                    return;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                _ => panic!("libnbd client did not quit"),
            }
        }
    }
}

// ---- shared state ------------------------------------------------------------------------

/// One client's region and model.
struct Region {
    export: usize,
    base: u64,
    qemu: bool,
    model: Mutex<ExpectedDisk>,
}

/// A snapshot and what its export's regions held when it was taken.
struct Snap {
    name: String,
    export: usize,
    /// Every region of the export.
    regions: Regions,
}

struct Shared {
    image: PathBuf,
    dir: PathBuf,
    regions: Vec<Region>,
    gates: Vec<RwLock<()>>,
    counts: Counts,
    stop: Arc<AtomicBool>,
    deadline: Instant,
}

impl Shared {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::SeqCst) && Instant::now() < self.deadline
    }
}

// ---- the threads -----------------------------------------------------------------------------

fn qemu_client(sh: &Shared, server: &QcowxNbd, r: usize, mut rng: Rng) {
    let _guard = StopOnPanic(Arc::clone(&sh.stop));
    let region = &sh.regions[r];
    let uri = server.uri(EXPORTS[region.export]);
    let mut batches = 0;
    while sh.running() {
        let _gate = sh.gates[region.export]
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let cmds = {
            let mut m = region.model.lock().unwrap_or_else(PoisonError::into_inner);
            qemu_batch(&mut rng, &mut m, region.base, &sh.counts)
        };
        let mut cmd = qemu_io();
        cmd.args(["-f", "raw"]);
        for c in &cmds {
            cmd.args(["-c", c]);
        }
        cmd.arg(&uri);
        let out = run_timeout(&mut cmd, BATCH_WAIT);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("failed") && !text.contains("error"),
            "qemu-io client {r} ({}, region {:#x}), batch {batches}: {}",
            EXPORTS[region.export],
            region.base,
            describe(&out)
        );
        bump(&sh.counts.qemu_io_runs);
        batches += 1;
    }
}

fn libnbd_client(sh: &Shared, server: &QcowxNbd, script: &Path, r: usize, mut rng: Rng) {
    let _guard = StopOnPanic(Arc::clone(&sh.stop));
    let region = &sh.regions[r];
    let window = rng.range(4, 17);
    let mut client = LibnbdClient::start(script, &server.uri(EXPORTS[region.export]), window);
    let plan = sh.dir.join(format!("plan-{r}.txt"));
    let mut batches = 0;
    while sh.running() {
        let _gate = sh.gates[region.export]
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let text = {
            let mut m = region.model.lock().unwrap_or_else(PoisonError::into_inner);
            libnbd_batch(&mut rng, &mut m, region.base, client.can_cache, &sh.counts)
        };
        std::fs::write(&plan, text).expect("write a plan");
        client.run_plan(
            &plan,
            &format!(
                "libnbd client {r} ({}, region {:#x}, window {window}), batch {batches}",
                EXPORTS[region.export], region.base
            ),
        );
        bump(&sh.counts.libnbd_batches);
        batches += 1;
    }
    client.quit();
}

/// The regions of `export` as the NBD checks want them.
fn export_regions(sh: &Shared, export: usize) -> Regions {
    sh.regions
        .iter()
        .filter(|r| r.export == export)
        .map(|r| {
            (
                r.base,
                r.model
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_bytes()
                    .to_vec(),
            )
        })
        .collect()
}

/// Takes live snapshots, checks them and deletes old ones. Returns (all snapshots
/// still alive, snapshots taken, snapshot reads checked, deletions).
fn snapshot_thread(sh: &Shared, server: &QcowxNbd, mut rng: Rng) -> (Vec<Snap>, u64, u64, u64) {
    let _guard = StopOnPanic(Arc::clone(&sh.stop));
    let image = sh.image.to_str().expect("UTF-8 path");
    let scratch = sh.dir.join("snapshot-checks");
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let mut snaps: Vec<Snap> = Vec::new();
    let (mut taken, mut checked, mut deleted) = (0, 0, 0);
    let check = |s: &Snap, when: &str| {
        verify_through_nbd(
            &[(
                format!("snapshot {} of {} ({when})", s.name, EXPORTS[s.export]),
                server.uri(&format!("{}@{}", EXPORTS[s.export], s.name)),
                s.regions.clone(),
            )],
            &scratch,
        );
    };
    while sh.running() {
        thread::sleep(Duration::from_millis(rng.range(200, 1200)));
        if !sh.running() {
            break;
        }
        let e = rng.below(EXPORTS.len() as u64) as usize;
        let name = format!("soak{}", taken + 1);
        let snap = {
            // Wait for the export's clients to finish their batches; others go on.
            let _quiet = sh.gates[e].write().unwrap_or_else(PoisonError::into_inner);
            let out = run(server
                .qcowx()
                .args(["snapshot", "--vdi", EXPORTS[e], image, &name]));
            assert!(
                out.status.success(),
                "qcowx snapshot --vdi {} {name}: {}\nserver stderr:\n{}",
                EXPORTS[e],
                describe(&out),
                server.stderr()
            );
            Snap {
                name,
                export: e,
                regions: export_regions(sh, e),
            }
        };
        taken += 1;
        check(&snap, "just taken, its export under load again");
        checked += 1;
        snaps.push(snap);
        if snaps.len() > MAX_SNAPSHOTS {
            let old = snaps.remove(rng.below(snaps.len() as u64 - 1) as usize);
            check(&old, "before its deletion");
            checked += 1;
            let out = run(server
                .qcowx()
                .args(["delete", "--snapshot", &old.name, image]));
            assert!(
                out.status.success(),
                "qcowx delete --snapshot {}: {}",
                old.name,
                describe(&out)
            );
            deleted += 1;
        }
    }
    (snaps, taken, checked, deleted)
}

/// Runs `qcowx gc` over and over. Returns (runs, clusters freed).
fn gc_thread(sh: &Shared, server: &QcowxNbd, mut rng: Rng) -> (u64, u64) {
    let _guard = StopOnPanic(Arc::clone(&sh.stop));
    let (mut runs, mut freed) = (0, 0);
    while sh.running() {
        thread::sleep(Duration::from_millis(rng.range(200, 1000)));
        let out = run(server.qcowx().args(["gc", "--output=json"]).arg(&sh.image));
        assert!(
            out.status.success(),
            "qcowx gc: {}\nserver stderr:\n{}",
            describe(&out),
            server.stderr()
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("qcowx gc output is not JSON ({e}): {}", describe(&out)));
        freed += v["clusters-freed"].as_u64().expect("clusters-freed");
        runs += 1;
    }
    (runs, freed)
}

// ---- the test ----------------------------------------------------------------------------

#[test]
fn soak_many_clients_snapshots_and_gc_against_a_model() {
    let secs = env_u64("QCOWX_SOAK_SECS").unwrap_or(DEFAULT_SECS);
    let seed = env_u64("QCOWX_SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    eprintln!(
        "soak: seed {seed} (QCOWX_SOAK_SEED={seed} replays the operations), {secs} s of load"
    );
    let mut rng = Rng::new(seed);
    // Build (or find) the binaries before the clock starts.
    qcowx_nbd_bin();
    qcowx_cli_bin();

    let dir = tempdir();
    let image = dir.path().join("disk.qcow2");
    let sock = dir.path().join("nbd.sock");
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).expect("runtime dir");
    let script = dir.path().join("client.py");
    std::fs::write(&script, CLIENT_PY).expect("write the client script");

    // Regions: client k of each export at k × 16 MiB + k × 64 KiB (cluster-aligned, so
    // a region's discards behave as the disk's). The default VDI gets data in every
    // region before `base` is taken, so the forks start out sharing it.
    let init_seed = 0x5eed_0000_0000_0001u64;
    let mut regions = Vec::new();
    {
        let img = Image::create(&image, &CreateOptions::new(VIRTUAL_SIZE)).expect("create");
        for k in 0..CLIENTS_PER_EXPORT as u64 {
            let base = k * (16 << 20) + k * CLUSTER;
            let data = pattern_at(init_seed, base, REGION);
            img.write_at(&data, base).expect("initial data");
        }
        img.snapshot("default", "base").expect("snapshot base");
        img.fork("base", "v1").expect("fork v1");
        img.fork("base", "v2").expect("fork v2");
        img.close().expect("close");
    }
    for e in 0..EXPORTS.len() {
        for k in 0..CLIENTS_PER_EXPORT as u64 {
            let base = k * (16 << 20) + k * CLUSTER;
            regions.push(Region {
                export: e,
                base,
                qemu: (k as usize) < QEMU_CLIENTS,
                model: Mutex::new(ExpectedDisk::from_bytes(
                    pattern_at(init_seed, base, REGION),
                    CLUSTER,
                )),
            });
        }
    }
    let base_regions: Vec<(u64, Vec<u8>)> = regions
        .iter()
        .filter(|r| r.export == 0)
        .map(|r| {
            (
                r.base,
                r.model
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_bytes()
                    .to_vec(),
            )
        })
        .collect();

    let server = QcowxNbd::start(
        &image,
        &sock,
        &runtime,
        &["-t", "--discard=unmap", "-e", "64"],
    );
    let pid = server.pid();
    let started = Instant::now();
    let sh = Shared {
        image: image.clone(),
        dir: dir.path().to_path_buf(),
        regions,
        gates: (0..EXPORTS.len()).map(|_| RwLock::new(())).collect(),
        counts: Counts::default(),
        stop: Arc::new(AtomicBool::new(false)),
        deadline: started + Duration::from_secs(secs),
    };

    // Memory: sampled every 50 ms while the load runs.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = Arc::clone(&sampling);
        thread::spawn(move || {
            let (mut peak, mut samples) = (0u64, 0u64);
            while sampling.load(Ordering::SeqCst) {
                if let Some(kib) = rss_kib(pid, "VmRSS:") {
                    peak = peak.max(kib);
                    samples += 1;
                }
                thread::sleep(Duration::from_millis(50));
            }
            (peak, samples)
        })
    };

    let (snaps, taken, snap_checks, deletions, gc_runs, gc_freed) = thread::scope(|s| {
        let mut clients = Vec::new();
        for (r, region) in sh.regions.iter().enumerate() {
            let crng = Rng::new(seed ^ (r as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let (sh, server, script) = (&sh, &server, &script);
            clients.push(if region.qemu {
                s.spawn(move || qemu_client(sh, server, r, crng))
            } else {
                s.spawn(move || libnbd_client(sh, server, script, r, crng))
            });
        }
        let snap_rng = Rng::new(rng.next_u64());
        let gc_rng = Rng::new(rng.next_u64());
        let snapper = s.spawn(|| snapshot_thread(&sh, &server, snap_rng));
        let gc = s.spawn(|| gc_thread(&sh, &server, gc_rng));
        let mut panics = Vec::new();
        for c in clients {
            if let Err(p) = c.join() {
                panics.push(p);
            }
        }
        let snap = snapper.join();
        let gc = gc.join();
        if let Some(p) = panics.into_iter().next() {
            std::panic::resume_unwind(p);
        }
        let (snaps, taken, checked, deleted) =
            snap.unwrap_or_else(|p| std::panic::resume_unwind(p));
        let (runs, freed) = gc.unwrap_or_else(|p| std::panic::resume_unwind(p));
        (snaps, taken, checked, deleted, runs, freed)
    });
    let load_time = started.elapsed();
    let verifying = Instant::now();

    // Everything through NBD, while the server still runs.
    let mut checks: Vec<(String, String, Regions)> = (0..EXPORTS.len())
        .map(|e| {
            (
                format!("export {}", EXPORTS[e]),
                server.uri(EXPORTS[e]),
                export_regions(&sh, e),
            )
        })
        .collect();
    checks.push((
        "snapshot base".into(),
        server.uri("default@base"),
        base_regions.clone(),
    ));
    for sn in &snaps {
        checks.push((
            format!("snapshot {} of {}", sn.name, EXPORTS[sn.export]),
            server.uri(&format!("{}@{}", EXPORTS[sn.export], sn.name)),
            sn.regions.clone(),
        ));
    }
    verify_through_nbd(&checks, dir.path());

    sampling.store(false, Ordering::SeqCst);
    let (sampled_peak, samples) = sampler.join().expect("sampler");
    let hwm = rss_kib(pid, "VmHWM:").expect("VmHWM of the server");
    let peak_mib = hwm.max(sampled_peak) / 1024;
    if std::env::var_os("QCOWX_SOAK_LOG").is_some() {
        eprintln!("server stderr:\n{}", server.stderr());
    }
    server.stop();
    assert_qemu_check_clean(&image);

    // The image at rest, as qcowx export and QEMU read it.
    let raw = dir.path().join("out.raw");
    let compare_raw = |what: &str, regions: &[(u64, Vec<u8>)]| {
        for (base, want) in regions {
            assert_bytes_eq(what, &read_at(&raw, *base, want.len()), want, *base);
        }
        let _ = std::fs::remove_file(&raw);
    };
    for (e, name) in EXPORTS.iter().enumerate() {
        let out = run(std::process::Command::new(qcowx_cli_bin())
            .args(["-q", "export", "--vdi", name])
            .arg(&image)
            .arg(&raw));
        assert!(out.status.success(), "qcowx export: {}", describe(&out));
        compare_raw(
            &format!("qcowx export --vdi {name}"),
            &export_regions(&sh, e),
        );
        if e == 0 {
            convert_to_raw(&image, &raw);
        } else {
            convert_snapshot_to_raw(&image, &format!("vdi:{name}"), &raw);
        }
        compare_raw(
            &format!("qemu-img convert of {name}"),
            &export_regions(&sh, e),
        );
    }
    convert_snapshot_to_raw(&image, "base", &raw);
    compare_raw("qemu-img convert of snapshot base", &base_regions);
    for sn in &snaps {
        convert_snapshot_to_raw(&image, &sn.name, &raw);
        compare_raw(
            &format!("qemu-img convert of snapshot {}", sn.name),
            &sn.regions,
        );
    }

    let c = &sh.counts;
    eprintln!(
        "soak: {} s of load ({:.1} s of final checks), {} clients ({} qemu-io, {} libnbd) on {} exports; {} requests \
         ({} writes, {} zero writes, {} trims, {} reads, {} flushes, {} caches) in {} qemu-io \
         runs and {} libnbd batches; {taken} live snapshots ({snap_checks} checked through NBD \
         while loaded, {deletions} deleted, {} at the end), {gc_runs} gc runs freeing {gc_freed} \
         clusters; server peak RSS {peak_mib} MiB ({samples} samples, bound {RSS_BOUND_MIB} MiB)",
        load_time.as_secs(),
        verifying.elapsed().as_secs_f64(),
        sh.regions.len(),
        EXPORTS.len() * QEMU_CLIENTS,
        EXPORTS.len() * LIBNBD_CLIENTS,
        EXPORTS.len(),
        c.total(),
        c.writes.load(Ordering::Relaxed),
        c.zeroes.load(Ordering::Relaxed),
        c.trims.load(Ordering::Relaxed),
        c.reads.load(Ordering::Relaxed),
        c.flushes.load(Ordering::Relaxed),
        c.caches.load(Ordering::Relaxed),
        c.qemu_io_runs.load(Ordering::Relaxed),
        c.libnbd_batches.load(Ordering::Relaxed),
        snaps.len(),
    );
    assert!(taken > 0, "no snapshot was taken");
    assert!(gc_runs > 0, "gc never ran");
    assert!(
        peak_mib < RSS_BOUND_MIB,
        "the server's resident memory peaked at {peak_mib} MiB, over the bound of {RSS_BOUND_MIB} MiB"
    );
}
