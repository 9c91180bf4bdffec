//! A fault-injecting store wrapper for reliability tests: it numbers every I/O operation
//! and, at a chosen one, crashes (that operation and every later one fails, as if the
//! process died there), fails once, or tears a write (only a prefix lands, then it
//! crashes). Tests pick the operation from a logged seed, so every failure replays. It
//! can also be taken down (every operation fails until it is back up), made to refuse
//! (permission denied) and slowed (each write waits first), as an unreachable, wrongly
//! configured or slow remote store is.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result,
};

/// What happens at the chosen operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The operation and every later one fail: the writer died here.
    Crash,
    /// Only this operation fails (a transient I/O error, a full disk).
    Fail,
    /// The operation happens, but its acknowledgement is lost: the caller sees an error.
    LostAck,
    /// A data write lands only in part at its final path, then the writer dies; other
    /// operations crash. A create-only write (the commit) is atomic on every supported
    /// store (one PUT; a staged file and a link on local disk), so tearing it means it
    /// never landed.
    Tear,
}

/// Wraps a store and injects one [`Fault`] at operation number `at` (0-based).
#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    state: Arc<Counter>,
}

#[derive(Debug)]
struct Counter {
    at: Option<u64>,
    fault: Fault,
    ops: AtomicU64,
    crashed: AtomicBool,
    /// Every operation fails while set.
    down: AtomicBool,
    /// Every operation is refused (permission denied) while set.
    refusing: AtomicBool,
    /// Milliseconds each write waits before it starts.
    delay_ms: AtomicU64,
}

impl FaultStore {
    /// A wrapper that only counts operations (to learn how many a workload does).
    pub fn counting(inner: Arc<dyn ObjectStore>) -> FaultStore {
        FaultStore::with(inner, None, Fault::Fail)
    }

    /// A wrapper that injects `fault` at operation `at`.
    pub fn new(inner: Arc<dyn ObjectStore>, at: u64, fault: Fault) -> FaultStore {
        FaultStore::with(inner, Some(at), fault)
    }

    fn with(inner: Arc<dyn ObjectStore>, at: Option<u64>, fault: Fault) -> FaultStore {
        let state = Counter {
            at,
            fault,
            ops: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
            down: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
        };
        FaultStore { inner, state: Arc::new(state) }
    }

    /// Operations seen so far.
    pub fn ops(&self) -> u64 {
        self.state.ops.load(Ordering::SeqCst)
    }

    /// Takes the store down (every operation fails, as if unreachable) or back up.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Makes the store refuse every operation (permission denied: wrong credentials), or
    /// stop refusing.
    pub fn set_refusing(&self, refusing: bool) {
        self.state.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Makes each write wait `delay` before it starts (a slow link).
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    fn step(&self, what: &str, location: &Path) -> Result<bool> {
        self.state.step(what, location)
    }

    /// Waits as long as a write must (see [`FaultStore::set_delay`]).
    async fn delay(&self) {
        let ms = self.state.delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

impl Counter {
    /// Numbers one operation; `Err` if it must fail, `Ok(true)` if it must be torn or its
    /// acknowledgement lost.
    fn step(&self, what: &str, location: &Path) -> Result<bool> {
        if self.crashed.load(Ordering::SeqCst) {
            return Err(injected(what, location, "after a crash"));
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(injected(what, location, "store down"));
        }
        if self.refusing.load(Ordering::SeqCst) {
            return Err(object_store::Error::PermissionDenied {
                path: location.to_string(),
                source: format!("injected refusal during {what}").into(),
            });
        }
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if Some(n) != self.at {
            return Ok(false);
        }
        match self.fault {
            Fault::Fail => Err(injected(what, location, "injected failure")),
            Fault::LostAck => Ok(true),
            Fault::Crash => {
                self.crashed.store(true, Ordering::SeqCst);
                Err(injected(what, location, "injected crash"))
            }
            Fault::Tear => {
                self.crashed.store(true, Ordering::SeqCst);
                Ok(true)
            }
        }
    }
}

fn injected(what: &str, location: &Path, why: &str) -> object_store::Error {
    object_store::Error::Generic { store: "FaultStore", source: format!("{why} during {what} of {location}").into() }
}

impl fmt::Display for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.delay().await;
        if self.step("put", location)? {
            if self.state.fault == Fault::LostAck {
                self.inner.put_opts(location, payload, opts).await?;
                return Err(injected("put", location, "lost acknowledgement"));
            }
            if !matches!(opts.mode, object_store::PutMode::Create) {
                let all: Bytes = payload.into();
                let half = PutPayload::from(all.slice(..all.len() / 2));
                let _ = self.inner.put_opts(location, half, opts).await;
            }
            return Err(injected("put", location, "torn write"));
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.delay().await;
        if self.step("multipart upload", location)? {
            return Err(injected("multipart upload", location, "injected crash"));
        }
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        if self.step("get", location)? {
            return Err(injected("get", location, "injected crash"));
        }
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        if self.step("get", location)? {
            return Err(injected("get", location, "injected crash"));
        }
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        // Number each deletion as it is requested, in order; a faulted one never happens.
        let state = self.state.clone();
        let gate = locations.map(move |location| {
            let location = location?;
            state.step("delete", &location).map(|_| location)
        });
        self.inner.delete_stream(gate.boxed())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let at = prefix.cloned().unwrap_or_default();
        match self.step("list", &at) {
            Ok(_) => self.inner.list(prefix),
            Err(e) => stream::once(async move { Err(e) }).boxed(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let at = prefix.cloned().unwrap_or_default();
        if self.step("list", &at)? {
            return Err(injected("list", &at, "injected crash"));
        }
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        if self.step("copy", to)? {
            return Err(injected("copy", to, "injected crash"));
        }
        self.inner.copy_opts(from, to, options).await
    }
}
