//! Client side of the daemon's socket protocol (`docs/control-socket.md`): framing, connecting, and the
//! process-wide `HELLO` facts.

use crate::sys::{self, errno};
use libc::{c_int, c_void};
use std::ffi::CStr;
use std::sync::OnceLock;

pub const MAGIC: u32 = 0x5545_4d44;
pub const IOCTL: u16 = 1;
pub const PLIST: u16 = 2;
pub const HELLO: u16 = 3;
pub const CANCEL: u16 = 4;
pub const BLK_RO_SET: u16 = 6;
pub const BLK_RO_SET_REPLY: u16 = 0x86;
pub const IOCTL_REPLY: u16 = 0x81;
pub const PLIST_REPLY: u16 = 0x82;
pub const HELLO_REPLY: u16 = 0x83;
pub const EVENT: u16 = 0x90;

/// A 16-byte frame header: magic, kind, flags = 0, len, aux = 0 (all little-endian).
pub fn header(kind: u16, len: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&kind.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h
}

/// (kind, len) of a received header, or None if it is not a valid frame.
pub fn parse(h: &[u8; 16]) -> Option<(u16, u32)> {
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let flags = u16::from_le_bytes([h[6], h[7]]);
    (word(0) == MAGIC && flags == 0).then(|| (u16::from_le_bytes([h[4], h[5]]), word(8)))
}

/// The daemon's socket address: `$DMEMU_SOCKET` (read now, not cached), else the daemon's defaults.
fn socket_addr() -> Option<(libc::sockaddr_un, libc::socklen_t)> {
    let env = |name: &CStr| {
        // SAFETY: getenv with a NUL-terminated name; the result is copied at once.
        let p = unsafe { libc::getenv(name.as_ptr()) };
        // SAFETY: getenv returns NULL or a NUL-terminated string.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_bytes().to_vec()).filter(|v| !v.is_empty())
    };
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let path = match env(c"DMEMU_SOCKET") {
        Some(p) => p,
        None if uid == 0 => b"/run/dmemu/control.sock".to_vec(),
        None => match env(c"XDG_RUNTIME_DIR") {
            Some(mut d) => {
                d.extend_from_slice(b"/dmemu/control.sock");
                d
            }
            None => format!("/tmp/dmemu-{uid}/control.sock").into_bytes(),
        },
    };
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if path.len() >= sa.sun_path.len() || path.contains(&0) {
        return None;
    }
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sa.sun_path.iter_mut().zip(&path) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + path.len() + 1;
    Some((sa, len as libc::socklen_t))
}

/// A fresh connection to the daemon. Errors: socket()'s own errno (EMFILE…), or ENODEV when no daemon
/// answers — what opening the control node gives when the driver is missing (interposition.md §1.2).
pub fn connect(cloexec: bool) -> Result<c_int, c_int> {
    let Some((sa, len)) = socket_addr() else {
        return Err(libc::ENODEV);
    };
    let ty = libc::SOCK_STREAM | if cloexec { libc::SOCK_CLOEXEC } else { 0 };
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_UNIX, ty, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: `sa` is a valid sockaddr_un of length `len`.
    if unsafe { libc::connect(fd, (&sa as *const libc::sockaddr_un).cast(), len) } != 0 {
        let e = errno();
        sys::sys_close(fd);
        return Err(if e == libc::EINTR { e } else { libc::ENODEV });
    }
    Ok(fd)
}

/// Sends all of `parts` as one byte stream (MSG_NOSIGNAL: a dead daemon must not SIGPIPE the caller).
pub fn send_all(fd: c_int, parts: &[&[u8]]) -> Result<(), c_int> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0;
    while done < total {
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 4];
        let (mut n, mut skip) = (0, done);
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            iov[n] = libc::iovec { iov_base: p[skip..].as_ptr() as *mut c_void, iov_len: p.len() - skip };
            skip = 0;
            n += 1;
        }
        // SAFETY: all-zero msghdr is valid; iov points at `n` live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n as _;
        // SAFETY: as above.
        let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            done += r as usize;
            continue;
        }
        match errno() {
            libc::EINTR => {}
            libc::EAGAIN => {
                wait(fd, libc::POLLOUT);
            }
            e => return Err(e),
        }
    }
    Ok(())
}

/// Blocks until `fd` is ready for `events` (only reached if the caller made the socket non-blocking).
fn wait(fd: c_int, events: libc::c_short) -> c_int {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, -1) }
}

/// EOF, a socket error, a timeout or a malformed frame: the connection is unusable.
pub struct Broken;

/// A reader for one request/reply exchange. With `cancel_on_signal` (ioctls), a signal interrupting
/// the wait sends one `CANCEL` frame and keeps reading, since the daemon still owes the reply
/// (interposition.md §1.6 "Blocking and signals"); otherwise EINTR is simply retried.
pub struct Reader {
    pub fd: c_int,
    pub cancel_on_signal: bool,
    pub cancelled: bool,
}

impl Reader {
    fn interrupted(&mut self) {
        if self.cancel_on_signal && !self.cancelled {
            self.cancelled = true;
            // If this fails the connection is dead and the next recv reports it.
            let _ = send_all(self.fd, &[&header(CANCEL, 0)]);
        }
    }

    /// Reads exactly `len` bytes into `buf`.
    ///
    /// # Safety
    /// `buf` must be writable for `len` bytes.
    pub unsafe fn read(&mut self, buf: *mut u8, len: usize) -> Result<(), Broken> {
        let mut got = 0;
        while got < len {
            // SAFETY: within the caller's buffer.
            let n = unsafe { libc::recv(self.fd, buf.add(got).cast(), len - got, 0) };
            if n > 0 {
                got += n as usize;
                continue;
            }
            if n == 0 {
                return Err(Broken);
            }
            match errno() {
                libc::EINTR => self.interrupted(),
                // Non-blocking only if the app made it so; a HELLO socket's timeout is final.
                libc::EAGAIN if self.cancel_on_signal => {
                    if wait(self.fd, libc::POLLIN) < 0 && errno() == libc::EINTR {
                        self.interrupted();
                    }
                }
                _ => return Err(Broken),
            }
        }
        Ok(())
    }

    /// Reads and throws away `n` bytes.
    pub fn skip(&mut self, mut n: u64) -> Result<(), Broken> {
        let mut scratch = [0u8; 4096];
        while n > 0 {
            let k = n.min(scratch.len() as u64) as usize;
            // SAFETY: scratch holds k bytes.
            unsafe { self.read(scratch.as_mut_ptr(), k)? };
            n -= k as u64;
        }
        Ok(())
    }

    /// The next frame header that is not an `EVENT` (those are discarded wherever found).
    pub fn next_frame(&mut self) -> Result<(u16, u32), Broken> {
        loop {
            let mut h = [0u8; 16];
            // SAFETY: h holds 16 bytes.
            unsafe { self.read(h.as_mut_ptr(), 16)? };
            match parse(&h) {
                Some((EVENT, len)) => self.skip(len.into())?,
                Some(kl) => return Ok(kl),
                None => return Err(Broken),
            }
        }
    }
}

/// Throws away `EVENT` frames already queued on a control connection, without blocking, so that the
/// socket stops polling readable once the caller reacts (re-arms) — docs/control-socket.md `EVENT`.
/// Err on EOF/error.
pub fn drain_events(fd: c_int) -> Result<(), ()> {
    loop {
        let mut h = [0u8; 16];
        let flags = libc::MSG_DONTWAIT | libc::MSG_PEEK;
        // SAFETY: h holds 16 bytes.
        let n = unsafe { libc::recv(fd, h.as_mut_ptr().cast(), 16, flags) };
        match n {
            16 if parse(&h) == Some((EVENT, 0)) => {
                // SAFETY: consume exactly the peeked header.
                unsafe { libc::recv(fd, h.as_mut_ptr().cast(), 16, libc::MSG_DONTWAIT) };
            }
            0 => return Err(()),
            n if n > 0 => return Ok(()),
            _ => match errno() {
                libc::EINTR => {}
                libc::EAGAIN => return Ok(()),
                _ => return Err(()),
            },
        }
    }
}

/// One request frame on a connection of its own, answered by a `ret`/`errno` reply of
/// `reply_kind`: the errno to report (0 on success). ENODEV when no daemon answers, EIO when the
/// exchange breaks.
pub fn call(kind: u16, payload: &[u8], reply_kind: u16) -> c_int {
    let fd = match connect(true) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    let r = (|| {
        send_all(fd, &[&header(kind, payload.len() as u32), payload]).map_err(|_| libc::EIO)?;
        let mut rd = Reader { fd, cancel_on_signal: false, cancelled: false };
        let (k, len) = rd.next_frame().map_err(|_| libc::EIO)?;
        if k != reply_kind || len != 8 {
            return Err(libc::EIO);
        }
        let mut b = [0u8; 8];
        // SAFETY: b holds 8 bytes.
        unsafe { rd.read(b.as_mut_ptr(), 8) }.map_err(|_| libc::EIO)?;
        let (ret, errno) =
            (i32::from_le_bytes(b[..4].try_into().unwrap()), i32::from_le_bytes(b[4..].try_into().unwrap()));
        Ok(if ret < 0 { errno.max(1) } else { 0 })
    })();
    sys::sys_close(fd);
    r.unwrap_or_else(|e| e)
}

/// What `HELLO` told us; fixed for the life of the daemon, so cached for the process.
pub struct Facts {
    /// The DM block major (for /proc/devices and /sys/dev/block/<major>:*).
    pub major: u32,
    /// Root of the daemon's sysfs mirror, without a trailing slash.
    pub run_dir: Vec<u8>,
    /// The daemon's FUSE directory of device files (`fuse_dir=`), without a trailing slash; None
    /// when it serves none, and DM block nodes are then left alone.
    pub fuse_dir: Option<Vec<u8>>,
}

static FACTS: OnceLock<Facts> = OnceLock::new();

/// The daemon's facts, asking it once (on its own short-lived connection) the first time they are
/// needed. A failure is not cached: the daemon may simply not be up yet. errno is left untouched.
pub fn facts() -> Option<&'static Facts> {
    if let Some(f) = FACTS.get() {
        return Some(f);
    }
    // Racing threads may each ask; the first answer wins, and no lock is held across I/O.
    let f = sys::keep_errno(hello)?;
    let _ = FACTS.set(f);
    FACTS.get()
}

fn hello() -> Option<Facts> {
    let fd = connect(true).ok()?;
    let r = hello_on(fd);
    sys::sys_close(fd);
    r
}

fn hello_on(fd: c_int) -> Option<Facts> {
    // A wedged daemon must not hang an innocent fopen("/proc/devices") forever.
    let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        let sz = std::mem::size_of_val(&tv) as libc::socklen_t;
        // SAFETY: valid option value.
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&tv as *const libc::timeval).cast(), sz) };
    }
    send_all(fd, &[&header(HELLO, 0)]).ok()?;
    let mut rd = Reader { fd, cancel_on_signal: false, cancelled: false };
    let (kind, len) = rd.next_frame().ok()?;
    if kind != HELLO_REPLY || len > 64 * 1024 {
        return None;
    }
    let mut body = vec![0u8; len as usize];
    // SAFETY: body holds len bytes.
    unsafe { rd.read(body.as_mut_ptr(), body.len()).ok()? };
    parse_hello(&body)
}

fn parse_hello(body: &[u8]) -> Option<Facts> {
    let (mut major, mut run_dir, mut fuse_dir) = (None, None, None);
    for line in body.split(|&c| c == b'\n') {
        if let Some(v) = line.strip_prefix(b"major=") {
            major = std::str::from_utf8(v).ok().and_then(|s| s.trim().parse::<u32>().ok());
        } else if let Some(v) = line.strip_prefix(b"run_dir=") {
            run_dir = abs_dir(v);
        } else if let Some(v) = line.strip_prefix(b"fuse_dir=") {
            fuse_dir = abs_dir(v);
        }
    }
    Some(Facts { major: major?, run_dir: run_dir?, fuse_dir })
}

/// An absolute directory path without trailing slashes, or None.
fn abs_dir(v: &[u8]) -> Option<Vec<u8>> {
    let mut v = v.to_vec();
    while v.len() > 1 && v.ends_with(b"/") {
        v.pop();
    }
    Some(v).filter(|v| v.starts_with(b"/") && !v.contains(&0))
}
