//! The thread pool shared by batch reads, `add_logits` and the loss kernels.
//!
//! One pool, sized once from the environment (`LOGITCACHE_NUM_THREADS`, else the number of
//! CPUs) and resizable at run time, so a training loop can give the data path and the loss
//! kernels the same number of threads as torch, and a benchmark can compare at equal threads.
//! Rayon's global pool can be neither resized nor used after `fork()` (its worker threads do
//! not exist in the child), hence a pool of our own that a forked child replaces.

use std::sync::{Arc, Mutex, PoisonError};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Error, Result};

struct Slot {
    pool: Arc<ThreadPool>,
    pid: u32,
}

static POOL: Mutex<Option<Slot>> = Mutex::new(None);

fn default_threads() -> usize {
    std::env::var("LOGITCACHE_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn build(n: usize) -> Result<Arc<ThreadPool>> {
    ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("logitcache-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::State(format!("cannot start {n} worker threads: {e}")))
}

/// The shared pool, started on first use and restarted in a forked child.
pub fn pool() -> Result<Arc<ThreadPool>> {
    let mut guard = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    let pid = std::process::id();
    if let Some(slot) = guard.as_ref() {
        if slot.pid == pid {
            return Ok(Arc::clone(&slot.pool));
        }
        // Inherited through fork(): its threads are gone. Dropping it would signal threads
        // that do not exist, so it is leaked on purpose (once per forked child).
        if let Some(stale) = guard.take() {
            std::mem::forget(stale.pool);
        }
        let n = default_threads();
        let p = build(n)?;
        *guard = Some(Slot { pool: Arc::clone(&p), pid });
        return Ok(p);
    }
    let p = build(default_threads())?;
    *guard = Some(Slot { pool: Arc::clone(&p), pid });
    Ok(p)
}

/// Replace the shared pool with one of `n` threads (`n >= 1`). Work already running on the
/// old pool finishes there.
pub fn set_num_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid_argument("n", "the number of threads must be at least 1"));
    }
    let p = build(n)?;
    *POOL.lock().unwrap_or_else(PoisonError::into_inner) =
        Some(Slot { pool: p, pid: std::process::id() });
    Ok(())
}

/// Number of threads of the shared pool.
pub fn num_threads() -> Result<usize> {
    Ok(pool()?.current_num_threads())
}

/// Run `f` inside the shared pool (so rayon's parallel iterators in `f` use it).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> Result<R> {
    Ok(pool()?.install(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_and_run() -> Result<()> {
        set_num_threads(2)?;
        assert_eq!(num_threads()?, 2);
        let total: u64 = install(|| {
            use rayon::prelude::*;
            (0..1000u64).into_par_iter().sum()
        })?;
        assert_eq!(total, 499_500);
        assert!(set_num_threads(0).is_err());
        Ok(())
    }
}
