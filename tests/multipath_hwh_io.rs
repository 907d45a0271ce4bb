//! The `userspace` hardware handler driving real multipath IO: `dmemu hwh` answering each activation
//! (`pg_init`) and error decision (`err`) of a multipath device, and the device doing what the seed's
//! flags say (docs/multipath.md, "Hardware-handler hooks"): slow activations hold IO until they end,
//! failed ones fail the path, `MP_BYPASS_PG` bypasses the group, retries are repeated up to
//! `pg_init_retries`, and `MP_ERROR_IO` fails an IO instead of retrying it.
//!
//! Paths are dmemu `linear` devices over one shared file; a path fails IO once its table is swapped
//! for `error`. Nothing depends on timing: `dmemu hwh` prints each request and its answer, and the
//! tests wait for those lines.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::hwh::Hwh;
use common::{pattern, Daemon, Out};

const SECTORS: u64 = 8192;

/// `dmemu hwh ARGS`, once it has registered.
fn hwh(d: &Daemon, args: &[&str]) -> Hwh {
    let h = Hwh::start(&d.socket, args);
    let first = h.line();
    assert!(first.starts_with("registered "), "{first}");
    h
}

/// The shared file and paths `p1`, `p2` over it (their `major:minor`).
fn paths(d: &Daemon) -> (String, String, String) {
    let f = d.file("shared.img", SECTORS);
    for p in ["p1", "p2"] {
        d.dmsetup(&["create", p, "--table", &format!("0 {SECTORS} linear {f} 0")]).ok();
    }
    (f, d.dev_num("p1"), d.dev_num("p2"))
}

fn fail_path_device(d: &Daemon, name: &str) {
    d.dmsetup(&["load", name, "--table", &format!("0 {SECTORS} error")]).ok();
    d.dmsetup(&["resume", name]).ok();
}

/// `mp` over p1 (group 1) and p2 (group 2) with the userspace handler and `features`.
fn two_groups(d: &Daemon, features: &str, a: &str, b: &str) {
    let t = format!("0 {SECTORS} multipath {features} 1 userspace 2 1 round-robin 0 1 1 {a} 1 round-robin 0 1 1 {b} 1");
    d.dmsetup(&["create", "mp", "--table", &t]).ok();
}

fn status(d: &Daemon) -> String {
    d.dmsetup(&["status", "mp"]).ok().trim_end_matches('\n').to_owned()
}

fn write(d: &Daemon, offset: u64, data: &[u8]) -> Out {
    let src = d.path(&format!("w{offset}.bin"));
    std::fs::write(&src, data).unwrap();
    let cmd = format!("write -s {} {offset} {}", src.display(), data.len());
    d.run("qemu-io", &["-f", "raw", "-t", "none", "-c", &cmd, &d.nbd_uri("mp")])
}

fn spawn_write(d: &Daemon, offset: u64, data: &[u8]) -> Child {
    let src = d.path(&format!("w{offset}.bin"));
    std::fs::write(&src, data).unwrap();
    let cmd = format!("write -s {} {offset} {}", src.display(), data.len());
    Command::new("qemu-io")
        .args(["-f", "raw", "-t", "none", "-c", &cmd, &d.nbd_uri("mp")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn ok(o: &Out) {
    assert!(o.code == 0 && !o.stdout.contains("failed"), "IO failed: {o:#?}");
}

fn file_range(path: &str, offset: u64, len: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[offset as usize..offset as usize + len].to_vec()
}

#[test]
fn a_slow_activation_holds_io_until_it_succeeds() {
    let d = Daemon::start();
    let (f, a, b) = paths(&d);
    two_groups(&d, "0", &a, &b);
    assert!(d.dmsetup(&["table", "mp"]).ok().contains(" 1 userspace 2 1 "));
    let h = hwh(&d, &["mp", "--pg-init", "sleep=400:ok"]);
    let data = pattern(1, 8192);
    let mut w = spawn_write(&d, 4096, &data);
    // The write waits while the activation is under way: IO is queued (queue_io 1).
    std::thread::sleep(Duration::from_millis(100));
    if w.try_wait().unwrap().is_none() {
        assert!(status(&d).contains("multipath 2 1 1 0 2 1 A "), "{}", status(&d));
    }
    h.expect(&format!("pg_init mp 1 {a} 0 -> ok"));
    let out = w.wait_with_output().unwrap();
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"));
    assert_eq!(file_range(&f, 4096, 8192), data);
    assert_eq!(status(&d), format!("0 {SECTORS} multipath 2 0 1 0 2 1 A 0 1 0 {a} A 0 E 0 1 0 {b} A 0 "));
}

#[test]
fn a_failed_activation_fails_the_path_and_the_next_group_takes_over() {
    let d = Daemon::start();
    let (f, a, b) = paths(&d);
    two_groups(&d, "0", &a, &b);
    let h = hwh(&d, &["mp", "--pg-init", "fail", "--pg-init", "ok"]);
    ok(&write(&d, 0, &pattern(2, 4096)));
    h.expect(&format!("pg_init mp 1 {a} 0 -> fail"));
    h.expect(&format!("pg_init mp 2 {b} 0 -> ok"));
    assert_eq!(file_range(&f, 0, 4096), pattern(2, 4096));
    assert_eq!(status(&d), format!("0 {SECTORS} multipath 2 0 1 0 2 2 E 0 1 0 {a} F 1 A 0 1 0 {b} A 0 "));
}

#[test]
fn a_bypass_answer_bypasses_the_group() {
    let d = Daemon::start();
    let (f, a, b) = paths(&d);
    two_groups(&d, "0", &a, &b);
    let h = hwh(&d, &["mp", "--pg-init", "bypass", "--pg-init", "ok"]);
    ok(&write(&d, 0, &pattern(3, 4096)));
    h.expect(&format!("pg_init mp 1 {a} 0 -> bypass"));
    h.expect(&format!("pg_init mp 2 {b} 0 -> ok"));
    assert_eq!(file_range(&f, 0, 4096), pattern(3, 4096));
    // Group 1 is bypassed (D), its path still usable; group 2 is active.
    assert_eq!(status(&d), format!("0 {SECTORS} multipath 2 0 1 0 2 2 D 0 1 0 {a} A 0 A 0 1 0 {b} A 0 "));
    // If group 2's path goes, group 1 is used again: its activation is told it is bypassed, and a
    // clean one lifts the bypass.
    d.dmsetup(&["message", "mp", "0", "fail_path", &b]).ok();
    ok(&write(&d, 8192, &pattern(4, 4096)));
    h.expect(&format!("pg_init mp 1 {a} 1 -> ok"));
    assert!(status(&d).contains(&format!(" 2 1 A 0 1 0 {a} A 0 E 0 1 0 {b} F 1 ")), "{}", status(&d));
}

#[test]
fn retries_are_repeated_up_to_pg_init_retries_then_fail_the_path() {
    let d = Daemon::start();
    let (f, a, b) = paths(&d);
    // Two retries allowed: retry, retry, ok → the path is used.
    two_groups(&d, "2 pg_init_retries 2", &a, &b);
    let h = hwh(&d, &["mp", "--pg-init", "retry", "--pg-init", "retry", "--pg-init", "ok"]);
    ok(&write(&d, 0, &pattern(5, 4096)));
    for answer in ["retry", "retry", "ok"] {
        h.expect(&format!("pg_init mp 1 {a} 0 -> {answer}"));
    }
    // pg_init_count counts the three rounds.
    assert_eq!(status(&d), format!("0 {SECTORS} multipath 2 0 3 0 2 1 A 0 1 0 {a} A 0 E 0 1 0 {b} A 0 "));
    assert_eq!(file_range(&f, 0, 4096), pattern(5, 4096));
    drop(h);
    d.dmsetup(&["remove", "mp"]).ok();

    // None allowed (the default): the first retry fails the path.
    two_groups(&d, "0", &a, &b);
    let h = hwh(&d, &["mp", "--pg-init", "retry", "--pg-init", "ok"]);
    ok(&write(&d, 0, &pattern(6, 4096)));
    h.expect(&format!("pg_init mp 1 {a} 0 -> retry"));
    h.expect(&format!("pg_init mp 2 {b} 0 -> ok"));
    assert!(status(&d).contains(&format!("{a} F 1 A 0 1 0 {b} A 0 ")), "{}", status(&d));
}

#[test]
fn error_decisions_fail_the_path_or_the_io() {
    let d = Daemon::start();
    let (f, a, b) = paths(&d);
    d.dmsetup(&[
        "create",
        "mp",
        "--table",
        &format!("0 {SECTORS} multipath 0 1 userspace 1 1 round-robin 0 2 1 {a} 1 {b} 1"),
    ])
    .ok();
    let h = hwh(&d, &["mp", "--err", "error-io", "--err", "fail"]);
    // The group's activation (both paths) first.
    ok(&write(&d, 0, &pattern(7, 4096)));
    let mut lines = vec![h.line(), h.line()];
    lines.sort();
    let mut want = vec![format!("pg_init mp 1 {a} 0 -> ok"), format!("pg_init mp 1 {b} 0 -> ok")];
    want.sort();
    assert_eq!(lines, want);
    fail_path_device(&d, "p1");
    fail_path_device(&d, "p2");
    // MP_ERROR_IO: the IO fails with its error, and the path stays usable. (nbdcopy, which sends
    // no flush, so each failing write asks exactly one question.)
    let o = nbdcopy_write(&d, &pattern(8, 4096));
    assert_ne!(o.code, 0, "{o:#?}");
    let l = h.line();
    assert!(l.starts_with("err mp 1 ") && l.ends_with(" write 0 8 5 -> error-io"), "{l}");
    assert!(status(&d).contains(&format!("{a} A 0 {b} A 0 ")), "{}", status(&d));
    // MP_FAIL_PATH from then on: the write fails on one path, is retried on the other, fails
    // there too; no path is left, so it fails.
    let o = nbdcopy_write(&d, &pattern(8, 4096));
    assert_ne!(o.code, 0, "{o:#?}");
    assert!(h.line().ends_with(" write 0 8 5 -> fail"));
    assert!(h.line().ends_with(" write 0 8 5 -> fail"));
    assert!(status(&d).contains(&format!("{a} F 1 {b} F 1 ")), "{}", status(&d));
    assert!(file_range(&f, 0, 4096) == pattern(7, 4096), "a failed write changed the disk");
}

/// Writes `data` at offset 0 with nbdcopy (one write, no flush).
fn nbdcopy_write(d: &Daemon, data: &[u8]) -> Out {
    let src = d.path("nbdcopy.bin");
    std::fs::write(&src, data).unwrap();
    d.run("nbdcopy", &[src.to_str().unwrap(), &d.nbd_uri("mp")])
}

#[test]
fn without_a_program_activation_succeeds_and_errors_get_the_kernels_decision() {
    let d = Daemon::start();
    let (f, a, b) = paths(&d);
    two_groups(&d, "0", &a, &b);
    ok(&write(&d, 0, &pattern(9, 4096)));
    assert_eq!(file_range(&f, 0, 4096), pattern(9, 4096));
    fail_path_device(&d, "p1");
    ok(&write(&d, 4096, &pattern(10, 4096)));
    assert_eq!(file_range(&f, 4096, 4096), pattern(10, 4096));
    assert!(status(&d).contains(&format!("{a} F 1 A 0 1 0 {b} A 0 ")), "{}", status(&d));
}

#[test]
fn an_error_io_activation_fails_the_io_held_for_it() {
    let d = Daemon::start();
    let (f, a, b) = paths(&d);
    two_groups(&d, "0", &a, &b);
    let h = hwh(&d, &["mp", "--pg-init", "error-io", "--pg-init", "ok"]);
    let o = nbdcopy_write(&d, &pattern(11, 4096));
    assert_ne!(o.code, 0, "{o:#?}");
    h.expect(&format!("pg_init mp 1 {a} 0 -> error-io"));
    assert!(file_range(&f, 0, 4096).iter().all(|&x| x == 0), "the failed write reached the disk");
    // The path is not blamed: the next IO activates group 1 again, and goes through.
    let o = nbdcopy_write(&d, &pattern(12, 4096));
    assert_eq!(o.code, 0, "{o:#?}");
    h.expect(&format!("pg_init mp 1 {a} 0 -> ok"));
    assert_eq!(file_range(&f, 0, 4096), pattern(12, 4096));
    assert!(status(&d).contains(&format!(" 2 1 A 0 1 0 {a} A 0 E ")), "{}", status(&d));
}

#[test]
fn a_delayed_retry_waits_pg_init_delay_msecs() {
    let d = Daemon::start();
    let (f, a, b) = paths(&d);
    two_groups(&d, "4 pg_init_retries 1 pg_init_delay_msecs 300", &a, &b);
    assert!(d
        .dmsetup(&["table", "mp"])
        .ok()
        .contains("multipath 4 pg_init_retries 1 pg_init_delay_msecs 300 1 userspace 2 1 "));
    let h = hwh(&d, &["mp", "--pg-init", "retry-delayed", "--pg-init", "ok"]);
    let started = std::time::Instant::now();
    ok(&write(&d, 0, &pattern(13, 4096)));
    h.expect(&format!("pg_init mp 1 {a} 0 -> retry-delayed"));
    h.expect(&format!("pg_init mp 1 {a} 0 -> ok"));
    // The second activation came no sooner than the delay (a lower bound, not a speed claim).
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(file_range(&f, 0, 4096), pattern(13, 4096));
    assert!(status(&d).contains(&format!("multipath 2 0 2 0 2 1 A 0 1 0 {a} A 0 ")), "{}", status(&d));
}
