//! dmemu: the device-mapper driver, in userspace. The `dmemu` binary (`src/main.rs`, subcommands
//! in `src/cli/`) and the benchmarks (`benches/`) are built on this library.
//!
//! * [`dm`] — the engine: devices, pdevs, tables, targets; synchronous and free of IO.
//! * [`targets`] — one file per target type, and the registry.
//! * [`ioctl`] — the wire codecs: Linux `struct dm_ioctl` buffers and NetBSD proplib dictionaries in,
//!   typed [`dm::Command`]s out, typed [`dm::Reply`]s back to bytes; the dm-switch netlink upload.
//! * [`server`] — the daemon: the control socket (framing from the `dmemu-frame` crate), event
//!   delivery, the sysfs tree, the filesystem resolver.
//! * [`io`] — the data plane: IO through live tables to files, block devices and stacked devices.
//! * [`nbd`] — the NBD server in front of the data plane, one export per active device.
//! * [`fuse`] — the FUSE directory of device files behind `/dev/mapper/<name>` (`serve --fuse-dir`).
//! * [`listen`] — listening sockets: created with their final mode, accept loops that back off
//!   when the process runs out of descriptors.
//! * [`client`] — clients of the control socket: raw ioctls, HELLO and starting a daemon, the
//!   dm-switch page-table upload.

pub mod client;
pub mod dm;
pub mod fuse;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod ioctl;
pub mod listen;
pub mod nbd;
pub mod server;
pub mod targets;
