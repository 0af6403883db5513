//! The thread pool that kernels run on.
//!
//! Kernels use the *current* rayon pool, so the caller decides the parallelism by installing a
//! pool: one client with every core ([`thread_pool`]`(0)`), or many clients each on a
//! single-threaded pool. Kernel results do not depend on the thread count.

use crate::{Error, Result};

/// Builds a pool of `threads` workers (0 = one per available core).
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("fedtiny-kernel-{i}"))
        .build()
        .map_err(|e| Error::ThreadPool(e.to_string()))
}
