//! `dmemu serve`: the daemon in the foreground, logging to standard error.

use std::path::{Path, PathBuf};

use dmemu::client::daemon::default_socket;
use dmemu::dm::{Engine, EngineConfig};
use dmemu::server::{self, resolver::FsResolver, Daemon, ServeConfig};

use super::Result;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Control socket path (default: $DMEMU_SOCKET, else a per-user default).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Directory for the sysfs tree and device nodes (default: the socket's directory).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Block major for dmemu's devices (default: the highest free one, as Linux allocates).
    #[arg(long)]
    pub major: Option<u32>,
    /// Log filter (tracing env-filter syntax), also read from DMEMU_LOG.
    #[arg(long)]
    pub log: Option<String>,
    /// How NETBSD_DM_IOCTL reports a failed command: `real` (its errno) or `compat` (as
    /// NetBSD: success, with EXISTS cleared and keys missing in the reply).
    #[arg(long, default_value = "real")]
    pub netbsd_errors: server::NetbsdErrors,
    /// NBD listener: `unix:PATH` or `tcp:HOST:PORT`, repeatable (default:
    /// `unix:<run dir>/nbd.sock`; `none` for no NBD). One export per active device.
    #[arg(long = "nbd", value_name = "LISTEN")]
    pub nbd: Vec<String>,
    /// Mount a FUSE directory here with one file per active device, which the shim serves as
    /// `/dev/mapper/<name>` and `/dev/dm-N` (default: none; `dmemu exec` asks for
    /// `<run dir>/fuse`). Unmounted on SIGTERM/SIGINT/SIGHUP.
    #[arg(long, value_name = "DIR")]
    pub fuse_dir: Option<PathBuf>,
}

pub fn run(a: ServeArgs) -> Result {
    let filter = a.log.or_else(|| std::env::var("DMEMU_LOG").ok()).unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let socket = std::path::absolute(a.socket.unwrap_or_else(default_socket))?;
    let run_dir = match a.run_dir {
        Some(d) => d,
        None => socket.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")),
    };
    std::fs::create_dir_all(&run_dir)?;
    let run_dir = run_dir.canonicalize()?;
    let proc_devices = std::fs::read_to_string("/proc/devices").unwrap_or_default();
    let (free, file_major) = server::free_majors(&proc_devices);
    let major = a.major.unwrap_or(free);
    let file_major = if file_major == major { free } else { file_major };
    let fuse_dir = a.fuse_dir.map(std::path::absolute).transpose()?;
    // Before any thread starts, so every thread inherits the blocked signals.
    let signals = server::signals::block_exit_signals();
    let cfg = ServeConfig {
        socket: socket.clone(),
        run_dir,
        engine: EngineConfig { major, file_major },
        netbsd_errors: a.netbsd_errors,
        fuse_dir: fuse_dir.clone(),
    };
    // Bound first: a second daemon on a live one's socket stops here, before it touches the run
    // directory (sysfs tree, state record). Clients that connect meanwhile wait in the backlog
    // until the devices are restored and the accept loop runs.
    let listener = server::bind_control(&socket)?;
    let engine = Engine::new(cfg.engine, dmemu::targets::registry(), Box::new(FsResolver));
    let daemon = Daemon::new(&cfg, engine)?;
    tracing::info!("block major {major}, file pseudo-major {file_major}, run dir {}", cfg.run_dir.display());
    // Mounted before the socket answers, so a client that sees fuse_dir in HELLO finds the files.
    let _fuse = match &fuse_dir {
        Some(d) => {
            let m = dmemu::fuse::mount(d, daemon.io().clone())
                .map_err(|e| format!("mounting FUSE on {}: {e}", d.display()))?;
            tracing::info!("device files on {}", m.dir().display());
            Some(m)
        }
        None => None,
    };
    let nbd = dmemu::nbd::listeners(&a.nbd, &cfg.run_dir)?;
    let nbd = dmemu::nbd::start(daemon.io().clone(), &nbd, dmemu::nbd::Tuning::default())?;
    {
        // What an exit signal does (docs/reliability.md, "Stopping"): no new control clients,
        // NBD requests already read answered (so every acknowledged write is on its file), the
        // FUSE mount detached (a dead daemon's mount would fail every access with ENOTCONN).
        let (socket, fuse_dir) = (socket.clone(), fuse_dir.clone());
        server::signals::on_exit_signal(signals, move |sig| {
            tracing::info!("{}: stopping", server::signals::name(sig));
            let _ = std::fs::remove_file(&socket);
            nbd.shutdown();
            if let Some(d) = &fuse_dir {
                dmemu::fuse::unmount(d);
            }
            tracing::info!(
                "{}: stopped; the state record keeps every device for the next start",
                server::signals::name(sig)
            );
        })?;
    }
    daemon.accept_loop(listener)?;
    Ok(())
}
