//! Access to the real libc functions and raw syscalls.
//!
//! Every libc symbol this library exports (open, close, fstat, ioctl, …) also binds *our own* calls to
//! it, so internal code must never call `libc::close` & co.: it uses the `sys_*` wrappers (raw
//! syscalls) below, or libc functions we do not export (socket, recv, read, memfd_create, fdopen…).

use libc::{c_char, c_int};
use std::ffi::CStr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `dlsym(RTLD_NEXT, name)`, cached in `cache`; 0 if libc has no such symbol.
pub fn resolve(cache: &AtomicUsize, name: &CStr) -> usize {
    let p = cache.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    let saved = errno();
    // SAFETY: `name` is NUL-terminated; dlsym has no other preconditions.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    set_errno(saved);
    cache.store(p, Ordering::Relaxed);
    p
}

/// `real!(name: fn type)` → `Option<fn type>` of the next definition of `name` (normally glibc's).
macro_rules! real {
    ($name:ident : $ty:ty) => {{
        static CACHE: ::std::sync::atomic::AtomicUsize = ::std::sync::atomic::AtomicUsize::new(0);
        // SAFETY (transmute): a non-zero dlsym result for this name is a function of type `$ty`.
        match $crate::sys::resolve(
            &CACHE,
            // SAFETY: the literal ends in exactly one NUL.
            unsafe { ::std::ffi::CStr::from_bytes_with_nul_unchecked(concat!(stringify!($name), "\0").as_bytes()) },
        ) {
            0 => None,
            p => Some(unsafe { ::std::mem::transmute::<usize, $ty>(p) }),
        }
    }};
}
pub(crate) use real;

/// Calls the real `name` with `args`, or fails with ENOSYS returning `fail` if libc lacks it.
macro_rules! pass {
    ($name:ident : $ty:ty, $fail:expr; $($arg:expr),* $(,)?) => {
        match $crate::sys::real!($name: $ty) {
            // SAFETY: the caller's arguments go unchanged to the function they were meant for.
            Some(f) => unsafe { f($($arg),*) },
            None => {
                $crate::sys::set_errno(::libc::ENOSYS);
                $fail
            }
        }
    };
}
pub(crate) use pass;

pub fn errno() -> c_int {
    // SAFETY: __errno_location always returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(e: c_int) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = e }
}

/// Runs `f` and puts errno back as it was, so a hook that looked at a path and then decided to pass
/// the call through leaves no trace in errno (interposition.md §1.4 "pass through").
/// Sets errno and returns -1, as a failing libc call does.
pub fn fail(e: c_int) -> c_int {
    set_errno(e);
    -1
}

pub fn keep_errno<R>(f: impl FnOnce() -> R) -> R {
    let saved = errno();
    let r = f();
    set_errno(saved);
    r
}

pub fn sys_close(fd: c_int) {
    // SAFETY: closing an fd we own; raw syscall so the `close` hook is not re-entered.
    unsafe { libc::syscall(libc::SYS_close, fd) };
}

/// `openat(AT_FDCWD, path, flags)` without going through the open hooks.
pub fn sys_open(path: &CStr, flags: c_int) -> c_int {
    // SAFETY: `path` is NUL-terminated.
    unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, path.as_ptr(), flags, 0) as c_int }
}

/// `fstat(fd)` without going through the stat hooks; None (errno set) if the fd is not open.
pub fn sys_fstat(fd: c_int) -> Option<libc::stat> {
    // SAFETY: an all-zero `struct stat` is valid; the kernel fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let empty: *const c_char = c"".as_ptr();
    // SAFETY: valid pointers; AT_EMPTY_PATH makes this fstat(fd).
    let r = unsafe { libc::syscall(libc::SYS_newfstatat, fd, empty, &mut st, libc::AT_EMPTY_PATH) };
    (r == 0).then_some(st)
}

/// `stat(path)` (or `lstat` with `nofollow`) without going through the stat hooks; None (errno set)
/// on failure.
pub fn sys_stat(path: &CStr, nofollow: bool) -> Option<libc::stat> {
    // SAFETY: an all-zero `struct stat` is valid; the kernel fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let flags = if nofollow { libc::AT_SYMLINK_NOFOLLOW } else { 0 };
    // SAFETY: valid pointers.
    let r = unsafe { libc::syscall(libc::SYS_newfstatat, libc::AT_FDCWD, path.as_ptr(), &mut st, flags) };
    (r == 0).then_some(st)
}

/// The first few KiB of a small file (a sysfs attribute), read without our hooks.
pub fn read_small(path: &CStr) -> Option<Vec<u8>> {
    let fd = sys_open(path, libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return None;
    }
    let mut buf = vec![0u8; 4096];
    let n = loop {
        // SAFETY: reading into our buffer (read is not hooked).
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 || errno() != libc::EINTR {
            break n;
        }
    };
    sys_close(fd);
    buf.truncate(usize::try_from(n).ok()?);
    Some(buf)
}
