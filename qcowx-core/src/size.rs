//! Sizes as `qemu-img` spells them: parsing (`64M`, `1.5G`) and the human-readable
//! form (`88.5 KiB`).
//!
//! [`parse_size`] takes what `qemu-img`'s size arguments take — leading white space,
//! an optional `+`, a decimal number (a leading zero does not make it octal) with an
//! optional fraction, and an optional one-letter suffix `B`, `K`, `M`, `G`, `T`, `P`
//! or `E` in either case (powers of 1024) — or a hexadecimal number (`0x10`, `0X1f`),
//! which takes neither a fraction nor a suffix (`0x1B` is 27). A fraction needs a
//! suffix larger than bytes unless it is zero (`1.0` is 1); the fraction of a byte
//! it leaves is rounded half up (`12.345M` is 12944671), as `qemu-img` does. The
//! arithmetic is exact over the whole `u64` range: there is no floating point.

/// Why a size does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// Nothing (or only white space) was given.
    #[error("the size is empty")]
    Empty,
    /// A minus sign.
    #[error("sizes cannot be negative")]
    Negative,
    /// A hexadecimal number (`0x…`) with a fraction, a suffix or no digits.
    #[error("a hexadecimal size is 0x and hex digits, with no fraction or suffix")]
    Hexadecimal,
    /// No digits before the suffix.
    #[error("expected a number with an optional K, M, G, T, P or E suffix")]
    NoNumber,
    /// A fraction of a byte.
    #[error("a fraction needs a suffix (K, M, G, T, P or E)")]
    FractionNeedsSuffix,
    /// Something other than one of the suffixes after the number.
    #[error("unknown suffix '{0}' (use K, M, G, T, P or E)")]
    UnknownSuffix(String),
    /// More than `u64::MAX` bytes.
    #[error("too large (at most 16 EiB - 1)")]
    TooLarge,
}

/// Parses a size as `qemu-img` does (see the module documentation).
///
/// ```
/// use qcowx_core::size::parse_size;
///
/// assert_eq!(parse_size("512").unwrap(), 512);
/// assert_eq!(parse_size("64k").unwrap(), 64 << 10);
/// assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
/// assert!(parse_size("10X").is_err());
/// ```
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    // C's isspace: space, \t, \n, \v, \f, \r.
    let t = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    if t.starts_with('-') {
        return Err(SizeError::Negative);
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let digits = |x: &str| x.find(|c: char| !c.is_ascii_digit()).unwrap_or(x.len());
    let (int, rest) = t.split_at(digits(t));
    if !int.is_empty() && int.bytes().all(|b| b == b'0') && rest.starts_with(['x', 'X']) {
        return parse_hex(int, &rest[1..]);
    }
    let (frac, suffix) = match rest.strip_prefix('.') {
        Some(r) => r.split_at(digits(r)),
        None => ("", rest),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(SizeError::NoNumber);
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        other => return Err(SizeError::UnknownSuffix(other.to_string())),
    };
    if shift == 0 && frac.bytes().any(|b| b != b'0') {
        return Err(SizeError::FractionNeedsSuffix);
    }
    // The integer part: exact, with overflow checked digit by digit.
    let mut whole: u64 = 0;
    for b in int.bytes() {
        whole = whole
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or(SizeError::TooLarge)?;
    }
    let scaled = u128::from(whole) << shift;
    let total = scaled + u128::from(fraction_bytes(frac, shift));
    u64::try_from(total).map_err(|_| SizeError::TooLarge)
}

/// `0x` and hex digits (`int` is what came before the `x`): exactly one zero, at
/// least one digit, nothing after them.
fn parse_hex(int: &str, digits: &str) -> Result<u64, SizeError> {
    if int != "0" || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SizeError::Hexadecimal);
    }
    let significant = digits.trim_start_matches('0');
    if significant.len() > 16 {
        return Err(SizeError::TooLarge);
    }
    Ok(u64::from_str_radix(digits, 16).unwrap_or(0))
}

/// The bytes `0.FRAC × 2^shift` gives, rounded half up: the decimal digits are
/// doubled `shift` times (what carries out of the first digit is whole bytes), and
/// the first digit left decides the rounding. Exact for any number of digits.
fn fraction_bytes(frac: &str, shift: u32) -> u64 {
    let mut d: Vec<u8> = frac.bytes().map(|b| b - b'0').collect();
    let mut whole: u64 = 0;
    for _ in 0..shift {
        let mut carry = 0u8;
        for x in d.iter_mut().rev() {
            let v = *x * 2 + carry;
            *x = v % 10;
            carry = v / 10;
        }
        // A fraction below 1 doubled at most 60 times stays below 2^60.
        whole = whole * 2 + u64::from(carry);
    }
    whole + u64::from(d.first().is_some_and(|&x| x >= 5))
}

/// Formats a byte count as `qemu-img` does in human output: three significant digits
/// and a binary unit (`0 B`, `88.5 KiB`, `1 GiB`).
///
/// ```
/// use qcowx_core::size::size_to_str;
///
/// assert_eq!(size_to_str(0), "0 B");
/// assert_eq!(size_to_str(90_624), "88.5 KiB");
/// assert_eq!(size_to_str(1 << 30), "1 GiB");
/// ```
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // Switch to the next unit once the value would print as 1000 or more.
    let mut i = 0usize;
    while i + 1 < SUFFIXES.len() && (val as f64) >= 1000.0 * (1u64 << (10 * i)) as f64 {
        i += 1;
    }
    let v = val as f64 / (1u64 << (10 * i)) as f64;
    format!("{} {}B", format_g3(v), SUFFIXES[i])
}

/// C's `%0.3g` for non-negative values.
fn format_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let mut exp = v.log10().floor() as i32;
    // Rounding to three significant digits may carry into the next power of ten.
    let scale = 10f64.powi(2 - exp);
    if (v * scale).round() >= 1000.0 {
        exp += 1;
    }
    if !(-4..3).contains(&exp) {
        let m = format!("{:.2}", v / 10f64.powi(exp));
        return format!(
            "{}e{}{:02}",
            trim_zeros(&m),
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        );
    }
    let decimals = (2 - exp).max(0) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const EIB: u64 = 1 << 60;

    #[test]
    fn parses_what_qemu_img_parses() {
        for (s, want) in [
            ("0", 0),
            ("1", 1),
            ("0x10", 16),
            ("0X10", 16),
            ("0x0", 0),
            ("0x100000", MIB),
            ("0x1B", 27),
            ("0x1e", 30),
            (" +0x0000000000000000001f", 31),
            ("0xffffffffffffffff", u64::MAX),
            ("512", 512),
            ("512B", 512),
            ("1b", 1),
            ("4k", 4 * KIB),
            ("4K", 4 * KIB),
            ("64M", 64 * MIB),
            ("2g", 2 * GIB),
            ("1T", 1 << 40),
            ("1P", 1 << 50),
            ("1E", EIB),
            ("15E", 15 * EIB),
            // A leading zero is not octal.
            ("010", 10),
            ("00", 0),
            ("012345", 12345),
            // Fractions with a suffix, exact, rounded half up.
            ("1.5G", 3 << 29),
            (".5K", 512),
            ("0.5E", EIB / 2),
            ("1.k", KIB),
            ("5.5e", 11 * EIB / 2),
            ("12.345M", 12_944_671),
            ("0.0004K", 0),
            ("0.0005K", 1),
            ("0.000244140625K", 0),
            ("0.00048828125K", 1),
            ("1.00000000000000000000001K", KIB),
            // A fraction of zero is tolerated without a suffix.
            ("1.0", 1),
            ("1.0B", 1),
            ("1.", 1),
            ("0.0", 0),
            // White space and a plus sign before the number.
            (" 1", 1),
            ("\t\n1", 1),
            ("+1", 1),
            (" +64k", 64 * KIB),
        ] {
            assert_eq!(parse_size(s), Ok(want), "{s:?}");
        }
    }

    #[test]
    fn is_exact_to_the_last_byte_of_u64() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_size("9007199254740993"), Ok((1 << 53) + 1));
        assert_eq!(parse_size("16777215T"), Ok((16_777_215) << 40));
        assert_eq!(parse_size("15.5E"), Ok(15 * EIB + EIB / 2));
        // (1 - 1e-18) * 2^60 = 2^60 - 1.1529..., rounded half up: 2^60 - 1.
        assert_eq!(parse_size("15.999999999999999999E"), Ok(u64::MAX));
        // (1 - 1e-22) * 2^60 rounds to 2^60: 16 EiB.
        assert_eq!(
            parse_size("15.9999999999999999999999E"),
            Err(SizeError::TooLarge)
        );
    }

    #[test]
    fn refuses_what_qemu_img_refuses() {
        for (s, want) in [
            ("", SizeError::Empty),
            (" \t ", SizeError::Empty),
            ("-1", SizeError::Negative),
            ("-0", SizeError::Negative),
            (" -1K", SizeError::Negative),
            ("16E", SizeError::TooLarge),
            ("20E", SizeError::TooLarge),
            ("18446744073709551616", SizeError::TooLarge),
            ("99999999999999999999999", SizeError::TooLarge),
            ("1.5", SizeError::FractionNeedsSuffix),
            ("1.1B", SizeError::FractionNeedsSuffix),
            ("0.5", SizeError::FractionNeedsSuffix),
            (
                "1.0000000000000000000000000000001B",
                SizeError::FractionNeedsSuffix,
            ),
            ("G", SizeError::NoNumber),
            (".", SizeError::NoNumber),
            (".K", SizeError::NoNumber),
            ("crap", SizeError::NoNumber),
            ("inf", SizeError::NoNumber),
            ("NaN", SizeError::NoNumber),
            ("++1", SizeError::NoNumber),
            ("+ 1", SizeError::NoNumber),
        ] {
            assert_eq!(parse_size(s), Err(want), "{s:?}");
        }
        // Hexadecimal: no fraction, no suffix, one leading zero, some digits.
        for s in [
            "0x", "00x1", "0x10k", "0x1.8k", "0x18M", "0x1g", " 0x", "0xz",
        ] {
            assert_eq!(parse_size(s), Err(SizeError::Hexadecimal), "{s:?}");
        }
        assert_eq!(parse_size("0x1ffffffffffffffff"), Err(SizeError::TooLarge));
        for (s, suffix) in [
            ("12Q", "Q"),
            ("1KiB", "KiB"),
            ("1kiB", "kiB"),
            ("1KB", "KB"),
            ("1 ", " "),
            ("1K2", "K2"),
            ("1.5kk", "kk"),
            ("1.2.3K", ".3K"),
            ("1e3", "e3"),
            ("1.5e1k", "e1k"),
            ("123-45", "-45"),
            ("1_000", "_000"),
            ("0.NaN", "NaN"),
            ("1x", "x"),
        ] {
            assert_eq!(
                parse_size(s),
                Err(SizeError::UnknownSuffix(suffix.into())),
                "{s:?}"
            );
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let msg = |s: &str| parse_size(s).unwrap_err().to_string();
        assert!(msg("12Q").contains("unknown suffix 'Q'"));
        assert!(msg("-1").contains("negative"));
        assert!(msg("").contains("empty"));
        assert!(msg("1.5").contains("fraction needs a suffix"));
        assert!(msg("16E").contains("too large"));
        assert!(msg("0x10M").contains("hexadecimal"));
    }

    #[test]
    fn formats_like_qemu_size_to_str() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(94208), "92 KiB");
        assert_eq!(size_to_str(90624), "88.5 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(10 << 20), "10 MiB");
        assert_eq!(size_to_str(1_073_741_823), "1 GiB");
        assert_eq!(size_to_str(123_456_789), "118 MiB");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
    }
}
