//! Per-server settings that shape the handshake and the transmission phase, with
//! their defaults: block sizes, per-connection limits, cache, discard and TLS modes,
//! timeouts.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};

/// Small requests run on the reader thread while their smoothed service time stays
/// below this (page-cache hits); above it they go to the workers. The default of
/// [`Settings::inline_limit`].
pub const INLINE_LIMIT: Duration = Duration::from_micros(50);

/// The largest request payload (and the advertised maximum block size): 32 MiB, the
/// size every NBD client supports.
///
/// The NBD protocol lets a server refuse larger payloads; QEMU's client never sends
/// more than 32 MiB and libnbd follows the advertised size. A longer read or write
/// gets `NBD_EINVAL` and the connection goes on.
pub const MAX_BLOCK_SIZE: u32 = 32 << 20;

/// Default number of worker threads per connection: requests of one connection run
/// this many at a time.
pub const DEFAULT_WORKERS: usize = 4;

/// Default bound on the requests of one connection that are read but not yet
/// answered. nbdcopy keeps 64 requests in flight by default and QEMU's client 16, so
/// neither waits on it; past it the server stops reading the socket until a reply has
/// gone out, which pushes back on the client through the socket (the protocol has no
/// error for "too many requests").
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// Default bound on the payload bytes (write data and read buffers) of one
/// connection's requests in flight: four maximum-size requests. It bounds the memory a
/// connection holds whatever its client sends; a request larger than what is left
/// waits, but one request is always admitted, so a single maximum-size request never
/// waits forever.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 4 * MAX_BLOCK_SIZE as usize;

/// How long shutdown waits for connections to finish their requests, by default
/// (`Settings::drain_timeout`).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Default bound on the clients served at once (`qcowx-nbd -e`, qemu-nbd's
/// `--shared`): more clients wait in the listen backlog until one leaves. With the
/// per-connection bounds above it bounds the server's memory; qemu-nbd's default is
/// 1, but one qcowx-nbd serves every VDI and snapshot of an image.
pub const DEFAULT_MAX_CLIENTS: usize = 16;

/// What `NBD_CMD_TRIM` (and write-zeroes without `NO_HOLE`) may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardMode {
    /// Trim requests succeed and do nothing (qemu-nbd's default).
    Ignore,
    /// Trim releases whole clusters; write-zeroes may release clusters too.
    Unmap,
}

/// What happens to writes whose data is all zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Written as data.
    Off,
    /// Turned into write-zeroes that keep clusters allocated.
    On,
    /// Turned into write-zeroes that may release clusters (with `--discard=unmap`).
    Unmap,
}

/// The host cache mode, as qemu-nbd's `--cache` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Writes complete in the page cache; FLUSH and FUA make them durable.
    Writeback,
    /// Like writeback (qcowx does not use `O_DIRECT`).
    None,
    /// Every write is made durable before its reply (as if FUA were set).
    Writethrough,
    /// Like writethrough.
    Directsync,
    /// FLUSH and FUA are acknowledged without making anything durable.
    Unsafe,
}

impl CacheMode {
    /// Whether every write is flushed before its reply.
    pub fn write_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }
    /// Whether flushes are skipped.
    pub fn skips_flush(self) -> bool {
        self == CacheMode::Unsafe
    }
}

/// When clients must use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Clients may upgrade with `STARTTLS` or go on in clear (the protocol's
    /// SELECTIVETLS with no export requiring TLS).
    Allow,
    /// Every option before `STARTTLS` is refused with `NBD_REP_ERR_TLS_REQD` (the
    /// protocol's FORCEDTLS).
    Require,
}

/// A server's TLS settings: the mode and the rustls configuration.
#[derive(Debug, Clone)]
pub struct Tls {
    /// When TLS is needed.
    pub mode: TlsMode,
    /// Certificates, key and client verification.
    pub config: Arc<rustls::ServerConfig>,
}

/// Settings shared by every connection of a server.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Advertised (and enforced) minimum block size: a power of two from 1 to 64 KiB.
    pub min_block_size: u32,
    /// Advertised and enforced maximum request length.
    pub max_block_size: u32,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`.
    pub multi_conn: bool,
    /// Trim behaviour.
    pub discard: DiscardMode,
    /// Zero detection on writes.
    pub detect_zeroes: DetectZeroes,
    /// Cache mode.
    pub cache: CacheMode,
    /// Worker threads per connection ([`DEFAULT_WORKERS`]).
    pub workers: usize,
    /// Most requests in flight per connection ([`DEFAULT_MAX_IN_FLIGHT`]).
    pub max_in_flight: usize,
    /// Most payload bytes (write data and read buffers) in flight per connection
    /// ([`DEFAULT_MAX_IN_FLIGHT_BYTES`]).
    pub max_in_flight_bytes: usize,
    /// Small reads and writes run on the connection's reading thread while their
    /// smoothed service time stays below this
    /// ([`INLINE_LIMIT`]); slower ones go to the workers.
    pub inline_limit: Duration,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// How long shutdown waits for busy connections to finish before it closes the
    /// image anyway ([`DRAIN_TIMEOUT`]).
    pub drain_timeout: Duration,
    /// How long a control connection may stay silent before it is closed and its
    /// slot given back ([`crate::control::IDLE_TIMEOUT`]).
    pub control_idle_timeout: Duration,
    /// How often a serving image's refcounts are made exact on disk and its dirty bit
    /// cleared ([`qcowx_core::Image::checkpoint`]), when anything changed: what a
    /// crash in between costs is a scan at the next open, never data.
    pub checkpoint_interval: Duration,
    /// Log connection events and client errors to stderr.
    pub verbose: bool,
    /// STARTTLS settings (`None`: TLS off, `STARTTLS` gets `NBD_REP_ERR_UNSUP`).
    pub tls: Option<Tls>,
}

/// The default [`Settings::checkpoint_interval`].
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            min_block_size: 1,
            max_block_size: MAX_BLOCK_SIZE,
            multi_conn: true,
            discard: DiscardMode::Ignore,
            detect_zeroes: DetectZeroes::Off,
            cache: CacheMode::Writeback,
            workers: DEFAULT_WORKERS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: DRAIN_TIMEOUT,
            control_idle_timeout: crate::control::IDLE_TIMEOUT,
            inline_limit: INLINE_LIMIT,
            checkpoint_interval: CHECKPOINT_INTERVAL,
            verbose: false,
            tls: None,
        }
    }
}

impl Settings {
    /// Checks the settings against the protocol's rules.
    pub fn validate(&self) -> Result<()> {
        let m = self.min_block_size;
        if !m.is_power_of_two() || m > 65536 {
            return Err(Error::Config(format!(
                "minimum block size {m} must be a power of two from 1 to 65536"
            )));
        }
        if self.max_block_size < 512 || !self.max_block_size.is_multiple_of(m) {
            return Err(Error::Config(format!(
                "maximum block size {} must be at least 512 and a multiple of the minimum block size",
                self.max_block_size
            )));
        }
        if self.workers == 0 || self.max_in_flight == 0 {
            return Err(Error::Config(
                "workers and requests in flight must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
