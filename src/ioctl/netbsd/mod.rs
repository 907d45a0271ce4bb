//! The NetBSD proplib codec (`NETBSD_DM_IOCTL`, netbsd-dm-proplib.md): a request dictionary in,
//! the same typed [`Request`] the Linux codec produces out; a typed
//! [`Reply`](crate::dm::Reply) in, the mutated request dictionary back out.
//!
//! Pure functions over bytes, like [`crate::ioctl::linux`]. The one thing the kernel's handlers
//! know that a codec cannot is which device a `(minor, name, uuid)` triple finds, since NetBSD
//! falls back from one key to the next (§3.3); [`decode`] asks a [`Devices`] for that.
//!
//! The server calls [`decode`], runs the engine, then [`Decoded::encode`] or
//! [`Decoded::encode_error`] (or [`Refused::encode`] when decoding already failed) and sends the
//! [`PlistReply`]. Where NetBSD and Linux semantics differ the engine keeps Linux's; the list is
//! in docs/protocols.md.

mod decode;
mod encode;
pub mod proplib;

pub use decode::decode;
pub use proplib::{externalize, internalize, Dict, Num, ParseError, Value, COPYIN_LIMIT};

use crate::dm::{DevNum, Request};

/// `struct plistref` (`void *pref_plist; size_t pref_len`) as the ioctl's parameter.
#[repr(C)]
pub struct PlistRef {
    pub pref_plist: *mut core::ffi::c_void,
    pub pref_len: usize,
}

/// `_IOWR(0xfd, 0, struct plistref)` with NetBSD's encoding (§1.1): 0xC010FD00 on LP64,
/// 0xC008FD00 on ILP32. Only the size field tells it from Linux's DM_VERSION.
pub const NETBSD_DM_IOCTL: u64 = 0xC000_0000 | ((core::mem::size_of::<PlistRef>() as u64) << 16) | 0xfd00;
const _: () = assert!(cfg!(not(target_pointer_width = "64")) || NETBSD_DM_IOCTL == 0xC010_FD00);

/// The interface version the NetBSD kernel reports (dm.h: 4.16.0).
pub const VERSION: [u32; 3] = [4, 16, 0];

/// `flags` bits as netbsd-dm.h numbers them (§3.2; the same bits as Linux's).
pub mod flags {
    pub const READONLY: u32 = 0x1;
    pub const SUSPEND: u32 = 0x2;
    /// NetBSD/libdevmapper-private: cleared when the device is not found, set by create, suspend
    /// and resume (§3.2, §3.4).
    pub const EXISTS: u32 = 0x4;
    pub const STATUS_TABLE: u32 = 0x10;
    pub const ACTIVE_PRESENT: u32 = 0x20;
    pub const INACTIVE_PRESENT: u32 = 0x40;
    pub const SKIP_LOCKFS: u32 = 0x400;
    pub const NOFLUSH: u32 = 0x800;
    pub const QUERY_INACTIVE_TABLE: u32 = 0x1000;
}

/// How failed commands are reported (`dmemu serve --netbsd-errors`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetbsdErrors {
    /// The handler's errno reaches the caller (what libdevmapper-style callers need, §4).
    #[default]
    Real,
    /// As NetBSD does: the copy-out's success replaces the handler's errno, so the caller sees 0
    /// and only the dictionary (EXISTS cleared, keys missing) tells (§4).
    Compat,
}

impl std::str::FromStr for NetbsdErrors {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "real" => Ok(Self::Real),
            "compat" => Ok(Self::Compat),
            _ => Err(format!("{s:?}: expected \"real\" or \"compat\"")),
        }
    }
}

/// The 15 command strings of the kernel's table (§2.1), in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbCmd {
    Version,
    Targets,
    Create,
    Info,
    Mknodes,
    Names,
    Suspend,
    Remove,
    Rename,
    Resume,
    Clear,
    Deps,
    Reload,
    Status,
    Table,
}

impl NbCmd {
    pub const ALL: [NbCmd; 15] = [
        NbCmd::Version,
        NbCmd::Targets,
        NbCmd::Create,
        NbCmd::Info,
        NbCmd::Mknodes,
        NbCmd::Names,
        NbCmd::Suspend,
        NbCmd::Remove,
        NbCmd::Rename,
        NbCmd::Resume,
        NbCmd::Clear,
        NbCmd::Deps,
        NbCmd::Reload,
        NbCmd::Status,
        NbCmd::Table,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NbCmd::Version => "version",
            NbCmd::Targets => "targets",
            NbCmd::Create => "create",
            NbCmd::Info => "info",
            NbCmd::Mknodes => "mknodes",
            NbCmd::Names => "names",
            NbCmd::Suspend => "suspend",
            NbCmd::Remove => "remove",
            NbCmd::Rename => "rename",
            NbCmd::Resume => "resume",
            NbCmd::Clear => "clear",
            NbCmd::Deps => "deps",
            NbCmd::Reload => "reload",
            NbCmd::Status => "status",
            NbCmd::Table => "table",
        }
    }

    /// An exact match: `table_load`, `remove_all`, `message` … are not NetBSD commands (§2.1).
    pub fn from_bytes(s: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str().as_bytes() == s)
    }

    /// Commands behind the `KAUTH_SYSTEM_DEVMAPPER` check (§2.1).
    pub fn privileged(self) -> bool {
        matches!(
            self,
            NbCmd::Create
                | NbCmd::Suspend
                | NbCmd::Remove
                | NbCmd::Rename
                | NbCmd::Resume
                | NbCmd::Clear
                | NbCmd::Reload
        )
    }
}

impl std::fmt::Display for NbCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device a lookup found: its number (the minor selects it in NetBSD) and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub dev: DevNum,
    /// Name bytes, without the NUL.
    pub name: Vec<u8>,
}

/// The engine's view the decoder needs for NetBSD's fallback lookup (§3.3).
pub trait Devices {
    fn by_minor(&self, minor: u32) -> Option<Found>;
    fn by_name(&self, name: &[u8]) -> Option<Found>;
    fn by_uuid(&self, uuid: &[u8]) -> Option<Found>;
}

/// A request that passed copy-in, the version check and the command lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub cmd: NbCmd,
    /// What the engine runs; `None` for `version`, which has no handler.
    pub request: Option<Request>,
    /// The request dictionary (version already rewritten to 4.16.0, keys the handler writes
    /// before running, like reload's `minor`, already set): the reply is built on it.
    pub dict: Dict,
}

/// A request the kernel turned down before the engine ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Copy-in failed (size limit, unparsable, not a dictionary): the ioctl fails with `errno`
    /// in either error mode and nothing is copied out (§1.2, §4).
    CopyIn { errno: i32, why: String },
    /// The version check, the command lookup, the authorization or the handler refused: `dict`
    /// is what the kernel copies out, `errno` what the handler returned (§4).
    Handler { cmd: Option<NbCmd>, dict: Dict, errno: i32, why: String },
}

impl Refused {
    pub fn errno(&self) -> i32 {
        match self {
            Refused::CopyIn { errno, .. } | Refused::Handler { errno, .. } => *errno,
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::CopyIn { why, .. } => write!(f, "copy-in: {why}"),
            Refused::Handler { cmd: Some(c), why, .. } => write!(f, "{c}: {why}"),
            Refused::Handler { cmd: None, why, .. } => f.write_str(why),
        }
    }
}

/// What the daemon sends back in a PLIST_REPLY frame: `ioctl()`'s return value, errno, and the
/// externalized reply (NUL included; empty when nothing is copied out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlistReply {
    pub ret: i32,
    pub errno: i32,
    pub xml: Vec<u8>,
}

impl PlistReply {
    fn finish(dict: &Dict, errno: i32, mode: NetbsdErrors) -> Self {
        let xml = externalize(dict);
        match (errno, mode) {
            (0, _) | (_, NetbsdErrors::Compat) => Self { ret: 0, errno: 0, xml },
            (e, NetbsdErrors::Real) => Self { ret: -1, errno: e, xml },
        }
    }
}

#[cfg(test)]
mod tests;
