//! `flakey` 1.5.0: a linear mapping that misbehaves periodically (more-targets.md §1; the newest
//! kernel generation, "K2", is the one emulated).
//!
//! `<dev> <offset> <up_interval> <down_interval> [<#features> <feature words>…]`
//!
//! The device is *up* for `up_interval` seconds, then *down* for `down_interval`, repeating, with
//! the clock started when the table is constructed (not at resume). Up, IO is a plain linear
//! remap. Down, the features decide: `error_reads` fails reads; `drop_writes` completes writes
//! without writing them; `error_writes` fails them; `corrupt_bio_byte` overwrites one byte of
//! matching reads (after they completed) or writes (in a private copy); `random_read_corrupt` /
//! `random_write_corrupt` overwrite a random byte of a bio with probability p/10⁹. A table with no
//! feature words gets `error_reads error_writes`.
//!
//! Write-direction bios are every op but a read, empty flushes and discards included (the kernel
//! sends a flush as `REQ_OP_WRITE | REQ_PREFLUSH`), so `drop_writes` swallows flushes and
//! `error_writes` fails them while down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::sscanf;
use crate::dm::pdev::Pdev;
use crate::dm::target::{CtorCtx, EndIo, Features, Map, Target, TargetType, TypeFlags};
use crate::dm::{DmError, DmResult, Sectors, StatusType};
use crate::invalid;
use crate::io::{Bio, BioFlags, IoError, IoResult, Op};

pub static TYPE: TargetType = TargetType { name: "flakey", version: [1, 5, 0], ctor, flags: TypeFlags::empty() };

/// Probabilities are parts of this (more-targets.md §1.1: `p` is 0…1000000000).
const PROBABILITY_BASE: u64 = 1_000_000_000;

/// A write clone holds at most `UIO_MAXIOV` pages (1024 × 4 KiB); the kernel accepts only that
/// much of a longer bio (`dm_accept_partial_bio`) and maps the rest as a new bio, which is
/// corrupted (or not) on its own. See [`Flakey::corrupt_write`].
const CLONE_MAX_BYTES: usize = 1024 * 4096;

/// Bits of the kernel's `bi_opf` (`include/linux/blk_types.h`, 6.x), which is what the
/// `corrupt_bio_byte` flags mask is compared with. dmemu's bios carry an op and two modifiers;
/// [`bi_opf`] encodes them with these numbers so a mask written for a current kernel
/// (`REQ_FUA` = 131072, or 1 = `REQ_OP_WRITE`'s direction bit) selects the same bios here. Bits
/// dmemu's bios never carry (`REQ_META`, `REQ_SYNC`, …) never match.
const REQ_OP_READ: u32 = 0;
const REQ_OP_WRITE: u32 = 1;
const REQ_OP_DISCARD: u32 = 3;
const REQ_OP_WRITE_ZEROES: u32 = 9;
const REQ_FUA: u32 = 1 << 17;
const REQ_PREFLUSH: u32 = 1 << 18;
const REQ_NOWAIT: u32 = 1 << 21;

/// The `bi_opf` a kernel bio equivalent to `bio` would carry.
fn bi_opf(bio: &Bio) -> u32 {
    let mut opf = match bio.op() {
        Op::Read => REQ_OP_READ,
        Op::Write => REQ_OP_WRITE,
        Op::Flush => REQ_OP_WRITE | REQ_PREFLUSH,
        Op::Discard => REQ_OP_DISCARD,
        Op::WriteZeroes => REQ_OP_WRITE_ZEROES,
    };
    if bio.flags().contains(BioFlags::FUA) {
        opf |= REQ_FUA;
    }
    if bio.flags().contains(BioFlags::NOWAIT) {
        opf |= REQ_NOWAIT;
    }
    opf
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

/// `corrupt_bio_byte <nth> <r|w> <value> <flags>`.
#[derive(Clone, Copy, Debug)]
struct CorruptByte {
    /// 1-based offset into the bio's data (1…2^32−1).
    nth: u32,
    dir: Dir,
    value: u8,
    /// Every bit of this must be set in the bio's `bi_opf` (0 matches every bio).
    flags: u32,
}

impl CorruptByte {
    fn matches(&self, bio: &Bio) -> bool {
        bi_opf(bio) & self.flags == self.flags
    }
}

/// A small PRNG for the random corruptions (the kernel's `get_random_*` need not be
/// cryptographic here): SplitMix64 over an atomic counter, so concurrent bios draw without a lock
/// and never the same value.
struct Rng(AtomicU64);

impl Rng {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let local = 0u8;
        Rng(AtomicU64::new(t.as_nanos() as u64 ^ (&local as *const u8 as u64).rotate_left(32)))
    }

    fn next(&self) -> u64 {
        let mut z = self.0.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `get_random_u64() % PROBABILITY_BASE < p`.
    fn hit(&self, p: u32) -> bool {
        self.next() % PROBABILITY_BASE < p as u64
    }
}

pub struct Flakey {
    dev: Arc<Pdev>,
    offset: Sectors,
    up: u32,
    down: u32,
    /// Construction time: the up/down clock starts here (more-targets.md §1.2).
    start: Instant,
    faults: Faults,
    rng: Rng,
}

/// What the feature words turned on.
#[derive(Debug, Default)]
struct Faults {
    error_reads: bool,
    drop_writes: bool,
    error_writes: bool,
    corrupt: Option<CorruptByte>,
    /// p out of [`PROBABILITY_BASE`]; 0 = off.
    random_read: u32,
    random_write: u32,
}

/// Set by `map` on a read mapped while down (the kernel's `bio_can_corrupt`): its `end_io` may
/// corrupt it. Decided at map time, so a read that completes after the device came up is still
/// corrupted, as in the kernel.
struct MappedDown;

/// `dm_read_arg`: `sscanf("%u")`, then the range check, with the kernel's error text.
fn read_arg(word: Option<&String>, min: u32, max: u32, err: &str) -> DmResult<u32> {
    word.and_then(|w| sscanf::u(w)).filter(|v| (min..=max).contains(v)).ok_or_else(|| invalid!("flakey: {err}"))
}

/// `flakey_ctr`, in the kernel's order of checks (more-targets.md §1.1): arguments, features,
/// and the device last.
fn ctor(ctx: &mut CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Box<dyn Target>> {
    let start = Instant::now();
    if argv.len() < 4 {
        return Err(invalid!("flakey: Invalid argument count"));
    }
    let offset = sscanf::llu(&argv[1]).ok_or_else(|| invalid!("flakey: Invalid device sector"))?;
    let up = read_arg(argv.get(2), 0, u32::MAX, "Invalid up interval")?;
    let down = read_arg(argv.get(3), 0, u32::MAX, "Invalid down interval")?;
    let total = up.wrapping_add(down);
    if total == 0 {
        return Err(invalid!("flakey: Total (up + down) interval is zero"));
    }
    if total < up {
        return Err(invalid!("flakey: Interval overflow"));
    }
    let faults = Faults::parse(&argv[4..])?;
    // The kernel returns dm_get_device's own error, with this text.
    let dev = ctx.get_device(&argv[0]).map_err(|e| match e {
        DmError::Invalid(_) => invalid!("flakey: Device lookup failed"),
        other => other,
    })?;
    Ok(Box::new(Flakey { dev, offset: Sectors(offset), up, down, start, faults, rng: Rng::seeded() }))
}

impl Faults {
    /// `parse_features`: the count word, then that many words. Words after the counted ones are
    /// ignored, as the kernel ignores them.
    fn parse(words: &[String]) -> DmResult<Faults> {
        let mut f = Faults::default();
        let mut it = words.iter();
        let mut argc = 0u32;
        if !words.is_empty() {
            // dm_read_arg_group: 0…11, and no more than the words left.
            argc = read_arg(it.next(), 0, 11, "Invalid number of feature args")?;
            if argc as usize > words.len() - 1 {
                return Err(invalid!("flakey: Invalid number of feature args"));
            }
        }
        if argc == 0 {
            f.error_reads = true;
            f.error_writes = true;
            return Ok(f);
        }
        while argc > 0 {
            let name = it.next().ok_or_else(|| invalid!("flakey: Insufficient feature arguments"))?;
            argc -= 1;
            let is = |w: &str| name.eq_ignore_ascii_case(w);
            if is("error_reads") {
                if std::mem::replace(&mut f.error_reads, true) {
                    return Err(invalid!("flakey: Feature error_reads duplicated"));
                }
            } else if is("drop_writes") {
                if std::mem::replace(&mut f.drop_writes, true) {
                    return Err(invalid!("flakey: Feature drop_writes duplicated"));
                } else if f.error_writes {
                    return Err(invalid!("flakey: Feature drop_writes conflicts with feature error_writes"));
                }
            } else if is("error_writes") {
                if std::mem::replace(&mut f.error_writes, true) {
                    return Err(invalid!("flakey: Feature error_writes duplicated"));
                } else if f.drop_writes {
                    return Err(invalid!("flakey: Feature error_writes conflicts with feature drop_writes"));
                }
            } else if is("corrupt_bio_byte") {
                if f.corrupt.is_some() {
                    return Err(invalid!("flakey: Feature corrupt_bio_byte duplicated"));
                } else if argc < 4 {
                    return Err(invalid!("flakey: Feature corrupt_bio_byte requires 4 parameters"));
                }
                let nth = read_arg(it.next(), 1, u32::MAX, "Invalid corrupt bio byte")?;
                let dir = match it.next() {
                    Some(w) if w.eq_ignore_ascii_case("w") => Dir::Write,
                    Some(w) if w.eq_ignore_ascii_case("r") => Dir::Read,
                    _ => return Err(invalid!("flakey: Invalid corrupt bio direction (r or w)")),
                };
                let value = read_arg(it.next(), 0, 255, "Invalid corrupt value to write into bio byte (0-255)")? as u8;
                let flags = read_arg(it.next(), 0, u32::MAX, "Invalid corrupt bio flags mask")?;
                argc -= 4;
                f.corrupt = Some(CorruptByte { nth, dir, value, flags });
            } else if is("random_read_corrupt") || is("random_write_corrupt") {
                let which = if is("random_read_corrupt") { "random_read_corrupt" } else { "random_write_corrupt" };
                let slot = if which == "random_read_corrupt" { &mut f.random_read } else { &mut f.random_write };
                // 0 means "off", so a repeated `… 0` is no duplicate (more-targets.md §1.1).
                if *slot != 0 {
                    return Err(invalid!("flakey: Feature {which} duplicated"));
                } else if argc == 0 {
                    return Err(invalid!("flakey: Feature {which} requires a parameter"));
                }
                *slot = read_arg(it.next(), 0, PROBABILITY_BASE as u32, "Invalid random corrupt argument")?;
                argc -= 1;
            } else {
                return Err(invalid!("flakey: Unrecognised flakey feature requested"));
            }
        }
        let corrupt_dir = |d| f.corrupt.is_some_and(|c| c.dir == d);
        let corrupts_writes = corrupt_dir(Dir::Write) || f.random_write > 0;
        if f.drop_writes && corrupts_writes {
            return Err(invalid!(
                "flakey: drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set"
            ));
        } else if f.error_writes && corrupts_writes {
            return Err(invalid!(
                "flakey: error_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set"
            ));
        } else if f.error_reads && (corrupt_dir(Dir::Read) || f.random_read > 0) {
            return Err(invalid!(
                "flakey: error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with the READ flag set"
            ));
        }
        // Only `random_*_corrupt 0` words: nothing is on, so K2 fails all IO (more-targets.md §1.1).
        if f.corrupt.is_none()
            && !f.error_reads
            && !f.drop_writes
            && !f.error_writes
            && f.random_read == 0
            && f.random_write == 0
        {
            f.error_reads = true;
            f.error_writes = true;
        }
        Ok(f)
    }
}

impl Flakey {
    /// `elapsed mod (up + down) ≥ up`, with `elapsed` in whole seconds since construction.
    fn is_down(&self) -> bool {
        let elapsed = self.start.elapsed().as_secs();
        elapsed % (self.up as u64 + self.down as u64) >= self.up as u64
    }

    fn remap(&self, mut bio: Bio) -> Map {
        match bio.remap_offset(&self.dev, self.offset) {
            Some(()) => Map::Remapped(bio),
            None => Map::Kill(bio),
        }
    }

    /// Overwrites byte `at` of `data` with `value`; past the end nothing happens (N beyond the
    /// bio's size is a no-op: `corrupt_bio_common` finds no segment that long).
    fn corrupt_at(data: &mut [u8], at: usize, value: u8) {
        if let Some(b) = data.get_mut(at) {
            *b = value;
        }
    }

    /// `corrupt_bio_random`: a uniformly chosen byte gets a random value (possibly the one it
    /// had).
    fn corrupt_random(&self, data: &mut [u8]) {
        if data.is_empty() {
            return;
        }
        let at = (self.rng.next() >> 32) as u32 as usize % data.len();
        Self::corrupt_at(data, at, self.rng.next() as u8);
    }

    /// A write mapped while down, with neither drop_writes nor error_writes: corrupts a private
    /// copy of the data if `corrupt_bio_byte … w` matches or the random draw hits (the caller's
    /// buffer is never touched: more-targets.md §1.2).
    ///
    /// The kernel's clone holds at most [`CLONE_MAX_BYTES`]; it accepts that much of a longer bio
    /// and maps the rest as a new bio, which is decided afresh. So each such piece is corrupted
    /// on its own (the fixed byte at its own offset N−1, a new random draw), until a piece is
    /// not corrupted at all: that piece and everything after it go down as they are.
    fn corrupt_write(&self, mut bio: Bio) -> Map {
        let fixed = self.faults.corrupt.filter(|c| c.dir == Dir::Write && c.matches(&bio));
        let decide = || {
            let random = self.faults.random_write > 0 && self.rng.hit(self.faults.random_write);
            (fixed.is_some() || random).then_some(random)
        };
        let Some(first_random) = decide() else {
            return self.remap(bio);
        };
        let data = match bio.own_data() {
            Ok(d) => d,
            Err(e) => {
                bio.end(Err(e));
                return Map::Submitted;
            }
        };
        let mut random = first_random;
        for piece in data.chunks_mut(CLONE_MAX_BYTES) {
            if let Some(c) = fixed {
                Self::corrupt_at(piece, c.nth as usize - 1, c.value);
            }
            if random {
                self.corrupt_random(piece);
            }
            match decide() {
                Some(r) => random = r,
                None => break,
            }
        }
        self.remap(bio)
    }
}

impl Target for Flakey {
    /// INFO and IMA are empty; TABLE echoes the features in a fixed order with the count of words
    /// they take (more-targets.md §1.3), no trailing space.
    fn status(&self, kind: StatusType, _noflush: bool) -> String {
        match kind {
            StatusType::Info | StatusType::Ima => String::new(),
            StatusType::Table => {
                let n = self.faults.error_reads as u32
                    + self.faults.drop_writes as u32
                    + self.faults.error_writes as u32
                    + 5 * self.faults.corrupt.is_some() as u32
                    + 2 * (self.faults.random_read > 0) as u32
                    + 2 * (self.faults.random_write > 0) as u32;
                let mut s = format!("{} {} {} {} {n}", self.dev.dev, self.offset, self.up, self.down);
                if self.faults.error_reads {
                    s.push_str(" error_reads");
                }
                if self.faults.drop_writes {
                    s.push_str(" drop_writes");
                } else if self.faults.error_writes {
                    s.push_str(" error_writes");
                }
                if let Some(c) = self.faults.corrupt {
                    let d = if c.dir == Dir::Write { 'w' } else { 'r' };
                    s.push_str(&format!(" corrupt_bio_byte {} {d} {} {}", c.nth, c.value, c.flags));
                }
                if self.faults.random_read > 0 {
                    s.push_str(&format!(" random_read_corrupt {}", self.faults.random_read));
                }
                if self.faults.random_write > 0 {
                    s.push_str(&format!(" random_write_corrupt {}", self.faults.random_write));
                }
                s
            }
        }
    }

    fn iterate_devices(&self, len: Sectors, f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors)) {
        f(&self.dev, self.offset, len)
    }

    /// One flush and one discard bio; no write-zeroes bios (the kernel's constructor sets only
    /// `num_flush_bios` and `num_discard_bios`), so write-zeroes arrive as writes of zeroes, as
    /// `blkdev_issue_zeroout` falls back to. `end_io` corrupts reads after they completed. The
    /// target may hold no IO but is not `DM_TARGET_NOWAIT` in the kernel, and corruption needs
    /// the payload in memory.
    fn features(&self) -> Features {
        Features { write_zeroes_bios: 0, end_io: true, nowait: false, pipes: false, ..Features::default() }
    }

    /// `flakey_map` (more-targets.md §1.2).
    fn map(&self, mut bio: Bio) -> Map {
        if !self.is_down() {
            return self.remap(bio);
        }
        if bio.op() == Op::Read {
            if self.faults.error_reads {
                return Map::Kill(bio);
            }
            bio.set_private(Box::new(MappedDown));
            return self.remap(bio);
        }
        if self.faults.drop_writes {
            bio.end(Ok(()));
            return Map::Submitted;
        }
        if self.faults.error_writes {
            bio.end(Err(IoError::Failed));
            return Map::Submitted;
        }
        if bio.op().has_data() && bio.sectors().0 > 0 {
            return self.corrupt_write(bio);
        }
        self.remap(bio)
    }

    /// `flakey_end_io`: a read mapped while down that succeeded gets `corrupt_bio_byte … r` (if
    /// its flags match) and then, on a hit, a random byte.
    fn end_io(&self, mut bio: Bio, result: IoResult) -> EndIo {
        if result.is_ok() && bio.op() == Op::Read && bio.take_private().is_some() {
            let fixed = self.faults.corrupt.filter(|c| c.dir == Dir::Read && c.matches(&bio));
            let random = self.faults.random_read > 0 && self.rng.hit(self.faults.random_read);
            if let Some(data) = bio.data_mut() {
                if let Some(c) = fixed {
                    Self::corrupt_at(data, c.nth as usize - 1, c.value);
                }
                if random {
                    self.corrupt_random(data);
                }
            }
        }
        EndIo::Done(bio, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm::pdev::PdevKind;
    use crate::dm::DevNum;
    use crate::io::bio::test_bio;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    /// An always-down flakey with these feature words.
    fn down(features: &str) -> Flakey {
        Flakey {
            dev: Arc::new(Pdev::new(
                DevNum::new(7, 0),
                PdevKind::File { path: "/nonexistent".into() },
                Sectors(1 << 20),
            )),
            offset: Sectors(0),
            up: 0,
            down: 1,
            start: Instant::now(),
            faults: Faults::parse(&words(features)).unwrap(),
            rng: Rng::seeded(),
        }
    }

    fn mapped_data(f: &Flakey, bio: Bio) -> Vec<u8> {
        match f.map(bio) {
            // Dropping the bio afterwards fails it, which nobody waits for.
            Map::Remapped(b) => b.data().unwrap().to_vec(),
            other => panic!("not remapped: {other:?}"),
        }
    }

    #[test]
    fn feature_parsing_defaults_and_zero_probabilities() {
        let f = Faults::parse(&[]).unwrap();
        assert!(f.error_reads && f.error_writes && !f.drop_writes);
        let f = Faults::parse(&words("4 random_read_corrupt 0 random_write_corrupt 0")).unwrap();
        assert!(f.error_reads && f.error_writes);
        let f = Faults::parse(&words("1 drop_writes ignored words")).unwrap();
        assert!(f.drop_writes && !f.error_reads && !f.error_writes);
        let e = Faults::parse(&words("5 corrupt_bio_byte 1 r 0 4294967296")).unwrap();
        assert_eq!(e.corrupt.unwrap().flags, 0, "%u truncates");
    }

    /// A write longer than the kernel's clone (4 MiB) is corrupted once per 4 MiB piece, each
    /// piece at its own byte N.
    #[test]
    fn long_writes_are_corrupted_per_clone_sized_piece() {
        let f = down("5 corrupt_bio_byte 2 w 170 0");
        let sectors = (9 << 20) / 512;
        let data = mapped_data(&f, test_bio(Op::Write, 0, sectors));
        let hits: Vec<usize> = data.iter().enumerate().filter(|(_, &b)| b != 0).map(|(i, _)| i).collect();
        assert_eq!(hits, vec![1, (4 << 20) + 1, (8 << 20) + 1]);
        assert!(hits.iter().all(|&i| data[i] == 170));

        let f = down("2 random_write_corrupt 1000000000");
        let data = mapped_data(&f, test_bio(Op::Write, 0, sectors));
        for (k, piece) in data.chunks(CLONE_MAX_BYTES).enumerate() {
            assert!(piece.iter().filter(|&&b| b != 0).count() <= 1, "piece {k}");
        }
    }

    #[test]
    fn opf_encoding_matches_the_kernel_bits() {
        let mut b = test_bio(Op::Write, 0, 1);
        assert_eq!(bi_opf(&b), 1);
        b.set_flags(BioFlags::FUA);
        assert_eq!(bi_opf(&b), 1 | 1 << 17);
        assert_eq!(bi_opf(&test_bio(Op::Read, 0, 1)), 0);
        assert_eq!(bi_opf(&test_bio(Op::Flush, 0, 0)), 1 | 1 << 18);
        assert_eq!(bi_opf(&test_bio(Op::Discard, 0, 1)), 3);
    }
}
