//! Underlying devices ("physical devices", NetBSD's dm_pdev.c): what table lines name by path or by
//! `major:minor`, shared by every table that uses them.
//!
//! Three kinds exist: regular files, real block devices and dmemu's own devices (so tables stack).
//! Regular files have no device number, so they get a stable pseudo one: major `file_major`, minor
//! assigned in order of first use and kept for the daemon's lifetime, keyed by the file's identity
//! (st_dev, st_ino). See docs/pdev-numbers.md.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use super::error::{DmError, DmResult};
use super::types::{DevNum, Sectors, MINOR_LIMIT};

/// What the engine learns about a path or device number from the outside world. The engine never
/// touches the filesystem itself: a [`DeviceResolver`] does (the daemon's looks at the real one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub identity: Identity,
    /// Path to open for IO.
    pub path: String,
    pub size: Sectors,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A regular file, by (st_dev, st_ino).
    File { dev: u64, ino: u64 },
    /// A real block device.
    Block(DevNum),
}

pub trait DeviceResolver: Send + Sync {
    /// Looks up a path that is neither `major:minor` nor one of dmemu's own nodes.
    fn resolve_path(&self, path: &str) -> DmResult<Resolved>;
    /// Looks up a real block device by number.
    fn resolve_block(&self, dev: DevNum) -> DmResult<Resolved>;
}

#[derive(Debug, PartialEq, Eq)]
pub enum PdevKind {
    File {
        path: String,
    },
    Block {
        path: String,
    },
    /// One of dmemu's own devices, by minor.
    Dm {
        minor: u32,
    },
}

/// One underlying device. Tables hold it by `Arc`; it lives while any table uses it.
#[derive(Debug)]
pub struct Pdev {
    pub dev: DevNum,
    pub kind: PdevKind,
    /// Size when it was resolved (files and block devices); dm devices are sized by their live table.
    pub size: Sectors,
}

/// The registry: one `Pdev` per device number while referenced, plus the file → pseudo-number map.
pub struct PdevRegistry {
    dm_major: u32,
    file_major: u32,
    live: HashMap<DevNum, Weak<Pdev>>,
    file_minors: HashMap<(u64, u64), u32>,
    file_paths: HashMap<u32, String>,
}

impl PdevRegistry {
    pub fn new(dm_major: u32, file_major: u32) -> Self {
        Self { dm_major, file_major, live: HashMap::new(), file_minors: HashMap::new(), file_paths: HashMap::new() }
    }

    pub fn dm_major(&self) -> u32 {
        self.dm_major
    }
    pub fn file_major(&self) -> u32 {
        self.file_major
    }

    /// Gets (or makes) the shared pdev for a resolved path or block number.
    pub fn get_resolved(&mut self, r: Resolved) -> DmResult<Arc<Pdev>> {
        let (dev, kind) = match r.identity {
            Identity::Block(dev) => (dev, PdevKind::Block { path: r.path.clone() }),
            Identity::File { dev, ino } => {
                let next = self.file_minors.len() as u32;
                if next >= MINOR_LIMIT {
                    return Err(DmError::NoMem("pseudo device numbers exhausted".into()));
                }
                let minor = *self.file_minors.entry((dev, ino)).or_insert(next);
                self.file_paths.insert(minor, r.path.clone());
                (DevNum::new(self.file_major, minor), PdevKind::File { path: r.path.clone() })
            }
        };
        Ok(self.intern(dev, || Pdev { dev, kind, size: r.size }))
    }

    /// Gets the pdev for one of dmemu's own devices.
    pub fn get_dm(&mut self, minor: u32) -> Arc<Pdev> {
        let dev = DevNum::new(self.dm_major, minor);
        self.intern(dev, || Pdev { dev, kind: PdevKind::Dm { minor }, size: Sectors(0) })
    }

    /// The path last seen for a pseudo-numbered file, so `file_major:N` can be named in a table.
    pub fn file_path(&self, minor: u32) -> Option<&str> {
        self.file_paths.get(&minor).map(String::as_str)
    }

    fn intern(&mut self, dev: DevNum, make: impl FnOnce() -> Pdev) -> Arc<Pdev> {
        if let Some(p) = self.live.get(&dev).and_then(Weak::upgrade) {
            return p;
        }
        let p = Arc::new(make());
        self.live.insert(dev, Arc::downgrade(&p));
        if self.live.len() > 64 && self.live.len().is_power_of_two() {
            self.live.retain(|_, w| w.strong_count() > 0);
        }
        p
    }

    /// Number of pdevs currently referenced by some table.
    pub fn in_use(&self) -> usize {
        self.live.values().filter(|w| w.strong_count() > 0).count()
    }
}
