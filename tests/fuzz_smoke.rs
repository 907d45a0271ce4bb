//! The fuzz targets without a fuzzer (docs/fuzzing.md): a fixed-seed mutation loop over the seed
//! corpus in `fuzz/corpus/<target>/`, through the same entry points (`dmemu::fuzzing`) the
//! cargo-fuzz crate calls. Deterministic: a xorshift generator with a constant seed. It must not
//! panic, in the caller's thread or any other (the NBD server's workers).
//!
//! `DMEMU_FUZZ_ITERS=<n>` sets the iterations per target (the default takes a few seconds each in
//! a debug build); `DMEMU_FUZZ_SEED=<n>` another seed. A failing input is written to
//! `target/fuzz-smoke/<target>-<iteration>` for `cargo fuzz run <target> <file>` or a regression
//! test. `cargo test --test fuzz_smoke -- --ignored write_corpus` rewrites the seed corpus.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::Instant;

use dmemu::fuzzing;

// ---- the mutation loop --------------------------------------------------------------------------

/// xorshift64* (Vigna): small, fast and plenty for picking mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Integers that break size arithmetic: zero, one, all ones, the sign bits, powers of two around
/// the sizes the codecs use.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    16,
    312,
    512,
    4096,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 30,
    1 << 32,
    1 << 63,
    (1 << 63) - 1,
    u64::MAX,
    u64::MAX - 1,
];

/// Tokens for the text formats (table lines, plists): numbers that overflow, escapes, tags.
const TOKENS: &[&str] = &[
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775808",
    "4294967295",
    "4294967296",
    "-1",
    "0",
    "0x",
    "0xffffffffffffffff",
    " ",
    "\n",
    "\t",
    "\\",
    "-",
    "!0 ",
    "/dev/mapper/z",
    "252:0",
    "251:0",
    "/f/missing",
    "linear",
    "striped",
    "zero",
    "error",
    "switch",
    "flakey",
    "dust",
    "delay",
    "<dict>",
    "</dict>",
    "<array>",
    "</array>",
    "<key>",
    "</key>",
    "<string>",
    "<integer>",
    "<true/>",
    "<data>",
    "&amp;",
    "&#",
    "<!--",
    "\0",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let at = rng.below(len);
                input[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                input[at] = rng.next() as u8;
            }
            2 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(8);
                for _ in 0..n {
                    input.insert(at, rng.next() as u8);
                }
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                input.drain(at..at + n);
            }
            4 => {
                // An interesting integer, 1, 2, 4 or 8 bytes wide, either byte order.
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let width = 1 << rng.below(4);
                let bytes = if rng.below(2) == 0 { v.to_le_bytes() } else { (v << (64 - 8 * width)).to_be_bytes() };
                let at = rng.below(len + 1);
                let end = (at + width).min(len);
                input.splice(at..end, bytes[..width].iter().copied());
            }
            5 => {
                // Splice: a stretch of another seed over or into this one.
                let other = &seeds[rng.below(seeds.len())];
                if other.is_empty() {
                    continue;
                }
                let from = rng.below(other.len());
                let n = 1 + rng.below((other.len() - from).min(512));
                let at = rng.below(len + 1);
                let end = if rng.below(2) == 0 { at } else { (at + n).min(len) };
                input.splice(at..end, other[from..from + n].iter().copied());
            }
            6 if len > 0 => {
                // Repeat a stretch (more records, longer lists).
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(256));
                let chunk: Vec<u8> = input[at..at + n].to_vec();
                input.splice(at..at, chunk);
            }
            7 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                let at = rng.below(len + 1);
                input.splice(at..at, t.iter().copied());
            }
            8 if len > 0 => input.truncate(rng.below(len)),
            _ => {}
        }
    }
    // Inputs stay small, as a fuzzer's do: big allocations would only be the mutator's.
    input.truncate(64 << 10);
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    let out: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).expect("corpus file")).collect();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// Panics in any thread since the hook went in (the NBD server's workers are not ours to join).
static PANICS: AtomicUsize = AtomicUsize::new(0);
static HOOK: Once = Once::new();
/// One target at a time: the panic count is process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

fn install_hook() {
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn env_u64(k: &str) -> Option<u64> {
    std::env::var(k).ok().and_then(|v| v.parse().ok())
}

/// Runs `iters` mutated inputs (every seed once as is first) through `target`.
fn smoke(target: &str, default_iters: u64) {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    install_hook();
    let f = fuzzing::TARGETS.iter().find(|(n, _)| *n == target).expect("a known target").1;
    let seeds = seeds(target);
    let iters = env_u64("DMEMU_FUZZ_ITERS").unwrap_or(default_iters);
    let mut rng = Rng(env_u64("DMEMU_FUZZ_SEED").unwrap_or(0x9e37_79b9_7f4a_7c15) | 1);
    let t0 = Instant::now();
    for i in 0..seeds.len() as u64 + iters {
        let mut input = seeds[(i as usize) % seeds.len()].clone();
        if i >= seeds.len() as u64 {
            mutate(&mut rng, &seeds, &mut input);
        }
        let before = PANICS.load(Ordering::SeqCst);
        let r = std::panic::catch_unwind(|| f(&input));
        if r.is_err() || PANICS.load(Ordering::SeqCst) != before {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-smoke");
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{target}-{i}"));
            let _ = std::fs::write(&file, &input);
            panic!("{target}: input {i} panicked; saved as {}", file.display());
        }
    }
    // The figure docs/fuzzing.md quotes; visible with --nocapture.
    eprintln!("{target}: {} inputs in {:.1?}", seeds.len() as u64 + iters, t0.elapsed());
}

#[test]
fn linux_ioctl() {
    smoke("linux_ioctl", 10000);
}

#[test]
fn proplib() {
    smoke("proplib", 6000);
}

#[test]
fn dm_switch() {
    smoke("dm_switch", 40000);
}

#[test]
fn nbd() {
    smoke("nbd", 8000);
}

#[test]
fn table_load() {
    smoke("table_load", 25000);
}

// ---- the seed corpus ----------------------------------------------------------------------------

mod corpus {
    use dmemu::client::IoctlBuf;
    use dmemu::fuzzing::{ioctl_record, DM_MAJOR, SWITCH_MINOR};
    use dmemu::ioctl::dm_switch::{self, IpcPgTable};
    use dmemu::ioctl::layout::{DmCmd, DmFlags};
    use dmemu::ioctl::netbsd::{externalize, Dict, Value};
    use dmemu::nbd::proto::*;

    /// An exact-size buffer (`size` bytes when the reply needs room).
    fn buf(b: IoctlBuf, size: usize) -> Vec<u8> {
        IoctlBuf { size, ..b }.bytes()
    }

    fn rec(out: &mut Vec<u8>, b: IoctlBuf, size: usize) {
        let cmd = b.cmd.nr();
        out.extend(ioctl_record(cmd, &buf(b, size)));
    }

    fn load(n: &str, table: &[(u64, u64, &str, &str)]) -> IoctlBuf {
        IoctlBuf::new(DmCmd::TableLoad).name(n).table(table.iter().copied())
    }

    pub fn linux_ioctl() -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();

        let mut v = ioctl_record(DmCmd::Version.nr(), &buf(IoctlBuf::new(DmCmd::Version), 0));
        rec(&mut v, IoctlBuf::new(DmCmd::ListVersions), 1024);
        rec(&mut v, IoctlBuf::new(DmCmd::GetTargetVersion).name("linear"), 512);
        rec(&mut v, IoctlBuf::new(DmCmd::ListDevices), 1024);
        out.push(("versions", v));

        let mut v = Vec::new();
        rec(&mut v, IoctlBuf::new(DmCmd::DevCreate).name("a").uuid("UUID-a"), 0);
        rec(&mut v, load("a", &[(0, 8, "zero", ""), (8, 8, "error", "")]), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::DevSuspend).name("a"), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::TableStatus).name("a"), 1024);
        rec(&mut v, IoctlBuf::new(DmCmd::TableStatus).name("a").flags(DmFlags::STATUS_TABLE), 1024);
        rec(&mut v, IoctlBuf::new(DmCmd::TableDeps).uuid("UUID-a"), 1024);
        rec(&mut v, IoctlBuf::new(DmCmd::DevRename).name("a").string("b"), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::DevSuspend).name("b").flags(DmFlags::SUSPEND), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::DevSuspend).name("b"), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::DevStatus).name("b"), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::ListDevices).flags(DmFlags::UUID), 1024);
        rec(&mut v, IoctlBuf::new(DmCmd::DevRemove).name("b"), 0);
        out.push(("create_load_resume_rename_remove", v));

        let mut v = Vec::new();
        rec(&mut v, IoctlBuf::new(DmCmd::DevCreate).name("base"), 0);
        rec(&mut v, load("base", &[(0, 2048, "linear", "/f/4096 0")]), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::DevSuspend).name("base"), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::DevCreate).name("top"), 0);
        rec(&mut v, load("top", &[(0, 1024, "linear", "/dev/mapper/base 0"), (1024, 1024, "linear", "252:0 1024")]), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::DevSuspend).name("top"), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::DevRemove).name("base"), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::TableDeps).name("top"), 1024);
        rec(&mut v, IoctlBuf::new(DmCmd::DevRemove).name("base").flags(DmFlags::DEFERRED_REMOVE), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::RemoveAll), 0);
        out.push(("stacked_linear_remove_all", v));

        let mut v = Vec::new();
        rec(&mut v, IoctlBuf::new(DmCmd::DevCreate).name("d"), 0);
        rec(&mut v, load("d", &[(0, 1024, "dust", "/f/2048 0 512")]), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::DevSuspend).name("d"), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::TargetMsg).name("d").message(0, "addbadblock 7"), 512);
        rec(&mut v, IoctlBuf::new(DmCmd::TargetMsg).name("d").message(0, "enable"), 512);
        rec(&mut v, IoctlBuf::new(DmCmd::TargetMsg).name("d").message(0, "countbadblocks"), 512);
        rec(&mut v, IoctlBuf::new(DmCmd::DevWait).name("d"), 1024);
        rec(&mut v, IoctlBuf::new(DmCmd::DevArmPoll), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::DevSetGeometry).name("d").string("16 4 32 0"), 0);
        rec(&mut v, load("d", &[(0, 8, "zero", "")]).flags(DmFlags::READONLY), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::TableStatus).name("d").flags(DmFlags::QUERY_INACTIVE_TABLE), 1024);
        rec(&mut v, IoctlBuf::new(DmCmd::TableClear).name("d"), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::DevRemove).name("d"), 0);
        out.push(("dust_messages_wait_geometry", v));

        let mut v = Vec::new();
        rec(&mut v, IoctlBuf::new(DmCmd::DevCreate).name("m").flags(DmFlags::PERSISTENT_DEV), 0);
        rec(
            &mut v,
            load(
                "m",
                &[
                    (0, 64, "striped", "2 8 /f/a 0 /f/b 0"),
                    (64, 64, "flakey", "/f/c 0 1 1 1 drop_writes"),
                    (128, 64, "delay", "/f/d 0 0"),
                    (192, 64, "switch", "2 16 0 /f/e 0 /f/f 0"),
                ],
            ),
            0,
        );
        rec(&mut v, IoctlBuf::new(DmCmd::DevSuspend).name("m").flags(DmFlags::NOFLUSH), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::TargetMsg).name("m").message(192, "set_region_mappings 0:1 1:0"), 512);
        rec(&mut v, IoctlBuf::new(DmCmd::TableStatus).name("m").flags(DmFlags::STATUS_TABLE), 2048);
        rec(&mut v, IoctlBuf::new(DmCmd::DevSuspend).name("m").flags(DmFlags::SUSPEND | DmFlags::NOFLUSH), 0);
        rec(&mut v, IoctlBuf::new(DmCmd::DevRemove).name("m"), 0);
        out.push(("four_targets", v));

        out
    }

    fn key(k: &str) -> Vec<u8> {
        k.as_bytes().to_vec()
    }

    /// A request dictionary as NetBSD's libdm builds it.
    fn task(command: &str, extra: &[(&str, Value)]) -> Vec<u8> {
        let mut d = Dict::new();
        d.insert(key("command"), Value::str(command));
        d.insert(key("version"), Value::Array(vec![Value::u(4u32), Value::u(0u32), Value::u(0u32)]));
        for (k, v) in extra {
            d.insert(key(k), v.clone());
        }
        externalize(&d)
    }

    fn entry(start: u64, length: u64, ty: &str, params: &str) -> Value {
        let mut e = Dict::new();
        e.insert(key("start"), Value::u(start));
        e.insert(key("length"), Value::u(length));
        e.insert(key("type"), Value::str(ty));
        e.insert(key("params"), Value::str(params));
        Value::Dict(e)
    }

    pub fn proplib() -> Vec<(&'static str, Vec<u8>)> {
        let n = |s: &str| ("name", Value::str(s));
        let mut session = Vec::new();
        session.extend(task("version", &[]));
        session.extend(task("create", &[n("a")]));
        let table = Value::Array(vec![entry(0, 8, "zero", ""), entry(8, 8, "linear", "/f/64 0")]);
        session.extend(task("reload", &[n("a"), ("cmd_data", table)]));
        session.extend(task("resume", &[n("a")]));
        session.extend(task("status", &[n("a")]));
        session.extend(task("table", &[n("a"), ("flags", Value::u(0x10u32))]));
        session.extend(task("deps", &[n("a")]));
        session.extend(task("names", &[]));
        session.extend(task("rename", &[n("a"), ("cmd_data", Value::Array(vec![Value::str("b")]))]));
        session.extend(task("suspend", &[n("b"), ("flags", Value::u(0x2u32))]));
        session.extend(task("info", &[("minor", Value::u(0u32)), n("b")]));
        session.extend(task("clear", &[n("b")]));
        session.extend(task("remove", &[n("b")]));
        let mixed = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- a comment -->\n<plist version=\"1.0\">\n\
<dict>\n\t<key>command</key>\n\t<string>targets</string>\n\t<key>n</key>\n\t<integer>-17</integer>\n\
\t<key>o</key>\n\t<integer>010</integer>\n\t<key>b</key>\n\t<true/>\n\t<key>f</key>\n\t<false/>\n\
\t<key>d</key>\n\t<data>AAEC</data>\n\t<key>e</key>\n\t<array/>\n\t<key>s</key>\n\t<string>&lt;&amp;&gt;&quot;&apos;</string>\n\
\t<key>version</key>\n\t<array>\n\t\t<integer>0x4</integer>\n\t\t<integer>0X10</integer>\n\t\t<integer>0</integer>\n\t</array>\n\
</dict>\n</plist>\n\0";
        vec![
            ("version", task("version", &[])),
            ("targets", task("targets", &[])),
            ("session", session),
            ("types_and_entities", mixed.as_bytes().to_vec()),
        ]
    }

    fn pg(total: u32, offset: u32, count: u32, bits: u8, paths: u16, entries: impl Iterator<Item = u32>) -> Vec<u8> {
        let h = IpcPgTable {
            userland: [0x1234, 0x2026_1121],
            dev_major: DM_MAJOR,
            dev_minor: SWITCH_MINOR,
            page_total: total,
            page_offset: offset,
            page_count: count,
            page_size: 16,
            dev_count: paths,
            pte_bits: bits,
            ..Default::default()
        };
        dm_switch::page_table_message(&h, &dm_switch::pack_entries(entries, bits))
    }

    pub fn dm_switch() -> Vec<(&'static str, Vec<u8>)> {
        let mut whole = dm_switch::getfamily_request(1, dm_switch::FAMILY_NAME);
        whole.extend(dm_switch::upload_request(2, &pg(64, 0, 64, 4, 4, (0..64).map(|i| i % 4))));
        let mut chunks = Vec::new();
        chunks.extend(dm_switch::upload_request(1, &pg(64, 0, 40, 2, 4, (0..40).map(|i| (i * 3) % 4))));
        chunks.extend(dm_switch::upload_request(2, &pg(64, 40, 24, 2, 4, (0..24).map(|i| i % 4))));
        let acked = dm_switch::genl_message(
            dm_switch::FAMILY_ID,
            dm_switch::NLM_F_REQUEST | dm_switch::NLM_F_ACK,
            7,
            99,
            dm_switch::NETLINK_CMD_GET_PAGE_TBL,
            dm_switch::FAMILY_VERSION,
            &[(dm_switch::NETLINK_ATTR_MSG, &pg(64, 0, 16, 8, 3, (0..16).map(|i| i % 3)))],
        );
        let by_id = dm_switch::genl_message(
            dm_switch::GENL_ID_CTRL,
            dm_switch::NLM_F_REQUEST | dm_switch::NLM_F_ACK,
            3,
            0,
            dm_switch::CTRL_CMD_GETFAMILY,
            1,
            &[(dm_switch::CTRL_ATTR_FAMILY_ID, &dm_switch::FAMILY_ID.to_ne_bytes())],
        );
        vec![("getfamily_and_upload", whole), ("two_chunks", chunks), ("acked_8bit", acked), ("family_by_id", by_id)]
    }

    fn opt(out: &mut Vec<u8>, o: u32, data: &[u8]) {
        out.extend(IHAVEOPT.to_be_bytes());
        out.extend(o.to_be_bytes());
        out.extend((data.len() as u32).to_be_bytes());
        out.extend(data);
    }

    fn info(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend(name.as_bytes());
        d.extend((reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend(r.to_be_bytes());
        }
        d
    }

    fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend(name.as_bytes());
        d.extend((queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend((q.len() as u32).to_be_bytes());
            d.extend(q.as_bytes());
        }
        d
    }

    fn req(out: &mut Vec<u8>, flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) {
        out.extend(Request { flags, typ, cookie, offset, len }.encode());
        if typ == CMD_WRITE {
            out.extend((0..len).map(|i| i as u8));
        }
    }

    /// Client flags: fixed newstyle, no zeroes.
    const CFLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

    pub fn nbd() -> Vec<(&'static str, Vec<u8>)> {
        let mut go = vec![0u8];
        go.extend(CFLAGS.to_be_bytes());
        opt(&mut go, OPT_LIST, &[]);
        opt(&mut go, OPT_STRUCTURED_REPLY, &[]);
        opt(&mut go, OPT_LIST_META_CONTEXT, &meta("z", &["base:"]));
        opt(&mut go, OPT_SET_META_CONTEXT, &meta("z", &["base:allocation"]));
        opt(&mut go, OPT_INFO, &info("z", &[INFO_NAME, INFO_DESCRIPTION]));
        opt(&mut go, OPT_GO, &info("z", &[INFO_BLOCK_SIZE]));
        req(&mut go, 0, CMD_WRITE, 1, 0, 512);
        req(&mut go, CMD_FLAG_DF, CMD_READ, 2, 0, 4096);
        req(&mut go, 0, CMD_BLOCK_STATUS, 3, 0, 1 << 20);
        req(&mut go, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4, 4096, 8192);
        req(&mut go, CMD_FLAG_FUA, CMD_TRIM, 5, 0, 4096);
        req(&mut go, CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 6, 8192, 4096);
        req(&mut go, 0, CMD_FLUSH, 7, 0, 0);
        req(&mut go, 0, CMD_DISC, 8, 0, 0);

        let mut export_name = vec![1u8];
        export_name.extend(FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
        opt(&mut export_name, OPT_EXPORT_NAME, b"lin");
        req(&mut export_name, CMD_FLAG_FUA, CMD_WRITE, 1, 4096, 1024);
        req(&mut export_name, 0, CMD_READ, 2, 0, 8192);
        req(&mut export_name, 0, CMD_READ, 3, (4 << 20) - 512, 512);
        req(&mut export_name, 0, CMD_FLUSH, 4, 0, 0);
        req(&mut export_name, 0, CMD_DISC, 5, 0, 0);

        let mut errors = vec![3u8];
        errors.extend(CFLAGS.to_be_bytes());
        opt(&mut errors, 99, b"unknown");
        opt(&mut errors, OPT_SET_META_CONTEXT, &meta("z", &["base:allocation"]));
        opt(&mut errors, OPT_GO, &info("nope", &[]));
        opt(&mut errors, OPT_INFO, &info("ro", &[]));
        opt(&mut errors, OPT_GO, &info("e", &[]));
        req(&mut errors, 0, CMD_READ, 1, 0, 512);
        req(&mut errors, 0, CMD_WRITE, 2, 0, 512);
        req(&mut errors, 0, CMD_BLOCK_STATUS, 3, 0, 512);
        req(&mut errors, 0, 42, 4, 0, 0);
        req(&mut errors, 0, CMD_READ, 5, 1 << 40, 512);

        let mut striped = vec![5u8];
        striped.extend(CFLAGS.to_be_bytes());
        opt(&mut striped, OPT_STRUCTURED_REPLY, &[]);
        opt(&mut striped, OPT_GO, &info("st", &[]));
        for i in 0..8u64 {
            req(&mut striped, 0, CMD_WRITE, 10 + i, i * 2048, 2048);
            req(&mut striped, 0, CMD_READ, 20 + i, i * 2048 + 512, 3072);
        }
        req(&mut striped, 0, CMD_WRITE, 30, (4 << 20) - 512, 1024);

        let mut ro = vec![0u8];
        ro.extend(CFLAGS.to_be_bytes());
        opt(&mut ro, OPT_GO, &info("ro", &[]));
        req(&mut ro, 0, CMD_WRITE, 1, 0, 512);
        req(&mut ro, 0, CMD_TRIM, 2, 0, 512);
        req(&mut ro, 0, CMD_READ, 3, 0, 512);

        let mut abort = vec![0u8];
        abort.extend(CFLAGS.to_be_bytes());
        opt(&mut abort, OPT_ABORT, &[]);

        vec![
            ("go_structured_all_commands", go),
            ("export_name_linear", export_name),
            ("option_and_io_errors", errors),
            ("striped_in_flight", striped),
            ("read_only", ro),
            ("abort", abort),
        ]
    }

    pub fn table_load() -> Vec<(&'static str, Vec<u8>)> {
        let t = |s: &str| s.as_bytes().to_vec();
        vec![
            ("linear", t("0 1024 linear /f/4096 0\n1024 1024 linear /dev/mapper/z 2048\n")),
            ("striped", t("0 4096 striped 4 128 /f/a 0 /f/b 0 /f/c 0 /f/d 0\n")),
            ("zero_error", t("0 8 zero\n8 8 error\n-\n0 16 error a b c\n")),
            ("switch_upstream", t("0 1024 switch 3 64 0 /f/a 0 /f/b 0 252:0 0\n!0 set_region_mappings 0:1 :2 R2,3\n")),
            ("switch_rfc", t("0 1024 switch 4 64 /f/a 0 /f/b 0 /f/c 0 /f/d 0\n")),
            ("flakey", t("0 2048 flakey /f/a 0 5 5 3 corrupt_bio_byte 32 r 1 0 drop_writes\n")),
            ("dust", t("0 2048 dust /f/a 0 512\n!0 addbadblock 3\n!0 enable\n!0 listbadblocks\n!0 quiet\n")),
            ("delay", t("0 2048 delay /f/a 0 0 /f/b 0 0 /f/c 0 0\n")),
            (
                "multipath",
                t("0 2048 multipath 3 queue_if_no_path pg_init_retries 2 1 alua 2 1 round-robin 0 1 1 /f/a 1 \
                   service-time 0 2 2 /f/b 1 50 /dev/mapper/z 1 0\n\
                   !0 fail_path /f/b\n!0 switch_group 2\n!0 fail_if_no_path\n!0 reinstate_path /f/b\n-\n\
                   0 2048 multipath 0 0 1 1 historical-service-time 2 900 3 1 1 /f/a 4\n"),
            ),
            ("overflow", t("0 18446744073709551615 linear /f/a 18446744073709551615\n")),
        ]
    }
}

/// Seed files (name, bytes) per target.
type Seeds = Vec<(&'static str, Vec<u8>)>;

fn all_seeds() -> [(&'static str, Seeds); 5] {
    [
        ("linux_ioctl", corpus::linux_ioctl()),
        ("proplib", corpus::proplib()),
        ("dm_switch", corpus::dm_switch()),
        ("nbd", corpus::nbd()),
        ("table_load", corpus::table_load()),
    ]
}

#[test]
#[ignore = "rewrites fuzz/corpus; run by hand after changing an input layout"]
fn write_corpus() {
    for (target, files) in all_seeds() {
        let dir = corpus_dir(target);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).expect("corpus file");
        }
    }
}

/// The seeds are what the generator writes: they follow the input layouts.
#[test]
fn corpus_is_current() {
    for (target, files) in all_seeds() {
        for (name, bytes) in files {
            let on_disk = std::fs::read(corpus_dir(target).join(name)).unwrap_or_default();
            assert!(on_disk == bytes, "fuzz/corpus/{target}/{name} is stale: run write_corpus");
        }
    }
}
