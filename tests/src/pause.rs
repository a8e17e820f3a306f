//! A pause point in a storage: one chosen thread stops on a chosen read until the test
//! releases it.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use qcowx_core::storage::{Access, Storage, Watched};

/// A pause point in a storage: it stops one chosen thread on its first read of a
/// chosen length, until the test releases it — a way to run other code
/// deterministically while, say, `gc` is half-way through counting.
#[derive(Debug, Default)]
pub struct Pause {
    state: Mutex<PauseState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct PauseState {
    /// The thread to stop and the read length that stops it.
    armed: Option<(ThreadId, usize)>,
    paused: bool,
    released: bool,
    finished: bool,
}

/// Where the stopped thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Stopped in the read, waiting for [`Pause::release`].
    Paused,
    /// It finished ([`Pause::finish`]) without making such a read.
    Finished,
}

impl Pause {
    /// `inner` behind a pause point: the point, and the storage to give the image.
    pub fn new(inner: Arc<dyn Storage>) -> (Arc<Pause>, Arc<dyn Storage>) {
        let pause = Arc::new(Pause::default());
        let p = Arc::clone(&pause);
        let storage = Watched::new(inner, move |a| {
            if let Access::Read { len, .. } = a {
                p.maybe_stop(len);
            }
            Ok(())
        });
        (pause, Arc::new(storage))
    }

    /// Forgets the previous round; call before starting the thread that will
    /// [`arm`](Pause::arm), so that [`wait`](Pause::wait) cannot see an old round.
    pub fn reset(&self) {
        *self.state.lock().unwrap() = PauseState::default();
    }

    /// Stops the calling thread at its next read of `len` bytes.
    pub fn arm(&self, len: usize) {
        self.state.lock().unwrap().armed = Some((std::thread::current().id(), len));
    }

    /// Called by the armed thread when its work is done (paused or not).
    pub fn finish(&self) {
        let mut s = self.state.lock().unwrap();
        s.finished = true;
        s.armed = None;
        self.cv.notify_all();
    }

    /// Waits (at most 30 s, then panics) until the armed thread is stopped or done.
    pub fn wait(&self) -> Stopped {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut s = self.state.lock().unwrap();
        loop {
            if s.paused && !s.released {
                return Stopped::Paused;
            }
            if s.finished {
                return Stopped::Finished;
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect("the armed thread neither paused nor finished within 30 s");
            s = self.cv.wait_timeout(s, left).unwrap().0;
        }
    }

    /// Lets the stopped thread go on.
    pub fn release(&self) {
        let mut s = self.state.lock().unwrap();
        s.released = true;
        self.cv.notify_all();
    }

    fn maybe_stop(&self, len: usize) {
        let mut s = self.state.lock().unwrap();
        if s.armed != Some((std::thread::current().id(), len)) || s.paused {
            return;
        }
        s.paused = true;
        self.cv.notify_all();
        while !s.released {
            s = self.cv.wait(s).unwrap();
        }
    }
}
