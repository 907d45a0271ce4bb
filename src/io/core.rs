//! The dm core's IO path (the kernel's `dm.c`): a bio enters a device through its suspend gate, is
//! split at target boundaries and `max_io_len` units, each piece is mapped by its target, and
//! remapped bios go on to files, block devices or other dmemu devices. Completion unwinds the
//! bio's frames: target `end_io`s, device accounting, joins of split bios, the submitter.
//!
//! **Submission is flattened** (the kernel's `current->bio_list`): a thread that submits while it
//! is already submitting only pushes the work onto its own list, and the outermost call runs the
//! list. So a stack of a thousand devices costs heap, not stack. The list is a stack, taken depth
//! first, so the pieces of a bio reach the files in order (a piped payload is consumed in order).

use crate::dm::stats::StatsTicket;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::bio::{Bio, BioFlags, Buf, Op, Private};
use super::{DataPlane, DeviceIo, IoError, IoResult, Pass, Waiter};
use crate::dm::pdev::PdevKind;
use crate::dm::table::Table;
use crate::dm::target::{EndIo, Map};

/// One step of a bio's completion, pushed as it goes down and run in reverse as it completes.
pub(crate) enum Frame {
    /// The bottom of a submitted bio: who hears the result.
    Submitter(Completion),
    /// The bottom of a piece of a split bio: its join.
    Child(Arc<Join>),
    /// The bio entered a device: its pass through the gate, and where it was on that device (a
    /// requeued bio is resubmitted from there).
    Device(Entry),
    /// A target with `end_io` remapped the bio.
    Target(TargetFrame),
}

pub(crate) enum Completion {
    /// A thread waits for it (the synchronous API).
    Sync(Arc<Waiter>),
    /// Called with the bio and its result, on whatever thread completes it.
    Call(Box<dyn FnOnce(Bio, IoResult) + Send>),
}

pub(crate) struct Entry {
    pub(crate) pass: Pass,
    sector: u64,
    sectors: u64,
    /// dmstats bookkeeping of this IO, when the device has regions.
    ticket: Option<StatsTicket>,
}

pub(crate) struct TargetFrame {
    table: Arc<Table>,
    index: usize,
    /// The bio's sector as the target mapped it (relative to the target's start).
    sector: u64,
    private: Option<Private>,
}

/// A bio split into pieces: the parent waits here until the last piece completes.
pub(crate) struct Join {
    remaining: AtomicUsize,
    /// The first error, with a requeue taking precedence (the whole IO is then requeued).
    status: Mutex<IoResult>,
    parent: Mutex<Option<Bio>>,
}

impl Join {
    #[cfg(test)]
    fn new_empty() -> Arc<Join> {
        Arc::new(Join { remaining: AtomicUsize::new(0), status: Mutex::new(Ok(())), parent: Mutex::new(None) })
    }

    fn new(parent: Bio, pieces: usize) -> Arc<Join> {
        Arc::new(Join {
            remaining: AtomicUsize::new(pieces),
            status: Mutex::new(Ok(())),
            parent: Mutex::new(Some(parent)),
        })
    }

    /// Records a piece's result; the parent and the joint result once it was the last.
    fn piece_done(&self, r: IoResult) -> Option<(Bio, IoResult)> {
        if let Err(e) = r {
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            if s.is_ok() || e == IoError::Requeue {
                *s = Err(e);
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        let parent = self.parent.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        let status = *self.status.lock().unwrap_or_else(|p| p.into_inner());
        Some((parent, status))
    }
}

/// Work on the submitting thread's list.
pub(crate) enum Work {
    /// A bio addressed to a dmemu device: enters its gate.
    Device(Arc<DeviceIo>, Bio),
    /// A piece for target `index` of `table`, its sector relative to the target.
    Map(Arc<Table>, usize, Bio),
    /// A bio a target remapped (to a file, a block device or a dmemu device).
    Remapped(Bio),
    /// An empty flush through every target of a table, outside its device's gate (a suspend that
    /// closed the gate flushes this way).
    Flush(Arc<Table>, Bio),
}

thread_local! {
    /// The work this thread is running, when it is inside a submission.
    static PENDING: RefCell<Option<Vec<Work>>> = const { RefCell::new(None) };
}

/// Submits work. Inside a submission on this thread it only joins the list; otherwise this call
/// runs the list until it is empty.
pub(crate) fn submit(plane: &DataPlane, w: Work) {
    let nested = PENDING.with(|p| match &mut *p.borrow_mut() {
        Some(list) => {
            list.push(w);
            None
        }
        none => {
            *none = Some(Vec::new());
            Some(w)
        }
    });
    let Some(first) = nested else { return };
    run(plane, first);
    drain(plane);
    PENDING.with(|p| *p.borrow_mut() = None);
}

/// Submits work on a list of its own and returns when that list is empty, even inside another
/// submission on this thread (a synchronous wait there would otherwise wait for work queued
/// behind itself).
pub(crate) fn submit_isolated(plane: &DataPlane, w: Work) {
    let outer = PENDING.with(|p| p.borrow_mut().replace(Vec::new()));
    run(plane, w);
    drain(plane);
    PENDING.with(|p| *p.borrow_mut() = outer);
}

fn drain(plane: &DataPlane) {
    while let Some(w) = PENDING.with(|p| p.borrow_mut().as_mut().and_then(Vec::pop)) {
        run(plane, w);
    }
}

fn push_all(mut ws: Vec<Work>) {
    // Reversed onto the stack, so the first piece runs first.
    ws.reverse();
    PENDING.with(|p| p.borrow_mut().as_mut().expect("inside a submission").extend(ws));
}

fn run(plane: &DataPlane, w: Work) {
    match w {
        Work::Device(dev, bio) => enter(plane, dev, bio),
        Work::Map(table, i, bio) => map(plane, table, i, bio),
        Work::Remapped(bio) => remapped(plane, bio),
        Work::Flush(table, bio) => split(plane, table, bio),
    }
}

/// A bio arrives at a device: gate, checks, split, map.
fn enter(plane: &DataPlane, dev: Arc<DeviceIo>, mut bio: Bio) {
    let nowait = bio.0.flags.contains(BioFlags::NOWAIT);
    let pass = match dev.enter(!nowait) {
        Ok(p) => p,
        Err(e) => return bio.end(Err(e)),
    };
    let table = pass.table.clone();
    let size = table.size().0;
    if bio.0.sector.checked_add(bio.0.sectors).is_none_or(|end| end > size) {
        tracing::debug!("dm-{}: {bio:?} beyond the end of the device ({size} sectors)", dev.minor);
        drop(pass);
        return bio.end(Err(IoError::Failed));
    }
    if pass.read_only && bio.0.op.is_write() && bio.0.op != Op::Flush {
        drop(pass);
        return bio.end(Err(IoError::ReadOnly));
    }
    if nowait {
        if !pass.nowait {
            // A table with a target that may hold IO takes no REQ_NOWAIT IO (the kernel's
            // `dm_table_supports_nowait`).
            drop(pass);
            return bio.end(Err(IoError::WouldBlock));
        }
        if bio.0.op.is_write() {
            // Past the first gate a write waits like any other: it may already be consuming a
            // piped payload, which a retry could not redo. Reads stay NOWAIT all the way down.
            bio.0.flags.remove(BioFlags::NOWAIT);
        }
    }
    let (sector, sectors) = (bio.0.sector, bio.0.sectors);
    let ticket = pass.stats.as_ref().map(|s| s.start(bio.0.op.is_write(), sector, sectors));
    bio.0.frames.push(Frame::Device(Entry { pass, sector, sectors, ticket }));
    split(plane, table, bio);
}

/// Splits a bio that entered a device into the pieces its targets take, and maps them.
fn split(plane: &DataPlane, table: Arc<Table>, mut bio: Bio) {
    let targets = table.targets();
    if bio.0.op == Op::Flush {
        // Every target gets its `num_flush_bios` empty flushes.
        let n: usize = targets.iter().map(|t| t.features.flush_bios as usize).sum();
        if n == 0 {
            return bio.end(Ok(()));
        }
        let flags = bio.0.flags;
        let join = Join::new(bio, n);
        let mut work = Vec::with_capacity(n);
        for (i, t) in targets.iter().enumerate() {
            for k in 0..t.features.flush_bios {
                let mut clone = Bio::new(Op::Flush, flags, 0, 0, Buf::None, Frame::Child(join.clone()));
                clone.0.clone_index = k;
                work.push(Work::Map(table.clone(), i, clone));
            }
        }
        return push_all(work);
    }
    // The pieces: (target index, sector relative to the target, offset into the bio, length),
    // discards and write-zeroes once per `num_*_bios`.
    let mut pieces = Vec::new();
    let (mut at, end) = (bio.0.sector, bio.0.sector + bio.0.sectors);
    let Some(mut i) = table.find_index(crate::dm::Sectors(at)) else {
        return bio.end(Err(IoError::Failed));
    };
    while at < end {
        let t = &targets[i];
        let within = at - t.start.0;
        let mut n = (t.len.0 - within).min(end - at);
        if let Some(unit) = t.features.max_io_len.filter(|&u| u > 0) {
            n = n.min(unit - within % unit);
        }
        let copies = match bio.0.op {
            Op::Discard => t.features.discard_bios,
            Op::WriteZeroes => t.features.write_zeroes_bios,
            _ => 1,
        };
        if copies == 0 {
            // A discard or write-zeroes this target cannot take (`__process_abnormal_io`).
            return bio.end(Err(IoError::NotSupported));
        }
        for k in 0..copies {
            pieces.push((i, within, at - bio.0.sector, n, k));
        }
        at += n;
        if at == t.start.0 + t.len.0 {
            i += 1;
        }
    }
    if let [(i, within, 0, _, _)] = pieces[..] {
        // The common case: one target takes all of it, no join needed.
        bio.0.sector = within;
        return map(plane, table, i, bio);
    }
    // The pieces are cut before the parent moves into the join: its data stays where it is.
    let join = Arc::new(Join {
        remaining: AtomicUsize::new(pieces.len()),
        status: Mutex::new(Ok(())),
        parent: Mutex::new(None),
    });
    let mut work = Vec::with_capacity(pieces.len());
    for &(i, within, offset, n, k) in &pieces {
        let mut c = bio.child(offset, n, Frame::Child(join.clone()));
        c.0.sector = within;
        c.0.clone_index = k;
        work.push(Work::Map(table.clone(), i, c));
    }
    *join.parent.lock().unwrap_or_else(|p| p.into_inner()) = Some(bio);
    push_all(work);
}

/// A target maps one piece.
fn map(plane: &DataPlane, table: Arc<Table>, i: usize, mut bio: Bio) {
    let t = &table.targets()[i];
    if bio.is_piped() && !t.features.pipes {
        if let Err(e) = bio.materialize() {
            return bio.end(Err(e));
        }
    }
    if t.features.end_io {
        let sector = bio.0.sector;
        bio.0.frames.push(Frame::Target(TargetFrame { table: table.clone(), index: i, sector, private: None }));
    }
    match t.target.map(bio) {
        Map::Remapped(b) => remapped(plane, b),
        Map::Submitted => {}
        Map::Requeue(b) => b.end(Err(IoError::Requeue)),
        Map::Kill(b) => b.end(Err(IoError::Failed)),
    }
}

/// A remapped bio goes on: another dmemu device through its gate (on the list), a file now. Runs
/// inside a submission ([`submit`] with [`Work::Remapped`] from anywhere else).
fn remapped(plane: &DataPlane, mut bio: Bio) {
    let private = bio.0.private.take();
    if let Some(tf) = bio.0.reentry.take() {
        // A bio a target kept in `end_io` and sends again: its `end_io` sees this try too.
        bio.0.frames.push(Frame::Target(tf));
    }
    if let Some(Frame::Target(tf)) = bio.0.frames.last_mut() {
        // What `map` left for `end_io` waits in the target's frame, out of the way of the
        // targets below.
        tf.private = private;
    }
    let Some(pdev) = bio.0.dev.take() else {
        tracing::error!("{bio:?} remapped to no device");
        return bio.end(Err(IoError::Failed));
    };
    match pdev.kind {
        // On the list, not here: the device's own pieces would otherwise recurse.
        PdevKind::Dm { minor } => match plane.device(minor) {
            Some(lower) => push_all(vec![Work::Device(lower, bio)]),
            None => bio.end(Err(IoError::NoDevice)),
        },
        _ => match DataPlane::file(&pdev) {
            Ok(f) => super::leaf::execute(f, bio),
            Err(e) => bio.end(Err(e)),
        },
    }
}

/// Runs a bio's completion: its frames from the top down, until one keeps it or the submitter has
/// it. Iterative, so a deep stack of devices costs no stack.
pub(crate) fn complete(mut bio: Bio, mut res: IoResult) {
    loop {
        let Some(frame) = bio.0.frames.pop() else {
            tracing::error!("{bio:?} completed twice");
            return;
        };
        match frame {
            Frame::Target(tf) => {
                bio.0.private = tf.private;
                bio.0.sector = tf.sector;
                bio.0.dev = None;
                let table = tf.table.clone();
                bio.0.reentry = Some(TargetFrame { private: None, ..tf });
                match table.targets()[tf.index].target.end_io(bio, res) {
                    EndIo::Done(mut b, r) => {
                        b.0.reentry = None;
                        (bio, res) = (b, r)
                    }
                    EndIo::Incomplete => return,
                    EndIo::Requeue(mut b) => {
                        b.0.reentry = None;
                        (bio, res) = (b, Err(IoError::Requeue))
                    }
                }
            }
            Frame::Device(e) => {
                bio.0.reentry = None;
                bio.0.sector = e.sector;
                bio.0.sectors = e.sectors;
                bio.0.dev = None;
                bio.0.private = None;
                if let (Some(t), Some(s)) = (e.ticket, &e.pass.stats) {
                    s.end(t);
                }
                if res == Err(IoError::Requeue) {
                    let dev = e.pass.dev.clone();
                    drop(e);
                    match dev.requeue(bio) {
                        None => return,
                        // Not in a noflush suspend: the IO fails (the kernel's rule).
                        Some(b) => (bio, res) = (b, Err(IoError::Failed)),
                    }
                } else {
                    drop(e);
                }
            }
            Frame::Child(join) => {
                drop(bio);
                match join.piece_done(res) {
                    Some((p, r)) => (bio, res) = (p, r),
                    None => return,
                }
            }
            Frame::Submitter(c) => {
                if res == Err(IoError::Requeue) {
                    res = Err(IoError::Failed);
                }
                match c {
                    Completion::Sync(w) => {
                        drop(bio);
                        w.done(res)
                    }
                    Completion::Call(f) => f(bio, res),
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The "completed exactly once" rule: a dropped bio fails with EIO, a split bio completes
    //! once after its last piece, requeued IO waits for the resume only in a noflush suspend.

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU32};

    use super::*;
    use crate::dm::command::TargetSpec;
    use crate::dm::pdev::PdevRegistry;
    use crate::dm::target::{BuildEnv, CtorCtx, Features, Target, TargetRegistry, TargetType};
    use crate::dm::{DmResult, Sectors, StatusType};

    /// How often a completion ran, and its last result.
    type Seen = Arc<(AtomicU32, Mutex<Option<IoResult>>)>;

    /// A completion that counts its calls and keeps the last result.
    fn counted() -> (Seen, Completion) {
        let seen = Arc::new((AtomicU32::new(0), Mutex::new(None)));
        let s = seen.clone();
        (
            seen,
            Completion::Call(Box::new(move |_, r| {
                s.0.fetch_add(1, Ordering::SeqCst);
                *s.1.lock().unwrap() = Some(r);
            })),
        )
    }

    #[test]
    fn a_dropped_bio_fails_once_with_eio() {
        let (seen, c) = counted();
        let bio = Bio::new(Op::Read, BioFlags::empty(), 0, 1, Buf::Owned(vec![0; 512]), Frame::Submitter(c));
        drop(bio);
        assert_eq!(seen.0.load(Ordering::SeqCst), 1);
        assert_eq!(*seen.1.lock().unwrap(), Some(Err(IoError::Failed)));
    }

    #[test]
    fn a_split_bio_completes_once_after_its_last_piece_with_the_first_error() {
        let (seen, c) = counted();
        let mut parent = Bio::new(Op::Read, BioFlags::empty(), 0, 3, Buf::Owned(vec![0; 1536]), Frame::Submitter(c));
        let join = Join::new_empty();
        join.remaining.store(3, Ordering::SeqCst);
        let mut pieces: Vec<Bio> = (0..3).map(|i| parent.child(i, 1, Frame::Child(join.clone()))).collect();
        // The pieces write into the parent's buffer.
        for (i, p) in pieces.iter_mut().enumerate() {
            p.data_mut().unwrap().fill(i as u8 + 1);
        }
        *join.parent.lock().unwrap() = Some(parent);
        let third = pieces.pop().unwrap();
        let second = pieces.pop().unwrap();
        let first = pieces.pop().unwrap();
        second.end(Err(IoError::NotSupported));
        assert_eq!(seen.0.load(Ordering::SeqCst), 0);
        third.end(Err(IoError::Failed));
        assert_eq!(seen.0.load(Ordering::SeqCst), 0);
        first.end(Ok(()));
        assert_eq!(seen.0.load(Ordering::SeqCst), 1);
        assert_eq!(*seen.1.lock().unwrap(), Some(Err(IoError::NotSupported)));
    }

    #[test]
    fn a_dropped_piece_fails_its_parent_once() {
        let (seen, c) = counted();
        let mut parent = Bio::new(Op::Write, BioFlags::empty(), 0, 2, Buf::Owned(vec![7; 1024]), Frame::Submitter(c));
        let join = Join::new_empty();
        let a = parent.child(0, 1, Frame::Child(join.clone()));
        let b = parent.child(1, 1, Frame::Child(join.clone()));
        join.remaining.store(2, Ordering::SeqCst);
        *join.parent.lock().unwrap() = Some(parent);
        a.end(Ok(()));
        drop(b);
        assert_eq!(seen.0.load(Ordering::SeqCst), 1);
        assert_eq!(*seen.1.lock().unwrap(), Some(Err(IoError::Failed)));
    }

    /// Requeues every bio it maps while `requeue` is set, passes the rest as zeroes.
    struct Requeuer {
        requeue: Arc<AtomicBool>,
    }
    impl Target for Requeuer {
        fn status(&self, _: StatusType, _: bool) -> String {
            String::new()
        }
        fn iterate_devices(&self, _: Sectors, _: &mut dyn FnMut(&Arc<crate::dm::pdev::Pdev>, Sectors, Sectors)) {}
        fn features(&self) -> Features {
            Features { flush_bios: 0, ..Features::default() }
        }
        fn map(&self, mut bio: Bio) -> Map {
            if self.requeue.load(Ordering::SeqCst) {
                return Map::Requeue(bio);
            }
            let r = bio.zero_fill();
            bio.end(r);
            Map::Submitted
        }
    }

    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    fn requeuer_ctor(_: &mut CtorCtx<'_, '_>, _: &[String]) -> DmResult<Box<dyn Target>> {
        Ok(Box::new(Requeuer { requeue: FLAG.get_or_init(Default::default).clone() }))
    }
    static REQUEUER: TargetType = TargetType {
        name: "requeuer",
        version: [1, 0, 0],
        ctor: requeuer_ctor,
        flags: crate::dm::target::TypeFlags::empty(),
    };

    struct NoFiles;
    impl crate::dm::pdev::DeviceResolver for NoFiles {
        fn resolve_path(&self, p: &str, _: bool) -> DmResult<crate::dm::pdev::Resolved> {
            Err(crate::dm::DmError::NoSuchBlockDevice(p.into()))
        }
        fn resolve_block(&self, d: crate::dm::DevNum, _: bool) -> DmResult<crate::dm::pdev::Resolved> {
            Err(crate::dm::DmError::NoSuchBlockDevice(d.to_string()))
        }
    }

    fn device_with(plane: &DataPlane, ty: &'static TargetType) -> Arc<DeviceIo> {
        let mut reg = TargetRegistry::default();
        reg.register(ty);
        let mut pdevs = PdevRegistry::new(252, 251);
        let mut env = BuildEnv {
            self_minor: 0,
            pdevs: &mut pdevs,
            resolver: &NoFiles,
            dm_by_name: &|_| None,
            dm_exists: &|_| false,
            cache: HashMap::new(),
            plane: plane.clone(),
            table_id: 0,
        };
        let spec =
            TargetSpec { start: Sectors(0), length: Sectors(8), target_type: ty.name.into(), params: String::new() };
        let table = Table::build(&[spec], false, &reg, &mut env).unwrap();
        plane.publish(0, "t", Some(Arc::new(table)), false, false);
        plane.device(0).unwrap()
    }

    fn read(plane: &DataPlane, dev: &Arc<DeviceIo>) -> Arc<Waiter> {
        let w = Arc::new(Waiter::default());
        let bio = Bio::new(
            Op::Read,
            BioFlags::empty(),
            0,
            1,
            Buf::Owned(vec![1; 512]),
            Frame::Submitter(Completion::Sync(w.clone())),
        );
        submit(plane, Work::Device(dev.clone(), bio));
        w
    }

    #[test]
    fn requeued_io_fails_outside_a_noflush_suspend_and_waits_for_the_resume_inside_one() {
        let plane = DataPlane::detached();
        let dev = device_with(&plane, &REQUEUER);
        let flag = FLAG.get_or_init(Default::default).clone();
        flag.store(true, Ordering::SeqCst);
        assert_eq!(read(&plane, &dev).wait(), Err(IoError::Failed), "no noflush suspend: EIO");
        // A noflush suspend under way: the requeued read is held (not in flight), the suspend
        // completes, and the resume runs it again.
        dev.state().noflush = true;
        let w = read(&plane, &dev);
        assert!(plane.drain(0, true, &mut || false), "held IO does not keep the suspend waiting");
        assert_eq!(dev.requeued.lock().unwrap().len(), 1);
        flag.store(false, Ordering::SeqCst);
        let table = dev.state().table.clone();
        plane.publish(0, "t", table, false, false);
        assert_eq!(w.wait(), Ok(()));
    }
}
