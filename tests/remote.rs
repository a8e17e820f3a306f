//! The object-store tier against a real S3 server (radosgw on loopback, started once
//! for this test process): an image whose base is a pushed snapshot reads like the
//! local image, caches what it read (no request for a cached range), keeps its
//! writes local, keeps its cache within its bound, fails clearly when the store is
//! unreachable and refuses damaged objects; qcowx-nbd serves such an image.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use qcowx_core::format::remote::{Manifest, RemoteBase};
use qcowx_core::remote::{self, RemoteError, RemoteLayer, Store, StoreConfig};
use qcowx_core::{CreateOptions, Error, Image, OpenOptions, DEFAULT_VDI};
use qcowx_tests::*;

const MIB: u64 = 1 << 20;

/// A bucket and prefix of its own for each test.
fn store_url(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("s3://qcowx-{test}-{n}/golden")
}

fn config() -> StoreConfig {
    let c = s3_cluster();
    StoreConfig {
        endpoint: c.endpoint.clone(),
        access_key: S3_ACCESS_KEY.into(),
        secret_key: S3_SECRET_KEY.into(),
        region: "us-east-1".into(),
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(30),
        part_bytes: remote::DEFAULT_PART_BYTES,
    }
}

fn open_store(url: &str) -> Store {
    let s = Store::open(url, &config()).expect("store");
    s.client().create_bucket().expect("create bucket");
    s
}

/// A golden image of `size` bytes: data, compressible data, explicit zeros and
/// holes; snapshot `base`, then changes and snapshot `s2`. Both pushed to `url`.
fn golden(dir: &Path, url: &str, size: u64) -> (std::path::PathBuf, Store) {
    let path = dir.join("golden.qcow2");
    let img = Arc::new(Image::create(&path, &CreateOptions::new(size)).unwrap());
    img.write_at(&pattern(1, 3 * MIB as usize), 0).unwrap();
    img.write_at(&compressible(2, 2 * MIB as usize + 4096), 5 * MIB + 512)
        .unwrap();
    img.write_zeroes(MIB, 64 << 10, false).unwrap();
    img.write_at(&pattern(3, 70_000), size - 70_000).unwrap();
    img.snapshot(DEFAULT_VDI, "base").unwrap();
    img.write_at(&pattern(4, MIB as usize), MIB / 2).unwrap();
    img.discard(5 * MIB + 512 * 1024, MIB).unwrap();
    img.write_zeroes(2 * MIB, 4096, false).unwrap();
    img.snapshot(DEFAULT_VDI, "s2").unwrap();
    // Changes after the snapshots: never pushed.
    img.write_at(&pattern(5, 4096), 0).unwrap();
    let store = open_store(url);
    remote::push(&img, "base", None, &store).unwrap();
    remote::push(&img, "s2", Some("base"), &store).unwrap();
    Arc::try_unwrap(img).unwrap().close().unwrap();
    (path, store)
}

fn snapshot_bytes(path: &Path, snapshot: &str) -> Vec<u8> {
    let img = Arc::new(OpenOptions::new().open(path).unwrap());
    let disk = img.open_root(snapshot).unwrap();
    let mut v = vec![0u8; disk.size() as usize];
    disk.read_at(&mut v, 0).unwrap();
    v
}

fn fork_of(path: &Path, store: &Store, snapshot: &str, cache: u64) -> Image {
    let c = s3_cluster();
    remote::create_on_remote(path, store, snapshot, &c.endpoint, cache).unwrap()
}

fn requests(img: &Image) -> u64 {
    img.backing()
        .and_then(|b| b.remote_requests())
        .expect("a remote base")
}

fn whole(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    for (i, chunk) in v.chunks_mut(MIB as usize).enumerate() {
        img.read_at(chunk, i as u64 * MIB).unwrap();
    }
    v
}

fn objects(store: &Store) -> Vec<(String, u64, String)> {
    store
        .client()
        .list("")
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.size, o.etag))
        .collect()
}

#[test]
fn a_fork_of_a_remote_base_reads_like_the_local_image_and_caches_what_it_read() {
    let _up = server_up();
    let dir = tempdir();
    let url = store_url("fork");
    let (golden_path, store) = golden(dir.path(), &url, 12 * MIB);
    let expected_s2 = snapshot_bytes(&golden_path, "s2");
    let expected_base = snapshot_bytes(&golden_path, "base");
    let before = objects(&store);
    assert_eq!(before.len(), 5, "{before:?}");

    let fork_path = dir.path().join("fork.qcow2");
    let fork = fork_of(&fork_path, &store, "s2", 64 * MIB);
    let opened = requests(&fork);
    assert_eq!(opened, 3, "the manifest and two indexes");
    let got = whole(&fork);
    assert!(got == expected_s2, "the fork reads other bytes than s2");
    let first = requests(&fork);
    assert!(first > opened, "reading fetched records");
    // Read again: all cached, no request.
    assert!(whole(&fork) == expected_s2);
    assert_eq!(requests(&fork), first, "a cached range made a request");

    // Writes stay local.
    fork.write_at(&pattern(9, 100_000), 3 * MIB - 50_000)
        .unwrap();
    fork.write_zeroes(0, 4096, false).unwrap();
    fork.flush().unwrap();
    let mut expected = expected_s2.clone();
    expected[3 * MIB as usize - 50_000..3 * MIB as usize + 50_000]
        .copy_from_slice(&pattern(9, 100_000));
    expected[..4096].fill(0);
    assert!(whole(&fork) == expected);
    fork.close().unwrap();
    assert_eq!(objects(&store), before, "the bucket changed");
    assert_qemu_check_clean(&fork_path);

    // Reopened: the cache folder serves every read; only the manifest and indexes
    // are fetched.
    let fork = OpenOptions::new().open(&fork_path).unwrap();
    assert!(whole(&fork) == expected);
    assert_eq!(requests(&fork), 3);
    fork.close().unwrap();

    // A fork of the older snapshot reads it.
    let old = fork_of(&dir.path().join("old.qcow2"), &store, "base", 64 * MIB);
    assert!(whole(&old) == expected_base);
    old.close().unwrap();
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn the_cache_stays_within_its_bound() {
    let _up = server_up();
    let dir = tempdir();
    let url = store_url("bound");
    let (golden_path, store) = golden(dir.path(), &url, 12 * MIB);
    let expected = snapshot_bytes(&golden_path, "s2");
    let fork_path = dir.path().join("fork.qcow2");
    let bound = 2 * MIB + 4096;
    let fork = fork_of(&fork_path, &store, "s2", bound);
    let cache_dir = dir.path().join("fork.qcow2.qcowx-cache");
    for _ in 0..2 {
        assert!(whole(&fork) == expected);
        let used = dir_bytes(&cache_dir);
        assert!(used <= bound, "cache holds {used} bytes, bound {bound}");
        assert!(used > 0);
    }
    fork.close().unwrap();
}

/// A TCP forwarder to the S3 server that can be cut.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(client) = conn else { continue };
                if !flag.load(Ordering::SeqCst) {
                    // Cut: refuse by closing at once, and stop listening.
                    drop(client);
                    return;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                for (mut a, mut b) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let f = flag.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        while f.load(Ordering::SeqCst) {
                            match a.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if !f.load(Ordering::SeqCst) || b.write_all(&buf[..n]).is_err()
                                    {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = b.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, up }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        // Wake the accept loop so it stops listening.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn is_unreachable(e: &Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        let e = x
            .downcast_ref::<Error>()
            .or_else(|| x.downcast_ref::<Box<Error>>().map(|b| &**b));
        if let Some(Error::Remote { source }) = e {
            if matches!(**source, RemoteError::Unreachable { .. }) {
                return true;
            }
        }
        cur = x.source();
    }
    false
}

#[test]
fn an_unreachable_store_is_a_clear_error_not_a_hang() {
    let _up = server_up();
    let dir = tempdir();
    let url = store_url("down");
    let (_, store) = golden(dir.path(), &url, 8 * MIB);
    let uid = store.manifest().unwrap().by_name("s2").unwrap().uid;

    // A closed port.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut cfg = config();
    cfg.endpoint = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    let e = RemoteLayer::load(Store::open(&url, &cfg).unwrap(), uid, dir.path(), MIB).unwrap_err();
    assert!(is_unreachable(&e), "{e}");
    let text = error_text(&e);
    assert!(
        text.contains("unreachable") && text.contains(&cfg.endpoint),
        "{text}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));

    // A server that accepts and never answers: the timeout ends the wait.
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    cfg.endpoint = format!("http://127.0.0.1:{}", hole.local_addr().unwrap().port());
    cfg.io_timeout = Duration::from_secs(2);
    let t = Instant::now();
    let e = RemoteLayer::load(Store::open(&url, &cfg).unwrap(), uid, dir.path(), MIB).unwrap_err();
    assert!(is_unreachable(&e), "{e}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    drop(hole);

    // The store goes away after the base was opened: a read of an uncached range
    // fails; what was cached still reads.
    let proxy = Proxy::start(s3_cluster().port);
    cfg = config();
    cfg.endpoint = format!("http://127.0.0.1:{}", proxy.port);
    cfg.io_timeout = Duration::from_secs(5);
    let layer = RemoteLayer::load(
        Store::open(&url, &cfg).unwrap(),
        uid,
        &dir.path().join("cache"),
        64 * MIB,
    )
    .unwrap();
    use qcowx_core::engine::backing::Layer;
    let mut buf = vec![0u8; 65536];
    layer.read_layer(&mut buf, 0).unwrap();
    proxy.cut();
    let t = Instant::now();
    // A data range of the full stream that nothing read yet.
    let e = layer
        .read_layer(&mut buf, 2 * MIB + 256 * 1024)
        .unwrap_err();
    assert!(is_unreachable(&e), "{e}");
    assert!(t.elapsed() < Duration::from_secs(15));
    layer.read_layer(&mut buf, 0).unwrap();
}

/// Held shared by every test, and exclusively by the one that stops the server.
static SERVER: RwLock<()> = RwLock::new(());

fn server_up() -> std::sync::RwLockReadGuard<'static, ()> {
    SERVER.read().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn opening_an_image_whose_store_is_stopped_says_so() {
    let dir = tempdir();
    let url = store_url("stopped");
    let uid = {
        let _up = server_up();
        let (_, store) = golden(dir.path(), &url, 8 * MIB);
        let uid = store.manifest().unwrap().by_name("s2").unwrap().uid;
        uid
    };
    // Opening an image whose base is unreachable says so.
    let fork_path = dir.path().join("fork.qcow2");
    let base = RemoteBase {
        url: url.clone(),
        endpoint: String::new(),
        uid,
        cache_bytes: MIB,
    };
    let mut o = CreateOptions::new(8 * MIB);
    o.remote_base = Some(base);
    // Created while reachable through the environment's endpoint.
    let _only = SERVER.write().unwrap_or_else(|p| p.into_inner());
    Image::create(&fork_path, &o).unwrap().close().unwrap();
    s3_cluster().stop_rgw();
    let t = Instant::now();
    let e = OpenOptions::new().open(&fork_path).unwrap_err();
    s3_cluster().start_rgw();
    assert!(is_unreachable(&e), "{e}");
    let text = error_text(&e);
    assert!(
        text.contains(&url) && text.contains("unreachable"),
        "{text}"
    );
    assert!(t.elapsed() < Duration::from_secs(40));
}

#[test]
fn damaged_objects_are_refused() {
    let _up = server_up();
    let dir = tempdir();
    let url = store_url("bad");
    let (_, store) = golden(dir.path(), &url, 8 * MIB);
    let manifest = store.manifest().unwrap();
    let s2 = manifest.by_name("s2").unwrap().clone();
    let base = manifest.by_name("base").unwrap().clone();
    let client = store.client();

    // One flipped byte in a data record of the full stream: that read is refused.
    let key = store.stream_key(base.uid);
    let good = client.get(&key, 1 << 30).unwrap();
    let mut bad = good.clone();
    bad[216 + 40 + 1000] ^= 0x40;
    client.put(&key, &bad, false).unwrap();
    let layer = RemoteLayer::load(
        Store::open(&url, &config()).unwrap(),
        s2.uid,
        &dir.path().join("c1"),
        64 * MIB,
    )
    .unwrap();
    use qcowx_core::engine::backing::Layer;
    let mut buf = vec![0u8; 4096];
    let e = layer.read_layer(&mut buf, 0).unwrap_err();
    let text = error_text(&e);
    assert!(
        matches!(&e, Error::Remote { source } if matches!(**source, RemoteError::Record { .. })),
        "{text}"
    );
    assert!(text.contains(&key) && text.contains("checksum"), "{text}");
    client.put(&key, &good, false).unwrap();

    // A damaged index, and one the manifest says is absurdly large.
    let ikey = store.index_key(s2.uid);
    let idx = client.get(&ikey, 1 << 30).unwrap();
    let mut bad_idx = idx.clone();
    let last = bad_idx.len() - 3;
    bad_idx[last] ^= 1;
    client.put(&ikey, &bad_idx, false).unwrap();
    let load = || {
        RemoteLayer::load(
            Store::open(&url, &config()).unwrap(),
            s2.uid,
            &dir.path().join("c2"),
            MIB,
        )
    };
    let e = load().unwrap_err();
    assert!(error_text(&e).contains("index is invalid"), "{e}");
    client.put(&ikey, &idx, false).unwrap();
    load().unwrap();

    let mut m = manifest.clone();
    m.entries
        .iter_mut()
        .for_each(|e| e.index_len = u64::MAX / 2);
    client
        .put(&store.manifest_key(), &m.encode(), false)
        .unwrap();
    let e = load().unwrap_err();
    assert!(error_text(&e).contains("more than a disk of"), "{e}");

    // A manifest that is not one.
    client
        .put(&store.manifest_key(), b"not a manifest", false)
        .unwrap();
    let e = load().unwrap_err();
    assert!(error_text(&e).contains("manifest is invalid"), "{e}");
    client
        .put(&store.manifest_key(), &manifest.encode(), false)
        .unwrap();
    assert_eq!(Manifest::decode(&manifest.encode()).unwrap(), manifest);
    load().unwrap();
}

#[test]
fn qcowx_nbd_serves_a_fork_of_a_remote_base() {
    let _up = server_up();
    let dir = tempdir();
    let url = store_url("nbd");
    let (golden_path, store) = golden(dir.path(), &url, 8 * MIB);
    let expected = snapshot_bytes(&golden_path, "s2");
    let fork_path = dir.path().join("fork.qcow2");
    fork_of(&fork_path, &store, "s2", 64 * MIB).close().unwrap();
    let server = QcowxNbd::in_dir(dir.path(), &fork_path, &[]);
    let raw = dir.path().join("read.raw");
    run_ok(
        qemu_img()
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(server.uri("default"))
            .arg(&raw),
    );
    let got = std::fs::read(&raw).unwrap();
    assert!(got == expected, "the export reads other bytes than s2");
    server.stop();
}

#[test]
fn a_stream_larger_than_a_part_is_uploaded_in_parts_and_pulled_back() {
    let _up = server_up();
    let dir = tempdir();
    let url = store_url("parts");
    let path = dir.path().join("big.qcow2");
    let img = Arc::new(Image::create(&path, &CreateOptions::new(16 * MIB)).unwrap());
    // Random data does not compress: a stream of about 12 MiB, three 5 MiB parts.
    img.write_at(&pattern(7, 12 * MIB as usize), MIB).unwrap();
    img.snapshot(DEFAULT_VDI, "big").unwrap();
    let mut cfg = config();
    cfg.part_bytes = 5 * MIB;
    let store = Store::open(&url, &cfg).unwrap();
    store.client().create_bucket().unwrap();
    let before = store.client().requests();
    let r = remote::push(&img, "big", None, &store).unwrap();
    assert!(r.entry.stream_len > 10 * MIB, "{}", r.entry.stream_len);
    // manifest GET, create, 3 parts, complete, index PUT, manifest PUT.
    assert_eq!(store.client().requests() - before, 8);
    Arc::try_unwrap(img).unwrap().close().unwrap();
    let listed = objects(&store);
    let obj = listed
        .iter()
        .find(|(k, _, _)| k.ends_with(".qxs"))
        .expect("stream object");
    assert_eq!(obj.1, r.entry.stream_len);
    assert!(obj.2.ends_with("-3"), "a multipart etag: {}", obj.2);
    // No spool file is left beside the image.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");

    let copy = dir.path().join("copy.qcow2");
    remote::pull(&store, &copy, Some("big")).unwrap();
    assert!(snapshot_bytes(&copy, "big") == snapshot_bytes(&path, "big"));
    assert_qemu_check_clean(&copy);
}
