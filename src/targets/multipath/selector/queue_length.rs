//! `queue-length` 0.2.0 (the kernel's `dm-ps-queue-length.c`; linux-dm-abi.md §4.2).
//!
//! Chooses the usable path with the fewest IOs in flight: the list is walked in order, a path
//! replaces the best so far only when strictly less loaded, and the walk stops at the first path
//! with nothing in flight. The chosen path moves to the tail, so ties rotate. The in-flight
//! count is the kernel's `atomic_t` (a wrapping signed 32-bit counter).

use super::{repeat_count, PathIdx, PathLists, PathSelector};
use crate::dm::{DmResult, StatusType};

pub(super) fn create(_args: &[String]) -> DmResult<Box<dyn PathSelector>> {
    Ok(Box::new(QueueLength { paths: PathLists::new() }))
}

struct PathInfo {
    repeat_count: u32,
    /// IOs in flight.
    qlen: i32,
}

struct QueueLength {
    paths: PathLists<PathInfo>,
}

impl PathSelector for QueueLength {
    fn name(&self) -> &'static str {
        "queue-length"
    }
    fn table_args(&self) -> u32 {
        1
    }
    fn info_args(&self) -> u32 {
        1
    }

    fn add_path(&mut self, path: PathIdx, args: &[String]) -> DmResult<()> {
        let repeat_count = repeat_count(args, 1, "queue-length", true)?;
        self.paths.add(path, PathInfo { repeat_count, qlen: 0 });
        Ok(())
    }

    fn fail_path(&mut self, path: PathIdx) {
        self.paths.fail(path);
    }

    fn reinstate_path(&mut self, path: PathIdx) -> DmResult<()> {
        self.paths.move_tail(path);
        Ok(())
    }

    fn select_path(&mut self, _nr_bytes: u64, _now_ns: u64) -> Option<PathIdx> {
        let mut best: Option<(PathIdx, i32)> = None;
        for (p, pi) in self.paths.valid() {
            if best.is_none_or(|(_, q)| pi.qlen < q) {
                best = Some((p, pi.qlen));
            }
            if best.is_some_and(|(_, q)| q == 0) {
                break;
            }
        }
        let (path, _) = best?;
        self.paths.move_tail(path);
        Some(path)
    }

    fn start_io(&mut self, path: PathIdx, _nr_bytes: u64, _now_ns: u64) {
        if let Some(pi) = self.paths.get_mut(path) {
            pi.qlen = pi.qlen.wrapping_add(1);
        }
    }

    fn end_io(&mut self, path: PathIdx, _nr_bytes: u64, _start_ns: u64, _now_ns: u64) {
        if let Some(pi) = self.paths.get_mut(path) {
            pi.qlen = pi.qlen.wrapping_sub(1);
        }
    }

    fn status(&self, path: Option<PathIdx>, kind: StatusType) -> String {
        let Some(path) = path else { return "0 ".to_string() };
        match (kind, self.paths.get(path)) {
            (StatusType::Info, Some(pi)) => format!("{} ", pi.qlen),
            (StatusType::Table, Some(pi)) => format!("{} ", pi.repeat_count),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{drive, err_text, words};
    use super::*;

    fn ql(paths: usize) -> Box<dyn PathSelector> {
        let mut s = create(&words("1 x")).unwrap();
        for p in 0..paths {
            s.add_path(p, &[]).unwrap();
        }
        s
    }

    fn info(s: &dyn PathSelector, n: usize) -> String {
        (0..n).map(|p| s.status(Some(p), StatusType::Info)).collect()
    }

    #[test]
    fn words_and_status() {
        let mut s = ql(0);
        assert_eq!((s.name(), s.table_args(), s.info_args()), ("queue-length", 1, 1));
        s.add_path(0, &words("7")).unwrap();
        s.add_path(1, &words("0")).unwrap();
        assert_eq!(s.status(Some(0), StatusType::Table), "1 ");
        assert_eq!(s.status(Some(1), StatusType::Table), "0 ");
        assert_eq!(s.status(Some(1), StatusType::Info), "0 ");
        assert_eq!(s.status(Some(1), StatusType::Ima), "");
        assert_eq!(s.status(None, StatusType::Info), "0 ");
        assert_eq!(s.status(None, StatusType::Table), "0 ");
        assert_eq!(
            err_text(s.add_path(2, &words("1 1")).unwrap_err()),
            "queue-length ps: incorrect number of arguments"
        );
        assert_eq!(err_text(s.add_path(2, &words("-")).unwrap_err()), "queue-length ps: invalid repeat count");
    }

    #[test]
    fn least_loaded_then_rotation() {
        let mut s = ql(3);
        // All idle: the first idle path wins at once, and rotation spreads idle choices.
        assert_eq!(s.select_path(1, 0), Some(0));
        s.start_io(0, 1, 0);
        assert_eq!(s.select_path(1, 0), Some(1));
        s.start_io(1, 1, 0);
        assert_eq!(s.select_path(1, 0), Some(2));
        s.start_io(2, 1, 0);
        assert_eq!(info(s.as_ref(), 3), "1 1 1 ");
        // All at 1, list 0 1 2: ties go to list order.
        assert_eq!(s.select_path(1, 0), Some(0));
        s.start_io(0, 1, 0);
        s.start_io(0, 1, 0);
        // 0:3 1:1 2:1, list 1 2 0.
        s.end_io(2, 1, 0, 0);
        // 2 is idle and wins although 1 is ahead of it.
        assert_eq!(s.select_path(1, 0), Some(2));
        s.start_io(2, 1, 0);
        // 0:3 1:1 2:1, list 1 0 2.
        assert_eq!(s.select_path(1, 0), Some(1));
        assert_eq!(info(s.as_ref(), 3), "3 1 1 ");
        s.fail_path(1);
        s.fail_path(2);
        assert_eq!(s.select_path(1, 0), Some(0));
        // IO accounting continues on failed paths.
        s.end_io(1, 1, 0, 0);
        assert_eq!(info(s.as_ref(), 3), "3 0 1 ");
        s.reinstate_path(2).unwrap();
        s.reinstate_path(1).unwrap();
        // list 0 2 1: 1 is idle.
        assert_eq!(s.select_path(1, 0), Some(1));
        s.fail_path(0);
        s.fail_path(1);
        s.fail_path(2);
        assert_eq!(s.select_path(1, 0), None);
    }

    #[test]
    fn negative_count_wins() {
        // An end without a start drives the kernel's counter below zero; it compares as signed.
        let mut s = ql(2);
        s.start_io(0, 1, 0);
        s.end_io(1, 1, 0, 0);
        assert_eq!(info(s.as_ref(), 2), "1 -1 ");
        assert_eq!(s.select_path(1, 0), Some(1));
    }

    /// A fixed pseudo-random run against a model of the kernel's code.
    #[test]
    fn long_run() {
        let mut s = ql(4);
        let (picks, info) = drive(s.as_mut(), 4, &[512], 1, 300, 1000);
        assert_eq!(
            picks,
            "0123013232322320003030230303030302211121101010230222323232333131313121210000000000333333333303000000\
             0001002222222222222222222200011111111111111"
        );
        assert_eq!(info, "18 10 14 10 ");
    }
}
