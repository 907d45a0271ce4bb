//! Made-up stat results (the control node, DM block nodes) written into whichever buffer the caller
//! passed: `struct stat`, `struct stat64` or `struct statx`.

use crate::sys::set_errno;
use libc::c_int;

/// What a faked node looks like.
pub struct FakeStat {
    pub mode: u32,
    pub rdev: (u32, u32),
    pub dev: (u32, u32),
    pub ino: u64,
    pub uid: u32,
    pub gid: u32,
    pub size: i64,
    /// (seconds, nanoseconds), used for atime, mtime and ctime alike.
    pub time: (i64, i64),
}

pub trait StatBuf {
    fn fill(&mut self, f: &FakeStat);
}

macro_rules! stat_buf {
    ($($ty:ty)*) => {$(
        impl StatBuf for $ty {
            fn fill(&mut self, f: &FakeStat) {
                self.st_dev = libc::makedev(f.dev.0, f.dev.1);
                self.st_ino = f.ino as _;
                self.st_nlink = 1;
                self.st_mode = f.mode;
                self.st_uid = f.uid;
                self.st_gid = f.gid;
                self.st_rdev = libc::makedev(f.rdev.0, f.rdev.1);
                self.st_size = f.size;
                self.st_blksize = 4096;
                self.st_atime = f.time.0;
                self.st_atime_nsec = f.time.1;
                self.st_mtime = f.time.0;
                self.st_mtime_nsec = f.time.1;
                self.st_ctime = f.time.0;
                self.st_ctime_nsec = f.time.1;
            }
        }
    )*};
}
stat_buf!(libc::stat libc::stat64);

impl StatBuf for libc::statx {
    fn fill(&mut self, f: &FakeStat) {
        // SAFETY: all-zero is a valid timestamp (its padding field is not public everywhere).
        let mut t: libc::statx_timestamp = unsafe { std::mem::zeroed() };
        t.tv_sec = f.time.0;
        t.tv_nsec = f.time.1 as u32;
        self.stx_mask = libc::STATX_BASIC_STATS;
        self.stx_blksize = 4096;
        self.stx_nlink = 1;
        self.stx_uid = f.uid;
        self.stx_gid = f.gid;
        self.stx_mode = f.mode as u16;
        self.stx_ino = f.ino;
        self.stx_size = f.size as u64;
        self.stx_atime = t;
        self.stx_ctime = t;
        self.stx_mtime = t;
        self.stx_rdev_major = f.rdev.0;
        self.stx_rdev_minor = f.rdev.1;
        self.stx_dev_major = f.dev.0;
        self.stx_dev_minor = f.dev.1;
    }
}

/// Writes `f` into the caller's buffer: 0, or -1/EFAULT for a NULL buffer.
///
/// # Safety
/// `buf` must be NULL or writable.
pub unsafe fn write<B: StatBuf>(buf: *mut B, f: &FakeStat) -> c_int {
    if buf.is_null() {
        set_errno(libc::EFAULT);
        return -1;
    }
    // SAFETY: caller's contract; all-zero is a valid stat/statx, then the meaningful fields.
    unsafe {
        buf.write_bytes(0, 1);
        (*buf).fill(f);
    }
    0
}
