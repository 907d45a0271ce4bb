//! Property tests: [`decode`] never panics on any input, and [`encode`] never panics or writes past
//! the caller's buffer for any reply (the payload writer's `debug_assert` turns an out-of-range
//! write into a test failure).

use proptest::prelude::*;

use super::fixtures::{buf, header, info, reply_header, set_field, sized, table, with_name, with_uuid};
use super::{decode, encode, encode_error, Decoded, DecodedIoctl};
use crate::dm::Command;
use crate::dm::{DevInfo, DevNum, DmError, DmName, DmUuid, NameEntry, Reply, Sectors, TargetStatus, TargetVersion};
use crate::ioctl::layout::{dm_ioctl_request, DmCmd, DmFlags};
use crate::ioctl::reader::field_str;

/// `{4, 0, 0}`, what libdm sends for most commands.
const LIBDM_VERSION: [u8; 12] = [4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Valid requests to mutate.
fn seeds() -> Vec<(DmCmd, Vec<u8>)> {
    let named = |n: &str| with_name(header(), n);
    let mut load = named("a");
    load.target_count = 3;
    let mut msg = vec![0u8; 8];
    msg.extend_from_slice(b"@stats_list\0\0\0\0\0");
    let mut uuid_list = with_uuid(named("vg"), "LVM-");
    uuid_list.set_flags(uuid_list.flags() | DmFlags::UUID);
    let mut secure = named("k");
    secure.set_flags(secure.flags() | DmFlags::SECURE_DATA);
    secure.target_count = 1;
    vec![
        (DmCmd::TableLoad, buf(load, &table(&[(0, 8, "linear", "7:0 0"), (8, 8, "zero", ""), (16, 8, "error", "")]))),
        (DmCmd::TableLoad, buf(secure, &table(&[(0, 8, "crypt", "aes 0123 0 7:0 0")]))),
        (DmCmd::DevRename, buf(named("old"), b"new\0\0\0\0\0")),
        (DmCmd::TargetMsg, buf(named("a"), &msg)),
        (DmCmd::DevSetGeometry, buf(named("a"), b"100 16 63 0\0\0\0\0\0")),
        (DmCmd::ListDevices, sized(uuid_list, 1024, 0)),
        (DmCmd::TableStatus, sized(named("a"), 1024, 0)),
        (DmCmd::DevCreate, buf(with_uuid(named("n"), "u"), &[])),
        (DmCmd::GetTargetVersion, sized(named("linear"), 512, 0)),
    ]
}

/// Names are bytes: anything but NUL, mostly without `/` so that few are filtered out.
fn name_strategy() -> impl Strategy<Value = DmName> {
    prop_oneof!["[a-z0-9_.-]{1,127}".prop_map(String::into_bytes), proptest::collection::vec(1u8..=255, 1..=127),]
        .prop_filter_map("check_name", |s| DmName::new(s).ok())
}

fn uuid_strategy() -> impl Strategy<Value = Option<DmUuid>> {
    proptest::option::of(
        prop_oneof!["[A-Za-z0-9-]{1,128}".prop_map(String::into_bytes), proptest::collection::vec(1u8..=255, 1..=128),]
            .prop_map(|s| DmUuid::new(s).unwrap()),
    )
}

fn text_strategy() -> impl Strategy<Value = String> {
    prop_oneof!["[ -~]{0,64}", "[ -~\u{0}é]{0,600}"]
}

fn dev_info_strategy() -> impl Strategy<Value = DevInfo> {
    (name_strategy(), uuid_strategy(), any::<u32>(), any::<bool>(), any::<bool>()).prop_map(
        |(name, uuid, minor, suspended, inactive)| {
            let mut i = info("x", minor & 0xfffff);
            i.name = name;
            i.uuid = uuid;
            i.suspended = suspended;
            i.inactive_present = inactive;
            i
        },
    )
}

fn version_strategy() -> impl Strategy<Value = TargetVersion> {
    ("[a-z-]{0,40}", any::<[u32; 3]>()).prop_map(|(name, version)| TargetVersion { name, version })
}

fn reply_strategy() -> impl Strategy<Value = Reply> {
    let entry =
        (name_strategy(), uuid_strategy(), any::<u32>(), any::<u32>()).prop_map(|(name, uuid, minor, event_nr)| {
            NameEntry { dev: DevNum::new(252, minor & 0xfffff), name, event_nr, uuid }
        });
    let target = ("[a-z-]{0,24}", text_strategy(), any::<u64>(), any::<u64>())
        .prop_map(|(ty, text, s, l)| TargetStatus { start: Sectors(s), length: Sectors(l), target_type: ty, text });
    let devs = proptest::option::of(proptest::collection::vec(any::<u64>(), 0..200));
    prop_oneof![
        Just(Reply::Nothing),
        Just(Reply::ArmPoll),
        Just(Reply::MessageNoTable),
        dev_info_strategy().prop_map(Reply::Device),
        dev_info_strategy().prop_map(Reply::Renamed),
        (name_strategy(), uuid_strategy(), any::<bool>())
            .prop_map(|(name, uuid, deferred)| { Reply::Removed { name, uuid, deferred } }),
        proptest::collection::vec(entry, 0..40).prop_map(Reply::DeviceList),
        (dev_info_strategy(), devs)
            .prop_map(|(i, d)| Reply::Deps(i, d.map(|d| d.into_iter().map(DevNum::huge_decode).collect()))),
        (dev_info_strategy(), proptest::option::of(proptest::collection::vec(target, 0..30)))
            .prop_map(|(i, t)| Reply::Status(i, t)),
        proptest::collection::vec(version_strategy(), 0..30).prop_map(Reply::Versions),
        version_strategy().prop_map(Reply::TargetVersion),
        (dev_info_strategy(), proptest::option::of(text_strategy())).prop_map(|(i, t)| Reply::Message(i, t)),
    ]
}

/// Encodes `reply` and checks the kernel's bound: never more than the caller's buffer.
fn check_encode(reply: &Reply, d: &DecodedIoctl) {
    let e = encode(reply, d);
    assert!(e.bytes.len() <= d.param_size.max(12), "{} bytes for a {}-byte buffer", e.bytes.len(), d.param_size);
    // (A secure-data request whose reply copies nothing reads back as zeros, version included.)
    if e.ret == 0 && !d.secure_data {
        assert_eq!(&e.bytes[..4], &4u32.to_ne_bytes()[..], "version written back");
    }
}

fn check_decode(request: u64, b: &[u8], reply: &Reply) {
    match decode(request, b) {
        Ok(Decoded::Command(d)) => {
            assert!(d.input.len() <= b.len());
            check_encode(reply, &d);
            let _ = d.encode_error(&DmError::Busy("x".into()));
        }
        Ok(Decoded::Version) => {}
        Err(e) => {
            let enc = encode_error(request, b, &e.error);
            assert!(enc.bytes.len() <= b.len().max(12));
            assert_eq!(enc.errno, e.errno());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decode_never_panics_on_random_bytes(nr in 0u8..24, raw in proptest::collection::vec(any::<u8>(), 0..1200),
                                           fix_header in any::<bool>(), reply in reply_strategy()) {
        let mut b = raw;
        // Half the time make the header plausible so the per-command code runs.
        if fix_header && b.len() >= 16 {
            b[..12].copy_from_slice(&LIBDM_VERSION);
            let len = b.len() as u32;
            b[12..16].copy_from_slice(&len.to_ne_bytes());
        }
        check_decode(dm_ioctl_request(nr), &b, &reply);
    }

    #[test]
    fn decode_never_panics_on_mutated_requests(
        seed in 0usize..9,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        word in proptest::option::of((any::<prop::sample::Index>(), prop_oneof![Just(0u32), Just(8), Just(305), Just(312), Just(u32::MAX), any::<u32>()])),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        reply in reply_strategy(),
    ) {
        let (cmd, mut b) = seeds().swap_remove(seed);
        for (i, v) in flips {
            let i = i.index(b.len());
            b[i] = v;
        }
        if let Some((i, v)) = word {
            let i = i.index(b.len() - 3);
            b[i..i + 4].copy_from_slice(&v.to_ne_bytes());
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len() + 1));
        }
        check_decode(cmd.request(), &b, &reply);
    }

    /// Any name and uuid bytes the kernel takes come through DEV_CREATE's decode and a status
    /// reply's header unchanged.
    #[test]
    fn names_and_uuids_round_trip_as_bytes(name in name_strategy(), uuid in uuid_strategy()) {
        let mut h = header();
        set_field(&mut h.name, name.as_bytes());
        set_field(&mut h.uuid, uuid.as_ref().map_or(&[][..], |u| u.as_bytes()));
        let d = super::fixtures::decoded(DmCmd::DevCreate, &buf(h, &[]));
        let Command::DevCreate { name: n, uuid: u, .. } = &d.request.command else { panic!() };
        prop_assert_eq!((n, u), (&name, &uuid));
        let mut i = info("x", 0);
        i.name = name.clone();
        i.uuid = uuid.clone();
        let out = reply_header(&encode(&Reply::Device(i), &d).bytes);
        prop_assert_eq!(field_str(&out.name), name.as_bytes());
        prop_assert_eq!(field_str(&out.uuid), uuid.as_ref().map_or(&[][..], |u| u.as_bytes()));
    }

    #[test]
    fn encode_stays_inside_any_buffer(size in 305usize..2048, reply in reply_strategy(), cmd_i in 0usize..4,
                                      uuid_flag in any::<bool>(), secure in any::<bool>()) {
        let cmd = [DmCmd::ListDevices, DmCmd::TableStatus, DmCmd::ListVersions, DmCmd::DevStatus][cmd_i];
        let mut h = with_name(header(), "a");
        if uuid_flag {
            h.set_flags(h.flags() | DmFlags::UUID);
        }
        if secure {
            h.set_flags(h.flags() | DmFlags::SECURE_DATA);
        }
        let b = sized(h, size, 0x5a);
        if let Ok(Decoded::Command(d)) = decode(cmd.request(), &b) {
            check_encode(&reply, &d);
        } else {
            prop_assert!(false, "seed did not decode");
        }
    }
}

#[test]
fn seeds_decode() {
    for (cmd, b) in seeds() {
        assert!(matches!(decode(cmd.request(), &b), Ok(Decoded::Command(_))), "{cmd}");
    }
}
