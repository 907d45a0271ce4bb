//! Core services for targets that own their IO, given to constructors ([`crate::dm::target::CtorCtx::services`]):
//! submitting remapped bios from any thread, dm-io (one buffer to or from several regions), kcopyd
//! (copying regions between devices, with progress and throttling), a work queue, timers, and
//! table events (`dm_table_event`). Everything asynchronous runs on one pool of worker threads,
//! grown on demand, so a target never holds a thread of its own per IO.

use std::collections::{BinaryHeap, HashMap};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::bio::{Bio, BioFlags, Buf, Op};
use super::core::{self, Completion, Frame, Work};
use super::{DataPlane, IoError, IoResult, Waiter};
use crate::dm::pdev::Pdev;
use crate::dm::Sectors;

/// Worker threads at most; beyond them work waits for one to be free.
const MAX_WORKERS: usize = 256;

type Job = Box<dyn FnOnce() + Send>;
/// What dm-io calls with the buffer and the result.
type IoDone = Box<dyn FnOnce(Vec<u8>, IoResult) + Send>;
/// What [`Services::clone_to`] calls with the bio and each copy's result.
type CloneDone = Box<dyn FnOnce(Bio, Vec<IoResult>) + Send>;

/// Raised table events go here (the daemon bumps the device's event number and wakes waiters).
pub type EventSink = Box<dyn Fn(u32, u64) + Send + Sync>;

#[derive(Default)]
struct Pool {
    jobs: std::collections::VecDeque<Job>,
    workers: usize,
    idle: usize,
}

/// State shared by every [`Services`] handle of one data plane.
#[derive(Default)]
pub(crate) struct Shared {
    pool: Arc<(Mutex<Pool>, Condvar)>,
    timers: OnceLock<Arc<Timers>>,
    events: Mutex<Option<Arc<EventSink>>>,
}

impl Shared {
    pub(crate) fn queue_work(&self, _plane: &DataPlane, job: Job) {
        let (m, cv) = &*self.pool;
        let mut p = m.lock().unwrap_or_else(|e| e.into_inner());
        p.jobs.push_back(job);
        if p.idle > 0 {
            drop(p);
            cv.notify_one();
            return;
        }
        if p.workers >= MAX_WORKERS {
            return;
        }
        p.workers += 1;
        drop(p);
        let pool = self.pool.clone();
        let spawned = std::thread::Builder::new().name("dmemu-work".into()).spawn(move || worker(&pool));
        if let Err(e) = spawned {
            tracing::warn!("cannot start a worker thread: {e}");
            self.pool.0.lock().unwrap_or_else(|e| e.into_inner()).workers -= 1;
        }
    }

    fn timers(&self, plane: &DataPlane) -> &Arc<Timers> {
        self.timers.get_or_init(|| Timers::start(plane.clone()))
    }
}

fn worker(pool: &(Mutex<Pool>, Condvar)) {
    let (m, cv) = pool;
    let mut p = m.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(job) = p.jobs.pop_front() {
            drop(p);
            job();
            p = m.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        p.idle += 1;
        p = cv.wait(p).unwrap_or_else(|e| e.into_inner());
        p.idle -= 1;
    }
}

/// A timer, to cancel it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId(u64);

struct Timers {
    state: Mutex<TimerState>,
    cv: Condvar,
}

#[derive(Default)]
struct TimerState {
    next_id: u64,
    /// Earliest first (reversed ordering).
    heap: BinaryHeap<std::cmp::Reverse<(Instant, TimerId)>>,
    jobs: HashMap<TimerId, Job>,
}

impl Timers {
    fn start(plane: DataPlane) -> Arc<Timers> {
        let t = Arc::new(Timers { state: Mutex::new(TimerState::default()), cv: Condvar::new() });
        let me = t.clone();
        std::thread::Builder::new()
            .name("dmemu-timers".into())
            .spawn(move || me.run(&plane))
            .expect("starting the timer thread");
        t
    }

    /// Sleeps until the earliest timer and hands expired ones to the workers (never runs them
    /// itself: a job may do IO).
    fn run(&self, plane: &DataPlane) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            while let Some(std::cmp::Reverse((at, id))) = s.heap.peek().copied() {
                if at > now {
                    break;
                }
                s.heap.pop();
                if let Some(job) = s.jobs.remove(&id) {
                    plane.inner.services.queue_work(plane, job);
                }
            }
            s = match s.heap.peek() {
                Some(std::cmp::Reverse((at, _))) => {
                    let d = at.saturating_duration_since(Instant::now());
                    self.cv.wait_timeout(s, d).unwrap_or_else(|e| e.into_inner()).0
                }
                None => self.cv.wait(s).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// An area of an underlying device (dm-io's `dm_io_region`).
#[derive(Clone, Debug)]
pub struct Region {
    pub dev: Arc<Pdev>,
    pub sector: Sectors,
    pub sectors: Sectors,
}

/// A kcopyd job: `from` (or zeroes when `None`) copied to every region of `to` (each as long as
/// `sectors`).
#[derive(Clone, Debug)]
pub struct CopyJob {
    pub from: Option<Region>,
    pub to: Vec<Region>,
    /// Percent of the time the copy may spend copying (kcopyd's throttle); 100 is no limit.
    pub throttle: u8,
}

/// How far a copy has got.
#[derive(Debug, Default)]
pub struct CopyProgress {
    /// Sectors copied so far.
    pub done: AtomicU64,
    /// Ask the copy to stop after the chunk under way (it then ends with EINTR).
    pub cancel: AtomicBool,
}

/// Sectors per kcopyd chunk.
const COPY_CHUNK: u64 = 2048;

/// The core services, bound to one table of one device. Cheap to clone.
#[derive(Clone)]
pub struct Services {
    plane: DataPlane,
    minor: u32,
    table_id: u64,
}

impl Services {
    pub(crate) fn new(plane: DataPlane, minor: u32, table_id: u64) -> Self {
        Self { plane, minor, table_id }
    }

    /// Submits a bio a target has pointed at a device with [`Bio::remap`] (the kernel's
    /// `submit_bio_noacct` from a target), from any thread.
    pub fn submit(&self, bio: Bio) {
        core::submit(&self.plane, Work::Remapped(bio));
    }

    /// Runs `f` on a worker thread (the target's workqueue).
    pub fn queue_work(&self, f: impl FnOnce() + Send + 'static) {
        self.plane.inner.services.queue_work(&self.plane, Box::new(f));
    }

    /// Runs `f` on a worker thread once `delay` has passed.
    pub fn after(&self, delay: Duration, f: impl FnOnce() + Send + 'static) -> TimerId {
        let t = self.plane.inner.services.timers(&self.plane);
        let mut s = t.state.lock().unwrap_or_else(|e| e.into_inner());
        s.next_id += 1;
        let id = TimerId(s.next_id);
        s.jobs.insert(id, Box::new(f));
        s.heap.push(std::cmp::Reverse((Instant::now() + delay, id)));
        drop(s);
        t.cv.notify_one();
        id
    }

    /// Cancels a timer that has not fired; false if it already ran (or is running).
    pub fn cancel(&self, id: TimerId) -> bool {
        let t = self.plane.inner.services.timers(&self.plane);
        let removed = t.state.lock().unwrap_or_else(|e| e.into_inner()).jobs.remove(&id).is_some();
        removed
    }

    /// Raises a table event (`dm_table_event`): the device's event number moves and DM_DEV_WAIT
    /// and ARM_POLL waiters wake, if this table is live. Delivered asynchronously, so a target may
    /// raise one from anywhere (a message handler, an IO completion).
    pub fn raise_event(&self) {
        let sink = self.plane.inner.services.events.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(sink) = sink {
            let (minor, table) = (self.minor, self.table_id);
            self.queue_work(move || sink(minor, table));
        }
    }

    /// dm-io, asynchronous: reads one region into `data`, or writes `data` to every region.
    /// `done` gets the buffer back with the first error.
    pub fn io(
        &self,
        op: Op,
        flags: BioFlags,
        regions: &[Region],
        mut data: Vec<u8>,
        done: impl FnOnce(Vec<u8>, IoResult) + Send + 'static,
    ) {
        if (op == Op::Read && regions.len() != 1) || regions.is_empty() {
            return done(data, Err(IoError::Failed));
        }
        let bytes = regions.iter().map(|r| r.sectors.bytes()).max().unwrap_or(0);
        if op.has_data() && (data.len() as u64) < bytes {
            return done(data, Err(IoError::Failed));
        }
        let ptr = NonNull::new(data.as_mut_ptr()).unwrap_or(NonNull::dangling());
        struct State {
            left: usize,
            result: IoResult,
            data: Option<Vec<u8>>,
            done: Option<IoDone>,
        }
        let state = Arc::new(Mutex::new(State {
            left: regions.len(),
            result: Ok(()),
            data: Some(data),
            done: Some(Box::new(done)),
        }));
        for r in regions {
            let st = state.clone();
            let buf = if op.has_data() {
                Buf::Ref { ptr, len: r.sectors.bytes() as usize, writable: op == Op::Read }
            } else {
                Buf::None
            };
            let finish: Box<dyn FnOnce(Bio, IoResult) + Send> = Box::new(move |_bio, res| {
                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                if let (Err(e), Ok(())) = (res, s.result) {
                    s.result = Err(e);
                }
                s.left -= 1;
                if s.left == 0 {
                    let (data, done, result) = (s.data.take(), s.done.take(), s.result);
                    drop(s);
                    if let (Some(d), Some(f)) = (data, done) {
                        f(d, result);
                    }
                }
            });
            let mut bio = Bio::new(op, flags, 0, r.sectors.0, buf, Frame::Submitter(Completion::Call(finish)));
            bio.remap(&r.dev, r.sector);
            self.submit(bio);
        }
    }

    /// Sends a copy of `bio` to each of `to` (device, sector), all sharing its data, and calls
    /// `done` with the bio and each copy's result, in the order of `to`, once every copy has
    /// completed: a mirror's write to all its legs (the kernel's dm-io over the bio's own pages).
    /// `done` decides what becomes of the bio (end it, retry, or fail a leg). A piped payload is
    /// taken into memory first.
    pub fn clone_to(
        &self,
        mut bio: Bio,
        to: &[(Arc<Pdev>, Sectors)],
        done: impl FnOnce(Bio, Vec<IoResult>) + Send + 'static,
    ) {
        if to.is_empty() {
            return done(bio, Vec::new());
        }
        if let Err(e) = bio.materialize() {
            return done(bio, vec![Err(e); to.len()]);
        }
        struct State {
            left: usize,
            results: Vec<IoResult>,
            parent: Option<Bio>,
            done: Option<CloneDone>,
        }
        let state = Arc::new(Mutex::new(State {
            left: to.len(),
            results: vec![Ok(()); to.len()],
            parent: None,
            done: Some(Box::new(done)),
        }));
        let sectors = bio.sectors().0;
        let mut clones = Vec::with_capacity(to.len());
        for (i, (dev, sector)) in to.iter().enumerate() {
            let st = state.clone();
            let finish: Box<dyn FnOnce(Bio, IoResult) + Send> = Box::new(move |_clone, res| {
                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                s.results[i] = res;
                s.left -= 1;
                if s.left == 0 {
                    let (parent, done, results) = (s.parent.take(), s.done.take(), std::mem::take(&mut s.results));
                    drop(s);
                    if let (Some(p), Some(f)) = (parent, done) {
                        f(p, results);
                    }
                }
            });
            let mut c = bio.child(0, sectors, Frame::Submitter(Completion::Call(finish)));
            c.remap(dev, *sector);
            clones.push(c);
        }
        // The bio waits with its data where the copies point until the last one is done.
        state.lock().unwrap_or_else(|e| e.into_inner()).parent = Some(bio);
        for c in clones {
            self.submit(c);
        }
    }

    /// dm-io, synchronous, on one region: reads into or writes from `buf` (a whole number of
    /// sectors). Safe to call from a target's `map`, `end_io` or a worker.
    pub fn io_sync(&self, op: Op, flags: BioFlags, region: &Region, buf: &mut [u8]) -> IoResult {
        if op.has_data() && buf.len() as u64 != region.sectors.bytes() {
            return Err(IoError::Failed);
        }
        let w = Arc::new(Waiter::default());
        let b = if op.has_data() {
            Buf::Ref { ptr: NonNull::from(&mut *buf).cast(), len: buf.len(), writable: op == Op::Read }
        } else {
            Buf::None
        };
        let mut bio = Bio::new(op, flags, 0, region.sectors.0, b, Frame::Submitter(Completion::Sync(w.clone())));
        bio.remap(&region.dev, region.sector);
        core::submit_isolated(&self.plane, Work::Remapped(bio));
        w.wait()
    }

    /// kcopyd: copies `job` on a worker in chunks of 1 MiB, counting progress; `done` gets the
    /// result (EINTR if cancelled).
    pub fn copy(&self, job: CopyJob, done: impl FnOnce(IoResult) + Send + 'static) -> Arc<CopyProgress> {
        let progress = Arc::new(CopyProgress::default());
        let (me, p) = (self.clone(), progress.clone());
        self.queue_work(move || done(me.copy_now(&job, &p)));
        progress
    }

    fn copy_now(&self, job: &CopyJob, p: &CopyProgress) -> IoResult {
        let total = job.to.iter().map(|r| r.sectors.0).max().unwrap_or(0);
        let mut buf = vec![0u8; (COPY_CHUNK * Sectors::SIZE) as usize];
        let mut at = 0u64;
        while at < total {
            if p.cancel.load(Ordering::Relaxed) {
                return Err(IoError::Os(libc::EINTR));
            }
            let started = Instant::now();
            let n = (total - at).min(COPY_CHUNK);
            let chunk = &mut buf[..(n * Sectors::SIZE) as usize];
            match &job.from {
                Some(src) => {
                    let r = Region { dev: src.dev.clone(), sector: Sectors(src.sector.0 + at), sectors: Sectors(n) };
                    self.io_sync(Op::Read, BioFlags::empty(), &r, chunk)?;
                }
                None => chunk.fill(0),
            }
            for dst in &job.to {
                let r = Region { dev: dst.dev.clone(), sector: Sectors(dst.sector.0 + at), sectors: Sectors(n) };
                self.io_sync(Op::Write, BioFlags::empty(), &r, chunk)?;
            }
            at += n;
            p.done.store(at, Ordering::Relaxed);
            if job.throttle > 0 && job.throttle < 100 {
                let busy = started.elapsed();
                std::thread::sleep(busy * u32::from(100 - job.throttle) / u32::from(job.throttle));
            }
        }
        Ok(())
    }
}

impl DataPlane {
    /// Where raised table events go (the daemon's: event number, waiters).
    pub fn set_event_sink(&self, sink: EventSink) {
        *self.inner.services.events.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(sink));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm::pdev::PdevKind;
    use crate::dm::DevNum;

    fn file_pdev(dir: &std::path::Path, name: &str, minor: u32) -> Arc<Pdev> {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let path = path.to_string_lossy().into_owned();
        let f = crate::io::Backing::open(&path, true).unwrap();
        Arc::new(Pdev::with_file(DevNum::new(251, minor), PdevKind::File { path }, Sectors(16), f))
    }

    #[test]
    fn a_bio_cloned_to_two_devices_writes_both_and_completes_once() {
        let dir = std::env::temp_dir().join(format!("dmemu-clone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (file_pdev(&dir, "a", 0), file_pdev(&dir, "b", 1));
        let plane = DataPlane::detached();
        let s = plane.services(0, 0);
        let w = Arc::new(Waiter::default());
        let data = vec![0x6bu8; 1024];
        let bio = Bio::new(
            Op::Write,
            BioFlags::empty(),
            0,
            2,
            Buf::Ref { ptr: NonNull::from(&data[..]).cast(), len: data.len(), writable: false },
            Frame::Submitter(Completion::Sync(w.clone())),
        );
        s.clone_to(bio, &[(a.clone(), Sectors(4)), (b.clone(), Sectors(10))], |bio, results| {
            assert_eq!(results, [Ok(()), Ok(())]);
            bio.end(Ok(()));
        });
        assert_eq!(w.wait(), Ok(()));
        let fa = std::fs::read(dir.join("a")).unwrap();
        let fb = std::fs::read(dir.join("b")).unwrap();
        assert!(fa[2048..3072].iter().all(|&x| x == 0x6b) && fa[..2048].iter().all(|&x| x == 0));
        assert!(fb[5120..6144].iter().all(|&x| x == 0x6b) && fb[6144..].iter().all(|&x| x == 0));
        // A copy to a device that cannot be opened reports its own failure.
        let gone = Arc::new(Pdev::new(
            DevNum::new(251, 2),
            PdevKind::File { path: dir.join("missing/x").to_string_lossy().into_owned() },
            Sectors(16),
        ));
        let w = Arc::new(Waiter::default());
        let bio = Bio::new(
            Op::Write,
            BioFlags::empty(),
            0,
            2,
            Buf::Owned(vec![1u8; 1024]),
            Frame::Submitter(Completion::Sync(w.clone())),
        );
        s.clone_to(bio, &[(a, Sectors(0)), (gone, Sectors(0))], |bio, results| {
            assert!(results[0].is_ok() && results[1].is_err(), "{results:?}");
            bio.end(results[1]);
        });
        assert!(w.wait().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
