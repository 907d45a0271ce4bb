//! Listening sockets: binding a Unix socket with its final mode, and backing off when `accept`
//! fails for want of resources. Shared by every accept loop of the daemon.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Paces an accept loop after failures, so that running out of descriptors (EMFILE, ENFILE) or
/// memory (ENOBUFS, ENOMEM) does not turn the loop into a busy spin that logs every turn: the
/// pending connection stays in the backlog and `accept` fails again at once until something is
/// closed.
///
/// Use: after each failed `accept`, call [`failed`](Self::failed) and wait the duration it returns
/// before the next `accept` (zero: retry at once; the call has logged what needs logging);
/// after each success call [`succeeded`](Self::succeeded). The wait grows from
/// [`MIN`](Self::MIN), doubling, to [`MAX`](Self::MAX) while failures last and starts over after
/// a success. Failures log one warning, then at most one per [`LOG_EVERY`](Self::LOG_EVERY) with
/// the count of failures since the last line, across successes too: at the descriptor limit
/// every client that leaves lets one more in and the next `accept` fails again.
///
/// ```ignore
/// let mut backoff = AcceptBackoff::new("control socket");
/// for s in listener.incoming() {
///     match s {
///         Ok(s) => { backoff.succeeded(); serve(s) }
///         Err(e) => std::thread::sleep(backoff.failed(&e)),
///     }
/// }
/// ```
#[derive(Debug)]
pub struct AcceptBackoff {
    what: String,
    /// The next wait; zero after a success.
    delay: Duration,
    /// Failures since the last log line, and when it was written.
    unreported: u64,
    logged: Option<Instant>,
    /// Failures since the last success.
    episode: u64,
}

impl AcceptBackoff {
    pub const MIN: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_secs(1);
    pub const LOG_EVERY: Duration = Duration::from_secs(5);

    /// `what` names the listener in log lines.
    pub fn new(what: impl Into<String>) -> Self {
        AcceptBackoff { what: what.into(), delay: Duration::ZERO, unreported: 0, logged: None, episode: 0 }
    }

    /// After a failed `accept`: how long to wait before the next one. A client that left before
    /// being accepted (ECONNABORTED, EPROTO), a signal (EINTR) or a nonblocking listener with
    /// nothing pending (EAGAIN) retries at once and logs nothing; anything else backs off, the
    /// shortage of resources this is for and errors not foreseen alike (none may spin).
    pub fn failed(&mut self, e: &io::Error) -> Duration {
        if let Some(libc::ECONNABORTED | libc::EPROTO | libc::EINTR | libc::EAGAIN) = e.raw_os_error() {
            return Duration::ZERO;
        }
        self.episode += 1;
        self.unreported += 1;
        let now = Instant::now();
        if self.logged.is_none_or(|t| now.duration_since(t) >= Self::LOG_EVERY) {
            match self.unreported {
                1 => tracing::warn!("accept on {}: {e}; retrying with backoff", self.what),
                n => tracing::warn!("accept on {}: {e} ({n} failures since the last report)", self.what),
            }
            self.logged = Some(now);
            self.unreported = 0;
        }
        self.delay = if self.delay.is_zero() { Self::MIN } else { (self.delay * 2).min(Self::MAX) };
        self.delay
    }

    /// After a successful `accept`: the episode (if any) is over.
    pub fn succeeded(&mut self) {
        if self.episode > 0 {
            tracing::debug!("accept on {} works again after {} failures", self.what, self.episode);
        }
        self.delay = Duration::ZERO;
        self.episode = 0;
    }
}

/// Binds a listening Unix socket at `path` whose file never has more permissions than `mode`,
/// whatever the umask, and then has exactly `mode`.
///
/// A socket file already at `path` is replaced if nobody answers on it (a daemon that died
/// left it; `connect` says ECONNREFUSED); if something answers, this fails with `AddrInUse`.
/// Anything else at `path` (a regular file, a directory) is left alone and is an error.
pub fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let name = path.display();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{name} exists and is not a socket")));
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("something already serves {name}"))),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => tracing::info!("replacing the stale socket {name}"),
            },
            Err(e) => return Err(io::Error::new(e.kind(), format!("{name}: {e}"))),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // SAFETY: all zeroes is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: not a usable socket path")));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Linux creates the socket file with the mode of the socket's inode less the umask
    // (net/unix/af_unix.c, unix_bind): set on the fd first, the file never exists with wider
    // permissions. The umask itself is process-wide and other threads run: not to be touched.
    // SAFETY: valid fd; a sockaddr_un of the size passed.
    let ok = unsafe {
        libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) == 0
            && libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            ) == 0
            && libc::listen(fd.as_raw_fd(), libc::SOMAXCONN) == 0
    };
    if !ok {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("binding {name}: {e}")));
    }
    // The umask may have taken bits `mode` grants (the owner's own): give them back. This only
    // ever widens to `mode`.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(UnixListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = AcceptBackoff::new("test");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let waits: Vec<_> = (0..10).map(|_| b.failed(&emfile)).collect();
        assert_eq!(waits[0], AcceptBackoff::MIN);
        assert_eq!(waits[1], AcceptBackoff::MIN * 2);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(waits[9], AcceptBackoff::MAX);
        assert_eq!(b.failed(&io::Error::from_raw_os_error(libc::ECONNABORTED)), Duration::ZERO);
        b.succeeded();
        assert_eq!(b.failed(&io::Error::from_raw_os_error(libc::ENFILE)), AcceptBackoff::MIN);
    }

    #[test]
    fn bind_unix_replaces_stale_sockets_only() {
        let dir = std::env::temp_dir().join(format!("dmemu-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.sock");
        let l = bind_unix(&p, 0o600).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(bind_unix(&p, 0o600).unwrap_err().kind(), io::ErrorKind::AddrInUse, "live");
        drop(l);
        assert!(p.exists(), "closing leaves the file: stale now");
        let _l = bind_unix(&p, 0o600).unwrap();
        let f = dir.join("file");
        std::fs::write(&f, b"keep").unwrap();
        assert_eq!(bind_unix(&f, 0o600).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&f).unwrap(), b"keep");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
