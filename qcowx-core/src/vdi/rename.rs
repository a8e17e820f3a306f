//! Renaming snapshots and VDIs.
//!
//! A name lives in the root's snapshot table entry, whose length depends on it, so a
//! rename rewrites the whole table: the new table is written to new clusters and
//! synced, then one header write (`snapshots_offset`) commits it. A crash before that
//! write leaves the old name and an orphaned copy of the table (reclaimed by `gc`);
//! after it, the new name.

use crate::engine::Image;
use crate::error::{Error, Result};
use crate::format::roots::extra_with_record;
use crate::vdi::{validate_name, RootKind, DEFAULT_VDI, VDI_NAME_PREFIX};

impl Image {
    /// Renames the live snapshot (`kind` [`RootKind::Snapshot`]) or VDI
    /// ([`RootKind::Vdi`]) `old` to `new`. The default VDI cannot be renamed; `new`
    /// must be a valid name ([`validate_name`]) not used by any snapshot or VDI.
    ///
    /// The root keeps its uid, lineage and QCOW2 snapshot ID. A snapshot QEMU made
    /// (no qcowx block) gets one, recording the uid it had, so roots whose lineage
    /// names it keep their parent.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image, RootKind};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.snapshot("default", "s1")?;
    /// img.rename(RootKind::Snapshot, "s1", "before-upgrade")?;
    /// let names: Vec<String> = img.list()?.into_iter().map(|r| r.name).collect();
    /// assert_eq!(names, ["default", "before-upgrade"]);
    /// # Ok(()) }
    /// ```
    pub fn rename(&self, kind: RootKind, old: &str, new: &str) -> Result<()> {
        let what = match kind {
            RootKind::Snapshot => "snapshot",
            RootKind::Vdi => "VDI",
        };
        self.check_writable()?;
        if kind == RootKind::Vdi && old == DEFAULT_VDI {
            return Err(Error::InvalidArgument(format!(
                "{}: the default VDI cannot be renamed",
                self.name
            )));
        }
        validate_name(new)?;
        let roots = self.list()?;
        if !roots.iter().any(|r| r.kind == kind && r.name == old) {
            return Err(Error::NotFound {
                file: self.name.clone(),
                what: what.to_string(),
                name: old.to_string(),
            });
        }
        if old == new {
            return Ok(());
        }
        if new == DEFAULT_VDI || roots.iter().any(|r| r.name == new) {
            return Err(self.exists(new));
        }
        let _structure = self.lock_structure();
        let mut st = self.lock_state()?;
        let _gate = self.io_gate_write();
        let st = &mut *st;
        let display = |st: &crate::engine::State, i: usize| st.registry.display_name(i).to_string();
        let i = (0..st.registry.len())
            .find(|&i| {
                st.registry.record(i).kind == kind
                    && st.registry.is_live(i)
                    && display(st, i) == old
            })
            .ok_or_else(|| Error::NotFound {
                file: self.name.clone(),
                what: what.to_string(),
                name: old.to_string(),
            })?;
        self.flush_locked(st)?;
        // The table moves to new clusters: refcounts are stale until the next rebuild.
        self.mark_stale(st)?;
        // The new table is built aside: the state takes it only once it is durable.
        let mut snapshots = st.registry.entries().to_vec();
        let mut records = st.registry.records().to_vec();
        snapshots[i].name = match kind {
            RootKind::Vdi => format!("{VDI_NAME_PREFIX}{new}"),
            RootKind::Snapshot => new.to_string(),
        };
        if !records[i].native {
            records[i].native = true;
            snapshots[i].extra = extra_with_record(&snapshots[i], &records[i], st.header.size);
        }
        self.replace_table(st, snapshots, records)
    }
}

#[cfg(test)]
mod tests {
    use crate::{CreateOptions, Image, RootKind};

    #[test]
    fn rename_keeps_identity_and_refuses_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        let img = std::sync::Arc::new(Image::create(&p, &CreateOptions::new(1 << 20)).unwrap());
        img.write_at(b"one", 0).unwrap();
        img.snapshot("default", "s1").unwrap();
        img.fork("s1", "dev").unwrap();
        img.snapshot("dev", "d1").unwrap();
        let before = img.list().unwrap();
        img.rename(RootKind::Snapshot, "s1", "base-with-a-much-longer-name")
            .unwrap();
        img.rename(RootKind::Vdi, "dev", "develop").unwrap();
        for (kind, old, new) in [
            (RootKind::Vdi, "default", "x"),
            (RootKind::Snapshot, "nope", "x"),
            (RootKind::Vdi, "d1", "x"),
            (RootKind::Snapshot, "d1", "develop"),
            (RootKind::Snapshot, "d1", "default"),
            (RootKind::Snapshot, "d1", "bad name"),
        ] {
            assert!(img.rename(kind, old, new).is_err(), "{old} -> {new}");
        }
        img.close().unwrap();
        drop(img);
        let img = std::sync::Arc::new(Image::open(&p).unwrap());
        let after = img.list().unwrap();
        assert_eq!(after.len(), before.len());
        let d1 = after.iter().find(|r| r.name == "d1").unwrap();
        assert_eq!(d1.parent.as_deref(), Some("base-with-a-much-longer-name"));
        assert_eq!(d1.vdi, "develop");
        let s = after
            .iter()
            .find(|r| r.name == "base-with-a-much-longer-name")
            .unwrap();
        assert_eq!(s.uid, before[1].uid);
        assert_eq!(s.id, before[1].id);
        let mut b = [0u8; 3];
        img.open_root("base-with-a-much-longer-name")
            .unwrap()
            .read_at(&mut b, 0)
            .unwrap();
        assert_eq!(&b, b"one");
        assert!(img.check().unwrap().corruptions == 0);
    }
}
