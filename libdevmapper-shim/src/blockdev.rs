//! DM block nodes backed by the daemon's FUSE device files (interposition.md §1.6 "Data plane",
//! option 1): opens of `/dev/mapper/<name>`, `$DM_DEV_DIR/mapper/<name>` and `/dev/dm-N` go to
//! `<fuse_dir>/<name>`; stat reports a block device `<dm major>:<minor>`; the block ioctls are
//! answered here (the FUSE file is a regular file to the kernel).
//!
//! A FUSE file's inode number is its device's minor + 2 (docs/control-socket.md "The FUSE
//! directory"), so an fd alone tells us the minor.
//!
//! When does a node "exist" for stat? Where libdm keeps real nodes (its node directory, as root),
//! the real path decides, so libdm's own bookkeeping (mknod on create, rename, unlink on remove)
//! sees exactly what it made; the answer is then faked as our block device while the FUSE file
//! exists. Elsewhere (`/dev/mapper` under `dmemu exec`, `/dev/dm-N`, unprivileged callers that
//! cannot mknod) the FUSE file alone decides.

use crate::daemon;
use crate::fds;
use crate::paths::BlockPath;
use crate::stat::FakeStat;
use crate::sys::{self, set_errno};
use libc::{c_int, c_long, c_uint, c_ulong, c_ushort, c_void};
use std::ffi::{CStr, CString};

/// A device's FUSE inode is its minor + this.
const INO_BASE: u64 = 2;
const SECTOR: u64 = 512;
/// The "disk" group, as udev gives block nodes.
const DISK_GID: u32 = 6;

const fn io(nr: c_ulong) -> c_ulong {
    0x1200 | nr
}
/// `_IOR(0x12, nr, size_t)` / `_IOW(…)`, as the kernel's headers define the size_t-typed ones.
const fn ior(nr: c_ulong) -> c_ulong {
    (2 << 30) | ((std::mem::size_of::<usize>() as c_ulong) << 16) | 0x1200 | nr
}
const fn iow(nr: c_ulong) -> c_ulong {
    (1 << 30) | ((std::mem::size_of::<usize>() as c_ulong) << 16) | 0x1200 | nr
}
const BLKROSET: c_ulong = io(93);
const BLKROGET: c_ulong = io(94);
const BLKRRPART: c_ulong = io(95);
const BLKGETSIZE: c_ulong = io(96);
const BLKFLSBUF: c_ulong = io(97);
const BLKRASET: c_ulong = io(98);
const BLKRAGET: c_ulong = io(99);
const BLKSSZGET: c_ulong = io(104);
const BLKBSZGET: c_ulong = ior(112);
const BLKBSZSET: c_ulong = iow(113);
const BLKGETSIZE64: c_ulong = ior(114);
const BLKDISCARD: c_ulong = io(119);
const BLKIOMIN: c_ulong = io(120);
const BLKIOOPT: c_ulong = io(121);
const BLKALIGNOFF: c_ulong = io(122);
const BLKPBSZGET: c_ulong = io(123);
const BLKDISCARDZEROES: c_ulong = io(124);
const BLKROTATIONAL: c_ulong = io(126);
const BLKZEROOUT: c_ulong = io(127);
/// The device-mapper ioctl type (`DM_IOCTL`): on a block node, `DM_MPATH_PROBE_PATHS` (`_IO(0xfd,
/// 18)`) and whatever else a caller sends with that type.
const DM_IOCTL_TYPE: u32 = 0xfd;

fn fail(e: c_int) -> c_int {
    set_errno(e);
    -1
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether something (a node libdm made, or a placeholder) stands at the caller's own path.
fn real_exists(path: &CStr) -> bool {
    sys::keep_errno(|| sys::sys_stat(path, true)).is_some()
}

/// The FUSE file of `b`, if the device is active.
fn fuse_stat(b: &BlockPath) -> Option<libc::stat> {
    sys::keep_errno(|| sys::sys_stat(&b.fuse, false)).filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
}

/// How a block node with the FUSE file's `st` looks (None if `st` is not one of our files).
pub fn fake(st: &libc::stat) -> Option<FakeStat> {
    let minor = st.st_ino.checked_sub(INO_BASE)?;
    let dev = st.st_dev;
    Some(FakeStat {
        mode: libc::S_IFBLK | 0o660,
        rdev: (daemon::facts()?.major, u32::try_from(minor).ok()?),
        dev: (libc::major(dev), libc::minor(dev)),
        ino: st.st_ino,
        uid: 0,
        gid: DISK_GID,
        // Block devices report size 0 to stat; BLKGETSIZE64 has the size.
        size: 0,
        time: (st.st_mtime, st.st_mtime_nsec),
    })
}

/// stat/lstat of a block node path: the fake, or None to let the real call answer.
///
/// # Safety
/// `path` must be NUL-terminated.
pub unsafe fn path_stat(b: &BlockPath, path: *const libc::c_char) -> Option<FakeStat> {
    // SAFETY: caller's contract.
    if b.managed && !real_exists(unsafe { CStr::from_ptr(path) }) {
        return None;
    }
    fake(&fuse_stat(b)?)
}

/// What to do after the FUSE file could not be opened because it is not there (no live table).
enum Missing {
    /// A node stands at the path but has no device behind it: ENXIO, as the kernel answers.
    Enxio,
    /// Nothing of ours: the real call on the caller's path decides.
    Real,
}

fn missing(b: &BlockPath, path: &CStr) -> Missing {
    if b.managed && real_exists(path) {
        Missing::Enxio
    } else {
        Missing::Real
    }
}

/// open*() of a block node. `real(path, flags)` is the real open.
///
/// # Safety
/// `path` must be NUL-terminated.
pub unsafe fn open(
    b: &BlockPath,
    path: *const libc::c_char,
    flags: c_int,
    real: impl Fn(*const libc::c_char, c_int) -> c_int,
) -> c_int {
    // SAFETY: caller's contract.
    let cpath = unsafe { CStr::from_ptr(path) };
    let excl_create = libc::O_CREAT | libc::O_EXCL;
    if flags & excl_create == excl_create && (fuse_stat(b).is_some() || real_exists(cpath)) {
        return fail(libc::EEXIST);
    }
    // A block node is never created or truncated by open; O_EXCL alone (mkfs's "not in use" claim)
    // has no meaning for a regular file.
    let fd = real(b.fuse.as_ptr(), flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC));
    if fd >= 0 {
        fds::mark_block(fd);
        return fd;
    }
    if sys::errno() != libc::ENOENT {
        return -1;
    }
    match missing(b, cpath) {
        Missing::Enxio => fail(libc::ENXIO),
        Missing::Real => real(path, flags),
    }
}

/// fopen*() of a block node. `real(path)` is the real fopen with the caller's mode.
///
/// # Safety
/// `path` must be NUL-terminated.
pub unsafe fn fopen(
    b: &BlockPath,
    path: *const libc::c_char,
    real: impl Fn(*const libc::c_char) -> *mut libc::FILE,
) -> *mut libc::FILE {
    let f = real(b.fuse.as_ptr());
    if !f.is_null() {
        // SAFETY: a FILE we just got.
        fds::mark_block(unsafe { libc::fileno(f) });
        return f;
    }
    if sys::errno() != libc::ENOENT {
        return f;
    }
    // SAFETY: caller's contract.
    match missing(b, unsafe { CStr::from_ptr(path) }) {
        Missing::Enxio => {
            set_errno(libc::ENXIO);
            std::ptr::null_mut()
        }
        Missing::Real => real(path),
    }
}

/// access()/faccessat() of a block node: the FUSE file's answer while it stands for the node.
///
/// # Safety
/// `path` must be NUL-terminated.
pub unsafe fn access(b: &BlockPath, path: *const libc::c_char, real: impl Fn(*const libc::c_char) -> c_int) -> c_int {
    // SAFETY: caller's contract.
    match unsafe { path_stat(b, path) } {
        Some(_) => real(b.fuse.as_ptr()),
        None => real(path),
    }
}

/// `<run_dir>/sys/devices/virtual/block/dm-<minor>/<attr>`.
fn sysfs_path(minor: u64, attr: &str) -> Option<CString> {
    let mut p = daemon::facts()?.run_dir.clone();
    p.extend_from_slice(format!("/sys/devices/virtual/block/dm-{minor}/{attr}").as_bytes());
    CString::new(p).ok()
}

fn sysfs_int(minor: u64, attr: &str) -> Option<i64> {
    let text = sys::keep_errno(|| sys::read_small(&sysfs_path(minor, attr)?))?;
    std::str::from_utf8(&text).ok()?.trim().parse().ok()
}

/// `queue/<attr>` of a device, or `default` when it cannot be read.
fn queue_limit(minor: u64, attr: &str, default: u64) -> u64 {
    sysfs_int(minor, &format!("queue/{attr}")).and_then(|v| u64::try_from(v).ok()).unwrap_or(default)
}

fn sysfs_write(minor: u64, attr: &str, value: &str) -> bool {
    let Some(p) = sysfs_path(minor, attr) else { return false };
    let fd = sys::sys_open(&p, libc::O_WRONLY | libc::O_TRUNC | libc::O_CLOEXEC);
    if fd < 0 {
        return false;
    }
    // SAFETY: writing from our own buffer (write is not hooked).
    let n = unsafe { libc::write(fd, value.as_ptr().cast(), value.len()) };
    sys::sys_close(fd);
    n == value.len() as isize
}

/// Stores `v` at the caller's `arg`.
///
/// # Safety
/// `arg` must be NULL or point at a writable `T`, as the ioctl's contract says.
unsafe fn put<T>(arg: *mut c_void, v: T) -> c_int {
    if arg.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: caller's contract (unaligned: callers pass whatever they like).
    unsafe { arg.cast::<T>().write_unaligned(v) };
    0
}

/// BLKDISCARD / BLKZEROOUT: `arg` is `u64 range[2]` (start, length in bytes). The kernel's checks,
/// then fallocate on the FUSE file, which the daemon maps to discard / write-zeroes.
///
/// # Safety
/// `arg` as for the ioctl.
unsafe fn range_op(fd: c_int, st: &libc::stat, minor: u64, arg: *mut c_void, mode: c_int) -> c_int {
    // SAFETY: F_GETFL on an fd we know is open (fcntl64 hooks only dups).
    let fl = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFL) } as c_int;
    if fl < 0 || fl & libc::O_ACCMODE == libc::O_RDONLY {
        return fail(libc::EBADF);
    }
    if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 && sysfs_int(minor, "ro") == Some(1) {
        return fail(libc::EPERM);
    }
    if arg.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: the caller's `u64[2]`.
    let (start, len) = unsafe { (arg.cast::<u64>().read_unaligned(), arg.cast::<u64>().add(1).read_unaligned()) };
    let size = st.st_size as u64;
    if !start.is_multiple_of(SECTOR)
        || !len.is_multiple_of(SECTOR)
        || start.checked_add(len).is_none_or(|end| end > size)
    {
        return fail(libc::EINVAL);
    }
    if len == 0 {
        return 0;
    }
    // SAFETY: plain fallocate on the caller's fd (not one of our exports).
    unsafe { libc::fallocate(fd, mode, start as libc::off_t, len as libc::off_t) }
}

/// ioctl on a block-node fd whose FUSE file currently has `st`; `real()` passes it on.
///
/// # Safety
/// As for the real ioctl: `arg` must be what `request` expects.
pub unsafe fn ioctl(
    fd: c_int,
    st: &libc::stat,
    request: c_ulong,
    arg: *mut c_void,
    real: impl FnOnce() -> c_int,
) -> c_int {
    let Some(minor) = st.st_ino.checked_sub(INO_BASE) else { return real() };
    let size = st.st_size as u64;
    // SAFETY (all `put`s): the ioctl's own argument type, per linux/fs.h and block/ioctl.c.
    unsafe {
        match request {
            BLKGETSIZE64 => put::<u64>(arg, size),
            BLKGETSIZE => put::<c_ulong>(arg, (size / SECTOR) as c_ulong),
            // The table's limits, as the daemon's sysfs queue/ files say.
            BLKSSZGET => put::<c_int>(arg, queue_limit(minor, "logical_block_size", SECTOR) as c_int),
            BLKPBSZGET => put::<c_uint>(arg, queue_limit(minor, "physical_block_size", SECTOR) as c_uint),
            BLKIOMIN => put::<c_uint>(arg, queue_limit(minor, "minimum_io_size", SECTOR) as c_uint),
            BLKIOOPT => put::<c_uint>(arg, queue_limit(minor, "optimal_io_size", 0) as c_uint),
            BLKBSZGET => put::<c_int>(arg, 4096),
            BLKBSZSET => 0,
            BLKDISCARDZEROES => put::<c_uint>(arg, 0),
            BLKALIGNOFF => put::<c_int>(arg, 0),
            BLKROTATIONAL => put::<c_ushort>(arg, 0),
            BLKROGET => put::<c_int>(arg, sysfs_int(minor, "ro").unwrap_or(0) as c_int),
            // read_ahead_kb ↔ 512-byte sectors, in whole 4 KiB pages as the kernel keeps them.
            BLKRAGET => put::<c_long>(arg, (sysfs_int(minor, "bdi/read_ahead_kb").unwrap_or(128) * 2) as c_long),
            BLKRASET | BLKFLSBUF | BLKROSET if !is_root() => fail(libc::EACCES),
            // The daemon keeps the flag (it shows in DM_DEV_STATUS and sysfs `ro`, and IO obeys it).
            BLKROSET if arg.is_null() => fail(libc::EFAULT),
            BLKROSET => {
                let value = arg.cast::<c_int>().read_unaligned();
                let mut payload = [0u8; 8];
                payload[..4].copy_from_slice(&(minor as u32).to_le_bytes());
                payload[4..].copy_from_slice(&value.to_le_bytes());
                match daemon::call(dmemu_frame::Kind::BlkRoSet, &payload, dmemu_frame::Kind::BlkRoSetReply) {
                    0 => 0,
                    e => fail(e),
                }
            }
            BLKRASET => {
                let kb = (arg as u64).saturating_mul(SECTOR) / 4096 * 4;
                if sysfs_write(minor, "bdi/read_ahead_kb", &format!("{kb}\n")) {
                    0
                } else {
                    fail(libc::EIO)
                }
            }
            BLKFLSBUF => libc::fsync(fd),
            BLKDISCARD => range_op(fd, st, minor, arg, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
            BLKZEROOUT => range_op(fd, st, minor, arg, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE),
            // DM disks have no partitions to rescan: the kernel says EINVAL (EACCES before that).
            BLKRRPART if !is_root() => fail(libc::EACCES),
            BLKRRPART => fail(libc::EINVAL),
            // The kernel takes the request as an unsigned int. The daemon asks the device's
            // target (dm_blk_ioctl): the multipath probe, or ENOTTY, EAGAIN while suspended.
            r if (r as u32 >> 8) & 0xff == DM_IOCTL_TYPE => {
                let mut payload = [0u8; 8];
                payload[..4].copy_from_slice(&(minor as u32).to_le_bytes());
                payload[4..].copy_from_slice(&(r as u32).to_le_bytes());
                match daemon::call(dmemu_frame::Kind::DmBlkIoctl, &payload, dmemu_frame::Kind::DmBlkIoctlReply) {
                    0 => 0,
                    e => fail(e),
                }
            }
            _ => real(),
        }
    }
}
