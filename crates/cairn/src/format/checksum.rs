//! CRC-32C (Castagnoli), the checksum of every shard header and tensor piece, computed
//! with `crc-fast` (carry-less multiplication; AVX-512 where the CPU has it: about twice
//! the speed of the SSE4.2 `crc32` instruction on data that is not in cache); and XXH3-128,
//! the content identity of a tensor (32 bits detect damage, but 10,000 ranks' contents
//! collide on them about once in a hundred saves; 128 bits do not).

use crc_fast::{CrcAlgorithm, Digest};

const ALGORITHM: CrcAlgorithm = CrcAlgorithm::Crc32Iscsi;

/// The CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::crc32_iscsi(data)
}

/// The CRC-32C of `first` followed by `second`, from the checksums of each and the
/// length of `second`.
pub fn combine(first: u32, second: u32, second_len: u64) -> u32 {
    crc_fast::checksum_combine(ALGORITHM, u64::from(first), u64::from(second), second_len) as u32
}

/// The content identity of `data`: its XXH3-128. Equal contents give equal ids; distinct
/// contents of the same length collide with probability about 2^-128 per pair.
pub fn content_id(data: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(data)
}

/// Bytes of `data` between two sampled lines of [`content_sample`].
pub const SAMPLE_STRIDE: usize = 64 << 10;
/// Bytes of each sampled line of [`content_sample`].
pub const SAMPLE_LINE: usize = 64;

/// A sparse fingerprint of `data`: the XXH3-64 of its first [`SAMPLE_LINE`] bytes at
/// every multiple of [`SAMPLE_STRIDE`], then of its last [`SAMPLE_LINE`] bytes (all of
/// `data` when it holds no more than that). Equal contents have equal samples, so a
/// sample that differs proves a change at the cost of reading one byte in a thousand;
/// an equal one proves nothing (compare [`content_id`]s then).
pub fn content_sample(data: &[u8]) -> u64 {
    if data.len() <= SAMPLE_STRIDE {
        return xxhash_rust::xxh3::xxh3_64(data);
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for line in data.chunks(SAMPLE_STRIDE) {
        hasher.update(&line[..line.len().min(SAMPLE_LINE)]);
    }
    hasher.update(&data[data.len() - SAMPLE_LINE..]);
    hasher.digest()
}

/// A CRC-32C over data given in parts.
pub struct Crc32c(Digest);

impl Crc32c {
    /// The checksum of nothing yet.
    pub fn new() -> Self {
        Self(Digest::new(ALGORITHM))
    }

    /// Adds `data` after what was given before.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The CRC-32C of everything given.
    pub fn value(&self) -> u32 {
        self.0.finalize() as u32
    }
}

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_the_standard_check_values() {
        // The check value of CRC-32C (RFC 3720, B.4) and of the empty input.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn content_ids_tell_contents_apart() {
        // XXH3-128's published value for the empty input.
        assert_eq!(content_id(b""), 0x99aa_06d3_0147_98d8_6001_c324_468d_497f);
        assert_eq!(content_id(&[7u8; 4096]), content_id(&[7u8; 4096]));
        assert_ne!(content_id(&[0u8; 8]), content_id(&[0u8; 9]));
        assert_ne!(content_id(b"rank 1 rng"), content_id(b"rank 2 rng"));
    }

    #[test]
    fn samples_are_equal_for_equal_contents_and_see_changes_at_the_sampled_bytes() {
        let mut data: Vec<u8> = (0..3 * SAMPLE_STRIDE + 100).map(|i| (i % 251) as u8).collect();
        let sample = content_sample(&data);
        assert_eq!(sample, content_sample(&data.clone()));
        data[SAMPLE_STRIDE + 1] ^= 1; // a sampled byte
        assert_ne!(content_sample(&data), sample);
        data[SAMPLE_STRIDE + 1] ^= 1;
        data[SAMPLE_STRIDE + SAMPLE_LINE] ^= 1; // between two sampled lines
        assert_eq!(content_sample(&data), sample, "a sample reads only its lines");
        assert_ne!(content_sample(&data[..data.len() - 1]), sample);
        assert_ne!(content_sample(b"a"), content_sample(b"b"));
    }

    proptest! {
        #[test]
        fn parts_and_combinations_give_the_checksum_of_the_whole(
            data in proptest::collection::vec(any::<u8>(), 0..5000),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
            cuts.push(0);
            cuts.push(data.len());
            cuts.sort_unstable();
            let mut parts = Crc32c::new();
            let mut combined = crc32c(b"");
            for pair in cuts.windows(2) {
                let part = &data[pair[0]..pair[1]];
                parts.update(part);
                combined = combine(combined, crc32c(part), part.len() as u64);
            }
            prop_assert_eq!(parts.value(), crc32c(&data));
            prop_assert_eq!(combined, crc32c(&data));
        }
    }
}
