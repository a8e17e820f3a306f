//! How guest writes reach the storage: clusters written in place whose host clusters
//! follow each other go out as one storage write, and every other case still writes
//! what it must (copy-on-write under a snapshot, clusters apart in the file).

use std::sync::{Arc, Mutex};

use qcowx_core::storage::{Access, MemStorage, Watched};
use qcowx_core::{CreateOptions, Image, OpenOptions};

const CS: u64 = 65536;

/// The writes an image made to its storage: (offset, length).
#[derive(Debug, Clone, Default)]
struct Writes(Arc<Mutex<Vec<(u64, usize)>>>);

impl Writes {
    /// The writes since the last call.
    fn take(&self) -> Vec<(u64, usize)> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// A storage in memory whose writes are recorded.
fn recorded() -> (Writes, Arc<Watched<MemStorage>>) {
    let writes = Writes::default();
    let log = writes.clone();
    let storage = Watched::new(MemStorage::new(), move |a| {
        if let Access::Write { offset, len } = a {
            log.0.lock().unwrap().push((offset, len));
        }
        Ok(())
    });
    (writes, Arc::new(storage))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8) ^ (i as u8))
        .collect()
}

fn new_image(clusters: u64) -> (Writes, Arc<Watched<MemStorage>>, Image) {
    let (writes, storage) = recorded();
    let img = Image::create_in(storage.clone(), &CreateOptions::new(clusters * CS)).unwrap();
    (writes, storage, img)
}

/// The model and the image agree on every byte of the disk.
fn assert_reads_as(img: &Image, model: &[u8]) {
    let mut back = vec![0u8; model.len()];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == model, "the disk does not read as written");
}

#[test]
fn an_overwrite_of_contiguous_clusters_is_one_write() {
    let (writes, _, img) = new_image(32);
    let mut model = vec![0u8; 32 * CS as usize];
    // Allocate clusters 0..20 in order: their host clusters follow each other.
    let first = pattern(1, 20 * CS as usize);
    img.write_at(&first, 0).unwrap();
    model[..first.len()].copy_from_slice(&first);
    img.flush().unwrap();
    writes.take();
    // 1 MiB starting inside cluster 1 and ending inside cluster 17.
    let at = CS + 4096;
    let data = pattern(2, 1 << 20);
    img.write_at(&data, at).unwrap();
    model[at as usize..at as usize + data.len()].copy_from_slice(&data);
    let writes = writes.take();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0].1, data.len());
    assert_reads_as(&img, &model);
}

#[test]
fn clusters_apart_in_the_file_are_written_one_by_one() {
    let (writes, _, img) = new_image(16);
    let mut model = vec![0u8; 16 * CS as usize];
    // Allocate clusters 15, 14, ..., 0: each lies before the previous one's host.
    for c in (0..16u64).rev() {
        let data = pattern(c as u8, CS as usize);
        img.write_at(&data, c * CS).unwrap();
        model[(c * CS) as usize..((c + 1) * CS) as usize].copy_from_slice(&data);
    }
    img.flush().unwrap();
    writes.take();
    let data = pattern(7, 8 * CS as usize);
    img.write_at(&data, 4 * CS).unwrap();
    model[4 * CS as usize..12 * CS as usize].copy_from_slice(&data);
    let writes = writes.take();
    assert_eq!(writes.len(), 8, "{writes:?}");
    assert!(writes.iter().all(|&(_, n)| n == CS as usize), "{writes:?}");
    assert_reads_as(&img, &model);
}

#[test]
fn a_shared_cluster_inside_a_run_is_copied_and_the_rest_written_in_place() {
    let (writes, _, img) = new_image(32);
    let mut model = vec![0u8; 32 * CS as usize];
    let first = pattern(3, 16 * CS as usize);
    img.write_at(&first, 0).unwrap();
    model[..first.len()].copy_from_slice(&first);
    img.snapshot("default", "s").unwrap();
    // Writing cluster 6 copies it (and the L2 table); clusters 0..16 stay shared
    // otherwise. Then write cluster 6 again: in place now.
    let c6 = pattern(4, 4096);
    img.write_at(&c6, 6 * CS).unwrap();
    model[6 * CS as usize..6 * CS as usize + 4096].copy_from_slice(&c6);
    img.flush().unwrap();
    writes.take();
    // Clusters 5..8: 5 and 7 are shared (copied), 6 is the active layer's own.
    let at = 5 * CS + 100;
    let data = pattern(5, 3 * CS as usize - 200);
    img.write_at(&data, at).unwrap();
    model[at as usize..at as usize + data.len()].copy_from_slice(&data);
    let writes = writes.take();
    // At least one write per cluster, none of them spanning two clusters.
    assert!(writes.len() >= 3, "{writes:?}");
    assert!(writes.iter().all(|&(_, n)| n <= CS as usize), "{writes:?}");
    assert_reads_as(&img, &model);
    // The snapshot still reads as before.
    let snap = Arc::new(img).open_root("s").unwrap();
    let mut back = vec![0u8; first.len()];
    snap.read_at(&mut back, 0).unwrap();
    assert!(back == first, "the snapshot changed");
}

/// The data writes (a cluster or more) among recorded writes; metadata and header
/// writes are smaller.
fn data_writes(writes: &[(u64, usize)]) -> Vec<usize> {
    writes
        .iter()
        .filter(|&&(_, n)| n >= CS as usize)
        .map(|&(_, n)| n)
        .collect()
}

#[test]
fn new_clusters_in_a_row_are_one_write() {
    let (writes, storage, img) = new_image(256);
    let mut model = vec![0u8; 256 * CS as usize];
    writes.take();
    // 1 MiB of unallocated clusters: allocated one after the other.
    let data = pattern(8, 1 << 20);
    img.write_at(&data, 2 * CS).unwrap();
    model[2 * CS as usize..2 * CS as usize + data.len()].copy_from_slice(&data);
    assert_eq!(data_writes(&writes.take()), vec![1 << 20]);
    // Under a snapshot every cluster is shared: new ones again, and the snapshot keeps
    // the old bytes. A partial cluster at the end goes on its own.
    img.snapshot("default", "s").unwrap();
    img.flush().unwrap();
    writes.take();
    let before = model.clone();
    let over = pattern(9, (1 << 20) + 4096);
    img.write_at(&over, 2 * CS).unwrap();
    model[2 * CS as usize..2 * CS as usize + over.len()].copy_from_slice(&over);
    assert_eq!(data_writes(&writes.take()), vec![1 << 20, CS as usize]);
    // A long run is cut into writes of at most 4 MiB.
    let long = pattern(10, 10 << 20);
    img.write_at(&long, 64 * CS).unwrap();
    model[64 * CS as usize..64 * CS as usize + long.len()].copy_from_slice(&long);
    assert_eq!(data_writes(&writes.take()), vec![4 << 20, 4 << 20, 2 << 20]);
    assert_reads_as(&img, &model);
    let img = Arc::new(img);
    let snap = img.open_root("s").unwrap();
    let mut back = vec![0u8; before.len()];
    snap.read_at(&mut back, 0).unwrap();
    assert!(back == before, "the snapshot changed");
    drop(snap);
    Arc::try_unwrap(img).ok().unwrap().close().unwrap();
    let img = Image::from_storage(storage.clone(), &OpenOptions::new()).unwrap();
    let report = img.check().unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.messages);
    assert_reads_as(&img, &model);
}
