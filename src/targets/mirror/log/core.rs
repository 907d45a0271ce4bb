//! The `core` dirty log: `core <1|2> <region_size> [sync|nosync]`, bits in memory only, so after a
//! restart every region is out of sync again unless the table says `nosync` (dm-log.c `core_ctr`).

use super::{region_args, DirtyLog, LogCtx, Regions, SyncMode};
use crate::dm::{DmResult, StatusType};

pub struct CoreLog {
    r: Regions,
}

impl CoreLog {
    pub fn new(args: &[String], ctx: &LogCtx) -> DmResult<Self> {
        let (region_size, sync) = region_args(args, ctx.target_len)?;
        Ok(CoreLog { r: Regions::new(region_size, sync, ctx.target_len) })
    }
}

impl DirtyLog for CoreLog {
    fn type_name(&self) -> &'static str {
        "core"
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
    fn flush(&mut self) -> crate::io::IoResult {
        Ok(())
    }
    fn mark_region(&mut self, region: u64) {
        self.r.mark(region)
    }
    fn clear_region(&mut self, region: u64) {
        self.r.clear(region)
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
            StatusType::Info => "1 core".to_owned(),
            _ => format!(
                "core {} {} {}",
                if self.r.sync == SyncMode::Default { 1 } else { 2 },
                self.r.region_size,
                self.r.sync.table_word()
            ),
        }
    }
    fn resume(&mut self) -> crate::io::IoResult {
        self.r.restart_search();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn log(args: &str, len: u64) -> DmResult<CoreLog> {
        CoreLog::new(&words(args), &LogCtx { target_len: len })
    }

    #[test]
    fn arguments_are_checked_as_create_log_context_does() {
        for bad in ["", "1024 sync extra", "3", "0", "1", "2048", "1000", "x", "1024 fast"] {
            assert!(log(bad, 1024).is_err(), "{bad:?} accepted");
        }
        let l = log("2", 5).unwrap();
        assert_eq!((l.region_size(), l.region_count()), (2, 3));
        assert_eq!(log("1024", 1024).unwrap().region_count(), 1);
    }

    #[test]
    fn status_words() {
        assert_eq!(log("1024", 4096).unwrap().status(StatusType::Table), "core 1 1024 ");
        assert_eq!(log("1024 nosync", 4096).unwrap().status(StatusType::Table), "core 2 1024 nosync ");
        assert_eq!(log("8 sync", 4096).unwrap().status(StatusType::Table), "core 2 8 sync ");
        assert_eq!(log("8", 4096).unwrap().status(StatusType::Info), "1 core");
    }

    #[test]
    fn resync_work_visits_each_out_of_sync_region_once() {
        let mut l = log("8", 80).unwrap(); // 10 regions, none in sync
        assert_eq!(l.sync_count(), 0);
        assert!(l.is_clean(3) && !l.in_sync(3));
        l.set_region_sync(4, true);
        let mut got = Vec::new();
        while let Some(r) = l.get_resync_work() {
            got.push(r);
        }
        assert_eq!(got, [0, 1, 2, 3, 5, 6, 7, 8, 9]);
        for r in got {
            l.set_region_sync(r, true);
        }
        assert_eq!(l.sync_count(), 10);
        // A failed recovery leaves the region out of sync; after resume it is found again.
        l.set_region_sync(7, false);
        assert_eq!(l.sync_count(), 9);
        assert_eq!(l.get_resync_work(), None);
        l.resume().unwrap();
        assert_eq!(l.get_resync_work(), Some(7));
        // nosync: everything in sync from the start.
        let mut n = log("8 nosync", 80).unwrap();
        assert_eq!((n.sync_count(), n.get_resync_work()), (10, None));
        n.mark_region(2);
        assert!(!n.is_clean(2));
        n.clear_region(2);
        assert!(n.is_clean(2));
    }
}
