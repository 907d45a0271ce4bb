//! A userspace hardware handler program's connection to the daemon (docs/multipath-hwh.md):
//! command lines out in `HWH` frames, the daemon's lines in from `HWH_MSG` frames. The two halves
//! are separate so a program can answer from other threads while one thread reads.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;

use dmemu_frame::{self as frame, Kind};

use super::ClientError;
use crate::targets::multipath::handler::userspace::wire::{Command, Message};

/// Reads the daemon's lines.
pub struct HwhReader {
    stream: UnixStream,
}

/// Sends command lines.
pub struct HwhWriter {
    stream: UnixStream,
}

/// Connects to the daemon at `socket` (the session starts with the first command sent).
pub fn connect(socket: &Path) -> io::Result<(HwhReader, HwhWriter)> {
    let stream = UnixStream::connect(socket)?;
    let writer = stream.try_clone()?;
    Ok((HwhReader { stream }, HwhWriter { stream: writer }))
}

impl HwhWriter {
    pub fn send(&mut self, cmd: &Command) -> io::Result<()> {
        self.send_line(&cmd.to_string())
    }

    /// Sends any text as one line (for tests of malformed input).
    pub fn send_line(&mut self, line: &str) -> io::Result<()> {
        frame::write_frame(&mut self.stream, Kind::Hwh, &[line.as_bytes()])
    }
}

impl HwhReader {
    /// The daemon's next line, `None` once it has closed the connection.
    pub fn recv(&mut self) -> Result<Option<Message>, ClientError> {
        let (h, payload) = match frame::read_frame(&mut self.stream, frame::MAX_HWH_MSG) {
            Ok(f) => f,
            Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        if h.kind != Kind::HwhMsg as u16 {
            return Err(ClientError::Protocol(format!("unexpected frame kind {:#x} on a handler session", h.kind)));
        }
        let line = std::str::from_utf8(&payload)
            .map_err(|_| ClientError::Protocol("a handler line that is not UTF-8".into()))?;
        Message::parse(line).map(Some).map_err(|e| ClientError::Protocol(format!("handler line {line:?}: {e}")))
    }
}
