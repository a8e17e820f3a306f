//! `qcowx bitmap`: persistent dirty bitmaps, as `qemu-img bitmap` changes them.

use qcowx_core::Error;

use super::{open_rw_meta, Failure};
use crate::BitmapArgs;

/// Applies the operations of `a` to bitmap `a.bitmap` in one writable session, in
/// the order add, clear, merge, enable/disable, remove; the close stores them.
pub(crate) fn bitmap(a: &BitmapArgs) -> Result<u8, Failure> {
    if !(a.add || a.remove || a.clear || a.enable || a.disable || !a.merge.is_empty()) {
        return Err(Error::InvalidArgument(
            "need at least one of --add, --remove, --clear, --enable, --disable, --merge".into(),
        )
        .into());
    }
    if a.granularity.is_some() && !a.add {
        return Err(Error::InvalidArgument("--granularity only goes with --add".into()).into());
    }
    let img = open_rw_meta(&a.file)?;
    if a.add {
        img.bitmap_add(&a.bitmap, a.granularity, a.disable)?;
    }
    if a.clear {
        img.bitmap_clear(&a.bitmap)?;
    }
    for source in &a.merge {
        img.bitmap_merge(source, &a.bitmap)?;
    }
    if a.enable {
        img.bitmap_enable(&a.bitmap, true)?;
    }
    if a.disable && !a.add {
        img.bitmap_enable(&a.bitmap, false)?;
    }
    if a.remove {
        img.bitmap_remove(&a.bitmap)?;
    }
    img.close()?;
    Ok(0)
}
