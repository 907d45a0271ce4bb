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

/// A device name that passed the kernel's `check_name` (non-empty, no `/`, not `control`, `.`, `..`,
/// at most 127 bytes).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DmName(String);

impl DmName {
    pub fn new(s: &str) -> Result<Self, DmError> {
        if s.is_empty() || s.len() > DM_NAME_MAX {
            return Err(DmError::Invalid(format!("invalid device name length {}", s.len())));
        }
        if s.contains('/') || s == "control" || s == "." || s == ".." {
            return Err(DmError::Invalid(format!("invalid device name {s:?}")));
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A non-empty uuid of at most 128 bytes. A device may have none, so it is carried as `Option<DmUuid>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DmUuid(String);

impl DmUuid {
    pub fn new(s: &str) -> Result<Self, DmError> {
        if s.is_empty() || s.len() > DM_UUID_MAX {
            return Err(DmError::Invalid(format!("invalid uuid length {}", s.len())));
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DmUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
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
    Name(String),
    Uuid(String),
    Dev(DevNum),
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
        assert!(DmName::new(&"x".repeat(128)).is_err());
    }
}
