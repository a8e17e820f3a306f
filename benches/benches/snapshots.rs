//! criterion benches of the snapshot layer, on images in temp files (64 KiB clusters):
//!
//! - `snapshot/create/N`: [`Image::snapshot`] of the default VDI of a 1 GiB image
//!   (8 MiB written) that already has about N snapshots (N = 10 and 10,000). Each
//!   sample adds a snapshot, so the image is replaced by a fresh copy of its template
//!   after `max(5, N / 100)` snapshots: the table holds between N and N + that many
//!   entries. Copying and opening the copy, and the once-per-open cost of setting the
//!   dirty bit (paid by a small write and a flush), are not timed.
//! - `diff/1pct` and `diff/identical`: [`Image::diff`] of two snapshots of a fully
//!   allocated 1 GiB image (`qemu-img create -o preallocation=metadata`) between which
//!   1% of the clusters (every 100th) were written, and of the newer snapshot with the
//!   default VDI, which has not changed since.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use qcowx_benches::fill;
use qcowx_benches::snapshots::{open_unsynced, populate, preallocated, VDI};
use qcowx_core::{CreateOptions, Image};
use tempfile::TempDir;

const CLUSTER: u64 = 64 << 10;
/// Virtual size of the images snapshotted by `snapshot/create`.
const CREATE_SIZE: u64 = 1 << 30;
/// Bytes written to them before the first snapshot.
const CREATE_DATA: u64 = 8 << 20;
/// Existing snapshots in `snapshot/create`.
const TABLE_SIZES: [usize; 2] = [10, 10_000];
/// Virtual size of the image `diff` compares.
const DIFF_SIZE: u64 = 1 << 30;

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("qcowx-bench-")
        .tempdir()
        .expect("temp dir")
}

/// Fresh copies of a template image with `existing` snapshots, each used for `reuse`
/// snapshots before the next copy replaces it.
struct Supply {
    dir: PathBuf,
    template: PathBuf,
    reuse: usize,
    used: usize,
    made: u32,
    current: Option<(Image, PathBuf)>,
    next_name: u64,
}

impl Supply {
    fn new(dir: &Path, existing: usize) -> Supply {
        let template = dir.join(format!("template-{existing}.qcow2"));
        let image = Image::create(&template, &CreateOptions::new(CREATE_SIZE)).expect("create");
        fill(&image, CREATE_DATA, 0x5a).expect("fill");
        image.close().expect("close");
        // Setup only: the same snapshots, without an fdatasync per snapshot.
        let unsynced = open_unsynced(&template).expect("open template");
        let p = populate(&unsynced.image, existing, "p").expect("populate");
        unsynced.finish().expect("close template");
        eprintln!(
            "snapshot/create/{existing}: template made ({} snapshots in {:.1} s)",
            p.added,
            p.elapsed.as_secs_f64()
        );
        let mut supply = Supply {
            dir: dir.to_path_buf(),
            template,
            reuse: (existing / 100).max(5),
            used: 0,
            made: 0,
            current: None,
            next_name: 0,
        };
        // The first copy is made here, so criterion's warm-up sees the steady state.
        supply.refill();
        supply
    }

    /// Replaces the current image with a fresh copy of the template.
    fn refill(&mut self) {
        if let Some((image, path)) = self.current.take() {
            drop(image);
            let _ = std::fs::remove_file(path);
        }
        self.made += 1;
        let path = self.dir.join(format!("copy-{}.qcow2", self.made));
        std::fs::copy(&self.template, &path).expect("copy template");
        let image = Image::open_rw(&path).expect("open copy");
        // The first write after an open sets the dirty bit durably; pay it here.
        image.write_at(&[0xa5; 512], 0).expect("prime write");
        image.flush().expect("flush");
        self.current = Some((image, path));
        self.used = 0;
    }

    /// The image to snapshot next and a new name for the snapshot.
    fn take(&mut self) -> (&Image, String) {
        if self.current.is_none() || self.used >= self.reuse {
            self.refill();
        }
        self.used += 1;
        self.next_name += 1;
        let name = format!("bench{}", self.next_name);
        let image = self.current.as_ref().map(|(i, _)| i).expect("image");
        (image, name)
    }
}

fn snapshot_create(c: &mut Criterion) {
    let dir = tempdir();
    let mut g = c.benchmark_group("snapshot");
    for existing in TABLE_SIZES {
        let mut supply = Supply::new(dir.path(), existing);
        g.bench_function(BenchmarkId::new("create", existing), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (image, name) = supply.take();
                    let t0 = Instant::now();
                    image.snapshot(VDI, &name).expect("snapshot");
                    total += t0.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

fn diff(c: &mut Criterion) {
    let dir = tempdir();
    let path = dir.path().join("diff.qcow2");
    preallocated(&path, DIFF_SIZE);
    let clusters = DIFF_SIZE / CLUSTER;
    let changed = clusters.div_ceil(100);
    {
        let image = Image::open_rw(&path).expect("open");
        image.snapshot(VDI, "a").expect("snapshot a");
        for i in 0..changed {
            image
                .write_at(&[0x3c; 4096], i * 100 * CLUSTER)
                .expect("write");
        }
        image.snapshot(VDI, "b").expect("snapshot b");
        image.close().expect("close");
    }
    let image = Image::open(&path).expect("open");
    // Not a speed check: the benches must compare what they claim to.
    let ranges = image.diff("a", "b").expect("diff");
    let bytes: u64 = ranges.iter().map(|r| r.length).sum();
    assert_eq!(bytes, changed * CLUSTER, "diff a b: {ranges:?}");
    assert!(image.diff("b", VDI).expect("diff").is_empty());

    let mut g = c.benchmark_group("diff");
    g.bench_function("1pct", |b| b.iter(|| image.diff("a", "b").expect("diff")));
    g.bench_function("identical", |b| {
        b.iter(|| image.diff("b", VDI).expect("diff"))
    });
    g.finish();
}

fn config() -> Criterion {
    // Plots take longer to draw than these benches take to run; every snapshot sample
    // also needs untimed setup (copies of the template), so keep the samples few.
    Criterion::default()
        .without_plots()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(10)
}

criterion_group! {
    name = snapshot_benches;
    config = config();
    targets = snapshot_create, diff
}

criterion_main!(snapshot_benches);
