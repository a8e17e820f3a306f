//! A real S3 server on loopback for the object-store tests: a one-node Ceph cluster
//! (a monitor, one memstore OSD, radosgw) in a fresh temporary folder, on free ports,
//! one per test process ([`s3_cluster`]), stopped rgw → osd → mon when the process
//! exits. Missing binaries fail the test naming the packages (scripts/test installs
//! them); a start that fails keeps the daemons' logs and prints where they are.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::process::{command_line, describe, drain, require_tool, wait_deadline};

/// The packages that hold the cluster's binaries.
pub const CEPH_PACKAGES: &str = "ceph-mon ceph-osd radosgw ceph-common";
/// The access key of the cluster's S3 user.
pub const S3_ACCESS_KEY: &str = "QCOWXTESTACCESSKEY01";
/// The secret key of the cluster's S3 user.
pub const S3_SECRET_KEY: &str = "qcowxtestsecretkey0000000000000000000001";

/// How long the whole start may take before it is a failure.
const START_LIMIT: Duration = Duration::from_secs(90);
/// How long each daemon gets to stop on SIGTERM before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(15);

/// A running one-node cluster with radosgw.
#[derive(Debug)]
pub struct S3Cluster {
    dir: PathBuf,
    conf: PathBuf,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The rgw port.
    pub port: u16,
    /// Daemons in start order (mon, osd, rgw).
    daemons: Mutex<Vec<(&'static str, Child)>>,
    /// How long the start took.
    pub started_in: Duration,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

fn uuid() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn conf_text(d: &Path, mon_port: u16, rgw_port: u16, fsid: &str) -> String {
    let d = d.display();
    format!(
        "[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
mon warn on insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
keyring = /dev/null
run dir = {d}/run
admin socket = {d}/run/$cluster-$name.asok
pid file = {d}/run/$cluster-$name.pid
log file = {d}/log/$cluster-$name.log
mon cluster log file = {d}/log/$cluster.$channel.log
crash dir = {d}/crash
ms bind msgr1 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
paxos propose interval = 0.05

[mon]
mon data = {d}/mon.$id

[osd]
osd data = {d}/osd.$id
osd objectstore = memstore
memstore device bytes = 2147483648

[client.rgw]
ms mon client mode = crc
rgw data = {d}/rgw
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw gc obj min wait = 0
rgw gc processor period = 10
"
    )
}

/// Runs a short cluster command with a time limit; `None` if it failed or hung.
fn try_run(cmd: &mut Command, limit: Duration) -> Option<String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().ok()?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_deadline(&mut child, limit);
    let out = out.join().unwrap_or_default();
    let _ = err.join();
    status
        .filter(ExitStatus::success)
        .map(|_| String::from_utf8_lossy(&out).into_owned())
}

/// Runs a cluster command that must succeed.
fn must_run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let line = command_line(cmd);
    cmd.stdin(Stdio::null());
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot run `{line}`: {e}"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_deadline(&mut child, Duration::from_secs(60))
        .ok_or_else(|| format!("{what}: `{line}` took over 60 s"))?;
    let output = std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    if !status.success() {
        return Err(format!("{what}: `{line}` failed: {}", describe(&output)));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether an HTTP GET of `/` on 127.0.0.1:`port` answers 200.
fn http_ok(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

impl S3Cluster {
    /// `prog -c CONF`: one of Ceph's programs, on this cluster.
    fn tool(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.arg("-c").arg(&self.conf);
        c
    }

    fn ceph(&self) -> Command {
        let mut c = self.tool("ceph");
        c.arg("--connect-timeout").arg("5");
        c
    }

    fn daemon(&self, what: &'static str, cmd: &mut Command) -> Result<(), String> {
        let line = command_line(cmd);
        let log = std::fs::File::create(self.dir.join("log").join(format!("{what}.out")))
            .map_err(|e| format!("{what}: log file: {e}"))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{what}: cannot start `{line}`: {e}"))?;
        self.daemons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((what, child));
        Ok(())
    }

    /// Polls `ready` until it holds, failing at once if daemon `what` exited.
    fn wait_ready(
        &self,
        what: &str,
        deadline: Instant,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), String> {
        loop {
            if ready() {
                return Ok(());
            }
            {
                let mut ds = self.daemons.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some((name, child)) = ds.iter_mut().find(|(n, _)| *n == what) {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!("{name} exited while starting ({status})"));
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!("{what} not ready within {START_LIMIT:?}"));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_once() -> Result<S3Cluster, (String, Option<Box<S3Cluster>>)> {
        let t0 = Instant::now();
        let deadline = t0 + START_LIMIT;
        let dir = tempfile::Builder::new()
            .prefix("qcowx-s3-")
            .tempdir()
            .map_err(|e| (format!("temp dir: {e}"), None))?
            .keep();
        for sub in ["run", "log", "crash", "mon.a", "osd.0", "rgw"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| (e.to_string(), None))?;
        }
        let (mon_port, port) = (free_port(), free_port());
        let fsid = uuid();
        let conf = dir.join("ceph.conf");
        std::fs::write(&conf, conf_text(&dir, mon_port, port, &fsid))
            .map_err(|e| (e.to_string(), None))?;
        let c = S3Cluster {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            dir: dir.clone(),
            conf: conf.clone(),
            daemons: Mutex::new(Vec::new()),
            started_in: Duration::ZERO,
        };
        match c.bring_up(mon_port, &fsid, deadline) {
            Ok(()) => Ok(S3Cluster {
                started_in: t0.elapsed(),
                ..c
            }),
            Err(e) => Err((e, Some(Box::new(c)))),
        }
    }

    fn bring_up(&self, mon_port: u16, fsid: &str, deadline: Instant) -> Result<(), String> {
        let monmap = self.dir.join("monmap");
        must_run(
            Command::new("monmaptool")
                .args(["--create", "--fsid", fsid, "--addv", "a"])
                .arg(format!("[v2:127.0.0.1:{mon_port}]"))
                .args(["--enable-all-features", "--set-min-mon-release", "pacific"])
                .arg(&monmap),
            "monmap",
        )?;
        must_run(
            self.tool("ceph-mon")
                .args(["-i", "a", "--mkfs", "--monmap"])
                .arg(&monmap),
            "mon mkfs",
        )?;
        self.daemon("mon", self.tool("ceph-mon").args(["-i", "a", "-f"]))?;
        self.wait_ready("mon", deadline, || {
            try_run(self.ceph().args(["mon", "stat"]), Duration::from_secs(10)).is_some()
        })?;
        let osd_uuid = uuid();
        let id = must_run(self.ceph().args(["osd", "new", &osd_uuid]), "osd new")?;
        let id = id.trim().to_string();
        must_run(
            self.tool("ceph-osd")
                .args(["-i", &id, "--mkfs", "--osd-uuid", &osd_uuid]),
            "osd mkfs",
        )?;
        self.daemon("osd", self.tool("ceph-osd").args(["-i", &id, "-f"]))?;
        self.wait_ready("osd", deadline, || {
            try_run(
                self.ceph().args(["osd", "dump", "-f", "json"]),
                Duration::from_secs(10),
            )
            .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
            .and_then(|v| {
                v["osds"]
                    .as_array()
                    .map(|a| a.iter().any(|o| o["up"].as_u64() == Some(1)))
            })
            .unwrap_or(false)
        })?;
        self.daemon("rgw", self.tool("radosgw").args(["-n", "client.rgw", "-f"]))?;
        self.wait_ready("rgw", deadline, || http_ok(self.port))?;
        must_run(
            self.tool("radosgw-admin")
                .args(["user", "create", "--uid=qcowx", "--display-name=qcowx"])
                .arg(format!("--access-key={S3_ACCESS_KEY}"))
                .arg(format!("--secret-key={S3_SECRET_KEY}")),
            "rgw user",
        )?;
        Ok(())
    }

    /// Starts a cluster (one retry of the whole start: the free-port probe races).
    /// Panics with the reason and the folder of the logs if it does not start.
    pub fn start() -> S3Cluster {
        for tool in [
            "monmaptool",
            "ceph-mon",
            "ceph-osd",
            "radosgw",
            "radosgw-admin",
        ] {
            require_tool(tool, CEPH_PACKAGES, &["--version"]);
        }
        require_tool("ceph", CEPH_PACKAGES, &["--version"]);
        let mut why = String::new();
        for _ in 0..2 {
            match S3Cluster::start_once() {
                Ok(c) => return c,
                Err((e, c)) => {
                    if let Some(c) = c {
                        c.stop();
                        why.push_str(&format!(
                            "{e} (logs kept in {})\n",
                            c.dir.join("log").display()
                        ));
                    } else {
                        why.push_str(&format!("{e}\n"));
                    }
                }
            }
        }
        panic!("the S3 test cluster did not start:\n{why}");
    }

    /// Stops the daemons, newest first (rgw, osd, mon): SIGTERM, then SIGKILL after
    /// 15 s. Returns whether each stopped on SIGTERM.
    pub fn stop(&self) -> bool {
        let mut ds = self.daemons.lock().unwrap_or_else(PoisonError::into_inner);
        let mut clean = true;
        while let Some((_, mut child)) = ds.pop() {
            if let Ok(None) = child.try_wait() {
                // The child is not reaped yet, so its pid is still ours.
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGTERM);
                }
                if wait_deadline(&mut child, STOP_LIMIT).is_none() {
                    clean = false;
                }
            }
        }
        clean
    }

    /// Stops the daemons and removes the folder (its logs too).
    pub fn stop_and_remove(&self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The folder of the daemons' logs.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// Whether radosgw is running.
    pub fn rgw_running(&self) -> bool {
        let mut ds = self.daemons.lock().unwrap_or_else(PoisonError::into_inner);
        ds.iter_mut()
            .any(|(n, c)| *n == "rgw" && matches!(c.try_wait(), Ok(None)))
    }

    /// Stops radosgw only (the store becomes unreachable); [`S3Cluster::start_rgw`]
    /// starts it again.
    pub fn stop_rgw(&self) {
        let mut ds = self.daemons.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = ds.iter().position(|(n, _)| *n == "rgw") {
            let (_, mut child) = ds.remove(i);
            if let Ok(None) = child.try_wait() {
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGTERM);
                }
                wait_deadline(&mut child, STOP_LIMIT);
            }
        }
    }

    /// Starts radosgw again after [`S3Cluster::stop_rgw`] and waits until it answers.
    pub fn start_rgw(&self) {
        self.daemon("rgw", self.tool("radosgw").args(["-n", "client.rgw", "-f"]))
            .unwrap_or_else(|e| panic!("{e}"));
        self.wait_ready("rgw", Instant::now() + START_LIMIT, || http_ok(self.port))
            .unwrap_or_else(|e| panic!("{e} (logs in {})", self.log_dir().display()));
    }

    /// Sets the environment the object-store code reads (endpoint and keys) for
    /// this process and the processes it starts.
    pub fn set_env(&self) {
        std::env::set_var("QCOWX_S3_ENDPOINT", &self.endpoint);
        std::env::set_var("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY);
        std::env::set_var("AWS_REGION", "us-east-1");
    }
}

static CLUSTER: OnceLock<S3Cluster> = OnceLock::new();
/// Whether a test of this process panicked: the cluster's logs are then kept.
static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn stop_at_exit() {
    if let Some(c) = CLUSTER.get() {
        if PANICKED.load(std::sync::atomic::Ordering::SeqCst) {
            c.stop();
            eprintln!(
                "a test failed: the S3 test cluster's logs are kept in {}",
                c.log_dir().display()
            );
        } else {
            c.stop_and_remove();
        }
    }
}

/// The cluster of this test process: started by the first caller, with the
/// environment set ([`S3Cluster::set_env`]); stopped when the process exits, its
/// folder removed unless a test panicked (then its logs are kept and named).
pub fn s3_cluster() -> &'static S3Cluster {
    CLUSTER.get_or_init(|| {
        let c = S3Cluster::start();
        c.set_env();
        eprintln!(
            "S3 test cluster at {} started in {:.1} s (logs in {})",
            c.endpoint,
            c.started_in.as_secs_f64(),
            c.log_dir().display()
        );
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, std::sync::atomic::Ordering::SeqCst);
            previous(info);
        }));
        unsafe {
            libc::atexit(stop_at_exit);
        }
        c
    })
}
