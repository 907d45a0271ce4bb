//! Every failure the engine can report, and the one place each maps to an errno
//! (linux-dm-abi.md §2.11).

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DmError {
    /// EINVAL: bad argument, bad table, bad name, version mismatch …
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// ENXIO: no such device (also forbidden key mixes and minor allocation failure).
    #[error("no such device: {0}")]
    NoDevice(String),
    /// EBUSY: name/uuid clash, device open.
    #[error("busy: {0}")]
    Busy(String),
    /// EOVERFLOW: too many targets.
    #[error("too many targets: {0}")]
    Overflow(String),
    /// EACCES: caller not allowed to change state.
    #[error("permission denied")]
    Access,
    /// ENOTTY: not a DM ioctl, or a command number this node does not serve.
    #[error("inappropriate ioctl: {0}")]
    NotTty(String),
    /// EFAULT: the request claims more bytes than the caller sent.
    #[error("bad address: {0}")]
    Fault(String),
    /// ENOMEM: an allocation would be unreasonable.
    #[error("out of memory: {0}")]
    NoMem(String),
    /// EINTR: a blocking wait was interrupted.
    #[error("interrupted")]
    Interrupted,
    /// ENOENT: e.g. missing stats region.
    #[error("not found: {0}")]
    NotFound(String),
    /// E2BIG: a plist beyond proplib's size limit.
    #[error("argument list too long: {0}")]
    TooBig(String),
    /// ENODEV: an underlying device that cannot be used.
    #[error("no such device: {0}")]
    NoSuchBlockDevice(String),
}

impl DmError {
    pub fn errno(&self) -> i32 {
        match self {
            DmError::Invalid(_) => libc::EINVAL,
            DmError::NoDevice(_) => libc::ENXIO,
            DmError::Busy(_) => libc::EBUSY,
            DmError::Overflow(_) => libc::EOVERFLOW,
            DmError::Access => libc::EACCES,
            DmError::NotTty(_) => libc::ENOTTY,
            DmError::Fault(_) => libc::EFAULT,
            DmError::NoMem(_) => libc::ENOMEM,
            DmError::Interrupted => libc::EINTR,
            DmError::NotFound(_) => libc::ENOENT,
            DmError::TooBig(_) => libc::E2BIG,
            DmError::NoSuchBlockDevice(_) => libc::ENODEV,
        }
    }
}

pub type DmResult<T> = Result<T, DmError>;

/// Shorthand used all over the engine and targets: `Err(invalid!("..."))`.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::dm::error::DmError::Invalid(format!($($arg)*)) };
}
