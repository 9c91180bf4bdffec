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
