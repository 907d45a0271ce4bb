//! The data plane: IO through a device's live table to files, block devices and other dmemu
//! devices (stacking goes through here directly, never through a socket).
//!
//! The control plane (the engine) stays IO-free; after every command the server publishes each
//! device's live table and suspend state here ([`DataPlane::publish`]), and a suspend drains the
//! device's in-flight IO here ([`DataPlane::drain`]), as the kernel's suspend does. Requests travel
//! as [`Bio`]s through the dm core ([`core`]: gate, split, target `map`, completion) to the files
//! ([`leaf`]); targets that own their IO use the core [`Services`] (dm-io, kcopyd, work queue,
//! timers, table events). Mechanism: positioned IO on the submitting thread (`preadv2(RWF_NOWAIT)`
//! for reads that must not wait, `splice` for payloads waiting in a pipe); front ends (NBD) run
//! what may wait on worker threads, so many requests are in flight at once (docs/PERFORMANCE.md
//! has the comparison that chose it).

pub mod bio;
pub(crate) mod core;
pub(crate) mod leaf;
mod services;

use std::collections::HashMap;
use std::os::unix::io::RawFd;
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use bio::Buf;
pub use bio::{Bio, BioFlags, Op};
use core::{Completion, Frame, Work};
pub use leaf::{discard_from_pipe, read_pipe, Backing, Extent, OpenError};
use leaf::{file_extents, push_extent, EXTENT_STEPS};
pub use services::{CopyJob, CopyProgress, Region, Services, TimerId};

use crate::dm::pdev::{Pdev, PdevKind};
use crate::dm::stats::StatsSet;
use crate::dm::table::Table;
use crate::dm::target::{Limits, Mapping};
use crate::dm::Sectors;

const SECTOR: u64 = Sectors::SIZE;

/// Why an IO failed; each maps to the errno a block device would give.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("device has no live table or is gone")]
    NoDevice,
    #[error("device is read-only")]
    ReadOnly,
    #[error("IO beyond the end of the device")]
    Range,
    #[error("IO error")]
    Failed,
    /// Only for `REQ_NOWAIT` IO (the `*_nowait` calls): the request would wait (device
    /// suspended, data not in memory, a target that may hold IO); nothing was changed that the
    /// blocking call would not redo.
    #[error("IO would block")]
    WouldBlock,
    /// A discard or write-zeroes a target does not take.
    #[error("operation not supported by the table")]
    NotSupported,
    /// Internal: a target asked for the IO to be requeued (`DM_MAPIO_REQUEUE`); never reaches a
    /// submitter (it becomes EIO outside a noflush suspend).
    #[error("IO requeued")]
    Requeue,
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Os(i32),
}

impl IoError {
    pub fn errno(&self) -> i32 {
        match self {
            IoError::NoDevice => libc::ENXIO,
            IoError::ReadOnly => libc::EPERM,
            IoError::Range => libc::EINVAL,
            IoError::Failed | IoError::Requeue => libc::EIO,
            IoError::WouldBlock => libc::EAGAIN,
            IoError::NotSupported => libc::EOPNOTSUPP,
            IoError::Os(e) => *e,
        }
    }
}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        IoError::Os(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

pub type IoResult<T = ()> = Result<T, IoError>;

/// What a device looks like to IO at one moment.
struct GateState {
    /// The device's name bytes (not necessarily UTF-8).
    name: Vec<u8>,
    table: Option<Arc<Table>>,
    suspended: bool,
    /// A suspend with DM_NOFLUSH_FLAG is under way or done: requeued IO waits for the resume.
    noflush: bool,
    read_only: bool,
    /// Every target of the live table takes `REQ_NOWAIT` IO.
    nowait: bool,
    limits: Limits,
    /// dmstats regions to count IO into.
    stats: Option<Arc<StatsSet>>,
    /// Requests between entering and leaving the gate.
    inflight: u64,
    /// Suspends waiting for `inflight` to reach zero: only they need a wake-up when a request
    /// leaves (a condvar notify is a syscall even with nobody waiting).
    drainers: u32,
    removed: bool,
}

/// One device's gate: IO enters while the device is not suspended, and suspend waits for the
/// requests inside to leave.
pub(crate) struct DeviceIo {
    pub(crate) minor: u32,
    state: Mutex<GateState>,
    changed: Condvar,
    /// Requeued IO held for the resume (noflush suspend).
    requeued: Mutex<Vec<Bio>>,
}

/// A request's pass through the gate: holds the table it runs against, leaves on drop.
pub(crate) struct Pass {
    pub(crate) dev: Arc<DeviceIo>,
    pub(crate) table: Arc<Table>,
    pub(crate) read_only: bool,
    pub(crate) nowait: bool,
    /// dmstats regions of the device, if any.
    pub(crate) stats: Option<Arc<StatsSet>>,
}

impl Drop for Pass {
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

    /// Enters the gate. `wait` false: a suspended device gives [`IoError::WouldBlock`] instead of
    /// waiting (new IO runs against whatever table is live after the resume).
    pub(crate) fn enter(self: &Arc<Self>, wait: bool) -> IoResult<Pass> {
        let mut s = self.state();
        if s.suspended && !s.removed && wait {
            tracing::debug!("dm-{}: IO waits for the resume", self.minor);
        }
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
        Ok(Pass { dev: self.clone(), table, read_only: s.read_only, nowait: s.nowait, stats: s.stats.clone() })
    }

    /// Holds a requeued bio for the resume if a noflush suspend is under way; gives it back
    /// otherwise.
    pub(crate) fn requeue(&self, bio: Bio) -> Option<Bio> {
        let s = self.state();
        if !s.noflush || s.removed {
            return Some(bio);
        }
        self.requeued.lock().unwrap_or_else(|p| p.into_inner()).push(bio);
        None
    }
}

/// A thread waiting for one bio (the synchronous API).
#[derive(Default)]
pub(crate) struct Waiter {
    result: Mutex<Option<IoResult>>,
    cv: Condvar,
}

impl Waiter {
    pub(crate) fn done(&self, r: IoResult) {
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.cv.notify_one();
    }
    pub(crate) fn wait(&self) -> IoResult {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Called when a front end opens or closes a device (the kernel's block-device open count).
pub type OpenHook = Box<dyn Fn(u32, bool) + Send + Sync>;

struct Inner {
    devices: RwLock<HashMap<u32, Arc<DeviceIo>>>,
    on_open: OpenHook,
    services: services::Shared,
}

#[derive(Clone)]
pub struct DataPlane {
    inner: Arc<Inner>,
}

/// An active device as [`DataPlane::active_devices`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveDevice {
    pub minor: u32,
    /// Name bytes (not necessarily UTF-8).
    pub name: Vec<u8>,
    /// Bytes.
    pub size: u64,
    pub read_only: bool,
    /// The live table's queue limits.
    pub limits: Limits,
}

impl DataPlane {
    pub fn new(on_open: OpenHook) -> Self {
        Self {
            inner: Arc::new(Inner {
                devices: RwLock::new(HashMap::new()),
                on_open,
                services: services::Shared::default(),
            }),
        }
    }

    /// A data plane with no devices and no open hook: what an engine without a daemon gets.
    pub fn detached() -> Self {
        Self::new(Box::new(|_, _| {}))
    }

    /// The core services for targets, bound to the table `table_id` of device `minor` (its
    /// events go to that device while the table is live).
    pub fn services(&self, minor: u32, table_id: u64) -> Services {
        Services::new(self.clone(), minor, table_id)
    }

    pub(crate) fn device(&self, minor: u32) -> Option<Arc<DeviceIo>> {
        self.inner.devices.read().unwrap_or_else(|p| p.into_inner()).get(&minor).cloned()
    }

    /// Publishes a device's state from the engine. `table` is the live table.
    pub fn publish(
        &self,
        minor: u32,
        name: impl AsRef<[u8]>,
        table: Option<Arc<Table>>,
        suspended: bool,
        read_only: bool,
    ) {
        self.publish_with_stats(minor, name, table, suspended, read_only, None)
    }

    /// [`Self::publish`] with the device's dmstats regions.
    pub fn publish_with_stats(
        &self,
        minor: u32,
        name: impl AsRef<[u8]>,
        table: Option<Arc<Table>>,
        suspended: bool,
        read_only: bool,
        stats: Option<Arc<StatsSet>>,
    ) {
        let dev = {
            let mut devs = self.inner.devices.write().unwrap_or_else(|p| p.into_inner());
            devs.entry(minor)
                .or_insert_with(|| {
                    Arc::new(DeviceIo {
                        minor,
                        state: Mutex::new(GateState {
                            name: Vec::new(),
                            table: None,
                            suspended,
                            noflush: false,
                            read_only,
                            nowait: false,
                            limits: Limits::default(),
                            stats: None,
                            inflight: 0,
                            drainers: 0,
                            removed: false,
                        }),
                        changed: Condvar::new(),
                        requeued: Mutex::new(Vec::new()),
                    })
                })
                .clone()
        };
        let mut s = dev.state();
        let same_stats = match (&s.stats, &stats) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same_stats {
            s.stats = stats;
        }
        let name = name.as_ref();
        let same = s.name == name
            && s.suspended == suspended
            && s.read_only == read_only
            && match (&s.table, &table) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
        if same {
            return;
        }
        s.name = name.to_vec();
        if !table.as_ref().zip(s.table.as_ref()).is_some_and(|(a, b)| Arc::ptr_eq(a, b)) {
            s.nowait = table.as_ref().is_some_and(|t| t.targets().iter().all(|t| t.features.nowait));
            s.limits = table.as_ref().map(|t| self.limits_of(t)).unwrap_or_default();
        }
        s.table = table;
        s.suspended = suspended;
        s.read_only = read_only;
        if !suspended {
            s.noflush = false;
        }
        dev.changed.notify_all();
        drop(s);
        if !suspended {
            self.resubmit_requeued(&dev);
        }
    }

    /// IO requeued during a noflush suspend runs again once the device resumes, on a worker
    /// (publication happens under the engine's lock).
    fn resubmit_requeued(&self, dev: &Arc<DeviceIo>) {
        let held = std::mem::take(&mut *dev.requeued.lock().unwrap_or_else(|p| p.into_inner()));
        for bio in held {
            let (plane, dev) = (self.clone(), dev.clone());
            self.inner.services.queue_work(self, Box::new(move || core::submit(&plane, Work::Device(dev, bio))));
        }
    }

    /// A table's limits: each target's hints over the devices it uses.
    fn limits_of(&self, t: &Table) -> Limits {
        let mut l = Limits::default();
        for tt in t.targets() {
            let mut own = Limits { discard: tt.features.discard_bios > 0, ..Limits::default() };
            tt.target.io_hints(&mut own);
            tt.target.iterate_devices(tt.len, &mut |p, _, _| {
                if let PdevKind::Dm { minor } = p.kind {
                    if let Some(lower) = self.device(minor) {
                        own.stack(&lower.state().limits);
                    }
                }
            });
            l.stack(&own);
        }
        l
    }

    /// A device's queue limits (defaults for a device without a live table).
    pub fn limits(&self, minor: u32) -> Limits {
        self.device(minor).map(|d| d.state().limits).unwrap_or_default()
    }

    /// Forgets a device the engine no longer has; IO waiting on it fails.
    pub fn forget(&self, minor: u32) {
        let gone = {
            let mut devs = self.inner.devices.write().unwrap_or_else(|p| p.into_inner());
            devs.remove(&minor)
        };
        let Some(d) = gone else { return };
        {
            let mut s = d.state();
            s.removed = true;
            s.table = None;
            d.changed.notify_all();
        }
        let held = std::mem::take(&mut *d.requeued.lock().unwrap_or_else(|p| p.into_inner()));
        held.into_iter().for_each(|b| b.end(Err(IoError::NoDevice)));
    }

    /// A noflush suspend is starting (the kernel sets `DMF_NOFLUSH_SUSPENDING` before the targets'
    /// `presuspend`): IO a target requeues from now on waits for the resume, even IO a presuspend
    /// hands back before the drain begins.
    pub fn begin_noflush(&self, minor: u32) {
        if let Some(dev) = self.device(minor) {
            dev.state().noflush = true;
        }
    }

    /// The kernel's suspend, after the targets' `presuspend`: stop admitting IO, wait for what is
    /// in flight, then (unless `noflush`) flush the table, so everything written before the
    /// suspend is durable. The engine's postsuspend runs afterwards. `interrupted` is asked
    /// every 50 ms while IO is still in flight: true abandons the suspend (the gate opens again)
    /// and returns false.
    pub fn drain(&self, minor: u32, noflush: bool, interrupted: &mut dyn FnMut() -> bool) -> bool {
        let Some(dev) = self.device(minor) else { return true };
        let table = {
            let mut s = dev.state();
            let was_suspended = s.suspended;
            s.suspended = true;
            s.noflush |= noflush;
            s.drainers += 1;
            if s.inflight > 0 {
                tracing::debug!("dm-{minor}: suspend waits for {} IOs in flight", s.inflight);
            }
            while s.inflight > 0 {
                let (g, _) = dev
                    .changed
                    .wait_timeout(s, std::time::Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner());
                s = g;
                if s.inflight > 0 && interrupted() {
                    s.drainers -= 1;
                    s.suspended = was_suspended;
                    s.noflush = false;
                    dev.changed.notify_all();
                    return false;
                }
            }
            s.drainers -= 1;
            s.table.clone()
        };
        if let (false, Some(t)) = (noflush, table) {
            if let Err(e) = self.flush_table(&t) {
                tracing::warn!("flush while suspending dm-{minor}: {e}");
            }
        }
        true
    }

    /// An empty flush through every target of `t`, outside the gate (which a suspend has closed).
    fn flush_table(&self, t: &Arc<Table>) -> IoResult {
        let w = Arc::new(Waiter::default());
        let bio =
            Bio::new(Op::Flush, BioFlags::empty(), 0, 0, Buf::None, Frame::Submitter(Completion::Sync(w.clone())));
        core::submit_isolated(self, Work::Flush(t.clone(), bio));
        w.wait()
    }

    /// Opens an active device by name for IO (an NBD export, a FUSE file): counts as an open of
    /// the block device until the handle is dropped.
    pub fn open(&self, name: impl AsRef<[u8]>) -> Option<IoHandle> {
        let name = name.as_ref();
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
        Some(IoHandle { plane: self.clone(), dev, rmw: Arc::new(Mutex::new(())) })
    }

    /// Active devices (those with a live table): name bytes and size in bytes, by name.
    pub fn active(&self) -> Vec<(Vec<u8>, u64)> {
        let mut v: Vec<(Vec<u8>, u64)> = self.active_devices().into_iter().map(|d| (d.name, d.size)).collect();
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
                    limits: s.limits,
                })
            })
            .collect();
        v.sort_by_key(|d| d.minor);
        v
    }

    /// The open file or block device under a pdev: the one its table's load opened, held by
    /// the pdev while tables or IO in flight hold it (never opened again by path here).
    pub(crate) fn file(p: &Pdev) -> IoResult<&Backing> {
        match p.kind {
            PdevKind::Dm { .. } => Err(IoError::NoDevice),
            _ => p.file().ok_or(IoError::NoDevice),
        }
    }

    /// Appends the allocation of `len` bytes at `offset` of a device to `out` (see
    /// [`IoHandle::extents`]), through stacked devices without recursing; stops early once `out`
    /// holds more than `max` runs or `budget` steps (pieces of tables, seeks in files) are spent.
    fn extents_of(&self, dev: Arc<DeviceIo>, offset: u64, len: u64, out: &mut Vec<Extent>, max: usize) -> IoResult {
        let mut budget = EXTENT_STEPS;
        // Segments still to walk, the next on top: (device, byte offset, bytes).
        let mut todo = vec![(dev, offset, len)];
        while let Some((dev, offset, len)) = todo.pop() {
            let pass = dev.enter(true)?;
            if offset.checked_add(len).is_none_or(|end| end > pass.table.size().bytes()) {
                return Err(IoError::Range);
            }
            let mut done = 0u64;
            while done < len && out.len() <= max && budget > 0 {
                budget -= 1;
                let n = match piece(&pass.table, offset + done, len - done)? {
                    Mapping::Remap { dev: pdev, at, len: n } => {
                        match pdev.kind {
                            PdevKind::Dm { minor } => {
                                let lower = self.device(minor).ok_or(IoError::NoDevice)?;
                                // The rest of this device after the lower piece.
                                if done + n < len {
                                    todo.push((dev.clone(), offset + done + n, len - done - n));
                                }
                                todo.push((lower, at, n));
                                break;
                            }
                            _ => file_extents(Self::file(pdev)?, at, n, out, max, &mut budget)?,
                        }
                        n
                    }
                    Mapping::Zero(n) => {
                        push_extent(out, Extent { len: n, hole: true, zero: true });
                        n
                    }
                    // Reads may fail there, but the blocks are not known to be unallocated or zero.
                    Mapping::Opaque(n) => {
                        push_extent(out, Extent { len: n, hole: false, zero: false });
                        n
                    }
                };
                done += n;
            }
            if out.len() > max || budget == 0 {
                break;
            }
        }
        Ok(())
    }
}

/// Where the bytes of `table` from byte `pos` on live, for at most `left` bytes: the target's
/// query answer carried from sectors to bytes.
fn piece(table: &Table, pos: u64, left: u64) -> IoResult<Mapping<'_, u64>> {
    let t = table.find(Sectors(pos / SECTOR)).ok_or(IoError::Range)?;
    let within = pos - t.start.bytes();
    let want = left.min(t.len.bytes() - within);
    // Targets answer in whole sectors; a request that starts mid-sector keeps its offset.
    let head = within % SECTOR;
    Ok(match t.target.query(Sectors(within / SECTOR), Sectors((head + want).div_ceil(SECTOR))) {
        Mapping::Remap { dev, at, len } => {
            let at = at.0.checked_mul(SECTOR).and_then(|a| a.checked_add(head)).ok_or(IoError::Failed)?;
            Mapping::Remap { dev, at, len: want.min((len.bytes()).saturating_sub(head)).max(1) }
        }
        Mapping::Zero(_) => Mapping::Zero(want),
        Mapping::Opaque(_) => Mapping::Opaque(want),
    })
}

/// An open device, for a front end, with byte-addressed calls: requests that do not start and end
/// on a sector boundary read and rewrite the partial sectors around them (as the page cache does
/// for a block device). Dropping it closes the device.
pub struct IoHandle {
    plane: DataPlane,
    dev: Arc<DeviceIo>,
    /// Serializes the read-modify-write of partial sectors.
    rmw: Arc<Mutex<()>>,
}

impl Drop for IoHandle {
    fn drop(&mut self) {
        (self.plane.inner.on_open)(self.dev.minor, false);
    }
}

fn aligned(offset: u64, len: u64) -> bool {
    offset.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR)
}

impl IoHandle {
    pub fn minor(&self) -> u32 {
        self.dev.minor
    }
    /// The device's name for logs (non-UTF-8 bytes escaped).
    pub fn name(&self) -> String {
        crate::dm::Escaped(&self.dev.state().name).to_string()
    }
    /// Current size in bytes (follows resume/resize); 0 once the device is gone.
    pub fn size(&self) -> u64 {
        let s = self.dev.state();
        s.table.as_ref().map_or(0, |t| t.size().bytes())
    }
    pub fn read_only(&self) -> bool {
        self.dev.state().read_only
    }
    /// The live table's queue limits (logical block size, discard support).
    pub fn limits(&self) -> Limits {
        self.dev.state().limits
    }

    fn check_range(&self, offset: u64, len: u64) -> IoResult {
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(IoError::Range);
        }
        Ok(())
    }

    /// Runs one sector-aligned bio to completion on this thread (and waits if a target holds it).
    fn run(&self, op: Op, flags: BioFlags, offset: u64, len: u64, buf: Buf) -> IoResult {
        let w = Arc::new(Waiter::default());
        let bio =
            Bio::new(op, flags, offset / SECTOR, len / SECTOR, buf, Frame::Submitter(Completion::Sync(w.clone())));
        core::submit_isolated(&self.plane, Work::Device(self.dev.clone(), bio));
        w.wait()
    }

    fn read_flags(&self, offset: u64, buf: &mut [u8], flags: BioFlags) -> IoResult {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if aligned(offset, len) {
            let buf = Buf::Ref { ptr: NonNull::from(&mut *buf).cast(), len: buf.len(), writable: true };
            return self.run(Op::Read, flags, offset, len, buf);
        }
        let start = offset / SECTOR * SECTOR;
        let end = (offset + len).div_ceil(SECTOR) * SECTOR;
        let mut bounce = vec![0u8; (end - start) as usize];
        self.read_flags(start, &mut bounce, flags)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&bounce[at..at + buf.len()]);
        Ok(())
    }

    fn write_flags(&self, offset: u64, data: &[u8], flags: BioFlags) -> IoResult {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if aligned(offset, len) {
            let buf = Buf::Ref { ptr: NonNull::from(data).cast(), len: data.len(), writable: false };
            return self.run(Op::Write, flags, offset, len, buf);
        }
        if flags.contains(BioFlags::NOWAIT) {
            return Err(IoError::WouldBlock);
        }
        // Read the partial sectors at both ends, patch, write the whole sectors back.
        let _g = self.rmw.lock().unwrap_or_else(|p| p.into_inner());
        let start = offset / SECTOR * SECTOR;
        let end = (offset + len).div_ceil(SECTOR) * SECTOR;
        let mut whole = vec![0u8; (end - start) as usize];
        self.read_flags(start, &mut whole[..SECTOR as usize], BioFlags::empty())?;
        let tail = whole.len() - SECTOR as usize;
        if tail > 0 {
            self.read_flags(end - SECTOR, &mut whole[tail..], BioFlags::empty())?;
        }
        let at = (offset - start) as usize;
        whole[at..at + data.len()].copy_from_slice(data);
        self.write_flags(start, &whole, flags)
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> IoResult {
        self.read_flags(offset, buf, BioFlags::empty())
    }
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> IoResult {
        self.write_flags(offset, data, if fua { BioFlags::FUA } else { BioFlags::empty() })
    }
    /// Discards whole sectors inside the range (discard is advisory: partial sectors at its ends
    /// are left alone, and a table that cannot discard ignores it).
    pub fn discard(&self, offset: u64, len: u64) -> IoResult {
        self.check_range(offset, len)?;
        let start = offset.div_ceil(SECTOR) * SECTOR;
        let end = (offset + len) / SECTOR * SECTOR;
        if end <= start {
            return Ok(());
        }
        match self.run(Op::Discard, BioFlags::empty(), start, end - start, Buf::None) {
            Err(IoError::NotSupported) => Ok(()),
            r => r,
        }
    }
    /// Writes zeroes: `REQ_OP_WRITE_ZEROES` for the whole sectors (zero buffers where the table
    /// cannot, as `blkdev_issue_zeroout` falls back), the partial sectors at the ends rewritten.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoResult {
        self.check_range(offset, len)?;
        let flags = if fua { BioFlags::FUA } else { BioFlags::empty() };
        let start = offset.div_ceil(SECTOR) * SECTOR;
        let end = (offset + len) / SECTOR * SECTOR;
        if end <= start {
            return self.write_flags(offset, &vec![0u8; len as usize], flags);
        }
        if start > offset {
            self.write_flags(offset, &vec![0u8; (start - offset) as usize], flags)?;
        }
        if offset + len > end {
            self.write_flags(end, &vec![0u8; (offset + len - end) as usize], flags)?;
        }
        match self.run(Op::WriteZeroes, flags, start, end - start, Buf::None) {
            Err(IoError::NotSupported) => {
                let zeroes = vec![0u8; (end - start).min(1 << 20) as usize];
                let mut at = start;
                while at < end {
                    let n = (end - at).min(zeroes.len() as u64) as usize;
                    self.write_flags(at, &zeroes[..n], flags)?;
                    at += n as u64;
                }
                Ok(())
            }
            r => r,
        }
    }
    /// [`Self::read`] that never waits: [`IoError::WouldBlock`] if the device is suspended, the
    /// data is not in memory or a target may hold IO (a front end then hands the request to a
    /// thread that may wait).
    pub fn read_nowait(&self, offset: u64, buf: &mut [u8]) -> IoResult {
        self.read_flags(offset, buf, BioFlags::NOWAIT)
    }
    /// [`Self::write`] of `len` bytes that wait in a pipe (`pipe`'s read end), moved to the files
    /// with `splice`. `nowait`: [`IoError::WouldBlock`] instead of waiting for a suspended
    /// device, with the pipe untouched. On other errors some of the bytes may be left in the
    /// pipe: the caller empties it.
    pub fn write_from_pipe(&self, offset: u64, pipe: RawFd, len: u64, fua: bool, nowait: bool) -> IoResult {
        let mut flags = if fua { BioFlags::FUA } else { BioFlags::empty() };
        if nowait {
            flags |= BioFlags::NOWAIT;
        }
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if !aligned(offset, len) {
            if nowait {
                return Err(IoError::WouldBlock);
            }
            let mut data = vec![0u8; len as usize];
            read_pipe(pipe, &mut data)?;
            return self.write_flags(offset, &data, flags);
        }
        self.run(Op::Write, flags, offset, len, Buf::Pipe { fd: pipe, len })
    }
    /// [`Self::write`] (without FUA) that gives [`IoError::WouldBlock`] instead of waiting for a
    /// suspended device; the write itself goes to the page cache as usual.
    pub fn write_nowait(&self, offset: u64, data: &[u8]) -> IoResult {
        self.write_flags(offset, data, BioFlags::NOWAIT)
    }
    /// The allocation of `len` bytes at `offset`, as runs of equal state (adjacent runs differ),
    /// through the table to the files below; at most `max` runs, which may cover less than `len`
    /// (never nothing). Waits while the device is suspended, as a read would. A query, not IO: no
    /// target counts it.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> IoResult<Vec<Extent>> {
        let mut out = Vec::new();
        // A request over a long run of tiny pieces (a striped device with small chunks over
        // sparse files) is answered in part rather than keeping a thread busy for seconds.
        self.plane.extents_of(self.dev.clone(), offset, len, &mut out, max.max(1))?;
        out.truncate(max.max(1));
        Ok(out)
    }
    /// A flush (`REQ_PREFLUSH`): every write completed before it is durable after it.
    pub fn flush(&self) -> IoResult {
        self.run(Op::Flush, BioFlags::empty(), 0, 0, Buf::None)
    }
}
