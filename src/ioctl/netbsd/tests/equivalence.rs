//! The same random command sequences through the Linux codec into one engine and through the
//! proplib codec into another: every reply says the same thing and the engines end equal.

use proptest::prelude::*;

use super::harness::*;
use crate::dm::{DevNum, Engine};
use crate::ioctl::layout::DmFlags;
use crate::ioctl::netbsd::{externalize, flags, Dict, NetbsdErrors, Num, Value};

/// What a reply tells a caller, in either face's terms.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok(Summary),
    /// Linux ENXIO, NetBSD ENOENT.
    NotFound,
    /// create with a name or uuid in use: Linux EBUSY, NetBSD EEXIST.
    Exists,
    Err(i32),
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Summary {
    minor: Option<u32>,
    uuid: Option<String>,
    target_count: Option<u32>,
    open_count: Option<u32>,
    suspended: Option<bool>,
    active: Option<bool>,
    inactive: Option<bool>,
    names: Vec<(String, u32)>,
    versions: Vec<(String, [u32; 3])>,
    table: Vec<(u64, u64, String, String)>,
    deps: Vec<DevNum>,
}

/// Which summary fields an operation's reply carries in both faces.
#[derive(Clone, Copy)]
enum Kind {
    Nothing,
    Minor,
    Info,
    Names,
    Versions,
    Deps,
    Table,
}

fn kind(op: &Op) -> Kind {
    match op {
        Op::Version | Op::Remove(_) | Op::Clear(_) => Kind::Nothing,
        Op::Targets => Kind::Versions,
        Op::Names => Kind::Names,
        Op::Create { .. } | Op::Suspend(_) | Op::Resume(_) | Op::Rename { .. } | Op::Reload { .. } => Kind::Minor,
        Op::Info(_) | Op::Mknodes(_) => Kind::Info,
        Op::Deps { .. } => Kind::Deps,
        Op::Status { .. } => Kind::Table,
    }
}

fn linux_outcome(op: &Op, v: &LinuxView) -> Outcome {
    match (v.ret, v.errno) {
        (0, _) => {}
        (_, libc::ENXIO) => return Outcome::NotFound,
        (_, libc::EBUSY) if matches!(op, Op::Create { .. }) => return Outcome::Exists,
        (_, e) => return Outcome::Err(e),
    }
    let mut s = Summary::default();
    let h = v.header;
    let dev = || h.map(|h| DevNum::huge_decode(h.dev).minor);
    match kind(op) {
        Kind::Nothing => {}
        Kind::Minor => s.minor = dev(),
        Kind::Info => {
            let h = h.expect("info header");
            let f = h.flags();
            s.minor = dev();
            s.uuid = Some(String::from_utf8_lossy(crate::ioctl::reader::field_str(&h.uuid)).into_owned());
            s.target_count = Some(h.target_count);
            s.open_count = Some(h.open_count as u32);
            s.suspended = Some(f.contains(DmFlags::SUSPEND));
            s.active = Some(f.contains(DmFlags::ACTIVE_PRESENT));
            s.inactive = Some(f.contains(DmFlags::INACTIVE_PRESENT));
        }
        Kind::Names => s.names = v.names.iter().map(|(d, n)| (n.clone(), d.minor)).collect(),
        Kind::Versions => s.versions = v.versions.clone(),
        Kind::Deps => {
            s.minor = dev();
            s.deps = v.deps.clone();
        }
        Kind::Table => {
            let f = h.expect("status header").flags();
            s.minor = dev();
            s.active = Some(f.contains(DmFlags::ACTIVE_PRESENT));
            s.suspended = Some(f.contains(DmFlags::SUSPEND));
            s.table = v.targets.clone();
        }
    }
    s.names.sort();
    s.versions.sort();
    Outcome::Ok(s)
}

fn num(d: &Dict, k: &str) -> Option<Num> {
    d.get(k.as_bytes()).and_then(Value::as_num)
}

fn u32_of(d: &Dict, k: &str) -> Option<u32> {
    num(d, k).and_then(Num::as_u32)
}

fn str_of(d: &Dict, k: &str) -> Option<String> {
    d.get(k.as_bytes()).and_then(Value::as_bytes).map(|s| String::from_utf8_lossy(s).into_owned())
}

fn entries(d: &Dict) -> Vec<&Dict> {
    match d.get(b"cmd_data".as_slice()) {
        Some(Value::Array(a)) => a.iter().filter_map(|v| if let Value::Dict(d) = v { Some(d) } else { None }).collect(),
        _ => vec![],
    }
}

fn netbsd_outcome(op: &Op, r: &crate::ioctl::netbsd::PlistReply) -> Outcome {
    match (r.ret, r.errno) {
        (0, _) => {}
        (_, libc::ENOENT) => return Outcome::NotFound,
        (_, libc::EEXIST) => return Outcome::Exists,
        (_, e) => return Outcome::Err(e),
    }
    let d = parse_reply(r);
    let f = u32_of(&d, "flags").unwrap_or(0);
    let mut s = Summary::default();
    match kind(op) {
        Kind::Nothing => {}
        Kind::Minor => s.minor = u32_of(&d, "minor"),
        Kind::Info => {
            s.minor = u32_of(&d, "minor");
            s.uuid = str_of(&d, "uuid");
            s.target_count = u32_of(&d, "target_count");
            s.open_count = u32_of(&d, "open_count");
            s.suspended = Some(f & flags::SUSPEND != 0);
            s.active = Some(f & flags::ACTIVE_PRESENT != 0);
            s.inactive = Some(f & flags::INACTIVE_PRESENT != 0);
        }
        Kind::Names => {
            s.names =
                entries(&d).into_iter().map(|e| (str_of(e, "name").unwrap(), u32_of(e, "dev").unwrap())).collect();
        }
        Kind::Versions => {
            s.versions = entries(&d)
                .into_iter()
                .map(|e| {
                    let v = match e.get(b"ver".as_slice()) {
                        Some(Value::Array(a)) => {
                            a.iter().map(|n| n.as_num().and_then(Num::as_u32).unwrap()).collect::<Vec<_>>()
                        }
                        _ => panic!("ver"),
                    };
                    (str_of(e, "name").unwrap(), [v[0], v[1], v[2]])
                })
                .collect();
        }
        Kind::Deps => {
            s.minor = u32_of(&d, "minor");
            s.deps = match d.get(b"cmd_data".as_slice()) {
                Some(Value::Array(a)) => {
                    a.iter().map(|v| DevNum::huge_decode(v.as_num().and_then(Num::as_u64).unwrap())).collect()
                }
                _ => panic!("deps without cmd_data"),
            };
        }
        Kind::Table => {
            s.minor = u32_of(&d, "minor");
            s.active = Some(f & flags::ACTIVE_PRESENT != 0);
            s.suspended = Some(f & flags::SUSPEND != 0);
            s.table = entries(&d)
                .into_iter()
                .map(|e| {
                    let n = |k| num(e, k).and_then(Num::as_u64).unwrap();
                    (n("start"), n("length"), str_of(e, "type").unwrap(), str_of(e, "params").unwrap())
                })
                .collect();
        }
    }
    s.names.sort();
    s.versions.sort();
    Outcome::Ok(s)
}

/// Everything that makes up an engine's state.
fn state(e: &Engine) -> Vec<String> {
    let mut v: Vec<String> = e
        .devices()
        .map(|d| {
            format!(
                "{} {} {:?} susp={} ro={} ev={} open={} live={:?} inactive={:?}",
                d.minor,
                d.name,
                d.uuid,
                d.suspended,
                d.read_only,
                d.event_nr,
                e.open_count(d.minor),
                table_lines(e, d.minor, false),
                table_lines(e, d.minor, true)
            )
        })
        .collect();
    v.push(format!("global event {}", e.global_event()));
    v
}

const NAMES: [&str; 3] = ["a", "b", "c"];

fn dev_name() -> impl Strategy<Value = String> {
    prop::sample::select(&NAMES[..]).prop_map(String::from)
}

/// Minors from 1: minor 0 means "not given" to NetBSD (a documented difference).
fn sel() -> impl Strategy<Value = Sel> {
    prop_oneof![
        4 => dev_name().prop_map(Sel::Name),
        1 => dev_name().prop_map(|n| Sel::Uuid(format!("U-{n}"))),
        1 => (1u32..4).prop_map(Sel::Minor),
    ]
}

fn table() -> impl Strategy<Value = Vec<Line>> {
    let l = prop_oneof![
        Just(("zero".to_string(), String::new())),
        Just(("error".to_string(), String::new())),
        (1u64..4, 0u64..32).prop_map(|(f, o)| ("linear".to_string(), format!("/f/{f}/64 {o}"))),
        dev_name().prop_map(|n| ("linear".to_string(), format!("/dev/mapper/{n} 0"))),
        Just(("bogus".to_string(), String::new())),
    ];
    proptest::collection::vec((l, 1u64..16), 1..4).prop_map(|v| {
        let mut start = 0;
        v.into_iter()
            .map(|((ty, params), len)| {
                let l = line(start, len, &ty, &params);
                start += len;
                l
            })
            .collect()
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Version),
        1 => Just(Op::Targets),
        2 => Just(Op::Names),
        6 => (dev_name(), any::<bool>()).prop_map(|(n, u)| Op::Create { uuid: u.then(|| format!("U-{n}")), name: n }),
        3 => sel().prop_map(Op::Info),
        1 => sel().prop_map(Op::Mknodes),
        2 => sel().prop_map(Op::Suspend),
        3 => sel().prop_map(Op::Resume),
        2 => sel().prop_map(Op::Remove),
        1 => sel().prop_map(Op::Clear),
        2 => (sel(), any::<bool>()).prop_map(|(sel, inactive)| Op::Deps { sel, inactive }),
        3 => (sel(), any::<bool>(), any::<bool>()).prop_map(|(sel, table, inactive)| Op::Status { sel, command: "status", table, inactive }),
        2 => (dev_name(), dev_name()).prop_map(|(name, new)| Op::Rename { name, new }),
        4 => (sel(), table()).prop_map(|(sel, lines)| Op::Reload { sel, lines }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn both_faces_drive_the_engine_alike(ops in proptest::collection::vec(op(), 1..24)) {
        let (mut lx, mut nb) = (engine(), engine());
        for op in &ops {
            let old_missing = matches!(op, Op::Rename { name, .. } if !lx.devices().any(|d| d.name.as_bytes() == name.as_bytes()));
            let l = linux_outcome(op, &LinuxView::new(op.linux().cmd, &run_linux(&mut lx, &op.linux())));
            let n = netbsd_outcome(op, &run_netbsd(&mut nb, &externalize(&op.dict()), true, NetbsdErrors::Real));
            // Linux's rename checks "new name taken" before "old name missing"; NetBSD looks the
            // device up first.
            if old_missing && l == Outcome::Err(libc::EBUSY) && n == Outcome::NotFound {
                continue;
            }
            prop_assert_eq!(&l, &n, "{:?}", op);
            prop_assert_eq!(state(&lx), state(&nb), "after {:?}", op);
        }
    }
}

/// Each NetBSD command decodes into exactly the `Request` the Linux codec makes of the same
/// operation (NetBSD `version` and Linux DM_VERSION both run nothing).
#[test]
fn both_codecs_produce_the_same_requests() {
    use crate::ioctl::linux;
    use crate::ioctl::netbsd::decode;
    let mut e = engine();
    for op in [create("a"), Op::Create { name: "b".into(), uuid: Some("U-b".into()) }] {
        run_linux(&mut e, &op.linux());
    }
    let st = |sel, table, inactive| Op::Status { sel, command: "table", table, inactive };
    let ops = [
        Op::Version,
        Op::Targets,
        Op::Names,
        Op::Create { name: "c".into(), uuid: Some("U-c".into()) },
        Op::Info(name("a")),
        Op::Info(Sel::Uuid("U-b".into())),
        Op::Mknodes(Sel::Minor(1)),
        Op::Suspend(name("a")),
        Op::Resume(Sel::Minor(1)),
        Op::Remove(Sel::Uuid("U-b".into())),
        Op::Clear(name("b")),
        Op::Deps { sel: name("a"), inactive: true },
        st(name("a"), true, false),
        st(Sel::Minor(1), false, true),
        Op::Rename { name: "a".into(), new: "z".into() },
        reload("b", &[line(0, 8, "zero", ""), line(8, 8, "linear", "/f/1/64 0")]),
    ];
    for op in ops {
        let b = op.linux();
        let l = match linux::decode(b.cmd.request(), &b.bytes()).unwrap() {
            linux::Decoded::Version => None,
            linux::Decoded::Command(d) => Some(d.request),
        };
        let n = decode(&externalize(&op.dict()), &e, true).unwrap().request;
        assert_eq!(l, n, "{op:?}");
    }
}
