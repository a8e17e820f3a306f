//! The protocol's rules about requests, checked before any I/O.

use super::{Conn, Request};
use crate::socket::ReplyWriter;
use crate::wire::*;

impl<W: ReplyWriter> Conn<'_, W> {
    /// Checks a request against the protocol's rules; `Err((errno, message))` if it
    /// must fail without doing anything.
    pub(super) fn check(&self, req: &Request) -> std::result::Result<(), (u32, String)> {
        let name = command_name(req.command);
        let allowed = match req.command {
            CMD_READ if self.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            c => return Err((EINVAL, format!("unknown command {c}"))),
        };
        if req.flags & !allowed != 0 {
            return Err((
                EINVAL,
                format!("flags {:#x} are not valid for {name}", req.flags & !allowed),
            ));
        }
        let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && !self.export.writable {
            return Err((EPERM, format!("{name} on a read-only export")));
        }
        let max = self.settings.max_block_size;
        // Only requests with a payload are limited: clients (nbdcopy among them)
        // send write-zeroes, trim and cache requests larger than the maximum block
        // size, and they cost no buffer here.
        let limited = matches!(req.command, CMD_READ | CMD_WRITE);
        if req.oversized || (limited && req.length > max) {
            return Err((
                EINVAL,
                format!(
                    "{name} of {} bytes is larger than the maximum block size {max}",
                    req.length
                ),
            ));
        }
        if req.command == CMD_FLUSH {
            if req.offset != 0 || req.length != 0 {
                return Err((EINVAL, "FLUSH with a nonzero offset or length".into()));
            }
            return Ok(());
        }
        if req.command == CMD_BLOCK_STATUS {
            if !self.structured || self.contexts.is_empty() {
                return Err((
                    EINVAL,
                    "BLOCK_STATUS without a negotiated metadata context".into(),
                ));
            }
            if req.length == 0 {
                return Err((EINVAL, "BLOCK_STATUS of length 0".into()));
            }
        }
        let size = self.export.size;
        let end = req.offset.checked_add(u64::from(req.length));
        if end.is_none_or(|e| e > size) {
            let errno = if matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES) {
                ENOSPC
            } else {
                EINVAL
            };
            return Err((
                errno,
                format!(
                    "{name} at offset {} length {} is past the end of the export ({size} bytes)",
                    req.offset, req.length
                ),
            ));
        }
        let min = u64::from(self.settings.min_block_size);
        if min > 1 {
            let end = req.offset + u64::from(req.length);
            if !req.offset.is_multiple_of(min)
                || (!u64::from(req.length).is_multiple_of(min) && end != size)
            {
                return Err((
                    EINVAL,
                    format!(
                        "{name} at offset {} length {} is not aligned to the minimum block size {min}",
                        req.offset, req.length
                    ),
                ));
            }
        }
        Ok(())
    }
}
