//! What an operator reads: `gc`'s report of what it did to the file.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use qcowx_tests::cli::*;
use serde_json::Value;

const CS: u64 = 65536;

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn gc_reports_what_it_did_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("g.qcow2");
    ok_quiet(d, &["create", "g.qcow2", "4M"]);
    ok_quiet(d, &["io", "g.qcow2", "-c", "write -P 1 0 256k"]);
    ok_quiet(d, &["snapshot", "g.qcow2", "s1"]);
    ok_quiet(d, &["fork", "g.qcow2", "s1", "dev"]);
    ok_quiet(
        d,
        &["io", "g.qcow2", "--vdi", "dev", "-c", "write -P 3 1M 128k"],
    );
    ok_quiet(d, &["delete", "g.qcow2", "--vdi", "dev"]);
    let before = allocated(&file);
    let len_before = std::fs::metadata(&file).unwrap().len();
    let v: Value = json(&ok_quiet(d, &["gc", "--output=json", "g.qcow2"]));
    // dev's 2 data clusters, its L2 table and its L1 table.
    assert_eq!(v["clusters-freed"], 4, "{v:#}");
    assert_eq!(v["file-size-before"], len_before, "{v:#}");
    // The compacted snapshot table went past the end: the length grew...
    let len_after = v["file-size-after"].as_u64().unwrap();
    assert_eq!(len_after, std::fs::metadata(&file).unwrap().len());
    assert!(len_after > len_before, "{v:#}");
    // ...while what the file occupies shrank by at least what was freed, and the
    // report says so.
    assert_eq!(v["allocated-before"], before, "{v:#}");
    let after = v["allocated-after"].as_u64().unwrap();
    assert_eq!(after, allocated(&file), "{v:#}");
    assert!(after + 4 * CS <= before, "{v:#}");

    // The human report explains a file that grew.
    ok_quiet(d, &["fork", "g.qcow2", "s1", "dev2"]);
    ok_quiet(
        d,
        &["io", "g.qcow2", "--vdi", "dev2", "-c", "write -P 3 1M 128k"],
    );
    ok_quiet(d, &["delete", "g.qcow2", "--vdi", "dev2"]);
    let text = stdout(&ok_quiet(d, &["gc", "g.qcow2"]));
    assert!(text.contains("allocated on disk: "), "{text}");
    let v_len = |t: &str| -> (u64, u64) {
        let l = t.lines().find(|l| l.starts_with("file size: ")).unwrap();
        let nums: Vec<u64> = l
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse().ok())
            .collect();
        (nums[0], nums[1])
    };
    let (b, a) = v_len(&text);
    assert_eq!(a > b, text.contains("note: the file grew"), "{text}");
    assert_qemu_check_clean(d, "g.qcow2");
}
