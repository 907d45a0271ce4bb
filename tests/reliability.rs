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
