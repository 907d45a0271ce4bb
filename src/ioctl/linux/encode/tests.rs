use super::super::fixtures::{
    buf, decoded, header, info, reply_header, sized, u32_at, u64_at, uuid, with_name, with_uuid,
};
use super::*;
use crate::dm::{Sectors, TargetStatus, TargetVersion};
use crate::ioctl::layout::{dm_ioctl_request, DmCmd};

const V: [u8; 12] = [4, 0, 0, 0, 48, 0, 0, 0, 0, 0, 0, 0];
const P: usize = DM_IOCTL_SIZE;

fn named(name: &str) -> DmIoctl {
    with_name(header(), name)
}

fn flagged(mut h: DmIoctl, f: DmFlags) -> DmIoctl {
    h.set_flags(h.flags() | f);
    h
}

fn ok(e: &Encoded) -> &[u8] {
    assert_eq!((e.ret, e.errno), (0, 0));
    &e.bytes
}

fn entry(name: &str, minor: u32, event_nr: u32, u: Option<&str>) -> NameEntry {
    NameEntry { dev: DevNum::new(252, minor), name: DmName::new(name).unwrap(), event_nr, uuid: u.and_then(uuid) }
}

fn ts(start: u64, len: u64, ty: &str, text: &str) -> TargetStatus {
    TargetStatus { start: Sectors(start), length: Sectors(len), target_type: ty.into(), text: text.into() }
}

// ---- version and errors --------------------------------------------------------------------

#[test]
fn version_reply_is_the_version_only() {
    assert_eq!(encode_version(), Encoded { ret: 0, errno: 0, bytes: V.to_vec() });
}

#[test]
fn errors_write_back_only_the_version() {
    let b = buf(named("a"), &[0xaa; 64]);
    let e = encode_error(DmCmd::TableStatus.request(), &b, &DmError::NoDevice("x".into()));
    assert_eq!(e, Encoded { ret: -1, errno: libc::ENXIO, bytes: V.to_vec() });
    // Even when the version check itself failed, or the command number is unknown.
    let mut h = named("a");
    h.version = [5, 1, 2];
    let e = encode_error(DmCmd::DevStatus.request(), &buf(h, &[]), &DmError::Invalid("v".into()));
    assert_eq!((e.errno, e.bytes), (libc::EINVAL, V.to_vec()));
    let e = encode_error(dm_ioctl_request(30), &b, &DmError::NotTty("n".into()));
    assert_eq!((e.errno, e.bytes), (libc::ENOTTY, V.to_vec()));
    // Nothing for a foreign ioctl type, an unreadable version, or EACCES (checked first of all).
    assert!(encode_error(0x5401, &b, &DmError::NotTty("t".into())).bytes.is_empty());
    assert!(encode_error(DmCmd::DevStatus.request(), &b[..11], &DmError::Fault("f".into())).bytes.is_empty());
    assert!(encode_error(DmCmd::DevStatus.request(), &b, &DmError::Access).bytes.is_empty());
    assert_eq!(encode_error(DmCmd::DevStatus.request(), &b, &DmError::Access).errno, libc::EACCES);
}

#[test]
fn secure_data_wipes_the_callers_buffer() {
    let b = sized(flagged(named("a"), DmFlags::SECURE_DATA), 1024, 0x55);
    // An error after copy_params: all of data_size reads back as zeros, version included.
    let e = encode_error(DmCmd::TableLoad.request(), &b, &DmError::Invalid("bad table".into()));
    assert_eq!(e.bytes, vec![0; 1024]);
    let d = decoded(DmCmd::TableStatus, &b);
    assert_eq!(d.encode_error(&DmError::Busy("b".into())).bytes, vec![0; 1024]);
    // Before copy_params (bad data_size) nothing was wiped.
    let mut bad = b.clone();
    bad[12..16].copy_from_slice(&300u32.to_ne_bytes());
    assert_eq!(encode_error(DmCmd::TableLoad.request(), &bad, &DmError::Invalid("x".into())).bytes, V.to_vec());
    // Success: the 305-byte reply over zeros.
    let r = encode(&Reply::Status(info("a", 0), None), &d);
    assert_eq!(r.bytes.len(), 1024);
    assert_eq!(&r.bytes[..12], &V);
    assert_eq!(u32_at(&r.bytes, 12), 305);
    assert!(r.bytes[305..].iter().all(|&x| x == 0));
    // No-params commands wipe just the header; REMOVE_ALL copies nothing, so even the version is gone.
    let d = decoded(DmCmd::RemoveAll, &b);
    assert_eq!(encode(&Reply::Nothing, &d).bytes, vec![0; 305]);
}

#[test]
fn decoded_errors_match_encode_error() {
    let b = buf(named("a"), &[1; 32]);
    let d = decoded(DmCmd::TableStatus, &b);
    let err = DmError::NoDevice("gone".into());
    assert_eq!(d.encode_error(&err), encode_error(DmCmd::TableStatus.request(), &b, &err));
    assert!(d.encode_error(&DmError::Access).bytes.is_empty());
}

// ---- header-only replies -------------------------------------------------------------------

#[test]
fn device_reply_status_fill() {
    let mut h = flagged(
        named("a"),
        DmFlags::SUSPEND
            | DmFlags::READONLY
            | DmFlags::ACTIVE_PRESENT
            | DmFlags::INTERNAL_SUSPEND
            | DmFlags::INACTIVE_PRESENT
            | DmFlags::DEFERRED_REMOVE
            | DmFlags::UEVENT_GENERATED
            | DmFlags::from_bits_retain(1 << 31),
    );
    h.data_start = 777;
    h.name[10] = b'z'; // junk after the NUL: strscpy leaves it
    let d = decoded(DmCmd::DevStatus, &buf(h, &[]));
    let mut i = info("dev", 0x123);
    i.uuid = uuid("U-1");
    i.open_count = 3;
    i.event_nr = 9;
    i.target_count = 2;
    i.active_present = true;
    let r = encode(&Reply::Device(i.clone()), &d);
    let b = ok(&r);
    assert_eq!(b.len(), 305);
    assert_eq!(&b[..12], &V);
    let o = reply_header(b);
    assert_eq!((o.data_size, o.data_start, o.target_count, o.open_count, o.event_nr), (305, 777, 2, 3, 9));
    assert_eq!(o.dev, DevNum::new(252, 0x123).huge_encode());
    assert_eq!(&o.name[..4], b"dev\0");
    assert_eq!(o.name[10], b'z');
    assert_eq!(&o.uuid[..4], b"U-1\0");
    // EXISTS and the unknown top bit echo, DEFERRED_REMOVE echoes (never cleared by the fill),
    // SUSPEND/READONLY/INTERNAL_SUSPEND cleared, INACTIVE_PRESENT follows the device,
    // UEVENT_GENERATED was cleared on input and is never set.
    assert_eq!(
        o.flags(),
        DmFlags::EXISTS | DmFlags::ACTIVE_PRESENT | DmFlags::DEFERRED_REMOVE | DmFlags::from_bits_retain(1 << 31)
    );
    // Everything from the fill set.
    i.suspended = true;
    i.read_only = true;
    i.inactive_present = true;
    i.deferred_remove = true;
    i.uuid = None;
    let o = reply_header(&encode(&Reply::Device(i), &decoded(DmCmd::DevStatus, &buf(named("a"), &[]))).bytes);
    assert_eq!(
        o.flags(),
        DmFlags::EXISTS
            | DmFlags::SUSPEND
            | DmFlags::READONLY
            | DmFlags::ACTIVE_PRESENT
            | DmFlags::INACTIVE_PRESENT
            | DmFlags::DEFERRED_REMOVE
    );
    assert_eq!(o.uuid[0], 0, "no uuid");
}

#[test]
fn device_reply_overwrites_the_lookup_key() {
    // Looked up by dev: name and uuid come back filled in.
    let mut h = header();
    h.dev = 0xfc01;
    let d = decoded(DmCmd::DevStatus, &buf(h, &[]));
    let mut i = info("found", 1);
    i.uuid = uuid("LVM-1");
    let o = reply_header(&encode(&Reply::Device(i), &d).bytes);
    assert_eq!(&o.name[..6], b"found\0");
    assert_eq!(&o.uuid[..6], b"LVM-1\0");
    // Looked up by uuid of a device without one... can't happen; by name of a device without one.
    let d = decoded(DmCmd::DevStatus, &buf(with_uuid(header(), "LVM-1"), &[]));
    let o = reply_header(&encode(&Reply::Device(info("x", 1)), &d).bytes);
    assert_eq!(&o.uuid[..6], b"\0VM-1\0");
}

#[test]
fn renamed_keeps_the_callers_name_and_inactive_bit() {
    let h = flagged(named("old"), DmFlags::INACTIVE_PRESENT);
    let d = decoded(DmCmd::DevRename, &buf(h, b"new\0\0\0\0\0"));
    let mut i = info("new", 4);
    i.event_nr = 1;
    let o = reply_header(ok(&encode(&Reply::Renamed(i), &d)));
    assert_eq!(&o.name[..4], b"old\0");
    assert_eq!(o.event_nr, 1);
    assert_eq!(o.dev, 0xfc04);
    assert_eq!(o.flags(), DmFlags::EXISTS | DmFlags::INACTIVE_PRESENT);
    assert_eq!(o.data_size, 305);
}

#[test]
fn removed_echoes_the_header_and_clears_deferred_unless_pending() {
    let mut h = flagged(with_uuid(header(), "U"), DmFlags::DEFERRED_REMOVE);
    h.event_nr = 0x40_0000; // udev cookie
    h.open_count = -5;
    h.target_count = 77;
    let d = decoded(DmCmd::DevRemove, &buf(h, &[]));
    let r = encode(&Reply::Removed { name: DmName::new("dev").unwrap(), uuid: uuid("U"), deferred: false }, &d);
    let o = reply_header(ok(&r));
    assert_eq!(r.bytes.len(), 305);
    assert_eq!((o.event_nr, o.open_count, o.target_count, o.dev), (0x40_0000, -5, 77, 0));
    assert_eq!(&o.name[..4], b"dev\0");
    assert_eq!(&o.uuid[..2], b"U\0");
    assert_eq!(o.flags(), DmFlags::EXISTS);
    let r = encode(&Reply::Removed { name: DmName::new("dev").unwrap(), uuid: None, deferred: true }, &d);
    assert_eq!(reply_header(&r.bytes).flags(), DmFlags::EXISTS | DmFlags::DEFERRED_REMOVE);
}

#[test]
fn nothing_copies_only_the_version() {
    let d = decoded(DmCmd::RemoveAll, &buf(header(), &[]));
    assert_eq!(encode(&Reply::Nothing, &d), Encoded { ret: 0, errno: 0, bytes: V.to_vec() });
    let d = decoded(DmCmd::DevSetGeometry, &buf(named("a"), b"1 1 1 0\0"));
    assert_eq!(encode(&Reply::Nothing, &d).bytes, V.to_vec());
}

#[test]
fn arm_poll_returns_the_header_with_input_bits_cleared() {
    let mut h = flagged(header(), DmFlags::BUFFER_FULL | DmFlags::DATA_OUT | DmFlags::SUSPEND);
    h.data_start = 305;
    h.event_nr = 12;
    let b = buf(h, &[]);
    let r = encode(&Reply::ArmPoll, &decoded(DmCmd::DevArmPoll, &b));
    let bytes = ok(&r);
    assert_eq!(bytes.len(), 305);
    let mut want = b[..305].to_vec();
    want[..12].copy_from_slice(&V);
    want[12..16].copy_from_slice(&305u32.to_ne_bytes());
    want[28..32].copy_from_slice(&(DmFlags::EXISTS | DmFlags::SUSPEND).bits().to_ne_bytes());
    assert_eq!(bytes, &want[..]);
}

#[test]
fn table_load_reply_is_header_only_with_data_start_echoed() {
    let mut h = named("a");
    h.target_count = 1;
    let mut p = vec![0u8; 48];
    p[8..16].copy_from_slice(&8u64.to_ne_bytes());
    p[24..28].copy_from_slice(b"zero");
    let d = decoded(DmCmd::TableLoad, &buf(h, &p));
    let mut i = info("a", 0);
    i.inactive_present = true;
    let r = encode(&Reply::Device(i), &d);
    let o = reply_header(ok(&r));
    assert_eq!(r.bytes.len(), 305);
    assert_eq!((o.data_size, o.data_start, o.target_count), (305, 312, 0));
    assert!(o.flags().contains(DmFlags::INACTIVE_PRESENT));
}

// ---- LIST_DEVICES --------------------------------------------------------------------------

#[test]
fn list_devices_records_without_uuids() {
    let d = decoded(DmCmd::ListDevices, &sized(header(), 1024, 0xaa));
    let r = encode(&Reply::DeviceList(vec![entry("a", 0, 5, Some("U-a")), entry("bcdefghijkl", 0x100, 6, None)]), &d);
    let b = ok(&r);
    // record 1: 12 + "a\0" → 14 → trailer at 16, ends at 24; record 2: 12 + 12 → 24, trailer at 24, ends at 32.
    assert_eq!(b.len(), P + 24 + 32);
    let o = reply_header(b);
    assert_eq!((o.data_size, o.data_start), (P as u32 + 56, P as u32));
    assert_eq!(u64_at(b, P), 0xfc00);
    assert_eq!(u32_at(b, P + 8), 24, "next is relative to the record");
    assert_eq!(&b[P + 12..P + 14], b"a\0");
    assert_eq!(&b[P + 14..P + 16], &[0xaa, 0xaa], "padding is not written");
    assert_eq!((u32_at(b, P + 16), u32_at(b, P + 20)), (5, 0), "no uuid flags without DM_UUID_FLAG");
    let r2 = P + 24;
    assert_eq!(u64_at(b, r2), DevNum::new(252, 0x100).huge_encode());
    assert_eq!(u64_at(b, r2), 0x10_0000 | 0xfc00);
    assert_eq!(u32_at(b, r2 + 8), 0, "last record");
    assert_eq!(&b[r2 + 12..r2 + 24], b"bcdefghijkl\0");
    assert_eq!((u32_at(b, r2 + 24), u32_at(b, r2 + 28)), (6, 0));
}

#[test]
fn list_devices_records_with_uuids() {
    let d = decoded(DmCmd::ListDevices, &sized(flagged(header(), DmFlags::UUID), 1024, 0xaa));
    let r = encode(&Reply::DeviceList(vec![entry("a", 0, 5, Some("U-1234567")), entry("b", 1, 6, None)]), &d);
    let b = ok(&r);
    // record 1: name → 16, trailer 16..24, uuid "U-1234567\0" 24..34 → 40; record 2: 16 + 8 = 24.
    assert_eq!(b.len(), P + 40 + 24);
    assert_eq!(u32_at(b, P + 8), 40);
    assert_eq!((u32_at(b, P + 16), u32_at(b, P + 20)), (5, DM_NAME_LIST_FLAG_HAS_UUID));
    assert_eq!(&b[P + 24..P + 34], b"U-1234567\0");
    assert_eq!(&b[P + 34..P + 40], &[0xaa; 6]);
    let r2 = P + 40;
    assert_eq!(u32_at(b, r2 + 8), 0);
    assert_eq!((u32_at(b, r2 + 16), u32_at(b, r2 + 20)), (6, DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID));
}

#[test]
fn list_devices_buffer_full_never_truncates() {
    let list = vec![entry("a", 0, 5, None), entry("b", 1, 6, None)];
    // Exactly the 48 bytes needed fit.
    let r = encode(&Reply::DeviceList(list.clone()), &decoded(DmCmd::ListDevices, &sized(header(), P + 48, 0)));
    assert_eq!(reply_header(&r.bytes).data_size, P as u32 + 48);
    assert!(!reply_header(&r.bytes).flags().contains(DmFlags::BUFFER_FULL));
    // One byte less: BUFFER_FULL, header only, data_start already 312.
    let r = encode(&Reply::DeviceList(list), &decoded(DmCmd::ListDevices, &sized(header(), P + 47, 0)));
    let o = reply_header(ok(&r));
    assert_eq!(r.bytes.len(), 305);
    assert_eq!((o.data_size, o.data_start), (305, 312));
    assert!(o.flags().contains(DmFlags::BUFFER_FULL));
}

#[test]
fn list_devices_empty() {
    let mut h = header();
    h.data = [0xbb; 7];
    let r = encode(&Reply::DeviceList(vec![]), &decoded(DmCmd::ListDevices, &sized(h, 2048, 0xaa)));
    let b = ok(&r);
    assert_eq!(b.len(), 312, "the zero dev at 312 is not copied");
    assert_eq!(reply_header(b).data_size, 312);
    assert_eq!(&b[305..312], &[0xbb; 7], "the header's data[7] echoes");
    // Fewer than 8 bytes of space is BUFFER_FULL even with nothing to list.
    for size in [305, 312, 319] {
        let r = encode(&Reply::DeviceList(vec![]), &decoded(DmCmd::ListDevices, &sized(header(), size, 0)));
        assert!(reply_header(&r.bytes).flags().contains(DmFlags::BUFFER_FULL), "{size}");
        assert_eq!(r.bytes.len(), 305);
    }
    let r = encode(&Reply::DeviceList(vec![]), &decoded(DmCmd::ListDevices, &sized(header(), 320, 0)));
    assert_eq!(r.bytes.len(), 312);
}

// ---- TABLE_DEPS ----------------------------------------------------------------------------

#[test]
fn deps_layout() {
    let d = decoded(DmCmd::TableDeps, &sized(named("a"), 1024, 0xaa));
    let devs = vec![DevNum::new(7, 0), DevNum::new(8, 0x1_0010)];
    let r = encode(&Reply::Deps(info("a", 0), Some(devs.clone())), &d);
    let b = ok(&r);
    assert_eq!(b.len(), P + 8 + 16);
    let o = reply_header(b);
    assert_eq!((o.data_size, o.data_start), (P as u32 + 24, 312));
    assert_eq!(u32_at(b, P), 2);
    assert_eq!(u32_at(b, P + 4), 0xaaaa_aaaa, "padding echoed");
    assert_eq!(u64_at(b, P + 8), 0x700);
    assert_eq!(u64_at(b, P + 16), devs[1].huge_encode());
    // Too small: BUFFER_FULL.
    let d = decoded(DmCmd::TableDeps, &sized(named("a"), P + 23, 0));
    let r = encode(&Reply::Deps(info("a", 0), Some(devs)), &d);
    assert_eq!(r.bytes.len(), 305);
    assert!(reply_header(&r.bytes).flags().contains(DmFlags::BUFFER_FULL));
    // Empty table: count 0.
    let d = decoded(DmCmd::TableDeps, &sized(named("a"), 1024, 0xaa));
    let r = encode(&Reply::Deps(info("a", 0), Some(vec![])), &d);
    assert_eq!(r.bytes.len(), P + 8);
    assert_eq!(u32_at(&r.bytes, P), 0);
}

#[test]
fn deps_without_a_table_is_header_only() {
    let mut h = named("a");
    h.data_start = 400;
    let d = decoded(DmCmd::TableDeps, &sized(h, 1024, 0));
    let r = encode(&Reply::Deps(info("a", 0), None), &d);
    let o = reply_header(ok(&r));
    assert_eq!(r.bytes.len(), 305);
    assert_eq!((o.data_size, o.data_start), (305, 400));
}

// ---- TABLE_STATUS / DEV_WAIT ---------------------------------------------------------------

#[test]
fn status_layout() {
    let d = decoded(DmCmd::TableStatus, &sized(named("a"), 4096, 0xaa));
    let targets =
        vec![ts(0, 100, "linear", "7:0 0"), ts(100, 8, "zero", ""), ts(108, 8, "a-very-long-target-name", "x")];
    let mut i = info("a", 0);
    i.target_count = 3;
    i.active_present = true;
    let r = encode(&Reply::Status(i, Some(targets)), &d);
    let b = ok(&r);
    // spec 1 at 0: 40 + "7:0 0\0" = 46 → next 48; spec 2 at 48: 40 + "\0" → 89 → next 96;
    // spec 3 at 96: 40 + "x\0" → 138 (data ends here) → next 144.
    assert_eq!(b.len(), P + 138);
    let o = reply_header(b);
    assert_eq!((o.data_size, o.data_start, o.target_count), (P as u32 + 138, 312, 3));
    assert!(o.flags().contains(DmFlags::ACTIVE_PRESENT));
    assert_eq!(u64_at(b, P), 0);
    assert_eq!(u64_at(b, P + 8), 100);
    assert_eq!(u32_at(b, P + 16), 0, "status is 0");
    assert_eq!(u32_at(b, P + 20), 48);
    assert_eq!(&b[P + 24..P + 40], b"linear\0\0\0\0\0\0\0\0\0\0");
    assert_eq!(&b[P + 40..P + 46], b"7:0 0\0");
    assert_eq!(&b[P + 46..P + 48], &[0xaa, 0xaa]);
    assert_eq!(u32_at(b, P + 48 + 20), 96, "next is measured from the first spec");
    assert_eq!(b[P + 48 + 40], 0);
    assert_eq!(u32_at(b, P + 96 + 20), 144, "the last next points past its padded end");
    assert_eq!(&b[P + 96 + 24..P + 96 + 40], b"a-very-long-tar\0", "strscpy_pad to 16");
    assert_eq!(&b[P + 136..P + 138], b"x\0");
}

#[test]
fn status_buffer_full() {
    let targets = vec![ts(0, 8, "linear", "7:0 0"), ts(8, 8, "linear", "7:0 8")];
    let run = |size: usize| {
        let d = decoded(DmCmd::TableStatus, &sized(named("a"), size, 0));
        encode(&Reply::Status(info("a", 0), Some(targets.clone())), &d)
    };
    // All fits: 48 + 46 = 94 bytes; the second text needs remaining - 40 > 6, i.e. ≥ 95 bytes.
    let r = run(P + 95);
    let o = reply_header(&r.bytes);
    assert!(!o.flags().contains(DmFlags::BUFFER_FULL));
    assert_eq!(o.data_size, P as u32 + 94);
    // 94: the second text plus NUL exactly fills the space → BUFFER_FULL, first target kept.
    let r = run(P + 94);
    let o = reply_header(&r.bytes);
    assert!(o.flags().contains(DmFlags::BUFFER_FULL));
    assert_eq!((o.data_size, o.target_count), (P as u32 + 46, 2));
    assert_eq!(r.bytes.len(), P + 46);
    // 88 = 48 + 40: no room for a second spec (remaining ≤ 40).
    let o = reply_header(&run(P + 88).bytes);
    assert!(o.flags().contains(DmFlags::BUFFER_FULL));
    assert_eq!(o.data_size, P as u32 + 46);
    // The first target does not fit: header only, but data_start and target_count are set.
    let r = run(P + 46);
    let o = reply_header(&r.bytes);
    assert!(o.flags().contains(DmFlags::BUFFER_FULL));
    assert_eq!((o.data_size, o.data_start, o.target_count), (305, 312, 2));
    assert_eq!(r.bytes.len(), 305);
    let o = reply_header(&run(305).bytes);
    assert!(o.flags().contains(DmFlags::BUFFER_FULL));
    // Odd sizes where the aligned position passes the end report full rather than wrap.
    let d = decoded(DmCmd::TableStatus, &sized(named("a"), P + 50, 0));
    let r = encode(&Reply::Status(info("a", 0), Some(vec![ts(0, 8, "t", "abcdefgh"), ts(8, 8, "t", "")])), &d);
    let o = reply_header(&r.bytes);
    assert!(o.flags().contains(DmFlags::BUFFER_FULL));
    assert_eq!(o.data_size, P as u32 + 49);
}

#[test]
fn status_without_a_table_is_header_only() {
    let mut h = named("a");
    h.data_start = 999;
    let d = decoded(DmCmd::DevWait, &sized(h, 4096, 0));
    let mut i = info("a", 0);
    i.target_count = 0;
    i.event_nr = 3;
    let r = encode(&Reply::Status(i, None), &d);
    let o = reply_header(ok(&r));
    assert_eq!(r.bytes.len(), 305);
    assert_eq!((o.data_size, o.data_start, o.event_nr), (305, 999, 3));
    // An empty table still moves data_start.
    let r = encode(&Reply::Status(info("a", 0), Some(vec![])), &d);
    assert_eq!(reply_header(&r.bytes).data_start, 312);
    assert_eq!(r.bytes.len(), 305);
}

// ---- LIST_VERSIONS / GET_TARGET_VERSION ----------------------------------------------------

#[test]
fn versions_layout() {
    let d = decoded(DmCmd::ListVersions, &sized(header(), 1024, 0xaa));
    let list = vec![
        TargetVersion { name: "striped".into(), version: [1, 7, 0] },
        TargetVersion { name: "linear".into(), version: [1, 5, 0] },
        TargetVersion { name: "error".into(), version: [1, 7, 0] },
    ];
    let r = encode(&Reply::Versions(list), &d);
    let b = ok(&r);
    // Estimate: (16+8+7) + (16+7+7) + (16+6+7) = 31 + 30 + 29 = 90.
    assert_eq!(b.len(), P + 90);
    assert_eq!(reply_header(b).data_size, P as u32 + 90);
    assert_eq!(reply_header(b).data_start, 312);
    assert_eq!(u32_at(b, P), 24, "16 + 8 → 24");
    assert_eq!((u32_at(b, P + 4), u32_at(b, P + 8), u32_at(b, P + 12)), (1, 7, 0));
    assert_eq!(&b[P + 16..P + 24], b"striped\0");
    assert_eq!(u32_at(b, P + 24), 24, "16 + 7 → 23 → 24");
    assert_eq!(&b[P + 40..P + 47], b"linear\0");
    assert_eq!(b[P + 47], 0xaa);
    assert_eq!(u32_at(b, P + 48), 0, "last");
    assert_eq!(&b[P + 64..P + 70], b"error\0");
    assert_eq!(&b[P + 70..P + 90], &[0xaa; 20], "the over-estimate shows the caller's bytes");
}

#[test]
fn versions_buffer_full() {
    let list = vec![TargetVersion { name: "linear".into(), version: [1, 5, 0] }];
    let r = encode(&Reply::Versions(list.clone()), &decoded(DmCmd::ListVersions, &sized(header(), P + 30, 0)));
    assert_eq!(r.bytes.len(), P + 30);
    let r = encode(&Reply::Versions(list), &decoded(DmCmd::ListVersions, &sized(header(), P + 29, 0)));
    assert_eq!(r.bytes.len(), 305);
    assert!(reply_header(&r.bytes).flags().contains(DmFlags::BUFFER_FULL));
}

#[test]
fn target_version_is_one_record() {
    let d = decoded(DmCmd::GetTargetVersion, &sized(named("zero"), 2048, 0));
    let r = encode(&Reply::TargetVersion(TargetVersion { name: "zero".into(), version: [1, 2, 0] }), &d);
    let b = ok(&r);
    assert_eq!(b.len(), P + 16 + 5 + 7);
    assert_eq!(u32_at(b, P), 0);
    assert_eq!((u32_at(b, P + 4), u32_at(b, P + 8)), (1, 2));
    assert_eq!(&b[P + 16..P + 21], b"zero\0");
    assert_eq!(&reply_header(b).name[..5], b"zero\0", "the name field is left alone");
}

// ---- TARGET_MSG ----------------------------------------------------------------------------

fn msg(size: usize) -> DecodedIoctl {
    let mut v = vec![0u8; size - P];
    v[8..13].copy_from_slice(b"@stat");
    let b = buf(named("a"), &v);
    decoded(DmCmd::TargetMsg, &b)
}

#[test]
fn message_with_output() {
    let d = msg(1024);
    let mut i = info("a", 2);
    i.active_present = true;
    let r = encode(&Reply::Message(i, Some("0: 0+8 8 - -\n".into())), &d);
    let b = ok(&r);
    assert_eq!(b.len(), P + 14);
    let o = reply_header(b);
    assert_eq!((o.data_size, o.data_start), (P as u32 + 14, 312));
    assert_eq!(o.flags(), DmFlags::EXISTS | DmFlags::ACTIVE_PRESENT | DmFlags::DATA_OUT);
    assert_eq!(&b[P..], b"0: 0+8 8 - -\n\0");
}

#[test]
fn message_without_output() {
    let r = encode(&Reply::Message(info("a", 2), None), &msg(1024));
    let o = reply_header(ok(&r));
    assert_eq!(r.bytes.len(), 305);
    assert_eq!((o.data_size, o.data_start), (305, 312));
    assert!(!o.flags().contains(DmFlags::DATA_OUT));
}

#[test]
fn message_buffer_full_when_text_fills_the_space() {
    // Capacity 16: 14 chars + NUL = 15 < 16 fits; 15 + NUL = 16 does not.
    let r = encode(&Reply::Message(info("a", 2), Some("x".repeat(14))), &msg(P + 16));
    assert_eq!(r.bytes.len(), P + 15);
    let r = encode(&Reply::Message(info("a", 2), Some("x".repeat(15))), &msg(P + 16));
    let o = reply_header(&r.bytes);
    assert_eq!(r.bytes.len(), 305);
    assert_eq!(o.flags() & (DmFlags::DATA_OUT | DmFlags::BUFFER_FULL), DmFlags::DATA_OUT | DmFlags::BUFFER_FULL);
    // The smallest valid message buffer: data_start 305, sector, "" → 314 bytes, capacity 2.
    let mut h = named("a");
    h.data_start = 305;
    let mut b = buf(h, &[0; 2]);
    b[305..314].fill(0);
    let d = decoded(DmCmd::TargetMsg, &b);
    let r = encode(&Reply::Message(info("a", 2), Some("x".into())), &d);
    assert!(reply_header(&r.bytes).flags().contains(DmFlags::BUFFER_FULL));
    let r = encode(&Reply::Message(info("a", 2), Some(String::new())), &d);
    assert_eq!(r.bytes.len(), P + 1);
    assert_eq!(r.bytes[P], 0);
}

#[test]
fn message_no_table_returns_two() {
    let r = encode(&Reply::MessageNoTable, &msg(1024));
    assert_eq!(r, Encoded { ret: 2, errno: 0, bytes: V.to_vec() });
}

// ---- guards ----------------------------------------------------------------------------------

#[test]
fn replies_never_exceed_the_input() {
    let many: Vec<_> = (0..100).map(|i| entry(&format!("dev{i}"), i, i, Some("U"))).collect();
    for size in [305, 311, 312, 320, 400, 4096] {
        let h = flagged(named("a"), DmFlags::UUID);
        for cmd in [DmCmd::ListDevices, DmCmd::TableStatus, DmCmd::ListVersions] {
            let d = decoded(cmd, &sized(h, size, 0));
            let reply = match cmd {
                DmCmd::ListDevices => Reply::DeviceList(many.clone()),
                DmCmd::TableStatus => Reply::Status(info("a", 0), Some(vec![ts(0, 1, "t", "status"); 50])),
                _ => Reply::Versions(vec![TargetVersion { name: "n".into(), version: [1, 0, 0] }; 40]),
            };
            let r = encode(&reply, &d);
            assert!(r.bytes.len() <= size.max(305), "{cmd} {size}");
        }
    }
}
