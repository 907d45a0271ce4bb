//! The data plane: IO through a device's live table to files, block devices and other dmemu
//! devices (stacking goes through here directly, never through a socket).
//!
//! The control plane (the engine) stays IO-free; after every command the server publishes each
//! device's live table and suspend state here ([`DataPlane::publish`]), and before a suspend it
//! drains in-flight IO ([`DataPlane::drain`]), as the kernel's suspend does. Mechanism: positioned
//! IO (`pread`/`pwrite`, `preadv2(RWF_NOWAIT)` for reads that must not wait, `splice` for payloads
//! waiting in a pipe) on the caller's thread; front ends (NBD) run what may wait on worker
//! threads, so many requests are in flight at once (docs/PERFORMANCE.md has the comparison that
//! chose it).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use crate::dm::pdev::{Pdev, PdevKind};
use crate::dm::table::Table;
use crate::dm::target::Mapping;
use crate::dm::{DevNum, Sectors};

const SECTOR: u64 = Sectors::SIZE;

/// Why an IO failed; each maps to the errno a block device would give.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("device has no live table or is gone")]
    NoDevice,
    #[error("device is read-only")]
    ReadOnly,
    #[error("IO beyond the end of the device")]
    Range,
    #[error("IO failed by the table (error target)")]
    Failed,
    /// Only from the `*_nowait` calls: the request would wait (device suspended, data not in
    /// memory); nothing was changed that the blocking call would not redo.
    #[error("IO would block")]
    WouldBlock,
    #[error("{0}")]
    Os(#[from] std::io::Error),
}

impl IoError {
    pub fn errno(&self) -> i32 {
        match self {
            IoError::NoDevice => libc::ENXIO,
            IoError::ReadOnly => libc::EPERM,
            IoError::Range => libc::EINVAL,
            IoError::Failed => libc::EIO,
            IoError::WouldBlock => libc::EAGAIN,
            IoError::Os(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

pub type IoResult<T = ()> = Result<T, IoError>;

/// What a device looks like to IO at one moment.
struct GateState {
    name: String,
    table: Option<Arc<Table>>,
    suspended: bool,
    read_only: bool,
    /// Requests between entering and leaving the gate.
    inflight: u64,
    /// Suspends waiting for `inflight` to reach zero: only they need a wake-up when a request
    /// leaves (a condvar notify is a syscall even with nobody waiting).
    drainers: u32,
    removed: bool,
}

/// One device's gate: IO enters while the device is not suspended, and suspend waits for the
/// requests inside to leave.
struct DeviceIo {
    minor: u32,
    state: Mutex<GateState>,
    changed: Condvar,
}

/// A request's pass through the gate: holds the table it runs against, leaves on drop.
struct Pass<'a> {
    dev: &'a DeviceIo,
    table: Arc<Table>,
    read_only: bool,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut s = self.dev.state();
        s.inflight -= 1;
        if s.inflight == 0 && s.drainers > 0 {
            self.dev.changed.notify_all();
        }
    }
}

impl DeviceIo {
    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits while suspended (new IO runs against whatever table is live after the resume).
    fn enter(&self) -> IoResult<Pass<'_>> {
        self.enter_or(true)
    }

    /// `wait` false: a suspended device gives [`IoError::WouldBlock`] instead of waiting.
    fn enter_or(&self, wait: bool) -> IoResult<Pass<'_>> {
        let mut s = self.state();
        while s.suspended && !s.removed {
            if !wait {
                return Err(IoError::WouldBlock);
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.removed {
            return Err(IoError::NoDevice);
        }
        let table = s.table.clone().ok_or(IoError::NoDevice)?;
        s.inflight += 1;
        Ok(Pass { dev: self, table, read_only: s.read_only })
    }
}

/// Called when a front end opens or closes a device (the kernel's block-device open count).
pub type OpenHook = Box<dyn Fn(u32, bool) + Send + Sync>;

struct Inner {
    devices: RwLock<HashMap<u32, Arc<DeviceIo>>>,
    /// Open files of underlying devices, by device number.
    files: RwLock<HashMap<DevNum, Arc<Backing>>>,
    on_open: OpenHook,
}

#[derive(Clone)]
pub struct DataPlane {
    inner: Arc<Inner>,
}

/// An active device as [`DataPlane::active_devices`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveDevice {
    pub minor: u32,
    pub name: String,
    /// Bytes.
    pub size: u64,
    pub read_only: bool,
}

/// One kind of IO, by what it does to the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write { fua: bool },
    Discard,
    WriteZeroes { fua: bool },
}

impl DataPlane {
    pub fn new(on_open: OpenHook) -> Self {
        Self {
            inner: Arc::new(Inner {
                devices: RwLock::new(HashMap::new()),
                files: RwLock::new(HashMap::new()),
                on_open,
            }),
        }
    }

    fn device(&self, minor: u32) -> Option<Arc<DeviceIo>> {
        self.inner.devices.read().unwrap_or_else(|p| p.into_inner()).get(&minor).cloned()
    }

    /// Publishes a device's state from the engine. `table` is the live table.
    pub fn publish(&self, minor: u32, name: &str, table: Option<Arc<Table>>, suspended: bool, read_only: bool) {
        let dev = {
            let mut devs = self.inner.devices.write().unwrap_or_else(|p| p.into_inner());
            devs.entry(minor)
                .or_insert_with(|| {
                    Arc::new(DeviceIo {
                        minor,
                        state: Mutex::new(GateState {
                            name: String::new(),
                            table: None,
                            suspended,
                            read_only,
                            inflight: 0,
                            drainers: 0,
                            removed: false,
                        }),
                        changed: Condvar::new(),
                    })
                })
                .clone()
        };
        let mut s = dev.state();
        let same = s.name == name
            && s.suspended == suspended
            && s.read_only == read_only
            && match (&s.table, &table) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
        if !same {
            s.name = name.to_owned();
            s.table = table;
            s.suspended = suspended;
            s.read_only = read_only;
            dev.changed.notify_all();
        }
    }

    /// Forgets devices the engine no longer has; IO waiting on them fails.
    pub fn retain(&self, alive: impl Fn(u32) -> bool) {
        let mut devs = self.inner.devices.write().unwrap_or_else(|p| p.into_inner());
        devs.retain(|&m, d| {
            let keep = alive(m);
            if !keep {
                let mut s = d.state();
                s.removed = true;
                s.table = None;
                d.changed.notify_all();
            }
            keep
        });
    }

    /// The kernel's suspend: stop admitting IO, wait for what is in flight, then flush the
    /// underlying devices unless `noflush`. The engine's suspend runs afterwards.
    pub fn drain(&self, minor: u32, noflush: bool) {
        let Some(dev) = self.device(minor) else { return };
        let table = {
            let mut s = dev.state();
            s.suspended = true;
            s.drainers += 1;
            while s.inflight > 0 {
                s = dev.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.drainers -= 1;
            s.table.clone()
        };
        if let (false, Some(t)) = (noflush, table) {
            if let Err(e) = self.flush_table(&t) {
                tracing::warn!("flush while suspending dm-{minor}: {e}");
            }
        }
    }

    /// Opens an active device by name for IO (an NBD export, a FUSE file): counts as an open of
    /// the block device until the handle is dropped.
    pub fn open(&self, name: &str) -> Option<IoHandle> {
        let dev = self
            .inner
            .devices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|d| {
                let s = d.state();
                s.name == name && s.table.is_some() && !s.removed
            })
            .cloned()?;
        (self.inner.on_open)(dev.minor, true);
        Some(IoHandle { plane: self.clone(), dev })
    }

    /// Active devices (those with a live table): name and size in bytes, by name.
    pub fn active(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.active_devices().into_iter().map(|d| (d.name, d.size)).collect();
        v.sort();
        v
    }

    /// Active devices with their minors and flags, without opening them (the FUSE front end
    /// names its files by minor and must not count as an opener while merely listing).
    pub fn active_devices(&self) -> Vec<ActiveDevice> {
        let mut v: Vec<ActiveDevice> = self
            .inner
            .devices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|d| {
                let s = d.state();
                let t = s.table.as_ref().filter(|_| !s.removed)?;
                Some(ActiveDevice {
                    minor: d.minor,
                    name: s.name.clone(),
                    size: t.size().bytes(),
                    read_only: s.read_only,
                })
            })
            .collect();
        v.sort_by_key(|d| d.minor);
        v
    }

    fn file(&self, p: &Pdev) -> IoResult<Arc<Backing>> {
        if let Some(f) = self.inner.files.read().unwrap_or_else(|p| p.into_inner()).get(&p.dev) {
            return Ok(f.clone());
        }
        let path = match &p.kind {
            PdevKind::File { path } | PdevKind::Block { path } => path,
            PdevKind::Dm { .. } => return Err(IoError::NoDevice),
        };
        let f = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(_) => File::open(path)?,
        };
        let f = Arc::new(Backing::new(f));
        self.inner.files.write().unwrap_or_else(|p| p.into_inner()).insert(p.dev, f.clone());
        Ok(f)
    }

    /// Runs one request against a device: split at target boundaries, mapped by each target.
    /// `nowait`: never wait for a suspended device, nor (reads) for data not in memory.
    fn submit(&self, dev: &DeviceIo, op: Op, offset: u64, buf: IoBuf<'_>, nowait: bool) -> IoResult {
        let pass = dev.enter_or(!nowait)?;
        let len = buf.len();
        let size = pass.table.size().bytes();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(IoError::Range);
        }
        if pass.read_only && op != Op::Read {
            return Err(IoError::ReadOnly);
        }
        let mut buf = buf;
        let mut done = 0u64;
        while done < len {
            done += match piece(&pass.table, offset + done, len - done)? {
                Mapping::Remap { dev: pdev, at, len: n } => {
                    self.pdev_io(pdev, op, at, buf.slice(done, n), nowait)?;
                    n
                }
                Mapping::Zero(n) => {
                    match (op, buf.slice(done, n)) {
                        (Op::Read, b) => b.zero(),
                        // Swallowed, but a piped payload is still taken off the pipe.
                        (_, IoBuf::Pipe(fd, n)) => discard_from_pipe(fd, n)?,
                        _ => {}
                    }
                    n
                }
                Mapping::Fail(_) => return Err(IoError::Failed),
            };
        }
        if matches!(op, Op::Write { fua: true } | Op::WriteZeroes { fua: true }) {
            self.flush_table(&pass.table)?;
        }
        Ok(())
    }

    fn pdev_io(&self, p: &Pdev, op: Op, at: u64, buf: IoBuf<'_>, nowait: bool) -> IoResult {
        if let PdevKind::Dm { minor } = p.kind {
            let lower = self.device(minor).ok_or(IoError::NoDevice)?;
            // A write that got this far is in flight on the upper device: below, it waits like
            // any bio would (only reads, which a retry cannot harm, give up).
            return self.submit(&lower, op, at, buf, nowait && op == Op::Read);
        }
        let f = self.file(p)?;
        match (op, buf) {
            (Op::Read, IoBuf::Read(b)) if nowait => read_nowait(&f, b, at),
            (Op::Read, IoBuf::Read(b)) => read_full(&f, b, at),
            (Op::Write { .. }, IoBuf::Write(b)) => Ok(f.write_all_at(b, at)?),
            (Op::Write { .. }, IoBuf::Pipe(fd, n)) => splice_to_file(fd, &f, at, n),
            (Op::Discard, IoBuf::Len(n)) => {
                punch(&f, at, n, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, false)
            }
            (Op::WriteZeroes { .. }, IoBuf::Len(n)) => {
                punch(&f, at, n, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, true)
            }
            _ => unreachable!("op and buffer kinds always match"),
        }
    }

    /// Appends the allocation of `len` bytes at `offset` of a device to `out` (see
    /// [`IoHandle::extents`]); stops early once `out` holds more than `max` runs or `budget`
    /// steps (pieces of the table, seeks in files) are spent.
    fn extents_of(
        &self,
        dev: &DeviceIo,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
        max: usize,
        budget: &mut u32,
    ) -> IoResult {
        let pass = dev.enter()?;
        if offset.checked_add(len).is_none_or(|end| end > pass.table.size().bytes()) {
            return Err(IoError::Range);
        }
        let mut done = 0u64;
        while done < len && out.len() <= max && *budget > 0 {
            *budget -= 1;
            done += match piece(&pass.table, offset + done, len - done)? {
                Mapping::Remap { dev: pdev, at, len: n } => {
                    match pdev.kind {
                        PdevKind::Dm { minor } => {
                            let lower = self.device(minor).ok_or(IoError::NoDevice)?;
                            self.extents_of(&lower, at, n, out, max, budget)?;
                        }
                        _ => file_extents(&self.file(pdev)?.file, at, n, out, max, budget)?,
                    }
                    n
                }
                Mapping::Zero(n) => {
                    push_extent(out, Extent { len: n, hole: true, zero: true });
                    n
                }
                // Reads fail there, but the blocks are not known to be unallocated or zero.
                Mapping::Fail(n) => {
                    push_extent(out, Extent { len: n, hole: false, zero: false });
                    n
                }
            };
        }
        Ok(())
    }

    /// fdatasync every underlying device of a table (recursing into stacked devices).
    fn flush_table(&self, t: &Table) -> IoResult {
        for p in t.devices() {
            match p.kind {
                PdevKind::Dm { minor } => {
                    if let Some(lower) = self.device(minor) {
                        let pass = lower.enter()?;
                        self.flush_table(&pass.table)?;
                    }
                }
                _ => self.file(p)?.sync_data()?,
            }
        }
        Ok(())
    }
}

/// Where the bytes of `table` from byte `pos` on go, for at most `left` bytes: the target's
/// [`Mapping`] carried from sectors to bytes.
fn piece(table: &Table, pos: u64, left: u64) -> IoResult<Mapping<'_, u64>> {
    let t = table.find(Sectors(pos / SECTOR)).ok_or(IoError::Range)?;
    let within = pos - t.start.bytes();
    let want = left.min(t.len.bytes() - within);
    // Targets map in whole sectors; a request that starts mid-sector keeps its offset.
    let head = within % SECTOR;
    Ok(match t.target.map(Sectors(within / SECTOR), Sectors((head + want).div_ceil(SECTOR))) {
        Mapping::Remap { dev, at, len } => {
            Mapping::Remap { dev, at: at.bytes() + head, len: want.min(len.bytes() - head) }
        }
        Mapping::Zero(_) => Mapping::Zero(want),
        Mapping::Fail(_) => Mapping::Fail(want),
    })
}

/// An open underlying file, and whether it lives in memory (tmpfs, ramfs: reads never wait
/// for a disk, though such filesystems do not support `RWF_NOWAIT`).
struct Backing {
    file: File,
    memory: bool,
}

impl Backing {
    // `f_type` and TMPFS_MAGIC have different integer types on other targets.
    #[allow(clippy::useless_conversion)]
    fn new(file: File) -> Self {
        // SAFETY: a valid fd and an out-buffer of the right type.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        const RAMFS_MAGIC: i64 = 0x8584_58f6;
        // Regular files only: a block device node lives on devtmpfs, which reports tmpfs too.
        let regular = file.metadata().is_ok_and(|m| m.file_type().is_file());
        let memory = regular
            && unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } == 0
            && matches!(i64::from(st.f_type), x if x == i64::from(libc::TMPFS_MAGIC) || x == RAMFS_MAGIC);
        Backing { file, memory }
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
fn read_nowait(f: &Backing, mut b: &mut [u8], mut at: u64) -> IoResult {
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
fn read_full(f: &File, mut b: &mut [u8], mut at: u64) -> IoResult {
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
const EXTENT_STEPS: u32 = 1 << 16;

fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    match out.last_mut() {
        Some(last) if (last.hole, last.zero) == (e.hole, e.zero) => last.len += e.len,
        _ if e.len > 0 => out.push(e),
        _ => {}
    }
}

/// The allocation of `n` bytes at `at` of a file or block device, from `SEEK_DATA`/`SEEK_HOLE`
/// (past the end of a file is a hole, as reads there give zeroes; a block device is all data).
fn file_extents(f: &File, at: u64, n: u64, out: &mut Vec<Extent>, max: usize, budget: &mut u32) -> IoResult {
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
fn splice_to_file(pipe: RawFd, f: &File, mut at: u64, mut n: u64) -> IoResult {
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
fn punch(f: &File, at: u64, n: u64, mode: i32, must_zero: bool) -> IoResult {
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

/// The data of one request (or a length, for discard / write-zeroes).
enum IoBuf<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
    /// A write's payload waiting in a pipe (fd, bytes), taken off in order as the request is
    /// mapped (`splice` moves it to the file with one copy instead of two).
    Pipe(RawFd, u64),
    Len(u64),
}

impl<'a> IoBuf<'a> {
    fn len(&self) -> u64 {
        match self {
            IoBuf::Read(b) => b.len() as u64,
            IoBuf::Write(b) => b.len() as u64,
            IoBuf::Pipe(_, n) | IoBuf::Len(n) => *n,
        }
    }
    fn slice(&mut self, from: u64, n: u64) -> IoBuf<'_> {
        let (a, b) = (from as usize, (from + n) as usize);
        match self {
            IoBuf::Read(x) => IoBuf::Read(&mut x[a..b]),
            IoBuf::Write(x) => IoBuf::Write(&x[a..b]),
            // Pieces are always taken in order, so the next `n` bytes of the pipe are these.
            IoBuf::Pipe(fd, _) => IoBuf::Pipe(*fd, n),
            IoBuf::Len(_) => IoBuf::Len(n),
        }
    }
    fn zero(self) {
        if let IoBuf::Read(b) = self {
            b.fill(0)
        }
    }
}

/// An open device, for a front end. Dropping it closes the device.
pub struct IoHandle {
    plane: DataPlane,
    dev: Arc<DeviceIo>,
}

impl Drop for IoHandle {
    fn drop(&mut self) {
        (self.plane.inner.on_open)(self.dev.minor, false);
    }
}

impl IoHandle {
    pub fn minor(&self) -> u32 {
        self.dev.minor
    }
    pub fn name(&self) -> String {
        self.dev.state().name.clone()
    }
    /// Current size in bytes (follows resume/resize); 0 once the device is gone.
    pub fn size(&self) -> u64 {
        let s = self.dev.state();
        s.table.as_ref().map_or(0, |t| t.size().bytes())
    }
    pub fn read_only(&self) -> bool {
        self.dev.state().read_only
    }
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> IoResult {
        self.plane.submit(&self.dev, Op::Read, offset, IoBuf::Read(buf), false)
    }
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> IoResult {
        self.plane.submit(&self.dev, Op::Write { fua }, offset, IoBuf::Write(data), false)
    }
    pub fn discard(&self, offset: u64, len: u64) -> IoResult {
        self.plane.submit(&self.dev, Op::Discard, offset, IoBuf::Len(len), false)
    }
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoResult {
        self.plane.submit(&self.dev, Op::WriteZeroes { fua }, offset, IoBuf::Len(len), false)
    }
    /// [`Self::read`] that never waits: [`IoError::WouldBlock`] if the device is suspended or
    /// the data is not in memory (a front end then hands the request to a thread that may wait).
    pub fn read_nowait(&self, offset: u64, buf: &mut [u8]) -> IoResult {
        self.plane.submit(&self.dev, Op::Read, offset, IoBuf::Read(buf), true)
    }
    /// [`Self::write`] of `len` bytes that wait in a pipe (`pipe`'s read end), moved to the files
    /// with `splice`. `nowait`: [`IoError::WouldBlock`] instead of waiting for a suspended
    /// device, with the pipe untouched. On other errors some of the bytes may be left in the
    /// pipe: the caller empties it.
    pub fn write_from_pipe(&self, offset: u64, pipe: RawFd, len: u64, fua: bool, nowait: bool) -> IoResult {
        self.plane.submit(&self.dev, Op::Write { fua }, offset, IoBuf::Pipe(pipe, len), nowait)
    }
    /// [`Self::write`] (without FUA) that gives [`IoError::WouldBlock`] instead of waiting for a
    /// suspended device; the write itself goes to the page cache as usual.
    pub fn write_nowait(&self, offset: u64, data: &[u8]) -> IoResult {
        self.plane.submit(&self.dev, Op::Write { fua: false }, offset, IoBuf::Write(data), true)
    }
    /// The allocation of `len` bytes at `offset`, as runs of equal state (adjacent runs differ),
    /// through the table to the files below; at most `max` runs, which may cover less than `len`
    /// (never nothing). Waits while the device is suspended, as a read would.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> IoResult<Vec<Extent>> {
        let mut out = Vec::new();
        // A request over a long run of tiny pieces (a striped device with small chunks over
        // sparse files) is answered in part rather than keeping a thread busy for seconds.
        let mut budget = EXTENT_STEPS;
        self.plane.extents_of(&self.dev, offset, len, &mut out, max.max(1), &mut budget)?;
        out.truncate(max.max(1));
        Ok(out)
    }
    pub fn flush(&self) -> IoResult {
        let pass = self.dev.enter()?;
        self.plane.flush_table(&pass.table)
    }
}
