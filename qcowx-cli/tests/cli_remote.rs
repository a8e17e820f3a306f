//! `qcowx push` / `qcowx pull` against a real S3 server (radosgw on loopback,
//! started once for this test process): round trips judged by `qemu-img`, an image
//! made with `pull --lazy` that reads like the pushed snapshot while its writes stay
//! local, and clear errors.

use qcowx_core::remote::{Store, StoreConfig};
use qcowx_tests::cli::*;
use qcowx_tests::{s3_cluster, S3_ACCESS_KEY, S3_SECRET_KEY};

fn bucket_url(name: &str) -> String {
    s3_cluster();
    format!("s3://qcowx-cli-{name}/images/golden")
}

/// The store's objects: key, size, entity tag.
fn objects(url: &str) -> Vec<(String, u64, String)> {
    let c = s3_cluster();
    let cfg = StoreConfig {
        endpoint: c.endpoint.clone(),
        access_key: S3_ACCESS_KEY.into(),
        secret_key: S3_SECRET_KEY.into(),
        region: "us-east-1".into(),
        connect_timeout: std::time::Duration::from_secs(5),
        io_timeout: std::time::Duration::from_secs(30),
        part_bytes: qcowx_core::remote::DEFAULT_PART_BYTES,
    };
    let s = Store::open(url, &cfg).unwrap();
    s.client()
        .list("")
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.size, o.etag))
        .collect()
}

fn create_bucket(url: &str) {
    let c = s3_cluster();
    let cfg = StoreConfig::from_env(Some(&c.endpoint)).unwrap();
    Store::open(url, &cfg)
        .unwrap()
        .client()
        .create_bucket()
        .unwrap();
}

#[test]
fn push_full_and_three_incrementals_then_pull_round_trips_judged_by_qemu() {
    let d = qcowx_tests::tempdir();
    let dir = d.path();
    let url = bucket_url("round");
    create_bucket(&url);
    ok(dir, &["create", "a.qcow2", "32M"]);
    let names = ["s0", "s1", "s2", "s3"];
    for (i, s) in names.iter().enumerate() {
        scribble(dir, "a.qcow2", i as u64 + 1, 40, 32);
        ok(dir, &["snapshot", "a.qcow2", s]);
    }
    let out = ok(dir, &["push", "a.qcow2", "s0", &url]);
    assert!(stdout(&out).contains("full"), "{}", stdout(&out));
    for w in names.windows(2) {
        let out = ok(dir, &["push", "--from", w[0], "a.qcow2", w[1], &url]);
        assert!(stdout(&out).contains("incremental"), "{}", stdout(&out));
    }
    // Pushed again: nothing to do.
    let out = ok(dir, &["push", "a.qcow2", "s1", &url]);
    assert!(stdout(&out).contains("already"), "{}", stdout(&out));
    // 4 streams, 4 indexes, one manifest.
    assert_eq!(objects(&url).len(), 9);

    let out = ok(dir, &["pull", &url, "b.qcow2"]);
    for n in names {
        assert!(stdout(&out).contains(&format!("'{n}'")), "{}", stdout(&out));
    }
    assert_eq!(qemu_snapshot_names(dir, "b.qcow2"), names);
    assert_qemu_check_clean(dir, "b.qcow2");
    for n in names {
        assert!(
            qemu_raw(dir, "b.qcow2", Some(n)) == qemu_raw(dir, "a.qcow2", Some(n)),
            "pulled snapshot {n} differs from the pushed one"
        );
    }
    // The same through qemu-img compare, on one snapshot as raw files.
    std::fs::write(dir.join("a3.raw"), qemu_raw(dir, "a.qcow2", Some("s3"))).unwrap();
    std::fs::write(dir.join("b3.raw"), qemu_raw(dir, "b.qcow2", Some("s3"))).unwrap();
    qemu_ok(
        dir,
        &["compare", "-f", "raw", "-F", "raw", "a3.raw", "b3.raw"],
    );

    // A later snapshot: pushed and pulled alone; pulling one snapshot of a fresh
    // image brings its chain.
    scribble(dir, "a.qcow2", 9, 20, 32);
    ok(dir, &["snapshot", "a.qcow2", "s4"]);
    ok(dir, &["push", "--from", "s3", "a.qcow2", "s4", &url]);
    let out = ok(dir, &["pull", &url, "b.qcow2"]);
    assert!(stdout(&out).contains("'s4'") && stdout(&out).contains("Already there"));
    assert!(qemu_raw(dir, "b.qcow2", Some("s4")) == qemu_raw(dir, "a.qcow2", Some("s4")));
    ok(dir, &["pull", &url, "c.qcow2", "s2"]);
    assert_eq!(qemu_snapshot_names(dir, "c.qcow2"), ["s0", "s1", "s2"]);
    assert_qemu_check_clean(dir, "c.qcow2");
}

#[test]
fn pull_lazy_reads_like_the_snapshot_and_keeps_writes_local() {
    let d = qcowx_tests::tempdir();
    let dir = d.path();
    let url = bucket_url("lazy");
    create_bucket(&url);
    ok(dir, &["create", "a.qcow2", "16M"]);
    scribble(dir, "a.qcow2", 21, 60, 16);
    ok(dir, &["snapshot", "a.qcow2", "gold"]);
    scribble(dir, "a.qcow2", 22, 20, 16);
    ok(dir, &["snapshot", "a.qcow2", "gold2"]);
    ok(dir, &["push", "a.qcow2", "gold", &url]);
    ok(dir, &["push", "--from", "gold", "a.qcow2", "gold2", &url]);
    let before = objects(&url);

    ok(
        dir,
        &[
            "pull",
            "--lazy",
            "--cache-size",
            "64M",
            &url,
            "fork.qcow2",
            "gold2",
        ],
    );
    assert_qemu_check_clean(dir, "fork.qcow2");
    ok(dir, &["convert", "fork.qcow2", "fork.raw"]);
    let want = qemu_raw(dir, "a.qcow2", Some("gold2"));
    assert!(
        std::fs::read(dir.join("fork.raw")).unwrap() == want,
        "the lazy image reads other bytes than the snapshot"
    );
    // Writes stay local; the image still checks clean with QEMU.
    ok(
        dir,
        &[
            "io",
            "-c",
            "write -P 7 1M 300k",
            "-c",
            "write -z 0 64k",
            "fork.qcow2",
        ],
    );
    assert_eq!(objects(&url), before, "the bucket changed");
    assert_qemu_check_clean(dir, "fork.qcow2");
    ok(dir, &["convert", "fork.qcow2", "fork2.raw"]);
    let mut want2 = want.clone();
    want2[1 << 20..(1 << 20) + 300 * 1024].fill(7);
    want2[..65536].fill(0);
    assert!(std::fs::read(dir.join("fork2.raw")).unwrap() == want2);
    let info = ok(dir, &["info", "fork.qcow2"]);
    assert!(
        stdout(&info).contains(&format!("remote base: {url} snapshot uid")),
        "{}",
        stdout(&info)
    );
    // The same in JSON, for scripts: the store, the snapshot, the cache's bound.
    let info = ok(dir, &["info", "--output=json", "fork.qcow2"]);
    let j: serde_json::Value = serde_json::from_str(&stdout(&info)).unwrap();
    assert_eq!(j["remote-base"]["url"], url.as_str(), "{j}");
    assert_eq!(j["remote-base"]["cache-bytes"], 64u64 << 20, "{j}");
    assert!(
        j["remote-base"]["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty()),
        "{j}"
    );
    assert!(j.get("backing-filename").is_none(), "{j}");
    // The map says which clusters the store holds: data at depth 1, not compressed.
    let map = ok(dir, &["map", "--output=json", "fork.qcow2"]);
    let map: serde_json::Value = serde_json::from_str(&stdout(&map)).unwrap();
    let from_store: Vec<_> = map["extents"]
        .as_array()
        .expect("a list")
        .iter()
        .filter(|e| e["depth"] == 1 && e["data"] == true)
        .collect();
    assert!(!from_store.is_empty(), "{map}");
    for e in &from_store {
        assert_eq!(e["compressed"], false, "{e}");
        assert!(e.get("offset").is_none(), "{e}");
    }
    // An import would copy only the local clusters: refused, nothing written.
    fails(
        dir,
        &["import", "fork.qcow2", "imported.qcow2"],
        &["object store", &url],
    );
    assert!(!dir.join("imported.qcow2").exists());
    // --lazy never replaces a file.
    fails(
        dir,
        &["pull", "--lazy", &url, "a.qcow2", "gold"],
        &["a.qcow2"],
    );
    assert_eq!(qemu_snapshot_names(dir, "a.qcow2"), ["gold", "gold2"]);
}

#[test]
fn store_errors_are_clear() {
    let d = qcowx_tests::tempdir();
    let dir = d.path();
    let url = bucket_url("errors");
    create_bucket(&url);
    ok(dir, &["create", "a.qcow2", "4M"]);
    ok(dir, &["io", "-c", "write -P 1 0 1M", "a.qcow2"]);
    ok(dir, &["snapshot", "a.qcow2", "s0"]);
    ok(dir, &["snapshot", "a.qcow2", "s1"]);
    // A closed port: refused at once, naming the endpoint.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let endpoint = format!("http://127.0.0.1:{port}");
    fails(
        dir,
        &["push", "--endpoint", &endpoint, "a.qcow2", "s0", &url],
        &["unreachable", &endpoint],
    );
    // An incremental whose base is not there.
    fails(
        dir,
        &["push", "--from", "s0", "a.qcow2", "s1", &url],
        &["'s0' is not in", "push it first"],
    );
    ok(dir, &["push", "a.qcow2", "s0", &url]);
    // A snapshot the store does not have.
    fails(
        dir,
        &["pull", &url, "b.qcow2", "nope"],
        &["no snapshot 'nope'", "s0"],
    );
    assert!(!dir.join("b.qcow2").exists());
    // Not an s3:// URL.
    fails(
        dir,
        &["pull", "http://x/y", "b.qcow2"],
        &["s3://BUCKET/PREFIX"],
    );
}
