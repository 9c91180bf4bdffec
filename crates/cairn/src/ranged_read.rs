//! Reading byte ranges of a stored object, each into a buffer of its own.
//!
//! A loaded tensor should own its memory: a frontend can then hand it out writable
//! without copying it, and each tensor is freed on its own. `object_store`'s `get_ranges`
//! returns slices of one buffer per coalesced request (a whole shard, when every tensor
//! of it is read), which a frontend had to copy to own: two copies of the state, and
//! twice its size in memory at the end of a load. Here each range gets a buffer of its
//! exact size and the response bodies are copied straight into those buffers as they
//! arrive: one copy from the network, however the ranges are grouped into requests.
//!
//! Nearby ranges share a request (the bytes between them are read and dropped);
//! requests carry at most `REQUEST_BYTES`, so a large range or file is fetched by
//! several requests at once.

use std::ops::Range;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};

use crate::error::{Error, Result};

/// Largest request, in bytes of the object.
const REQUEST_BYTES: usize = 16 << 20;
/// Requests in flight for one object.
const REQUESTS_IN_FLIGHT: usize = 8;
/// Ranges at most this far apart are read in one request.
const COALESCE_GAP_BYTES: u64 = 1 << 20;

/// Whether no two non-empty `ranges` share a byte: the ranges `read_ranges` accepts.
pub(crate) fn disjoint(ranges: &[Range<u64>]) -> bool {
    let mut sorted: Vec<&Range<u64>> = ranges.iter().filter(|r| !r.is_empty()).collect();
    sorted.sort_by_key(|r| r.start);
    sorted.windows(2).all(|w| w[0].end <= w[1].start)
}

/// Reads the disjoint `ranges` (see [`disjoint`]) of the object at `path`, one buffer per
/// range in the order given. The caller has checked the ranges against the object's real
/// size, so the buffers together are no larger than the object. `shown` names the object
/// in errors.
pub(crate) async fn read_ranges(
    store: &dyn ObjectStore,
    path: &Path,
    ranges: &[Range<u64>],
    shown: &str,
) -> Result<Vec<Vec<u8>>> {
    debug_assert!(disjoint(ranges), "read_ranges needs disjoint ranges");
    let mut buffers = Vec::with_capacity(ranges.len());
    for range in ranges {
        let len = usize::try_from(range.end.saturating_sub(range.start))
            .map_err(|_| Error::corrupt(format!("byte range {range:?} does not fit in memory file=`{shown}`")))?;
        buffers.push(vec![0u8; len]);
    }
    let requests = plan(ranges, &mut buffers, REQUEST_BYTES, COALESCE_GAP_BYTES);
    let ranged = futures::stream::iter(requests.into_iter().map(|request| fetch(store, path, request, shown)))
        .buffer_unordered(REQUESTS_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await;
    match ranged {
        Ok(_) => {}
        // A server that ignores Range (a plain HTTP file server answers 200 with the
        // whole file): one GET of the object, streamed into every buffer in one pass.
        Err(Fetch::NoRange) => {
            if let Some(request) = spanning(ranges, &mut buffers) {
                fill(store.get(path).await.map_err(|e| shard_read_error(e, shown))?, request, true, shown).await?;
            }
        }
        Err(Fetch::Failed(err)) => return Err(err),
    }
    Ok(buffers)
}

/// How a ranged request failed.
enum Fetch {
    /// The server does not serve byte ranges.
    NoRange,
    /// Any other failure.
    Failed(Error),
}

impl From<Error> for Fetch {
    fn from(err: Error) -> Fetch {
        Fetch::Failed(err)
    }
}

/// Whether `err` says a ranged GET got the whole object instead: `object_store`'s HTTP
/// store calls it not supported, its other clients say so by message only.
fn range_ignored(err: &object_store::Error) -> bool {
    if matches!(err, object_store::Error::NotSupported { .. }) {
        return true;
    }
    let mut source: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = source {
        if e.to_string().contains("non-partial response when range requested") {
            return true;
        }
        source = e.source();
    }
    false
}

/// One ranged GET and where its bytes go.
struct Request<'a> {
    range: Range<u64>,
    /// Destinations in object order: (offset in the object, bytes to fill).
    targets: Vec<(u64, &'a mut [u8])>,
}

/// Groups the buffers' parts (at most `request_bytes` each) into requests in object
/// order, joining parts at most `gap` bytes apart while a request stays within
/// `request_bytes`.
fn plan<'a>(ranges: &[Range<u64>], buffers: &'a mut [Vec<u8>], request_bytes: usize, gap: u64) -> Vec<Request<'a>> {
    let mut parts: Vec<(u64, &'a mut [u8])> = Vec::new();
    for (range, buffer) in ranges.iter().zip(buffers.iter_mut()) {
        let mut offset = range.start;
        for part in buffer.chunks_mut(request_bytes) {
            let len = part.len() as u64;
            parts.push((offset, part));
            offset += len;
        }
    }
    parts.sort_by_key(|(offset, _)| *offset);
    let mut requests: Vec<Request<'a>> = Vec::new();
    for (offset, part) in parts {
        let end = offset + part.len() as u64;
        match requests.last_mut() {
            Some(r) if offset <= r.range.end + gap && end - r.range.start <= request_bytes as u64 => {
                r.range.end = end;
                r.targets.push((offset, part));
            }
            _ => requests.push(Request { range: offset..end, targets: vec![(offset, part)] }),
        }
    }
    requests
}

/// One request for every buffer at once, spanning all the ranges (none if all are
/// empty).
fn spanning<'a>(ranges: &[Range<u64>], buffers: &'a mut [Vec<u8>]) -> Option<Request<'a>> {
    let mut targets: Vec<(u64, &'a mut [u8])> = ranges
        .iter()
        .zip(buffers.iter_mut())
        .filter(|(r, _)| !r.is_empty())
        .map(|(r, b)| (r.start, &mut b[..]))
        .collect();
    targets.sort_by_key(|(offset, _)| *offset);
    let start = targets.first()?.0;
    let end = ranges.iter().map(|r| r.end).max()?;
    Some(Request { range: start..end, targets })
}

/// Runs one request, copying its body into its targets as it arrives.
async fn fetch(
    store: &dyn ObjectStore,
    path: &Path,
    request: Request<'_>,
    shown: &str,
) -> std::result::Result<(), Fetch> {
    let options = GetOptions { range: Some(GetRange::Bounded(request.range.clone())), ..Default::default() };
    let got = match store.get_opts(path, options).await {
        Ok(got) => got,
        Err(e) if range_ignored(&e) => return Err(Fetch::NoRange),
        Err(e) => return Err(shard_read_error(e, shown).into()),
    };
    Ok(fill(got, request, false, shown).await?)
}

/// Copies the body of `got` into the targets of `request` as it arrives: the body of a
/// ranged GET (it must end with them), or with `whole` the whole object, read up to the
/// end of the request only.
async fn fill(got: object_store::GetResult, request: Request<'_>, whole: bool, shown: &str) -> Result<()> {
    let read_error = |e| shard_read_error(e, shown);
    let mut body = got.into_stream();
    let mut scatter = Scatter::new(if whole { 0 } else { request.range.start }, request.targets);
    while !(whole && scatter.is_full()) {
        let Some(chunk) = body.try_next().await.map_err(read_error)? else { break };
        let chunk = if whole {
            let wanted = usize::try_from(request.range.end.saturating_sub(scatter.at)).unwrap_or(usize::MAX);
            &chunk[..chunk.len().min(wanted)]
        } else {
            &chunk[..]
        };
        scatter.write(chunk).map_err(|()| too_long(&request.range, shown))?;
    }
    if !scatter.is_full() {
        return Err(Error::corrupt(format!(
            "data file ended early: got {} of bytes {}..{} file=`{shown}`",
            scatter.at.saturating_sub(request.range.start),
            request.range.start,
            request.range.end
        )));
    }
    Ok(())
}

/// A store's failure to read the data file `shown`: a missing file is corruption (the
/// manifest names it), anything else is classified by [`Error::from_store`].
pub(crate) fn shard_read_error(err: object_store::Error, shown: &str) -> Error {
    match err {
        object_store::Error::NotFound { .. } => Error::corrupt(format!("data file missing file=`{shown}`")),
        other => Error::from_store(other, "reading shard", &format!("file=`{shown}`")),
    }
}

fn too_long(range: &Range<u64>, shown: &str) -> Error {
    Error::corrupt(format!("store returned more than bytes {}..{} file=`{shown}`", range.start, range.end))
}

/// Copies a stream of bytes, starting at object offset `at`, into sorted non-overlapping
/// targets, dropping the bytes between them.
struct Scatter<'a> {
    at: u64,
    current: Option<(u64, &'a mut [u8])>,
    rest: std::vec::IntoIter<(u64, &'a mut [u8])>,
}

impl<'a> Scatter<'a> {
    fn new(at: u64, targets: Vec<(u64, &'a mut [u8])>) -> Scatter<'a> {
        let mut rest = targets.into_iter();
        let current = rest.next();
        Scatter { at, current, rest }
    }

    /// Takes the next bytes of the stream; fails when they go past the last target.
    fn write(&mut self, mut data: &[u8]) -> std::result::Result<(), ()> {
        while !data.is_empty() {
            let Some((start, dest)) = self.current.as_mut() else { return Err(()) };
            if self.at < *start {
                let skip = (*start - self.at).min(data.len() as u64);
                data = &data[skip as usize..];
                self.at += skip;
                continue;
            }
            let n = dest.len().min(data.len());
            let filled = std::mem::take(dest);
            filled[..n].copy_from_slice(&data[..n]);
            *dest = &mut filled[n..];
            *start += n as u64;
            self.at += n as u64;
            data = &data[n..];
            if dest.is_empty() {
                self.current = self.rest.next();
            }
        }
        Ok(())
    }

    /// Whether every target has been filled.
    fn is_full(&self) -> bool {
        self.current.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutPayload};
    use proptest::prelude::*;

    fn object(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn disjoint_ignores_order_and_empty_ranges() {
        assert!(disjoint(&[10..20, 0..10, 5..5, 20..30]));
        assert!(!disjoint(&[0..10, 9..12]));
        assert!(!disjoint(&[4..6, 0..10]));
    }

    #[test]
    fn plan_joins_near_ranges_and_splits_large_ones() {
        let ranges = [10..20, 25..30, 40..45, 100..135];
        let mut buffers: Vec<Vec<u8>> = ranges.iter().map(|r| vec![0; (r.end - r.start) as usize]).collect();
        let requests = plan(&ranges, &mut buffers, 20, 5);
        let spans: Vec<Range<u64>> = requests.iter().map(|r| r.range.clone()).collect();
        // 10..20 and 25..30 are 5 apart: one request; 40..45 would make it longer than 20.
        assert_eq!(spans, vec![10..30, 40..45, 100..120, 120..135]);
        assert_eq!(requests[0].targets.len(), 2);
    }

    #[test]
    fn scatter_rejects_bytes_past_its_targets() {
        let mut dest = [0u8; 4];
        let mut scatter = Scatter::new(0, vec![(0, &mut dest[..])]);
        assert!(scatter.write(&[1, 2, 3]).is_ok());
        assert!(!scatter.is_full());
        assert!(scatter.write(&[4, 5]).is_err());
    }

    #[tokio::test]
    async fn a_short_object_is_reported_with_its_name() {
        let store = InMemory::new();
        let path = Path::from("shard");
        store.put(&path, PutPayload::from(object(100))).await.unwrap();
        // The range lies past the end: the store answers with an error or a short body.
        let err = read_ranges(&store, &path, &[0..10, 50..150], "run/shard").await.unwrap_err();
        assert!(err.to_string().contains("run/shard"), "{err}");
    }

    #[tokio::test]
    async fn a_whole_object_fills_every_range_in_one_pass() {
        let store = InMemory::new();
        let path = Path::from("shard");
        let data = object(1000);
        store.put(&path, PutPayload::from(data.clone())).await.unwrap();
        let ranges = [600..700, 0..10, 10..10, 20..400];
        let mut buffers: Vec<Vec<u8>> = ranges.iter().map(|r| vec![0; (r.end - r.start) as usize]).collect();
        let request = spanning(&ranges, &mut buffers).unwrap();
        assert_eq!(request.range, 0..700);
        fill(store.get(&path).await.unwrap(), request, true, "shard").await.unwrap();
        for (range, buffer) in ranges.iter().zip(&buffers) {
            assert_eq!(buffer.as_slice(), &data[range.start as usize..range.end as usize]);
        }
    }

    proptest! {
        /// Any disjoint ranges of an object, planned with any request size and gap and
        /// streamed in any chunking, come back byte for byte.
        #[test]
        fn ranges_read_back_exactly(
            cuts in proptest::collection::vec(0u64..4096, 0..24),
            keep in proptest::collection::vec(any::<bool>(), 24),
            request_bytes in 1usize..600,
            gap in 0u64..300,
            chunk in 1usize..700,
        ) {
            let data = object(4096);
            let mut points = cuts.clone();
            points.sort_unstable();
            points.dedup();
            let ranges: Vec<Range<u64>> = points
                .windows(2)
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(w, _)| w[0]..w[1])
                .collect();
            let mut buffers: Vec<Vec<u8>> = ranges.iter().map(|r| vec![0; (r.end - r.start) as usize]).collect();
            for request in plan(&ranges, &mut buffers, request_bytes, gap) {
                prop_assert!(request.range.end - request.range.start <= request_bytes as u64);
                let body = &data[request.range.start as usize..request.range.end as usize];
                let mut scatter = Scatter::new(request.range.start, request.targets);
                for piece in body.chunks(chunk) {
                    prop_assert!(scatter.write(piece).is_ok());
                }
                prop_assert!(scatter.is_full());
            }
            for (range, buffer) in ranges.iter().zip(&buffers) {
                prop_assert_eq!(&buffer[..], &data[range.start as usize..range.end as usize]);
            }
        }
    }

    #[tokio::test]
    async fn ranges_come_back_in_the_order_given_each_in_its_own_buffer() {
        let data = object(3 * REQUEST_BYTES + 77);
        let store = InMemory::new();
        let path = Path::from("shard");
        store.put(&path, PutPayload::from(data.clone())).await.unwrap();
        let ranges =
            [(2 * REQUEST_BYTES as u64)..(3 * REQUEST_BYTES as u64 + 77), 0..10, 10..10, 12..REQUEST_BYTES as u64 + 3];
        let buffers = read_ranges(&store, &path, &ranges, "shard").await.unwrap();
        for (range, buffer) in ranges.iter().zip(&buffers) {
            assert_eq!(buffer.as_slice(), &data[range.start as usize..range.end as usize]);
        }
    }
}
