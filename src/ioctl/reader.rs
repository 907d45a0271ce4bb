//! Bounds-checked reads from an untrusted buffer, in the style of rustls' `codec.rs`: every read
//! names its offset and length, fails with a [`ReadError`] instead of panicking, never indexes
//! out of range and never allocates.

use core::fmt;
use core::mem::size_of;

use zerocopy::FromBytes;

/// Why a read failed. Offsets are from the start of the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// `len` bytes at `offset` do not fit in the `available` bytes (or the end overflowed).
    OutOfBounds { offset: usize, len: usize, available: usize },
    /// No NUL between `offset` and the end of the buffer.
    Unterminated { offset: usize, available: usize },
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ReadError::OutOfBounds { offset, len, available } => {
                write!(f, "{len} bytes at offset {offset} lie outside the {available}-byte buffer")
            }
            ReadError::Unterminated { offset, available } => {
                write!(f, "string at offset {offset} is not NUL-terminated within {available} bytes")
            }
        }
    }
}

impl std::error::Error for ReadError {}

/// A read-only view of an untrusted buffer.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// `len` bytes at `offset`.
    pub fn bytes(&self, offset: usize, len: usize) -> Result<&'a [u8], ReadError> {
        let oob = ReadError::OutOfBounds { offset, len, available: self.buf.len() };
        let end = offset.checked_add(len).ok_or(oob)?;
        self.buf.get(offset..end).ok_or(oob)
    }

    /// A copy of the `T` stored (unaligned) at `offset`.
    pub fn read<T: FromBytes>(&self, offset: usize) -> Result<T, ReadError> {
        let b = self.bytes(offset, size_of::<T>())?;
        T::read_from_bytes(b).map_err(|_| ReadError::OutOfBounds {
            offset,
            len: size_of::<T>(),
            available: self.buf.len(),
        })
    }

    /// The C string at `offset`, without its NUL; the NUL must lie inside the buffer (the kernel's
    /// `invalid_str`).
    pub fn cstr(&self, offset: usize) -> Result<&'a [u8], ReadError> {
        let unterminated = ReadError::Unterminated { offset, available: self.buf.len() };
        let tail = self.buf.get(offset..).ok_or(unterminated)?;
        let len = tail.iter().position(|&b| b == 0).ok_or(unterminated)?;
        tail.get(..len).ok_or(unterminated)
    }
}

/// `offset + rel` for an offset taken from the wire, `None` on overflow.
pub fn offset_add(offset: usize, rel: u32) -> Option<usize> {
    offset.checked_add(usize::try_from(rel).ok()?)
}

/// The C string held in a fixed-size field: up to the first NUL, or the whole field when there is
/// none (`strnlen`).
pub fn field_str(field: &[u8]) -> &[u8] {
    field.split(|&b| b == 0).next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_structs_are_bounds_checked() {
        let buf = [1u8, 0, 0, 0, 2, 0, 0, 0, 3];
        let r = Reader::new(&buf);
        assert_eq!(r.bytes(8, 1), Ok(&[3u8][..]));
        assert_eq!(r.bytes(9, 0), Ok(&[][..]));
        assert_eq!(r.bytes(8, 2), Err(ReadError::OutOfBounds { offset: 8, len: 2, available: 9 }));
        assert!(r.bytes(usize::MAX, 2).is_err());
        assert!(r.bytes(10, 0).is_err());
        assert_eq!(r.read::<u32>(4), Ok(u32::from_ne_bytes([2, 0, 0, 0])));
        assert_eq!(r.read::<u32>(5), Ok(u32::from_ne_bytes([0, 0, 0, 3])));
        assert!(r.read::<u32>(6).is_err());
        assert!(r.read::<u64>(usize::MAX - 2).is_err());
    }

    #[test]
    fn cstr_needs_its_nul_inside_the_buffer() {
        let r = Reader::new(b"ab\0cd");
        assert_eq!(r.cstr(0), Ok(&b"ab"[..]));
        assert_eq!(r.cstr(2), Ok(&b""[..]));
        assert_eq!(r.cstr(3), Err(ReadError::Unterminated { offset: 3, available: 5 }));
        assert!(r.cstr(5).is_err());
        assert!(r.cstr(usize::MAX).is_err());
    }

    #[test]
    fn field_str_is_strnlen() {
        assert_eq!(field_str(b"abc\0def"), b"abc");
        assert_eq!(field_str(b"abc"), b"abc");
        assert_eq!(field_str(b""), b"");
        assert_eq!(field_str(b"\0"), b"");
    }

    #[test]
    fn offsets_do_not_wrap() {
        assert_eq!(offset_add(8, 4), Some(12));
        assert_eq!(offset_add(usize::MAX, 1), None);
    }
}
