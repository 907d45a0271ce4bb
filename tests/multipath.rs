//! The `multipath` target (linux-dm-abi.md §4) through the real dmsetup and real NBD clients.
//!
//! Paths are dmemu `linear` devices over one shared file, so every byte is checkable whichever
//! path carried it; a path is made to fail by swapping its table for `error` (as a cable pull
//! would), and to come back by swapping `linear` back in.

mod common;

use common::{pattern, Daemon, Out};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every device here: 4 MiB.
const SECTORS: u64 = 8192;

/// A shared backing file and `n` linear paths over it (`p1`…`pn`); returns the file and the
/// paths' `major:minor`.
fn paths(d: &Daemon, n: usize) -> (String, Vec<String>) {
    let f = d.file("shared.img", SECTORS);
    let devs = (1..=n)
        .map(|i| {
            let name = format!("p{i}");
            d.dmsetup(&["create", &name, "--table", &format!("0 {SECTORS} linear {f} 0")]).ok();
            d.dev_num(&name)
        })
        .collect();
    (f, devs)
}

/// Swaps path `pN`'s table: `error` (the path fails every IO) or `linear` over the shared file.
fn set_path(d: &Daemon, i: usize, file: &str, working: bool) {
    let name = format!("p{i}");
    let table = if working { format!("0 {SECTORS} linear {file} 0") } else { format!("0 {SECTORS} error") };
    d.dmsetup(&["load", &name, "--table", &table]).ok();
    d.dmsetup(&["resume", &name]).ok();
}

fn create(d: &Daemon, name: &str, params: &str) -> Out {
    d.dmsetup(&["create", name, "--table", &format!("0 {SECTORS} multipath {params}")])
}

fn status(d: &Daemon, name: &str) -> String {
    d.dmsetup(&["status", name]).ok().trim_end_matches('\n').to_owned()
}

fn table(d: &Daemon, name: &str) -> String {
    d.dmsetup(&["table", name]).ok().trim_end_matches('\n').to_owned()
}

fn message(d: &Daemon, name: &str, msg: &[&str]) -> Out {
    let mut args = vec!["message", name, "0"];
    args.extend_from_slice(msg);
    d.dmsetup(&args)
}

fn qemu_io(d: &Daemon, name: &str, cmds: &[&str]) -> Out {
    let mut args = vec!["-f", "raw", "-t", "none"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let uri = d.nbd_uri(name);
    args.push(&uri);
    d.run("qemu-io", &args)
}

/// qemu-io in the background. It flushes when it exits, and a flush waits while the device is
/// suspended or held with no path, as on a kernel.
fn qemu_io_spawn(d: &Daemon, name: &str, cmds: &[&str]) -> Child {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-t", "none"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(d.nbd_uri(name)).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().expect("qemu-io")
}

fn io_ok(o: &Out) {
    assert!(o.code == 0 && !o.stdout.contains("failed"), "IO failed: {o:#?}");
}

/// Writes `data` at `offset` through the device with nbdcopy-free qemu-io: a file holds the
/// bytes and `write -s` sends them.
fn write_bytes(d: &Daemon, name: &str, offset: u64, data: &[u8]) -> Out {
    let src = d.path(&format!("src-{offset}.bin"));
    std::fs::write(&src, data).unwrap();
    let cmd = format!("write -s {} {offset} {}", src.display(), data.len());
    qemu_io(d, name, &[&cmd])
}

fn file_range(path: &str, offset: u64, len: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[offset as usize..offset as usize + len].to_vec()
}

#[test]
fn table_and_status_round_trip_for_every_selector() {
    let d = Daemon::start();
    let (_f, p) = paths(&d, 2);
    let (a, b) = (&p[0], &p[1]);
    // (table line, TABLE output, INFO output right after load)
    let cases = [
        (
            format!("0 0 1 1 round-robin 0 2 1 {a} 1 {b} 1"),
            format!("0 0 1 1 round-robin 0 2 1 {a} 1 {b} 1 "),
            format!("2 1 0 0 1 1 E 0 2 0 {a} A 0 {b} A 0 "),
        ),
        (
            format!("0 0 1 1 queue-length 0 2 1 {a} 1 {b} 1"),
            format!("0 0 1 1 queue-length 0 2 1 {a} 1 {b} 1 "),
            format!("2 1 0 0 1 1 E 0 2 1 {a} A 0 0 {b} A 0 0 "),
        ),
        (
            format!("0 0 1 1 service-time 0 2 2 {a} 1 50 {b} 1 100"),
            format!("0 0 1 1 service-time 0 2 2 {a} 1 50 {b} 1 100 "),
            format!("2 1 0 0 1 1 E 0 2 2 {a} A 0 0 50 {b} A 0 0 100 "),
        ),
        (
            format!("0 0 1 1 historical-service-time 0 2 1 {a} 1 {b} 1"),
            format!("0 0 1 1 historical-service-time 2 972 0 2 1 {a} 0 {b} 0 "),
            String::new(),
        ),
        (
            format!("1 queue_if_no_path 0 2 1 round-robin 0 1 1 {a} 1 round-robin 0 1 1 {b} 1"),
            format!("1 queue_if_no_path 0 2 1 round-robin 0 1 1 {a} 1 round-robin 0 1 1 {b} 1 "),
            format!("2 1 0 0 2 1 E 0 1 0 {a} A 0 E 0 1 0 {b} A 0 "),
        ),
        (
            format!("5 pg_init_retries 3 pg_init_delay_msecs 100 queue_if_no_path 1 alua 2 1 round-robin 0 1 1 {a} 1 round-robin 0 1 1 {b} 1"),
            format!("5 queue_if_no_path pg_init_retries 3 pg_init_delay_msecs 100 1 alua 2 1 round-robin 0 1 1 {a} 1 round-robin 0 1 1 {b} 1 "),
            format!("2 1 0 0 2 1 E 0 1 0 {a} A 0 E 0 1 0 {b} A 0 "),
        ),
        (
            // Handler arguments are not reproduced; bio mode forces retain_attached_hw_handler and
            // ignores the handler.
            format!("2 queue_mode bio 2 emc 1 1 1 round-robin 0 1 1 {a} 1"),
            format!("3 retain_attached_hw_handler queue_mode bio 0 1 1 round-robin 0 1 1 {a} 1 "),
            format!("2 1 0 0 1 1 E 0 1 0 {a} A 0 "),
        ),
        (
            format!("3 retain_attached_hw_handler queue_mode mq 3 rdac a b 1 1 round-robin 0 1 1 {a} 1"),
            format!("1 retain_attached_hw_handler 1 rdac 1 1 round-robin 0 1 1 {a} 1 "),
            format!("2 1 0 0 1 1 E 0 1 0 {a} A 0 "),
        ),
        (String::from("0 0 0 0"), String::from("0 0 0 0 "), String::from("2 1 0 0 0 0 ")),
    ];
    for (i, (line, want_table, want_info)) in cases.iter().enumerate() {
        let name = format!("mp{i}");
        create(&d, &name, line).ok();
        assert_eq!(table(&d, &name), format!("0 {SECTORS} multipath {want_table}"), "case {i}: {line}");
        if !want_info.is_empty() {
            assert_eq!(status(&d, &name), format!("0 {SECTORS} multipath {want_info}"), "case {i}: {line}");
        }
    }
    // Paths may be named by path; tables show major:minor.
    create(&d, "byname", "0 0 1 1 round-robin 0 1 1 /dev/mapper/p1 1").ok();
    assert_eq!(table(&d, "byname"), format!("0 {SECTORS} multipath 0 0 1 1 round-robin 0 1 1 {a} 1 "));
}

#[test]
fn constructor_errors_are_the_kernels() {
    let d = Daemon::start();
    let (_f, p) = paths(&d, 1);
    let a = &p[0];
    let bad = [
        format!("9 a b c d e f g h i 0 1 1 round-robin 0 1 1 {a} 1"), // > 8 feature args
        format!("1 no_such_feature 0 1 1 round-robin 0 1 1 {a}"),
        format!("2 pg_init_retries 0 0 1 1 round-robin 0 1 0 {a}"), // retries 1..50
        format!("2 pg_init_retries 51 0 1 1 round-robin 0 1 0 {a}"),
        format!("2 pg_init_delay_msecs 60001 0 1 1 round-robin 0 1 0 {a}"),
        format!("2 queue_mode xyz 0 1 1 round-robin 0 1 0 {a}"),
        format!("0 1 nosuchhandler 1 1 round-robin 0 1 0 {a}"),
        format!("0 0 1 0 round-robin 0 1 0 {a}"), // groups but no initial group
        String::from("0 0 0 1"),                  // initial group without groups
        format!("0 0 2 1 round-robin 0 1 0 {a}"), // group count mismatch
        format!("0 0 1 1 no-such-selector 0 1 0 {a}"),
        format!("0 0 1 1 round-robin 0 0 0 {a}"), // 0 paths
        format!("0 0 1 1 round-robin 0 1025 0 {a}"),
        format!("0 0 1 1 round-robin 0 2 0 {a}"), // not enough path parameters
        format!("0 0 1 1 round-robin 0 1 2 {a} 1 1"), // round-robin takes at most one
        format!("0 0 1 1 round-robin 0 1 1 {a} x"),
        format!("0 0 1 1 service-time 0 1 2 {a} 1 101"),
        format!("0 0 1 1 historical-service-time 1 1024 1 1 {a} 1"),
        String::from("0 0 1 1 round-robin 0 1 0 /no/such/device"),
        format!("0 0 1 1 round-robin 5 1 0 {a}"), // selector args beyond the line
        String::from("0 0 1 1"),                  // not enough priority group arguments
    ];
    for (i, line) in bad.iter().enumerate() {
        let o = create(&d, &format!("bad{i}"), line);
        assert_ne!(o.code, 0, "accepted: {line}");
        assert!(o.stderr.contains("Invalid argument") || o.stderr.contains("No such device"), "{line}: {o:#?}");
        d.dmsetup(&["remove", &format!("bad{i}")]);
    }
    // Singleton and immutable.
    let two = format!("0 {SECTORS} multipath 0 0 1 1 round-robin 0 1 0 {a}\n{SECTORS} 8 zero\n");
    assert_ne!(d.dmsetup_stdin(&["create", "two"], &two).code, 0);
    create(&d, "mp", &format!("0 0 1 1 round-robin 0 1 0 {a}")).ok();
    let o = d.dmsetup(&["load", "mp", "--table", &format!("0 {SECTORS} linear {a} 0")]);
    assert!(o.stderr.contains("Invalid argument"), "immutable target replaced: {o:#?}");
    // A bio-based device cannot take a request-based table.
    d.dmsetup(&["create", "lin", "--table", &format!("0 {SECTORS} zero")]).ok();
    let o = d.dmsetup(&["load", "lin", "--table", &format!("0 {SECTORS} multipath 0 0 1 1 round-robin 0 1 0 {a}")]);
    assert!(o.stderr.contains("Invalid argument"), "device type changed: {o:#?}");
    // ... but a bio-mode multipath table is bio-based.
    d.dmsetup(&[
        "load",
        "lin",
        "--table",
        &format!("0 {SECTORS} multipath 2 queue_mode bio 0 1 1 round-robin 0 1 0 {a}"),
    ])
    .ok();
    assert!(d.alive());
}

#[test]
fn messages_change_path_and_group_state_and_raise_events() {
    let d = Daemon::start();
    let (_f, p) = paths(&d, 2);
    let (a, b) = (&p[0], &p[1]);
    create(&d, "mp", &format!("0 0 2 1 round-robin 0 1 1 {a} 1 round-robin 0 1 1 {b} 1")).ok();
    let event = |d: &Daemon| -> u64 {
        d.dmsetup(&["info", "-c", "--noheadings", "-o", "events", "mp"]).ok().trim().parse().unwrap()
    };
    let e0 = event(&d);
    message(&d, "mp", &["fail_path", a]).ok();
    assert_eq!(status(&d, "mp"), format!("0 {SECTORS} multipath 2 1 0 0 2 1 E 0 1 0 {a} F 1 E 0 1 0 {b} A 0 "));
    // `dmsetup wait` for the event after e0 returns (the event was raised).
    d.dmsetup(&["wait", "mp", &e0.to_string()]).ok();
    assert!(event(&d) > e0);
    // Already failed: a silent no-op (the count stays).
    message(&d, "mp", &["fail_path", a]).ok();
    message(&d, "mp", &["FAIL_PATH", "/dev/mapper/p1"]).ok();
    assert!(status(&d, "mp").contains(&format!("{a} F 1 ")));
    message(&d, "mp", &["reinstate_path", a]).ok();
    assert!(status(&d, "mp").contains(&format!("{a} A 1 ")));
    message(&d, "mp", &["disable_group", "1"]).ok();
    assert!(status(&d, "mp").contains(" 2 1 D 0 1 0 "), "{}", status(&d, "mp"));
    message(&d, "mp", &["enable_group", "1"]).ok();
    message(&d, "mp", &["switch_group", "2"]).ok();
    // The requested group shows as pg_num until IO goes there.
    assert!(status(&d, "mp").contains(" 0 2 2 E "), "{}", status(&d, "mp"));
    io_ok(&qemu_io(&d, "mp", &["read 0 4k"]));
    assert_eq!(status(&d, "mp"), format!("0 {SECTORS} multipath 2 0 0 0 2 2 E 0 1 0 {a} A 1 A 0 1 0 {b} A 0 "));
    message(&d, "mp", &["fail_if_no_path"]).ok();
    message(&d, "mp", &["queue_if_no_path"]).ok();
    assert!(table(&d, "mp").contains("multipath 1 queue_if_no_path 0 2 2 "), "{}", table(&d, "mp"));
    // Wrong shapes and values: EINVAL.
    for bad in [
        vec!["switch_group", "3"],
        vec!["switch_group", "0"],
        vec!["disable_group", "x"],
        vec!["fail_path", "9:9"],
        vec!["frobnicate", "1"],
        vec!["fail_path"],
        vec!["queue_if_no_path", "1"],
        vec!["a", "b", "c"],
    ] {
        let o = message(&d, "mp", &bad);
        assert!(o.stderr.contains("Invalid argument"), "{bad:?}: {o:#?}");
    }
    // EBUSY while suspended.
    d.dmsetup(&["suspend", "mp"]).ok();
    let o = message(&d, "mp", &["fail_path", a]);
    assert!(o.stderr.contains("Device or resource busy"), "{o:#?}");
    d.dmsetup(&["resume", "mp"]).ok();
    message(&d, "mp", &["fail_path", a]).ok();
}

#[test]
fn a_failing_path_is_failed_and_io_goes_on_through_the_other() {
    let d = Daemon::start();
    let (f, p) = paths(&d, 2);
    let (a, b) = (&p[0], &p[1]);
    create(&d, "mp", &format!("0 0 1 1 round-robin 0 2 1 {a} 1 {b} 1")).ok();
    set_path(&d, 1, &f, false);
    // Each write goes first to whichever path round-robin picks; the one to p1 fails there, p1 is
    // failed, and the write is retried on p2: no error reaches the client.
    for k in 0..4u64 {
        let data = pattern(k, 64 * 1024);
        io_ok(&write_bytes(&d, "mp", k * 65536, &data));
        assert_eq!(file_range(&f, k * 65536, data.len()), data);
    }
    let st = status(&d, "mp");
    assert_eq!(st, format!("0 {SECTORS} multipath 2 0 0 0 1 1 A 0 2 0 {a} F 1 {b} A 0 "));
    // The path comes back: reinstated, it carries IO again.
    set_path(&d, 1, &f, true);
    message(&d, "mp", &["reinstate_path", a]).ok();
    io_ok(&qemu_io(&d, "mp", &["read 0 4k", "read 4k 4k", "read 8k 4k"]));
    assert!(status(&d, "mp").contains(&format!("{a} A 1 {b} A 0 ")));
    assert!(d.log().contains(&format!("Failing path {a}")));
}

#[test]
fn fio_verify_sees_no_error_while_a_path_fails_under_it() {
    let d = Daemon::start();
    let (f, p) = paths(&d, 2);
    let (a, b) = (&p[0], &p[1]);
    create(&d, "mp", &format!("0 0 1 1 round-robin 0 2 1 {a} 1 {b} 1")).ok();
    let uri = d.nbd_uri("mp");
    let fio = Command::new("fio")
        .args([
            "--name=failover",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=4M",
            "--loops=4",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randseed=7",
            "--output-format=json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio");
    std::thread::sleep(Duration::from_millis(300));
    set_path(&d, 1, &f, false);
    let out = fio.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fio: {text} {}", String::from_utf8_lossy(&out.stderr));
    let json = &text[text.find('{').expect("fio JSON")..];
    assert!(json.contains("\"error\" : 0"), "{json}");
    // Reads after the swap reach p1 at least once (round-robin), which fails it.
    io_ok(&qemu_io(&d, "mp", &["read 0 4k", "read 4k 4k", "read 8k 4k"]));
    let st = status(&d, "mp");
    assert!(st.contains(&format!("{a} F 1 {b} A 0 ")), "{st}");
    // Every byte fio left is in the shared file, and the export reads the same bytes back.
    let copy = d.path("copy.img");
    d.run("nbdcopy", &[&uri, copy.to_str().unwrap()]).ok();
    let disk = std::fs::read(&f).unwrap();
    assert!(std::fs::read(&copy).unwrap() == disk, "export and shared file differ");
    assert!(disk.chunks(4096).all(|blk| blk.iter().any(|&x| x != 0)), "a block fio never wrote");
}

#[test]
fn queue_if_no_path_holds_io_until_a_path_returns() {
    let d = Daemon::start();
    let (f, p) = paths(&d, 2);
    let (a, b) = (&p[0], &p[1]);
    create(&d, "mp", &format!("1 queue_if_no_path 0 1 1 round-robin 0 2 1 {a} 1 {b} 1")).ok();
    set_path(&d, 1, &f, false);
    set_path(&d, 2, &f, false);
    let data = pattern(3, 8192);
    let src = d.path("held.bin");
    std::fs::write(&src, &data).unwrap();
    let cmd = format!("write -s {} 65536 8192", src.display());
    let child = qemu_io_spawn(&d, "mp", &[&cmd]);
    // Both paths fail the write in turn; then it is held.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !status(&d, "mp").contains(&format!("{a} F 1 {b} F 1 ")) {
        assert!(Instant::now() < deadline, "paths not failed: {}", status(&d, "mp"));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut child = child;
    assert!(child.try_wait().unwrap().is_none(), "IO completed with no path");
    // The daemon serves other IO and commands meanwhile.
    d.dmsetup(&["create", "other", "--table", "0 8 zero"]).ok();
    set_path(&d, 2, &f, true);
    message(&d, "mp", &["reinstate_path", b]).ok();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("failed"), "{text}");
    assert_eq!(file_range(&f, 65536, 8192), data);
}

#[test]
fn without_queue_if_no_path_io_fails_when_no_path_is_left() {
    let d = Daemon::start();
    let (f, p) = paths(&d, 2);
    let (a, b) = (&p[0], &p[1]);
    create(&d, "mp", &format!("0 0 1 1 round-robin 0 2 1 {a} 1 {b} 1")).ok();
    set_path(&d, 1, &f, false);
    set_path(&d, 2, &f, false);
    let o = qemu_io(&d, "mp", &["read 0 4k"]);
    assert!(o.stdout.contains("read failed: Input/output error"), "{o:#?}");
    assert!(status(&d, "mp").contains(&format!("{a} F 1 {b} F 1 ")));
    // fail_if_no_path on a queueing table releases held IO with EIO too.
    create(&d, "mq", &format!("1 queue_if_no_path 0 1 1 round-robin 0 2 1 {a} 1 {b} 1")).ok();
    let child = qemu_io_spawn(&d, "mq", &["read 0 4k"]);
    std::thread::sleep(Duration::from_millis(300));
    message(&d, "mq", &["fail_if_no_path"]).ok();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("read failed: Input/output error"));
}

#[test]
fn suspend_with_held_io_flushing_fails_it_noflush_keeps_it() {
    let d = Daemon::start();
    let (f, p) = paths(&d, 1);
    let a = &p[0];
    create(&d, "mp", &format!("1 queue_if_no_path 0 1 1 round-robin 0 1 1 {a} 1")).ok();
    set_path(&d, 1, &f, false);
    // A flushing suspend turns queueing off: the held read fails, so the suspend completes (it
    // could not while the read was in flight), and TABLE lacks queue_if_no_path while suspended;
    // resume restores it.
    let child = qemu_io_spawn(&d, "mp", &["read 0 4k"]);
    std::thread::sleep(Duration::from_millis(300));
    d.dmsetup(&["suspend", "mp"]).ok();
    assert!(table(&d, "mp").contains("multipath 0 0 1 1 "), "{}", table(&d, "mp"));
    d.dmsetup(&["resume", "mp"]).ok();
    assert!(table(&d, "mp").contains("multipath 1 queue_if_no_path 0 1 1 "));
    // qemu-io's flush at exit is held now (no path, queueing on) until the path returns.
    set_path(&d, 1, &f, true);
    message(&d, "mp", &["reinstate_path", a]).ok();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("read failed: Input/output error"));
    set_path(&d, 1, &f, false);
    // A noflush suspend completes with IO held; after resume and a path's return the IO is done.
    let data = pattern(9, 4096);
    let src = d.path("nf.bin");
    std::fs::write(&src, &data).unwrap();
    let cmd = format!("write -s {} 4096 4096", src.display());
    let mut child = qemu_io_spawn(&d, "mp", &[&cmd]);
    std::thread::sleep(Duration::from_millis(300));
    d.dmsetup(&["suspend", "--noflush", "mp"]).ok();
    assert!(child.try_wait().unwrap().is_none());
    d.dmsetup(&["resume", "mp"]).ok();
    set_path(&d, 1, &f, true);
    message(&d, "mp", &["reinstate_path", a]).ok();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "{text}");
    assert_eq!(file_range(&f, 4096, 4096), data);
}

#[test]
fn bypassed_groups_are_used_last_and_the_next_group_takes_over() {
    let d = Daemon::start();
    let (f, p) = paths(&d, 2);
    let (a, b) = (&p[0], &p[1]);
    create(&d, "mp", &format!("0 0 2 1 round-robin 0 1 1 {a} 1 round-robin 0 1 1 {b} 1")).ok();
    io_ok(&qemu_io(&d, "mp", &["read 0 4k"]));
    assert!(status(&d, "mp").contains(" 2 1 A 0 1 0 "));
    message(&d, "mp", &["disable_group", "1"]).ok();
    io_ok(&qemu_io(&d, "mp", &["read 0 4k"]));
    assert_eq!(status(&d, "mp"), format!("0 {SECTORS} multipath 2 0 0 0 2 2 D 0 1 0 {a} A 0 A 0 1 0 {b} A 0 "));
    // Group 2's only path fails: IO falls back to the bypassed group 1.
    set_path(&d, 2, &f, false);
    io_ok(&write_bytes(&d, "mp", 0, &pattern(5, 4096)));
    assert_eq!(file_range(&f, 0, 4096), pattern(5, 4096));
    // Group 1 is in use again but stays bypassed (D) until an activation clears it.
    assert!(status(&d, "mp").contains(&format!(" 2 1 D 0 1 0 {a} A 0 E 0 1 0 {b} F 1 ")), "{}", status(&d, "mp"));
}

#[test]
fn files_as_paths_and_a_restart_brings_the_table_back() {
    let mut d = Daemon::start();
    let f = d.file("direct.img", SECTORS);
    // A file named twice is one device: one path state for both entries.
    create(&d, "mf", &format!("1 queue_if_no_path 1 alua 1 1 service-time 0 2 2 {f} 1 1 {f} 1 2")).ok();
    let fdev = {
        let t = table(&d, "mf");
        t.split(' ').nth(13).unwrap().to_owned()
    };
    assert!(fdev.starts_with("251:"), "{fdev}");
    assert_eq!(
        table(&d, "mf"),
        format!("0 {SECTORS} multipath 1 queue_if_no_path 1 alua 1 1 service-time 0 2 2 {fdev} 1 1 {fdev} 1 2 ")
    );
    io_ok(&write_bytes(&d, "mf", 512, &pattern(21, 4096)));
    assert_eq!(file_range(&f, 512, 4096), pattern(21, 4096));
    message(&d, "mf", &["fail_path", &f]).ok();
    assert!(status(&d, "mf").contains(&format!("{fdev} F 1 0 1 {fdev} F 1 0 2 ")), "{}", status(&d, "mf"));
    message(&d, "mf", &["reinstate_path", &fdev]).ok();

    let (_shared, p) = paths(&d, 2);
    create(&d, "mp", &format!("0 0 2 2 round-robin 0 1 1 {} 1 queue-length 0 1 1 {} 1", p[0], p[1])).ok();
    let before = (table(&d, "mf"), table(&d, "mp"));
    d.restart_after(libc::SIGKILL);
    assert_eq!((table(&d, "mf"), table(&d, "mp")), before);
    io_ok(&qemu_io(&d, "mp", &["read 0 64k"]));
    io_ok(&qemu_io(&d, "mf", &["read 512 4k"]));
}
