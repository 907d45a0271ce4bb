//! The connection to the daemon (docs/control-socket.md): connecting, sending and reading frames with
//! raw syscalls, one exchange at a time per connection, and the process-wide `HELLO` facts. The
//! framing itself is the `dmemu-frame` crate the daemon uses too.

use crate::sys::{self, errno};
use dmemu_frame::{self as wire, hello, FrameHeader, Kind, Status};
use libc::{c_int, c_void};
use std::ffi::CStr;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Serialises exchanges on one connection (threads sharing libdm's cached control fd): frames of two
/// requests must not interleave. Striped by socket inode so dup'ed fds share a lock.
static LOCKS: [Mutex<()>; 32] = [const { Mutex::new(()) }; 32];

/// Holds the exchange lock of the connection whose socket has inode `ino`.
pub fn exchange_lock(ino: u64) -> MutexGuard<'static, ()> {
    LOCKS[(ino % LOCKS.len() as u64) as usize].lock().unwrap_or_else(|e| e.into_inner())
}

/// A frame header as the daemon expects it.
pub fn header(kind: Kind, len: u32) -> [u8; wire::HEADER_LEN] {
    FrameHeader::new(kind, len).encode()
}

/// The daemon's socket address: `$DMEMU_SOCKET` (read now, not cached), else the daemon's defaults.
fn socket_addr() -> Option<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let path = wire::default_socket(uid, |name| {
        let name = std::ffi::CString::new(name).ok()?;
        // SAFETY: getenv with a NUL-terminated name; the result is copied at once.
        let p = unsafe { libc::getenv(name.as_ptr()) };
        // SAFETY: getenv returns NULL or a NUL-terminated string.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_bytes().to_vec())
    });
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
            let _ = send_all(self.fd, &[&header(Kind::Cancel, 0)]);
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
    pub fn next_frame(&mut self) -> Result<FrameHeader, Broken> {
        loop {
            let mut h = [0u8; wire::HEADER_LEN];
            // SAFETY: h holds 16 bytes.
            unsafe { self.read(h.as_mut_ptr(), h.len())? };
            match wire::parse_header(&h) {
                Ok(h) if h.is_event() => self.skip(h.len.into())?,
                Ok(h) => return Ok(h),
                Err(_) => return Err(Broken),
            }
        }
    }

    /// Reads the status that starts a reply payload.
    pub fn status(&mut self) -> Result<Status, Broken> {
        let mut b = [0u8; wire::STATUS_LEN];
        // SAFETY: b holds STATUS_LEN bytes.
        unsafe { self.read(b.as_mut_ptr(), b.len())? };
        Ok(Status::decode(&b))
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
            16 if wire::parse_header(&h).is_ok_and(|h| h.is_event() && h.len == 0) => {
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
pub fn call(kind: Kind, payload: &[u8], reply_kind: Kind) -> c_int {
    let fd = match connect(true) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    let r = (|| {
        let len = u32::try_from(payload.len()).map_err(|_| libc::EINVAL)?;
        send_all(fd, &[&header(kind, len), payload]).map_err(|_| libc::EIO)?;
        let mut rd = Reader { fd, cancel_on_signal: false, cancelled: false };
        let h = rd.next_frame().map_err(|_| libc::EIO)?;
        if h.kind != reply_kind as u16 || h.len as usize != wire::STATUS_LEN {
            return Err(libc::EIO);
        }
        let st = rd.status().map_err(|_| libc::EIO)?;
        Ok(if st.ret < 0 { st.errno.max(1) } else { 0 })
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
    send_all(fd, &[&header(Kind::Hello, 0)]).ok()?;
    let mut rd = Reader { fd, cancel_on_signal: false, cancelled: false };
    let h = rd.next_frame().ok()?;
    if h.kind != Kind::HelloReply as u16 || h.len > wire::MAX_HELLO_REPLY {
        return None;
    }
    let mut body = vec![0u8; h.len as usize];
    // SAFETY: body holds len bytes.
    unsafe { rd.read(body.as_mut_ptr(), body.len()).ok()? };
    parse_hello(&body)
}

fn parse_hello(body: &[u8]) -> Option<Facts> {
    let major = std::str::from_utf8(hello::field(body, hello::MAJOR)?).ok()?.trim().parse::<u32>().ok()?;
    let run_dir = abs_dir(hello::field(body, hello::RUN_DIR)?)?;
    let fuse_dir = hello::field(body, hello::FUSE_DIR).and_then(abs_dir);
    Some(Facts { major, run_dir, fuse_dir })
}

/// An absolute directory path without trailing slashes, or None.
fn abs_dir(v: &[u8]) -> Option<Vec<u8>> {
    let mut v = v.to_vec();
    while v.len() > 1 && v.ends_with(b"/") {
        v.pop();
    }
    Some(v).filter(|v| v.starts_with(b"/") && !v.contains(&0))
}
