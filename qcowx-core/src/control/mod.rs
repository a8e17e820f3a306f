//! The control protocol: live snapshot, fork, delete, revert, gc, list and diff on the
//! image a running `qcowx-nbd` owns — its requests and answers, where its socket is,
//! the client `qcowx` uses, and the executor that runs a request on an [`Image`].
//! The server's listener (binding, accepting, limits, shutdown) is `qcowx-nbd`'s.
//!
//! This module is built with the `control` feature.
//!
//! A `qcowx-nbd` serving an image writable holds its exclusive lock, so no other
//! process can open it to take a snapshot. Instead the server listens on a Unix
//! control socket and runs those operations itself, on the image it has open: the
//! [`Image`] methods are `&self` and thread-safe, and a live snapshot waits only for
//! the writes already in flight — clients keep reading and writing throughout. New
//! VDIs and snapshots are exports at once (exports are looked up per connection).
//!
//! # Where the socket is
//!
//! The path follows from the image file alone, so that a tool that finds the image
//! locked can find its server: the socket is named after the image file's device and
//! inode numbers (`img-DEV-INO.sock`, lower-case hexadecimal, from `stat(2)`; the same
//! for every path that names the file: symbolic links, hard links, bind mounts) and
//! lies in the first usable directory of:
//!
//! 1. `$QCOWX_RUNTIME_DIR`, when set and not empty;
//! 2. `/run/qcowx`, for a server running as root;
//! 3. `$XDG_RUNTIME_DIR/qcowx`, when `XDG_RUNTIME_DIR` is set;
//! 4. `/tmp/qcowx-UID` (created with mode 0700, and refused if another user owns it
//!    or others may write it).
//!
//! A client ([`request`]) tries every one of them, in that order. The socket file has
//! mode 0600: only the server's user (and root) may use it. `qcowx-nbd --control PATH`
//! puts the socket somewhere else ([`request_at`] reaches it there) and
//! `--no-control` turns it off; a read-only server (`-r`, `-l`) has no control socket
//! unless `--control` asks for one.
//!
//! # The protocol
//!
//! Line-delimited JSON over the stream socket: the client sends one request object
//! per line (at most [`MAX_LINE`] bytes) and reads one response line per request; it
//! may send several requests on one connection, one after the other. Requests:
//!
//! | request | what it runs |
//! |---|---|
//! | `{"op": "snapshot", "vdi": VDI, "name": NAME}` | [`Image::snapshot`] (`vdi` may be left out: `"default"`) |
//! | `{"op": "fork", "snapshot": SNAPSHOT, "name": NEW_VDI}` | [`Image::fork`] |
//! | `{"op": "delete", "snapshot": NAME}` or `{"op": "delete", "vdi": NAME}` | [`Image::delete_snapshot`], [`Image::delete_vdi`] |
//! | `{"op": "revert", "vdi": VDI, "snapshot": SNAPSHOT}` | [`Image::revert`] |
//! | `{"op": "gc"}` | [`Image::gc`] |
//! | `{"op": "list"}` | [`Image::list`] |
//! | `{"op": "diff", "from": ROOT, "to": ROOT}` | [`Image::diff`] |
//! | `{"op": "usage"}` | [`Image::list`] and [`Image::root_usage`] (`qcowx tree`) |
//! | `{"op": "check"}` | [`Image::check`] on the served image (its own changes written out first) |
//! | `{"op": "bitmap", "bitmap": NAME, "add", "granularity", "clear", "merge": [SOURCE...], "enable", "disable", "remove"}` | [`Image::bitmap_add`], [`Image::bitmap_clear`], [`Image::bitmap_merge`], [`Image::bitmap_enable`], [`Image::bitmap_remove`] in that order (`qcowx bitmap`; every key but `bitmap` may be left out) |
//!
//! Every request may carry `"image": PATH`: the server then refuses it (kind
//! `wrong-image`) unless PATH names the file it serves — [`request`] always sends it.
//!
//! A success is `{"ok": true, ...}` with, by operation: `snapshot` and `fork`:
//! `"root"` (the new root) and `"export"` (the NBD export name it is served under, or
//! `null`); `list`: `"roots"`; `gc`: `"gc"`; `diff`: `"ranges"` and `"bytes"`;
//! `usage`: `"roots"` and `"usage"` (one `{"name", "kind", "uid", "mapped-bytes",
//! "exclusive-bytes"}` per root, in the same order); `check`: `"check"` (the fields
//! of [`crate::CheckReport`], kebab-case: `"corruptions"`, `"leaks"`,
//! `"check-errors"`, `"messages"`, ...);
//! `delete`, `revert` and `bitmap`: nothing more. Roots, gc reports and ranges have the keys of
//! `qcowx list|gc|diff --output=json` (`spec/cli-json.md`): a root is `{"name",
//! "kind": "vdi"|"snapshot", "uid": HEX, "vdi", "parent", "date-sec", "date-nsec",
//! "virtual-size", "id"}`; a gc report `{"roots-removed", "clusters-freed",
//! "bytes-freed", "file-size-before", "file-size-after", "allocated-before",
//! "allocated-after", "refcounts-exact"}`; a range `{"offset",
//! "length"}`.
//!
//! A failure is `{"ok": false, "error": MESSAGE, "kind": KIND}`: MESSAGE is the
//! library's own message (what `qcowx` would print had it opened the image itself);
//! KIND is the library's error kind (`qcowx_core::ErrorKind::as_str`: `not-found`,
//! `already-exists`, `invalid-argument`, `read-only`, `out-of-range`, `no-space`, `io`, `corrupt`,
//! `locked`, `unsupported`, `closed`, `image`) or one of the protocol's own:
//! `invalid-request` (the line is not a valid request), `wrong-image`,
//! `shutting-down`, `busy`. A bad request
//! changes nothing and the connection stays usable (except after a line longer than
//! [`MAX_LINE`], which closes it).
//!
//! # From the command line tool
//!
//! ```no_run
//! use std::path::Path;
//! use qcowx_core::control::{self, ControlError, Request, Response};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let image = Path::new("disk.qcow2");
//! // After `Image::open_rw(image)` failed with `qcowx_core::Error::Locked`:
//! let req = Request::Snapshot { vdi: "default".into(), name: "before-upgrade".into() };
//! match control::request(image, &req) {
//!     Ok(Response::Root { root, export }) => println!("{} (export {export:?})", root.name),
//!     Ok(other) => println!("{other:?}"),
//!     // Nobody serves it: report the lock error the open gave.
//!     Err(ControlError::NoServer { .. }) => {}
//!     // The server's answer: the library's message, as the CLI prints its errors.
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok(()) }
//! ```
//!
//! [`Image`]: crate::Image
//! [`Image::snapshot`]: crate::Image::snapshot
//! [`Image::fork`]: crate::Image::fork
//! [`Image::delete_snapshot`]: crate::Image::delete_snapshot
//! [`Image::delete_vdi`]: crate::Image::delete_vdi
//! [`Image::revert`]: crate::Image::revert
//! [`Image::gc`]: crate::Image::gc
//! [`Image::list`]: crate::Image::list
//! [`Image::diff`]: crate::Image::diff
//! [`Image::root_usage`]: crate::Image::root_usage
//! [`Image::check`]: crate::Image::check
//! [`Image::bitmap_add`]: crate::Image::bitmap_add
//! [`Image::bitmap_clear`]: crate::Image::bitmap_clear
//! [`Image::bitmap_merge`]: crate::Image::bitmap_merge
//! [`Image::bitmap_enable`]: crate::Image::bitmap_enable
//! [`Image::bitmap_remove`]: crate::Image::bitmap_remove

mod client;
mod exec;
mod json;
mod proto;
mod socket;

pub use client::{request, request_at, ControlError};
pub use exec::{execute, Host, Local};
pub use json::{RangeJson, RangesJson, RootJson, RootKindJson, UsageJson};
pub use proto::{parse_request, DeleteTarget, ErrorReply, Request, Response};
pub use socket::{
    default_socket_path, runtime_dirs, socket_candidates, socket_name, socket_path_for,
};

/// The environment variable naming the directory for control sockets (first choice
/// of servers and clients alike).
pub const ENV_RUNTIME_DIR: &str = "QCOWX_RUNTIME_DIR";

/// The longest request or response line.
pub const MAX_LINE: usize = 64 << 10;
