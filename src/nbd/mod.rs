//! The NBD front end: one export per active device, named after it, on Unix and TCP sockets.
//!
//! Written by hand to the protocol document (NetworkBlockDevice/nbd `doc/proto.md`) rather than
//! with a crate: the server side needs only the fixed-newstyle handshake and six commands, a few
//! hundred lines, and the available crates are client-oriented or pull in an async runtime.
//!
//! * Handshake ([`handshake`]): fixed newstyle; NBD_OPT_GO, INFO, LIST, EXPORT_NAME, ABORT,
//!   STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (`base:allocation`); anything else
//!   gets NBD_REP_ERR_UNSUP.
//! * Transmission ([`conn`]): READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, DISC and FUA,
//!   many requests in flight per connection, any number of connections.
//! * A connection that entered transmission holds its device open (as a mounted block device
//!   would): `dmsetup remove` then fails with EBUSY, `--deferred` removes it at disconnect. The
//!   export size is fixed per connection at negotiation, as NBD requires; new connections see the
//!   size after a resize. IO while the device is suspended waits for the resume and then runs
//!   against the new table (the data plane's gate).
//! * [`start`] binds the listeners and returns an [`NbdServer`], whose `shutdown` drains it;
//!   [`accept`] has the socket binding and accept backoff every listener of the daemon can use.

mod conn;
mod handshake;
pub mod proto;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::listen::{bind_unix, AcceptBackoff};

use crate::io::{DataPlane, IoHandle};

/// The default listener's file name in the daemon's run dir.
pub const DEFAULT_SOCKET: &str = "nbd.sock";

/// Bytes read from a socket at once: many small requests arrive in one `read`.
const READ_BUFFER: usize = 256 << 10;

/// Where to listen (`--nbd unix:PATH`, `--nbd tcp:HOST:PORT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            let addr = a
                .to_socket_addrs()
                .map_err(|e| format!("tcp:{a}: {e}"))?
                .next()
                .ok_or_else(|| format!("tcp:{a}: no address"))?;
            return Ok(Listen::Tcp(addr));
        }
        Err(format!("{s:?}: expected unix:PATH or tcp:HOST:PORT"))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// The listeners for `--nbd` values: none given means `unix:<run_dir>/nbd.sock`; `none` alone
/// means no NBD at all.
pub fn listeners(specs: &[String], run_dir: &Path) -> Result<Vec<Listen>, String> {
    match specs {
        [] => Ok(vec![Listen::Unix(run_dir.join(DEFAULT_SOCKET))]),
        [one] if one == "none" => Ok(Vec::new()),
        _ => specs.iter().map(|s| s.parse()).collect(),
    }
}

/// Server knobs, for the IO-mechanism comparison (docs/PERFORMANCE.md, "Data plane").
/// `workers`: worker threads per connection at most (`DMEMU_NBD_WORKERS`, default 8; 0 runs
/// every request on the connection's own thread, one at a time). `inline`: the largest write the
/// connection's thread runs itself while further requests are waiting (`DMEMU_NBD_INLINE`,
/// default 128 KiB); 0 hands every request to a worker. `splice`: big writes at queue depth 1
/// go through a pipe into the files (`DMEMU_NBD_SPLICE`, default 1).
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    pub workers: usize,
    pub inline: usize,
    pub splice: bool,
    /// Write payloads not yet buffered are taken with one `recv(MSG_WAITALL)`.
    pub waitall: bool,
    /// Bytes of idle request buffers a connection keeps for reuse.
    pub pool_bytes: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        Tuning {
            workers: var("DMEMU_NBD_WORKERS").unwrap_or(8),
            inline: var("DMEMU_NBD_INLINE").unwrap_or(128 << 10),
            splice: var("DMEMU_NBD_SPLICE").unwrap_or(1) != 0,
            waitall: var("DMEMU_NBD_WAITALL").unwrap_or(1) != 0,
            pool_bytes: var("DMEMU_NBD_POOL").unwrap_or(16 << 20),
        }
    }
}

/// A device as negotiated by one connection.
pub(crate) struct Export {
    handle: IoHandle,
    /// Fixed for the connection's lifetime (proto.md: the size sent at NBD_OPT_GO).
    size: u64,
    flags: u16,
    structured: bool,
    /// `base:allocation` was selected for this export: NBD_CMD_BLOCK_STATUS is allowed.
    meta: bool,
}

/// The running NBD server, as [`start`] returns it. Dropping it leaves the server running (the
/// daemon serves until it exits); [`NbdServer::shutdown`] drains it.
pub struct NbdServer {
    shared: Arc<Shared>,
    /// Where each listener is bound (a TCP port 0 resolved).
    addrs: Vec<Listen>,
    accepters: Mutex<Vec<JoinHandle<()>>>,
    /// The Unix socket files this server created, with their (device, inode) to recognize them.
    files: Vec<(PathBuf, (u64, u64))>,
    /// Written once at shutdown: the accept loops poll its other end.
    wake: OwnedFd,
}

/// What the accept loops, the connections and the handle share.
struct Shared {
    stopping: AtomicBool,
    /// Connections by id: their socket fds, for shutting them down. A connection leaves before
    /// its fd is closed (under this lock), so an fd found here is still that connection's.
    conns: Mutex<(HashMap<u64, RawFd>, u64)>,
    /// Signalled when a connection leaves.
    left: Condvar,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, (HashMap<u64, RawFd>, u64)> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shuts every connection's socket down `how` (libc::SHUT_RD, SHUT_RDWR); how many there are.
    fn shut_all(&self, how: libc::c_int) -> usize {
        let c = self.conns();
        for &fd in c.0.values() {
            // SAFETY: registered fds stay open while registered (see `conns`).
            unsafe { libc::shutdown(fd, how) };
        }
        c.0.len()
    }

    /// Waits until no connection is left or `deadline` passes; whether none is left.
    fn wait_empty(&self, deadline: Instant) -> bool {
        let mut c = self.conns();
        while !c.0.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            c = self.left.wait_timeout(c, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }
}

/// A connection's place in [`Shared::conns`]; leaving it (on drop) must come before the socket
/// is closed.
struct Registered {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.conns().0.remove(&self.id);
        self.shared.left.notify_all();
    }
}

impl NbdServer {
    /// How long [`Self::shutdown`] waits for replies to be written before it closes the
    /// connections that still hold some.
    pub const GRACE: Duration = Duration::from_secs(5);
    /// How long it then waits for their threads to leave.
    const AFTER_CLOSE: Duration = Duration::from_secs(1);

    /// The listeners as bound (a `tcp:…:0` shows its port).
    pub fn addrs(&self) -> &[Listen] {
        &self.addrs
    }

    /// Drains the server, for SIGTERM: [`Self::shutdown_within`] with [`Self::GRACE`].
    pub fn shutdown(&self) {
        self.shutdown_within(Self::GRACE)
    }

    /// Drains the server and returns:
    ///
    /// 1. stops accepting: the listeners are closed and the Unix socket files this server created
    ///    removed (unless something else has replaced them meanwhile);
    /// 2. every connection stops reading requests (its socket is shut down for reading: a client
    ///    in the middle of sending a write's payload is cut off there, and requests it sent that
    ///    were not yet read get no reply);
    /// 3. waits up to `grace` until every request already read has been run and its reply
    ///    written, and the connections have closed;
    /// 4. connections still open then (a client that reads no replies, IO still running) are
    ///    shut down both ways: their unwritten replies are dropped. A write whose reply was not
    ///    sent may or may not be on its file; every write whose reply was sent already is. Waits
    ///    up to a further second for their threads, then returns anyway (IO held by a suspended
    ///    device can stay blocked; the process is about to exit).
    ///
    /// Calling it again (or from several threads) repeats the waits and returns.
    pub fn shutdown_within(&self, grace: Duration) {
        let start = Instant::now();
        if !self.shared.stopping.swap(true, Ordering::SeqCst) {
            // SAFETY: a valid pipe fd and one byte.
            unsafe { libc::write(self.wake.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
        for t in std::mem::take(&mut *self.accepters.lock().unwrap_or_else(|p| p.into_inner())) {
            let _ = t.join();
        }
        for (path, id) in &self.files {
            if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *id) {
                let _ = std::fs::remove_file(path);
            }
        }
        let n = self.shared.shut_all(libc::SHUT_RD);
        tracing::info!("NBD: listeners closed; draining {n} connections");
        if self.shared.wait_empty(start + grace) {
            return;
        }
        let n = self.shared.shut_all(libc::SHUT_RDWR);
        tracing::warn!("NBD: closing {n} connections that still hold replies after {grace:?}");
        if !self.shared.wait_empty(Instant::now() + Self::AFTER_CLOSE) {
            tracing::warn!("NBD: {} connections still busy at shutdown", self.shared.conns().0.len());
        }
    }
}

/// Binds every listener (errors are the caller's), then serves each on its own thread.
pub fn start(io: DataPlane, listeners: &[Listen], tuning: Tuning) -> io::Result<NbdServer> {
    let mut fds = [0; 2];
    // SAFETY: an array of two ints for the new fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are new and ours.
    let (wake_rd, wake) = unsafe { (Arc::new(OwnedFd::from_raw_fd(fds[0])), OwnedFd::from_raw_fd(fds[1])) };
    let shared = Arc::new(Shared {
        stopping: AtomicBool::new(false),
        conns: Mutex::new((HashMap::new(), 0)),
        left: Condvar::new(),
    });
    let mut bound: Vec<(OwnedFd, Listen)> = Vec::new();
    let mut files = Vec::new();
    for l in listeners {
        match l {
            Listen::Unix(p) => {
                // Data access is as privileged as the control socket.
                let lst = bind_unix(p, 0o600)?;
                let m = std::fs::symlink_metadata(p)?;
                files.push((p.clone(), (m.dev(), m.ino())));
                bound.push((lst.into(), l.clone()));
            }
            Listen::Tcp(a) => {
                let lst = TcpListener::bind(a)?;
                let at = Listen::Tcp(lst.local_addr()?);
                bound.push((lst.into(), at));
            }
        }
    }
    let mut accepters = Vec::new();
    let mut addrs = Vec::new();
    for (fd, at) in bound {
        tracing::info!("serving NBD on {at}");
        let tcp = matches!(at, Listen::Tcp(_));
        let (io, shared, wake_rd, what) = (io.clone(), shared.clone(), wake_rd.clone(), format!("NBD {at}"));
        let t = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&io, &shared, fd, tcp, wake_rd.as_raw_fd(), what, tuning))?;
        accepters.push(t);
        addrs.push(at);
    }
    Ok(NbdServer { shared, addrs, accepters: Mutex::new(accepters), files, wake })
}

/// Accepts connections until the server stops, backing off when `accept` fails (out of
/// descriptors: the pending connection stays readable and would fail again at once).
fn accept_loop(
    io: &DataPlane,
    shared: &Arc<Shared>,
    lst: OwnedFd,
    tcp: bool,
    wake: RawFd,
    what: String,
    tuning: Tuning,
) {
    // Nonblocking: readiness comes from poll, which also watches for the shutdown.
    // SAFETY: a valid fd.
    unsafe { libc::fcntl(lst.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut backoff = AcceptBackoff::new(what);
    let mut wait = -1;
    loop {
        let mut p = [
            libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: lst.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // After a failure only the wake-up is watched: the listener is readable all along.
        let n = if wait < 0 { 2 } else { 1 };
        // SAFETY: valid pollfds.
        unsafe { libc::poll(p.as_mut_ptr(), n, wait) };
        if shared.stopping.load(Ordering::SeqCst) || p[0].revents != 0 {
            return;
        }
        wait = -1;
        // SAFETY: a valid listening fd; no address wanted.
        let fd =
            unsafe { libc::accept4(lst.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            let d = backoff.failed(&e);
            if !d.is_zero() {
                wait = d.as_millis() as libc::c_int;
            }
            continue;
        }
        backoff.succeeded();
        // SAFETY: a new fd, ours.
        let s = unsafe { OwnedFd::from_raw_fd(fd) };
        if tcp {
            // Replies are small and latency-bound: no Nagle delay.
            let one: libc::c_int = 1;
            // SAFETY: a valid socket and an int option.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        spawn_connection(io.clone(), shared, s, tuning);
    }
}

/// Send buffer per connection: a 1 MiB read reply then goes out in one piece instead of five
/// (the kernel caps it at net.core.wmem_max).
const SEND_BUFFER: libc::c_int = 4 << 20;

fn spawn_connection(io: DataPlane, shared: &Arc<Shared>, fd: OwnedFd, tuning: Tuning) {
    let reg = {
        let mut c = shared.conns();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        c.1 += 1;
        let id = c.1;
        c.0.insert(id, fd.as_raw_fd());
        Registered { shared: shared.clone(), id }
    };
    // SAFETY: a valid socket fd and an int option of the size we pass.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&SEND_BUFFER as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let client = Client { reg, sock: File::from(fd) };
    let r = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || {
        // The whole struct, not its fields one by one (closures capture fields otherwise).
        let c = client;
        connection(&io, &c.sock, &c.reg.shared.stopping, tuning)
    });
    if let Err(e) = r {
        tracing::warn!("nbd: cannot start a connection thread: {e}");
    }
}

/// A connection's socket and registration, which leaves the registry before the socket closes
/// (fields drop in order), however the thread ends.
struct Client {
    reg: Registered,
    sock: File,
}

/// One client: handshake, then transmission until it leaves or `stop` is set. Errors end only
/// this connection.
fn connection(io: &DataPlane, sock: &File, stop: &AtomicBool, tuning: Tuning) {
    let mut r = BufReader::with_capacity(READ_BUFFER, sock);
    match handshake::negotiate(io, &mut r, sock) {
        Ok(Some(export)) => {
            tracing::debug!("nbd: client entered transmission on {} ({} bytes)", export.handle.name(), export.size);
            conn::transmit(&export, sock, r, stop, tuning);
        }
        Ok(None) => tracing::debug!("nbd: client aborted the handshake"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => tracing::debug!("nbd: client left during the handshake"),
        Err(e) => tracing::info!("nbd: handshake ended: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs_parse() {
        assert_eq!("unix:/run/x.sock".parse::<Listen>(), Ok(Listen::Unix("/run/x.sock".into())));
        assert_eq!("tcp:127.0.0.1:10809".parse::<Listen>(), Ok(Listen::Tcp("127.0.0.1:10809".parse().unwrap())));
        assert!("tcp:nonsense".parse::<Listen>().is_err());
        assert!("10809".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
        let run = Path::new("/run/dmemu");
        assert_eq!(listeners(&[], run), Ok(vec![Listen::Unix("/run/dmemu/nbd.sock".into())]));
        assert_eq!(listeners(&["none".into()], run), Ok(vec![]));
        assert_eq!(listeners(&["unix:/a".into(), "tcp:127.0.0.1:1".into()], run).unwrap().len(), 2);
    }
}
