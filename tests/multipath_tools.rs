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

const WWID: &str = "3600d0230000000000e13955cc3757800";

/// Creates multipath map `name` (uuid `mpath-<WWID>`) with `table` after `0 <sectors> multipath`.
fn create_map(m: &Mapper, name: &str, sectors: u64, table: &str) {
    let uuid = format!("mpath-{WWID}");
    m.d.dmsetup(&["create", name, "-u", &uuid, "--table", &format!("0 {sectors} multipath {table}")]).ok();
}

fn status(m: &Mapper, name: &str) -> String {
    m.d.dmsetup(&["status", name]).ok().trim_end().to_owned()
}

/// Replaces a device's table (load, resume).
fn swap(m: &Mapper, name: &str, table: &str) {
    m.d.dmsetup(&["load", name, "--table", table]).ok();
    m.d.dmsetup(&["resume", name]).ok();
}

/// Reads the first 4 KiB of a node under the shim (one IO; a multipath map picks its group).
fn read_first_block(m: &Mapper, node: &str) -> common::Out {
    m.run("dd", &[&format!("if={node}"), "of=/dev/null", "bs=4096", "count=1", "iflag=direct", "status=none"])
}

#[test]
fn probe_paths_fails_the_paths_that_error_and_says_enotconn_when_none_is_left() {
    let m = Mapper::start();
    let prog = build_probe(&m.d);
    let major = m.d.major();
    m.linear("pa", 64, 0, &[]);
    m.linear("pb", 64, 0, &[]);
    create_map(&m, "mp", 64, "0 0 1 1 round-robin 0 2 1 /dev/mapper/pa 1 /dev/mapper/pb 1");
    let (a, b) = (format!("{major}:0"), format!("{major}:1"));
    // Right after the load no group is current: nothing to probe, and valid paths remain.
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/mp", PROBE), "ok");
    assert_eq!(status(&m, "mp"), format!("0 64 multipath 2 1 0 0 1 1 E 0 2 0 {a} A 0 {b} A 0"));
    // One read makes group 1 current; the probe then reads every active path of it.
    read_first_block(&m, "/dev/mapper/mp").ok();
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/mp", PROBE), "ok");
    assert_eq!(status(&m, "mp"), format!("0 64 multipath 2 0 0 0 1 1 A 0 2 0 {a} A 0 {b} A 0"));
    // pb now fails its IO: the probe fails it, pa is left.
    swap(&m, "pb", "0 64 error");
    assert_eq!(ioctl(&m, &prog, "/dev/dm-2", PROBE), "ok");
    assert_eq!(status(&m, "mp"), format!("0 64 multipath 2 0 0 0 1 1 A 0 2 0 {a} A 0 {b} F 1"));
    // And then pa: no valid path anywhere.
    swap(&m, "pa", "0 64 error");
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/mp", PROBE), "ENOTCONN");
    assert!(status(&m, "mp").ends_with(&format!("{a} F 1 {b} F 1")), "{}", status(&m, "mp"));
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/mp", PROBE), "ENOTCONN");
    // Any other 0xfd ioctl on a multipath map: ENOTTY; suspended: EAGAIN.
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/mp", "0xfd13"), "ENOTTY");
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/mp", "0xc138fd00"), "ENOTTY");
    m.d.dmsetup(&["suspend", "mp"]).ok();
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/mp", PROBE), "EAGAIN");
    m.d.dmsetup(&["resume", "mp"]).ok();
    // A whole-device linear over the map passes the probe down to it.
    m.d.dmsetup(&["create", "over", "--table", "0 64 linear /dev/mapper/mp 0"]).ok();
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/over", PROBE), "ENOTCONN");
    // The paths come back: the probe finds them valid again.
    swap(&m, "pa", &format!("0 64 linear {} 0", m.d.path("pa.img").display()));
    m.d.dmsetup(&["message", "mp", "0", "reinstate_path", &a]).ok();
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/over", PROBE), "ok");
}

const MULTIPATH: &str = "/usr/sbin/multipath";

/// What a udev database and a configuration would add (docs/multipath-tools.md): runs `multipath
/// ARGS` under `dmemu exec` in a private mount namespace, with a tmpfs over /etc/multipath (a
/// conf.d file that lets dm-N paths through, takes the WWID from ID_SERIAL and checks paths with
/// directio) and one over /run/udev (udev's database: the ID_SERIAL udevd would have recorded for
/// each path in `paths`, `major:minor`). Nothing outside the namespace changes.
fn multipath_with_udev_db(m: &Mapper, args: &[&str], paths: &[String]) -> common::Out {
    let script = r#"set -e
mkdir -p /etc/multipath /run/udev
mount -t tmpfs dmemu-test /etc/multipath
mkdir /etc/multipath/conf.d
printf '%s\n' 'defaults {' '	path_checker directio' '}' 'blacklist_exceptions {' \
	'	devnode "^dm-"' '	property "^ID_SERIAL$"' '}' > /etc/multipath/conf.d/dmemu.conf
mount -t tmpfs dmemu-test /run/udev
mkdir /run/udev/data
for n in $PATHS; do printf 'E:ID_SERIAL=%s\n' "$WWID" > "/run/udev/data/b$n"; done
exec "$DMEMU" exec --socket "$SOCK" -- "$@"
"#;
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c", script, "sh", MULTIPATH]).args(args);
    c.env("PATHS", paths.join(" ")).env("WWID", WWID).env("DMEMU", common::bin()).env("SOCK", &m.d.socket);
    let o = c.output().expect("unshare");
    common::Out {
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        code: o.status.code().unwrap_or(-1),
    }
}

#[test]
fn multipath_ll_lists_a_map_over_dmemu_paths() {
    if !std::path::Path::new(MULTIPATH).exists() {
        eprintln!("skipped: {MULTIPATH} is not installed (Debian package multipath-tools)");
        return;
    }
    let m = Mapper::start();
    let prog = build_probe(&m.d);
    let major = m.d.major();
    m.linear("p1", 131072, 0, &[]);
    m.linear("p2", 131072, 0, &[]);
    m.d.dmsetup(&["create", "e1", "--table", "0 131072 error"]).ok();
    let table = "0 0 2 1 round-robin 0 2 1 /dev/mapper/p1 1 /dev/mapper/e1 1 round-robin 0 1 1 /dev/mapper/p2 1";
    create_map(&m, "mpatha", 131072, table);
    let header = format!("mpatha ({WWID}) dm-3 ##,##\nsize=64M features='0' hwhandler='0' wp=rw\n");

    // As it is: multipath-tools finds the map, its table and status and each path's sysfs entry
    // through libudev, then drops every path: neither dm-N names nor paths without a udev
    // ID_SERIAL pass its default blacklist.
    let plain = m.run(MULTIPATH, &["-ll"]);
    assert_eq!(plain.ok(), header, "{plain:#?}");
    for dev in ["dm-0", "dm-1", "dm-2"] {
        assert!(plain.stderr.contains(&format!("{dev}: error 2 in pathinfo, discarding path")), "{plain:#?}");
    }

    // The rest needs a private mount namespace for the stand-in udev database and configuration.
    let ns = Command::new("unshare").args(["--mount", "--propagation", "private", "true"]).status();
    if !ns.is_ok_and(|s| s.success()) {
        eprintln!("skipped the udev-database part: no private mount namespace here (unshare --mount)");
        return;
    }
    // With udev's database and a configuration, the groups and the path states: right after the
    // load no group is active; the error path's checker says faulty while the map still has it
    // active.
    let paths: Vec<String> = (0..3).map(|n| format!("{major}:{n}")).collect();
    let before = multipath_with_udev_db(&m, &["-ll"], &paths);
    assert_eq!(
        before.ok(),
        format!(
            "{header}|-+- policy='round-robin 0' prio=1 status=enabled\n\
             | |- #:#:#:# dm-0 {major}:0 active ready  running\n\
             | `- #:#:#:# dm-2 {major}:2 active faulty running\n\
             `-+- policy='round-robin 0' prio=1 status=enabled\n  \
             `- #:#:#:# dm-1 {major}:1 active ready  running\n"
        ),
        "{before:#?}"
    );
    // One read makes group 1 current, and DM_MPATH_PROBE_PATHS fails the error path in the map.
    read_first_block(&m, "/dev/mapper/mpatha").ok();
    assert_eq!(ioctl(&m, &prog, "/dev/mapper/mpatha", PROBE), "ok");
    let after = multipath_with_udev_db(&m, &["-ll"], &paths);
    assert_eq!(
        after.ok(),
        format!(
            "{header}|-+- policy='round-robin 0' prio=1 status=active\n\
             | |- #:#:#:# dm-0 {major}:0 active ready  running\n\
             | `- #:#:#:# dm-2 {major}:2 failed faulty running\n\
             `-+- policy='round-robin 0' prio=1 status=enabled\n  \
             `- #:#:#:# dm-1 {major}:1 active ready  running\n"
        ),
        "{after:#?}"
    );
    // multipath -ll changed nothing in the map.
    assert!(status(&m, "mpatha").contains(&format!("A 0 2 0 {major}:0 A 0 {major}:2 F 1 E 0 1 0 {major}:1 A 0")));
}
