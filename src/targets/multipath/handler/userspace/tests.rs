//! The hub's rules: every request completes exactly once, whether answered, timed out, left by a
//! disconnecting program, or dropped with its table.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use super::wire::Message;
use super::*;
use crate::dm::DevNum;
use crate::io::{DataPlane, Op};
use crate::targets::multipath::handler::{default_err, MpFlags, PgInitOutcome};

/// Long enough that a healthy run never reaches it: only a broken build waits this long.
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Pg(PgInitOutcome),
    Err(MpFlags),
}

struct Rig {
    hub: Arc<Hub>,
    plane: DataPlane,
    ended_tx: Sender<Ended>,
    ended: Receiver<Ended>,
}

impl Rig {
    fn new() -> Self {
        let (ended_tx, ended) = channel();
        Self { hub: Hub::new(), plane: DataPlane::detached(), ended_tx, ended }
    }

    fn handler(&self, minor: u32, args: &[&str]) -> Arc<dyn HwHandler> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        with_hub(self.hub.clone(), &args, HandlerCtx { minor, services: self.plane.services(minor, 1) })
    }

    /// A session and the lines it gets.
    fn session(&self) -> (SessionId, Receiver<String>) {
        let (tx, rx) = channel();
        let id = self.hub.open_session(Arc::new(move |o| {
            let _ = tx.send(o);
        }));
        (id, rx)
    }

    fn pg_init(&self, h: &Arc<dyn HwHandler>, group: u32) {
        let tx = self.ended_tx.clone();
        h.pg_init(path(group), false, Box::new(move |o| tx.send(Ended::Pg(o)).unwrap()));
    }

    fn err(&self, h: &Arc<dyn HwHandler>, errno: i32) {
        let tx = self.ended_tx.clone();
        let req = ErrRequest { path: path(1), op: Op::Write, sector: 8, sectors: 16, errno };
        h.err(req, Box::new(move |f| tx.send(Ended::Err(f)).unwrap()));
    }

    fn next_end(&self) -> Ended {
        self.ended.recv_timeout(PATIENCE).expect("a request completed")
    }

    /// Nothing else completed (every completion is sent at once; a late double would also show
    /// in later tests of the same rig).
    fn no_more_ends(&self) {
        assert_eq!(self.ended.try_recv().ok(), None);
    }
}

fn path(group: u32) -> PathRef {
    PathRef { dev: DevNum::new(253, 1), group }
}

fn line(rx: &Receiver<String>) -> Message {
    let l = rx.recv_timeout(PATIENCE).expect("a line for the session");
    Message::parse(&l).unwrap()
}

fn request_id(rx: &Receiver<String>) -> u64 {
    line(rx).request_id().expect("a request line")
}

#[test]
fn without_a_program_requests_complete_at_once() {
    let rig = Rig::new();
    let h = rig.handler(3, &[]);
    assert!(!h.decides_inline());
    assert_eq!(h.name(), "userspace");
    rig.pg_init(&h, 1);
    assert_eq!(rig.ended.try_recv().unwrap(), Ended::Pg(PgInitOutcome::Done(MpFlags::empty())));
    rig.err(&h, libc::EIO);
    assert_eq!(rig.ended.try_recv().unwrap(), Ended::Err(MpFlags::FAIL_PATH));
    rig.err(&h, libc::ENOSPC);
    assert_eq!(rig.ended.try_recv().unwrap(), Ended::Err(MpFlags::ERROR_IO));
    // Another device's program does not take these.
    let (s, _rx) = rig.session();
    rig.hub.register(s, 4, b"other", None).unwrap();
    rig.pg_init(&h, 1);
    assert_eq!(rig.ended.try_recv().unwrap(), Ended::Pg(PgInitOutcome::Done(MpFlags::empty())));
    assert_eq!(rig.hub.pending_count(), 0);
}

#[test]
fn answers_complete_requests_once() {
    let rig = Rig::new();
    let h = rig.handler(3, &["a b", "c"]);
    let (s, rx) = rig.session();
    rig.hub.register(s, 3, b"mp", None).unwrap();
    assert_eq!(line(&rx), Message::Ok { minor: Some(3) });

    rig.pg_init(&h, 2);
    let m = line(&rx);
    let Message::PgInit { id, name, group, dev, bypassed, args } = m else { panic!("{m:?}") };
    assert_eq!((name.as_slice(), group, dev, bypassed), (&b"mp"[..], 2, DevNum::new(253, 1), false));
    assert_eq!(args, ["a b", "c"]);
    rig.no_more_ends();
    let (other, _orx) = rig.session();
    assert_eq!(rig.hub.answer(other, id, Answer::Done(MpFlags::empty())).unwrap_err().errno, libc::ENOENT);
    rig.hub.answer(s, id, Answer::Retry { delayed: true }).unwrap();
    assert_eq!(rig.next_end(), Ended::Pg(PgInitOutcome::Retry { delayed: true }));
    assert_eq!(rig.hub.answer(s, id, Answer::Done(MpFlags::empty())).unwrap_err().errno, libc::ENOENT);

    rig.err(&h, libc::EIO);
    let m = line(&rx);
    let Message::Err { id, op, sector, sectors, errno, .. } = m else { panic!("{m:?}") };
    assert_eq!((op, sector, sectors, errno), (Op::Write, 8, 16, libc::EIO));
    assert_eq!(rig.hub.answer(s, id, Answer::Retry { delayed: false }).unwrap_err().errno, libc::EINVAL);
    assert!(rig.hub.is_pending(id));
    rig.hub.answer(s, id, Answer::Done(MpFlags::BYPASS_PG | MpFlags::ERROR_IO)).unwrap();
    assert_eq!(rig.next_end(), Ended::Err(MpFlags::BYPASS_PG | MpFlags::ERROR_IO));
    assert!(!rig.hub.is_pending(id));
    rig.no_more_ends();
}

#[test]
fn a_disconnect_completes_its_requests_as_unanswered() {
    let rig = Rig::new();
    let h = rig.handler(5, &[]);
    let (s, rx) = rig.session();
    rig.hub.register(s, 5, b"mp", Some(Duration::from_secs(3600))).unwrap();
    line(&rx);
    rig.pg_init(&h, 1);
    rig.err(&h, libc::ENODATA);
    let (a, b) = (request_id(&rx), request_id(&rx));
    rig.no_more_ends();
    rig.hub.close_session(s);
    let mut ends = [rig.next_end(), rig.next_end()];
    ends.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(ends, [Ended::Err(MpFlags::ERROR_IO), Ended::Pg(PgInitOutcome::Done(MpFlags::empty()))]);
    assert_eq!(rig.hub.answer(s, a, Answer::Done(MpFlags::FAIL_PATH)).unwrap_err().errno, libc::ENOENT);
    assert!(!rig.hub.is_pending(b));
    // The registration went with it.
    rig.pg_init(&h, 1);
    assert_eq!(rig.ended.try_recv().unwrap(), Ended::Pg(PgInitOutcome::Done(MpFlags::empty())));
    rig.no_more_ends();
    assert_eq!(rig.hub.register(s, 5, b"mp", None).unwrap_err().errno, libc::EBADF);
}

#[test]
fn timeouts_fail_the_path_and_tell_the_program() {
    let rig = Rig::new();
    let h = rig.handler(6, &[]);
    let (s, rx) = rig.session();
    rig.hub.register(s, 6, b"mp", Some(Duration::from_millis(20))).unwrap();
    line(&rx);
    rig.pg_init(&h, 1);
    let id = request_id(&rx);
    assert_eq!(rig.next_end(), Ended::Pg(PgInitOutcome::Done(MpFlags::FAIL_PATH)));
    assert_eq!(line(&rx), Message::Cancel { id, reason: "timeout".into() });
    assert_eq!(rig.hub.answer(s, id, Answer::Done(MpFlags::empty())).unwrap_err().errno, libc::ENOENT);

    rig.err(&h, libc::EOPNOTSUPP);
    let id = request_id(&rx);
    assert_eq!(rig.next_end(), Ended::Err(default_err(libc::EOPNOTSUPP)));
    assert_eq!(line(&rx), Message::Cancel { id, reason: "timeout".into() });
    rig.no_more_ends();
}

#[test]
fn an_answer_beats_its_timer() {
    let rig = Rig::new();
    let h = rig.handler(7, &[]);
    let (s, rx) = rig.session();
    rig.hub.register(s, 7, b"mp", Some(Duration::from_millis(50))).unwrap();
    line(&rx);
    rig.pg_init(&h, 1);
    let id = request_id(&rx);
    rig.hub.answer(s, id, Answer::Done(MpFlags::BYPASS_PG)).unwrap();
    assert_eq!(rig.next_end(), Ended::Pg(PgInitOutcome::Done(MpFlags::BYPASS_PG)));
    // Well past the timer: it was cancelled, or found nothing to end.
    std::thread::sleep(Duration::from_millis(200));
    rig.no_more_ends();
    assert!(rx.try_recv().is_err(), "no cancel line after an answer");
}

#[test]
fn a_dropped_table_completes_its_requests() {
    let rig = Rig::new();
    let (old, new) = (rig.handler(8, &[]), rig.handler(8, &[]));
    let (s, rx) = rig.session();
    rig.hub.register(s, 8, b"mp", None).unwrap();
    line(&rx);
    rig.pg_init(&old, 1);
    rig.pg_init(&new, 1);
    let (a, b) = (request_id(&rx), request_id(&rx));
    drop(old);
    assert_eq!(rig.next_end(), Ended::Pg(PgInitOutcome::Done(MpFlags::empty())));
    assert_eq!(line(&rx), Message::Cancel { id: a, reason: "dropped".into() });
    // The other table's request still waits.
    assert!(rig.hub.is_pending(b));
    rig.no_more_ends();
    rig.hub.answer(s, b, Answer::Done(MpFlags::FAIL_PATH)).unwrap();
    assert_eq!(rig.next_end(), Ended::Pg(PgInitOutcome::Done(MpFlags::FAIL_PATH)));
    rig.no_more_ends();
}

#[test]
fn registrations_follow_renames_takeovers_and_removals() {
    let rig = Rig::new();
    let h = rig.handler(9, &[]);
    let (s1, rx1) = rig.session();
    let (s2, rx2) = rig.session();
    rig.hub.register(s1, 9, b"mp", None).unwrap();
    line(&rx1);
    rig.hub.device_changed(9, Some(b"renamed"));
    rig.pg_init(&h, 1);
    let m = line(&rx1);
    assert!(matches!(&m, Message::PgInit { name, .. } if name == b"renamed"), "{m:?}");
    let first = m.request_id().unwrap();

    // A second program takes the device over; the first still answers what it was sent.
    rig.hub.register(s2, 9, b"renamed", None).unwrap();
    assert_eq!(line(&rx2), Message::Ok { minor: Some(9) });
    assert_eq!(line(&rx1), Message::Released { name: b"renamed".to_vec(), reason: "replaced".into() });
    assert_eq!(rig.hub.unregister(s1, 9).unwrap_err().errno, libc::ENOENT);
    rig.err(&h, libc::EIO);
    let second = request_id(&rx2);
    rig.hub.answer(s1, first, Answer::Done(MpFlags::empty())).unwrap();
    assert_eq!(rig.next_end(), Ended::Pg(PgInitOutcome::Done(MpFlags::empty())));
    rig.hub.answer(s2, second, Answer::Done(MpFlags::ERROR_IO)).unwrap();
    assert_eq!(rig.next_end(), Ended::Err(MpFlags::ERROR_IO));

    // Removal ends the registration.
    rig.hub.device_changed(9, None);
    assert_eq!(line(&rx2), Message::Released { name: b"renamed".to_vec(), reason: "removed".into() });
    rig.pg_init(&h, 1);
    assert_eq!(rig.ended.try_recv().unwrap(), Ended::Pg(PgInitOutcome::Done(MpFlags::empty())));

    // Unregistering stops the requests too.
    rig.hub.register(s2, 9, b"again", None).unwrap();
    line(&rx2);
    rig.hub.unregister(s2, 9).unwrap();
    rig.err(&h, libc::EIO);
    assert_eq!(rig.ended.try_recv().unwrap(), Ended::Err(MpFlags::FAIL_PATH));
    assert!(rx2.try_recv().is_err());
    rig.no_more_ends();
}

#[test]
fn completions_run_without_the_hub_lock() {
    // A completion that calls back into the hub (as a target re-running pg_init would) must not
    // deadlock, whichever way the request ends.
    let rig = Rig::new();
    let h = rig.handler(10, &[]);
    let (s, rx) = rig.session();
    rig.hub.register(s, 10, b"mp", Some(Duration::from_millis(10))).unwrap();
    line(&rx);
    let (tx, done) = channel();
    let hub = rig.hub.clone();
    h.pg_init(
        path(1),
        false,
        Box::new(move |o| {
            let _ = hub.pending_count();
            tx.send(o).unwrap();
        }),
    );
    assert_eq!(done.recv_timeout(PATIENCE).unwrap(), PgInitOutcome::Done(MpFlags::FAIL_PATH));
    let first = request_id(&rx);
    assert_eq!(line(&rx), Message::Cancel { id: first, reason: "timeout".into() });
    rig.hub.register(s, 10, b"mp", None).unwrap();
    assert_eq!(line(&rx), Message::Ok { minor: Some(10) });
    let (tx, done) = channel();
    let hub = rig.hub.clone();
    h.pg_init(
        path(1),
        false,
        Box::new(move |o| {
            hub.close_session(12345);
            tx.send(o).unwrap();
        }),
    );
    let id = request_id(&rx);
    rig.hub.answer(s, id, Answer::Done(MpFlags::empty())).unwrap();
    assert_eq!(done.recv_timeout(PATIENCE).unwrap(), PgInitOutcome::Done(MpFlags::empty()));
}
