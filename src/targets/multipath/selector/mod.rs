//! Path selectors of the `multipath` target (the kernel's `dm-path-selector.h` and `dm-ps-*.c`;
//! linux-dm-abi.md §4.2): each priority group has one, which picks the path for each IO among
//! the group's usable paths.
//!
//! A selector knows a group's paths by their index in the group (table order, from 0). The
//! target calls it under its own lock, so a selector needs no locking of its own.

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
    /// the selector-level words with `path == None`, one path's words otherwise. For INFO and
    /// TABLE; IMA gets what TABLE gets.
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

/// `sscanf(s, "%u%c")` == 1: a decimal unsigned 32-bit number and nothing after it (leading
/// whitespace and a sign are accepted as glibc/kernel sscanf accept them).
pub(crate) fn scan_u32(s: &str) -> Option<u32> {
    let t = s.trim_start();
    let (neg, d) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if d.is_empty() || !d.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    // The kernel's %u wraps as an unsigned long conversion truncated to 32 bits.
    let v = d.parse::<u64>().ok()?;
    let v = v as u32;
    Some(if neg { v.wrapping_neg() } else { v })
}

/// EINVAL with a selector's error text, as `*error = "..."; return -EINVAL`.
pub(crate) fn bad(text: &str) -> crate::dm::DmError {
    invalid!("{text}")
}
