//! Clients of the control socket (docs/control-socket.md): a connection that sends raw ioctls
//! ([`Client`]) and a builder for `struct dm_ioctl` buffers ([`IoctlBuf`]); the daemon's facts and
//! starting one ([`daemon`]); the dm-switch page-table upload ([`switch`]); a userspace hardware
//! handler program's session ([`hwh`]). Used by the CLI subcommands, the benchmarks and the tests;
//! the framing itself is the `dmemu-frame` crate, which the daemon and the shim share.

pub mod daemon;
pub mod hwh;
pub mod switch;

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use dmemu_frame::{self as frame, Kind, Status};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::ioctl::layout::{align8, DmCmd, DmFlags, DmIoctl, DmTargetSpec, DM_IOCTL_SIZE, DM_VERSION};

/// What can go wrong on the client side of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The daemon answered, with an error.
    #[error("{what}: {}", io::Error::from_raw_os_error(*errno))]
    Errno { what: String, errno: i32 },
    /// The daemon's answer was not what the protocol says it sends.
    #[error("{0}")]
    Protocol(String),
    /// The request cannot be made (the caller's input is out of range, the device is not what it
    /// should be).
    #[error("{0}")]
    Invalid(String),
}

/// What one ioctl returned: the return value, errno, and the bytes copied back.
#[derive(Debug)]
pub struct IoctlResult {
    pub ret: i32,
    pub errno: i32,
    pub bytes: Vec<u8>,
}

impl IoctlResult {
    /// `Ok(self)` if the ioctl succeeded, else its errno, labelled `what`.
    pub fn check(self, what: &str) -> Result<Self, ClientError> {
        if self.ret < 0 {
            return Err(ClientError::Errno { what: what.to_owned(), errno: self.errno });
        }
        Ok(self)
    }

    /// The reply header (zero-extended if the reply was shorter).
    pub fn header(&self) -> DmIoctl {
        let mut buf = [0u8; DM_IOCTL_SIZE];
        let n = self.bytes.len().min(DM_IOCTL_SIZE);
        buf[..n].copy_from_slice(&self.bytes[..n]);
        DmIoctl::read_from_bytes(&buf).expect("312 bytes")
    }
}

pub struct Client {
    stream: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> io::Result<Self> {
        Ok(Self { stream: UnixStream::connect(path)? })
    }

    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// Sends one IOCTL frame and waits for its reply, skipping EVENT frames.
    pub fn ioctl(&mut self, request: u64, buf: &[u8]) -> io::Result<IoctlResult> {
        frame::write_frame(&mut self.stream, Kind::Ioctl, &[&request.to_le_bytes(), buf])?;
        self.reply(Kind::IoctlReply)
    }

    /// Sends one PLIST frame (`NETBSD_DM_IOCTL`: the XML with its NUL) and waits for the
    /// PLIST_REPLY, skipping EVENT frames. `bytes` is the reply XML (NUL included, empty when the
    /// copy-in failed).
    pub fn plist(&mut self, xml: &[u8]) -> io::Result<IoctlResult> {
        frame::write_frame(&mut self.stream, Kind::Plist, &[xml])?;
        self.reply(Kind::PlistReply)
    }

    /// Reads frames up to the reply of kind `want` (return value, errno, bytes), skipping EVENTs.
    fn reply(&mut self, want: Kind) -> io::Result<IoctlResult> {
        let (h, payload) = frame::read_frame(&mut self.stream, frame::MAX_IOCTL_PAYLOAD)?;
        match Status::split(&payload) {
            Some((st, bytes)) if h.kind == want as u16 => {
                Ok(IoctlResult { ret: st.ret, errno: st.errno, bytes: bytes.to_vec() })
            }
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected reply frame")),
        }
    }

    /// Sends one frame of `kind` and returns the payload of the next frame that is not an EVENT,
    /// which must be of kind `want`.
    pub fn exchange(&mut self, kind: Kind, payload: &[u8], want: Kind) -> Result<Vec<u8>, ClientError> {
        frame::write_frame(&mut self.stream, kind, &[payload])?;
        let (h, payload) = frame::read_frame(&mut self.stream, frame::MAX_IOCTL_PAYLOAD)?;
        if h.kind != want as u16 {
            return Err(ClientError::Protocol(format!("unexpected reply frame kind {:#x}", h.kind)));
        }
        Ok(payload)
    }

    /// Sends raw bytes (for malformed-input tests).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Runs a command built with [`IoctlBuf`].
    pub fn run(&mut self, b: &IoctlBuf) -> io::Result<IoctlResult> {
        self.ioctl(b.cmd.request(), &b.bytes())
    }
}

/// Builds a `struct dm_ioctl` request buffer the way libdevmapper does (data_start 312, the payload
/// after it, `data_size` covering a buffer of at least `size` bytes).
#[derive(Clone)]
pub struct IoctlBuf {
    pub cmd: DmCmd,
    pub header: DmIoctl,
    pub payload: Vec<u8>,
    /// Total buffer size to claim (at least header + payload).
    pub size: usize,
}

impl IoctlBuf {
    pub fn new(cmd: DmCmd) -> Self {
        let mut header = DmIoctl::new_zeroed();
        header.version = DM_VERSION;
        header.data_start = DM_IOCTL_SIZE as u32;
        header.set_flags(DmFlags::EXISTS);
        Self { cmd, header, payload: Vec::new(), size: 16 * 1024 }
    }

    pub fn name(mut self, name: &str) -> Self {
        self.header.name = [0; 128];
        self.header.name[..name.len()].copy_from_slice(name.as_bytes());
        self
    }

    pub fn uuid(mut self, uuid: &str) -> Self {
        self.header.uuid = [0; 129];
        self.header.uuid[..uuid.len()].copy_from_slice(uuid.as_bytes());
        self
    }

    pub fn flags(mut self, f: DmFlags) -> Self {
        self.header.set_flags(self.header.flags() | f);
        self
    }

    /// A NUL-terminated string payload (rename, geometry).
    pub fn string(mut self, s: &str) -> Self {
        self.payload = s.as_bytes().to_vec();
        self.payload.push(0);
        self
    }

    /// A TARGET_MSG payload.
    pub fn message(mut self, sector: u64, msg: &str) -> Self {
        self.payload = sector.to_le_bytes().to_vec();
        self.payload.extend_from_slice(msg.as_bytes());
        self.payload.push(0);
        self
    }

    /// A TABLE_LOAD payload: `(start, length, type, params)` per target, `next` relative to the
    /// current spec, parameters padded to 8 as libdm does.
    pub fn table<'a>(mut self, targets: impl IntoIterator<Item = (u64, u64, &'a str, &'a str)>) -> Self {
        let mut out = Vec::new();
        let mut count = 0u32;
        for (start, length, ty, params) in targets {
            let mut spec = DmTargetSpec::new_zeroed();
            spec.sector_start = start;
            spec.length = length;
            spec.target_type[..ty.len()].copy_from_slice(ty.as_bytes());
            let rec = align8(std::mem::size_of::<DmTargetSpec>() + params.len() + 1);
            spec.next = rec as u32;
            let at = out.len();
            out.extend_from_slice(spec.as_bytes());
            out.extend_from_slice(params.as_bytes());
            out.resize(at + rec, 0);
            count += 1;
        }
        self.header.target_count = count;
        self.payload = out;
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let total = (DM_IOCTL_SIZE + self.payload.len()).max(self.size);
        let mut h = self.header;
        h.data_size = total as u32;
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&self.payload);
        out.resize(total, 0);
        out
    }
}
