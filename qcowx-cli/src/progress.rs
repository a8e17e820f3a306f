//! Progress bars on long work, shown only when stderr is a terminal (never in pipes,
//! with `-q`, or when the output is JSON).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether progress may be drawn: stderr is a terminal and the user did not ask for
/// quiet or machine-readable output.
pub fn enabled(quiet: bool, json: bool) -> bool {
    !quiet && !json && std::io::stderr().is_terminal()
}

/// A byte-count progress bar (hidden when `show` is false).
pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    /// A bar labelled `what`, drawn on stderr when `show`.
    pub fn new(show: bool, what: &str) -> Bar {
        if !show {
            return Bar { bar: None };
        }
        // Hidden until the first report gives it a length.
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(what.to_string());
        Bar { bar: Some(bar) }
    }

    /// Records `done` of `total` bytes.
    pub fn update(&self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            if b.length() != Some(total) {
                b.set_length(total);
            }
            b.set_position(done.min(total));
            if b.is_hidden() {
                b.set_draw_target(ProgressDrawTarget::stderr());
            }
        }
    }

    /// A callback for the library's progress reports.
    pub fn callback(&self) -> impl FnMut(u64, u64) + '_ {
        move |done, total| self.update(done, total)
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A spinner for work that reports no progress (gc, check); it appears only when the
/// work takes longer than half a second.
pub struct Spinner {
    bar: Option<ProgressBar>,
    done: Arc<AtomicBool>,
}

impl Spinner {
    /// A spinner labelled `what`, drawn on stderr when `show`.
    pub fn start(show: bool, what: &str) -> Spinner {
        let done = Arc::new(AtomicBool::new(false));
        if !show {
            return Spinner { bar: None, done };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(what.to_string());
        let (b, d) = (bar.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            if !d.load(Ordering::SeqCst) {
                b.set_draw_target(ProgressDrawTarget::stderr());
                b.enable_steady_tick(Duration::from_millis(120));
            }
        });
        Spinner {
            bar: Some(bar),
            done,
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
