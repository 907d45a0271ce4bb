//! `dmemu`: the daemon and its helpers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use dmemu::dm::{Engine, EngineConfig};
use dmemu::server::{self, frame, resolver::FsResolver, Daemon, ServeConfig};

#[derive(Parser)]
#[command(name = "dmemu", version, about = "The device-mapper driver, in userspace")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground.
    Serve {
        /// Control socket path (default: $DMEMU_SOCKET, else a per-user default).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Directory for the sysfs tree and device nodes (default: the socket's directory).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Block major for dmemu's devices (default: the highest free one, as Linux allocates).
        #[arg(long)]
        major: Option<u32>,
        /// Log filter (tracing env-filter syntax), also read from DMEMU_LOG.
        #[arg(long)]
        log: Option<String>,
        /// How NETBSD_DM_IOCTL reports a failed command: `real` (its errno) or `compat` (as
        /// NetBSD: success, with EXISTS cleared and keys missing in the reply).
        #[arg(long, default_value = "real")]
        netbsd_errors: server::NetbsdErrors,
        /// NBD listener: `unix:PATH` or `tcp:HOST:PORT`, repeatable (default:
        /// `unix:<run dir>/nbd.sock`; `none` for no NBD). One export per active device.
        #[arg(long = "nbd", value_name = "LISTEN")]
        nbd: Vec<String>,
        /// Mount a FUSE directory here with one file per active device, which the shim serves as
        /// `/dev/mapper/<name>` and `/dev/dm-N` (default: none; `dmemu exec` asks for
        /// `<run dir>/fuse`). Unmounted on SIGTERM/SIGINT/SIGHUP.
        #[arg(long, value_name = "DIR")]
        fuse_dir: Option<PathBuf>,
    },
    /// Run a command against dmemu (LD_PRELOAD shim), starting a daemon first if none answers.
    Exec {
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Control-plane benchmarks (results: docs/PERFORMANCE.md).
    Bench(dmemu::bench::BenchArgs),
    /// Switch-target tools: `switch upload` loads a page table (docs/protocols.md).
    Switch(dmemu::switch_cli::SwitchArgs),
    /// Switch-target benchmarks (results: docs/PERFORMANCE.md, "switch").
    BenchSwitch(dmemu::bench_switch::BenchSwitchArgs),
    /// NetBSD's dmctl over the proplib ioctl (NETBSD_DM_IOCTL).
    Nbsd(dmemu::nbsd::NbsdArgs),
}

/// `$DMEMU_SOCKET`, else `/run/dmemu/control.sock` for root, else a per-user path.
fn default_socket() -> PathBuf {
    if let Some(s) = std::env::var_os("DMEMU_SOCKET") {
        return PathBuf::from(s);
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/dmemu/control.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => Path::new(&d).join("dmemu/control.sock"),
        None => PathBuf::from(format!("/tmp/dmemu-{uid}/control.sock")),
    }
}

/// Asks a daemon for its facts; `None` if nothing answers.
fn hello(socket: &Path) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(&frame::header(frame::Kind::Hello, 0)).ok()?;
    let mut h = [0u8; frame::HEADER_LEN];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_le_bytes(h[8..12].try_into().ok()?);
    let body = frame::read_payload(&mut s, len.min(64 * 1024)).ok()?;
    String::from_utf8(body).ok()
}

fn hello_field(hello: &str, key: &str) -> Option<String> {
    hello.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
}

#[allow(clippy::too_many_arguments)]
fn serve(
    socket: Option<PathBuf>,
    run_dir: Option<PathBuf>,
    major: Option<u32>,
    log: Option<String>,
    netbsd_errors: server::NetbsdErrors,
    nbd: Vec<String>,
    fuse_dir: Option<PathBuf>,
) -> anyhow_like::Result {
    let filter = log.or_else(|| std::env::var("DMEMU_LOG").ok()).unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let socket = socket.unwrap_or_else(default_socket);
    let socket = std::path::absolute(&socket)?;
    let run_dir = match run_dir {
        Some(d) => d,
        None => socket.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")),
    };
    std::fs::create_dir_all(&run_dir)?;
    let run_dir = run_dir.canonicalize()?;
    let proc_devices = std::fs::read_to_string("/proc/devices").unwrap_or_default();
    let (free, file_major) = server::free_majors(&proc_devices);
    let major = major.unwrap_or(free);
    let file_major = if file_major == major { free } else { file_major };
    let fuse_dir = fuse_dir.map(std::path::absolute).transpose()?;
    if let Some(d) = &fuse_dir {
        // Before any thread starts, so every thread inherits the blocked signals.
        dmemu::fuse::unmount_on_exit_signals(d.clone())?;
    }
    let cfg = ServeConfig {
        socket: socket.clone(),
        run_dir,
        engine: EngineConfig { major, file_major },
        netbsd_errors,
        fuse_dir: fuse_dir.clone(),
    };
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
    let nbd = dmemu::nbd::listeners(&nbd, &cfg.run_dir)?;
    dmemu::nbd::start(daemon.io().clone(), &nbd, dmemu::nbd::Tuning::default())?;
    daemon.serve(&socket)?;
    Ok(())
}

/// Starts `dmemu serve` in the background (own session, log in the run dir) and waits for it.
fn start_daemon(socket: &Path) -> anyhow_like::Result {
    // With /dev/mapper files (<run dir>/fuse) if this machine lets us mount FUSE, else without.
    start_daemon_with(socket, true).or_else(|_| start_daemon_with(socket, false))
}

fn start_daemon_with(socket: &Path, fuse: bool) -> anyhow_like::Result {
    let exe = std::env::current_exe()?;
    let dir = socket.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("dmemu.log"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("serve").arg("--socket").arg(socket);
    if fuse {
        cmd.arg("--fuse-dir").arg(dir.join("fuse"));
    }
    cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe; detaches the daemon from our terminal and process group.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if hello(socket).is_some() {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("daemon exited ({st}); see {}", dir.join("dmemu.log").display()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("daemon did not come up at {}", socket.display()).into())
}

/// The shim next to our own executable (`target/<profile>/libdmemu_preload.so`), or
/// `$DMEMU_PRELOAD`.
fn shim_path() -> anyhow_like::Result<PathBuf> {
    if let Some(p) = std::env::var_os("DMEMU_PRELOAD") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("libdmemu_preload.so");
    if p.exists() {
        Ok(p)
    } else {
        Err(format!("{} not found (build the workspace, or set DMEMU_PRELOAD)", p.display()).into())
    }
}

fn exec(socket: Option<PathBuf>, command: Vec<String>) -> anyhow_like::Result {
    let socket = std::path::absolute(socket.unwrap_or_else(default_socket))?;
    let info = match hello(&socket) {
        Some(h) => h,
        None => {
            start_daemon(&socket)?;
            hello(&socket).ok_or("daemon vanished")?
        }
    };
    let run_dir = PathBuf::from(hello_field(&info, "run_dir").ok_or("daemon did not report its run dir")?);
    let dev_dir = run_dir.join("dev");
    std::fs::create_dir_all(dev_dir.join("mapper"))?;
    let mut preload = shim_path()?.into_os_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD") {
        preload.push(":");
        preload.push(old);
    }
    let err = std::process::Command::new(&command[0])
        .args(&command[1..])
        .env("LD_PRELOAD", preload)
        .env("DMEMU_SOCKET", &socket)
        .env("DM_DEV_DIR", &dev_dir)
        .env("DM_DISABLE_UDEV", "1")
        .exec();
    Err(format!("{}: {err}", command[0]).into())
}

/// A tiny boxed-error result, enough for a CLI.
mod anyhow_like {
    pub type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Serve { socket, run_dir, major, log, netbsd_errors, nbd, fuse_dir } => {
            serve(socket, run_dir, major, log, netbsd_errors, nbd, fuse_dir)
        }
        Cmd::Exec { socket, command } => exec(socket, command),
        Cmd::Bench(args) => dmemu::bench::run(args),
        Cmd::Switch(args) => dmemu::switch_cli::run(args, default_socket()),
        Cmd::BenchSwitch(args) => dmemu::bench_switch::run(args),
        Cmd::Nbsd(args) => dmemu::nbsd::run(args, default_socket),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmemu: {e}");
            ExitCode::FAILURE
        }
    }
}
