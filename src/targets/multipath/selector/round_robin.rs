//! `round-robin` 1.2.0 (the kernel's `dm-ps-round-robin.c`; linux-dm-abi.md §4.2).
//!
//! The usable paths form a queue: each selection takes the head and moves it to the tail. A
//! failed path leaves the queue; a reinstated one goes back to its *head* (the kernel's
//! `list_move`), so it is the next chosen. Selector-level words are ignored; the per-path word
//! is a repeat count, which the kernel no longer honours (anything above 1 becomes 1).

use super::{repeat_count, PathIdx, PathLists, PathSelector};
use crate::dm::{DmResult, StatusType};

pub(super) fn create(_args: &[String]) -> DmResult<Box<dyn PathSelector>> {
    Ok(Box::new(RoundRobin { paths: PathLists::new() }))
}

struct PathInfo {
    repeat_count: u32,
}

struct RoundRobin {
    paths: PathLists<PathInfo>,
}

impl PathSelector for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }
    fn table_args(&self) -> u32 {
        1
    }
    fn info_args(&self) -> u32 {
        0
    }

    fn add_path(&mut self, path: PathIdx, args: &[String]) -> DmResult<()> {
        let repeat_count = repeat_count(args, 1, "round-robin", true)?;
        self.paths.add(path, PathInfo { repeat_count });
        Ok(())
    }

    fn fail_path(&mut self, path: PathIdx) {
        self.paths.fail(path);
    }

    fn reinstate_path(&mut self, path: PathIdx) -> DmResult<()> {
        self.paths.reinstate_head(path);
        Ok(())
    }

    fn select_path(&mut self, _nr_bytes: u64, _now_ns: u64) -> Option<PathIdx> {
        let path = self.paths.first_valid()?;
        self.paths.move_tail(path);
        Some(path)
    }

    fn status(&self, path: Option<PathIdx>, kind: StatusType) -> String {
        let Some(path) = path else { return "0 ".to_string() };
        match (kind, self.paths.get(path)) {
            (StatusType::Table, Some(pi)) => format!("{} ", pi.repeat_count),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{err_text, words};
    use super::*;

    fn rr(paths: usize) -> Box<dyn PathSelector> {
        let mut s = create(&words("3 a b c")).unwrap();
        for p in 0..paths {
            s.add_path(p, &[]).unwrap();
        }
        s
    }

    fn picks(s: &mut dyn PathSelector, n: usize) -> Vec<Option<PathIdx>> {
        (0..n).map(|_| s.select_path(4096, 0)).collect()
    }

    #[test]
    fn identity() {
        let s = rr(0);
        assert_eq!((s.name(), s.table_args(), s.info_args()), ("round-robin", 1, 0));
    }

    #[test]
    fn per_path_words() {
        let mut s = rr(0);
        s.add_path(0, &words("0")).unwrap();
        s.add_path(1, &words("1")).unwrap();
        s.add_path(2, &words("1000")).unwrap();
        s.add_path(3, &[]).unwrap();
        let table: Vec<String> = (0..4).map(|p| s.status(Some(p), StatusType::Table)).collect();
        assert_eq!(table, ["0 ", "1 ", "1 ", "1 "]);
        assert_eq!(s.status(Some(0), StatusType::Info), "");
        assert_eq!(s.status(Some(0), StatusType::Ima), "");
        for kind in [StatusType::Info, StatusType::Table, StatusType::Ima] {
            assert_eq!(s.status(None, kind), "0 ");
        }

        assert_eq!(
            err_text(s.add_path(4, &words("1 2")).unwrap_err()),
            "round-robin ps: incorrect number of arguments"
        );
        for w in ["x", "1x", "", "1 ", "0x10"] {
            assert_eq!(
                err_text(s.add_path(4, &[w.to_string()]).unwrap_err()),
                "round-robin ps: invalid repeat count",
                "{w:?}"
            );
        }
    }

    #[test]
    fn rotation_fail_reinstate() {
        let mut s = rr(3);
        assert_eq!(picks(s.as_mut(), 4), [Some(0), Some(1), Some(2), Some(0)]);
        // Queue is now 1 2 0.
        s.fail_path(2);
        assert_eq!(picks(s.as_mut(), 3), [Some(1), Some(0), Some(1)]);
        // Queue 0 1; a reinstated path goes to the head.
        s.reinstate_path(2).unwrap();
        assert_eq!(picks(s.as_mut(), 4), [Some(2), Some(0), Some(1), Some(2)]);
        s.fail_path(0);
        s.fail_path(1);
        s.fail_path(2);
        assert_eq!(s.select_path(1, 0), None);
        s.reinstate_path(1).unwrap();
        assert_eq!(picks(s.as_mut(), 2), [Some(1), Some(1)]);
        // Unknown paths are ignored.
        s.fail_path(9);
        s.reinstate_path(9).unwrap();
        assert_eq!(s.status(Some(9), StatusType::Table), "");
        s.start_io(1, 1, 0);
        s.end_io(1, 1, 0, 0);
        assert_eq!(s.select_path(1, 0), Some(1));
    }
}
