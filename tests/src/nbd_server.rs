//! A `qcowx-nbd` process serving an image, stopped when dropped.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::{command_line, qcowx_cli_bin, qcowx_nbd_bin, send_signal, wait_deadline};

/// How long [`QcowxNbd`] waits for a server to start listening or to exit.
pub const SERVER_WAIT: Duration = Duration::from_secs(60);

/// A running `qcowx-nbd` serving one image on a Unix socket, with its control socket
/// in a runtime directory of the test's choosing (`QCOWX_RUNTIME_DIR`).
///
/// Dropping it kills the server (SIGKILL) if it is still running, so a failing test
/// leaves no server behind.
#[derive(Debug)]
pub struct QcowxNbd {
    child: Option<Child>,
    sock: PathBuf,
    runtime: PathBuf,
    control: Option<PathBuf>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
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
        let line = command_line(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("piped stderr");
        let sink = std::sync::Arc::clone(&stderr);
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
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                // After the banner nobody listens: keep reading so the server never
                // blocks on a full pipe.
                let _ = tx.send(l);
            }
        });
        let mut server = QcowxNbd {
            child: Some(child),
            sock: sock.to_path_buf(),
            runtime: runtime.to_path_buf(),
            control: None,
            stderr,
        };
        let deadline = Instant::now() + SERVER_WAIT;
        let mut banner = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    banner.push_str(&l);
                    banner.push('\n');
                    if let Some(p) = l.strip_prefix("control socket ") {
                        server.control = Some(PathBuf::from(p));
                    } else if l.trim_start().starts_with("nbdinfo --list") {
                        break; // the last line of the banner
                    }
                }
                Err(_) => panic!(
                    "`{line}` did not start listening within {SERVER_WAIT:?}\nstdout:\n{banner}\nstderr:\n{}",
                    server.stderr()
                ),
            }
        }
        server
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    /// The `nbd+unix://` URI of `export`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// The control socket the server announced, if any.
    pub fn control(&self) -> Option<&Path> {
        self.control.as_deref()
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
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
        assert!(
            !self.sock.exists(),
            "{} left behind after shutdown",
            self.sock.display()
        );
        if let Some(c) = &self.control {
            assert!(!c.exists(), "{} left behind after shutdown", c.display());
        }
    }

    /// Kills the server with SIGKILL (a crash) and reaps it.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
