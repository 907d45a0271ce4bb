//! Small value types shared by the engine and the codecs.

use std::fmt;

use super::error::DmError;

/// A count or offset in 512-byte sectors, the unit of every DM table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sectors(pub u64);

impl Sectors {
    pub const SIZE: u64 = 512;
    /// In bytes, saturating: a table may be longer than 2^64 bytes, and a size or a range check
    /// must then see "more than any offset", never a wrapped small number.
    pub fn bytes(self) -> u64 {
        self.0.saturating_mul(Self::SIZE)
    }
    /// In bytes, or `None` past 2^64 - 1.
    pub fn checked_bytes(self) -> Option<u64> {
        self.0.checked_mul(Self::SIZE)
    }
}

impl fmt::Display for Sectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Longest device name, without the NUL (DM_NAME_LEN = 128: linux-dm-abi.md §1.1).
pub const DM_NAME_MAX: usize = 127;
/// Longest uuid, without the NUL (DM_UUID_LEN = 129).
pub const DM_UUID_MAX: usize = 128;
/// Minors are limited to MINORBITS = 20 (linux-dm-abi.md §1.7).
pub const MINOR_LIMIT: u32 = 1 << 20;
/// The kernel's DM_MAX_TARGETS (linux-dm-abi.md §1.1).
pub const MAX_TARGETS: usize = 1_048_576;

/// Writes bytes as text for logs and messages: valid UTF-8 as is, any other byte as `\xNN`.
pub fn write_escaped(f: &mut fmt::Formatter<'_>, b: &[u8]) -> fmt::Result {
    for chunk in b.utf8_chunks() {
        f.write_str(chunk.valid())?;
        for x in chunk.invalid() {
            write!(f, "\\x{x:02x}")?;
        }
    }
    Ok(())
}

/// Bytes shown as [`write_escaped`] does.
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, self.0)
    }
}

/// A device name that passed the kernel's `check_name` (non-empty, no `/`, not `control`, `.`, `..`,
/// at most 127 bytes). Any other byte is allowed: names are C strings, not text (linux-dm-abi.md
/// §2.4), so a NUL cannot be part of one.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DmName(Box<[u8]>);

impl DmName {
    pub fn new(s: impl AsRef<[u8]>) -> Result<Self, DmError> {
        let s = s.as_ref();
        if s.is_empty() || s.len() > DM_NAME_MAX {
            return Err(DmError::Invalid(format!("invalid device name length {}", s.len())));
        }
        if s.contains(&b'/') || s.contains(&0) || matches!(s, b"control" | b"." | b"..") {
            return Err(DmError::Invalid(format!("invalid device name \"{}\"", Escaped(s))));
        }
        Ok(Self(s.into()))
    }
    /// The name as the kernel holds it (without the NUL).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// The name when it is UTF-8 (an NBD export name must be).
    pub fn to_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl fmt::Display for DmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, &self.0)
    }
}

impl fmt::Debug for DmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DmName(\"{self}\")")
    }
}

/// A non-empty uuid of at most 128 bytes. The kernel checks nothing else (no `check_name` for
/// uuids); like a name it is a C string, so it holds no NUL. A device may have none, so it is
/// carried as `Option<DmUuid>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DmUuid(Box<[u8]>);

impl DmUuid {
    pub fn new(s: impl AsRef<[u8]>) -> Result<Self, DmError> {
        let s = s.as_ref();
        if s.is_empty() || s.len() > DM_UUID_MAX {
            return Err(DmError::Invalid(format!("invalid uuid length {}", s.len())));
        }
        if s.contains(&0) {
            return Err(DmError::Invalid(format!("invalid uuid \"{}\"", Escaped(s))));
        }
        Ok(Self(s.into()))
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for DmUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, &self.0)
    }
}

impl fmt::Debug for DmUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DmUuid(\"{self}\")")
    }
}

/// A block device number. Printed as `major:minor` like the kernel's `format_dev_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }
    /// The kernel's "huge" encoding used in `dm_ioctl.dev`, name lists and deps (linux-dm-abi.md §1.7).
    pub fn huge_encode(self) -> u64 {
        let (maj, min) = (self.major as u64, self.minor as u64);
        (min & 0xff) | (maj << 8) | ((min & !0xff) << 12)
    }
    pub fn huge_decode(v: u64) -> Self {
        Self { major: ((v & 0xfff00) >> 8) as u32, minor: ((v & 0xff) | ((v >> 12) & 0xfff00)) as u32 }
    }
    /// Parses `major:minor` as the kernel's `dm_get_device` does (decimal, nothing else).
    pub fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.split_once(':')?;
        let ok = |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit());
        if !ok(a) || !ok(b) {
            return None;
        }
        Some(Self::new(a.parse().ok()?, b.parse().ok()?))
    }
}

impl fmt::Display for DevNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// How a device is named in a request (linux-dm-abi.md §2.2). Forbidden mixes are rejected by the
/// codec before a command is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevKey {
    /// Name bytes, without the NUL.
    Name(Vec<u8>),
    /// Uuid bytes, without the NUL.
    Uuid(Vec<u8>),
    Dev(DevNum),
}

impl fmt::Display for DevKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DevKey::Name(n) => write!(f, "name \"{}\"", Escaped(n)),
            DevKey::Uuid(u) => write!(f, "uuid \"{}\"", Escaped(u)),
            DevKey::Dev(d) => write!(f, "dev {d}"),
        }
    }
}

/// Which status text a target is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusType {
    Info,
    Table,
    Ima,
}

/// Disk geometry as set by DM_DEV_SET_GEOMETRY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u64,
    pub heads: u64,
    pub sectors: u64,
    pub start: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_encoding_matches_makedev_for_small_numbers() {
        let d = DevNum::new(252, 0);
        assert_eq!(d.huge_encode(), 0xfc00);
        assert_eq!(DevNum::huge_decode(0xfc00), d);
        let big = DevNum::new(252, 0x12345);
        assert_eq!(DevNum::huge_decode(big.huge_encode()), big);
    }

    #[test]
    fn names_follow_check_name() {
        assert!(DmName::new("a").is_ok());
        for bad in ["", "a/b", "control", ".", ".."] {
            assert!(DmName::new(bad).is_err(), "{bad}");
        }
        assert!(DmName::new("x".repeat(128)).is_err());
        assert!(DmName::new("x".repeat(127)).is_ok());
    }

    #[test]
    fn names_and_uuids_are_bytes() {
        let n = DmName::new(b"caf\xe9").unwrap();
        assert_eq!(n.as_bytes(), b"caf\xe9");
        assert_eq!(n.to_str(), None);
        assert_eq!(n.to_string(), "caf\\xe9");
        assert_eq!(format!("{n:?}"), "DmName(\"caf\\xe9\")");
        assert_eq!(DmName::new("café").unwrap().to_string(), "café");
        for bad in [&b"\xff/x"[..], b"a\0b"] {
            assert!(DmName::new(bad).is_err());
        }
        // Byte order is strcmp order: 0xe9 sorts after every ASCII byte.
        assert!(DmName::new(b"caf\xe9").unwrap() > DmName::new("caff").unwrap());
        let u = DmUuid::new(b"\x01\xfe/..").unwrap();
        assert_eq!(u.as_bytes(), b"\x01\xfe/..");
        assert_eq!(u.to_string(), "\u{1}\\xfe/..");
        assert!(DmUuid::new(vec![0xffu8; 128]).is_ok());
        for bad in [&b""[..], &[0xff; 129], b"a\0"] {
            assert!(DmUuid::new(bad).is_err());
        }
    }
}
