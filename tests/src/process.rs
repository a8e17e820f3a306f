//! Running processes with a time limit and describing what they did.

use std::io::Read;
use std::ops::{Deref, DerefMut};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// How long [`run`] lets one QEMU tool invocation take before it is killed.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Makes sure `tool` runs (`tool PROBE...` exits 0), once per process; panics with
/// "TOOL not found: install PACKAGE (scripts/test does)" otherwise — a test never skips
/// because its oracle is missing.
pub fn require_tool(tool: &str, package: &str, probe: &[&str]) {
    let mut cmd = Command::new(tool);
    cmd.args(probe);
    require_command(tool, package, &mut cmd);
}

/// [`require_tool`] with the probe command given: runs `probe` (once per process for
/// each `tool`) and panics naming `package` unless it exits 0.
pub fn require_command(tool: &str, package: &str, probe: &mut Command) {
    static CHECKED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let checked = |t: &str| {
        CHECKED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|c| c == t)
    };
    if checked(tool) {
        return;
    }
    let ok = probe
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{tool} not found: install {package} (scripts/test does)"
    );
    CHECKED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(tool.to_string());
}

/// The command line of `cmd`, for messages.
pub fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push('\'');
            s.push_str(&a);
            s.push('\'');
        } else {
            s.push_str(&a);
        }
    }
    if let Some(dir) = cmd.get_current_dir() {
        s.push_str(&format!(" (in {})", dir.display()));
    }
    s
}

/// Describes a finished process: exit status, stdout and stderr.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// Runs `cmd` (stdin closed) and returns its output whatever its exit status.
///
/// Panics if it cannot be started or does not finish within [`TOOL_TIMEOUT`] (it is
/// killed then).
pub fn run(cmd: &mut Command) -> Output {
    run_timeout(cmd, TOOL_TIMEOUT)
}

/// [`run`] with an explicit time limit.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let line = command_line(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{line}`: {e}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_deadline(&mut child, timeout)
        .unwrap_or_else(|| panic!("`{line}` did not finish within {timeout:?}; killed it"));
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

pub(crate) fn drain<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut v);
        }
        v
    })
}

/// Waits for `child` until `timeout`; kills it and returns `None` if it is still running.
pub(crate) fn wait_deadline(
    child: &mut Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for process {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    }
}

/// Sends signal `sig` (a name such as `KILL` or `TERM`) to process `pid` with
/// `kill(1)`; panics if `kill` fails.
pub fn send_signal(pid: u32, sig: &str) {
    let out = run(Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string()));
    assert!(
        out.status.success(),
        "kill -{sig} {pid}: {}",
        describe(&out)
    );
}

/// A child process that is killed (and reaped) when dropped if it still runs, so a
/// failing test leaves no process behind.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A child process with piped stdin and stdout, and a thread collecting its stderr.
#[derive(Debug)]
pub struct Piped {
    /// The process, killed when dropped.
    pub child: KillOnDrop,
    /// Its stdin.
    pub stdin: Option<ChildStdin>,
    /// Its stdout.
    pub stdout: ChildStdout,
    /// Everything it wrote to stderr so far.
    pub stderr: Arc<Mutex<String>>,
}

/// Starts `cmd` with piped stdin, stdout and stderr, and a thread that collects its
/// stderr; panics with `what` if it cannot be started.
pub fn spawn_piped(cmd: &mut Command, what: &str) -> Piped {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(what);
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&stderr);
    thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        sink.lock().unwrap().push_str(&s);
    });
    Piped {
        child: KillOnDrop(child),
        stdin,
        stdout,
        stderr,
    }
}
