//! Parsing and printing byte sizes the way users write them: `4096`, `4K`, `4k`, `1MiB`, `1.5G`, `1GB`.
//! Binary multiples throughout (K = KiB = 1024), as fio does.

use crate::error::{Error, Result};

/// Parses a size such as `4K`, `1MiB`, `1G` or `512`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        Error::invalid(format!(
            "'{s}' is not a size (examples: 4096, 4K, 1MiB, 2G)"
        ))
    };
    if num.is_empty() {
        return Err(bad());
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| bad())?;
        let bytes = v * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(bad());
        }
        return Ok(bytes.round() as u64);
    }
    let v: u64 = num.parse().map_err(|_| bad())?;
    v.checked_mul(mult)
        .ok_or_else(|| Error::invalid(format!("size '{s}' is too large")))
}

/// Formats bytes with a binary unit: `4.0 KiB`, `1.5 GiB`.
pub fn format_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        for bad in ["", "K", "4X", "-1", "99999999999999999999", "1e9"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_size("16777216T").unwrap_err().kind(),
            crate::ErrorKind::InvalidInput
        );
        assert_eq!(format_bytes(1536.0), "1.5 KiB");
    }
}
