//! The core `@stats_*` messages (linux-dm-abi.md §2.10): statistics regions over a device, each cut
//! into areas of `step` sectors, with the kernel's counters per area (`dm-stats.c`): IOs, merges
//! (an IO that starts where the previous one of the same direction ended), sectors, ticks, IOs in
//! flight, io_ticks, time in queue and the optional latency histogram. The engine keeps the regions;
//! the data plane counts into them as IO starts and ends ([`StatsSet`]); messages read and clear.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::error::{DmError, DmResult};
use super::target::parse_u64;
use super::types::Sectors;
use crate::invalid;

#[derive(Clone, Debug)]
struct Region {
    start: u64,
    len: u64,
    step: u64,
    precise: bool,
    histogram: Vec<u64>,
    program_id: String,
    aux: String,
    counters: Arc<RegionCounters>,
}

/// One area's counters (`struct dm_stat_shared` + `dm_stat_percpu`). Times are nanoseconds.
#[derive(Clone, Debug, Default)]
struct Area {
    ios: [u64; 2],
    merges: [u64; 2],
    sectors: [u64; 2],
    ticks: [u64; 2],
    in_flight: [u64; 2],
    io_ticks: [u64; 2],
    io_ticks_total: u64,
    time_in_queue: u64,
    /// When the in-flight counts last changed.
    stamp: Option<Instant>,
    histogram: Vec<u64>,
}

impl Area {
    /// Brings io_ticks and time_in_queue up to `now` (the kernel's `dm_stat_round`).
    fn round(&mut self, now: Instant) {
        if let Some(t) = self.stamp {
            let d = now.saturating_duration_since(t).as_nanos() as u64;
            let (r, w) = (self.in_flight[0], self.in_flight[1]);
            if r + w > 0 {
                self.io_ticks_total += d;
                self.time_in_queue += d * (r + w);
            }
            for i in 0..2 {
                if self.in_flight[i] > 0 {
                    self.io_ticks[i] += d;
                }
            }
        }
        self.stamp = Some(now);
    }
}

/// The counters of one region, shared between the engine (print, clear) and the data plane.
#[derive(Debug)]
pub struct RegionCounters {
    start: u64,
    len: u64,
    step: u64,
    /// Histogram boundaries, in nanoseconds.
    bounds: Vec<u64>,
    areas: Mutex<Vec<Area>>,
}

impl RegionCounters {
    fn new(start: u64, len: u64, step: u64, bounds: Vec<u64>) -> Self {
        let n = len.div_ceil(step) as usize;
        let area = Area { histogram: vec![0; if bounds.is_empty() { 0 } else { bounds.len() + 1 }], ..Area::default() };
        Self { start, len, step, bounds, areas: Mutex::new(vec![area; n]) }
    }

    fn areas(&self) -> std::sync::MutexGuard<'_, Vec<Area>> {
        self.areas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one IO of `sectors` at `sector` into every area it touches: its start
    /// (`done` None) or its end after `took` nanoseconds.
    fn account(&self, write: bool, sector: u64, sectors: u64, merged: bool, now: Instant, done: Option<u64>) {
        if sectors == 0 {
            // An empty flush touches no area.
            return;
        }
        let end = sector.saturating_add(sectors);
        let (from, to) = (sector.max(self.start), end.min(self.start.saturating_add(self.len)));
        if from >= to {
            return;
        }
        let i = write as usize;
        let mut areas = self.areas();
        let mut at = from;
        while at < to {
            let idx = ((at - self.start) / self.step) as usize;
            let area_end = self.start + (idx as u64 + 1) * self.step;
            let n = to.min(area_end) - at;
            let Some(a) = areas.get_mut(idx) else { break };
            a.round(now);
            match done {
                None => a.in_flight[i] += 1,
                Some(took) => {
                    a.in_flight[i] = a.in_flight[i].saturating_sub(1);
                    a.ios[i] += 1;
                    a.merges[i] += merged as u64;
                    a.sectors[i] += n;
                    a.ticks[i] += took;
                    if !a.histogram.is_empty() {
                        let b = self.bounds.partition_point(|&x| x <= took);
                        a.histogram[b] += 1;
                    }
                }
            }
            at += n;
        }
    }
}

/// The regions of one device as the data plane counts into them.
#[derive(Debug, Default)]
pub struct StatsSet {
    regions: Vec<Arc<RegionCounters>>,
    /// Where the last IO ended and whether it wrote (for merges).
    last: Mutex<(u64, bool)>,
}

/// What the data plane remembers of an IO between its start and end.
#[derive(Clone, Copy, Debug)]
pub struct StatsTicket {
    write: bool,
    sector: u64,
    sectors: u64,
    merged: bool,
    started: Instant,
}

impl StatsSet {
    /// An IO starts (`dm_stats_account_io` at start).
    pub fn start(&self, write: bool, sector: u64, sectors: u64) -> StatsTicket {
        let now = Instant::now();
        let merged = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            // dm-stats.c compares the sector with a truth value, `bi_sector == (last_sector &&
            // same_direction)`: an IO at sector 1 after one of the same direction, or at sector
            // 0 otherwise, counts as merged. Reproduced as the kernel counts it (one position
            // for the device rather than one per CPU).
            let same = last.1 == write;
            let m = sector == u64::from(last.0 != 0 && same);
            *last = (sector.saturating_add(sectors), write);
            m
        };
        for r in &self.regions {
            r.account(write, sector, sectors, merged, now, None);
        }
        StatsTicket { write, sector, sectors, merged, started: now }
    }

    /// The IO ends.
    pub fn end(&self, t: StatsTicket) {
        let now = Instant::now();
        let took = now.saturating_duration_since(t.started).as_nanos() as u64;
        for r in &self.regions {
            r.account(t.write, t.sector, t.sectors, t.merged, now, Some(took));
        }
    }
}

/// One device's statistics regions, by id.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    regions: BTreeMap<u32, Region>,
    /// What the data plane counts into; rebuilt when regions come and go.
    set: Option<Arc<StatsSet>>,
}

impl Stats {
    /// The regions for the data plane, `None` when there are none (no IO pays for statistics).
    pub fn set(&self) -> Option<Arc<StatsSet>> {
        self.set.clone()
    }

    fn rebuild(&mut self) {
        self.set = (!self.regions.is_empty()).then(|| {
            Arc::new(StatsSet {
                regions: self.regions.values().map(|r| r.counters.clone()).collect(),
                last: Mutex::new((0, false)),
            })
        });
    }
}

/// Areas one region may have (each holds its counters in memory).
const MAX_AREAS: u64 = 1 << 20;

fn region_id(s: &str) -> DmResult<u32> {
    parse_u64(s).filter(|&v| v <= i32::MAX as u64).map(|v| v as u32).ok_or_else(|| invalid!("invalid region id {s:?}"))
}

impl Stats {
    fn get(&mut self, id: &str) -> DmResult<&mut Region> {
        let id = region_id(id)?;
        self.regions.get_mut(&id).ok_or_else(|| DmError::NotFound(format!("stats region {id}")))
    }

    /// Handles one `@stats_*` message; `Ok(Some(text))` is output for DM_DATA_OUT_FLAG.
    pub fn message(&mut self, argv: &[String], dev_size: Sectors) -> DmResult<Option<String>> {
        let cmd = argv[0].to_ascii_lowercase();
        match (cmd.as_str(), argv.len()) {
            ("@stats_create", 3..=7) => {
                let r = self.create(&argv[1..], dev_size).map(Some);
                self.rebuild();
                r
            }
            ("@stats_delete", 2) => {
                let id = region_id(&argv[1])?;
                self.regions.remove(&id).ok_or_else(|| DmError::NotFound(format!("stats region {id}")))?;
                self.rebuild();
                Ok(None)
            }
            // Reports output without writing any: the caller sees an empty string (§2.7).
            ("@stats_clear", 2) => {
                clear(self.get(&argv[1])?);
                Ok(Some(String::new()))
            }
            ("@stats_list", 1 | 2) => Ok(Some(self.list(argv.get(1).map(String::as_str)))),
            ("@stats_print" | "@stats_print_clear", 2 | 4) => {
                let lines = match argv.get(2..4) {
                    Some([a, b]) => Some((
                        parse_u64(a).ok_or_else(|| invalid!("invalid first line"))?,
                        parse_u64(b).ok_or_else(|| invalid!("invalid line count"))?,
                    )),
                    _ => None,
                };
                let r = self.get(&argv[1])?;
                let out = print(r, lines);
                if cmd == "@stats_print_clear" {
                    clear(r);
                }
                Ok(Some(out))
            }
            ("@stats_set_aux", 3) => {
                self.get(&argv[1])?.aux = argv[2].clone();
                Ok(None)
            }
            _ => Err(invalid!("invalid statistics message {}", argv.join(" "))),
        }
    }

    fn create(&mut self, args: &[String], dev_size: Sectors) -> DmResult<String> {
        let (start, len) = if args[0] == "-" {
            (0, dev_size.0.max(1))
        } else {
            let (a, b) = args[0].split_once('+').ok_or_else(|| invalid!("invalid range {}", args[0]))?;
            let start = parse_u64(a).ok_or_else(|| invalid!("invalid range start"))?;
            let len = parse_u64(b).filter(|&l| l > 0).ok_or_else(|| invalid!("invalid range length"))?;
            start.checked_add(len).ok_or_else(|| invalid!("range overflows"))?;
            (start, len)
        };
        let step = match args[1].strip_prefix('/') {
            Some(d) => {
                let d = parse_u64(d).filter(|&d| d > 0).ok_or_else(|| invalid!("invalid step divisor"))?;
                len.div_ceil(d).max(1)
            }
            None => parse_u64(&args[1]).filter(|&s| s > 0 && s <= 1 << 63).ok_or_else(|| invalid!("invalid step"))?,
        };
        if len.div_ceil(step) > MAX_AREAS {
            // The kernel refuses counters it cannot allocate (`check_shared_memory`).
            return Err(DmError::NoMem(format!("{} statistics areas", len.div_ceil(step))));
        }
        let mut rest = &args[2..];
        let (mut precise, mut histogram) = (false, Vec::new());
        if let Some(n) = rest.first().and_then(|s| parse_u64(s)) {
            let n = n as usize;
            let opts = rest.get(1..1 + n).ok_or_else(|| invalid!("missing statistics options"))?;
            for o in opts {
                if o == "precise_timestamps" {
                    precise = true;
                } else if let Some(h) = o.strip_prefix("histogram:") {
                    histogram = h
                        .split(',')
                        .map(|b| parse_u64(b).ok_or_else(|| invalid!("invalid histogram")))
                        .collect::<DmResult<_>>()?;
                    if histogram.windows(2).any(|w| w[0] >= w[1]) || histogram.is_empty() {
                        return Err(invalid!("histogram boundaries must increase"));
                    }
                } else {
                    return Err(invalid!("unknown statistics option {o}"));
                }
            }
            rest = &rest[1 + n..];
        }
        if rest.len() > 2 {
            return Err(invalid!("too many statistics arguments"));
        }
        let program_id = rest.first().cloned().unwrap_or_else(|| "-".into());
        let aux = rest.get(1).cloned().unwrap_or_else(|| "-".into());
        let id = (0..=i32::MAX as u32)
            .find(|i| !self.regions.contains_key(i))
            .ok_or_else(|| DmError::NoMem("no free region id".into()))?;
        // Histogram boundaries are milliseconds, nanoseconds with precise_timestamps.
        let unit = if precise { 1 } else { 1_000_000 };
        let bounds = histogram.iter().map(|b| b.saturating_mul(unit)).collect();
        let counters = Arc::new(RegionCounters::new(start, len, step, bounds));
        self.regions.insert(id, Region { start, len, step, precise, histogram, program_id, aux, counters });
        Ok(format!("{id}"))
    }

    fn list(&self, program: Option<&str>) -> String {
        let mut out = String::new();
        for (id, r) in &self.regions {
            if program.is_some_and(|p| p != "-" && p != r.program_id) {
                continue;
            }
            let _ = write!(out, "{id}: {}+{} {} {} {}", r.start, r.len, r.step, r.program_id, r.aux);
            if r.precise {
                out.push_str(" precise_timestamps");
            }
            if !r.histogram.is_empty() {
                let h: Vec<String> = r.histogram.iter().map(u64::to_string).collect();
                let _ = write!(out, " histogram:{}", h.join(","));
            }
            out.push('\n');
        }
        out
    }
}

/// Zeroes a region's counters, but for the IOs in flight (`@stats_clear`).
fn clear(r: &Region) {
    for a in r.counters.areas().iter_mut() {
        let in_flight = a.in_flight;
        let n = a.histogram.len();
        *a = Area { in_flight, stamp: a.stamp, histogram: vec![0; n], ..Area::default() };
    }
}

/// `@stats_print`: one line per area, `start+step` (the kernel prints the step even for a last,
/// shorter area) then 13 counters (times in milliseconds, or nanoseconds with precise_timestamps),
/// then the histogram (`dm_stats_print`).
fn print(r: &Region, lines: Option<(u64, u64)>) -> String {
    let areas = r.len.div_ceil(r.step);
    let (first, count) = lines.unwrap_or((0, areas));
    let now = Instant::now();
    let mut counters = r.counters.areas();
    let t = |ns: u64| if r.precise { ns } else { ns / 1_000_000 };
    let mut out = String::new();
    for i in first.min(areas)..first.saturating_add(count).min(areas) {
        let start = r.start + i * r.step;
        let a = &mut counters[i as usize];
        a.round(now);
        let _ = write!(
            out,
            "{start}+{} {} {} {} {} {} {} {} {} {} {} {} {} {}",
            r.step,
            a.ios[0],
            a.merges[0],
            a.sectors[0],
            t(a.ticks[0]),
            a.ios[1],
            a.merges[1],
            a.sectors[1],
            t(a.ticks[1]),
            a.in_flight[0] + a.in_flight[1],
            t(a.io_ticks_total),
            t(a.time_in_queue),
            t(a.io_ticks[0]),
            t(a.io_ticks[1]),
        );
        if !r.histogram.is_empty() {
            out.push(' ');
            let h: Vec<String> = a.histogram.iter().map(u64::to_string).collect();
            out.push_str(&h.join(":"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(s: &mut Stats, m: &str) -> DmResult<Option<String>> {
        let argv: Vec<String> = m.split_whitespace().map(str::to_owned).collect();
        s.message(&argv, Sectors(100))
    }

    #[test]
    fn regions_are_created_listed_printed_and_deleted() {
        let mut s = Stats::default();
        assert_eq!(msg(&mut s, "@stats_create - /2").unwrap().unwrap(), "0");
        assert_eq!(msg(&mut s, "@stats_create 10+20 8 1 precise_timestamps dmstats aux").unwrap().unwrap(), "1");
        assert_eq!(
            msg(&mut s, "@stats_list").unwrap().unwrap(),
            "0: 0+100 50 - -\n1: 10+20 8 dmstats aux precise_timestamps\n"
        );
        assert_eq!(
            msg(&mut s, "@stats_print 1").unwrap().unwrap(),
            "10+8 0 0 0 0 0 0 0 0 0 0 0 0 0\n18+8 0 0 0 0 0 0 0 0 0 0 0 0 0\n26+8 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        );
        msg(&mut s, "@stats_delete 0").unwrap();
        assert!(matches!(msg(&mut s, "@stats_delete 0"), Err(DmError::NotFound(_))));
        assert!(matches!(msg(&mut s, "@stats_create 1+0 1"), Err(DmError::Invalid(_))));
    }
}
