//! The fuzz corpora, replayed on stable Rust.
//!
//! Every committed seed (`fuzz/seeds/TARGET/*`) and every input a fuzzer once failed
//! on (`fuzz/regressions/TARGET/*`) goes through the very function its cargo-fuzz
//! target calls (crate `qcowx-fuzz-harness`, `fuzz/harness/`): opening, reading,
//! writing, snapshotting, forking, reverting, deleting, collecting and checking
//! hostile images; hostile snapshot tables; hostile NBD handshakes and request
//! streams against a served image. Each input runs under a watchdog (a hang fails
//! the test), a panic fails it with the input's name, and the largest single
//! allocation it makes is bounded.
//!
//! An input that fails and is not fixed yet goes under `fuzz/open-bugs/TARGET/`:
//! `open_bugs` replays those (none at the moment) and fails while any of them does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qcowx_fuzz_harness::{image_ops, nbd, snapshot_table};
use qcowx_tests::{alloc_limit, run_bounded};

#[global_allocator]
static ALLOC: alloc_limit::LimitAlloc = alloc_limit::LimitAlloc;

/// Time one input may take (they take milliseconds).
const WATCHDOG: Duration = Duration::from_secs(60);
/// Largest single allocation one input may make (the fuzz targets abort beyond it).
const ALLOC_BUDGET: usize = qcowx_fuzz_harness::alloc_cap::MAX_ALLOC;

type Target = fn(&[u8]);

fn target(name: &str) -> Target {
    match name {
        "image_ops" => image_ops::run,
        "snapshot_table" => snapshot_table::run,
        "nbd_handshake" => nbd::handshake,
        "nbd_transmission" => nbd::transmission,
        t => panic!("unknown fuzz target {t}"),
    }
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.expect("read a corpus directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

const TARGETS: [&str; 4] = [
    "image_ops",
    "snapshot_table",
    "nbd_handshake",
    "nbd_transmission",
];

/// Runs every input of `fuzz/KIND/TARGET/`; returns how many ran and a line for each
/// one that failed.
fn replay(kind: &str, name: &str) -> (usize, Vec<String>) {
    let run = target(name);
    let files = inputs(&fuzz_dir().join(kind).join(name));
    let mut failures = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
        let what = format!("{name} {}", f.display());
        let b = run_bounded(&what, WATCHDOG, move || run(&data));
        if let Err(msg) = &b.result {
            failures.push(format!("{what}: panicked: {msg}"));
        } else if b.largest_alloc > ALLOC_BUDGET {
            failures.push(format!(
                "{what}: allocated {} bytes at once (budget {ALLOC_BUDGET})",
                b.largest_alloc
            ));
        }
    }
    (files.len(), failures)
}

/// Replays `fuzz/KIND/TARGET/` for each of `targets`; panics listing every failure.
fn replay_all(kind: &str, targets: &[&str]) -> usize {
    let mut total = 0;
    let mut failures = Vec::new();
    for name in targets {
        let (n, f) = replay(kind, name);
        total += n;
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} of {total} inputs in fuzz/{kind} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    total
}

fn seeds(name: &str) {
    let n = replay_all("seeds", &[name]);
    assert!(
        n > 0,
        "no seeds in fuzz/seeds/{name}: regenerate them with fuzz/make-seeds"
    );
    println!("{name}: {n} seeds");
}

#[test]
fn image_ops_seeds() {
    seeds("image_ops");
}

#[test]
fn snapshot_table_seeds() {
    seeds("snapshot_table");
}

#[test]
fn nbd_handshake_seeds() {
    seeds("nbd_handshake");
}

#[test]
fn nbd_transmission_seeds() {
    seeds("nbd_transmission");
}

#[test]
fn regressions() {
    let total = replay_all("regressions", &TARGETS);
    println!("{total} regression inputs");
}

#[test]
fn open_bugs() {
    let n = replay_all("open-bugs", &TARGETS);
    println!("{n} open-bug inputs");
}
