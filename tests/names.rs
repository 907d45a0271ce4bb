//! Device names and uuids are bytes (linux-dm-abi.md §2.4: the kernel's `check_name` refuses only
//! `/` and the reserved names): Debian's dmsetup, with name mangling off, creates, shows, lists,
//! renames and removes a device whose name and uuid are not UTF-8, and every byte comes back.

mod common;

use common::{Daemon, RawOut};
use dmemu::client::{Client, IoctlBuf, IoctlResult};
use dmemu::ioctl::layout::DmCmd;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// `dmsetup --manglename none ARGS`: libdm's default ("auto") would turn non-whitelisted bytes
/// into `\xNN` text before the ioctl; "none" sends them as they are.
fn dmsetup(d: &Daemon, args: &[&[u8]]) -> RawOut {
    let mut all: Vec<&OsStr> = vec![OsStr::new("--manglename"), OsStr::new("none")];
    all.extend(args.iter().map(|a| OsStr::from_bytes(a)));
    d.dmsetup_os(&all)
}

#[track_caller]
fn ok(out: RawOut, stdout: &[u8]) {
    assert_eq!((out.code, out.stdout.as_slice(), out.stderr.as_slice()), (0, stdout, &b""[..]), "{out:?}");
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `dmsetup info` of a live one-target device (`_display_info_long`).
fn info(name: &[u8], event: u32, major: u32, uuid: &[u8]) -> Vec<u8> {
    let head = "State:             ACTIVE\nRead Ahead:        256\nTables present:    LIVE\n\
                Open count:        0\n";
    let tail = format!("Event number:      {event}\nMajor, minor:      {major}, 0\nNumber of targets: 1\n");
    cat(&[b"Name:              ", name, b"\n", head.as_bytes(), tail.as_bytes(), b"UUID: ", uuid, b"\n\n"])
}

#[test]
fn non_utf8_names_and_uuids_round_trip() {
    let d = Daemon::start();
    let major = d.major();
    let (name, uuid, renamed) = (&b"caf\xe9"[..], &b"LVM-\xff\x01 x"[..], &b"\xfe\xff-2"[..]);
    ok(dmsetup(&d, &[b"create", name, b"-u", uuid, b"--table", b"0 2048 zero"]), b"");
    ok(dmsetup(&d, &[b"info", name]), &info(name, 0, major, uuid));
    // Found by uuid too, byte for byte.
    ok(dmsetup(&d, &[b"info", b"-u", uuid]), &info(name, 0, major, uuid));
    ok(dmsetup(&d, &[b"table", name]), b"0 2048 zero \n");
    ok(dmsetup(&d, &[b"ls"]), &cat(&[name, format!("\t({major}:0)\n").as_bytes()]));
    ok(dmsetup(&d, &[b"info", b"-c", b"--noheadings", b"-o", b"name,uuid"]), &cat(&[name, b":", uuid, b"\n"]));
    // sysfs shows the raw bytes and a newline, as the kernel's does.
    assert_eq!(std::fs::read(d.path("sys/block/dm-0/dm/name")).unwrap(), cat(&[name, b"\n"]));
    assert_eq!(std::fs::read(d.path("sys/block/dm-0/dm/uuid")).unwrap(), cat(&[uuid, b"\n"]));
    // libdm made the node under the raw name.
    let node = |n: &[u8]| d.path("dev/mapper").join(OsStr::from_bytes(n));
    assert!(node(name).symlink_metadata().is_ok(), "no node {:?}", node(name));

    ok(dmsetup(&d, &[b"rename", name, renamed]), b"");
    // A rename fires a table event on the live table (§2.4 DM_DEV_RENAME).
    ok(dmsetup(&d, &[b"info", renamed]), &info(renamed, 1, major, uuid));
    ok(dmsetup(&d, &[b"ls"]), &cat(&[renamed, format!("\t({major}:0)\n").as_bytes()]));
    assert_eq!(std::fs::read(d.path("sys/block/dm-0/dm/name")).unwrap(), cat(&[renamed, b"\n"]));
    assert!(node(renamed).symlink_metadata().is_ok() && node(name).symlink_metadata().is_err());
    let old = dmsetup(&d, &[b"info", name]);
    assert_eq!((old.code, old.stderr.as_slice()), (1, &b"Device does not exist.\nCommand failed.\n"[..]), "{old:?}");

    ok(dmsetup(&d, &[b"remove", renamed]), b"");
    ok(dmsetup(&d, &[b"ls"]), b"No devices found\n");
    assert!(node(renamed).symlink_metadata().is_err());
    assert!(d.alive());
}

/// A raw DM ioctl with `name` set byte for byte, and RENAME's new name as payload.
fn raw(d: &Daemon, cmd: DmCmd, name: &[u8], new_name: Option<&[u8]>) -> IoctlResult {
    let mut b = IoctlBuf::new(cmd);
    b.header.name[..name.len()].copy_from_slice(name);
    if let Some(n) = new_name {
        b.payload = [n, b"\0"].concat();
    }
    Client::connect(&d.socket).expect("connect").run(&b).expect("reply")
}

#[test]
fn a_slash_or_a_reserved_name_is_still_einval() {
    let d = Daemon::start();
    // libdm refuses a `/` itself, before any ioctl.
    let out = dmsetup(&d, &[b"create", b"caf\xe9/x", b"--table", b"0 8 zero"]);
    assert_eq!(
        (out.code, out.stderr.as_slice()),
        (1, &b"Name \"caf\xe9/x\" invalid. It contains \"/\".\nCommand failed.\n"[..]),
        "{out:?}"
    );
    // The reserved names reach the daemon: EINVAL.
    for bad in [&b"control"[..], b".", b".."] {
        let out = dmsetup(&d, &[b"create", bad, b"--table", b"0 8 zero"]);
        let stderr = cat(&[b"device-mapper: create ioctl on ", bad, b"  failed: Invalid argument\nCommand failed.\n"]);
        assert_eq!(
            (out.code, out.stdout.as_slice(), out.stderr.as_slice()),
            (1, &b""[..], stderr.as_slice()),
            "{out:?}"
        );
    }
    // The daemon refuses it too, among any other bytes, on create and as a new name.
    for bad in [&b"caf\xe9/x"[..], b"/", b"\xff/", b"control", b".", b".."] {
        let r = raw(&d, DmCmd::DevCreate, bad, None);
        assert_eq!((r.ret, r.errno), (-1, libc::EINVAL), "create {:?}", bad.escape_ascii().to_string());
    }
    assert_eq!(raw(&d, DmCmd::DevCreate, b"\xe9", None).ret, 0);
    let r = raw(&d, DmCmd::DevRename, b"\xe9", Some(b"\xe9/\xe9"));
    assert_eq!((r.ret, r.errno), (-1, libc::EINVAL));
    ok(dmsetup(&d, &[b"ls"]), &cat(&[b"\xe9", format!("\t({}:0)\n", d.major()).as_bytes()]));
    assert!(d.alive());
}

/// The state record keeps name and uuid bytes: a daemon started on the same run dir brings the
/// device back under the same bytes.
#[test]
fn byte_names_survive_a_restart() {
    let mut d = Daemon::start();
    let major = d.major();
    let (name, uuid) = (&b"\xe9t\xe9 \x01"[..], &b"\x80\x81"[..]);
    ok(dmsetup(&d, &[b"create", name, b"-u", uuid, b"--table", b"0 2048 zero"]), b"");
    d.restart_after(libc::SIGKILL);
    ok(dmsetup(&d, &[b"info", name]), &info(name, 0, major, uuid));
    assert_eq!(std::fs::read(d.path("sys/block/dm-0/dm/name")).unwrap(), cat(&[name, b"\n"]));
    ok(dmsetup(&d, &[b"remove", name]), b"");
}

/// The FUSE front end names a device's file by the name's raw bytes, and the shim's `/dev/dm-N`
/// (which reads the name back from sysfs) and `/dev/mapper/<bytes>` both lead to it.
#[test]
fn fuse_files_are_named_by_the_raw_bytes() {
    use std::os::unix::fs::FileExt;
    let m = common::fuse::Mapper::start();
    let name = &b"caf\xe9 "[..];
    let file = m.d.file("disk.img", 64);
    let table = format!("0 64 linear {file} 0");
    ok(dmsetup(&m.d, &[b"create", name, b"--table", table.as_bytes()]), b"");
    let listed: Vec<Vec<u8>> =
        std::fs::read_dir(&m.fuse).unwrap().map(|e| e.unwrap().file_name().as_bytes().to_vec()).collect();
    assert_eq!(listed, vec![name.to_vec()]);
    let f = std::fs::OpenOptions::new().write(true).open(m.fuse.join(OsStr::from_bytes(name))).unwrap();
    f.write_all_at(b"through the byte name", 512).unwrap();
    drop(f);
    assert_eq!(&std::fs::read(&file).unwrap()[512..533], b"through the byte name");
    // /dev/dm-0 under the shim: the name comes back from sysfs, trailing space and all.
    let out = m.run("dd", &["if=/dev/dm-0", "bs=512", "skip=1", "count=1", "status=none"]);
    assert!(out.stdout.as_bytes().starts_with(b"through the byte name"), "{out:?}");
    // /dev/mapper/<bytes> under the shim.
    let mut dd: Vec<&OsStr> = ["dd", "bs=512", "skip=1", "count=1", "status=none"].iter().map(OsStr::new).collect();
    let arg = [&b"if=/dev/mapper/"[..], name].concat();
    dd.push(OsStr::from_bytes(&arg));
    let out = std::process::Command::new(common::bin())
        .arg("exec")
        .arg("--socket")
        .arg(&m.d.socket)
        .arg("--")
        .args(&dd)
        .output()
        .unwrap();
    assert!(out.stdout.starts_with(b"through the byte name"), "{out:?}");
}
