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
//!
//! The model (slots, blocks, plans, the client script and process, what a client's log
//! allows) is in `qcowx_tests::kill_tools` (tests/src/kill_tools.rs); tests/kill_model.rs
//! checks it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use qcowx_core::{CreateOptions, Image};
use qcowx_tests::kill_tools::*;
use qcowx_tests::*;

/// The writable exports: the default VDI and two forks of snapshot `base`.
const EXPORTS: [&str; 3] = ["default", "v1", "v2"];
const VIRTUAL_SIZE: u64 = 2 << 30;
/// Requests planned per client and round (more than a round has time for).
const PLAN_OPS: usize = 3000;
/// Kill delays, counted from the moment every client is connected.
const KILL_MIN_MS: u64 = 30;
const KILL_MAX_MS: u64 = 900;
/// Snapshots (besides `base`) kept: older ones are deleted in later rounds.
const MAX_SNAPSHOTS: usize = 5;

// ---- the slots and the content of a block ------------------------------------------------

/// The ranges that hold the used blocks, in used-block order.
fn used_ranges() -> Vec<(u64, u64)> {
    AREAS.iter().map(|&a| (a, AREA_LEN)).collect()
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

// ---- what a client's log allows ----------------------------------------------------------

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
