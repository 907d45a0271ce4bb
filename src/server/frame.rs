//! Framing on the control socket (docs/control-socket.md): a 16-byte header, then the payload.
//! Pure functions, so they can be fuzzed without a socket.

use std::io::{self, Read, Write};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const MAGIC: u32 = 0x5545_4d44;
pub const HEADER_LEN: usize = 16;
/// Largest IOCTL payload: the u64 request number plus the kernel's 1 GiB `data_size` limit.
pub const MAX_IOCTL_PAYLOAD: u32 = 8 + (1 << 30);
/// Largest PLIST payload (proplib's own limit is far smaller; see the NetBSD codec).
pub const MAX_PLIST_PAYLOAD: u32 = 1 << 30;
/// Largest GENL payload: one netlink message; its attribute may exceed the 65,480-byte policy
/// bound (answered with `ERANGE`, as the kernel does) up to this frame bound.
pub const MAX_GENL_PAYLOAD: u32 = 128 * 1024;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct FrameHeader {
    pub magic: u32,
    pub kind: u16,
    pub flags: u16,
    pub len: u32,
    pub aux: u32,
}
const _: () = assert!(core::mem::size_of::<FrameHeader>() == HEADER_LEN);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Ioctl = 1,
    Plist = 2,
    Hello = 3,
    Cancel = 4,
    /// The RFC dm-switch generic-netlink upload (docs/protocols.md).
    Genl = 5,
    /// `BLKROSET` on a device's block node (the shim's): minor and value, two u32.
    BlkRoSet = 6,
    IoctlReply = 0x81,
    PlistReply = 0x82,
    HelloReply = 0x83,
    GenlReply = 0x85,
    BlkRoSetReply = 0x86,
    Event = 0x90,
}

impl Kind {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Kind::Ioctl,
            2 => Kind::Plist,
            3 => Kind::Hello,
            4 => Kind::Cancel,
            5 => Kind::Genl,
            6 => Kind::BlkRoSet,
            0x81 => Kind::IoctlReply,
            0x82 => Kind::PlistReply,
            0x83 => Kind::HelloReply,
            0x85 => Kind::GenlReply,
            0x86 => Kind::BlkRoSetReply,
            0x90 => Kind::Event,
            _ => return None,
        })
    }

    /// The largest payload a client may send in a frame of this kind.
    pub fn max_request_len(self) -> Option<u32> {
        match self {
            Kind::Ioctl => Some(MAX_IOCTL_PAYLOAD),
            Kind::Plist => Some(MAX_PLIST_PAYLOAD),
            Kind::Genl => Some(MAX_GENL_PAYLOAD),
            Kind::Hello | Kind::Cancel => Some(0),
            Kind::BlkRoSet => Some(8),
            _ => None,
        }
    }
}

/// Why a frame header was refused (the connection is then closed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#x}")]
    Magic(u32),
    #[error("non-zero flags {0:#x}")]
    Flags(u16),
    #[error("unknown or unexpected frame kind {0:#x}")]
    Kind(u16),
    #[error("payload of {len} bytes exceeds the {max}-byte bound for this kind")]
    TooLong { len: u32, max: u32 },
}

/// Checks a request header and returns its kind.
pub fn parse_request_header(raw: &[u8; HEADER_LEN]) -> Result<(Kind, FrameHeader), FrameError> {
    let h = FrameHeader::read_from_bytes(raw).expect("16 bytes");
    if h.magic != MAGIC {
        return Err(FrameError::Magic(h.magic));
    }
    if h.flags != 0 {
        return Err(FrameError::Flags(h.flags));
    }
    let kind = Kind::from_u16(h.kind).ok_or(FrameError::Kind(h.kind))?;
    let max = kind.max_request_len().ok_or(FrameError::Kind(h.kind))?;
    if h.len > max {
        return Err(FrameError::TooLong { len: h.len, max });
    }
    Ok((kind, h))
}

pub fn header(kind: Kind, len: usize) -> [u8; HEADER_LEN] {
    let h = FrameHeader { magic: MAGIC, kind: kind as u16, flags: 0, len: len as u32, aux: 0 };
    let mut out = [0u8; HEADER_LEN];
    out.copy_from_slice(h.as_bytes());
    out
}

/// Up-front reservation for a payload: only address space (pages are touched as bytes arrive),
/// and capped so a lying `len` cannot make the daemon reserve more than this per connection.
const RESERVE_CAP: usize = 256 << 20;

/// Reads exactly `len` payload bytes. `len` has been checked against the kind's bound; beyond
/// [`RESERVE_CAP`] the buffer grows only as bytes actually arrive.
pub fn read_payload(r: &mut impl Read, len: u32) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    // Where address space is short (strict overcommit), fall back to growing as bytes arrive.
    if buf.try_reserve_exact((len as usize).min(RESERVE_CAP)).is_err() {
        buf.reserve((len as usize).min(64 * 1024));
    }
    let got = r.take(len as u64).read_to_end(&mut buf)?;
    if got != len as usize {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short frame"));
    }
    Ok(buf)
}

/// Writes one frame with a single write where possible.
pub fn write_frame(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    out.extend_from_slice(&header(kind, len));
    for p in parts {
        out.extend_from_slice(p);
    }
    w.write_all(&out)
}

/// An IOCTL_REPLY payload: return value, errno, bytes to copy back.
pub fn ioctl_reply(ret: i32, errno: i32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + bytes.len());
    out.extend_from_slice(&ret.to_le_bytes());
    out.extend_from_slice(&errno.to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bounds_hold() {
        let h = header(Kind::Ioctl, 320);
        let (k, fh) = parse_request_header(&h).unwrap();
        assert_eq!((k, fh.len), (Kind::Ioctl, 320));
        let mut bad = header(Kind::Hello, 1);
        assert!(matches!(parse_request_header(&bad), Err(FrameError::TooLong { .. })));
        bad[0] = 0;
        assert!(matches!(parse_request_header(&bad), Err(FrameError::Magic(_))));
        assert!(matches!(parse_request_header(&header(Kind::Event, 0)), Err(FrameError::Kind(0x90))));
    }

    #[test]
    fn payload_reader_rejects_short_input() {
        let data = [1u8; 10];
        assert!(read_payload(&mut &data[..], 11).is_err());
        assert_eq!(read_payload(&mut &data[..], 10).unwrap().len(), 10);
    }
}
