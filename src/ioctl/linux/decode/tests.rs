use super::super::fixtures::{buf, decoded, header, sized, spec, table, with_name, with_uuid};
use super::*;
use crate::ioctl::layout::{dm_ioctl_request, DM_MPATH_PROBE_PATHS};

fn errno(request: u64, b: &[u8]) -> i32 {
    decode(request, b).expect_err("should fail").errno()
}

fn err(cmd: DmCmd, b: &[u8]) -> DecodeError {
    decode(cmd.request(), b).expect_err("should fail")
}

fn cmd_of(cmd: DmCmd, b: &[u8]) -> Command {
    decoded(cmd, b).request.command
}

fn named(name: &str) -> DmIoctl {
    with_name(header(), name)
}

fn flagged(mut h: DmIoctl, f: DmFlags) -> DmIoctl {
    h.set_flags(h.flags() | f);
    h
}

/// A string payload at 312 (RENAME, SET_GEOMETRY).
fn string_payload(s: &[u8]) -> Vec<u8> {
    let mut v = s.to_vec();
    v.push(0);
    v.resize(align8(v.len()), 0);
    v
}

use crate::ioctl::layout::align8;

// ---- §2.1 dispatch -------------------------------------------------------------------------

#[test]
fn version_command_needs_only_the_version() {
    let b = buf(header(), &[]);
    assert_eq!(decode(DmCmd::Version.request(), &b), Ok(Decoded::Version));
    // 12 bytes are enough: the kernel stops after check_version.
    assert_eq!(decode(DmCmd::Version.request(), &b[..12]), Ok(Decoded::Version));
    // The patchlevel is ignored, minor 48 is the newest accepted.
    let mut h = header();
    h.version = [4, 48, 99];
    assert_eq!(decode(DmCmd::Version.request(), &buf(h, &[])), Ok(Decoded::Version));
}

#[test]
fn only_type_and_nr_of_the_request_matter() {
    let b = buf(named("a"), &[]);
    // _IO(0xfd, 7) without direction or size bits still is DM_DEV_STATUS (§1.4).
    let d = decode(0xfd07, &b).unwrap();
    assert!(matches!(d, Decoded::Command(DecodedIoctl { cmd: DmCmd::DevStatus, nr: 7, .. })));
}

#[test]
fn wrong_type_is_enotty() {
    assert_eq!(errno(0xc138_fe07, &buf(named("a"), &[])), libc::ENOTTY);
    assert_eq!(errno(0x5401, &[]), libc::ENOTTY);
}

#[test]
fn short_buffers_fault() {
    let b = buf(named("a"), &[]);
    assert_eq!(errno(DmCmd::Version.request(), &b[..11]), libc::EFAULT);
    assert_eq!(errno(DmCmd::DevStatus.request(), &b[..15]), libc::EFAULT);
    assert_eq!(errno(DmCmd::DevStatus.request(), &[]), libc::EFAULT);
}

#[test]
fn version_mismatch_is_einval() {
    for v in [[5, 0, 0], [3, 0, 0], [4, 49, 0], [0, 0, 0]] {
        let mut h = named("a");
        h.version = v;
        assert_eq!(errno(DmCmd::DevStatus.request(), &buf(h, &[])), libc::EINVAL, "{v:?}");
        assert_eq!(errno(DmCmd::Version.request(), &buf(h, &[])), libc::EINVAL, "{v:?}");
    }
}

#[test]
fn unknown_command_numbers_are_enotty() {
    let b = buf(named("a"), &[]);
    assert_eq!(errno(dm_ioctl_request(18), &b), libc::ENOTTY);
    assert_eq!(errno(DM_MPATH_PROBE_PATHS, &b), libc::ENOTTY);
    assert_eq!(errno(dm_ioctl_request(255), &b), libc::ENOTTY);
    // The version check comes first.
    let mut h = named("a");
    h.version = [5, 0, 0];
    assert_eq!(errno(dm_ioctl_request(18), &buf(h, &[])), libc::EINVAL);
}

#[test]
fn data_size_out_of_range_is_einval() {
    let mut b = buf(named("a"), &[]);
    b[12..16].copy_from_slice(&304u32.to_ne_bytes());
    assert_eq!(errno(DmCmd::DevStatus.request(), &b), libc::EINVAL);
    // The shim sends a short buffer when data_size < 305: still EINVAL, not EFAULT.
    assert_eq!(errno(DmCmd::DevStatus.request(), &b[..200]), libc::EINVAL);
    // Over 1 GiB, the shim sends only the header.
    b[12..16].copy_from_slice(&(DM_MAX_DATA_SIZE + 1).to_ne_bytes());
    assert_eq!(errno(DmCmd::TableStatus.request(), &b), libc::EINVAL);
    b[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
    assert_eq!(errno(DmCmd::TableStatus.request(), &b), libc::EINVAL);
}

#[test]
fn data_size_beyond_the_buffer_faults_unless_the_command_takes_no_params() {
    let mut b = buf(named("a"), &[0; 8]);
    b[12..16].copy_from_slice(&16384u32.to_ne_bytes());
    assert_eq!(errno(DmCmd::TableStatus.request(), &b), libc::EFAULT);
    assert_eq!(errno(DmCmd::TableLoad.request(), &b), libc::EFAULT);
    // DEV_STATUS reads only the 305-byte header.
    let d = decoded(DmCmd::DevStatus, &b[..305]);
    assert_eq!(d.param_size, 305);
    assert_eq!(d.input.len(), 305);
    assert_eq!(d.header.data_size, 305);
    // Exactly data_size bytes are fine; a larger buffer is fine too.
    let mut b = buf(named("a"), &[0; 8]);
    b.extend_from_slice(&[1; 8]);
    let d = decoded(DmCmd::TableStatus, &b);
    assert_eq!(d.param_size, 320);
    assert_eq!(d.input.len(), 320);
}

#[test]
fn a_305_byte_request_decodes() {
    let b = buf(named("a"), &[]);
    assert_eq!(cmd_of(DmCmd::DevStatus, &b[..305]), Command::DevStatus { key: DevKey::Name("a".into()) });
    let mut short = b[..305].to_vec();
    short[12..16].copy_from_slice(&305u32.to_ne_bytes());
    let d = decoded(DmCmd::TableStatus, &short);
    assert_eq!(d.param_size, 305);
    assert_eq!(d.header.data, [0; 7]);
}

// ---- §2.1 step 6: validate_params ----------------------------------------------------------

#[test]
fn output_only_flags_are_cleared_and_unknown_bits_kept() {
    let all = DmFlags::from_bits_retain(0xffff_ffff) - DmFlags::SECURE_DATA;
    let mut h = named("a");
    h.flags = all.bits();
    let d = decoded(DmCmd::DevStatus, &buf(h, &[]));
    assert_eq!(d.header.flags, !0x1_a100);
    assert!(d.header.flags().contains(DmFlags::EXISTS));
    assert!(!d.secure_data);
    let d = decoded(DmCmd::DevStatus, &buf(flagged(named("a"), DmFlags::SECURE_DATA), &[]));
    assert!(d.secure_data);
    assert!(!d.header.flags().contains(DmFlags::SECURE_DATA));
}

#[test]
fn create_needs_a_name() {
    let e = err(DmCmd::DevCreate, &buf(with_uuid(header(), "u"), &[]));
    assert_eq!(e.errno(), libc::EINVAL);
    assert_eq!(e.cmd, Some(DmCmd::DevCreate));
    assert!(e.to_string().starts_with("DM_DEV_CREATE: "), "{e}");
}

#[test]
fn name_and_uuid_together_are_einval_except_for_create_and_lists() {
    let both = buf(with_uuid(named("a"), "u"), &[]);
    for cmd in [DmCmd::DevRemove, DmCmd::DevStatus, DmCmd::TableStatus, DmCmd::DevArmPoll, DmCmd::GetTargetVersion] {
        assert_eq!(err(cmd, &both).errno(), libc::EINVAL, "{cmd}");
    }
    assert!(matches!(cmd_of(DmCmd::DevCreate, &both), Command::DevCreate { .. }));
    assert_eq!(
        cmd_of(DmCmd::ListDevices, &both),
        Command::ListDevices { name_prefix: "a".into(), uuid_prefix: "u".into(), with_uuid: false }
    );
    assert_eq!(cmd_of(DmCmd::ListVersions, &both), Command::ListVersions);
    assert_eq!(cmd_of(DmCmd::RemoveAll, &both), Command::RemoveAll { deferred: false });
}

#[test]
fn strings_are_force_terminated_except_for_lists() {
    let mut h = header();
    h.name = [b'n'; 128];
    h.uuid = [b'u'; 129];
    let d = decoded(DmCmd::DevCreate, &buf(h, &[]));
    assert_eq!(d.header.name[127], 0);
    assert_eq!(d.header.uuid[128], 0);
    // Over-long names are truncated on create, not rejected (§2.4).
    let Command::DevCreate { name, uuid, .. } = d.request.command else { panic!() };
    assert_eq!(name.as_bytes(), "n".repeat(127).as_bytes());
    assert_eq!(uuid.unwrap().as_bytes(), "u".repeat(128).as_bytes());
    // LIST_DEVICES keeps them as sent: a 128-byte prefix no name can match.
    let d = decoded(DmCmd::ListDevices, &buf(h, &[]));
    assert_eq!(d.header.name, [b'n'; 128]);
    let Command::ListDevices { name_prefix, uuid_prefix, .. } = d.request.command else { panic!() };
    assert_eq!(name_prefix.len(), 128);
    assert_eq!(uuid_prefix.len(), 129);
}

// ---- §2.2 lookup keys ----------------------------------------------------------------------

#[test]
fn lookup_prefers_uuid_then_name_then_dev() {
    let by_uuid = buf(with_uuid(header(), "LVM-x"), &[]);
    assert_eq!(cmd_of(DmCmd::DevStatus, &by_uuid), Command::DevStatus { key: DevKey::Uuid("LVM-x".into()) });
    let by_name = buf(named("vg-lv"), &[]);
    assert_eq!(cmd_of(DmCmd::DevStatus, &by_name), Command::DevStatus { key: DevKey::Name("vg-lv".into()) });
    let mut h = header();
    h.dev = 0xfc00; // 252:0 as libdm sends it for `ls --tree`
    assert_eq!(cmd_of(DmCmd::TableDeps, &buf(h, &[])), Command::TableDeps { key: DevKey::Dev(DevNum::new(252, 0)) });
    h.dev = DevNum::new(252, 0x12345).huge_encode();
    assert_eq!(
        cmd_of(DmCmd::DevStatus, &buf(h, &[])),
        Command::DevStatus { key: DevKey::Dev(DevNum::new(252, 0x12345)) }
    );
}

#[test]
fn forbidden_key_mixes_and_no_key_are_enxio() {
    let mut h = with_uuid(header(), "u");
    h.dev = 0xfc00;
    assert_eq!(err(DmCmd::DevStatus, &buf(h, &[])).errno(), libc::ENXIO);
    let mut h = named("a");
    h.dev = 0xfc00;
    assert_eq!(err(DmCmd::DevStatus, &buf(h, &[])).errno(), libc::ENXIO);
    assert_eq!(err(DmCmd::DevRemove, &buf(header(), &[])).errno(), libc::ENXIO);
    assert_eq!(err(DmCmd::TableStatus, &buf(header(), &[])).errno(), libc::ENXIO);
    // Names and uuids are keys as raw bytes, UTF-8 or not.
    let mut h = header();
    h.name[..2].copy_from_slice(&[0xff, 0xfe]);
    assert_eq!(cmd_of(DmCmd::DevStatus, &buf(h, &[])), Command::DevStatus { key: DevKey::Name(vec![0xff, 0xfe]) });
    let mut h = header();
    h.uuid[..2].copy_from_slice(&[0x01, 0x80]);
    assert_eq!(cmd_of(DmCmd::DevStatus, &buf(h, &[])), Command::DevStatus { key: DevKey::Uuid(vec![0x01, 0x80]) });
}

#[test]
fn query_inactive_is_carried_on_the_request() {
    let d = decoded(DmCmd::TableStatus, &buf(flagged(named("a"), DmFlags::QUERY_INACTIVE_TABLE), &[]));
    assert!(d.request.query_inactive);
    assert!(!decoded(DmCmd::TableStatus, &buf(named("a"), &[])).request.query_inactive);
}

// ---- per command -----------------------------------------------------------------------------

#[test]
fn create() {
    let b = buf(with_uuid(named("vg-lv"), "LVM-abc"), &[]);
    assert_eq!(
        cmd_of(DmCmd::DevCreate, &b),
        Command::DevCreate {
            name: DmName::new("vg-lv").unwrap(),
            uuid: Some(DmUuid::new("LVM-abc").unwrap()),
            minor: None
        }
    );
    let mut h = flagged(named("p"), DmFlags::PERSISTENT_DEV);
    h.dev = DevNum::new(7, 0x1_2345).huge_encode(); // major bits ignored
    let Command::DevCreate { minor, uuid, .. } = cmd_of(DmCmd::DevCreate, &buf(h, &[])) else { panic!() };
    assert_eq!((minor, uuid), (Some(0x1_2345), None));
    // dev without PERSISTENT_DEV is ignored.
    let mut h = named("p");
    h.dev = 0xfc05;
    assert!(matches!(cmd_of(DmCmd::DevCreate, &buf(h, &[])), Command::DevCreate { minor: None, .. }));
}

#[test]
fn create_applies_check_name() {
    for bad in ["control", ".", "..", "a/b", "/"] {
        assert_eq!(err(DmCmd::DevCreate, &buf(named(bad), &[])).errno(), libc::EINVAL, "{bad}");
    }
    let mut h = header();
    h.name[..4].copy_from_slice(b"\xff/\xfe\xfd");
    assert_eq!(err(DmCmd::DevCreate, &buf(h, &[])).errno(), libc::EINVAL);
    // Any other byte is fine in a name; a uuid takes any byte (check_name is for names only).
    let mut h = header();
    h.name[..3].copy_from_slice(b"a\xffb");
    h.uuid[..3].copy_from_slice(b"\x80/.");
    let Command::DevCreate { name, uuid, .. } = cmd_of(DmCmd::DevCreate, &buf(h, &[])) else { panic!() };
    assert_eq!((name.as_bytes(), uuid.unwrap().as_bytes()), (&b"a\xffb"[..], &b"\x80/."[..]));
}

#[test]
fn remove_and_remove_all() {
    let b = buf(flagged(named("a"), DmFlags::DEFERRED_REMOVE), &[]);
    assert_eq!(cmd_of(DmCmd::DevRemove, &b), Command::DevRemove { key: DevKey::Name("a".into()), deferred: true });
    assert_eq!(cmd_of(DmCmd::RemoveAll, &b), Command::RemoveAll { deferred: true });
    assert_eq!(
        cmd_of(DmCmd::DevRemove, &buf(named("a"), &[])),
        Command::DevRemove { key: DevKey::Name("a".into()), deferred: false }
    );
    // REMOVE_ALL ignores name/uuid/dev entirely.
    assert_eq!(cmd_of(DmCmd::RemoveAll, &buf(header(), &[])), Command::RemoveAll { deferred: false });
}

#[test]
fn rename_to_a_name() {
    let b = buf(named("old"), &string_payload(b"new"));
    assert_eq!(
        cmd_of(DmCmd::DevRename, &b),
        Command::DevRename { name: "old".into(), to: RenameTo::Name(DmName::new("new").unwrap()) }
    );
    // The string may start anywhere from 305 on.
    let mut h = named("old");
    h.data_start = 305;
    let mut b = buf(h, &[0; 8]);
    b[305..309].copy_from_slice(b"new\0");
    assert!(matches!(cmd_of(DmCmd::DevRename, &b), Command::DevRename { .. }));
    // Old and new names are bytes.
    let mut h = header();
    h.name[..4].copy_from_slice(b"caf\xe9");
    assert_eq!(
        cmd_of(DmCmd::DevRename, &buf(h, &string_payload(b"\xff\xfe"))),
        Command::DevRename { name: b"caf\xe9".to_vec(), to: RenameTo::Name(DmName::new(b"\xff\xfe").unwrap()) }
    );
}

#[test]
fn rename_sets_a_uuid_and_finds_the_device_by_name_only() {
    let b = buf(flagged(named("old"), DmFlags::UUID), &string_payload("u".repeat(128).as_bytes()));
    assert_eq!(
        cmd_of(DmCmd::DevRename, &b),
        Command::DevRename { name: "old".into(), to: RenameTo::Uuid(DmUuid::new("u".repeat(128)).unwrap()) }
    );
    // Identified by uuid: the name is empty, which the engine reports as ENXIO.
    let b = buf(with_uuid(header(), "x"), &string_payload(b"new"));
    assert!(matches!(cmd_of(DmCmd::DevRename, &b), Command::DevRename { name, .. } if name.is_empty()));
}

#[test]
fn rename_string_errors_are_einval() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", buf(named("old"), &string_payload(b""))),
        ("128-char name", buf(named("old"), &string_payload("n".repeat(128).as_bytes()))),
        ("129-char uuid", buf(flagged(named("old"), DmFlags::UUID), &string_payload("u".repeat(129).as_bytes()))),
        ("check_name", buf(named("old"), &string_payload(b"control"))),
        ("slash", buf(named("old"), &string_payload(b"a/b"))),
        ("slash among other bytes", buf(named("old"), &string_payload(b"\xc3/\xa9"))),
        ("unterminated", buf(named("old"), b"newnewne")),
        ("no payload", buf(named("old"), &[])),
    ];
    for (what, b) in cases {
        assert_eq!(err(DmCmd::DevRename, &b).errno(), libc::EINVAL, "{what}");
    }
    for start in [0, 304, 320, 1 << 20, u32::MAX] {
        let mut h = named("old");
        h.data_start = start;
        assert_eq!(err(DmCmd::DevRename, &buf(h, &string_payload(b"new"))).errno(), libc::EINVAL, "{start}");
    }
    // String checks precede the lookup: a bad string for a bad key is still EINVAL.
    let mut h = header();
    h.name[0] = 0xff;
    assert_eq!(err(DmCmd::DevRename, &buf(h, &string_payload(b""))).errno(), libc::EINVAL);
    assert!(matches!(cmd_of(DmCmd::DevRename, &buf(h, &string_payload(b"new"))),
        Command::DevRename { name, .. } if name == [0xff]));
}

#[test]
fn suspend_and_resume() {
    let b = buf(flagged(named("a"), DmFlags::SUSPEND | DmFlags::NOFLUSH), &[]);
    assert_eq!(
        cmd_of(DmCmd::DevSuspend, &b),
        Command::DevSuspend { key: DevKey::Name("a".into()), opts: SuspendOpts { noflush: true, skip_lockfs: false } }
    );
    let b = buf(flagged(named("a"), DmFlags::SKIP_LOCKFS), &[]);
    assert_eq!(
        cmd_of(DmCmd::DevSuspend, &b),
        Command::DevResume { key: DevKey::Name("a".into()), opts: SuspendOpts { noflush: false, skip_lockfs: true } }
    );
}

#[test]
fn status_and_wait() {
    let key = || DevKey::Name("a".into());
    let b = buf(named("a"), &[]);
    assert_eq!(
        cmd_of(DmCmd::TableStatus, &b),
        Command::TableStatus { key: key(), status: StatusType::Info, noflush: false }
    );
    let b = buf(flagged(named("a"), DmFlags::STATUS_TABLE | DmFlags::IMA_MEASUREMENT), &[]);
    assert_eq!(
        cmd_of(DmCmd::TableStatus, &b),
        Command::TableStatus { key: key(), status: StatusType::Table, noflush: false }
    );
    let b = buf(flagged(named("a"), DmFlags::IMA_MEASUREMENT | DmFlags::NOFLUSH), &[]);
    assert_eq!(
        cmd_of(DmCmd::TableStatus, &b),
        Command::TableStatus { key: key(), status: StatusType::Ima, noflush: true }
    );
    let mut h = flagged(named("a"), DmFlags::STATUS_TABLE);
    h.event_nr = 41;
    assert_eq!(
        cmd_of(DmCmd::DevWait, &buf(h, &[])),
        Command::DevWait { key: key(), event_nr: 41, status: StatusType::Table, noflush: false }
    );
    assert_eq!(cmd_of(DmCmd::DevStatus, &buf(named("a"), &[])), Command::DevStatus { key: key() });
    assert_eq!(cmd_of(DmCmd::TableClear, &buf(named("a"), &[])), Command::TableClear { key: key() });
    assert_eq!(cmd_of(DmCmd::TableDeps, &buf(named("a"), &[])), Command::TableDeps { key: key() });
}

#[test]
fn versions_arm_poll_and_target_version() {
    assert_eq!(cmd_of(DmCmd::ListVersions, &buf(header(), &[])), Command::ListVersions);
    assert_eq!(cmd_of(DmCmd::DevArmPoll, &buf(header(), &[])), Command::ArmPoll);
    assert_eq!(
        cmd_of(DmCmd::GetTargetVersion, &buf(named("linear"), &[])),
        Command::GetTargetVersion { name: "linear".into() }
    );
    let mut h = header();
    h.name[0] = 0xc0;
    assert_eq!(err(DmCmd::GetTargetVersion, &buf(h, &[])).errno(), libc::EINVAL);
}

#[test]
fn list_devices_filters() {
    let b = buf(flagged(with_uuid(named("vg-"), "LVM-"), DmFlags::UUID), &[]);
    assert_eq!(
        cmd_of(DmCmd::ListDevices, &b),
        Command::ListDevices { name_prefix: "vg-".into(), uuid_prefix: "LVM-".into(), with_uuid: true }
    );
    let mut h = header();
    h.name[0] = 0xff;
    let Command::ListDevices { name_prefix, uuid_prefix, .. } = cmd_of(DmCmd::ListDevices, &buf(h, &[])) else {
        panic!()
    };
    assert_eq!((name_prefix, uuid_prefix), (vec![0xff], vec![]));
    // An unterminated field is a prefix longer than any name: it matches nothing.
    let mut h = header();
    h.name.fill(b'n');
    let Command::ListDevices { name_prefix, .. } = cmd_of(DmCmd::ListDevices, &buf(h, &[])) else { panic!() };
    assert!(name_prefix.len() > crate::dm::DM_NAME_MAX);
}

// ---- §2.5 table load -----------------------------------------------------------------------

fn load(count: u32, payload: &[u8]) -> Vec<u8> {
    let mut h = named("a");
    h.target_count = count;
    buf(h, payload)
}

fn load_err(count: u32, payload: &[u8]) -> DecodeError {
    err(DmCmd::TableLoad, &load(count, payload))
}

#[test]
fn table_load_as_libdm_sends_it() {
    let t = table(&[(0, 100, "linear", "7:0 0"), (100, 50, "zero", ""), (150, 8, "error", "a\\\\b")]);
    let d = decoded(DmCmd::TableLoad, &load(3, &t));
    assert_eq!(d.input.len(), 305, "a load's reply is header-only");
    let Command::TableLoad { key, targets, read_only } = d.request.command else { panic!() };
    assert_eq!(key, DevKey::Name("a".into()));
    assert!(!read_only);
    let ts = |s, l, t: &str, p: &str| TargetSpec {
        start: Sectors(s),
        length: Sectors(l),
        target_type: t.into(),
        params: p.into(),
    };
    assert_eq!(targets, vec![ts(0, 100, "linear", "7:0 0"), ts(100, 50, "zero", ""), ts(150, 8, "error", "a\\\\b")]);
    let b = buf(
        {
            let mut h = flagged(named("a"), DmFlags::READONLY);
            h.target_count = 1;
            h
        },
        &table(&[(0, 8, "zero", "")]),
    );
    assert!(matches!(cmd_of(DmCmd::TableLoad, &b), Command::TableLoad { read_only: true, .. }));
}

#[test]
fn table_load_reads_only_target_count_specs() {
    let t = table(&[(0, 100, "linear", "7:0 0"), (100, 50, "zero", "")]);
    let Command::TableLoad { targets, .. } = cmd_of(DmCmd::TableLoad, &load(1, &t)) else { panic!() };
    assert_eq!(targets.len(), 1);
}

#[test]
fn table_load_target_count_limits() {
    let t = table(&[(0, 8, "zero", "")]);
    assert_eq!(load_err(0, &t).errno(), libc::EINVAL);
    let e = load_err(DM_MAX_TARGETS + 1, &t);
    assert_eq!(e.errno(), libc::EOVERFLOW);
    assert_eq!(e.lookup_first, Some(DevKey::Name("a".into())));
    assert_eq!(load_err(u32::MAX, &[]).errno(), libc::EOVERFLOW);
    // A huge (legal) count over a tiny buffer fails at the second spec, without reserving for it.
    let e = load_err(DM_MAX_TARGETS, &t);
    assert_eq!(e.errno(), libc::EINVAL);
}

#[test]
fn table_load_errors_come_after_the_lookup() {
    let e = load_err(0, &[]);
    assert_eq!(e.lookup_first, Some(DevKey::Name("a".into())));
    assert_eq!(e.cmd, Some(DmCmd::TableLoad));
    // ... but a bad key itself is ENXIO straight away.
    let mut h = with_uuid(named("a"), "");
    h.dev = 1;
    h.target_count = 0;
    let e = err(DmCmd::TableLoad, &buf(h, &[]));
    assert_eq!((e.errno(), e.lookup_first), (libc::ENXIO, None));
}

#[test]
fn table_load_first_spec_must_not_overlap_the_header() {
    let t = table(&[(0, 8, "zero", "")]);
    for start in [0, 8, 304, 305, 311] {
        let mut h = named("a");
        h.target_count = 1;
        h.data_start = start;
        let mut b = buf(h, &t);
        // Put a valid-looking spec at every candidate offset.
        if start as usize + t.len() <= b.len() {
            b[start as usize..start as usize + t.len()].copy_from_slice(&t);
        }
        assert_eq!(err(DmCmd::TableLoad, &b).errno(), libc::EINVAL, "data_start {start}");
    }
    // 320 (aligned, past the header) is fine.
    let mut h = named("a");
    h.target_count = 1;
    h.data_start = 320;
    let mut p = vec![0u8; 8];
    p.extend(&t);
    assert!(matches!(cmd_of(DmCmd::TableLoad, &buf(h, &p)), Command::TableLoad { .. }));
}

#[test]
fn table_load_next_must_be_aligned_and_move_forward() {
    let mut t = table(&[(0, 8, "zero", ""), (8, 8, "zero", "")]);
    let next_at = 20;
    let set_next = |t: &mut Vec<u8>, v: u32| t[next_at..next_at + 4].copy_from_slice(&v.to_ne_bytes());
    for bad in [0u32, 8, 40, 41, 44, 47] {
        // 0 loops back onto the same spec; below 48 overlaps this spec's parameters; 44 is misaligned.
        set_next(&mut t, bad);
        assert_eq!(load_err(2, &t).errno(), libc::EINVAL, "next {bad}");
    }
    set_next(&mut t, 52);
    assert_eq!(load_err(2, &t).errno(), libc::EINVAL, "misaligned");
    set_next(&mut t, u32::MAX - 7);
    assert_eq!(load_err(2, &t).errno(), libc::EINVAL, "far outside");
    set_next(&mut t, 48);
    assert!(matches!(cmd_of(DmCmd::TableLoad, &load(2, &t)), Command::TableLoad { .. }));
    // 41 bytes of spec + NUL is the minimum: next = 48 with params "" needs 48 + 41 bytes in all.
}

#[test]
fn table_load_spec_needs_room_for_a_parameter_byte() {
    // A spec that ends exactly at the buffer end: no room for the NUL.
    let t = spec(0, 8, "zero", "", true);
    assert_eq!(load_err(1, &t[..40]).errno(), libc::EINVAL);
    assert!(matches!(cmd_of(DmCmd::TableLoad, &load(1, &t[..41])), Command::TableLoad { .. }));
    assert_eq!(load_err(1, &t[..39]).errno(), libc::EINVAL);
}

#[test]
fn table_load_parameters_must_be_terminated_and_utf8() {
    let mut t = spec(0, 8, "linear", "7:0 0", true);
    let end = t.len();
    t[40..end].fill(b'x');
    assert_eq!(load_err(1, &t).errno(), libc::EINVAL);
    let t = spec(0, 8, "linear", "7:0 \u{ff}", true);
    let mut bad = t.clone();
    bad[44] = 0xff;
    assert_eq!(load_err(1, &bad).errno(), libc::EINVAL);
    let mut bad = t;
    bad[24] = 0xfe;
    assert_eq!(load_err(1, &bad).errno(), libc::EINVAL);
}

#[test]
fn table_load_unterminated_type_runs_into_the_parameters() {
    let mut t = spec(0, 8, "zero", "", true);
    t[24..40].copy_from_slice(b"0123456789abcdef");
    let Command::TableLoad { targets, .. } = cmd_of(DmCmd::TableLoad, &load(1, &t)) else { panic!() };
    assert_eq!(targets[0].target_type, "0123456789abcdef");
    let mut t = spec(0, 8, "zero", "xy", true);
    t[24..40].copy_from_slice(b"0123456789abcdef");
    let Command::TableLoad { targets, .. } = cmd_of(DmCmd::TableLoad, &load(1, &t)) else { panic!() };
    assert_eq!(targets[0].target_type, "0123456789abcdefxy");
    assert_eq!(targets[0].params, "xy");
}

#[test]
fn table_load_last_next_is_ignored() {
    let mut t = table(&[(0, 8, "zero", "")]);
    t[20..24].copy_from_slice(&7u32.to_ne_bytes());
    assert!(matches!(cmd_of(DmCmd::TableLoad, &load(1, &t)), Command::TableLoad { .. }));
}

// ---- §2.7 target message -------------------------------------------------------------------

fn msg_payload(sector: u64, m: &[u8]) -> Vec<u8> {
    let mut v = sector.to_ne_bytes().to_vec();
    v.extend_from_slice(m);
    v.push(0);
    v.resize(align8(v.len()), 0);
    v
}

#[test]
fn target_message() {
    let d = decoded(DmCmd::TargetMsg, &buf(named("a"), &msg_payload(123, b"@stats_list")));
    assert_eq!(
        d.request.command,
        Command::TargetMsg { key: DevKey::Name("a".into()), sector: Sectors(123), message: "@stats_list".into() }
    );
    assert_eq!(d.input.len(), d.param_size, "the reply is built on the whole buffer");
    // data_start 305 is allowed (not 312), and the sector is read unaligned.
    let mut h = named("a");
    h.data_start = 305;
    let mut b = buf(h, &[0; 16]);
    b[305..313].copy_from_slice(&9u64.to_ne_bytes());
    b[313..316].copy_from_slice(b"hi\0");
    assert!(matches!(cmd_of(DmCmd::TargetMsg, &b), Command::TargetMsg { sector: Sectors(9), .. }));
}

#[test]
fn target_message_errors() {
    let unterminated = buf(named("a"), &[0, 0, 0, 0, 0, 0, 0, 0, b'x', b'y']);
    let e = err(DmCmd::TargetMsg, &unterminated);
    assert_eq!((e.errno(), e.lookup_first), (libc::EINVAL, Some(DevKey::Name("a".into()))));
    for start in [0, 304, 320, 321, 400, u32::MAX - 4, u32::MAX] {
        let mut h = named("a");
        h.data_start = start;
        assert_eq!(err(DmCmd::TargetMsg, &buf(h, &msg_payload(0, b"x"))).errno(), libc::EINVAL, "{start}");
    }
    assert_eq!(err(DmCmd::TargetMsg, &buf(named("a"), &msg_payload(0, b"\xff"))).errno(), libc::EINVAL);
    // No key → ENXIO before the payload is looked at.
    assert_eq!(err(DmCmd::TargetMsg, &buf(header(), &[])).errno(), libc::ENXIO);
}

// ---- set geometry --------------------------------------------------------------------------

fn geo(s: &[u8]) -> Result<Command, DecodeError> {
    match decode(DmCmd::DevSetGeometry.request(), &buf(named("a"), &string_payload(s))) {
        Ok(Decoded::Command(d)) => Ok(d.request.command),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e),
    }
}

fn g(cylinders: u64, heads: u64, sectors: u64, start: u64) -> Command {
    Command::SetGeometry { key: DevKey::Name("a".into()), geometry: Geometry { cylinders, heads, sectors, start } }
}

#[test]
fn set_geometry_parses_like_sscanf() {
    assert_eq!(geo(b"1000 16 63 0"), Ok(g(1000, 16, 63, 0)));
    assert_eq!(geo(b"  1000\t16\n63 \x0b\x0c\r 8"), Ok(g(1000, 16, 63, 8)));
    assert_eq!(geo(b"1\xa02 3 4"), Ok(g(1, 2, 3, 4)), "0xa0 is kernel whitespace");
    assert_eq!(geo(b"65535 255 255 4261413375"), Ok(g(65535, 255, 255, 65535 * 255 * 255)));
    assert_eq!(geo(b"0 0 0 0"), Ok(g(0, 0, 0, 0)));
    assert_eq!(geo(b"007 1 1 0"), Ok(g(7, 1, 1, 0)));
    // simple_strntoull wraps: 2^64 + 5 cylinders are 5 cylinders.
    assert_eq!(geo(b"18446744073709551621 1 1 0"), Ok(g(5, 1, 1, 0)));
}

#[test]
fn set_geometry_errors_are_einval() {
    for bad in [
        &b""[..],
        b"1 2 3",
        b"1 2 3 4 5",
        b"1 2 3 4 ",
        b"1 2 3 4\n",
        b"1 2 3 4x",
        b"+1 2 3 4",
        b"-1 2 3 4",
        b"0x10 2 3 4",
        b"1,2,3,4",
        b"65536 1 1 0",
        b"1 256 1 0",
        b"1 1 256 0",
        b"2 2 2 9",
        b"1 2 \xc3\xa9 4",
    ] {
        let e = geo(bad).expect_err(&String::from_utf8_lossy(bad));
        assert_eq!(e.errno(), libc::EINVAL, "{:?}", String::from_utf8_lossy(bad));
        assert_eq!(e.lookup_first, Some(DevKey::Name("a".into())));
    }
    assert_eq!(geo(b"2 2 2 8"), Ok(g(2, 2, 2, 8)));
    let mut h = named("a");
    h.data_start = 304;
    assert_eq!(err(DmCmd::DevSetGeometry, &buf(h, &string_payload(b"1 1 1 0"))).errno(), libc::EINVAL);
    assert_eq!(err(DmCmd::DevSetGeometry, &buf(named("a"), b"1 1 1 0")).errno(), libc::EINVAL);
}

// ---- kept input ----------------------------------------------------------------------------

#[test]
fn payload_commands_keep_the_whole_buffer() {
    let b = sized(named("a"), 16384, 0xaa);
    for cmd in [DmCmd::ListDevices, DmCmd::TableStatus, DmCmd::DevWait, DmCmd::TableDeps, DmCmd::ListVersions] {
        let d = decoded(cmd, &b);
        assert_eq!((d.input.len(), d.param_size), (16384, 16384), "{cmd}");
        assert_eq!(d.input[1000], 0xaa);
        assert_eq!(&d.input[..12], &b[..12], "the input is kept as sent");
    }
    let d = decoded(DmCmd::TableClear, &b);
    assert_eq!((d.input.len(), d.param_size), (305, 305));
    assert_eq!(d.input, b[..305].to_vec());
    assert_eq!(d.header.data_size, 305, "the no-params header claims 305 bytes");
}
