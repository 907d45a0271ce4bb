//! Dirty region logs (the kernel's `dm-dirty-log.h` and `dm-log.c`; linux-dm-abi.md §5.2): what a
//! mirror asks about its regions — which are in sync across the legs, which have writes in flight
//! (dirty), which to recover next. `core` keeps the bits in memory only; `disk` keeps the clean
//! bits on a log device in the kernel's on-disk format, so a mirror resyncs after a restart only the
//! regions that were dirty.
//!
//! A region is `region_size` sectors (a power of two); the last one may be short. Each log keeps
//! three bitsets over the regions: *clean* (no write in flight; persisted by `disk`), *sync* (every
//! leg holds the same data) and *recovering* (handed out by `get_resync_work`, not yet settled).

use crate::dm::pdev::Pdev;
use crate::dm::target::CtorCtx;
use crate::dm::{DmError, DmResult, StatusType};
use crate::invalid;
use crate::io::IoResult;
use std::sync::Arc;

mod bits;
pub mod core;
pub mod disk;

pub use bits::Bits;

/// What a mirror sets up its log with.
pub struct LogCtx {
    /// The mirror target's length, in sectors.
    pub target_len: u64,
}

/// The kernel's `struct dm_dirty_log_type` methods. The mirror calls them from one thread at a
/// time (its own lock), as dm-raid1 does from its worker.
pub trait DirtyLog: Send {
    /// The log type's name (`core`, `disk`, `userspace`).
    fn type_name(&self) -> &'static str;
    /// Sectors per region.
    fn region_size(&self) -> u32;
    /// Number of regions: the target's length divided by the region size, rounded up.
    fn region_count(&self) -> u64;

    /// No write in flight in the region.
    fn is_clean(&mut self, region: u64) -> bool;
    /// Every leg holds the same data in the region.
    fn in_sync(&mut self, region: u64) -> bool;
    /// Makes every mark and clear since the last flush durable (before the writes a mark
    /// protects go to the legs).
    fn flush(&mut self) -> IoResult;
    /// A write to the region is about to start: it is dirty until cleared.
    fn mark_region(&mut self, region: u64);
    /// The region's last write has completed.
    fn clear_region(&mut self, region: u64);
    /// A region to recover (out of sync, not being recovered), now marked as being recovered.
    fn get_resync_work(&mut self) -> Option<u64>;
    /// Ends a region's recovery: in sync now, or not.
    fn set_region_sync(&mut self, region: u64, in_sync: bool);
    /// Regions in sync.
    fn sync_count(&self) -> u64;
    /// Whether another node is recovering the region (cluster logs only).
    fn is_remote_recovering(&mut self, _region: u64) -> bool {
        false
    }

    /// The log's status words (linux-dm-abi.md §5.3): INFO `1 core` / `3 disk <dev> <A|D|F>`,
    /// TABLE `core <argc> <region_size> [sync|nosync] `…
    fn status(&self, kind: StatusType) -> String;

    /// The log device, for the mirror's `iterate_devices` and deps.
    fn device(&self) -> Option<&Arc<Pdev>> {
        None
    }

    fn presuspend(&mut self) {}
    fn postsuspend(&mut self) {}
    /// Loads or re-reads the log (the disk log reads its device here).
    fn resume(&mut self) -> IoResult {
        Ok(())
    }
}

/// How the table asked to treat existing data (`sync` / `nosync` / neither).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Resync what the log does not know to be in sync.
    Default,
    /// `sync`: resync everything.
    Force,
    /// `nosync`: everything is in sync already.
    No,
}

impl SyncMode {
    /// The optional last word of a log's arguments.
    fn parse(word: Option<&String>) -> DmResult<SyncMode> {
        match word.map(String::as_str) {
            None => Ok(SyncMode::Default),
            Some("sync") => Ok(SyncMode::Force),
            Some("nosync") => Ok(SyncMode::No),
            Some(w) => {
                tracing::warn!("unrecognised sync argument to dirty region log: {w}");
                Err(invalid!("unrecognised sync argument to dirty region log: {w}"))
            }
        }
    }

    /// The TABLE word after the region size, if any (`DMEMIT_SYNC`).
    fn table_word(self) -> &'static str {
        match self {
            SyncMode::Default => "",
            SyncMode::Force => "sync ",
            SyncMode::No => "nosync ",
        }
    }
}

/// `<region_size> [sync|nosync]`, checked as `create_log_context` does.
fn region_args(args: &[String], target_len: u64) -> DmResult<(u32, SyncMode)> {
    if args.is_empty() || args.len() > 2 {
        tracing::warn!("wrong number of arguments to dirty region log");
        return Err(invalid!("wrong number of arguments to dirty region log"));
    }
    let sync = SyncMode::parse(args.get(1))?;
    let region_size = crate::targets::sscanf::u(&args[0])
        .filter(|&r| r >= 2 && u64::from(r) <= target_len && r.is_power_of_two())
        .ok_or_else(|| {
            tracing::warn!("invalid region size {}", args[0]);
            invalid!("invalid region size {}", args[0])
        })?;
    Ok((region_size, sync))
}

/// Constructs the log a mirror table names: `<type> <#args> <args…>` has been split by the mirror
/// into `name` and `args`. Types are `core` and `disk` (`userspace` later).
pub fn create(name: &str, args: &[String], ctx: &LogCtx, cctx: &mut CtorCtx<'_, '_>) -> DmResult<Box<dyn DirtyLog>> {
    match name {
        "core" => Ok(Box::new(core::CoreLog::new(args, ctx)?)),
        "disk" => Ok(Box::new(disk::DiskLog::new(args, ctx, cctx)?)),
        _ => Err(DmError::Invalid(format!("unknown dirty log type {name:?}"))),
    }
}

/// The region bookkeeping `core` and `disk` share (the kernel's `struct log_c` without the
/// device): clean, in-sync and recovering bits and the search position for resync work.
#[derive(Debug)]
pub(crate) struct Regions {
    pub(crate) region_size: u32,
    pub(crate) region_count: u64,
    pub(crate) sync: SyncMode,
    pub(crate) clean: Bits,
    pub(crate) in_sync: Bits,
    recovering: Bits,
    pub(crate) sync_count: u64,
    sync_search: u64,
    /// A clean bit was cleared (a mark) / set (a clear) since the last flush.
    pub(crate) touched_dirtied: bool,
    pub(crate) touched_cleaned: bool,
}

impl Regions {
    /// `create_log_context`: every region clean; in sync only with `nosync`.
    pub(crate) fn new(region_size: u32, sync: SyncMode, target_len: u64) -> Self {
        let region_count = target_len.div_ceil(u64::from(region_size));
        let all_sync = sync == SyncMode::No;
        Regions {
            region_size,
            region_count,
            sync,
            clean: Bits::new(region_count, true),
            in_sync: Bits::new(region_count, all_sync),
            recovering: Bits::new(region_count, false),
            sync_count: if all_sync { region_count } else { 0 },
            sync_search: 0,
            touched_dirtied: false,
            touched_cleaned: false,
        }
    }

    pub(crate) fn is_clean(&self, region: u64) -> bool {
        self.clean.test(region)
    }

    pub(crate) fn in_sync(&self, region: u64) -> bool {
        self.in_sync.test(region)
    }

    pub(crate) fn mark(&mut self, region: u64) {
        self.clean.clear(region);
        self.touched_dirtied = true;
    }

    pub(crate) fn clear(&mut self, region: u64) {
        self.clean.set(region);
        self.touched_cleaned = true;
    }

    /// `core_get_resync_work`: the next out-of-sync region not being recovered, from where the
    /// last search stopped.
    pub(crate) fn get_resync_work(&mut self) -> Option<u64> {
        loop {
            if self.sync_search >= self.region_count {
                return None;
            }
            let r = self.in_sync.next_zero(self.sync_search, self.region_count)?;
            self.sync_search = r + 1;
            if !self.recovering.test(r) {
                self.recovering.set(r);
                return Some(r);
            }
        }
    }

    pub(crate) fn set_region_sync(&mut self, region: u64, in_sync: bool) {
        if region >= self.region_count {
            return;
        }
        self.recovering.clear(region);
        if in_sync {
            if !self.in_sync.test(region) {
                self.sync_count += 1;
            }
            self.in_sync.set(region);
        } else if self.in_sync.test(region) {
            self.sync_count -= 1;
            self.in_sync.clear(region);
        }
    }

    /// Resync starts over from the first region (`core_resume`).
    pub(crate) fn restart_search(&mut self) {
        self.sync_search = 0;
    }
}
