//! Shared harness: a real `dmemu serve` per test, the real `/usr/sbin/dmsetup` through the real
//! shim, backing files in a private directory.

#![allow(dead_code)]

pub mod fuse;
pub mod hwh;

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const DMSETUP: &str = "/usr/sbin/dmsetup";

pub struct Daemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Child,
    extra: Vec<String>,
}

/// The output of one client run.
#[derive(Debug)]
pub struct Out {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
}

/// The output of one client run, as bytes.
pub struct RawOut {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub code: i32,
}

/// Shown with non-UTF-8 bytes escaped, so a failed assertion stays readable.
impl std::fmt::Debug for RawOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawOut")
            .field("stdout", &self.stdout.escape_ascii().to_string())
            .field("stderr", &self.stderr.escape_ascii().to_string())
            .field("code", &self.code)
            .finish()
    }
}

impl Out {
    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        &self.stdout
    }
    /// Asserts failure and returns stderr.
    #[track_caller]
    pub fn err(&self) -> &str {
        assert_ne!(self.code, 0, "command unexpectedly succeeded: {self:#?}");
        &self.stderr
    }
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dmemu"))
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A daemon started with extra `dmemu serve` arguments (e.g. `--netbsd-errors=compat`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "dmemu-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("control.sock");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = Self::spawn(&dir, &socket, &extra);
        Daemon { dir, socket, child, extra }
    }

    fn spawn(dir: &Path, socket: &Path, extra: &[String]) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("daemon.log")).unwrap();
        let child = Command::new(bin())
            .args(["serve", "--socket"])
            .arg(socket)
            .arg("--run-dir")
            .arg(dir)
            .args(extra)
            .env("DMEMU_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dmemu serve");
        // Answered, not just bound: the socket is bound before the devices are restored and the
        // NBD listeners start, and HELLO is answered only once all of that is done.
        let deadline = Instant::now() + Duration::from_secs(20);
        while dmemu::client::daemon::hello(socket).is_none() {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    /// Sends `signal` to the daemon, waits for it to end, and starts a new one on the same run
    /// directory and socket (its log appended to the same file). Returns the old one's exit status.
    pub fn restart_after(&mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let status = self.child.wait().unwrap();
        self.child = Self::spawn(&self.dir, &self.socket, &self.extra);
        status
    }

    /// Runs `dmemu nbsd ARGS` (NetBSD's dmctl over the proplib ioctl) against this daemon, with
    /// `input` on stdin.
    pub fn nbsd(&self, args: &[&str], input: Option<&str>) -> Out {
        let mut c = Command::new(bin());
        c.arg("nbsd").arg("--socket").arg(&self.socket).args(args);
        run_with_input(c, input)
    }

    /// Runs `dmsetup ARGS` under `dmemu exec`.
    pub fn dmsetup(&self, args: &[&str]) -> Out {
        self.exec(DMSETUP, args, None)
    }

    /// Runs `dmsetup ARGS` with `input` on stdin.
    pub fn dmsetup_stdin(&self, args: &[&str], input: &str) -> Out {
        self.exec(DMSETUP, args, Some(input))
    }

    /// Runs `dmsetup ARGS` under `dmemu exec` with arguments that need not be UTF-8 (device
    /// names are bytes), keeping its output as bytes.
    pub fn dmsetup_os(&self, args: &[&OsStr]) -> RawOut {
        let o = self
            .exec_command(DMSETUP)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn dmsetup {args:?}: {e}"));
        RawOut { stdout: o.stdout, stderr: o.stderr, code: o.status.code().unwrap_or(-1) }
    }

    pub fn exec(&self, prog: &str, args: &[&str], input: Option<&str>) -> Out {
        let mut c = self.exec_command(prog);
        c.args(args);
        run_with_input(c, input)
    }

    /// `dmemu exec --socket SOCKET -- PROG`, for the caller to add arguments and run.
    pub fn exec_command(&self, prog: &str) -> Command {
        let mut c = Command::new(bin());
        c.arg("exec").arg("--socket").arg(&self.socket).arg("--").arg(prog);
        c
    }

    /// A backing file of `sectors` 512-byte sectors.
    pub fn file(&self, name: &str, sectors: u64) -> String {
        let p = self.dir.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(sectors * 512).unwrap();
        p.to_string_lossy().into_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The daemon's facts (major etc.) from a HELLO frame.
    pub fn hello(&self, key: &str) -> String {
        self.hello_reply().field(key).unwrap().to_owned()
    }

    /// The whole HELLO reply text.
    pub fn hello_text(&self) -> String {
        self.hello_reply().text
    }

    fn hello_reply(&self) -> dmemu::client::daemon::Hello {
        dmemu::client::daemon::hello(&self.socket).expect("the daemon answers HELLO")
    }

    pub fn major(&self) -> u32 {
        self.hello("major").parse().unwrap()
    }

    pub fn alive(&self) -> bool {
        UnixStream::connect(&self.socket).is_ok()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The daemon's process id (e.g. to look at its threads under /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("daemon log kept in {}:\n{}", self.dir.display(), self.log());
        }
    }
}

/// utime + stime of a process, in clock ticks (/proc/<pid>/stat fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces: fields count from after its closing parenthesis.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The share of one CPU a process uses over the next second (an idle loop's check, not a speed
/// measurement).
pub fn cpu_share_over_a_second(pid: u32) -> f64 {
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_millis(1000));
    let (wall, cpu) = (t0.elapsed(), cpu_ticks(pid) - c0);
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    cpu as f64 / hz / wall.as_secs_f64()
}

/// Big-endian fields of NBD messages.
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// Deterministic bytes (xorshift), different per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Lowers a process's open-file limit to `limit` descriptors.
pub fn limit_fds(pid: u32, limit: u64) {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid rlimit structs for a process of ours.
    assert_eq!(unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) }, 0);
    let new = libc::rlimit { rlim_cur: limit, rlim_max: old.rlim_max };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) }, 0);
}

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

/// NBD: the daemon's default export socket and plain (non-shim) client programs.
impl Daemon {
    /// `<run dir>/nbd.sock`, where `dmemu serve` exports devices when `--nbd` is not given.
    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    /// The NBD URI of a device's export on the default socket.
    pub fn nbd_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.nbd_socket().display())
    }

    /// `major:minor` of a device, as a table line names it.
    pub fn dev_num(&self, name: &str) -> String {
        self.dmsetup(&["info", "-c", "--noheadings", "-o", "major,minor", name]).ok().trim().replace(' ', "")
    }

    /// Runs a program as is (no shim), e.g. an NBD client.
    pub fn run(&self, prog: &str, args: &[&str]) -> Out {
        let o = Command::new(prog).args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{prog}: {e}"));
        Out {
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            code: o.status.code().unwrap_or(-1),
        }
    }
}

/// Runs a command with `input` (if any) on stdin, collecting its output.
fn run_with_input(mut c: Command, input: Option<&str>) -> Out {
    c.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("spawn {c:?}: {e}"));
    if let Some(i) = input {
        child.stdin.take().unwrap().write_all(i.as_bytes()).unwrap();
    }
    let o = child.wait_with_output().unwrap();
    Out {
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        code: o.status.code().unwrap_or(-1),
    }
}
