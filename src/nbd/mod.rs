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

mod conn;
mod handshake;
pub mod proto;

use std::fs::File;
use std::io::{self, BufReader};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;

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

fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("something already serves {}", path.display())));
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    // Data access is as privileged as the control socket.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Binds every listener (errors are the caller's), then serves each on its own thread.
pub fn start(io: DataPlane, listeners: &[Listen], tuning: Tuning) -> io::Result<()> {
    for l in listeners {
        match l {
            Listen::Unix(p) => {
                let lst = bind_unix(p)?;
                let io = io.clone();
                tracing::info!("serving NBD on {l}");
                std::thread::Builder::new().name("nbd-accept".into()).spawn(move || {
                    for s in lst.incoming() {
                        match s {
                            Ok(s) => spawn_connection(io.clone(), OwnedFd::from(s), tuning),
                            Err(e) => tracing::warn!("nbd accept: {e}"),
                        }
                    }
                })?;
            }
            Listen::Tcp(a) => {
                let lst = TcpListener::bind(a)?;
                let io = io.clone();
                tracing::info!("serving NBD on tcp:{}", lst.local_addr()?);
                std::thread::Builder::new().name("nbd-accept".into()).spawn(move || {
                    for s in lst.incoming() {
                        match s {
                            Ok(s) => {
                                // Replies are small and latency-bound: no Nagle delay.
                                let _ = s.set_nodelay(true);
                                spawn_connection(io.clone(), OwnedFd::from(s), tuning)
                            }
                            Err(e) => tracing::warn!("nbd accept: {e}"),
                        }
                    }
                })?;
            }
        }
    }
    Ok(())
}

/// Send buffer per connection: a 1 MiB read reply then goes out in one piece instead of five
/// (the kernel caps it at net.core.wmem_max).
const SEND_BUFFER: libc::c_int = 4 << 20;

fn spawn_connection(io: DataPlane, fd: OwnedFd, tuning: Tuning) {
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
    let r = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || connection(&io, File::from(fd), tuning));
    if let Err(e) = r {
        tracing::warn!("nbd: cannot start a connection thread: {e}");
    }
}

/// One client: handshake, then transmission until it leaves. Errors end only this connection.
fn connection(io: &DataPlane, sock: File, tuning: Tuning) {
    let mut r = BufReader::with_capacity(READ_BUFFER, &sock);
    match handshake::negotiate(io, &mut r, &sock) {
        Ok(Some(export)) => {
            tracing::debug!("nbd: client entered transmission on {} ({} bytes)", export.handle.name(), export.size);
            conn::transmit(&export, &sock, r, tuning);
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
