//! `delay` 1.5.0: holds each bio for a fixed time before passing it on, per class of IO (read,
//! write, flush), each class with its own device and offset (more-targets.md §2, the kernel's
//! `dm-delay.c`).
//!
//! Held bios wait in one FIFO queue per target, never on a thread: one timer (the core's
//! [`Services::after`]) is armed for the earliest expiry, and when it fires every expired bio is
//! issued in queue order and the timer is re-armed for the earliest bio still waiting.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::sscanf;
use crate::dm::pdev::Pdev;
use crate::dm::target::{CtorCtx, Features, Map, Mapping, Target, TargetType, TypeFlags};
use crate::dm::{DmError, DmResult, Sectors, StatusType};
use crate::invalid;
use crate::io::{Bio, Op, Services, TimerId};

pub static TYPE: TargetType = TargetType { name: "delay", version: [1, 5, 0], ctor, flags: TypeFlags::empty() };

/// The classes, as indices into [`Delay::classes`] and [`Queue::queued`].
const READ: usize = 0;
const WRITE: usize = 1;
const FLUSH: usize = 2;

/// One class's `<dev> <offset> <delay_ms>` triple.
struct Class {
    dev: Arc<Pdev>,
    offset: Sectors,
    delay_ms: u32,
}

/// A bio waiting for its expiry, already remapped to its class's device.
struct Held {
    expires: Instant,
    class: usize,
    bio: Bio,
}

struct Queue {
    /// In arrival order, across classes (more-targets.md §2.2: issue order is queue order).
    held: VecDeque<Held>,
    /// Bios currently held per class (INFO status; not cumulative, more-targets.md §2.3).
    queued: [u32; 3],
    /// Off from presuspend to resume: bios then pass straight through (the kernel's `may_delay`).
    may_delay: bool,
    /// The armed timer and when it fires.
    timer: Option<(Instant, TimerId)>,
}

/// The queue and what releasing it needs. The timer closure holds only a `Weak` to this, so a
/// pending timer never keeps a removed table alive.
struct Shared {
    queue: Mutex<Queue>,
    services: Services,
}

pub struct Delay {
    /// Read, write, flush.
    classes: [Class; 3],
    /// Words in the table line (3, 6 or 9): TABLE status keeps that shape (more-targets.md §2.3).
    argc: usize,
    shared: Arc<Shared>,
}

/// Parses one triple in the kernel's order: offset, delay, then the device (`delay_class_ctr`).
fn class(ctx: &mut CtorCtx<'_, '_>, triple: &[String]) -> DmResult<Class> {
    // `sscanf("%llu%c")` for the sector, `kstrtouint` for the delay, as dm-delay.c reads them.
    let offset = sscanf::llu(&triple[1]).map(Sectors).ok_or_else(|| invalid!("delay: Invalid device sector"))?;
    let delay_ms = sscanf::kstrtouint(&triple[2]).ok_or_else(|| invalid!("delay: Invalid delay"))?;
    let dev = ctx.get_device(&triple[0]).map_err(|e| match e {
        DmError::Invalid(_) => invalid!("delay: Device lookup failed"),
        other => other,
    })?;
    Ok(Class { dev, offset, delay_ms })
}

/// 3 words: one triple for every class; 6: read, then write and flush share the second triple;
/// 9: one triple each (more-targets.md §2.1).
fn ctor(ctx: &mut CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Box<dyn Target>> {
    if !matches!(argv.len(), 3 | 6 | 9) {
        return Err(invalid!("delay: Requires exactly 3, 6 or 9 arguments"));
    }
    let read = class(ctx, &argv[0..3])?;
    let (write, flush) = match argv.len() {
        3 => (class(ctx, &argv[0..3])?, class(ctx, &argv[0..3])?),
        6 => (class(ctx, &argv[3..6])?, class(ctx, &argv[3..6])?),
        _ => (class(ctx, &argv[3..6])?, class(ctx, &argv[6..9])?),
    };
    let queue = Queue { held: VecDeque::new(), queued: [0; 3], may_delay: true, timer: None };
    Ok(Box::new(Delay {
        classes: [read, write, flush],
        argc: argv.len(),
        shared: Arc::new(Shared { queue: Mutex::new(queue), services: ctx.services() }),
    }))
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes sure a timer fires by `at` (the kernel's `timer_reduce`): an armed timer that fires
    /// later is replaced.
    fn arm(self: &Arc<Self>, q: &mut Queue, at: Instant) {
        if q.timer.is_some_and(|(t, _)| t <= at) {
            return;
        }
        if let Some((_, id)) = q.timer.take() {
            // If it already fired, its scan finds nothing new to do; harmless.
            self.services.cancel(id);
        }
        let me = Arc::downgrade(self);
        let id = self.services.after(at.saturating_duration_since(Instant::now()), move || expired(&me));
        q.timer = Some((at, id));
    }

    /// Takes every held bio that is due (all of them with `all`), in queue order, and re-arms the
    /// timer for the earliest one left (the kernel's `flush_delayed_bios`). Bios of different
    /// classes expire out of arrival order, so the whole queue is scanned.
    fn take(self: &Arc<Self>, q: &mut Queue, all: bool) -> Vec<Bio> {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut next: Option<Instant> = None;
        for h in std::mem::take(&mut q.held) {
            if all || h.expires <= now {
                q.queued[h.class] -= 1;
                out.push(h.bio);
            } else {
                next = Some(next.map_or(h.expires, |n| n.min(h.expires)));
                q.held.push_back(h);
            }
        }
        if let Some(at) = next {
            self.arm(q, at);
        }
        out
    }
}

/// The timer fired: issue what is due.
fn expired(shared: &Weak<Shared>) {
    let Some(s) = shared.upgrade() else { return };
    let due = {
        let mut q = s.lock();
        // The armed timer is due, so it is this one (or fires next with nothing to do): forget it,
        // so what is left re-arms a timer of its own.
        if q.timer.is_some_and(|(at, _)| at <= Instant::now()) {
            q.timer = None;
        }
        s.take(&mut q, false)
    };
    // Already on a worker thread: submit here, in queue order.
    due.into_iter().for_each(|b| s.services.submit(b));
}

impl Drop for Shared {
    fn drop(&mut self) {
        let timer = self.queue.get_mut().unwrap_or_else(|p| p.into_inner()).timer.take();
        if let Some((_, id)) = timer {
            self.services.cancel(id);
        }
    }
}

/// The class of a bio (more-targets.md §2.1): an empty flush (`REQ_PREFLUSH` in the kernel) →
/// flush; any other write-direction bio (write, discard, write-zeroes) → write; reads → read.
fn class_of(op: Op) -> usize {
    match op {
        Op::Read => READ,
        Op::Flush => FLUSH,
        Op::Write | Op::Discard | Op::WriteZeroes => WRITE,
    }
}

impl Target for Delay {
    /// INFO: bios held now per class; TABLE: the original line's shape, devices as
    /// `major:minor`; IMA: empty (more-targets.md §2.3).
    fn status(&self, kind: StatusType, _noflush: bool) -> String {
        match kind {
            StatusType::Info => {
                let [r, w, f] = self.shared.lock().queued;
                format!("{r} {w} {f}")
            }
            StatusType::Table => self.classes[..self.argc / 3]
                .iter()
                .map(|c| format!("{} {} {}", c.dev.dev, c.offset, c.delay_ms))
                .collect::<Vec<_>>()
                .join(" "),
            StatusType::Ima => String::new(),
        }
    }

    /// Every class's area, duplicates included, as the kernel reports them.
    fn iterate_devices(&self, len: Sectors, f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors)) {
        for c in &self.classes {
            f(&c.dev, c.offset, len);
        }
    }

    /// One flush bio and one discard bio, as the kernel sets them; no `num_write_zeroes_bios`,
    /// so write-zeroes reach this target as written zeroes (delayed as writes). Held bios need
    /// their payload in memory (no pipes), and `map` may hold a bio (no nowait).
    fn features(&self) -> Features {
        Features {
            flush_bios: 1,
            discard_bios: 1,
            write_zeroes_bios: 0,
            max_io_len: None,
            end_io: false,
            nowait: false,
            pipes: false,
        }
    }

    /// Remaps to the class's device first (as the kernel does), then holds the bio unless the
    /// class has no delay or delaying is off (more-targets.md §2.2).
    fn map(&self, mut bio: Bio) -> Map {
        let k = class_of(bio.op());
        let c = &self.classes[k];
        if bio.remap_offset(&c.dev, c.offset).is_none() {
            return Map::Kill(bio);
        }
        if c.delay_ms == 0 {
            return Map::Remapped(bio);
        }
        let expires = Instant::now() + Duration::from_millis(c.delay_ms.into());
        let mut q = self.shared.lock();
        if !q.may_delay {
            return Map::Remapped(bio);
        }
        q.queued[k] += 1;
        q.held.push_back(Held { expires, class: k, bio });
        self.shared.arm(&mut q, expires);
        Map::Submitted
    }

    /// Block status follows the read class (the class a read of the area would go to).
    fn query(&self, offset: Sectors, len: Sectors) -> Mapping<'_> {
        let c = &self.classes[READ];
        match c.offset.0.checked_add(offset.0) {
            Some(at) => Mapping::Remap { dev: &c.dev, at: Sectors(at), len },
            None => Mapping::Opaque(len),
        }
    }

    /// Delaying off, and everything held issued now without waiting for expiry, so the suspend's
    /// drain finds it completing (more-targets.md §2.2). Issued from a worker, in queue order:
    /// this runs under the engine's lock, and a bio to a suspended device below would wait there.
    fn presuspend(&self, _noflush: bool) {
        let held = {
            let mut q = self.shared.lock();
            q.may_delay = false;
            if let Some((_, id)) = q.timer.take() {
                self.shared.services.cancel(id);
            }
            self.shared.take(&mut q, true)
        };
        if !held.is_empty() {
            let services = self.shared.services.clone();
            self.shared.services.queue_work(move || held.into_iter().for_each(|b| services.submit(b)));
        }
    }

    // No `presuspend_undo`, as in the kernel: after an interrupted suspend delaying stays off
    // until the next resume.

    fn resume(&self) {
        self.shared.lock().may_delay = true;
    }
}

#[cfg(test)]
mod tests;
