//! A bitset over regions in the kernel's little-endian bit order (`set_bit_le`: bit `i` is bit
//! `i % 8` of byte `i / 8`), sized as dm-log.c sizes it: the region count rounded up to a whole
//! number of 64-bit words (`BITS_PER_LONG`), so its bytes are what the disk log writes.

/// See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bits {
    bytes: Vec<u8>,
}

impl Bits {
    /// The bitset's size in bytes for `regions` regions.
    pub fn byte_len(regions: u64) -> usize {
        (regions.div_ceil(64) * 8) as usize
    }

    /// Every bit set (`memset(-1)`) or clear.
    pub fn new(regions: u64, set: bool) -> Self {
        Bits { bytes: vec![if set { 0xff } else { 0 }; Self::byte_len(regions)] }
    }

    pub fn from_bytes(bytes: &[u8]) -> Self {
        Bits { bytes: bytes.to_vec() }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn test(&self, i: u64) -> bool {
        self.bytes.get((i / 8) as usize).is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    pub fn set(&mut self, i: u64) {
        if let Some(b) = self.bytes.get_mut((i / 8) as usize) {
            *b |= 1 << (i % 8);
        }
    }

    pub fn clear(&mut self, i: u64) {
        if let Some(b) = self.bytes.get_mut((i / 8) as usize) {
            *b &= !(1 << (i % 8));
        }
    }

    /// Set bits in the whole bitset (`memweight`).
    pub fn count(&self) -> u64 {
        self.bytes.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// The first clear bit at or after `from` and below `limit` (`find_next_zero_bit_le`).
    pub fn next_zero(&self, from: u64, limit: u64) -> Option<u64> {
        (from..limit).find(|&i| !self.test(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn little_endian_bit_order_and_word_rounding() {
        assert_eq!(Bits::byte_len(1), 8);
        assert_eq!(Bits::byte_len(64), 8);
        assert_eq!(Bits::byte_len(65), 16);
        let mut b = Bits::new(70, false);
        b.set(0);
        b.set(9);
        b.set(69);
        assert_eq!(&b.as_bytes()[..2], &[0x01, 0x02]);
        assert_eq!(b.as_bytes()[8], 0x20);
        assert_eq!(b.count(), 3);
        assert_eq!(b.next_zero(0, 70), Some(1));
        b.clear(9);
        assert!(!b.test(9) && b.test(69));
        assert!(!b.test(1_000_000), "beyond the set reads as clear");
        let full = Bits::new(10, true);
        assert_eq!(full.next_zero(0, 10), None);
    }
}
