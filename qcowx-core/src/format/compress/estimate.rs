//! A cheap guess at whether data is worth handing to the compressor: a sample's
//! byte entropy and its repeated 8-byte strings, in a few microseconds, where
//! compressing the sample to find out costs the zstd encoder's table set-up (about a
//! hundred times more on data that then does not shrink).

/// Bytes looked at: four pieces of this size, spread over the data.
const PIECE: usize = 1024;
const PIECES: usize = 4;

/// Below this many bits of order-0 entropy per byte, entropy coding alone saves at
/// least an eighth.
const ENTROPY_BITS: f64 = 7.0;

/// Slots of the table that finds repeated 8-byte strings in the sample.
const SLOTS: usize = 1 << 11;

/// Whether compressing `data` is likely to save at least about an eighth of it.
///
/// Looks at up to 4 KiB: four 1 KiB pieces spread over `data` a power of two apart (all of it when it is
/// shorter). Compressible when the sample's bytes carry under 7 bits of entropy
/// each, or when at least an eighth of its 8-byte strings (taken every 4 bytes)
/// repeat one seen before in the sample, as text, tables, zeros, copies of one block
/// do. Data that is random, already compressed or encrypted shows neither. A guess:
/// callers still keep the compressed form only when it is smaller.
///
/// ```
/// use qcowx_core::format::compress::likely_compressible;
///
/// let mut x = 0x9e37_79b9_7f4a_7c15u64;
/// let noise: Vec<u8> = (0..65536)
///     .map(|_| {
///         x ^= x << 13;
///         x ^= x >> 7;
///         x ^= x << 17;
///         x as u8
///     })
///     .collect();
/// assert!(!likely_compressible(&noise));
/// assert!(likely_compressible(&[0u8; 65536]));
/// assert!(likely_compressible(&b"the same words, over and over ".repeat(2000)));
/// // Random bytes whose 8 KiB repeat: the pieces, 16 KiB apart, find each other.
/// assert!(likely_compressible(&noise[..8192].repeat(8)));
/// ```
pub fn likely_compressible(data: &[u8]) -> bool {
    if data.is_empty() {
        return false;
    }
    let mut counts = [0u32; 256];
    let mut table = [None::<u64>; SLOTS];
    let (mut probes, mut repeats) = (0usize, 0usize);
    let mut sample = |piece: &[u8]| {
        for &b in piece {
            counts[usize::from(b)] += 1;
        }
        let mut at = 0;
        while at + 8 <= piece.len() {
            let key = u64::from_le_bytes(piece[at..at + 8].try_into().expect("8 bytes"));
            let slot = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 53) as usize % SLOTS;
            if table[slot] == Some(key) {
                repeats += 1;
            }
            table[slot] = Some(key);
            probes += 1;
            at += 4;
        }
    };
    if data.len() <= PIECE * PIECES {
        sample(data);
    } else {
        // A power of two apart, so pieces of data made of one repeated block (of a
        // power-of-two size, as disk blocks are) find each other.
        let most = (data.len() - PIECE) / (PIECES - 1);
        let stride = 1 << most.ilog2();
        for i in 0..PIECES {
            sample(&data[i * stride..i * stride + PIECE]);
        }
    }
    let total: u32 = counts.iter().sum();
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / f64::from(total);
            -p * p.log2()
        })
        .sum();
    entropy < ENTROPY_BITS || repeats * 8 >= probes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::compress::compress_zstd;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// The guess agrees with the compressor on kinds of data a disk holds: where it
    /// says no, zstd saves less than an eighth; where zstd saves a quarter or more, it
    /// says yes.
    #[test]
    fn agrees_with_the_compressor() {
        let n = 65536;
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("noise", noise(n, 1)),
            ("zeros", vec![0; n]),
            ("one byte", vec![0x5a; n]),
            (
                "text",
                b"Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(1200),
            ),
            ("noise block repeated", noise(4096, 2).repeat(16)),
            // Half noise, half zeros, in 512-byte sectors.
            ("sparse sectors", {
                let r = noise(n, 3);
                r.chunks(512)
                    .enumerate()
                    .flat_map(|(i, c)| if i % 2 == 0 { c.to_vec() } else { vec![0; 512] })
                    .collect()
            }),
            // Small integers in u32s: a table.
            (
                "table",
                (0..n / 4)
                    .flat_map(|i| ((i * 7 % 1000) as u32).to_le_bytes())
                    .collect(),
            ),
            // Bytes of 6 bits of entropy each.
            ("six bits", noise(n, 4).iter().map(|b| b & 0x3f).collect()),
        ];
        cases.push(("noise, 4 KiB", noise(4096, 5)));
        for (name, data) in &cases {
            let guess = likely_compressible(data);
            let saved = compress_zstd(data).map_or(0, |f| data.len() - f.len());
            if !guess {
                assert!(
                    saved * 8 < data.len(),
                    "{name}: said no, zstd saved {saved}"
                );
            }
            if saved * 4 >= data.len() {
                assert!(
                    guess,
                    "{name}: said no, zstd saved {saved} of {}",
                    data.len()
                );
            }
        }
        assert!(!likely_compressible(&noise(n, 6)));
        assert!(!likely_compressible(&[]));
    }
}
