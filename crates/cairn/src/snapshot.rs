//! Snapshots of many buffers at once, for asynchronous saves: the training loop waits
//! for this copy, so it must run at memory speed.
//!
//! All buffers go into one arena and the copy is split across threads, so the page
//! faults of fresh memory are taken in parallel too. No transparent huge pages: the
//! kernel's compaction to find them stalls the first snapshot (see
//! docs/measurements.md). Large pieces are copied with non-temporal (streaming) stores:
//! the copy is read by the writer much later, so filling the caches with it only slows
//! the copy (each destination line read before it is written) and evicts the training
//! loop's data; glibc's `memcpy` streams only past a threshold far above these pieces.
//!
//! Each copy is a view into the arena. When the last view is dropped (the save is done),
//! the arena goes back to its [`ArenaPool`], so the next snapshot copies into memory that
//! is already mapped: after the first save, a snapshot costs a plain copy into warm memory.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use memmap2::MmapMut;

/// Start of every copy in the arena is aligned to this (SIMD loads, numpy views).
const ALIGN: usize = 64;
/// Unit of work handed to a copying thread.
const PIECE_BYTES: usize = 16 << 20;
/// Below this total a single thread copies (thread start-up would dominate).
const PARALLEL_MIN_BYTES: usize = 32 << 20;

type Spare = Mutex<Option<MmapMut>>;

/// Keeps one arena between snapshots of the same owner (a checkpoint manager); the
/// arena is freed with the pool. Cloning shares the pool.
#[derive(Debug, Clone, Default)]
pub(crate) struct ArenaPool {
    spare: Arc<Spare>,
}

impl ArenaPool {
    /// Copies every buffer of `sources` into one arena and returns a view of each copy,
    /// in order. Reuses the pool's spare arena when it fits (at most twice the size).
    pub(crate) fn copy_all(&self, sources: &[&[u8]]) -> Vec<Bytes> {
        let mut offsets = Vec::with_capacity(sources.len());
        let mut total = 0usize;
        for source in sources {
            offsets.push(total);
            total += source.len().next_multiple_of(ALIGN);
        }
        if total == 0 {
            return sources.iter().map(|_| Bytes::new()).collect();
        }
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).take();
        let reused = spare.filter(|a| a.len() >= total && a.len() / 2 <= total);
        let mut arena = match reused.map_or_else(|| MmapMut::map_anon(total), Ok) {
            Ok(arena) => arena,
            // No address space for one arena: copy buffer by buffer through the allocator.
            Err(_) => return sources.iter().map(|s| Bytes::copy_from_slice(s)).collect(),
        };
        fill(&mut arena, sources, total);
        let arena = Bytes::from_owner(PooledArena { arena: Some(arena), home: Arc::downgrade(&self.spare) });
        sources.iter().zip(offsets).map(|(source, start)| arena.slice(start..start + source.len())).collect()
    }
}

/// An arena that returns to its pool (if the pool still exists) when dropped.
struct PooledArena {
    arena: Option<MmapMut>,
    home: Weak<Spare>,
}

impl AsRef<[u8]> for PooledArena {
    fn as_ref(&self) -> &[u8] {
        self.arena.as_deref().unwrap_or_default()
    }
}

impl Drop for PooledArena {
    fn drop(&mut self) {
        if let (Some(arena), Some(home)) = (self.arena.take(), self.home.upgrade()) {
            *home.lock().unwrap_or_else(|e| e.into_inner()) = Some(arena);
        }
    }
}

/// Copies `sources` back to back (each at an `ALIGN` boundary) into `arena`, splitting
/// the work into pieces spread evenly over the available cores.
fn fill(arena: &mut [u8], sources: &[&[u8]], total: usize) {
    let mut pieces: Vec<(&[u8], &mut [u8])> = Vec::new();
    let mut rest = arena;
    for source in sources {
        let (slot, tail) = rest.split_at_mut(source.len().next_multiple_of(ALIGN));
        rest = tail;
        pieces.extend(source.chunks(PIECE_BYTES).zip(slot[..source.len()].chunks_mut(PIECE_BYTES)));
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if threads == 1 || total < PARALLEL_MIN_BYTES {
        for (from, to) in pieces {
            copy(to, from);
        }
        return;
    }
    // Contiguous runs of pieces of about equal bytes, one per thread.
    let share = total.div_ceil(threads);
    let mut runs: Vec<Vec<(&[u8], &mut [u8])>> = vec![Vec::new()];
    let mut filled = 0usize;
    for piece in pieces {
        if filled >= share {
            runs.push(Vec::new());
            filled = 0;
        }
        filled += piece.0.len();
        if let Some(run) = runs.last_mut() {
            run.push(piece);
        }
    }
    std::thread::scope(|scope| {
        for run in runs {
            scope.spawn(move || {
                for (from, to) in run {
                    copy(to, from);
                }
            });
        }
    });
}

/// Below this, a piece is copied through the caches (the writer may find it there).
const STREAM_MIN_BYTES: usize = 256 << 10;

/// Copies `from` into `to` (same length), streaming past the caches when it is large.
fn copy(to: &mut [u8], from: &[u8]) {
    if from.len() < STREAM_MIN_BYTES {
        to.copy_from_slice(from);
        return;
    }
    stream_copy(to, from);
}

/// Copies with SSE2 non-temporal stores (every x86-64 has SSE2): the destination lines
/// are not read first and do not stay in the caches.
#[cfg(target_arch = "x86_64")]
fn stream_copy(to: &mut [u8], from: &[u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    const LANE: usize = 16;
    const STRIDE: usize = 4 * LANE;
    // The head up to the first 16-byte boundary of `to` and the tail past the last full
    // stride go through the caches.
    let head = to.as_ptr().align_offset(LANE).min(to.len());
    let (to_head, to_body) = to.split_at_mut(head);
    let (from_head, from_body) = from.split_at(head);
    to_head.copy_from_slice(from_head);
    let body = to_body.len() / STRIDE * STRIDE;
    let (to_body, to_tail) = to_body.split_at_mut(body);
    let (from_body, from_tail) = from_body.split_at(body);
    for (dst, src) in to_body.chunks_exact_mut(STRIDE).zip(from_body.chunks_exact(STRIDE)) {
        let (dst, src) = (dst.as_mut_ptr().cast::<__m128i>(), src.as_ptr().cast::<__m128i>());
        // SAFETY: `dst` and `src` each span STRIDE bytes of distinct slices (4 lanes);
        // `dst` is 16-byte aligned (the body starts at a 16-byte boundary and strides are
        // multiples of 16), as `_mm_stream_si128` needs; `_mm_loadu_si128` takes any
        // alignment. SSE2 is part of the x86-64 baseline.
        unsafe {
            let lanes = [
                _mm_loadu_si128(src),
                _mm_loadu_si128(src.add(1)),
                _mm_loadu_si128(src.add(2)),
                _mm_loadu_si128(src.add(3)),
            ];
            for (i, lane) in lanes.into_iter().enumerate() {
                _mm_stream_si128(dst.add(i), lane);
            }
        }
    }
    to_tail.copy_from_slice(from_tail);
    // SAFETY: a store fence has no preconditions; it orders the streaming stores above
    // before whatever this thread does next (signalling that the copy is done).
    unsafe { _mm_sfence() };
}

#[cfg(not(target_arch = "x86_64"))]
fn stream_copy(to: &mut [u8], from: &[u8]) {
    to.copy_from_slice(from);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_equal_aligned_and_independent() {
        let mut sources: Vec<Vec<u8>> = vec![vec![], vec![7u8; 3], vec![1u8; PIECE_BYTES * 2 + 5]];
        sources.extend((0..20).map(|i| vec![i as u8; PIECE_BYTES / 3 + i]));
        let slices: Vec<&[u8]> = sources.iter().map(Vec::as_slice).collect();
        let copies = ArenaPool::default().copy_all(&slices);
        for (source, copy) in sources.iter_mut().zip(&copies) {
            assert_eq!(&copy[..], &source[..]);
            assert_eq!(copy.as_ptr() as usize % ALIGN, 0);
            if let Some(b) = source.first_mut() {
                *b ^= 0xff;
                assert_ne!(copy[0], *b, "the copy must not share memory with its source");
            }
        }
    }

    #[test]
    fn streamed_copies_are_exact_at_every_alignment_and_length() {
        let source: Vec<u8> = (0..STREAM_MIN_BYTES * 2 + 200).map(|i| (i * 31 % 251) as u8).collect();
        let mut target = vec![0u8; source.len()];
        for shift in [0, 1, 7, 16, 33] {
            for len in [STREAM_MIN_BYTES, STREAM_MIN_BYTES + 1, STREAM_MIN_BYTES + 63, STREAM_MIN_BYTES * 2 - 5] {
                target.fill(0);
                let (from, to) = (&source[shift..shift + len], &mut target[shift + 3..shift + 3 + len]);
                copy(to, from);
                assert_eq!(to, from, "shift {shift} len {len}");
                assert!(target[..shift + 3].iter().all(|&b| b == 0), "nothing written before the copy");
                assert!(target[shift + 3 + len..].iter().all(|&b| b == 0), "nothing written after the copy");
            }
        }
    }

    #[test]
    fn nothing_to_copy_gives_empty_views() {
        let pool = ArenaPool::default();
        let copies = pool.copy_all(&[&[], &[]]);
        assert!(copies.iter().all(Bytes::is_empty));
        assert!(pool.copy_all(&[]).is_empty());
    }

    #[test]
    fn a_released_arena_is_reused_only_once_free() {
        let pool = ArenaPool::default();
        let first = pool.copy_all(&[&[1u8; 1000], &[2u8; 10]]);
        let address = first[0].as_ptr();
        let second = pool.copy_all(&[&[3u8; 1000]]);
        assert_ne!(second[0].as_ptr(), address, "an arena in use must not be reused");
        drop(first);
        let third = pool.copy_all(&[&[4u8; 900]]);
        assert_eq!(third[0].as_ptr(), address, "the released arena is reused");
        assert_eq!(&third[0][..], &[4u8; 900][..]);
        assert_eq!(&second[0][..], &[3u8; 1000][..]);
    }
}
