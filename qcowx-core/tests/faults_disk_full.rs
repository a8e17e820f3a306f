//! Faults of the storage under an image: a full disk.
//!
//! The storage is `Faulty` (`faults_common`), an in-memory file that fails on demand:
//! once it is "full", writes that need a block not yet allocated fail with `ENOSPC`
//! (what fits is written, as a real short write leaves it; punched holes give space
//! back).
//!
//! * Disk full: the caller sees an `Error::NoSpace` whose OS error is `ENOSPC` and that
//!   names the file and offset; the image stays consistent and readable; writes (and
//!   snapshots) succeed on the same handle once space returns.

mod faults_common;

use std::io;
use std::sync::Arc;

use qcowx_core::storage::MemStorage;
use qcowx_core::{Error, Image, OpenOptions};
use qcowx_tests::assert_qemu_check_clean_bytes;

use faults_common::{base_image, data, os_error, rw, Faulty};

// ---- disk full -------------------------------------------------------------------------------

/// A full file system: writes to new clusters fail with ENOSPC (naming the file and
/// an offset); in-place writes and reads go on; the file stays consistent; once space
/// returns, the same handle writes, snapshots and closes cleanly and nothing written
/// before is lost.
#[test]
fn a_full_disk_fails_allocating_writes_with_enospc_and_recovers_when_space_returns() {
    let before = data(1, 0, 64 << 10);
    let storage = Arc::new(Faulty::from_vec(base_image(&before)));
    let img = Image::from_storage(storage.clone(), &rw()).expect("open");
    storage.fill_up();

    // A partial-cluster write into a new cluster (its L2 table exists).
    let err = img
        .write_at(&data(3, 70 << 10, 512), 70 << 10)
        .expect_err("partial allocating write on a full disk");
    assert_eq!(os_error(&err), Some(libc::ENOSPC), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("<memory>") && text.contains("offset") && text.contains("No space"),
        "the message names file, offset and cause: {text}"
    );
    match &err {
        Error::NoSpace { source, .. } => assert_eq!(source.kind(), io::ErrorKind::StorageFull),
        other => panic!("a full disk is Error::NoSpace: {other:?}"),
    }
    img.flush()
        .expect("nothing new to link: flush works on a full disk");
    let report = img.check().expect("check while full");
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);

    // A write that needs a new L2 table too; a snapshot.
    let far = 5 << 20;
    let err = img
        .write_at(&data(2, far, 8192), far)
        .expect_err("an allocating write on a full disk");
    assert_eq!(os_error(&err), Some(libc::ENOSPC), "{err:?}");
    let err = img.snapshot("default", "full").expect_err("snapshot");
    assert_eq!(os_error(&err), Some(libc::ENOSPC), "{err:?}");
    // The L2 table the failed write allocated is linked in memory and must be written
    // before its L1 entry: until space returns a flush may fail, with ENOSPC.
    if let Err(e) = img.flush() {
        assert_eq!(os_error(&e), Some(libc::ENOSPC), "{e:?}");
    }

    // Writes in place and reads carry on.
    img.write_at(&data(4, 4096, 4096), 4096)
        .expect("in-place write on a full disk");
    let mut expect = before.clone();
    expect[4096..8192].copy_from_slice(&data(4, 4096, 4096));
    let mut back = vec![0u8; expect.len()];
    img.read_at(&mut back, 0).expect("read");
    assert_eq!(back, expect);

    // The file as it is now (what a crash would leave) opens and holds `before`.
    {
        let now = Image::from_storage(
            Arc::new(MemStorage::from_vec(storage.inner.to_vec())),
            &OpenOptions::new(),
        )
        .expect("open the file of the full disk");
        let r = now.check().expect("check");
        assert_eq!(r.corruptions, 0, "{:?}", r.messages);
        let mut b = vec![0u8; 4096];
        now.read_at(&mut b, 0).expect("read");
        assert_eq!(b, before[..4096]);
    }

    // Space returns: the same handle writes, snapshots and closes.
    storage.free_up();
    img.write_at(&data(2, far, 8192), far)
        .expect("write after space returned");
    img.write_at(&data(3, 70 << 10, 512), 70 << 10)
        .expect("write");
    img.snapshot("default", "full")
        .expect("snapshot after space returned");
    img.close().expect("close");

    let bytes = storage.inner.to_vec();
    let img = Arc::new(
        Image::from_storage(
            Arc::new(MemStorage::from_vec(bytes.clone())),
            &OpenOptions::new(),
        )
        .expect("reopen"),
    );
    let report = img.check().expect("check");
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
    for (seed, off, len) in [(2u8, far, 8192u64), (3, 70 << 10, 512)] {
        let mut b = vec![0u8; len as usize];
        img.read_at(&mut b, off).expect("read");
        assert_eq!(b, data(seed, off, len));
    }
    let snap = img.open_root("full").expect("snapshot");
    let mut b = vec![0u8; expect.len()];
    snap.read_at(&mut b, 0).expect("read snapshot");
    assert_eq!(b, expect);
    assert_qemu_check_clean_bytes(&bytes, "after a full disk");
}

/// Flush and close on a full disk: a flush that must write a new L2 table fails with
/// ENOSPC (and again when retried); a close that cannot finish fails with ENOSPC and
/// leaves a file that opens and repairs without losing a flushed write.
#[test]
fn flush_and_close_on_a_full_disk_fail_cleanly_and_lose_nothing_flushed() {
    let before = data(1, 0, 64 << 10);
    let storage = Arc::new(Faulty::from_vec(base_image(&before)));
    let img = Image::from_storage(storage.clone(), &rw()).expect("open");
    // The data of an allocating write lands; its new L2 table is not written yet.
    img.write_at(&data(5, 3 << 20, 4096), 3 << 20)
        .expect("write");
    storage.fill_up();
    let err = img
        .flush()
        .expect_err("flush needs room for the new L2 table");
    assert_eq!(os_error(&err), Some(libc::ENOSPC), "{err:?}");
    let err = img.flush().expect_err("still full");
    assert_eq!(os_error(&err), Some(libc::ENOSPC), "{err:?}");
    let err = img.close().expect_err("close on a full disk");
    assert_eq!(os_error(&err), Some(libc::ENOSPC), "{err:?}");
    drop(img);

    let bytes = storage.inner.to_vec();
    let img = Image::from_storage(Arc::new(MemStorage::from_vec(bytes)), &rw())
        .expect("the file of a failed close opens");
    let report = img.check().expect("check");
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    let mut b = vec![0u8; before.len()];
    img.read_at(&mut b, 0).expect("read");
    assert_eq!(b, before, "flushed data survives");
    let report = img.repair().expect("repair");
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
    img.close().expect("close");
}
