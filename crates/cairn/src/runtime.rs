//! The shared tokio runtime behind Cairn's blocking API. Blocking calls refuse to run
//! inside another async runtime (where blocking would stall it) with a clear error.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

use crate::error::{Error, Result};

fn runtime() -> Result<&'static Runtime> {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get()).max(4);
    let rt = Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("cairn-io")
        .enable_all()
        .build()
        .map_err(|e| Error::new(crate::ErrorKind::Unavailable, "cannot start i/o runtime").with_source(e))?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// Runs `fut` to completion on the shared runtime, blocking the calling thread.
pub fn block_on<F: Future<Output = Result<T>>, T>(fut: F) -> Result<T> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::invalid(
            "blocking cairn call made inside an async runtime; use the async functions instead",
        ));
    }
    runtime()?.block_on(fut)
}
