//! The sysfs tree libdevmapper reads (`dm/name`, `dm/uuid`, `size`, `holders/` …), kept under
//! `<run_dir>/sys` and updated after every command (layout: docs/control-socket.md).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::dm::device::Device;
use crate::dm::pdev::PdevKind;
use crate::dm::target::Limits;
use crate::dm::Engine;

#[derive(Clone, Debug, PartialEq, Eq)]
struct DevState {
    /// Name and uuid bytes: `dm/name` and `dm/uuid` show them raw, as the kernel's sysfs does.
    name: Vec<u8>,
    uuid: Vec<u8>,
    size: u64,
    ro: bool,
    suspended: bool,
    /// The live table's queue limits.
    limits: Limits,
    slaves: Vec<u32>,
    holders: Vec<u32>,
}

pub struct Sysfs {
    root: PathBuf,
    /// Removed device directories are renamed here (one syscall) and deleted by a background
    /// thread: removing 5,000 devices costs 5,000 renames, not 300,000 unlinks on the caller's
    /// clock (issue 11's `remove_all` goal).
    trash: PathBuf,
    trashed: u64,
    reaper: std::sync::mpsc::Sender<PathBuf>,
    major: u32,
    known: HashMap<u32, DevState>,
    /// Lower device → the devices whose live tables use it (their `holders/`).
    holders: HashMap<u32, BTreeSet<u32>>,
}

/// The dmemu devices a device's live table uses (its `slaves/`), in minor order.
fn slaves_of(d: &Device) -> Vec<u32> {
    let set: BTreeSet<u32> = d
        .live
        .as_ref()
        .map(|t| {
            t.devices()
                .iter()
                .filter_map(|p| match p.kind {
                    PdevKind::Dm { minor } => Some(minor),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    set.into_iter().collect()
}

fn write_atomic(path: &Path, content: &(impl AsRef<[u8]> + ?Sized)) -> io::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, content.as_ref())?;
    std::fs::rename(&tmp, path)
}

fn replace_link(target: &str, link: &Path) -> io::Result<()> {
    let _ = std::fs::remove_file(link);
    symlink(target, link)
}

impl Sysfs {
    /// Starts an empty tree at `<run_dir>/sys`, clearing whatever an earlier daemon left.
    pub fn new(run_dir: &Path, major: u32) -> io::Result<Self> {
        let root = run_dir.join("sys");
        let trash = run_dir.join("sys-removed");
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&trash);
        for d in ["devices/virtual/block", "dev/block", "block", "class/block"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        std::fs::create_dir_all(&trash)?;
        let (reaper, rx) = std::sync::mpsc::channel::<PathBuf>();
        std::thread::Builder::new().name("sysfs-reaper".into()).spawn(move || {
            for dir in rx {
                let _ = std::fs::remove_dir_all(dir);
            }
        })?;
        Ok(Self { root, trash, trashed: 0, reaper, major, known: HashMap::new(), holders: HashMap::new() })
    }

    fn dev_dir(&self, minor: u32) -> PathBuf {
        self.root.join(format!("devices/virtual/block/dm-{minor}"))
    }

    /// Brings the tree in line with the engine for the devices in `changed` (and the devices
    /// whose `holders/` they move), touching only what changed: a command costs O(1) in the
    /// number of other devices. `limits` gives a device's queue limits (the data plane's, which
    /// stacks them over the devices below).
    pub fn sync(&mut self, engine: &Engine, changed: &[u32], limits: &dyn Fn(u32) -> Limits) {
        if let Err(e) = self.try_sync(engine, changed, limits) {
            tracing::warn!("updating sysfs tree under {}: {e}", self.root.display());
        }
    }

    fn try_sync(&mut self, engine: &Engine, changed: &[u32], limits: &dyn Fn(u32) -> Limits) -> io::Result<()> {
        let mut todo: BTreeSet<u32> = changed.iter().copied().collect();
        // First the holders index, so a lower device's state below sees its new holders.
        for &m in changed {
            let slaves = engine.device(m).filter(|d| d.queue_initialized).map(slaves_of).unwrap_or_default();
            let old = self.known.get(&m).map(|s| s.slaves.clone()).unwrap_or_default();
            if old == slaves {
                continue;
            }
            for l in &old {
                if let Some(h) = self.holders.get_mut(l) {
                    h.remove(&m);
                    if h.is_empty() {
                        self.holders.remove(l);
                    }
                }
                todo.insert(*l);
            }
            for l in &slaves {
                self.holders.entry(*l).or_default().insert(m);
                todo.insert(*l);
            }
        }
        for m in todo {
            // The kernel registers a device's gendisk at its first successful table load, so a
            // device that never had one has no sysfs entry yet (linux-dm-abi.md §2.4, DM_DEV_CREATE).
            let Some(d) = engine.device(m).filter(|d| d.queue_initialized) else {
                if self.known.contains_key(&m) {
                    self.remove(m)?;
                }
                continue;
            };
            let state = DevState {
                name: d.name.as_bytes().to_vec(),
                uuid: d.uuid.as_ref().map(|u| u.as_bytes().to_vec()).unwrap_or_default(),
                size: d.size().0,
                ro: d.disk_read_only(),
                suspended: d.suspended,
                limits: limits(m),
                slaves: slaves_of(d),
                holders: self.holders.get(&m).map(|h| h.iter().copied().collect()).unwrap_or_default(),
            };
            let old = self.known.get(&m);
            if old != Some(&state) {
                self.write(m, &state, old.cloned())?;
                self.known.insert(m, state);
            }
        }
        Ok(())
    }

    fn remove(&mut self, minor: u32) -> io::Result<()> {
        let _ = std::fs::remove_file(self.root.join(format!("dev/block/{}:{minor}", self.major)));
        let _ = std::fs::remove_file(self.root.join(format!("block/dm-{minor}")));
        let _ = std::fs::remove_file(self.root.join(format!("class/block/dm-{minor}")));
        self.trashed += 1;
        let away = self.trash.join(format!("dm-{minor}.{}", self.trashed));
        match std::fs::rename(self.dev_dir(minor), &away) {
            Ok(()) => {
                let _ = self.reaper.send(away);
            }
            Err(_) => {
                let _ = std::fs::remove_dir_all(self.dev_dir(minor));
            }
        }
        self.known.remove(&minor);
        Ok(())
    }

    fn write(&self, minor: u32, s: &DevState, old: Option<DevState>) -> io::Result<()> {
        let dir = self.dev_dir(minor);
        if old.is_none() {
            for sub in ["dm", "bdi", "queue", "holders", "slaves"] {
                std::fs::create_dir_all(dir.join(sub))?;
            }
            write_atomic(&dir.join("dev"), &format!("{}:{minor}\n", self.major))?;
            write_atomic(&dir.join("bdi/read_ahead_kb"), "128\n")?;
            write_atomic(&dir.join("removable"), "0\n")?;
            write_atomic(&dir.join("hidden"), "0\n")?;
            // What libudev needs to take the directory for a device: its uevent (device number,
            // kernel name; libudev's devnode is /dev/<DEVNAME>) and its subsystem.
            write_atomic(
                &dir.join("uevent"),
                &format!("MAJOR={}\nMINOR={minor}\nDEVNAME=dm-{minor}\nDEVTYPE=disk\n", self.major),
            )?;
            replace_link("../../../../class/block", &dir.join("subsystem"))?;
            let target = format!("../../devices/virtual/block/dm-{minor}");
            replace_link(&target, &self.root.join(format!("dev/block/{}:{minor}", self.major)))?;
            replace_link(
                &format!("../devices/virtual/block/dm-{minor}"),
                &self.root.join(format!("block/dm-{minor}")),
            )?;
            replace_link(&target, &self.root.join(format!("class/block/dm-{minor}")))?;
        }
        type Render = fn(&DevState) -> Vec<u8>;
        type List = fn(&DevState) -> &Vec<u32>;
        let changed = |f: Render| old.as_ref().is_none_or(|o| f(o) != f(s));
        let files: [(&str, Render); 12] = [
            ("size", |s| format!("{}\n", s.size).into_bytes()),
            ("ro", |s| format!("{}\n", s.ro as u8).into_bytes()),
            ("dm/name", |s| [&s.name[..], b"\n"].concat()),
            ("dm/uuid", |s| [&s.uuid[..], b"\n"].concat()),
            ("dm/suspended", |s| format!("{}\n", s.suspended as u8).into_bytes()),
            ("queue/logical_block_size", |s| format!("{}\n", s.limits.logical_block_size).into_bytes()),
            ("queue/hw_sector_size", |s| format!("{}\n", s.limits.logical_block_size).into_bytes()),
            ("queue/physical_block_size", |s| format!("{}\n", s.limits.physical_block_size).into_bytes()),
            ("queue/minimum_io_size", |s| format!("{}\n", s.limits.io_min).into_bytes()),
            ("queue/optimal_io_size", |s| format!("{}\n", s.limits.io_opt).into_bytes()),
            ("queue/discard_granularity", |s| {
                format!("{}\n", if s.limits.discard { s.limits.logical_block_size } else { 0 }).into_bytes()
            }),
            // What one discard may cover: the NBD front end's largest request when supported.
            ("queue/discard_max_bytes", |s| {
                format!("{}\n", if s.limits.discard { u32::MAX as u64 + 1 - 512 } else { 0 }).into_bytes()
            }),
        ];
        for (file, render) in files {
            if changed(render) {
                write_atomic(&dir.join(file), &render(s))?;
            }
        }
        let lists: [(&str, List); 2] = [("slaves", |s| &s.slaves), ("holders", |s| &s.holders)];
        for (sub, list) in lists {
            if old.as_ref().is_some_and(|o| list(o) == list(s)) {
                continue;
            }
            let d = dir.join(sub);
            for e in std::fs::read_dir(&d)? {
                let _ = std::fs::remove_file(e?.path());
            }
            for m in list(s) {
                symlink(format!("../../dm-{m}"), d.join(format!("dm-{m}")))?;
            }
        }
        Ok(())
    }
}
