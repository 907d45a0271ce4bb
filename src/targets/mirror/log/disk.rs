//! The `disk` dirty log: `disk <2|3> <log_dev> <region_size> [sync|nosync]`. The clean bits live on
//! the log device in the kernel's format (dm-log.c), so a mirror that comes back after a crash or
//! a restart resyncs only the regions that had writes in flight:
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `0x4D695272` ("MiRr" read as a little-endian u32), little-endian |
//! | 4 | 4 | version, 2 (version 1 is read as 2, as little-endian kernels do) |
//! | 8 | 8 | `nr_regions`, little-endian |
//! | 1024 | … | the clean bits (bit `i` = region `i`, little-endian bit order), the region count rounded up to 64 bits |
//!
//! The header and the bits are read and written together, as one buffer rounded up to the logical
//! block size (512 bytes here).

use std::sync::Arc;

use super::{region_args, Bits, DirtyLog, LogCtx, Regions, SyncMode};
use crate::dm::pdev::Pdev;
use crate::dm::target::CtorCtx;
use crate::dm::{DmError, DmResult, Sectors, StatusType};
use crate::invalid;
use crate::io::{BioFlags, IoError, IoResult, Op, Region, Services};

pub const MIRROR_MAGIC: u32 = 0x4D69_5272;
pub const MIRROR_DISK_VERSION: u32 = 2;
/// Sectors before the bits (`LOG_OFFSET`).
const LOG_OFFSET_BYTES: usize = 2 * 512;
const LOGICAL_BLOCK: usize = 512;

pub struct DiskLog {
    r: Regions,
    dev: Arc<Pdev>,
    services: Services,
    /// `header.nr_regions` as last read or written.
    nr_regions_on_disk: u64,
    /// The whole on-disk buffer's size in bytes.
    buf_len: usize,
    /// `log_dev_failed`, `log_dev_flush_failed`.
    failed: bool,
    flush_failed: bool,
}

impl DiskLog {
    pub fn new(args: &[String], ctx: &LogCtx, cctx: &mut CtorCtx<'_, '_>) -> DmResult<Self> {
        if !(2..=3).contains(&args.len()) {
            tracing::warn!("wrong number of arguments to disk dirty region log");
            return Err(invalid!("wrong number of arguments to disk dirty region log"));
        }
        let dev = cctx.get_device(&args[0])?;
        Self::on(dev, &args[1..], ctx, cctx.services())
    }

    /// The log on `dev`, with `<region_size> [sync|nosync]`.
    pub fn on(dev: Arc<Pdev>, args: &[String], ctx: &LogCtx, services: Services) -> DmResult<Self> {
        let (region_size, sync) = region_args(args, ctx.target_len)?;
        let r = Regions::new(region_size, sync, ctx.target_len);
        let bits = Bits::byte_len(r.region_count);
        let buf_len = (LOG_OFFSET_BYTES + bits).div_ceil(LOGICAL_BLOCK) * LOGICAL_BLOCK;
        // A dmemu device below is sized by its table, which may still change: checked at use.
        let size = dev.size();
        if size.0 > 0 && size.bytes() < buf_len as u64 {
            tracing::warn!("log device {} too small: need {buf_len} bytes", dev.dev);
            return Err(DmError::Invalid(format!("log device {} too small: need {buf_len} bytes", dev.dev)));
        }
        Ok(DiskLog { r, dev, services, nr_regions_on_disk: 0, buf_len, failed: false, flush_failed: false })
    }

    fn area(&self) -> Region {
        Region { dev: self.dev.clone(), sector: Sectors(0), sectors: Sectors(self.buf_len as u64 / 512) }
    }

    /// `fail_log_device`: once, with a table event.
    fn fail(&mut self) {
        if !self.failed {
            self.failed = true;
            self.services.raise_event();
        }
    }

    /// The buffer as it goes to disk: header, then the clean bits.
    fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.buf_len];
        buf[0..4].copy_from_slice(&MIRROR_MAGIC.to_le_bytes());
        buf[4..8].copy_from_slice(&MIRROR_DISK_VERSION.to_le_bytes());
        buf[8..16].copy_from_slice(&self.nr_regions_on_disk.to_le_bytes());
        let bits = self.r.clean.as_bytes();
        buf[LOG_OFFSET_BYTES..LOG_OFFSET_BYTES + bits.len()].copy_from_slice(bits);
        buf
    }

    fn write(&mut self) -> IoResult {
        let mut buf = self.encode();
        self.services.io_sync(Op::Write, BioFlags::empty(), &self.area(), &mut buf)
    }

    fn flush_device(&self) -> IoResult {
        let area = Region { dev: self.dev.clone(), sector: Sectors(0), sectors: Sectors(0) };
        self.services.io_sync(Op::Flush, BioFlags::empty(), &area, &mut [])
    }

    /// `read_header`: the regions the disk knows of (0 for a new log) and its clean bits.
    fn read(&mut self) -> IoResult<(u64, Bits)> {
        let mut buf = vec![0u8; self.buf_len];
        self.services.io_sync(Op::Read, BioFlags::empty(), &self.area(), &mut buf)?;
        let magic = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
        let mut version = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
        let mut nr_regions = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        // A new log is wanted for `sync`/`nosync`, or where there is none.
        if self.r.sync != SyncMode::Default || magic != MIRROR_MAGIC {
            version = MIRROR_DISK_VERSION;
            nr_regions = 0;
        }
        if version == 1 {
            version = 2;
        }
        if version != MIRROR_DISK_VERSION {
            tracing::warn!("incompatible disk log version");
            return Err(IoError::Failed);
        }
        let bits = Bits::from_bytes(&buf[LOG_OFFSET_BYTES..LOG_OFFSET_BYTES + Bits::byte_len(self.r.region_count)]);
        Ok((nr_regions, bits))
    }
}

impl DirtyLog for DiskLog {
    fn type_name(&self) -> &'static str {
        "disk"
    }
    fn region_size(&self) -> u32 {
        self.r.region_size
    }
    fn region_count(&self) -> u64 {
        self.r.region_count
    }
    fn is_clean(&mut self, region: u64) -> bool {
        self.r.is_clean(region)
    }
    fn in_sync(&mut self, region: u64) -> bool {
        self.r.in_sync(region)
    }

    /// `disk_flush`: the bits (and header) written; the device flushed when a region was marked
    /// since the last flush, so no write reaches a leg before its mark is durable.
    fn flush(&mut self) -> IoResult {
        if !self.r.touched_cleaned && !self.r.touched_dirtied {
            return Ok(());
        }
        if let Err(e) = self.write() {
            self.fail();
            return Err(e);
        }
        if self.r.touched_dirtied {
            if let Err(e) = self.flush_device() {
                self.flush_failed = true;
                self.fail();
                return Err(e);
            }
            self.r.touched_dirtied = false;
        }
        self.r.touched_cleaned = false;
        Ok(())
    }

    fn mark_region(&mut self, region: u64) {
        self.r.mark(region)
    }
    fn clear_region(&mut self, region: u64) {
        // A log whose flush failed keeps regions dirty (the kernel's `flush_failed`).
        if !self.flush_failed {
            self.r.clear(region)
        }
    }
    fn get_resync_work(&mut self) -> Option<u64> {
        self.r.get_resync_work()
    }
    fn set_region_sync(&mut self, region: u64, in_sync: bool) {
        self.r.set_region_sync(region, in_sync)
    }
    fn sync_count(&self) -> u64 {
        self.r.sync_count
    }

    fn status(&self, kind: StatusType) -> String {
        match kind {
            StatusType::Info => {
                let state = if self.flush_failed {
                    'F'
                } else if self.failed {
                    'D'
                } else {
                    'A'
                };
                format!("3 disk {} {state}", self.dev.dev)
            }
            _ => format!(
                "disk {} {} {} {}",
                if self.r.sync == SyncMode::Default { 2 } else { 3 },
                self.dev.dev,
                self.r.region_size,
                self.r.sync.table_word()
            ),
        }
    }

    fn device(&self) -> Option<&Arc<Pdev>> {
        Some(&self.dev)
    }

    fn postsuspend(&mut self) {
        let _ = self.flush();
    }

    /// `disk_resume`: reads the log; regions the disk did not know of are in sync only with
    /// `nosync`; the clean bits become the in-sync bits; the header is written back with today's
    /// region count.
    fn resume(&mut self) -> IoResult {
        let count = self.r.region_count;
        let (known, clean) = match self.read() {
            Ok(v) => v,
            Err(_) => {
                tracing::warn!("{}: Failed to read header on dirty region log device", self.dev.dev);
                self.fail();
                // Unreadable: every region is out of sync.
                (0, Bits::new(count, false))
            }
        };
        self.r.clean = clean;
        for i in known.min(count)..count {
            if self.r.sync == SyncMode::No {
                self.r.clean.set(i);
            } else {
                self.r.clean.clear(i);
            }
        }
        // Bits past the last region (the device shrank) are cleared.
        for i in count..count.div_ceil(64) * 64 {
            self.r.clean.clear(i);
        }
        self.r.in_sync = self.r.clean.clone();
        self.r.sync_count = self.r.clean.count();
        self.r.restart_search();
        self.nr_regions_on_disk = count;
        let r = self.write().and_then(|()| self.flush_device().inspect_err(|_| self.flush_failed = true));
        if r.is_err() {
            tracing::warn!("{}: Failed to write header on dirty region log device", self.dev.dev);
            self.fail();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm::pdev::PdevKind;
    use crate::dm::DevNum;
    use crate::io::DataPlane;

    struct LogFile {
        path: String,
        dev: Arc<Pdev>,
    }

    impl Drop for LogFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn log_file(tag: &str, bytes: u64) -> LogFile {
        let path = std::env::temp_dir().join(format!("dmemu-disklog-{}-{tag}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(bytes).unwrap();
        let path = path.to_string_lossy().into_owned();
        let f = crate::io::Backing::open(&path, true).unwrap();
        let dev = Arc::new(Pdev::with_file(
            DevNum::new(251, 7),
            PdevKind::File { path: path.clone() },
            Sectors(bytes / 512),
            f,
        ));
        LogFile { path, dev }
    }

    fn open(f: &LogFile, args: &str, len: u64) -> DmResult<DiskLog> {
        let args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
        DiskLog::on(f.dev.clone(), &args, &LogCtx { target_len: len }, DataPlane::detached().services(0, 0))
    }

    #[test]
    fn a_new_log_resyncs_everything_and_writes_the_kernels_header() {
        let f = log_file("new", 1 << 20);
        let mut l = open(&f, "8", 8 * 100).unwrap();
        l.resume().unwrap();
        assert_eq!((l.region_count(), l.sync_count()), (100, 0));
        let disk = std::fs::read(&f.path).unwrap();
        assert_eq!(&disk[0..4], b"rRiM", "magic 0x4D695272 little-endian");
        assert_eq!(u32::from_le_bytes(disk[4..8].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(disk[8..16].try_into().unwrap()), 100);
        assert!(disk[1024..1024 + 16].iter().all(|&b| b == 0), "no region clean yet");
        assert_eq!(l.status(StatusType::Info), "3 disk 251:7 A");
        assert_eq!(l.status(StatusType::Table), "disk 2 251:7 8 ");
    }

    #[test]
    fn only_regions_dirty_at_a_restart_are_resynced() {
        let f = log_file("restart", 1 << 20);
        {
            let mut l = open(&f, "8 nosync", 8 * 70).unwrap();
            l.resume().unwrap();
            assert_eq!(l.sync_count(), 70);
            // Writes to regions 3 and 65 are in flight when the daemon dies.
            l.mark_region(3);
            l.mark_region(65);
            l.mark_region(10);
            l.flush().unwrap();
            l.clear_region(10);
            l.flush().unwrap();
            assert_eq!(l.status(StatusType::Table), "disk 3 251:7 8 nosync ");
        }
        // The table comes back without `nosync` (as a restore would load it): the log is read.
        let mut l = open(&f, "8", 8 * 70).unwrap();
        l.resume().unwrap();
        assert_eq!(l.sync_count(), 68);
        let mut work = Vec::new();
        while let Some(r) = l.get_resync_work() {
            work.push(r);
        }
        assert_eq!(work, [3, 65]);
        // The device grew: new regions are out of sync (without nosync).
        let mut l = open(&f, "8", 8 * 80).unwrap();
        l.resume().unwrap();
        assert_eq!(l.sync_count(), 68);
        // `sync` forces a full resync whatever the disk says.
        let mut l = open(&f, "8 sync", 8 * 70).unwrap();
        l.resume().unwrap();
        assert_eq!(l.sync_count(), 0);
    }

    #[test]
    fn arguments_and_a_device_too_small() {
        let f = log_file("small", 1024);
        // 1024 bytes of header offset + 8 bytes of bits need 1536 bytes.
        assert!(open(&f, "8", 800).is_err());
        let g = log_file("args", 1 << 20);
        for bad in ["", "3", "8 maybe", "8 sync x"] {
            assert!(open(&g, bad, 800).is_err(), "{bad:?}");
        }
    }
}
