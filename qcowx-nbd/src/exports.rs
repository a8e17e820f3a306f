//! Which exports a server offers and how export names resolve to roots of the image.
//!
//! By default ([`ExportPlan::Auto`]) every live VDI is an export named after it — the
//! default VDI as `default` (or the name given with `-x`) — writable when the image
//! is, and every snapshot is a read-only export named `VDI@SNAPSHOT`. The list is
//! computed from the image at each `NBD_OPT_LIST` / `NBD_OPT_GO`, so roots created
//! while the server runs show up. The empty name `""` is the default export.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use qcowx_core::{Disk, Image, RootInfo, RootKind};

use crate::error::{Error, Result};

/// One explicitly configured export (`--export NAME=ROOT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Export name clients ask for.
    pub name: String,
    /// The root it serves: a VDI, a snapshot, or `VDI@SNAPSHOT`.
    pub root: String,
    /// Description shown by `NBD_INFO_DESCRIPTION` and `NBD_OPT_LIST`.
    pub description: Option<String>,
    /// Serve it read-only even when the root is a writable VDI.
    pub read_only: bool,
}

impl ExportSpec {
    /// Parses `NAME=ROOT` (or just `ROOT`, exported under its own name).
    pub fn parse(s: &str) -> Result<ExportSpec> {
        let (name, root) = match s.split_once('=') {
            Some((n, r)) => (n, r),
            None => (s, s),
        };
        if root.is_empty() {
            return Err(Error::Config(format!(
                "--export {s}: expected NAME=VDI (or NAME=SNAPSHOT, NAME=VDI@SNAPSHOT)"
            )));
        }
        if name.len() > crate::wire::MAX_STRING || name.contains('\0') {
            return Err(Error::Config(format!("--export {s}: invalid export name")));
        }
        Ok(ExportSpec {
            name: name.to_string(),
            root: root.to_string(),
            description: None,
            read_only: false,
        })
    }
}

/// How the export list is formed.
#[derive(Debug, Clone)]
pub enum ExportPlan {
    /// One export per live VDI named after it (the default VDI as `main_name`) plus a
    /// read-only `VDI@SNAPSHOT` export per snapshot.
    Auto {
        /// Name of the default VDI's export.
        main_name: String,
        /// Its description.
        main_description: Option<String>,
    },
    /// Exactly these exports; the first is also the default export `""`.
    Fixed(Vec<ExportSpec>),
}

/// What a client sees of one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical export name.
    pub name: String,
    /// The root of the image it serves (a name [`Image::open_root`] takes).
    pub root: String,
    /// Human-readable description.
    pub description: String,
    /// Served read-only (a snapshot, `-r`, or a read-only image).
    pub read_only: bool,
    /// Virtual size.
    pub size: u64,
}

/// An export opened for a connection.
#[derive(Debug, Clone)]
pub struct Export {
    /// What it is.
    pub info: ExportInfo,
    /// The I/O handle.
    pub disk: Disk,
    /// Size in bytes.
    pub size: u64,
    /// Whether writes are allowed.
    pub writable: bool,
    /// The image's cluster size (the preferred block size).
    pub cluster_size: u64,
    /// Connections of this server in their transmission phase (shared by every
    /// export of the image; counted by [`crate::transmission::serve`]).
    pub(crate) serving: Arc<AtomicUsize>,
}

/// The exports of one image.
#[derive(Debug)]
pub struct Exports {
    image: Arc<Image>,
    plan: ExportPlan,
    read_only: bool,
    /// Persistent bitmaps exported as `qemu:dirty-bitmap:NAME` (`-B`).
    bitmaps: Vec<String>,
    /// Connections in their transmission phase, over all exports.
    serving: Arc<AtomicUsize>,
}

impl Exports {
    /// Exports of `image` by `plan`; with `read_only` every export is read-only.
    /// Fails if a fixed export names a root that does not exist.
    pub fn new(image: Arc<Image>, plan: ExportPlan, read_only: bool) -> Result<Exports> {
        let exports = Exports {
            image,
            plan,
            read_only,
            bitmaps: Vec::new(),
            serving: Arc::new(AtomicUsize::new(0)),
        };
        if let ExportPlan::Fixed(specs) = &exports.plan {
            if specs.is_empty() {
                return Err(Error::Config("no exports configured".into()));
            }
            let roots = exports.image.list()?;
            for (i, s) in specs.iter().enumerate() {
                if resolve_root(&roots, &s.root).is_none() {
                    return Err(Error::Config(format!(
                        "export '{}': no VDI or snapshot '{}' in {}",
                        s.name,
                        s.root,
                        exports.image.file_name()
                    )));
                }
                if specs[..i].iter().any(|o| o.name == s.name) {
                    return Err(Error::Config(format!("export '{}' given twice", s.name)));
                }
            }
        }
        Ok(exports)
    }

    /// Exports the persistent bitmaps `names` as `qemu:dirty-bitmap:NAME` contexts of
    /// the default VDI's exports. Each must exist and be consistent; an enabled one
    /// needs read-only exports (its bits would change under the client), as qemu-nbd
    /// requires.
    pub fn with_bitmaps(mut self, names: Vec<String>) -> Result<Exports> {
        let writable = !self.read_only && self.image.is_writable();
        let list = self.image.bitmaps()?;
        for n in &names {
            let Some(b) = list.iter().find(|b| &b.name == n) else {
                return Err(Error::Config(format!(
                    "bitmap '{n}' not found in {}",
                    self.image.file_name()
                )));
            };
            if b.in_use {
                return Err(Error::Config(format!(
                    "bitmap '{n}' is inconsistent (in use): it cannot be exported"
                )));
            }
            if b.enabled && writable {
                return Err(Error::Config(format!(
                    "enabled bitmap '{n}' is incompatible with a writable export: \
                     serve read-only (-r) or disable it first"
                )));
            }
            // Read now, so that a damaged bitmap refuses the start, not a client.
            self.image.bitmap_dirty_in(n, 0, 0)?;
        }
        self.bitmaps = names;
        Ok(self)
    }

    /// The persistent bitmaps exported (`-B`).
    pub fn bitmaps(&self) -> &[String] {
        &self.bitmaps
    }

    /// The image.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// Every export, the default export first.
    pub fn list(&self) -> Result<Vec<ExportInfo>> {
        let roots = self.image.list()?;
        let image_ro = self.read_only || !self.image.is_writable();
        let mut out = Vec::new();
        match &self.plan {
            ExportPlan::Auto {
                main_name,
                main_description,
            } => {
                let vdi_export: HashMap<&str, &str> = roots
                    .iter()
                    .filter(|r| r.kind == RootKind::Vdi)
                    .map(|r| {
                        let export = if r.name == qcowx_core::vdi::DEFAULT_VDI {
                            main_name.as_str()
                        } else {
                            r.name.as_str()
                        };
                        (r.name.as_str(), export)
                    })
                    .collect();
                for r in &roots {
                    match r.kind {
                        RootKind::Vdi => {
                            let default = r.name == qcowx_core::vdi::DEFAULT_VDI;
                            let description = match (default, main_description) {
                                (true, Some(d)) => d.clone(),
                                (true, None) => "the default VDI".to_string(),
                                (false, _) => format!("VDI '{}'", r.name),
                            };
                            out.push(ExportInfo {
                                name: vdi_export
                                    .get(r.name.as_str())
                                    .map_or_else(|| r.name.clone(), |n| n.to_string()),
                                root: r.name.clone(),
                                description,
                                read_only: image_ro,
                                size: r.size,
                            });
                        }
                        RootKind::Snapshot => {
                            let name = match vdi_export.get(r.vdi.as_str()) {
                                Some(v) => format!("{v}@{}", r.name),
                                None => r.name.clone(),
                            };
                            out.push(ExportInfo {
                                name,
                                root: r.name.clone(),
                                description: format!(
                                    "snapshot '{}' of VDI '{}' (read-only)",
                                    r.name, r.vdi
                                ),
                                read_only: true,
                                size: r.size,
                            });
                        }
                    }
                }
            }
            ExportPlan::Fixed(specs) => {
                for s in specs {
                    let Some(r) = resolve_root(&roots, &s.root) else {
                        continue;
                    };
                    let description = s.description.clone().unwrap_or_else(|| match r.kind {
                        RootKind::Vdi => format!("VDI '{}'", r.name),
                        RootKind::Snapshot => {
                            format!("snapshot '{}' of VDI '{}' (read-only)", r.name, r.vdi)
                        }
                    });
                    out.push(ExportInfo {
                        name: s.name.clone(),
                        root: r.name.clone(),
                        description,
                        read_only: image_ro || s.read_only || r.kind == RootKind::Snapshot,
                        size: r.size,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Names of the image's live snapshots.
    pub fn snapshots(&self) -> Result<Vec<String>> {
        Ok(self
            .image
            .list()?
            .into_iter()
            .filter(|r| r.kind == RootKind::Snapshot)
            .map(|r| r.name)
            .collect())
    }

    /// The export a client names (`""` is the default export), if it exists.
    pub fn find(&self, name: &str) -> Result<Option<ExportInfo>> {
        let list = self.list()?;
        if name.is_empty() {
            return Ok(list.into_iter().next());
        }
        Ok(list.into_iter().find(|e| e.name == name))
    }

    /// Opens an export for I/O.
    pub fn open(&self, info: &ExportInfo) -> Result<Export> {
        let disk = self.image.open_root(&info.root)?;
        let size = disk.size();
        let writable = disk.is_writable() && !info.read_only;
        Ok(Export {
            info: ExportInfo {
                size,
                ..info.clone()
            },
            disk,
            size,
            writable,
            cluster_size: self.image.cluster_size(),
            serving: Arc::clone(&self.serving),
        })
    }
}

/// Finds root `spec` (`NAME` or `VDI@SNAPSHOT`) among `roots`.
pub fn resolve_root<'a>(roots: &'a [RootInfo], spec: &str) -> Option<&'a RootInfo> {
    roots.iter().find(|r| r.name == spec).or_else(|| {
        let (vdi, snap) = spec.rsplit_once('@')?;
        roots
            .iter()
            .find(|r| r.kind == RootKind::Snapshot && r.name == snap && r.vdi == vdi)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcowx_core::storage::MemStorage;
    use qcowx_core::CreateOptions;

    fn image() -> Arc<Image> {
        let img = Image::create_in(Arc::new(MemStorage::new()), &CreateOptions::new(1 << 20))
            .expect("create");
        let img = Arc::new(img);
        img.snapshot("default", "s1").expect("snapshot");
        img.fork("s1", "web").expect("fork");
        img.snapshot("web", "w1").expect("snapshot");
        img
    }

    #[test]
    fn auto_exports_name_vdis_and_snapshots() {
        let ex = Exports::new(
            image(),
            ExportPlan::Auto {
                main_name: "default".into(),
                main_description: None,
            },
            false,
        )
        .expect("exports");
        let list = ex.list().expect("list");
        let names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names[0], "default");
        for n in ["default@s1", "web", "web@w1"] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        let snap = list.iter().find(|e| e.name == "default@s1").expect("snap");
        assert!(snap.read_only);
        assert!(!list[0].read_only);
        assert_eq!(ex.find("").expect("find").expect("default").name, "default");
        assert!(ex.find("nope").expect("find").is_none());
        let web = ex.open(&ex.find("web").unwrap().unwrap()).expect("open");
        assert!(web.writable);
        let s = ex.open(snap).expect("open");
        assert!(!s.writable);
    }

    #[test]
    fn fixed_exports_resolve_roots_and_reject_unknown_ones() {
        let img = image();
        let specs = vec![
            ExportSpec::parse("a=web").unwrap(),
            ExportSpec::parse("b=web@w1").unwrap(),
        ];
        let ex = Exports::new(img.clone(), ExportPlan::Fixed(specs), false).expect("exports");
        let list = ex.list().expect("list");
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].root, "w1");
        assert!(list[1].read_only);
        assert_eq!(ex.find("").unwrap().unwrap().name, "a");
        let bad = vec![ExportSpec::parse("x=missing").unwrap()];
        assert!(Exports::new(img, ExportPlan::Fixed(bad), false).is_err());
        assert!(ExportSpec::parse("x=").is_err());
    }
}
