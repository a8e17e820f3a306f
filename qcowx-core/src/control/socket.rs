//! Where a server's control socket is (see the module documentation).

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{ControlError, ENV_RUNTIME_DIR};

pub(super) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The socket's file name for an image: from the file's device and inode numbers.
///
/// ```
/// use std::os::unix::fs::MetadataExt;
/// use qcowx_core::control::socket_name;
///
/// let dir = tempfile::tempdir().unwrap();
/// let image = dir.path().join("a.qcow2");
/// std::fs::write(&image, b"").unwrap();
/// let m = std::fs::metadata(&image).unwrap();
/// assert_eq!(socket_name(&image).unwrap(), format!("img-{:x}-{:x}.sock", m.dev(), m.ino()));
/// // Every name of the file gives the same socket.
/// let link = dir.path().join("link.qcow2");
/// std::os::unix::fs::symlink(&image, &link).unwrap();
/// assert_eq!(socket_name(&link).unwrap(), socket_name(&image).unwrap());
/// ```
pub fn socket_name(image: &Path) -> io::Result<String> {
    let m = std::fs::metadata(image)?;
    Ok(format!("img-{:x}-{:x}.sock", m.dev(), m.ino()))
}

/// The directories control sockets may be in, in the order clients try them (see the
/// module documentation).
///
/// ```
/// use std::path::Path;
/// use qcowx_core::control::{runtime_dirs, ENV_RUNTIME_DIR};
///
/// std::env::set_var(ENV_RUNTIME_DIR, "/srv/qcowx-sockets");
/// let dirs = runtime_dirs();
/// assert_eq!(dirs[0], Path::new("/srv/qcowx-sockets"));
/// assert_eq!(dirs[1], Path::new("/run/qcowx"));
/// assert!(dirs.last().unwrap().starts_with("/tmp"));
/// ```
pub fn runtime_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os(ENV_RUNTIME_DIR).filter(|d| !d.is_empty()) {
        v.push(PathBuf::from(d));
    }
    v.push(PathBuf::from("/run/qcowx"));
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        v.push(Path::new(&d).join("qcowx"));
    }
    v.push(PathBuf::from(format!("/tmp/qcowx-{}", euid())));
    v
}

/// Every path where a control socket for `image` may be, in the order
/// [`super::request`] tries them. Fails only if the image cannot be `stat`ed.
///
/// ```
/// use qcowx_core::control::{runtime_dirs, socket_candidates, socket_name};
///
/// let dir = tempfile::tempdir().unwrap();
/// let image = dir.path().join("a.qcow2");
/// std::fs::write(&image, b"").unwrap();
/// let name = socket_name(&image).unwrap();
/// let expected: Vec<_> = runtime_dirs().into_iter().map(|d| d.join(&name)).collect();
/// assert_eq!(socket_candidates(&image).unwrap(), expected);
/// assert!(socket_candidates(&dir.path().join("missing")).is_err());
/// ```
pub fn socket_candidates(image: &Path) -> io::Result<Vec<PathBuf>> {
    let name = socket_name(image)?;
    Ok(runtime_dirs().into_iter().map(|d| d.join(&name)).collect())
}

/// The control socket of the server serving `image`: the first candidate where a
/// socket file exists, else the path a server started now would use (without
/// creating anything).
///
/// ```
/// use qcowx_core::control::{socket_name, socket_path_for, ENV_RUNTIME_DIR};
///
/// let dir = tempfile::tempdir().unwrap();
/// let image = dir.path().join("a.qcow2");
/// std::fs::write(&image, b"").unwrap();
/// std::env::set_var(ENV_RUNTIME_DIR, dir.path());
/// // No server: where one started now would listen.
/// let path = socket_path_for(&image).unwrap();
/// assert_eq!(path, dir.path().join(socket_name(&image).unwrap()));
/// assert!(!path.exists(), "nothing is created");
/// ```
pub fn socket_path_for(image: &Path) -> io::Result<PathBuf> {
    let c = socket_candidates(image)?;
    if let Some(p) = c.iter().find(|p| is_socket(p)) {
        return Ok(p.clone());
    }
    let name = socket_name(image)?;
    Ok(server_dir_choice(false)
        .map(|d| d.join(&name))
        .unwrap_or_else(|_| c[c.len() - 1].clone()))
}

/// Whether `p` is a socket file (not following a symbolic link).
pub(super) fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Makes sure `dir` exists and is safe for a socket: created with `mode`; when
/// `private`, it must be a real directory owned by this user that nobody else may
/// write.
fn prepare_dir(dir: &Path, mode: u32, private: bool) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if private && (m.uid() != euid() || m.mode() & 0o022 != 0) {
        return Err(io::Error::other(format!(
            "{} is owned by another user or writable by others",
            dir.display()
        )));
    }
    Ok(())
}

/// The directory a server uses: the first of [`runtime_dirs`] it can use (creating
/// it when `create`).
fn server_dir_choice(create: bool) -> io::Result<PathBuf> {
    let mut errors = Vec::new();
    let env = std::env::var_os(ENV_RUNTIME_DIR).filter(|d| !d.is_empty());
    for d in runtime_dirs() {
        let (mode, private) = if env.as_deref() == Some(d.as_os_str()) {
            (0o700, false)
        } else if d == Path::new("/run/qcowx") {
            if euid() != 0 {
                continue;
            }
            (0o755, false)
        } else {
            (0o700, true)
        };
        if !create {
            return Ok(d);
        }
        match prepare_dir(&d, mode, private) {
            Ok(()) => return Ok(d),
            Err(e) => errors.push(format!("{}: {e}", d.display())),
        }
    }
    Err(io::Error::other(format!(
        "no usable directory for the control socket ({})",
        errors.join("; ")
    )))
}

/// The default control socket path of a server for `image`, creating its directory
/// (see the module documentation).
///
/// ```
/// use qcowx_core::control::{default_socket_path, socket_name, ENV_RUNTIME_DIR};
///
/// let dir = tempfile::tempdir().unwrap();
/// let image = dir.path().join("a.qcow2");
/// std::fs::write(&image, b"").unwrap();
/// let sockets = dir.path().join("run");
/// std::env::set_var(ENV_RUNTIME_DIR, &sockets);
/// let path = default_socket_path(&image).unwrap();
/// assert_eq!(path, sockets.join(socket_name(&image).unwrap()));
/// assert!(sockets.is_dir(), "the directory is created for the server");
/// ```
pub fn default_socket_path(image: &Path) -> Result<PathBuf, ControlError> {
    let name = socket_name(image).map_err(|source| ControlError::Io {
        context: format!("stat {}", image.display()),
        source,
    })?;
    let dir = server_dir_choice(true).map_err(|source| ControlError::Io {
        context: "control socket".into(),
        source,
    })?;
    Ok(dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn socket_names_follow_the_file_not_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.qcow2");
        std::fs::write(&a, b"x").unwrap();
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let hard = dir.path().join("hard.qcow2");
        std::fs::hard_link(&a, &hard).unwrap();
        let n = socket_name(&a).unwrap();
        assert!(n.starts_with("img-") && n.ends_with(".sock"), "{n}");
        assert_eq!(socket_name(&link).unwrap(), n);
        assert_eq!(socket_name(&hard).unwrap(), n);
        let b = dir.path().join("b.qcow2");
        std::fs::write(&b, b"y").unwrap();
        assert_ne!(socket_name(&b).unwrap(), n);
        assert!(socket_name(&dir.path().join("missing")).is_err());
        let c = socket_candidates(&a).unwrap();
        assert!(c.iter().all(|p| p.file_name().unwrap() == n.as_str()));
        assert_eq!(
            c.last().unwrap().parent().unwrap(),
            Path::new(&format!("/tmp/qcowx-{}", euid()))
        );
    }

    #[test]
    fn private_dirs_must_belong_to_us() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("ctl");
        prepare_dir(&d, 0o700, true).expect("create");
        prepare_dir(&d, 0o700, true).expect("exists");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(prepare_dir(&d, 0o700, true).is_err());
        let f = dir.path().join("file");
        std::fs::write(&f, b"").unwrap();
        assert!(prepare_dir(&f, 0o700, false).is_err());
    }
}
