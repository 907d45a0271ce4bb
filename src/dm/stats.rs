//! The core `@stats_*` messages (linux-dm-abi.md §2.10): statistics regions over a device. Until the
//! data plane counts IO, every counter reads zero; the region bookkeeping and text formats are the
//! kernel's.

use std::collections::BTreeMap;
use std::fmt::Write;

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
}

/// One device's statistics regions, by id.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    regions: BTreeMap<u32, Region>,
}

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
            ("@stats_create", 3..=7) => self.create(&argv[1..], dev_size).map(Some),
            ("@stats_delete", 2) => {
                let id = region_id(&argv[1])?;
                self.regions.remove(&id).ok_or_else(|| DmError::NotFound(format!("stats region {id}")))?;
                Ok(None)
            }
            // Reports output without writing any: the caller sees an empty string (§2.7).
            ("@stats_clear", 2) => self.get(&argv[1]).map(|_| Some(String::new())),
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
                Ok(Some(print(r, lines)))
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
        self.regions.insert(id, Region { start, len, step, precise, histogram, program_id, aux });
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

fn print(r: &Region, lines: Option<(u64, u64)>) -> String {
    let areas = r.len.div_ceil(r.step);
    let (first, count) = lines.unwrap_or((0, areas));
    let mut out = String::new();
    for i in first.min(areas)..first.saturating_add(count).min(areas) {
        let start = r.start + i * r.step;
        let len = r.step.min(r.start + r.len - start);
        let _ = write!(out, "{start}+{len} 0 0 0 0 0 0 0 0 0 0 0 0 0");
        if !r.histogram.is_empty() {
            out.push(' ');
            out.push_str(&vec!["0"; r.histogram.len() + 1].join(":"));
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
            "10+8 0 0 0 0 0 0 0 0 0 0 0 0 0\n18+8 0 0 0 0 0 0 0 0 0 0 0 0 0\n26+4 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        );
        msg(&mut s, "@stats_delete 0").unwrap();
        assert!(matches!(msg(&mut s, "@stats_delete 0"), Err(DmError::NotFound(_))));
        assert!(matches!(msg(&mut s, "@stats_create 1+0 1"), Err(DmError::Invalid(_))));
    }
}
