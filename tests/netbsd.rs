//! The NetBSD proplib face against a real daemon: `dmemu nbsd` (dmctl) and dmsetup sharing one
//! daemon, the error modes, and a C program that uses nothing but
//! `ioctl(fd, NETBSD_DM_IOCTL, &plistref)` through the shim.

mod common;

use common::Daemon;
use std::process::Command;

#[test]
fn nbsd_and_dmsetup_see_each_others_devices() {
    let d = Daemon::start();
    let major = d.major();
    let file_major = d.hello("file_major");
    let f = d.file("disk", 64);

    // Made through proplib, seen by dmsetup.
    d.nbsd(&["create", "a"], None).ok();
    d.nbsd(&["reload", "a"], Some(&format!("0 16 linear {f} 0\n16 16 zero\n"))).ok();
    d.nbsd(&["resume", "a"], None).ok();
    assert_eq!(d.dmsetup(&["ls"]).ok(), format!("a\t({major}:0)\n"));
    assert_eq!(d.dmsetup(&["table", "a"]).ok(), format!("0 16 linear {file_major}:0 0\n16 16 zero \n"));
    assert!(d.dmsetup(&["info", "a"]).ok().contains("State:             ACTIVE\n"));

    // Made through dmsetup (stacked on a), seen by proplib.
    d.dmsetup(&["create", "b", "--uuid", "U-b", "--table", "0 8 linear /dev/mapper/a 0"]).ok();
    assert_eq!(d.nbsd(&["ls"], None).ok(), "Device name: a, device minor: 0 \nDevice name: b, device minor: 1 \n");
    assert_eq!(
        d.nbsd(&["info", "b"], None).ok(),
        "Printing Device info for:\nDevice name: \t\tb\nDevice uuid: \t\tU-b\nDevice minor: \t\t1\nDevice target number: \t1\nDevice flags: \t\t32\n"
    );
    assert_eq!(d.nbsd(&["table", "b"], None).ok(), "Getting device table for device b\n         0          8 linear\n");
    assert_eq!(
        d.nbsd(&["status", "a"], None).ok(),
        "Getting device table for device a\n         0         16 linear\n        16         16 zero\n"
    );
    assert_eq!(d.nbsd(&["deps", "b"], None).ok(), format!("Device b dependencies \nmajor: {major} minor: 0\n"));

    // State changes through one face show through the other.
    d.nbsd(&["suspend", "b"], None).ok();
    assert!(d.dmsetup(&["info", "b"]).ok().contains("State:             SUSPENDED\n"));
    d.nbsd(&["resume", "b"], None).ok();
    assert!(d.dmsetup(&["info", "b"]).ok().contains("State:             ACTIVE\n"));
    d.nbsd(&["rename", "b", "c"], None).ok();
    assert!(d.dmsetup(&["info", "c"]).ok().contains("UUID: U-b\n"));
    d.dmsetup(&["suspend", "c"]).ok();
    assert!(d.nbsd(&["info", "c"], None).ok().ends_with("Device flags: \t\t34\n"));
    d.dmsetup(&["resume", "c"]).ok();

    // a is held by c's table: EBUSY, reported as dmctl's err(3) does.
    let busy = d.nbsd(&["remove", "a"], None);
    assert_eq!(busy.err(), "dmemu: dmctl_dev_remove: libdm_task_run failed.: Device or resource busy\n");
    d.dmsetup(&["remove", "c"]).ok();
    d.nbsd(&["remove", "a"], None).ok();
    assert_eq!(d.dmsetup(&["ls"]).ok(), "No devices found\n");
    assert_eq!(d.nbsd(&["ls"], None).ok(), "");
}

#[test]
fn nbsd_version_targets_and_table_files() {
    let d = Daemon::start();
    assert_eq!(d.nbsd(&["version"], None).ok(), "Library protocol version 4:0:0\nKernel protocol version 4:16:0\n");
    let targets = d.nbsd(&["targets"], None);
    // Registration order, each record followed by a blank line.
    assert!(
        targets.ok().starts_with("Target name: error\nTarget version 1.7.0\n\nTarget name: linear\n"),
        "{targets:?}"
    );
    let table = d.path("t.table");
    std::fs::write(&table, "0 8 zero\n\n8 8 error\n").unwrap();
    d.nbsd(&["create", "t"], None).ok();
    d.nbsd(&["reload", "t", table.to_str().unwrap()], None).ok();
    d.nbsd(&["resume", "t"], None).ok();
    assert_eq!(d.dmsetup(&["table", "t"]).ok(), "0 8 zero \n8 8 error \n");
    let bad = d.nbsd(&["reload", "t"], Some("0 8\n"));
    assert!(bad.err().contains("table line 1"), "{bad:?}");
}

#[test]
fn errors_are_real_errnos_by_default_and_dump_plist_shows_both_sides() {
    let d = Daemon::start();
    let missing = d.nbsd(&["info", "nope"], None);
    assert_eq!(missing.err(), "dmemu: dmctl_get_device_info: libdm_task_run failed: No such file or directory\n");
    d.nbsd(&["create", "x"], None).ok();
    let again = d.nbsd(&["create", "x"], None);
    assert_eq!(again.err(), "dmemu: dmctl_create_dev: libdm_task_run failed.: File exists\n");
    let bad_name = d.nbsd(&["create", "a/b"], None);
    assert!(bad_name.err().ends_with("Invalid argument\n"), "{bad_name:?}");

    let dump = d.nbsd(&["--dump-plist", "info", "x"], None);
    dump.ok();
    let (req, reply) = dump.stderr.split_once("--- reply: ret 0 errno 0 (").expect("reply dumped");
    assert!(req.starts_with("--- request (392 bytes) ---\n<?xml version=\"1.0\""), "{req}");
    assert!(req.contains("\t<key>command</key>\n\t<string>info</string>\n"), "{req}");
    assert!(reply.contains("\t<key>minor</key>\n\t<integer>0x0</integer>\n"), "{reply}");
    assert!(reply.contains("\t\t<integer>0x10</integer>\n"), "version 4.16.0: {reply}");
    assert!(reply.ends_with("</plist>\n"), "{reply}");
}

#[test]
fn compat_mode_returns_success_as_netbsd_does() {
    let d = Daemon::start_with(&["--netbsd-errors=compat"]);
    // Not found: success, and only the reply tells (no minor, EXISTS clear, no uuid).
    let missing = d.nbsd(&["info", "nope"], None);
    assert_eq!(
        missing.ok(),
        "Printing Device info for:\nDevice name: \t\tnope\nDevice uuid: \t\t(null)\nDevice minor: \t\t0\nDevice target number: \t0\nDevice flags: \t\t0\n"
    );
    d.nbsd(&["create", "x"], None).ok();
    d.nbsd(&["create", "x"], None).ok();
    let dump = d.nbsd(&["--dump-plist", "remove", "nope"], None);
    dump.ok();
    assert!(dump.stderr.contains("--- reply: ret 0 errno 0"), "{dump:?}");
    assert_eq!(d.nbsd(&["ls"], None).ok(), "Device name: x, device minor: 0 \n");
    // The Linux face is unaffected by the mode.
    assert!(d.dmsetup(&["info", "nope"]).err().contains("Device does not exist."));
}

#[test]
fn c_program_speaks_only_the_netbsd_ioctl_through_the_shim() {
    let d = Daemon::start();
    let f = d.file("disk", 64);
    let prog = d.path("netbsd").to_string_lossy().into_owned();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/netbsd.c");
    let st = Command::new("cc").args(["-O1", "-Wall", "-Werror", "-o", &prog, src]).status().expect("cc");
    assert!(st.success());
    let out = d.exec(&prog, &["nb", &f], None);
    let file_major = d.hello("file_major");
    assert_eq!(
        out.ok(),
        format!(
            "version 4.16.0\n\
             create: minor 0 flags 0x4\n\
             reload: flags 0x44\n\
             resume: flags 0x4\n\
             info: target_count 2 flags 0x24\n\
             table: [linear {file_major}:0 0] [zero ]\n\
             remove: ok\n\
             info after remove: -1 No such file or directory\n\
             oversized: -1 Argument list too long\n"
        )
    );
    assert_eq!(d.dmsetup(&["ls"]).ok(), "No devices found\n");
}

#[test]
fn unprivileged_peers_get_eperm_for_privileged_commands() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start();
    d.nbsd(&["create", "mine"], None).ok();
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(common::bin())
            .args(["nbsd", "--socket"])
            .arg(&d.socket)
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // kauth lets anyone list and query, and only the privileged change state (§2.1).
    assert_eq!(as_nobody(&["ls"]), (Some(0), "Device name: mine, device minor: 0 \n".into(), String::new()));
    let (code, _, err) = as_nobody(&["remove", "mine"]);
    assert_eq!(
        (code, err.as_str()),
        (Some(1), "dmemu: dmctl_dev_remove: libdm_task_run failed.: Operation not permitted\n")
    );
    assert_eq!(d.nbsd(&["ls"], None).ok(), "Device name: mine, device minor: 0 \n");
}

#[test]
fn an_oversized_plist_gets_e2big_from_a_raw_client_and_the_daemon_goes_on() {
    let d = Daemon::start();
    let mut c = dmemu::client::Client::connect(&d.socket).unwrap();
    let mut xml = vec![b' '; 200 * 1024];
    xml.push(0);
    let r = c.plist(&xml).unwrap();
    assert_eq!((r.ret, r.errno), (-1, libc::E2BIG));
    // The same connection is still in step and serves the next request.
    let ok = c.run(&dmemu::client::IoctlBuf::new(dmemu::ioctl::DmCmd::Version)).unwrap();
    assert_eq!(ok.ret, 0);
    assert!(d.log().contains("beyond proplib's copy-in limit"));
}
