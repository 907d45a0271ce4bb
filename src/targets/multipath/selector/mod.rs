//! Path selectors of the `multipath` target (the kernel's `dm-path-selector.h` and `dm-ps-*.c`;
//! linux-dm-abi.md §4.2): each priority group has one, which picks the path for each IO among
//! the group's usable paths.
//!
//! A selector knows a group's paths by their index in the group (table order, from 0). The
//! target calls it under its own lock, so a selector needs no locking of its own.

use std::collections::{BTreeMap, VecDeque};

use crate::dm::{DmResult, StatusType};
use crate::invalid;

mod historical_service_time;
mod queue_length;
mod round_robin;
mod service_time;

/// A path's index within its priority group, in table order from 0.
pub type PathIdx = usize;

/// The kernel's `struct path_selector_type` methods.
pub trait PathSelector: Send {
    /// The selector's table name (`round-robin`, …).
    fn name(&self) -> &'static str;
    /// Per-path words each path shows in TABLE status (`table_args`).
    fn table_args(&self) -> u32;
    /// Per-path words each path shows in INFO status (`info_args`).
    fn info_args(&self) -> u32;

    /// Adds path `path` (paths are added in index order: 0, 1, …) with its per-path table words
    /// (`add_path`). Errors are the kernel's (EINVAL with its text).
    fn add_path(&mut self, path: PathIdx, args: &[String]) -> DmResult<()>;
    /// The path failed: it is not chosen until reinstated.
    fn fail_path(&mut self, path: PathIdx);
    /// The path is usable again.
    fn reinstate_path(&mut self, path: PathIdx) -> DmResult<()>;

    /// Chooses a usable path for an IO of `nr_bytes` (`select_path`); `None` when none is usable.
    /// `now_ns` is a monotonic clock in nanoseconds ([`now_ns`]).
    fn select_path(&mut self, nr_bytes: u64, now_ns: u64) -> Option<PathIdx>;
    /// An IO of `nr_bytes` was sent to `path` (`start_io`).
    fn start_io(&mut self, _path: PathIdx, _nr_bytes: u64, _now_ns: u64) {}
    /// That IO completed (`end_io`); `start_ns` is when it started (the dm core's start time).
    fn end_io(&mut self, _path: PathIdx, _nr_bytes: u64, _start_ns: u64, _now_ns: u64) {}

    /// Status words, each followed by one space as the kernel's `DMEMIT("%u ")` writes them:
    /// the selector-level words with `path == None`, one path's words otherwise. The
    /// selector-level words do not depend on `kind`; a path's words for IMA are empty (the
    /// kernel's selectors write nothing there, so `path_selector_status_<g>_<p>=` is bare).
    fn status(&self, path: Option<PathIdx>, kind: StatusType) -> String;
}

/// A monotonic clock in nanoseconds (the kernel's `ktime_get_ns`).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// Constructs the selector a table names, with its selector-level words (`create`).
/// `Ok(None)` for an unknown name ("unknown path selector type"); an error from the
/// constructor is returned as is (the caller reports "path selector constructor failed").
pub fn create(name: &str, args: &[String]) -> DmResult<Option<Box<dyn PathSelector>>> {
    Ok(Some(match name {
        "round-robin" => round_robin::create(args)?,
        "queue-length" => queue_length::create(args)?,
        "service-time" => service_time::create(args)?,
        "historical-service-time" => historical_service_time::create(args)?,
        _ => return Ok(None),
    }))
}

/// EINVAL with a selector's error text, as `*error = "..."; return -EINVAL`.
pub(crate) fn bad(text: &str) -> crate::dm::DmError {
    invalid!("{text}")
}

/// The per-path part of every selector's `add_path`: at most `max_args` words, the first (if
/// any) the repeat count (default 1), as `"<who> ps: incorrect number of arguments"` /
/// `"<who> ps: invalid repeat count"`. With `clamp`, a count above 1 is replaced by 1 with the
/// kernel's deprecation warning.
pub(crate) fn repeat_count(args: &[String], max_args: usize, who: &str, clamp: bool) -> DmResult<u32> {
    if args.len() > max_args {
        return Err(bad(&format!("{who} ps: incorrect number of arguments")));
    }
    let mut count = 1;
    if let Some(word) = args.first() {
        count = crate::targets::sscanf::u(word).ok_or_else(|| bad(&format!("{who} ps: invalid repeat count")))?;
    }
    if clamp && count > 1 {
        tracing::warn!("multipath {who}: repeat_count > 1 is deprecated, using 1 instead");
        count = 1;
    }
    Ok(count)
}

/// The two lists every kernel selector keeps (usable paths in selection order, failed paths)
/// and each path's context (`pscontext`), found by the path's index.
///
/// List moves follow the kernel's `list_move` (to the head) and `list_move_tail` (to the tail);
/// an index never added is ignored. A selector's `start_io`/`end_io` reach a path's context
/// whichever list the path is on, as the kernel's do.
pub(crate) struct PathLists<T> {
    info: BTreeMap<PathIdx, T>,
    valid: VecDeque<PathIdx>,
    failed: VecDeque<PathIdx>,
}

impl<T> PathLists<T> {
    pub(crate) fn new() -> Self {
        PathLists { info: BTreeMap::new(), valid: VecDeque::new(), failed: VecDeque::new() }
    }

    fn unlink(&mut self, path: PathIdx) {
        if let Some(at) = self.valid.iter().position(|&p| p == path) {
            self.valid.remove(at);
        } else if let Some(at) = self.failed.iter().position(|&p| p == path) {
            self.failed.remove(at);
        }
    }

    /// `list_add_tail(valid)` of a new path (a path added again replaces its old context).
    pub(crate) fn add(&mut self, path: PathIdx, info: T) {
        if self.info.insert(path, info).is_some() {
            self.unlink(path);
        }
        self.valid.push_back(path);
    }

    /// `list_move(failed)`: `false` when the path is unknown.
    pub(crate) fn fail(&mut self, path: PathIdx) -> bool {
        if !self.info.contains_key(&path) {
            return false;
        }
        self.unlink(path);
        self.failed.push_front(path);
        true
    }

    /// `list_move(valid)`: to the head of the usable paths (round-robin's reinstate).
    pub(crate) fn reinstate_head(&mut self, path: PathIdx) -> bool {
        if !self.info.contains_key(&path) {
            return false;
        }
        self.unlink(path);
        self.valid.push_front(path);
        true
    }

    /// `list_move_tail(valid)`: to the tail of the usable paths (the other selectors'
    /// reinstate, and every selector's move of the path it chose).
    pub(crate) fn move_tail(&mut self, path: PathIdx) -> bool {
        if !self.info.contains_key(&path) {
            return false;
        }
        self.unlink(path);
        self.valid.push_back(path);
        true
    }

    /// The number of usable paths.
    pub(crate) fn valid_count(&self) -> usize {
        self.valid.len()
    }

    /// The usable paths in list order, with their contexts.
    pub(crate) fn valid(&self) -> impl Iterator<Item = (PathIdx, &T)> + '_ {
        self.valid.iter().filter_map(move |&p| self.info.get(&p).map(|i| (p, i)))
    }

    /// The usable path the kernel's selection loops pick: the first, in list order, that no
    /// earlier one beats (`better(a, b)`: `a` beats the best so far `b`). The chosen path moves
    /// to the tail of the list, as every selector but round-robin's does after choosing.
    pub(crate) fn choose_best(&mut self, better: impl Fn(&T, &T) -> bool) -> Option<PathIdx> {
        let mut best: Option<(PathIdx, &T)> = None;
        for (p, pi) in self.valid() {
            if best.is_none_or(|(_, b)| better(pi, b)) {
                best = Some((p, pi));
            }
        }
        let (path, _) = best?;
        self.move_tail(path);
        Some(path)
    }

    /// The first usable path (`valid_paths.next`).
    pub(crate) fn first_valid(&self) -> Option<PathIdx> {
        self.valid.front().copied()
    }

    pub(crate) fn get(&self, path: PathIdx) -> Option<&T> {
        self.info.get(&path)
    }

    pub(crate) fn get_mut(&mut self, path: PathIdx) -> Option<&mut T> {
        self.info.get_mut(&path)
    }
}

/// Checks shared by the selectors' tests.
#[cfg(test)]
pub(crate) mod test_util {
    pub(crate) fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    /// Runs a pseudo-random but fixed sequence of selections (each followed by its `start_io`),
    /// completions (oldest IO of a random busy path first), fails and reinstates over `n` paths,
    /// the clock advancing by up to `tstep` ns a step. Returns the paths chosen (`-` for none)
    /// and the paths' INFO words at the end, for comparison with a model of the kernel's code.
    pub(crate) fn drive(
        s: &mut dyn super::PathSelector,
        n: usize,
        sizes: &[u64],
        seed: u64,
        steps: usize,
        tstep: u64,
    ) -> (String, String) {
        let mut x = seed;
        let mut next = move || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            x >> 33
        };
        let mut pending: Vec<std::collections::VecDeque<(u64, u64)>> = vec![Default::default(); n];
        let mut failed = vec![false; n];
        let mut now = 0u64;
        let mut picks = String::new();
        for _ in 0..steps {
            now += next() % tstep;
            let op = next() % 10;
            if op < 5 {
                let bytes = sizes[(next() % sizes.len() as u64) as usize];
                match s.select_path(bytes, now) {
                    None => picks.push('-'),
                    Some(p) => {
                        picks.push_str(&p.to_string());
                        s.start_io(p, bytes, now);
                        pending[p].push_back((now, bytes));
                    }
                }
            } else if op < 8 {
                let busy: Vec<usize> = (0..n).filter(|&p| !pending[p].is_empty()).collect();
                if !busy.is_empty() {
                    let p = busy[(next() % busy.len() as u64) as usize];
                    let (start, bytes) = pending[p].pop_front().unwrap();
                    s.end_io(p, bytes, start, now);
                }
            } else {
                let p = (next() % n as u64) as usize;
                if op == 8 && !failed[p] {
                    s.fail_path(p);
                    failed[p] = true;
                } else if op == 9 && failed[p] {
                    s.reinstate_path(p).unwrap();
                    failed[p] = false;
                }
            }
        }
        let info = (0..n).map(|p| s.status(Some(p), crate::dm::StatusType::Info)).collect();
        (picks, info)
    }

    pub(crate) fn err_text(e: crate::dm::DmError) -> String {
        assert_eq!(e.errno(), libc::EINVAL);
        match e {
            crate::dm::DmError::Invalid(t) => t,
            other => panic!("unexpected error {other:?}"),
        }
    }
}
