//! Commands on the snapshots and VDIs of an image: snapshot, list, fork, delete,
//! revert, gc, diff, rename, tree and map. Those that change the image, and list,
//! diff and tree, go to the qcowx-nbd serving it when it is locked (without -U).

use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use qcowx_core::control::{DeleteTarget, Request, Response};
use qcowx_core::vdi::DEFAULT_VDI;
use qcowx_core::{OpenOptions, RootInfo, RootKind};

use super::{emit, lock_mode, open_rw_meta, require_kind, run_request, unexpected, Failure};
use crate::{
    map as qmap, progress, report, tree as forest, DeleteArgs, DiffArgs, ForkArgs, GcArgs, MapArgs,
    OutputKind, ReadArgs, RenameArgs, RevertArgs, SnapshotArgs, TreeArgs,
};

/// Runs `req`, which changes `file` and prints nothing, here or on the server.
fn change(file: &Path, req: Request) -> Result<u8, Failure> {
    run_request(file, open_rw_meta(file), &req)?;
    Ok(0)
}

/// Runs `req`, which creates a root, and prints it: `human` on one line, or the root
/// as `list` shows it in JSON.
fn create_root(
    file: &Path,
    req: Request,
    output: OutputKind,
    quiet: bool,
    out: &mut dyn Write,
    human: impl FnOnce(&RootInfo) -> String,
) -> Result<u8, Failure> {
    let root = match run_request(file, open_rw_meta(file), &req)? {
        Response::Root { root, .. } => root,
        other => return Err(unexpected(&req, &other)),
    };
    let name = file.display().to_string();
    let json = || report::created_json(&name, &root);
    emit(out, output, quiet, json, |out| {
        writeln!(out, "{}", human(&root))
    })?;
    Ok(0)
}

/// `qcowx snapshot FILE NAME`, and `qemu-img snapshot`'s forms: `-l`, `-c NAME`,
/// `-d NAME`, `-a NAME` (clap allows one of them, or NAME).
pub(crate) fn snapshot(a: &SnapshotArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    if a.list {
        return snapshot_list(a, quiet, out);
    }
    if let Some(name) = &a.delete {
        return delete(&DeleteArgs {
            file: a.file.clone(),
            snapshot: Some(name.clone()),
            vdi: None,
        });
    }
    if let Some(name) = &a.apply {
        return revert(&RevertArgs {
            file: a.file.clone(),
            vdi: a.vdi.clone(),
            snapshot: name.clone(),
        });
    }
    let Some(name) = a.create.as_ref().or(a.name.as_ref()) else {
        return Err(Failure::Image(qcowx_core::Error::InvalidArgument(
            "snapshot needs NAME, or one of -l, -c NAME, -d NAME, -a NAME".into(),
        )));
    };
    let req = Request::Snapshot {
        vdi: a.vdi.clone(),
        name: name.clone(),
    };
    create_root(&a.file, req, a.output, quiet, out, |r| {
        format!("Created snapshot '{}' of VDI '{}'.", r.name, r.vdi)
    })
}

/// `snapshot -l`: the snapshot table `qemu-img snapshot -l` prints (with --output=json,
/// what `list` prints).
fn snapshot_list(a: &SnapshotArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    if a.output == OutputKind::Json {
        return list(
            &ReadArgs {
                output: a.output,
                force_share: false,
                image_format: crate::Qcow2Only { format: None },
                file: a.file.clone(),
            },
            quiet,
            out,
        );
    }
    let img = OpenOptions::new()
        .lock(lock_mode(false))
        .open_backing(false)
        .open(&a.file)?;
    let info = img.info()?;
    if !quiet {
        report::snapshot_list(out, &info.snapshots)?;
    }
    Ok(0)
}

pub(crate) fn list(a: &ReadArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let opened = OpenOptions::new()
        .lock(lock_mode(a.force_share))
        .open_backing(false)
        .open(&a.file);
    let roots = match run_request(&a.file, opened, &Request::List)? {
        Response::Roots(roots) => roots,
        other => return Err(unexpected(&Request::List, &other)),
    };
    let name = a.file.display().to_string();
    let json = || report::list_json(&name, &roots);
    emit(out, a.output, quiet, json, |out| {
        report::list_human(out, &roots)
    })?;
    Ok(0)
}

pub(crate) fn fork(a: &ForkArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let req = Request::Fork {
        snapshot: a.snapshot.clone(),
        name: a.new_vdi.clone(),
    };
    let from = a.snapshot.clone();
    create_root(&a.file, req, a.output, quiet, out, |r| {
        format!("Created VDI '{}' from snapshot '{from}'.", r.name)
    })
}

pub(crate) fn delete(a: &DeleteArgs) -> Result<u8, Failure> {
    // clap requires exactly one of --snapshot and --vdi.
    let target = match (&a.snapshot, &a.vdi) {
        (Some(s), _) => DeleteTarget::Snapshot(s.clone()),
        (None, Some(v)) => DeleteTarget::Vdi(v.clone()),
        (None, None) => {
            return Err(Failure::Image(qcowx_core::Error::InvalidArgument(
                "delete needs --snapshot NAME or --vdi NAME".into(),
            )))
        }
    };
    change(&a.file, Request::Delete(target))
}

pub(crate) fn revert(a: &RevertArgs) -> Result<u8, Failure> {
    change(
        &a.file,
        Request::Revert {
            vdi: a.vdi.clone(),
            snapshot: a.snapshot.clone(),
        },
    )
}

pub(crate) fn gc(a: &GcArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let spinner = progress::Spinner::start(
        progress::enabled(quiet, a.output == OutputKind::Json),
        "collecting garbage",
    );
    let r = match run_request(&a.file, open_rw_meta(&a.file), &Request::Gc)? {
        Response::Gc(r) => r,
        other => return Err(unexpected(&Request::Gc, &other)),
    };
    drop(spinner);
    let name = a.file.display().to_string();
    let json = || report::gc_json(&name, &r);
    emit(out, a.output, quiet, json, |out| report::gc_human(out, &r))?;
    Ok(0)
}

pub(crate) fn diff(a: &DiffArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let opened = OpenOptions::new()
        .lock(lock_mode(a.image.force_share))
        .open(&a.image.file);
    let req = Request::Diff {
        from: a.from.clone(),
        to: a.to.clone(),
    };
    let ranges = match run_request(&a.image.file, opened, &req)? {
        Response::Ranges(r) => r,
        other => return Err(unexpected(&req, &other)),
    };
    let name = a.image.file.display().to_string();
    let json = || report::diff_json(&name, &a.from, &a.to, &ranges);
    emit(out, a.image.output, quiet, json, |out| {
        report::diff_human(out, &ranges)
    })?;
    Ok(0)
}

pub(crate) fn rename(a: &RenameArgs) -> Result<u8, Failure> {
    let img = open_rw_meta(&a.file)?;
    let kind = if a.snapshot {
        RootKind::Snapshot
    } else {
        RootKind::Vdi
    };
    img.rename(kind, &a.old, &a.new)?;
    img.close()?;
    Ok(0)
}

pub(crate) fn tree(a: &TreeArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let opened = OpenOptions::new()
        .lock(lock_mode(a.image.force_share))
        .open_backing(false)
        .open(&a.image.file);
    let (roots, usage) = match run_request(&a.image.file, opened, &Request::Usage)? {
        Response::Usage { roots, usage } => (roots, usage),
        other => return Err(unexpected(&Request::Usage, &other)),
    };
    let forest = forest::Forest::build(&roots, &usage);
    if let Some(svg) = &a.svg {
        write_svg(&forest, svg)?;
    }
    let name = a.image.file.display().to_string();
    if a.dot {
        out.write_all(forest::dot(&forest).as_bytes())?;
    } else {
        let json = || forest::json(&name, &forest);
        emit(out, a.image.output, quiet || a.svg.is_some(), json, |out| {
            forest::human(out, &forest)
        })?;
    }
    Ok(0)
}

/// Writes the forest as SVG to `path`: with Graphviz's `dot` (or the program named by
/// `QCOWX_DOT`; none when it is empty) when it can be run, else with the built-in
/// renderer.
pub(crate) fn write_svg(forest: &forest::Forest, path: &Path) -> Result<(), qcowx_core::Error> {
    use std::process::{Command as Process, Stdio};
    let name = path.display().to_string();
    let io_err = |op: &'static str, source: io::Error| qcowx_core::Error::Io {
        file: name.clone(),
        op,
        offset: 0,
        source,
    };
    let program = std::env::var_os("QCOWX_DOT").unwrap_or_else(|| "dot".into());
    if !program.is_empty() {
        let spawned = Process::new(&program)
            .arg("-Tsvg")
            .arg("-o")
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(mut child) => {
                if let Some(mut stdin) = child.stdin.take() {
                    // An early exit of dot shows in its status below.
                    let _ = stdin.write_all(forest::dot(forest).as_bytes());
                }
                let done = child
                    .wait_with_output()
                    .map_err(|e| io_err("run dot for", e))?;
                if done.status.success() {
                    return Ok(());
                }
                return Err(qcowx_core::Error::InvalidArgument(format!(
                    "{name}: `{} -Tsvg` failed ({}): {}; unset QCOWX_DOT or set it empty to \
                     use the built-in renderer",
                    program.to_string_lossy(),
                    done.status,
                    String::from_utf8_lossy(&done.stderr).trim()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("run dot for", e)),
        }
    }
    std::fs::write(path, forest::svg(forest)).map_err(|e| io_err("write", e))
}

pub(crate) fn map(a: &MapArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let lock = lock_mode(a.image.force_share);
    let img = Arc::new(OpenOptions::new().lock(lock).open(&a.image.file)?);
    let root = match (&a.snapshot, &a.vdi) {
        (Some(s), _) => {
            require_kind(&img, RootKind::Snapshot, s)?;
            s.as_str()
        }
        (None, Some(v)) => {
            require_kind(&img, RootKind::Vdi, v)?;
            v.as_str()
        }
        (None, None) => DEFAULT_VDI,
    };
    let len = a.max_length.unwrap_or(u64::MAX);
    let extents = qmap::map_range(&img, Some(root), lock, a.start_offset, len)?;
    img.close()?;
    let name = a.image.file.display().to_string();
    let json = || crate::map::map_json(&name, root, &extents);
    emit(out, a.image.output, quiet, json, |out| {
        crate::map::map_human(out, &extents)
    })?;
    Ok(0)
}
