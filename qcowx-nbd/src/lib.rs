//! # qcowx-nbd
//!
//! An NBD server for qcowx images: one process serves every VDI of an image
//! (writable) and every snapshot (read-only) to any NBD client — QEMU, `qemu-img`,
//! `qemu-io`, libnbd's tools, the Linux kernel client.
//!
//! It speaks the NBD protocol; the `qcowx-nbd` binary takes the options of
//! `qemu-nbd` where they mean the same. The layout:
//!
//! * [`wire`]: constants and the fixed-size messages (big-endian zerocopy structs);
//! * [`handshake`]: fixed newstyle negotiation (`EXPORT_NAME`, `GO`, `INFO`, `LIST`,
//!   `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT` with
//!   `base:allocation` and `qemu:allocation-depth`);
//! * [`transmission`]: pipelined requests answered out of order by a bounded pool of
//!   workers per connection (`READ` with sparse structured replies, `WRITE` (+FUA),
//!   `FLUSH`, `TRIM`, `WRITE_ZEROES` (+`NO_HOLE`, `FAST_ZERO`), `CACHE`,
//!   `BLOCK_STATUS` (+`REQ_ONE`), `DISC`);
//! * [`exports`]: export names and the roots they serve;
//! * [`server`]: Unix and TCP listeners, systemd socket activation, connection
//!   limits, the handshake timeout and clean shutdown;
//! * [`control`]: the control socket's listener (live snapshot, fork, delete, revert,
//!   gc, list, diff, usage and check for `qcowx` on a served image); the protocol,
//!   its client and its executor are `qcowx_core::control`, re-exported there;
//! * [`tls`]: STARTTLS with rustls (X.509 files, `require`/`allow` modes, client
//!   certificate allow-list) and the I/O thread of a TLS connection;
//! * [`overlay`]: the temporary overlay of `-s` (writes kept apart from the image);
//! * [`config`]: settings (TLS mode, timeouts, limits); [`socket`]: the connection
//!   type and what the transmission phase needs of a connection; [`error`]: errors
//!   and the one map from image errors to NBD error values.
//!
//! Modules import only from the layers below them, with no cycle: [`wire`] and
//! [`error`] at the bottom, then [`exports`], [`config`], [`socket`] and [`tls`], then
//! [`handshake`], then [`transmission`], then [`server`] (and `main`). [`control`]
//! needs only [`exports`] and [`error`]; [`config`] takes the control connections'
//! default idle timeout from it.
//!
//! ```no_run
//! use std::sync::Arc;
//! use qcowx_core::Image;
//! use qcowx_nbd::exports::{ExportPlan, Exports};
//! use qcowx_nbd::server::{ListenAddr, Server, ServerConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let image = Arc::new(Image::open_rw("disk.qcow2")?);
//! let plan = ExportPlan::Auto { main_name: "default".into(), main_description: None };
//! let exports = Arc::new(Exports::new(image, plan, false)?);
//! let config = ServerConfig {
//!     listen: vec![ListenAddr::Unix("/tmp/qcowx.sock".into())],
//!     socket_activation: false,
//!     max_clients: 0,
//!     persistent: true,
//!     settings: Default::default(),
//!     control: None,
//! };
//! let server = Server::bind(exports, config)?;
//! server.run()?; // until shutdown; then drains, flushes and closes the image
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod config;
pub mod control;
pub mod error;
pub mod exports;
pub mod handshake;
pub mod overlay;
pub mod server;
pub mod socket;
pub mod tls;
pub mod transmission;
pub mod wire;

pub use config::Settings;
pub use error::{Error, Result};
pub use exports::{ExportPlan, ExportSpec, Exports};
pub use server::{ListenAddr, Server, ServerConfig, ShutdownHandle};
