//! The dm core's IO path against real clients: tables that would make a device use itself are
//! refused (and the daemon keeps serving), sector arithmetic never wraps (an IO past any
//! addressable offset fails, nothing is written), flushes and FUA reach the files, and the
//! control node's directory exists for dmsetup's nodes.

mod common;

use common::Daemon;
use dmemu::client::{Client, IoctlBuf};
use dmemu::ioctl::layout::{DmCmd, DmFlags};

fn qemu_io(d: &Daemon, name: &str, cmds: &[&str]) -> common::Out {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let uri = d.nbd_uri(name);
    args.push(&uri);
    d.run("qemu-io", &args)
}

#[test]
fn a_table_that_would_loop_is_refused_and_the_daemon_keeps_serving() {
    let d = Daemon::start();
    d.dmsetup(&["create", "b", "--table", "0 2048 zero"]).ok();
    d.dmsetup(&["create", "a", "--table", "0 2048 linear /dev/mapper/b 0"]).ok();
    // b over a, while a is over b: refused at load.
    let o = d.dmsetup(&["load", "b", "--table", "0 2048 linear /dev/mapper/a 0"]);
    assert!(o.err().contains("Invalid argument"), "{o:?}");
    assert!(d.log().contains("use itself"), "the refusal says why");
    // Through a third device too, and at resume when the loop only closes then.
    d.dmsetup(&["create", "c", "--table", "0 2048 linear /dev/mapper/a 0"]).ok();
    let o = d.dmsetup(&["load", "b", "--table", "0 2048 linear /dev/mapper/c 0"]);
    assert!(o.err().contains("Invalid argument"), "{o:?}");
    d.dmsetup(&["create", "x", "--table", "0 2048 zero"]).ok();
    d.dmsetup(&["create", "y", "--notable"]).ok();
    d.dmsetup(&["load", "y", "--table", "0 2048 linear /dev/mapper/x 0"]).ok();
    d.dmsetup(&["load", "x", "--table", "0 2048 linear /dev/mapper/y 0"]).ok();
    d.dmsetup(&["resume", "y"]).ok();
    let o = d.dmsetup(&["resume", "x"]);
    assert!(o.err().contains("Invalid argument"), "{o:?}");
    // The reproducer path: read a over NBD. The daemon is alive and a reads zeroes.
    let o = qemu_io(&d, "a", &["read -P 0 0 64k"]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    assert!(d.alive());
    d.dmsetup(&["status", "a"]).ok();
}

#[test]
fn offsets_past_any_byte_address_fail_and_write_nothing() {
    let d = Daemon::start();
    let empty = d.file("empty.img", 0);
    // 36028797018963969 sectors = 2^64 + 512 bytes: a wrapping multiply would land at byte 512.
    d.dmsetup(&["create", "far", "--table", &format!("0 8 linear {empty} 36028797018963969")]).ok();
    let o = qemu_io(&d, "far", &["write -P 0xaa 0 512"]);
    assert!(o.stdout.contains("write failed: Input/output error"), "{o:?}");
    let o = qemu_io(&d, "far", &["read 0 512"]);
    assert!(o.stdout.contains("read failed: Input/output error"), "{o:?}");
    // Addressable as u64 bytes but past the largest file offset.
    d.dmsetup(&["create", "huge", "--table", &format!("0 8 linear {empty} {}", 1u64 << 54)]).ok();
    let o = qemu_io(&d, "huge", &["write -P 0xbb 0 4k"]);
    assert!(o.stdout.contains("write failed: Input/output error"), "{o:?}");
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0, "nothing was written anywhere");
    // A device over those devices fails the same way (through the stack).
    d.dmsetup(&["create", "over", "--table", "0 8 linear /dev/mapper/far 0"]).ok();
    let o = qemu_io(&d, "over", &["write -P 0xcc 0 4k"]);
    assert!(o.stdout.contains("write failed: Input/output error"), "{o:?}");
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
    assert!(d.alive());
}

#[test]
fn deep_stacks_cost_no_stack() {
    // 1,000 linear devices, each over the one before: IO through the top recurses nowhere (made
    // with raw ioctls; a thousand dmsetup runs would take a while).
    let d = Daemon::start();
    let f = d.file("base.img", 2048);
    let mut c = Client::connect(&d.socket).unwrap();
    let mut below = f.clone();
    for i in 0..1000 {
        let name = format!("s{i}");
        let params = format!("{below} 0");
        c.run(&IoctlBuf::new(DmCmd::DevCreate).name(&name)).unwrap().check("create").unwrap();
        c.run(&IoctlBuf::new(DmCmd::TableLoad).name(&name).table([(0, 2048, "linear", params.as_str())]))
            .unwrap()
            .check("load")
            .unwrap();
        c.run(&IoctlBuf::new(DmCmd::DevSuspend).name(&name)).unwrap().check("resume").unwrap();
        below = format!("/dev/mapper/{name}");
    }
    let o = qemu_io(&d, "s999", &["write -P 0x3c 4k 8k", "read -P 0x3c 4k 8k", "flush"]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    let bytes = std::fs::read(&f).unwrap();
    assert!(bytes[4096..12288].iter().all(|&b| b == 0x3c));
}

#[test]
fn mknodes_makes_the_mapper_directory() {
    // With the kernel /dev/mapper exists, because the control node lives there: a DM_DEV_DIR
    // without mapper/ must not make libdm's mknod fail.
    let d = Daemon::start();
    d.dmsetup(&["create", "h1", "--table", "0 8 zero"]).ok();
    let dev_dir = d.path("fresh-dev");
    std::fs::create_dir_all(&dev_dir).unwrap();
    let o = std::process::Command::new(common::DMSETUP)
        .arg("mknodes")
        .env("LD_PRELOAD", common::bin().with_file_name("libdmemu_preload.so"))
        .env("DMEMU_SOCKET", &d.socket)
        .env("DM_DEV_DIR", &dev_dir)
        .env("DM_DISABLE_UDEV", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !stderr.contains("failed"), "{stderr}");
    assert!(dev_dir.join("mapper").is_dir());
    assert!(dev_dir.join("mapper/h1").exists(), "a node for h1");
}

#[test]
fn front_ends_advertise_the_tables_limits() {
    let d = Daemon::start();
    let f = d.file("f.img", 2048);
    d.dmsetup(&["create", "l", "--table", &format!("0 2048 linear {f} 0")]).ok();
    let info = d.run("nbdinfo", &["--json", &d.nbd_uri("l")]).ok().to_owned();
    assert!(info.contains("\"block_size_minimum\": 512"), "{info}");
    assert!(info.contains("\"block_size_preferred\": 4096"), "{info}");
    assert!(info.contains("\"can_trim\": true"), "{info}");
    let dm = d.dev_num("l").replace(':', " ");
    let minor = dm.split(' ').nth(1).unwrap().to_owned();
    let q = |attr: &str| {
        std::fs::read_to_string(d.path(&format!("sys/devices/virtual/block/dm-{minor}/queue/{attr}"))).unwrap()
    };
    assert_eq!(q("logical_block_size"), "512\n");
    assert_eq!(q("physical_block_size"), "512\n");
    assert_eq!(q("minimum_io_size"), "512\n");
    assert_eq!(q("optimal_io_size"), "0\n");
    assert_eq!(q("discard_granularity"), "512\n");
}

/// Waits (without a time bound that could fail the test) until the daemon log holds `what`.
fn wait_for_log(d: &Daemon, what: &str) {
    while !d.log().contains(what) {
        assert!(d.alive(), "daemon died");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_suspend_waiting_for_io_is_interrupted_by_cancel_and_the_device_keeps_running() {
    use dmemu_frame::{self as frame, FrameHeader, Kind};
    use std::io::{Read, Write};
    let d = Daemon::start();
    let f = d.file("f.img", 2048);
    d.dmsetup(&["create", "b", "--table", &format!("0 2048 linear {f} 0")]).ok();
    d.dmsetup(&["create", "a", "--table", "0 2048 linear /dev/mapper/b 0"]).ok();
    let minor_a = d.dev_num("a").split(':').nth(1).unwrap().to_owned();
    let minor_b = d.dev_num("b").split(':').nth(1).unwrap().to_owned();
    d.dmsetup(&["suspend", "b"]).ok();
    // A write into a, held at b's gate: in flight on a.
    let uri = d.nbd_uri("a");
    let writer = std::thread::spawn(move || {
        std::process::Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5e 8k 4k", &uri]).output().unwrap()
    });
    wait_for_log(&d, &format!("dm-{minor_b}: IO waits for the resume"));
    // DM_DEV_SUSPEND on a waits for that write; a CANCEL (what the shim sends when a signal
    // interrupts the caller) abandons it with EINTR.
    let mut c = Client::connect(&d.socket).unwrap();
    let req = IoctlBuf::new(DmCmd::DevSuspend).name("a").flags(DmFlags::SUSPEND);
    frame::write_frame(c.stream(), Kind::Ioctl, &[&DmCmd::DevSuspend.request().to_le_bytes(), &req.bytes()]).unwrap();
    wait_for_log(&d, &format!("dm-{minor_a}: suspend waits for 1 IOs in flight"));
    c.stream().write_all(&frame::header(Kind::Cancel, 0)).unwrap();
    let reply = loop {
        let mut h = [0u8; frame::HEADER_LEN];
        c.stream().read_exact(&mut h).unwrap();
        let fh = FrameHeader::decode(&h);
        let payload = frame::read_payload(c.stream(), fh.len).unwrap();
        if !fh.is_event() {
            break payload;
        }
    };
    let (status, _) = frame::Status::split(&reply).unwrap();
    assert_eq!((status.ret, status.errno), (-1, libc::EINTR));
    assert!(d.log().contains(&format!("suspend of dm-{minor_a} interrupted")));
    // a is still running; once b resumes, the write lands.
    let info = d.dmsetup(&["info", "a"]).ok().to_owned();
    assert!(info.lines().any(|l| l.starts_with("State:") && l.ends_with(" ACTIVE")), "{info}");
    d.dmsetup(&["resume", "b"]).ok();
    let o = writer.join().unwrap();
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed"), "{o:?}");
    assert!(std::fs::read(&f).unwrap()[8192..12288].iter().all(|&x| x == 0x5e));
    // And a suspends normally now.
    d.dmsetup(&["suspend", "a"]).ok();
    d.dmsetup(&["resume", "a"]).ok();
}

#[test]
fn block_status_is_a_query_and_moves_no_io_counter() {
    // The RFC switch counts remapped and unmapped IOs in its status: nbdinfo --map must not.
    let d = Daemon::start();
    let files: Vec<String> = (0..2).map(|i| d.file(&format!("p{i}.img"), 2048)).collect();
    let table = format!("0 2048 switch 2 256 {} 0 {} 0", files[0], files[1]);
    d.dmsetup(&["create", "sw", "--table", &table]).ok();
    let counters = |d: &Daemon| {
        let s = d.dmsetup(&["status", "sw"]).ok().to_owned();
        s.split_whitespace().rev().take(2).map(str::to_owned).collect::<Vec<_>>()
    };
    assert_eq!(counters(&d), ["0", "0"]);
    let map = d.run("nbdinfo", &["--map", &d.nbd_uri("sw")]);
    assert!(map.ok().contains("hole,zero") || map.ok().contains("data"), "{map:?}");
    assert_eq!(counters(&d), ["0", "0"], "block status counted as IO");
    let o = qemu_io(&d, "sw", &["read 0 4k"]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    assert_eq!(counters(&d), ["1", "0"], "one unmapped IO (no page table uploaded yet)");
}
