//! The command line: `dmemu exec` starting a daemon when none answers, and peer-credential checks.

mod common;

use common::{bin, Daemon, DMSETUP};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

/// Kills the daemon serving `socket` (found by its command line), by PID, and waits (bounded) for it
/// to go, so that it has unmounted its FUSE dir before the test removes the directory.
fn kill_daemon_for(socket: &str) {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.contains(&&b"serve"[..]) && args.contains(&socket.as_bytes()) {
            unsafe { libc::kill(pid, libc::SIGTERM) };
            // A dead process's cmdline reads empty (zombie) or is gone.
            for _ in 0..400 {
                if std::fs::read(e.path().join("cmdline")).unwrap_or_default().is_empty() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
        }
    }
}

#[test]
fn exec_starts_a_daemon_when_none_answers() {
    let dir = std::env::temp_dir().join(format!("dmemu-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let socket = dir.join("sub/control.sock");
    let sock = socket.to_string_lossy().into_owned();
    let run = |args: &[&str]| {
        Command::new(bin()).args(["exec", "--socket", &sock, "--", DMSETUP]).args(args).output().unwrap()
    };
    let out = run(&["version"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // The same daemon answers the second client: the device made by one is seen by the next.
    let created = run(&["create", "auto", "--table", "0 8 zero"]);
    let ls = run(&["ls"]);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    kill_daemon_for(&sock);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.ends_with("Driver version:    4.48.0\n"), "{stdout}");
    assert!(created.status.success(), "{created:?}");
    let ls = String::from_utf8_lossy(&ls.stdout).into_owned();
    assert!(ls.starts_with("auto\t("), "{ls}");
    assert_eq!(mode, 0o600);
    assert!(!socket.exists(), "SIGTERM removes the control socket");
    assert!(dir.join("sub/dmemu.log").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unprivileged_peers_may_read_but_not_change_state() {
    let d = Daemon::start();
    d.dmsetup(&["create", "mine", "--table", "0 8 zero"]).ok();
    // Let `nobody` reach the socket at all (the daemon makes it 0600).
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin())
            .args(["exec", "--socket"])
            .arg(&d.socket)
            .args(["--", DMSETUP])
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, out, _) = as_nobody(&["ls"]);
    assert_eq!((code, out.starts_with("mine\t(")), (Some(0), true));
    let (code, _, err) = as_nobody(&["remove", "mine"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Permission denied"), "{err}");
    d.dmsetup(&["info", "mine"]).ok();
    assert!(d.log().contains("caller is not privileged"));
}
