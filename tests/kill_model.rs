//! The model of the SIGKILL test of `qcowx-nbd` (tests/kill_server.rs), checked on its
//! own: the Rust helpers of `qcowx_tests::kill_tools` and the libnbd client script agree
//! on the content of a block, `identify` refuses torn and misplaced blocks, and
//! `allowed` follows flushes and FUA on a hand-made log. Needs `python3-libnbd`.

use std::collections::HashMap;

use qcowx_tests::kill_tools::*;
use qcowx_tests::*;

/// The helpers agree with the client script on the content of a block.
#[test]
fn python_and_rust_blocks_agree() {
    let dir = tempdir();
    let script = dir.path().join("block.py");
    let body = CLIENT_PY
        .split("ops = []")
        .next()
        .expect("the script's helpers")
        .replace("uri, plan_path, src, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])", "src = 2");
    std::fs::write(
        &script,
        format!("{body}\nsys.stdout.buffer.write(block(77, 1234) + block(1 << 40, 5))\n"),
    )
    .expect("write script");
    let out = run(python3_libnbd().arg(&script));
    assert!(out.status.success(), "{}", describe(&out));
    let mut want = block_bytes(77, 2, 1234);
    want.extend(block_bytes(1 << 40, 2, 5));
    assert_eq!(out.stdout, want);
    let sources: Sources = HashMap::from([(77, 2)]);
    // Block 1234 is not a used block; use a used one to check `identify`.
    let u = 5;
    let b = block_bytes(77, 2, block_offset(u) / BLOCK);
    assert_eq!(identify(&b, u, &sources), Ok(77));
    let mut torn = b.clone();
    torn[600] ^= 1;
    assert!(identify(&torn, u, &sources).is_err());
    assert!(identify(
        &block_bytes(77, 2, block_offset(u + 1) / BLOCK),
        u,
        &sources
    )
    .is_err());
    assert_eq!(identify(&[0; BLOCK as usize], u, &sources), Ok(0));
    assert!(identify(&block_bytes(78, 2, block_offset(u) / BLOCK), u, &sources).is_err());
}

/// The rules of `allowed` on a hand-made log.
#[test]
fn allowed_follows_flushes_and_fua() {
    let slots = slots();
    let w = |gen, slot, fua| Op {
        kind: OpKind::Write { gen, fua },
        slot,
    };
    let plan = vec![
        w(10, 0, false), // 0: acked before the flush: durable
        w(11, 1, false), // 1: acked after the flush was sent: not durable
        Op {
            kind: OpKind::Flush,
            slot: 0,
        }, // 2
        w(12, 0, false), // 3: sent after 0: allowed
        w(13, 2, true),  // 4: FUA, acked: durable
        w(14, 3, false), // 5: never sent
        Op {
            kind: OpKind::Trim,
            slot: 4,
        }, // 6: sent, not acked
    ];
    let lines: Vec<String> = [
        "r", "s 0", "a 0", "s 1", "s 2", "a 1", "a 2", "s 3", "s 4", "a 4", "s 6",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = parse_log("test", &lines, plan.len());
    let base = vec![INIT_GEN; USED_BLOCKS];
    let a = allowed(&plan, &log, &slots, &base);
    let at = |s: usize| a.candidates[slots[s].first].clone();
    assert_eq!(at(0), vec![10, 12]);
    assert_eq!(at(1), vec![INIT_GEN, 11]);
    assert_eq!(at(2), vec![13]);
    assert_eq!(at(3), vec![INIT_GEN]);
    assert_eq!(at(4), vec![INIT_GEN, 0]);
    assert_eq!((a.sent, a.acked, a.durable, a.flushes), (6, 4, 2, 1));
}
