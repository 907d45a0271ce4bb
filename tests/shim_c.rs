//! A C program that speaks raw ioctls on /dev/mapper/control, run under the shim: poll readiness
//! after DM_DEV_ARM_POLL and DM_DEV_WAIT interrupted by a signal.

mod common;

use common::Daemon;
use std::process::Command;

fn build_c(d: &Daemon) -> String {
    let out = d.path("control").to_string_lossy().into_owned();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/control.c");
    let st = Command::new("cc").args(["-O1", "-Wall", "-o", &out, src]).status().expect("cc");
    assert!(st.success());
    out
}

#[test]
fn arm_poll_makes_the_control_fd_readable_on_events() {
    let d = Daemon::start();
    let prog = build_c(&d);
    let out = d.exec(&prog, &["armpoll"], None);
    assert_eq!(
        out.ok(),
        "armed, readable=0\nafter create, readable=1\nlist ok, still readable=1\nrearmed, readable=0\n"
    );
}

#[test]
fn dev_wait_interrupted_by_a_signal_returns_eintr() {
    let d = Daemon::start();
    d.dmsetup(&["create", "w", "--table", "0 8 zero"]).ok();
    let prog = build_c(&d);
    let out = d.exec(&prog, &["waitintr", "w"], None);
    assert_eq!(out.ok(), "wait returned -1 errno Interrupted system call\nnext ioctl returned 0, name w\n");
}
