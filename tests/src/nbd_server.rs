//! A `qcowx-nbd` process serving an image, stopped when dropped.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::{
    command_line, qcowx_cli_bin, qcowx_nbd_bin, send_signal, tempdir, wait_deadline, TempDir,
};

/// How long [`QcowxNbd`] waits for a server to start listening or to exit.
pub const SERVER_WAIT: Duration = Duration::from_secs(60);

/// Where [`QcowxNbd::listen`] makes the server listen.
#[derive(Debug, Clone, Copy)]
pub enum Listen<'a> {
    /// A Unix socket at this path (`-k PATH`).
    Unix(&'a Path),
    /// A free TCP port on 127.0.0.1 (`-b 127.0.0.1 -p 0`).
    Tcp,
}

/// A running `qcowx-nbd` serving an image on a Unix socket or a TCP port, with its
/// control socket in a runtime directory (`QCOWX_RUNTIME_DIR`): one of the test's
/// choosing, or one temporary directory for the whole test process.
///
/// Dropping it kills the server (SIGKILL) if it is still running, so a failing test
/// leaves no server behind.
#[derive(Debug)]
pub struct QcowxNbd {
    child: Option<Child>,
    sock: Option<PathBuf>,
    tcp: Option<String>,
    runtime: PathBuf,
    control: Option<PathBuf>,
    banner: String,
    stderr: Arc<Mutex<String>>,
}

impl QcowxNbd {
    /// Starts `qcowx-nbd -k SOCK ARGS... IMAGE` with `QCOWX_RUNTIME_DIR=RUNTIME` and
    /// waits (up to [`SERVER_WAIT`]) until its banner says it listens.
    pub fn start(image: &Path, sock: &Path, runtime: &Path, args: &[&str]) -> QcowxNbd {
        let mut cmd = Command::new(qcowx_nbd_bin());
        cmd.arg("-k")
            .arg(sock)
            .args(args)
            .arg(image)
            .env("QCOWX_RUNTIME_DIR", runtime);
        let mut server = QcowxNbd::spawn(cmd);
        server.sock.get_or_insert_with(|| sock.to_path_buf());
        server
    }

    /// [`QcowxNbd::start`] with the socket `DIR/nbd.sock` and the runtime directory
    /// `DIR/run` (made if missing).
    pub fn in_dir(dir: &Path, image: &Path, args: &[&str]) -> QcowxNbd {
        let runtime = dir.join("run");
        std::fs::create_dir_all(&runtime).expect("runtime directory");
        QcowxNbd::start(image, &dir.join("nbd.sock"), &runtime, args)
    }

    /// Starts `qcowx-nbd ARGS... IMAGE` listening as `listen` says, with the test
    /// process's runtime directory, and waits (up to [`SERVER_WAIT`]) until it listens.
    pub fn listen(image: &Path, listen: Listen<'_>, args: &[&str]) -> QcowxNbd {
        let mut cmd = Command::new(qcowx_nbd_bin());
        match listen {
            Listen::Unix(p) => {
                cmd.arg("-k").arg(p);
            }
            Listen::Tcp => {
                cmd.args(["-b", "127.0.0.1", "-p", "0"]);
            }
        }
        cmd.args(args).arg(image);
        QcowxNbd::spawn(cmd)
    }

    /// Starts `cmd` (a `qcowx-nbd` command line, or one that runs it) and waits (up to
    /// [`SERVER_WAIT`]) for the end of the server's banner, reading from it where the
    /// server listens and its control socket. Without `QCOWX_RUNTIME_DIR` in `cmd`'s
    /// environment, control sockets go to a temporary directory of the test process,
    /// not `/run/qcowx`.
    pub fn spawn(mut cmd: Command) -> QcowxNbd {
        static RUNTIME: OnceLock<TempDir> = OnceLock::new();
        let runtime = match cmd.get_envs().find(|(k, _)| *k == "QCOWX_RUNTIME_DIR") {
            Some((_, Some(dir))) => PathBuf::from(dir),
            _ => {
                let dir = RUNTIME.get_or_init(tempdir).path().to_path_buf();
                cmd.env("QCOWX_RUNTIME_DIR", &dir);
                dir
            }
        };
        let line = command_line(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                // After the banner nobody listens: keep reading so the server never
                // blocks on a full pipe.
                let _ = tx.send(l);
            }
        });
        let mut server = QcowxNbd {
            child: Some(child),
            sock: None,
            tcp: None,
            runtime,
            control: None,
            banner: String::new(),
            stderr,
        };
        let deadline = Instant::now() + SERVER_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    server.banner.push_str(&l);
                    server.banner.push('\n');
                    if let Some(p) = l.strip_prefix("listening on unix ") {
                        server.sock = Some(PathBuf::from(p));
                    } else if let Some(a) = l.strip_prefix("listening on tcp ") {
                        server.tcp = Some(a.to_string());
                    } else if let Some(p) = l.strip_prefix("control socket ") {
                        server.control = Some(PathBuf::from(p));
                    } else if l.trim_start().starts_with("nbdinfo --list") {
                        break; // the last line of the banner
                    }
                }
                Err(_) => panic!(
                    "`{line}` did not start listening within {SERVER_WAIT:?}\nstdout:\n{}\nstderr:\n{}",
                    server.banner,
                    server.stderr()
                ),
            }
        }
        server
    }

    /// What the server printed on stdout when it started.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    /// The NBD URI of `export`: `nbd+unix://` on a Unix socket, else `nbd://`.
    pub fn uri(&self, export: &str) -> String {
        match (&self.sock, &self.tcp) {
            (Some(s), _) => format!("nbd+unix:///{export}?socket={}", s.display()),
            (None, Some(a)) => format!("nbd://{a}/{export}"),
            (None, None) => panic!("the server announced no address:\n{}", self.banner),
        }
    }

    /// The Unix socket the server listens on, if any.
    pub fn sock(&self) -> Option<&Path> {
        self.sock.as_deref()
    }

    /// The TCP address (`HOST:PORT`) the server announced, if any.
    pub fn tcp(&self) -> Option<&str> {
        self.tcp.as_deref()
    }

    /// The control socket the server announced, if any.
    pub fn control(&self) -> Option<&Path> {
        self.control.as_deref()
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits (up to [`SERVER_WAIT`]) until the server's stderr contains `needle`, and
    /// says whether it did. Stderr is read by its own thread, so a line written before
    /// the banner may still be in flight when [`QcowxNbd::in_dir`] returns.
    pub fn stderr_shows(&self, needle: &str) -> bool {
        let deadline = Instant::now() + SERVER_WAIT;
        loop {
            if self.stderr().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A `qcowx` command (no arguments yet) that finds this server's control socket:
    /// `qcowx snapshot|fork|delete|revert|gc|list` on the served image forward to it.
    pub fn qcowx(&self) -> Command {
        let mut cmd = Command::new(qcowx_cli_bin());
        cmd.env("QCOWX_RUNTIME_DIR", &self.runtime);
        cmd
    }

    /// Waits (up to [`SERVER_WAIT`]) for the server to exit, after a signal; kills it
    /// and panics if it does not.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the server is running");
        match wait_deadline(&mut child, SERVER_WAIT) {
            Some(status) => status,
            None => panic!(
                "qcowx-nbd did not exit within {SERVER_WAIT:?}\nstderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Stops the server with SIGTERM and asserts a clean exit (status 0, sockets
    /// removed): the image is closed, with exact refcounts.
    pub fn stop(mut self) {
        send_signal(self.pid(), "TERM");
        let status = self.wait_exit();
        assert!(
            status.success(),
            "qcowx-nbd exited with {status} after SIGTERM\nstderr:\n{}",
            self.stderr()
        );
        if let Some(s) = &self.sock {
            assert!(!s.exists(), "{} left behind after shutdown", s.display());
        }
        if let Some(c) = &self.control {
            assert!(!c.exists(), "{} left behind after shutdown", c.display());
        }
    }

    /// Kills the server with SIGKILL (a crash) and reaps it.
    pub fn kill9(mut self) {
        let mut c = self.child.take().expect("the server is running");
        c.kill().expect("kill -9");
        c.wait().expect("wait");
    }
}

impl Drop for QcowxNbd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
