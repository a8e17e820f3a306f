//! The registry (the snapshot table's roots and what qcowx knows of them) after a
//! commit that failed: the state must describe the table the file still has, down to
//! the room that table may grow into in place.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use qcowx_core::storage::{Access, MemStorage, Storage, Watched};
use qcowx_core::{CreateOptions, Image};

/// A snapshot whose commit moved the table and then failed (the header write was
/// refused) leaves the old table in force with the room it had: the next snapshot
/// must not append in place past that room, over the clusters that follow the old
/// table (another snapshot's L1 table here). Every snapshot taken before and after
/// reads back, and the image checks clean.
#[test]
fn a_failed_commit_of_a_moved_table_keeps_the_old_tables_room() {
    // The hook refuses the first header write that follows a table move (a write of
    // the whole table: longer than one entry, and not a cluster-sized L1 copy) after
    // the first move, then lets everything through.
    let armed = Arc::new(AtomicBool::new(true));
    let moved = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicBool::new(false));
    let (a2, m2, r2) = (Arc::clone(&armed), Arc::clone(&moved), Arc::clone(&refused));
    let storage: Arc<dyn Storage> = Arc::new(Watched::new(MemStorage::new(), move |a| {
        match a {
            Access::Write { offset: 0, .. } if m2.swap(false, Ordering::SeqCst) => {
                if a2.swap(false, Ordering::SeqCst) {
                    r2.store(true, Ordering::SeqCst);
                    return Err(io::Error::other("header write refused by the test"));
                }
            }
            Access::Write { len, .. } if len > 1024 && len != 4096 => {
                m2.store(true, Ordering::SeqCst)
            }
            Access::Write { .. } => m2.store(false, Ordering::SeqCst),
            Access::Read { .. } => {}
        }
        Ok(())
    }));
    let mut opts = CreateOptions::new(8 << 20);
    opts.cluster_size = 4096;
    let img = Image::create_in(Arc::clone(&storage), &opts).expect("create");

    // Entries with long names: about 17 fit the first table's 4 KiB of room.
    let name = |i: usize| format!("{i:04}-{}", "n".repeat(100));
    let mut taken = 0;
    let mut failures = 0;
    while taken < 40 {
        img.write_at(&[taken as u8 + 1; 512], 0).expect("write");
        match img.snapshot("default", &name(taken)) {
            Ok(_) => taken += 1,
            Err(e) => {
                failures += 1;
                assert!(failures == 1, "only the one refused commit fails: {e}");
            }
        }
    }
    assert!(
        refused.load(Ordering::SeqCst),
        "a moved table's commit was refused"
    );
    assert_eq!(img.info().expect("info").snapshots.len(), taken);

    let report = img.check().expect("check");
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    let img = Arc::new(img);
    for i in 0..taken {
        let snap = img.open_root(&name(i)).expect("open snapshot");
        let mut b = [0u8; 512];
        snap.read_at(&mut b, 0).expect("read");
        assert_eq!(b, [i as u8 + 1; 512], "snapshot {i} reads what it held");
    }
}
