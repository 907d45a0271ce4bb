//! `mirror` 1.15.0 (the kernel's dm-raid1, linux-dm-abi.md §5.1, §5.3): 2–9 legs kept identical,
//! with a dirty log ([`log`]) that says which regions are in sync and which have writes in flight.
//!
//! * A write marks its region dirty in the log and flushes the log before the data goes out, to
//!   every leg if the region is in sync (else to the default leg only: the resync copies it); the
//!   region is cleared when its last write completes.
//! * Reads go to the default leg (another leg that has no errors if it has), and are retried on
//!   another in-sync leg when one fails.
//! * Out-of-sync regions are recovered one at a time, in the log's `get_resync_work` order, by a
//!   copy from the default leg to the others (the core's kcopyd service); writes to a region being
//!   recovered wait for its recovery. Recovery stops on suspend and starts again on resume.
//!
//! Status counts `<in-sync regions>/<regions>` live, with a health letter per leg.
//!
//! A write that fails on a leg: with no healthy leg left it fails; with `handle_errors` it is held
//! until the next suspend (requeued by a noflush one, for the repaired table; failed otherwise), as
//! dmeventd expects; without, it counts as done (the kernel's choice). Not yet served: the
//! `userspace` and cluster log types.

pub mod log;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use self::log::{DirtyLog, LogCtx};
use crate::dm::pdev::Pdev;
use crate::dm::target::{parse_sectors, CtorCtx, EndIo, Features, Map, Target, TargetType, TypeFlags};
use crate::dm::{DmError, DmResult, Sectors, StatusType};
use crate::invalid;
use crate::io::{Bio, CopyJob, CopyProgress, IoError, IoResult, Op, Region, Services};

pub static TYPE: TargetType = TargetType { name: "mirror", version: [1, 15, 0], ctor, flags: TypeFlags::empty() };

/// 8 kcopyd destinations and the source (`MAX_NR_MIRRORS`).
const MAX_LEGS: usize = 9;

/// Error kinds of a leg, as bits of [`Leg::error_type`] (`DM_RAID1_*_ERROR`).
const WRITE_ERROR: u8 = 1;
const FLUSH_ERROR: u8 = 2;
const SYNC_ERROR: u8 = 4;
const READ_ERROR: u8 = 8;

struct Leg {
    dev: Arc<Pdev>,
    offset: Sectors,
    error_count: AtomicU32,
    error_type: AtomicU8,
}

impl Leg {
    fn ok(&self) -> bool {
        self.error_count.load(Ordering::Relaxed) == 0
    }

    /// `device_status_char`.
    fn health(&self) -> char {
        if self.ok() {
            return 'A';
        }
        let t = self.error_type.load(Ordering::Relaxed);
        match () {
            _ if t & FLUSH_ERROR != 0 => 'F',
            _ if t & WRITE_ERROR != 0 => 'D',
            _ if t & SYNC_ERROR != 0 => 'S',
            _ if t & READ_ERROR != 0 => 'R',
            _ => 'U',
        }
    }
}

struct State {
    log: Box<dyn DirtyLog>,
    default_leg: usize,
    /// Writes in flight per region.
    pending: HashMap<u64, u32>,
    /// The region being recovered, if any, and the writes waiting for it.
    recovering: Option<u64>,
    /// The region to recover still has writes in flight: its copy starts when they are done.
    quiescing: bool,
    delayed: Vec<Bio>,
    /// Every region in sync (the sync-completion event was raised).
    in_sync: bool,
    /// Recovery may run (between resume and presuspend).
    recovery_allowed: bool,
    /// Copy jobs of the region being recovered that have not completed, and their progress
    /// (to cancel them on suspend).
    copies: Vec<Arc<CopyProgress>>,
    copies_in_flight: usize,
    /// Writes that failed on a leg, held for userspace to repair the mirror (`handle_errors`):
    /// released by the next suspend (`hold_bio`).
    holds: Vec<Bio>,
    /// Between presuspend and resume, and whether that suspend is a noflush one.
    suspending: bool,
    noflush: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when the last copy job of a recovery completes.
    copies_done: Condvar,
    legs: Vec<Leg>,
    region_size: u64,
    nr_regions: u64,
    /// The target's length: the last region may be short.
    len: u64,
    handle_errors: bool,
    keep_log: bool,
    services: Services,
    me: Weak<Shared>,
}

pub struct Mirror {
    shared: Arc<Shared>,
}

/// How a region's recovery went (kcopyd's read error and per-destination write errors).
struct Recovery {
    read_error: bool,
    write_errors: Vec<usize>,
    /// Stopped by a suspend: nobody is to blame, and the region stays out of sync.
    cancelled: bool,
}

/// Per-bio data from `map` to `end_io`: which leg a read went to.
struct ReadIo {
    leg: usize,
}

/// `create_dirty_log`, `get_mirror`, `parse_features` in dm-raid1.c's order.
fn ctor(ctx: &mut CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Box<dyn Target>> {
    if argv.len() < 2 {
        return Err(invalid!("Insufficient mirror log arguments"));
    }
    let log_argc =
        crate::targets::sscanf::u(&argv[1]).ok_or_else(|| invalid!("Invalid mirror log argument count"))? as usize;
    let used = 2 + log_argc;
    if argv.len() < used {
        return Err(invalid!("Insufficient mirror log arguments"));
    }
    let log = log::create(&argv[0], &argv[2..used], &LogCtx { target_len: ctx.len.0 }, ctx)
        .map_err(|e| invalid!("Error creating mirror dirty log: {e}"))?;
    let rest = &argv[used..];
    let nr = rest
        .first()
        .and_then(|w| crate::targets::sscanf::u(w))
        .map(|n| n as usize)
        .filter(|n| (2..=MAX_LEGS).contains(n))
        .ok_or_else(|| invalid!("Invalid number of mirrors"))?;
    let rest = &rest[1..];
    if rest.len() < nr * 2 {
        return Err(invalid!("Too few mirror arguments"));
    }
    let mut legs = Vec::with_capacity(nr);
    for pair in rest[..nr * 2].chunks(2) {
        let offset = parse_sectors(&pair[1]).ok_or_else(|| invalid!("Invalid offset"))?;
        let dev = ctx.get_device(&pair[0]).map_err(|e| match e {
            DmError::Invalid(_) => invalid!("Device lookup failure"),
            other => other,
        })?;
        legs.push(Leg { dev, offset, error_count: AtomicU32::new(0), error_type: AtomicU8::new(0) });
    }
    let mut rest = &rest[nr * 2..];
    let (mut handle_errors, mut keep_log) = (false, false);
    if let Some(first) = rest.first() {
        let n = crate::targets::sscanf::u(first).ok_or_else(|| invalid!("Invalid number of features"))? as usize;
        rest = &rest[1..];
        if n > rest.len() {
            return Err(invalid!("Not enough arguments to support feature count"));
        }
        for f in &rest[..n] {
            match f.as_str() {
                "handle_errors" => handle_errors = true,
                "keep_log" => keep_log = true,
                _ => return Err(invalid!("Unrecognised feature requested")),
            }
        }
        rest = &rest[n..];
        if keep_log && !handle_errors {
            return Err(invalid!("keep_log feature requires the handle_errors feature"));
        }
    }
    if !rest.is_empty() {
        return Err(invalid!("Too many mirror arguments"));
    }
    let region_size = u64::from(log.region_size());
    let nr_regions = ctx.len.0.div_ceil(region_size);
    let state = State {
        log,
        default_leg: 0,
        pending: HashMap::new(),
        recovering: None,
        quiescing: false,
        delayed: Vec::new(),
        in_sync: false,
        recovery_allowed: false,
        copies: Vec::new(),
        copies_in_flight: 0,
        holds: Vec::new(),
        suspending: false,
        noflush: false,
    };
    let services = ctx.services();
    let shared = Arc::new_cyclic(|me| Shared {
        state: Mutex::new(state),
        copies_done: Condvar::new(),
        legs,
        region_size,
        nr_regions,
        len: ctx.len.0,
        handle_errors,
        keep_log,
        services,
        me: me.clone(),
    });
    Ok(Box::new(Mirror { shared }))
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `choose_mirror`: the default leg, else the next one down without errors.
    fn choose_leg(&self, st: &State) -> Option<usize> {
        let n = self.legs.len();
        (0..n).map(|k| (st.default_leg + n - k) % n).find(|&i| self.legs[i].ok())
    }

    /// `fail_mirror`: counts the error; with `handle_errors`, a failed default leg hands over to a
    /// healthy one (unless out of sync) and an event is raised.
    fn fail_leg(&self, st: &mut State, leg: usize, kind: u8) {
        let l = &self.legs[leg];
        l.error_count.fetch_add(1, Ordering::Relaxed);
        if l.error_type.fetch_or(kind, Ordering::Relaxed) & kind != 0 {
            return;
        }
        tracing::warn!("mirror: leg {} failed ({})", l.dev.dev, l.health());
        if !self.handle_errors {
            return;
        }
        if leg == st.default_leg {
            if !st.in_sync && !self.keep_log {
                tracing::error!("mirror: Primary mirror ({}) failed while out-of-sync: Reads may fail.", l.dev.dev);
            } else if let Some(new) = (0..self.legs.len()).find(|&i| self.legs[i].ok()) {
                st.default_leg = new;
            } else {
                tracing::warn!("mirror: All sides of mirror have failed.");
            }
        }
        self.services.raise_event();
    }

    /// A write's way out: mark and flush, then to every leg (or the default one for a region out
    /// of sync). Called with the region not being recovered.
    fn write(self: &Arc<Self>, mut st: MutexGuard<'_, State>, bio: Bio, region: u64) {
        let pending = st.pending.entry(region).or_insert(0);
        *pending += 1;
        if *pending == 1 && bio.op() != Op::Flush {
            st.log.mark_region(region);
        }
        if st.log.flush().is_err() {
            tracing::warn!("mirror: log flush failed");
        }
        let in_sync = st.log.in_sync(region);
        let (sector, end) = (bio.sector().0, bio.sector().0.saturating_add(bio.sectors().0));
        let legs: Vec<usize> =
            if in_sync || bio.op() == Op::Flush { (0..self.legs.len()).collect() } else { vec![st.default_leg] };
        // Checked: a leg whose offset would wrap takes no write (the write fails on it).
        let targets: Option<Vec<(Arc<Pdev>, Sectors)>> = legs
            .iter()
            .map(|&i| {
                let l = &self.legs[i];
                l.offset.0.checked_add(end)?;
                Some((l.dev.clone(), Sectors(l.offset.0 + sector)))
            })
            .collect();
        drop(st);
        let Some(targets) = targets else {
            let results = vec![Err(IoError::Range); legs.len()];
            return self.write_done(bio, region, &legs, results);
        };
        let me = self.clone();
        self.services.clone_to(bio, &targets, move |bio, results| me.write_done(bio, region, &legs, results));
    }

    /// `write_callback` and the region's release.
    fn write_done(self: &Arc<Self>, bio: Bio, region: u64, legs: &[usize], results: Vec<IoResult>) {
        let mut st = self.lock();
        let mut failed = 0;
        for (&leg, r) in legs.iter().zip(&results) {
            if r.is_err() {
                failed += 1;
                let kind = if bio.op() == Op::Flush { FLUSH_ERROR } else { WRITE_ERROR };
                self.fail_leg(&mut st, leg, kind);
            }
        }
        if failed > 0 && bio.op() != Op::Flush && failed < legs.len() {
            // A leg missed the write: the region is no longer the same everywhere.
            st.log.set_region_sync(region, false);
            st.in_sync = false;
        }
        let left = st.pending.get_mut(&region).map(|p| {
            *p -= 1;
            *p
        });
        if left == Some(0) {
            st.pending.remove(&region);
            if bio.op() != Op::Flush {
                st.log.clear_region(region);
                let _ = st.log.flush();
            }
            if st.quiescing && st.recovering == Some(region) {
                st.quiescing = false;
                self.start_copy(st, region);
            } else {
                drop(st);
                self.kick_recovery();
            }
        } else {
            drop(st);
        }
        if failed == 0 {
            return bio.end(Ok(()));
        }
        // `do_failures`: no healthy leg left, fail it; errors handled, hold it for userspace
        // (dmeventd) to repair the mirror; otherwise the write counts as done, as the kernel has it.
        let any_valid = self.legs.iter().any(Leg::ok);
        if !any_valid {
            return bio.end(Err(IoError::Failed));
        }
        if self.handle_errors && !self.keep_log {
            return self.hold(bio);
        }
        bio.end(Ok(()))
    }

    /// `hold_bio`: kept until the next suspend, which requeues it (noflush) or fails it.
    fn hold(&self, bio: Bio) {
        let mut st = self.lock();
        if st.suspending {
            let r = if st.noflush { IoError::Requeue } else { IoError::Failed };
            drop(st);
            return bio.end(Err(r));
        }
        st.holds.push(bio);
    }

    /// Starts the next region's recovery if none is under way (`do_recovery`).
    fn kick_recovery(self: &Arc<Self>) {
        let mut st = self.lock();
        if st.recovering.is_some() || !st.recovery_allowed {
            return;
        }
        if st.log.sync_count() >= self.nr_regions {
            if !st.in_sync {
                st.in_sync = true;
                self.services.raise_event();
            }
            return;
        }
        let Some(region) = st.log.get_resync_work() else { return };
        st.recovering = Some(region);
        if st.pending.contains_key(&region) {
            // Writes in flight: the copy starts once they are done (the kernel's quiescing); new
            // writes to the region wait meanwhile.
            st.quiescing = true;
            return;
        }
        self.start_copy(st, region);
    }

    /// Copies a quiesced region from the default leg to the others.
    fn start_copy(self: &Arc<Self>, st: MutexGuard<'_, State>, region: u64) {
        let start = region.saturating_mul(self.region_size);
        let len = self.region_size.min(self.len_sectors().saturating_sub(start));
        // Checked: an offset that would wrap fails the recovery instead of writing elsewhere.
        let area = |i: usize| {
            let l = &self.legs[i];
            l.offset.0.checked_add(start).filter(|s| s.checked_add(len).is_some()).map(|s| Region {
                dev: l.dev.clone(),
                sector: Sectors(s),
                sectors: Sectors(len),
            })
        };
        let src = st.default_leg;
        let from = area(src);
        let to: Option<Vec<(usize, Region)>> =
            (0..self.legs.len()).filter(|&i| i != src).map(|i| area(i).map(|r| (i, r))).collect();
        drop(st);
        let (Some(from), Some(to)) = (from, to) else {
            return self
                .recovery_done(region, Recovery { read_error: true, write_errors: Vec::new(), cancelled: false });
        };
        self.lock().copies_in_flight += to.len();
        // One kcopyd job per destination, so a failure names its leg (the kernel's kcopyd reports
        // a read error and a bit per destination).
        struct Copies {
            left: usize,
            failed: Vec<usize>,
            cancelled: bool,
        }
        let copies = Arc::new(Mutex::new(Copies { left: to.len(), failed: Vec::new(), cancelled: false }));
        for (leg, dest) in to {
            let job = CopyJob { from: Some(from.clone()), to: vec![dest], throttle: 100 };
            let (me, copies, from) = (Arc::downgrade(self), copies.clone(), from.clone());
            let progress = self.services.copy(job, move |r| {
                if let Some(me) = me.upgrade() {
                    me.copy_finished();
                }
                let mut c = copies.lock().unwrap_or_else(|p| p.into_inner());
                if r == Err(IoError::Os(libc::EINTR)) {
                    c.cancelled = true;
                } else if r.is_err() {
                    c.failed.push(leg);
                }
                c.left -= 1;
                if c.left > 0 {
                    return;
                }
                let (failed, cancelled) = (std::mem::take(&mut c.failed), c.cancelled);
                drop(c);
                let Some(me) = me.upgrade() else { return };
                let outcome = if failed.is_empty() || cancelled {
                    Recovery { read_error: false, write_errors: failed, cancelled }
                } else {
                    // Which side failed: the source is read again (its first sector).
                    let mut sector = vec![0u8; 512];
                    let probe = Region { dev: from.dev.clone(), sector: from.sector, sectors: Sectors(1) };
                    let read_ok = me.services.io_sync(Op::Read, Default::default(), &probe, &mut sector).is_ok();
                    if read_ok {
                        Recovery { read_error: false, write_errors: failed, cancelled }
                    } else {
                        Recovery { read_error: true, write_errors: Vec::new(), cancelled }
                    }
                };
                me.recovery_done(region, outcome);
            });
            self.lock().copies.push(progress);
        }
    }

    /// One copy job of the current recovery has completed.
    fn copy_finished(&self) {
        let mut st = self.lock();
        st.copies_in_flight = st.copies_in_flight.saturating_sub(1);
        if st.copies_in_flight == 0 {
            st.copies.clear();
            self.copies_done.notify_all();
        }
    }

    fn len_sectors(&self) -> u64 {
        self.len
    }

    /// `recovery_complete` and `dm_rh_recovery_end`: the legs to blame, the region's sync state,
    /// then the writes that waited for it.
    fn recovery_done(self: &Arc<Self>, region: u64, outcome: Recovery) {
        let ok = !outcome.read_error && outcome.write_errors.is_empty() && !outcome.cancelled;
        let r: IoResult = if ok { Ok(()) } else { Err(IoError::Failed) };
        let delayed = {
            let mut st = self.lock();
            if outcome.read_error {
                tracing::warn!("mirror: Unable to read primary mirror during recovery of region {region}");
                let d = st.default_leg;
                self.fail_leg(&mut st, d, SYNC_ERROR);
            }
            for leg in outcome.write_errors {
                tracing::warn!("mirror: Write error during recovery of region {region}");
                self.fail_leg(&mut st, leg, SYNC_ERROR);
            }
            // `dm_rh_update_states`: a recovered region is clean (and in sync); a failed one is
            // out of sync only when errors are handled (else it counts as in sync, as the kernel
            // has it).
            if r.is_ok() {
                st.log.clear_region(region);
            }
            st.log.set_region_sync(region, r.is_ok() || (!self.handle_errors && !outcome.cancelled));
            if st.log.flush().is_err() {
                tracing::warn!("mirror: log flush failed");
            }
            st.recovering = None;
            std::mem::take(&mut st.delayed)
        };
        for bio in delayed {
            let region = bio.sector().0 / self.region_size;
            let st = self.lock();
            self.write(st, bio, region);
        }
        self.kick_recovery();
    }
}

impl Target for Mirror {
    fn status(&self, kind: StatusType, _noflush: bool) -> String {
        let sh = &self.shared;
        let st = sh.lock();
        match kind {
            StatusType::Info => {
                let mut out = format!("{} ", sh.legs.len());
                for l in &sh.legs {
                    out.push_str(&format!("{} ", l.dev.dev));
                }
                let health: String = sh.legs.iter().map(Leg::health).collect();
                out.push_str(&format!("{}/{} 1 {health} ", st.log.sync_count(), sh.nr_regions));
                out.push_str(&st.log.status(StatusType::Info));
                out
            }
            _ => {
                let mut out = st.log.status(StatusType::Table);
                out.push_str(&sh.legs.len().to_string());
                for l in &sh.legs {
                    out.push_str(&format!(" {} {}", l.dev.dev, l.offset));
                }
                let n = usize::from(sh.handle_errors) + usize::from(sh.keep_log);
                if n > 0 {
                    out.push_str(&format!(" {n}"));
                    if sh.handle_errors {
                        out.push_str(" handle_errors");
                    }
                    if sh.keep_log {
                        out.push_str(" keep_log");
                    }
                }
                out
            }
        }
    }

    fn iterate_devices(&self, len: Sectors, f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors)) {
        let st = self.shared.lock();
        if let Some(d) = st.log.device() {
            f(d, Sectors(0), Sectors(0));
        }
        drop(st);
        for l in &self.shared.legs {
            f(&l.dev, l.offset, len);
        }
    }

    fn features(&self) -> Features {
        Features {
            max_io_len: Some(self.shared.region_size),
            write_zeroes_bios: 0,
            end_io: true,
            ..Features::default()
        }
    }

    fn map(&self, mut bio: Bio) -> Map {
        let sh = &self.shared;
        let region = bio.sector().0 / sh.region_size;
        let mut st = sh.lock();
        if bio.op() == Op::Read {
            let leg = if st.log_in_sync(region) { sh.choose_leg(&st) } else { Some(st.default_leg) };
            let Some(leg) = leg else { return Map::Kill(bio) };
            let l = &sh.legs[leg];
            bio.set_private(Box::new(ReadIo { leg }));
            return match bio.remap_offset(&l.dev, l.offset) {
                Some(()) => Map::Remapped(bio),
                None => Map::Kill(bio),
            };
        }
        if st.recovering == Some(region) && bio.op() != Op::Flush {
            st.delayed.push(bio);
            return Map::Submitted;
        }
        sh.write(st, bio, region);
        Map::Submitted
    }

    fn end_io(&self, mut bio: Bio, result: IoResult) -> EndIo {
        let Some(io) = bio.take_private().and_then(|p| p.downcast::<ReadIo>().ok()) else {
            return EndIo::Done(bio, result);
        };
        let Err(e) = result else { return EndIo::Done(bio, result) };
        if matches!(e, IoError::WouldBlock | IoError::Requeue) {
            return EndIo::Done(bio, result);
        }
        let sh = &self.shared;
        let mut st = sh.lock();
        sh.fail_leg(&mut st, io.leg, READ_ERROR);
        // Another leg holds the same data only where the region is in sync.
        let region = bio.sector().0 / sh.region_size;
        let other = if st.log_in_sync(region) { sh.choose_leg(&st) } else { None };
        drop(st);
        match other {
            Some(leg) if leg != io.leg => {
                let l = &sh.legs[leg];
                bio.set_private(Box::new(ReadIo { leg }));
                if bio.remap_offset(&l.dev, l.offset).is_none() {
                    return EndIo::Done(bio, result);
                }
                sh.services.submit(bio);
                EndIo::Incomplete
            }
            _ => EndIo::Done(bio, result),
        }
    }

    /// `dm_rh_stop_recovery`: no new recovery; the one under way is cancelled after its current
    /// chunk and waited for, so no copy of the old table writes a leg after the suspend. The
    /// wait is bounded (5 s): a copy stuck on a suspended leg must not hold the engine.
    fn presuspend(&self, noflush: bool) {
        let sh = &self.shared;
        let mut st = sh.lock();
        st.recovery_allowed = false;
        st.suspending = true;
        st.noflush = noflush;
        let holds = std::mem::take(&mut st.holds);
        drop(st);
        let r = if noflush { IoError::Requeue } else { IoError::Failed };
        for bio in holds {
            bio.end(Err(r));
        }
        let mut st = sh.lock();
        for p in &st.copies {
            p.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while st.copies_in_flight > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!("mirror: recovery still copying at suspend; not waiting longer");
                break;
            }
            st = sh.copies_done.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn presuspend_undo(&self) {
        self.resume();
    }

    fn postsuspend(&self) {
        self.shared.lock().log.postsuspend();
    }

    fn preresume(&self) -> DmResult<()> {
        let mut st = self.shared.lock();
        st.log.resume().map_err(|e| invalid!("mirror: log resume failed: {e}"))?;
        st.in_sync = st.log.sync_count() >= self.shared.nr_regions;
        Ok(())
    }

    fn resume(&self) {
        let mut st = self.shared.lock();
        st.recovery_allowed = true;
        st.suspending = false;
        st.noflush = false;
        drop(st);
        if let Some(me) = self.shared.me.upgrade() {
            self.shared.services.queue_work(move || me.kick_recovery());
        }
    }
}

impl State {
    fn log_in_sync(&mut self, region: u64) -> bool {
        self.in_sync || self.log.in_sync(region)
    }
}
