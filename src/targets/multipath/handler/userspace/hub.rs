//! The process-wide hub of the userspace hardware handler: handler programs' sessions, which
//! session each device's requests go to (by minor), and the requests waiting for an answer (by id).
//!
//! Rules (docs/multipath-hwh.md):
//! * a request of a device no session is registered for completes at once: `pg_init` with no flags
//!   (the path is ready), `err` with the kernel's decision ([`default_err`]);
//! * a request waits for its session's answer at most the registration's timeout, then completes
//!   as a failed activation (`pg_init`: [`MpFlags::FAIL_PATH`]) or with the kernel's decision
//!   (`err`), and the session is told (`cancel <id> timeout`);
//! * when a session ends, its registrations go and its waiting requests complete as if no program
//!   had been registered; when a handler (its table) is dropped, its waiting requests complete so
//!   too (`cancel <id> dropped`), on a worker;
//! * a later registration of the same device takes it over (`released <name> replaced` to the
//!   earlier session, whose requests already sent still wait for its answer); a removed device's
//!   registration goes (`released <name> removed`).
//!
//! Every request's completion is called exactly once, and never with the hub's lock held; nothing
//! here blocks on a program (lines go out through each session's [`Sink`], which only queues). A
//! session gets every request line it was chosen for, even one that ends before the line is
//! written, and then that request's `cancel` after it: a program always learns of both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::wire::Message;
use crate::io::{Services, TimerId};
use crate::targets::multipath::handler::{
    default_err, ErrDone, ErrRequest, MpFlags, PathRef, PgInitDone, PgInitOutcome,
};

/// A handler program's session (one connection that sent an `HWH` frame).
pub type SessionId = u64;

/// Where a session's lines go, in order. Must not block (the daemon queues them for the
/// connection's writer).
pub type Sink = Arc<dyn Fn(String) + Send + Sync>;

fn line(m: &Message) -> String {
    m.to_string()
}

/// A program's answer to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Done(MpFlags),
    /// `pg_init` only.
    Retry {
        delayed: bool,
    },
}

/// Why a command of a session was refused: errno and text for its `error` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub errno: i32,
    pub text: String,
}

impl Refusal {
    fn new(errno: i32, text: impl Into<String>) -> Self {
        Self { errno, text: text.into() }
    }
}

/// Who waits for a request's end.
enum Waiter {
    PgInit(PgInitDone),
    Err { done: ErrDone, errno: i32 },
}

impl Waiter {
    /// No program answers (none registered, its session ended, its table dropped).
    fn unanswered(self) {
        match self {
            Waiter::PgInit(done) => done(PgInitOutcome::Done(MpFlags::empty())),
            Waiter::Err { done, errno } => done(default_err(errno)),
        }
    }

    /// The program did not answer in time.
    fn timed_out(self) {
        match self {
            Waiter::PgInit(done) => done(PgInitOutcome::Done(MpFlags::FAIL_PATH)),
            Waiter::Err { done, errno } => done(default_err(errno)),
        }
    }

    fn answered(self, a: Answer) {
        match (self, a) {
            (Waiter::PgInit(done), Answer::Done(flags)) => done(PgInitOutcome::Done(flags)),
            (Waiter::PgInit(done), Answer::Retry { delayed }) => done(PgInitOutcome::Retry { delayed }),
            (Waiter::Err { done, .. }, Answer::Done(flags)) => done(flags),
            (Waiter::Err { done, errno }, Answer::Retry { .. }) => {
                // Refused before the request was taken (see `Hub::answer`); never reached.
                done(default_err(errno))
            }
        }
    }
}

struct Pending {
    session: SessionId,
    /// The handler instance that asked (its table).
    handler: u64,
    waiter: Waiter,
    timer: Option<(Services, TimerId)>,
}

impl Pending {
    fn cancel_timer(&mut self) {
        if let Some((s, t)) = self.timer.take() {
            s.cancel(t);
        }
    }
}

struct Registration {
    session: SessionId,
    /// `None`: requests wait for the answer however long it takes.
    timeout: Option<Duration>,
    /// The device's current name (kept up to date by [`Hub::device_changed`]).
    name: Vec<u8>,
}

#[derive(Default)]
struct State {
    next_session: SessionId,
    next_request: u64,
    next_handler: u64,
    sessions: HashMap<SessionId, Sink>,
    /// By minor.
    registered: HashMap<u32, Registration>,
    pending: HashMap<u64, Pending>,
}

/// The hub; one per process ([`super::hub`]), or private ones in tests.
#[derive(Default)]
pub struct Hub {
    state: Mutex<State>,
}

/// A request as the handler hands it over.
pub(super) enum Ask<'a> {
    PgInit { path: PathRef, bypassed: bool, args: &'a [String], done: PgInitDone },
    Err { req: ErrRequest, done: ErrDone },
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session whose lines go to `sink`.
    pub fn open_session(&self, sink: Sink) -> SessionId {
        let mut st = self.lock();
        st.next_session += 1;
        let id = st.next_session;
        st.sessions.insert(id, sink);
        id
    }

    /// Ends a session: its registrations go, its waiting requests complete unanswered.
    pub fn close_session(&self, session: SessionId) {
        let mut st = self.lock();
        st.sessions.remove(&session);
        st.registered.retain(|_, r| r.session != session);
        let ids: Vec<u64> = st.pending.iter().filter(|(_, p)| p.session == session).map(|(&id, _)| id).collect();
        let ended: Vec<Pending> = ids.iter().filter_map(|id| st.pending.remove(id)).collect();
        drop(st);
        if !ended.is_empty() {
            tracing::info!("hardware handler session {session} ended with {} request(s) unanswered", ended.len());
        }
        for mut p in ended {
            p.cancel_timer();
            p.waiter.unanswered();
        }
    }

    /// Sends the requests of device `minor` (now called `name`) to `session`, each waiting at
    /// most `timeout`. The `ok <minor>` reply goes out before any request of the device can.
    pub fn register(
        &self,
        session: SessionId,
        minor: u32,
        name: &[u8],
        timeout: Option<Duration>,
    ) -> Result<(), Refusal> {
        let mut st = self.lock();
        let Some(sink) = st.sessions.get(&session).cloned() else {
            return Err(Refusal::new(libc::EBADF, "session closed"));
        };
        let reg = Registration { session, timeout, name: name.to_vec() };
        let before = st.registered.insert(minor, reg).map(|r| r.session).filter(|&s| s != session);
        // Queued under the lock, so no request of the device is queued before it.
        sink(line(&Message::Ok { minor: Some(minor) }));
        if let Some(sink) = before.and_then(|s| st.sessions.get(&s).cloned()) {
            sink(line(&Message::Released { name: name.to_vec(), reason: "replaced".into() }));
        }
        Ok(())
    }

    /// Stops sending `minor`'s requests to `session` (its requests already sent still wait).
    pub fn unregister(&self, session: SessionId, minor: u32) -> Result<(), Refusal> {
        let mut st = self.lock();
        match st.registered.get(&minor) {
            Some(r) if r.session == session => {
                st.registered.remove(&minor);
                Ok(())
            }
            _ => Err(Refusal::new(libc::ENOENT, "device not registered by this session")),
        }
    }

    /// The daemon's word that device `minor` changed: its current name, or `None` once removed.
    pub fn device_changed(&self, minor: u32, name: Option<&[u8]>) {
        let mut st = self.lock();
        if st.registered.is_empty() {
            return;
        }
        match name {
            Some(name) => {
                if let Some(r) = st.registered.get_mut(&minor) {
                    if r.name != name {
                        r.name = name.to_vec();
                    }
                }
            }
            None => {
                let Some(r) = st.registered.remove(&minor) else { return };
                if let Some(sink) = st.sessions.get(&r.session) {
                    sink(line(&Message::Released { name: r.name, reason: "removed".into() }));
                }
            }
        }
    }

    /// Whether request `id` still waits for an answer.
    pub fn is_pending(&self, id: u64) -> bool {
        self.lock().pending.contains_key(&id)
    }

    /// Requests waiting for an answer.
    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// A session's answer to request `id`.
    pub fn answer(&self, session: SessionId, id: u64, answer: Answer) -> Result<(), Refusal> {
        let mut st = self.lock();
        let p = match st.pending.get(&id) {
            Some(p) if p.session == session => p,
            _ => return Err(Refusal::new(libc::ENOENT, format!("no request {id} waits for this session"))),
        };
        if matches!((&p.waiter, answer), (Waiter::Err { .. }, Answer::Retry { .. })) {
            return Err(Refusal::new(libc::EINVAL, format!("request {id} is an err: answer it with done")));
        }
        let mut p = st.pending.remove(&id).expect("looked up above");
        drop(st);
        p.cancel_timer();
        p.waiter.answered(answer);
        Ok(())
    }

    /// A new handler instance's id (to find its requests when it is dropped).
    pub(super) fn new_handler(&self) -> u64 {
        let mut st = self.lock();
        st.next_handler += 1;
        st.next_handler
    }

    /// Forwards a request of device `minor` to its session, or completes it at once when none is
    /// registered.
    pub(super) fn ask(self: &Arc<Self>, minor: u32, handler: u64, services: &Services, ask: Ask<'_>) {
        let mut st = self.lock();
        let Some(reg) = st.registered.get(&minor) else {
            drop(st);
            match ask {
                Ask::PgInit { done, .. } => Waiter::PgInit(done).unanswered(),
                Ask::Err { req, done } => Waiter::Err { done, errno: req.errno }.unanswered(),
            }
            return;
        };
        let (session, timeout, name) = (reg.session, reg.timeout, reg.name.clone());
        let sink = st.sessions.get(&session).cloned().expect("registered sessions are open");
        st.next_request += 1;
        let id = st.next_request;
        let (msg, waiter) = match ask {
            Ask::PgInit { path, bypassed, args, done } => (
                Message::PgInit { id, name, group: path.group, dev: path.dev, bypassed, args: args.to_vec() },
                Waiter::PgInit(done),
            ),
            Ask::Err { req, done } => (
                Message::Err {
                    id,
                    name,
                    group: req.path.group,
                    dev: req.path.dev,
                    op: req.op,
                    sector: req.sector,
                    sectors: req.sectors,
                    errno: req.errno,
                },
                Waiter::Err { done, errno: req.errno },
            ),
        };
        st.pending.insert(id, Pending { session, handler, waiter, timer: None });
        // Queued under the lock: a session's lines leave in the order the hub decided them.
        sink(line(&msg));
        drop(st);
        let Some(t) = timeout else { return };
        let hub = self.clone();
        let timer = services.after(t, move || hub.expire(id));
        let mut st = self.lock();
        match st.pending.get_mut(&id) {
            Some(p) => p.timer = Some((services.clone(), timer)),
            None => {
                drop(st);
                services.cancel(timer);
            }
        }
    }

    /// Request `id`'s time is up.
    fn expire(&self, id: u64) {
        let mut st = self.lock();
        let Some(p) = st.pending.remove(&id) else { return };
        if let Some(sink) = st.sessions.get(&p.session) {
            sink(line(&Message::Cancel { id, reason: "timeout".into() }));
        }
        drop(st);
        tracing::info!("hardware handler request {id} timed out");
        p.waiter.timed_out();
    }

    /// A handler instance is gone: its waiting requests complete unanswered, on a worker.
    pub(super) fn handler_dropped(&self, handler: u64, services: &Services) {
        let mut st = self.lock();
        let ids: Vec<u64> = st.pending.iter().filter(|(_, p)| p.handler == handler).map(|(&id, _)| id).collect();
        let mut ended = Vec::with_capacity(ids.len());
        for id in ids {
            let p = st.pending.remove(&id).expect("listed above");
            if let Some(sink) = st.sessions.get(&p.session) {
                sink(line(&Message::Cancel { id, reason: "dropped".into() }));
            }
            ended.push(p);
        }
        drop(st);
        for mut p in ended {
            p.cancel_timer();
            services.queue_work(move || p.waiter.unanswered());
        }
    }
}
