//! Which fds are ours (interposition.md §1.4: "Remember fd → control"): control sockets, and DM
//! block nodes opened through the daemon's FUSE directory.
//!
//! Each mark records what the fd pointed at when we made it: a control socket's inode, or a FUSE
//! file's device and inode. A mark is trusted only while `fstat(fd)` still shows that object, so an
//! fd closed behind our back (close_range, a raw syscall, LVM's stray-fd sweep through a path we do
//! not see) and reused for something else is never mistaken for one of ours.
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

/// Tag bit of a block-node mark: `BLOCK | (st_dev low 31 bits) << 32 | inode (32 bits)`. A
/// control mark is the socket's inode, tag clear.
const BLOCK: u64 = 1 << 63;

/// What a marked fd is (verified live).
pub enum Mark {
    /// A control connection, by socket inode.
    Control(u64),
    /// A DM block node: its FUSE file's current `fstat`.
    Block(libc::stat),
}

fn big() -> std::sync::MutexGuard<'static, Vec<(c_int, u64)>> {
    BIG.lock().unwrap_or_else(|e| e.into_inner())
}

/// The recorded mark for `fd`, 0 when unmarked. No syscalls.
fn marked(fd: c_int) -> u64 {
    match usize::try_from(fd) {
        Ok(i) if i < DIRECT => SLOTS[i].load(Relaxed),
        Ok(_) if BIG_USED.load(Relaxed) => big().iter().find(|e| e.0 == fd).map_or(0, |e| e.1),
        _ => 0,
    }
}

fn set(fd: c_int, v: u64) {
    match usize::try_from(fd) {
        Ok(i) if i < DIRECT => SLOTS[i].store(v, Relaxed),
        Ok(_) => {
            let mut list = big();
            list.retain(|e| e.0 != fd);
            if v != 0 {
                list.push((fd, v));
                BIG_USED.store(true, Relaxed);
            }
        }
        Err(_) => {}
    }
}

/// Marks `fd` as a control connection whose socket has inode `ino`.
pub fn mark(fd: c_int, ino: u64) {
    set(fd, ino & !BLOCK);
}

fn block_mark(st: &libc::stat) -> Option<u64> {
    let (dev, ino) = (st.st_dev, st.st_ino);
    if dev >= 1 << 31 || ino >= 1 << 32 {
        return None;
    }
    Some(BLOCK | dev << 32 | ino)
}

/// Marks `fd` as a DM block node if it is open on a regular file (the FUSE file), else clears it.
pub fn mark_block(fd: c_int) {
    let m = sys::keep_errno(|| sys::sys_fstat(fd))
        .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
        .and_then(|st| block_mark(&st));
    set(fd, m.unwrap_or(0));
}

pub fn unmark(fd: c_int) {
    if marked(fd) != 0 {
        set(fd, 0);
    }
}

/// What `fd` is, if it is (still) one of ours; a stale mark is dropped.
pub fn lookup(fd: c_int) -> Option<Mark> {
    let m = marked(fd);
    if m == 0 {
        return None;
    }
    let st = sys::keep_errno(|| sys::sys_fstat(fd));
    let live = match &st {
        Some(st) if m & BLOCK == 0 => st.st_mode & libc::S_IFMT == libc::S_IFSOCK && st.st_ino == m,
        Some(st) => st.st_mode & libc::S_IFMT == libc::S_IFREG && block_mark(st) == Some(m),
        None => false,
    };
    match st {
        Some(_) if live && m & BLOCK == 0 => Some(Mark::Control(m)),
        Some(st) if live => Some(Mark::Block(st)),
        _ => {
            unmark(fd);
            None
        }
    }
}

/// `fd`'s live mark (0 if none), to copy onto a duplicate with [`copied`].
pub fn live(fd: c_int) -> u64 {
    if marked(fd) == 0 || lookup(fd).is_none() {
        return 0;
    }
    marked(fd)
}

/// Keeps the marks in step after `new` became a copy of an fd whose [`live`] mark was `mark`
/// (dup*, fcntl F_DUPFD*).
pub fn copied(mark: u64, new: c_int) {
    set(new, mark);
}
