//! The emulated `/dev/mapper/control`: one daemon connection per open, DM ioctls forwarded over it, and
//! stat results that look like the misc character device 10:236.

use crate::daemon::{self, exchange_lock, Broken, Reader};
use crate::fds;
use crate::netbsd;
use crate::stat::FakeStat;
use crate::sys::{self, fail, set_errno};
use dmemu_frame::{Kind, STATUS_LEN};
use libc::{c_int, c_ulong, c_void};
use std::sync::OnceLock;

const CONTROL_MAJOR: u32 = 10;
const CONTROL_MINOR: u32 = 236;
/// The kernel's `data_size` limit (linux-dm-abi.md §1.1); beyond it only the 312-byte header is sent
/// and the daemon answers EINVAL, as the kernel does.
const MAX_DATA: u32 = 1 << 30;
const DM_IOCTL_SIZE: u32 = 312;
/// `version[3]` + `data_size`: the least we can send (the daemon needs `data_size` to judge the rest).
const MIN_SEND: u32 = 16;

/// Opens a control "node": a new daemon connection, marked as control. Returns the fd or -1/errno
/// (ENODEV when no daemon answers). O_CLOEXEC is honoured only if asked for (libdm does not ask).
pub fn open(flags: c_int) -> c_int {
    let fd = match daemon::connect(flags & libc::O_CLOEXEC != 0) {
        Ok(fd) => fd,
        Err(e) => {
            set_errno(e);
            return -1;
        }
    };
    match sys::sys_fstat(fd) {
        Some(st) => {
            fds::mark(fd, st.st_ino);
            fd
        }
        None => {
            sys::sys_close(fd);
            set_errno(libc::ENODEV);
            -1
        }
    }
}

/// `ioctl(fd, request, arg)` on a control fd whose socket has inode `ino`.
///
/// # Safety
/// As for the real ioctl: `arg` must point at the caller's `struct dm_ioctl` buffer of `data_size` bytes.
pub unsafe fn ioctl(fd: c_int, ino: u64, request: c_ulong, arg: *mut c_void) -> c_int {
    if (request >> 8) & 0xff != 0xfd {
        // The VFS handles these on any fd before the driver sees them; the driver knows no others.
        return match request {
            libc::FIOCLEX | libc::FIONCLEX | libc::FIONBIO | libc::FIOASYNC => {
                sys::pass!(ioctl: unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int, -1; fd, request, arg)
            }
            _ => fail(libc::ENOTTY),
        };
    }
    if arg.is_null() {
        return fail(libc::EFAULT);
    }
    if request == netbsd::NETBSD_DM_IOCTL {
        // SAFETY: for this request `arg` is the caller's `struct plistref`.
        return unsafe { netbsd::ioctl(fd, ino, arg) };
    }
    let buf = arg.cast::<u8>();
    // SAFETY: every DM request starts with `struct dm_ioctl`; data_size is the u32 at offset 12.
    let data_size = unsafe { buf.add(12).cast::<u32>().read_unaligned() };
    let send_len = if data_size > MAX_DATA { DM_IOCTL_SIZE } else { data_size.max(MIN_SEND) };
    // Never write past what the caller said its buffer holds (linux-dm-abi.md §2.1 step 9).
    let cap = data_size.max(MIN_SEND);

    let _guard = exchange_lock(ino);
    if daemon::drain_events(fd).is_err() {
        return fail(libc::EIO);
    }
    let mut head = [0u8; 24];
    head[..16].copy_from_slice(&daemon::header(Kind::Ioctl, 8 + send_len));
    #[allow(clippy::useless_conversion)] // c_ulong is u32 on 32-bit targets
    head[16..].copy_from_slice(&u64::from(request).to_le_bytes());
    // SAFETY: the caller's buffer holds at least `send_len` bytes (its own data_size, or the header).
    let body = unsafe { std::slice::from_raw_parts(buf, send_len as usize) };
    if daemon::send_all(fd, &[&head, body]).is_err() {
        return fail(libc::EIO);
    }

    let mut rd = Reader { fd, cancel_on_signal: true, cancelled: false };
    // SAFETY: `buf` is writable for `cap` bytes (see above).
    let reply = unsafe { read_reply(&mut rd, buf, cap) };
    match reply {
        Err(Broken) => fail(libc::EIO),
        // Interrupted and the daemon gave up the request: EINTR, as an interrupted DM_DEV_WAIT gives.
        // (Had the request completed before our CANCEL landed, its real result stands.)
        Ok((ret, _)) if rd.cancelled && ret < 0 => fail(libc::EINTR),
        Ok((ret, 0)) if ret >= 0 => ret,
        Ok((_, errno)) => fail(if errno > 0 { errno } else { libc::EIO }),
    }
}

/// Reads frames up to the `IOCTL_REPLY`, copies at most `cap` of its bytes to `buf`, and returns
/// (return value, errno). The daemon sends just `version` on failure, so "version is always written
/// back, the rest only on success" (interposition.md §1.4) follows.
///
/// # Safety
/// `buf` must be writable for `cap` bytes.
unsafe fn read_reply(rd: &mut Reader, buf: *mut u8, cap: u32) -> Result<(i32, i32), Broken> {
    let h = rd.next_frame()?;
    let Some(data_len) = h.len.checked_sub(STATUS_LEN as u32).filter(|_| h.kind == Kind::IoctlReply as u16) else {
        return Err(Broken);
    };
    let st = rd.status()?;
    let copy = data_len.min(cap);
    // SAFETY: `buf` is writable for at least `copy` ≤ `cap` bytes.
    unsafe { rd.read(buf, copy as usize)? };
    rd.skip(u64::from(data_len - copy))?;
    Ok((st.ret, st.errno))
}

/// A fixed, plausible timestamp for the fake node (first time it was asked for).
fn node_time() -> i64 {
    static T: OnceLock<i64> = OnceLock::new();
    // SAFETY: time(NULL) cannot fail.
    *T.get_or_init(|| unsafe { libc::time(std::ptr::null_mut()) })
}

/// `crw------- root root 10, 236`, so libdm neither unlinks nor re-mknods the node
/// (interposition.md §1.1 item 3) and the socket does not show as S_IFSOCK.
pub fn fake_stat() -> FakeStat {
    FakeStat {
        mode: libc::S_IFCHR | 0o600,
        rdev: (CONTROL_MAJOR, CONTROL_MINOR),
        dev: (0, 5),
        ino: u64::from(CONTROL_MINOR),
        uid: 0,
        gid: 0,
        size: 0,
        time: (node_time(), 0),
    }
}
