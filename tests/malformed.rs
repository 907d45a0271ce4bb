//! Malformed input on the control socket: every broken `struct dm_ioctl` must get the errno the
//! Linux kernel gives it (linux-dm-abi.md §2.1, §2.4, §2.5, §2.7, §2.11), with only the 12-byte
//! `version` copied back, and no malformed request or frame may take the daemon (or another client)
//! down (docs/control-socket.md "Bounds").
//!
//! Broken buffers are built by mutating valid ones through the declared structs
//! (`dmemu::ioctl::layout`) and `offset_of!`; there are no magic offsets. Every test runs its own
//! `dmemu serve` and ends with a fresh connection and a real `dmsetup ls` through the shim.

mod common;

use core::mem::{offset_of, size_of};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::Daemon;
use dmemu::client::{Client, IoctlBuf, IoctlResult};
use dmemu::dm::DevNum;
use dmemu::ioctl::layout::{
    dm_ioctl_request, DmCmd, DmFlags, DmIoctl, DmTargetMsg, DmTargetSpec, DM_IOCTL_MIN_SIZE, DM_IOCTL_SIZE,
    DM_IOCTL_TYPE, DM_MAX_DATA_SIZE, DM_MAX_TARGETS, DM_MPATH_PROBE_PATHS, DM_NAME_LEN, DM_TARGET_MSG_MESSAGE_OFFSET,
    DM_TARGET_SPEC_ALIGN, DM_TARGET_SPEC_SIZE, DM_UUID_LEN, DM_VERSION, DM_VERSION_BYTES, DM_VERSION_MAJOR,
    DM_VERSION_MINOR,
};
use dmemu_frame::{self as frame, FrameHeader, Kind, HEADER_LEN, MAGIC, MAX_IOCTL_PAYLOAD};
use libc::{EBUSY, EFAULT, EINTR, EINVAL, ENOTTY, ENXIO, EOVERFLOW};
use zerocopy::{FromBytes, IntoBytes};

// ------------------------------------------------------------------------------------------------
// Buffers
// ------------------------------------------------------------------------------------------------

/// The bytes holding `version[3]` and `data_size`: the least a caller can hand over (§2.1 step 5).
const HEADER_PREFIX: usize = offset_of!(DmIoctl, data_size) + size_of::<u32>();

/// What the kernel writes back on every failure after the version check (§2.1 step 3, step 9).
fn version_bytes() -> Vec<u8> {
    DM_VERSION.as_bytes().to_vec()
}

/// The `dm_ioctl` at the start of `buf`, zero-extended when `buf` is shorter.
fn header_of(buf: &[u8]) -> DmIoctl {
    let mut raw = [0u8; DM_IOCTL_SIZE];
    let n = buf.len().min(DM_IOCTL_SIZE);
    raw[..n].copy_from_slice(&buf[..n]);
    DmIoctl::read_from_bytes(&raw).expect("312 bytes")
}

/// Edits the `dm_ioctl` at the start of `buf` through the declared struct.
fn edit_header(buf: &mut [u8], f: impl FnOnce(&mut DmIoctl)) {
    let mut h = header_of(buf);
    f(&mut h);
    let n = buf.len().min(DM_IOCTL_SIZE);
    buf[..n].copy_from_slice(&h.as_bytes()[..n]);
}

fn spec_at(buf: &[u8], at: usize) -> DmTargetSpec {
    DmTargetSpec::read_from_bytes(&buf[at..at + DM_TARGET_SPEC_SIZE]).expect("40 bytes")
}

/// Edits the `dm_target_spec` at byte `at` of `buf`.
fn edit_spec(buf: &mut [u8], at: usize, f: impl FnOnce(&mut DmTargetSpec)) {
    let mut s = spec_at(buf, at);
    f(&mut s);
    buf[at..at + DM_TARGET_SPEC_SIZE].copy_from_slice(s.as_bytes());
}

/// Where the specs of a valid TABLE_LOAD buffer start (the load's `next` is relative to the
/// current spec, the first one is `data_start` from the header: §2.5).
fn spec_offsets(buf: &[u8]) -> Vec<usize> {
    let h = header_of(buf);
    let mut at = h.data_start as usize;
    let mut out = Vec::new();
    for _ in 0..h.target_count {
        out.push(at);
        at += spec_at(buf, at).next as usize;
    }
    out
}

/// Where the parameter string of the spec at `at` starts.
fn params_of(at: usize) -> usize {
    at + DM_TARGET_SPEC_SIZE
}

/// A buffer of `b`'s header with `payload` at byte `off` (which may lie inside the header's
/// trailing `data[7]`, i.e. at 305..312), `data_start = off`, and `data_size` = the buffer length
/// (at least `total`).
fn payload_at(b: &IoctlBuf, off: usize, payload: &[u8], total: usize) -> Vec<u8> {
    let mut out = b.bytes()[..DM_IOCTL_SIZE].to_vec();
    out.resize(total.max(off + payload.len()), 0);
    out[off..off + payload.len()].copy_from_slice(payload);
    let len = out.len();
    edit_header(&mut out, |h| {
        h.data_start = off as u32;
        h.data_size = len as u32;
    });
    out
}

/// The exact-size buffer (no slack after the payload) of `b`.
fn exact(b: IoctlBuf) -> IoctlBuf {
    IoctlBuf { size: 0, ..b }
}

/// A valid three-target load: `zero`, `error` with ignored words, `zero` (24 sectors).
fn three_target_load(name: &str) -> IoctlBuf {
    exact(IoctlBuf::new(DmCmd::TableLoad).name(name).table([
        (0, 8, "zero", ""),
        (8, 8, "error", "a b c"),
        (16, 8, "zero", ""),
    ]))
}

fn one_target_load(name: &str) -> IoctlBuf {
    exact(IoctlBuf::new(DmCmd::TableLoad).name(name).table([(0, 8, "zero", "")]))
}

/// A DM_TARGET_MSG payload (`dm_target_msg` + message) with no NUL at the end, built from the
/// declared struct.
fn target_msg(sector: u64, msg: &[u8]) -> Vec<u8> {
    let mut out = DmTargetMsg { sector }.as_bytes().to_vec();
    assert_eq!(out.len(), DM_TARGET_MSG_MESSAGE_OFFSET);
    out.extend_from_slice(msg);
    out
}

/// `request` with its `_IOC_TYPE` byte replaced.
fn with_type(request: u64, ty: u8) -> u64 {
    let ty_shift = 8;
    (request & !(0xff << ty_shift)) | (u64::from(ty) << ty_shift)
}

// ------------------------------------------------------------------------------------------------
// Assertions
// ------------------------------------------------------------------------------------------------

fn client(d: &Daemon) -> Client {
    Client::connect(&d.socket).expect("connect to the daemon")
}

#[track_caller]
fn send(c: &mut Client, request: u64, buf: &[u8]) -> IoctlResult {
    c.ioctl(request, buf).unwrap_or_else(|e| panic!("no reply to request {request:#x}: {e}"))
}

#[track_caller]
fn run(c: &mut Client, b: &IoctlBuf) -> IoctlResult {
    send(c, b.cmd.request(), &b.bytes())
}

/// `ioctl()` returned -1 with `errno`, and only `version` was copied back.
#[track_caller]
fn assert_err(r: &IoctlResult, errno: i32, what: &str) {
    assert_eq!((r.ret, r.errno), (-1, errno), "{what}: wrong result (bytes {:?})", r.bytes);
    assert_eq!(r.bytes, version_bytes(), "{what}: on failure only `version` is copied back");
}

/// `ioctl()` returned -1 with `errno` and nothing was written (the kernel failed before its
/// version check wrote anything: wrong type byte, unreadable version).
#[track_caller]
fn assert_err_unwritten(r: &IoctlResult, errno: i32, what: &str) {
    assert_eq!((r.ret, r.errno), (-1, errno), "{what}: wrong result (bytes {:?})", r.bytes);
    assert!(r.bytes.is_empty(), "{what}: nothing may be written back, got {:?}", r.bytes);
}

#[track_caller]
fn assert_ok(r: &IoctlResult, what: &str) {
    assert_eq!((r.ret, r.errno), (0, 0), "{what}: expected success, got {r:?}");
    assert_eq!(&r.bytes[..DM_VERSION_BYTES], version_bytes().as_slice(), "{what}: version");
}

/// A successful header-only reply: `data_size` 305 bytes copied back (§2.1 step 7).
#[track_caller]
fn assert_ok_header(r: &IoctlResult, what: &str) {
    assert_ok(r, what);
    assert_eq!(r.bytes.len(), DM_IOCTL_MIN_SIZE, "{what}: header-only reply length");
    assert_eq!(r.header().data_size as usize, DM_IOCTL_MIN_SIZE, "{what}: data_size");
}

/// A fresh connection still gets DM_VERSION answered.
#[track_caller]
fn assert_serves(d: &Daemon, after: &str) {
    let mut c = Client::connect(&d.socket)
        .unwrap_or_else(|e| panic!("after {after}: the daemon no longer accepts connections: {e}"));
    let r = c
        .run(&IoctlBuf::new(DmCmd::Version))
        .unwrap_or_else(|e| panic!("after {after}: DM_VERSION on a new connection failed: {e}"));
    assert_eq!((r.ret, r.errno, r.bytes), (0, 0, version_bytes()), "after {after}: DM_VERSION");
}

fn create(c: &mut Client, name: &str) -> IoctlResult {
    run(c, &IoctlBuf::new(DmCmd::DevCreate).name(name))
}

fn status(c: &mut Client, name: &str) -> IoctlResult {
    run(c, &IoctlBuf::new(DmCmd::DevStatus).name(name))
}

#[track_caller]
fn must_create(c: &mut Client, name: &str) -> DmIoctl {
    let r = create(c, name);
    assert_ok_header(&r, &format!("create {name}"));
    r.header()
}

#[track_caller]
fn must_exist(c: &mut Client, name: &str) -> DmIoctl {
    let r = status(c, name);
    assert_ok_header(&r, &format!("status of {name}"));
    r.header()
}

#[track_caller]
fn must_not_exist(c: &mut Client, name: &str) {
    assert_err(&status(c, name), ENXIO, &format!("status of {name} (must not exist)"));
}

/// The target count of `name`'s inactive table (0 when it has none).
#[track_caller]
fn inactive_targets(c: &mut Client, name: &str) -> u32 {
    let b = IoctlBuf::new(DmCmd::TableStatus).name(name).flags(DmFlags::QUERY_INACTIVE_TABLE | DmFlags::STATUS_TABLE);
    let r = run(c, &b);
    assert_ok(&r, &format!("inactive table of {name}"));
    let h = r.header();
    if h.flags().contains(DmFlags::INACTIVE_PRESENT) {
        h.target_count
    } else {
        0
    }
}

/// The end of every test: a new connection is served and the real dmsetup, through the shim,
/// lists exactly `names`.
#[track_caller]
fn finish(d: &Daemon, names: &[&str]) {
    assert_serves(d, "the test");
    let out = d.dmsetup(&["ls"]);
    let ls = out.ok();
    let mut listed: Vec<&str> =
        ls.lines().filter(|l| !l.starts_with("No devices found")).filter_map(|l| l.split_whitespace().next()).collect();
    listed.sort_unstable();
    let mut want = names.to_vec();
    want.sort_unstable();
    assert_eq!(listed, want, "dmsetup ls:\n{ls}");
}

// ------------------------------------------------------------------------------------------------
// §2.1 step 2–5: type byte, version, data_size
// ------------------------------------------------------------------------------------------------

/// A buffer too short to hold `version` and `data_size`: EFAULT. Shorter than `version` nothing is
/// written back; with `version` readable the kernel has already written its own back (§2.1 step 3).
#[test]
fn buffer_shorter_than_16_bytes_faults() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "keep");
    for b in [
        IoctlBuf::new(DmCmd::DevStatus).name("keep"),
        one_target_load("keep"),
        IoctlBuf::new(DmCmd::ListDevices),
        IoctlBuf::new(DmCmd::DevCreate).name("new"),
        IoctlBuf::new(DmCmd::DevRemove).name("keep"),
    ] {
        let full = b.bytes();
        for n in 0..HEADER_PREFIX {
            let what = format!("{} with a {n}-byte buffer", b.cmd);
            let r = send(&mut c, b.cmd.request(), &full[..n]);
            if n < DM_VERSION_BYTES {
                assert_err_unwritten(&r, EFAULT, &what);
            } else {
                assert_err(&r, EFAULT, &what);
            }
            assert_serves(&d, &what);
        }
    }
    // DM_VERSION stops after the version check: 12 bytes are enough, fewer fault.
    let v = IoctlBuf::new(DmCmd::Version).bytes();
    let r = send(&mut c, DmCmd::Version.request(), &v[..DM_VERSION_BYTES]);
    assert_eq!((r.ret, r.errno, r.bytes), (0, 0, version_bytes()), "DM_VERSION with 12 bytes");
    let r = send(&mut c, DmCmd::Version.request(), &v[..DM_VERSION_BYTES - 1]);
    assert_err_unwritten(&r, EFAULT, "DM_VERSION with 11 bytes");
    must_exist(&mut c, "keep");
    must_not_exist(&mut c, "new");
    finish(&d, &["keep"]);
}

/// `data_size` < 305 is EINVAL for every command but DM_VERSION, whether the caller sent only the
/// `data_size` bytes it claims (what the shim does) or a whole header.
#[test]
fn data_size_below_the_header_is_einval() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "keep");
    let cmds = [
        IoctlBuf::new(DmCmd::DevStatus).name("keep"),
        IoctlBuf::new(DmCmd::DevCreate).name("tiny"),
        IoctlBuf::new(DmCmd::DevRemove).name("keep"),
        one_target_load("keep"),
        IoctlBuf::new(DmCmd::ListDevices),
        IoctlBuf::new(DmCmd::TableStatus).name("keep"),
        IoctlBuf::new(DmCmd::DevRename).name("keep").string("renamed"),
    ];
    for b in &cmds {
        for ds in [0, 1, HEADER_PREFIX, 100, DM_IOCTL_MIN_SIZE - 1] {
            let mut full = b.bytes();
            edit_header(&mut full, |h| h.data_size = ds as u32);
            for sent in [ds.max(HEADER_PREFIX), full.len()] {
                let what = format!("{} with data_size {ds}, {sent} bytes sent", b.cmd);
                assert_err(&send(&mut c, b.cmd.request(), &full[..sent]), EINVAL, &what);
                assert_serves(&d, &what);
            }
        }
    }
    must_exist(&mut c, "keep");
    must_not_exist(&mut c, "tiny");
    must_not_exist(&mut c, "renamed");
    assert_eq!(inactive_targets(&mut c, "keep"), 0, "no table was loaded");
    // The boundary: exactly 305 bytes is a whole header.
    let mut b = IoctlBuf::new(DmCmd::DevCreate).name("tiny").bytes();
    b.truncate(DM_IOCTL_MIN_SIZE);
    edit_header(&mut b, |h| h.data_size = DM_IOCTL_MIN_SIZE as u32);
    assert_ok_header(&send(&mut c, DmCmd::DevCreate.request(), &b), "create with data_size 305");
    finish(&d, &["keep", "tiny"]);
}

/// A `data_size` larger than the bytes actually sent: the kernel's copy_from_user fails (EFAULT)
/// and nothing happens. The no-params commands read only the 305-byte header, so for them a lying
/// `data_size` is harmless — unless even the header is short (§2.1 step 5).
#[test]
fn data_size_larger_than_the_buffer_faults() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "keep");
    let msg = {
        let mut m = target_msg(0, b"@cancel_deferred_remove");
        m.push(0);
        m
    };
    let with_params = [
        one_target_load("keep"),
        three_target_load("keep"),
        IoctlBuf::new(DmCmd::DevRename).name("keep").string("renamed"),
        IoctlBuf { payload: msg, ..IoctlBuf::new(DmCmd::TargetMsg).name("keep") },
        IoctlBuf::new(DmCmd::DevSetGeometry).name("keep").string("1 1 1 0"),
        IoctlBuf::new(DmCmd::ListDevices),
        IoctlBuf::new(DmCmd::ListVersions),
        IoctlBuf::new(DmCmd::TableStatus).name("keep"),
        IoctlBuf::new(DmCmd::TableDeps).name("keep"),
        IoctlBuf::new(DmCmd::GetTargetVersion).name("zero"),
    ];
    for b in &with_params {
        let full = b.bytes();
        let real = DM_IOCTL_SIZE + b.payload.len();
        for (claim, sent) in [
            (full.len(), real),
            (full.len(), full.len() - 1),
            (real + 1, real),
            (DM_MAX_DATA_SIZE as usize, real),
            (DM_IOCTL_MIN_SIZE, DM_IOCTL_MIN_SIZE - 1),
        ] {
            if claim <= sent {
                continue; // an exact-size buffer: nothing is missing
            }
            let mut buf = full.clone();
            buf.resize(buf.len().max(claim.min(1 << 20)), 0);
            edit_header(&mut buf, |h| h.data_size = claim as u32);
            let what = format!("{} claiming {claim} bytes, sending {sent}", b.cmd);
            assert_err(&send(&mut c, b.cmd.request(), &buf[..sent]), EFAULT, &what);
            assert_serves(&d, &what);
        }
    }
    must_exist(&mut c, "keep");
    must_not_exist(&mut c, "renamed");
    assert_eq!(inactive_targets(&mut c, "keep"), 0, "no table was loaded");

    // No-params commands: the header alone must be there.
    for b in [IoctlBuf::new(DmCmd::DevStatus).name("keep"), IoctlBuf::new(DmCmd::DevCreate).name("short")] {
        let mut buf = b.bytes();
        buf.truncate(DM_IOCTL_MIN_SIZE - 1);
        let what = format!("{} with a {}-byte header", b.cmd, buf.len());
        assert_err(&send(&mut c, b.cmd.request(), &buf), EFAULT, &what);
        assert_serves(&d, &what);
    }
    must_not_exist(&mut c, "short");
    // ... and a lying data_size is then ignored.
    for claim in [16 * 1024, DM_MAX_DATA_SIZE as usize] {
        let mut buf = IoctlBuf::new(DmCmd::DevStatus).name("keep").bytes();
        buf.truncate(DM_IOCTL_MIN_SIZE);
        edit_header(&mut buf, |h| h.data_size = claim as u32);
        let r = send(&mut c, DmCmd::DevStatus.request(), &buf);
        assert_ok_header(&r, &format!("DM_DEV_STATUS claiming {claim} bytes, sending 305"));
    }
    let mut buf = IoctlBuf::new(DmCmd::DevCreate).name("liar").bytes();
    buf.truncate(DM_IOCTL_MIN_SIZE);
    edit_header(&mut buf, |h| h.data_size = 16 * 1024);
    assert_ok_header(&send(&mut c, DmCmd::DevCreate.request(), &buf), "create claiming 16 KiB");
    finish(&d, &["keep", "liar"]);
}

/// `data_size` > 1 GiB (DM_MAX_TARGETS × DM_MAX_TARGET_PARAMS) is EINVAL; the shim sends such a
/// request as the bare 312-byte header (docs/control-socket.md). DM_VERSION does not look at it.
#[test]
fn data_size_over_one_gib_is_einval() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "keep");
    for b in [
        IoctlBuf::new(DmCmd::DevStatus).name("keep"),
        IoctlBuf::new(DmCmd::DevCreate).name("huge"),
        IoctlBuf::new(DmCmd::RemoveAll),
        one_target_load("keep"),
        IoctlBuf::new(DmCmd::ListDevices),
        IoctlBuf::new(DmCmd::DevRename).name("keep").string("renamed"),
    ] {
        for claim in [DM_MAX_DATA_SIZE + 1, DM_MAX_DATA_SIZE + 8, 0x8000_0000, u32::MAX] {
            let mut buf = b.bytes();
            buf.resize(DM_IOCTL_SIZE.max(DM_IOCTL_SIZE + b.payload.len()), 0);
            edit_header(&mut buf, |h| h.data_size = claim);
            for sent in [DM_IOCTL_SIZE, buf.len()] {
                let what = format!("{} with data_size {claim:#x}, {sent} bytes sent", b.cmd);
                assert_err(&send(&mut c, b.cmd.request(), &buf[..sent]), EINVAL, &what);
                assert_serves(&d, &what);
            }
        }
    }
    let mut v = IoctlBuf::new(DmCmd::Version).bytes();
    edit_header(&mut v, |h| h.data_size = u32::MAX);
    let r = send(&mut c, DmCmd::Version.request(), &v[..DM_IOCTL_SIZE]);
    assert_eq!((r.ret, r.errno, r.bytes), (0, 0, version_bytes()), "DM_VERSION ignores data_size");
    must_exist(&mut c, "keep");
    must_not_exist(&mut c, "huge");
    must_not_exist(&mut c, "renamed");
    assert_eq!(inactive_targets(&mut c, "keep"), 0, "no table was loaded");
    finish(&d, &["keep"]);
}

/// `version[0] != 4` or `version[1]` newer than the daemon's minor: EINVAL, and the daemon's own
/// version is written back regardless (§2.1 step 3). The patchlevel is ignored; older minors are
/// fine. The check comes before everything else, so nothing is done.
#[test]
fn wrong_interface_version_is_einval_with_version_written_back() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "keep");
    let bad: [[u32; 3]; 7] = [
        [DM_VERSION_MAJOR - 1, 0, 0],
        [DM_VERSION_MAJOR + 1, 0, 0],
        [0, 0, 0],
        [u32::MAX, DM_VERSION_MINOR, 0],
        [DM_VERSION_MAJOR, DM_VERSION_MINOR + 1, 0],
        [DM_VERSION_MAJOR, u32::MAX, 0],
        [DM_VERSION_MAJOR + 1, DM_VERSION_MINOR + 1, u32::MAX],
    ];
    let cmds = [
        IoctlBuf::new(DmCmd::Version),
        IoctlBuf::new(DmCmd::DevCreate).name("v"),
        IoctlBuf::new(DmCmd::DevStatus).name("keep"),
        IoctlBuf::new(DmCmd::DevRemove).name("keep"),
        one_target_load("keep"),
        IoctlBuf::new(DmCmd::ListDevices),
        IoctlBuf::new(DmCmd::RemoveAll),
    ];
    for v in bad {
        for b in &cmds {
            let mut buf = b.bytes();
            edit_header(&mut buf, |h| h.version = v);
            let what = format!("{} with version {v:?}", b.cmd);
            assert_err(&send(&mut c, b.cmd.request(), &buf), EINVAL, &what);
            // Only the version is needed to fail this way.
            let what = format!("{} with version {v:?} in a 12-byte buffer", b.cmd);
            assert_err(&send(&mut c, b.cmd.request(), &buf[..DM_VERSION_BYTES]), EINVAL, &what);
            assert_serves(&d, &what);
        }
    }
    must_exist(&mut c, "keep");
    must_not_exist(&mut c, "v");
    assert_eq!(inactive_targets(&mut c, "keep"), 0, "no table was loaded");
    // Accepted: older minors, any patchlevel.
    for v in [[DM_VERSION_MAJOR, 0, 0], [DM_VERSION_MAJOR, DM_VERSION_MINOR, u32::MAX], [DM_VERSION_MAJOR, 6, 7]] {
        let mut buf = IoctlBuf::new(DmCmd::Version).bytes();
        edit_header(&mut buf, |h| h.version = v);
        let r = send(&mut c, DmCmd::Version.request(), &buf);
        assert_eq!((r.ret, r.errno, r.bytes), (0, 0, version_bytes()), "DM_VERSION with {v:?}");
    }
    finish(&d, &["keep"]);
}

/// `_IOC_TYPE != 0xfd`: ENOTTY before anything is read or written. `_IOC_NR` ≥ 18 (18 is the
/// multipath block-device ioctl): ENOTTY after the version check, so the version is written back
/// and a bad version still wins with EINVAL (§2.1 steps 2–4). Direction and size bits are ignored.
#[test]
fn bad_ioctl_numbers_are_enotty() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "keep");
    let buf = IoctlBuf::new(DmCmd::DevStatus).name("keep").bytes();
    let mut bad_version = buf.clone();
    edit_header(&mut bad_version, |h| h.version = [DM_VERSION_MAJOR + 1, 0, 0]);
    for ty in [0x00, 0x01, DM_IOCTL_TYPE - 1, DM_IOCTL_TYPE + 1, 0xff, 0x12] {
        for cmd in [DmCmd::Version, DmCmd::DevStatus, DmCmd::TableLoad, DmCmd::RemoveAll] {
            let request = with_type(cmd.request(), ty);
            let what = format!("{cmd} with type byte {ty:#x}");
            assert_err_unwritten(&send(&mut c, request, &buf), ENOTTY, &what);
            let what = format!("{cmd} with type byte {ty:#x} and a bad version");
            assert_err_unwritten(&send(&mut c, request, &bad_version), ENOTTY, &what);
            assert_serves(&d, &what);
        }
    }
    for nr in 18..=u8::MAX {
        let what = format!("command number {nr}");
        assert_err(&send(&mut c, dm_ioctl_request(nr), &buf), ENOTTY, &what);
        let what = format!("command number {nr} with a bad version");
        assert_err(&send(&mut c, dm_ioctl_request(nr), &bad_version), EINVAL, &what);
        assert_serves(&d, &what);
    }
    assert_err(&send(&mut c, DM_MPATH_PROBE_PATHS, &buf), ENOTTY, "DM_MPATH_PROBE_PATHS on the control node");
    // Only type and nr count: `_IO(0xfd, 7)` is DM_DEV_STATUS.
    let plain_io = (u64::from(DM_IOCTL_TYPE) << 8) | u64::from(DmCmd::DevStatus.nr());
    assert_ok_header(&send(&mut c, plain_io, &buf), "DM_DEV_STATUS as _IO(0xfd, 7)");
    must_exist(&mut c, "keep");
    finish(&d, &["keep"]);
}

// ------------------------------------------------------------------------------------------------
// §2.1 step 6, §2.2, §2.4: names and device keys
// ------------------------------------------------------------------------------------------------

/// DM_DEV_CREATE: no name → EINVAL (whatever else is given); names with `/`, `control`, `.`, `..`
/// → EINVAL; a busy persistent minor → ENXIO; taken name or uuid → EBUSY. Giving both name and
/// uuid is how libdm creates devices and is fine; over-long fields are silently truncated.
#[test]
fn create_with_bad_names_and_keys() {
    let d = Daemon::start();
    let mut c = client(&d);
    let keep = must_create(&mut c, "keep");
    let major = d.major();
    let other_dev = DevNum::new(major, 77).huge_encode();
    let nameless = [
        IoctlBuf::new(DmCmd::DevCreate),
        IoctlBuf::new(DmCmd::DevCreate).uuid("only-uuid"),
        {
            let mut b = IoctlBuf::new(DmCmd::DevCreate).uuid("uuid-and-dev");
            b.header.dev = other_dev;
            b
        },
        {
            let mut b = IoctlBuf::new(DmCmd::DevCreate).flags(DmFlags::PERSISTENT_DEV);
            b.header.dev = other_dev;
            b
        },
    ];
    for b in &nameless {
        let h = b.header;
        let what = format!("create without a name (uuid {:?}, dev {:#x})", String::from_utf8_lossy(&h.uuid), h.dev);
        assert_err(&run(&mut c, b), EINVAL, &what);
        assert_serves(&d, &what);
    }
    for name in ["a/b", "/", "/x", "x/", "control", ".", ".."] {
        let what = format!("create {name:?}");
        assert_err(&create(&mut c, name), EINVAL, &what);
        let what = format!("create {name:?} with a uuid");
        assert_err(&run(&mut c, &IoctlBuf::new(DmCmd::DevCreate).name(name).uuid("u-bad")), EINVAL, &what);
        assert_serves(&d, &what);
    }
    // Minor allocation failures are ENXIO, even "in use" (§2.4).
    let mut busy_minor = IoctlBuf::new(DmCmd::DevCreate).name("clash").flags(DmFlags::PERSISTENT_DEV);
    busy_minor.header.dev = keep.dev;
    assert_err(&run(&mut c, &busy_minor), ENXIO, "create with the persistent minor of keep");
    assert_err(&create(&mut c, "keep"), EBUSY, "create keep twice");
    assert_ok_header(
        &run(&mut c, &IoctlBuf::new(DmCmd::DevCreate).name("both").uuid("u-both")),
        "create with name and uuid",
    );
    assert_err(
        &run(&mut c, &IoctlBuf::new(DmCmd::DevCreate).name("other").uuid("u-both")),
        EBUSY,
        "create with a taken uuid",
    );
    for n in ["clash", "other", "control", "only-uuid"] {
        must_not_exist(&mut c, n);
    }
    // An unterminated 128-byte name is cut to 127 characters; a 129-byte uuid to 128.
    let long = "n".repeat(DM_NAME_LEN);
    let long_uuid = "u".repeat(DM_UUID_LEN);
    let r = run(&mut c, &IoctlBuf::new(DmCmd::DevCreate).name(&long).uuid(&long_uuid));
    assert_ok_header(&r, "create with unterminated name and uuid fields");
    let h = must_exist(&mut c, &long[..DM_NAME_LEN - 1]);
    assert_eq!(&h.uuid[..DM_UUID_LEN - 1], &long_uuid.as_bytes()[..DM_UUID_LEN - 1]);
    assert_eq!(h.uuid[DM_UUID_LEN - 1], 0);
    finish(&d, &["keep", "both", &long[..DM_NAME_LEN - 1]]);
}

/// Every command but create/list/remove-all: name and uuid both set → EINVAL (validate_params,
/// before any lookup, so even for a missing device with a broken payload); uuid+dev, name+dev or
/// no key at all → ENXIO (§2.1 step 6, §2.2).
#[test]
fn lookup_key_combinations() {
    let d = Daemon::start();
    let mut c = client(&d);
    assert_ok_header(&run(&mut c, &IoctlBuf::new(DmCmd::DevCreate).name("k").uuid("k-uuid")), "create k");
    let k = must_exist(&mut c, "k");
    let keyed = |cmd: DmCmd| -> IoctlBuf {
        match cmd {
            DmCmd::TableLoad => exact(IoctlBuf::new(cmd).table([(0, 8, "zero", "")])),
            DmCmd::DevRename => IoctlBuf::new(cmd).string("k2"),
            DmCmd::TargetMsg => IoctlBuf::new(cmd).message(0, "@cancel_deferred_remove"),
            DmCmd::DevSetGeometry => IoctlBuf::new(cmd).string("1 1 1 0"),
            _ => IoctlBuf::new(cmd),
        }
    };
    let cmds = [
        DmCmd::DevStatus,
        DmCmd::DevRemove,
        DmCmd::DevSuspend,
        DmCmd::TableLoad,
        DmCmd::TableClear,
        DmCmd::TableStatus,
        DmCmd::TableDeps,
        DmCmd::TargetMsg,
        DmCmd::DevSetGeometry,
        DmCmd::DevRename,
        DmCmd::DevWait,
    ];
    for cmd in cmds {
        // name + uuid: EINVAL, for the right device, a missing one, and with a broken payload.
        for (name, uuid) in [("k", "k-uuid"), ("ghost", "ghost-uuid")] {
            let b = keyed(cmd).name(name).uuid(uuid);
            let what = format!("{cmd} with name {name} and uuid {uuid}");
            assert_err(&run(&mut c, &b), EINVAL, &what);
            let mut broken = b.bytes();
            edit_header(&mut broken, |h| {
                h.data_start = 0;
                h.target_count = 0;
            });
            assert_err(&send(&mut c, cmd.request(), &broken), EINVAL, &format!("{what}, broken payload"));
            assert_serves(&d, &what);
        }
        // DEV_WAIT would block on a found device; the others must all miss.
        let mut combos =
            vec![("uuid+dev", keyed(cmd).uuid("k-uuid")), ("name+dev", keyed(cmd).name("k")), ("no key", keyed(cmd))];
        combos[0].1.header.dev = k.dev;
        combos[1].1.header.dev = k.dev;
        for (what, b) in combos {
            // RENAME finds the device by `name` alone and ignores `dev` (§2.4): name+dev is a
            // valid rename there, not a malformed one.
            if cmd == DmCmd::DevRename && what == "name+dev" {
                continue;
            }
            let what = format!("{cmd} with {what}");
            assert_err(&run(&mut c, &b), ENXIO, &what);
            assert_serves(&d, &what);
        }
    }
    let h = must_exist(&mut c, "k");
    assert_eq!(h.dev, k.dev);
    assert!(!h.flags().contains(DmFlags::SUSPEND), "k was not suspended");
    assert_eq!(inactive_targets(&mut c, "k"), 0, "no table was loaded");
    finish(&d, &["k"]);
}

// ------------------------------------------------------------------------------------------------
// §2.4, §2.5, §2.7: payload offsets and strings
// ------------------------------------------------------------------------------------------------

/// `data_start` outside the buffer or overlapping the header: EINVAL for RENAME, TARGET_MSG and
/// SET_GEOMETRY (which accept ≥ 305) and for TABLE_LOAD (which needs ≥ 312, 8-aligned, and room
/// for a spec plus one parameter byte). Nothing changes; the boundaries are accepted.
#[test]
fn data_start_out_of_range_is_einval() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "ds");
    assert_ok_header(&run(&mut c, &one_target_load("ds")), "first load");

    let rename = exact(IoctlBuf::new(DmCmd::DevRename).name("ds").string("renamed"));
    let msg = exact(IoctlBuf::new(DmCmd::TargetMsg).name("ds").message(0, "hello"));
    let geo = exact(IoctlBuf::new(DmCmd::DevSetGeometry).name("ds").string("1 1 1 0"));
    let load = three_target_load("ds");
    for b in [&rename, &msg, &geo, &load] {
        let len = b.bytes().len();
        let mut starts =
            vec![0, 1, 8, 16, 304, len, len + 1, len + 4096, 0x7fff_ffff, u32::MAX as usize, u32::MAX as usize - 7];
        match b.cmd {
            // Past the end, or the string/struct starts on the last byte(s) only.
            DmCmd::DevRename | DmCmd::DevSetGeometry => starts.push(len - 1),
            DmCmd::TargetMsg => starts.extend([len - 1, len - DM_TARGET_MSG_MESSAGE_OFFSET, len - 4]),
            _ => {
                // Inside the header, misaligned, or no room for a spec and a parameter byte.
                starts.extend([DM_IOCTL_MIN_SIZE, DM_IOCTL_SIZE - 1, DM_IOCTL_SIZE - DM_TARGET_SPEC_ALIGN]);
                starts.extend([DM_IOCTL_SIZE + 1, DM_IOCTL_SIZE + 4, DM_IOCTL_SIZE + 7]);
                starts.extend([len - DM_TARGET_SPEC_SIZE, (len - DM_TARGET_SPEC_SIZE) & !7, len - 1]);
            }
        }
        for start in starts {
            let mut buf = b.bytes();
            edit_header(&mut buf, |h| h.data_start = start as u32);
            let what = format!("{} with data_start {start} in a {len}-byte buffer", b.cmd);
            assert_err(&send(&mut c, b.cmd.request(), &buf), EINVAL, &what);
            assert_serves(&d, &what);
        }
    }
    must_exist(&mut c, "ds");
    must_not_exist(&mut c, "renamed");
    assert_eq!(inactive_targets(&mut c, "ds"), 1, "the previous inactive table is kept");

    // Boundaries: strings may start at 305 (inside dm_ioctl's `data` padding) …
    let r = send(&mut c, DmCmd::DevSetGeometry.request(), &payload_at(&geo, DM_IOCTL_MIN_SIZE, b"1 1 1 0\0", 0));
    assert_eq!((r.ret, r.errno, r.bytes), (0, 0, version_bytes()), "geometry at data_start 305");
    let mut m = target_msg(0, b"hello");
    m.push(0);
    let r = send(&mut c, DmCmd::TargetMsg.request(), &payload_at(&msg, DM_IOCTL_MIN_SIZE, &m, 0));
    // No live table: the kernel's +2 quirk, with only the version copied back (§2.7).
    assert_eq!((r.ret, r.errno, r.bytes), (2, 0, version_bytes()), "message at data_start 305");
    let r = send(&mut c, DmCmd::DevRename.request(), &payload_at(&rename, DM_IOCTL_MIN_SIZE, b"ds2\0", 0));
    assert_ok_header(&r, "rename at data_start 305");
    must_exist(&mut c, "ds2");
    // … a table may start anywhere 8-aligned from 312 on.
    let load2 = three_target_load("ds2");
    let payload = &load2.bytes()[DM_IOCTL_SIZE..];
    let buf = payload_at(&load2, DM_IOCTL_SIZE + DM_TARGET_SPEC_ALIGN * 3, payload, 0);
    assert_ok_header(&send(&mut c, DmCmd::TableLoad.request(), &buf), "load at data_start 336");
    assert_eq!(inactive_targets(&mut c, "ds2"), 3);
    finish(&d, &["ds2"]);
}

/// Strings that run to the end of the buffer without a NUL: EINVAL (the kernel's `invalid_str`
/// and the NUL check of `populate_table`). A NUL in the very last byte is fine.
#[test]
fn unterminated_strings_are_einval() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "s");
    assert_ok_header(&run(&mut c, &one_target_load("s")), "first load");

    // RENAME (name and uuid), SET_GEOMETRY, TARGET_MSG: the payload is the only thing after the
    // header and its NUL is dropped.
    let cases: Vec<(&str, IoctlBuf)> = vec![
        ("rename", exact(IoctlBuf::new(DmCmd::DevRename).name("s").string("renamed"))),
        ("rename uuid", exact(IoctlBuf::new(DmCmd::DevRename).name("s").flags(DmFlags::UUID).string("new-uuid"))),
        ("geometry", exact(IoctlBuf::new(DmCmd::DevSetGeometry).name("s").string("1 1 1 0"))),
        ("message", exact(IoctlBuf::new(DmCmd::TargetMsg).name("s").message(0, "@cancel_deferred_remove"))),
    ];
    for (what, b) in &cases {
        let mut buf = b.bytes();
        assert_eq!(buf.pop(), Some(0), "{what}: the payload ends in its NUL");
        edit_header(&mut buf, |h| h.data_size -= 1);
        assert_err(&send(&mut c, b.cmd.request(), &buf), EINVAL, &format!("unterminated {what}"));
        // A longer run of non-NUL bytes, to the end of a 4 KiB buffer.
        let mut buf = b.bytes();
        let last = buf.len() - 1;
        buf[last] = b'7';
        buf.resize(4096, b'7');
        edit_header(&mut buf, |h| h.data_size = 4096);
        assert_err(&send(&mut c, b.cmd.request(), &buf), EINVAL, &format!("unterminated {what} (4 KiB)"));
        assert_serves(&d, what);
    }
    let h = must_exist(&mut c, "s");
    assert_eq!(h.uuid[0], 0, "no uuid was set");

    // TABLE_LOAD: the parameters of the first, middle and last target; exact buffers, so the
    // string runs into the end.
    let load = three_target_load("s");
    let base = load.bytes();
    let offs = spec_offsets(&base);
    for (i, &at) in offs.iter().enumerate() {
        let end = offs.get(i + 1).copied().unwrap_or(base.len());
        let mut buf = base.clone();
        buf[params_of(at)..end].fill(b'x');
        buf.truncate(end);
        let len = buf.len();
        edit_header(&mut buf, |h| h.data_size = len as u32);
        let what = format!("table load with target {i}'s parameters unterminated");
        assert_err(&send(&mut c, DmCmd::TableLoad.request(), &buf), EINVAL, &what);
        assert_serves(&d, &what);
    }
    // `target_type` without a NUL in its 16 bytes is read on into the parameters: an unknown type.
    let mut buf = base.clone();
    edit_spec(&mut buf, offs[0], |s| s.target_type = *b"zerozerozerozero");
    assert_err(&send(&mut c, DmCmd::TableLoad.request(), &buf), EINVAL, "16-byte target_type");
    assert_eq!(inactive_targets(&mut c, "s"), 1, "the previous inactive table is kept");

    // Boundary: NULs in the very last byte of a buffer whose size is not a multiple of 8.
    let b = IoctlBuf::new(DmCmd::TableLoad).name("s").table([(0, 8, "zero", ""), (8, 8, "error", "a b c")]);
    let mut buf = b.bytes();
    let params = params_of(spec_offsets(&buf)[1]);
    buf.truncate(params + "a b c".len() + 1);
    let len = buf.len();
    edit_header(&mut buf, |h| h.data_size = len as u32);
    assert_ok_header(&send(&mut c, DmCmd::TableLoad.request(), &buf), "params ending on the last byte");
    assert_eq!(inactive_targets(&mut c, "s"), 2);
    let b = exact(IoctlBuf::new(DmCmd::DevSetGeometry).name("s").string("1 1 1 0"));
    let r = run(&mut c, &b);
    assert_eq!((r.ret, r.errno, r.bytes), (0, 0, version_bytes()), "geometry ending on the last byte");
    let r = run(&mut c, &exact(IoctlBuf::new(DmCmd::DevRename).name("s").string("s2")));
    assert_ok_header(&r, "rename ending on the last byte");
    finish(&d, &["s2"]);
}

/// TABLE_LOAD's spec chain (§2.5): `next` is relative to the current spec and must be 8-aligned,
/// clear the previous parameter string (so 0, pointing at itself, or anything earlier loops and is
/// refused) and leave room for a whole spec and a parameter byte. All EINVAL; the previous
/// inactive table survives. The last spec's `next` is never followed.
#[test]
fn table_load_spec_chain_abuse_is_einval() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "nx");
    assert_ok_header(&run(&mut c, &one_target_load("nx")), "first load");
    let load = three_target_load("nx");
    let base = load.bytes();
    let offs = spec_offsets(&base);
    let len = base.len();
    for (i, &at) in offs[..offs.len() - 1].iter().enumerate() {
        let good = spec_at(&base, at).next as usize;
        let back_to_first = (offs[0] as i64 - at as i64) as i32 as u32;
        let to_end = (len - at) as u32;
        let nexts: Vec<(String, u32)> = vec![
            ("0 (itself)".into(), 0),
            ("back to the first spec".into(), back_to_first),
            ("one spec back".into(), (-(DM_TARGET_SPEC_SIZE as i64)) as i32 as u32),
            ("-8".into(), (-8i32) as u32),
            ("8 (inside the spec)".into(), 8),
            ("40 (onto its own parameters)".into(), DM_TARGET_SPEC_SIZE as u32),
            ("misaligned by 1".into(), good as u32 + 1),
            ("misaligned by 4".into(), good as u32 + 4),
            ("misaligned, before the end".into(), good as u32 - 1),
            ("the buffer's end".into(), to_end),
            ("a spec before the end".into(), to_end - DM_TARGET_SPEC_SIZE as u32),
            ("past the end".into(), to_end + 8),
            ("u32::MAX".into(), u32::MAX),
            ("u32::MAX aligned".into(), !7u32),
            ("2 GiB".into(), 0x8000_0000),
        ];
        for (what, next) in nexts {
            let mut buf = base.clone();
            edit_spec(&mut buf, at, |s| s.next = next);
            let what = format!("spec {i}'s next = {what} ({next:#x})");
            assert_err(&send(&mut c, DmCmd::TableLoad.request(), &buf), EINVAL, &what);
            assert_serves(&d, &what);
        }
    }
    // The same in a libdm-style 16 KiB buffer (zeros after the table).
    for (what, next) in [("0", 0u32), ("misaligned", 49), ("u32::MAX", u32::MAX)] {
        let mut buf = three_target_load("nx");
        buf.size = 16 * 1024;
        let mut buf = buf.bytes();
        edit_spec(&mut buf, offs[1], |s| s.next = next);
        let what = format!("16 KiB buffer, spec 1's next = {what}");
        assert_err(&send(&mut c, DmCmd::TableLoad.request(), &buf), EINVAL, &what);
    }
    assert_eq!(inactive_targets(&mut c, "nx"), 1, "the previous inactive table is kept");
    // The last spec's `next` is not followed.
    for next in [0, 1, u32::MAX] {
        let mut buf = base.clone();
        edit_spec(&mut buf, *offs.last().unwrap(), |s| s.next = next);
        assert_ok_header(&send(&mut c, DmCmd::TableLoad.request(), &buf), &format!("last next = {next:#x}"));
    }
    assert_eq!(inactive_targets(&mut c, "nx"), 3);
    finish(&d, &["nx"]);
}

/// `target_count`: 0 → EINVAL, > 1 048 576 → EOVERFLOW (checked before the walk), more than the
/// specs present → EINVAL (the walk runs off the buffer or into zeros).
#[test]
fn table_load_target_count_abuse() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "tc");
    assert_ok_header(&run(&mut c, &one_target_load("tc")), "first load");
    let exact3 = three_target_load("tc");
    let mut slack3 = exact3.clone();
    slack3.size = 16 * 1024;
    for b in [&exact3, &slack3] {
        let base = b.bytes();
        let len = base.len();
        let cases: [(u32, i32); 9] = [
            (0, EINVAL),
            (DM_MAX_TARGETS + 1, EOVERFLOW),
            (DM_MAX_TARGETS + 2, EOVERFLOW),
            (0x8000_0000, EOVERFLOW),
            (u32::MAX, EOVERFLOW),
            (DM_MAX_TARGETS, EINVAL),
            (4, EINVAL),
            (5, EINVAL),
            (1000, EINVAL),
        ];
        for (count, errno) in cases {
            let mut buf = base.clone();
            edit_header(&mut buf, |h| h.target_count = count);
            let what = format!("target_count {count} with 3 specs in a {len}-byte buffer");
            assert_err(&send(&mut c, DmCmd::TableLoad.request(), &buf), errno, &what);
            assert_serves(&d, &what);
        }
    }
    assert_eq!(inactive_targets(&mut c, "tc"), 1, "the previous inactive table is kept");
    // Fewer than present is fine: the rest is ignored.
    for count in [1u32, 2] {
        let mut buf = exact3.bytes();
        edit_header(&mut buf, |h| h.target_count = count);
        assert_ok_header(&send(&mut c, DmCmd::TableLoad.request(), &buf), &format!("target_count {count} of 3"));
        assert_eq!(inactive_targets(&mut c, "tc"), count);
    }
    finish(&d, &["tc"]);
}

/// The kernel finds the device before it parses TABLE_LOAD, TARGET_MSG and SET_GEOMETRY payloads,
/// so a missing device wins with ENXIO over any payload error (§2.4, §2.7). Errors of the generic
/// steps (version, data_size, copy) still come first; RENAME checks its string before the lookup.
#[test]
fn missing_device_wins_over_malformed_payloads() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "real");
    let major = d.major();
    let ghost_dev = DevNum::new(major, 4321).huge_encode();
    type Address = fn(IoctlBuf, u64) -> IoctlBuf;
    let keys: [(&str, Address); 3] = [
        ("name", |b, _| b.name("ghost")),
        ("uuid", |b, _| b.uuid("ghost-uuid")),
        ("dev", |mut b, dev| {
            b.header.dev = dev;
            b
        }),
    ];
    for (key, address) in keys {
        let load = address(three_target_load(""), ghost_dev);
        let base = load.bytes();
        let offs = spec_offsets(&base);
        let mut broken: Vec<(&str, Vec<u8>)> = Vec::new();
        for (what, count) in
            [("target_count 0", 0), ("target_count > max", DM_MAX_TARGETS + 1), ("target_count u32::MAX", u32::MAX)]
        {
            let mut b = base.clone();
            edit_header(&mut b, |h| h.target_count = count);
            broken.push((what, b));
        }
        for (what, start) in
            [("data_start 0", 0u32), ("data_start 305", DM_IOCTL_MIN_SIZE as u32), ("data_start u32::MAX", u32::MAX)]
        {
            let mut b = base.clone();
            edit_header(&mut b, |h| h.data_start = start);
            broken.push((what, b));
        }
        let mut b = base.clone();
        edit_spec(&mut b, offs[0], |s| s.next = 0);
        broken.push(("looping next", b));
        let mut b = base.clone();
        edit_spec(&mut b, offs[0], |s| s.next = 44);
        broken.push(("misaligned next", b));
        let mut b = base.clone();
        let len = b.len();
        b[params_of(offs[2])..len].fill(b'x');
        broken.push(("unterminated params", b));
        let mut b = base.clone();
        edit_spec(&mut b, offs[0], |s| s.length = 0);
        broken.push(("zero-length target", b));
        for (what, buf) in &broken {
            let what = format!("load of a missing device by {key}, {what}");
            assert_err(&send(&mut c, DmCmd::TableLoad.request(), buf), ENXIO, &what);
            assert_serves(&d, &what);
        }

        let msg = exact(address(IoctlBuf::new(DmCmd::TargetMsg).message(0, "hello"), ghost_dev));
        let geo = exact(address(IoctlBuf::new(DmCmd::DevSetGeometry).string("1 1 1 0"), ghost_dev));
        for b in [&msg, &geo] {
            let mut bufs: Vec<(String, Vec<u8>)> = Vec::new();
            for start in [0u32, 304, u32::MAX] {
                let mut buf = b.bytes();
                edit_header(&mut buf, |h| h.data_start = start);
                bufs.push((format!("data_start {start}"), buf));
            }
            let mut buf = b.bytes();
            let last = buf.len() - 1;
            buf[last] = b'x';
            bufs.push(("unterminated".into(), buf));
            if b.cmd == DmCmd::DevSetGeometry {
                let bad = exact(address(IoctlBuf::new(DmCmd::DevSetGeometry).string("99999 1 1 0 junk"), ghost_dev));
                bufs.push(("bad geometry".into(), bad.bytes()));
            } else {
                let empty = exact(address(IoctlBuf::new(DmCmd::TargetMsg).message(0, "   "), ghost_dev));
                bufs.push(("empty message".into(), empty.bytes()));
            }
            for (what, buf) in bufs {
                let what = format!("{} to a missing device by {key}, {what}", b.cmd);
                assert_err(&send(&mut c, b.cmd.request(), &buf), ENXIO, &what);
                assert_serves(&d, &what);
            }
        }

        // Generic steps come first.
        let mut buf = base.clone();
        edit_header(&mut buf, |h| h.target_count = 0);
        let mut bad_version = buf.clone();
        edit_header(&mut bad_version, |h| h.version[1] = DM_VERSION_MINOR + 1);
        assert_err(&send(&mut c, DmCmd::TableLoad.request(), &bad_version), EINVAL, "missing device, bad version");
        let mut small = buf.clone();
        edit_header(&mut small, |h| h.data_size = DM_IOCTL_MIN_SIZE as u32 - 1);
        assert_err(&send(&mut c, DmCmd::TableLoad.request(), &small), EINVAL, "missing device, data_size 304");
        let mut lying = buf.clone();
        edit_header(&mut lying, |h| h.data_size += 8);
        assert_err(&send(&mut c, DmCmd::TableLoad.request(), &lying), EFAULT, "missing device, lying data_size");
    }
    // RENAME validates the new name before looking the old one up: EINVAL.
    let mut buf = exact(IoctlBuf::new(DmCmd::DevRename).name("ghost").string("x")).bytes();
    edit_header(&mut buf, |h| h.data_start = 0);
    assert_err(&send(&mut c, DmCmd::DevRename.request(), &buf), EINVAL, "rename of a missing device, data_start 0");
    let r = run(&mut c, &exact(IoctlBuf::new(DmCmd::DevRename).name("ghost").string("a/b")));
    assert_err(&r, EINVAL, "rename of a missing device to a bad name");
    must_not_exist(&mut c, "ghost");
    finish(&d, &["real"]);
}

/// With DM_SECURE_DATA_FLAG the kernel wipes the caller's buffer right after copying it in, so a
/// failure *after* the copy leaves `param_size` zero bytes (the version included); a failure
/// before it (version, data_size, short copy) leaves only the version (§2.1 step 5).
#[test]
fn secure_data_failures_wipe_exactly_what_was_copied() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "sd");
    let mut load = three_target_load("sd").flags(DmFlags::SECURE_DATA);
    load.size = 1000;
    let base = load.bytes();
    let mut bad = base.clone();
    edit_header(&mut bad, |h| h.target_count = 0);
    let r = send(&mut c, DmCmd::TableLoad.request(), &bad);
    assert_eq!((r.ret, r.errno), (-1, EINVAL));
    assert_eq!(r.bytes, vec![0u8; base.len()], "the whole buffer reads back as zeros");
    let r = run(&mut c, &IoctlBuf::new(DmCmd::DevStatus).name("ghost").flags(DmFlags::SECURE_DATA));
    assert_eq!((r.ret, r.errno), (-1, ENXIO));
    assert_eq!(r.bytes, vec![0u8; DM_IOCTL_MIN_SIZE], "a no-params command copies (and wipes) 305 bytes");
    let mut v = bad.clone();
    edit_header(&mut v, |h| h.version[0] = 0);
    assert_err(&send(&mut c, DmCmd::TableLoad.request(), &v), EINVAL, "secure data, bad version");
    assert_err(&send(&mut c, DmCmd::TableLoad.request(), &bad[..bad.len() - 1]), EFAULT, "secure data, short copy");
    let mut small = bad.clone();
    edit_header(&mut small, |h| h.data_size = 100);
    assert_err(&send(&mut c, DmCmd::TableLoad.request(), &small), EINVAL, "secure data, data_size 100");
    finish(&d, &["sd"]);
}

/// Terminated but wrong payload strings: RENAME's new name/uuid (length, create's name rules),
/// SET_GEOMETRY's four numbers, TARGET_MSG's words (§2.4, §2.7) — EINVAL, nothing changes.
#[test]
fn bad_payload_strings_are_einval() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "p");
    must_create(&mut c, "q");
    let rename = |to: &str| exact(IoctlBuf::new(DmCmd::DevRename).name("p").string(to));
    let long_name = "n".repeat(DM_NAME_LEN);
    for to in ["", "a/b", "/", "control", ".", "..", long_name.as_str()] {
        let what = format!("rename p to {to:?}");
        assert_err(&run(&mut c, &rename(to)), EINVAL, &what);
        assert_serves(&d, &what);
    }
    let long_uuid = "u".repeat(DM_UUID_LEN);
    for to in ["", long_uuid.as_str()] {
        let b = exact(IoctlBuf::new(DmCmd::DevRename).name("p").flags(DmFlags::UUID).string(to));
        assert_err(&run(&mut c, &b), EINVAL, &format!("set p's uuid to {} chars", to.len()));
    }
    // The new name is checked for use before the old one is looked up.
    let b = exact(IoctlBuf::new(DmCmd::DevRename).name("ghost").string("q"));
    assert_err(&run(&mut c, &b), EBUSY, "rename a missing device to a taken name");
    let h = must_exist(&mut c, "p");
    assert_eq!(h.uuid[0], 0, "no uuid was set");

    let geo = |g: &str| exact(IoctlBuf::new(DmCmd::DevSetGeometry).name("p").string(g));
    let bad_geometry = [
        "",
        "1 1 1",
        "1 1 1 0 0",
        "1 1 1 0 ",
        "1 1 1 0x",
        "-1 1 1 0",
        "+1 1 1 0",
        "a b c d",
        "1,1,1,0",
        "65536 1 1 0",
        "1 256 1 0",
        "1 1 256 0",
        "2 2 2 9",
    ];
    for g in bad_geometry {
        let what = format!("geometry {g:?}");
        assert_err(&run(&mut c, &geo(g)), EINVAL, &what);
        assert_serves(&d, &what);
    }
    for g in [" 1 1 1 0", "65535 255 255 0", "2 2 2 8", "\t3 3 3 27"] {
        let r = run(&mut c, &geo(g));
        assert_eq!((r.ret, r.errno, r.bytes), (0, 0, version_bytes()), "geometry {g:?}");
    }

    let msg = |m: &str| exact(IoctlBuf::new(DmCmd::TargetMsg).name("p").message(0, m));
    for m in ["", "   ", "\t\n", "@bogus", "@cancel_deferred_remove extra"] {
        let what = format!("message {m:?}");
        assert_err(&run(&mut c, &msg(m)), EINVAL, &what);
        assert_serves(&d, &what);
    }
    assert_ok_header(&run(&mut c, &msg("@cancel_deferred_remove")), "@cancel_deferred_remove");
    // With a live zero table: no message handler, and a sector beyond the device.
    assert_ok_header(&run(&mut c, &one_target_load("p")), "load p");
    assert_ok_header(&run(&mut c, &IoctlBuf::new(DmCmd::DevSuspend).name("p")), "resume p");
    assert_err(&run(&mut c, &msg("hello")), EINVAL, "message to a zero target");
    let b = exact(IoctlBuf::new(DmCmd::TargetMsg).name("p").message(8, "hello"));
    assert_err(&run(&mut c, &b), EINVAL, "message beyond the device");
    finish(&d, &["p", "q"]);
}

// ------------------------------------------------------------------------------------------------
// Framing abuse (docs/control-socket.md "Bounds")
// ------------------------------------------------------------------------------------------------

fn raw_header(magic: u32, kind: u16, flags: u16, len: u32) -> Vec<u8> {
    FrameHeader { magic, kind, flags, len, aux: 0 }.encode().to_vec()
}

/// A well-formed IOCTL frame.
fn ioctl_frame(request: u64, buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::write_frame(&mut out, Kind::Ioctl, &[&request.to_le_bytes(), buf]).unwrap();
    out
}

/// Waits (up to a generous bound; nothing is asserted about time) for `pred` on the log text
/// written since `from`, and returns that text.
fn wait_for_log(d: &Daemon, from: usize, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = d.log();
        let new = log.get(from..).unwrap_or_default().to_owned();
        if pred(&new) || Instant::now() > deadline {
            return new;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn warned_closed(log: &str) -> bool {
    log.lines().any(|l| l.contains("WARN") && l.to_lowercase().contains("clos"))
}

/// Reads until the daemon closes the connection; panics if it answers or hangs.
#[track_caller]
fn expect_closed_by_daemon(s: &mut UnixStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: the daemon answered {n} bytes ({:?}) instead of closing", &buf[..n]),
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        Err(e) => panic!("{what}: the connection was not closed: {e}"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Closes {
    /// The daemon must close the connection.
    Daemon,
    /// The client goes away by itself (after `act`).
    Client,
}

/// What the daemon logged while one abuse was handled, checked at the very end of a test (so a
/// missing warning is reported only after everything else held).
struct Logged {
    what: String,
    log: String,
}

impl Logged {
    #[track_caller]
    fn assert_warned(&self) {
        assert!(
            warned_closed(&self.log),
            "{}: no warning about the closed connection in the daemon log; log while it was handled:\n{}",
            self.what,
            self.log
        );
    }
}

/// Runs one abuse on its own connection of a fresh daemon: a connection opened before it and a
/// device created before it must be unaffected and a new connection must be served. Returns the
/// daemon, the earlier connection and what was logged (which must carry a warning about the
/// closed connection: [`Logged::assert_warned`]); devices "keep" and "after" exist.
#[must_use]
fn abuse(what: &str, closes: Closes, act: impl FnOnce(&Daemon, &mut UnixStream)) -> (Daemon, Client, Logged) {
    let d = Daemon::start();
    let mut pre = client(&d);
    must_create(&mut pre, "keep");
    assert_ok(&run(&mut pre, &IoctlBuf::new(DmCmd::Version)), "before");
    let mark = d.log().len();

    let mut s = UnixStream::connect(&d.socket).expect("connect");
    act(&d, &mut s);
    match closes {
        Closes::Daemon => expect_closed_by_daemon(&mut s, what),
        Closes::Client => drop(s),
    }
    let logged = Logged { what: what.to_owned(), log: wait_for_log(&d, mark, warned_closed) };

    // The connection opened before the abuse still works, and so does a new one.
    assert_ok(&run(&mut pre, &IoctlBuf::new(DmCmd::Version)), &format!("{what}: the earlier connection"));
    must_exist(&mut pre, "keep");
    assert_serves(&d, what);
    let mut after = client(&d);
    must_create(&mut after, "after");
    (d, pre, logged)
}

/// [`abuse`], then the end-of-test checks, then the warning.
fn abuse_and_finish(what: &str, closes: Closes, act: impl FnOnce(&Daemon, &mut UnixStream)) {
    let (d, pre, logged) = abuse(what, closes, act);
    drop(pre);
    finish(&d, &["after", "keep"]);
    logged.assert_warned();
}

#[test]
fn frame_with_bad_magic_closes_only_that_connection() {
    for magic in [0, MAGIC.swap_bytes(), MAGIC + 1, u32::MAX] {
        abuse_and_finish(&format!("magic {magic:#x}"), Closes::Daemon, |_, s| {
            s.write_all(&raw_header(magic, Kind::Ioctl as u16, 0, 0)).unwrap();
        });
    }
    // Garbage instead of a header, in the middle of a conversation.
    abuse_and_finish("text after a good request", Closes::Daemon, |_, s| {
        let v = IoctlBuf::new(DmCmd::Version).bytes();
        s.write_all(&ioctl_frame(DmCmd::Version.request(), &v)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        // The good request is answered first.
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let fh = FrameHeader::decode(&h);
        assert_eq!(fh.kind, Kind::IoctlReply as u16);
        let payload = frame::read_payload(s, fh.len).unwrap();
        assert_eq!(payload, frame::status_reply(0, 0, &version_bytes()));
    });
}

#[test]
fn frame_with_nonzero_flags_closes_only_that_connection() {
    for flags in [1, 0x8000, u16::MAX] {
        abuse_and_finish(&format!("flags {flags:#x}"), Closes::Daemon, |_, s| {
            let v = IoctlBuf::new(DmCmd::Version).bytes();
            let mut f = raw_header(MAGIC, Kind::Ioctl as u16, flags, (8 + v.len()) as u32);
            f.extend_from_slice(&DmCmd::Version.request().to_le_bytes());
            f.extend_from_slice(&v);
            s.write_all(&f).unwrap();
        });
    }
}

#[test]
fn frame_with_unknown_kind_closes_only_that_connection() {
    // Kinds that are not client requests per the declared frame table (docs/control-socket.md):
    // unassigned numbers and the daemon→client kinds.
    let candidates = [
        0u16,
        7,
        0x7f,
        0x80,
        Kind::IoctlReply as u16,
        Kind::PlistReply as u16,
        Kind::HelloReply as u16,
        Kind::Event as u16,
        0x1234,
        u16::MAX,
    ];
    let kinds: Vec<u16> =
        candidates.into_iter().filter(|&k| Kind::from_u16(k).and_then(Kind::max_request_len).is_none()).collect();
    assert!(kinds.len() >= 8, "{kinds:?}");
    for kind in kinds {
        abuse_and_finish(&format!("kind {kind:#x}"), Closes::Daemon, |_, s| {
            s.write_all(&raw_header(MAGIC, kind, 0, 0)).unwrap();
        });
    }
}

#[test]
fn ioctl_frame_shorter_than_its_request_number_closes_only_that_connection() {
    for n in 0..size_of::<u64>() {
        abuse_and_finish(&format!("IOCTL payload of {n} bytes"), Closes::Daemon, |_, s| {
            let mut f = raw_header(MAGIC, Kind::Ioctl as u16, 0, n as u32);
            f.extend_from_slice(&DmCmd::Version.request().to_le_bytes()[..n]);
            s.write_all(&f).unwrap();
        });
    }
}

#[test]
fn frame_len_over_the_bound_closes_only_that_connection() {
    let cases = [
        (Kind::Ioctl, u32::MAX),
        (Kind::Ioctl, MAX_IOCTL_PAYLOAD + 1),
        (Kind::Ioctl, 0x8000_0000),
        (Kind::Hello, 1),
        (Kind::Hello, u32::MAX),
        (Kind::Cancel, 1),
        (Kind::BlkRoSet, 9),
    ];
    for (kind, len) in cases {
        abuse_and_finish(&format!("{kind:?} frame with len {len:#x} and no payload"), Closes::Daemon, |_, s| {
            s.write_all(&raw_header(MAGIC, kind as u16, 0, len)).unwrap();
        });
    }
}

#[test]
fn half_a_frame_then_disconnect_closes_only_that_connection() {
    let v = IoctlBuf::new(DmCmd::Version).bytes();
    let whole = ioctl_frame(DmCmd::Version.request(), &v);
    for cut in [1, HEADER_LEN / 2, HEADER_LEN - 1, HEADER_LEN + 4, whole.len() - 1] {
        let part = whole[..cut].to_vec();
        abuse_and_finish(
            &format!("{cut} of {} frame bytes, then disconnect", whole.len()),
            Closes::Client,
            move |_, s| {
                s.write_all(&part).unwrap();
            },
        );
    }
    // A header announcing a large (in-bound) payload, a little of it, then gone.
    abuse_and_finish("a 64 MiB IOCTL frame cut after 100 bytes", Closes::Client, |_, s| {
        let mut f = raw_header(MAGIC, Kind::Ioctl as u16, 0, 64 << 20);
        f.extend_from_slice(&DmCmd::TableLoad.request().to_le_bytes());
        f.extend_from_slice(&[0u8; 92]);
        s.write_all(&f).unwrap();
    });
}

/// Many connections announcing the largest IOCTL frame and then sending (almost) nothing: the
/// daemon must not commit memory for announced lengths (docs/control-socket.md "Bounds"), keeps
/// serving, and warns about each truncated frame when they go.
#[test]
fn many_connections_announcing_huge_frames() {
    let d = Daemon::start();
    let mut pre = client(&d);
    must_create(&mut pre, "keep");
    let mut hogs = Vec::new();
    for i in 0..64u32 {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        let mut f = raw_header(MAGIC, Kind::Ioctl as u16, 0, MAX_IOCTL_PAYLOAD - i);
        f.extend_from_slice(&DmCmd::TableLoad.request().to_le_bytes());
        f.extend_from_slice(&IoctlBuf::new(DmCmd::TableLoad).bytes()[..DM_IOCTL_SIZE]);
        s.write_all(&f).unwrap();
        hogs.push(s);
    }
    assert_serves(&d, "64 connections announcing 1 GiB frames");
    must_exist(&mut pre, "keep");
    let mark = d.log().len();
    drop(hogs);
    let log = wait_for_log(&d, mark, |l| l.lines().filter(|l| l.contains("WARN")).count() >= 64);
    assert!(
        log.lines().filter(|l| l.contains("WARN") && l.to_lowercase().contains("clos")).count() >= 64,
        "one warning per truncated frame; new log:\n{log}"
    );
    assert_ok(&run(&mut pre, &IoctlBuf::new(DmCmd::Version)), "the earlier connection");
    drop(pre);
    finish(&d, &["keep"]);
}

/// Creates "w" with a live table and sends, on `s`, a DM_DEV_WAIT for its next event.
fn start_dev_wait(d: &Daemon, s: &mut UnixStream) {
    let mut c = client(d);
    must_create(&mut c, "w");
    assert_ok_header(&run(&mut c, &one_target_load("w")), "load w");
    assert_ok_header(&run(&mut c, &IoctlBuf::new(DmCmd::DevSuspend).name("w")), "resume w");
    let mut wait = IoctlBuf::new(DmCmd::DevWait).name("w");
    wait.header.event_nr = must_exist(&mut c, "w").event_nr;
    s.write_all(&ioctl_frame(DmCmd::DevWait.request(), &wait.bytes())).unwrap();
}

/// A client blocked in DM_DEV_WAIT disconnects: the wait ends, only that connection goes away,
/// and a later event on the device (rename fires one on the live table) harms nobody.
#[test]
fn dev_wait_client_disconnecting_while_blocked() {
    let (d, mut pre, logged) = abuse("disconnect during DM_DEV_WAIT", Closes::Client, |d, s| {
        start_dev_wait(d, s);
        // The wait is pending: no reply yet. (Whether the daemon has started waiting when the
        // client goes is not asserted; the outcome must be the same.)
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock), "DM_DEV_WAIT answered at once");
        std::thread::sleep(Duration::from_millis(200));
    });
    let before = must_exist(&mut pre, "w").event_nr;
    let r = run(&mut pre, &exact(IoctlBuf::new(DmCmd::DevRename).name("w").string("w2")));
    assert_ok_header(&r, "rename w after its waiter left");
    assert_eq!(must_exist(&mut pre, "w2").event_nr, before.wrapping_add(1), "rename fires a table event");
    assert_serves(&d, "the rename");
    drop(pre);
    finish(&d, &["after", "keep", "w2"]);
    logged.assert_warned();
}

/// A pipelined request while DM_DEV_WAIT is pending (only CANCEL may come then) closes that
/// connection.
#[test]
fn request_while_dev_wait_pending_closes_only_that_connection() {
    let (d, pre, logged) = abuse("HELLO sent while DM_DEV_WAIT is pending", Closes::Daemon, |d, s| {
        start_dev_wait(d, s);
        s.write_all(&raw_header(MAGIC, Kind::Hello as u16, 0, 0)).unwrap();
    });
    drop(pre);
    finish(&d, &["after", "keep", "w"]);
    logged.assert_warned();
}

/// CANCEL interrupts a pending DM_DEV_WAIT: EINTR with the version written back; the connection
/// stays usable.
#[test]
fn dev_wait_cancel_answers_eintr() {
    let d = Daemon::start();
    let mut c = client(&d);
    must_create(&mut c, "w");
    assert_ok_header(&run(&mut c, &one_target_load("w")), "load w");
    assert_ok_header(&run(&mut c, &IoctlBuf::new(DmCmd::DevSuspend).name("w")), "resume w");
    let mut wait = IoctlBuf::new(DmCmd::DevWait).name("w");
    wait.header.event_nr = must_exist(&mut c, "w").event_nr;
    let mut w = client(&d);
    w.stream().write_all(&ioctl_frame(DmCmd::DevWait.request(), &wait.bytes())).unwrap();
    w.stream().write_all(&raw_header(MAGIC, Kind::Cancel as u16, 0, 0)).unwrap();
    // The reply to the wait: read it with the client's own frame reader via a DM_VERSION after it.
    let mut h = [0u8; HEADER_LEN];
    w.stream().set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    loop {
        w.stream().read_exact(&mut h).expect("a reply to the cancelled wait");
        let fh = FrameHeader::decode(&h);
        let payload = frame::read_payload(w.stream(), fh.len).unwrap();
        if fh.kind == Kind::Event as u16 {
            continue;
        }
        assert_eq!(fh.kind, Kind::IoctlReply as u16);
        assert_eq!(payload, frame::status_reply(-1, EINTR, &version_bytes()), "cancelled DM_DEV_WAIT");
        break;
    }
    assert_ok(&run(&mut w, &IoctlBuf::new(DmCmd::Version)), "the cancelled connection");
    finish(&d, &["w"]);
}

/// A client that sends requests but never reads its replies can only stall its own connection:
/// another client's request that raises an event (and so an EVENT frame for every connection)
/// must still be answered.
#[test]
fn client_that_never_reads_does_not_block_others() {
    let d = Daemon::start();
    let mut pre = client(&d);
    must_create(&mut pre, "keep");
    // The hog arms a poll (as multipathd does), so it is owed EVENT frames.
    let mut hog = client(&d);
    assert_ok_header(&run(&mut hog, &IoctlBuf::new(DmCmd::DevArmPoll)), "arm poll");
    let mut hog = hog.stream().try_clone().unwrap();
    hog.set_nonblocking(true).unwrap();
    let one = ioctl_frame(DmCmd::Version.request(), &DM_VERSION.as_bytes()[..DM_VERSION_BYTES]);
    let chunk: Vec<u8> = one.iter().copied().cycle().take(one.len() * 256).collect();
    // Write until the daemon stops reading (it is then blocked writing replies nobody reads).
    let (mut written, mut stalled) = (0usize, 0u32);
    while stalled < 200 && written < (256 << 20) {
        match hog.write(&chunk) {
            Ok(n) => {
                written += n;
                stalled = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                stalled += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("hog: {e}"),
        }
    }
    let mut victim = client(&d);
    victim.stream().set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let r = victim.run(&IoctlBuf::new(DmCmd::DevCreate).name("victim"));
    let r = r
        .unwrap_or_else(|e| panic!("a create on another connection got no reply while one client does not read ({e})"));
    assert_ok_header(&r, "create while another client does not read");
    assert_ok(&run(&mut pre, &IoctlBuf::new(DmCmd::Version)), "the earlier connection");
    drop(hog);
    finish(&d, &["keep", "victim"]);
}

// ------------------------------------------------------------------------------------------------
// Fuzz
// ------------------------------------------------------------------------------------------------

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

/// The bytes the kernel leaves in a failed TABLE_LOAD's buffer (§2.1 steps 3, 5, 9): nothing if
/// `version` is unreadable, else the version, or `data_size` zeros once SECURE_DATA wiped a copied
/// buffer.
fn expected_error_bytes(buf: &[u8]) -> Vec<u8> {
    if buf.len() < DM_VERSION_BYTES {
        return Vec::new();
    }
    let h = header_of(buf);
    let version_ok = h.version[0] == DM_VERSION_MAJOR && h.version[1] <= DM_VERSION_MINOR;
    let size_ok = (DM_IOCTL_MIN_SIZE as u32..=DM_MAX_DATA_SIZE).contains(&h.data_size);
    if version_ok
        && buf.len() >= DM_IOCTL_MIN_SIZE
        && size_ok
        && h.data_size as usize <= buf.len()
        && h.flags().contains(DmFlags::SECURE_DATA)
    {
        vec![0; h.data_size as usize]
    } else {
        version_bytes()
    }
}

/// The errno the generic steps decide, if they fail: (errno, reason).
fn expected_generic_errno(buf: &[u8], target: DevNum) -> Option<(i32, &'static str)> {
    if buf.len() < DM_VERSION_BYTES {
        return Some((EFAULT, "version unreadable"));
    }
    let h = header_of(buf);
    if h.version[0] != DM_VERSION_MAJOR || h.version[1] > DM_VERSION_MINOR {
        return Some((EINVAL, "version"));
    }
    if buf.len() < HEADER_PREFIX {
        return Some((EFAULT, "data_size unreadable"));
    }
    // The emulation judges `data_size` as soon as it is readable: a caller that claims fewer
    // than 305 bytes is sent as just those (docs/control-socket.md), and gets EINVAL as from the
    // kernel, which would have read the rest of its struct.
    if !(DM_IOCTL_MIN_SIZE as u32..=DM_MAX_DATA_SIZE).contains(&h.data_size) {
        return Some((EINVAL, "data_size out of range"));
    }
    if buf.len() < DM_IOCTL_MIN_SIZE || h.data_size as usize > buf.len() {
        return Some((EFAULT, "data_size beyond the buffer"));
    }
    let cstr = |f: &[u8]| f.iter().position(|&b| b == 0).map_or(f.len(), |n| n);
    let name = &h.name[..cstr(&h.name[..DM_NAME_LEN - 1])];
    let uuid = &h.uuid[..cstr(&h.uuid[..DM_UUID_LEN - 1])];
    let (has_name, has_uuid) = (h.name[0] != 0, h.uuid[0] != 0);
    if has_name && has_uuid {
        return Some((EINVAL, "name and uuid"));
    }
    // The fuzzed device has a name ("fz") and no uuid.
    let found = if !uuid.is_empty() {
        false
    } else if !name.is_empty() {
        h.dev == 0 && name == b"fz"
    } else {
        h.dev != 0 && DevNum::huge_decode(h.dev) == target
    };
    if !found {
        return Some((ENXIO, "lookup"));
    }
    if h.target_count > DM_MAX_TARGETS {
        return Some((EOVERFLOW, "target_count"));
    }
    if h.target_count == 0 {
        return Some((EINVAL, "no targets"));
    }
    None
}

/// A few thousand random mutations of a valid TABLE_LOAD sent to the live daemon: every reply is
/// well-formed, its errno is the one the kernel's generic steps decide (or EINVAL from the table
/// parse), the bytes copied back are what the kernel would leave, and the daemon survives.
#[test]
fn fuzz_table_load_mutations() {
    let d = Daemon::start();
    let back = d.file("back", 64);
    let mut c = client(&d);
    let fz = must_create(&mut c, "fz");
    let target = DevNum::huge_decode(fz.dev);
    let linear = format!("{back} 8");
    let valid = IoctlBuf::new(DmCmd::TableLoad).name("fz").table([
        (0, 8, "zero", ""),
        (8, 8, "error", "a b c"),
        (16, 16, "linear", linear.as_str()),
        (32, 8, "zero", ""),
    ]);
    let exact_base = exact(valid.clone()).bytes();
    let slack_base = {
        let mut b = valid.clone();
        b.size = 4096;
        b.bytes()
    };
    assert_ok_header(&send(&mut c, DmCmd::TableLoad.request(), &exact_base), "the unmutated load");
    let spec_offs = spec_offsets(&exact_base);

    let header_u32 = [
        offset_of!(DmIoctl, version),
        offset_of!(DmIoctl, version) + 4,
        offset_of!(DmIoctl, version) + 8,
        offset_of!(DmIoctl, data_size),
        offset_of!(DmIoctl, data_start),
        offset_of!(DmIoctl, target_count),
        offset_of!(DmIoctl, flags),
        offset_of!(DmIoctl, event_nr),
        offset_of!(DmIoctl, dev),
        offset_of!(DmIoctl, dev) + 4,
        offset_of!(DmIoctl, name),
        offset_of!(DmIoctl, uuid),
    ];
    let spec_u32 = [
        offset_of!(DmTargetSpec, sector_start),
        offset_of!(DmTargetSpec, sector_start) + 4,
        offset_of!(DmTargetSpec, length),
        offset_of!(DmTargetSpec, length) + 4,
        offset_of!(DmTargetSpec, next),
        offset_of!(DmTargetSpec, target_type),
    ];
    let fz_dev = fz.dev;

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut oks, mut errs) = (0usize, std::collections::BTreeMap::<i32, usize>::new());
    const ITERATIONS: usize = 4000;
    for iter in 0..ITERATIONS {
        let mut buf = if rng.below(4) == 0 { slack_base.clone() } else { exact_base.clone() };
        let len0 = buf.len();
        let interesting = |rng: &mut Rng, len: usize| -> u32 {
            let xs = [
                0,
                1,
                7,
                8,
                40,
                41,
                48,
                304,
                305,
                311,
                312,
                313,
                320,
                (len as u32).wrapping_sub(1),
                len as u32,
                len as u32 + 1,
                DM_MAX_TARGETS,
                DM_MAX_TARGETS + 1,
                DM_MAX_DATA_SIZE,
                DM_MAX_DATA_SIZE + 1,
                0x7fff_ffff,
                0x8000_0000,
                u32::MAX - 7,
                u32::MAX,
                rng.next() as u32,
                (rng.next() % 64) as u32 * 8,
            ];
            rng.pick(&xs)
        };
        for _ in 0..1 + rng.below(4) {
            let len = buf.len();
            match rng.below(10) {
                0 | 1 => {
                    if len > 0 {
                        let i = rng.below(len);
                        buf[i] ^= 1 << rng.below(8);
                    }
                }
                2 => {
                    if len > 0 {
                        let i = rng.below(len);
                        let random = rng.next() as u8;
                        buf[i] = rng.pick(&[0u8, 0xff, b'x', b'/', b' ', random]);
                    }
                }
                3 | 4 => {
                    let off = rng.pick(&header_u32);
                    let v = interesting(&mut rng, len);
                    if off + 4 <= len {
                        buf[off..off + 4].copy_from_slice(&v.to_ne_bytes());
                    }
                }
                5 | 6 => {
                    let at = rng.pick(&spec_offs) + rng.pick(&spec_u32);
                    let v = interesting(&mut rng, len);
                    if at + 4 <= len {
                        buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
                    }
                }
                7 => {
                    // Kill a NUL (a terminator or padding).
                    let zeros: Vec<usize> = (DM_IOCTL_SIZE..len).filter(|&i| buf[i] == 0).collect();
                    if !zeros.is_empty() {
                        let i = rng.pick(&zeros);
                        buf[i] = b'q';
                    }
                }
                8 => {
                    let n = rng.below(len + 1);
                    buf.truncate(n);
                }
                _ => {
                    let extra = rng.below(200);
                    for _ in 0..extra {
                        buf.push(rng.next() as u8);
                    }
                }
            }
        }
        let what = format!("fuzz iteration {iter} ({} bytes, from {len0})", buf.len());
        let r = c
            .ioctl(DmCmd::TableLoad.request(), &buf)
            .unwrap_or_else(|e| panic!("{what}: no well-formed reply: {e}\nbuffer: {buf:?}"));
        let generic = expected_generic_errno(&buf, target);
        match r.ret {
            0 => {
                assert_eq!(r.errno, 0, "{what}");
                assert!(generic.is_none(), "{what}: succeeded, but the kernel fails it ({generic:?})");
                let sent = header_of(&buf);
                if sent.flags().contains(DmFlags::SECURE_DATA) {
                    // The wiped buffer shows zeros after the 305-byte reply (§2.1 step 5).
                    assert_eq!(r.bytes.len(), sent.data_size as usize, "{what}: wiped buffer length");
                    assert!(r.bytes[DM_IOCTL_MIN_SIZE..].iter().all(|&b| b == 0), "{what}: wiped tail");
                } else {
                    assert_eq!(r.bytes.len(), DM_IOCTL_MIN_SIZE, "{what}: header-only reply");
                }
                let h = r.header();
                assert_eq!(h.version, DM_VERSION, "{what}");
                assert_eq!(h.data_size as usize, DM_IOCTL_MIN_SIZE, "{what}");
                assert!(h.flags().contains(DmFlags::INACTIVE_PRESENT), "{what}: INACTIVE_PRESENT");
                assert_eq!(h.dev, fz_dev, "{what}: dev");
                assert_eq!(&h.name[..3], b"fz\0", "{what}: name");
                oks += 1;
            }
            -1 => {
                let want = generic.map_or(EINVAL, |(e, _)| e);
                assert_eq!(r.errno, want, "{what}: errno (generic step: {generic:?})\nbuffer: {buf:?}");
                assert_eq!(r.bytes, expected_error_bytes(&buf), "{what}: bytes copied back");
                *errs.entry(r.errno).or_default() += 1;
            }
            other => panic!("{what}: ioctl returned {other}"),
        }
        if iter % 250 == 249 {
            assert_serves(&d, &what);
            must_exist(&mut c, "fz");
        }
    }
    eprintln!("fuzz: {oks} loads accepted, errors {errs:?}");
    // The loop must exercise both outcomes and several errnos, or it tests nothing.
    assert!(oks > 0 && errs.len() >= 4, "fuzz coverage: {oks} ok, {errs:?}");
    must_exist(&mut c, "fz");
    let out = d.dmsetup(&["info", "fz"]);
    assert!(out.ok().contains("fz"), "{out:?}");
    finish(&d, &["fz"]);
}

#[test]
fn blkroset_frames_with_a_bad_payload_or_device_get_errnos() {
    let d = Daemon::start();
    let mut s = UnixStream::connect(&d.socket).unwrap();
    let mut call = |payload: &[u8]| -> (u16, i32, i32) {
        let mut f = raw_header(MAGIC, Kind::BlkRoSet as u16, 0, payload.len() as u32);
        f.extend_from_slice(payload);
        s.write_all(&f).unwrap();
        let mut h = [0u8; HEADER_LEN + 8];
        s.read_exact(&mut h).unwrap();
        let word = |i: usize| i32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        (u16::from_le_bytes([h[4], h[5]]), word(16), word(20))
    };
    let reply = Kind::BlkRoSetReply as u16;
    assert_eq!(call(&[1, 2, 3]), (reply, -1, EINVAL), "short payload");
    assert_eq!(call(&[]), (reply, -1, EINVAL), "empty payload");
    let mut p = 999u32.to_le_bytes().to_vec();
    p.extend_from_slice(&1i32.to_le_bytes());
    assert_eq!(call(&p), (reply, -1, ENXIO), "no such device");
    assert_serves(&d, "BLKROSET frames");
}
