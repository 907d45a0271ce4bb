//! Finding the daemon: its socket path, its facts (`HELLO`), and starting one in the background
//! when none answers (what `dmemu exec` does).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dmemu_frame::{self as frame, hello, Kind};

use super::ClientError;

/// `$DMEMU_SOCKET`, else `/run/dmemu/control.sock` for root, else a per-user path
/// (docs/control-socket.md).
pub fn default_socket() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let path = frame::default_socket(uid, |name| std::env::var_os(name).map(OsString::into_vec));
    PathBuf::from(OsString::from_vec(path))
}

/// What a daemon says of itself in its `HELLO_REPLY`.
#[derive(Clone, Debug)]
pub struct Hello {
    pub text: String,
}

impl Hello {
    /// The value of `key` (one of [`dmemu_frame::hello`]'s keys).
    pub fn field(&self, key: &str) -> Option<&str> {
        hello::field(self.text.as_bytes(), key).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn run_dir(&self) -> Option<PathBuf> {
        self.field(hello::RUN_DIR).map(PathBuf::from)
    }
}

/// Asks the daemon at `socket` for its facts; `None` if nothing answers within 5 seconds.
pub fn hello(socket: &Path) -> Option<Hello> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    frame::write_frame(&mut s, Kind::Hello, &[]).ok()?;
    let (h, body) = frame::read_frame(&mut s, frame::MAX_HELLO_REPLY).ok()?;
    if h.kind != Kind::HelloReply as u16 {
        return None;
    }
    Some(Hello { text: String::from_utf8(body).ok()? })
}

/// The daemon at `socket`, started in the background (`dmemu serve`, its own session, the log in
/// `<socket dir>/dmemu.log`) if none answers: with `/dev/mapper` files (`<socket dir>/fuse`) if this
/// machine lets us mount FUSE, else without. `exe` is the `dmemu` binary.
pub fn hello_or_start(exe: &Path, socket: &Path) -> Result<Hello, ClientError> {
    if let Some(h) = hello(socket) {
        return Ok(h);
    }
    start(exe, socket, true).or_else(|_| start(exe, socket, false))?;
    hello(socket).ok_or_else(|| ClientError::Protocol(format!("the daemon at {} vanished", socket.display())))
}

fn start(exe: &Path, socket: &Path, fuse: bool) -> Result<(), ClientError> {
    let dir = socket.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let log_path = dir.join("dmemu.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
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
            return Err(ClientError::Protocol(format!("daemon exited ({st}); see {}", log_path.display())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(ClientError::Protocol(format!("daemon did not come up at {}", socket.display())))
}

/// The shim: `$DMEMU_PRELOAD`, else `libdmemu_preload.so` beside `exe` (`target/<profile>/`).
pub fn preload_path(exe: &Path) -> Result<PathBuf, ClientError> {
    if let Some(p) = std::env::var_os("DMEMU_PRELOAD") {
        return Ok(PathBuf::from(p));
    }
    let p = exe.with_file_name("libdmemu_preload.so");
    if p.exists() {
        Ok(p)
    } else {
        Err(ClientError::Invalid(format!("{} not found (build the workspace, or set DMEMU_PRELOAD)", p.display())))
    }
}
