//! Concurrency tests on real image files, with QEMU as the judge.
//!
//! Several threads write, zero, discard and read through one `Arc<Image>` at once, each
//! thread owning disjoint byte ranges (stripes) of the disk: stripes smaller than a
//! cluster, whole clusters that are also discarded, and subclusters of an extended-L2
//! image that `qemu-io` wrote parts of first. Every read must show a thread's own bytes
//! as it last wrote them; afterwards the whole disk must match the merged model, and
//! `qemu-img check` and `qemu-img compare` must find the closed image clean and
//! identical to it. (The single-threaded model tests are in `model.rs`.)

use std::path::Path;
use std::sync::Arc;
use std::thread;

use qcowx_core::{CreateOptions, Image, OpenOptions};
use qcowx_tests::strategies::guest_pattern;
use qcowx_tests::{describe, first_difference, qemu_check, qemu_img, qemu_io_run, run, Rng};

/// How the disk is split between threads.
#[derive(Debug, Clone, Copy)]
struct Stripes {
    /// Bytes per stripe; stripe `k` belongs to thread `k % threads`.
    stripe: u64,
    threads: u64,
}

impl Stripes {
    fn owner(&self, g: u64) -> u64 {
        (g / self.stripe) % self.threads
    }
}

/// Several threads write, zero, discard and read through one `Arc<Image>`, each
/// writing only its own stripes. Every read must show each thread's own bytes exactly
/// as that thread last wrote them (other threads' bytes are in flux). Afterwards the
/// whole disk must match the merged model, and QEMU must find the closed image clean
/// and identical to it.
fn concurrent_run(
    dir: &Path,
    path: &Path,
    initial: Vec<u8>,
    stripes: Stripes,
    ops_per_thread: usize,
    seed: u64,
) {
    let img = Arc::new(OpenOptions::new().write(true).open(path).expect("open rw"));
    let cs = img.cluster_size();
    let size = img.size();
    assert_eq!(size, initial.len() as u64);
    let whole_clusters = stripes.stripe.is_multiple_of(cs);
    let initial = Arc::new(initial);
    let mut handles = Vec::new();
    for t in 0..stripes.threads {
        let img = Arc::clone(&img);
        let initial = Arc::clone(&initial);
        handles.push(thread::spawn(move || {
            let mut model = (*initial).clone();
            let mut rng = Rng::new(seed ^ (t + 1).wrapping_mul(0xA076_1D64_78BD_642F));
            let nstripes = size / stripes.stripe;
            let my_stripe = |rng: &mut Rng| {
                let k = rng.below(nstripes / stripes.threads) * stripes.threads + t;
                k * stripes.stripe
            };
            for step in 0..ops_per_thread {
                match rng.below(10) {
                    0..=4 => {
                        let base = my_stripe(&mut rng);
                        let off = base + rng.below(stripes.stripe);
                        let len = 1 + rng.below(base + stripes.stripe - off);
                        let seed = 1 + rng.below(255) as u8;
                        let data = guest_pattern(seed, off, len);
                        img.write_at(&data, off).expect("write");
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                    5 => {
                        let base = my_stripe(&mut rng);
                        if whole_clusters && rng.below(2) == 0 {
                            img.discard(base, stripes.stripe).expect("discard");
                        } else {
                            img.write_zeroes(base, stripes.stripe, rng.below(2) == 0)
                                .expect("write_zeroes");
                        }
                        model[base as usize..(base + stripes.stripe) as usize].fill(0);
                    }
                    6 if step.is_multiple_of(16) => img.flush().expect("flush"),
                    _ => {
                        // Read anywhere; check the bytes this thread owns.
                        let off = rng.below(size);
                        let len = (1 + rng.below(4 * stripes.stripe)).min(size - off);
                        let mut got = vec![0u8; len as usize];
                        img.read_at(&mut got, off).expect("read");
                        for (i, &b) in got.iter().enumerate() {
                            let g = off + i as u64;
                            if stripes.owner(g) == t {
                                assert_eq!(
                                    b, model[g as usize],
                                    "thread {t} step {step}: byte at {g} (read {off}+{len})"
                                );
                            }
                        }
                    }
                }
            }
            model
        }));
    }
    let models: Vec<Vec<u8>> = handles
        .into_iter()
        .map(|h| h.join().expect("a worker thread panicked"))
        .collect();
    let mut merged = (*initial).clone();
    for (g, byte) in merged.iter_mut().enumerate() {
        *byte = models[stripes.owner(g as u64) as usize][g];
    }
    let mut got = vec![0u8; size as usize];
    img.read_at(&mut got, 0).expect("read all");
    if got != merged {
        let i = first_difference(&got, &merged).unwrap_or(0);
        panic!(
            "after the threads: byte {i} reads {:#04x}, model {:#04x} (owner thread {})",
            got[i],
            merged[i],
            stripes.owner(i as u64)
        );
    }
    let img = Arc::try_unwrap(img).expect("the workers are done");
    img.close().expect("close");
    let c = qemu_check(path);
    assert!(
        c.code == 0 && c.count("leaks") == 0 && c.count("corruptions") == 0,
        "qemu-img check after the concurrent run: {}",
        describe(&c.output)
    );
    let model_path = dir.join("model.raw");
    std::fs::write(&model_path, &merged).expect("write model");
    let out = run(qemu_img()
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(path)
        .arg(&model_path));
    assert!(out.status.success(), "qemu-img compare: {}", describe(&out));
}

/// Threads share clusters: stripes smaller than a cluster, so writes to one cluster
/// from different threads race on its allocation.
#[test]
fn concurrent_threads_sharing_clusters() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("disk.qcow2");
    let size = 8 << 20;
    Image::create(&path, &CreateOptions::new(size))
        .and_then(|img| img.close())
        .expect("create");
    let stripes = Stripes {
        stripe: 4096,
        threads: 4,
    };
    concurrent_run(dir.path(), &path, vec![0; size as usize], stripes, 2000, 1);
}

/// Threads own whole clusters and also discard them, so freed clusters are punched and
/// reused while other threads read and write.
#[test]
fn concurrent_threads_owning_clusters() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("disk.qcow2");
    let size = 8 << 20;
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = 4096;
    Image::create(&path, &opts)
        .and_then(|img| img.close())
        .expect("create");
    let stripes = Stripes {
        stripe: 8192,
        threads: 4,
    };
    concurrent_run(dir.path(), &path, vec![0; size as usize], stripes, 2000, 2);
}

/// Extended L2 with subclusters QEMU allocated: `qemu-io` writes parts of clusters
/// first, so threads then write both allocated and unallocated subclusters of the
/// same clusters at once.
#[test]
fn concurrent_threads_on_qemu_subclusters() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("disk.qcow2");
    let size: u64 = 8 << 20;
    let mut opts = CreateOptions::new(size);
    opts.extended_l2 = true; // 64 KiB clusters, 2 KiB subclusters
    Image::create(&path, &opts)
        .and_then(|img| img.close())
        .expect("create");
    let mut initial = vec![0u8; size as usize];
    let mut cmds = Vec::new();
    let mut c = 0;
    while c < size {
        // Two subclusters in each cluster, at a place that varies.
        let off = c + ((c / 65536) % 31) * 2048;
        let byte = 1 + ((c / 65536) % 250) as u8;
        cmds.push(format!("write -P {byte:#x} {off} 4096"));
        initial[off as usize..off as usize + 4096].fill(byte);
        c += 65536;
    }
    let out = qemu_io_run("qcow2", &path, &cmds);
    assert!(out.status.success(), "qemu-io: {}", describe(&out));
    let stripes = Stripes {
        stripe: 2048,
        threads: 4,
    };
    concurrent_run(dir.path(), &path, initial, stripes, 2000, 3);
}
