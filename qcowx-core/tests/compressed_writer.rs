//! The compressed writer links its clusters through the engine's one table path: a
//! dirty L2 table evicted from the cache while compressed output goes on, whose
//! write-back fails, is kept (and written later), not dropped with its links.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use qcowx_core::convert::CompressedWriter;
use qcowx_core::storage::{Access, MemStorage, Watched};
use qcowx_core::{CreateOptions, Image, OpenOptions};

const CLUSTER: u64 = 512;
/// Bytes of guest disk one L2 table maps with 512-byte clusters (64 entries).
const PER_L2: u64 = CLUSTER / 8 * CLUSTER;

fn cluster(seed: u8) -> Vec<u8> {
    // Compressible but distinct per cluster.
    (0..CLUSTER as usize)
        .map(|i| seed ^ (i / 64) as u8)
        .collect()
}

#[test]
fn failed_write_back_of_an_evicted_dirty_table_keeps_the_table() {
    let mem = Arc::new(MemStorage::new());
    let mut opts = CreateOptions::new(16 * PER_L2);
    opts.cluster_size = CLUSTER;
    Image::create_in(Arc::clone(&mem) as _, &opts)
        .unwrap()
        .close()
        .unwrap();

    let failing = Arc::new(AtomicBool::new(false));
    let fail = Arc::clone(&failing);
    let watched = Watched::new(Arc::clone(&mem), move |a| match a {
        Access::Write { .. } if fail.load(Ordering::SeqCst) => {
            Err(io::Error::other("injected write failure"))
        }
        _ => Ok(()),
    });
    // The smallest cache: it holds a few tables, so the next new one evicts a dirty
    // table, which has to be written back first.
    let img = Image::from_storage(
        Arc::new(watched),
        &OpenOptions::new().write(true).cache_bytes(0),
    )
    .unwrap();
    let mut w = CompressedWriter::new(&img).unwrap();
    let mut stored = Vec::new();
    // One cluster in each of eight L2 tables: more than the cache holds, so every
    // new table evicts a dirty one. Every write fails while the ninth comes in.
    let mut t = 0;
    loop {
        let guest = t * PER_L2;
        let data = cluster(t as u8 + 1);
        failing.store(t == 8, Ordering::SeqCst);
        match w.write_cluster(guest, &data) {
            Ok(compressed) => {
                assert!(compressed, "test data compresses");
                stored.push((guest, data));
            }
            Err(e) => {
                assert!(
                    e.to_string().contains("injected write failure"),
                    "the write-back failure is reported: {e}"
                );
                break;
            }
        }
        t += 1;
        assert!(t <= 8, "the injected failure was not reported");
    }
    failing.store(false, Ordering::SeqCst);
    // After the failure the same cluster can be written, and every earlier cluster
    // still reads back: none of their tables was lost.
    let guest = t * PER_L2;
    let data = cluster(0xee);
    assert!(w.write_cluster(guest, &data).unwrap());
    stored.push((guest, data));
    w.finish().unwrap();
    for (guest, data) in &stored {
        let mut buf = vec![0u8; CLUSTER as usize];
        img.read_at(&mut buf, *guest).unwrap();
        assert_eq!(&buf, data, "guest cluster at {guest}, before close");
    }
    img.close().unwrap();

    let img = Image::from_storage(mem, &OpenOptions::new()).unwrap();
    for (guest, data) in &stored {
        let mut buf = vec![0u8; CLUSTER as usize];
        img.read_at(&mut buf, *guest).unwrap();
        assert_eq!(&buf, data, "guest cluster at {guest}, after reopen");
    }
    let report = img.check().unwrap();
    assert_eq!(report.exit_code(), 0, "{report:?}");
}
