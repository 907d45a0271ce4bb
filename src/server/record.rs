//! The daemon's state record: what a daemon started on the same run directory after any death
//! (kill -9, a crash, SIGTERM) needs to bring every device back with the same name, uuid, number,
//! tables and flags (as ublk's `UBLK_F_USER_RECOVERY` lets a server come back; docs/reliability.md).
//!
//! One file per device (`<run dir>/state/dm-<minor>`), rewritten whole by write-then-rename
//! whenever the device changes, before the command that changed it is answered: a record is
//! always one whole version, and a command costs O(1) in the number of other devices. Plus
//! `files`, an append-only log of the pseudo numbers given to regular files (docs/pdev-numbers.md),
//! compacted at start-up.
//!
//! Tables are kept as the kernel reports them (`STATUS_TYPE_TABLE`: underlying devices by
//! number, as the kernel holds devices rather than paths), which the targets' constructors accept
//! back. The text format is one `key value` per line; names, uuids and table text are escaped
//! (`%XX` for bytes outside printable ASCII and for `%`) so any byte survives.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use crate::dm::device::Device;
use crate::dm::pdev::FileNumber;
use crate::dm::table::Table;
use crate::dm::Geometry;
use crate::dm::StatusType;

const MAGIC: &str = "dmemu-state 1";

/// One table as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRecord {
    pub read_only: bool,
    /// (start, length, type, parameters)
    pub lines: Vec<(u64, u64, String, String)>,
}

/// One device as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    pub minor: u32,
    pub name: Vec<u8>,
    pub uuid: Option<Vec<u8>>,
    pub event_nr: u32,
    pub suspended: bool,
    pub bdev_read_only: bool,
    pub deferred_remove: bool,
    pub read_ahead_kb: u32,
    pub geometry: Option<Geometry>,
    pub live: Option<TableRecord>,
    pub inactive: Option<TableRecord>,
}

/// Escapes bytes so a record line holds any name or parameter text.
pub fn escape(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_graphic() && c != b'%' {
            s.push(c as char);
        } else {
            let _ = write!(s, "%{c:02X}");
        }
    }
    s
}

pub fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn table_record(t: &Table) -> TableRecord {
    TableRecord {
        read_only: t.read_only(),
        lines: t
            .status(StatusType::Table, false)
            .into_iter()
            .map(|s| (s.start.0, s.length.0, s.target_type, s.text))
            .collect(),
    }
}

impl DeviceRecord {
    pub fn of(d: &Device) -> Self {
        DeviceRecord {
            minor: d.minor,
            name: d.name.as_bytes().to_vec(),
            uuid: d.uuid.as_ref().map(|u| u.as_bytes().to_vec()),
            event_nr: d.event_nr,
            suspended: d.suspended,
            bdev_read_only: d.bdev_read_only,
            deferred_remove: d.deferred_remove,
            read_ahead_kb: d.read_ahead_kb,
            geometry: d.geometry,
            live: d.live.as_deref().map(table_record),
            inactive: d.inactive.as_ref().map(table_record),
        }
    }

    pub fn encode(&self) -> String {
        let mut s = format!("{MAGIC}\nminor {}\nname {}\n", self.minor, escape(&self.name));
        if let Some(u) = &self.uuid {
            let _ = writeln!(s, "uuid {}", escape(u));
        }
        let flag = |b: bool| b as u8;
        let _ = writeln!(
            s,
            "event_nr {}\nsuspended {}\nbdev_read_only {}\ndeferred_remove {}\nread_ahead_kb {}",
            self.event_nr,
            flag(self.suspended),
            flag(self.bdev_read_only),
            flag(self.deferred_remove),
            self.read_ahead_kb
        );
        if let Some(g) = &self.geometry {
            let _ = writeln!(s, "geometry {} {} {} {}", g.cylinders, g.heads, g.sectors, g.start);
        }
        for (slot, t) in [("live", &self.live), ("inactive", &self.inactive)] {
            if let Some(t) = t {
                let _ = writeln!(s, "{slot} {} {}", flag(t.read_only), t.lines.len());
                for (start, len, ty, text) in &t.lines {
                    let _ = writeln!(s, "target {start} {len} {} {}", escape(ty.as_bytes()), escape(text.as_bytes()));
                }
            }
        }
        s.push_str("end\n");
        s
    }

    /// Parses a record; `None` for anything that is not one whole, well-formed record.
    pub fn decode(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let mut r = DeviceRecord {
            minor: u32::MAX,
            name: Vec::new(),
            uuid: None,
            event_nr: 0,
            suspended: false,
            bdev_read_only: false,
            deferred_remove: false,
            read_ahead_kb: 128,
            geometry: None,
            live: None,
            inactive: None,
        };
        let mut slot: Option<(bool, usize, TableRecord)> = None;
        let mut ended = false;
        let finish = |r: &mut DeviceRecord, slot: Option<(bool, usize, TableRecord)>| -> Option<()> {
            if let Some((live, want, t)) = slot {
                if t.lines.len() != want {
                    return None;
                }
                *(if live { &mut r.live } else { &mut r.inactive }) = Some(t);
            }
            Some(())
        };
        for line in lines {
            if ended {
                return None;
            }
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            let flag = |v: &str| match v {
                "0" => Some(false),
                "1" => Some(true),
                _ => None,
            };
            match key {
                "minor" => r.minor = rest.parse().ok()?,
                "name" => r.name = unescape(rest)?,
                "uuid" => r.uuid = Some(unescape(rest)?),
                "event_nr" => r.event_nr = rest.parse().ok()?,
                "suspended" => r.suspended = flag(rest)?,
                "bdev_read_only" => r.bdev_read_only = flag(rest)?,
                "deferred_remove" => r.deferred_remove = flag(rest)?,
                "read_ahead_kb" => r.read_ahead_kb = rest.parse().ok()?,
                "geometry" => {
                    let v: Vec<u64> = rest.split(' ').map(|x| x.parse().ok()).collect::<Option<_>>()?;
                    let [cylinders, heads, sectors, start] = v[..] else { return None };
                    r.geometry = Some(Geometry { cylinders, heads, sectors, start });
                }
                "live" | "inactive" => {
                    finish(&mut r, slot.take())?;
                    let (ro, n) = rest.split_once(' ')?;
                    slot =
                        Some((key == "live", n.parse().ok()?, TableRecord { read_only: flag(ro)?, lines: Vec::new() }));
                }
                "target" => {
                    let mut f = rest.splitn(4, ' ');
                    let start = f.next()?.parse().ok()?;
                    let len = f.next()?.parse().ok()?;
                    let ty = String::from_utf8(unescape(f.next()?)?).ok()?;
                    let text = String::from_utf8(unescape(f.next().unwrap_or(""))?).ok()?;
                    slot.as_mut()?.2.lines.push((start, len, ty, text));
                }
                "end" => {
                    finish(&mut r, slot.take())?;
                    ended = true;
                }
                _ => return None,
            }
        }
        (ended && r.minor != u32::MAX && !r.name.is_empty()).then_some(r)
    }
}

/// The record directory of a run directory.
pub struct StateRecord {
    dir: PathBuf,
}

/// Writes `content` to `path` whole or not at all (a reader sees the old or the new version).
fn write_whole(path: &Path, content: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}

impl StateRecord {
    pub fn open(run_dir: &Path) -> io::Result<Self> {
        let dir = run_dir.join("state");
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn device_path(&self, minor: u32) -> PathBuf {
        self.dir.join(format!("dm-{minor}"))
    }

    pub fn write_device(&self, d: &Device) -> io::Result<()> {
        write_whole(&self.device_path(d.minor), DeviceRecord::of(d).encode().as_bytes())
    }

    pub fn remove_device(&self, minor: u32) -> io::Result<()> {
        match std::fs::remove_file(self.device_path(minor)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn files_path(&self) -> PathBuf {
        self.dir.join("files")
    }

    /// Appends pseudo-number assignments to the `files` log (one line each, appended whole).
    pub fn append_files(&self, numbers: &[FileNumber]) -> io::Result<()> {
        use std::io::Write as _;
        let mut text = String::new();
        for n in numbers {
            let _ = writeln!(text, "file {} {} {} {}", n.minor, n.dev, n.ino, escape(n.path.as_bytes()));
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.files_path())?;
        f.write_all(text.as_bytes())
    }

    /// The recorded pseudo numbers (the last line for each minor wins), and the log rewritten
    /// to just those.
    pub fn files(&self) -> Vec<FileNumber> {
        let text = std::fs::read_to_string(self.files_path()).unwrap_or_default();
        let mut by_minor = std::collections::BTreeMap::new();
        for line in text.lines() {
            let parsed = (|| {
                let mut f = line.strip_prefix("file ")?.splitn(4, ' ');
                let minor = f.next()?.parse().ok()?;
                let dev = f.next()?.parse().ok()?;
                let ino = f.next()?.parse().ok()?;
                let path = String::from_utf8(unescape(f.next()?)?).ok()?;
                Some(FileNumber { minor, dev, ino, path })
            })();
            match parsed {
                Some(n) => {
                    by_minor.insert(n.minor, n);
                }
                // A line cut short by a death mid-append: its table load was never answered.
                None => {
                    tracing::warn!("state record: skipping unreadable line {line:?} in {}", self.files_path().display())
                }
            }
        }
        let numbers: Vec<FileNumber> = by_minor.into_values().collect();
        if text.is_empty() {
            return numbers;
        }
        let compact = std::fs::remove_file(self.files_path()).and_then(|()| self.append_files(&numbers));
        if let Err(e) = compact {
            tracing::error!("state record: rewriting {}: {e}", self.files_path().display());
        }
        numbers
    }

    /// Every device record found, in minor order; unreadable or torn ones are logged and skipped.
    pub fn devices(&self) -> Vec<DeviceRecord> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir(&self.dir) else { return out };
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(minor) = name.to_str().and_then(|n| n.strip_prefix("dm-")).and_then(|m| m.parse::<u32>().ok())
            else {
                continue;
            };
            match std::fs::read_to_string(e.path()).ok().as_deref().and_then(DeviceRecord::decode) {
                Some(r) if r.minor == minor => out.push(r),
                _ => {
                    tracing::error!("state record {} is unreadable: device dm-{minor} not restored", e.path().display())
                }
            }
        }
        out.sort_by_key(|r| r.minor);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_any_bytes() {
        let r = DeviceRecord {
            minor: 7,
            name: b"a b%\n\xff/".to_vec(),
            uuid: Some(b"LVM-x".to_vec()),
            event_nr: 9,
            suspended: true,
            bdev_read_only: false,
            deferred_remove: true,
            read_ahead_kb: 256,
            geometry: Some(Geometry { cylinders: 1, heads: 2, sectors: 3, start: 4 }),
            live: Some(TableRecord {
                read_only: false,
                lines: vec![(0, 10, "linear".into(), "251:0 0".into()), (10, 5, "zero".into(), String::new())],
            }),
            inactive: Some(TableRecord { read_only: true, lines: vec![(0, 1, "error".into(), String::new())] }),
        };
        let text = r.encode();
        assert_eq!(DeviceRecord::decode(&text), Some(r));
        // A torn record (cut anywhere before its end line) is refused, never half-read.
        for cut in 0..text.len() - 4 {
            assert_eq!(DeviceRecord::decode(&text[..cut]), None, "cut at {cut}");
        }
    }
}
