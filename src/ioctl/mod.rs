//! Wire codecs: bytes in, typed [`crate::dm::Request`]s out; typed [`crate::dm::Reply`]s back to
//! bytes.
//!
//! * [`dm_switch`] — the RFC dm-switch page-table upload (`IpcPgTable` in generic netlink).
//! * [`layout`] — the declared C structs, constants and flags of `dm-ioctl.h`.
//! * [`reader`] — bounds-checked reads from untrusted buffers.
//! * [`linux`] — the Linux `dm_ioctl` codec: [`decode`], [`encode`], [`encode_error`],
//!   [`encode_version`].
//! * [`netbsd`] — the NetBSD proplib codec (`NETBSD_DM_IOCTL`): the same typed commands and
//!   replies, as XML dictionaries.

pub mod dm_switch;
pub mod dm_ulog;
pub mod layout;
pub mod linux;
pub mod netbsd;
pub mod reader;

pub use layout::{DmCmd, DmFlags, DmIoctl};
pub use linux::{decode, encode, encode_error, encode_version, DecodeError, Decoded, DecodedIoctl, Encoded};
