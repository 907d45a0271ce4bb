//! Fuzzing entry points (docs/fuzzing.md): one `pub fn <target>(data: &[u8])` per target, called
//! by the cargo-fuzz crate in `fuzz/` and by the deterministic smoke test (`tests/fuzz_smoke.rs`).
//!
//! Each builds what it needs in process (an engine over [`FakeDevices`], a data plane, a
//! socketpair) and panics only on a bug: a panic in the code under test, or an invariant checked
//! here. Input layouts are documented per function; the seed corpus in `fuzz/corpus/<target>/`
//! follows them (`tests/fuzz_smoke.rs` regenerates it with `--ignored`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};

use crate::dm::pdev::{DeviceResolver, Identity, Resolved};
use crate::dm::{
    Command, DevKey, DevNum, DmError, DmName, DmResult, Engine, EngineConfig, Reply, Request, Sectors, StatusType,
    SuspendOpts, TargetSpec,
};
use crate::io::DataPlane;
use crate::ioctl::dm_switch;
use crate::ioctl::layout::{dm_ioctl_request, DM_VERSION_BYTES};
use crate::ioctl::linux::{self, Decoded};
use crate::ioctl::netbsd::{self, NetbsdErrors};
use crate::nbd::proto;

/// An entry point: one input, a panic on a bug.
pub type Entry = fn(&[u8]);

/// Every target by name, for the smoke test and the corpus generator.
pub const TARGETS: &[(&str, Entry)] = &[
    ("linux_ioctl", linux_ioctl),
    ("proplib", proplib),
    ("dm_switch", dm_switch),
    ("nbd", nbd),
    ("table_load", table_load),
];

/// The engine's numbers, as the engine tests use them.
pub const DM_MAJOR: u32 = 252;
pub const FILE_MAJOR: u32 = 251;

/// Size of a fake file or block device whose path names none: 1 GiB.
const DEFAULT_SECTORS: u64 = 1 << 21;
/// No real file is larger than `i64::MAX` bytes (`st_size` is signed).
const MAX_SECTORS: u64 = i64::MAX as u64 / 512;

/// A resolver with no filesystem behind it: every path is a regular file (identity from a hash of
/// the path, so one path is one pdev), of the size its last component names in sectors, else
/// 1 GiB; a path containing `missing` does not exist. Every foreign `major:minor` is a 1 GiB block
/// device.
pub struct FakeDevices;

impl DeviceResolver for FakeDevices {
    fn resolve_path(&self, path: &str, _writable: bool) -> DmResult<Resolved> {
        if path.is_empty() || path.contains("missing") {
            return Err(DmError::NoSuchBlockDevice(path.into()));
        }
        let size = path.rsplit('/').next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(DEFAULT_SECTORS);
        let ino = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        Ok(Resolved::unopened(Identity::File { dev: 1, ino }, path.into(), Sectors(size.min(MAX_SECTORS))))
    }
    fn resolve_block(&self, dev: DevNum, _writable: bool) -> DmResult<Resolved> {
        Ok(Resolved::unopened(Identity::Block(dev), format!("/dev/block/{dev}"), Sectors(DEFAULT_SECTORS)))
    }
}

/// One data plane for every engine the entry points build: a detached plane starts worker and
/// timer threads that live as long as it does, so a plane per input would leak threads.
fn shared_plane() -> DataPlane {
    static PLANE: OnceLock<DataPlane> = OnceLock::new();
    PLANE.get_or_init(DataPlane::detached).clone()
}

/// A fresh engine over [`FakeDevices`].
pub fn engine() -> Engine {
    let mut e = Engine::new(
        EngineConfig { major: DM_MAJOR, file_major: FILE_MAJOR },
        crate::targets::registry(),
        Box::new(FakeDevices),
    );
    e.set_data_plane(shared_plane());
    e
}

fn run(e: &mut Engine, command: Command) -> DmResult<Reply> {
    e.execute(Request::new(command))
}

fn name(s: &str) -> DevKey {
    DevKey::Name(s.into())
}

fn spec(start: u64, length: u64, ty: &str, params: &str) -> TargetSpec {
    TargetSpec { start: Sectors(start), length: Sectors(length), target_type: ty.into(), params: params.into() }
}

/// Creates `n`, loads `specs` and resumes it; panics if the engine refuses (fixtures only).
fn device(e: &mut Engine, n: &str, specs: Vec<TargetSpec>) {
    let dm_name = DmName::new(n).expect("fixture name");
    run(e, Command::DevCreate { name: dm_name, uuid: None, minor: None }).expect("create fixture");
    run(e, Command::TableLoad { key: name(n), targets: specs, read_only: false }).expect("load fixture");
    run(e, Command::DevResume { key: name(n), opts: SuspendOpts::default() }).expect("resume fixture");
}

// ---- (a) Linux ioctls ---------------------------------------------------------------------------

/// Splits an input into ioctls: records of a selector byte, a little-endian `u16` length and that
/// many bytes of `dm_ioctl` buffer (cut short at the end of the input). The selector is the
/// command number (`_IOWR(0xfd, nr, struct dm_ioctl)`), except 0xff: a request of another ioctl
/// type. At most 64 records.
pub fn ioctl_records(mut data: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    while let [sel, l0, l1, rest @ ..] = data {
        let len = (u16::from_le_bytes([*l0, *l1]) as usize).min(rest.len());
        let request = if *sel == 0xff { 0xc138_fe00 } else { dm_ioctl_request(*sel) };
        out.push((request, &rest[..len]));
        data = &rest[len..];
        if out.len() == 64 {
            break;
        }
    }
    out
}

/// The record [`ioctl_records`] reads back as `(nr, buf)`.
pub fn ioctl_record(nr: u8, buf: &[u8]) -> Vec<u8> {
    let len = u16::try_from(buf.len()).expect("an ioctl record holds at most 64 KiB");
    let mut out = vec![nr];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(buf);
    out
}

/// One ioctl as the daemon runs it (src/server: decode, the engine, encode), for a privileged
/// caller and without DM_DEV_WAIT's sleep.
pub fn run_ioctl(e: &mut Engine, request: u64, buf: &[u8]) -> linux::Encoded {
    match linux::decode(request, buf) {
        Ok(Decoded::Version) => linux::encode_version(),
        Err(err) => {
            let error = match &err.lookup_first {
                Some(key) if e.event_nr(key).is_err() => DmError::NoDevice(format!("{key:?}")),
                _ => err.error.clone(),
            };
            linux::encode_error(request, buf, &error)
        }
        Ok(Decoded::Command(mut d)) => {
            let req = std::mem::replace(&mut d.request, Request::new(Command::Version));
            match e.execute(req) {
                Ok(reply) => linux::encode(&reply, &d),
                Err(error) => d.encode_error(&error),
            }
        }
    }
}

/// Linux ioctls against one engine, state kept from one to the next (create, load, resume,
/// remove … in any order). Layout: [`ioctl_records`]. Checks what the shim relies on: the reply
/// never holds more than the caller's buffer (it is copied over it), errors carry an errno.
pub fn linux_ioctl(data: &[u8]) {
    let mut e = engine();
    for (request, buf) in ioctl_records(data) {
        let enc = run_ioctl(&mut e, request, buf);
        assert!(
            enc.bytes.len() <= buf.len().max(DM_VERSION_BYTES),
            "{} reply bytes for a {}-byte buffer",
            enc.bytes.len(),
            buf.len()
        );
        assert!(enc.ret >= 0 || (1..4096).contains(&enc.errno), "ret {} errno {}", enc.ret, enc.errno);
    }
}

// ---- (b) proplib --------------------------------------------------------------------------------

/// NetBSD proplib requests: the input is split after each NUL (a request ends at the NUL
/// `pref_len` counts), at most 16. Each is parsed as the kernel parses it; what parses must be
/// written and read back to the same dictionary. Each also runs as a `NETBSD_DM_IOCTL` against one
/// engine, as src/server/plist.rs runs it.
pub fn proplib(data: &[u8]) {
    let mut e = engine();
    for req in data.split_inclusive(|&b| b == 0).take(16) {
        if let Ok(d) = netbsd::internalize(req) {
            let text = netbsd::externalize(&d);
            let back = netbsd::internalize(&text).unwrap_or_else(|err| panic!("our own output does not parse: {err}"));
            assert_eq!(back, d, "round trip changed the dictionary");
            assert_eq!(netbsd::externalize(&back), text, "writing is not deterministic");
        }
        let reply = match netbsd::decode(req, &e, true) {
            Err(refused) => refused.encode(NetbsdErrors::Real),
            Ok(mut d) => match d.request.take() {
                None => d.encode(&Reply::Version),
                Some(r) => match e.execute(r) {
                    Ok(reply) => d.encode(&reply),
                    Err(err) => d.encode_error(&err, NetbsdErrors::Real),
                },
            },
        };
        if !reply.xml.is_empty() {
            netbsd::internalize(&reply.xml).unwrap_or_else(|err| panic!("reply does not parse: {err}"));
        }
    }
}

// ---- (c) dm-switch genl -------------------------------------------------------------------------

/// The RFC switch the uploads go to: `sw`, minor 1 (so `dev_minor` 1 in a message finds it), 64
/// regions of 16 sectors over 4 paths. Minor 0 is an upstream-form switch the RFC upload refuses.
pub const SWITCH_MINOR: u32 = 1;

/// Generic-netlink frames for the dm-switch upload. The input is a netlink stream: each message
/// is as long as its `nlmsg_len` says (4-aligned); a length that does not fit makes the rest one
/// frame. At most 32 frames, against one engine with an RFC switch, each answered by
/// [`dm_switch::serve`] as the daemon answers a GENL frame; the answer must parse, and the
/// switch's status and lookups must work after every upload.
pub fn dm_switch(data: &[u8]) {
    let mut e = engine();
    device(&mut e, "up", vec![spec(0, 1024, "switch", "2 16 0 /f/a 0 /f/b 0")]);
    device(&mut e, "sw", vec![spec(0, 1024, "switch", "4 16 /f/p0 0 /f/p1 0 /f/p2 0 /f/p3 0")]);
    let mut rest = data;
    for _ in 0..32 {
        if rest.is_empty() {
            break;
        }
        let len = rest.get(..4).map_or(0, |b| u32::from_ne_bytes(b.try_into().expect("4 bytes")) as usize);
        let take = if (dm_switch::NLMSG_HDRLEN..=rest.len()).contains(&len) {
            dm_switch::align4(len).min(rest.len())
        } else {
            rest.len()
        };
        let (frame, tail) = rest.split_at(take);
        rest = tail;
        let reply = dm_switch::serve(frame, true, |dev, upload| crate::targets::switch::upload(&e, dev, upload));
        if let Err(err) = dm_switch::parse_reply(&reply) {
            panic!("reply does not parse: {err}");
        }
        match run(&mut e, Command::TableStatus { key: name("sw"), status: StatusType::Info, noflush: false }) {
            Ok(Reply::Status(_, Some(_))) => {}
            r => panic!("switch status: {r:?}"),
        }
        query_all(&e, SWITCH_MINOR);
    }
}

/// Asks every target of a device's live table where a few stretches of it live (block status's
/// question, no IO): both ends, the middle, the whole target.
fn query_all(e: &Engine, minor: u32) {
    let Some(live) = e.device(minor).and_then(|d| d.live.clone()) else { return };
    for t in live.targets() {
        let n = t.len.0;
        for (at, len) in [(0, 1), (0, n), (n / 2, n - n / 2), (n - 1, 1)] {
            if len > 0 {
                let _ = t.target.query(Sectors(at), Sectors(len));
            }
        }
    }
}

// ---- (d) NBD ------------------------------------------------------------------------------------

/// The data plane the NBD sessions see: exports `z` (zero, 8 MiB), `e` (error), `ro` (zero,
/// read-only), `lin` (linear over `z`, going through the data plane's stacking), `st` (striped
/// over two zero devices), all without files.
fn nbd_plane() -> DataPlane {
    // The engine stays alive beside the plane: it owns the devices' pdevs and minors.
    static PLANE: OnceLock<(DataPlane, Mutex<Engine>)> = OnceLock::new();
    let (plane, _) = PLANE.get_or_init(|| {
        let plane = DataPlane::detached();
        let mut e = engine();
        e.set_data_plane(plane.clone());
        device(&mut e, "z", vec![spec(0, 16384, "zero", "")]);
        device(&mut e, "e", vec![spec(0, 64, "error", "")]);
        device(&mut e, "z2", vec![spec(0, 16384, "zero", "")]);
        device(&mut e, "lin", vec![spec(0, 8192, "linear", "/dev/mapper/z 8")]);
        device(&mut e, "st", vec![spec(0, 8192, "striped", "2 8 /dev/mapper/z 0 /dev/mapper/z2 0")]);
        let key = name("ro");
        run(&mut e, Command::DevCreate { name: DmName::new("ro").expect("name"), uuid: None, minor: None })
            .expect("create ro");
        run(&mut e, Command::TableLoad { key: key.clone(), targets: vec![spec(0, 64, "zero", "")], read_only: true })
            .expect("load ro");
        run(&mut e, Command::DevResume { key, opts: SuspendOpts::default() }).expect("resume ro");
        for d in e.devices() {
            plane.publish(d.minor, d.name.as_bytes(), d.live.clone(), d.suspended, d.disk_read_only());
        }
        (plane, Mutex::new(e))
    });
    plane.clone()
}

/// One NBD client session, as the server runs it on an accepted socket: handshake (option
/// haggling), then transmission. Byte 0 picks the server's tuning (bit 0: worker threads, bit 1:
/// splice, bit 2: hand every request to a worker); the rest is what the client sends, after which
/// it closes its side and reads every reply. Every 28-byte window is also parsed as a request
/// header, which must encode back to itself.
pub fn nbd(data: &[u8]) {
    let Some((&knobs, stream)) = data.split_first() else { return };
    for w in stream.windows(proto::REQUEST_LEN) {
        let w: &[u8; proto::REQUEST_LEN] = w.try_into().expect("window size");
        if let Some(r) = proto::Request::parse(w) {
            assert_eq!(&r.encode(), w);
        }
    }
    let tuning = crate::nbd::Tuning {
        workers: if knobs & 1 != 0 { 2 } else { 0 },
        inline: if knobs & 4 != 0 { 0 } else { 128 << 10 },
        splice: knobs & 2 != 0,
        waitall: true,
        pool_bytes: 1 << 20,
    };
    let (client, server) = UnixStream::pair().expect("socketpair");
    let plane = nbd_plane();
    let input = Arc::new(stream.to_vec());
    // The client writes and reads on its own thread, so neither side waits on a full socket.
    let peer = std::thread::spawn(move || {
        let mut c = client;
        let _ = c.write_all(&input);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    });
    proto::serve_connection(&plane, File::from(OwnedFd::from(server)), tuning);
    peer.join().expect("client thread");
}

// ---- (e) table lines ----------------------------------------------------------------------------

/// C's `strtoull` on a leading run of digits, saturating as it does (an overflowing number is
/// `u64::MAX`, which is what the engine must survive).
fn saturating_number(s: &str) -> u64 {
    s.bytes().take_while(u8::is_ascii_digit).fold(0u64, |n, d| n.saturating_mul(10).saturating_add((d - b'0') as u64))
}

/// Table loads from text, against an engine holding `z` (zero, 1 GiB, minor 0, `/dev/mapper/z`
/// or `252:0` for stacking) and the device `t` (minor 1) that gets the tables. Lines are
/// `<start> <length> <type> <params>` as dmsetup takes them (numbers saturate); consecutive lines
/// are one load; a line `-` ends a load; `!<sector> <message>` sends a message to `t`. After each
/// load: resume, both status texts, and the printed table loaded back (what `dmsetup table` prints
/// must load), plus queries on every target. At most 64 lines, 256 targets in all.
pub fn table_load(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut e = engine();
    device(&mut e, "z", vec![spec(0, DEFAULT_SECTORS, "zero", "")]);
    let t = DmName::new("t").expect("name");
    run(&mut e, Command::DevCreate { name: t, uuid: None, minor: None }).expect("create t");
    let mut specs = Vec::new();
    let mut targets = 0;
    for line in text.lines().take(64).chain(["-"]) {
        if line == "-" {
            if !specs.is_empty() {
                load_and_check(&mut e, std::mem::take(&mut specs));
            }
        } else if let Some(msg) = line.strip_prefix('!') {
            let (sector, message) = msg.split_once(' ').unwrap_or((msg, ""));
            let sector = Sectors(saturating_number(sector));
            let _ = run(&mut e, Command::TargetMsg { key: name("t"), sector, message: message.into() });
        } else if targets < 256 {
            let mut words = line.splitn(4, [' ', '\t']);
            let start = saturating_number(words.next().unwrap_or(""));
            let length = saturating_number(words.next().unwrap_or(""));
            let ty = words.next().unwrap_or("");
            specs.push(spec(start, length, ty, words.next().unwrap_or("")));
            targets += 1;
        }
    }
}

fn load_and_check(e: &mut Engine, specs: Vec<TargetSpec>) {
    if run(e, Command::TableLoad { key: name("t"), targets: specs, read_only: false }).is_err() {
        return;
    }
    if run(e, Command::DevResume { key: name("t"), opts: SuspendOpts::default() }).is_err() {
        return;
    }
    let status = |e: &mut Engine, status| match run(e, Command::TableStatus { key: name("t"), status, noflush: false })
    {
        Ok(Reply::Status(_, Some(s))) => s,
        r => panic!("status of a live table: {r:?}"),
    };
    status(e, StatusType::Info);
    let printed = status(e, StatusType::Table);
    query_all(e, 1);
    let again = printed.iter().map(|t| TargetSpec {
        start: t.start,
        length: t.length,
        target_type: t.target_type.clone(),
        params: t.text.clone(),
    });
    let again: Vec<TargetSpec> = again.collect();
    if let Err(err) = run(e, Command::TableLoad { key: name("t"), targets: again.clone(), read_only: false }) {
        panic!("the printed table does not load again ({err}): {again:?}");
    }
}
