//! `amend` and `rebase`: options an image changes in place (refcount width, backing
//! file, lazy refcounts, size, version), around `Image::set_refcount_bits`,
//! `set_backing_file`, `set_lazy_refcounts`, `resize`, `OpenOptions::upgrade` and
//! `Image::close_as_v2`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use qcowx_core::{Error, OpenOptions};

use super::Failure;
use crate::{size_arg, AmendArgs};

/// One `-o` option of `amend`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    RefcountBits(u32),
    BackingFile(String),
    BackingFormat(String),
    LazyRefcounts(bool),
    Size(u64),
    /// `compat=1.1`: a version 2 image becomes version 3 (nothing for a version 3 one).
    Upgrade,
    /// `compat=0.10`: a version 3 image becomes version 2 (nothing for a version 2 one).
    Downgrade,
}

fn parse(options: &str) -> Result<Vec<Change>, Error> {
    let bad = |what: String| Error::InvalidArgument(format!("-o {options}: {what}"));
    let mut out = Vec::new();
    for opt in options.split(',').filter(|o| !o.is_empty()) {
        let (key, v) = opt
            .split_once('=')
            .ok_or_else(|| bad(format!("'{opt}' is not key=value")))?;
        out.push(match key {
            "refcount_bits" => match v.parse::<u32>() {
                Ok(n) if n.is_power_of_two() && n <= 64 => Change::RefcountBits(n),
                _ => {
                    return Err(bad(format!(
                        "refcount_bits must be 1, 2, 4, 8, 16, 32 or 64, not '{v}'"
                    )))
                }
            },
            "backing_file" => Change::BackingFile(v.to_string()),
            "backing_fmt" => Change::BackingFormat(v.to_string()),
            "lazy_refcounts" => Change::LazyRefcounts(match v {
                "on" | "true" | "yes" => true,
                "off" | "false" | "no" => false,
                _ => return Err(bad(format!("lazy_refcounts must be on or off, not '{v}'"))),
            }),
            "size" => Change::Size(size_arg(v).map_err(|e| bad(format!("size '{v}': {e}")))?),
            "compat" if matches!(v, "1.1" | "v3") => Change::Upgrade,
            "compat" if matches!(v, "0.10" | "v2") => Change::Downgrade,
            "compat" => return Err(bad(format!("compat must be 0.10 or 1.1, not '{v}'"))),
            _ => {
                return Err(bad(format!(
                    "unsupported option '{opt}' (qcowx amends refcount_bits, backing_file, \
                     backing_fmt, lazy_refcounts, size and compat)"
                )))
            }
        });
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument("no option to amend".into()));
    }
    // The last compat= counts, as in qemu-img.
    let last = out
        .iter()
        .rposition(|c| matches!(c, Change::Upgrade | Change::Downgrade));
    if let Some(last) = last {
        let keep = out[last].clone();
        out.retain(|c| !matches!(c, Change::Upgrade | Change::Downgrade));
        out.push(keep);
    }
    if out.contains(&Change::Downgrade) && out.contains(&Change::LazyRefcounts(true)) {
        return Err(bad(
            "lazy refcounts need compatibility level 1.1 (compat=1.1)".into(),
        ));
    }
    if out.contains(&Change::Downgrade)
        && out
            .iter()
            .any(|c| matches!(c, Change::RefcountBits(b) if *b != 16))
    {
        return Err(bad(
            "refcount widths other than 16 bits need compatibility level 1.1 (compat=1.1)".into(),
        ));
    }
    Ok(out)
}

/// `qcowx amend -o OPTIONS FILE`. Options are checked before the image is opened;
/// an unknown one is refused, as `qemu-img amend` refuses it.
pub(crate) fn amend(a: &AmendArgs) -> Result<u8, Failure> {
    let changes = parse(&a.options)?;
    if changes.contains(&Change::Upgrade) {
        // First, on its own: the other changes need a version 3 image.
        OpenOptions::new()
            .upgrade(true)
            .open_backing(false)
            .open(&a.file)?
            .close()?;
    }
    // The persistent bitmaps a downgrade removes (listed by a read-only open: the
    // repair-mode open below does not read them).
    let mut removed = Vec::new();
    if changes.contains(&Change::Downgrade) {
        // A version 2 image is left as it is (it opens read-only only).
        let img = OpenOptions::new()
            .write(false)
            .open_backing(false)
            .open(&a.file)?;
        let v2 = img.info()?.version < 3;
        removed = img.bitmaps()?;
        img.close()?;
        if v2 && changes.len() == 1 {
            return Ok(0);
        }
    }
    // A new size first, on a plain writable open: the persistent bitmaps grow with
    // the disk, and only such an open loads them.
    if let Some(size) = changes.iter().rev().find_map(|c| match c {
        Change::Size(n) => Some(*n),
        _ => None,
    }) {
        let img = OpenOptions::new()
            .write(true)
            .open_backing(false)
            .open(&a.file)?;
        img.resize(size)?;
        img.close()?;
    }
    // As a repair does: the open checks and changes nothing (an image whose counts
    // overflow its width, the reason to amend, is refused by a plain writable open),
    // and the amend refuses before writing anything or rewrites every refcount.
    let img = OpenOptions::new()
        .repair(true)
        .open_backing(false)
        .open(&a.file)?;
    let info = img.info()?;
    let file = changes.iter().rev().find_map(|c| match c {
        Change::BackingFile(f) => Some(f.clone()),
        _ => None,
    });
    let format = changes.iter().rev().find_map(|c| match c {
        Change::BackingFormat(f) => Some(f.clone()),
        _ => None,
    });
    if file.is_some() || format.is_some() {
        let file = file.or(info.backing_file).filter(|f| !f.is_empty());
        let format = format.or(info.backing_format).filter(|_| file.is_some());
        img.set_backing_file(file.as_deref(), format.as_deref())?;
    }
    for c in &changes {
        match c {
            Change::LazyRefcounts(on) => img.set_lazy_refcounts(*on)?,
            Change::RefcountBits(bits) => img.set_refcount_bits(*bits)?,
            Change::Size(_)
            | Change::BackingFile(_)
            | Change::BackingFormat(_)
            | Change::Upgrade
            | Change::Downgrade => {}
        }
    }
    // Last, as qemu-img downgrades: the other changes may be what it needs.
    if changes.contains(&Change::Downgrade) {
        img.close_as_v2()?;
        for b in removed {
            eprintln!(
                "qcowx: warning: removed persistent bitmap '{}': version 2 cannot hold it",
                b.name
            );
        }
    } else {
        img.close()?;
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub(crate) struct RebaseArgs {
    /// Unsafe: change the backing file name only, without reading either file (the
    /// new backing file must read as the old one does). Without it, what each VDI
    /// reads through the old chain and the new file reads otherwise is first copied
    /// into the VDI; a snapshot that would read otherwise makes the rebase fail.
    #[arg(short = 'u')]
    unsafe_: bool,
    /// The new backing file, stored as given (resolved against FILE's folder when
    /// relative); "" removes the backing file.
    #[arg(short = 'b', value_name = "BACKING", required = true)]
    backing: String,
    /// Its format (raw or qcow2; probed at open when absent).
    #[arg(short = 'F', value_name = "FORMAT", value_parser = ["raw", "qcow2"])]
    backing_format: Option<String>,
    #[command(flatten)]
    image_format: crate::Qcow2Only,
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// `qcowx rebase [-u] -b BACKING [-F FORMAT] FILE`.
pub(crate) fn rebase(a: &RebaseArgs) -> Result<u8, Failure> {
    let file = Some(a.backing.as_str()).filter(|b| !b.is_empty());
    if file.is_none() && a.backing_format.is_some() {
        return Err(Error::InvalidArgument("-F without a backing file".into()).into());
    }
    let format = a.backing_format.as_deref();
    if a.unsafe_ {
        let img = OpenOptions::new()
            .write(true)
            .open_backing(false)
            .open(&a.file)?;
        img.set_backing_file(file, format)?;
        img.close()?;
    } else {
        let img = Arc::new(OpenOptions::new().write(true).open(&a.file)?);
        img.rebase(file, format)?;
        img.close()?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_as_qemu_img_amend_spells_them() {
        assert_eq!(
            parse("refcount_bits=16,lazy_refcounts=on,backing_file=b.raw,backing_fmt=raw,size=2G")
                .unwrap(),
            [
                Change::RefcountBits(16),
                Change::LazyRefcounts(true),
                Change::BackingFile("b.raw".into()),
                Change::BackingFormat("raw".into()),
                Change::Size(2 << 30),
            ]
        );
        assert_eq!(
            parse("compat=1.1,lazy_refcounts=off").unwrap(),
            [Change::LazyRefcounts(false), Change::Upgrade]
        );
        assert_eq!(parse("compat=v3").unwrap(), [Change::Upgrade]);
        assert_eq!(parse("compat=v2").unwrap(), [Change::Downgrade]);
        assert_eq!(
            parse("compat=0.10,refcount_bits=16,compat=1.1").unwrap(),
            [Change::RefcountBits(16), Change::Upgrade]
        );
        for bad in [
            "",
            "compat=0.10,lazy_refcounts=on",
            "compat=0.10,refcount_bits=32",
            "compat=1.2",
            "refcount_bits=3",
            "lazy_refcounts=maybe",
            "encrypt=on",
            "x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
