//! Opening reads the snapshot table in growing pieces (not the whole 64 MiB bound): a
//! table longer than the first guess, followed by other clusters, still reads back
//! entry for entry, and a table cut short by the end of the file is still refused.

use std::sync::Arc;

use qcowx_core::format::snapshot::SnapshotError;
use qcowx_core::storage::{MemStorage, Storage};
use qcowx_core::{CreateOptions, Error, Image, OpenOptions, RootKind};

const SNAPSHOTS: usize = 1000;

/// A 120-byte name: entries of about 250 bytes, twice the first guess per entry.
fn name(i: usize) -> String {
    format!("{i:05}-{}", "n".repeat(114))
}

/// An image with `SNAPSHOTS` long-named snapshots and data written after the last
/// one (so clusters follow the table); returns its bytes.
fn image_bytes() -> Vec<u8> {
    let storage = Arc::new(MemStorage::new());
    let image = Image::create_in(storage.clone(), &CreateOptions::new(8 << 20)).expect("create");
    for i in 0..SNAPSHOTS {
        image.snapshot("default", &name(i)).expect("snapshot");
    }
    image.write_at(&[0x5a; 65536], 0).expect("write");
    image.close().expect("close");
    drop(image);
    storage.to_vec()
}

fn open(bytes: Vec<u8>) -> qcowx_core::Result<Image> {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes));
    Image::from_storage(storage, &OpenOptions::new())
}

#[test]
fn long_table_reads_back_entry_for_entry() {
    let bytes = image_bytes();
    let image = open(bytes).expect("reopen");
    let names: Vec<String> = image
        .list()
        .expect("list")
        .into_iter()
        .filter(|r| r.kind == RootKind::Snapshot)
        .map(|r| r.name)
        .collect();
    let want: Vec<String> = (0..SNAPSHOTS).map(name).collect();
    assert_eq!(names, want);
    let info = image.info().expect("info");
    assert_eq!(info.snapshots.len(), SNAPSHOTS);
    let report = image.check().expect("check");
    assert_eq!(report.exit_code(), 0, "{:?}", report.messages);
}

#[test]
fn table_cut_by_the_end_of_the_file_is_refused() {
    let bytes = image_bytes();
    let offset = u64::from_be_bytes(bytes[64..72].try_into().expect("8 bytes")) as usize;
    // Cut the file in the middle of the table (past the first guess of 128 bytes per
    // entry, so the read has to grow before it meets the end of the file).
    let cut = offset + SNAPSHOTS * 200;
    assert!(cut < bytes.len());
    let mut short = bytes;
    short.truncate(cut);
    match open(short) {
        Err(Error::Snapshot {
            source: SnapshotError::Truncated { .. },
            ..
        }) => {}
        Err(e) => panic!("wrong error for a cut table: {e}"),
        Ok(_) => panic!("a table cut by the end of the file was accepted"),
    }
}
