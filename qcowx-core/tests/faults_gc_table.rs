//! Faults of the storage under an image: gc, and a change of the snapshot table, whose
//! writes fail.
//!
//! The storage is `Faulty` (`faults_common`), an in-memory file whose k-th write or
//! sync fails with `EIO`.
//!
//! * gc with each of its writes and syncs failing once: the caller gets `EIO`, and the
//!   file left once the handle is dropped has no corruption and loses nothing.
//! * A change of the snapshot table (a new snapshot, a delete, a rename) whose header
//!   write fails did not happen: the handle lists the roots it had, a close commits
//!   those, and the same change succeeds on the same handle once the disk works.

mod faults_common;

use std::sync::Arc;

use qcowx_core::storage::MemStorage;
use qcowx_core::{CreateOptions, Image, OpenOptions};
use qcowx_tests::assert_qemu_check_clean_bytes;

use faults_common::{data, io_op, os_error, rw, Faulty, Kind, Rule, CS, SIZE};

// ---- gc ---------------------------------------------------------------------------------------

/// An image with snapshots `s1` (deleted) and `s2`, for gc: the bytes and what the
/// default VDI and `s2` hold.
fn image_for_gc() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mem = Arc::new(MemStorage::new());
    let mut opts = CreateOptions::new(SIZE);
    opts.cluster_size = CS;
    let img = Image::create_in(mem.clone(), &opts).expect("create");
    img.write_at(&data(1, 0, 16384), 0).expect("write");
    img.snapshot("default", "s1").expect("s1");
    img.write_at(&data(2, 0, 8192), 0).expect("write");
    img.snapshot("default", "s2").expect("s2");
    let s2 = [data(2, 0, 8192), data(1, 8192, 8192)].concat();
    img.write_at(&data(3, 4096, 4096), 4096).expect("write");
    img.delete_snapshot("s1").expect("delete s1");
    img.close().expect("close");
    let head = [data(2, 0, 4096), data(3, 4096, 4096), data(1, 8192, 8192)].concat();
    (mem.to_vec(), head, s2)
}

/// gc with each of its writes and syncs failing once: the caller gets EIO, and the
/// file left once the handle is dropped has no corruption and loses nothing.
#[test]
fn gc_failing_at_each_write_and_sync_leaves_a_consistent_image() {
    let (bytes, head, s2) = image_for_gc();
    for kind in [Kind::Write, Kind::Sync] {
        let clean = Arc::new(Faulty::from_vec(bytes.clone()));
        let img = Image::from_storage(clean.clone(), &rw()).expect("open");
        let (w0, s0) = clean.counts();
        img.gc().expect("gc");
        let (w1, s1) = clean.counts();
        drop(img);
        let (first, last) = match kind {
            Kind::Write => (w0 + 1, w1),
            Kind::Sync => (s0 + 1, s1),
        };
        assert!(last >= first, "gc makes {kind:?} calls");
        for k in first..=last {
            let storage = Arc::new(Faulty::from_vec(bytes.clone()));
            let img = Image::from_storage(storage.clone(), &rw()).expect("open");
            storage.set_rule(Some(Rule {
                kind,
                index: k,
                sticky: false,
                errno: libc::EIO,
            }));
            let err = img.gc().expect_err("gc with a failing call");
            assert_eq!(os_error(&err), Some(libc::EIO), "{err:?}");
            drop(img);
            let label = format!("gc, {kind:?} #{k} fails");
            let img = Arc::new(
                Image::from_storage(
                    Arc::new(MemStorage::from_vec(storage.inner.to_vec())),
                    &OpenOptions::new(),
                )
                .expect("open"),
            );
            let report = img.check().expect("check");
            assert_eq!(report.corruptions, 0, "{label}: {:?}", report.messages);
            let mut b = vec![0u8; head.len()];
            img.read_at(&mut b, 0).expect("read");
            assert_eq!(b, head, "{label}: the default VDI");
            let d = img.open_root("s2").expect("s2");
            d.read_at(&mut b, 0).expect("read s2");
            assert_eq!(b, s2, "{label}: s2");
        }
    }
}

// ---- a failed commit of the snapshot table ------------------------------------------------------

/// The names of the image's roots, in table order.
fn root_names(img: &Image) -> Vec<String> {
    img.list()
        .expect("list")
        .into_iter()
        .map(|r| r.name)
        .collect()
}

/// A change of the snapshot table (a new snapshot, a delete, a rename) whose header
/// write fails did not happen: the handle lists the roots it had, a close commits
/// those, and the same change succeeds on the same handle once the disk works.
#[test]
fn a_table_change_whose_header_write_fails_does_not_happen() {
    type Change = fn(&Image) -> qcowx_core::Result<()>;
    let changes: [(&str, Change); 3] = [
        ("snapshot", |img| img.snapshot("default", "s3").map(|_| ())),
        ("delete", |img| img.delete_snapshot("s1")),
        ("rename", |img| {
            img.rename(qcowx_core::RootKind::Snapshot, "s1", "renamed")
        }),
    ];
    let mem = Arc::new(MemStorage::new());
    let img = Image::create_in(mem.clone(), &CreateOptions::new(SIZE)).expect("create");
    img.write_at(&data(1, 0, CS), 0).expect("write");
    img.snapshot("default", "s1").expect("s1");
    img.snapshot("default", "s2").expect("s2");
    img.close().expect("close");
    drop(img);
    let start = mem.to_vec();
    for (what, change) in changes {
        // The commit is the change's last header write (an earlier one may set the
        // dirty bit): found by failing the 1st, 2nd, ... write after the open.
        let fail_write = |k: u64| {
            let storage = Arc::new(Faulty::from_vec(start.clone()));
            let img = Image::from_storage(storage.clone(), &rw()).expect("open");
            let before = root_names(&img);
            let (writes, _) = storage.counts();
            storage.set_rule(Some(Rule {
                kind: Kind::Write,
                index: writes + k,
                sticky: false,
                errno: libc::EIO,
            }));
            let result = change(&img);
            (storage, img, before, result)
        };
        let commit = (1..=32)
            .map_while(|k| {
                let (_, _, _, result) = fail_write(k);
                result.err().map(|e| (k, io_op(&e)))
            })
            .filter(|(_, op)| op == "write header")
            .map(|(k, _)| k)
            .last()
            .unwrap_or_else(|| panic!("{what}: no header write among its first 32 writes"));

        let (storage, img, before, result) = fail_write(commit);
        let e = result.expect_err("the commit's write fails");
        assert_eq!(os_error(&e), Some(libc::EIO), "{what}: {e}");
        assert_eq!(root_names(&img), before, "{what}: the failed change shows");
        img.close().expect("close after the failed change");
        let bytes = storage.inner.to_vec();
        let reopened = Image::from_storage(
            Arc::new(MemStorage::from_vec(bytes.clone())),
            &OpenOptions::new(),
        )
        .expect("reopen");
        assert_eq!(
            root_names(&reopened),
            before,
            "{what}: the close committed the failed change"
        );
        assert_eq!(reopened.check().expect("check").corruptions, 0, "{what}");
        assert_qemu_check_clean_bytes(&bytes, what);

        // The same handle makes the change once the disk works again.
        let (storage, img, before, result) = fail_write(commit);
        assert!(result.is_err(), "{what}: the same write fails again");
        change(&img).unwrap_or_else(|e| panic!("{what} once the disk works: {e}"));
        let after = root_names(&img);
        assert_ne!(after, before, "{what}: the change took effect");
        img.close().expect("close");
        let reopened = Image::from_storage(
            Arc::new(MemStorage::from_vec(storage.inner.to_vec())),
            &OpenOptions::new(),
        )
        .expect("reopen");
        assert_eq!(root_names(&reopened), after, "{what}: committed once");
    }
}
