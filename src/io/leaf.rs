//! IO on the files and block devices at the bottom of every table: positioned reads and writes
//! (`preadv2(RWF_NOWAIT)` for reads that must not wait, `RWF_DSYNC` for FUA), `splice` for
//! payloads waiting in a pipe, `fallocate` for discard and write-zeroes, `fdatasync` for flushes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use super::bio::{Bio, BioFlags, Buf, Op};
use super::{IoError, IoResult};
use crate::dm::Sectors;

/// The largest byte offset a file can have (`off_t`).
const MAX_OFFSET: u64 = i64::MAX as u64;

/// Runs a bio remapped to a file or block device and ends it. The bio's place is checked first:
/// an IO whose byte range does not fit a file offset fails with EIO, as `bio_check_eod` fails IO
/// past a device's end (a file shorter than its table reads zeroes past its end and grows when
/// written there, like a sparse device).
pub(crate) fn execute(f: &Backing, mut bio: Bio) {
    let at = bio.0.sector.checked_mul(Sectors::SIZE);
    let end = at.and_then(|a| a.checked_add(bio.bytes())).filter(|&e| e <= MAX_OFFSET);
    let (Some(at), Some(_)) = (at, end) else {
        tracing::debug!("{bio:?} lies beyond the largest file offset");
        return bio.end(Err(IoError::Failed));
    };
    let flags = bio.0.flags;
    let r = match (bio.0.op, &mut bio.0.buf) {
        (Op::Read, Buf::Ref { ptr, len, writable: true }) => {
            // SAFETY: see `Buf::Ref`.
            let b = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), *len) };
            read(f, b, at, flags)
        }
        (Op::Read, Buf::Owned(v)) => read(f, v, at, flags),
        (Op::Write, Buf::Ref { ptr, len, .. }) => {
            // SAFETY: see `Buf::Ref`.
            let b = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), *len) };
            write(f, b, at, flags)
        }
        (Op::Write, Buf::Owned(v)) => write(f, v, at, flags),
        (Op::Write, Buf::Pipe { fd, len }) => splice_to_file(*fd, f, at, *len).and_then(|()| {
            if flags.contains(BioFlags::FUA) {
                f.sync_data()?;
            }
            Ok(())
        }),
        (Op::Flush, _) => flush(f),
        (Op::Discard, _) => punch(f, at, bio.bytes(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, false),
        (Op::WriteZeroes, _) => punch(f, at, bio.bytes(), libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, true)
            .and_then(|()| if flags.contains(BioFlags::FUA) { Ok(f.sync_data()?) } else { Ok(()) }),
        (op, _) => {
            tracing::error!("{op:?} bio without the data it needs");
            Err(IoError::Failed)
        }
    };
    if r.is_ok() && bio.0.op.is_write() && bio.0.op != Op::Flush {
        // After the write, so a flush that finds the flag clear has nothing completed to cover.
        f.dirty.store(true, Ordering::Release);
    }
    bio.end(r)
}

fn read(f: &Backing, b: &mut [u8], at: u64, flags: BioFlags) -> IoResult {
    if flags.contains(BioFlags::NOWAIT) {
        read_nowait(f, b, at)
    } else {
        read_full(f, b, at)
    }
}

fn write(f: &Backing, b: &[u8], at: u64, flags: BioFlags) -> IoResult {
    if !flags.contains(BioFlags::FUA) {
        return Ok(f.write_all_at(b, at)?);
    }
    let mut done = 0usize;
    while done < b.len() {
        let iov = libc::iovec { iov_base: b[done..].as_ptr() as *mut libc::c_void, iov_len: b.len() - done };
        // SAFETY: one iovec over a live buffer; RWF_DSYNC makes this write durable on return.
        let n = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, (at + done as u64) as libc::off_t, libc::RWF_DSYNC) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
            _ => match std::io::Error::last_os_error() {
                e if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Filesystems without RWF_DSYNC: write, then sync.
                e if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    f.write_all_at(&b[done..], at + done as u64)?;
                    f.sync_data()?;
                    return Ok(());
                }
                e => return Err(e.into()),
            },
        }
    }
    Ok(())
}

/// A flush: `fdatasync` if anything was written since the last one began (a table of a million
/// targets over one file sends a million flushes; one reaches the disk).
fn flush(f: &Backing) -> IoResult {
    if f.dirty.swap(false, Ordering::AcqRel) {
        if let Err(e) = f.sync_data() {
            f.dirty.store(true, Ordering::Release);
            return Err(e.into());
        }
    }
    Ok(())
}

/// An open underlying file or block device: what a pdev holds from its table's load until the
/// last table (or IO) using it lets go, as the kernel holds a `dm_dev` (dm_get_device /
/// dm_put_device). All IO goes through this fd; the path is never opened again.
pub struct Backing {
    file: File,
    /// Lives in memory (tmpfs, ramfs): reads never wait for a disk, though such filesystems do
    /// not support `RWF_NOWAIT`.
    memory: bool,
    /// A block device (sized with `BLKGETSIZE64`), else a regular file (sized with `fstat`).
    block: bool,
    /// Opened for writing too (`FMODE_WRITE`).
    writable: bool,
    /// A write completed since the last flush began: the next flush must reach the disk.
    dirty: AtomicBool,
}

/// Opens what `fd` refers to anew, in the given mode (`/proc/self/fd/N`, which reaches the very
/// inode, with the permission checks of an open).
fn open_fd(fd: &File, writable: bool) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(writable).open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Why [`Backing::open`] failed, and the device number if the path names a block node that could
/// not be opened (ENXIO there: no driver behind its major).
#[derive(Debug)]
pub struct OpenError {
    pub error: std::io::Error,
    pub block: Option<u64>,
}

/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl Backing {
    /// Opens `path` (following symlinks, as the kernel's path lookup does) read-only or
    /// read-write. The path is looked at once, with `O_PATH` (which opens nothing: no wait on a
    /// FIFO, none of the side effects of opening a character device); anything but a regular
    /// file or a block device is refused (`ENODEV`), and what was looked at is then opened
    /// through that fd, so it is the same file whatever the path names by then.
    ///
    /// Block devices are not opened `O_EXCL`: the kernel's exclusive claim is shared by every dm
    /// device (one holder), which a per-open userspace claim cannot express — a second table
    /// over the same device, resolved while the first holds it, would fail with EBUSY.
    pub fn open(path: &str, writable: bool) -> Result<Backing, OpenError> {
        let plain = |error| OpenError { error, block: None };
        let at = OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(path).map_err(plain)?;
        let md = at.metadata().map_err(plain)?;
        let block = md.file_type().is_block_device();
        if !md.file_type().is_file() && !block {
            return Err(plain(std::io::Error::from_raw_os_error(libc::ENODEV)));
        }
        let file = match open_fd(&at, writable) {
            // No /proc: the path again, accepted only if it still names what was looked at.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = OpenOptions::new().read(true).write(writable).open(path);
                f.and_then(|f| {
                    let m = f.metadata()?;
                    if (m.dev(), m.ino()) != (md.dev(), md.ino()) {
                        return Err(std::io::Error::from_raw_os_error(libc::ESTALE));
                    }
                    Ok(f)
                })
            }
            r => r,
        };
        let file = file.map_err(|error| OpenError { error, block: block.then(|| md.rdev()) })?;
        Self::with_mode(file, writable).map_err(plain)
    }

    /// Opens the file this one holds again, by its fd rather than a path, e.g. read-write when
    /// it was opened read-only: the same file even if its path now names another.
    pub fn reopen(&self, writable: bool) -> std::io::Result<Backing> {
        Self::with_mode(open_fd(&self.file, writable)?, writable)
    }

    // `f_type` and TMPFS_MAGIC have different integer types on other targets.
    #[allow(clippy::useless_conversion)]
    fn with_mode(file: File, writable: bool) -> std::io::Result<Backing> {
        let ft = file.metadata()?.file_type();
        let block = ft.is_block_device();
        if !ft.is_file() && !block {
            return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
        }
        // SAFETY: a valid fd and an out-buffer of the right type.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        const RAMFS_MAGIC: i64 = 0x8584_58f6;
        // Regular files only: a block device node lives on devtmpfs, which reports tmpfs too.
        let memory = ft.is_file()
            && unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } == 0
            && matches!(i64::from(st.f_type), x if x == i64::from(libc::TMPFS_MAGIC) || x == RAMFS_MAGIC);
        Ok(Backing { file, memory, block, writable, dirty: AtomicBool::new(false) })
    }

    /// The identity of what is open: `(st_dev, st_ino)` for a regular file, `st_rdev` for a
    /// block device (from `fstat` of the fd, never a second look at the path).
    pub fn identity(&self) -> std::io::Result<(u64, u64, Option<u64>)> {
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino(), self.block.then(|| m.rdev())))
    }

    /// The current size in whole sectors, as `bdev_nr_sectors` reads it at each use.
    pub fn size(&self) -> std::io::Result<Sectors> {
        let bytes = if self.block {
            let mut n: u64 = 0;
            // SAFETY: a valid fd and a live u64 for the ioctl to fill.
            if unsafe { libc::ioctl(self.file.as_raw_fd(), BLKGETSIZE64 as _, &mut n) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            n
        } else {
            self.file.metadata()?.len()
        };
        Ok(Sectors(bytes / Sectors::SIZE))
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    pub fn is_block(&self) -> bool {
        self.block
    }
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backing")
            .field("fd", &self.file.as_raw_fd())
            .field("block", &self.block)
            .field("writable", &self.writable)
            .finish()
    }
}

impl std::ops::Deref for Backing {
    type Target = File;
    fn deref(&self) -> &File {
        &self.file
    }
}

/// [`read_full`] that gives [`IoError::WouldBlock`] instead of waiting for a disk
/// (`RWF_NOWAIT`: served from the page cache or not at all).
pub(crate) fn read_nowait(f: &Backing, mut b: &mut [u8], mut at: u64) -> IoResult {
    if f.memory {
        return read_full(f, b, at);
    }
    while !b.is_empty() {
        let iov = libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() };
        // SAFETY: one iovec over a live, exclusively borrowed buffer.
        let n = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, at as libc::off_t, libc::RWF_NOWAIT) };
        match n {
            0 => {
                b.fill(0);
                return Ok(());
            }
            n if n > 0 => {
                b = &mut b[n as usize..];
                at += n as u64;
            }
            _ => match std::io::Error::last_os_error() {
                e if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EAGAIN: not cached; EOPNOTSUPP: the filesystem cannot tell.
                e if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP)) => {
                    return Err(IoError::WouldBlock)
                }
                e => return Err(e.into()),
            },
        }
    }
    Ok(())
}

/// Reads exactly `b.len()` bytes at `at`; past the end of a file reads zeroes (a file shorter
/// than its table behaves like a sparse device).
pub(crate) fn read_full(f: &File, mut b: &mut [u8], mut at: u64) -> IoResult {
    while !b.is_empty() {
        match f.read_at(b, at) {
            Ok(0) => {
                b.fill(0);
                return Ok(());
            }
            Ok(n) => {
                b = &mut b[n..];
                at += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// How a run of a device's bytes is stored (NBD's `base:allocation`): `hole` — no storage
/// behind it (a file's hole, a zero target); `zero` — reads as zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub hole: bool,
    pub zero: bool,
}

/// Table pieces and file seeks one [`IoHandle::extents`] call may take.
pub(crate) const EXTENT_STEPS: u32 = 1 << 16;

pub(crate) fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    match out.last_mut() {
        Some(last) if (last.hole, last.zero) == (e.hole, e.zero) => last.len += e.len,
        _ if e.len > 0 => out.push(e),
        _ => {}
    }
}

/// The allocation of `n` bytes at `at` of a file or block device, from `SEEK_DATA`/`SEEK_HOLE`
/// (past the end of a file is a hole, as reads there give zeroes; a block device is all data).
pub(crate) fn file_extents(f: &File, at: u64, n: u64, out: &mut Vec<Extent>, max: usize, budget: &mut u32) -> IoResult {
    let seek = |pos: u64, whence: i32| -> std::io::Result<u64> {
        // SAFETY: a valid fd; the file position is never used for IO here (all IO is positioned).
        let r = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let end = at + n;
    let mut pos = at;
    while pos < end && out.len() <= max && *budget > 0 {
        *budget -= 1;
        let data = match seek(pos, libc::SEEK_DATA) {
            Ok(d) => d,
            // No data at or after `pos`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            // A file that cannot tell: all data.
            Err(_) => pos,
        };
        if data > pos {
            let h = data.min(end) - pos;
            push_extent(out, Extent { len: h, hole: true, zero: true });
            pos += h;
            continue;
        }
        let hole = seek(pos, libc::SEEK_HOLE).unwrap_or(end).max(pos + 1);
        let d = hole.min(end) - pos;
        push_extent(out, Extent { len: d, hole: false, zero: false });
        pos += d;
    }
    Ok(())
}

/// Moves `n` bytes from a pipe (all already in it) to `f` at `at` with `splice`; files that
/// cannot take a splice get the bytes copied.
pub(crate) fn splice_to_file(pipe: RawFd, f: &File, mut at: u64, mut n: u64) -> IoResult {
    while n > 0 {
        let mut off = at as libc::loff_t;
        // SAFETY: valid fds; `off` is a live loff_t the kernel updates.
        let r = unsafe { libc::splice(pipe, std::ptr::null_mut(), f.as_raw_fd(), &mut off, n as usize, 0) };
        match r {
            0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            r if r > 0 => {
                at += r as u64;
                n -= r as u64;
            }
            _ => match std::io::Error::last_os_error() {
                e if e.kind() == std::io::ErrorKind::Interrupted => {}
                e if e.raw_os_error() == Some(libc::EINVAL) => {
                    let mut buf = vec![0u8; (n as usize).min(1 << 20)];
                    while n > 0 {
                        let k = (n as usize).min(buf.len());
                        read_pipe(pipe, &mut buf[..k])?;
                        f.write_all_at(&buf[..k], at)?;
                        at += k as u64;
                        n -= k as u64;
                    }
                }
                e => return Err(e.into()),
            },
        }
    }
    Ok(())
}

/// Reads exactly `b.len()` bytes from a pipe that holds them.
pub fn read_pipe(pipe: RawFd, b: &mut [u8]) -> std::io::Result<()> {
    let mut got = 0;
    while got < b.len() {
        // SAFETY: a valid fd and a live buffer of the given length.
        let r = unsafe { libc::read(pipe, b[got..].as_mut_ptr().cast(), b.len() - got) };
        match r {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            r if r > 0 => got += r as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Takes `n` bytes off a pipe and drops them.
pub fn discard_from_pipe(pipe: RawFd, mut n: u64) -> IoResult {
    let mut buf = [0u8; 16 << 10];
    while n > 0 {
        let k = (n as usize).min(buf.len());
        read_pipe(pipe, &mut buf[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// Discard / write-zeroes on a file or block device with fallocate; write-zeroes falls back to
/// writing zeroes where the filesystem cannot.
pub(crate) fn punch(f: &File, at: u64, n: u64, mode: i32, must_zero: bool) -> IoResult {
    // SAFETY: a valid fd; fallocate only reads its integer arguments.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, at as libc::off_t, n as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    if !must_zero {
        // Discard is advisory: a device that cannot punch holes ignores it.
        return Ok(());
    }
    let zeros = vec![0u8; (n as usize).min(1 << 20)];
    let mut done = 0;
    while done < n {
        let k = (n - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..k], at + done)?;
        done += k as u64;
    }
    Ok(())
}
