//! `dust` 1.0.0: a linear mapping with a list of bad blocks that fail reads, emulating a disk
//! that reports "Read Medium Error" (more-targets.md §3).
//!
//! `<dev> <offset> <blksz>`
//!
//! IO is split into blocks of `blksz` bytes. Failures start disabled ("bypass"): every bio is a
//! linear remap and the list is neither consulted nor changed. After `enable`, a read of a listed
//! block fails with EIO; a write to one fails while the block's write-fail count is above zero
//! (decrementing it) and otherwise removes the block from the list and goes through — a write
//! "repairs" the block. Every op but a read (flushes, discards) takes the write path.
//!
//! Block numbers count from the start of the **underlying device**, not the target:
//! `(offset + sector) / (blksz / 512)`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::sscanf;
use crate::dm::pdev::{Pdev, PdevKind};
use crate::dm::target::{CtorCtx, Features, Map, Target, TargetType, TypeFlags};
use crate::dm::{DmResult, Sectors, StatusType};
use crate::invalid;
use crate::io::{Bio, DataPlane, Op};

pub static TYPE: TargetType = TargetType { name: "dust", version: [1, 0, 0], ctor, flags: TypeFlags::empty() };

/// The largest block: 1 GiB (`DUST_MAX_BLKSZ_SECTORS`).
const MAX_BLOCK_SECTORS: u64 = 2_097_152;

pub struct Dust {
    dev: Arc<Pdev>,
    offset: Sectors,
    blksz: u32,
    /// log2(blksz / 512).
    shift: u32,
    /// `fail_read_on_bad_block` (true) or bypass (false). Read without the list's lock, as the
    /// kernel reads `fail_read_on_bb`: bypass IO never takes the lock.
    enabled: AtomicBool,
    /// Quiet mode silences the log lines about the list, never message output.
    quiet: AtomicBool,
    /// Bad block → remaining write failures (`wr_fail_cnt`), in ascending order (the kernel's
    /// rbtree, listed in order by `listbadblocks`).
    list: Mutex<BTreeMap<u64, u8>>,
    /// Where the size of a dmemu device below is found (its live table's size, as
    /// `bdev_nr_sectors` reports it for a dm device).
    plane: DataPlane,
}

/// `dust_ctr`, in the kernel's order of checks (more-targets.md §3.1).
fn ctor(ctx: &mut CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Box<dyn Target>> {
    let [dev, offset, blksz] = argv else {
        return Err(invalid!("dust: Invalid argument count"));
    };
    let blksz =
        sscanf::kstrtouint(blksz).filter(|&b| b != 0).ok_or_else(|| invalid!("dust: Invalid block size parameter"))?;
    if blksz < 512 {
        return Err(invalid!("dust: Block size must be at least 512"));
    }
    if !blksz.is_power_of_two() {
        return Err(invalid!("dust: Block size must be a power of 2"));
    }
    let sectors = blksz as u64 / 512;
    if sectors > ctx.len.0.min(MAX_BLOCK_SECTORS) {
        return Err(invalid!("dust: Block size is too large"));
    }
    let offset = sscanf::llu(offset).ok_or_else(|| invalid!("dust: Invalid device offset sector"))?;
    // Whatever went wrong, the kernel's dust answers EINVAL here.
    let dev = ctx.get_device(dev).map_err(|_| invalid!("dust: Device lookup failed"))?;
    Ok(Box::new(Dust {
        dev,
        offset: Sectors(offset),
        blksz,
        shift: sectors.trailing_zeros(),
        enabled: AtomicBool::new(false),
        quiet: AtomicBool::new(false),
        list: Mutex::new(BTreeMap::new()),
        plane: ctx.env.plane.clone(),
    }))
}

impl Dust {
    fn list(&self) -> MutexGuard<'_, BTreeMap<u64, u8>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn quiet(&self) -> bool {
        self.quiet.load(Ordering::Relaxed)
    }

    /// The underlying device's size in sectors (`bdev_nr_sectors`): the size a file or block
    /// device had when the table named it, a dmemu device's live size (0 without a live table).
    fn device_sectors(&self) -> u64 {
        match self.dev.kind {
            PdevKind::Dm { minor } => {
                self.plane.active_devices().iter().find(|d| d.minor == minor).map_or(0, |d| d.size / 512)
            }
            _ => self.dev.size().0,
        }
    }

    /// The block number of the two- and three-word messages (`sscanf("%llu")`).
    fn parse_block(word: &str) -> DmResult<u64> {
        sscanf::llu(word).ok_or_else(|| invalid!("dust: invalid block number {word:?}"))
    }

    /// The range check of those messages: the bound is the whole underlying device, inclusive
    /// (`block > size / sect_per_block` fails), which admits one block past the end
    /// (more-targets.md §3.3).
    fn check_range(&self, block: u64) -> DmResult<u64> {
        if block > self.device_sectors() >> self.shift {
            return Err(invalid!("dust: selected block value out of range"));
        }
        Ok(block)
    }

    fn add_block(&self, block: u64, wr_fail_cnt: u8) -> DmResult<Option<String>> {
        let mut list = self.list();
        if list.contains_key(&block) {
            return Err(invalid!("dust: dust_add_block: block {block} already in badblocklist"));
        }
        list.insert(block, wr_fail_cnt);
        if !self.quiet() {
            tracing::info!("dust: dust_add_block: badblock added at block {block} with write fail count {wr_fail_cnt}");
        }
        Ok(None)
    }

    fn remove_block(&self, block: u64) -> DmResult<Option<String>> {
        if self.list().remove(&block).is_none() {
            return Err(invalid!("dust: dust_remove_block: block {block} not found in badblocklist"));
        }
        if !self.quiet() {
            tracing::info!("dust: dust_remove_block: badblock removed at block {block}");
        }
        Ok(None)
    }

    /// The one-word messages.
    fn message1(&self, word: &str) -> DmResult<Option<String>> {
        let is = |w: &str| word.eq_ignore_ascii_case(w);
        if is("addbadblock") || is("removebadblock") || is("queryblock") {
            Err(invalid!("dust: {word} requires an additional argument"))
        } else if is("disable") {
            tracing::info!("dust: disabling read failures on bad sectors");
            self.enabled.store(false, Ordering::Relaxed);
            Ok(None)
        } else if is("enable") {
            tracing::info!("dust: enabling read failures on bad sectors");
            self.enabled.store(true, Ordering::Relaxed);
            Ok(None)
        } else if is("countbadblocks") {
            Ok(Some(format!("countbadblocks: {} badblock(s) found", self.list().len())))
        } else if is("clearbadblocks") {
            let was = std::mem::take(&mut *self.list());
            // The prefix is the kernel function's name (`__func__`), hard-coded.
            Ok(Some(if was.is_empty() {
                "dust_clear_badblocks: no badblocks found".to_owned()
            } else {
                "dust_clear_badblocks: badblocks cleared".to_owned()
            }))
        } else if is("quiet") {
            self.quiet.fetch_xor(true, Ordering::Relaxed);
            Ok(None)
        } else if is("listbadblocks") {
            let list = self.list();
            if list.is_empty() {
                // The documentation says nothing is printed; the code prints this.
                return Ok(Some("No blocks in badblocklist".to_owned()));
            }
            let mut s = String::new();
            for b in list.keys() {
                let _ = writeln!(s, "{b}");
            }
            Ok(Some(s))
        } else {
            Err(invalid!("dust: unrecognized message '{word}' received"))
        }
    }
}

impl Target for Dust {
    fn status(&self, kind: StatusType, _noflush: bool) -> String {
        match kind {
            StatusType::Info => format!(
                "{} {} {}",
                self.dev.dev,
                if self.enabled.load(Ordering::Relaxed) { "fail_read_on_bad_block" } else { "bypass" },
                if self.quiet() { "quiet" } else { "verbose" }
            ),
            StatusType::Table => format!("{} {} {}", self.dev.dev, self.offset, self.blksz),
            StatusType::Ima => String::new(),
        }
    }

    /// `dust_message` (more-targets.md §3.3): the word count picks the form; a block number is
    /// parsed and range-checked before the keyword is looked at.
    fn message(&self, argv: &[String]) -> DmResult<Option<String>> {
        match argv {
            [word] => self.message1(word),
            [word, block] => {
                let block = self.check_range(Self::parse_block(block)?)?;
                if word.eq_ignore_ascii_case("addbadblock") {
                    self.add_block(block, 0)
                } else if word.eq_ignore_ascii_case("removebadblock") {
                    self.remove_block(block)
                } else if word.eq_ignore_ascii_case("queryblock") {
                    let found = if self.list().contains_key(&block) { "found" } else { "not found" };
                    Ok(Some(format!("dust_query_block: block {block} {found} in badblocklist")))
                } else {
                    Err(invalid!("dust: unrecognized message '{word}' received"))
                }
            }
            [word, block, count] => {
                let block = Self::parse_block(block)?;
                let count = sscanf::u(count).ok_or_else(|| invalid!("dust: invalid write fail count {count:?}"))?;
                if count > 255 {
                    return Err(invalid!("dust: selected write fail count out of range"));
                }
                let block = self.check_range(block)?;
                if word.eq_ignore_ascii_case("addbadblock") {
                    self.add_block(block, count as u8)
                } else {
                    Err(invalid!("dust: unrecognized message '{word}' received"))
                }
            }
            _ => Err(invalid!("dust: invalid number of arguments '{}'", argv.len())),
        }
    }

    fn iterate_devices(&self, len: Sectors, f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors)) {
        f(&self.dev, self.offset, len)
    }

    /// IO split into blocks (`dm_set_target_max_io_len`); one flush and one discard bio, no
    /// write-zeroes bios (the kernel sets none, so write-zeroes arrive as writes of zeroes). Not
    /// `DM_TARGET_NOWAIT` in the kernel.
    fn features(&self) -> Features {
        Features {
            write_zeroes_bios: 0,
            max_io_len: Some(1 << self.shift),
            nowait: false,
            pipes: false,
            ..Features::default()
        }
    }

    /// `dust_map`: remap, then (when enabled) look the block up. An empty flush carries sector 0
    /// of the target, so it checks block `offset / sect_per_block`, as the kernel's does for a
    /// target at the start of its table.
    fn map(&self, mut bio: Bio) -> Map {
        if bio.remap_offset(&self.dev, self.offset).is_none() {
            return Map::Kill(bio);
        }
        if !self.enabled.load(Ordering::Relaxed) {
            return Map::Remapped(bio);
        }
        // Remapped: the sector is on the underlying device now.
        let block = bio.sector().0 >> self.shift;
        let mut list = self.list();
        if bio.op() == Op::Read {
            return if list.contains_key(&block) { Map::Kill(bio) } else { Map::Remapped(bio) };
        }
        match list.get_mut(&block) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Map::Kill(bio)
            }
            Some(_) => {
                list.remove(&block);
                if !self.quiet() {
                    tracing::info!("dust: block {block} removed from badblocklist by write");
                }
                Map::Remapped(bio)
            }
            None => Map::Remapped(bio),
        }
    }
}
