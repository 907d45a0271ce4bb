//! Names and uuids over proplib are bytes (netbsd-dm-proplib.md §5.2: strings are copied as-is, no
//! UTF-8 validation): any byte but NUL goes in and comes back unchanged.

use super::harness::{engine, parse_reply, run_netbsd};
use crate::ioctl::netbsd::proplib::{externalize, Dict, Value};
use crate::ioctl::netbsd::{flags, NetbsdErrors};

fn request(command: &str, keys: &[(&str, Value)]) -> Vec<u8> {
    let mut d = Dict::new();
    d.insert(b"version".to_vec(), Value::Array(vec![Value::u(4u32), Value::u(0u32), Value::u(0u32)]));
    d.insert(b"command".to_vec(), Value::str(command));
    d.insert(b"flags".to_vec(), Value::u(flags::EXISTS));
    for (k, v) in keys {
        d.insert(k.as_bytes().to_vec(), v.clone());
    }
    externalize(&d)
}

fn bytes(b: &[u8]) -> Value {
    Value::String(b.to_vec())
}

#[test]
fn non_utf8_names_and_uuids_round_trip() {
    let mut e = engine();
    let (name, uuid, renamed) = (&b"caf\xe9 &<x>"[..], &b"\xff\xfe"[..], &b"\x80"[..]);
    let run = |e: &mut _, xml: Vec<u8>| run_netbsd(e, &xml, true, NetbsdErrors::Real);
    let r = run(&mut e, request("create", &[("name", bytes(name)), ("uuid", bytes(uuid))]));
    assert_eq!((r.ret, r.errno), (0, 0));
    assert_eq!(e.devices().next().map(|d| d.name.as_bytes().to_vec()), Some(name.to_vec()));
    // Found by the uuid's bytes; the reply carries them back.
    let r = run(&mut e, request("info", &[("uuid", bytes(uuid))]));
    assert_eq!(parse_reply(&r).get(b"uuid".as_slice()), Some(&bytes(uuid)));
    let r = run(&mut e, request("names", &[]));
    let Some(Value::Array(list)) = parse_reply(&r).get(b"cmd_data".as_slice()).cloned() else { panic!("{r:?}") };
    let Value::Dict(entry) = &list[0] else { panic!() };
    assert_eq!(entry.get(b"name".as_slice()), Some(&bytes(name)));
    let r = run(&mut e, request("rename", &[("name", bytes(name)), ("cmd_data", Value::Array(vec![bytes(renamed)]))]));
    assert_eq!((r.ret, r.errno), (0, 0));
    let r = run(&mut e, request("deps", &[("name", bytes(renamed))]));
    assert_eq!(parse_reply(&r).get(b"name".as_slice()), Some(&bytes(renamed)));
    // A slash is still refused among other bytes.
    let r = run(&mut e, request("create", &[("name", bytes(b"\xe9/"))]));
    assert_eq!(r.errno, libc::EINVAL);
}
