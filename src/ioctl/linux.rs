//! The Linux `dm_ioctl` codec: a caller's ioctl buffer in, a typed [`Request`] out; a typed
//! [`Reply`](crate::dm::Reply) in, the bytes the kernel would copy back out.
//!
//! Both directions are pure functions. The shim forwards `(request, buf)` where `buf` is exactly the
//! `data_size` bytes the caller's header claims (docs/control-socket.md); the server calls
//! [`decode`], runs the engine, then [`encode`] (or [`encode_error`] / [`encode_version`]), and
//! sends [`Encoded`] back for the shim to copy to the start of the caller's buffer.
//!
//! The kernel's order of checks (linux-dm-abi.md §2.1) decides which errno a malformed request
//! gets, so [`decode`] follows `ctl_ioctl` step by step.

mod decode;
mod encode;

pub use decode::decode;
pub use encode::{encode, encode_error, encode_version};

use crate::dm::{DevKey, DmError, Request};

use super::layout::{DmCmd, DmIoctl};

/// What [`decode`] made of a request.
// One per ioctl, moved once: boxing the command would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// DM_VERSION: nothing to run; answer with [`encode_version`].
    Version,
    Command(DecodedIoctl),
}

/// A decoded DM command plus what [`encode`] needs to build the kernel's reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedIoctl {
    pub request: Request,
    /// The command number (`_IOC_NR`); always `cmd.nr()`.
    pub nr: u8,
    pub cmd: DmCmd,
    /// The input header after `validate_params` (input-only flags cleared, name/uuid
    /// force-terminated): the reply starts from it.
    pub header: DmIoctl,
    /// The input bytes the reply is built on: all `param_size` bytes for commands that can return a
    /// payload (the kernel never writes padding, so the caller's bytes show through), the 305-byte
    /// header otherwise.
    pub input: Vec<u8>,
    /// The buffer size the kernel handler works with: the input `data_size`, or 305 for the
    /// no-params commands (§2.1 step 5).
    pub param_size: usize,
    /// DM_SECURE_DATA_FLAG was set: the kernel zeroes `param_size` bytes of the caller's buffer
    /// right after copying them in, so they read back as zeros unless the reply overwrites them.
    pub secure_data: bool,
}

/// The kernel's name of command `nr` (`DM_TABLE_LOAD` …), for logs.
pub fn command_name(nr: u8) -> &'static str {
    DmCmd::from_nr(nr).map_or("DM_UNKNOWN", DmCmd::name)
}

/// A request the kernel would refuse: the errno-carrying [`DmError`] (its text is the log message)
/// and the command it was for, when known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub error: DmError,
    /// `None` when the request failed before its command number was checked.
    pub cmd: Option<DmCmd>,
    /// Set when the kernel looks the device up *before* it parses the payload that failed
    /// (TABLE_LOAD, TARGET_MSG, DEV_SET_GEOMETRY): a missing device then wins with `ENXIO`. A server
    /// that wants the kernel's exact errno checks this key against the engine first.
    pub lookup_first: Option<DevKey>,
}

impl DecodeError {
    pub fn errno(&self) -> i32 {
        self.error.errno()
    }
}

impl From<DmError> for DecodeError {
    fn from(error: DmError) -> Self {
        Self { error, cmd: None, lookup_first: None }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.cmd {
            Some(cmd) => write!(f, "{cmd}: {}", self.error),
            None => self.error.fmt(f),
        }
    }
}

impl std::error::Error for DecodeError {}

/// What the shim hands back to the caller: `ioctl()` returns `ret` (with `errno` set when it is
/// -1) and `bytes` are copied to the start of the caller's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ret: i32,
    pub errno: i32,
    pub bytes: Vec<u8>,
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod proptests;
