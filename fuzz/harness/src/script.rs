//! Numbers decoded from fuzz-chosen bytes.

/// Reads big-endian numbers from a byte string; past its end every read gives 0, so
/// any byte string is a valid script.
#[derive(Debug, Clone)]
pub struct Script<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Script<'a> {
    /// A script over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Script<'a> {
        Script { bytes, pos: 0 }
    }

    /// Whether every byte was read.
    pub fn is_done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        let b = self.bytes.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    /// The next two bytes, big-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    /// The next four bytes, big-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// One of `n` choices (0 when `n` is 0).
    pub fn pick(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            usize::from(self.u8()) % n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_the_end_give_zero() {
        let mut s = Script::new(&[1, 2, 3]);
        assert_eq!(s.u16(), 0x0102);
        assert!(!s.is_done());
        assert_eq!(s.u32(), 0x0300_0000);
        assert!(s.is_done());
        assert_eq!(s.pick(5), 0);
        assert_eq!(s.pick(0), 0);
    }
}
