//! Per-server settings that shape the handshake and the transmission phase.

use std::time::Duration;

use crate::error::{Error, Result};

/// The largest request payload (and the advertised maximum block size): 32 MiB, the
/// size every NBD client supports.
pub const MAX_BLOCK_SIZE: u32 = 32 << 20;

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
    /// Worker threads per connection.
    pub workers: usize,
    /// Most requests in flight per connection.
    pub max_in_flight: usize,
    /// Most payload bytes (write data and read buffers) in flight per connection.
    pub max_in_flight_bytes: usize,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// Log connection events and client errors to stderr.
    pub verbose: bool,
    /// STARTTLS settings (`None`: TLS off, `STARTTLS` gets `NBD_REP_ERR_UNSUP`).
    pub tls: Option<crate::tls::Tls>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            min_block_size: 1,
            max_block_size: MAX_BLOCK_SIZE,
            multi_conn: true,
            discard: DiscardMode::Ignore,
            detect_zeroes: DetectZeroes::Off,
            cache: CacheMode::Writeback,
            workers: 4,
            max_in_flight: 64,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(10),
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
