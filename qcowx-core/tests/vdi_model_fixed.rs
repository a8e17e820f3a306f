//! Model-based tests of snapshots, forks, deletes, reverts and GC: fixed sequences.
//!
//! A fixed sequence touching every operation runs against the image and the model of
//! `vdi_model_common` (the checks of `vdi_model_random.rs`), so a regression shows up
//! with a short, readable history even before the property test finds it; and a
//! handle opened before a revert reads and writes the VDI's new head.

mod vdi_model_common;

use std::sync::Arc;

use qcowx_core::storage::{MemStorage, Storage};
use qcowx_core::{CreateOptions, Image};

use vdi_model_common::{run_case, At, NameChoice, Op, Shape, GEOMETRIES};

/// A fixed sequence touching every operation, so a regression shows up with a short,
/// readable history even before the property test finds it.
#[test]
fn every_operation_once() {
    let w = |vdi, off, len, seed| Op::Write {
        vdi,
        at: At {
            shape: Shape::Unaligned,
            off,
            len,
        },
        seed,
        via_image: false,
    };
    let ops = vec![
        w(0, 1000, 9000, 1),
        Op::Snapshot {
            vdi: 0,
            name: NameChoice::Fresh,
        },
        w(0, 5000, 100, 2),
        Op::Fork {
            snap: 0,
            name: NameChoice::Fresh,
        },
        w(1, 0, 70000, 3),
        Op::Snapshot {
            vdi: 1,
            name: NameChoice::Fresh,
        },
        Op::Discard {
            vdi: 1,
            at: At {
                shape: Shape::Clusters,
                off: 0,
                len: 2,
            },
        },
        Op::Revert { vdi: 1, snap: 1 },
        Op::DeleteSnapshot { snap: 0 },
        Op::Gc,
        Op::Reopen { small_cache: true },
        Op::DeleteVdi { vdi: 1 },
        Op::Gc,
        Op::Invalid { which: 9, pick: 0 },
    ];
    for g in 0..GEOMETRIES.len() {
        run_case(g, &ops);
    }
}

/// A handle opened before a revert reads and writes the VDI's new head (it used to
/// keep reading the superseded head's L1 table).
#[test]
fn a_handle_follows_its_vdi_through_a_revert() {
    for vdi in ["default", "v"] {
        let storage = Arc::new(MemStorage::new());
        let mut opts = CreateOptions::new(1 << 20);
        opts.cluster_size = 4096;
        let img = Arc::new(Image::create_in(storage as Arc<dyn Storage>, &opts).unwrap());
        img.write_at(&[1; 8192], 0).unwrap();
        img.snapshot("default", "s").unwrap();
        img.fork("s", "v").unwrap();
        let d = img.open_root(vdi).unwrap();
        d.write_at(&[2; 8192], 0).unwrap();
        img.snapshot(vdi, "s2").unwrap();
        d.discard(0, 8192).unwrap();
        img.revert(vdi, "s2").unwrap();
        let mut b = vec![0u8; 8192];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(
            b,
            vec![2; 8192],
            "{vdi}: an old handle reads the reverted content"
        );
        d.write_at(&[3; 4096], 0).unwrap();
        img.open_root(vdi).unwrap().read_at(&mut b, 0).unwrap();
        assert_eq!(
            &b[..4096],
            &[3; 4096],
            "{vdi}: an old handle writes the new head"
        );
        img.open_root("s2").unwrap().read_at(&mut b, 0).unwrap();
        assert_eq!(b, vec![2; 8192], "{vdi}: the snapshot is unchanged");
        let check = img.check().unwrap();
        assert_eq!(check.corruptions, 0, "{:?}", check.messages);
    }
}
