//! Progress of long operations (verify, repair, rebuild, merge, remove, copy), and stopping
//! them.
//!
//! Each takes a `progress(done, total)` callback; returning `false` asks the operation to
//! stop. It does at its next safe point (the next chunk, or the next MiB of a file read or
//! copied whole), keeping nothing it has not committed (new files removed as on any
//! failure), and returns [`stopped`]. The Python bindings return `false` once Ctrl-C is
//! pressed or the Python callback raised.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};

/// `progress(done, total)`: `false` asks the operation to stop (see the module docs).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) -> bool + Sync);

/// `tick(n)`: `n` more units done; `false` asks the work to stop (the units of one
/// operation's inner loops, passed to the helpers that run them).
pub type Tick<'a> = &'a (dyn Fn(u64) -> bool + Sync);

/// A progress callback that never asks to stop.
pub fn ignore(_: u64, _: u64) -> bool {
    true
}

/// The error of an operation stopped at its callback's request.
pub fn stopped() -> Error {
    Error::State("stopped at the request of its progress callback; nothing uncommitted kept".into())
}

/// Units done out of a total, passed on to a [`Progress`] callback, and whether it asked to
/// stop. Safe to tick from several threads.
pub(crate) struct Ticker<'a> {
    progress: Progress<'a>,
    total: u64,
    done: AtomicU64,
    stop: AtomicBool,
}

impl<'a> Ticker<'a> {
    pub(crate) fn new(progress: Progress<'a>, total: u64) -> Ticker<'a> {
        Ticker { progress, total, done: AtomicU64::new(0), stop: AtomicBool::new(false) }
    }

    /// `n` more units done; whether to go on (as [`Tick`]).
    pub(crate) fn tick(&self, n: u64) -> bool {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if !(self.progress)(done, self.total) {
            self.stop.store(true, Ordering::Relaxed);
        }
        !self.stopping()
    }

    /// Report the whole total done (the last call).
    pub(crate) fn finish(&self) {
        if !(self.progress)(self.total, self.total) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// [`stopped`] once the callback asked to stop.
    pub(crate) fn check(&self) -> Result<()> {
        if self.stopping() { Err(stopped()) } else { Ok(()) }
    }
}
