//! The model of the soak test of `qcowx-nbd` (tests/soak_server.rs), checked on its own:
//! the Rust pattern and CRC of `qcowx_tests::soak_tools` agree with the client script's.
//! Needs `python3-libnbd`.

use qcowx_tests::soak_tools::*;
use qcowx_tests::*;

/// The Rust pattern and CRC agree with the client script's.
#[test]
fn python_and_rust_agree_on_patterns_and_crc() {
    let dir = tempdir();
    let script = dir.path().join("p.py");
    let helpers = CLIENT_PY.split("def fail").next().expect("helpers");
    let helpers = helpers.replace("uri, window = sys.argv[1], int(sys.argv[2])", "");
    std::fs::write(
        &script,
        format!(
            "{helpers}\nd = pat(12345, 1000003, 70001) + pat(2**64 - 1, 0, 33)\n\
             sys.stdout.buffer.write(d)\nsys.stderr.write(str(zlib.crc32(d)))\n"
        ),
    )
    .expect("write script");
    let out = run(python3_libnbd().arg(&script));
    assert!(out.status.success(), "{}", describe(&out));
    let mut want = pattern_at(12345, 1000003, 70001);
    want.extend(pattern_at(u64::MAX, 0, 33));
    assert_eq!(out.stdout, want);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        crc32(&want).to_string()
    );
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
}
