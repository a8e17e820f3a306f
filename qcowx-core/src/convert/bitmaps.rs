//! `convert --bitmaps`: the source's persistent bitmaps copied to the output, as they
//! are (granularity, enabled or not, dirty bits).

use super::content::Content;
use super::copy::Warning;
use crate::engine::{BitmapInfo, Image, STATUS_WINDOW};
use crate::error::{Error, Result};

/// The bitmaps of `src` to copy, checked before anything is written: an inconsistent
/// one refuses the conversion, or with `skip_broken` is left out (and reported).
pub(super) fn to_copy(
    src: &dyn Content,
    skip_broken: bool,
    report: &mut dyn FnMut(Warning),
) -> Result<Vec<BitmapInfo>> {
    let Some(img) = src.image() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for b in img.bitmaps()? {
        if !b.in_use {
            out.push(b);
        } else if skip_broken {
            report(Warning::SkippedBitmap { name: b.name });
        } else {
            return Err(Error::InvalidArgument(format!(
                "{}: cannot copy inconsistent bitmap '{}': try --skip-broken-bitmaps, or \\
                 remove it with qcowx bitmap --remove",
                img.file_name(),
                b.name
            )));
        }
    }
    Ok(out)
}

/// Adds each bitmap of `list` to `dst` and marks the granules `src` has dirty in it,
/// one [`STATUS_WINDOW`] at a time (so a fragmented bitmap is never listed whole).
pub(super) fn copy(src: &Image, dst: &Image, list: &[BitmapInfo]) -> Result<()> {
    let size = src.size().min(dst.size());
    for b in list {
        dst.bitmap_add(&b.name, Some(b.granularity), !b.enabled)?;
        let mut window = 0u64;
        while window < size {
            let len = STATUS_WINDOW.min(size - window);
            dst.bitmap_mark(&b.name, &src.bitmap_dirty_in(&b.name, window, len)?)?;
            window += len;
        }
    }
    Ok(())
}
