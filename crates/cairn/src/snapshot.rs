//! Snapshots of many buffers at once, for asynchronous saves: the training loop waits
//! for this copy, so it must run at memory speed.
//!
//! All buffers go into one arena, backed by huge pages where the kernel allows (a copy
//! into fresh memory otherwise pays one page fault per 4 KiB), and the copy is split
//! across threads. Each copy is a view into the arena, which is freed when the last view
//! is dropped.

use bytes::Bytes;
use memmap2::{Advice, MmapMut};

/// Start of every copy in the arena is aligned to this (SIMD loads, numpy views).
const ALIGN: usize = 64;
/// Unit of work handed to a copying thread.
const PIECE_BYTES: usize = 16 << 20;
/// Below this total a single thread copies (thread start-up would dominate).
const PARALLEL_MIN_BYTES: usize = 32 << 20;

/// Copies every buffer of `sources` into memory owned by the returned views, in order.
pub(crate) fn copy_all(sources: &[&[u8]]) -> Vec<Bytes> {
    let mut offsets = Vec::with_capacity(sources.len());
    let mut total = 0usize;
    for source in sources {
        offsets.push(total);
        total += source.len().next_multiple_of(ALIGN);
    }
    if total == 0 {
        return sources.iter().map(|_| Bytes::new()).collect();
    }
    let Ok(mut arena) = MmapMut::map_anon(total) else {
        // No address space for one arena: copy buffer by buffer through the allocator.
        return sources.iter().map(|s| Bytes::copy_from_slice(s)).collect();
    };
    // A hint only; the copy is correct either way.
    let _ = arena.advise(Advice::HugePage);
    fill(&mut arena, sources, total);
    let arena = Bytes::from_owner(arena);
    sources.iter().zip(offsets).map(|(source, start)| arena.slice(start..start + source.len())).collect()
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
            to.copy_from_slice(from);
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
                    to.copy_from_slice(from);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_equal_aligned_and_independent() {
        let mut sources: Vec<Vec<u8>> = vec![vec![], vec![7u8; 3], vec![1u8; PIECE_BYTES * 2 + 5]];
        sources.extend((0..20).map(|i| vec![i as u8; PIECE_BYTES / 3 + i]));
        let slices: Vec<&[u8]> = sources.iter().map(Vec::as_slice).collect();
        let copies = copy_all(&slices);
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
    fn nothing_to_copy_gives_empty_views() {
        let copies = copy_all(&[&[], &[]]);
        assert!(copies.iter().all(Bytes::is_empty));
        assert!(copy_all(&[]).is_empty());
    }
}
