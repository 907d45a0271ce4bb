//! Recovery across restarts (docs/reliability.md): a daemon started on the run directory of one
//! that died brings every device back — names, uuids, numbers, live and inactive tables, suspend
//! state — and NBD clients reconnect to the same exports with every acknowledged write in place.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::Daemon;

/// Everything `dmsetup` shows about the devices, for before/after comparison.
fn picture(d: &Daemon) -> String {
    let info = d
        .dmsetup(&[
            "info",
            "-c",
            "--noheadings",
            "-o",
            "name,uuid,major,minor,attr,open,segments,events",
            "--sort",
            "name",
        ])
        .ok()
        .to_owned();
    let table = d.dmsetup(&["table"]).ok().to_owned();
    let inactive = d.dmsetup(&["table", "--inactive"]).ok().to_owned();
    let status = d.dmsetup(&["status"]).ok().to_owned();
    format!("{info}\n--\n{table}\n--\n{inactive}\n--\n{status}")
}

fn devices_setup(d: &Daemon) -> String {
    let img = d.file("a.img", 8192);
    d.dmsetup(&["create", "lin", "--uuid", "TEST-lin", "--table", &format!("0 8192 linear {img} 0")]).ok();
    let lin = d.dev_num("lin");
    d.dmsetup(&["create", "top", "--table", &format!("0 4096 linear {lin} 2048")]).ok();
    d.dmsetup(&["create", "z", "--table", "0 100 zero"]).ok();
    d.dmsetup(&["suspend", "z"]).ok();
    d.dmsetup(&["create", "pending", "--notable"]).ok();
    d.dmsetup(&["load", "pending", "--table", "0 10 error"]).ok();
    d.dmsetup(&["create", "empty", "--notable"]).ok();
    d.dmsetup(&["create", "dly", "--table", &format!("0 1024 delay {lin} 0 0 {lin} 1024 0")]).ok();
    img
}

#[test]
fn kill_9_restores_devices_tables_and_flags() {
    let mut d = Daemon::start();
    devices_setup(&d);
    let before = picture(&d);
    assert!(before.contains("TEST-lin"), "{before}");
    d.restart_after(libc::SIGKILL);
    let after = picture(&d);
    assert_eq!(before, after);
    assert!(d.log().contains("restored 6 of 6 device(s)"), "{}", d.log());
    assert!(!d.log().contains(" ERROR "), "{}", d.log());
    // The restored devices work as before: remove them top-down, then nothing is left.
    for n in ["top", "dly", "lin", "z", "pending", "empty"] {
        if n == "z" {
            d.dmsetup(&["resume", n]).ok();
        }
        d.dmsetup(&["remove", n]).ok();
    }
    assert_eq!(d.dmsetup(&["ls"]).ok().trim(), "No devices found");
    // And a removal is remembered too.
    d.restart_after(libc::SIGKILL);
    assert_eq!(d.dmsetup(&["ls"]).ok().trim(), "No devices found");
}

#[test]
fn stale_sysfs_and_sockets_are_replaced() {
    let mut d = Daemon::start();
    d.dmsetup(&["create", "a", "--table", "0 100 zero"]).ok();
    d.dmsetup(&["create", "b", "--table", "0 100 zero"]).ok();
    let stale = d.path("sys/devices/virtual/block/dm-1");
    assert!(stale.exists());
    d.dmsetup(&["remove", "b"]).ok();
    // Leave a stale entry behind as a daemon killed mid-update could.
    std::fs::create_dir_all(d.path("sys/devices/virtual/block/dm-9/dm")).unwrap();
    d.restart_after(libc::SIGKILL);
    assert!(d.path("sys/devices/virtual/block/dm-0/dm/name").exists());
    assert_eq!(std::fs::read_to_string(d.path("sys/devices/virtual/block/dm-0/dm/name")).unwrap(), "a\n");
    assert!(!d.path("sys/devices/virtual/block/dm-1").exists());
    assert!(!d.path("sys/devices/virtual/block/dm-9").exists());
    assert!(d.nbd_socket().exists());
}

#[test]
fn kill_9_under_nbd_writes_loses_no_acknowledged_write_and_clients_reconnect() {
    const SLOTS: u64 = 128;
    const LEN: u64 = 16384;
    let mut d = Daemon::start();
    let img = devices_setup(&d);
    let uri = d.nbd_uri("top");
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let restarted = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, restarted, uri) = (acked.clone(), restarted.clone(), uri.clone());
        std::thread::spawn(move || {
            let mut after_restart = 0;
            // Each slot is written once, with its own pattern, by a new client connection.
            for slot in 0..SLOTS {
                let ok = nbd_write_uri(&uri, (slot % 250 + 1) as u8, slot * LEN, LEN);
                if ok {
                    acked.lock().unwrap().push(slot);
                    if restarted.load(Ordering::SeqCst) {
                        after_restart += 1;
                    }
                }
                if after_restart >= 8 {
                    break;
                }
                if !ok {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        })
    };
    while acked.lock().unwrap().len() < 8 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    d.restart_after(libc::SIGKILL);
    restarted.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 16, "writes acknowledged before and after the restart: {acked:?}");
    // Every acknowledged write is in the file where the table says, and reads back over NBD.
    let bytes = std::fs::read(&img).unwrap();
    for &slot in &acked {
        let pattern = (slot % 250 + 1) as u8;
        let at = (2048 * 512 + slot * LEN) as usize;
        assert!(bytes[at..at + LEN as usize].iter().all(|&b| b == pattern), "slot {slot} lost");
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("read -P {pattern} {} {LEN}", slot * LEN), &uri])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && !out.contains("Pattern verification failed"), "slot {slot}: {out}");
    }
}

/// One write of a distinct pattern through NBD with qemu-io; true when the server acknowledged it.
fn nbd_write_uri(uri: &str, pattern: u8, offset: u64, len: u64) -> bool {
    Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P {pattern} {offset} {len}"), uri])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("wrote"))
}
