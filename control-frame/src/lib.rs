//! The framing of dmemu's control socket (docs/control-socket.md, "Frames"), in one place for both
//! sides: the daemon, the library client, the CLI, the benchmarks and the `LD_PRELOAD` shim.
//!
//! Every message is a 16-byte little-endian header (magic, kind, flags, len, aux) and `len` payload
//! bytes. This crate has no dependencies, so the shim can link it into every process it is preloaded
//! into; it does no socket IO of its own beyond `Read`/`Write` helpers for `std` streams.

use std::fmt;
use std::io::{self, Read, Write};

/// The bytes `"DMEU"` read as a little-endian `u32`.
pub const MAGIC: u32 = 0x5545_4d44;
pub const HEADER_LEN: usize = 16;
/// Largest IOCTL payload: the u64 request number plus the kernel's 1 GiB `data_size` limit.
pub const MAX_IOCTL_PAYLOAD: u32 = 8 + (1 << 30);
/// Largest PLIST payload (proplib's own copy-in limit is far smaller; the daemon answers E2BIG).
pub const MAX_PLIST_PAYLOAD: u32 = 1 << 30;
/// Largest GENL payload: one netlink message; its attribute may exceed the 65,480-byte policy
/// bound (answered with `ERANGE`, as the kernel does) up to this frame bound.
pub const MAX_GENL_PAYLOAD: u32 = 128 * 1024;
/// Largest HELLO_REPLY a client accepts.
pub const MAX_HELLO_REPLY: u32 = 64 * 1024;
/// Largest HWH payload: one line of the userspace hardware handler's protocol
/// (docs/multipath-hwh.md), far more than its longest line (a 128-byte name, escaped).
pub const MAX_HWH_PAYLOAD: u32 = 4096;
/// Largest HWH_MSG a handler program accepts: a `pg_init` line carries the table's handler
/// arguments, escaped.
pub const MAX_HWH_MSG: u32 = 1 << 20;

/// Frame kinds; replies have bit 7 set.
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
    /// One line of a userspace hardware handler session (docs/multipath-hwh.md).
    Hwh = 7,
    /// A device-mapper-type ioctl (`_IOC_TYPE` 0xfd, e.g. `DM_MPATH_PROBE_PATHS`) on a device's
    /// block node (the shim's): minor and request number, two u32.
    DmBlkIoctl = 8,
    IoctlReply = 0x81,
    PlistReply = 0x82,
    HelloReply = 0x83,
    GenlReply = 0x85,
    BlkRoSetReply = 0x86,
    /// One line to a userspace hardware handler session: a reply or a request.
    HwhMsg = 0x87,
    DmBlkIoctlReply = 0x88,
    Event = 0x90,
}

impl Kind {
    const ALL: [Kind; 16] = [
        Kind::Ioctl,
        Kind::Plist,
        Kind::Hello,
        Kind::Cancel,
        Kind::Genl,
        Kind::BlkRoSet,
        Kind::Hwh,
        Kind::DmBlkIoctl,
        Kind::IoctlReply,
        Kind::PlistReply,
        Kind::HelloReply,
        Kind::GenlReply,
        Kind::BlkRoSetReply,
        Kind::HwhMsg,
        Kind::DmBlkIoctlReply,
        Kind::Event,
    ];

    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u16 == v)
    }

    /// The largest payload a client may send in a frame of this kind; `None` for the daemon's kinds.
    pub fn max_request_len(self) -> Option<u32> {
        match self {
            Kind::Ioctl => Some(MAX_IOCTL_PAYLOAD),
            Kind::Plist => Some(MAX_PLIST_PAYLOAD),
            Kind::Genl => Some(MAX_GENL_PAYLOAD),
            Kind::Hello | Kind::Cancel => Some(0),
            Kind::BlkRoSet | Kind::DmBlkIoctl => Some(8),
            Kind::Hwh => Some(MAX_HWH_PAYLOAD),
            _ => None,
        }
    }
}

/// The 16-byte header, field by field (all little-endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameHeader {
    pub magic: u32,
    pub kind: u16,
    /// Reserved: 0 (non-zero is refused).
    pub flags: u16,
    pub len: u32,
    /// Kind-specific, 0 unless stated.
    pub aux: u32,
}

impl FrameHeader {
    /// A well-formed header of `kind` announcing `len` payload bytes.
    pub fn new(kind: Kind, len: u32) -> Self {
        Self { magic: MAGIC, kind: kind as u16, flags: 0, len, aux: 0 }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&self.magic.to_le_bytes());
        out[4..6].copy_from_slice(&self.kind.to_le_bytes());
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..16].copy_from_slice(&self.aux.to_le_bytes());
        out
    }

    /// The fields of any 16 bytes, unchecked.
    pub fn decode(raw: &[u8; HEADER_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        Self { magic: u32_at(0), kind: u16_at(4), flags: u16_at(6), len: u32_at(8), aux: u32_at(12) }
    }

    /// Whether this is the daemon's `EVENT` (clients discard those wherever they find them).
    pub fn is_event(&self) -> bool {
        self.kind == Kind::Event as u16
    }
}

/// Why a frame header was refused (the connection is then closed).
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    Magic(u32),
    Flags(u16),
    Kind(u16),
    TooLong { len: u32, max: u32 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Magic(m) => write!(f, "bad magic {m:#x}"),
            FrameError::Flags(v) => write!(f, "non-zero flags {v:#x}"),
            FrameError::Kind(k) => write!(f, "unknown or unexpected frame kind {k:#x}"),
            FrameError::TooLong { len, max } => {
                write!(f, "payload of {len} bytes exceeds the {max}-byte bound for this kind")
            }
        }
    }
}

impl std::error::Error for FrameError {}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Checks magic and flags: what a client asks of any frame it receives.
pub fn parse_header(raw: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
    let h = FrameHeader::decode(raw);
    if h.magic != MAGIC {
        return Err(FrameError::Magic(h.magic));
    }
    if h.flags != 0 {
        return Err(FrameError::Flags(h.flags));
    }
    Ok(h)
}

/// Checks a request header as the daemon does: magic, flags, a client's kind, the kind's bound.
pub fn parse_request_header(raw: &[u8; HEADER_LEN]) -> Result<(Kind, FrameHeader), FrameError> {
    let h = parse_header(raw)?;
    let kind = Kind::from_u16(h.kind).ok_or(FrameError::Kind(h.kind))?;
    let max = kind.max_request_len().ok_or(FrameError::Kind(h.kind))?;
    if h.len > max {
        return Err(FrameError::TooLong { len: h.len, max });
    }
    Ok((kind, h))
}

/// The header of a frame of `kind` with `len` payload bytes.
///
/// # Panics
/// If `len` does not fit the header's `u32` (every kind's bound is far below it).
pub fn header(kind: Kind, len: usize) -> [u8; HEADER_LEN] {
    let len = u32::try_from(len).expect("frame payloads are bounded far below 4 GiB");
    FrameHeader::new(kind, len).encode()
}

/// Up-front reservation for a payload: only address space (pages are touched as bytes arrive),
/// and capped so a lying `len` cannot make a reader reserve more than this.
const RESERVE_CAP: usize = 256 << 20;

/// Reads exactly `len` payload bytes. `len` has been checked against the kind's bound; beyond
/// [`RESERVE_CAP`] the buffer grows only as bytes actually arrive.
pub fn read_payload(r: &mut impl Read, len: u32) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    // Where address space is short (strict overcommit), fall back to growing as bytes arrive.
    if buf.try_reserve_exact((len as usize).min(RESERVE_CAP)).is_err() {
        buf.reserve((len as usize).min(64 * 1024));
    }
    let got = r.take(u64::from(len)).read_to_end(&mut buf)?;
    if got != len as usize {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short frame"));
    }
    Ok(buf)
}

/// Reads the next frame that is not an `EVENT`: its header and payload. `max_len` bounds the
/// payload a client is willing to take.
pub fn read_frame(r: &mut impl Read, max_len: u32) -> io::Result<(FrameHeader, Vec<u8>)> {
    loop {
        let mut raw = [0u8; HEADER_LEN];
        r.read_exact(&mut raw)?;
        let h = parse_header(&raw)?;
        if h.len > max_len {
            return Err(FrameError::TooLong { len: h.len, max: max_len }.into());
        }
        let payload = read_payload(r, h.len)?;
        if !h.is_event() {
            return Ok((h, payload));
        }
    }
}

/// Writes one frame with a single write.
pub fn write_frame(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    out.extend_from_slice(&header(kind, len));
    for p in parts {
        out.extend_from_slice(p);
    }
    w.write_all(&out)
}

/// The status that starts `IOCTL_REPLY`, `PLIST_REPLY`, `BLKROSET_REPLY` and `DM_BLK_IOCTL_REPLY`
/// payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// The return value the caller's `ioctl` gives.
    pub ret: i32,
    /// 0 on success, else the errno.
    pub errno: i32,
}

pub const STATUS_LEN: usize = 8;

impl Status {
    pub fn encode(&self) -> [u8; STATUS_LEN] {
        let mut out = [0u8; STATUS_LEN];
        out[..4].copy_from_slice(&self.ret.to_le_bytes());
        out[4..].copy_from_slice(&self.errno.to_le_bytes());
        out
    }

    pub fn decode(raw: &[u8; STATUS_LEN]) -> Self {
        Self {
            ret: i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
            errno: i32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]),
        }
    }

    /// The status and the bytes after it, or `None` if the payload is shorter than a status.
    pub fn split(payload: &[u8]) -> Option<(Self, &[u8])> {
        let (status, rest) = payload.split_first_chunk::<STATUS_LEN>()?;
        Some((Self::decode(status), rest))
    }
}

/// A status reply payload: return value, errno, then the bytes to copy back.
pub fn status_reply(ret: i32, errno: i32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(STATUS_LEN + bytes.len());
    out.extend_from_slice(&Status { ret, errno }.encode());
    out.extend_from_slice(bytes);
    out
}

/// The HELLO_REPLY keys (`key=value` lines).
pub mod hello {
    /// DM block major.
    pub const MAJOR: &str = "major";
    /// Pseudo major of regular files used as underlying devices.
    pub const FILE_MAJOR: &str = "file_major";
    /// Absolute run directory (sysfs tree, device nodes).
    pub const RUN_DIR: &str = "run_dir";
    pub const VERSION: &str = "version";
    /// Absolute FUSE directory of device files, present only when the daemon serves one.
    pub const FUSE_DIR: &str = "fuse_dir";

    /// The value of `key` in a HELLO_REPLY body.
    pub fn field<'a>(body: &'a [u8], key: &str) -> Option<&'a [u8]> {
        body.split(|&c| c == b'\n').find_map(|line| line.strip_prefix(key.as_bytes())?.strip_prefix(b"="))
    }

    /// A HELLO_REPLY body from its fields, in order.
    pub fn encode(fields: &[(&str, &str)]) -> String {
        fields.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
    }
}

/// The daemon's default control socket when no path is given: `$DMEMU_SOCKET`, else
/// `/run/dmemu/control.sock` for root, else `$XDG_RUNTIME_DIR/dmemu/control.sock`, else
/// `/tmp/dmemu-<uid>/control.sock` (docs/control-socket.md). `env` reads an environment variable
/// (the shim's reads libc's environment directly); empty values count as unset.
pub fn default_socket(uid: u32, env: impl Fn(&str) -> Option<Vec<u8>>) -> Vec<u8> {
    let env = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(p) = env("DMEMU_SOCKET") {
        return p;
    }
    if uid == 0 {
        return b"/run/dmemu/control.sock".to_vec();
    }
    match env("XDG_RUNTIME_DIR") {
        Some(mut d) => {
            d.extend_from_slice(b"/dmemu/control.sock");
            d
        }
        None => format!("/tmp/dmemu-{uid}/control.sock").into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bounds_hold() {
        let h = header(Kind::Ioctl, 320);
        let (k, fh) = parse_request_header(&h).unwrap();
        assert_eq!((k, fh.len), (Kind::Ioctl, 320));
        assert_eq!(FrameHeader::decode(&fh.encode()), fh);
        let mut bad = header(Kind::Hello, 1);
        assert!(matches!(parse_request_header(&bad), Err(FrameError::TooLong { .. })));
        bad[0] = 0;
        assert!(matches!(parse_request_header(&bad), Err(FrameError::Magic(_))));
        assert!(matches!(parse_request_header(&header(Kind::Event, 0)), Err(FrameError::Kind(0x90))));
        assert!(matches!(parse_request_header(&header(Kind::HwhMsg, 0)), Err(FrameError::Kind(0x87))));
        assert!(parse_request_header(&header(Kind::Hwh, MAX_HWH_PAYLOAD as usize)).is_ok());
        let long = header(Kind::Hwh, MAX_HWH_PAYLOAD as usize + 1);
        assert!(matches!(parse_request_header(&long), Err(FrameError::TooLong { .. })));
        let mut flagged = header(Kind::Hello, 0);
        flagged[6] = 1;
        assert_eq!(parse_header(&flagged), Err(FrameError::Flags(1)));
    }

    #[test]
    fn layout_is_little_endian_in_declared_order() {
        let raw = FrameHeader { magic: MAGIC, kind: 0x0102, flags: 0, len: 0x0304_0506, aux: 0x0708_090a }.encode();
        assert_eq!(raw, [b'D', b'M', b'E', b'U', 2, 1, 0, 0, 6, 5, 4, 3, 0x0a, 9, 8, 7]);
    }

    #[test]
    fn every_kind_round_trips() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_u16(k as u16), Some(k));
        }
        assert_eq!(Kind::from_u16(0x84), None);
    }

    #[test]
    fn payload_reader_rejects_short_input() {
        let data = [1u8; 10];
        assert!(read_payload(&mut &data[..], 11).is_err());
        assert_eq!(read_payload(&mut &data[..], 10).unwrap().len(), 10);
    }

    #[test]
    fn frame_reader_skips_events_and_bounds_payloads() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Event, &[]).unwrap();
        write_frame(&mut wire, Kind::IoctlReply, &[&status_reply(-1, 6, b"v")]).unwrap();
        let (h, p) = read_frame(&mut &wire[..], 64).unwrap();
        assert_eq!(h.kind, Kind::IoctlReply as u16);
        let (st, rest) = Status::split(&p).unwrap();
        assert_eq!((st, rest), (Status { ret: -1, errno: 6 }, &b"v"[..]));
        assert!(read_frame(&mut &wire[..], 4).is_err());
        assert_eq!(Status::split(&[0; 7]), None);
    }

    #[test]
    fn hello_fields() {
        let body = hello::encode(&[(hello::MAJOR, "252"), (hello::RUN_DIR, "/run/dmemu")]);
        assert_eq!(hello::field(body.as_bytes(), hello::RUN_DIR), Some(&b"/run/dmemu"[..]));
        assert_eq!(hello::field(body.as_bytes(), "run"), None);
        assert_eq!(hello::field(body.as_bytes(), hello::FUSE_DIR), None);
    }

    #[test]
    fn default_socket_paths() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_bytes().to_vec())
        };
        assert_eq!(default_socket(0, env(&[("DMEMU_SOCKET", "/x.sock")])), b"/x.sock");
        assert_eq!(default_socket(0, env(&[("DMEMU_SOCKET", "")])), b"/run/dmemu/control.sock");
        assert_eq!(default_socket(7, env(&[("XDG_RUNTIME_DIR", "/run/user/7")])), b"/run/user/7/dmemu/control.sock");
        assert_eq!(default_socket(7, env(&[])), b"/tmp/dmemu-7/control.sock");
    }
}
