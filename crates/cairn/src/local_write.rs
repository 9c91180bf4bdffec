//! Durable writes of new local files at the disk's speed.
//!
//! Buffered writes are bound by the copy into the page cache, and their fsync then waits
//! for writeback; direct I/O (`O_DIRECT`) sends large aligned blocks straight to the
//! device. The data goes through a few aligned bounce buffers: one thread copies the
//! caller's bytes into a buffer and checksums them while they are hot in the cache, a
//! second thread writes the previous buffer, so the copy, the checksum and the device
//! overlap and each byte of the state is read from memory once. Extra memory is the
//! fixed set of buffers, whatever the file's size.
//!
//! Where the filesystem refuses direct I/O (tmpfs, some network filesystems), or off
//! Linux, the same file is written with ordinary writes instead. Either way the file is
//! fsynced before returning; making its name durable (the directory's fsync) is the
//! caller's job, once for all the files of a folder.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc;

/// Alignment of direct I/O offsets, lengths and buffers (the largest common logical
/// block size).
const ALIGN: usize = 4096;
/// Size of one bounce buffer: one write request to the device.
const BLOCK_BYTES: usize = 8 << 20;
/// Bounce buffers per file: one being filled, the others queued or being written.
const BLOCKS_PER_FILE: usize = 3;
/// Bytes copied before checksumming them, so the checksum reads from the cache.
const CHECKSUM_STEP: usize = 256 << 10;

#[cfg(target_os = "linux")]
const DIRECT_FLAG: i32 = libc::O_DIRECT;
#[cfg(not(target_os = "linux"))]
const DIRECT_FLAG: i32 = 0;

/// Writes the concatenation of `chunks` as the new file `path` (it must not exist) and
/// fsyncs it. Returns the CRC-32C of each chunk, computed over the bytes written.
pub(crate) fn write_new_file(path: &Path, chunks: &[&[u8]]) -> io::Result<Vec<u32>> {
    if DIRECT_FLAG != 0 {
        match OpenOptions::new().write(true).create_new(true).custom_flags(DIRECT_FLAG).open(path) {
            Ok(file) => match write_direct(&file, chunks) {
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
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
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
        crcs.push(crc32c::crc32c(chunk));
        file.write_all_at(chunk, offset)?;
        offset += chunk.len() as u64;
    }
    file.set_len(offset)?;
    file.sync_all()?;
    Ok(crcs)
}

/// A heap buffer whose usable part starts at an `ALIGN`-aligned address.
struct AlignedBlock {
    storage: Vec<u8>,
    start: usize,
}

impl AlignedBlock {
    fn new() -> AlignedBlock {
        let storage = vec![0u8; BLOCK_BYTES + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        AlignedBlock { storage, start }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + BLOCK_BYTES]
    }
}

/// A filled block on its way to the writer: its bytes `[0, len)` go at `offset`.
struct Filled {
    block: AlignedBlock,
    len: usize,
    offset: u64,
}

/// The direct-I/O pipeline: this thread copies and checksums into aligned blocks, a
/// scoped writer thread writes them in order. The last block is padded to the
/// alignment with zeros and the file cut back to its real length.
fn write_direct(file: &File, chunks: &[&[u8]]) -> io::Result<Vec<u32>> {
    let (filled_tx, filled_rx) = mpsc::sync_channel::<Filled>(BLOCKS_PER_FILE);
    let (free_tx, free_rx) = mpsc::channel::<AlignedBlock>();
    for _ in 0..BLOCKS_PER_FILE {
        let _ = free_tx.send(AlignedBlock::new());
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> io::Result<()> {
            for Filled { mut block, len, offset } in filled_rx {
                let padded = len.next_multiple_of(ALIGN);
                block.bytes()[len..padded].fill(0);
                file.write_all_at(&block.bytes()[..padded], offset)?;
                if free_tx.send(block).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let copied = fill_blocks(chunks, &free_rx, &filled_tx);
        drop(filled_tx);
        let written = writer.join().unwrap_or_else(|_| Err(io::Error::other("direct writer thread panicked")));
        // A writer failure also stops the copier; report the writer's error first.
        written?;
        let (crcs, total) = copied?;
        file.set_len(total)?;
        Ok(crcs)
    })
}

/// Copies `chunks` back to back into blocks taken from `free`, checksumming each chunk,
/// and hands every full block (and the last partial one) to `filled`. Returns the
/// checksums and the total length; stops early if the writer went away.
fn fill_blocks(
    chunks: &[&[u8]],
    free: &mpsc::Receiver<AlignedBlock>,
    filled: &mpsc::SyncSender<Filled>,
) -> io::Result<(Vec<u32>, u64)> {
    let writer_gone = || io::Error::other("direct writer stopped");
    let mut crcs = Vec::with_capacity(chunks.len());
    let mut block = free.recv().map_err(|_| writer_gone())?;
    let mut len = 0usize;
    let mut offset = 0u64;
    for chunk in chunks {
        let mut crc = 0u32;
        let mut rest: &[u8] = chunk;
        while !rest.is_empty() {
            let n = rest.len().min(BLOCK_BYTES - len).min(CHECKSUM_STEP);
            let target = &mut block.bytes()[len..len + n];
            target.copy_from_slice(&rest[..n]);
            crc = crc32c::crc32c_append(crc, target);
            rest = &rest[n..];
            len += n;
            if len == BLOCK_BYTES {
                filled.send(Filled { block, len, offset }).map_err(|_| writer_gone())?;
                offset += len as u64;
                len = 0;
                block = free.recv().map_err(|_| writer_gone())?;
            }
        }
        crcs.push(crc);
    }
    if len > 0 {
        filled.send(Filled { block, len, offset }).map_err(|_| writer_gone())?;
    }
    Ok((crcs, offset + len as u64))
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
            let crcs = write_new_file(&path, &slices).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), chunks.concat(), "size {size}");
            let expected: Vec<u32> = chunks.iter().map(|c| crc32c::crc32c(c)).collect();
            assert_eq!(crcs, expected, "size {size}");
        }
    }

    #[test]
    fn an_existing_file_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"keep").unwrap();
        let err = write_new_file(&path, &[b"new".as_slice()]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }

    #[test]
    fn a_failing_device_write_stops_the_copy_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("read-only");
        std::fs::write(&path, b"").unwrap();
        let file = File::open(&path).unwrap(); // not writable: every write fails
        let big = pattern(BLOCK_BYTES * BLOCKS_PER_FILE * 3, 9);
        let err = write_direct(&file, &[big.as_slice()]).unwrap_err();
        assert_ne!(err.to_string(), "direct writer stopped", "the writer's own error must surface");
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
        assert_eq!(crcs, write_new_file(&dir.path().join("d"), &slices).unwrap());
    }
}
