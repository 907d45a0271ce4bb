//! `switch` 1.1.0: each fixed-size region of the device goes to one of N paths, chosen by a packed
//! page table (the Dell EqualLogic dm-switch RFC patch of 2011, never merged; upstream `dm-switch.c`,
//! linux-dm-abi.md §3.4). Both generations share the name; **the parity of the argument count
//! tells them apart**:
//!
//! * **odd — upstream 1.1.0**: `<num_paths> <region_size> <#optional_args=0> {<dev> <offset>}×num_paths`
//!   (3 + 2n words). Regions start round-robin; `set_region_mappings` messages change them. INFO
//!   status is empty, TABLE is `<n> <region_size> 0 {<maj:min> <offset>}…`.
//! * **even — the RFC**: `<dev_count> <page_size> {<dev> <start>}×dev_count` (2 + 2n words). There is
//!   no table until the binary `IpcPgTable` upload sends one (docs/protocols.md); until then, and for
//!   regions the upload has not reached, IO goes to path 0 and counts as unmapped. INFO status is
//!   the RFC's `<n> <maj:min>… 5 A… <userland0> <userland1> <remapped> <unmapped>`.
//!
//! An argument list meant for one form but with a count of the other's parity is parsed (and
//! refused) as the other form.
//!
//! Mapping, both forms: region = offset / region_size (a shift when the size is a power of two),
//! path = entry\[region\], sector = path.start + offset (the offset within the *target*). IO is split
//! at region boundaries; the last region may be partial.
//!
//! ## The page table and its updates
//! Entries are `bits` wide — the smallest width that holds the path count (upstream), or the
//! upload's `pte_bits` (RFC) — packed `64 / bits` to a 64-bit word. Lookups take no lock: the table
//! is an immutable snapshot behind an [`ArcSwapOption`], and every change (one message, one upload
//! chunk) builds a new snapshot and publishes it with one pointer swap. **Why arc-swap rather than
//! in-place atomic words**: an RFC upload can change the entry width and the table size, and its
//! metadata (width, valid entry count, total) must change together with the entries — the RFC
//! updated `pte_bits`/`ptbl_num` in place before copying the entries, so a concurrent lookup could
//! decode old entries with the new width. Per-word atomics cannot publish a new buffer without a
//! reclamation scheme, and that is what arc-swap is: readers never block or retry, writers never
//! wait for readers, the old snapshot is freed when its last reader lets go, and a lookup sees the
//! table exactly as it was before or after a whole message or chunk. The costs: a second buffer
//! while an upload is under way (the snapshot a chunk replaces becomes the next chunk's buffer once
//! no reader holds it, brought up to date by copying only the words its successor changed; an
//! upload's first chunk starts a fresh table, and a message copies the whole table: 512 KiB for
//! 1,048,576 regions of 4 bits), and
//! per lookup section arc-swap's guard; [`Switch::lookup`] holds one guard for any number of
//! lookups (the kernel's RCU read section), which is what a batch of IO should use
//! (docs/PERFORMANCE.md, "switch").
//!
//! ## The RFC upload (`get_page_tbl`), with the RFC's evident mistakes corrected
//! * a chunk's entries land at `page_offset…page_offset+page_count` whatever the alignment (the
//!   RFC rounded the start *up* to a whole 32-bit word and copied whole words, misplacing every
//!   chunk that did not start on a word);
//! * "missing entries" when `page_offset > ptbl_num` (the RFC allowed `ptbl_num + 1`, a one-entry
//!   hole);
//! * an entry equal to the device count is unmapped like any larger one (the RFC's `<=` indexed one
//!   past its device list);
//! * an upload at offset 0 starts a fresh table (the RFC reused the buffer when its byte size
//!   matched; no entry of the old one is reachable afterwards either way);
//! * only `min(page_total, regions of the target)` entries are stored: regions past the device are
//!   never looked up, so a huge `page_total` cannot make the daemon allocate gigabytes;
//! * the RFC form splits IO at page boundaries too (the RFC never set `split_io`).
//!
//! The wire checks (too short, too many entries, invalid mask, incomplete) are the codec's
//! (`crate::ioctl::dm_switch`); the device lookup is the engine's; the rest is here.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwapOption, Guard};

use crate::dm::pdev::Pdev;
use crate::dm::target::{parse_u64, CtorCtx, Features, Map, Mapping, Target, TargetType, TypeFlags};
use crate::dm::{DevNum, DmError, DmResult, Engine, Sectors, StatusType};
use crate::invalid;
use crate::io::{Bio, Op};

pub static TYPE: TargetType = TargetType { name: "switch", version: [1, 1, 0], ctor, flags: TypeFlags::empty() };

/// One `IpcPgTable` message of the RFC dm-switch upload after its wire checks (too
/// short, too many entries, invalid mask, incomplete), as a target receives it. `entries` holds
/// exactly the message's 32-bit words: `page_count` entries of `pte_bits` bits, `32 / pte_bits` per
/// word from the least significant bits up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageTableUpload {
    pub userland: [u32; 2],
    pub page_total: u32,
    pub page_offset: u32,
    pub page_count: u32,
    /// Carried but not checked, as in the RFC.
    pub page_size: u32,
    pub dev_count: u16,
    /// 1..=32.
    pub pte_bits: u8,
    pub entries: Vec<u32>,
}

/// The RFC upload's route to its switch (the RFC's context list holds every constructed switch,
/// oldest first): the device is found by number and the upload goes to its first RFC-form switch,
/// in the live table, else in the inactive one. `NoDevice` when there is no such device or target.
pub fn upload(engine: &Engine, dev: DevNum, upload: &PageTableUpload) -> DmResult<()> {
    engine
        .targets_of::<Switch>(dev)?
        .find_map(|sw| sw.upload_page_table(upload))
        .unwrap_or_else(|| Err(DmError::NoDevice(dev.to_string())))
}

/// Upstream's path limit: `(KMALLOC_MAX_SIZE − sizeof(switch_ctx)) / sizeof(switch_path)` with a
/// 4 MiB KMALLOC_MAX_SIZE (linux-dm-abi.md §3.4).
pub const MAX_PATHS: u64 = ((4 << 20) - 40) / 16;
/// The largest page table dmemu allocates (upstream fails its vmalloc somewhere around here).
pub const MAX_TABLE_BYTES: u64 = 1 << 30;
/// The prefix of the RFC's upload errors.
const INVALID_MSG: &str = "Invalid Page Table message";

/// Entries of `bits` bits packed `64 / bits` to a word, least significant first.
#[derive(Clone, Debug)]
pub struct PageTable {
    bits: u32,
    per_word: u64,
    /// `log2(per_word)` when `per_word` is a power of two (then lookups shift instead of dividing).
    per_word_shift: Option<u32>,
    mask: u64,
    entries: u64,
    words: Box<[u64]>,
    /// Words written since this table was copied from its predecessor (`lo..hi`; empty when
    /// `lo >= hi`), so the next copy can be brought up to date by copying only those.
    dirty: (usize, usize),
}

impl PageTable {
    /// A zeroed table; `None` when it would exceed [`MAX_TABLE_BYTES`]. `bits` is 1..=32.
    pub fn new(bits: u32, entries: u64) -> Option<Self> {
        debug_assert!((1..=32).contains(&bits));
        let per_word = 64 / bits as u64;
        let nwords = entries.div_ceil(per_word);
        if nwords.checked_mul(8)? > MAX_TABLE_BYTES {
            return None;
        }
        Some(Self {
            bits,
            per_word,
            per_word_shift: per_word.is_power_of_two().then(|| per_word.trailing_zeros()),
            mask: (1u64 << bits) - 1,
            entries,
            words: vec![0u64; nwords as usize].into_boxed_slice(),
            dirty: (usize::MAX, 0),
        })
    }

    /// A table filled in order from `next` (built word by word).
    fn from_fn(bits: u32, entries: u64, mut next: impl FnMut() -> u64) -> Option<Self> {
        let mut t = Self::new(bits, entries)?;
        let mut left = entries;
        for w in t.words.iter_mut() {
            let n = left.min(t.per_word);
            let mut word = 0u64;
            for k in 0..n {
                word |= (next() & t.mask) << (k as u32 * bits);
            }
            *w = word;
            left -= n;
        }
        Some(t)
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }
    pub fn entries(&self) -> u64 {
        self.entries
    }
    /// Bytes of packed entries.
    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }

    #[inline(always)]
    fn position(&self, i: u64) -> (usize, u32) {
        match self.per_word_shift {
            Some(s) => ((i >> s) as usize, (i & (self.per_word - 1)) as u32 * self.bits),
            None => ((i / self.per_word) as usize, (i % self.per_word) as u32 * self.bits),
        }
    }

    /// Entry `i` (`i < entries`).
    #[inline(always)]
    pub fn get(&self, i: u64) -> u64 {
        let (w, s) = self.position(i);
        (self.words[w] >> s) & self.mask
    }

    pub fn set(&mut self, i: u64, v: u64) {
        debug_assert!(i < self.entries);
        let (w, s) = self.position(i);
        let word = &mut self.words[w];
        *word = (*word & !(self.mask << s)) | ((v & self.mask) << s);
        self.dirty = (self.dirty.0.min(w), self.dirty.1.max(w + 1));
    }

    /// Makes this table equal to `cur`, given that it already is outside `cur`'s dirty words
    /// (it is `cur`'s predecessor, or a copy of `cur`).
    fn sync_from(&mut self, cur: &PageTable) {
        let (lo, hi) = cur.dirty;
        if lo < hi {
            self.words[lo..hi].copy_from_slice(&cur.words[lo..hi]);
        }
        self.dirty = (usize::MAX, 0);
    }

    /// Writes `count` entries packed in the RFC's wire layout (`32 / bits` per 32-bit word, least
    /// significant first) at entries `start…`; entries at or past `self.entries` are dropped.
    fn write_packed32(&mut self, start: u64, count: u64, src: &[u32]) {
        let per32 = (32 / self.bits) as u64;
        let count = count.min(self.entries.saturating_sub(start));
        let mut j = 0u64;
        // Fast path: when the width divides 32 and the chunk starts on a 64-bit word, two wire words
        // are one table word.
        if 32 % self.bits == 0 && start.is_multiple_of(self.per_word) {
            let first = (start / self.per_word) as usize;
            let whole = (count / self.per_word) as usize;
            for (k, pair) in src.chunks_exact(2).take(whole).enumerate() {
                self.words[first + k] = pair[0] as u64 | (pair[1] as u64) << 32;
            }
            if whole > 0 {
                self.dirty = (self.dirty.0.min(first), self.dirty.1.max(first + whole));
            }
            j = whole as u64 * self.per_word;
        }
        for j in j..count {
            let w = src[(j / per32) as usize] as u64;
            let v = (w >> ((j % per32) as u32 * self.bits)) & self.mask;
            self.set(start + j, v);
        }
    }
}

/// What lookups see: replaced whole by every change.
#[derive(Clone, Debug)]
struct Snapshot {
    table: PageTable,
    /// Regions `< limit` are looked up in the table: the upload's `num` capped at the entries
    /// stored (upstream: every region).
    limit: u64,
    /// The RFC's `ptbl_num`: entries uploaded so far (may exceed what is stored).
    num: u64,
    /// The RFC's `ptbl_max` (the upload's `page_total`).
    total: u32,
    /// The last successful upload's userland words (status).
    userland: [u32; 2],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// dm-switch 1.1.0: odd argument count.
    Upstream,
    /// The RFC form: even argument count.
    Rfc,
}

/// A counter on its own cache lines, so counting IO does not slow lookups on other CPUs.
#[derive(Default, Debug)]
#[repr(align(128))]
struct Counter(AtomicU64);

pub struct Switch {
    form: Form,
    paths: Vec<(Arc<Pdev>, Sectors)>,
    region_size: u64,
    region_shift: Option<u32>,
    nr_regions: u64,
    table: ArcSwapOption<Snapshot>,
    /// Serialises changes (the kernel's message mutex / the RFC's global spinlock); lookups never
    /// take it. It holds the spare: a retired snapshot no reader holds any more, overwritten by the
    /// next change instead of allocating (see [`Switch::next_from`]).
    writer: Mutex<Option<Snapshot>>,
    /// RFC status counters: IOs the page table routed, and IOs sent to path 0 for want of an entry.
    remapped: Counter,
    unmapped: Counter,
}

fn ctor(ctx: &mut CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Box<dyn Target>> {
    let sw = if argv.len() % 2 == 1 { upstream_ctor(ctx, argv)? } else { rfc_ctor(ctx, argv)? };
    Ok(Box::new(sw))
}

/// `dm-switch.c`'s constructor: `dm_read_arg` ranges, then paths (device first, then offset).
fn upstream_ctor(ctx: &mut CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Switch> {
    let mut args = argv.iter();
    let mut read = |min: u64, max: u64, err: &str| {
        args.next()
            .and_then(|a| parse_u64(a))
            .filter(|v| (min..=max).contains(v))
            .ok_or_else(|| invalid!("switch: {err}"))
    };
    let n = read(1, MAX_PATHS, "Invalid number of paths")?;
    let region_size = read(1, u32::MAX as u64, "Invalid region size")?;
    read(0, 0, "Invalid number of optional args")?;
    let rest = &argv[3..];
    if rest.len() as u64 != 2 * n {
        return Err(invalid!("switch: Incorrect number of path arguments"));
    }
    let mut paths = Vec::with_capacity(n as usize);
    for pair in rest.chunks(2) {
        let dev = ctx.get_device(&pair[0])?;
        let start = parse_u64(&pair[1]).ok_or_else(|| invalid!("switch: Invalid device starting offset"))?;
        paths.push((dev, Sectors(start)));
    }
    Switch::upstream(paths, region_size as u32, ctx.len)
}

/// The RFC's `switch_ctr`, in its order of checks.
fn rfc_ctor(ctx: &mut CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Switch> {
    if argv.len() < 4 {
        return Err(invalid!("switch: Insufficient arguments"));
    }
    // simple_strtoul: decimal digits and nothing else.
    let digits =
        |s: &str| Some(s).filter(|s| s.bytes().all(|c| c.is_ascii_digit())).and_then(|s| s.parse::<u64>().ok());
    let n = digits(&argv[0]).ok_or_else(|| invalid!("switch: Invalid device count"))?;
    if n != (argv.len() as u64 - 2) / 2 {
        return Err(invalid!("switch: Invalid argument count"));
    }
    let page_size = digits(&argv[1])
        .filter(|&p| p >= 1 && p <= u32::MAX as u64)
        .ok_or_else(|| invalid!("switch: Invalid page size"))?;
    let mut paths = Vec::with_capacity(n as usize);
    for pair in argv[2..].chunks(2) {
        let start = sscanf_llu(&pair[1]).ok_or_else(|| invalid!("switch: Invalid device starting offset"))?;
        let dev = ctx.get_device(&pair[0])?;
        // switch_ctr_limits: the target must fit in each device (a device of unknown size — a
        // dmemu device — passes here, as the RFC's "Missing device limits" case does; the
        // engine's range check covers it at load or resume).
        if dev.size().0 > 0 && ctx.len > dev.size() {
            return Err(invalid!("switch: Device too small for target"));
        }
        paths.push((dev, Sectors(start)));
    }
    Ok(Switch::rfc(paths, page_size as u32, ctx.len))
}

/// `sscanf(s, "%llu")` as the RFC uses it: an optional `+`, decimal digits, anything after
/// ignored. (A `-`, which sscanf would wrap to a huge offset, and overflow are refused.)
fn sscanf_llu(s: &str) -> Option<u64> {
    let d = s.strip_prefix('+').unwrap_or(s);
    let end = d.bytes().position(|c| !c.is_ascii_digit()).unwrap_or(d.len());
    d[..end].parse().ok()
}

impl Switch {
    fn new(
        form: Form,
        paths: Vec<(Arc<Pdev>, Sectors)>,
        region_size: u32,
        len: Sectors,
        table: Option<Snapshot>,
    ) -> Self {
        let region_size = region_size as u64;
        Self {
            form,
            paths,
            region_size,
            region_shift: region_size.is_power_of_two().then(|| region_size.trailing_zeros()),
            nr_regions: len.0.div_ceil(region_size),
            table: ArcSwapOption::new(table.map(Arc::new)),
            writer: Mutex::new(None),
            remapped: Counter::default(),
            unmapped: Counter::default(),
        }
    }

    /// An upstream-form switch of `len` sectors, regions round-robin over `paths` (1..=MAX_PATHS).
    pub fn upstream(paths: Vec<(Arc<Pdev>, Sectors)>, region_size: u32, len: Sectors) -> DmResult<Self> {
        let n = paths.len() as u64;
        assert!(n >= 1 && region_size >= 1);
        // The smallest width b ≥ 1 with 2^b ≥ n.
        let bits = (64 - (n - 1).leading_zeros()).max(1);
        let nr_regions = len.0.div_ceil(region_size as u64);
        let mut p = 0u64;
        let table = PageTable::from_fn(bits, nr_regions, || {
            let v = p;
            p = if p + 1 == n { 0 } else { p + 1 };
            v
        })
        .ok_or_else(|| DmError::NoMem("switch: Cannot allocate region table".into()))?;
        let snap = Snapshot { table, limit: nr_regions, num: nr_regions, total: 0, userland: [0; 2] };
        Ok(Self::new(Form::Upstream, paths, region_size, len, Some(snap)))
    }

    /// An RFC-form switch of `len` sectors with no page table yet.
    pub fn rfc(paths: Vec<(Arc<Pdev>, Sectors)>, page_size: u32, len: Sectors) -> Self {
        assert!(!paths.is_empty() && page_size >= 1);
        Self::new(Form::Rfc, paths, page_size, len, None)
    }

    pub fn form(&self) -> Form {
        self.form
    }
    pub fn nr_regions(&self) -> u64 {
        self.nr_regions
    }
    pub fn paths(&self) -> &[(Arc<Pdev>, Sectors)] {
        &self.paths
    }
    /// Bytes of packed entries in the current table (0 before an RFC upload).
    pub fn table_bytes(&self) -> usize {
        self.table.load().as_ref().map_or(0, |s| s.table.bytes())
    }
    /// The RFC counters: (remapped, unmapped).
    pub fn counters(&self) -> (u64, u64) {
        (self.remapped.0.load(Ordering::Relaxed), self.unmapped.0.load(Ordering::Relaxed))
    }

    #[inline(always)]
    fn region(&self, offset: u64) -> u64 {
        match self.region_shift {
            Some(s) => offset >> s,
            None => offset / self.region_size,
        }
    }

    /// Sectors from `offset` to the end of its region.
    #[inline(always)]
    fn to_region_end(&self, offset: u64) -> u64 {
        match self.region_shift {
            Some(_) => self.region_size - (offset & (self.region_size - 1)),
            None => self.region_size - offset % self.region_size,
        }
    }

    /// A consistent view of the table for any number of lookups.
    #[inline]
    pub fn lookup(&self) -> Lookup<'_> {
        Lookup { sw: self, snap: self.table.load() }
    }

    /// `set_region_mappings` (upstream `process_set_region_mappings`): applied left to right on a
    /// copy that is published even when an argument fails, so the arguments before it stay applied.
    fn set_region_mappings(&self, args: &[String]) -> DmResult<()> {
        let mut spare = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.table.load_full().expect("upstream switches always have a table");
        let mut next = Self::next_from(&mut spare, &cur);
        let mut changed = false;
        let r = self.apply_mappings(&mut next.table, args, &mut changed);
        if changed {
            // Messages come one at a time with no end in sight: keep no spare (the table's memory
            // stays at one copy between messages).
            self.publish(&mut spare, next, Some(cur), false);
        }
        r
    }

    /// A private copy of `cur` to change. The spare, when its shape fits, is `cur`'s predecessor
    /// (or a copy of `cur`), so only the words `cur` changed need copying: a chunk of an upload
    /// then rewrites two chunks' worth of words rather than the whole table, and lookups on other
    /// CPUs lose only those cache lines.
    fn next_from(spare: &mut Option<Snapshot>, cur: &Snapshot) -> Snapshot {
        let mut table = match spare.take() {
            Some(mut n) if n.table.bits == cur.table.bits && n.table.entries == cur.table.entries => {
                n.table.sync_from(&cur.table);
                n.table
            }
            _ => cur.table.clone(),
        };
        table.dirty = (usize::MAX, 0);
        Snapshot { table, ..*cur }
    }

    /// Makes `next` what lookups see. With `keep`, the snapshot it replaces becomes the spare when
    /// no lookup holds it any more (arc-swap has turned every reader's claim into a reference count
    /// by the time `swap` returns), so the chunks of an upload reuse two buffers instead of
    /// allocating, faulting in and unmapping one each — unmapping interrupts every CPU running
    /// lookups. Without `keep` it is freed, so an idle table costs one copy.
    fn publish(&self, spare: &mut Option<Snapshot>, next: Snapshot, cur: Option<Arc<Snapshot>>, keep: bool) {
        let old = self.table.swap(Some(Arc::new(next)));
        drop(cur);
        *spare = old.filter(|_| keep).and_then(|o| Arc::try_unwrap(o).ok());
    }

    fn apply_mappings(&self, t: &mut PageTable, args: &[String], changed: &mut bool) -> DmResult<()> {
        let nr_regions = self.nr_regions;
        let nr_paths = self.paths.len() as u64;
        let mut region: u64 = 0;
        for arg in args {
            let s = arg.as_bytes();
            let bad = || invalid!("switch: invalid set_region_mappings argument: '{arg}'");
            let mut i = 0usize;
            // An empty word (a lone trailing backslash) is refused like the kernel's NUL.
            if s.is_empty() {
                return Err(bad());
            }
            if s[0] & 0xdf == b'R' {
                i += 1;
                if s.get(i) == Some(&b',') {
                    return Err(bad());
                }
                let cycle = parse_hex(s, &mut i);
                if s.get(i) != Some(&b',') {
                    return Err(bad());
                }
                i += 1;
                if i == s.len() {
                    return Err(bad());
                }
                let num_write = parse_hex(s, &mut i);
                if i != s.len() {
                    return Err(bad());
                }
                if cycle == 0 || cycle - 1 > region {
                    return Err(invalid!(
                        "switch: invalid set_region_mappings cycle length: {} > {region}",
                        cycle.wrapping_sub(1)
                    ));
                }
                if region.checked_add(num_write).is_none_or(|end| end >= nr_regions) {
                    return Err(invalid!(
                        "switch: invalid set_region_mappings region number: {region} + {num_write} >= {nr_regions}"
                    ));
                }
                for _ in 0..num_write {
                    region += 1;
                    let v = t.get(region - cycle);
                    t.set(region, v);
                    *changed = true;
                }
                continue;
            }
            if s[0] == b':' {
                region = region.wrapping_add(1);
            } else {
                region = parse_hex(s, &mut i);
                if s.get(i) != Some(&b':') {
                    return Err(bad());
                }
            }
            i += 1;
            if i == s.len() {
                return Err(bad());
            }
            let path = parse_hex(s, &mut i);
            if i != s.len() {
                return Err(bad());
            }
            if region >= nr_regions {
                return Err(invalid!("switch: invalid set_region_mappings region number: {region} >= {nr_regions}"));
            }
            if path >= nr_paths {
                return Err(invalid!("switch: invalid set_region_mappings device: {path} >= {nr_paths}"));
            }
            t.set(region, path);
            *changed = true;
        }
        Ok(())
    }

    /// The RFC upload, after the wire checks and the device lookup. `None`: this switch is of the
    /// upstream form, which takes no page tables.
    pub fn upload_page_table(&self, upload: &PageTableUpload) -> Option<DmResult<()>> {
        (self.form == Form::Rfc).then(|| self.upload(upload))
    }

    /// The RFC's `get_page_tbl` after the device lookup.
    fn upload(&self, u: &PageTableUpload) -> DmResult<()> {
        let mut spare = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.table.load_full();
        let offset = u.page_offset as u64;
        let missing = match &cur {
            Some(s) => offset > s.num,
            None => offset != 0,
        };
        if missing {
            return Err(invalid!("{INVALID_MSG}: missing entries"));
        }
        // Context parameters change only when the table is rebuilt from offset 0.
        let next = match &cur {
            Some(s) if offset != 0 => {
                if u.dev_count as usize != self.paths.len() {
                    return Err(invalid!("{INVALID_MSG}: invalid device count {}", u.dev_count));
                }
                if u.pte_bits as u32 != s.table.bits {
                    return Err(invalid!("{INVALID_MSG}: number of bits changed"));
                }
                if u.page_total != s.total {
                    return Err(invalid!("{INVALID_MSG}: total number of entries changed"));
                }
                Some(Self::next_from(&mut spare, s))
            }
            _ => None,
        };
        let mut next = match next {
            Some(n) => n,
            None => {
                // A rebuild: every entry lookups can reach afterwards is written by this or a
                // later chunk of the same shape, so the spare's stale contents can stay.
                let (bits, stored) = (u.pte_bits as u32, (u.page_total as u64).min(self.nr_regions));
                let table = match spare.take() {
                    Some(mut n) if n.table.bits == bits && n.table.entries == stored => {
                        n.table.dirty = (usize::MAX, 0);
                        n.table
                    }
                    _ => PageTable::new(bits, stored).ok_or_else(|| invalid!("Cannot allocate Page Table"))?,
                };
                Snapshot { table, limit: 0, num: 0, total: u.page_total, userland: [0; 2] }
            }
        };
        next.table.write_packed32(offset, u.page_count as u64, &u.entries);
        next.num = offset + u.page_count as u64;
        next.limit = next.num.min(next.table.entries);
        next.userland = u.userland;
        // Keep a spare only while the upload has chunks to come.
        let keep = next.num < next.total as u64;
        self.publish(&mut spare, next, cur, keep);
        Ok(())
    }
}

/// Hex digits from `s[*i]` on (upstream `parse_hex`: no prefix, no overflow check).
fn parse_hex(s: &[u8], i: &mut usize) -> u64 {
    let mut r = 0u64;
    while let Some(d) = s.get(*i).and_then(|&c| (c as char).to_digit(16)) {
        r = (r << 4) | d as u64;
        *i += 1;
    }
    r
}

/// One snapshot of the page table (the kernel's RCU read section): lookups through it see the
/// table as one message or upload chunk left it, however many changes happen meanwhile.
pub struct Lookup<'a> {
    sw: &'a Switch,
    snap: Guard<Option<Arc<Snapshot>>>,
}

impl Lookup<'_> {
    /// The path for a target offset and whether the table routed it. A region the table does
    /// not cover (no RFC upload yet, or past the uploaded entries) or an entry that names no path
    /// goes to path 0, unmapped.
    #[inline(always)]
    pub fn path(&self, offset: u64) -> (usize, bool) {
        let r = self.sw.region(offset);
        match &*self.snap {
            Some(s) if r < s.limit => {
                let e = s.table.get(r);
                if e < self.sw.paths.len() as u64 {
                    (e as usize, true)
                } else {
                    (0, false)
                }
            }
            _ => (0, false),
        }
    }
}

impl Target for Switch {
    fn status(&self, kind: StatusType, _noflush: bool) -> String {
        let mut s = String::new();
        match (self.form, kind) {
            (Form::Upstream, StatusType::Table) => {
                let _ = write!(s, "{} {} 0", self.paths.len(), self.region_size);
                for (d, off) in &self.paths {
                    let _ = write!(s, " {} {}", d.dev, off);
                }
            }
            (Form::Rfc, StatusType::Table) => {
                let _ = write!(s, "{} {}", self.paths.len(), self.region_size);
                for (d, off) in &self.paths {
                    let _ = write!(s, " {} {}", d.dev, off);
                }
            }
            (Form::Rfc, StatusType::Info) => {
                let _ = write!(s, "{}", self.paths.len());
                for (d, _) in &self.paths {
                    let _ = write!(s, " {}", d.dev);
                }
                s.push_str(" 5 ");
                s.extend(self.paths.iter().map(|_| 'A'));
                let userland = self.table.load().as_ref().map_or([0; 2], |t| t.userland);
                let (remapped, unmapped) = self.counters();
                let _ = write!(s, " {:08x} {:08x} {remapped} {unmapped}", userland[0], userland[1]);
            }
            // Upstream INFO and IMA are empty; the RFC has no IMA status.
            (_, StatusType::Info | StatusType::Ima) => {}
        }
        s
    }

    fn message(&self, argv: &[String]) -> DmResult<Option<String>> {
        match self.form {
            Form::Upstream if argv[0].eq_ignore_ascii_case("set_region_mappings") => {
                self.set_region_mappings(&argv[1..]).map(|()| None)
            }
            Form::Upstream => Err(invalid!("switch: Unrecognised message received.")),
            Form::Rfc => Err(invalid!("target does not accept messages")),
        }
    }

    /// Upstream reports each path with the target's length from its offset. The RFC's only range
    /// rule is "target length ≤ device size" (`switch_ctr_limits`), so its paths are reported from
    /// sector 0, which makes the engine's range check enforce exactly that.
    fn iterate_devices(&self, len: Sectors, f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors)) {
        for (d, off) in &self.paths {
            match self.form {
                Form::Upstream => f(d, *off, len),
                Form::Rfc => f(d, Sectors(0), len),
            }
        }
    }

    /// IO is split at region boundaries; a flush goes down every path (one clone each), a
    /// discard down the path of its region ("for UNMAP, sending the request down any path is
    /// sufficient").
    fn features(&self) -> Features {
        Features {
            flush_bios: self.paths.len() as u32,
            write_zeroes_bios: 0,
            max_io_len: Some(self.region_size),
            nowait: true,
            pipes: true,
            ..Features::default()
        }
    }

    fn map(&self, mut bio: Bio) -> Map {
        if bio.op() == Op::Flush {
            let (dev, _) = &self.paths[bio.clone_index() as usize % self.paths.len()];
            bio.remap(dev, Sectors(0));
            return Map::Remapped(bio);
        }
        let offset = bio.sector();
        let (path, mapped) = self.lookup().path(offset.0);
        if self.form == Form::Rfc {
            let c = if mapped { &self.remapped } else { &self.unmapped };
            c.0.fetch_add(1, Ordering::Relaxed);
        }
        let (dev, start) = &self.paths[path];
        match bio.remap_offset(dev, *start) {
            Some(()) => Map::Remapped(bio),
            None => Map::Kill(bio),
        }
    }

    /// Like `map`, without counting: block status is not IO.
    fn query(&self, offset: Sectors, len: Sectors) -> Mapping<'_> {
        let (path, _) = self.lookup().path(offset.0);
        let (dev, start) = &self.paths[path];
        match start.0.checked_add(offset.0) {
            Some(at) => Mapping::Remap { dev, at: Sectors(at), len: Sectors(len.0.min(self.to_region_end(offset.0))) },
            None => Mapping::Opaque(len),
        }
    }
}

#[cfg(test)]
mod tests;
