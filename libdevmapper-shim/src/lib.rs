//! `libdmemu_preload.so`: an LD_PRELOAD shim that points unmodified libdevmapper clients (dmsetup,
//! LVM, cryptsetup, …) at the dmemu daemon instead of the kernel's device-mapper driver.
//!
//! What is interposed and why is the project's interposition spec (`interposition.md` §1.4 below);
//! the wire protocol is `docs/control-socket.md`.
//!
//! Ground rules (interposition.md §1.3, §1.6):
//! * every export resolves the real libc function lazily with `dlsym(RTLD_NEXT)` and passes any call
//!   that is not ours through untouched, errno included;
//! * nothing is opened in a constructor and no private fd outlives the call that needed it (LVM closes
//!   stray fds at start-up); the only fds we hand out are control sockets the caller owns;
//! * our own helpers use raw syscalls or functions we do not export, so they can never re-enter a hook;
//! * no panic unwinds across the C ABI (`hooks::guard`).
//!
//! With a daemon that serves device files (`dmemu serve --fuse-dir`), DM block nodes are redirected to
//! them and made to look like block devices (`blockdev`); without one they are left alone.

mod blockdev;
mod control;
mod daemon;
mod fds;
mod hooks;
mod netbsd;
mod paths;
mod procdevices;
mod stat;
mod sys;
