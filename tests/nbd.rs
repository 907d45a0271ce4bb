//! The NBD front end against real clients (qemu-io from qemu-utils; nbdcopy and nbdinfo from
//! libnbd-bin) and a raw protocol client: bytes land at the right offsets of the right backing
//! files; suspend/reload/resume under a write stream; read-only and error tables; bad input.

mod common;

use common::Daemon;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

// ---------------------------------------------------------------------------------------------
// A minimal NBD client, written from the protocol document, for the cases real clients never
// produce.

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_META_CONTEXT: u32 = 4;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const FLAG_REQ_ONE: u16 = 8;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const FLAG_FUA: u16 = 1;
const FLAG_NO_HOLE: u16 = 2;
const TF_READ_ONLY: u16 = 1 << 1;
const TF_CAN_MULTI_CONN: u16 = 1 << 8;
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

use common::{be32, be64};
fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

/// A connection in option haggling.
struct Haggle {
    s: UnixStream,
}

impl Haggle {
    fn connect(sock: &Path) -> Haggle {
        let mut s = UnixStream::connect(sock).unwrap();
        // Only against hangs: nothing here asserts on time.
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut h = [0u8; 18];
        s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h[0..]), NBDMAGIC);
        assert_eq!(be64(&h[8..]), IHAVEOPT);
        assert_eq!(be16(&h[16..]), 0b11, "FIXED_NEWSTYLE | NO_ZEROES");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Haggle { s }
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// One option reply: (reply type, data).
    fn reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h), REPLY_MAGIC);
        assert_eq!(be32(&h[8..]), opt);
        let mut d = vec![0u8; be32(&h[16..]) as usize];
        self.s.read_exact(&mut d).unwrap();
        (be32(&h[12..]), d)
    }

    fn list(&mut self) -> Vec<String> {
        self.option(OPT_LIST, &[]);
        let mut names = Vec::new();
        loop {
            match self.reply(OPT_LIST) {
                (REP_SERVER, d) => names.push(String::from_utf8(d[4..4 + be32(&d) as usize].to_vec()).unwrap()),
                (REP_ACK, _) => return names,
                (t, _) => panic!("unexpected reply {t:#x} to NBD_OPT_LIST"),
            }
        }
    }

    /// NBD_OPT_GO: the export, or the error reply type.
    fn go(mut self, name: &str, structured: bool) -> Result<Nbd, u32> {
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        let (mut size, mut flags) = (None, 0);
        loop {
            match self.reply(OPT_GO) {
                (REP_INFO, i) if be16(&i) == 0 => {
                    size = Some(be64(&i[2..]));
                    flags = be16(&i[10..]);
                }
                (REP_INFO, _) => {}
                (REP_ACK, _) => break,
                (t, _) => return Err(t),
            }
        }
        Ok(Nbd {
            s: self.s,
            structured,
            size: size.expect("NBD_INFO_EXPORT before ACK"),
            flags,
            cookie: 0,
            reads: HashMap::new(),
        })
    }
}

/// A connection in transmission.
struct Nbd {
    s: UnixStream,
    structured: bool,
    size: u64,
    flags: u16,
    cookie: u64,
    /// Read lengths of requests in flight, by cookie (a simple reply's payload length is known
    /// only from its request).
    reads: HashMap<u64, u32>,
}

fn open(d: &Daemon, name: &str) -> Nbd {
    Haggle::connect(&d.nbd_socket()).go(name, false).unwrap_or_else(|e| panic!("NBD_OPT_GO {name}: {e:#x}"))
}

impl Nbd {
    /// Sends a request; returns its cookie.
    fn send(&mut self, typ: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        self.cookie += 1;
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&typ.to_be_bytes());
        m.extend_from_slice(&self.cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
        if typ == CMD_READ {
            self.reads.insert(self.cookie, len);
        }
        self.cookie
    }

    /// The next reply: cookie and data, or cookie and error.
    fn recv(&mut self) -> (u64, Result<Vec<u8>, u32>) {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        match be32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                let (err, cookie) = (be32(&h), be64(&h[4..]));
                let len = self.reads.remove(&cookie).unwrap_or(0);
                if err != 0 {
                    return (cookie, Err(err));
                }
                let mut d = vec![0u8; len as usize];
                self.s.read_exact(&mut d).unwrap();
                (cookie, Ok(d))
            }
            STRUCTURED_REPLY_MAGIC => {
                assert!(self.structured, "structured reply without negotiation");
                let mut data = Vec::new();
                let mut error = None;
                loop {
                    let mut h = [0u8; 16];
                    self.s.read_exact(&mut h).unwrap();
                    let (flags, typ, cookie, len) = (be16(&h), be16(&h[2..]), be64(&h[4..]), be32(&h[12..]));
                    let mut p = vec![0u8; len as usize];
                    self.s.read_exact(&mut p).unwrap();
                    match typ {
                        0 => assert_eq!(len, 0),
                        1 => data.extend_from_slice(&p[8..]),
                        // NBD_REPLY_TYPE_BLOCK_STATUS: the raw payload (context id, descriptors).
                        5 => data.extend_from_slice(&p),
                        t if t & 0x8000 != 0 => {
                            let msg_len = be16(&p[4..]) as usize;
                            assert!(6 + msg_len <= p.len());
                            error = Some(be32(&p));
                        }
                        t => panic!("unexpected chunk type {t}"),
                    }
                    if flags & 1 != 0 {
                        self.reads.remove(&cookie);
                        return (cookie, error.map_or(Ok(data), Err));
                    }
                    let mut m = [0u8; 4];
                    self.s.read_exact(&mut m).unwrap();
                    assert_eq!(be32(&m), STRUCTURED_REPLY_MAGIC);
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    fn call(&mut self, typ: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> Result<Vec<u8>, u32> {
        let c = self.send(typ, flags, offset, len, payload);
        let (got, r) = self.recv();
        assert_eq!(got, c);
        r
    }
    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.call(CMD_READ, 0, offset, len, &[])
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        self.call(CMD_WRITE, 0, offset, data.len() as u32, data).map(drop)
    }

    /// True once the server has closed the connection (reads end of stream or a reset).
    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("waiting for the server to close: {e}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

use common::pattern;

fn read_at(path: &str, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

fn write_at(path: &str, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// Copies `src` into the export with nbdcopy (several connections: nbdcopy uses multi-conn).
fn nbdcopy_to(d: &Daemon, src: &Path, name: &str) {
    d.run("nbdcopy", &[src.to_str().unwrap(), &d.nbd_uri(name)]).ok();
}

/// The whole export, read with nbdcopy.
fn nbdcopy_from(d: &Daemon, name: &str) -> Vec<u8> {
    let out = d.path(&format!("{name}.out"));
    let _ = std::fs::remove_file(&out);
    d.run("nbdcopy", &[&d.nbd_uri(name), out.to_str().unwrap()]).ok();
    std::fs::read(out).unwrap()
}

fn qemu_io(d: &Daemon, name: &str, cmds: &[&str]) -> common::Out {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let uri = d.nbd_uri(name);
    args.push(&uri);
    d.run("qemu-io", &args)
}

// ---------------------------------------------------------------------------------------------
// Real clients against each target type.

#[test]
fn linear_two_segments_map_bytes_to_both_files() {
    let d = Daemon::start();
    let a = d.file("a.img", 4096); // 2 MiB
    let b = d.file("b.img", 4096);
    // 0..1 MiB -> a at 512 KiB; 1..2 MiB -> b at 0.
    let table = format!("0 2048 linear {a} 1024\n2048 2048 linear {b} 0\n");
    d.dmsetup_stdin(&["create", "lin"], &table).ok();

    let info = d.run("nbdinfo", &["--json", &d.nbd_uri("lin")]);
    assert!(info.ok().contains("\"export-size\": 2097152"), "{info:?}");

    // NBD -> files.
    let data = pattern(1, 2 * MIB as usize);
    let src = d.path("src.img");
    std::fs::write(&src, &data).unwrap();
    nbdcopy_to(&d, &src, "lin");
    assert!(read_at(&a, 512 * KIB, MIB as usize) == data[..MIB as usize], "first segment in a.img at 512 KiB");
    assert!(read_at(&b, 0, MIB as usize) == data[MIB as usize..], "second segment in b.img at 0");
    assert!(read_at(&a, 0, 512 * KIB as usize).iter().all(|&x| x == 0), "a.img before the mapping untouched");

    // Files -> NBD.
    let fresh = pattern(2, MIB as usize);
    write_at(&a, 512 * KIB, &fresh[..512 * KIB as usize]);
    write_at(&b, 0, &fresh[512 * KIB as usize..]);
    let got = nbdcopy_from(&d, "lin");
    assert!(got[..512 * KIB as usize] == fresh[..512 * KIB as usize]);
    assert!(got[MIB as usize..MIB as usize + 512 * KIB as usize] == fresh[512 * KIB as usize..]);

    // qemu-io: a pattern across the segment boundary, read back through NBD and from the files.
    let o = qemu_io(&d, "lin", &["write -P 0x5a 1020k 8k", "read -P 0x5a 1020k 8k", "flush"]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    assert!(read_at(&a, 512 * KIB + 1020 * KIB, 4096).iter().all(|&x| x == 0x5a));
    assert!(read_at(&b, 0, 4096).iter().all(|&x| x == 0x5a));
}

#[test]
fn striped_chunks_alternate_between_files() {
    let d = Daemon::start();
    let a = d.file("a.img", 8192); // 4 MiB each
    let b = d.file("b.img", 8192);
    // Two stripes of 8 sectors (4 KiB); stripe 1 starts 64 sectors into b.img.
    d.dmsetup(&["create", "st", "--table", &format!("0 16000 striped 2 8 {a} 0 {b} 64")]).ok();
    let size = 16000 * 512;
    let data = pattern(3, size);
    let src = d.path("src.img");
    std::fs::write(&src, &data).unwrap();
    nbdcopy_to(&d, &src, "st");
    for (i, chunk) in data.chunks(4096).enumerate() {
        let (file, base) = if i % 2 == 0 { (&a, 0) } else { (&b, 64 * 512) };
        let at = base + (i as u64 / 2) * 4096;
        assert!(read_at(file, at, chunk.len()) == chunk, "chunk {i} at {file}:{at}");
    }
    assert_eq!(nbdcopy_from(&d, "st"), data);
    // An unaligned qemu-io write spanning three chunks.
    let o = qemu_io(&d, "st", &["write -P 0xc3 6k 8k"]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    assert!(read_at(&b, 64 * 512 + 2048, 2048).iter().all(|&x| x == 0xc3), "chunk 1, second half");
    assert!(read_at(&a, 4096, 4096).iter().all(|&x| x == 0xc3), "chunk 2");
    assert!(read_at(&b, 64 * 512 + 4096, 2048).iter().all(|&x| x == 0xc3), "chunk 3, first half");
}

#[test]
fn zero_target_reads_zeroes_and_swallows_writes() {
    let d = Daemon::start();
    d.dmsetup(&["create", "z", "--table", "0 4096 zero"]).ok();
    let o = qemu_io(&d, "z", &["write -P 0x77 0 64k", "read -P 0 0 64k", "write -z 1M 4k", "discard 0 4k", "flush"]);
    assert!(!o.ok().contains("failed") && !o.stdout.contains("Pattern verification failed"), "{o:?}");
    let all = nbdcopy_from(&d, "z");
    assert_eq!(all.len(), 2 * MIB as usize);
    assert!(all.iter().all(|&x| x == 0));
}

#[test]
fn error_target_fails_io_and_others_keep_working() {
    let d = Daemon::start();
    let f = d.file("f.img", 2048);
    d.dmsetup_stdin(&["create", "mixed"], &format!("0 1024 linear {f} 0\n1024 1024 error\n")).ok();
    let o = qemu_io(&d, "mixed", &["read 512k 4k"]);
    assert!(o.stdout.contains("read failed: Input/output error"), "{o:?}");
    let o = qemu_io(&d, "mixed", &["write 600k 4k"]);
    assert!(o.stdout.contains("write failed: Input/output error"), "{o:?}");
    // The linear half works, and a request spanning both halves fails as a whole.
    let mut c = open(&d, "mixed");
    c.write(0, &pattern(4, 4096)).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), pattern(4, 4096));
    assert_eq!(c.read(510 * KIB, 4 * KIB as u32), Err(EIO));
    assert_eq!(c.read(0, 4096).unwrap(), pattern(4, 4096));
}

#[test]
fn stacked_linear_over_linear_lands_in_the_file() {
    let d = Daemon::start();
    let f = d.file("base.img", 8192); // 4 MiB
    d.dmsetup(&["create", "low", "--table", &format!("0 6144 linear {f} 2048")]).ok();
    let low = d.dev_num("low");
    d.dmsetup(&["create", "top", "--table", &format!("0 4096 linear {low} 1024")]).ok();
    // top byte X -> low byte X + 512 KiB -> file byte X + 512 KiB + 1 MiB.
    let data = pattern(5, 2 * MIB as usize);
    let src = d.path("src.img");
    std::fs::write(&src, &data).unwrap();
    nbdcopy_to(&d, &src, "top");
    assert!(read_at(&f, 1536 * KIB, 2 * MIB as usize) == data);
    assert!(read_at(&f, 0, 1536 * KIB as usize).iter().all(|&x| x == 0));
    // Both layers export the same bytes at their own offsets.
    let lower = nbdcopy_from(&d, "low");
    assert!(lower[512 * KIB as usize..512 * KIB as usize + 2 * MIB as usize] == data[..]);
    // Files -> NBD through both layers.
    write_at(&f, 1536 * KIB + 4096, &[0xee; 512]);
    let o = qemu_io(&d, "top", &["read -P 0xee 4k 512"]);
    assert!(!o.ok().contains("verification failed"), "{o:?}");
}

#[test]
fn reads_not_in_the_page_cache_come_back_right() {
    let d = Daemon::start();
    let f = d.file("cold.img", 8192);
    let data = pattern(9, 4 * MIB as usize);
    write_at(&f, 0, &data);
    let file = std::fs::File::open(&f).unwrap();
    file.sync_all().unwrap();
    // Evict the file's pages: on a disk filesystem the server's no-wait reads then fail and the
    // requests go to its workers (on tmpfs this changes nothing).
    // SAFETY: a valid fd.
    unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, libc::POSIX_FADV_DONTNEED) };
    d.dmsetup(&["create", "cold", "--table", &format!("0 8192 linear {f} 0")]).ok();
    let mut c = Haggle::connect(&d.nbd_socket()).go("cold", true).unwrap();
    let mut want = HashMap::new();
    for i in 0..64u64 {
        want.insert(c.send(CMD_READ, 0, i * 65536, 65536, &[]), i);
    }
    for _ in 0..64 {
        let (k, r) = c.recv();
        let i = want.remove(&k).unwrap() as usize;
        assert!(r.unwrap() == data[i * 65536..(i + 1) * 65536], "block {i}");
    }
}

#[test]
fn read_only_table_refuses_writes() {
    let d = Daemon::start();
    let f = d.file("f.img", 2048);
    write_at(&f, 0, &[0x42; 4096]);
    d.dmsetup(&["create", "ro", "--readonly", "--table", &format!("0 2048 linear {f} 0")]).ok();
    let info = d.run("nbdinfo", &["--json", &d.nbd_uri("ro")]);
    assert!(info.ok().contains("\"is_read_only\": true"), "{info:?}");
    let mut c = open(&d, "ro");
    assert_ne!(c.flags & TF_READ_ONLY, 0);
    assert_eq!(c.write(0, &[1; 512]), Err(EPERM));
    assert_eq!(c.call(CMD_TRIM, 0, 0, 4096, &[]), Err(EPERM));
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 4096, &[]), Err(EPERM));
    assert_eq!(c.read(0, 4096).unwrap(), vec![0x42; 4096]);
    assert_eq!(read_at(&f, 0, 4096), vec![0x42; 4096]);
}

// ---------------------------------------------------------------------------------------------
// Suspend, reload, resume.

#[test]
fn writes_sent_while_suspended_land_by_the_new_table() {
    let d = Daemon::start();
    let a = d.file("a.img", 2048);
    let b = d.file("b.img", 2048);
    d.dmsetup(&["create", "sw", "--table", &format!("0 2048 linear {a} 0")]).ok();
    let mut c = open(&d, "sw");
    for i in 0..8u64 {
        c.write(i * 4096, &pattern(100 + i, 4096)).unwrap();
    }
    d.dmsetup(&["suspend", "sw"]).ok();
    // Sent after the suspend completed: they must wait, then run against the reloaded table.
    let cookies: Vec<u64> = (8..16u64).map(|i| c.send(CMD_WRITE, 0, i * 4096, 4096, &pattern(100 + i, 4096))).collect();
    d.dmsetup(&["reload", "sw", "--table", &format!("0 2048 linear {b} 0")]).ok();
    d.dmsetup(&["resume", "sw"]).ok();
    let mut answered: Vec<u64> = (0..8)
        .map(|_| {
            let (k, r) = c.recv();
            assert_eq!(r, Ok(vec![]));
            k
        })
        .collect();
    answered.sort();
    assert_eq!(answered, cookies);
    for i in 0..16u64 {
        let (on, off) = if i < 8 { (&a, &b) } else { (&b, &a) };
        assert_eq!(read_at(on, i * 4096, 4096), pattern(100 + i, 4096), "block {i}");
        assert!(read_at(off, i * 4096, 4096).iter().all(|&x| x == 0), "block {i} also on the other file");
    }
}

#[test]
fn big_writes_one_at_a_time_land_by_the_table_and_a_failed_one_leaves_the_connection_clean() {
    // 1 MiB writes with nothing else in flight take the server's pipe path (payload spliced
    // from the socket, then into the files); this checks it against each kind of target.
    let d = Daemon::start();
    let a = d.file("a.img", 2048); // 1 MiB each
    let b = d.file("b.img", 2048);
    let c2 = d.file("c.img", 2048);
    let table = format!("0 2048 linear {a} 0\n2048 2048 zero\n4096 2048 linear {b} 0\n6144 2048 error\n");
    d.dmsetup_stdin(&["create", "big"], &table).ok();
    let mut c = open(&d, "big");
    let data = pattern(21, 3 * MIB as usize);
    for i in 0..3 {
        let at = i * MIB as usize;
        assert_eq!(c.write(at as u64, &data[at..at + MIB as usize]), Ok(()), "MiB {i}");
    }
    assert!(read_at(&a, 0, MIB as usize) == data[..MIB as usize]);
    assert!(read_at(&b, 0, MIB as usize) == data[2 * MIB as usize..]);
    assert_eq!(c.read(MIB, 4096).unwrap(), vec![0; 4096], "the zero target swallowed its part");
    // Half on b, half on the error target: EIO, and the connection goes on cleanly.
    let half = pattern(22, MIB as usize);
    assert_eq!(c.write(2 * MIB + MIB / 2, &half), Err(EIO));
    let again = pattern(23, MIB as usize);
    assert_eq!(c.write(0, &again), Ok(()));
    assert!(read_at(&a, 0, MIB as usize) == again);
    assert_eq!(c.read(0, 4096).unwrap(), again[..4096].to_vec());
    // Sent while suspended: waits, then lands by the reloaded table.
    d.dmsetup(&["suspend", "big"]).ok();
    let late = pattern(24, MIB as usize);
    let cookie = c.send(CMD_WRITE, 0, 0, MIB as u32, &late);
    d.dmsetup(&["reload", "big", "--table", &format!("0 2048 linear {c2} 0")]).ok();
    d.dmsetup(&["resume", "big"]).ok();
    assert_eq!(c.recv(), (cookie, Ok(vec![])));
    assert!(read_at(&c2, 0, MIB as usize) == late, "landed by the new table");
    assert!(read_at(&a, 0, MIB as usize) == again, "nothing of it on the replaced table");
}

#[test]
fn write_stream_through_suspend_reload_resume_loses_nothing() {
    let d = Daemon::start();
    // Far more blocks than the stream can write while dmsetup suspends, reloads and resumes, so it
    // is still running on both sides of the swap (it stops only when told to).
    const SECTORS: u64 = 262_144;
    let a = d.file("a.img", SECTORS);
    let b = d.file("b.img", SECTORS);
    d.dmsetup(&["create", "ws", "--table", &format!("0 {SECTORS} linear {a} 0")]).ok();
    let blocks = SECTORS * 512 / 4096;
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut c = open(&d, "ws");
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        std::thread::spawn(move || {
            // One write at a time, in order: block i is acknowledged before block i+1 is sent.
            let mut i = 0u64;
            while i < blocks && !(stop.load(Ordering::SeqCst) && i.is_multiple_of(16)) {
                c.write(i * 4096, &pattern(1000 + i, 4096)).unwrap();
                i += 1;
                acked.store(i, Ordering::SeqCst);
            }
            c.send(CMD_DISC, 0, 0, 0, &[]);
            i
        })
    };
    while acked.load(Ordering::SeqCst) < 64 {
        std::thread::sleep(Duration::from_millis(1));
    }
    d.dmsetup(&["suspend", "ws"]).ok();
    let at_suspend = acked.load(Ordering::SeqCst);
    d.dmsetup(&["reload", "ws", "--table", &format!("0 {SECTORS} linear {b} 0")]).ok();
    d.dmsetup(&["resume", "ws"]).ok();
    // Let the stream run on the new table for a while, then stop it.
    let after = acked.load(Ordering::SeqCst);
    while acked.load(Ordering::SeqCst) < (after + 64).min(blocks) {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();
    assert!(written > at_suspend);
    // Every acknowledged block is in exactly one file: a prefix in a.img (before the suspend),
    // the rest in b.img (after the resume), none lost, none in both.
    let mut split = None;
    for i in 0..written {
        let want = pattern(1000 + i, 4096);
        let (in_a, in_b) = (read_at(&a, i * 4096, 4096) == want, read_at(&b, i * 4096, 4096) == want);
        assert!(in_a != in_b, "block {i}: in a.img {in_a}, in b.img {in_b}");
        match (in_a, split) {
            (false, None) => split = Some(i),
            (true, Some(s)) => panic!("block {i} went to the old table after block {s} went to the new one"),
            _ => {}
        }
    }
    let split = split.expect("some writes after the resume");
    assert!(
        split <= at_suspend + 1,
        "block {split} landed on the old table after the suspend ({at_suspend} acknowledged then)"
    );
    assert!(split >= at_suspend, "acknowledged before the suspend, yet on the new table");
}

// ---------------------------------------------------------------------------------------------
// Export lifecycle.

#[test]
fn exports_follow_devices_size_and_removal() {
    let d = Daemon::start();
    let f = d.file("f.img", 8192);
    d.dmsetup(&["create", "dev1", "--table", &format!("0 2048 linear {f} 0")]).ok();
    d.dmsetup(&["create", "dev2", "--table", "0 8 zero"]).ok();
    d.dmsetup(&["create", "inactive", "--notable"]).ok();
    assert_eq!(Haggle::connect(&d.nbd_socket()).list(), vec!["dev1", "dev2"]);

    let mut old = open(&d, "dev1");
    assert_eq!(old.size, MIB);
    assert_ne!(old.flags & TF_CAN_MULTI_CONN, 0);
    d.dmsetup(&["reload", "dev1", "--table", &format!("0 4096 linear {f} 0")]).ok();
    d.dmsetup(&["resume", "dev1"]).ok();
    // The old connection keeps its negotiated size; a new one sees the new size.
    assert_eq!(old.read(MIB, 512), Err(EINVAL));
    let mut new = open(&d, "dev1");
    assert_eq!(new.size, 2 * MIB);
    new.write(MIB, &[9; 512]).unwrap();
    assert_eq!(old.read(0, 512).unwrap(), vec![0; 512]);

    // Open exports hold their device: remove fails, deferred remove waits for the last close.
    assert!(d.dmsetup(&["remove", "dev1"]).err().contains("busy"));
    d.dmsetup(&["remove", "--deferred", "dev1"]).ok();
    drop(old);
    new.send(CMD_DISC, 0, 0, 0, &[]);
    assert!(new.closed_by_server());
    let mut gone = false;
    for _ in 0..1000 {
        if !d.dmsetup(&["ls"]).ok().contains("dev1") {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(gone, "deferred removal after the last NBD client left");
    assert_eq!(Haggle::connect(&d.nbd_socket()).go("dev1", false).err(), Some(REP_ERR_UNKNOWN));
    assert_eq!(Haggle::connect(&d.nbd_socket()).go("inactive", false).err(), Some(REP_ERR_UNKNOWN));
    assert_eq!(Haggle::connect(&d.nbd_socket()).list(), vec!["dev2"]);
    // A device nobody holds is removed at once.
    d.dmsetup(&["remove", "dev2"]).ok();
    assert!(Haggle::connect(&d.nbd_socket()).list().is_empty());
}

#[test]
fn structured_replies_and_all_commands() {
    let d = Daemon::start();
    let f = d.file("f.img", 2048);
    d.dmsetup(&["create", "s", "--table", &format!("0 2048 linear {f} 0")]).ok();
    let mut c = Haggle::connect(&d.nbd_socket()).go("s", true).unwrap();
    let data = pattern(7, 8192);
    assert_eq!(c.call(CMD_WRITE, FLAG_FUA, 4096, 8192, &data), Ok(vec![]));
    assert_eq!(c.read(4096, 8192).unwrap(), data);
    assert_eq!(c.read(0, 0), Ok(vec![]));
    assert_eq!(c.call(CMD_WRITE_ZEROES, FLAG_NO_HOLE | FLAG_FUA, 4096, 4096, &[]), Ok(vec![]));
    assert_eq!(c.call(CMD_TRIM, 0, 8192, 4096, &[]), Ok(vec![]));
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]), Ok(vec![]));
    assert_eq!(read_at(&f, 4096, 4096), vec![0; 4096]);
    // Errors come back as error chunks, reads included.
    assert_eq!(c.read(MIB - 512, 1024), Err(EINVAL));
    assert_eq!(c.call(CMD_WRITE, 0, MIB, 512, &[0; 512]), Err(ENOSPC));
    // Many requests in flight on one connection, answered in any order.
    let mut want = HashMap::new();
    for i in 0..64u64 {
        want.insert(c.send(CMD_WRITE, 0, i * 8192, 8192, &pattern(200 + i, 8192)), None);
        want.insert(c.send(CMD_READ, 0, i * 8192, 8192, &[]), Some(i));
    }
    for _ in 0..want.len() {
        let (k, r) = c.recv();
        let r = r.expect("no error");
        let _ = want.remove(&k).expect("known cookie");
        assert!(r.is_empty() || r.len() == 8192);
    }
    for i in 0..64u64 {
        assert_eq!(read_at(&f, i * 8192, 8192), pattern(200 + i, 8192));
    }
    c.send(CMD_DISC, 0, 0, 0, &[]);
    assert!(c.closed_by_server());
}

// ---------------------------------------------------------------------------------------------
// Bad input.

#[test]
fn bad_input_gets_protocol_errors_and_disturbs_nobody_else() {
    let d = Daemon::start();
    let f = d.file("f.img", 2048);
    let g = d.file("g.img", 2048);
    d.dmsetup(&["create", "victim", "--table", &format!("0 2048 linear {f} 0")]).ok();
    d.dmsetup(&["create", "bystander", "--table", &format!("0 2048 linear {g} 0")]).ok();
    let mut by = open(&d, "bystander");
    let mut same = open(&d, "victim");
    let check = |by: &mut Nbd, same: &mut Nbd, seed: u64| {
        by.write(0, &pattern(seed, 4096)).unwrap();
        assert_eq!(by.read(0, 4096).unwrap(), pattern(seed, 4096));
        same.write(8192, &pattern(seed + 1, 4096)).unwrap();
        assert_eq!(same.read(8192, 4096).unwrap(), pattern(seed + 1, 4096));
    };

    // Handshake: unknown options are refused, unknown exports are unknown, bad magic closes.
    let mut h = Haggle::connect(&d.nbd_socket());
    h.option(12345, b"whatever");
    assert_eq!(h.reply(12345).0, REP_ERR_UNSUP);
    h.option(OPT_LIST, b"junk");
    assert_eq!(h.reply(OPT_LIST).0, (1 << 31) + 3, "NBD_REP_ERR_INVALID");
    assert_eq!(h.go("no-such-device", false).err(), Some(REP_ERR_UNKNOWN));
    let mut h = Haggle::connect(&d.nbd_socket());
    h.option(OPT_ABORT, &[]);
    assert_eq!(h.reply(OPT_ABORT).0, REP_ACK);
    let mut h = Haggle::connect(&d.nbd_socket());
    h.s.write_all(&[0xde; 16]).unwrap();
    assert_eq!(h.s.read(&mut [0u8; 1]).unwrap_or(0), 0, "bad option magic closes the session");
    let mut s = UnixStream::connect(d.nbd_socket()).unwrap();
    s.read_exact(&mut [0u8; 18]).unwrap();
    s.write_all(&0x80u32.to_be_bytes()).unwrap();
    assert_eq!(s.read(&mut [0u8; 1]).unwrap_or(0), 0, "unknown client flags close the session");
    check(&mut by, &mut same, 10);

    // Transmission: out of range, unknown command, bad flags, oversized read: error replies, and
    // the connection goes on.
    let mut c = open(&d, "victim");
    assert_eq!(c.read(MIB, 512), Err(EINVAL));
    assert_eq!(c.read(u64::MAX - 100, 512), Err(EINVAL));
    assert_eq!(c.write(MIB - 256, &[1; 512]), Err(ENOSPC));
    assert_eq!(c.call(CMD_TRIM, 0, MIB, 4096, &[]), Err(EINVAL));
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 2 * MIB, 4096, &[]), Err(ENOSPC));
    assert_eq!(c.call(42, 0, 0, 0, &[]), Err(EINVAL));
    assert_eq!(c.call(CMD_READ, 0x80, 0, 512, &[]), Err(EINVAL));
    assert_eq!(c.read(0, (32 << 20) + 1), Err(EINVAL));
    assert!(read_at(&f, MIB - 256, 256).iter().all(|&x| x == 0), "refused write wrote nothing");
    c.write(0, &[3; 512]).unwrap();
    drop(c);
    check(&mut by, &mut same, 20);

    // An oversized write ends that session (its payload is not worth reading).
    let mut c = open(&d, "victim");
    c.send(CMD_WRITE, 0, 0, (32 << 20) + 1, &[0; 4096]);
    assert!(c.closed_by_server());
    drop(c);
    check(&mut by, &mut same, 30);

    // Wrong request magic ends that session.
    let mut c = open(&d, "victim");
    c.s.write_all(&[0x55; 28]).unwrap();
    assert!(c.closed_by_server());
    drop(c);
    check(&mut by, &mut same, 40);

    // Abrupt disconnects: mid-header, mid-payload, with requests in flight.
    for cut in [10usize, 28 + 100] {
        let mut c = open(&d, "victim");
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&CMD_WRITE.to_be_bytes());
        m.extend_from_slice(&1u64.to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&4096u32.to_be_bytes());
        m.extend_from_slice(&[7; 4096]);
        c.s.write_all(&m[..cut]).unwrap();
        drop(c);
    }
    let mut c = open(&d, "victim");
    for i in 0..32 {
        c.send(CMD_READ, 0, i * 4096, 4096, &[]);
    }
    drop(c);
    check(&mut by, &mut same, 50);
    assert!(read_at(&f, 0, 512) == vec![3; 512], "the torn write never happened");

    // Every one of those connections closed its device again: once the two kept open leave,
    // the device can be removed.
    drop(same);
    let mut removed = false;
    for _ in 0..1000 {
        if d.dmsetup(&["remove", "victim"]).code == 0 {
            removed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(removed, "victim stayed open: {}", d.log());
    check_alive(&mut by);
    assert!(d.alive());
}

fn check_alive(c: &mut Nbd) {
    c.write(4096, &[5; 512]).unwrap();
    assert_eq!(c.read(4096, 512).unwrap(), vec![5; 512]);
}

#[test]
fn tcp_listener_serves_the_same_exports() {
    let d = Daemon::start_with(&["--nbd", "tcp:127.0.0.1:0"]);
    let f = d.file("f.img", 2048);
    d.dmsetup(&["create", "t", "--table", &format!("0 2048 linear {f} 0")]).ok();
    let log = d.log();
    let port = log
        .lines()
        .find_map(|l| l.split("serving NBD on tcp:127.0.0.1:").nth(1))
        .unwrap_or_else(|| panic!("no TCP listener in the log:\n{log}"))
        .trim()
        .to_owned();
    let uri = format!("nbd://127.0.0.1:{port}/t");
    let o = d.run("qemu-io", &["-f", "raw", "-c", "write -P 0x21 4k 4k", &uri]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    assert_eq!(read_at(&f, 4096, 4096), vec![0x21; 4096]);
    let info = d.run("nbdinfo", &["--json", &uri]);
    assert!(info.ok().contains("\"export-size\": 1048576"), "{info:?}");
    // With --nbd given, the default socket is not created.
    assert!(!d.nbd_socket().exists());
}

// ---------------------------------------------------------------------------------------------
// base:allocation block status, and fio.

/// `nbdinfo --map` of an export: (offset, length, state name) per run.
fn map(d: &Daemon, name: &str) -> Vec<(u64, u64, String)> {
    let o = d.run("nbdinfo", &["--map", &d.nbd_uri(name)]);
    o.ok()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "nbdinfo --map line {l:?}");
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[3].to_owned())
        })
        .collect()
}

#[test]
fn block_status_reports_holes_data_and_zero_targets_through_the_stack() {
    let d = Daemon::start();
    let f = d.file("sparse.img", 8192); // 4 MiB, all hole
    write_at(&f, MIB, &pattern(11, 64 * KIB as usize));
    // 0..4 MiB -> the file; 4..5 MiB zero; 5..6 MiB error.
    let table = format!("0 8192 linear {f} 0\n8192 2048 zero\n10240 2048 error\n");
    d.dmsetup_stdin(&["create", "bs"], &table).ok();
    let info = d.run("nbdinfo", &["--json", &d.nbd_uri("bs")]);
    assert!(info.ok().contains("\"base:allocation\""), "LIST_META_CONTEXT offers base:allocation: {info:?}");
    let hz = "hole,zero".to_owned();
    let want = vec![
        (0, MIB, hz.clone()),
        (MIB, 64 * KIB, "data".to_owned()),
        // The file's tail hole and the zero target merge into one run.
        (MIB + 64 * KIB, 4 * MIB - 64 * KIB, hz.clone()),
        (5 * MIB, MIB, "data".to_owned()),
    ];
    assert_eq!(map(&d, "bs"), want);
    // A linear device over it, shifted by 512 KiB, sees the same runs shifted.
    let low = d.dev_num("bs");
    d.dmsetup(&["create", "up", "--table", &format!("0 4096 linear {low} 1024")]).ok();
    assert_eq!(
        map(&d, "up"),
        vec![(0, 512 * KIB, hz.clone()), (512 * KIB, 64 * KIB, "data".to_owned()), (576 * KIB, 1472 * KIB, hz)]
    );
    // qemu reads the same map through its own NBD client.
    let o = d.run("qemu-img", &["map", "--output=json", "-f", "raw", &d.nbd_uri("up")]);
    let json = o.ok();
    assert!(json.contains("\"start\": 524288, \"length\": 65536") && json.contains("\"data\": true"), "{json}");

    // Without SET_META_CONTEXT the command is refused, and the connection goes on.
    let mut c = open(&d, "bs");
    assert_eq!(c.call(CMD_BLOCK_STATUS, 0, 0, 4096, &[]), Err(EINVAL));
    assert_eq!(c.read(MIB, 512).unwrap(), pattern(11, 512));
}

#[test]
fn fio_verify_job_through_a_two_segment_linear_device() {
    let d = Daemon::start();
    let a = d.file("a.img", 8192); // 4 MiB each
    let b = d.file("b.img", 8192);
    // 0..2 MiB -> a at 1 MiB; 2..6 MiB -> b at 0.
    let table = format!("0 4096 linear {a} 2048\n4096 8192 linear {b} 0\n");
    d.dmsetup_stdin(&["create", "fv"], &table).ok();
    let o = d.run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", d.nbd_uri("fv")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=6M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randseed=42",
            "--output-format=json",
        ],
    );
    let out = o.ok();
    let json = &out[out.find('{').expect("fio JSON")..];
    for key in ["\"error\" : 0", "\"io_bytes\" : 6291456"] {
        assert!(json.contains(key), "fio output lacks {key}: {json}");
    }
    // Every block was written once and verified; the export's bytes are the files' bytes at the
    // table's offsets, and none of them is still zero (fio fills blocks with random data).
    let got = nbdcopy_from(&d, "fv");
    assert!(got[..2 * MIB as usize] == read_at(&a, MIB, 2 * MIB as usize));
    assert!(got[2 * MIB as usize..] == read_at(&b, 0, 4 * MIB as usize));
    assert!(got.chunks(4096).all(|blk| blk.iter().any(|&x| x != 0)), "a block fio never wrote");
    assert!(read_at(&a, 0, MIB as usize).iter().all(|&x| x == 0), "a.img before the mapping untouched");
}

/// The body of a LIST/SET_META_CONTEXT option.
fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

#[test]
fn metadata_context_negotiation_and_block_status_follow_the_protocol() {
    let d = Daemon::start();
    let f = d.file("m.img", 4096); // 2 MiB, all hole
    write_at(&f, MIB, &pattern(31, 64 * KIB as usize));
    d.dmsetup(&["create", "m", "--table", &format!("0 4096 linear {f} 0")]).ok();
    let mut h = Haggle::connect(&d.nbd_socket());
    // Metadata contexts need structured replies first.
    h.option(OPT_SET_META_CONTEXT, &meta_request("m", &["base:allocation"]));
    assert_eq!(h.reply(OPT_SET_META_CONTEXT).0, REP_ERR_INVALID);
    h.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(h.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
    h.option(OPT_SET_META_CONTEXT, &[0, 0, 0]);
    assert_eq!(h.reply(OPT_SET_META_CONTEXT).0, REP_ERR_INVALID, "malformed");
    h.option(OPT_SET_META_CONTEXT, &meta_request("nonesuch", &["base:allocation"]));
    assert_eq!(h.reply(OPT_SET_META_CONTEXT).0, REP_ERR_UNKNOWN);
    // LIST without queries: every context; with an unknown namespace only: none.
    h.option(OPT_LIST_META_CONTEXT, &meta_request("m", &[]));
    let (t, ctx) = h.reply(OPT_LIST_META_CONTEXT);
    assert_eq!((t, be32(&ctx), &ctx[4..]), (REP_META_CONTEXT, 1, &b"base:allocation"[..]));
    assert_eq!(h.reply(OPT_LIST_META_CONTEXT).0, REP_ACK);
    h.option(OPT_LIST_META_CONTEXT, &meta_request("m", &["qemu:dirty-bitmap:x"]));
    assert_eq!(h.reply(OPT_LIST_META_CONTEXT).0, REP_ACK);
    h.option(OPT_SET_META_CONTEXT, &meta_request("m", &["qemu:dirty-bitmap:x", "base:allocation"]));
    assert_eq!(h.reply(OPT_SET_META_CONTEXT).0, REP_META_CONTEXT);
    assert_eq!(h.reply(OPT_SET_META_CONTEXT).0, REP_ACK);
    let mut c = h.go("m", false).unwrap();
    c.structured = true;
    let descriptors = |r: Vec<u8>| -> Vec<(u32, u32)> {
        assert_eq!(be32(&r), 1, "context id");
        r[4..].chunks(8).map(|x| (be32(x), be32(&x[4..]))).collect()
    };
    let all = c.call(CMD_BLOCK_STATUS, 0, 0, 2 * MIB as u32, &[]).unwrap();
    let k = KIB as u32;
    assert_eq!(descriptors(all), vec![(1024 * k, 3), (64 * k, 0), (960 * k, 3)]);
    let one = c.call(CMD_BLOCK_STATUS, FLAG_REQ_ONE, MIB + 4096, MIB as u32 - 4096, &[]).unwrap();
    assert_eq!(descriptors(one), vec![(60 * k, 0)]);
    assert_eq!(c.call(CMD_BLOCK_STATUS, 0, 0, 0, &[]), Err(EINVAL), "length 0");
    assert_eq!(c.call(CMD_BLOCK_STATUS, 0, MIB, 2 * MIB as u32, &[]), Err(EINVAL), "past the end");
    assert_eq!(c.call(CMD_BLOCK_STATUS, FLAG_FUA, 0, 4096, &[]), Err(EINVAL), "flag not for this command");
    assert_eq!(c.read(MIB, 512).unwrap(), pattern(31, 512), "the connection goes on");

    // Millions of tiny pieces (4 KiB stripes over sparse files): answered in part, correctly,
    // rather than walked to the end.
    let s1 = d.file("s1.img", 4 << 21); // 4 GiB each, all hole
    let s2 = d.file("s2.img", 4 << 21);
    d.dmsetup(&["create", "tiny", "--table", &format!("0 {} striped 2 8 {s1} 0 {s2} 0", 8u64 << 21)]).ok();
    let mut h = Haggle::connect(&d.nbd_socket());
    h.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(h.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
    h.option(OPT_SET_META_CONTEXT, &meta_request("tiny", &["base:allocation"]));
    assert_eq!(h.reply(OPT_SET_META_CONTEXT).0, REP_META_CONTEXT);
    assert_eq!(h.reply(OPT_SET_META_CONTEXT).0, REP_ACK);
    let mut t = h.go("tiny", false).unwrap();
    t.structured = true;
    let asked: u32 = !4095; // the largest 4 KiB-aligned length
    let got = descriptors(t.call(CMD_BLOCK_STATUS, 0, 0, asked, &[]).unwrap());
    assert_eq!(got.len(), 1, "{got:?}");
    let (len, state) = got[0];
    assert!(len > 0 && len < asked && len % 4096 == 0 && state == 3, "{got:?}");
}

/// Export names are UTF-8 (proto.md), device names are bytes: a device whose name is not UTF-8
/// is not listed and cannot be reached by name, and its bytes never reach another device (say one
/// named with U+FFFD, which a lossy conversion would produce).
#[test]
fn devices_with_non_utf8_names_are_not_exports() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let d = Daemon::start();
    let replaced = "caf\u{fffd}";
    for name in [&b"caf\xe9"[..], replaced.as_bytes()] {
        let args: Vec<&OsStr> = ["--manglename", "none", "create"]
            .iter()
            .map(OsStr::new)
            .chain([OsStr::from_bytes(name)])
            .chain(["--table", "0 8 zero"].iter().map(OsStr::new))
            .collect();
        let out = d.dmsetup_os(&args);
        assert_eq!(out.code, 0, "{out:?}");
    }
    assert_eq!(Haggle::connect(&d.nbd_socket()).list(), vec![replaced]);
    // NBD_OPT_GO with the raw bytes: not a UTF-8 name, so not a valid request.
    let mut h = Haggle::connect(&d.nbd_socket());
    let mut req = 4u32.to_be_bytes().to_vec();
    req.extend_from_slice(b"caf\xe9");
    req.extend_from_slice(&0u16.to_be_bytes());
    h.option(OPT_GO, &req);
    assert_eq!(h.reply(OPT_GO).0, REP_ERR_INVALID);
    // NBD_OPT_EXPORT_NAME (no error reply exists): the session ends without an export.
    h.option(1, b"caf\xe9");
    let mut rest = Vec::new();
    let _ = h.s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the server answered an export for non-UTF-8 bytes: {rest:?}");
    // The U+FFFD device is an ordinary export.
    assert_eq!(open(&d, replaced).size, 4096);
    assert!(d.alive());
}
