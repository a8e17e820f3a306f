//! Generators of the model tests: where a random operation lands on a disk whose size
//! changes, and the position-dependent data a write puts there.

use proptest::prelude::*;

/// Where an operation lands, as selectors resolved against the disk size at the time
/// the operation runs (the size changes when the disk grows).
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// Any byte offset, any length up to a few clusters.
    Unaligned,
    /// Sector-aligned offset and length.
    Sectors,
    /// Whole clusters.
    Clusters,
    /// A range that ends exactly at the end of the disk.
    Tail,
}

/// A byte range of the disk, before it is resolved against the disk's size.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// How the range is aligned.
    pub shape: Shape,
    /// Selects the offset.
    pub off: u64,
    /// Selects the length.
    pub len: u64,
}

impl Range {
    /// The byte range `(offset, len)` on a disk of `size` bytes with `cs`-byte clusters.
    pub fn resolve(self, size: u64, cs: u64) -> (u64, u64) {
        let span = |max: u64| 1 + self.len % max;
        let (off, len) = match self.shape {
            Shape::Unaligned => (self.off % size, span(3 * cs)),
            Shape::Sectors => {
                let off = (self.off % size.div_ceil(512)) * 512;
                (off, 512 * span(3 * cs.div_ceil(512)))
            }
            Shape::Clusters => {
                let off = (self.off % size.div_ceil(cs)) * cs;
                (off, cs * span(4))
            }
            Shape::Tail => {
                let back = span(size.min(3 * cs));
                (size - back, back)
            }
        };
        (off, len.min(size - off))
    }
}

/// Ranges of every shape: unaligned 3, sectors 2, clusters 3, tail 1.
pub fn range() -> impl Strategy<Value = Range> {
    (
        prop_oneof![
            3 => Just(Shape::Unaligned),
            2 => Just(Shape::Sectors),
            3 => Just(Shape::Clusters),
            1 => Just(Shape::Tail),
        ],
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(shape, off, len)| Range { shape, off, len })
}

/// The byte a write with `seed` puts at guest offset `g`: it depends on both, so data
/// written to the wrong place or left over from an older write is noticed.
pub fn pattern_byte(seed: u8, g: u64) -> u8 {
    let x = (g ^ (u64::from(seed) << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ seed
}

/// The bytes a write with `seed` puts at guest offsets `off..off + len`
/// ([`pattern_byte`] of each).
pub fn guest_pattern(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (off..off + len).map(|g| pattern_byte(seed, g)).collect()
}
