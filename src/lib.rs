//! dmemu: the device-mapper driver, in userspace.
//!
//! * [`dm`] — the engine: devices, pdevs, tables, targets; synchronous and free of IO on the wire.
//! * [`targets`] — one file per target type.
//! * [`ioctl`] — wire codecs: bytes in, typed [`dm::Command`]s out, typed [`dm::Reply`]s back to bytes.
//! * [`server`] — the control socket, the sysfs tree, the daemon loop.
//! * [`io`] — the data plane; [`nbd`] — the NBD server in front of it.
//! * [`switch_cli`] — `dmemu switch upload`: a switch device's page table, by upload or messages.
//! * [`fuse`] — `/dev/mapper` files for unmodified tools (`serve --fuse-dir`).

pub mod bench;
pub mod bench_switch;
pub mod client;
pub mod dm;
pub mod fuse;
pub mod io;
pub mod ioctl;
pub mod nbd;
pub mod nbsd;
pub mod server;
pub mod switch_cli;
pub mod targets;
