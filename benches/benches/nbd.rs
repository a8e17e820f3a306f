//! criterion benches of the NBD server's hot paths (package `qcowx-nbd`):
//!
//! - `nbd_wire/*`: decoding a request header (`RequestHeader` from 28 bytes, magic
//!   checked) and encoding the replies a read or write sends (a simple reply; a
//!   structured `OFFSET_DATA` chunk header with its offset), one message and a
//!   pipelined batch of 16;
//! - `nbd_serve/*`: the whole transmission phase (`transmission::serve`) of 1,024
//!   pipelined requests read from memory and answered into a sink, against the default
//!   VDI of a 64 MiB image in memory (`MemStorage`, every cluster written): 4 KiB
//!   reads (structured replies), 4 KiB writes, and 256 KiB reads (run by the worker
//!   threads instead of the reader). No sockets and no file I/O: the numbers are the
//!   server's own cost per request, plus the start of the worker threads (once per
//!   1,024 requests).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qcowx_benches::fill;
use qcowx_core::storage::MemStorage;
use qcowx_core::{CreateOptions, Image};
use qcowx_nbd::exports::{ExportPlan, Exports};
use qcowx_nbd::handshake::Negotiated;
use qcowx_nbd::transmission;
use qcowx_nbd::wire::{
    ChunkHeader, RequestHeader, SimpleReply, CMD_READ, CMD_WRITE, REPLY_TYPE_OFFSET_DATA,
    REQUEST_MAGIC,
};
use qcowx_nbd::Settings;
use zerocopy::{FromBytes, IntoBytes};

const IMAGE_SIZE: u64 = 64 << 20;
const REQUESTS: u64 = 1024;

fn request(command: u16, cookie: u64, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        magic: REQUEST_MAGIC.into(),
        flags: 0.into(),
        command: command.into(),
        cookie: cookie.into(),
        offset: offset.into(),
        length: length.into(),
    }
}

/// Decodes one header the way the server does: layout, magic, then the fields.
fn decode(bytes: &[u8]) -> Option<(u16, u64, u64, u32)> {
    let h = RequestHeader::read_from_bytes(bytes).ok()?;
    if h.magic.get() != REQUEST_MAGIC {
        return None;
    }
    Some((
        h.command.get(),
        h.cookie.get(),
        h.offset.get(),
        h.length.get(),
    ))
}

fn wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_wire");
    let one = request(CMD_READ, 7, 4096 * 1234, 4096);
    let bytes = one.as_bytes().to_vec();
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_request", |b| {
        b.iter(|| decode(black_box(&bytes)).expect("valid"))
    });
    let batch: Vec<u8> = (0..16u64)
        .flat_map(|i| request(CMD_READ, i, i * 65536, 4096).as_bytes().to_vec())
        .collect();
    g.throughput(Throughput::Elements(16));
    g.bench_function("decode_request_batch_16", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for h in black_box(&batch).chunks_exact(28) {
                sum += decode(h).expect("valid").2;
            }
            sum
        })
    });
    let mut out = Vec::with_capacity(64 << 10);
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_simple_reply", |b| {
        b.iter(|| {
            out.clear();
            out.extend_from_slice(SimpleReply::new(black_box(7), 0).as_bytes());
            out.len()
        })
    });
    g.bench_function("encode_data_chunk_header", |b| {
        b.iter(|| {
            out.clear();
            let h = ChunkHeader::new(black_box(7), REPLY_TYPE_OFFSET_DATA, 1, 8 + 4096);
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(&black_box(4096u64 * 1234).to_be_bytes());
            out.len()
        })
    });
    g.throughput(Throughput::Elements(16));
    g.bench_function("encode_simple_reply_batch_16", |b| {
        b.iter(|| {
            out.clear();
            for i in 0..16u64 {
                out.extend_from_slice(SimpleReply::new(black_box(i), 0).as_bytes());
            }
            out.len()
        })
    });
    g.finish();
}

/// A negotiated session (structured replies, no metadata contexts) on the default
/// VDI of a 64 MiB in-memory image whose every byte was written.
fn session() -> Negotiated {
    let image = Image::create_in(Arc::new(MemStorage::new()), &CreateOptions::new(IMAGE_SIZE))
        .expect("create image");
    fill(&image, IMAGE_SIZE, 0x5a).expect("fill image");
    let plan = ExportPlan::Auto {
        main_name: "default".into(),
        main_description: None,
    };
    let exports = Exports::new(Arc::new(image), plan, false).expect("exports");
    let info = exports
        .find("default")
        .expect("find")
        .expect("the default export");
    Negotiated {
        export: exports.open(&info).expect("open export"),
        flags: 0,
        structured: true,
        contexts: Vec::new(),
    }
}

/// `REQUESTS` pipelined requests of `len` bytes spread over the image (a write
/// carries its payload).
fn stream(command: u16, len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let slots = IMAGE_SIZE / u64::from(len);
    for i in 0..REQUESTS {
        // An odd stride visits every slot before it repeats.
        let offset = (i * 2053 % slots) * u64::from(len);
        out.extend_from_slice(request(command, i, offset, len).as_bytes());
        if command == CMD_WRITE {
            out.resize(out.len() + len as usize, 0x3c);
        }
    }
    out
}

fn serve(c: &mut Criterion) {
    let n = session();
    let settings = Settings::default();
    let mut g = c.benchmark_group("nbd_serve");
    g.throughput(Throughput::Elements(REQUESTS));
    for (name, command, len) in [
        ("read_4KiB", CMD_READ, 4096u32),
        ("write_4KiB", CMD_WRITE, 4096),
        ("read_256KiB", CMD_READ, 256 << 10),
    ] {
        let input = stream(command, len);
        g.bench_function(BenchmarkId::new("1024_requests", name), |b| {
            b.iter(|| {
                transmission::serve(
                    black_box(&input[..]),
                    std::io::sink(),
                    &n,
                    &settings,
                    &|| {},
                    "bench",
                )
                .expect("serve")
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    // Plots take longer to draw than these benches take to run.
    Criterion::default()
        .without_plots()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30)
}

criterion_group! {
    name = nbd;
    config = config();
    targets = wire, serve
}
criterion_main!(nbd);
