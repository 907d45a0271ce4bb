//! Multipath from the outside: `DM_MPATH_PROBE_PATHS` (linux-dm-abi.md §4.6) issued by a C program
//! on block nodes through the real shim, and the real multipath-tools (`multipath -ll`) under
//! `dmemu exec` (docs/multipath-tools.md).

mod common;

use common::fuse::Mapper;
use common::Daemon;
use dmemu_frame::{FrameHeader, Kind, HEADER_LEN, MAGIC};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;

/// `_IO(0xfd, 18)`.
const PROBE: &str = "0xfd12";

/// Builds tests/c/mpath_probe.c into the daemon's directory.
fn build_probe(d: &Daemon) -> String {
    let out = d.path("mpath_probe").to_string_lossy().into_owned();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/mpath_probe.c");
    let st = Command::new("cc").args(["-O1", "-Wall", "-Werror", "-o", &out, src]).status().expect("cc");
    assert!(st.success());
    out
}

/// `ioctl(open(node), request)` under the shim: "ok" or the errno's name.
fn ioctl(m: &Mapper, prog: &str, node: &str, request: &str) -> String {
    m.run(prog, &[node, request]).ok().trim().to_owned()
}

#[test]
fn probe_paths_on_a_table_that_is_not_multipath_is_enotty() {
    let m = Mapper::start();
    let prog = build_probe(&m.d);
    m.linear("lin", 64, 0, &[]);
    m.d.dmsetup(&["create", "z", "--table", "0 64 zero"]).ok();
    // Two targets: no target is asked at all.
    let two = "0 32 zero\n32 32 zero";
    m.d.dmsetup_stdin(&["create", "two"], two).ok();
    for node in ["/dev/mapper/lin", "/dev/mapper/z", "/dev/mapper/two", "/dev/dm-0"] {
        assert_eq!(ioctl(&m, &prog, node, PROBE), "ENOTTY", "{node}");
    }
    // Another 0xfd ioctl (DM_VERSION's number, DM_MPATH_PROBE_PATHS + 1) on a block node: the same.
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/lin", "0xc138fd00"), "ENOTTY");
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/lin", "0xfd13"), "ENOTTY");
    // Block ioctls still answer as before.
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/lin", "0x1260"), "EFAULT", "BLKGETSIZE with a NULL argument");
}

#[test]
fn probe_paths_is_passed_down_a_stack_and_waits_for_no_suspend() {
    let m = Mapper::start();
    let prog = build_probe(&m.d);
    m.linear("low", 64, 0, &[]);
    // A whole-device linear passes the ioctl to the dm device below, which is not multipath.
    m.d.dmsetup(&["create", "top", "--table", "0 64 linear /dev/mapper/low 0"]).ok();
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/top", PROBE), "ENOTTY");
    // A device that takes ioctls to the one below refuses them while suspended (dm_prepare_ioctl).
    m.d.dmsetup(&["suspend", "top"]).ok();
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/top", PROBE), "EAGAIN");
    m.d.dmsetup(&["resume", "top"]).ok();
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/top", PROBE), "ENOTTY");
    // zero has no prepare_ioctl: suspended or not, nothing to ask.
    m.d.dmsetup(&["create", "z", "--table", "0 8 zero"]).ok();
    m.d.dmsetup(&["suspend", "z"]).ok();
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/z", PROBE), "ENOTTY");
}

/// One DM_BLK_IOCTL frame on a raw connection: (reply kind, ret, errno).
fn dm_blk_ioctl_frame(s: &mut UnixStream, payload: &[u8]) -> (u16, i32, i32) {
    let mut f =
        FrameHeader { magic: MAGIC, kind: Kind::DmBlkIoctl as u16, flags: 0, len: payload.len() as u32, aux: 0 }
            .encode()
            .to_vec();
    f.extend_from_slice(payload);
    s.write_all(&f).unwrap();
    let mut h = [0u8; HEADER_LEN + 8];
    s.read_exact(&mut h).unwrap();
    let word = |i: usize| i32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    (u16::from_le_bytes([h[4], h[5]]), word(16), word(20))
}

#[test]
fn dm_blk_ioctl_frames_with_a_bad_payload_device_or_type_get_errnos() {
    let d = Daemon::start();
    d.dmsetup(&["create", "z", "--table", "0 8 zero"]).ok();
    let mut s = UnixStream::connect(&d.socket).unwrap();
    let reply = Kind::DmBlkIoctlReply as u16;
    let frame = |minor: u32, request: u32| [minor.to_le_bytes(), request.to_le_bytes()].concat();
    assert_eq!(dm_blk_ioctl_frame(&mut s, &[1, 2, 3]), (reply, -1, libc::EINVAL), "short payload");
    assert_eq!(dm_blk_ioctl_frame(&mut s, &frame(999, 0xfd12)), (reply, -1, libc::ENXIO), "no such device");
    assert_eq!(dm_blk_ioctl_frame(&mut s, &frame(0, 0x1260)), (reply, -1, libc::ENOTTY), "not a DM ioctl");
    assert_eq!(dm_blk_ioctl_frame(&mut s, &frame(0, 0xfd12)), (reply, -1, libc::ENOTTY), "zero table");
    // Over the bound: the connection is closed, the daemon keeps serving.
    let mut bad = UnixStream::connect(&d.socket).unwrap();
    let h = FrameHeader { magic: MAGIC, kind: Kind::DmBlkIoctl as u16, flags: 0, len: 9, aux: 0 }.encode();
    bad.write_all(&h).unwrap();
    let mut rest = Vec::new();
    assert_eq!(bad.read_to_end(&mut rest).map(|_| rest.len()).unwrap_or(0), 0);
    d.dmsetup(&["info", "z"]).ok();
}

/// Builds tests/c/udev_lookup.c into the daemon's directory.
fn build_udev_lookup(d: &Daemon) -> String {
    let out = d.path("udev_lookup").to_string_lossy().into_owned();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/udev_lookup.c");
    let st = Command::new("cc").args(["-O1", "-Wall", "-Werror", "-o", &out, src, "-ldl"]).status().expect("cc");
    assert!(st.success());
    out
}

#[test]
fn libudev_finds_dm_devices_by_number_through_the_shim() {
    let d = Daemon::start();
    let major = d.major();
    let f = d.file("a.img", 64);
    d.dmsetup(&["create", "a", "--table", &format!("0 64 linear {f} 0")]).ok();
    d.dmsetup(&["create", "b", "-r", "--table", "0 8 zero"]).ok();
    let prog = build_udev_lookup(&d);
    let look = |minor: &str| d.exec(&prog, &[&major.to_string(), minor, "size", "dm/name", "ro", "dev"], None);
    // libudev walks /sys/dev/block/<major>:<minor> one component at a time from a directory fd,
    // needs a uevent file and a subsystem link, and takes the result only if it is on sysfs.
    assert_eq!(
        look("0").ok(),
        format!(
            "syspath=/sys/devices/virtual/block/dm-0\nsysname=dm-0\ndevnode=/dev/dm-0\nsubsystem=block\ndevtype=disk\n\
             size=64\ndm/name=a\nro=0\ndev={major}:0\nparent=(none)\n"
        )
    );
    assert!(look("1").ok().contains("sysname=dm-1\n"));
    assert!(look("1").ok().contains("dm/name=b\nro=1\n"));
    // No such device; and a regular file's pseudo number has no sysfs entry.
    assert_eq!(look("7").stdout, "no device\n");
    let file_major = d.hello("file_major");
    let o = d.exec(&prog, &[&file_major, "0"], None);
    assert_eq!(o.stdout, "no device\n");
    // Without the shim the real sysfs answers (no dmemu device there).
    let o = d.run(&prog, &[&major.to_string(), "0"]);
    assert_ne!(o.stdout, look("0").stdout);
}
