//! Wire codecs: bytes in, typed [`crate::dm::Request`]s out; typed [`crate::dm::Reply`]s back to
//! bytes.
//!
//! * [`layout`] — the declared C structs, constants and flags of `dm-ioctl.h`.
//! * [`reader`] — bounds-checked reads from untrusted buffers.
//! * [`linux`] — the Linux `dm_ioctl` codec: [`decode`], [`encode`], [`encode_error`],
//!   [`encode_version`].

pub mod layout;
pub mod linux;
pub mod reader;

pub use layout::{DmCmd, DmFlags, DmIoctl};
pub use linux::{
    decode, encode, encode_error, encode_version, DecodeError, Decoded, DecodedIoctl, Encoded,
};
