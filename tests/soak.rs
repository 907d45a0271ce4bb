//! Soak: one daemon, many concurrent clients cycling devices through their whole life with the
//! real dmsetup (create, reload, resume, rename, remove) while qemu-io writes and verifies bytes
//! over NBD on some of them. Afterwards no device is left, the daemon holds no more file
//! descriptors than before, and it still answers.
//!
//! Sized for CI (`DMEMU_SOAK_ROUNDS`, default 3 rounds of 8 clients). The backing files are a
//! fixed set reused every round: the data plane keeps a backing file open once IO touched it, so
//! the baseline is taken after one warm-up round has touched them all, and any growth after that is
//! another leak.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Daemon;

const CLIENTS: usize = 8;
/// Sectors per backing file (4 MiB).
const FILE_SECTORS: u64 = 8192;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The fd count once it stops moving towards `want` (NBD connections and client sockets close
/// on the daemon's threads shortly after the client exits); returns the last count seen.
fn settled_fds(pid: u32, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = fd_count(pid);
        if n <= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One device's life. Even clients put a linear table over their file and check bytes through
/// NBD between the resume and the rename; odd ones use `zero` and a file.
fn cycle(d: &Daemon, client: usize, round: usize, file: &str) {
    let name = format!("soak{client}-{round}");
    let renamed = format!("{name}-r");
    let half = FILE_SECTORS / 2;
    let first = if client.is_multiple_of(2) {
        format!("0 {FILE_SECTORS} linear {file} 0\n")
    } else {
        format!("0 {FILE_SECTORS} zero\n")
    };
    d.dmsetup_stdin(&["create", &name], &first).ok();
    // The reload swaps halves: the second half of the device now maps the file's first half.
    let second = format!("0 {half} linear {file} {half}\n{half} {half} linear {file} 0\n");
    d.dmsetup_stdin(&["reload", &name], &second).ok();
    d.dmsetup(&["resume", &name]).ok();
    if client.is_multiple_of(2) {
        let pattern = format!("{:#04x}", 0x10 + (client * 16 + round) % 0xe0);
        let uri = d.nbd_uri(&name);
        let io = d.run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {pattern} 2M 64k"),
                "-c",
                &format!("read -P {pattern} 2M 64k"),
                &uri,
            ],
        );
        let out = io.ok();
        assert!(!out.contains("failed") && out.contains("read 65536/65536"), "{name}: {out}");
        // The device's 2 MiB is the file's start after the reload: the bytes are there.
        let f = std::fs::read(file).expect("backing file");
        let want = u8::from_str_radix(pattern.trim_start_matches("0x"), 16).expect("hex");
        assert!(f[..64 << 10].iter().all(|&b| b == want), "{name}: bytes not in the file");
    }
    d.dmsetup(&["rename", &name, &renamed]).ok();
    d.dmsetup(&["remove", &renamed]).ok();
}

fn round(d: &Daemon, files: &[String], r: usize) {
    std::thread::scope(|s| {
        for (c, f) in files.iter().enumerate() {
            s.spawn(move || cycle(d, c, r, f));
        }
    });
}

#[test]
fn concurrent_device_lifecycles_leave_nothing_behind() {
    let d = Daemon::start();
    let pid = d.pid();
    let files: Vec<String> = (0..CLIENTS).map(|c| d.file(&format!("soak{c}.img"), FILE_SECTORS)).collect();
    let start_fds = fd_count(pid);
    round(&d, &files, 0);
    let baseline = settled_fds(pid, start_fds);
    let rounds = std::env::var("DMEMU_SOAK_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    for r in 1..=rounds {
        round(&d, &files, r);
    }
    let after = settled_fds(pid, baseline);
    eprintln!("daemon fds: {start_fds} at start, {baseline} after the warm-up round, {after} after {rounds} more");
    assert_eq!(after, baseline, "the daemon's fd count grew over {rounds} rounds");
    assert!(d.dmsetup(&["ls"]).ok().contains("No devices found"));
    assert!(d.alive());
    d.dmsetup(&["version"]).ok();
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "the daemon died");
}
