//! The NBD server's limits against clients that misbehave (issue 11): a client that never reads
//! its replies, more connections than the daemon has descriptors for, the socket's mode under a
//! permissive umask, stale and live sockets at start, and draining the server on shutdown.
//! Raw protocol clients written from the protocol document (NetworkBlockDevice/nbd
//! `doc/proto.md`), real clients (nbdinfo, nbdcopy) for the well-behaved side.

mod common;

use common::Daemon;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;

use common::{be32, be64};

/// Fixed newstyle handshake and NBD_OPT_GO without structured replies: replies are simple.
fn go(sock: &Path, name: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    // Only against hangs: nothing here asserts on time.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut h = [0u8; 18];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be64(&h), NBDMAGIC);
    assert_eq!(be64(&h[8..]), IHAVEOPT);
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(d.len() as u32).to_be_bytes());
    m.extend_from_slice(&d);
    s.write_all(&m).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h), REPLY_MAGIC);
        let mut d = vec![0u8; be32(&h[16..]) as usize];
        s.read_exact(&mut d).unwrap();
        match be32(&h[12..]) {
            REP_INFO => {}
            REP_ACK => return s,
            t => panic!("NBD_OPT_GO {name}: reply {t:#x}"),
        }
    }
}

fn request(typ: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut m = [0u8; 28];
    m[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m[6..8].copy_from_slice(&typ.to_be_bytes());
    m[8..16].copy_from_slice(&cookie.to_be_bytes());
    m[16..24].copy_from_slice(&offset.to_be_bytes());
    m[24..28].copy_from_slice(&len.to_be_bytes());
    m
}

/// A simple reply's header: (error, cookie).
fn reply_header(s: &mut UnixStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC);
    (be32(&h[4..]), be64(&h[8..]))
}

use common::pattern;

/// A field of /proc/<pid>/status in KiB (VmRSS, …).
fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in {s}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A device `name` over a file of `data`, in the daemon's dir.
fn device(d: &Daemon, name: &str, data: &[u8]) -> PathBuf {
    let f = d.path(&format!("{name}.img"));
    std::fs::write(&f, data).unwrap();
    let table = format!("0 {} linear {} 0", data.len() / 512, f.display());
    d.dmsetup(&["create", name, "--table", &table]).ok();
    f
}

fn nbd_uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// The whole export, read with nbdcopy (a well-behaved client).
fn nbdcopy_from(d: &Daemon, sock: &Path, name: &str) -> Vec<u8> {
    let out = d.path(&format!("{name}.copy"));
    let _ = std::fs::remove_file(&out);
    d.run("nbdcopy", &[&nbd_uri(sock, name), out.to_str().unwrap()]).ok();
    std::fs::read(out).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Back-pressure.

/// A client sends many 32 MiB reads and reads no reply: the daemon stops reading it at its
/// per-connection bound (256 MiB of requests whose replies are not yet written) instead of
/// buffering every reply. Then the client reads all the replies, which are right, and the
/// daemon serves others.
#[test]
fn a_client_that_reads_no_replies_holds_the_daemon_at_its_bound() {
    let d = Daemon::start();
    let data = pattern(11, 64 * MIB);
    device(&d, "big", &data);
    let rss_before = status_kib(d.pid(), "VmRSS");

    const N: u64 = 40; // 1.25 GiB of replies.
    const LEN: usize = 32 * MIB;
    let offset = |i: u64| (i % 33) * MIB as u64;
    let mut s = go(&d.nbd_socket(), "big");
    let mut tx = s.try_clone().unwrap();
    // A thread sends: were the daemon to stop reading before it took all 40 headers, the
    // sender would block until the replies below are read.
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            tx.write_all(&request(CMD_READ, i, offset(i), LEN as u32)).unwrap();
        }
    });
    // Unbounded, the daemon would hold 1.25 GiB of replies within a second or so: watch it for
    // a while. Bounded, it never gets past the bound plus its buffer pool, whatever the timing.
    let mut peak = 0;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_millis(1500) {
        peak = peak.max(status_kib(d.pid(), "VmRSS"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let grown = peak.saturating_sub(rss_before) / 1024;
    assert!(grown < 450, "daemon RSS grew by {grown} MiB with nobody reading the replies");

    // Every reply, right.
    let mut seen = vec![false; N as usize];
    let mut buf = vec![0u8; LEN];
    for _ in 0..N {
        let (err, cookie) = reply_header(&mut s);
        assert_eq!(err, 0, "read {cookie}");
        assert!(!std::mem::replace(&mut seen[cookie as usize], true), "reply {cookie} twice");
        s.read_exact(&mut buf).unwrap();
        let o = offset(cookie) as usize;
        assert!(buf == data[o..o + LEN], "data of read {cookie}");
    }
    sender.join().unwrap();
    drop(s);

    // Others are served, and so is a new connection of the same client.
    assert!(nbdcopy_from(&d, &d.nbd_socket(), "big") == data);
    let mut s = go(&d.nbd_socket(), "big");
    s.write_all(&request(CMD_READ, 7, 4096, 4096)).unwrap();
    assert_eq!(reply_header(&mut s), (0, 7));
    let mut b = vec![0u8; 4096];
    s.read_exact(&mut b).unwrap();
    assert!(b == data[4096..8192]);
}

// ---------------------------------------------------------------------------------------------
// Out of descriptors.

/// Waits (against hangs only) until `cond` holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// More clients than the daemon has descriptors for: `accept` fails with EMFILE while they
/// wait in the backlog. The accept loop backs off instead of spinning and logs once; when the
/// clients leave, new ones are served.
#[test]
fn out_of_descriptors_the_accept_loop_backs_off_and_recovers() {
    let d = Daemon::start();
    let data = pattern(12, 4 * MIB);
    device(&d, "small", &data);
    let pid = d.pid();
    common::limit_fds(pid, common::fd_count(pid) + 8);

    // Each accepted client holds one descriptor while it haggles: 8 fit, the rest wait.
    let clients: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(d.nbd_socket()).unwrap()).collect();
    wait_for("the accept failure in the log", || d.log().contains("Too many open files"));

    let busy = common::cpu_share_over_a_second(pid);
    assert!(busy < 0.2, "the daemon used {:.0} % of a CPU while accept failed", busy * 100.0);
    // One warning (a second if this took over 5 s); a client that the daemon lost track of
    // (one of the test's own dmsetup connections closing late) may let one accept through.
    let log = d.log();
    let about: Vec<&str> = log.lines().filter(|l| l.contains("accept on") && l.contains("WARN")).collect();
    assert!((1..=2).contains(&about.len()), "log lines about accept:\n{about:#?}");

    drop(clients);
    let o = d.run("nbdinfo", &["--size", &nbd_uri(&d.nbd_socket(), "small")]);
    assert_eq!(o.ok().trim(), (4 * MIB).to_string());
    assert!(nbdcopy_from(&d, &d.nbd_socket(), "small") == data);
}

// ---------------------------------------------------------------------------------------------
// The socket file.

/// A `dmemu serve` started by hand (umask, expected failures).
struct Serve {
    child: std::process::Child,
    dir: PathBuf,
}

impl Serve {
    fn spawn(tag: &str, nbd: &Path, umask: Option<libc::mode_t>) -> Serve {
        use std::os::unix::process::CommandExt;
        let dir = std::env::temp_dir().join(format!("dmemu-limits-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = std::process::Command::new(common::bin());
        c.arg("serve").arg("--socket").arg(dir.join("control.sock")).arg("--run-dir").arg(&dir);
        c.arg("--nbd").arg(format!("unix:{}", nbd.display()));
        c.stdout(std::process::Stdio::null()).stderr(std::fs::File::create(dir.join("log")).unwrap());
        if let Some(m) = umask {
            // SAFETY: umask is async-signal-safe.
            unsafe {
                c.pre_exec(move || {
                    libc::umask(m);
                    Ok(())
                })
            };
        }
        Serve { child: c.spawn().unwrap(), dir }
    }

    /// Waits for the daemon to exit; its status and log.
    fn exit(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st, std::fs::read_to_string(self.dir.join("log")).unwrap());
            }
            assert!(Instant::now() < deadline, "the daemon did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Under umask 000 the NBD socket is 0600 from the moment it exists (it is created so, not
/// chmod'ed afterwards).
#[test]
fn the_socket_is_created_private_under_a_permissive_umask() {
    let dir = std::env::temp_dir().join(format!("dmemu-limits-{}-umask", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("nbd.sock");
    let _s = Serve::spawn("umask", &sock, Some(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mode = loop {
        if let Ok(m) = std::fs::symlink_metadata(&sock) {
            break m.permissions().mode();
        }
        assert!(Instant::now() < deadline, "no socket");
        std::hint::spin_loop();
    };
    assert_eq!(mode & 0o7777, 0o600, "mode {mode:o} when the socket appeared");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A socket file left by a daemon that died is replaced; one a live daemon answers on is an
/// error for the second daemon and stays the first's; a file that is no socket is left alone.
#[test]
fn stale_sockets_are_replaced_live_ones_and_other_files_refused() {
    let dir = std::env::temp_dir().join(format!("dmemu-limits-{}-stale", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("nbd.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(std::fs::symlink_metadata(&sock).unwrap().file_type().is_socket());

    let d = Daemon::start_with(&["--nbd", &format!("unix:{}", sock.display())]);
    let data = pattern(13, MIB);
    device(&d, "st", &data);
    assert_eq!(d.run("nbdinfo", &["--size", &nbd_uri(&sock, "st")]).ok().trim(), MIB.to_string());

    let (st, log) = Serve::spawn("live", &sock, None).exit();
    assert!(!st.success(), "a second daemon on a live socket: {log}");
    assert!(log.contains("already serves"), "{log}");
    assert!(nbdcopy_from(&d, &sock, "st") == data, "the first daemon still serves");

    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let (st, log) = Serve::spawn("file", &file, None).exit();
    assert!(!st.success(), "{log}");
    assert!(log.contains("not a socket"), "{log}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Draining (the API behind SIGTERM), against a daemon running in this process.

/// A daemon in this process (its control socket served by a thread), for `nbd::start` here.
fn in_process_daemon(dir: &Path) -> std::sync::Arc<dmemu::server::Daemon> {
    use dmemu::server;
    let (major, file_major) = server::free_majors(&std::fs::read_to_string("/proc/devices").unwrap_or_default());
    let cfg = server::ServeConfig {
        socket: dir.join("control.sock"),
        run_dir: dir.to_path_buf(),
        engine: dmemu::dm::EngineConfig { major, file_major },
        netbsd_errors: server::NetbsdErrors::Real,
        fuse_dir: None,
    };
    let engine = dmemu::dm::Engine::new(cfg.engine, dmemu::targets::registry(), Box::new(server::resolver::FsResolver));
    let daemon = server::Daemon::new(&cfg, engine).unwrap();
    let (d, sock) = (daemon.clone(), cfg.socket.clone());
    std::thread::spawn(move || d.serve(&sock));
    wait_for("the control socket", || UnixStream::connect(dir.join("control.sock")).is_ok());
    daemon
}

fn dmsetup(dir: &Path, args: &[&str]) {
    let o = std::process::Command::new(common::bin())
        .arg("exec")
        .arg("--socket")
        .arg(dir.join("control.sock"))
        .arg("--")
        .arg(common::DMSETUP)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "dmsetup {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Shutdown stops accepting and removes the socket, lets a write already read finish and its
/// reply reach the client, closes idle connections, and then returns.
#[test]
fn shutdown_answers_what_was_read_then_closes() {
    use dmemu::nbd::{Listen, Tuning};
    let dir = std::env::temp_dir().join(format!("dmemu-limits-{}-drain", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let daemon = in_process_daemon(&dir);
    let f = dir.join("slow.img");
    std::fs::write(&f, vec![0u8; MIB]).unwrap();
    // Reads at once, writes held 600 ms.
    let f = f.display();
    dmsetup(&dir, &["create", "slow", "--table", &format!("0 2048 delay {f} 0 0 {f} 0 600")]);
    let sock = dir.join("nbd.sock");
    let server = dmemu::nbd::start(daemon.io().clone(), &[Listen::Unix(sock.clone())], Tuning::default()).unwrap();

    let mut idle = go(&sock, "slow");
    let mut a = go(&sock, "slow");
    let payload = pattern(14, 4096);
    let mut m = request(CMD_WRITE, 1, 8192, 4096).to_vec();
    m.extend_from_slice(&payload);
    a.write_all(&m).unwrap();
    a.write_all(&request(CMD_READ, 2, 0, 512)).unwrap();
    // The read's reply means the write before it has been read by the server (requests are
    // read in order); it is held in the delay, or answered already.
    let mut replies = vec![reply_header(&mut a)];
    if replies[0].1 == 2 {
        let mut b = [0u8; 512];
        a.read_exact(&mut b).unwrap();
    }
    let drain = std::thread::spawn(move || {
        server.shutdown_within(Duration::from_secs(30));
        server
    });
    while replies.len() < 2 {
        let r = reply_header(&mut a);
        if r.1 == 2 {
            let mut b = [0u8; 512];
            a.read_exact(&mut b).unwrap();
        }
        replies.push(r);
    }
    replies.sort();
    assert_eq!(replies, vec![(0, 1), (0, 2)]);
    let mut rest = Vec::new();
    assert_eq!(a.read_to_end(&mut rest).unwrap(), 0, "then the server closes");
    assert_eq!(idle.read_to_end(&mut rest).unwrap(), 0, "an idle connection is closed");
    let server = drain.join().unwrap();
    assert!(!sock.exists(), "the socket file is removed");
    assert!(server.addrs() == [Listen::Unix(sock.clone())]);
    let mut on_file = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(dir.join("slow.img")).unwrap(), &mut on_file, 8192)
        .unwrap();
    assert!(on_file == payload, "the answered write is on its file");

    // A client that reads no replies does not hold shutdown beyond its grace.
    let server = dmemu::nbd::start(daemon.io().clone(), &[Listen::Unix(sock.clone())], Tuning::default()).unwrap();
    let mut c = go(&sock, "slow");
    for i in 0..64 {
        c.write_all(&request(CMD_READ, i, 0, MIB as u32)).unwrap();
    }
    // Its first reply: the server is at work on its requests.
    assert_eq!(reply_header(&mut c), (0, 0));
    server.shutdown_within(Duration::from_millis(200));
    assert!(!sock.exists());
    // What it gets then ends early: the connection was closed.
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.len() < 64 * MIB);
    let _ = std::fs::remove_dir_all(&dir);
}
