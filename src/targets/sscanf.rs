//! The kernel's number parsers as the `flakey`, `dust` and `delay` constructors and messages use them,
//! reproduced exactly rather than approximated with [`crate::dm::target::parse_u64`]: the two
//! differ at the edges (a `+` sign, a 32-bit field given a 64-bit number), and those edges decide
//! whether a table loads.

/// The kernel's `isspace` in the ASCII range.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// The number `vsscanf` reads for an unsigned conversion: leading white space skipped, then at
/// least one decimal digit (no sign), accumulated modulo 2^64 as `simple_strntoull` does; the
/// rest of the string is returned.
fn scan_unsigned(s: &str) -> Option<(u64, &str)> {
    let b = s.as_bytes();
    let start = b.iter().position(|&c| !is_space(c)).unwrap_or(b.len());
    let digits = b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let v = b[start..start + digits].iter().fold(0u64, |v, &c| v.wrapping_mul(10).wrapping_add((c - b'0') as u64));
    Some((v, &s[start + digits..]))
}

/// `sscanf(s, "%llu%c", &v, &dummy) == 1`: a number and nothing after it.
pub fn llu(s: &str) -> Option<u64> {
    match scan_unsigned(s)? {
        (v, "") => Some(v),
        _ => None,
    }
}

/// `sscanf(s, "%u%c", &v, &dummy) == 1` (`dm_read_arg`, dust's write-fail count): as [`llu`],
/// then stored into an `unsigned int`, so a number past 2^32 − 1 is silently truncated to its
/// low 32 bits before any range check sees it.
pub fn u(s: &str) -> Option<u32> {
    llu(s).map(|v| v as u32)
}

/// `kstrtouint(s, 10, &v) == 0`: an optional `+`, decimal digits, an optional single trailing
/// newline; overflow of 32 bits is an error (ERANGE), not a truncation.
pub fn kstrtouint(s: &str) -> Option<u32> {
    let s = s.strip_prefix('+').unwrap_or(s);
    let s = s.strip_suffix('\n').unwrap_or(s);
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanf_forms() {
        assert_eq!(llu("42"), Some(42));
        assert_eq!(llu(" 42"), Some(42));
        assert_eq!(llu("42 "), None);
        assert_eq!(llu("+42"), None);
        assert_eq!(llu("-1"), None);
        assert_eq!(llu("4x"), None);
        assert_eq!(llu(""), None);
        assert_eq!(llu("18446744073709551616"), Some(0), "wraps modulo 2^64");
        assert_eq!(u("4294967296"), Some(0), "truncated to 32 bits");
        assert_eq!(u("4294967297"), Some(1));
        assert_eq!(kstrtouint("+512"), Some(512));
        assert_eq!(kstrtouint("512\n"), Some(512));
        assert_eq!(kstrtouint("4294967296"), None);
        assert_eq!(kstrtouint(" 512"), None);
        assert_eq!(kstrtouint("0x200"), None);
    }
}
