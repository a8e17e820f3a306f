//! Sizes on the command line and in human output, spelled as `qemu-img` spells them.

/// Parses a size as `qemu-img` does: a decimal number with an optional one-letter
/// suffix `B`, `K`, `M`, `G`, `T`, `P` or `E` (either case; powers of 1024). A fraction
/// (`1.5G`) is allowed with a suffix larger than bytes and is rounded down to a byte.
pub fn parse_size(s: &str) -> Result<u64, String> {
    if s.is_empty() {
        return Err("the size is empty".into());
    }
    if s.starts_with('-') {
        return Err("sizes cannot be negative".into());
    }
    let int_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (int_part, rest) = s.split_at(int_end);
    let (frac_part, rest) = match rest.strip_prefix('.') {
        Some(r) => {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            r.split_at(end)
        }
        None => ("", rest),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err("expected a number with an optional K, M, G, T, P or E suffix".into());
    }
    let mul: u64 = match rest {
        "" | "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return Err(format!("unknown suffix '{rest}' (use K, M, G, T, P or E)")),
    };
    if !frac_part.is_empty() && mul == 1 {
        return Err("a fraction needs a suffix (K, M, G, T, P or E)".into());
    }
    let too_large = || "too large (at most 16 EiB - 1)".to_string();
    let int: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| too_large())?
    };
    let mut total = u128::from(int) * u128::from(mul);
    if !frac_part.is_empty() {
        // Beyond 18 digits the fraction cannot change the byte count (mul <= 2^60).
        let digits = &frac_part[..frac_part.len().min(18)];
        let num: u128 = digits.parse().map_err(|_| too_large())?;
        total += num * u128::from(mul) / 10u128.pow(digits.len() as u32);
    }
    u64::try_from(total).map_err(|_| too_large())
}

/// Formats a byte count as `qemu-img` does in human output: three significant digits
/// and a binary unit (`0 B`, `88.5 KiB`, `1 GiB`).
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

    #[test]
    fn parses_suffixes_like_qemu_img() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("1E"), Ok(1 << 60));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size(".5K"), Ok(512));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
    }

    #[test]
    fn rejects_bad_sizes_with_a_reason() {
        for (bad, why) in [
            ("", "empty"),
            ("-1", "negative"),
            ("12Q", "unknown suffix 'Q'"),
            ("1KiB", "unknown suffix 'KiB'"),
            ("G", "expected a number"),
            ("1.5", "fraction needs a suffix"),
            ("16E", "too large"),
            ("99999999999999999999", "too large"),
        ] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
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
    }
}
