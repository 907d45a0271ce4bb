//! The `switch` target through the real dmsetup (both constructor forms), the RFC's binary
//! `IpcPgTable` upload on the control socket (every check of the RFC's `get_page_tbl`), and
//! `dmemu switch upload`.

mod common;

use common::{bin, Daemon};
use dmemu::client::switch::genl;
use dmemu::client::Client;
use dmemu::ioctl::dm_switch::{self, IpcPgTable, ReplyMsg, FAMILY_ID, FAMILY_NAME, NLM_F_ACK};

/// Three 2048-sector backing files; returns their paths and `file_major:minor` names.
fn three_paths(d: &Daemon) -> (Vec<String>, Vec<String>) {
    let files: Vec<String> = (0..3).map(|i| d.file(&format!("p{i}"), 2048)).collect();
    let fm = d.hello("file_major");
    (files, (0..3).map(|i| format!("{fm}:{i}")).collect())
}

#[test]
fn upstream_form_create_table_status_message() {
    let d = Daemon::start();
    let (f, n) = three_paths(&d);
    // 2000 sectors in regions of 300 (not a power of two; the last region is partial).
    let table = format!("0 2000 switch 3 300 0 {} 0 {} 16 {} 32", f[0], f[1], f[2]);
    d.dmsetup(&["create", "up", "--table", &table]).ok();
    assert_eq!(d.dmsetup(&["table", "up"]).ok(), format!("0 2000 switch 3 300 0 {} 0 {} 16 {} 32\n", n[0], n[1], n[2]));
    // No status line upstream.
    assert_eq!(d.dmsetup(&["status", "up"]).ok(), "0 2000 switch \n");
    d.dmsetup(&["message", "up", "0", "set_region_mappings", "0:2", ":1", "R2,3"]).ok();
    d.dmsetup(&["message", "up", "0", "SET_REGION_MAPPINGS"]).ok();
    // Region 6 is the last of 7; region 7 does not exist; there is no path 3.
    d.dmsetup(&["message", "up", "0", "set_region_mappings", "6:0"]).ok();
    let bad = [
        "set_region_mappings 7:0",
        "set_region_mappings 1:3",
        "set_region_mappings 0:1 R2,1",
        "set_region_mappings 1:1 R1,6",
        "set_region_mappings 1:",
        "set_region_mappings 0x1:1",
        "set_region_mappings 1+2",
        "no_such_message",
    ];
    for m in bad {
        let args: Vec<&str> = ["message", "up", "0"].into_iter().chain(m.split(' ')).collect();
        assert!(d.dmsetup(&args).err().contains("Invalid argument"), "{m}");
    }
    let log = d.log();
    assert!(log.contains("switch: invalid set_region_mappings region number: 7 >= 7"), "{log}");
    assert!(log.contains("switch: invalid set_region_mappings device: 3 >= 3"));
    assert!(log.contains("switch: invalid set_region_mappings cycle length: 1 > 0"));
    assert!(log.contains("switch: invalid set_region_mappings region number: 1 + 6 >= 7"));
    assert!(log.contains("switch: Unrecognised message received."));
    // Messages never change the table line.
    assert_eq!(d.dmsetup(&["table", "up"]).ok(), format!("0 2000 switch 3 300 0 {} 0 {} 16 {} 32\n", n[0], n[1], n[2]));
    // The switch sits behind another target: messages go to the target at their sector.
    let two = format!("0 8 zero\n8 2000 switch 2 64 0 {} 0 {} 0", f[0], f[1]);
    d.dmsetup_stdin(&["create", "two"], &two).ok();
    d.dmsetup(&["message", "two", "8", "set_region_mappings", "1f:1"]).ok();
    assert!(d.dmsetup(&["message", "two", "0", "set_region_mappings", "0:1"]).err().contains("Invalid argument"));
    assert!(d.dmsetup(&["targets"]).ok().contains("switch           v1.1.0\n"));
}

#[test]
fn rfc_form_create_table_status_upload() {
    let d = Daemon::start();
    let (f, n) = three_paths(&d);
    let table = format!("0 2048 switch 3 64 {} 0 {} 8 {} 0", f[0], f[1], f[2]);
    d.dmsetup(&["create", "rfc", "--table", &table]).ok();
    assert_eq!(d.dmsetup(&["table", "rfc"]).ok(), format!("0 2048 switch 3 64 {} 0 {} 8 {} 0\n", n[0], n[1], n[2]));
    let status = |u0: &str, u1: &str| format!("0 2048 switch 3 {} {} {} 5 AAA {u0} {u1} 0 0\n", n[0], n[1], n[2]);
    assert_eq!(d.dmsetup(&["status", "rfc"]).ok(), status("00000000", "00000000"));
    // The RFC form has no message handler.
    assert!(d.dmsetup(&["message", "rfc", "0", "set_region_mappings", "0:1"]).err().contains("Invalid argument"));
    let map = d.path("map.txt");
    std::fs::write(&map, (0..32).map(|i| (i % 3).to_string()).collect::<Vec<_>>().join("\n")).unwrap();
    let up = std::process::Command::new(bin())
        .args(["switch", "upload", "--socket"])
        .arg(&d.socket)
        .args(["rfc", "--page-size", "64", "--userland", "0xc0ffee", "7"])
        .arg(&map)
        .output()
        .unwrap();
    assert!(up.status.success(), "{up:?}");
    assert_eq!(
        String::from_utf8_lossy(&up.stdout).split(" (").next().unwrap(),
        "rfc: 32 regions in 1 IpcPgTable messages"
    );
    assert_eq!(d.dmsetup(&["status", "rfc"]).ok(), status("00c0ffee", "00000007"));
    assert_eq!(d.dmsetup(&["table", "rfc"]).ok(), format!("0 2048 switch 3 64 {} 0 {} 8 {} 0\n", n[0], n[1], n[2]));
    // A new table starts without a page table (the RFC's context is per constructed target).
    d.dmsetup(&["reload", "rfc", "--table", &table]).ok();
    d.dmsetup(&["resume", "rfc"]).ok();
    assert_eq!(d.dmsetup(&["status", "rfc"]).ok(), status("00000000", "00000000"));
}

#[test]
fn constructor_errors_of_both_forms() {
    let d = Daemon::start();
    let (f, _) = three_paths(&d);
    let cases = [
        // Odd counts: upstream.
        ("0 64 switch 0 8 0".to_string(), "switch: Invalid number of paths"),
        (format!("0 64 switch 1 0 0 {} 0", f[0]), "switch: Invalid region size"),
        (format!("0 64 switch 1 4294967296 0 {} 0", f[0]), "switch: Invalid region size"),
        (format!("0 64 switch 1 8 1 {} 0", f[0]), "switch: Invalid number of optional args"),
        (format!("0 64 switch 2 8 0 {} 0", f[0]), "switch: Incorrect number of path arguments"),
        (format!("0 64 switch 1 8 0 {} x", f[0]), "switch: Invalid device starting offset"),
        ("0 64 switch 1".to_string(), "switch: Invalid region size"),
        // Even counts: the RFC.
        ("0 64 switch 1 8".to_string(), "switch: Insufficient arguments"),
        (format!("0 64 switch x 8 {} 0", f[0]), "switch: Invalid device count"),
        (format!("0 64 switch 2 8 {} 0", f[0]), "switch: Invalid argument count"),
        (format!("0 64 switch 1 0 {} 0", f[0]), "switch: Invalid page size"),
        (format!("0 64 switch 1 +8 {} 0", f[0]), "switch: Invalid page size"),
        (format!("0 64 switch 1 8 {} x", f[0]), "switch: Invalid device starting offset"),
        (format!("0 4096 switch 1 8 {} 0", f[0]), "switch: Device too small for target"),
        // Upstream checks start + length against the device.
        (format!("0 2048 switch 1 8 0 {} 1", f[0]), "too small for target"),
    ];
    for (i, (table, want)) in cases.iter().enumerate() {
        let name = format!("bad{i}");
        assert!(d.dmsetup(&["create", &name, "--table", table]).err().contains("Invalid argument"), "{table}");
        assert!(d.log().contains(want), "{table}: want {want:?} in\n{}", d.log());
    }
    // The RFC's offset is read like sscanf("%llu"): trailing characters are ignored.
    d.dmsetup(&["create", "lenient", "--table", &format!("0 64 switch 1 8 {} 16abc", f[0])]).ok();
    assert!(d.dmsetup(&["table", "lenient"]).ok().ends_with(":0 16\n"));
}

/// One upload request on a fresh connection; the reply's messages.
fn send(d: &Daemon, req: &[u8]) -> Vec<ReplyMsg> {
    let mut c = Client::connect(&d.socket).unwrap();
    genl(&mut c, req).unwrap()
}

fn pg(dev: (u32, u32), dev_count: u16, bits: u8, total: u32, offset: u32, count: u32) -> IpcPgTable {
    IpcPgTable {
        userland: [1, 2],
        dev_major: dev.0,
        dev_minor: dev.1,
        page_total: total,
        page_offset: offset,
        page_count: count,
        page_size: 64,
        dev_count,
        pte_bits: bits,
        ..Default::default()
    }
}

/// Uploads one `IpcPgTable` and returns (status, err_str), checking the echoed fields.
fn upload(d: &Daemon, msg: &[u8]) -> (u32, String) {
    let reply = send(d, &dm_switch::upload_request(9, msg));
    let [ReplyMsg::Response(r)] = &reply[..] else { panic!("{reply:?}") };
    let mut echo = [0u8; 24];
    let n = msg.len().min(24);
    echo[..n].copy_from_slice(&msg[..n]);
    assert_eq!((r.total_len, r.opcode), (284, 1));
    assert_eq!(r.userland[0].to_ne_bytes(), echo[8..12]);
    assert_eq!(r.dev_major.to_ne_bytes(), echo[16..20]);
    assert_eq!(r.dev_minor.to_ne_bytes(), echo[20..24]);
    (r.status, r.error())
}

fn msg(h: IpcPgTable, entries: &[u32]) -> Vec<u8> {
    if entries.is_empty() {
        return dm_switch::page_table_message(&h, &[]);
    }
    dm_switch::page_table_message(&h, &dm_switch::pack_entries(entries.iter().copied(), h.pte_bits))
}

#[test]
fn every_ipc_pg_table_check() {
    let d = Daemon::start();
    let (f, _) = three_paths(&d);
    let major = d.major();
    // minor 0: an RFC switch of 32 regions over 3 paths; 1: upstream form; 2: linear.
    d.dmsetup(&["create", "rfc", "--table", &format!("0 2048 switch 3 64 {} 0 {} 0 {} 0", f[0], f[1], f[2])]).ok();
    d.dmsetup(&["create", "up", "--table", &format!("0 2048 switch 3 64 0 {} 0 {} 0 {} 0", f[0], f[1], f[2])]).ok();
    d.dmsetup(&["create", "lin", "--table", &format!("0 2048 linear {} 0", f[0])]).ok();
    let rfc = (major, 0);
    let einval = libc::EINVAL as u32;
    let inv = |s: &str| (einval, format!("Invalid Page Table message: {s}"));
    let e16: Vec<u32> = (0..16).map(|i| i % 3).collect();

    assert_eq!(upload(&d, &msg(pg(rfc, 3, 2, 32, 0, 16), &e16)[..43]), inv("too short (43)"));
    assert_eq!(upload(&d, &msg(pg(rfc, 3, 2, 32, 20, 16), &e16)), inv("too many page table entries (36 > 32)"));
    assert_eq!(upload(&d, &msg(pg(rfc, 5, 2, 32, 0, 16), &e16)), inv("invalid mask 0x3 for 5 devices"));
    assert_eq!(upload(&d, &msg(pg(rfc, 3, 0, 32, 0, 0), &[])), inv("invalid mask 0x0 for 3 devices"));
    let m = msg(pg(rfc, 3, 2, 32, 0, 17), &e16);
    assert_eq!(upload(&d, &m[..m.len() - 1]), inv("incomplete message"));
    for dev in [(major, 7), (major, 1), (major, 2), (major + 1, 0), (major, 1 << 20)] {
        assert_eq!(
            upload(&d, &msg(pg(dev, 3, 2, 32, 0, 16), &e16)),
            inv(&format!("invalid target device {}:{}", dev.0, dev.1))
        );
    }
    assert_eq!(upload(&d, &msg(pg(rfc, 3, 2, 32, 16, 16), &e16)), inv("missing entries"));
    // Chunks: 0..16, then 16..32.
    assert_eq!(upload(&d, &msg(pg(rfc, 3, 2, 32, 0, 16), &e16)), (0, String::new()));
    assert_eq!(upload(&d, &msg(pg(rfc, 3, 2, 32, 17, 15), &e16[..15])), inv("missing entries"));
    assert_eq!(upload(&d, &msg(pg(rfc, 4, 2, 32, 16, 16), &e16)), inv("invalid device count 4"));
    assert_eq!(upload(&d, &msg(pg(rfc, 3, 4, 32, 16, 16), &e16)), inv("number of bits changed"));
    assert_eq!(upload(&d, &msg(pg(rfc, 3, 2, 64, 16, 16), &e16)), inv("total number of entries changed"));
    assert_eq!(upload(&d, &msg(pg(rfc, 3, 2, 32, 16, 16), &e16)), (0, String::new()));
    // A rebuild from offset 0 may change everything the later chunks may not.
    assert_eq!(upload(&d, &msg(pg(rfc, 4, 4, 64, 0, 3), &[3, 2, 1])), (0, String::new()));
    assert!(d.dmsetup(&["status", "rfc"]).ok().contains(" 5 AAA 00000001 00000002 0 0\n"));
    let log = d.log();
    assert!(log.contains("get_page_tbl: Invalid Page Table message: missing entries"), "{log}");
}

#[test]
fn netlink_framing_of_the_upload() {
    let d = Daemon::start();
    let (f, _) = three_paths(&d);
    d.dmsetup(&["create", "rfc", "--table", &format!("0 2048 switch 3 64 {} 0 {} 0 {} 0", f[0], f[1], f[2])]).ok();
    let m = msg(pg((d.major(), 0), 3, 2, 32, 0, 4), &[1, 2, 0, 1]);
    // The family resolves by name like any generic-netlink family.
    assert_eq!(send(&d, &dm_switch::getfamily_request(1, FAMILY_NAME)), vec![ReplyMsg::Family(FAMILY_ID)]);
    assert_eq!(send(&d, &dm_switch::getfamily_request(1, "nl80211")), vec![ReplyMsg::Error(-libc::ENOENT)]);
    // NLM_F_ACK: the response, then an ack, in one reply frame.
    let mut req = dm_switch::upload_request(5, &m);
    req[6] |= NLM_F_ACK as u8;
    let r = send(&d, &req);
    assert!(matches!(&r[..], [ReplyMsg::Response(x), ReplyMsg::Error(0)] if x.status == 0), "{r:?}");
    // The attribute policy: at most 65,480 bytes.
    let big = vec![0u8; dm_switch::MAX_IPC_MSG_LEN + 1];
    assert_eq!(send(&d, &dm_switch::upload_request(1, &big)), vec![ReplyMsg::Error(-libc::ERANGE)]);
    // Many requests on one connection, answered in order.
    let mut c = Client::connect(&d.socket).unwrap();
    for seq in 0..50 {
        let r = genl(&mut c, &dm_switch::upload_request(seq, &m)).unwrap();
        assert!(matches!(&r[..], [ReplyMsg::Response(x)] if x.status == 0));
    }
    // The connection still serves ioctls.
    assert!(d.dmsetup(&["status", "rfc"]).ok().contains(" 5 AAA 00000001 00000002 0 0\n"));
}

#[test]
fn uploads_reach_an_inactive_table_when_there_is_no_live_one() {
    let d = Daemon::start();
    let (f, n) = three_paths(&d);
    d.dmsetup(&["create", "late", "--notable"]).ok();
    d.dmsetup(&["load", "late", "--table", &format!("0 2048 switch 3 64 {} 0 {} 0 {} 0", f[0], f[1], f[2])]).ok();
    assert_eq!(upload(&d, &msg(pg((d.major(), 0), 3, 2, 32, 0, 4), &[1, 2, 0, 1])), (0, String::new()));
    d.dmsetup(&["resume", "late"]).ok();
    assert_eq!(
        d.dmsetup(&["status", "late"]).ok(),
        format!("0 2048 switch 3 {} {} {} 5 AAA 00000001 00000002 0 0\n", n[0], n[1], n[2])
    );
}

fn upload_cli(d: &Daemon, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin()).args(["switch", "upload", "--socket"]).arg(&d.socket).args(args).output().unwrap()
}

#[test]
fn cli_chunks_big_tables_and_reports_progress() {
    let d = Daemon::start();
    // 1,048,576 regions of 1 sector over 5 files: 3-bit entries, 10 to a wire word, 163,590 per
    // message: 7 messages.
    let files: Vec<String> = (0..5).map(|i| d.file(&format!("big{i}"), 1 << 20)).collect();
    let paths: Vec<String> = files.iter().map(|f| format!("{f} 0")).collect();
    d.dmsetup(&["create", "big", "--table", &format!("0 1048576 switch 5 1 {}", paths.join(" "))]).ok();
    let map = d.path("big.txt");
    let text: String = (0..1u32 << 20).map(|i| format!("{}\n", i.wrapping_mul(2654435761) % 5)).collect();
    std::fs::write(&map, text).unwrap();
    let o = upload_cli(&d, &["big", "--page-size", "1", map.to_str().unwrap()]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{err}");
    assert!(out.starts_with("big: 1048576 regions in 7 IpcPgTable messages"), "{out}");
    assert!(err.contains("big: 1048576/1048576 regions (100%)\n"), "{err}");
    assert!(err.lines().count() >= 5, "{err}");
    // The same table packed (raw), at 4 bits.
    let raw = d.path("big.raw");
    let words = dm_switch::pack_entries((0..1u32 << 20).map(|i| i % 5), 4);
    std::fs::write(&raw, words.iter().flat_map(|w| w.to_ne_bytes()).collect::<Vec<u8>>()).unwrap();
    let o = upload_cli(&d, &["big", "--page-size", "1", "--pte-bits", "4", "--raw", raw.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("big: 1048576 regions in 9 IpcPgTable messages"));
    // Wrong page size, an entry too wide for the entries.
    let o = upload_cli(&d, &["big", "--page-size", "8", map.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--page-size 8 does not match the table's 1"), "{o:?}");
    let o = upload_cli(&d, &["big", "--page-size", "1", "--pte-bits", "2", map.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("more than 3"), "{o:?}");
}

#[test]
fn cli_uploads_upstream_form_by_messages() {
    let d = Daemon::start();
    let (f, _) = three_paths(&d);
    d.dmsetup(&["create", "up", "--table", &format!("0 2048 switch 3 16 0 {} 0 {} 0 {} 0", f[0], f[1], f[2])]).ok();
    let map = d.path("map.txt");
    std::fs::write(&map, (0..128).map(|i| ((i / 5) % 3).to_string()).collect::<Vec<_>>().join(" ")).unwrap();
    let o = upload_cli(&d, &["up", "--page-size", "16", map.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("up: 128 regions in 1 set_region_mappings messages"));
    assert!(d.log().contains("DM_TARGET_MSG ok"));
    // One region too many for the device.
    std::fs::write(&map, vec!["1"; 129].join(" ")).unwrap();
    let o = upload_cli(&d, &["up", "--page-size", "16", map.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("the device only 128 regions"), "{o:?}");
}

#[test]
fn unprivileged_peers_may_not_upload() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start();
    let (f, _) = three_paths(&d);
    d.dmsetup(&["create", "rfc", "--table", &format!("0 2048 switch 3 64 {} 0 {} 0 {} 0", f[0], f[1], f[2])]).ok();
    let map = d.path("map.txt");
    std::fs::write(&map, "0 1 2 0").unwrap();
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&map, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin())
        .args(["switch", "upload", "--socket"])
        .arg(&d.socket)
        .args(["rfc", "--page-size", "64"])
        .arg(&map)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("upload refused: Operation not permitted"), "{o:?}");
    assert!(d.dmsetup(&["status", "rfc"]).ok().ends_with(" 5 AAA 00000000 00000000 0 0\n"));
}
