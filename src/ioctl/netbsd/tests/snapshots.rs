//! Every NetBSD command and its main error cases: the exact request and reply plist text (with
//! `pref_len`), the compat-mode return where it differs, and the Linux face's reply to the same
//! operation, decoded. Review changes with `INSTA_UPDATE=always cargo test` and `git diff`.

use insta::assert_snapshot;

use super::harness::*;
use crate::ioctl::netbsd::{externalize, Dict, Value};

/// A linear line over the fake 64-sector file `/f/1/64` (pseudo number 251:0).
fn lin(start: u64, len: u64, off: u64) -> Line {
    line(start, len, "linear", &format!("/f/1/64 {off}"))
}

/// `a` live (linear + zero) and `b` created with a uuid, no table.
fn two_devices() -> Pair {
    let mut p = Pair::new();
    p.setup(&[
        create("a"),
        reload("a", &[lin(0, 16, 0), line(16, 16, "zero", "")]),
        Op::Resume(name("a")),
        Op::Create { name: "b".into(), uuid: Some("UUID-b".into()) },
    ]);
    p
}

fn raw(entries: Vec<(&str, Value)>) -> Vec<u8> {
    let d: Dict = entries.into_iter().map(|(k, v)| (k.as_bytes().to_vec(), v)).collect();
    externalize(&d)
}

fn ver(major: u32, minor: u32) -> Value {
    Value::Array(vec![Value::u(major), Value::u(minor), Value::u(0u32)])
}

#[test]
fn version_command() {
    assert_snapshot!("version", Pair::new().snapshot(&Op::Version));
}

#[test]
fn version_mismatch() {
    // Major 5, then minor 17 (newer than 4.16): EIO, the dictionary back untouched.
    let mut p = Pair::new();
    let mut s = p.snapshot_netbsd(&raw(vec![("command", Value::str("version")), ("version", ver(5, 0))]), true);
    s += &p.snapshot_netbsd(
        &raw(vec![("command", Value::str("info")), ("name", Value::str("a")), ("version", ver(4, 17))]),
        true,
    );
    assert_snapshot!("version_mismatch", s);
}

#[test]
fn targets() {
    assert_snapshot!("targets", Pair::new().snapshot(&Op::Targets));
}

#[test]
fn names() {
    let mut s = Pair::new().snapshot(&Op::Names);
    s += &two_devices().snapshot(&Op::Names);
    assert_snapshot!("names", s);
}

#[test]
fn create_command() {
    let op = Op::Create { name: "vg0-lv0".into(), uuid: Some("LVM-Q8nN0example".into()) };
    let mut p = Pair::new();
    let mut s = p.snapshot(&op);
    // The same name again: EEXIST with EXISTS set (Linux: EBUSY).
    s += &p.snapshot(&Op::Create { name: "vg0-lv0".into(), uuid: None });
    // A uuid in use.
    s += &p.snapshot(&Op::Create { name: "other".into(), uuid: Some("LVM-Q8nN0example".into()) });
    assert_snapshot!("create", s);
}

#[test]
fn create_invalid_name() {
    // NetBSD takes any name; the engine keeps Linux's check_name.
    let mut p = Pair::new();
    let mut s = p.snapshot(&create("a/b"));
    s += &p.snapshot_netbsd(&raw(vec![("command", Value::str("create")), ("version", ver(4, 0))]), true);
    assert_snapshot!("create_invalid_name", s);
}

#[test]
fn info() {
    let mut p = two_devices();
    p.setup(&[Op::Suspend(name("a")), reload("a", &[line(0, 8, "error", "")])]);
    let mut s = p.snapshot(&Op::Info(name("a")));
    s += &p.snapshot(&Op::Info(Sel::Uuid("UUID-b".into())));
    s += &p.snapshot(&Op::Mknodes(Sel::Minor(1)));
    assert_snapshot!("info", s);
}

#[test]
fn info_not_found() {
    let mut p = two_devices();
    let mut s = p.snapshot(&Op::Info(name("nope")));
    // Minor 0 means "not given" to NetBSD: the first device (minor 0) cannot be found by minor.
    s += &p.snapshot(&Op::Info(Sel::Minor(0)));
    assert_snapshot!("info_not_found", s);
}

#[test]
fn lookup_falls_back_from_minor_to_name_to_uuid() {
    let mut p = two_devices();
    let xml = raw(vec![
        ("command", Value::str("info")),
        ("flags", Value::u(4u32)),
        ("minor", Value::u(7u32)),
        ("name", Value::str("nope")),
        ("uuid", Value::str("UUID-b")),
        ("version", ver(4, 0)),
    ]);
    assert_snapshot!("lookup_fallback", p.snapshot_netbsd(&xml, true));
}

#[test]
fn suspend() {
    let mut p = two_devices();
    let mut s = p.snapshot(&Op::Suspend(name("a")));
    s += &p.snapshot(&Op::Suspend(name("nope")));
    assert_snapshot!("suspend", s);
}

#[test]
fn resume() {
    let mut p = two_devices();
    p.setup(&[reload("b", &[line(0, 8, "zero", "")])]);
    let mut s = p.snapshot(&Op::Resume(name("b")));
    // Again, without a new table: the engine keeps Linux's plain resume (NetBSD would swap in the
    // empty slot).
    s += &p.snapshot(&Op::Resume(name("b")));
    s += &p.snapshot(&Op::Resume(name("nope")));
    assert_snapshot!("resume", s);
}

#[test]
fn remove() {
    let mut p = two_devices();
    p.setup(&[create("c"), reload("c", &[line(0, 8, "linear", "/dev/mapper/a 0")]), Op::Resume(name("c"))]);
    // a is used by c's table.
    let mut s = p.snapshot(&Op::Remove(name("a")));
    s += &p.snapshot(&Op::Remove(name("c")));
    s += &p.snapshot(&Op::Remove(name("nope")));
    assert_snapshot!("remove", s);
}

#[test]
fn rename() {
    let mut p = two_devices();
    let mut s = p.snapshot(&Op::Rename { name: "b".into(), new: "b2".into() });
    s += &p.snapshot(&Op::Rename { name: "b2".into(), new: "a".into() });
    s += &p.snapshot(&Op::Rename { name: "nope".into(), new: "x".into() });
    s += &p.snapshot(&Op::Rename { name: "a".into(), new: "n".repeat(128) });
    s += &p.snapshot_netbsd(
        &raw(vec![("command", Value::str("rename")), ("name", Value::str("a")), ("version", ver(4, 0))]),
        true,
    );
    assert_snapshot!("rename", s);
}

#[test]
fn rename_by_uuid() {
    // NetBSD finds the device by any key; the engine's rename is by name, so the found name is used.
    let mut p = two_devices();
    let xml = raw(vec![
        ("cmd_data", Value::Array(vec![Value::str("renamed")])),
        ("command", Value::str("rename")),
        ("uuid", Value::str("UUID-b")),
        ("version", ver(4, 0)),
    ]);
    let mut s = p.snapshot_netbsd(&xml, true);
    s += &p.snapshot_netbsd(&externalize(&Op::Info(name("renamed")).dict()), true);
    assert_snapshot!("rename_by_uuid", s);
}

#[test]
fn reload_command() {
    let mut p = two_devices();
    let mut s = p.snapshot(&reload("b", &[lin(0, 8, 8), line(8, 8, "striped", "2 4 /f/2/64 0 /f/3/64 0")]));
    s += &p.snapshot(&reload("nope", &[line(0, 8, "zero", "")]));
    assert_snapshot!("reload", s);
}

#[test]
fn reload_errors() {
    let mut p = two_devices();
    // An unknown type (NetBSD: ENOENT; the engine's Linux check says EINVAL), a gap (NetBSD does
    // not validate, Linux does), an empty table.
    let mut s = p.snapshot(&reload("b", &[line(0, 8, "bogus", "")]));
    s += &p.snapshot(&reload("b", &[line(0, 8, "zero", ""), line(16, 8, "zero", "")]));
    s += &p.snapshot(&reload("b", &[]));
    // No params key: EINVAL after `minor` was written.
    let xml = raw(vec![
        (
            "cmd_data",
            Value::Array(vec![Value::Dict(
                [(b"type".to_vec(), Value::str("zero")), (b"length".to_vec(), Value::u(8u32))].into_iter().collect(),
            )]),
        ),
        ("command", Value::str("reload")),
        ("name", Value::str("b")),
        ("version", ver(4, 0)),
    ]);
    s += &p.snapshot_netbsd(&xml, true);
    assert_snapshot!("reload_errors", s);
}

#[test]
fn clear() {
    let mut p = two_devices();
    p.setup(&[reload("b", &[line(0, 8, "zero", "")])]);
    let mut s = p.snapshot(&Op::Clear(name("b")));
    s += &p.snapshot(&Op::Info(name("b")));
    s += &p.snapshot(&Op::Clear(name("nope")));
    assert_snapshot!("clear", s);
}

#[test]
fn deps() {
    let mut p = two_devices();
    p.setup(&[reload("b", &[line(0, 8, "linear", "/dev/mapper/a 0"), lin(8, 8, 0)]), Op::Resume(name("b"))]);
    let mut s = p.snapshot(&Op::Deps { sel: name("b"), inactive: false });
    // No inactive table: an empty list.
    s += &p.snapshot(&Op::Deps { sel: name("b"), inactive: true });
    s += &p.snapshot(&Op::Deps { sel: name("nope"), inactive: false });
    assert_snapshot!("deps", s);
}

#[test]
fn status_and_table() {
    let mut p = two_devices();
    p.setup(&[reload("b", &[line(0, 8, "striped", "2 4 /f/2/64 0 /f/3/64 0")]), Op::Suspend(name("a"))]);
    let st = |sel: Sel, command, table, inactive| Op::Status { sel, command, table, inactive };
    let mut s = p.snapshot(&st(name("a"), "table", true, false));
    // Without STATUS_TABLE the target's status text, whatever the command string says.
    s += &p.snapshot(&st(name("a"), "table", false, false));
    s += &p.snapshot(&st(name("b"), "status", false, false));
    s += &p.snapshot(&st(name("b"), "status", true, true));
    s += &p.snapshot(&st(name("nope"), "status", true, false));
    assert_snapshot!("status_and_table", s);
}

#[test]
fn commands_netbsd_does_not_have() {
    let mut p = two_devices();
    let mut s = String::new();
    for c in ["remove_all", "message", "setgeometry", "waitevent", "table_load", "table_status", "TABLE"] {
        s += &p.snapshot_netbsd(
            &raw(vec![("command", Value::str(c)), ("name", Value::str("a")), ("version", ver(4, 0))]),
            true,
        );
    }
    // No command string at all, or not a string.
    s += &p.snapshot_netbsd(&raw(vec![("version", ver(4, 0))]), true);
    s += &p.snapshot_netbsd(&raw(vec![("command", Value::u(1u32)), ("version", ver(4, 0))]), true);
    assert_snapshot!("commands_netbsd_does_not_have", s);
}

#[test]
fn unprivileged_callers() {
    // kauth: create (and any unknown string) is refused with EPERM; info is allowed.
    let mut p = two_devices();
    let mut s = p.snapshot_netbsd(&externalize(&create("c").dict()), false);
    s += &p.snapshot_netbsd(&raw(vec![("command", Value::str("bogus")), ("version", ver(4, 0))]), false);
    s += &p.snapshot_netbsd(&externalize(&Op::Info(name("a")).dict()), false);
    assert_snapshot!("unprivileged", s);
}

#[test]
fn copy_in_failures() {
    let mut p = Pair::new();
    let mut s = String::new();
    // Size limit: pref_len (NUL counted) at 128 KiB is E2BIG; just under it is parsed.
    let pad = |n: usize| {
        let mut x = externalize(&Op::Version.dict());
        let body = x.len() - 1;
        x.splice(body..body, std::iter::repeat_n(b' ', n - x.len()));
        x
    };
    for n in [128 * 1024 - 1, 128 * 1024] {
        let r = run_netbsd(&mut p.netbsd, &pad(n), true, crate::ioctl::netbsd::NetbsdErrors::Compat);
        s += &format!("pref_len {n}: ret {} errno {} xml {} bytes\n", r.ret, errno_name(r.errno), r.xml.len());
    }
    for (what, x) in [
        ("not XML", b"hello\0".to_vec()),
        ("array root", b"<plist><array/></plist>\0".to_vec()),
        ("numeric entity", b"<plist><dict><key>command</key><string>&#118;ersion</string></dict></plist>\0".to_vec()),
        ("empty", Vec::new()),
    ] {
        let r = run_netbsd(&mut p.netbsd, &x, true, crate::ioctl::netbsd::NetbsdErrors::Compat);
        s += &format!("{what}: ret {} errno {} xml {} bytes\n", r.ret, errno_name(r.errno), r.xml.len());
    }
    assert_snapshot!("copy_in_failures", s);
}

#[test]
fn requests_in_other_spellings() {
    // Signed and octal numbers, entities, unsorted keys, no prologue, a missing NUL: accepted;
    // the reply is proplib's canonical form.
    let mut p = two_devices();
    let xml = b"<plist version=\"1.0\"><dict><key>version</key><array><integer>4</integer><integer>00</integer><integer>-0</integer></array><key>command</key><string>inf&#x6f;</string></dict></plist>";
    let bad = p.snapshot_netbsd(xml, true);
    let xml = b"<plist version=\"1.0\"><dict><key>version</key><array><integer>4</integer><integer>010</integer><integer>-0</integer></array><key>flags</key><integer>0X14</integer><key>command</key><string>table</string><key>name</key><string>a</string></dict></plist>";
    let good = p.snapshot_netbsd(xml, true);
    assert_snapshot!("other_spellings", format!("{bad}{good}"));
}
