//! The userspace hardware handler's protocol (docs/multipath-hwh.md) against a real daemon:
//! `dmemu hwh` registering for devices made with the real dmsetup, takeovers, removals, unknown
//! devices, malformed lines, clients that die; and, with a daemon in this process, requests of a
//! `userspace` handler answered by `dmemu hwh` (answers, retries, timeouts, a dropped table, a
//! disconnect), each completing exactly once.
//!
//! Nothing here depends on how fast anything runs: deadlines only keep a broken build from
//! hanging, and timeouts are only ever waited for, never raced.

mod common;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::hwh::{Hwh, PATIENCE};
use common::Daemon;
use dmemu::client::hwh::{connect, HwhReader, HwhWriter};
use dmemu::dm::DevNum;
use dmemu::io::Op;
use dmemu::targets::multipath::handler::userspace::wire::{Command as Line, Message};
use dmemu::targets::multipath::handler::{self, ErrRequest, HandlerCtx, HwHandler, MpFlags, PathRef, PgInitOutcome};
use dmemu_frame::{self as frame, Kind};

/// A device with any table (a linear map of a file).
fn device(d: &Daemon, name: &str) {
    let f = d.file(&format!("{name}.img"), 2048);
    d.dmsetup(&["create", name, "--table", &format!("0 2048 linear {f} 0")]).ok();
}

/// A raw handler session, for what `dmemu hwh` never sends.
fn raw(socket: &Path) -> (HwhReader, HwhWriter) {
    connect(socket).expect("connect")
}

#[track_caller]
fn next(r: &mut HwhReader) -> Message {
    r.recv().expect("a handler line").expect("the daemon keeps the session")
}

#[test]
fn registration_takeover_removal_and_unknown_devices() {
    let d = Daemon::start();
    device(&d, "mp");
    device(&d, "other");
    let first = Hwh::start(&d.socket, &["mp", "/dev/mapper/other"]);
    first.expect("registered mp");
    first.expect("registered /dev/mapper/other");

    // A second program takes a device over; the first is told.
    let second = Hwh::start(&d.socket, &["mp", "--timeout-ms", "0"]);
    second.expect("registered mp");
    first.expect("released mp replaced");

    // Unknown devices are refused, and the program says why.
    let o = Command::new(common::bin()).args(["hwh", "--socket"]).arg(&d.socket).arg("nosuch").output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("register nosuch") && err.contains("errno 6"), "{err}");
    assert!(o.stdout.is_empty());

    // A removed device's program is told; a renamed one keeps its registration (by minor).
    d.dmsetup(&["rename", "other", "other2"]).ok();
    d.dmsetup(&["remove", "other2"]).ok();
    first.expect("released other2 removed");
    d.dmsetup(&["remove", "mp"]).ok();
    second.expect("released mp removed");
    assert!(d.log().contains("hardware handler session"), "{}", d.log());
}

#[test]
fn dying_clients_leave_the_daemon_serving() {
    let d = Daemon::start();
    device(&d, "mp");
    let mut h = Hwh::start(&d.socket, &["mp"]);
    h.expect("registered mp");
    // A raw session stays open meanwhile: the daemon serves others while sessions are idle.
    let (mut r, mut w) = raw(&d.socket);
    w.send(&Line::Register { name: b"mp".to_vec(), timeout_ms: Some(1000) }).unwrap();
    assert!(matches!(next(&mut r), Message::Ok { minor: Some(_) }));
    assert!(d.dmsetup(&["ls"]).ok().contains("mp"));
    h.kill();
    drop((r, w));
    assert!(d.dmsetup(&["info", "mp"]).ok().contains("ACTIVE"));
    let again = Hwh::start(&d.socket, &["mp"]);
    again.expect("registered mp");

    // A client dying mid-frame ends only its own connection.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    use std::io::Write;
    s.write_all(&frame::header(Kind::Hwh, 100)).unwrap();
    s.write_all(b"register m").unwrap();
    drop(s);
    assert!(d.dmsetup(&["info", "mp"]).ok().contains("ACTIVE"));
    assert!(d.alive());
}

#[test]
fn malformed_lines_get_errors_and_the_session_goes_on() {
    let d = Daemon::start();
    device(&d, "mp");
    let (mut r, mut w) = raw(&d.socket);
    let errno = |m: Message| match m {
        Message::Error { errno, .. } => errno,
        other => panic!("want an error, got {other:?}"),
    };
    for bad in ["", "hello", "register", "register mp timeout_ms=x", "done 1", "done 1 8", "retry x", "register %zz"] {
        w.send_line(bad).unwrap();
        assert_eq!(errno(next(&mut r)), libc::EINVAL, "{bad:?}");
    }
    // Not UTF-8.
    let mut raw_stream = UnixStream::connect(&d.socket).unwrap();
    frame::write_frame(&mut raw_stream, Kind::Hwh, &[b"register \xff"]).unwrap();
    let (h, body) = frame::read_frame(&mut raw_stream, frame::MAX_HWH_MSG).unwrap();
    assert_eq!(h.kind, Kind::HwhMsg as u16);
    assert!(body.starts_with(b"error 22 "), "{}", String::from_utf8_lossy(&body));
    // Answers to requests that do not exist, devices that do not.
    w.send(&Line::Done { id: 12345, flags: MpFlags::empty() }).unwrap();
    assert_eq!(errno(next(&mut r)), libc::ENOENT);
    w.send(&Line::Retry { id: 1, delayed: true }).unwrap();
    assert_eq!(errno(next(&mut r)), libc::ENOENT);
    w.send(&Line::Register { name: b"nosuch".to_vec(), timeout_ms: None }).unwrap();
    assert_eq!(errno(next(&mut r)), libc::ENXIO);
    w.send(&Line::Unregister { name: b"mp".to_vec() }).unwrap();
    assert_eq!(errno(next(&mut r)), libc::ENOENT);
    // The session still works.
    w.send(&Line::Register { name: b"mp".to_vec(), timeout_ms: None }).unwrap();
    let Message::Ok { minor: Some(minor) } = next(&mut r) else { panic!("register refused") };
    w.send(&Line::Unregister { name: b"mp".to_vec() }).unwrap();
    assert_eq!(next(&mut r), Message::Ok { minor: Some(minor) });

    // An oversized frame closes that connection only.
    let mut big = UnixStream::connect(&d.socket).unwrap();
    use std::io::{Read, Write};
    big.write_all(&frame::FrameHeader::new(Kind::Hwh, frame::MAX_HWH_PAYLOAD + 1).encode()).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(big.read(&mut b), Ok(0) | Err(_)));
    w.send(&Line::Register { name: b"mp".to_vec(), timeout_ms: None }).unwrap();
    assert!(matches!(next(&mut r), Message::Ok { .. }));
    assert!(d.log().contains("refused"), "{}", d.log());
}

// ---------------------------------------------------------------------------------------------
// Requests, from a handler in this process (the multipath target's side) to `dmemu hwh`.

/// A daemon in this process, so a `userspace` handler made here shares its hub. The hub is the
/// process's (one daemon per process): every in-process case runs in the one test below, against
/// one such daemon.
struct InProcess {
    dir: std::path::PathBuf,
    daemon: Arc<dmemu::server::Daemon>,
}

impl InProcess {
    fn start(tag: &str) -> Self {
        use dmemu::server;
        let dir = std::env::temp_dir().join(format!("dmemu-hwh-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (major, file_major) = server::free_majors(&std::fs::read_to_string("/proc/devices").unwrap_or_default());
        let cfg = server::ServeConfig {
            socket: dir.join("control.sock"),
            run_dir: dir.clone(),
            engine: dmemu::dm::EngineConfig { major, file_major },
            netbsd_errors: server::NetbsdErrors::Real,
            fuse_dir: None,
        };
        let engine =
            dmemu::dm::Engine::new(cfg.engine, dmemu::targets::registry(), Box::new(server::resolver::FsResolver));
        let daemon = server::Daemon::new(&cfg, engine).unwrap();
        let (d, sock) = (daemon.clone(), cfg.socket.clone());
        std::thread::spawn(move || d.serve(&sock));
        let deadline = Instant::now() + PATIENCE;
        while dmemu::client::daemon::hello(&dir.join("control.sock")).is_none() {
            assert!(Instant::now() < deadline, "the daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { dir, daemon }
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.join("control.sock")
    }

    /// A device made with dmsetup; its minor.
    fn device(&self, name: &str) -> u32 {
        let f = self.dir.join(format!("{name}.img"));
        std::fs::File::create(&f).unwrap().set_len(2048 * 512).unwrap();
        let o = Command::new(common::bin())
            .arg("exec")
            .arg("--socket")
            .arg(self.socket())
            .arg("--")
            .arg(common::DMSETUP)
            .args(["create", name, "--table", &format!("0 2048 linear {} 0", f.display())])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = Command::new(common::bin())
            .arg("exec")
            .arg("--socket")
            .arg(self.socket())
            .arg("--")
            .arg(common::DMSETUP)
            .args(["info", "-c", "--noheadings", "-o", "minor", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    }

    /// The `userspace` handler a multipath table of device `minor` would make.
    fn handler(&self, minor: u32, args: &[&str]) -> Arc<dyn HwHandler> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let ctx = HandlerCtx { minor, services: self.daemon.io().services(minor, 1) };
        handler::create("userspace", &args, ctx).unwrap().expect("userspace is a handler")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Pg(PgInitOutcome),
    Err(MpFlags),
}

struct Ends {
    tx: std::sync::mpsc::Sender<Ended>,
    rx: Receiver<Ended>,
}

impl Ends {
    fn new() -> Self {
        let (tx, rx) = channel();
        Self { tx, rx }
    }

    fn pg_init(&self, h: &Arc<dyn HwHandler>, group: u32, bypassed: bool) {
        let tx = self.tx.clone();
        let path = PathRef { dev: DevNum::new(8, 16), group };
        h.pg_init(path, bypassed, Box::new(move |o| tx.send(Ended::Pg(o)).unwrap()));
    }

    fn err(&self, h: &Arc<dyn HwHandler>, op: Op, errno: i32) {
        let tx = self.tx.clone();
        let req = ErrRequest { path: PathRef { dev: DevNum::new(8, 32), group: 2 }, op, sector: 64, sectors: 8, errno };
        h.err(req, Box::new(move |f| tx.send(Ended::Err(f)).unwrap()));
    }

    #[track_caller]
    fn next(&self) -> Ended {
        self.rx.recv_timeout(PATIENCE).expect("the request completed")
    }

    /// Every completion so far has been taken (a second completion of a request would show here).
    #[track_caller]
    fn none_left(&self) {
        assert_eq!(self.rx.try_recv().ok(), None);
    }
}

#[test]
fn requests_from_a_handler_in_this_process() {
    let d = InProcess::start("requests");
    answers_come_back(&d);
    timeouts_drops_and_disconnects_complete_each_request_once(&d);
}

fn answers_come_back(d: &InProcess) {
    let minor = d.device("mp");
    let h = d.handler(minor, &["vendor", "a b"]);
    assert!(!h.decides_inline());
    let ends = Ends::new();

    // No program yet: at once, the kernel's way.
    ends.pg_init(&h, 1, false);
    assert_eq!(ends.next(), Ended::Pg(PgInitOutcome::Done(MpFlags::empty())));
    ends.err(&h, Op::Read, libc::ENODATA);
    assert_eq!(ends.next(), Ended::Err(MpFlags::ERROR_IO));

    let prog = Hwh::start(
        &d.socket(),
        &[
            "mp",
            "--pg-init",
            "fail",
            "--pg-init",
            "retry",
            "--pg-init",
            "sleep=20:6",
            "--err",
            "bypass",
            "--err",
            "default",
        ],
    );
    prog.expect("registered mp");
    ends.pg_init(&h, 1, false);
    assert_eq!(ends.next(), Ended::Pg(PgInitOutcome::Done(MpFlags::FAIL_PATH)));
    prog.expect("pg_init mp 1 8:16 0 vendor a%20b -> fail");
    ends.pg_init(&h, 2, true);
    assert_eq!(ends.next(), Ended::Pg(PgInitOutcome::Retry { delayed: false }));
    prog.expect("pg_init mp 2 8:16 1 vendor a%20b -> retry");
    ends.pg_init(&h, 2, false);
    assert_eq!(ends.next(), Ended::Pg(PgInitOutcome::Done(MpFlags::BYPASS_PG | MpFlags::ERROR_IO)));
    prog.expect("pg_init mp 2 8:16 0 vendor a%20b -> 6");
    // The last action repeats.
    ends.pg_init(&h, 1, false);
    assert_eq!(ends.next(), Ended::Pg(PgInitOutcome::Done(MpFlags::BYPASS_PG | MpFlags::ERROR_IO)));
    prog.expect("pg_init mp 1 8:16 0 vendor a%20b -> 6");

    ends.err(&h, Op::Write, libc::EIO);
    assert_eq!(ends.next(), Ended::Err(MpFlags::BYPASS_PG));
    prog.expect("err mp 2 8:32 write 64 8 5 -> bypass");
    ends.err(&h, Op::Discard, libc::EOPNOTSUPP);
    assert_eq!(ends.next(), Ended::Err(MpFlags::ERROR_IO));
    prog.expect(&format!("err mp 2 8:32 discard 64 8 {} -> error-io", libc::EOPNOTSUPP));
    ends.err(&h, Op::Flush, libc::EIO);
    assert_eq!(ends.next(), Ended::Err(MpFlags::FAIL_PATH));
    prog.expect("err mp 2 8:32 flush 64 8 5 -> fail");
    ends.none_left();
}

fn timeouts_drops_and_disconnects_complete_each_request_once(d: &InProcess) {
    let minor = d.device("slow");
    let h = d.handler(minor, &[]);
    let ends = Ends::new();

    // Timeouts: the program never answers in time.
    let mut prog = Hwh::start(&d.socket(), &["slow", "--timeout-ms", "100", "--pg-init", "sleep=600000:ok"]);
    prog.expect("registered slow");
    ends.pg_init(&h, 1, false);
    assert_eq!(ends.next(), Ended::Pg(PgInitOutcome::Done(MpFlags::FAIL_PATH)));
    prog.expect("pg_init slow 1 8:16 0 -> timeout");
    ends.err(&h, Op::Read, libc::EIO);
    // `--err` defaults to answering at once: the kernel's decision, unless the timer won.
    assert_eq!(ends.next(), Ended::Err(MpFlags::FAIL_PATH));
    let l = prog.line();
    assert!(l == "err slow 2 8:32 read 64 8 5 -> fail" || l == "err slow 2 8:32 read 64 8 5 -> timeout", "{l}");
    prog.kill();

    // A dropped table: its waiting requests complete, and the program is told.
    let prog = Hwh::start(&d.socket(), &["slow", "--timeout-ms", "0", "--pg-init", "sleep=600000:ok"]);
    prog.expect("registered slow");
    let doomed = d.handler(minor, &[]);
    ends.pg_init(&doomed, 3, false);
    drop(doomed);
    assert_eq!(ends.next(), Ended::Pg(PgInitOutcome::Done(MpFlags::empty())));
    prog.expect("pg_init slow 3 8:16 0 -> dropped");

    // A disconnect: the program dies with a request unanswered.
    let mut prog = prog;
    ends.pg_init(&h, 1, false);
    prog.kill();
    assert_eq!(ends.next(), Ended::Pg(PgInitOutcome::Done(MpFlags::empty())));
    // And without a program, requests complete at once again.
    ends.pg_init(&h, 1, false);
    assert_eq!(ends.next(), Ended::Pg(PgInitOutcome::Done(MpFlags::empty())));
    std::thread::sleep(Duration::from_millis(200));
    ends.none_left();
}
