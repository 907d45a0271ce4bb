//! Which fds are control sockets (interposition.md §1.4: "Remember fd → control").
//!
//! Each mark stores the socket's inode number. A mark is trusted only while `fstat(fd)` still shows that
//! socket, so an fd closed behind our back (close_range, a raw syscall, LVM's stray-fd sweep through a
//! path we do not see) and reused for something else is never mistaken for the control node.
//! Unmarked fds — every fd of a normal program — cost one relaxed atomic load per ioctl/fstat/close.

use crate::sys;
use libc::c_int;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// fds below this live in a flat table (512 KiB of .bss, only touched pages are ever mapped).
const DIRECT: usize = 1 << 16;
static SLOTS: [AtomicU64; DIRECT] = [const { AtomicU64::new(0) }; DIRECT];
/// Larger fds (rare: needs a raised RLIMIT_NOFILE) go to a locked list.
static BIG: Mutex<Vec<(c_int, u64)>> = Mutex::new(Vec::new());
static BIG_USED: AtomicBool = AtomicBool::new(false);

fn big() -> std::sync::MutexGuard<'static, Vec<(c_int, u64)>> {
    BIG.lock().unwrap_or_else(|e| e.into_inner())
}

/// The recorded inode for `fd`, 0 when unmarked. No syscalls.
fn marked(fd: c_int) -> u64 {
    match usize::try_from(fd) {
        Ok(i) if i < DIRECT => SLOTS[i].load(Relaxed),
        Ok(_) if BIG_USED.load(Relaxed) => big().iter().find(|e| e.0 == fd).map_or(0, |e| e.1),
        _ => 0,
    }
}

pub fn mark(fd: c_int, ino: u64) {
    match usize::try_from(fd) {
        Ok(i) if i < DIRECT => SLOTS[i].store(ino, Relaxed),
        Ok(_) => {
            let mut v = big();
            v.retain(|e| e.0 != fd);
            v.push((fd, ino));
            BIG_USED.store(true, Relaxed);
        }
        Err(_) => {}
    }
}

pub fn unmark(fd: c_int) {
    if marked(fd) == 0 {
        return;
    }
    match usize::try_from(fd) {
        Ok(i) if i < DIRECT => SLOTS[i].store(0, Relaxed),
        Ok(_) => big().retain(|e| e.0 != fd),
        Err(_) => {}
    }
}

/// The inode of an fd's socket, if the fd is (still) one of our control connections.
pub fn control_ino(fd: c_int) -> Option<u64> {
    let ino = marked(fd);
    if ino == 0 {
        return None;
    }
    let live = sys::keep_errno(|| sys::sys_fstat(fd))
        .is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK && st.st_ino == ino);
    if !live {
        unmark(fd);
        return None;
    }
    Some(ino)
}

/// Keeps the marks in step after `new` became a copy of `old` (dup*, fcntl F_DUPFD*).
pub fn copied(old_ino: Option<u64>, new: c_int) {
    match old_ino {
        Some(ino) => mark(new, ino),
        None => unmark(new),
    }
}
