//! Model-based property test of snapshots, forks, deletes, reverts and GC.
//!
//! Random sequences of writes, zero writes, discards, snapshots, forks, snapshot and
//! VDI deletes, reverts, GC runs, flushes and close/reopen cycles run against an image
//! held in a [`MemStorage`] and against a plain in-memory model: a map from each live
//! VDI's name to its content and from each live snapshot's name to the content it had
//! when it was taken (snapshots never change). Operations pick existing roots by index
//! so most of them are valid; some name roots that do not exist, names already taken,
//! malformed names, or the wrong kind of root, and must fail with the documented error
//! without changing anything.
//!
//! After every step: `list()` names exactly the model's roots (kind, owning VDI, and
//! the parent of a VDI whose origin snapshot still lives); every root reads exactly as
//! the model says over the whole disk; `diff` between two roots covers every byte
//! where they differ; block status never calls a byte holding data "zero". After every
//! GC, `check` finds no corruption and no leak with exact refcounts (dirty bit clear)
//! and the GC removed exactly the roots that were deleted or superseded; after every
//! close the reopened image checks clean with exact refcounts.

mod vdi_model_common;

use proptest::prelude::*;
use proptest::test_runner::Config;

use vdi_model_common::{run_case, At, NameChoice, Op, Shape, GEOMETRIES};

fn at() -> impl Strategy<Value = At> {
    (
        prop_oneof![
            4 => Just(Shape::Unaligned),
            4 => Just(Shape::Clusters),
            1 => Just(Shape::Tail),
        ],
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(shape, off, len)| At { shape, off, len })
}

fn name_choice() -> impl Strategy<Value = NameChoice> {
    prop_oneof![
        12 => Just(NameChoice::Fresh),
        3 => any::<usize>().prop_map(NameChoice::Reused),
        1 => any::<usize>().prop_map(NameChoice::Taken),
        1 => any::<usize>().prop_map(NameChoice::Malformed),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        14 => (any::<usize>(), at(), any::<u64>(), any::<bool>())
            .prop_map(|(vdi, at, seed, via_image)| Op::Write { vdi, at, seed, via_image }),
        3 => (any::<usize>(), at(), any::<bool>())
            .prop_map(|(vdi, at, unmap)| Op::Zeroes { vdi, at, unmap }),
        3 => (any::<usize>(), at()).prop_map(|(vdi, at)| Op::Discard { vdi, at }),
        6 => (any::<usize>(), name_choice()).prop_map(|(vdi, name)| Op::Snapshot { vdi, name }),
        4 => (any::<usize>(), name_choice()).prop_map(|(snap, name)| Op::Fork { snap, name }),
        3 => any::<usize>().prop_map(|snap| Op::DeleteSnapshot { snap }),
        2 => any::<usize>().prop_map(|vdi| Op::DeleteVdi { vdi }),
        3 => (any::<usize>(), any::<usize>()).prop_map(|(vdi, snap)| Op::Revert { vdi, snap }),
        3 => Just(Op::Gc),
        2 => Just(Op::Flush),
        2 => any::<bool>().prop_map(|small_cache| Op::Reopen { small_cache }),
        2 => (0u8..12, any::<usize>()).prop_map(|(which, pick)| Op::Invalid { which, pick }),
    ]
}

proptest! {
    #![proptest_config(Config {
        // QCOWX_MODEL_CASES=N runs a longer exploration.
        cases: std::env::var("QCOWX_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        max_shrink_iters: 400,
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn snapshots_forks_and_gc_match_the_model(
        geometry in 0..GEOMETRIES.len(),
        ops in proptest::collection::vec(op(), 40..80),
    ) {
        run_case(geometry, &ops);
    }
}
