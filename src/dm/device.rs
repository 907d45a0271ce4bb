//! A mapped device (NetBSD's dm_dev.c, Linux's `struct mapped_device` + hash cell): identity, the
//! live and inactive table slots, suspend / read-only state and the per-device event counter.

use std::sync::Arc;

use super::stats::Stats;
use super::table::Table;
use super::types::{DmName, DmUuid, Geometry, Sectors};

pub struct Device {
    pub name: DmName,
    /// Settable once (linux-dm-abi.md §2.4, DM_DEV_RENAME with DM_UUID_FLAG).
    pub uuid: Option<DmUuid>,
    pub minor: u32,
    /// The table IO runs against. Shared so the data plane can hold it across a request.
    pub live: Option<Arc<Table>>,
    /// Loaded but not yet resumed.
    pub inactive: Option<Table>,
    pub suspended: bool,
    /// The disk's read-only state, which follows the live table's mode.
    pub read_only: bool,
    /// `BLKROSET`'s flag on the block device: unlike `read_only`, table swaps leave it alone and
    /// only `BLKROSET 0` clears it (the kernel's `BD_READ_ONLY` beside `GD_READ_ONLY`).
    pub bdev_read_only: bool,
    /// Per-device event counter (u32, wraps), moved by table events on the live table.
    pub event_nr: u32,
    /// Openers of the block device itself (the data plane); tables that use this device as a pdev
    /// are counted separately by the engine.
    pub opens: i32,
    pub geometry: Option<Geometry>,
    pub deferred_remove: bool,
    /// The first table load sets the queue up; until then range checks happen at load, afterwards
    /// at resume (linux-dm-abi.md §2.5).
    pub queue_initialized: bool,
    /// Request-based (true) or bio-based, fixed by the first table loaded (`md->type`).
    pub request_based: Option<bool>,
    pub read_ahead_kb: u32,
    /// `@stats_*` regions.
    pub stats: Stats,
    /// The live table's targets have had their `presuspend` for a suspend under way.
    pub presuspended: bool,
}

impl Device {
    /// What `get_disk_ro` says: the live table's mode or `BLKROSET`'s flag.
    pub fn disk_read_only(&self) -> bool {
        self.read_only || self.bdev_read_only
    }

    pub fn new(name: DmName, uuid: Option<DmUuid>, minor: u32) -> Self {
        Self {
            name,
            uuid,
            minor,
            live: None,
            inactive: None,
            suspended: false,
            read_only: false,
            bdev_read_only: false,
            event_nr: 0,
            opens: 0,
            geometry: None,
            deferred_remove: false,
            queue_initialized: false,
            request_based: None,
            read_ahead_kb: 128,
            stats: Stats::default(),
            presuspended: false,
        }
    }

    /// Size of the live table (0 without one).
    pub fn size(&self) -> Sectors {
        self.live.as_ref().map(|t| t.size()).unwrap_or_default()
    }

    /// A table event on the live table: the counter moves only if there is one (§2.9).
    /// Returns whether an event fired.
    pub fn table_event(&mut self) -> bool {
        if self.live.is_some() {
            self.event_nr = self.event_nr.wrapping_add(1);
            true
        } else {
            false
        }
    }
}
