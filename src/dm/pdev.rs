//! Underlying devices ("physical devices", NetBSD's dm_pdev.c): what table lines name by path or by
//! `major:minor`, shared by every table that uses them. Files and block devices are opened when a
//! table naming them is loaded and stay open exactly while a table or IO in flight holds their
//! `Pdev` (the kernel's `dm_get_device`/`dm_put_device`).
//!
//! Three kinds exist: regular files, real block devices and dmemu's own devices (so tables stack).
//! Regular files have no device number, so they get a stable pseudo one: major `file_major`, minor
//! assigned in order of first use and kept for the daemon's lifetime, keyed by the file's identity
//! (st_dev, st_ino). See docs/pdev-numbers.md.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use super::error::{DmError, DmResult};
use super::types::{DevNum, Sectors, MINOR_LIMIT};
use crate::io::Backing;

/// What the engine learns about a path or device number from the outside world. The engine never
/// touches the filesystem itself: a [`DeviceResolver`] does (the daemon's looks at the real one),
/// and hands over the device it opened, which the pdev then holds.
#[derive(Debug)]
pub struct Resolved {
    /// From `fstat` of the opened fd.
    pub identity: Identity,
    /// The path it was found by (what `file_major:N` looks up again once no table holds it).
    pub path: String,
    /// The size now (`bdev_nr_sectors`).
    pub size: Sectors,
    pub handle: Handle,
    /// Opened for writing too (`FMODE_WRITE`), else read-only.
    pub writable: bool,
}

impl Resolved {
    /// A device found without opening anything (resolvers that do no IO).
    pub fn unopened(identity: Identity, path: String, size: Sectors) -> Self {
        Resolved { identity, path, size, handle: Handle::Unopened, writable: true }
    }
}

/// What a resolver opened.
#[derive(Debug)]
pub enum Handle {
    /// The open device: every IO to it goes through this fd.
    Open(Backing),
    /// A block node with no driver behind it: usable only if it is one of dmemu's own devices
    /// (its major is dmemu's), which are reached without an fd.
    NoDriver,
    /// Nothing was opened: a resolver that does no IO (tests). IO to such a pdev fails.
    Unopened,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A regular file, by (st_dev, st_ino).
    File { dev: u64, ino: u64 },
    /// A real block device.
    Block(DevNum),
}

/// The daemon's way to the outside world. Like the kernel's `dm_get_device`, a table's devices
/// are looked up and opened once, at load, in the table's mode (read-write unless the table is
/// read-only, `dm_table_get_mode`); the open device is held and all IO uses it.
pub trait DeviceResolver: Send + Sync {
    /// Looks up and opens a path that is neither `major:minor` nor one of dmemu's own nodes.
    fn resolve_path(&self, path: &str, writable: bool) -> DmResult<Resolved>;
    /// Looks up and opens a real block device by number.
    fn resolve_block(&self, dev: DevNum, writable: bool) -> DmResult<Resolved>;
    /// Opens a held device again through its open fd, not a path (a read-only open needed
    /// read-write: the kernel's `upgrade_mode`).
    fn reopen(&self, p: &Pdev, _writable: bool) -> DmResult<Resolved> {
        Err(DmError::NoSuchBlockDevice(format!("{}: cannot be opened again", p.dev)))
    }
    /// A held device's size now, read from its fd; `None`: the size seen when it was resolved.
    fn size(&self, _p: &Pdev) -> Option<Sectors> {
        None
    }
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

/// One underlying device (the kernel's `dm_dev`). Tables hold it by `Arc`, and so does IO in
/// flight to it; the fd it holds closes when the last of them lets go (`dm_put_device`).
#[derive(Debug)]
pub struct Pdev {
    pub dev: DevNum,
    pub kind: PdevKind,
    /// Sectors, as of the latest load that named it (files and block devices); dm devices are
    /// sized by their live table.
    size: AtomicU64,
    file: Option<Backing>,
    writable: bool,
}

impl Pdev {
    /// A pdev with nothing open (dmemu devices, and tests).
    pub fn new(dev: DevNum, kind: PdevKind, size: Sectors) -> Self {
        Pdev { dev, kind, size: AtomicU64::new(size.0), file: None, writable: true }
    }

    /// A pdev holding an open file or block device.
    pub fn with_file(dev: DevNum, kind: PdevKind, size: Sectors, file: Backing) -> Self {
        let writable = file.writable();
        Pdev { dev, kind, size: AtomicU64::new(size.0), file: Some(file), writable }
    }

    /// The size as of the latest load that named it (0 for dm devices: see their live table).
    pub fn size(&self) -> Sectors {
        Sectors(self.size.load(Ordering::Relaxed))
    }

    pub(crate) fn set_size(&self, s: Sectors) {
        self.size.store(s.0, Ordering::Relaxed);
    }

    /// The open file or block device IO goes to.
    pub fn file(&self) -> Option<&Backing> {
        self.file.as_ref()
    }

    /// Open for writing (dm devices always are).
    pub fn writable(&self) -> bool {
        self.writable
    }
}

/// A regular file's pseudo number, as [`PdevRegistry::file_numbers`] lists it and
/// [`PdevRegistry::restore_file_number`] takes it back (a daemon's saved state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileNumber {
    pub minor: u32,
    /// `st_dev`, `st_ino`.
    pub dev: u64,
    pub ino: u64,
    /// The path last seen for it.
    pub path: String,
}

/// The registry: the pdevs tables hold, by device number, plus the file → pseudo-number map.
pub struct PdevRegistry {
    dm_major: u32,
    file_major: u32,
    /// Held pdevs: usually one per number, two while a read-only open and a read-write one of
    /// the same device are both held (as the kernel keeps one `table_device` per mode).
    live: HashMap<DevNum, Vec<Weak<Pdev>>>,
    file_minors: HashMap<(u64, u64), u32>,
    /// Minor → (st_dev, st_ino), path last seen.
    files: BTreeMap<u32, ((u64, u64), String)>,
    /// The next minor to try: one past the highest given or restored, so a number never names
    /// two files while the records last.
    next_minor: u32,
    /// Minors given, or seen under a new path, since [`Self::take_new_file_numbers`] last ran
    /// (the daemon's state record appends them).
    fresh: Vec<u32>,
}

impl PdevRegistry {
    pub fn new(dm_major: u32, file_major: u32) -> Self {
        Self {
            dm_major,
            file_major,
            live: HashMap::new(),
            file_minors: HashMap::new(),
            files: BTreeMap::new(),
            next_minor: 0,
            fresh: Vec::new(),
        }
    }

    pub fn dm_major(&self) -> u32 {
        self.dm_major
    }
    pub fn file_major(&self) -> u32 {
        self.file_major
    }

    /// Gets the shared pdev for a resolved path or block number: one already held in a mode
    /// that will do (its size updated to the one just read), else a new one holding the
    /// resolver's open device.
    pub fn get_resolved(&mut self, r: Resolved) -> DmResult<Arc<Pdev>> {
        let (dev, kind) = match r.identity {
            Identity::Block(dev) => (dev, PdevKind::Block { path: r.path }),
            Identity::File { dev, ino } => {
                let minor = match self.file_minors.get(&(dev, ino)) {
                    Some(&m) => m,
                    None => {
                        let m = self.alloc_minor()?;
                        self.file_minors.insert((dev, ino), m);
                        m
                    }
                };
                if self.files.get(&minor).is_none_or(|(_, p)| *p != r.path) {
                    self.fresh.push(minor);
                }
                self.files.insert(minor, ((dev, ino), r.path.clone()));
                (DevNum::new(self.file_major, minor), PdevKind::File { path: r.path })
            }
        };
        if let Some(p) = self.held(dev, r.writable) {
            p.set_size(r.size);
            return Ok(p);
        }
        let p = match r.handle {
            Handle::Open(f) => Pdev::with_file(dev, kind, r.size, f),
            Handle::Unopened => Pdev { writable: r.writable, ..Pdev::new(dev, kind, r.size) },
            Handle::NoDriver => return Err(DmError::NoSuchBlockDevice(format!("{dev}: no driver"))),
        };
        Ok(self.hold(Arc::new(p)))
    }

    /// Gets the pdev for one of dmemu's own devices.
    pub fn get_dm(&mut self, minor: u32) -> Arc<Pdev> {
        let dev = DevNum::new(self.dm_major, minor);
        self.held(dev, true).unwrap_or_else(|| self.hold(Arc::new(Pdev::new(dev, PdevKind::Dm { minor }, Sectors(0)))))
    }

    /// A pdev some table holds with this number, open for writing if `writable` (a read-write
    /// open serves a read-only table too).
    pub fn held(&self, dev: DevNum, writable: bool) -> Option<Arc<Pdev>> {
        self.live.get(&dev)?.iter().filter_map(Weak::upgrade).find(|p| p.writable || !writable)
    }

    /// The path last seen for a pseudo-numbered file, so `file_major:N` can be named in a table.
    pub fn file_path(&self, minor: u32) -> Option<&str> {
        self.files.get(&minor).map(|(_, p)| p.as_str())
    }

    /// The pseudo minor a file (by `st_dev`, `st_ino`) was given, if any.
    pub fn file_number(&self, dev: u64, ino: u64) -> Option<u32> {
        self.file_minors.get(&(dev, ino)).copied()
    }

    /// Whether a resolved identity is the file numbered `file_major:minor`.
    pub fn is_file_numbered(&self, minor: u32, identity: Identity) -> bool {
        matches!(identity, Identity::File { dev, ino } if self.files.get(&minor).is_some_and(|(id, _)| *id == (dev, ino)))
    }

    /// The pseudo numbers given (or whose file was seen under a new path) since the last call.
    pub fn take_new_file_numbers(&mut self) -> Vec<FileNumber> {
        std::mem::take(&mut self.fresh)
            .into_iter()
            .filter_map(|minor| {
                let ((dev, ino), path) = self.files.get(&minor)?;
                Some(FileNumber { minor, dev: *dev, ino: *ino, path: path.clone() })
            })
            .collect()
    }

    /// Every file's pseudo number, by minor (for a daemon's saved state).
    pub fn file_numbers(&self) -> Vec<FileNumber> {
        self.files
            .iter()
            .map(|(&minor, &((dev, ino), ref path))| FileNumber { minor, dev, ino, path: path.clone() })
            .collect()
    }

    /// Gives a file the pseudo number it had before (a daemon's saved state, at startup). The
    /// same assignment again is accepted; a minor or a file already numbered otherwise is
    /// refused (`EBUSY`), and so is a minor out of range (`EINVAL`).
    pub fn restore_file_number(&mut self, n: FileNumber) -> DmResult<()> {
        if n.minor >= MINOR_LIMIT {
            return Err(DmError::Invalid(format!("file minor {} out of range", n.minor)));
        }
        let id = (n.dev, n.ino);
        match (self.file_minors.get(&id), self.files.get(&n.minor)) {
            (Some(&m), _) if m == n.minor => return Ok(()),
            (Some(&m), _) => {
                return Err(DmError::Busy(format!("file {}:{} already has minor {m}", n.dev, n.ino)));
            }
            (None, Some((other, _))) => {
                return Err(DmError::Busy(format!("minor {} already names file {}:{}", n.minor, other.0, other.1)));
            }
            (None, None) => {}
        }
        self.file_minors.insert(id, n.minor);
        self.files.insert(n.minor, (id, n.path));
        self.next_minor = self.next_minor.max(n.minor + 1);
        Ok(())
    }

    /// The next free pseudo minor: one past the highest so far, else (all used up to the limit)
    /// the lowest free one.
    fn alloc_minor(&mut self) -> DmResult<u32> {
        let m = if self.next_minor < MINOR_LIMIT && !self.files.contains_key(&self.next_minor) {
            self.next_minor
        } else {
            (0..MINOR_LIMIT)
                .find(|m| !self.files.contains_key(m))
                .ok_or_else(|| DmError::NoMem("pseudo device numbers exhausted".into()))?
        };
        self.next_minor = self.next_minor.max(m + 1);
        Ok(m)
    }

    fn hold(&mut self, p: Arc<Pdev>) -> Arc<Pdev> {
        let v = self.live.entry(p.dev).or_default();
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(&p));
        if self.live.len() > 64 && self.live.len().is_power_of_two() {
            self.live.retain(|_, v| {
                v.retain(|w| w.strong_count() > 0);
                !v.is_empty()
            });
        }
        p
    }

    /// Number of device numbers currently held by some table.
    pub fn in_use(&self) -> usize {
        self.live.values().filter(|v| v.iter().any(|w| w.strong_count() > 0)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(ino: u64, path: &str, size: u64, writable: bool) -> Resolved {
        Resolved { writable, ..Resolved::unopened(Identity::File { dev: 9, ino }, path.into(), Sectors(size)) }
    }

    fn num(minor: u32, ino: u64, path: &str) -> FileNumber {
        FileNumber { minor, dev: 9, ino, path: path.into() }
    }

    #[test]
    fn held_pdevs_are_shared_and_take_the_size_of_each_load() {
        let mut r = PdevRegistry::new(252, 251);
        let a = r.get_resolved(file(1, "/a", 0, true)).unwrap();
        assert_eq!(a.dev, DevNum::new(251, 0));
        let again = r.get_resolved(file(1, "/other/name", 2048, true)).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(a.size(), Sectors(2048), "the size read at this load");
        assert_eq!(r.file_path(0), Some("/other/name"));
        drop((a, again));
        assert!(r.held(DevNum::new(251, 0), false).is_none(), "nothing holds it once the tables go");
        assert_eq!(r.in_use(), 0);
        // The number stays with the file.
        assert_eq!(r.get_resolved(file(1, "/a", 0, true)).unwrap().dev, DevNum::new(251, 0));
    }

    #[test]
    fn a_read_only_open_is_not_used_for_a_read_write_table() {
        let mut r = PdevRegistry::new(252, 251);
        let ro = r.get_resolved(file(1, "/a", 8, false)).unwrap();
        assert!(!ro.writable());
        let rw = r.get_resolved(file(1, "/a", 8, true)).unwrap();
        assert!(rw.writable() && !Arc::ptr_eq(&ro, &rw));
        assert_eq!(ro.dev, rw.dev, "one device, one number");
        // Either open serves a read-only table; only the read-write one a read-write table.
        let p = r.get_resolved(file(1, "/a", 8, false)).unwrap();
        assert!(Arc::ptr_eq(&p, &ro) || Arc::ptr_eq(&p, &rw));
        drop(p);
        assert!(Arc::ptr_eq(&r.held(ro.dev, true).unwrap(), &rw));
        drop(rw);
        assert!(r.held(ro.dev, true).is_none());
        assert!(Arc::ptr_eq(&r.held(ro.dev, false).unwrap(), &ro));
        assert_eq!(r.in_use(), 1);
    }

    #[test]
    fn file_numbers_round_trip_and_clashes_are_refused() {
        let mut r = PdevRegistry::new(252, 251);
        let _a = r.get_resolved(file(1, "/a", 8, true)).unwrap();
        let _b = r.get_resolved(file(2, "/b", 8, true)).unwrap();
        let saved = r.file_numbers();
        assert_eq!(saved, vec![num(0, 1, "/a"), num(1, 2, "/b")]);
        let mut fresh = PdevRegistry::new(252, 251);
        for n in saved.clone() {
            fresh.restore_file_number(n).unwrap();
        }
        assert_eq!(fresh.file_numbers(), saved);
        // The same assignment again is fine; anything else that clashes is not.
        fresh.restore_file_number(num(1, 2, "/b")).unwrap();
        assert!(matches!(fresh.restore_file_number(num(1, 3, "/c")), Err(DmError::Busy(_))));
        assert!(matches!(fresh.restore_file_number(num(7, 2, "/b")), Err(DmError::Busy(_))));
        assert!(matches!(fresh.restore_file_number(num(MINOR_LIMIT, 4, "/d")), Err(DmError::Invalid(_))));
        // A restored file resolves to its old number.
        assert_eq!(fresh.get_resolved(file(2, "/b2", 8, true)).unwrap().dev, DevNum::new(251, 1));
    }

    #[test]
    fn new_numbers_follow_the_highest_restored_one() {
        let mut r = PdevRegistry::new(252, 251);
        r.restore_file_number(num(5, 50, "/five")).unwrap();
        r.restore_file_number(num(2, 20, "/two")).unwrap();
        let p = r.get_resolved(file(1, "/new", 8, true)).unwrap();
        assert_eq!(p.dev.minor, 6, "past the highest, not into the gaps");
        assert_eq!(r.get_resolved(file(3, "/new3", 8, true)).unwrap().dev.minor, 7);
        // At the top of the range, the lowest free minor.
        r.restore_file_number(num(MINOR_LIMIT - 1, 99, "/top")).unwrap();
        assert_eq!(r.get_resolved(file(4, "/n4", 8, true)).unwrap().dev.minor, 0);
        assert_eq!(r.get_resolved(file(5, "/n5", 8, true)).unwrap().dev.minor, 1);
        assert_eq!(r.get_resolved(file(6, "/n6", 8, true)).unwrap().dev.minor, 3);
    }
}
