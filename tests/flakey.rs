//! The `flakey` target (more-targets.md §1) through the real dmsetup (table grammar, every
//! constructor error, TABLE and INFO lines) and real NBD clients (qemu-io, nbdcopy): what the
//! down interval does to reads and writes, checked byte by byte against the backing files.
//!
//! Down-interval behaviour is tested with `up_interval 0` (always down) and pass-through with
//! `down_interval 0` (never down), so nothing depends on how fast the test runs; the one test of
//! the clock itself only waits for a lower bound.

mod common;

use common::{Daemon, Out};
use std::collections::BTreeMap;

/// Every device here: 256 KiB.
const SECTORS: u64 = 512;
const BYTES: usize = SECTORS as usize * 512;

/// Known, position-dependent bytes (never a run that would hide a shifted copy).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + i / 251) as u8).wrapping_add(seed)).collect()
}

/// A backing file filled with `pattern(…, seed)` and a flakey device over it: `0 SECTORS flakey
/// <file> 0 <args>`. Returns the file's path.
fn flakey(d: &Daemon, name: &str, args: &str, seed: u8) -> String {
    let f = d.file(&format!("{name}.img"), SECTORS);
    std::fs::write(&f, pattern(BYTES, seed)).unwrap();
    d.dmsetup(&["create", name, "--table", &format!("0 {SECTORS} flakey {f} 0 {args}")]).ok();
    f
}

fn file_bytes(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// qemu-io with the write-back cache mode: its default, write-through, sends every write with
/// FUA, which `corrupt_bio_byte` flags can tell apart.
fn qemu_io(d: &Daemon, name: &str, cmds: &[&str]) -> Out {
    let mut args = vec!["-f", "raw", "-t", "writeback"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let uri = d.nbd_uri(name);
    args.push(&uri);
    d.run("qemu-io", &args)
}

/// Reads each `(offset, len)` range with its own qemu-io `read -v` (one NBD read, one bio each)
/// and returns the bytes from qemu-io's hex dump, or the qemu-io output if any read failed.
fn read_ranges(d: &Daemon, name: &str, ranges: &[(u64, usize)]) -> Result<Vec<Vec<u8>>, Out> {
    let cmds: Vec<String> = ranges.iter().map(|(o, l)| format!("read -v {o} {l}")).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let o = qemu_io(d, name, &cmds);
    if o.code != 0 || o.stdout.contains("failed") {
        return Err(o);
    }
    // Dump lines: "%08x:  " then up to 16 "%02x " then the characters.
    let mut bytes = BTreeMap::new();
    for line in o.stdout.lines() {
        let Some((off, rest)) = line.split_once(":  ") else { continue };
        let Ok(off) = u64::from_str_radix(off, 16) else { continue };
        for (i, h) in rest.split(' ').take(16).take_while(|h| h.len() == 2).enumerate() {
            if let Ok(b) = u8::from_str_radix(h, 16) {
                bytes.insert(off + i as u64, b);
            }
        }
    }
    Ok(ranges
        .iter()
        .map(|&(o, l)| {
            (o..o + l as u64).map(|a| *bytes.get(&a).unwrap_or_else(|| panic!("no byte {a} dumped"))).collect()
        })
        .collect())
}

fn failed(o: &Out, what: &str) -> bool {
    o.stdout.contains(&format!("{what} failed: Input/output error"))
}

fn differing(a: &[u8], b: &[u8]) -> Vec<usize> {
    a.iter().zip(b).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i).collect()
}

// ---------------------------------------------------------------------------------------------
// The table line.

#[test]
fn flakey_table_errors_refuse_the_load_with_the_kernel_text() {
    let d = Daemon::start();
    let f = d.file("f.img", SECTORS);
    let cases: &[(&str, &str)] = &[
        ("{f} 0 1", "Invalid argument count"),
        ("{f} x 1 1", "Invalid device sector"),
        ("{f} 1x 1 1", "Invalid device sector"),
        ("{f} +1 1 1", "Invalid device sector"),
        ("{f} 0 x 1", "Invalid up interval"),
        ("{f} 0 -1 1", "Invalid up interval"),
        ("{f} 0 1 1y", "Invalid down interval"),
        ("{f} 0 0 0", "Total (up + down) interval is zero"),
        // `%u` keeps the low 32 bits: 2^32 is 0.
        ("{f} 0 4294967296 0", "Total (up + down) interval is zero"),
        // The sum is checked for zero before overflow, in 32 bits: 2^32 − 1 + 1 wraps to 0.
        ("{f} 0 4294967295 1", "Total (up + down) interval is zero"),
        ("{f} 0 4294967295 2", "Interval overflow"),
        ("{f} 0 1 1 12 a b c d e f g h i j k l", "Invalid number of feature args"),
        ("{f} 0 1 1 2 error_reads", "Invalid number of feature args"),
        ("{f} 0 1 1 x", "Invalid number of feature args"),
        ("{f} 0 1 1 1 bogus", "Unrecognised flakey feature requested"),
        ("{f} 0 1 1 2 error_reads ERROR_READS", "Feature error_reads duplicated"),
        ("{f} 0 1 1 2 drop_writes drop_writes", "Feature drop_writes duplicated"),
        ("{f} 0 1 1 2 error_writes error_writes", "Feature error_writes duplicated"),
        ("{f} 0 1 1 2 error_writes drop_writes", "Feature drop_writes conflicts with feature error_writes"),
        ("{f} 0 1 1 2 drop_writes error_writes", "Feature error_writes conflicts with feature drop_writes"),
        ("{f} 0 1 1 4 corrupt_bio_byte 1 r 0", "Feature corrupt_bio_byte requires 4 parameters"),
        ("{f} 0 1 1 5 corrupt_bio_byte 0 r 0 0", "Invalid corrupt bio byte"),
        ("{f} 0 1 1 5 corrupt_bio_byte 1 x 0 0", "Invalid corrupt bio direction (r or w)"),
        ("{f} 0 1 1 5 corrupt_bio_byte 1 rw 0 0", "Invalid corrupt bio direction (r or w)"),
        ("{f} 0 1 1 5 corrupt_bio_byte 1 r 256 0", "Invalid corrupt value to write into bio byte (0-255)"),
        ("{f} 0 1 1 5 corrupt_bio_byte 1 r 0 -1", "Invalid corrupt bio flags mask"),
        ("{f} 0 1 1 10 corrupt_bio_byte 1 r 0 0 corrupt_bio_byte 2 w 0 0", "Feature corrupt_bio_byte duplicated"),
        ("{f} 0 1 1 1 random_read_corrupt", "Feature random_read_corrupt requires a parameter"),
        ("{f} 0 1 1 1 random_write_corrupt", "Feature random_write_corrupt requires a parameter"),
        ("{f} 0 1 1 2 random_read_corrupt 1000000001", "Invalid random corrupt argument"),
        ("{f} 0 1 1 2 random_write_corrupt p", "Invalid random corrupt argument"),
        ("{f} 0 1 1 4 random_read_corrupt 5 random_read_corrupt 0", "Feature random_read_corrupt duplicated"),
        ("{f} 0 1 1 4 random_write_corrupt 5 random_write_corrupt 5", "Feature random_write_corrupt duplicated"),
        (
            "{f} 0 1 1 3 drop_writes random_write_corrupt 1",
            "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set",
        ),
        (
            "{f} 0 1 1 6 error_writes corrupt_bio_byte 1 W 0 0",
            "error_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set",
        ),
        (
            "{f} 0 1 1 6 corrupt_bio_byte 1 r 0 0 error_reads",
            "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with the READ flag set",
        ),
        (
            "{f} 0 1 1 3 random_read_corrupt 1 error_reads",
            "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with the READ flag set",
        ),
        ("/nonexistent/dev 0 1 1", "Device lookup failed"),
    ];
    for (i, (args, text)) in cases.iter().enumerate() {
        let table = format!("0 {SECTORS} flakey {}", args.replace("{f}", &f));
        let o = d.dmsetup(&["create", &format!("bad{i}"), "--table", &table]);
        assert!(o.err().contains("Invalid argument"), "{table}: {o:?}");
        let log = d.log();
        assert!(log.contains(&format!("flakey: {text}")), "{table}: no {text:?} in the log:\n{log}");
    }
    assert!(d.dmsetup(&["ls"]).ok().starts_with("No devices found"), "no failed load left a device");
    // The version.
    assert!(d.dmsetup(&["targets"]).ok().contains("flakey           v1.5.0\n"));
}

#[test]
fn flakey_table_and_status_lines() {
    let d = Daemon::start();
    let f = d.file("f.img", 4 * SECTORS);
    let fm = d.hello("file_major");
    let dev = format!("{fm}:0");
    let cases: &[(&str, &str)] = &[
        // No features, an empty group, or only random_*_corrupt 0: K2 errors reads and writes.
        ("0 5 5", "0 5 5 2 error_reads error_writes"),
        ("0 5 5 0", "0 5 5 2 error_reads error_writes"),
        ("0 5 5 2 random_read_corrupt 0", "0 5 5 2 error_reads error_writes"),
        ("0 5 5 4 random_read_corrupt 0 random_read_corrupt 0", "0 5 5 2 error_reads error_writes"),
        // Words past the counted ones are ignored and not echoed.
        ("0 5 5 0 drop_writes", "0 5 5 2 error_reads error_writes"),
        ("8 1 2 1 DROP_WRITES", "8 1 2 1 drop_writes"),
        ("0 1 2 1 error_writes", "0 1 2 1 error_writes"),
        ("0 1 2 2 error_writes error_reads", "0 1 2 2 error_reads error_writes"),
        ("0 0 7 2 drop_writes error_reads", "0 0 7 2 error_reads drop_writes"),
        ("0 1 0 6 error_reads corrupt_bio_byte 32 W 7 131072", "0 1 0 6 error_reads corrupt_bio_byte 32 w 7 131072"),
        (
            "0 3 4 6 drop_writes corrupt_bio_byte 4294967295 R 255 0",
            "0 3 4 6 drop_writes corrupt_bio_byte 4294967295 r 255 0",
        ),
        (
            "0 3 4 9 random_write_corrupt 7 corrupt_bio_byte 1 r 0 0 random_read_corrupt 1000000000",
            "0 3 4 9 corrupt_bio_byte 1 r 0 0 random_read_corrupt 1000000000 random_write_corrupt 7",
        ),
        ("0 3 4 3 error_writes random_read_corrupt 500", "0 3 4 3 error_writes random_read_corrupt 500"),
        ("0 3 4 4 random_write_corrupt 0 random_read_corrupt 9", "0 3 4 2 random_read_corrupt 9"),
        // `%u` keeps the low 32 bits of the interval.
        ("0 4294967297 0", "0 1 0 2 error_reads error_writes"),
        ("17 4294967294 1", "17 4294967294 1 2 error_reads error_writes"),
    ];
    for (i, (args, table)) in cases.iter().enumerate() {
        let name = format!("t{i}");
        d.dmsetup(&["create", &name, "--table", &format!("0 {SECTORS} flakey {f} {args}")]).ok();
        assert_eq!(d.dmsetup(&["table", &name]).ok(), format!("0 {SECTORS} flakey {dev} {table}\n"), "{args}");
        // INFO is empty.
        assert_eq!(d.dmsetup(&["status", &name]).ok(), format!("0 {SECTORS} flakey \n"), "{args}");
    }
    // No message handler.
    assert!(d.dmsetup(&["message", "t0", "0", "anything"]).err().contains("Invalid argument"));
}

// ---------------------------------------------------------------------------------------------
// The down interval (`up_interval 0`: always down).

#[test]
fn flakey_no_features_fails_reads_and_writes() {
    let d = Daemon::start();
    let f = flakey(&d, "fl", "0 1", 1);
    let o = qemu_io(&d, "fl", &["read 0 4k"]);
    assert!(failed(&o, "read"), "{o:?}");
    let o = qemu_io(&d, "fl", &["write -P 0x5a 8k 4k"]);
    assert!(failed(&o, "write"), "{o:?}");
    assert_eq!(file_bytes(&f), pattern(BYTES, 1), "nothing was written");
}

#[test]
fn flakey_error_reads_fails_reads_only() {
    let d = Daemon::start();
    let f = flakey(&d, "fl", "0 1 1 error_reads", 2);
    let o = qemu_io(&d, "fl", &["read 4k 4k"]);
    assert!(failed(&o, "read"), "{o:?}");
    // Writes pass through unchanged.
    let o = qemu_io(&d, "fl", &["write -P 0x5a 8k 4k"]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    let mut want = pattern(BYTES, 2);
    want[8192..12288].fill(0x5a);
    assert_eq!(file_bytes(&f), want);
}

#[test]
fn flakey_drop_writes_succeed_without_writing() {
    let d = Daemon::start();
    let f = flakey(&d, "fl", "0 1 1 drop_writes", 3);
    let o = qemu_io(&d, "fl", &["write -P 0x5a 0 64k", "write -z 64k 64k", "discard 128k 64k", "flush"]);
    assert!(!o.ok().contains("failed"), "writes, zeroes, discards and flushes all succeed: {o:?}");
    assert_eq!(file_bytes(&f), pattern(BYTES, 3), "nothing reached the file");
    // Reads are not affected by drop_writes: the file's bytes come back.
    let got = read_ranges(&d, "fl", &[(0, 4096), (200 * 1024, 512)]).unwrap();
    assert_eq!(got[0], pattern(BYTES, 3)[..4096]);
    assert_eq!(got[1], pattern(BYTES, 3)[200 * 1024..200 * 1024 + 512]);
}

#[test]
fn flakey_error_writes_fail_and_leave_the_file() {
    let d = Daemon::start();
    let f = flakey(&d, "fl", "0 1 1 error_writes", 4);
    let o = qemu_io(&d, "fl", &["write -P 0x5a 4k 4k"]);
    assert!(failed(&o, "write"), "{o:?}");
    // An empty flush is a write (qemu-io reports its failure only in the exit code).
    let o = qemu_io(&d, "fl", &["flush"]);
    assert_ne!(o.code, 0, "{o:?}");
    assert_eq!(file_bytes(&f), pattern(BYTES, 4));
    // Reads pass.
    let got = read_ranges(&d, "fl", &[(4096, 4096)]).unwrap();
    assert_eq!(got[0], pattern(BYTES, 4)[4096..8192]);
}

#[test]
fn flakey_corrupt_bio_byte_on_reads_sets_byte_n_of_each_read() {
    let d = Daemon::start();
    let f = flakey(&d, "fl", "0 1 5 corrupt_bio_byte 10 r 165 0", 5);
    let data = pattern(BYTES, 5);
    let ranges = [(0u64, 4096usize), (8192, 512), (65536, 65536), (4096, 9), (12288, 10)];
    let got = read_ranges(&d, "fl", &ranges).unwrap();
    for (&(off, len), got) in ranges.iter().zip(&got) {
        let mut want = data[off as usize..off as usize + len].to_vec();
        // Byte N = 10 of the bio is at index 9; a 9-byte read is a whole-sector bio, so it is
        // corrupted too, but outside what the client asked for.
        if len >= 10 {
            want[9] = 165;
        }
        assert_eq!(got, &want, "read of {len} at {off}");
    }
    // The file itself is untouched, and so are writes.
    assert_eq!(file_bytes(&f), data);
    let o = qemu_io(&d, "fl", &["write -P 0x11 0 4k"]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    assert!(file_bytes(&f)[..4096].iter().all(|&b| b == 0x11), "a write is not corrupted by an `r` feature");

    // nbdcopy, one request per 64 KiB: byte 9 of every request is 165, nothing else changed.
    let out = d.path("copy.out");
    d.run("nbdcopy", &["--request-size=65536", "--no-extents", &d.nbd_uri("fl"), out.to_str().unwrap()]).ok();
    let copy = std::fs::read(&out).unwrap();
    let mut want = file_bytes(&f);
    for chunk in want.chunks_mut(65536) {
        chunk[9] = 165;
    }
    assert_eq!(differing(&copy, &want), Vec::<usize>::new());
}

#[test]
fn flakey_corrupt_bio_byte_on_writes_lands_in_the_file() {
    let d = Daemon::start();
    let f = flakey(&d, "fl", "0 1 5 corrupt_bio_byte 100 w 0 0", 6);
    let o = qemu_io(&d, "fl", &["write -P 0x77 0 4k", "write -P 0x66 64k 512", "write -P 0x55 128k 64"]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    let mut want = pattern(BYTES, 6);
    want[..4096].fill(0x77);
    want[99] = 0;
    want[65536..66048].fill(0x66);
    want[65536 + 99] = 0;
    // An unaligned write reaches the device as one whole-sector write of the patched sector:
    // its byte 100 is the sector's, which the client did not write.
    want[131072..131072 + 64].fill(0x55);
    want[131072 + 99] = 0;
    assert_eq!(differing(&file_bytes(&f), &want), Vec::<usize>::new());
    // Reads are not corrupted by a `w` feature.
    let got = read_ranges(&d, "fl", &[(0, 4096)]).unwrap();
    assert_eq!(got[0], want[..4096]);
}

#[test]
fn flakey_corrupt_bio_byte_past_the_bio_does_nothing() {
    let d = Daemon::start();
    let f = flakey(&d, "fl", "0 1 5 corrupt_bio_byte 8192 w 0 0", 7);
    let o = qemu_io(&d, "fl", &["write -P 0x77 0 4k", "write -P 0x66 64k 8k"]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    let mut want = pattern(BYTES, 7);
    want[..4096].fill(0x77);
    want[65536..73728].fill(0x66);
    // Byte 8192 exists only in the 8 KiB write.
    want[65536 + 8191] = 0;
    assert_eq!(differing(&file_bytes(&f), &want), Vec::<usize>::new());
}

#[test]
fn flakey_corrupt_flags_select_fua_writes() {
    let d = Daemon::start();
    // 131072 = REQ_FUA in a current kernel's bi_opf.
    let f = flakey(&d, "fl", "0 1 5 corrupt_bio_byte 1 w 35 131072", 8);
    let o = qemu_io(&d, "fl", &["write -P 0x11 0 4k", "write -f -P 0x22 4k 4k"]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    let got = file_bytes(&f);
    assert!(got[..4096].iter().all(|&b| b == 0x11), "a write without FUA is left alone");
    assert_eq!(got[4096], 35, "the FUA write is corrupted");
    assert!(got[4097..8192].iter().all(|&b| b == 0x22));
    // Reads never carry FUA: a read mask with the bit matches nothing.
    let d2 = Daemon::start();
    let f2 = flakey(&d2, "fr", "0 1 5 corrupt_bio_byte 1 r 35 131072", 9);
    let got = read_ranges(&d2, "fr", &[(0, 4096)]).unwrap();
    assert_eq!(got[0], file_bytes(&f2)[..4096]);
}

#[test]
fn flakey_never_down_passes_io_through() {
    let d = Daemon::start();
    let f = flakey(&d, "e", "1000 0", 10);
    let k = flakey(&d, "k", "1000 0 7 corrupt_bio_byte 1 r 0 0 random_write_corrupt 1000000000", 13);
    for (name, path, seed) in [("e", &f, 10u8), ("k", &k, 13)] {
        let got = read_ranges(&d, name, &[(0, 4096), (100_000, 5000)]).unwrap();
        let data = pattern(BYTES, seed);
        assert_eq!(got[0], data[..4096], "{name}");
        assert_eq!(got[1], data[100_000..105_000], "{name}");
        // A flush on its own succeeds (the failing one in the error_writes test is flakey's).
        assert_eq!(qemu_io(&d, name, &["flush"]).code, 0);
        let o = qemu_io(&d, name, &["write -P 0x42 8k 8k", "flush"]);
        assert!(!o.ok().contains("failed"), "{o:?}");
        let mut want = data.clone();
        want[8192..16384].fill(0x42);
        assert_eq!(differing(&file_bytes(path), &want), Vec::<usize>::new(), "{name}");
    }
}

#[test]
fn flakey_random_read_corrupt_changes_at_most_one_byte_per_read() {
    let d = Daemon::start();
    let f = flakey(&d, "fl", "0 1 2 random_read_corrupt 1000000000", 14);
    let data = file_bytes(&f);
    let ranges: Vec<(u64, usize)> = (0..64).map(|i| (i * 4096, 4096)).collect();
    let got = read_ranges(&d, "fl", &ranges).unwrap();
    let mut changed = 0;
    for (&(off, len), got) in ranges.iter().zip(&got) {
        let diff = differing(got, &data[off as usize..off as usize + len]);
        assert!(diff.len() <= 1, "read at {off}: bytes {diff:?} differ");
        changed += diff.len();
    }
    // A random byte keeps its value with probability 1/256: 64 reads all unchanged is 2^-512.
    assert!(changed > 32, "only {changed} of 64 reads were corrupted");
    assert_eq!(file_bytes(&f), data, "the file is untouched");
    // Writes are not corrupted by random_read_corrupt.
    let o = qemu_io(&d, "fl", &["write -P 0x3c 0 64k"]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    assert!(file_bytes(&f)[..65536].iter().all(|&b| b == 0x3c));
}

#[test]
fn flakey_random_write_corrupt_changes_at_most_one_byte_per_write() {
    let d = Daemon::start();
    let f = flakey(&d, "fl", "0 1 2 random_write_corrupt 1000000000", 15);
    let cmds: Vec<String> = (0..32).map(|i| format!("write -P 0x5a {} 4k", i * 4096)).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let o = qemu_io(&d, "fl", &cmds);
    assert!(!o.ok().contains("failed"), "{o:?}");
    let got = file_bytes(&f);
    let mut changed = 0;
    for (i, chunk) in got[..32 * 4096].chunks(4096).enumerate() {
        let n = chunk.iter().filter(|&&b| b != 0x5a).count();
        assert!(n <= 1, "write {i}: {n} bytes corrupted");
        changed += n;
    }
    assert!(changed > 16, "only {changed} of 32 writes were corrupted");
    assert_eq!(got[32 * 4096..], pattern(BYTES, 15)[32 * 4096..], "nothing else written");
    // Reads are not corrupted by random_write_corrupt.
    let ranges: Vec<(u64, usize)> = (0..16).map(|i| (i * 4096, 4096)).collect();
    for (&(off, len), r) in ranges.iter().zip(read_ranges(&d, "fl", &ranges).unwrap()) {
        assert_eq!(r, got[off as usize..off as usize + len], "read at {off}");
    }

    // Write-zeroes reach flakey as writes from one shared zero buffer, 1 MiB at a time: each
    // write corrupts its own copy, never the shared buffer, so every MiB has at most one
    // non-zero byte (corrupting in place would accumulate them).
    let d = Daemon::start();
    let g = d.file("big.img", 8192);
    std::fs::write(&g, vec![0xffu8; 8192 * 512]).unwrap();
    d.dmsetup(&["create", "z", "--table", &format!("0 8192 flakey {g} 0 0 1 2 random_write_corrupt 1000000000")]).ok();
    let o = qemu_io(&d, "z", &["write -z 0 4M"]);
    assert!(!o.ok().contains("failed"), "{o:?}");
    let got = file_bytes(&g);
    for (i, mib) in got.chunks(1 << 20).enumerate() {
        let n = mib.iter().filter(|&&b| b != 0).count();
        assert!(n <= 1, "MiB {i}: {n} non-zero bytes");
    }
}

#[test]
fn flakey_clock_starts_when_the_table_is_constructed() {
    let d = Daemon::start();
    let f = d.file("f.img", SECTORS);
    std::fs::write(&f, pattern(BYTES, 16)).unwrap();
    // Up for the first second after the table is loaded, then down for 1000 s.
    d.dmsetup(&["create", "fl", "--notable"]).ok();
    d.dmsetup(&["load", "fl", "--table", &format!("0 {SECTORS} flakey {f} 0 1 1000 1 error_reads")]).ok();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // Resumed more than a second after construction: already down.
    d.dmsetup(&["resume", "fl"]).ok();
    let o = qemu_io(&d, "fl", &["read 0 4k"]);
    assert!(failed(&o, "read"), "{o:?}");
}
