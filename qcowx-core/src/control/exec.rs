//! The executor: one handler per operation, run on an [`Image`].

use super::proto::{DeleteTarget, Request, Response};
use crate::{Image, Result};

/// What the executor needs to know about whoever runs it (a server, or `qcowx` on an
/// image it opened itself).
///
/// ```
/// use qcowx_core::control::{execute, Host, Request, Response};
/// use qcowx_core::{CreateOptions, Image};
///
/// /// A server that exports every root under its own name.
/// struct Exports;
/// impl Host for Exports {
///     fn export_of(&self, root: &str) -> Option<String> {
///         Some(root.to_string())
///     }
/// }
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
/// let req = Request::Snapshot { vdi: "default".into(), name: "s1".into() };
/// let Response::Root { export, .. } = execute(&img, &req, &Exports)? else {
///     panic!("a snapshot answers its root");
/// };
/// assert_eq!(export.as_deref(), Some("s1"));
/// # Ok(()) }
/// ```
pub trait Host {
    /// The name of the NBD export serving root `root`, if any.
    fn export_of(&self, root: &str) -> Option<String>;
}

/// Running requests on an image opened in this process: nothing is exported.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl Host for Local {
    fn export_of(&self, _root: &str) -> Option<String> {
        None
    }
}

/// Runs `req` on `img`. The error is the library's: a server answers it with its
/// message and [`crate::Error::kind`].
///
/// ```
/// use qcowx_core::control::{execute, Local, Request, Response};
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
/// let req = Request::Snapshot { vdi: "default".into(), name: "s1".into() };
/// match execute(&img, &req, &Local)? {
///     Response::Root { root, export } => {
///         assert_eq!(root.name, "s1");
///         assert_eq!(export, None); // nothing is exported locally
///     }
///     // Request and Response are #[non_exhaustive]: new operations add variants.
///     other => panic!("unexpected {other:?}"),
/// }
/// let Response::Roots(roots) = execute(&img, &Request::List, &Local)? else {
///     panic!("list answers roots");
/// };
/// assert_eq!(roots.len(), 2);
/// # Ok(()) }
/// ```
pub fn execute(img: &Image, req: &Request, host: &dyn Host) -> Result<Response> {
    match req {
        Request::Snapshot { vdi, name } => snapshot(img, host, vdi, name),
        Request::Fork { snapshot, name } => fork(img, host, snapshot, name),
        Request::Delete(target) => delete(img, target),
        Request::Revert { vdi, snapshot } => revert(img, vdi, snapshot),
        Request::Gc => gc(img),
        Request::List => list(img),
        Request::Diff { from, to } => diff(img, from, to),
        Request::Usage => usage(img),
        Request::Check => Ok(Response::Check(img.check()?)),
        Request::Bitmap { .. } => bitmap(img, req),
    }
}

fn bitmap(img: &Image, req: &Request) -> Result<Response> {
    let Request::Bitmap {
        bitmap: name,
        add,
        granularity,
        clear,
        merge,
        merge_file,
        enable,
        disable,
        remove,
    } = req
    else {
        return Ok(Response::Done);
    };
    if !(*add || *remove || *clear || *enable || *disable || !merge.is_empty()) {
        return Err(crate::Error::InvalidArgument(
            "need at least one of add, remove, clear, enable, disable, merge".into(),
        ));
    }
    if *enable && *disable {
        return Err(crate::Error::InvalidArgument(
            "enable and disable exclude each other".into(),
        ));
    }
    if granularity.is_some() && !*add {
        return Err(crate::Error::InvalidArgument(
            "a granularity only goes with add".into(),
        ));
    }
    if *add {
        img.bitmap_add(name, *granularity, *disable)?;
    }
    if *clear {
        img.bitmap_clear(name)?;
    }
    match merge_file {
        None => {
            for source in merge {
                img.bitmap_merge(source, name)?;
            }
        }
        Some(file) => {
            if merge.is_empty() {
                return Err(crate::Error::InvalidArgument(
                    "a merge file only goes with merge".into(),
                ));
            }
            let other = crate::OpenOptions::new().open(file)?;
            let size = other.size();
            for source in merge {
                let mut window = 0u64;
                while window < size {
                    let len = crate::engine::STATUS_WINDOW.min(size - window);
                    img.bitmap_mark(name, &other.bitmap_dirty_in(source, window, len)?)?;
                    window += len;
                }
            }
        }
    }
    if *enable || (*disable && !*add) {
        img.bitmap_enable(name, *enable)?;
    }
    if *remove {
        img.bitmap_remove(name)?;
    }
    Ok(Response::Done)
}

fn snapshot(img: &Image, host: &dyn Host, vdi: &str, name: &str) -> Result<Response> {
    let root = img.snapshot(vdi, name)?;
    let export = host.export_of(&root.name);
    Ok(Response::Root { root, export })
}

fn fork(img: &Image, host: &dyn Host, snapshot: &str, name: &str) -> Result<Response> {
    let root = img.fork(snapshot, name)?;
    let export = host.export_of(&root.name);
    Ok(Response::Root { root, export })
}

fn delete(img: &Image, target: &DeleteTarget) -> Result<Response> {
    match target {
        DeleteTarget::Snapshot(name) => img.delete_snapshot(name)?,
        DeleteTarget::Vdi(name) => img.delete_vdi(name)?,
    }
    Ok(Response::Done)
}

fn revert(img: &Image, vdi: &str, snapshot: &str) -> Result<Response> {
    img.revert(vdi, snapshot)?;
    Ok(Response::Done)
}

fn gc(img: &Image) -> Result<Response> {
    Ok(Response::Gc(img.gc()?))
}

fn list(img: &Image) -> Result<Response> {
    Ok(Response::Roots(img.list()?))
}

fn diff(img: &Image, from: &str, to: &str) -> Result<Response> {
    Ok(Response::Ranges(img.diff(from, to)?))
}

fn usage(img: &Image) -> Result<Response> {
    Ok(Response::Usage {
        roots: img.list()?,
        usage: img.root_usage()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CreateOptions;

    #[test]
    fn requests_run_on_an_image_opened_here() {
        let dir = tempfile::tempdir().unwrap();
        let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))
            .expect("create");
        let run = |r: Request| execute(&img, &r, &Local);
        let Response::Root { root, export } = run(Request::Snapshot {
            vdi: "default".into(),
            name: "s".into(),
        })
        .unwrap() else {
            panic!("snapshot answer")
        };
        assert_eq!((root.name.as_str(), export), ("s", None));
        let Response::Roots(roots) = run(Request::List).unwrap() else {
            panic!("list answer")
        };
        assert_eq!(roots.len(), 2);
        let e = run(Request::Delete(DeleteTarget::Vdi("nope".into()))).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotFound);
        assert_eq!(
            run(Request::Delete(DeleteTarget::Snapshot("s".into()))).unwrap(),
            Response::Done
        );
        assert!(matches!(run(Request::Gc).unwrap(), Response::Gc(g) if g.roots_removed == 1));
        img.close().unwrap();
    }
}
