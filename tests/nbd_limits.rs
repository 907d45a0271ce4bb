//! The NBD server's limits against clients that misbehave (issue 11): a client that never reads
//! its replies, more connections than the daemon has descriptors for, the socket's mode under a
//! permissive umask, stale and live sockets at start, and draining the server on shutdown.
//! Raw protocol clients written from the protocol document (NetworkBlockDevice/nbd
//! `doc/proto.md`), real clients (nbdinfo, nbdcopy) for the well-behaved side.

mod common;

use common::Daemon;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// Fixed newstyle handshake and NBD_OPT_GO without structured replies: replies are simple.
fn go(sock: &Path, name: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    // Only against hangs: nothing here asserts on time.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut h = [0u8; 18];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be64(&h), NBDMAGIC);
    assert_eq!(be64(&h[8..]), IHAVEOPT);
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(d.len() as u32).to_be_bytes());
    m.extend_from_slice(&d);
    s.write_all(&m).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h), REPLY_MAGIC);
        let mut d = vec![0u8; be32(&h[16..]) as usize];
        s.read_exact(&mut d).unwrap();
        match be32(&h[12..]) {
            REP_INFO => {}
            REP_ACK => return s,
            t => panic!("NBD_OPT_GO {name}: reply {t:#x}"),
        }
    }
}

fn request(typ: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut m = [0u8; 28];
    m[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m[6..8].copy_from_slice(&typ.to_be_bytes());
    m[8..16].copy_from_slice(&cookie.to_be_bytes());
    m[16..24].copy_from_slice(&offset.to_be_bytes());
    m[24..28].copy_from_slice(&len.to_be_bytes());
    m
}

/// A simple reply's header: (error, cookie).
fn reply_header(s: &mut UnixStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC);
    (be32(&h[4..]), be64(&h[8..]))
}

/// Deterministic bytes (xorshift), different per seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A field of /proc/<pid>/status in KiB (VmRSS, …).
fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in {s}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A device `name` over a file of `data`, in the daemon's dir.
fn device(d: &Daemon, name: &str, data: &[u8]) -> PathBuf {
    let f = d.path(&format!("{name}.img"));
    std::fs::write(&f, data).unwrap();
    let table = format!("0 {} linear {} 0", data.len() / 512, f.display());
    d.dmsetup(&["create", name, "--table", &table]).ok();
    f
}

fn nbd_uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// The whole export, read with nbdcopy (a well-behaved client).
fn nbdcopy_from(d: &Daemon, sock: &Path, name: &str) -> Vec<u8> {
    let out = d.path(&format!("{name}.copy"));
    let _ = std::fs::remove_file(&out);
    d.run("nbdcopy", &[&nbd_uri(sock, name), out.to_str().unwrap()]).ok();
    std::fs::read(out).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Back-pressure.

/// A client sends many 32 MiB reads and reads no reply: the daemon stops reading it at its
/// per-connection bound (256 MiB of requests whose replies are not yet written) instead of
/// buffering every reply. Then the client reads all the replies, which are right, and the
/// daemon serves others.
#[test]
fn a_client_that_reads_no_replies_holds_the_daemon_at_its_bound() {
    let d = Daemon::start();
    let data = pattern(11, 64 * MIB);
    device(&d, "big", &data);
    let rss_before = status_kib(d.pid(), "VmRSS");

    const N: u64 = 48; // 1.5 GiB of replies.
    const LEN: usize = 32 * MIB;
    let offset = |i: u64| (i % 33) * MIB as u64;
    let mut s = go(&d.nbd_socket(), "big");
    let mut tx = s.try_clone().unwrap();
    // A thread sends: were the daemon to stop reading before it took all 48 headers, the
    // sender would block until the replies below are read.
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            tx.write_all(&request(CMD_READ, i, offset(i), LEN as u32)).unwrap();
        }
    });
    // Unbounded, the daemon would hold 1.5 GiB of replies within a second or so: watch it for
    // a while. Bounded, it never gets past the bound plus its buffer pool, whatever the timing.
    let mut peak = 0;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_millis(1500) {
        peak = peak.max(status_kib(d.pid(), "VmRSS"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let grown = peak.saturating_sub(rss_before) / 1024;
    assert!(grown < 400, "daemon RSS grew by {grown} MiB with nobody reading the replies");

    // Every reply, right.
    let mut seen = vec![false; N as usize];
    let mut buf = vec![0u8; LEN];
    for _ in 0..N {
        let (err, cookie) = reply_header(&mut s);
        assert_eq!(err, 0, "read {cookie}");
        assert!(!std::mem::replace(&mut seen[cookie as usize], true), "reply {cookie} twice");
        s.read_exact(&mut buf).unwrap();
        let o = offset(cookie) as usize;
        assert!(buf == data[o..o + LEN], "data of read {cookie}");
    }
    sender.join().unwrap();
    drop(s);

    // Others are served, and so is a new connection of the same client.
    assert!(nbdcopy_from(&d, &d.nbd_socket(), "big") == data);
    let mut s = go(&d.nbd_socket(), "big");
    s.write_all(&request(CMD_READ, 7, 4096, 4096)).unwrap();
    assert_eq!(reply_header(&mut s), (0, 7));
    let mut b = vec![0u8; 4096];
    s.read_exact(&mut b).unwrap();
    assert!(b == data[4096..8192]);
}
