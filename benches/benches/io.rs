//! criterion benches: qcowx-core I/O on a temp file, and the metadata hot paths.
//!
//! I/O groups (4 KiB, 64 KiB and 1 MiB requests, 64 KiB clusters, no flushes):
//! - `read/allocated`, `read/unallocated`: reads of written data and of holes;
//! - `write/overwrite`: writes to clusters the active layer owns (in place);
//! - `write/allocate`: first writes to unallocated clusters;
//! - `write/cow`: first writes under a snapshot made by `qemu-img snapshot -c`: every
//!   request lands on a fresh shared cluster, so each one copies (partial clusters read
//!   the old data first).
//!
//! Allocating and copying writes consume clusters: their images are re-created (from a
//! template for `cow`) in the untimed setup of `iter_batched` once used up. The
//! once-per-open cost of the first write (setting the dirty bit durably) is paid in
//! that setup too, so the numbers are per-request steady state.
//!
//! Micro groups: `l2_entry_kind` (decoding a table of L2 entries), `l2_cache` (hit, and
//! miss with LRU eviction), `l2_lookup` (through `Image`: a cached lookup, and reads
//! that miss a one-table cache) and `allocator` (new clusters, and reuse of freed
//! ones).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use qcowx_benches::{fill, run_tool};
use qcowx_core::engine::alloc::Allocator;
use qcowx_core::engine::cache::{L2Cache, DEFAULT_CACHE_BYTES, MIN_CACHED_TABLES};
use qcowx_core::format::addr::HostOffset;
use qcowx_core::format::tables::{Geometry, L2Entry, WRITABLE};
use qcowx_core::{CreateOptions, Image, OpenOptions};
use tempfile::TempDir;

const CLUSTER: u64 = 64 << 10;
const SIZES: [(&str, u64); 3] = [("4KiB", 4 << 10), ("64KiB", 64 << 10), ("1MiB", 1 << 20)];
/// Virtual size of the images that are read or overwritten.
const STEADY_SIZE: u64 = 64 << 20;
/// Virtual size of the images that allocating writes use up.
const ALLOC_SIZE: u64 = 256 << 20;
/// Virtual size of the snapshot template that copy-on-write writes use up.
const COW_SIZE: u64 = 128 << 20;

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("qcowx-bench-")
        .tempdir()
        .expect("temp dir")
}

fn create(path: &Path, size: u64) -> Image {
    Image::create(path, &CreateOptions::new(size)).expect("create image")
}

/// An image of `size` bytes, every byte written, closed.
fn filled(path: &Path, size: u64) {
    let img = create(path, size);
    fill(&img, size, 0x5a).expect("fill image");
    img.close().expect("close image");
}

/// Offsets `0, len, 2 len, ...` wrapping inside `size`.
struct Cursor {
    next: u64,
    len: u64,
    size: u64,
}

impl Cursor {
    fn new(len: u64, size: u64) -> Cursor {
        Cursor { next: 0, len, size }
    }
    fn take(&mut self) -> u64 {
        if self.next + self.len > self.size {
            self.next = 0;
        }
        let at = self.next;
        self.next += self.len;
        at
    }
}

fn reads(c: &mut Criterion) {
    let dir = tempdir();
    let data = dir.path().join("data.qcow2");
    let holes = dir.path().join("holes.qcow2");
    filled(&data, STEADY_SIZE);
    create(&holes, STEADY_SIZE).close().expect("close");

    let mut g = c.benchmark_group("read");
    for (label, path) in [("allocated", &data), ("unallocated", &holes)] {
        let img = Image::open(path).expect("open");
        for (name, len) in SIZES {
            g.throughput(Throughput::Bytes(len));
            let mut buf = vec![0u8; len as usize];
            let mut cur = Cursor::new(len, STEADY_SIZE);
            g.bench_function(BenchmarkId::new(label, name), |b| {
                b.iter(|| img.read_at(black_box(&mut buf), cur.take()).expect("read"))
            });
        }
    }
    g.finish();
}

fn overwrites(c: &mut Criterion) {
    let dir = tempdir();
    let path = dir.path().join("data.qcow2");
    filled(&path, STEADY_SIZE);
    let img = Image::open_rw(&path).expect("open");
    let mut g = c.benchmark_group("write");
    for (name, len) in SIZES {
        g.throughput(Throughput::Bytes(len));
        let buf = vec![0xa5u8; len as usize];
        let mut cur = Cursor::new(len, STEADY_SIZE);
        g.bench_function(BenchmarkId::new("overwrite", name), |b| {
            b.iter(|| img.write_at(black_box(&buf), cur.take()).expect("write"))
        });
    }
    g.finish();
    img.close().expect("close");
}

/// A supply of fresh clusters: hands out `(image, offset)` pairs whose target range has
/// never been written in that image (through qcowx), making a new image when the
/// current one is used up.
struct Fresh<'a> {
    dir: &'a Path,
    make: &'a dyn Fn(&Path) -> Image,
    size: u64,
    stride: u64,
    made: u32,
    current: Option<(Arc<Image>, PathBuf)>,
    next: u64,
}

impl<'a> Fresh<'a> {
    fn new(dir: &'a Path, size: u64, len: u64, make: &'a dyn Fn(&Path) -> Image) -> Fresh<'a> {
        Fresh {
            dir,
            make,
            size,
            stride: len.next_multiple_of(CLUSTER),
            made: 0,
            current: None,
            next: 0,
        }
    }

    fn take(&mut self) -> (Arc<Image>, u64) {
        if self.current.is_none() || self.next + self.stride > self.size - CLUSTER {
            if let Some((_, old)) = self.current.take() {
                // Still open through requests not yet dropped; unlinking is fine.
                let _ = std::fs::remove_file(old);
            }
            self.made += 1;
            let path = self.dir.join(format!("fresh-{}.qcow2", self.made));
            let img = (self.make)(&path);
            // Pay the once-per-open costs here, untimed: the first write sets the dirty
            // bit durably (an fdatasync, which would also write back a just-copied
            // template). The last cluster is kept for this and never handed out.
            img.write_at(&[0xff; 512], self.size - CLUSTER)
                .expect("prime write");
            img.flush().expect("flush");
            self.current = Some((Arc::new(img), path));
            self.next = 0;
        }
        let at = self.next;
        self.next += self.stride;
        let img = self
            .current
            .as_ref()
            .map(|(i, _)| i.clone())
            .expect("image");
        (img, at)
    }
}

fn allocating_writes(c: &mut Criterion) {
    let dir = tempdir();
    let make = |p: &Path| create(p, ALLOC_SIZE);
    let mut g = c.benchmark_group("write");
    for (name, len) in SIZES {
        g.throughput(Throughput::Bytes(len));
        let buf = vec![0xa5u8; len as usize];
        let mut fresh = Fresh::new(dir.path(), ALLOC_SIZE, len, &make);
        g.bench_function(BenchmarkId::new("allocate", name), |b| {
            b.iter_batched(
                || fresh.take(),
                // Return the image so that dropping (closing) it is not timed.
                |(img, at)| {
                    img.write_at(&buf, at).expect("write");
                    img
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn cow_writes(c: &mut Criterion) {
    let dir = tempdir();
    // Template: written by qcowx, snapshotted by qemu-img (which clears the COPIED
    // bits, so every cluster is shared with s1).
    let template = dir.path().join("template.qcow2");
    run_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            template.to_str().expect("utf-8 path"),
            &COW_SIZE.to_string(),
        ],
    );
    {
        let img = Image::open_rw(&template).expect("open template");
        fill(&img, COW_SIZE, 0x3c).expect("fill template");
        img.close().expect("close template");
    }
    run_tool(
        "qemu-img",
        &[
            "snapshot",
            "-c",
            "s1",
            template.to_str().expect("utf-8 path"),
        ],
    );
    let make = |p: &Path| {
        std::fs::copy(&template, p).expect("copy template");
        OpenOptions::new().write(true).open(p).expect("open copy")
    };
    let mut g = c.benchmark_group("write");
    for (name, len) in SIZES {
        g.throughput(Throughput::Bytes(len));
        let buf = vec![0xa5u8; len as usize];
        let mut fresh = Fresh::new(dir.path(), COW_SIZE, len, &make);
        g.bench_function(BenchmarkId::new("cow", name), |b| {
            b.iter_batched(
                || fresh.take(),
                |(img, at)| {
                    img.write_at(&buf, at).expect("write");
                    img
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn l2_entry_kind(c: &mut Criterion) {
    let mut g = c.benchmark_group("l2_entry_kind");
    for extended in [false, true] {
        let geo = Geometry {
            cluster_bits: 16,
            extended,
        };
        let n = geo.l2_entries();
        // A mix like a real table: writable and shared data, zeros, holes, and (for
        // standard entries) compressed clusters.
        let table: Vec<L2Entry> = (0..n)
            .map(|i| {
                let host = HostOffset::new((i + 16) * CLUSTER);
                match (i % 8, extended) {
                    (0..=3, false) => L2Entry::data(host, &geo),
                    (4, false) => L2Entry::data(host, &geo).read_only(),
                    (5, false) => L2Entry::zero(&geo),
                    (6, false) => L2Entry::UNALLOCATED,
                    (_, false) => L2Entry::compressed(host + 512, 4 * 512, &geo),
                    (0..=3, true) => L2Entry::data(host, &geo),
                    (4, true) => L2Entry::zero(&geo),
                    (5, true) => L2Entry::UNALLOCATED,
                    (_, true) => L2Entry::from_raw(host.get() | WRITABLE, 0x0000_ff00_0000_00ff),
                }
            })
            .collect();
        g.throughput(Throughput::Elements(n));
        let label = if extended { "extended" } else { "standard" };
        g.bench_function(BenchmarkId::new("table", label), |b| {
            b.iter(|| {
                let mut data = 0u32;
                for e in black_box(&table) {
                    if let Ok(qcowx_core::format::tables::ClusterKind::Data { .. }) = e.kind(&geo) {
                        data += 1;
                    }
                }
                data
            })
        });
    }
    g.finish();
}

fn l2_cache(c: &mut Criterion) {
    let table_bytes = CLUSTER as usize;
    let words = table_bytes / 8;
    let mut g = c.benchmark_group("l2_cache");
    // Hit: a full default-size cache, lookups cycling over every cached table.
    let mut cache = L2Cache::new(DEFAULT_CACHE_BYTES, table_bytes);
    let cap = cache.capacity() as u64;
    for t in 0..cap {
        cache.insert(HostOffset::new(t * CLUSTER), vec![t; words], false);
    }
    let mut i = 0u64;
    g.bench_function("hit", |b| {
        b.iter(|| {
            i = (i + 7) % cap;
            black_box(
                cache
                    .get(black_box(HostOffset::new(i * CLUSTER)))
                    .map(|t| t[3]),
            )
        })
    });
    // Miss: the lookup fails and the loaded table goes in, evicting the least recently
    // used clean table (the table is decoded in the untimed setup).
    let mut next = cap;
    g.bench_function("miss_evict", |b| {
        b.iter_batched(
            || vec![0u64; words],
            |table| {
                let off = HostOffset::new(next * CLUSTER);
                next += 1;
                assert!(cache.get(off).is_none());
                cache.insert(off, table, false)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// L2 lookups through the public API on a file image: `Image::block_status` of one
/// 4 KiB block of written data (the L2 table cached: a hit), and 4 KiB reads that
/// cycle through twice as many L2 tables as the smallest cache holds, opened with
/// that smallest cache, so every read misses and loads its table from the file (page
/// cache) first.
fn l2_lookup(c: &mut Criterion) {
    /// Guest bytes one L2 table maps (64 KiB clusters).
    const PER_TABLE: u64 = (CLUSTER / 8) * CLUSTER;
    let tables = 2 * MIN_CACHED_TABLES as u64;
    let dir = tempdir();
    let path = dir.path().join("l2.qcow2");
    {
        let img = create(&path, tables * PER_TABLE);
        for t in 0..tables {
            img.write_at(&[0x5a; 4096], t * PER_TABLE).expect("write");
        }
        img.close().expect("close");
    }
    let mut g = c.benchmark_group("l2_lookup");
    let img = Image::open(&path).expect("open");
    g.bench_function("block_status_hit", |b| {
        b.iter(|| img.block_status(black_box(0), 4096).expect("block status"))
    });
    let small = OpenOptions::new()
        .cache_bytes(CLUSTER as usize)
        .open(&path)
        .expect("open with a one-table cache");
    let mut buf = vec![0u8; 4096];
    let mut t = 0u64;
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("read_4KiB_miss", |b| {
        b.iter(|| {
            t = (t + 1) % tables;
            small.read_at(&mut buf, t * PER_TABLE).expect("read");
        })
    });
    g.finish();
}

fn allocator(c: &mut Criterion) {
    let mut g = c.benchmark_group("allocator");
    let mut a = Allocator::new(CLUSTER, 1 << 30);
    g.bench_function("new_cluster", |b| b.iter(|| black_box(a.cluster())));
    // Free 64 clusters, make them ready, hand them out again.
    let mut a = Allocator::new(CLUSTER, 1 << 30);
    let batch: Vec<HostOffset> = (0..64).map(|_| a.cluster()).collect();
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function("reuse_64", |b| {
        b.iter(|| {
            for &c in &batch {
                a.free(c);
            }
            let p = a.take_pending();
            a.make_ready(p);
            for _ in 0..batch.len() {
                black_box(a.cluster());
            }
        })
    });
    g.finish();
}

fn io_config() -> Criterion {
    // Plots take longer to draw than most of these benches take to run.
    Criterion::default()
        .without_plots()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

fn micro_config() -> Criterion {
    // Plots take longer to draw than most of these benches take to run.
    Criterion::default()
        .without_plots()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1))
        .sample_size(50)
}

criterion_group! {
    name = io;
    config = io_config();
    targets = reads, overwrites, allocating_writes, cow_writes
}
criterion_group! {
    name = micro;
    config = micro_config();
    targets = l2_entry_kind, l2_cache, l2_lookup, allocator
}
criterion_main!(io, micro);
