//! Refcount block entries: 1 to 64 bits each, big-endian, packed as QCOW2 packs them.

/// Reads refcount entry `index` of a refcount block.
///
/// ```
/// use qcowx_core::format::refblock::{get_entry, set_entry};
///
/// // 16-bit refcounts (order 4), big-endian.
/// let mut block = vec![0u8; 512];
/// set_entry(&mut block, 4, 3, 0x0102);
/// assert_eq!(&block[6..8], &[1, 2]);
/// assert_eq!(get_entry(&block, 4, 3), 0x0102);
/// // 1-bit refcounts (order 0), least significant bit first.
/// set_entry(&mut block, 0, 9, 1);
/// assert_eq!(block[1], 0b10);
/// assert_eq!(get_entry(&block, 0, 9), 1);
/// ```
pub fn get_entry(block: &[u8], order: u32, index: usize) -> u64 {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = index * bits;
        let byte = block.get(bit / 8).copied().unwrap_or(0);
        u64::from((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8)
    } else {
        let n = bits / 8;
        let start = index * n;
        block.get(start..start + n).map_or(0, |b| {
            b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
        })
    }
}

/// Writes refcount entry `index` of a refcount block (the value must fit).
///
/// ```
/// use qcowx_core::format::refblock::{get_entry, set_entry};
///
/// let mut block = vec![0u8; 64];
/// set_entry(&mut block, 6, 1, u64::MAX); // 64-bit entries
/// assert_eq!(get_entry(&block, 6, 1), u64::MAX);
/// assert_eq!(get_entry(&block, 6, 0), 0);
/// ```
pub fn set_entry(block: &mut [u8], order: u32, index: usize, value: u64) {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = index * bits;
        let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
        if let Some(b) = block.get_mut(bit / 8) {
            *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
    } else {
        let n = bits / 8;
        let start = index * n;
        if let Some(dst) = block.get_mut(start..start + n) {
            let be = value.to_be_bytes();
            dst.copy_from_slice(&be[8 - n..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_every_width() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..10 {
                set_entry(&mut block, order, i, (i as u64 * 7919) & max);
            }
            for i in 0..10 {
                assert_eq!(
                    get_entry(&block, order, i),
                    (i as u64 * 7919) & max,
                    "order {order}"
                );
            }
        }
        // 16-bit entries are big-endian.
        let mut block = vec![0u8; 4];
        set_entry(&mut block, 4, 1, 0x0102);
        assert_eq!(block, [0, 0, 1, 2]);
    }
}
