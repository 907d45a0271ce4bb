//! What the benchmarks share: daemons in child processes, CPU pinning, resident memory, the work
//! directory. Results and the exact commands: docs/PERFORMANCE.md.

#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A benchmark's result: a message on failure.
pub type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The `dmemu` binary cargo built beside this benchmark.
pub const DMEMU: &str = env!("CARGO_BIN_EXE_dmemu");

/// A child process that dies with the bench.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Settles and reads the process's resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        std::thread::sleep(Duration::from_millis(300));
        vm_rss_kib(self.0.id()) * 1024
    }
}

/// Starts `program args… socket` (on CPU 0 only with `pin`) and waits until `socket` accepts.
pub fn spawn_server(program: &Path, args: &[&str], socket: &Path, pin: bool) -> Result<Proc> {
    let mut c = Command::new(program);
    c.args(args).arg(socket).stdout(Stdio::null()).stderr(Stdio::null());
    if pin {
        // SAFETY: sched_setaffinity is async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                pin_to_cpu(0);
                Ok(())
            });
        }
    }
    let p = Proc(c.spawn()?);
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket).is_err() {
        if Instant::now() > deadline {
            return Err(format!("server at {} did not start", socket.display()).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(p)
}

/// A `dmemu serve` logging only warnings, on `socket`.
pub fn spawn_daemon(socket: &Path, pin: bool) -> Result<Proc> {
    spawn_server(Path::new(DMEMU), &["serve", "--log", "warn", "--socket"], socket, pin)
}

/// Pins the calling thread (or, before exec, the process) to one CPU.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, applied to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Lets the calling thread run on every CPU again.
pub fn unpin() {
    // SAFETY: as above, all CPUs.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for i in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(i, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

pub fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

/// A fresh work directory for a benchmark under `dir` (default `/dev/shm`, a tmpfs like the
/// `/run` a production daemon uses; else the temp dir), announced with the machine it runs on.
pub fn work_dir(dir: Option<PathBuf>, tag: &str) -> std::io::Result<PathBuf> {
    let base = dir.unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    let dir = base.join(format!("dmemu-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        })
        .unwrap_or_default();
    println!(
        "machine: {} CPUs, {cpu}; run dir {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        dir.display()
    );
    Ok(dir)
}
