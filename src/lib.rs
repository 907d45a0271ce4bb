//! dmemu: the device-mapper driver, in userspace.
//!
//! * [`dm`] — the engine: devices, pdevs, tables, targets; synchronous and free of IO on the wire.
//! * [`targets`] — one file per target type.
//! * [`ioctl`] — wire codecs: bytes in, typed [`dm::Command`]s out, typed [`dm::Reply`]s back to bytes.
//! * [`server`] — the control socket, the sysfs tree, the daemon loop.

pub mod bench;
pub mod client;
pub mod dm;
pub mod io;
pub mod ioctl;
pub mod server;
pub mod targets;
