//! The exported libc entry points (interposition.md §1.4 lists them; §1.3 says why both the old
//! `__xstat*`/`__xmknod*` and the glibc 2.33 `stat*`/`mknod*` generations, and why `fopen*`/`opendir`
//! need hooks of their own: glibc calls its internal open from them, bypassing ours).
//!
//! C declares `open*`, `ioctl` and `fcntl` variadic; stable Rust cannot define variadic functions, so
//! they take a fixed last argument, which is register-compatible on x86-64 and aarch64 Linux (§1.3).
//! The real functions are called through variadic pointer types, as C callers would.

use crate::blockdev;
use crate::control;
use crate::fds::{self, Mark};
use crate::paths::{self, classify, Target};
use crate::procdevices;
use crate::stat::{self as fake, StatBuf};
use crate::sys::{self, pass, set_errno};
use libc::{c_char, c_int, c_long, c_uint, c_ulong, c_void, dev_t, mode_t, size_t, ssize_t, DIR, FILE};
use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::null_mut;

type OpenFn = unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int;
type Open2Fn = unsafe extern "C" fn(*const c_char, c_int) -> c_int;
type OpenatFn = unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int;
type Openat2Fn = unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;
type FopenFn = unsafe extern "C" fn(*const c_char, *const c_char) -> *mut FILE;
type OpendirFn = unsafe extern "C" fn(*const c_char) -> *mut DIR;
type ReadlinkFn = unsafe extern "C" fn(*const c_char, *mut c_char, size_t) -> ssize_t;
type ReadlinkatFn = unsafe extern "C" fn(c_int, *const c_char, *mut c_char, size_t) -> ssize_t;
type AccessFn = unsafe extern "C" fn(*const c_char, c_int) -> c_int;
type FaccessatFn = unsafe extern "C" fn(c_int, *const c_char, c_int, c_int) -> c_int;
type StatFn<B> = unsafe extern "C" fn(*const c_char, *mut B) -> c_int;
type FstatFn<B> = unsafe extern "C" fn(c_int, *mut B) -> c_int;
type FstatatFn<B> = unsafe extern "C" fn(c_int, *const c_char, *mut B, c_int) -> c_int;
type StatxFn = unsafe extern "C" fn(c_int, *const c_char, c_int, c_uint, *mut libc::statx) -> c_int;
type XstatFn<B> = unsafe extern "C" fn(c_int, *const c_char, *mut B) -> c_int;
type FxstatFn<B> = unsafe extern "C" fn(c_int, c_int, *mut B) -> c_int;
type FxstatatFn<B> = unsafe extern "C" fn(c_int, c_int, *const c_char, *mut B, c_int) -> c_int;
type MknodFn = unsafe extern "C" fn(*const c_char, mode_t, dev_t) -> c_int;
type MknodatFn = unsafe extern "C" fn(c_int, *const c_char, mode_t, dev_t) -> c_int;
type XmknodFn = unsafe extern "C" fn(c_int, *const c_char, mode_t, *mut dev_t) -> c_int;
type XmknodatFn = unsafe extern "C" fn(c_int, c_int, *const c_char, mode_t, *mut dev_t) -> c_int;
type IoctlFn = unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;
type CloseFn = unsafe extern "C" fn(c_int) -> c_int;
type DupFn = unsafe extern "C" fn(c_int) -> c_int;
type Dup2Fn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type Dup3Fn = unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
type FcntlFn = unsafe extern "C" fn(c_int, c_int, ...) -> c_int;

type Stat = libc::stat;
type Stat64 = libc::stat64;

/// Runs a hook body; a panic becomes `fail` with errno EIO rather than unwinding into C.
fn guard<R>(fail: R, body: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| {
        set_errno(libc::EIO);
        fail
    })
}

// ---- open family -------------------------------------------------------------------------------

/// `real(path, flags)` is the real function with the caller's other arguments.
unsafe fn open_common(path: *const c_char, flags: c_int, real: impl Fn(*const c_char, c_int) -> c_int) -> c_int {
    match classify(path) {
        Target::Pass => real(path, flags),
        Target::Control => {
            paths::make_control_dir(path);
            control::open(flags)
        }
        // Only a plain read-only open is served from a copy (not O_PATH/O_DIRECTORY or writes).
        Target::ProcDevices if flags & (libc::O_ACCMODE | libc::O_PATH | libc::O_DIRECTORY) == libc::O_RDONLY => {
            procdevices::open(flags & libc::O_CLOEXEC != 0).unwrap_or_else(|| real(path, flags))
        }
        Target::ProcDevices => real(path, flags),
        Target::Redirect(p) => real(p.as_ptr(), flags),
        Target::Block(b) => blockdev::open(&b, path, flags, real),
    }
}

macro_rules! open_hooks {
    ($($name:ident)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
            guard(-1, || open_common(path, flags, |p, f| pass!($name: OpenFn, -1; p, f, mode as c_uint)))
        }
    )*};
}
open_hooks!(open open64);

macro_rules! open2_hooks {
    ($($name:ident)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(path: *const c_char, flags: c_int) -> c_int {
            guard(-1, || open_common(path, flags, |p, f| pass!($name: Open2Fn, -1; p, f)))
        }
    )*};
}
open2_hooks!(__open_2 __open64_2);

// A path we act on is absolute (or ends in /mapper/control), or relative to a directory fd whose path
// makes it one of ours (`paths::resolve_at`): the absolute path then replaces `(dirfd, path)`.
macro_rules! openat_hooks {
    ($($name:ident)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
            guard(-1, || {
                let abs = paths::resolve_at(dirfd, path);
                let path = abs.as_ref().map_or(path, |a| a.as_ptr());
                open_common(path, flags, |p, f| pass!($name: OpenatFn, -1; dirfd, p, f, mode as c_uint))
            })
        }
    )*};
}
openat_hooks!(openat openat64);

macro_rules! openat2_hooks {
    ($($name:ident)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
            guard(-1, || {
                let abs = paths::resolve_at(dirfd, path);
                let path = abs.as_ref().map_or(path, |a| a.as_ptr());
                open_common(path, flags, |p, f| pass!($name: Openat2Fn, -1; dirfd, p, f))
            })
        }
    )*};
}
openat2_hooks!(__openat_2 __openat64_2);

/// `fdopen` for an fd we made; on failure the fd is closed again.
unsafe fn wrap(fd: c_int, mode: *const c_char) -> *mut FILE {
    let f = libc::fdopen(fd, mode);
    if f.is_null() {
        sys::keep_errno(|| {
            fds::unmark(fd);
            sys::sys_close(fd)
        });
    }
    f
}

unsafe fn fopen_common(
    path: *const c_char,
    mode: *const c_char,
    real: impl Fn(*const c_char) -> *mut FILE,
) -> *mut FILE {
    let m = if mode.is_null() { &b""[..] } else { CStr::from_ptr(mode).to_bytes() };
    let cloexec = m.contains(&b'e');
    match classify(path) {
        Target::Pass => real(path),
        Target::Redirect(p) => real(p.as_ptr()),
        Target::Block(b) => blockdev::fopen(&b, path, real),
        Target::Control => {
            let fd = control::open(libc::O_RDWR | if cloexec { libc::O_CLOEXEC } else { 0 });
            if fd < 0 {
                return null_mut();
            }
            wrap(fd, mode)
        }
        // Only reading is served from a copy; a write attempt gets the real file's answer.
        Target::ProcDevices if m.first() == Some(&b'r') && !m.contains(&b'+') => match procdevices::open(cloexec) {
            Some(fd) => match wrap(fd, mode) {
                f if f.is_null() => real(path),
                f => f,
            },
            None => real(path),
        },
        Target::ProcDevices => real(path),
    }
}

macro_rules! fopen_hooks {
    ($($name:ident)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: *const c_char) -> *mut FILE {
            guard(null_mut(), || fopen_common(path, mode, |p| pass!($name: FopenFn, null_mut(); p, mode)))
        }
    )*};
}
fopen_hooks!(fopen fopen64);

/// Path hooks whose only job is the sysfs redirect (opendir, readlink*).
unsafe fn redirect<R>(path: *const c_char, real: impl Fn(*const c_char) -> R) -> R {
    match classify(path) {
        Target::Redirect(p) => real(p.as_ptr()),
        _ => real(path),
    }
}

#[no_mangle]
pub unsafe extern "C" fn opendir(path: *const c_char) -> *mut DIR {
    guard(null_mut(), || redirect(path, |p| pass!(opendir: OpendirFn, null_mut(); p)))
}

#[no_mangle]
pub unsafe extern "C" fn readlink(path: *const c_char, buf: *mut c_char, size: size_t) -> ssize_t {
    guard(-1, || redirect(path, |p| pass!(readlink: ReadlinkFn, -1; p, buf, size)))
}

#[no_mangle]
pub unsafe extern "C" fn readlinkat(dirfd: c_int, path: *const c_char, buf: *mut c_char, size: size_t) -> ssize_t {
    guard(-1, || {
        let abs = paths::resolve_at(dirfd, path);
        let path = abs.as_ref().map_or(path, |a| a.as_ptr());
        redirect(path, |p| pass!(readlinkat: ReadlinkatFn, -1; dirfd, p, buf, size))
    })
}

// ---- access --------------------------------------------------------------------------------------

unsafe fn access_common(path: *const c_char, mode: c_int, real: impl Fn(*const c_char) -> c_int) -> c_int {
    if paths::is_udev_control(path) {
        set_errno(libc::ENOENT);
        return -1;
    }
    match classify(path) {
        // Consistent with the faked stat: a crw------- node exists (and is not executable).
        Target::Control if mode & libc::X_OK != 0 => {
            set_errno(libc::EACCES);
            -1
        }
        Target::Control => 0,
        Target::Redirect(p) => real(p.as_ptr()),
        Target::Block(b) => blockdev::access(&b, path, real),
        _ => real(path),
    }
}

#[no_mangle]
pub unsafe extern "C" fn access(path: *const c_char, mode: c_int) -> c_int {
    guard(-1, || access_common(path, mode, |p| pass!(access: AccessFn, -1; p, mode)))
}

#[no_mangle]
pub unsafe extern "C" fn faccessat(dirfd: c_int, path: *const c_char, mode: c_int, flags: c_int) -> c_int {
    guard(-1, || {
        let abs = paths::resolve_at(dirfd, path);
        let path = abs.as_ref().map_or(path, |a| a.as_ptr());
        access_common(path, mode, |p| pass!(faccessat: FaccessatFn, -1; dirfd, p, mode, flags))
    })
}

// ---- stat family -------------------------------------------------------------------------------

unsafe fn stat_path<B: StatBuf>(path: *const c_char, buf: *mut B, real: impl Fn(*const c_char) -> c_int) -> c_int {
    match classify(path) {
        Target::Control => fake::write(buf, &control::fake_stat()),
        Target::Redirect(p) => real(p.as_ptr()),
        Target::Block(b) => match blockdev::path_stat(&b, path) {
            Some(f) => fake::write(buf, &f),
            None => real(path),
        },
        _ => real(path),
    }
}

unsafe fn stat_fd<B: StatBuf>(fd: c_int, buf: *mut B, real: impl Fn() -> c_int) -> c_int {
    match fds::lookup(fd) {
        Some(Mark::Control(_)) => fake::write(buf, &control::fake_stat()),
        Some(Mark::Block(st)) => match blockdev::fake(&st) {
            Some(f) => fake::write(buf, &f),
            None => real(),
        },
        None => real(),
    }
}

/// The `*at` forms: `(fd, "", AT_EMPTY_PATH)` is an fstat of `fd` (Rust std's `File::metadata`).
unsafe fn stat_at<B: StatBuf>(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    buf: *mut B,
    real: impl Fn(*const c_char) -> c_int,
) -> c_int {
    if flags & libc::AT_EMPTY_PATH != 0 && !path.is_null() && *path == 0 {
        stat_fd(dirfd, buf, || real(path))
    } else {
        let abs = paths::resolve_at(dirfd, path);
        stat_path(abs.as_ref().map_or(path, |a| a.as_ptr()), buf, real)
    }
}

macro_rules! stat_hooks {
    ($($name:ident: $buf:ty;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(path: *const c_char, buf: *mut $buf) -> c_int {
            guard(-1, || stat_path(path, buf, |p| pass!($name: StatFn<$buf>, -1; p, buf)))
        }
    )*};
}
stat_hooks! {
    stat: Stat;
    stat64: Stat64;
    lstat: Stat;
    lstat64: Stat64;
}

macro_rules! fstat_hooks {
    ($($name:ident: $buf:ty;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(fd: c_int, buf: *mut $buf) -> c_int {
            guard(-1, || stat_fd(fd, buf, || pass!($name: FstatFn<$buf>, -1; fd, buf)))
        }
    )*};
}
fstat_hooks! {
    fstat: Stat;
    fstat64: Stat64;
}

macro_rules! fstatat_hooks {
    ($($name:ident: $buf:ty;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, buf: *mut $buf, flags: c_int) -> c_int {
            guard(-1, || stat_at(dirfd, path, flags, buf, |p| pass!($name: FstatatFn<$buf>, -1; dirfd, p, buf, flags)))
        }
    )*};
}
fstatat_hooks! {
    fstatat: Stat;
    fstatat64: Stat64;
}

/// glibc has no `newfstatat` symbol (it is the syscall's name), but some code declares and calls it;
/// the real call then goes to `fstatat`, which is the same thing.
#[no_mangle]
pub unsafe extern "C" fn newfstatat(dirfd: c_int, path: *const c_char, buf: *mut Stat, flags: c_int) -> c_int {
    guard(-1, || {
        stat_at(dirfd, path, flags, buf, |p| match sys::real!(newfstatat: FstatatFn<Stat>) {
            Some(f) => f(dirfd, p, buf, flags),
            None => pass!(fstatat: FstatatFn<Stat>, -1; dirfd, p, buf, flags),
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn statx(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mask: c_uint,
    buf: *mut libc::statx,
) -> c_int {
    guard(-1, || stat_at(dirfd, path, flags, buf, |p| pass!(statx: StatxFn, -1; dirfd, p, flags, mask, buf)))
}

// Pre-2.33 glibc ABI (`ver` is _STAT_VER, passed through unchanged).
macro_rules! xstat_hooks {
    ($($name:ident: $buf:ty;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(ver: c_int, path: *const c_char, buf: *mut $buf) -> c_int {
            guard(-1, || stat_path(path, buf, |p| pass!($name: XstatFn<$buf>, -1; ver, p, buf)))
        }
    )*};
}
xstat_hooks! {
    __xstat: Stat;
    __xstat64: Stat64;
    __lxstat: Stat;
    __lxstat64: Stat64;
}

macro_rules! fxstat_hooks {
    ($($name:ident: $buf:ty;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(ver: c_int, fd: c_int, buf: *mut $buf) -> c_int {
            guard(-1, || stat_fd(fd, buf, || pass!($name: FxstatFn<$buf>, -1; ver, fd, buf)))
        }
    )*};
}
fxstat_hooks! {
    __fxstat: Stat;
    __fxstat64: Stat64;
}

macro_rules! fxstatat_hooks {
    ($($name:ident: $buf:ty;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(ver: c_int, dirfd: c_int, path: *const c_char, buf: *mut $buf, flags: c_int) -> c_int {
            guard(-1, || stat_at(dirfd, path, flags, buf, |p| pass!($name: FxstatatFn<$buf>, -1; ver, dirfd, p, buf, flags)))
        }
    )*};
}
fxstatat_hooks! {
    __fxstatat: Stat;
    __fxstatat64: Stat64;
}

// ---- statfs family: the daemon's sysfs tree is sysfs ------------------------------------------------

/// `SYSFS_MAGIC` (linux/magic.h).
const SYSFS_MAGIC: i64 = 0x6265_6572;

type StatfsFn<B> = unsafe extern "C" fn(*const c_char, *mut B) -> c_int;
type FstatfsFn<B> = unsafe extern "C" fn(c_int, *mut B) -> c_int;

/// The `f_type` of both `struct statfs` generations.
trait FsType {
    fn set_sysfs(&mut self);
}
impl FsType for libc::statfs {
    fn set_sysfs(&mut self) {
        self.f_type = SYSFS_MAGIC as _;
    }
}
impl FsType for libc::statfs64 {
    fn set_sysfs(&mut self) {
        self.f_type = SYSFS_MAGIC as _;
    }
}

macro_rules! statfs_hooks {
    ($($name:ident: $buf:ty;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(path: *const c_char, buf: *mut $buf) -> c_int {
            guard(-1, || match classify(path) {
                Target::Redirect(p) => {
                    let r = pass!($name: StatfsFn<$buf>, -1; p.as_ptr(), buf);
                    if r == 0 && !buf.is_null() {
                        (*buf).set_sysfs();
                    }
                    r
                }
                _ => pass!($name: StatfsFn<$buf>, -1; path, buf),
            })
        }
    )*};
}
statfs_hooks! {
    statfs: libc::statfs;
    statfs64: libc::statfs64;
}

macro_rules! fstatfs_hooks {
    ($($name:ident: $buf:ty;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(fd: c_int, buf: *mut $buf) -> c_int {
            guard(-1, || {
                let r = pass!($name: FstatfsFn<$buf>, -1; fd, buf);
                if r == 0 && !buf.is_null() && paths::fd_in_sysfs_tree(fd) {
                    (*buf).set_sysfs();
                }
                r
            })
        }
    )*};
}
fstatfs_hooks! {
    fstatfs: libc::statfs;
    fstatfs64: libc::statfs64;
}

// ---- mknod family: creating the control node "succeeds" without touching the fs (§1.1 item 3) ----

#[no_mangle]
pub unsafe extern "C" fn mknod(path: *const c_char, mode: mode_t, dev: dev_t) -> c_int {
    guard(-1, || if paths::is_control(path) { 0 } else { pass!(mknod: MknodFn, -1; path, mode, dev) })
}

#[no_mangle]
pub unsafe extern "C" fn mknodat(dirfd: c_int, path: *const c_char, mode: mode_t, dev: dev_t) -> c_int {
    guard(-1, || if paths::is_control(path) { 0 } else { pass!(mknodat: MknodatFn, -1; dirfd, path, mode, dev) })
}

#[no_mangle]
pub unsafe extern "C" fn __xmknod(ver: c_int, path: *const c_char, mode: mode_t, dev: *mut dev_t) -> c_int {
    guard(-1, || if paths::is_control(path) { 0 } else { pass!(__xmknod: XmknodFn, -1; ver, path, mode, dev) })
}

#[no_mangle]
pub unsafe extern "C" fn __xmknodat(
    ver: c_int,
    dirfd: c_int,
    path: *const c_char,
    mode: mode_t,
    dev: *mut dev_t,
) -> c_int {
    guard(
        -1,
        || {
            if paths::is_control(path) {
                0
            } else {
                pass!(__xmknodat: XmknodatFn, -1; ver, dirfd, path, mode, dev)
            }
        },
    )
}

// ---- fd operations ---------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    guard(-1, || match fds::lookup(fd) {
        Some(Mark::Control(ino)) => control::ioctl(fd, ino, request, arg),
        Some(Mark::Block(st)) => blockdev::ioctl(fd, &st, request, arg, || pass!(ioctl: IoctlFn, -1; fd, request, arg)),
        None => pass!(ioctl: IoctlFn, -1; fd, request, arg),
    })
}

#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    // Forget first: once closed, the number may be handed out again at any moment.
    guard(-1, || {
        fds::unmark(fd);
        pass!(close: CloseFn, -1; fd)
    })
}

/// Runs a dup-like call and gives the new fd the old one's mark (or clears a stale one).
unsafe fn dup_common(old: c_int, new: Option<c_int>, real: impl FnOnce() -> c_int) -> c_int {
    let mark = fds::live(old);
    let r = real();
    if r >= 0 && new.is_none_or(|n| n != old) {
        fds::copied(mark, r);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    guard(-1, || dup_common(fd, None, || pass!(dup: DupFn, -1; fd)))
}

#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    guard(-1, || dup_common(old, Some(new), || pass!(dup2: Dup2Fn, -1; old, new)))
}

#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    guard(-1, || dup_common(old, Some(new), || pass!(dup3: Dup3Fn, -1; old, new, flags)))
}

// glibc ≥ 2.28 programs built with _FILE_OFFSET_BITS=64 (libdevmapper among them) call `fcntl64`.
macro_rules! fcntl_hooks {
    ($($name:ident)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(fd: c_int, cmd: c_int, arg: c_long) -> c_int {
            guard(-1, || match cmd {
                libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => dup_common(fd, None, || pass!($name: FcntlFn, -1; fd, cmd, arg)),
                _ => pass!($name: FcntlFn, -1; fd, cmd, arg),
            })
        }
    )*};
}
fcntl_hooks!(fcntl fcntl64);
