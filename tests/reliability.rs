//! The daemon under an operator's and an attacker's conditions (docs/reliability.md): socket
//! modes under a permissive umask, stopping on SIGTERM.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, Daemon};

/// Under umask 000 the control socket never exists with a mode wider than 0600: watched from
/// before the daemon starts until it answers.
#[test]
fn control_socket_is_created_with_its_final_mode() {
    let dir = std::env::temp_dir().join(format!("dmemu-test-mode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("control.sock");
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--nbd", "none", "--socket"]).arg(&socket).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut modes = Vec::new();
    loop {
        if let Ok(m) = std::fs::symlink_metadata(&socket) {
            modes.push(m.permissions().mode() & 0o777);
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "daemon did not start");
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(modes.iter().all(|&m| m == 0o600), "modes seen: {modes:?}");
}

/// SIGTERM: a log line says the daemon stops, the control socket goes away, and the devices come
/// back at the next start.
#[test]
fn sigterm_stops_with_a_log_line_and_keeps_devices_for_the_next_start() {
    let mut d = Daemon::start();
    d.dmsetup(&["create", "keep", "--table", "0 100 zero"]).ok();
    let status = d.restart_after(libc::SIGTERM);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    let log = d.log();
    assert!(log.contains("SIGTERM: stopping"), "{log}");
    assert!(log.contains("SIGTERM: stopped"), "{log}");
    assert_eq!(d.dmsetup(&["table", "keep"]).ok(), "0 100 zero \n");
}

/// More control clients than the daemon has descriptors for: the accept loop backs off instead
/// of spinning and logs once; when the clients leave, new ones are served.
#[test]
fn out_of_descriptors_the_control_accept_loop_backs_off_and_recovers() {
    let d = Daemon::start();
    d.dmsetup(&["create", "z", "--table", "0 8 zero"]).ok();
    let pid = d.pid();
    common::limit_fds(pid, common::fd_count(pid) + 4);
    // Each accepted client holds one descriptor (and the thread serving it): 4 fit, the rest wait.
    let clients: Vec<_> = (0..20).map(|_| std::os::unix::net::UnixStream::connect(&d.socket).unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains("Too many open files") {
        assert!(Instant::now() < deadline, "no accept failure logged");
        std::thread::sleep(Duration::from_millis(10));
    }
    let busy = common::cpu_share_over_a_second(pid);
    assert!(busy < 0.2, "the daemon used {:.0} % of a CPU while accept failed", busy * 100.0);
    let log = d.log();
    let about = log.lines().filter(|l| l.contains("control socket") && l.contains("WARN")).count();
    assert!((1..=2).contains(&about), "{log}");
    drop(clients);
    common::limit_fds(pid, 1024);
    assert_eq!(d.dmsetup(&["table", "z"]).ok(), "0 8 zero \n");
}

/// A command costs O(1) in the number of other devices: the daemon republishes only the devices a
/// command changed. Seen from outside: creating, loading, resuming, renaming and removing one
/// device rewrites no other device's state record or sysfs files. (The time per command against
/// the number of idle devices: `cargo bench --bench control -- --scale-only`.)
#[test]
fn a_command_touches_only_the_devices_it_changes() {
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start();
    for i in 0..50 {
        d.dmsetup(&["create", &format!("idle{i}"), "--table", "0 8 zero"]).ok();
    }
    let watched: Vec<std::path::PathBuf> = (0..50)
        .flat_map(|m| [format!("state/dm-{m}"), format!("sys/devices/virtual/block/dm-{m}/size")])
        .map(|p| d.path(&p))
        .collect();
    let stamp = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        (m.ino(), m.mtime(), m.mtime_nsec(), m.ctime_nsec())
    };
    let before: Vec<_> = watched.iter().map(|p| stamp(p)).collect();
    d.dmsetup(&["create", "busy", "--table", "0 8 zero"]).ok();
    d.dmsetup(&["load", "busy", "--table", "0 16 error"]).ok();
    d.dmsetup(&["resume", "busy"]).ok();
    d.dmsetup(&["rename", "busy", "busier"]).ok();
    d.dmsetup(&["remove", "busier"]).ok();
    let after: Vec<_> = watched.iter().map(|p| stamp(p)).collect();
    assert_eq!(before, after);
    // A fresh run directory is no error either (no state record yet).
    assert!(!d.log().contains(" ERROR "), "{}", d.log());
}

/// A second daemon started on a live one's socket and run directory refuses to start and leaves
/// the first one's sysfs tree and state record alone.
#[test]
fn a_second_daemon_on_a_live_socket_leaves_the_run_dir_alone() {
    let d = Daemon::start();
    d.dmsetup(&["create", "mine", "--table", "0 8 zero"]).ok();
    let o =
        Command::new(bin()).args(["serve", "--socket"]).arg(&d.socket).arg("--run-dir").arg(&d.dir).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already serves"), "{o:?}");
    assert_eq!(std::fs::read_to_string(d.path("sys/devices/virtual/block/dm-0/dm/name")).unwrap(), "mine\n");
    assert!(d.path("state/dm-0").exists());
    assert_eq!(d.dmsetup(&["table", "mine"]).ok(), "0 8 zero \n");
}
