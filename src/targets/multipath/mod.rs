//! `multipath` 1.15.0 (linux-dm-abi.md §4, the kernel's `dm-mpath.c`) with seed 004's
//! hardware-handler hooks ([`handler`]) and the kernel's path selectors ([`selector`]).
//!
//! Paths are grouped into priority groups, numbered from 1 in table order; IO goes to one group
//! at a time, and that group's selector picks a path per IO. A failed IO fails its path (unless
//! the handler decides otherwise) and is retried on another; with no usable path left, IO is held
//! in the target (`queue_if_no_path`) or fails. With a hardware handler, switching groups first
//! activates the new group's paths (`pg_init`), IO queued until that completes.
//!
//! IO is never held on a thread: held bios wait in [`State::queued`], released by the events that
//! can change the answer (a path reinstated, an activation finished, queueing turned off). The
//! state machine follows `dm-mpath.c`'s flags one for one (`MPATHF_*` → [`State`]'s fields).
//! Unlike the kernel, request-based tables may name bio-based (dmemu) devices as paths: the issue
//! that asked for this target wants dmemu devices (flakey, error layers) as paths, and dmemu's IO
//! path is the same for both kinds.

pub mod handler;
pub mod selector;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use self::handler::{ErrRequest, HandlerCtx, HwHandler, MpFlags, PathRef, PgInitOutcome};
use self::selector::{now_ns, PathSelector};
use crate::dm::pdev::Pdev;
use crate::dm::target::{CtorCtx, EndIo, Features, Map, Mapping, Target, TargetType, TypeFlags};
use crate::dm::{DevNum, DmError, DmResult, Sectors, StatusType};
use crate::invalid;
use crate::io::{Bio, BioFlags, IoError, IoResult, Op, Region, Services};

pub static TYPE: TargetType = TargetType {
    name: "multipath",
    version: [1, 15, 0],
    ctor,
    flags: TypeFlags::SINGLETON.union(TypeFlags::IMMUTABLE),
};

/// The retry delay when `pg_init_delay_msecs` is not set (`DM_PG_INIT_DELAY_MSECS`).
const PG_INIT_DELAY_DEFAULT_MS: u32 = 2000;

struct Path {
    dev: Arc<Pdev>,
    active: bool,
    /// Transitions to failed, ever.
    fail_count: u32,
}

struct Group {
    selector: Box<dyn PathSelector>,
    paths: Vec<Path>,
    /// Temporarily avoided (`disable_group`, a handler's `MP_BYPASS_PG`).
    bypassed: bool,
}

/// (group index, path index), both from 0.
type PathAt = (usize, usize);

/// The mutable state, under one lock (the kernel's `m->lock` and `m->flags`).
struct State {
    groups: Vec<Group>,
    current_pg: Option<usize>,
    current_path: Option<PathAt>,
    /// Switch to this group at the next path choice (`switch_group`, the initial group).
    next_pg: Option<usize>,
    nr_valid_paths: usize,
    /// `MPATHF_QUEUE_IO`: hold all IO (no group chosen yet, or its activation is under way).
    queue_io: bool,
    /// `MPATHF_QUEUE_IF_NO_PATH` and its saved copy across a suspend.
    queue_if_no_path: bool,
    saved_queue_if_no_path: bool,
    /// `MPATHF_PG_INIT_REQUIRED`, `_DISABLED`, `_DELAY_RETRY`.
    pg_init_required: bool,
    pg_init_disabled: bool,
    pg_init_delay_retry: bool,
    pg_init_in_progress: u32,
    /// Activations of the current group (INFO field 3); reset when the group changes.
    pg_init_count: u32,
    /// Held IO, in arrival order.
    queued: VecDeque<Bio>,
    /// A worker is about to run [`Shared::process_queued`].
    process_scheduled: bool,
    /// Between postsuspend and resume (`dm_suspended`): messages are refused.
    suspended: bool,
    /// Between a noflush presuspend and the end of that suspend (`dm_noflush_suspending`).
    noflush_suspending: bool,
}

/// What the table line fixed.
struct Config {
    /// `queue_mode bio`: no hardware handler, `retain_attached_hw_handler` forced.
    bio_mode: bool,
    retain_attached_hw_handler: bool,
    pg_init_retries: u32,
    pg_init_delay_msecs: Option<u32>,
    handler: Option<Arc<dyn HwHandler>>,
}

struct Shared {
    state: Mutex<State>,
    config: Config,
    services: Services,
    /// Itself, for work items scheduled from `&self` methods.
    me: Weak<Shared>,
}

/// Carried from `map` to `end_io` (the kernel's `struct dm_mpath_io`).
struct MpIo {
    at: PathAt,
    nr_bytes: u64,
    start_ns: u64,
}

pub struct Multipath {
    shared: Arc<Shared>,
}

/// What to do with one bio, decided under the lock and done after it (the kernel's
/// `__map_bio` outcomes).
enum Route {
    Remap(PathAt, Arc<Pdev>),
    /// Held in the queue (or, for `REQ_NOWAIT` IO, to be answered EAGAIN).
    Held,
    Requeue,
    Kill,
}

/// Activations to start once the lock is released: (path, delay).
type Activations = Vec<(PathAt, u32)>;

// ---------------------------------------------------------------------------------------------
// Constructor (`multipath_ctr`): features, hardware handler, groups.
// ---------------------------------------------------------------------------------------------

/// The words of a table line, consumed from the front (`struct dm_arg_set`).
struct Args<'a> {
    words: &'a [String],
}

impl<'a> Args<'a> {
    fn shift(&mut self) -> Option<&'a String> {
        let (first, rest) = self.words.split_first()?;
        self.words = rest;
        Some(first)
    }
    /// `dm_read_arg`: a decimal number within `[min, max]`, else EINVAL with `error`.
    fn read(&mut self, min: u32, max: u32, error: &str) -> DmResult<u32> {
        let v = self.shift().and_then(|w| crate::targets::sscanf::u(w)).filter(|v| (min..=max).contains(v));
        v.ok_or_else(|| invalid!("{error}"))
    }
    /// `dm_read_arg_group`: a count that the remaining words must cover.
    fn read_group(&mut self, min: u32, max: u32, error: &str) -> DmResult<u32> {
        let n = self.read(min, max, error)?;
        if n as usize > self.words.len() {
            return Err(invalid!("Insufficient arguments"));
        }
        Ok(n)
    }
    fn take(&mut self, n: usize) -> &'a [String] {
        let (a, b) = self.words.split_at(n.min(self.words.len()));
        self.words = b;
        a
    }
}

struct Features0 {
    queue_if_no_path: bool,
    retain: bool,
    pg_init_retries: u32,
    pg_init_delay_msecs: Option<u32>,
    bio_mode: bool,
}

/// `parse_features`: names case-insensitive, unknown words EINVAL.
fn parse_features(a: &mut Args<'_>) -> DmResult<Features0> {
    let mut f = Features0 {
        queue_if_no_path: false,
        retain: false,
        pg_init_retries: 0,
        pg_init_delay_msecs: None,
        bio_mode: false,
    };
    let mut argc = a.read_group(0, 8, "invalid number of feature args")?;
    while argc > 0 {
        let name = a.shift().map(|s| s.to_ascii_lowercase()).unwrap_or_default();
        argc -= 1;
        match name.as_str() {
            "queue_if_no_path" => f.queue_if_no_path = true,
            "retain_attached_hw_handler" => f.retain = true,
            "pg_init_retries" if argc >= 1 => {
                f.pg_init_retries = a.read(1, 50, "pg_init_retries must be between 1 and 50")?;
                argc -= 1;
            }
            "pg_init_delay_msecs" if argc >= 1 => {
                f.pg_init_delay_msecs = Some(a.read(0, 60000, "pg_init_delay_msecs must be between 0 and 60000")?);
                argc -= 1;
            }
            "queue_mode" if argc >= 1 => {
                let mode = a.shift().map(|s| s.to_ascii_lowercase()).unwrap_or_default();
                argc -= 1;
                match mode.as_str() {
                    "bio" => f.bio_mode = true,
                    "rq" | "mq" => f.bio_mode = false,
                    _ => return Err(invalid!("Unknown 'queue_mode' requested")),
                }
            }
            _ => return Err(invalid!("Unrecognised multipath feature request")),
        }
    }
    if f.bio_mode {
        // bio-based multipath has no handler management; it only keeps what is attached.
        f.retain = true;
    }
    Ok(f)
}

fn ctor(ctx: &mut CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Box<dyn Target>> {
    let mut a = Args { words: argv };
    let f = parse_features(&mut a)?;
    let services = ctx.services();

    // `parse_hw_handler`: in bio mode the words are consumed and ignored.
    let hw_argc = a.read_group(0, 1024, "invalid number of hardware handler args")? as usize;
    let mut handler = None;
    if hw_argc > 0 {
        let words = a.take(hw_argc);
        if f.bio_mode {
            tracing::warn!("multipath: bio-based multipath doesn't allow hardware handler args");
        } else {
            let hctx = HandlerCtx { minor: ctx.env.self_minor, services: services.clone() };
            handler = Some(
                handler::create(&words[0], &words[1..], hctx)?
                    .ok_or_else(|| invalid!("error attaching hardware handler"))?,
            );
        }
    }

    let nr_groups = a.read(0, 1024, "invalid number of priority groups")? as usize;
    let initial = a.read(0, 1024, "invalid initial priority group number")? as usize;
    if (nr_groups == 0) != (initial == 0) {
        return Err(invalid!("invalid initial priority group"));
    }

    let mut groups = Vec::new();
    while !a.words.is_empty() {
        groups.push(parse_group(ctx, &mut a)?);
    }
    if groups.len() != nr_groups {
        return Err(invalid!("priority group count mismatch"));
    }
    let next_pg = initial.checked_sub(1).filter(|&i| i < groups.len());
    let state = State::new(groups, next_pg, f.queue_if_no_path);
    let config = Config {
        bio_mode: f.bio_mode,
        retain_attached_hw_handler: f.retain,
        pg_init_retries: f.pg_init_retries,
        pg_init_delay_msecs: f.pg_init_delay_msecs,
        handler,
    };
    let shared = Arc::new_cyclic(|me| Shared { state: Mutex::new(state), config, services, me: me.clone() });
    Ok(Box::new(Multipath { shared }))
}

/// `parse_priority_group`: selector, path count, per-path word count, paths.
fn parse_group(ctx: &mut CtorCtx<'_, '_>, a: &mut Args<'_>) -> DmResult<Group> {
    if a.words.len() < 2 {
        return Err(invalid!("not enough priority group arguments"));
    }
    // `parse_path_selector`.
    let name = a.shift().cloned().unwrap_or_default();
    if !selector_known(&name) {
        return Err(invalid!("unknown path selector type"));
    }
    let ps_argc = a.read_group(0, 1024, "invalid number of path selector args")? as usize;
    let ps_args = a.take(ps_argc);
    let mut sel = selector::create(&name, ps_args)
        .inspect_err(|e| tracing::info!("multipath: path selector constructor failed: {e}"))?
        .ok_or_else(|| invalid!("unknown path selector type"))?;

    let nr_paths = a.read(1, 1024, "invalid number of paths")? as usize;
    let nr_selector_args = a.read(0, 1024, "invalid number of selector args")? as usize;
    let mut paths = Vec::with_capacity(nr_paths);
    for i in 0..nr_paths {
        if a.words.len() < 1 + nr_selector_args {
            return Err(invalid!("not enough path parameters"));
        }
        let words = a.take(1 + nr_selector_args);
        let dev = ctx.get_device(&words[0]).map_err(|e| match e {
            DmError::Invalid(_) => invalid!("error getting device"),
            other => other,
        })?;
        sel.add_path(i, &words[1..])?;
        paths.push(Path { dev, active: true, fail_count: 0 });
    }
    Ok(Group { selector: sel, paths, bypassed: false })
}

/// The selectors [`selector::create`] builds (`dm_get_path_selector` finds them by name).
fn selector_known(name: &str) -> bool {
    matches!(name, "round-robin" | "queue-length" | "service-time" | "historical-service-time")
}

// ---------------------------------------------------------------------------------------------
// The state machine.
// ---------------------------------------------------------------------------------------------

impl State {
    /// Right after load: every path usable, no group chosen, IO queued until the first choice.
    fn new(groups: Vec<Group>, next_pg: Option<usize>, queue_if_no_path: bool) -> Self {
        let nr_valid_paths = groups.iter().map(|g| g.paths.len()).sum();
        State {
            groups,
            current_pg: None,
            current_path: None,
            next_pg,
            nr_valid_paths,
            queue_io: true,
            queue_if_no_path,
            saved_queue_if_no_path: queue_if_no_path,
            pg_init_required: false,
            pg_init_disabled: false,
            pg_init_delay_retry: false,
            pg_init_in_progress: 0,
            pg_init_count: 0,
            queued: VecDeque::new(),
            process_scheduled: false,
            suspended: false,
            noflush_suspending: false,
        }
    }

    /// A group's letter in INFO status: D(isabled, i.e. bypassed), A(ctive), E(nabled).
    fn group_state(&self, g: usize) -> char {
        if self.groups[g].bypassed {
            'D'
        } else if self.current_pg == Some(g) {
            'A'
        } else {
            'E'
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn has_handler(&self) -> bool {
        self.config.handler.is_some()
    }

    /// `__switch_pg`.
    fn switch_pg(&self, st: &mut State, g: usize) {
        st.current_pg = Some(g);
        let init = self.has_handler();
        st.pg_init_required = init;
        st.queue_io = init;
        st.pg_init_count = 0;
    }

    /// `choose_path_in_pg`.
    fn choose_path_in_pg(&self, st: &mut State, g: usize, nr_bytes: u64) -> Option<PathAt> {
        let p = st.groups[g].selector.select_path(nr_bytes, now_ns())?;
        if st.current_pg != Some(g) {
            st.current_path = Some((g, p));
            self.switch_pg(st, g);
        }
        Some((g, p))
    }

    /// `choose_pgpath`: the requested group, else the current one, else the first group with a
    /// usable path, bypassed groups last (and then with delayed activation retries).
    fn choose_pgpath(&self, st: &mut State, nr_bytes: u64) -> Option<PathAt> {
        if st.nr_valid_paths > 0 {
            if let Some(g) = st.next_pg.take() {
                if let Some(p) = self.choose_path_in_pg(st, g, nr_bytes) {
                    return Some(p);
                }
            }
            if let Some(g) = st.current_pg {
                if let Some(p) = self.choose_path_in_pg(st, g, nr_bytes) {
                    return Some(p);
                }
            }
            for bypassed in [false, true] {
                for g in 0..st.groups.len() {
                    if st.groups[g].bypassed != bypassed {
                        continue;
                    }
                    if let Some(p) = self.choose_path_in_pg(st, g, nr_bytes) {
                        if bypassed {
                            st.pg_init_delay_retry = true;
                        }
                        return Some(p);
                    }
                }
            }
        } else {
            st.queue_io = false;
        }
        st.current_path = None;
        st.current_pg = None;
        None
    }

    /// `__pg_init_all_paths`: activations of every active path of the current group.
    fn pg_init_all_paths(&self, st: &mut State) -> Activations {
        if st.pg_init_in_progress > 0 || st.pg_init_disabled {
            return Vec::new();
        }
        st.pg_init_count += 1;
        st.pg_init_required = false;
        let Some(g) = st.current_pg else { return Vec::new() };
        let delay = if st.pg_init_delay_retry {
            self.config.pg_init_delay_msecs.unwrap_or(PG_INIT_DELAY_DEFAULT_MS)
        } else {
            0
        };
        let acts: Activations =
            st.groups[g].paths.iter().enumerate().filter(|(_, p)| p.active).map(|(i, _)| ((g, i), delay)).collect();
        st.pg_init_in_progress += acts.len() as u32;
        acts
    }

    /// Decides where one bio goes (`__map_bio`). A bio that must wait is pushed on the queue
    /// unless `may_hold` is false (`REQ_NOWAIT`), in which case it is handed back as `Held`
    /// without being queued.
    fn route(&self, st: &mut State, nr_bytes: u64, acts: &mut Activations) -> Route {
        let mut at = st.current_path;
        if at.is_none() || !st.queue_io {
            at = self.choose_pgpath(st, nr_bytes);
        }
        match at {
            None if st.noflush_suspending => Route::Requeue,
            None if st.queue_if_no_path => Route::Held,
            None => Route::Kill,
            Some(_) if st.queue_io || st.pg_init_required => {
                acts.extend(self.pg_init_all_paths(st));
                Route::Held
            }
            Some((g, p)) => Route::Remap((g, p), st.groups[g].paths[p].dev.clone()),
        }
    }

    /// Sends a bio down the chosen path (`start_io` and the remap).
    fn send(&self, st: &mut State, mut bio: Bio, at: PathAt, dev: &Arc<Pdev>) -> Bio {
        let sector = bio.sector();
        let nr_bytes = bio.bytes();
        let now = now_ns();
        st.groups[at.0].selector.start_io(at.1, nr_bytes, now);
        bio.set_private(Box::new(MpIo { at, nr_bytes, start_ns: now }));
        // Paths are the whole device: the bio keeps its sector (the target is alone in its table).
        bio.remap(dev, sector);
        bio
    }

    /// Starts activations (outside the lock), each after its delay, on a worker.
    fn activate(self: &Arc<Self>, acts: Activations) {
        for (at, delay) in acts {
            let me = self.clone();
            let run = move || me.activate_path(at);
            if delay > 0 {
                self.services.after(Duration::from_millis(u64::from(delay)), run);
            } else {
                self.services.queue_work(run);
            }
        }
    }

    /// `activate_or_offline_path`: asks the handler to activate one path.
    fn activate_path(self: &Arc<Self>, at: PathAt) {
        let (active, path, bypassed) = {
            let st = self.lock();
            let g = &st.groups[at.0];
            (g.paths[at.1].active, PathRef { dev: g.paths[at.1].dev.dev, group: at.0 as u32 + 1 }, g.bypassed)
        };
        match (&self.config.handler, active) {
            (Some(h), true) => {
                // Weak: a table dropped while its handler still works on an activation goes away
                // (the handler then completes the request into nothing).
                let me = Arc::downgrade(self);
                h.pg_init(
                    path,
                    bypassed,
                    Box::new(move |outcome| {
                        if let Some(me) = me.upgrade() {
                            me.pg_init_done(at, outcome)
                        }
                    }),
                );
            }
            // A path that failed meanwhile is offline (`SCSI_DH_DEV_OFFLINED`).
            _ => self.pg_init_done(at, PgInitOutcome::Done(MpFlags::FAIL_PATH)),
        }
    }

    /// `pg_init_done` with seed 004's `dm_pg_init_complete` flags.
    fn pg_init_done(self: &Arc<Self>, at: PathAt, outcome: PgInitOutcome) {
        let mut st = self.lock();
        let (g, _) = at;
        let mut errors = false;
        let mut error_io = false;
        let mut delay_retry = false;
        match outcome {
            PgInitOutcome::Done(mut flags) => {
                // The seed insists on failing the path if its group is already bypassed, so an
                // activation that keeps failing cannot bounce between groups for ever.
                if !flags.is_empty() && st.groups[g].bypassed {
                    flags |= MpFlags::FAIL_PATH;
                }
                if flags.contains(MpFlags::FAIL_PATH) {
                    self.fail_path(&mut st, at);
                }
                if flags.contains(MpFlags::BYPASS_PG) {
                    self.bypass_pg(&mut st, g, true);
                }
                error_io = flags.contains(MpFlags::ERROR_IO);
                errors = !flags.is_empty();
            }
            PgInitOutcome::Retry { delayed } => {
                delay_retry = delayed;
                // `pg_init_limit_reached`.
                if st.pg_init_count <= self.config.pg_init_retries && !st.pg_init_disabled {
                    st.pg_init_required = true;
                } else {
                    self.fail_path(&mut st, at);
                }
            }
        }
        if errors {
            st.current_path = None;
            st.current_pg = None;
        } else if !st.pg_init_required {
            st.groups[g].bypassed = false;
        }
        st.pg_init_in_progress = st.pg_init_in_progress.saturating_sub(1);
        if st.pg_init_in_progress > 0 {
            return;
        }
        if st.pg_init_required {
            st.pg_init_delay_retry = delay_retry;
            let acts = self.pg_init_all_paths(&mut st);
            if !acts.is_empty() {
                drop(st);
                return self.activate(acts);
            }
        }
        st.queue_io = false;
        // MP_ERROR_IO on an activation fails the IO that was waiting for it.
        let failed: Vec<Bio> = if error_io { st.queued.drain(..).collect() } else { Vec::new() };
        self.schedule_process(&mut st);
        drop(st);
        for b in failed {
            b.end(Err(IoError::Failed));
        }
    }

    /// `fail_path`.
    fn fail_path(&self, st: &mut State, at: PathAt) {
        let (g, p) = at;
        if !st.groups[g].paths[p].active {
            return;
        }
        tracing::warn!("multipath: Failing path {}.", st.groups[g].paths[p].dev.dev);
        st.groups[g].selector.fail_path(p);
        let path = &mut st.groups[g].paths[p];
        path.active = false;
        path.fail_count = path.fail_count.saturating_add(1);
        st.nr_valid_paths -= 1;
        if st.current_path == Some(at) {
            st.current_path = None;
        }
        self.services.raise_event();
    }

    /// `reinstate_path`: activations to start (outside the lock) when the path joins the
    /// current group of a handler-managed table.
    fn reinstate_path(&self, st: &mut State, at: PathAt) -> DmResult<Activations> {
        let (g, p) = at;
        if st.groups[g].paths[p].active {
            return Ok(Vec::new());
        }
        tracing::warn!("multipath: Reinstating path {}.", st.groups[g].paths[p].dev.dev);
        st.groups[g].selector.reinstate_path(p)?;
        st.groups[g].paths[p].active = true;
        st.nr_valid_paths += 1;
        let mut acts = Vec::new();
        if st.nr_valid_paths == 1 {
            st.current_path = None;
            self.schedule_process(st);
        } else if self.has_handler() && st.current_pg == Some(g) {
            st.pg_init_in_progress += 1;
            acts.push((at, 0));
        }
        self.services.raise_event();
        Ok(acts)
    }

    /// `bypass_pg`.
    fn bypass_pg(&self, st: &mut State, g: usize, bypassed: bool) {
        st.groups[g].bypassed = bypassed;
        st.current_path = None;
        st.current_pg = None;
        self.services.raise_event();
    }

    /// `queue_if_no_path`: turning it off releases held IO (which then fails or is requeued).
    fn set_queue_if_no_path(&self, st: &mut State, on: bool, save_old: bool) {
        st.saved_queue_if_no_path = if save_old { st.queue_if_no_path } else { on };
        st.queue_if_no_path = on;
        if !on {
            self.schedule_process(st);
        }
    }

    /// Arranges for held IO to be looked at again on a worker (`process_queued_bios`).
    fn schedule_process(&self, st: &mut State) {
        if st.process_scheduled || st.queued.is_empty() {
            return;
        }
        st.process_scheduled = true;
        let me = self.me.clone();
        self.services.queue_work(move || {
            if let Some(me) = me.upgrade() {
                me.process_queued();
            }
        });
    }

    /// Routes every held bio again (`process_queued_bios`).
    fn process_queued(self: &Arc<Self>) {
        let mut acts = Vec::new();
        let mut out = Vec::new();
        {
            let mut st = self.lock();
            st.process_scheduled = false;
            let held: Vec<Bio> = st.queued.drain(..).collect();
            for bio in held {
                match self.route(&mut st, bio.bytes(), &mut acts) {
                    Route::Remap(at, dev) => out.push((self.send(&mut st, bio, at, &dev), Ok(()))),
                    Route::Held => st.queued.push_back(bio),
                    Route::Requeue => out.push((bio, Err(IoError::Requeue))),
                    Route::Kill => out.push((bio, Err(IoError::Failed))),
                }
            }
        }
        self.activate(acts);
        for (bio, r) in out {
            match r {
                Ok(()) => self.services.submit(bio),
                Err(e) => bio.end(Err(e)),
            }
        }
    }

    /// A failed IO's outcome, once decided: retry it, or end it.
    fn retry_or_fail(&self, st: &mut State, bio: Bio, err: IoError) -> Option<(Bio, IoResult)> {
        if st.nr_valid_paths == 0 && !st.queue_if_no_path {
            if st.noflush_suspending {
                return Some((bio, Err(IoError::Requeue)));
            }
            let e = if self.config.bio_mode { IoError::Failed } else { err };
            return Some((bio, Err(e)));
        }
        if bio.flags().contains(BioFlags::NOWAIT) {
            // Never kept: the submitter retries where it may wait.
            return Some((bio, Err(IoError::WouldBlock)));
        }
        st.queued.push_back(bio);
        if !st.queue_io {
            self.schedule_process(st);
        }
        None
    }

    /// Applies a handler's decision on a failed IO (`do_end_io` in seed 004).
    fn decided(&self, bio: Bio, at: PathAt, err: IoError, flags: MpFlags) -> Option<(Bio, IoResult)> {
        let mut st = self.lock();
        if flags.contains(MpFlags::FAIL_PATH) {
            self.fail_path(&mut st, at);
        }
        if flags.contains(MpFlags::BYPASS_PG) {
            self.bypass_pg(&mut st, at.0, true);
        }
        if flags.contains(MpFlags::ERROR_IO) {
            return Some((bio, Err(err)));
        }
        self.retry_or_fail(&mut st, bio, err)
    }
}

/// Errors that say nothing about the path: the submitter's own retry signals.
fn is_path_error(e: IoError) -> bool {
    !matches!(e, IoError::WouldBlock | IoError::Requeue)
}

// ---------------------------------------------------------------------------------------------
// The target interface.
// ---------------------------------------------------------------------------------------------

impl Multipath {
    /// The handle `DM_MPATH_PROBE_PATHS` uses once the engine's lock is released.
    pub fn probe_handle(&self) -> ProbeHandle {
        ProbeHandle(self.shared.clone())
    }

    fn status_info(&self, st: &State) -> String {
        let mut out = format!("2 {} {} ", u8::from(st.queue_io), st.pg_init_count);
        match self.shared.config.handler.as_ref().and_then(|h| h.status(StatusType::Info)) {
            Some(words) => out.push_str(&words),
            None => out.push_str("0 "),
        }
        out.push_str(&format!("{} {} ", st.groups.len(), pg_num(st)));
        for (gi, g) in st.groups.iter().enumerate() {
            let state = st.group_state(gi);
            out.push_str(&format!("{state} "));
            out.push_str(&g.selector.status(None, StatusType::Info));
            out.push_str(&format!("{} {} ", g.paths.len(), g.selector.info_args()));
            for (pi, p) in g.paths.iter().enumerate() {
                out.push_str(&format!("{} {} {} ", p.dev.dev, if p.active { 'A' } else { 'F' }, p.fail_count));
                out.push_str(&g.selector.status(Some(pi), StatusType::Info));
            }
        }
        out
    }

    fn status_table(&self, st: &State) -> String {
        let c = &self.shared.config;
        let mut words = Vec::new();
        if st.queue_if_no_path {
            words.push("queue_if_no_path".to_owned());
        }
        if c.pg_init_retries > 0 {
            words.push(format!("pg_init_retries {}", c.pg_init_retries));
        }
        if let Some(ms) = c.pg_init_delay_msecs {
            words.push(format!("pg_init_delay_msecs {ms}"));
        }
        if c.retain_attached_hw_handler {
            words.push("retain_attached_hw_handler".to_owned());
        }
        if c.bio_mode {
            words.push("queue_mode bio".to_owned());
        }
        let count: usize = words.iter().map(|w| w.split(' ').count()).sum();
        let mut out = format!("{count} ");
        for w in &words {
            out.push_str(w);
            out.push(' ');
        }
        match &c.handler {
            Some(h) => match h.status(StatusType::Table) {
                Some(words) => out.push_str(&words),
                None => out.push_str(&format!("1 {} ", h.name())),
            },
            None => out.push_str("0 "),
        }
        out.push_str(&format!("{} {} ", st.groups.len(), pg_num(st)));
        for g in &st.groups {
            out.push_str(g.selector.name());
            out.push(' ');
            out.push_str(&g.selector.status(None, StatusType::Table));
            out.push_str(&format!("{} {} ", g.paths.len(), g.selector.table_args()));
            for (pi, p) in g.paths.iter().enumerate() {
                out.push_str(&format!("{} ", p.dev.dev));
                out.push_str(&g.selector.status(Some(pi), StatusType::Table));
            }
        }
        out
    }

    /// IMA form (linux-dm-abi.md §4.3): `key=value` pairs, `;` at the end.
    fn status_ima(&self, st: &State) -> String {
        let [a, b, c] = TYPE.version;
        let mut out =
            format!("target_name=multipath,target_version={a}.{b}.{c},nr_priority_groups={}", st.groups.len());
        for (gi, g) in st.groups.iter().enumerate() {
            let state = st.group_state(gi);
            out.push_str(&format!(
                ",pg_state_{gi}={state},nr_pgpaths_{gi}={},path_selector_name_{gi}={}",
                g.paths.len(),
                g.selector.name()
            ));
            for (pi, p) in g.paths.iter().enumerate() {
                out.push_str(&format!(
                    ",path_name_{gi}_{pi}={},is_active_{gi}_{pi}={},fail_count_{gi}_{pi}={},path_selector_status_{gi}_{pi}=",
                    p.dev.dev,
                    if p.active { 'A' } else { 'F' },
                    p.fail_count
                ));
            }
        }
        out.push(';');
        out
    }

    /// `bypass_pg_num` / `switch_pg_num`'s group number: 1..=#groups.
    fn group_arg(st: &State, word: &str) -> DmResult<usize> {
        match crate::targets::sscanf::u(word) {
            Some(n) if n >= 1 && (n as usize) <= st.groups.len() => Ok(n as usize - 1),
            _ => {
                tracing::warn!("multipath: invalid PG number supplied to {word:?}");
                Err(invalid!("invalid PG number"))
            }
        }
    }
}

/// The group number status shows: the requested one, else the current one, else 1 if there are
/// groups.
fn pg_num(st: &State) -> usize {
    match (st.next_pg, st.current_pg) {
        (Some(g), _) | (None, Some(g)) => g + 1,
        (None, None) => usize::from(!st.groups.is_empty()),
    }
}

impl Target for Multipath {
    fn status(&self, kind: StatusType, _noflush: bool) -> String {
        let st = self.shared.lock();
        match kind {
            StatusType::Info => self.status_info(&st),
            StatusType::Table => self.status_table(&st),
            StatusType::Ima => self.status_ima(&st),
        }
    }

    fn message(&self, argv: &[String]) -> DmResult<Option<String>> {
        self.message_with_devices(argv, &|name| DevNum::parse(name).ok_or_else(|| invalid!("no such device {name}")))
    }

    /// linux-dm-abi.md §4.4.
    fn message_with_devices(
        &self,
        argv: &[String],
        lookup: &dyn Fn(&str) -> DmResult<DevNum>,
    ) -> DmResult<Option<String>> {
        let sh = &self.shared;
        let mut st = sh.lock();
        if st.suspended {
            return Err(DmError::Busy("multipath: device is suspended".into()));
        }
        let word = argv.first().map(|w| w.to_ascii_lowercase()).unwrap_or_default();
        if argv.len() == 1 {
            match word.as_str() {
                "queue_if_no_path" => {
                    sh.set_queue_if_no_path(&mut st, true, false);
                    return Ok(None);
                }
                "fail_if_no_path" => {
                    sh.set_queue_if_no_path(&mut st, false, false);
                    return Ok(None);
                }
                _ => {}
            }
        }
        if argv.len() != 2 {
            tracing::warn!("multipath: Invalid multipath message arguments. Expected 2 arguments, got {}.", argv.len());
            return Err(invalid!("invalid multipath message"));
        }
        match word.as_str() {
            "disable_group" | "enable_group" => {
                let g = Self::group_arg(&st, &argv[1])?;
                sh.bypass_pg(&mut st, g, word == "disable_group");
                Ok(None)
            }
            "switch_group" => {
                let g = Self::group_arg(&st, &argv[1])?;
                for grp in &mut st.groups {
                    grp.bypassed = false;
                }
                st.current_path = None;
                st.current_pg = None;
                st.next_pg = Some(g);
                sh.services.raise_event();
                Ok(None)
            }
            "fail_path" | "reinstate_path" => {
                drop(st);
                let dev = lookup(&argv[1]).inspect_err(|_| {
                    tracing::warn!("multipath: message: error getting device {}", argv[1]);
                })?;
                let mut st = sh.lock();
                let matching: Vec<PathAt> = st
                    .groups
                    .iter()
                    .enumerate()
                    .flat_map(|(g, grp)| {
                        grp.paths.iter().enumerate().filter(|(_, p)| p.dev.dev == dev).map(move |(p, _)| (g, p))
                    })
                    .collect();
                if matching.is_empty() {
                    return Err(invalid!("multipath: no path {dev} in the table"));
                }
                let mut acts = Vec::new();
                for at in matching {
                    if word == "fail_path" {
                        sh.fail_path(&mut st, at);
                    } else {
                        acts.extend(sh.reinstate_path(&mut st, at)?);
                    }
                }
                drop(st);
                sh.activate(acts);
                Ok(None)
            }
            _ => {
                tracing::warn!("multipath: Unrecognised multipath message received: {}", argv[0]);
                Err(invalid!("unrecognised multipath message"))
            }
        }
    }

    fn iterate_devices(&self, len: Sectors, f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors)) {
        let st = self.shared.lock();
        for g in &st.groups {
            for p in &g.paths {
                f(&p.dev, Sectors(0), len);
            }
        }
    }

    fn features(&self) -> Features {
        Features {
            end_io: true,
            // Held IO waits in the target's queue, never on a thread, and `REQ_NOWAIT` IO that
            // would be held is answered EAGAIN instead; so the table can take it, unless the
            // handler decides on errors later.
            nowait: self.shared.config.handler.as_ref().is_none_or(|h| h.decides_inline()),
            // A failed write is retried on another path: its payload must stay in memory.
            pipes: false,
            ..Features::default()
        }
    }

    fn map(&self, bio: Bio) -> Map {
        let sh = &self.shared;
        let mut acts = Vec::new();
        let mut st = sh.lock();
        let m = match sh.route(&mut st, bio.bytes(), &mut acts) {
            Route::Remap(at, dev) => Map::Remapped(sh.send(&mut st, bio, at, &dev)),
            Route::Held if bio.flags().contains(BioFlags::NOWAIT) => {
                drop(st);
                sh.activate(acts);
                bio.end(Err(IoError::WouldBlock));
                return Map::Submitted;
            }
            Route::Held => {
                st.queued.push_back(bio);
                Map::Submitted
            }
            Route::Requeue => Map::Requeue(bio),
            Route::Kill => Map::Kill(bio),
        };
        drop(st);
        sh.activate(acts);
        m
    }

    fn end_io(&self, mut bio: Bio, result: IoResult) -> EndIo {
        let Some(io) = bio.take_private().and_then(|p| p.downcast::<MpIo>().ok()) else {
            // Never sent down a path (ended by the target itself): nothing to account.
            return EndIo::Done(bio, result);
        };
        let sh = &self.shared;
        sh.lock().groups[io.at.0].selector.end_io(io.at.1, io.nr_bytes, io.start_ns, now_ns());
        let err = match result {
            Err(e) if is_path_error(e) => e,
            other => return EndIo::Done(bio, other),
        };
        let default = handler::default_err(err.errno());
        let flags = match &sh.config.handler {
            Some(h) => {
                let path = {
                    let st = sh.lock();
                    PathRef { dev: st.groups[io.at.0].paths[io.at.1].dev.dev, group: io.at.0 as u32 + 1 }
                };
                let req = ErrRequest {
                    path,
                    op: bio.op(),
                    sector: bio.sector().0,
                    sectors: bio.sectors().0,
                    errno: err.errno(),
                };
                if h.decides_inline() || bio.flags().contains(BioFlags::NOWAIT) {
                    let answer = Arc::new(Mutex::new(None));
                    let slot = answer.clone();
                    if h.decides_inline() {
                        h.err(req, Box::new(move |f| *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(f)));
                    }
                    let got = *answer.lock().unwrap_or_else(|p| p.into_inner());
                    got.unwrap_or(default)
                } else {
                    let me = sh.clone();
                    let at = io.at;
                    h.err(
                        req,
                        Box::new(move |flags| {
                            if let Some((b, r)) = me.decided(bio, at, err, flags) {
                                b.end(r);
                            }
                        }),
                    );
                    return EndIo::Incomplete;
                }
            }
            None => default,
        };
        match sh.decided(bio, io.at, err, flags) {
            Some((b, r)) => EndIo::Done(b, r),
            None => EndIo::Incomplete,
        }
    }

    fn presuspend(&self, noflush: bool) {
        let sh = &self.shared;
        let mut st = sh.lock();
        st.noflush_suspending = noflush;
        // A flushing suspend (and any suspend in bio mode) turns queueing off until resume, so
        // held IO fails now instead of holding the suspend; a noflush suspend hands it back to
        // the core, which keeps it until the resume (linux-dm-abi.md §4.3).
        if sh.config.bio_mode || !noflush {
            sh.set_queue_if_no_path(&mut st, false, true);
        }
        sh.schedule_process(&mut st);
    }

    fn presuspend_undo(&self) {
        self.shared.lock().noflush_suspending = false;
    }

    fn postsuspend(&self) {
        let mut st = self.shared.lock();
        st.noflush_suspending = false;
        st.suspended = true;
    }

    fn resume(&self) {
        let mut st = self.shared.lock();
        st.suspended = false;
        st.queue_if_no_path = st.saved_queue_if_no_path;
    }

    fn request_based(&self) -> bool {
        !self.shared.config.bio_mode
    }

    fn query(&self, _offset: Sectors, len: Sectors) -> Mapping<'_> {
        Mapping::Opaque(len)
    }
}

/// What `DM_MPATH_PROBE_PATHS` runs, outside the engine's lock (linux-dm-abi.md §4.6).
#[derive(Clone)]
pub struct ProbeHandle(Arc<Shared>);

impl ProbeHandle {
    /// Reads the first block of every active path of the current group, failing the paths that
    /// error; `Err(errno)`: ENOTCONN when no usable path is left. Blocks while it reads.
    pub fn probe(&self) -> Result<(), i32> {
        let sh = &self.0;
        let (pg, paths) = {
            let st = sh.lock();
            match st.current_pg {
                Some(g) if !st.queue_io && !st.suspended && !st.noflush_suspending => {
                    let paths: Vec<(usize, Arc<Pdev>)> = st.groups[g]
                        .paths
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.active)
                        .map(|(i, p)| (i, p.dev.clone()))
                        .collect();
                    (Some(g), paths)
                }
                _ => (None, Vec::new()),
            }
        };
        if let Some(g) = pg {
            for (i, dev) in paths {
                if sh.lock().current_pg != Some(g) {
                    break;
                }
                let mut block = vec![0u8; Sectors::SIZE as usize];
                let region = Region { dev, sector: Sectors(0), sectors: Sectors(1) };
                if let Err(e) = sh.services.io_sync(Op::Read, BioFlags::empty(), &region, &mut block) {
                    if is_path_error(e) {
                        let mut st = sh.lock();
                        sh.fail_path(&mut st, (g, i));
                    }
                }
            }
        }
        if sh.lock().nr_valid_paths == 0 {
            return Err(libc::ENOTCONN);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
