//! The commands, one file per group: [`image`] (create, info, check, export,
//! convert, compare, resize, import), [`measure`], [`roots`] (snapshot, list, fork, delete,
//! revert, gc, diff, rename, tree, map), [`stream`] (send, receive), [`io`] and [`docs`] (completions, man
//! pages); here, what they share: how a command fails, the hints after an error, and
//! how a result is printed.

pub(crate) mod amend;
pub(crate) mod bitmap;
pub(crate) mod docs;
pub(crate) mod image;
pub(crate) mod io;
pub(crate) mod measure;
#[cfg(feature = "s3")]
pub(crate) mod remote;
pub(crate) mod roots;
pub(crate) mod stream;

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use qcowx_core::control::{self, ControlError, Request, Response};
use qcowx_core::{ErrorKind, Image, LockMode, OpenOptions, RootKind};
use serde_json::Value;

use crate::report;
use crate::{Cli, OutputKind};

/// Why a command failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The image library reported an error.
    Image(qcowx_core::Error),
    /// A running qcowx-nbd serving the image refused or failed a forwarded request.
    Control(ControlError),
    /// Writing the command's output failed.
    Output(std::io::Error),
}

impl From<qcowx_core::Error> for Failure {
    fn from(e: qcowx_core::Error) -> Self {
        Failure::Image(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Output(e)
    }
}

impl Failure {
    /// The library's kind of the error (`None` for output errors and for failures to
    /// talk to a server).
    pub(crate) fn kind(&self) -> Option<ErrorKind> {
        match self {
            Failure::Image(e) => Some(e.kind()),
            Failure::Control(e) => e.kind(),
            Failure::Output(_) => None,
        }
    }

    /// What to print after `qcowx: `.
    pub(crate) fn message(&self) -> String {
        match self {
            Failure::Image(e) => error_chain(e),
            Failure::Control(e) => e.to_string(),
            Failure::Output(e) => format!("error writing output: {e}"),
        }
    }

    /// The OS error behind an image error, if any.
    pub(crate) fn os_error(&self) -> Option<&std::io::Error> {
        match self {
            Failure::Image(e) => {
                std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>())
            }
            Failure::Control(_) | Failure::Output(_) => None,
        }
    }

    /// Whether writing was refused: by the library, or by the OS (a permission, a
    /// read-only file system; the library reports the latter as an I/O error when the
    /// OS error comes wrapped in a message).
    pub(crate) fn write_refused(&self) -> bool {
        self.kind() == Some(ErrorKind::ReadOnly)
            || self.os_error().is_some_and(|e| {
                matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                )
            })
    }
}

/// The hints that follow an error: `could_share` when the command could have read the
/// image with -U, `writes` when it writes the image, `names_roots` the image file when
/// the command names snapshots or VDIs of it.
pub(crate) fn hints(
    f: &Failure,
    could_share: bool,
    writes: bool,
    names_roots: Option<&Path>,
) -> Vec<String> {
    let mut v = Vec::new();
    let kind = f.kind();
    if could_share && kind == Some(ErrorKind::Locked) {
        v.push(
            "-U (--force-share) reads an image in use, though what it reads may be changing"
                .to_string(),
        );
    }
    if writes && f.write_refused() && f.os_error().is_some() {
        v.push(
            "this command writes the image: it needs write access to the file (list, diff \
             and export only read)"
                .to_string(),
        );
    }
    if let Failure::Image(qcowx_core::Error::RefcountOverflow { file, bits, .. }) = f {
        let wider = (bits * 2).clamp(16, 64);
        v.push(format!(
            "`qcowx amend -o refcount_bits={wider} {file}` widens the refcounts \
             (nothing was changed)"
        ));
    }
    if let Some(file) = names_roots {
        // A name that is not there (not a file that is not there), or one already taken.
        let unknown_name = kind == Some(ErrorKind::NotFound) && f.os_error().is_none();
        let taken = kind == Some(ErrorKind::AlreadyExists) && f.os_error().is_none();
        if unknown_name || taken {
            v.push(format!(
                "`qcowx list {}` lists the snapshots and VDIs",
                file.display()
            ));
        }
    }
    v
}

/// The error and the causes its message does not already include.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !msg.contains(&s) {
            msg.push_str(": ");
            msg.push_str(&s);
        }
        cause = c.source();
    }
    msg
}

pub(crate) fn lock_mode(force_share: bool) -> LockMode {
    if force_share {
        LockMode::ForceShare
    } else {
        LockMode::Shared
    }
}

/// Fails with the library's not-found error unless `name` is a live root of `kind`.
pub(crate) fn require_kind(
    img: &Image,
    kind: RootKind,
    name: &str,
) -> Result<(), qcowx_core::Error> {
    if img.list()?.iter().any(|r| r.kind == kind && r.name == name) {
        return Ok(());
    }
    Err(qcowx_core::Error::NotFound {
        file: img.file_name().to_string(),
        what: match kind {
            RootKind::Snapshot => "snapshot",
            RootKind::Vdi => "VDI",
        }
        .to_string(),
        name: name.to_string(),
    })
}

/// Runs `req` on the image `opened` gave (then closes it), or, when opening failed
/// because a qcowx-nbd serving the image holds its lock, sends `req` to that server:
/// scripts work the same on live and idle images. Any other error, or no server
/// answering, is reported as the open error.
pub(crate) fn run_request(
    file: &Path,
    opened: Result<Image, qcowx_core::Error>,
    req: &Request,
) -> Result<Response, Failure> {
    let open_error = match opened {
        Ok(img) => {
            let r = control::execute(&img, req, &control::Local)?;
            img.close()?;
            return Ok(r);
        }
        Err(e) => e,
    };
    if open_error.kind() != ErrorKind::Locked {
        return Err(Failure::Image(open_error));
    }
    match control::request(file, req) {
        Ok(r) => Ok(r),
        Err(ControlError::NoServer { .. }) => Err(Failure::Image(open_error)),
        Err(e) => Err(Failure::Control(e)),
    }
}

/// The failure for an answer of the wrong kind to `req`.
pub(crate) fn unexpected(req: &Request, r: &Response) -> Failure {
    Failure::Control(ControlError::Protocol(format!(
        "unexpected answer to {req}: {r:?}"
    )))
}

/// Opens `file` for writing (exclusive lock) without its backing chain.
pub(crate) fn open_rw_meta(file: &Path) -> Result<Image, qcowx_core::Error> {
    OpenOptions::new()
        .write(true)
        .open_backing(false)
        .open(file)
}

/// Exits with a usage error (exit code 2) in clap's format, with `sub`'s usage.
pub(crate) fn usage_error(sub: &str, kind: clap::error::ErrorKind, msg: String) -> ! {
    let mut cmd = Cli::command();
    cmd.build();
    match cmd.find_subcommand_mut(sub) {
        Some(s) => s.error(kind, msg).exit(),
        None => cmd.error(kind, msg).exit(),
    }
}

/// Prints a command's result: `json` with `--output=json`, else (unless `quiet`)
/// what `human` writes.
pub(crate) fn emit(
    out: &mut dyn Write,
    output: OutputKind,
    quiet: bool,
    json: impl FnOnce() -> Value,
    human: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), Failure> {
    match output {
        OutputKind::Json => report::write_json(out, &json())?,
        OutputKind::Human if quiet => {}
        OutputKind::Human => human(out)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_adds_missing_causes_once() {
        let inner = std::io::Error::other("disk on fire");
        let e = qcowx_core::Error::Io {
            file: "a.qcow2".into(),
            op: "read",
            offset: 0,
            source: inner,
        };
        let s = error_chain(&e);
        assert_eq!(s.matches("disk on fire").count(), 1, "{s}");
        assert!(s.starts_with("a.qcow2: "), "{s}");
    }
}
