//! The switch target without an engine: mapping, `set_region_mappings`, the RFC upload, status,
//! and a proptest against a naive model.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::dm::pdev::PdevKind;
use crate::dm::DevNum;
use crate::ioctl::dm_switch::pack_entries;

fn paths(n: usize) -> Vec<(Arc<Pdev>, Sectors)> {
    (0..n)
        .map(|i| {
            let p = Pdev::new(DevNum::new(8, i as u32), PdevKind::Block { path: format!("/dev/p{i}") }, Sectors(0));
            (Arc::new(p), Sectors(1_000_000 * i as u64))
        })
        .collect()
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

fn msg(sw: &Switch, s: &str) -> DmResult<Option<String>> {
    sw.message(&args(s))
}

/// Path per region.
fn regions(sw: &Switch) -> Vec<usize> {
    let l = sw.lookup();
    (0..sw.nr_regions()).map(|r| l.path(r * sw.region_size).0).collect()
}

/// Maps a read of `len` sectors at `offset` as the core would (cut at the region's end first):
/// (path minor, remapped sector, length).
fn remap_io(sw: &Switch, offset: u64, len: u64) -> (u32, u64, u64) {
    let n = len.min(sw.to_region_end(offset));
    match sw.map(crate::io::bio::test_bio(Op::Read, offset, n)) {
        Map::Remapped(b) => {
            let r = (b.device().expect("remapped").dev.minor, b.sector().0, b.sectors().0);
            b.end(Ok(()));
            r
        }
        m => panic!("{m:?}"),
    }
}

fn upload(sw: &Switch, dev_count: u16, bits: u8, total: u32, offset: u32, entries: &[u32]) -> DmResult<()> {
    let u = PageTableUpload {
        userland: [0x1234, 0xabcdef],
        page_total: total,
        page_offset: offset,
        page_count: entries.len() as u32,
        page_size: 0,
        dev_count,
        pte_bits: bits,
        entries: pack_entries(entries.iter().copied(), bits),
    };
    sw.upload_page_table(&u).expect("RFC switches take uploads")
}

#[test]
fn upstream_starts_round_robin_and_splits_at_region_boundaries() {
    // 1050 sectors in regions of 100: 11 regions, the last one partial.
    let sw = Switch::upstream(paths(3), 100, Sectors(1050)).unwrap();
    assert_eq!(sw.nr_regions(), 11);
    assert_eq!(regions(&sw), vec![0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1]);
    // Region 2 → path 2; the remapped sector is the path's start plus the offset in the target.
    assert_eq!(remap_io(&sw, 250, 200), (2, 2_000_250, 50));
    assert_eq!(remap_io(&sw, 1040, 10), (1, 1_001_040, 10));
    assert_eq!(remap_io(&sw, 300, 1000), (0, 300, 100));
    // Power-of-two regions take the shift path.
    let sw = Switch::upstream(paths(5), 64, Sectors(64 * 7 + 1)).unwrap();
    assert_eq!(regions(&sw), vec![0, 1, 2, 3, 4, 0, 1, 2]);
    assert_eq!(remap_io(&sw, 130, 100), (2, 2_000_130, 62));
    // Entry widths: the smallest that holds the path count.
    for (n, bits) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (16, 4), (17, 5), (256, 8), (257, 9)] {
        let sw = Switch::upstream(paths(n), 1, Sectors(10)).unwrap();
        assert_eq!(sw.table.load().as_ref().unwrap().table.bits(), bits, "{n} paths");
    }
    // A million regions over 16 paths: half a byte each.
    let sw = Switch::upstream(paths(16), 8, Sectors(8 << 20)).unwrap();
    assert_eq!(sw.table_bytes(), 512 * 1024);
    assert_eq!(sw.status(StatusType::Info, false), "");
    assert_eq!(sw.status(StatusType::Ima, false), "");
    assert_eq!(
        Switch::upstream(paths(2), 7, Sectors(1)).unwrap().status(StatusType::Table, false),
        "2 7 0 8:0 0 8:1 1000000"
    );
}

#[test]
fn set_region_mappings_follows_the_kernel_grammar() {
    let sw = Switch::upstream(paths(4), 1, Sectors(0x1100)).unwrap();
    // The documentation's example: 1000:1 :2 R2,10 sets 0x1000..=0x100b to 1 2 1 2 …
    msg(&sw, "set_region_mappings 1000:1 :2 R2,a").unwrap();
    let r = regions(&sw);
    assert_eq!(&r[0x1000..0x100d], &[1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 0]);
    assert_eq!(&r[..4], &[0, 1, 2, 3]);
    // The cursor starts at 0 in every message, so a leading `:p` sets region 1. Case-insensitive
    // keyword, hex digits in either case.
    msg(&sw, "SET_REGION_MAPPINGS :3 A:2 b:0 r1,2").unwrap();
    let r = regions(&sw);
    assert_eq!((r[0], r[1], r[0xa], r[0xb], r[0xc], r[0xd], r[0xe]), (0, 3, 2, 0, 0, 0, 2));
    // No arguments: nothing to do.
    msg(&sw, "set_region_mappings").unwrap();
    // Partial application: 0:1 and 2:3 stay applied when 5:4 fails.
    let before = regions(&sw);
    let e = msg(&sw, "set_region_mappings 0:1 2:3 5:4 6:1").unwrap_err();
    assert_eq!(e, DmError::Invalid("switch: invalid set_region_mappings device: 4 >= 4".into()));
    let r = regions(&sw);
    assert_eq!((r[0], r[2], r[5], r[6]), (1, 3, before[5], before[6]));
    let errors = [
        ("5", "invalid set_region_mappings argument: '5'"),
        ("5:", "invalid set_region_mappings argument: '5:'"),
        (":", "invalid set_region_mappings argument: ':'"),
        ("5:1x", "invalid set_region_mappings argument: '5:1x'"),
        ("g:1", "invalid set_region_mappings argument: 'g:1'"),
        ("0x5:1", "invalid set_region_mappings argument: '0x5:1'"),
        ("1100:0", "invalid set_region_mappings region number: 4352 >= 4352"),
        ("R", "invalid set_region_mappings argument: 'R'"),
        ("R,1", "invalid set_region_mappings argument: 'R,1'"),
        ("R1,", "invalid set_region_mappings argument: 'R1,'"),
        ("R1", "invalid set_region_mappings argument: 'R1'"),
        ("R1,2z", "invalid set_region_mappings argument: 'R1,2z'"),
        ("R0,1", "invalid set_region_mappings cycle length: 18446744073709551615 > 0"),
        ("R2,1", "invalid set_region_mappings cycle length: 1 > 0"),
        ("10ff:1 R1,1", "invalid set_region_mappings region number: 4351 + 1 >= 4352"),
        ("0:1 Rffffffffffffffff,1", "invalid set_region_mappings cycle length: 18446744073709551614 > 0"),
        ("1:1 R1,ffffffffffffffff", "invalid set_region_mappings region number: 1 + 18446744073709551615 >= 4352"),
    ];
    for (a, want) in errors {
        let e = msg(&sw, &format!("set_region_mappings {a}")).unwrap_err();
        assert_eq!(e, DmError::Invalid(format!("switch: {want}")), "{a}");
    }
    assert!(sw.message(&["set_region_mappings".into(), String::new()]).is_err());
    // Overlong hex wraps silently (no overflow check): 1_0000000000000001 is region 1.
    msg(&sw, "set_region_mappings 10000000000000001:2").unwrap();
    assert_eq!(regions(&sw)[1], 2);
    assert_eq!(msg(&sw, "bogus 1:1").unwrap_err(), DmError::Invalid("switch: Unrecognised message received.".into()));
}

#[test]
fn rfc_routes_to_path_zero_until_uploaded_and_counts() {
    let sw = Switch::rfc(paths(3), 10, Sectors(95));
    assert_eq!(sw.nr_regions(), 10);
    assert_eq!(sw.status(StatusType::Table, false), "3 10 8:0 0 8:1 1000000 8:2 2000000");
    assert_eq!(sw.status(StatusType::Info, false), "3 8:0 8:1 8:2 5 AAA 00000000 00000000 0 0");
    assert_eq!(remap_io(&sw, 25, 20), (0, 25, 5));
    assert_eq!(sw.counters(), (0, 1));
    assert!(sw.message(&args("set_region_mappings 0:1")).is_err());
    // 2-bit entries; 3 (no such path) and regions past the upload go to path 0, unmapped.
    upload(&sw, 3, 2, 10, 0, &[2, 1, 3, 0, 1, 2]).unwrap();
    let l = sw.lookup();
    let got: Vec<(usize, bool)> = (0..10).map(|r| l.path(r * 10)).collect();
    drop(l);
    let want = [
        (2, true),
        (1, true),
        (0, false),
        (0, true),
        (1, true),
        (2, true),
        (0, false),
        (0, false),
        (0, false),
        (0, false),
    ];
    assert_eq!(got, want);
    assert_eq!(remap_io(&sw, 54, 100), (2, 2_000_054, 6));
    remap_io(&sw, 94, 1);
    assert_eq!(sw.counters(), (1, 2));
    assert_eq!(sw.status(StatusType::Info, false), "3 8:0 8:1 8:2 5 AAA 00001234 00abcdef 1 2");
    assert_eq!(sw.status(StatusType::Ima, false), "");
}

#[test]
fn rfc_upload_checks_and_unaligned_chunks() {
    let sw = Switch::rfc(paths(4), 1, Sectors(100));
    let e = |r: DmResult<()>| match r.unwrap_err() {
        DmError::Invalid(s) => s,
        e => panic!("{e}"),
    };
    // No table yet: only offset 0 may start one.
    assert_eq!(e(upload(&sw, 4, 2, 50, 1, &[1])), "Invalid Page Table message: missing entries");
    // The table in chunks that start mid-word (16 two-bit entries per wire word).
    let want: Vec<u32> = (0..50).map(|i| (i * 7 % 4) as u32).collect();
    upload(&sw, 4, 2, 50, 0, &want[..5]).unwrap();
    upload(&sw, 4, 2, 50, 5, &want[5..23]).unwrap();
    // A hole of one entry is missing entries (the RFC let `ptbl_num + 1` through).
    assert_eq!(e(upload(&sw, 4, 2, 50, 24, &want[24..30])), "Invalid Page Table message: missing entries");
    upload(&sw, 4, 2, 50, 23, &want[23..50]).unwrap();
    assert_eq!(regions(&sw)[..50], want.iter().map(|&v| v as usize).collect::<Vec<_>>()[..]);
    // Parameters are fixed except when rebuilding from offset 0.
    assert_eq!(e(upload(&sw, 3, 2, 50, 10, &[1])), "Invalid Page Table message: invalid device count 3");
    assert_eq!(e(upload(&sw, 4, 4, 50, 10, &[1])), "Invalid Page Table message: number of bits changed");
    assert_eq!(e(upload(&sw, 4, 2, 60, 10, &[1])), "Invalid Page Table message: total number of entries changed");
    // Rewriting inside the table: num becomes offset + count, as in the RFC.
    upload(&sw, 4, 2, 50, 10, &[3, 3]).unwrap();
    let l = sw.lookup();
    assert_eq!((l.path(11), l.path(12)), ((3, true), (0, false)));
    drop(l);
    // A rebuild from 0 may change width, total and device count (entries ≥ 4 are unmapped).
    upload(&sw, 16, 4, 200, 0, &[9, 3, 2]).unwrap();
    let l = sw.lookup();
    assert_eq!((l.path(0), l.path(1), l.path(2), l.path(3)), ((0, false), (3, true), (2, true), (0, false)));
    drop(l);
    // page_total beyond the device: only the device's 100 regions are stored.
    assert_eq!(sw.table_bytes(), 100 / 16 * 8 + 8);
    let all: Vec<u32> = (0..200).map(|i| i % 4).collect();
    upload(&sw, 4, 32, 200, 0, &all).unwrap();
    assert_eq!(sw.table_bytes(), 400);
    assert_eq!(regions(&sw), (0..100).map(|i| i % 4).collect::<Vec<_>>());
    // The upstream form takes no uploads.
    let up = Switch::upstream(paths(2), 1, Sectors(4)).unwrap();
    assert!(up
        .upload_page_table(&PageTableUpload {
            userland: [0; 2],
            page_total: 1,
            page_offset: 0,
            page_count: 0,
            page_size: 1,
            dev_count: 2,
            pte_bits: 1,
            entries: vec![]
        })
        .is_none());
}

#[test]
fn lookups_under_concurrent_uploads_see_whole_chunks() {
    // Every chunk writes one value to all regions; a lookup section must see one value throughout.
    let sw = Arc::new(Switch::rfc(paths(4), 1, Sectors(4096)));
    upload(&sw, 4, 2, 4096, 0, &[0; 4096]).unwrap();
    let reader = {
        let sw = sw.clone();
        std::thread::spawn(move || {
            for _ in 0..2000 {
                let l = sw.lookup();
                let first = l.path(0);
                assert!((0..4096).step_by(7).all(|o| l.path(o) == first));
            }
        })
    };
    for i in 0..400u32 {
        upload(&sw, 4, 2, 4096, 0, &vec![i % 4; 4096]).unwrap();
    }
    reader.join().unwrap();
}

/// The naive model: one `u64` per region, the operations as data.
#[derive(Clone, Debug)]
enum Arg {
    Set(u64, u64),
    Next(u64),
    Repeat(u64, u64),
}

fn hex(v: u64, upper: bool) -> String {
    if upper {
        format!("{v:X}")
    } else {
        format!("{v:x}")
    }
}

fn render(a: &Arg, upper: bool) -> String {
    match a {
        Arg::Set(r, p) => format!("{}:{}", hex(*r, upper), hex(*p, upper)),
        Arg::Next(p) => format!(":{}", hex(*p, upper)),
        Arg::Repeat(n, m) => format!("{}{},{}", if upper { "R" } else { "r" }, hex(*n, upper), hex(*m, upper)),
    }
}

/// Applies one message to the model; false when an argument fails (earlier ones stay).
fn model_message(m: &mut [u64], nr_paths: u64, args: &[Arg]) -> bool {
    let mut cur: u64 = 0;
    for a in args {
        let (r, p) = match *a {
            Arg::Set(r, p) => (r, p),
            Arg::Next(p) => (cur + 1, p),
            Arg::Repeat(n, k) => {
                if n == 0 || n - 1 > cur || cur + k >= m.len() as u64 {
                    return false;
                }
                for _ in 0..k {
                    cur += 1;
                    m[cur as usize] = m[(cur - n) as usize];
                }
                continue;
            }
        };
        cur = r;
        if r >= m.len() as u64 || p >= nr_paths {
            return false;
        }
        m[r as usize] = p;
    }
    true
}

fn arg_strategy(nr_regions: u64, nr_paths: u64) -> impl Strategy<Value = Arg> {
    prop_oneof![
        4 => (0..nr_regions + 2, 0..nr_paths + 1).prop_map(|(r, p)| Arg::Set(r, p)),
        4 => (0..nr_paths + 1).prop_map(Arg::Next),
        2 => (0..4u64, 0..nr_regions.min(40) + 2).prop_map(|(n, k)| Arg::Repeat(n, k)),
    ]
}

/// The RFC model: (bits, total, num, entries of the whole page_total).
type RfcModel = Option<(u8, u32, u64, Vec<u64>)>;

#[derive(Clone, Debug)]
struct Chunk {
    dev_count: u16,
    bits: u8,
    total: u32,
    offset: u32,
    entries: Vec<u32>,
}

/// Parameter sets chunks choose from: (dev_count, pte_bits, page_total).
const PARAMS: [(u16, u8, u32); 5] = [(4, 2, 40), (4, 2, 40), (4, 4, 64), (3, 3, 40), (4, 32, 20)];

/// A chunk as generated: parameters, where it starts relative to the model's progress, entries.
#[derive(Clone, Debug)]
struct ChunkSpec {
    params: usize,
    /// 0: offset 0; 1: continue at num; 2: overlap (num − back); 3: a hole (num + 1); 4: `raw`.
    start: u8,
    back: u32,
    raw: u32,
    entries: Vec<u32>,
}

fn chunk_strategy() -> impl Strategy<Value = ChunkSpec> {
    (
        0..PARAMS.len(),
        prop_oneof![3 => Just(0u8), 5 => Just(1), 2 => Just(2), 1 => Just(3), 1 => Just(4)],
        0..20u32,
        0..70u32,
        proptest::collection::vec(0..8u32, 0..70),
    )
        .prop_map(|(params, start, back, raw, entries)| ChunkSpec { params, start, back, raw, entries })
}

/// Makes the chunk concrete against the model's progress (the model is the reference, so using
/// its state to aim chunks is fair).
fn concretise(m: &RfcModel, c: &ChunkSpec) -> Chunk {
    let (dev_count, bits, total) = PARAMS[c.params];
    let num = m.as_ref().map_or(0, |(_, _, n, _)| *n as u32);
    let offset = match c.start {
        0 => 0,
        1 => num,
        2 => num.saturating_sub(c.back),
        3 => num + 1,
        _ => c.raw,
    }
    .min(total);
    let mask = if bits >= 32 { u32::MAX } else { (1 << bits) - 1 };
    let n = c.entries.len().min((total - offset) as usize);
    Chunk { dev_count, bits, total, offset, entries: c.entries[..n].iter().map(|v| v & mask).collect() }
}

fn model_upload(m: &mut RfcModel, nr_paths: usize, c: &Chunk) -> bool {
    let off = c.offset as u64;
    match m {
        None if off != 0 => return false,
        Some((_, _, num, _)) if off > *num => return false,
        Some((bits, total, _, _))
            if off != 0 && (c.dev_count as usize != nr_paths || c.bits != *bits || c.total != *total) =>
        {
            return false
        }
        _ => {}
    }
    if off == 0 {
        *m = Some((c.bits, c.total, 0, vec![0; c.total as usize]));
    }
    let (_, _, num, e) = m.as_mut().unwrap();
    for (j, &v) in c.entries.iter().enumerate() {
        e[c.offset as usize + j] = v as u64;
    }
    *num = off + c.entries.len() as u64;
    true
}

fn check_lookups(sw: &Switch, expect: impl Fn(u64) -> (usize, bool), len: u64) {
    let l = sw.lookup();
    for o in (0..len).step_by(((len / 97) as usize).max(1)).chain([len - 1]) {
        assert_eq!(l.path(o), expect(sw.region(o)), "offset {o}");
    }
    drop(l);
    // Every region start, and the split at region ends.
    for r in 0..sw.nr_regions() {
        let o = r * sw.region_size;
        let (p, _) = expect(r);
        let (minor, sector, max_len) = remap_io(sw, o, len - o);
        assert_eq!((minor as usize, sector), (p, 1_000_000 * p as u64 + o));
        assert_eq!(max_len, sw.region_size.min(len - o));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn upstream_lookups_match_a_naive_model(
        (len, region_size, nr_paths, messages) in (1..3000u64, 1..200u32, 1..20usize).prop_flat_map(|(len, rs, np)| {
            let nr = len.div_ceil(rs as u64);
            (Just(len), Just(rs), Just(np), proptest::collection::vec((proptest::collection::vec(arg_strategy(nr, np as u64), 0..12), any::<bool>()), 0..8))
        })
    ) {
        let sw = Switch::upstream(paths(nr_paths), region_size, Sectors(len)).unwrap();
        let nr = sw.nr_regions();
        let mut model: Vec<u64> = (0..nr).map(|r| r % nr_paths as u64).collect();
        for (m, upper) in &messages {
            let text: Vec<String> = std::iter::once("set_region_mappings".to_owned()).chain(m.iter().map(|a| render(a, *upper))).collect();
            let ok = model_message(&mut model, nr_paths as u64, m);
            prop_assert_eq!(sw.message(&text).is_ok(), ok, "{:?}", text);
        }
        check_lookups(&sw, |r| (model[r as usize] as usize, true), len);
    }

    #[test]
    fn rfc_lookups_match_a_naive_model(
        len in 1..600u64,
        page_size in 1..40u32,
        chunks in proptest::collection::vec(chunk_strategy(), 1..12),
    ) {
        let sw = Switch::rfc(paths(4), page_size, Sectors(len));
        let mut model: RfcModel = None;
        let expect_in = |model: &RfcModel, r: u64| match model {
            Some((_, _, num, e)) if r < *num && e[r as usize] < 4 => (e[r as usize] as usize, true),
            _ => (0, false),
        };
        for (i, spec) in chunks.iter().enumerate() {
            let c = &concretise(&model, spec);
            // Now and then a lookup section stays open across the upload: it keeps seeing the
            // table as it was (and the old snapshot cannot become the writer's spare).
            let held = (i % 3 == 1).then(|| (sw.lookup(), model.clone()));
            let ok = model_upload(&mut model, 4, c);
            prop_assert_eq!(upload(&sw, c.dev_count, c.bits, c.total, c.offset, &c.entries).is_ok(), ok, "{:?}", c);
            if let Some((l, before)) = held {
                for o in 0..len {
                    prop_assert_eq!(l.path(o), expect_in(&before, sw.region(o)));
                }
            }
        }
        let expect = |r: u64| expect_in(&model, r);
        check_lookups(&sw, expect, len);
    }
}
