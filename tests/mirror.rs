//! The `mirror` target (linux-dm-abi.md §5) through the real dmsetup and real NBD clients: resync
//! of legs that start different, writes landing on every leg, status and table lines, constructor
//! errors. (Issue 13 is under way: leg failures, the userspace log and the cluster log come next.)

mod common;

use common::{pattern, Daemon};
use std::time::{Duration, Instant};

/// 4 MiB legs, 512 KiB regions: 8 regions.
const SECTORS: u64 = 8192;

fn legs(d: &Daemon, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let f = d.file(&format!("leg{i}.img"), SECTORS);
            std::fs::write(&f, pattern(i as u64 + 1, SECTORS as usize * 512)).unwrap();
            f
        })
        .collect()
}

fn status(d: &Daemon, name: &str) -> String {
    d.dmsetup(&["status", name]).ok().trim_end_matches('\n').to_owned()
}

/// Waits (bounded, for a broken build only) until status shows every region in sync.
fn wait_in_sync(d: &Daemon, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(d, name);
        if s.contains(" 8/8 1 ") {
            return s;
        }
        assert!(Instant::now() < deadline, "no resync: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn legs_that_start_different_are_resynced_from_the_first() {
    for n in [2usize, 3] {
        let d = Daemon::start();
        let files = legs(&d, n);
        let mut table = format!("0 {SECTORS} mirror core 1 1024 {n}");
        for f in &files {
            table.push_str(&format!(" {f} 0"));
        }
        d.dmsetup(&["create", "m", "--table", &table]).ok();
        let s = wait_in_sync(&d, "m");
        let devs: Vec<String> =
            d.dmsetup(&["table", "m"]).ok().split_whitespace().skip(7).step_by(2).map(str::to_owned).collect();
        let health = "A".repeat(n);
        assert_eq!(s, format!("0 {SECTORS} mirror {n} {} 8/8 1 {health} 1 core", devs.join(" ") + ""));
        let first = std::fs::read(&files[0]).unwrap();
        assert_eq!(first, pattern(1, SECTORS as usize * 512), "the source leg changed");
        for f in &files[1..] {
            assert!(std::fs::read(f).unwrap() == first, "leg {f} differs after resync");
        }
        // A write lands on every leg.
        let src = d.path("w.bin");
        std::fs::write(&src, pattern(99, 65536)).unwrap();
        let cmd = format!("write -s {} 1048576 65536", src.display());
        let o = d.run("qemu-io", &["-f", "raw", "-t", "none", "-c", &cmd, &d.nbd_uri("m")]);
        assert!(o.code == 0 && !o.stdout.contains("failed"), "{o:#?}");
        for f in &files {
            assert_eq!(std::fs::read(f).unwrap()[1048576..1048576 + 65536], pattern(99, 65536)[..]);
        }
        assert!(d.alive());
    }
}

#[test]
fn nosync_table_and_status_lines() {
    let d = Daemon::start();
    let files = legs(&d, 2);
    let t = format!("0 {SECTORS} mirror core 2 1024 nosync 2 {} 0 {} 0 1 handle_errors", files[0], files[1]);
    d.dmsetup(&["create", "m", "--table", &t]).ok();
    let table = d.dmsetup(&["table", "m"]).ok().trim_end().to_owned();
    let devs: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(table, format!("0 {SECTORS} mirror core 2 1024 nosync 2 {} 0 {} 0 1 handle_errors", devs[8], devs[10]));
    assert_eq!(status(&d, "m"), format!("0 {SECTORS} mirror 2 {} {} 8/8 1 AA 1 core", devs[8], devs[10]));
    // nosync: nothing was copied.
    assert_eq!(std::fs::read(&files[1]).unwrap(), pattern(2, SECTORS as usize * 512));
}

#[test]
fn constructor_errors() {
    let d = Daemon::start();
    let f = legs(&d, 2);
    let (a, b) = (&f[0], &f[1]);
    for bad in [
        String::from("core"),
        format!("core 1 1024 1 {a} 0"),
        format!("core 1 1024 10 {a} 0 {b} 0"),
        format!("core 1 1024 2 {a} 0"),
        format!("core 1 1000 2 {a} 0 {b} 0"),
        format!("core 1 1024 2 {a} x {b} 0"),
        format!("core 1 1024 2 {a} 0 {b} 0 1 keep_log"),
        format!("core 1 1024 2 {a} 0 {b} 0 1 frob"),
        format!("core 1 1024 2 {a} 0 {b} 0 2 handle_errors"),
        format!("core 1 1024 2 {a} 0 {b} 0 1 handle_errors extra"),
        format!("nolog 1 1024 2 {a} 0 {b} 0"),
        format!("core 3 1024 2 {a} 0 {b} 0"),
        // An offset that would wrap, or a leg area past the end of its device.
        format!("core 1 1024 2 {a} 0 {b} 18446744073709551000"),
        format!("core 1 1024 2 {a} 0 {b} 8"),
    ] {
        let o = d.dmsetup(&["create", "bad", "--table", &format!("0 {SECTORS} mirror {bad}")]);
        assert_ne!(o.code, 0, "accepted: {bad}");
        d.dmsetup(&["remove", "bad"]);
    }
    assert!(d.alive());
}

#[test]
fn a_short_last_region_is_copied_only_up_to_the_target_end() {
    let d = Daemon::start();
    let files = legs(&d, 2);
    // 8000 sectors: the eighth region is 832 sectors, not 1024.
    let t = format!("0 8000 mirror core 1 1024 2 {} 0 {} 0", files[0], files[1]);
    d.dmsetup(&["create", "m", "--table", &t]).ok();
    wait_in_sync(&d, "m");
    let (a, b) = (std::fs::read(&files[0]).unwrap(), std::fs::read(&files[1]).unwrap());
    assert!(a[..8000 * 512] == b[..8000 * 512], "legs differ inside the mirror");
    assert!(b[8000 * 512..] == pattern(2, SECTORS as usize * 512)[8000 * 512..], "resync wrote past the target");
}

#[test]
fn a_disk_log_survives_a_restart_and_nothing_in_sync_is_copied_again() {
    let mut d = Daemon::start();
    let files = legs(&d, 2);
    let log = d.file("log.img", 64);
    let t = format!("0 {SECTORS} mirror disk 2 {log} 1024 2 {} 0 {} 0", files[0], files[1]);
    d.dmsetup(&["create", "m", "--table", &t]).ok();
    let s = wait_in_sync(&d, "m");
    assert!(s.ends_with(" 3 disk 251:2 A") || s.contains(" 3 disk "), "{s}");
    let disk = std::fs::read(&log).unwrap();
    assert_eq!(&disk[0..4], b"rRiM");
    assert_eq!(disk[1024], 0xff, "all 8 regions clean on disk");
    // Behind the mirror's back, leg 1 changes in region 3; a restart must not copy over it (the
    // log says region 3 is in sync), where a core log would copy everything again.
    let mut b = std::fs::read(&files[1]).unwrap();
    b[3 * 1024 * 512] ^= 0xff;
    std::fs::write(&files[1], &b).unwrap();
    d.restart_after(libc::SIGKILL);
    let s = status(&d, "m");
    assert!(s.contains(" 8/8 1 AA 3 disk "), "{s}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(std::fs::read(&files[1]).unwrap(), b, "an in-sync region was copied again");
}

/// Leg 0 a dmemu device over the first file (so it can be made to fail), leg 1 the second file.
fn mirror_with_failing_leg(d: &Daemon, features: &str) -> (Vec<String>, String) {
    let files = legs(d, 2);
    d.dmsetup(&["create", "l0", "--table", &format!("0 {SECTORS} linear {} 0", files[0])]).ok();
    let l0 = d.dev_num("l0");
    let t = format!("0 {SECTORS} mirror core 2 1024 nosync 2 {l0} 0 {} 0{features}", files[1]);
    d.dmsetup(&["create", "m", "--table", &t]).ok();
    d.dmsetup(&["load", "l0", "--table", &format!("0 {SECTORS} error")]).ok();
    d.dmsetup(&["resume", "l0"]).ok();
    (files, l0)
}

fn qemu_write(d: &Daemon, data: &[u8]) -> std::process::Child {
    let src = d.path("w.bin");
    std::fs::write(&src, data).unwrap();
    let cmd = format!("write -s {} 0 {}", src.display(), data.len());
    std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-t", "none", "-c", &cmd, &d.nbd_uri("m")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn without_handle_errors_a_failing_leg_is_marked_and_io_goes_on() {
    let d = Daemon::start();
    let (files, _) = mirror_with_failing_leg(&d, "");
    let out = qemu_write(&d, &pattern(7, 4096)).wait_with_output().unwrap();
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"));
    assert_eq!(std::fs::read(&files[1]).unwrap()[..4096], pattern(7, 4096)[..]);
    // Leg 0 shows D (write error). Region 0 went out of sync; the default leg stays leg 0 (no
    // handle_errors), so its recovery fails reading it, and a failed recovery without
    // handle_errors counts as in sync (the kernel's `complete_resync_work(reg, 1)`).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !status(&d, "m").contains(" 8/8 1 DA 1 core") {
        assert!(Instant::now() < deadline, "{}", status(&d, "m"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn with_handle_errors_the_write_is_held_until_a_noflush_reload_repairs_the_mirror() {
    let d = Daemon::start();
    let (files, _) = mirror_with_failing_leg(&d, " 1 handle_errors");
    let e0: u64 = d.dmsetup(&["info", "-c", "--noheadings", "-o", "events", "m"]).ok().trim().parse().unwrap();
    let mut w = qemu_write(&d, &pattern(8, 4096));
    // The leg failure raises an event; the write waits for userspace.
    d.dmsetup(&["wait", "m", &e0.to_string()]).ok();
    std::thread::sleep(Duration::from_millis(200));
    assert!(w.try_wait().unwrap().is_none(), "a write was completed with a failed leg");
    assert!(status(&d, "m").contains(" 1 DA 1 core"), "{}", status(&d, "m"));
    // What dmeventd does: a new table without the failed leg (here a fresh file in its place),
    // loaded and swapped in with a noflush suspend; the held write is requeued into it.
    let spare = d.file("spare.img", SECTORS);
    let t = format!("0 {SECTORS} mirror core 2 1024 nosync 2 {} 0 {spare} 0 1 handle_errors", files[1]);
    d.dmsetup(&["load", "m", "--table", &t]).ok();
    d.dmsetup(&["suspend", "--noflush", "m"]).ok();
    d.dmsetup(&["resume", "m"]).ok();
    let out = w.wait_with_output().unwrap();
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"));
    assert_eq!(std::fs::read(&files[1]).unwrap()[..4096], pattern(8, 4096)[..]);
    assert_eq!(std::fs::read(&spare).unwrap()[..4096], pattern(8, 4096)[..]);
}

#[test]
fn suspend_stops_recovery_and_resume_finishes_it() {
    let d = Daemon::start();
    let files = legs(&d, 2);
    let t = format!("0 {SECTORS} mirror core 1 8 2 {} 0 {} 0", files[0], files[1]);
    d.dmsetup(&["create", "m", "--table", &t]).ok();
    // Small regions: 1024 of them, so suspends land in the middle of the resync.
    for _ in 0..5 {
        d.dmsetup(&["suspend", "m"]).ok();
        d.dmsetup(&["resume", "m"]).ok();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !status(&d, "m").contains(" 1024/1024 1 AA ") {
        assert!(Instant::now() < deadline, "no resync: {}", status(&d, "m"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(std::fs::read(&files[0]).unwrap() == std::fs::read(&files[1]).unwrap(), "legs differ");
    assert_eq!(std::fs::read(&files[0]).unwrap(), pattern(1, SECTORS as usize * 512));
}
