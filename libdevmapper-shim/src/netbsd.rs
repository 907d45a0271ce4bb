//! NetBSD's device-mapper ioctl on a control fd (netbsd-dm-proplib.md §1):
//! `ioctl(fd, NETBSD_DM_IOCTL, &plistref)`, so programs written for libprop's
//! `prop_dictionary_sendrecv_ioctl` run unmodified.
//!
//! The `pref_len` bytes at `pref_plist` (the XML and its NUL) go to the daemon in a `PLIST` frame.
//! On success the reply replaces them as the kernel's copy-out does: a fresh anonymous mapping with
//! `pref_len` counting the NUL, which libprop frees with `munmap(pref_plist, pref_len)`. On failure
//! the caller's plistref is left alone (libprop reads nothing back then).

use crate::daemon::{self, exchange_lock, Broken, Reader};
use crate::sys::fail;
use dmemu_frame::{Kind, STATUS_LEN};
use libc::{c_int, c_ulong, c_void};

/// `struct plistref`.
#[repr(C)]
struct PlistRef {
    pref_plist: *mut c_void,
    pref_len: usize,
}

/// `_IOWR(0xfd, 0, struct plistref)`: 0xC010FD00 on LP64, 0xC008FD00 on ILP32 (§1.1).
pub const NETBSD_DM_IOCTL: c_ulong = 0xC000_0000 | ((std::mem::size_of::<PlistRef>() as c_ulong) << 16) | 0xfd00;

/// The kernel's copy-in limit (§1.2). A longer request is sent cut to this length: the daemon then
/// answers E2BIG, as the kernel does, without the rest crossing the socket.
const COPYIN_LIMIT: usize = 128 * 1024;

/// # Safety
/// `arg` must point at the caller's `struct plistref`, whose `pref_plist` is readable for
/// `pref_len` bytes.
pub unsafe fn ioctl(fd: c_int, ino: u64, arg: *mut c_void) -> c_int {
    let pref = arg.cast::<PlistRef>();
    // SAFETY: caller's contract.
    let (plist, len) = unsafe { ((*pref).pref_plist, (*pref).pref_len) };
    let send = len.min(COPYIN_LIMIT);
    if plist.is_null() && send > 0 {
        return fail(libc::EFAULT);
    }
    let body: &[u8] = if send == 0 {
        &[]
    } else {
        // SAFETY: the caller's buffer holds `pref_len` ≥ `send` bytes.
        unsafe { std::slice::from_raw_parts(plist.cast::<u8>(), send) }
    };

    let _guard = exchange_lock(ino);
    if daemon::drain_events(fd).is_err() {
        return fail(libc::EIO);
    }
    if daemon::send_all(fd, &[&daemon::header(Kind::Plist, send as u32), body]).is_err() {
        return fail(libc::EIO);
    }
    // Proplib requests never block in the daemon: an interrupted read is simply retried.
    let mut rd = Reader { fd, cancel_on_signal: false, cancelled: false };
    match read_reply(&mut rd) {
        Err(Broken) => fail(libc::EIO),
        Ok(Reply::Failed(errno)) => fail(if errno > 0 { errno } else { libc::EIO }),
        Ok(Reply::Mapped(ptr, n)) => {
            // SAFETY: caller's contract; the kernel overwrites both fields on success.
            unsafe {
                (*pref).pref_plist = ptr;
                (*pref).pref_len = n;
            }
            0
        }
    }
}

enum Reply {
    Failed(c_int),
    /// The reply XML (NUL included) in its own mapping.
    Mapped(*mut c_void, usize),
}

fn read_reply(rd: &mut Reader) -> Result<Reply, Broken> {
    let h = rd.next_frame()?;
    let Some(n) = h.len.checked_sub(STATUS_LEN as u32).filter(|_| h.kind == Kind::PlistReply as u16) else {
        return Err(Broken);
    };
    let st = rd.status()?;
    let n = n as usize;
    if st.ret < 0 || n == 0 {
        // The daemon's diagnostic copy of a failed request's dictionary is not for the caller.
        rd.skip(n as u64)?;
        return Ok(Reply::Failed(if st.ret < 0 { st.errno } else { libc::EIO }));
    }
    // SAFETY: a private anonymous mapping; no preconditions.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            n,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        rd.skip(n as u64)?;
        return Ok(Reply::Failed(libc::ENOMEM));
    }
    // SAFETY: the mapping holds `n` writable bytes.
    if let Err(e) = unsafe { rd.read(map.cast::<u8>(), n) } {
        // SAFETY: our own mapping of `n` bytes.
        unsafe { libc::munmap(map, n) };
        return Err(e);
    }
    Ok(Reply::Mapped(map, n))
}
