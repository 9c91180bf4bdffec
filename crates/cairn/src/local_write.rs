//! Durable writes of new local files at the disk's speed.
//!
//! Buffered writes are bound by the copy into the page cache, and their fsync then waits
//! for writeback; direct I/O (`O_DIRECT`) sends large aligned blocks straight to the
//! device. The file is cut into blocks of `BLOCK_BYTES`, claimed in turn by a few worker
//! threads, each with its own aligned bounce block: a worker copies the caller's bytes of
//! its block and checksums them while they are hot in the cache, then writes the block.
//! While one worker copies, the others' writes are in flight, and each byte of the state
//! is read from memory once; the checksums of a chunk's pieces are combined at the end.
//! A disk reaches its speed only with enough bytes in flight (`WRITES_IN_FLIGHT` writes
//! of `BLOCK_BYTES` across the files being written at once), so a save writing fewer
//! files at once gives each file more workers.
//!
//! Bounce blocks are kept for the next file and the next save (at most `POOLED_BLOCKS`):
//! fresh memory costs a page fault per page (and on a VM a host-side fault too). Extra
//! memory is the set of blocks, whatever the file's size. The measurements behind these
//! figures are in docs/measurements.md.
//!
//! Where the filesystem refuses direct I/O (tmpfs, some network filesystems), or off
//! Linux, the same file is written with ordinary writes instead. Either way the file is
//! fsynced before returning; making its name durable (the directory's fsync) is the
//! caller's job, once for all the files of a folder.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::format::checksum::{self, Crc32c};

/// Alignment of direct I/O offsets, lengths and buffers (the largest common logical
/// block size).
const ALIGN: usize = 4096;
/// Size of one bounce block: one write request to the device.
const BLOCK_BYTES: usize = 8 << 20;
/// Device writes in flight across the files of a save, for files written at once.
const WRITES_IN_FLIGHT: usize = 8;
/// Bounce blocks kept for later files: one per write in flight.
const POOLED_BLOCKS: usize = WRITES_IN_FLIGHT;
/// Bytes copied before checksumming them, so the checksum reads from the cache.
const CHECKSUM_STEP: usize = 256 << 10;

#[cfg(target_os = "linux")]
const DIRECT_FLAG: i32 = libc::O_DIRECT;
#[cfg(not(target_os = "linux"))]
const DIRECT_FLAG: i32 = 0;

/// Writes the concatenation of `chunks` as the new file `path` (it must not exist) and
/// fsyncs it, while `files_at_once - 1` other files are being written (which sets how many
/// writes this one keeps in flight). Returns the CRC-32C of each chunk, computed over the
/// bytes written.
pub(crate) fn write_new_file(path: &Path, chunks: &[&[u8]], files_at_once: usize) -> io::Result<Vec<u32>> {
    if DIRECT_FLAG != 0 {
        let writers = (WRITES_IN_FLIGHT / files_at_once.max(1)).max(1);
        match OpenOptions::new().write(true).create_new(true).custom_flags(DIRECT_FLAG | libc::O_NOFOLLOW).open(path) {
            Ok(file) => match write_direct(&file, chunks, writers) {
                Ok(crcs) => {
                    file.sync_all()?;
                    return Ok(crcs);
                }
                Err(e) if !refused_direct_io(&e) => return Err(e),
                Err(_) => {}
            },
            Err(e) if !refused_direct_io(&e) => return Err(e),
            // The refusing open may still have created the file: rewrite it below.
            Err(_) => {}
        }
        let file =
            OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
        return write_buffered(&file, chunks);
    }
    write_buffered(&OpenOptions::new().write(true).create_new(true).open(path)?, chunks)
}

/// Whether `e` is the filesystem refusing direct I/O rather than a real failure.
fn refused_direct_io(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Ordinary writes straight from the caller's buffers, then fsync.
fn write_buffered(file: &File, chunks: &[&[u8]]) -> io::Result<Vec<u32>> {
    let mut offset = 0u64;
    let mut crcs = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        crcs.push(checksum::crc32c(chunk));
        file.write_all_at(chunk, offset)?;
        offset += chunk.len() as u64;
    }
    file.set_len(offset)?;
    file.sync_all()?;
    Ok(crcs)
}

/// Blocks written and free for the next file, at most `POOLED_BLOCKS`.
static FREE_BLOCKS: Mutex<Vec<AlignedBlock>> = Mutex::new(Vec::new());

/// A heap buffer whose usable part starts at an `ALIGN`-aligned address.
struct AlignedBlock {
    storage: Vec<u8>,
    start: usize,
}

impl AlignedBlock {
    /// A block from the pool, or a new one.
    fn take() -> AlignedBlock {
        let pooled = FREE_BLOCKS.lock().unwrap_or_else(|e| e.into_inner()).pop();
        pooled.unwrap_or_else(|| {
            let storage = vec![0u8; BLOCK_BYTES + ALIGN];
            let start = storage.as_ptr().align_offset(ALIGN);
            AlignedBlock { storage, start }
        })
    }

    /// Gives the block back to the pool, or frees it when the pool is full.
    fn recycle(self) {
        let mut free = FREE_BLOCKS.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOLED_BLOCKS {
            free.push(self);
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + BLOCK_BYTES]
    }
}

/// The checksum of the part of one chunk that one block holds.
struct ChunkPart {
    chunk: usize,
    /// Where the part starts in the file.
    offset: u64,
    len: usize,
    crc: u32,
}

/// The direct-I/O pipeline: `workers` scoped threads claim the file's blocks in turn,
/// each copying, checksumming and writing its block, so that while one copies the
/// others write. The last block is padded to the alignment with zeros and the file cut
/// back to its real length. The first worker to fail stops the others.
fn write_direct(file: &File, chunks: &[&[u8]], workers: usize) -> io::Result<Vec<u32>> {
    let mut starts = Vec::with_capacity(chunks.len());
    let mut total = 0u64;
    for chunk in chunks {
        starts.push(total);
        total += chunk.len() as u64;
    }
    let block_count = usize::try_from(total.div_ceil(BLOCK_BYTES as u64)).map_err(io::Error::other)?;
    preallocate(file, total)?;
    let next_block = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let claimed = || {
        let index = next_block.fetch_add(1, Ordering::Relaxed);
        (index < block_count && !failed.load(Ordering::Relaxed)).then_some(index)
    };
    let results: Vec<io::Result<Vec<ChunkPart>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.clamp(1, block_count.max(1)))
            .map(|_| {
                scope.spawn(|| {
                    let mut block = AlignedBlock::take();
                    let mut pieces = Vec::new();
                    let mut written = Ok(());
                    while let Some(index) = claimed() {
                        let offset = index as u64 * BLOCK_BYTES as u64;
                        let len = fill_block(block.bytes(), offset, total, chunks, &starts, &mut pieces);
                        let padded = len.next_multiple_of(ALIGN);
                        block.bytes()[len..padded].fill(0);
                        written = file.write_all_at(&block.bytes()[..padded], offset);
                        if written.is_err() {
                            failed.store(true, Ordering::Relaxed);
                            break;
                        }
                    }
                    block.recycle();
                    written.map(|()| pieces)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(io::Error::other("direct write worker panicked"))))
            .collect()
    });
    let mut pieces = Vec::new();
    for result in results {
        pieces.extend(result?);
    }
    file.set_len(total)?;
    Ok(chunk_checksums(chunks.len(), pieces))
}

/// Reserves the file's `len` bytes before its blocks are written, so that the filesystem
/// lays it out in one run instead of allocating each block in the order the workers (and
/// those of the other files written at once) happen to write it: on ext4, four shards
/// written at once came out as 23–48 extents of 8 MiB each, interleaved and out of order,
/// and as 5–9 extents preallocated, which a later sequential read follows. A full disk
/// fails here, before any block is written. Filesystems without preallocation are
/// written as before.
#[cfg(target_os = "linux")]
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let Ok(len) = libc::off_t::try_from(len) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "file too large to preallocate"));
    };
    if len == 0 {
        return Ok(());
    }
    // SAFETY: `fallocate` only reads its integer arguments; the descriptor is open for
    // writing for the lifetime of `file`.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return Ok(());
    }
    Err(err)
}

#[cfg(not(target_os = "linux"))]
fn preallocate(_file: &File, _len: u64) -> io::Result<()> {
    Ok(())
}

/// Copies the bytes of the file's `[offset, offset + block.len())` (or up to `total`)
/// from `chunks` (which start at `starts` in the file) into `block`, checksumming each
/// chunk's part as a `ChunkPart`. Returns the number of bytes filled.
fn fill_block(
    block: &mut [u8],
    offset: u64,
    total: u64,
    chunks: &[&[u8]],
    starts: &[u64],
    pieces: &mut Vec<ChunkPart>,
) -> usize {
    let end = total.min(offset + block.len() as u64);
    // The last chunk starting at or before `offset` (empty chunks hold no bytes: skipped).
    let first = starts.partition_point(|&start| start <= offset).saturating_sub(1);
    for chunk in first..chunks.len() {
        let start = starts[chunk];
        if start >= end {
            break;
        }
        let from = offset.max(start);
        let to = end.min(start + chunks[chunk].len() as u64);
        if from >= to {
            continue;
        }
        let source = &chunks[chunk][(from - start) as usize..(to - start) as usize];
        let target = &mut block[(from - offset) as usize..(to - offset) as usize];
        let mut crc = Crc32c::new();
        for (source, target) in source.chunks(CHECKSUM_STEP).zip(target.chunks_mut(CHECKSUM_STEP)) {
            target.copy_from_slice(source);
            crc.update(target);
        }
        pieces.push(ChunkPart { chunk, offset: from, len: source.len(), crc: crc.value() });
    }
    (end - offset) as usize
}

/// The CRC-32C of each of `chunk_count` chunks, from the checksums of their pieces
/// (a chunk without pieces is empty).
fn chunk_checksums(chunk_count: usize, mut pieces: Vec<ChunkPart>) -> Vec<u32> {
    pieces.sort_unstable_by_key(|p| p.offset);
    let mut crcs: Vec<Option<u32>> = vec![None; chunk_count];
    for piece in pieces {
        let crc = &mut crcs[piece.chunk];
        *crc = Some(match *crc {
            None => piece.crc,
            Some(before) => checksum::combine(before, piece.crc, piece.len as u64),
        });
    }
    crcs.into_iter().map(|crc| crc.unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn files_of_every_size_round_trip_with_their_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [0, 1, ALIGN - 1, ALIGN, BLOCK_BYTES - 3, BLOCK_BYTES, 2 * BLOCK_BYTES + 5];
        for (i, &size) in sizes.iter().enumerate() {
            let chunks = [pattern(13, 1), pattern(size, 2), Vec::new(), pattern(ALIGN + 7, 3)];
            let slices: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let path = dir.path().join(format!("f{i}"));
            let crcs = write_new_file(&path, &slices, 2).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), chunks.concat(), "size {size}");
            let expected: Vec<u32> = chunks.iter().map(|c| checksum::crc32c(c)).collect();
            assert_eq!(crcs, expected, "size {size}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn preallocation_reserves_the_whole_file_before_any_write() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reserved");
        let file = OpenOptions::new().write(true).create_new(true).open(&path).unwrap();
        let len = 3 * BLOCK_BYTES as u64 + 5;
        preallocate(&file, len).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), len);
        assert!(meta.blocks() * 512 >= len, "{} bytes reserved of {len}", meta.blocks() * 512);
        preallocate(&file, 0).unwrap();
    }

    #[test]
    fn any_number_of_writers_writes_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = [pattern(7, 4), pattern(5 * BLOCK_BYTES + BLOCK_BYTES / 2, 5), pattern(3, 6)];
        let slices: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        for files_at_once in [1, 3, WRITES_IN_FLIGHT, 4 * WRITES_IN_FLIGHT] {
            let path = dir.path().join(format!("w{files_at_once}"));
            let crcs = write_new_file(&path, &slices, files_at_once).unwrap();
            assert!(std::fs::read(&path).unwrap() == chunks.concat(), "{files_at_once} files at once");
            assert_eq!(crcs, chunks.iter().map(|c| checksum::crc32c(c)).collect::<Vec<_>>());
        }
    }

    proptest::proptest! {
        /// Blocks of any size, filled in any order, hold the chunks back to back, and the
        /// checksums combined from their pieces are each chunk's own.
        #[test]
        fn blocks_filled_in_any_order_rebuild_the_file_and_its_checksums(
            sizes in proptest::collection::vec(0usize..40, 0..8),
            block_len in 1usize..32,
            order_seed in proptest::prelude::any::<u64>(),
        ) {
            let chunks: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| pattern(n, i as u8)).collect();
            let slices: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let starts: Vec<u64> = sizes.iter().scan(0u64, |at, &n| { let s = *at; *at += n as u64; Some(s) }).collect();
            let total: u64 = sizes.iter().map(|&n| n as u64).sum();
            let mut order: Vec<u64> = (0..total.div_ceil(block_len as u64)).collect();
            order.sort_by_key(|i| (i ^ order_seed).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut file = vec![0u8; total as usize];
            let mut pieces = Vec::new();
            for index in order {
                let offset = index * block_len as u64;
                let mut block = vec![0u8; block_len];
                let len = fill_block(&mut block, offset, total, &slices, &starts, &mut pieces);
                file[offset as usize..offset as usize + len].copy_from_slice(&block[..len]);
            }
            proptest::prop_assert_eq!(file, chunks.concat());
            let expected: Vec<u32> = chunks.iter().map(|c| checksum::crc32c(c)).collect();
            proptest::prop_assert_eq!(chunk_checksums(chunks.len(), pieces), expected);
        }
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_limit() {
        // Other tests may take blocks meanwhile; none can push the count over the limit.
        let blocks: Vec<AlignedBlock> = (0..POOLED_BLOCKS + 3).map(|_| AlignedBlock::take()).collect();
        blocks.into_iter().for_each(AlignedBlock::recycle);
        let pooled = FREE_BLOCKS.lock().unwrap().len();
        assert!(pooled <= POOLED_BLOCKS, "{pooled} blocks pooled");
    }

    #[test]
    fn an_existing_file_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"keep").unwrap();
        let err = write_new_file(&path, &[b"new".as_slice()], 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }

    #[test]
    fn a_failing_device_write_stops_the_copy_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("read-only");
        std::fs::write(&path, b"").unwrap();
        let file = File::open(&path).unwrap(); // not writable: every write fails
        let big = pattern(BLOCK_BYTES * WRITES_IN_FLIGHT * 3, 9);
        let err = write_direct(&file, &[big.as_slice()], WRITES_IN_FLIGHT).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "the device's own error must surface: {err}");
    }

    #[test]
    fn buffered_writes_match_direct_ones() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = [pattern(5, 1), pattern(BLOCK_BYTES + 1, 2)];
        let slices: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let path = dir.path().join("b");
        let file = OpenOptions::new().write(true).create_new(true).open(&path).unwrap();
        let crcs = write_buffered(&file, &slices).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), chunks.concat());
        assert_eq!(crcs, write_new_file(&dir.path().join("d"), &slices, 1).unwrap());
    }
}
