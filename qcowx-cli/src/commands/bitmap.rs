//! `qcowx bitmap`: persistent dirty bitmaps, as `qemu-img bitmap` changes them. A
//! served image is changed by its server (control op `bitmap`).

use qcowx_core::control::Request;

use super::{open_rw_meta, run_request, unexpected, Failure};
use crate::BitmapArgs;

/// Applies the operations of `a` to bitmap `a.bitmap` in one request, in the order
/// add, clear, merge, enable/disable, remove; the close (or the server's) stores them.
pub(crate) fn bitmap(a: &BitmapArgs) -> Result<u8, Failure> {
    let req = Request::Bitmap {
        bitmap: a.bitmap.clone(),
        add: a.add,
        granularity: a.granularity,
        clear: a.clear,
        merge: a.merge.clone(),
        // Absolute: a server resolves it, from its own working directory.
        merge_file: a
            .source_file
            .as_ref()
            .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()))
            .map(|f| f.display().to_string()),
        enable: a.enable,
        disable: a.disable,
        remove: a.remove,
    };
    match run_request(&a.file, open_rw_meta(&a.file), &req)? {
        qcowx_core::control::Response::Done => Ok(0),
        other => Err(unexpected(&req, &other)),
    }
}
