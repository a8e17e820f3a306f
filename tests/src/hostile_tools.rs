//! What the workspace's `hostile_*.rs` test targets share: the corpus of hostile images
//! (valid `qemu-img` images with bytes patched to break one thing each) and the way a
//! case runs. Each target declares [`crate::alloc_limit::LimitAlloc`] as its global
//! allocator, so that [`check_alloc`] sees the largest single allocation of a case.
//! They use it as `qcowx_tests::hostile_tools`.
//!
//! Header field offsets used by the cases (QCOW2 specification):
//! 0 magic, 4 version, 8 backing_file_offset, 16 backing_file_size, 20 cluster_bits,
//! 24 size, 32 crypt_method, 36 l1_size, 40 l1_table_offset, 48 refcount_table_offset,
//! 56 refcount_table_clusters, 60 nb_snapshots, 64 snapshots_offset,
//! 72 incompatible_features, 80 compatible_features, 88 autoclear_features,
//! 96 refcount_order, 100 header_length, 104 compression_type.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qcowx_core::format::header::HeaderError;
use qcowx_core::{CheckReport, Error, OpenOptions};

use crate::{
    convert_to_raw, error_text, open_retry, qemu_img_create, qemu_io_ok, run_bounded, tempdir,
    Bounded, TempDir,
};

/// Per-operation watchdog.
pub const WATCHDOG: Duration = Duration::from_secs(30);
/// Largest single allocation a case may make (the biggest legitimate buffers are an
/// L1 table or snapshot table, bounded by the file, and 2 MiB clusters).
pub const ALLOC_BUDGET: usize = 256 << 20;
/// Disk bytes the full-read pass reads at most.
pub const READ_CAP: u64 = 64 << 20;
/// The size of the chunks [`exercise`] reads.
pub const CHUNK: u64 = 64 << 10;

/// The offset mask of L1/L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The COPIED flag of L1/L2 entries (refcount 1).
pub const COPIED: u64 = 1 << 63;

// ---- base images ------------------------------------------------------------------------

/// A valid image and the raw content QEMU reads from it.
pub struct Base {
    dir: TempDir,
    /// The image.
    pub path: PathBuf,
    /// What QEMU reads from it (`qemu-img convert` to raw).
    pub raw: Vec<u8>,
}

impl Base {
    /// A copy of the image to patch, named `name`.
    pub fn copy(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::copy(&self.path, &p).expect("copy base image");
        p
    }
}

/// 4 KiB clusters, 8 MiB, data under each of the four L1 entries (an L1 entry covers
/// 2 MiB with 4 KiB clusters).
pub fn plain() -> Base {
    let dir = tempdir();
    let path = dir.path().join("plain.qcow2");
    qemu_img_create(&path, 8 << 20, "cluster_size=4096");
    qemu_io_ok(
        "qcow2",
        &path,
        &[
            "write -P 0x11 0 65536",
            "write -P 0x22 2097252 9000",
            "write -P 0x33 4198400 4096",
            "write -P 0x44 6299648 12288",
        ],
    );
    finish_base(dir, path)
}

/// The [`Base`] of image `path` (in `dir`, which it keeps).
pub fn finish_base(dir: TempDir, path: PathBuf) -> Base {
    let raw_path = dir.path().join("base.raw");
    convert_to_raw(&path, &raw_path);
    let raw = std::fs::read(&raw_path).expect("read raw");
    Base { dir, path, raw }
}

// ---- running a case -----------------------------------------------------------------------

/// Fails the test (naming `what`) if `b` made a single allocation larger than
/// [`ALLOC_BUDGET`].
pub fn check_alloc<T>(what: &str, b: &Bounded<T>) {
    assert!(
        b.largest_alloc <= ALLOC_BUDGET,
        "{what}: the library made a single allocation of {} bytes (budget {ALLOC_BUDGET})",
        b.largest_alloc
    );
}

/// Opens `path` read-only under the watchdog and returns the error it must give.
pub fn open_error(path: &Path) -> Error {
    open_error_with(path, OpenOptions::new())
}

/// [`open_error`] with options `opts`.
pub fn open_error_with(path: &Path, opts: OpenOptions) -> Error {
    let p = path.to_path_buf();
    let what = format!("open {}", path.display());
    let b = run_bounded(&what, WATCHDOG, move || {
        open_retry(&opts, &p).err().map(|e| (error_text(&e), e))
    });
    check_alloc(&what, &b);
    match b.result {
        Ok(Some((text, e))) => {
            println!("{what}: {text}");
            e
        }
        Ok(None) => panic!("{what}: opened, but it should have been refused"),
        Err(p) => panic!("{what}: panicked: {p}"),
    }
}

/// What reading a whole opened image and checking it gave.
pub struct Exercise {
    /// Results per [`CHUNK`]-sized chunk of the disk (up to [`READ_CAP`]).
    chunks: Vec<(u64, Result<Vec<u8>, Error>)>,
    check: Result<CheckReport, Error>,
}

impl Exercise {
    /// The offsets of the chunks that failed to read.
    pub fn failing(&self) -> Vec<u64> {
        self.chunks
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(o, _)| *o)
            .collect()
    }

    /// The error of the chunk at `off`, which must have failed.
    pub fn error_at(&self, off: u64) -> &Error {
        match &self.chunks[(off / CHUNK) as usize] {
            (_, Err(e)) => e,
            (o, Ok(_)) => panic!("chunk at {o} read fine; expected an error"),
        }
    }

    /// Every chunk except those in `bad` reads fine and equals `raw`.
    pub fn others_match(&self, raw: &[u8], bad: std::ops::Range<u64>) {
        for (off, r) in &self.chunks {
            if bad.contains(off) {
                continue;
            }
            match r {
                Ok(data) => {
                    let s = *off as usize;
                    assert!(
                        data[..] == raw[s..s + data.len()],
                        "chunk at {off} reads different content than QEMU's"
                    );
                }
                Err(e) => panic!("chunk at {off} outside the broken range failed: {e}"),
            }
        }
    }

    /// The check must not call the image clean.
    pub fn check_not_clean(&self) {
        match &self.check {
            Ok(r) => assert!(
                r.exit_code() != 0,
                "check calls a broken image clean: {r:?}"
            ),
            Err(e) => println!("check failed with {e}"),
        }
    }
}

/// Opens `path` read-only (it must open), reads the whole disk in chunks and checks it,
/// each step under the watchdog.
pub fn exercise(path: &Path) -> Exercise {
    let p = path.to_path_buf();
    let what = format!("open+read+check {}", path.display());
    let b = run_bounded(&what, WATCHDOG, move || {
        let img = open_retry(&OpenOptions::new(), &p)
            .unwrap_or_else(|e| panic!("open {}: {}", p.display(), error_text(&e)));
        let size = img.size().min(READ_CAP);
        let mut chunks = Vec::new();
        let mut off = 0;
        while off < size {
            let n = CHUNK.min(size - off);
            let mut buf = vec![0u8; n as usize];
            chunks.push((off, img.read_at(&mut buf, off).map(|_| buf)));
            off += n;
        }
        let check = img.check();
        Exercise { chunks, check }
    });
    check_alloc(&what, &b);
    b.result.unwrap_or_else(|p| panic!("{what}: panicked: {p}"))
}

/// Asserts that `e` is a header error blaming field `want`.
pub fn header_field(e: &Error, want: &str) {
    match e {
        Error::Header {
            source: HeaderError::Field { field, .. },
            ..
        } => assert_eq!(*field, want, "wrong field blamed: {e}"),
        other => panic!("expected a header error about `{want}`, got {other:?}"),
    }
}
