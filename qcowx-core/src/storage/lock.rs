//! QEMU-compatible OFD byte-range image locks.
//!
//! QEMU's `file-posix` block driver coordinates concurrent users of an image file with
//! shared (`F_RDLCK`) open-file-description locks on single bytes of the file. Taking
//! the same bytes makes qcowx and QEMU (`qemu-system-*`, `qemu-img`, `qemu-io`,
//! `qemu-nbd`, libvirt-managed guests) refuse to open an image in conflicting ways at
//! the same time.
//!
//! # Byte layout
//!
//! There are four permissions ([`Permission`]), numbered by their QEMU
//! `BLK_PERM_*` bit index: consistent read (0), write (1), write unchanged (2) and
//! resize (3). A user of the image
//!
//! * holds byte `100 + bit` for every permission it *uses*, and
//! * holds byte `200 + bit` for every permission it does *not share* with others.
//!
//! Each held byte is a shared lock of length 1, so any number of users may hold the
//! same byte. Conflicts are found by testing (`F_OFD_GETLK` with `F_WRLCK`) whether
//! another open file description holds a byte: for each permission a user wants, the
//! "unshared" byte `200 + bit` must be free; for each permission it does not share, the
//! permission byte `100 + bit` must be free. Like QEMU, [`lock_file`] first takes its
//! own bytes and then checks, so two users racing to open the same image cannot both
//! succeed.
//!
//! # Lifetime
//!
//! Open-file-description (OFD) locks belong to the open file description, not to the
//! process: they are released automatically when the last file descriptor referring to
//! it is closed (for a [`File`], when it and every `try_clone` of it are dropped).
//! Two separate `open` calls in the same process get separate descriptions, so they
//! conflict with each other exactly like two processes would. Descriptors inherited by
//! a child process share the description and therefore its locks; Rust's standard
//! library opens files with `O_CLOEXEC`, so spawned programs do not inherit them.
//!
//! OFD locks need Linux 3.15 or newer; on other systems [`lock_file`] reports
//! [`io::ErrorKind::Unsupported`] for every mode that takes a lock.

use std::fmt;
use std::fs::File;
use std::io;

use thiserror::Error;

mod holders;
mod perms;

pub use perms::{Permission, Permissions};

/// Offset of the first "permission in use" byte (QEMU's `RAW_LOCK_PERM_BASE`).
pub const PERM_LOCK_BASE: u64 = 100;
/// Offset of the first "permission not shared" byte (QEMU's `RAW_LOCK_SHARED_BASE`).
pub const SHARED_LOCK_BASE: u64 = 200;

/// How an image file is locked against concurrent users.
///
/// ```
/// use qcowx_core::storage::lock::{LockMode, Permission, Permissions};
///
/// // A writer uses write and resize and lets others only read and write unchanged.
/// assert!(LockMode::Exclusive.held().has(Permission::Write));
/// assert!(!LockMode::Exclusive.shared().has(Permission::Write));
/// assert_eq!(LockMode::Shared.held(), Permissions::CONSISTENT_READ);
/// assert!(LockMode::Shared.takes_lock() && !LockMode::ForceShare.takes_lock());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// No locking at all: no bytes are held and nothing is checked. Use only when the
    /// caller guarantees exclusive access by other means.
    None,
    /// A read-only user, like `qemu-img info` on a qcow2 image: uses consistent read
    /// and shares only consistent read and write unchanged. It coexists with other
    /// readers but fails while any process writes or resizes the image, and keeps
    /// QEMU writers from opening the image while it is held.
    Shared,
    /// A read-only user that ignores other users and takes no lock, like `qemu-img -U`
    /// (`--force-share`). The image may change underneath it.
    ForceShare,
    /// A writer, like a QEMU guest or `qemu-img commit`: uses consistent read, write
    /// and resize and shares only consistent read and write unchanged. It fails while
    /// any other process reads (without force-share) or writes the image.
    Exclusive,
}

impl LockMode {
    /// The permissions a user in this mode holds (bytes `100 + bit`).
    pub const fn held(self) -> Permissions {
        match self {
            LockMode::None | LockMode::ForceShare => Permissions::NONE,
            LockMode::Shared => Permissions::CONSISTENT_READ,
            LockMode::Exclusive => Permissions(
                Permissions::CONSISTENT_READ.0 | Permissions::WRITE.0 | Permissions::RESIZE.0,
            ),
        }
    }

    /// The permissions a user in this mode allows others to hold; it holds bytes
    /// `200 + bit` for all the others.
    pub const fn shared(self) -> Permissions {
        match self {
            LockMode::None | LockMode::ForceShare => Permissions::ALL,
            LockMode::Shared | LockMode::Exclusive => {
                Permissions(Permissions::CONSISTENT_READ.0 | Permissions::WRITE_UNCHANGED.0)
            }
        }
    }

    /// Whether this mode holds any lock byte.
    pub const fn takes_lock(self) -> bool {
        matches!(self, LockMode::Shared | LockMode::Exclusive)
    }
}

/// Who holds a conflicting image lock, as far as this process can tell.
///
/// Open-file-description locks record no owner; the holder is found by looking for
/// descriptions of the same file that hold the conflicting byte in `/proc/*/fdinfo`
/// (Linux; only processes this user may inspect are seen).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockHolder {
    /// Another handle in this process: the image (or its file) is open twice.
    ThisProcess,
    /// Another process.
    Process {
        /// Its process id.
        pid: u32,
        /// Its command name (`/proc/PID/comm`), empty when unreadable.
        name: String,
    },
    /// Some other process that cannot be seen from here.
    Unknown,
}

impl fmt::Display for LockHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockHolder::ThisProcess => f.write_str("another handle in this process"),
            LockHolder::Process { pid, name } if name.is_empty() => write!(f, "process {pid}"),
            LockHolder::Process { pid, name } => write!(f, "process {pid} ({name})"),
            LockHolder::Unknown => f.write_str("another process"),
        }
    }
}

/// Why an image lock could not be taken.
///
/// Two handles on one file conflict as two processes would:
///
/// ```
/// use qcowx_core::storage::lock::{held_by_others, lock_file, unlock_file, LockHolder, LockMode, Permission};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("a.img");
/// std::fs::write(&path, b"").unwrap();
/// let writer = std::fs::File::open(&path).unwrap(); // locks need a readable descriptor
/// lock_file(&writer, LockMode::Exclusive).unwrap();
///
/// let reader = std::fs::File::open(&path).unwrap();
/// let e = lock_file(&reader, LockMode::Shared).unwrap_err();
/// assert!(e.is_conflict());
/// assert_eq!(e.permission(), Some(Permission::Write));
/// assert_eq!(e.holder(), Some(&LockHolder::ThisProcess));
/// let seen = held_by_others(&reader).unwrap();
/// assert!(seen.held.has(Permission::Write) && !seen.is_unlocked());
///
/// unlock_file(&writer).unwrap();
/// assert!(held_by_others(&reader).unwrap().is_unlocked());
/// lock_file(&reader, LockMode::Shared).unwrap();
/// ```
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another user holds a permission that the requested mode does not share.
    #[error("image is locked: {holder} holds the \"{permission}\" lock")]
    Held {
        /// The permission in conflict.
        permission: Permission,
        /// Who holds it.
        holder: LockHolder,
    },
    /// Another user does not share a permission that the requested mode needs.
    #[error("image is locked: {holder} does not share the \"{permission}\" lock")]
    NotShared {
        /// The permission in conflict.
        permission: Permission,
        /// Who refuses to share it.
        holder: LockHolder,
    },
    /// A lock operation failed for a reason other than a conflict (for example, the
    /// file system or kernel does not support OFD locks).
    #[error("cannot {op} image lock byte {offset}: {source}")]
    Io {
        /// What was being done: `"take"`, `"test"` or `"release"`.
        op: &'static str,
        /// The byte offset involved.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl LockError {
    fn held(permission: Permission) -> LockError {
        LockError::Held {
            permission,
            holder: LockHolder::Unknown,
        }
    }

    fn not_shared(permission: Permission) -> LockError {
        LockError::NotShared {
            permission,
            holder: LockHolder::Unknown,
        }
    }

    /// The permission in conflict, if this error is a conflict with another user.
    pub fn permission(&self) -> Option<Permission> {
        match self {
            LockError::Held { permission, .. } | LockError::NotShared { permission, .. } => {
                Some(*permission)
            }
            LockError::Io { .. } => None,
        }
    }

    /// Who holds the conflicting lock, if this error is a conflict.
    pub fn holder(&self) -> Option<&LockHolder> {
        match self {
            LockError::Held { holder, .. } | LockError::NotShared { holder, .. } => Some(holder),
            LockError::Io { .. } => None,
        }
    }

    /// The byte whose holder caused the conflict.
    fn conflict_byte(&self) -> Option<u64> {
        match self {
            LockError::Held { permission, .. } => Some(permission.perm_byte()),
            LockError::NotShared { permission, .. } => Some(permission.shared_byte()),
            LockError::Io { .. } => None,
        }
    }

    /// Whether the error is a conflict with another user of the image.
    pub fn is_conflict(&self) -> bool {
        self.permission().is_some()
    }
}

impl From<LockError> for io::Error {
    fn from(err: LockError) -> io::Error {
        let kind = match &err {
            LockError::Held { .. } | LockError::NotShared { .. } => io::ErrorKind::ResourceBusy,
            LockError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, err)
    }
}

/// The image-lock bytes held by *other* open file descriptions of a file.
///
/// ```
/// use qcowx_core::storage::lock::{held_by_others, lock_file, LockMode, Permission};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("a.img");
/// std::fs::write(&path, b"").unwrap();
/// let me = std::fs::File::open(&path).unwrap(); // locks need a readable descriptor
/// assert!(held_by_others(&me).unwrap().is_unlocked());
/// let reader = std::fs::File::open(&path).unwrap();
/// lock_file(&reader, LockMode::Shared).unwrap();
/// let status = held_by_others(&me).unwrap();
/// assert!(status.held.has(Permission::ConsistentRead));
/// assert!(status.unshared.has(Permission::Write), "a reader does not share write");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LockStatus {
    /// Permissions some other user holds (bytes `100 + bit`).
    pub held: Permissions,
    /// Permissions some other user does not share (bytes `200 + bit`).
    pub unshared: Permissions,
}

impl LockStatus {
    /// Whether no other user holds any image-lock byte.
    pub fn is_unlocked(&self) -> bool {
        self.held.is_empty() && self.unshared.is_empty()
    }
}

/// Sets the image lock held through `file`'s open file description to `mode`.
///
/// For [`LockMode::Shared`] and [`LockMode::Exclusive`] this takes the mode's bytes,
/// then checks for conflicting users and fails with [`LockError::Held`] or
/// [`LockError::NotShared`] (naming the holder when it can be found) if there are any. Bytes held from an earlier call that the
/// new mode does not need are released on success. [`LockMode::None`] and
/// [`LockMode::ForceShare`] check nothing and release any image-lock bytes held
/// through `file`.
///
/// On error, `file` holds no image-lock bytes (even ones it held before the call).
/// The lock is released when the file is closed; see the [module docs](self).
///
/// ```
/// use qcowx_core::storage::lock::{lock_file, LockMode};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("a.img");
/// std::fs::write(&path, b"").unwrap();
/// let a = std::fs::File::open(&path).unwrap(); // locks need a readable descriptor
/// let b = std::fs::File::open(&path).unwrap();
/// lock_file(&a, LockMode::Shared).unwrap();
/// lock_file(&b, LockMode::Shared).unwrap(); // readers coexist
/// assert!(lock_file(&a, LockMode::Exclusive).is_err(), "b reads");
/// lock_file(&b, LockMode::None).unwrap(); // releases b's bytes
/// lock_file(&a, LockMode::Exclusive).unwrap();
/// ```
pub fn lock_file(file: &File, mode: LockMode) -> Result<(), LockError> {
    lock_file_with(file, mode.held(), mode.shared())
}

/// Sets the image lock held through `file` to using `held` and sharing `shared`, with
/// the same semantics as [`lock_file`]; for callers that need a combination that no
/// [`LockMode`] offers.
///
/// ```
/// use qcowx_core::storage::lock::{lock_file, lock_file_with, LockMode, Permissions};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("a.img");
/// std::fs::write(&path, b"").unwrap();
/// let a = std::fs::File::open(&path).unwrap(); // locks need a readable descriptor
/// // Read, and let others do anything (what QEMU's `-U` readers never refuse).
/// lock_file_with(&a, Permissions::CONSISTENT_READ, Permissions::ALL).unwrap();
/// let b = std::fs::File::open(&path).unwrap();
/// lock_file(&b, LockMode::Exclusive).unwrap();
/// ```
pub fn lock_file_with(
    file: &File,
    held: Permissions,
    shared: Permissions,
) -> Result<(), LockError> {
    let unshared = !shared;
    if held.is_empty() && unshared.is_empty() {
        return unlock_file(file);
    }
    let result = apply_and_check(file, held, unshared);
    match result {
        Ok(()) => Ok(()),
        Err(mut e) => {
            // Best effort: the conflict (or the first failure) is the error to report.
            let _ = unlock_file(file);
            // With our bytes gone, any description holding the byte is the holder.
            if let (
                Some(byte),
                LockError::Held { holder, .. } | LockError::NotShared { holder, .. },
            ) = (e.conflict_byte(), &mut e)
            {
                *holder = holders::find(file, byte);
            }
            Err(e)
        }
    }
}

fn apply_and_check(file: &File, held: Permissions, unshared: Permissions) -> Result<(), LockError> {
    // Take our bytes first so that a racing opener sees them, as QEMU does.
    for perm in held.iter() {
        sys::set_lock(file, perm.perm_byte(), sys::LockKind::Shared).map_err(|e| {
            conflict_or_io(e, "take", perm.perm_byte(), LockError::not_shared(perm))
        })?;
    }
    for perm in unshared.iter() {
        sys::set_lock(file, perm.shared_byte(), sys::LockKind::Shared)
            .map_err(|e| conflict_or_io(e, "take", perm.shared_byte(), LockError::held(perm)))?;
    }
    // Every permission we use must be shared by everybody else.
    for perm in held.iter() {
        if is_held_by_other(file, perm.shared_byte())? {
            return Err(LockError::not_shared(perm));
        }
    }
    // Nobody else may use a permission we do not share.
    for perm in unshared.iter() {
        if is_held_by_other(file, perm.perm_byte())? {
            return Err(LockError::held(perm));
        }
    }
    // Drop bytes left over from an earlier mode.
    for perm in (!held).iter() {
        release(file, perm.perm_byte())?;
    }
    for perm in (!unshared).iter() {
        release(file, perm.shared_byte())?;
    }
    Ok(())
}

/// Releases every image-lock byte held through `file`'s open file description.
///
/// Closing the file does the same implicitly.
///
/// ```
/// use qcowx_core::storage::lock::{lock_file, unlock_file, LockMode};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("a.img");
/// std::fs::write(&path, b"").unwrap();
/// let a = std::fs::File::open(&path).unwrap(); // locks need a readable descriptor
/// let b = std::fs::File::open(&path).unwrap();
/// lock_file(&a, LockMode::Exclusive).unwrap();
/// assert!(lock_file(&b, LockMode::Shared).is_err());
/// unlock_file(&a).unwrap();
/// lock_file(&b, LockMode::Shared).unwrap();
/// ```
pub fn unlock_file(file: &File) -> Result<(), LockError> {
    for perm in Permission::ALL {
        release(file, perm.perm_byte())?;
        release(file, perm.shared_byte())?;
    }
    Ok(())
}

/// Reports which image-lock bytes other open file descriptions (in this or any other
/// process) hold on `file`. Bytes held through `file` itself are not reported.
///
/// ```
/// use qcowx_core::storage::lock::{held_by_others, lock_file, LockMode, Permissions};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("a.img");
/// std::fs::write(&path, b"").unwrap();
/// let a = std::fs::File::open(&path).unwrap(); // locks need a readable descriptor
/// lock_file(&a, LockMode::Exclusive).unwrap();
/// // Its own bytes are not reported to itself.
/// assert!(held_by_others(&a).unwrap().is_unlocked());
/// let other = std::fs::File::open(&path).unwrap();
/// assert_eq!(held_by_others(&other).unwrap().held, LockMode::Exclusive.held());
/// assert_eq!(held_by_others(&other).unwrap().unshared, !LockMode::Exclusive.shared());
/// # let _ = Permissions::NONE;
/// ```
pub fn held_by_others(file: &File) -> Result<LockStatus, LockError> {
    let mut status = LockStatus::default();
    for perm in Permission::ALL {
        if is_held_by_other(file, perm.perm_byte())? {
            status.held = status.held | perm.into();
        }
        if is_held_by_other(file, perm.shared_byte())? {
            status.unshared = status.unshared | perm.into();
        }
    }
    Ok(status)
}

fn is_held_by_other(file: &File, offset: u64) -> Result<bool, LockError> {
    sys::is_locked_by_other(file, offset).map_err(|source| LockError::Io {
        op: "test",
        offset,
        source,
    })
}

fn release(file: &File, offset: u64) -> Result<(), LockError> {
    sys::set_lock(file, offset, sys::LockKind::Unlock).map_err(|source| LockError::Io {
        op: "release",
        offset,
        source,
    })
}

fn conflict_or_io(err: io::Error, op: &'static str, offset: u64, conflict: LockError) -> LockError {
    if sys::is_conflict(&err) {
        conflict
    } else {
        LockError::Io {
            op,
            offset,
            source: err,
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    #[derive(Clone, Copy)]
    pub(super) enum LockKind {
        Shared,
        Unlock,
    }

    fn flock_for(offset: u64, lock_type: libc::c_int) -> io::Result<libc::flock> {
        let start = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "lock offset too large"))?;
        // SAFETY: `flock` is a plain C struct of integers, for which all-zero bytes are
        // a valid value; OFD commands require `l_pid` to be zero.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = lock_type as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = start;
        fl.l_len = 1;
        Ok(fl)
    }

    fn fcntl_lock(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
        loop {
            // SAFETY: the descriptor is open for the lifetime of `file`, and `fl` points
            // to a valid, writable `flock` as F_OFD_SETLK/F_OFD_GETLK require.
            let ret = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
            if ret != -1 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    pub(super) fn set_lock(file: &File, offset: u64, kind: LockKind) -> io::Result<()> {
        let lock_type = match kind {
            LockKind::Shared => libc::F_RDLCK,
            LockKind::Unlock => libc::F_UNLCK,
        };
        let mut fl = flock_for(offset, lock_type)?;
        fcntl_lock(file, libc::F_OFD_SETLK, &mut fl)
    }

    pub(super) fn is_locked_by_other(file: &File, offset: u64) -> io::Result<bool> {
        let mut fl = flock_for(offset, libc::F_WRLCK)?;
        fcntl_lock(file, libc::F_OFD_GETLK, &mut fl)?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    pub(super) fn is_conflict(err: &io::Error) -> bool {
        matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod sys {
    use std::fs::File;
    use std::io;

    #[derive(Clone, Copy)]
    pub(super) enum LockKind {
        Shared,
        Unlock,
    }

    fn unsupported() -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "QEMU-compatible image locks need Linux open file description locks",
        )
    }

    pub(super) fn set_lock(_file: &File, _offset: u64, kind: LockKind) -> io::Result<()> {
        match kind {
            // Nothing can have been taken, so there is nothing to release.
            LockKind::Unlock => Ok(()),
            LockKind::Shared => Err(unsupported()),
        }
    }

    pub(super) fn is_locked_by_other(_file: &File, _offset: u64) -> io::Result<bool> {
        Err(unsupported())
    }

    pub(super) fn is_conflict(_err: &io::Error) -> bool {
        false
    }
}

#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::path::Path;

    fn open(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open temp file")
    }

    fn temp() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().expect("temp file")
    }

    #[test]
    fn permission_layout_matches_qemu() {
        assert_eq!(Permission::ConsistentRead.perm_byte(), 100);
        assert_eq!(Permission::Resize.perm_byte(), 103);
        assert_eq!(Permission::Write.shared_byte(), 201);
        assert_eq!(Permissions::ALL.bits(), 0x0f);
        assert_eq!(LockMode::Exclusive.held().bits(), 0x0b);
        assert_eq!(LockMode::Exclusive.shared().bits(), 0x05);
        assert_eq!(LockMode::Shared.held().bits(), 0x01);
        assert_eq!(LockMode::Shared.shared().bits(), 0x05);
        assert_eq!(!Permissions::NONE, Permissions::ALL);
        assert_eq!(
            (Permissions::WRITE | Permissions::RESIZE).to_string(),
            "write, resize"
        );
    }

    #[test]
    fn exclusive_excludes_everything_but_force_share() {
        let tmp = temp();
        let a = open(tmp.path());
        let b = open(tmp.path());
        lock_file(&a, LockMode::Exclusive).unwrap();
        let status = held_by_others(&b).unwrap();
        assert_eq!(status.held, LockMode::Exclusive.held());
        assert_eq!(status.unshared, !LockMode::Exclusive.shared());
        // Own locks are invisible to the holder.
        assert!(held_by_others(&a).unwrap().is_unlocked());

        let err = lock_file(&b, LockMode::Exclusive).unwrap_err();
        assert!(err.is_conflict(), "{err}");
        assert_eq!(err.permission(), Some(Permission::Write));
        assert!(err.to_string().contains("\"write\""), "{err}");
        // A failed attempt leaves nothing behind.
        assert_eq!(held_by_others(&a).unwrap(), LockStatus::default());

        let err = lock_file(&b, LockMode::Shared).unwrap_err();
        assert!(
            matches!(
                err,
                LockError::Held {
                    permission: Permission::Write,
                    holder: LockHolder::ThisProcess
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("another handle in this process"),
            "{err}"
        );
        lock_file(&b, LockMode::ForceShare).unwrap();
        lock_file(&b, LockMode::None).unwrap();

        drop(a);
        lock_file(&b, LockMode::Exclusive).unwrap();
    }

    #[test]
    fn readers_share_and_block_writers() {
        let tmp = temp();
        let a = open(tmp.path());
        let b = open(tmp.path());
        let c = open(tmp.path());
        lock_file(&a, LockMode::Shared).unwrap();
        lock_file(&b, LockMode::Shared).unwrap();
        let err = lock_file(&c, LockMode::Exclusive).unwrap_err();
        assert_eq!(err.permission(), Some(Permission::Write));
        drop(a);
        assert!(lock_file(&c, LockMode::Exclusive).is_err());
        unlock_file(&b).unwrap();
        lock_file(&c, LockMode::Exclusive).unwrap();
    }

    #[test]
    fn relocking_changes_mode() {
        let tmp = temp();
        let a = open(tmp.path());
        let b = open(tmp.path());
        lock_file(&a, LockMode::Exclusive).unwrap();
        lock_file(&a, LockMode::Shared).unwrap();
        assert_eq!(
            held_by_others(&b).unwrap(),
            LockStatus {
                held: Permissions::CONSISTENT_READ,
                unshared: Permissions::WRITE | Permissions::RESIZE,
            }
        );
        lock_file(&b, LockMode::Shared).unwrap();
        lock_file(&a, LockMode::ForceShare).unwrap();
        assert!(held_by_others(&b).unwrap().is_unlocked());
    }

    #[test]
    fn foreign_exclusive_byte_lock_is_a_conflict() {
        let tmp = temp();
        let a = open(tmp.path());
        let b = open(tmp.path());
        // Some non-QEMU program holding a write lock over the permission bytes.
        sys_write_lock(&a, Permission::Write.perm_byte());
        let err = lock_file(&b, LockMode::Exclusive).unwrap_err();
        assert!(err.is_conflict(), "{err}");
        let io: io::Error = err.into();
        assert_eq!(io.kind(), io::ErrorKind::ResourceBusy);
    }

    fn sys_write_lock(file: &File, offset: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: see `sys::flock_for`.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = offset as libc::off_t;
        fl.l_len = 1;
        // SAFETY: valid descriptor and flock pointer.
        let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
        assert_eq!(ret, 0, "{}", io::Error::last_os_error());
    }
}
