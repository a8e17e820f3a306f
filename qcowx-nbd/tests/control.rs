//! The control socket in process: a server on a real image file, its control socket,
//! and the library client (`qcowx_nbd::control::{request, request_at}`) that `qcowx`
//! uses when the image is locked. Live snapshots under real NBD clients are in the
//! workspace's `tests/nbd_control.rs`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qcowx_core::storage::lock::LockHolder;
use qcowx_core::{CreateOptions, Image, OpenOptions, RootKind};
use qcowx_nbd::control::{self, ControlError, DeleteTarget, Request, Response};
use qcowx_nbd::exports::{ExportPlan, Exports};
use qcowx_nbd::server::{Server, ServerConfig};
use qcowx_nbd::Settings;
use qcowx_tests::nbd_wire::{unix_config, InProcessServer};
use serde_json::{json, Value};

struct TestServer {
    server: InProcessServer,
    exports: Arc<Exports>,
    control: PathBuf,
}

impl TestServer {
    /// Serves `image` (opened writable unless `read_only`) with its control socket at
    /// `control`.
    fn start(image: &Path, control: PathBuf, read_only: bool) -> TestServer {
        TestServer::start_with(image, control, read_only, Settings::default())
    }

    /// [`TestServer::start`] with `settings`.
    fn start_with(
        image: &Path,
        control: PathBuf,
        read_only: bool,
        settings: Settings,
    ) -> TestServer {
        let img = OpenOptions::new()
            .write(!read_only)
            .open(image)
            .expect("open image");
        let exports = Arc::new(
            Exports::new(
                Arc::new(img),
                ExportPlan::Auto {
                    main_name: "default".into(),
                    main_description: None,
                },
                read_only,
            )
            .expect("exports"),
        );
        let nbd = image.with_extension("nbd.sock");
        let server = Server::bind(
            Arc::clone(&exports),
            ServerConfig {
                control: Some(control.clone()),
                ..unix_config(nbd, settings)
            },
        )
        .expect("bind");
        assert_eq!(server.control_path(), Some(control.as_path()));
        TestServer {
            server: InProcessServer::run(server),
            exports,
            control,
        }
    }

    fn export_names(&self) -> Vec<String> {
        self.exports
            .list()
            .expect("exports")
            .into_iter()
            .map(|e| e.name)
            .collect()
    }

    fn stop(self) {
        self.server.stop();
        assert!(!self.control.exists(), "control socket left behind");
    }
}

fn new_image(path: &Path) {
    let img = Image::create(path, &CreateOptions::new(8 << 20)).expect("create");
    img.write_at(&[0x11; 65536], 0).expect("write");
    img.close().expect("close");
}

fn refused(r: Result<Response, ControlError>) -> (String, String) {
    match r {
        Err(ControlError::Refused { message, kind }) => (kind, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn control_requests_run_on_the_served_image_and_new_roots_are_exports_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    new_image(&img);
    let ctl = dir.path().join("ctl.sock");
    let srv = TestServer::start(&img, ctl.clone(), false);
    // What the CLI sees: the image is locked.
    let e = Image::open_rw(&img).expect_err("the served image must be locked");
    assert!(matches!(e, qcowx_core::Error::Locked { .. }), "{e}");
    // The server runs in this process: the error says so, not "another process".
    assert_eq!(e.lock_holder(), Some(&LockHolder::ThisProcess), "{e}");
    assert!(
        e.to_string().contains("another handle in this process"),
        "{e}"
    );

    let at = |req: Request| control::request_at(&ctl, Some(&img), &req);
    let r = at(Request::Snapshot {
        vdi: "default".into(),
        name: "s1".into(),
    })
    .expect("snapshot");
    let Response::Root { root, export } = r else {
        panic!("{r:?}")
    };
    assert_eq!((root.kind, root.name.as_str()), (RootKind::Snapshot, "s1"));
    assert_eq!(export.as_deref(), Some("default@s1"));
    assert!(srv.export_names().contains(&"default@s1".to_string()));

    let Response::Root { root, export } = at(Request::Fork {
        snapshot: "s1".into(),
        name: "web".into(),
    })
    .expect("fork") else {
        panic!("fork answer")
    };
    assert_eq!(root.kind, RootKind::Vdi);
    assert_eq!(root.parent.as_deref(), Some("s1"));
    assert_eq!(export.as_deref(), Some("web"));

    // The served image changes under the server; diff sees it.
    let image = Arc::clone(srv.exports.image());
    image.write_at(&[0x22; 4096], 1 << 20).unwrap();
    let Response::Ranges(ranges) = at(Request::Diff {
        from: "s1".into(),
        to: "default".into(),
    })
    .expect("diff") else {
        panic!("diff answer")
    };
    assert_eq!(ranges.len(), 1);
    assert_eq!((ranges[0].offset, ranges[0].length), (1 << 20, 65536));

    let Response::Roots(roots) = at(Request::List).expect("list") else {
        panic!("list answer")
    };
    let names: Vec<&str> = roots.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["default", "s1", "web"]);
    assert_eq!(
        roots,
        image.list().unwrap(),
        "list over the socket = Image::list"
    );

    // Revert web (written since) to s1.
    image
        .open_root("web")
        .unwrap()
        .write_at(&[0x33; 512], 0)
        .unwrap();
    assert_eq!(
        at(Request::Revert {
            vdi: "web".into(),
            snapshot: "s1".into()
        })
        .expect("revert"),
        Response::Done
    );
    let mut b = [0u8; 512];
    image.open_root("web").unwrap().read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x11; 512]);

    // Errors carry the library's message and a kind; nothing changes.
    let (kind, msg) = refused(at(Request::Snapshot {
        vdi: "nope".into(),
        name: "x".into(),
    }));
    assert_eq!(kind, "not-found");
    assert!(msg.contains("nope"), "{msg}");
    let (kind, msg) = refused(at(Request::Snapshot {
        vdi: "default".into(),
        name: "web".into(),
    }));
    assert_eq!(kind, "already-exists");
    assert!(msg.contains("already exists"), "{msg}");
    let (kind, _) = refused(at(Request::Delete(DeleteTarget::Vdi("default".into()))));
    assert_eq!(kind, "invalid-argument");
    let (kind, _) = refused(at(Request::Fork {
        snapshot: "s1".into(),
        name: "bad/name".into(),
    }));
    assert_eq!(kind, "invalid-argument");
    let (kind, _) = refused(at(Request::Delete(DeleteTarget::Snapshot("web".into()))));
    assert_eq!(kind, "not-found", "web is a VDI, not a snapshot");
    assert_eq!(
        image.list().unwrap().len(),
        3,
        "failed requests changed nothing"
    );

    // A request naming another file is refused.
    let other = dir.path().join("other.qcow2");
    new_image(&other);
    let (kind, msg) = refused(control::request_at(&ctl, Some(&other), &Request::List));
    assert_eq!(kind, "wrong-image");
    assert!(msg.contains("other.qcow2"), "{msg}");

    // Delete, then gc reclaims.
    assert_eq!(
        at(Request::Delete(DeleteTarget::Vdi("web".into()))).expect("delete VDI"),
        Response::Done
    );
    assert_eq!(
        at(Request::Delete(DeleteTarget::Snapshot("s1".into()))).expect("delete snapshot"),
        Response::Done
    );
    assert_eq!(srv.export_names(), vec!["default"]);
    let Response::Gc(report) = at(Request::Gc).expect("gc") else {
        panic!("gc answer")
    };
    assert!(report.roots_removed >= 2, "{report:?}");
    srv.stop();

    let image = Image::open(&img).expect("open after the server");
    assert_eq!(image.list().unwrap().len(), 1);
    let report = image.check().expect("check");
    assert_eq!(report.exit_code(), 0, "{report:?}");
    let mut b = [0u8; 4096];
    image.read_at(&mut b, 1 << 20).unwrap();
    assert_eq!(b, [0x22; 4096]);
}

/// Sends raw lines on one connection; returns the answers.
fn raw(ctl: &Path, lines: &[&[u8]]) -> Vec<Value> {
    let s = UnixStream::connect(ctl).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    for l in lines {
        w.write_all(l).unwrap();
        w.write_all(b"\n").unwrap();
        let mut a = String::new();
        r.read_line(&mut a).expect("answer");
        out.push(serde_json::from_str(&a).unwrap_or_else(|e| panic!("{a:?}: {e}")));
    }
    out
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    new_image(&img);
    let ctl = dir.path().join("ctl.sock");
    let srv = TestServer::start(&img, ctl.clone(), false);
    let answers = raw(
        &ctl,
        &[
            b"this is not json",
            b"[1, 2, 3]",
            b"{\"op\": \"explode\"}",
            b"{\"op\": \"snapshot\"}",
            b"{\"op\": \"delete\", \"vdi\": \"a\", \"snapshot\": \"b\"}",
            b"{\"op\": \"gc\", \"now\": true}",
            b"\xff\xfe{}",
            b"",
            b"{\"op\": \"list\"}",
        ],
    );
    for a in &answers[..8] {
        assert_eq!(a["ok"], false, "{a}");
        assert_eq!(a["kind"], "invalid-request", "{a}");
        assert!(a["error"].as_str().is_some_and(|e| !e.is_empty()), "{a}");
    }
    assert!(answers[2]["error"].as_str().unwrap().contains("explode"));
    assert!(answers[3]["error"].as_str().unwrap().contains("name"));
    assert_eq!(answers[8]["ok"], true);
    assert_eq!(answers[8]["roots"][0]["name"], "default");

    // A line longer than the limit is answered, then the connection closes.
    let mut s = UnixStream::connect(&ctl).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let long = vec![b'x'; control::MAX_LINE + 10];
    let _ = s.write_all(&long);
    let mut r = BufReader::new(s);
    let mut a = String::new();
    r.read_line(&mut a).unwrap();
    let v: Value = serde_json::from_str(&a).unwrap();
    assert_eq!(v["kind"], "invalid-request");
    a.clear();
    assert_eq!(r.read_line(&mut a).unwrap_or(0), 0, "connection closed");

    // The server is unaffected: a snapshot still works, on a fresh connection.
    let a = raw(
        &ctl,
        &[json!({"op": "snapshot", "name": "after"})
            .to_string()
            .as_bytes()],
    );
    assert_eq!(a[0]["ok"], true, "{}", a[0]);
    assert_eq!(a[0]["export"], "default@after");
    srv.stop();
}

#[test]
fn a_read_only_server_refuses_changes_but_lists() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    new_image(&img);
    let ctl = dir.path().join("ctl.sock");
    let srv = TestServer::start(&img, ctl.clone(), true);
    let (kind, msg) = refused(control::request_at(
        &ctl,
        Some(&img),
        &Request::Snapshot {
            vdi: "default".into(),
            name: "s".into(),
        },
    ));
    assert_eq!(kind, "read-only", "{msg}");
    assert!(matches!(
        control::request_at(&ctl, None, &Request::List),
        Ok(Response::Roots(r)) if r.len() == 1
    ));
    srv.stop();
}

#[test]
fn request_finds_the_server_from_the_image_path_alone() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    new_image(&img);
    // Nobody serves it yet.
    assert!(matches!(
        control::request(&img, &Request::List),
        Err(ControlError::NoServer { .. })
    ));
    // Where a server puts its socket by default (this creates the directory).
    let ctl = control::default_socket_path(&img).expect("default path");
    assert!(control::socket_candidates(&img).unwrap().contains(&ctl));
    let srv = TestServer::start(&img, ctl.clone(), false);
    assert_eq!(control::socket_path_for(&img).unwrap(), ctl);
    // Through a symbolic link to the image: the same file, the same server.
    let link = dir.path().join("link.qcow2");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let r = control::request(
        &link,
        &Request::Snapshot {
            vdi: "default".into(),
            name: "via-link".into(),
        },
    )
    .expect("snapshot through the discovered socket");
    assert!(matches!(r, Response::Root { ref root, .. } if root.name == "via-link"));
    let meta = std::fs::metadata(&ctl).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    srv.stop();
    assert!(matches!(
        control::request(&img, &Request::List),
        Err(ControlError::NoServer { .. })
    ));

    // A socket file left by a server that died is passed over, and replaced by the
    // next server.
    drop(UnixListener::bind(&ctl).unwrap());
    assert!(ctl.exists());
    assert!(matches!(
        control::request(&img, &Request::List),
        Err(ControlError::NoServer { .. })
    ));
    let srv = TestServer::start(&img, ctl.clone(), false);
    let Response::Roots(roots) = control::request(&img, &Request::List).unwrap() else {
        panic!("list answer")
    };
    assert!(roots.iter().any(|r| r.name == "via-link"));
    srv.stop();
}

/// A control connection that says nothing is closed at `Settings::control_idle_timeout`,
/// and gives its slot back: with every slot taken by silent connections, a request
/// is answered (not `busy`) once they have timed out.
#[test]
fn silent_control_connections_are_closed_at_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    new_image(&img);
    let ctl = dir.path().join("ctl.sock");
    let settings = Settings {
        control_idle_timeout: Duration::from_millis(300),
        ..Settings::default()
    };
    let srv = TestServer::start_with(&img, ctl.clone(), false, settings);
    let t0 = Instant::now();
    let silent: Vec<UnixStream> = (0..control::MAX_CONNECTIONS)
        .map(|_| {
            let s = UnixStream::connect(&ctl).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
        .collect();
    for mut s in silent {
        let mut b = [0u8; 64];
        assert_eq!(s.read(&mut b).expect("closed, not timed out"), 0);
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(8),
        "{took:?}"
    );
    let a = raw(&ctl, &[b"{\"op\": \"list\"}"]);
    assert_eq!(a[0]["ok"], true, "{}", a[0]);
    srv.stop();
}
