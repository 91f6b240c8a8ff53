//! Human sizes: `4KiB`, `1MiB`, `64k`, `1048576`.

use crate::CoreError;

/// Parses a byte size with an optional binary suffix (`K`, `KB`, `KiB`, `M`, ... are all
/// powers of 1024, as block sizes always are).
pub fn parse_size(text: &str) -> Result<u64, CoreError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(CoreError::Size { text: text.into(), reason: "no digits" });
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| CoreError::Size { text: text.into(), reason: "number too large" })?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(CoreError::Size { text: text.into(), reason: "unknown suffix" }),
    };
    n.checked_mul(1u64 << shift)
        .ok_or(CoreError::Size { text: text.into(), reason: "number too large" })
}

/// Formats a byte size the way `parse_size` reads it (`4KiB`, `1MiB`, `1000`).
pub fn format_size(n: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip() {
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("17"), Ok(17));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("4XB").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        for n in [1u64, 4096, 1 << 20, 3 << 30, 1000] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
    }
}
