//! What every command shares: completions, man pages and `--help` from the same
//! definitions, `-q`, progress bars only on a terminal and never with JSON, and a
//! closed stdout as a clean exit.

use std::path::Path;
use std::process::{Command, Stdio};

use qcowx_tests::cli::*;
use serde_json::Value;

mod common;
use common::QCOWX;

// ---- completions, man, help --------------------------------------------------------

const COMMANDS: [&str; 21] = [
    "create",
    "info",
    "check",
    "export",
    "snapshot",
    "list",
    "fork",
    "delete",
    "revert",
    "gc",
    "diff",
    "io",
    "import",
    "tree",
    "map",
    "resize",
    "rename",
    "compare",
    "convert",
    "completions",
    "man",
];

#[test]
fn completions_and_man_pages_come_from_the_same_definitions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let text = stdout(&ok_quiet(d, &["completions", shell]));
        for cmd in ["import", "tree", "rename", "compare"] {
            assert!(text.contains(cmd), "{shell}: {cmd}");
        }
    }
    let bash = stdout(&ok_quiet(d, &["completions", "bash"]));
    assert!(bash.contains("complete -F _qcowx"), "{bash}");
    usage_error(d, &["completions", "tcsh"]);
    let page = stdout(&ok_quiet(d, &["man"]));
    assert!(
        page.contains(".TH qcowx 1"),
        "{}",
        &page[..200.min(page.len())]
    );
    for cmd in COMMANDS {
        assert!(
            page.contains(&format!("qcowx\\-{cmd}")) || page.contains(cmd),
            "{cmd}"
        );
    }
    let page = stdout(&ok_quiet(d, &["man", "import"]));
    assert!(page.contains(".TH qcowx-import 1"), "{page}");
    assert!(page.contains("qcowx import"), "{page}");
    assert!(
        page.contains("first free suffix"),
        "the naming rule is documented"
    );
    let err = usage_error(d, &["man", "frobnicate"]);
    assert!(err.contains("frobnicate"), "{err}");
    // Every command has a man page and help.
    for cmd in COMMANDS {
        let page = stdout(&ok_quiet(d, &["man", cmd]));
        assert!(page.contains(&format!(".TH qcowx-{cmd} 1")), "{cmd}");
        ok_quiet(d, &[cmd, "--help"]);
    }
    let help = stdout(&ok_quiet(d, &["--help"]));
    for cmd in COMMANDS {
        assert!(help.contains(cmd), "{cmd} not in --help");
    }
}

// ---- shared behaviour --------------------------------------------------------------

#[test]
fn quiet_suppresses_human_output_but_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["-q", "create", "q.qcow2", "1M"][..],
        &["create", "-q", "q2.qcow2", "1M"][..],
        &["-q", "info", "q.qcow2"][..],
        &["-q", "check", "q.qcow2"][..],
        &["-q", "snapshot", "q.qcow2", "s"][..],
        &["-q", "list", "q.qcow2"][..],
        &["-q", "tree", "q.qcow2"][..],
        &["-q", "map", "q.qcow2"][..],
        &["-q", "diff", "q.qcow2", "s", "default"][..],
        &["-q", "resize", "q.qcow2", "2M"][..],
        &["-q", "compare", "q.qcow2", "q.qcow2"][..],
        &["-q", "io", "q.qcow2", "-c", "write 0 512"][..],
        &["-q", "gc", "q.qcow2"][..],
    ] {
        let out = ok_quiet(d, args);
        assert!(out.stdout.is_empty(), "{args:?}: {}", stdout(&out));
    }
    assert!(d.join("q2.qcow2").exists());
    for args in [
        &["-q", "info", "--output=json", "q.qcow2"][..],
        &["-q", "list", "--output=json", "q.qcow2"][..],
        &["-q", "tree", "--output=json", "q.qcow2"][..],
        &["-q", "map", "--output=json", "q.qcow2"][..],
        &["-q", "gc", "--output=json", "q.qcow2"][..],
    ] {
        json(&ok_quiet(d, args));
    }
    assert!(stdout(&ok_quiet(d, &["-q", "tree", "--dot", "q.qcow2"])).starts_with("digraph"));
    // check -q still gives its exit code.
    let out = qcowx(d, &["-q", "check", "missing.qcow2"]);
    assert_code(&out, 1, "check -q missing");
    assert!(stderr(&out).contains("missing.qcow2"));
}

/// Runs `cmd` (a shell command line) with a terminal as stdout and stderr (`script`),
/// returning everything written to the terminal.
fn on_a_terminal(d: &Path, cmd: &str) -> String {
    let out = Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .current_dir(d)
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) runs commands on a terminal");
    assert_code(&out, 0, cmd);
    stdout(&out)
}

#[test]
fn progress_bars_only_on_a_terminal_and_never_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_ok(d, &["create", "-f", "qcow2", "p.qcow2", "16M"]);
    qemu_io(d, "qcow2", "p.qcow2", &["write -P 3 0 12M"]);
    qemu_ok(
        d,
        &[
            "create", "-f", "qcow2", "-b", "p.qcow2", "-F", "qcow2", "t.qcow2", "16M",
        ],
    );
    let q = QCOWX;
    let tty = on_a_terminal(d, &format!("{q} convert -O raw p.qcow2 a.raw"));
    assert!(tty.contains("converting"), "{tty:?}");
    assert!(tty.contains("MiB"), "{tty:?}");
    let tty = on_a_terminal(d, &format!("{q} export p.qcow2 b.raw"));
    assert!(tty.contains("exporting"), "{tty:?}");
    let tty = on_a_terminal(d, &format!("{q} import t.qcow2 i.qcow2"));
    assert!(tty.contains("importing"), "{tty:?}");
    assert!(tty.contains("Imported 2 layers"), "{tty:?}");
    // Not with -q, not with JSON: the terminal shows the JSON object alone.
    let tty = on_a_terminal(d, &format!("{q} -q convert -O raw p.qcow2 c.raw"));
    assert!(tty.is_empty(), "{tty:?}");
    let tty = on_a_terminal(d, &format!("{q} import --output=json t.qcow2 j.qcow2"));
    let v: Value = serde_json::from_str(&tty).unwrap_or_else(|e| panic!("{e}: {tty:?}"));
    assert_eq!(v["snapshots"], 1);
    // In a pipe nothing but the output (checked by `ok` for every command).
    let out = ok_quiet(d, &["convert", "-O", "raw", "p.qcow2", "d.raw"]);
    assert!(out.stdout.is_empty());
}

#[test]
fn a_closed_stdout_is_a_clean_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_quiet(d, &["create", "p.qcow2", "4M"]);
    ok_quiet(
        d,
        &[
            "io",
            "p.qcow2",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 1M 64k",
        ],
    );
    ok_quiet(d, &["snapshot", "p.qcow2", "s"]);
    for args in [
        &["tree", "p.qcow2"][..],
        &["tree", "--dot", "p.qcow2"][..],
        &["tree", "--output=json", "p.qcow2"][..],
        &["map", "p.qcow2"][..],
        &["map", "--output=json", "p.qcow2"][..],
        &["compare", "p.qcow2", "p.qcow2"][..],
        &["completions", "bash"][..],
        &["man"][..],
    ] {
        ok_into_closed_stdout(d, args);
    }
}
