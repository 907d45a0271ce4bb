//! The engine: every command runs here, synchronously, against devices, tables and pdevs.
//! Like the kernel's dm-ioctl.c handlers, minus the copying (the codecs do that).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::command::*;
use super::device::Device;
use super::error::{DmError, DmResult};
use super::pdev::{DeviceResolver, Identity, Pdev, PdevKind, PdevRegistry};
use super::table::Table;
use super::target::{split_args, BuildEnv, Target, TargetRegistry};
use super::types::*;
use crate::invalid;
use crate::io::DataPlane;

/// Engine-wide settings.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Block major of dmemu's devices.
    pub major: u32,
    /// Pseudo major given to regular files used as underlying devices.
    pub file_major: u32,
}

pub struct Engine {
    cfg: EngineConfig,
    /// By minor.
    devices: BTreeMap<u32, Device>,
    /// Name → minor, in `strcmp` order (LIST_DEVICES order, linux-dm-abi.md §2.4).
    by_name: BTreeMap<Vec<u8>, u32>,
    by_uuid: HashMap<Vec<u8>, u32>,
    pdevs: PdevRegistry,
    targets: TargetRegistry,
    resolver: Box<dyn DeviceResolver>,
    /// The data plane whose core services targets get (the daemon's; a detached one otherwise).
    plane: DataPlane,
    /// Global event counter (§2.9): moves on create/remove/rename, table swaps and device events.
    global_event: u64,
    /// Tables (live or inactive, of any device) using each dmemu device: kept as tables come and
    /// go so a device's open count costs O(1), not a walk over every table.
    users: HashMap<u32, u32>,
    /// Devices marked for deferred removal.
    deferred: BTreeSet<u32>,
    /// No minor below this is free (allocation is lowest-free, as the kernel's idr).
    free_from: u32,
    /// Devices whose visible state may have changed since [`Self::take_changed`] last ran (the
    /// daemon republishes only these: a command costs O(1) in the number of other devices).
    changed: BTreeSet<u32>,
}

/// The dmemu devices among a table's underlying devices.
fn dm_minors(devs: &[Arc<Pdev>]) -> impl Iterator<Item = u32> + '_ {
    devs.iter().filter_map(|p| match p.kind {
        PdevKind::Dm { minor } => Some(minor),
        _ => None,
    })
}

fn no_device(key: &DevKey) -> DmError {
    DmError::NoDevice(format!("no device with {key}"))
}

impl Engine {
    pub fn new(cfg: EngineConfig, targets: TargetRegistry, resolver: Box<dyn DeviceResolver>) -> Self {
        Self {
            cfg,
            devices: BTreeMap::new(),
            by_name: BTreeMap::new(),
            by_uuid: HashMap::new(),
            pdevs: PdevRegistry::new(cfg.major, cfg.file_major),
            targets,
            resolver,
            plane: DataPlane::detached(),
            global_event: 0,
            users: HashMap::new(),
            deferred: BTreeSet::new(),
            free_from: 0,
            changed: BTreeSet::new(),
        }
    }

    /// The devices created, changed or removed since the last call, in minor order; a minor
    /// with no device now was removed.
    pub fn take_changed(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.changed).into_iter().collect()
    }

    /// Counts a table in (`+1`) or out (`-1`) of the users of the dmemu devices below it, and
    /// marks those devices changed (their `holders` moved).
    fn count_users(&mut self, t: &Table, delta: i32) {
        let lower: HashSet<u32> = dm_minors(t.devices()).collect();
        for m in lower {
            let n = self.users.entry(m).or_insert(0);
            *n = n.checked_add_signed(delta).expect("table use counts balance");
            if *n == 0 {
                self.users.remove(&m);
            }
            self.changed.insert(m);
        }
    }

    /// Replaces a device's inactive table, keeping the use counts.
    fn set_inactive(&mut self, m: u32, table: Option<Table>) {
        if let Some(t) = &table {
            self.count_users(t, 1);
        }
        let old = std::mem::replace(&mut self.devices.get_mut(&m).expect("found").inactive, table);
        if let Some(t) = old {
            self.count_users(&t, -1);
        }
    }

    /// Gives targets built from now on the daemon's data plane for their services.
    pub fn set_data_plane(&mut self, plane: DataPlane) {
        self.plane = plane;
    }

    pub fn config(&self) -> EngineConfig {
        self.cfg
    }
    pub fn global_event(&self) -> u64 {
        self.global_event
    }
    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.values()
    }
    pub fn device(&self, minor: u32) -> Option<&Device> {
        self.devices.get(&minor)
    }
    pub fn pdevs(&self) -> &PdevRegistry {
        &self.pdevs
    }

    /// The registry, for restoring saved pseudo numbers at start-up and collecting new ones.
    pub fn pdevs_mut(&mut self) -> &mut PdevRegistry {
        &mut self.pdevs
    }

    /// A front end opened (`+1`) or closed (`-1`) a device's block device. Closing the last
    /// opener completes a deferred removal.
    pub fn adjust_opens(&mut self, minor: u32, delta: i32) {
        // Open counts show nowhere a republish would reach (sysfs, the data plane, the state
        // record), so this marks nothing changed; a removal it completes marks its own.
        if let Some(d) = self.devices.get_mut(&minor) {
            d.opens = (d.opens + delta).max(0);
        }
        self.reap_deferred();
    }

    /// Puts back what a state record kept beside a device's tables (server/restore.rs): its
    /// event counter, `BLKROSET` flag, deferred removal mark and read-ahead.
    pub fn restore_marks(
        &mut self,
        minor: u32,
        event_nr: u32,
        bdev_read_only: bool,
        deferred: bool,
        read_ahead_kb: u32,
    ) {
        let Some(d) = self.devices.get_mut(&minor) else { return };
        d.event_nr = event_nr;
        d.bdev_read_only = bdev_read_only;
        d.deferred_remove = deferred;
        d.read_ahead_kb = read_ahead_kb;
        if deferred {
            self.deferred.insert(minor);
        }
        self.changed.insert(minor);
    }

    /// `BLKROSET` on a device's block device; false if there is no such device.
    pub fn set_bdev_read_only(&mut self, minor: u32, read_only: bool) -> bool {
        self.changed.insert(minor);
        self.devices.get_mut(&minor).map(|d| d.bdev_read_only = read_only).is_some()
    }

    /// A device's status fill, by minor (DEV_WAIT keeps the device it looked up once).
    pub fn dev_info(&self, minor: u32, query_inactive: bool) -> Option<DevInfo> {
        self.devices.contains_key(&minor).then(|| self.info(minor, query_inactive))
    }

    /// Minor of a device, for callers that act before the engine does (draining IO).
    pub fn lookup(&self, key: &DevKey) -> Option<u32> {
        self.find(key).ok()
    }

    /// The current event counter of a device (for DEV_WAIT, which the server blocks on).
    pub fn event_nr(&self, key: &DevKey) -> DmResult<u32> {
        Ok(self.devices[&self.find(key)?].event_nr)
    }

    fn find(&self, key: &DevKey) -> DmResult<u32> {
        let minor = match key {
            DevKey::Name(n) => self.by_name.get(n.as_slice()).copied(),
            DevKey::Uuid(u) => self.by_uuid.get(u.as_slice()).copied(),
            DevKey::Dev(d) if d.major == self.cfg.major => Some(d.minor).filter(|m| self.devices.contains_key(m)),
            DevKey::Dev(_) => None,
        };
        minor.ok_or_else(|| no_device(key))
    }

    fn dev_num(&self, minor: u32) -> DevNum {
        DevNum::new(self.cfg.major, minor)
    }

    /// Openers of a device: block-device opens plus every table (live or inactive, of any device)
    /// that uses it, as the kernel's table loads open their devices.
    pub fn open_count(&self, minor: u32) -> i32 {
        let holders = self.users.get(&minor).copied().unwrap_or(0) as i32;
        self.devices.get(&minor).map_or(0, |d| d.opens) + holders
    }

    /// The kernel's `__dev_status` (linux-dm-abi.md §2.3).
    fn info(&self, minor: u32, query_inactive: bool) -> DevInfo {
        let d = &self.devices[&minor];
        let mut info = DevInfo {
            name: d.name.clone(),
            uuid: d.uuid.clone(),
            dev: self.dev_num(minor),
            open_count: self.open_count(minor),
            event_nr: d.event_nr,
            target_count: 0,
            suspended: d.suspended,
            read_only: false,
            active_present: d.live.is_some(),
            inactive_present: d.inactive.is_some(),
            deferred_remove: d.deferred_remove,
        };
        if let Some(live) = &d.live {
            if !query_inactive {
                info.read_only = d.disk_read_only();
                info.target_count = live.len() as u32;
            }
        }
        if query_inactive {
            if let Some(t) = &d.inactive {
                info.read_only = t.read_only();
                info.target_count = t.len() as u32;
            }
        }
        info
    }

    /// Runs one command.
    pub fn execute(&mut self, req: Request) -> DmResult<Reply> {
        let qi = req.query_inactive;
        if req.command.mutates() {
            if let Some(m) = req.command.key().and_then(|k| self.find(k).ok()) {
                self.changed.insert(m);
            }
        }
        let reply = match req.command {
            Command::Version => Ok(Reply::Version),
            Command::RemoveAll { deferred } => {
                self.remove_all(deferred);
                Ok(Reply::Nothing)
            }
            Command::ListDevices { name_prefix, uuid_prefix, with_uuid } => {
                Ok(Reply::DeviceList(self.list(&name_prefix, &uuid_prefix, with_uuid)))
            }
            Command::DevCreate { name, uuid, minor } => {
                self.create(name, uuid, minor).map(|m| Reply::Device(self.info(m, qi)))
            }
            Command::DevRemove { key, deferred } => self.remove(&key, deferred),
            Command::DevRename { name, to } => self.rename(&name, to).map(|m| Reply::Renamed(self.info(m, qi))),
            Command::DevSuspend { key, opts } => {
                let m = self.find(&key)?;
                self.suspend(m, opts);
                Ok(Reply::Device(self.info(m, qi)))
            }
            Command::DevResume { key, opts } => {
                let m = self.find(&key)?;
                self.resume(m, opts)?;
                Ok(Reply::Device(self.info(m, qi)))
            }
            Command::DevStatus { key } => self.find(&key).map(|m| Reply::Device(self.info(m, qi))),
            Command::DevWait { key, status, noflush, .. } | Command::TableStatus { key, status, noflush } => {
                let m = self.find(&key)?;
                let d = &self.devices[&m];
                let table = if qi { d.inactive.as_ref() } else { d.live.as_deref() };
                Ok(Reply::Status(self.info(m, qi), table.map(|t| t.status(status, noflush))))
            }
            Command::TableLoad { key, targets, read_only } => {
                let m = self.find(&key)?;
                self.load(m, &targets, read_only)?;
                Ok(Reply::Device(self.info(m, qi)))
            }
            Command::TableClear { key } => {
                let m = self.find(&key)?;
                self.set_inactive(m, None);
                Ok(Reply::Device(self.info(m, qi)))
            }
            Command::TableDeps { key } => {
                let m = self.find(&key)?;
                let d = &self.devices[&m];
                let table = if qi { d.inactive.as_ref() } else { d.live.as_deref() };
                Ok(Reply::Deps(self.info(m, qi), table.map(Table::deps)))
            }
            Command::ListVersions => Ok(Reply::Versions(
                self.targets.list().map(|t| TargetVersion { name: t.name.to_owned(), version: t.version }).collect(),
            )),
            Command::GetTargetVersion { name } => {
                let t = self.targets.get(&name)?;
                Ok(Reply::TargetVersion(TargetVersion { name: t.name.to_owned(), version: t.version }))
            }
            Command::TargetMsg { key, sector, message } => self.message(&key, sector, &message, qi),
            Command::SetGeometry { key, geometry } => {
                let m = self.find(&key)?;
                check_geometry(&geometry)?;
                self.devices.get_mut(&m).expect("found").geometry = Some(geometry);
                Ok(Reply::Nothing)
            }
            Command::ArmPoll => Ok(Reply::ArmPoll),
        };
        self.reap_deferred();
        reply
    }

    fn list(&self, name_prefix: &[u8], uuid_prefix: &[u8], with_uuid: bool) -> Vec<NameEntry> {
        use std::ops::Bound;
        self.by_name
            .range::<[u8], _>((Bound::Included(name_prefix), Bound::Unbounded))
            .take_while(|(n, _)| n.starts_with(name_prefix))
            .map(|(_, m)| &self.devices[m])
            .filter(|d| d.uuid.as_ref().map_or(&[][..], |u| u.as_bytes()).starts_with(uuid_prefix))
            .map(|d| NameEntry {
                dev: self.dev_num(d.minor),
                name: d.name.clone(),
                event_nr: d.event_nr,
                uuid: if with_uuid { d.uuid.clone() } else { None },
            })
            .collect()
    }

    fn create(&mut self, name: DmName, uuid: Option<DmUuid>, minor: Option<u32>) -> DmResult<u32> {
        // Minor allocation comes first and any failure is ENXIO (linux-dm-abi.md §2.4).
        let minor = match minor {
            Some(m) if m >= MINOR_LIMIT || self.devices.contains_key(&m) => {
                return Err(DmError::NoDevice(format!("minor {m} unavailable")))
            }
            Some(m) => m,
            None => (self.free_from..MINOR_LIMIT)
                .find(|m| !self.devices.contains_key(m))
                .ok_or_else(|| DmError::NoDevice("no free minor".into()))?,
        };
        if self.by_name.contains_key(name.as_bytes()) {
            return Err(DmError::Busy(format!("device name {name} already in use")));
        }
        if let Some(u) = &uuid {
            if self.by_uuid.contains_key(u.as_bytes()) {
                return Err(DmError::Busy(format!("uuid {u} already in use")));
            }
            self.by_uuid.insert(u.as_bytes().to_vec(), minor);
        }
        self.by_name.insert(name.as_bytes().to_vec(), minor);
        self.devices.insert(minor, Device::new(name, uuid, minor));
        if minor == self.free_from {
            self.free_from += 1;
        }
        self.changed.insert(minor);
        self.global_event += 1;
        Ok(minor)
    }

    /// Drops a device that nothing holds open.
    fn destroy(&mut self, minor: u32) -> Device {
        let mut d = self.devices.remove(&minor).expect("device exists");
        if d.table_event() {
            self.global_event += 1;
        }
        for t in d.live.as_deref().into_iter().chain(d.inactive.as_ref()) {
            self.count_users(t, -1);
        }
        self.deferred.remove(&minor);
        self.free_from = self.free_from.min(minor);
        self.changed.insert(minor);
        self.by_name.remove(d.name.as_bytes());
        if let Some(u) = &d.uuid {
            self.by_uuid.remove(u.as_bytes());
        }
        self.global_event += 1;
        d
    }

    fn remove(&mut self, key: &DevKey, deferred: bool) -> DmResult<Reply> {
        let m = self.find(key)?;
        if self.open_count(m) > 0 {
            if deferred {
                let d = self.devices.get_mut(&m).expect("found");
                d.deferred_remove = true;
                self.deferred.insert(m);
                return Ok(Reply::Removed { name: d.name.clone(), uuid: d.uuid.clone(), deferred: true });
            }
            return Err(DmError::Busy(format!("device {} is open", self.devices[&m].name)));
        }
        let d = self.destroy(m);
        Ok(Reply::Removed { name: d.name, uuid: d.uuid, deferred: false })
    }

    /// Removes every unopened device, repeating while progress is made so stacks come apart
    /// top-down (the kernel's `dm_hash_remove_all`).
    fn remove_all(&mut self, deferred: bool) {
        // Passes over the devices, each removing what nothing holds; a pass that removes nothing
        // ends it. Each pass is O(devices), and only stacks take more than one.
        loop {
            let victims: Vec<u32> = self.devices.keys().copied().filter(|&m| self.open_count(m) == 0).collect();
            let before = self.devices.len();
            for m in victims {
                // An earlier victim of this pass may have been the last user of a later one, or
                // a later one may still hold an earlier one: recheck.
                if self.devices.contains_key(&m) && self.open_count(m) == 0 {
                    self.destroy(m);
                }
            }
            if self.devices.len() == before {
                break;
            }
        }
        if deferred {
            for d in self.devices.values_mut() {
                d.deferred_remove = true;
                self.deferred.insert(d.minor);
            }
        }
        if !self.devices.is_empty() {
            tracing::warn!("remove_all left {} open device(s)", self.devices.len());
        }
    }

    /// Removes devices marked for deferred removal once nothing holds them.
    fn reap_deferred(&mut self) {
        // Repeat while progress is made: removing one marked device can free the next one down
        // a stack.
        while let Some(m) = self.deferred.iter().copied().find(|&m| self.open_count(m) == 0) {
            tracing::info!("deferred removal of {}", self.devices[&m].name);
            self.destroy(m);
        }
    }

    fn rename(&mut self, name: &[u8], to: RenameTo) -> DmResult<u32> {
        // Order of checks as the kernel's dm_hash_rename (linux-dm-abi.md §2.4).
        match &to {
            RenameTo::Name(n) if self.by_name.contains_key(n.as_bytes()) => {
                return Err(DmError::Busy(format!("name {n} already in use")))
            }
            RenameTo::Uuid(u) if self.by_uuid.contains_key(u.as_bytes()) => {
                return Err(DmError::Busy(format!("uuid {u} already in use")))
            }
            _ => {}
        }
        let m = *self.by_name.get(name).ok_or_else(|| DmError::NoDevice(format!("no device {}", Escaped(name))))?;
        self.changed.insert(m);
        let d = self.devices.get_mut(&m).expect("indexed");
        match to {
            RenameTo::Uuid(u) => {
                if let Some(old) = &d.uuid {
                    return Err(invalid!("device {} already has uuid {old}", d.name));
                }
                self.by_uuid.insert(u.as_bytes().to_vec(), m);
                d.uuid = Some(u);
            }
            RenameTo::Name(n) => {
                self.by_name.remove(name);
                self.by_name.insert(n.as_bytes().to_vec(), m);
                d.name = n;
            }
        }
        if d.table_event() {
            self.global_event += 1;
        }
        self.global_event += 1;
        Ok(m)
    }

    fn suspend(&mut self, m: u32, opts: SuspendOpts) {
        let d = self.devices.get_mut(&m).expect("found");
        if d.suspended {
            return;
        }
        if let Some(t) = &d.live {
            if !std::mem::take(&mut d.presuspended) {
                if opts.noflush {
                    self.plane.begin_noflush(m);
                }
                t.presuspend(opts.noflush);
            }
            t.postsuspend();
        }
        d.suspended = true;
    }

    /// The first step of a suspend, before the data plane drains the device's IO: the live
    /// table's `presuspend` (`dm_table_presuspend_targets`), for a command that will suspend a
    /// running device with a live table (DM_DEV_SUSPEND, or a resume that swaps tables). Returns
    /// the device's minor and whether the suspend is a noflush one.
    pub fn begin_suspend(&mut self, cmd: &Command) -> Option<(u32, bool)> {
        let (key, opts, swap) = match cmd {
            Command::DevSuspend { key, opts } => (key, opts, false),
            Command::DevResume { key, opts } => (key, opts, true),
            _ => return None,
        };
        let m = self.find(key).ok()?;
        let d = self.devices.get_mut(&m).expect("found");
        if d.suspended || (swap && d.inactive.is_none()) {
            return None;
        }
        if let Some(t) = &d.live {
            if !d.presuspended {
                if opts.noflush {
                    self.plane.begin_noflush(m);
                }
                t.presuspend(opts.noflush);
                d.presuspended = true;
            }
        }
        Some((m, opts.noflush))
    }

    /// A suspend begun with [`Self::begin_suspend`] was abandoned (interrupted while its IO
    /// drained): the targets' `presuspend_undo`.
    pub fn abandon_suspend(&mut self, m: u32) {
        if let Some(d) = self.devices.get_mut(&m) {
            if std::mem::take(&mut d.presuspended) {
                if let Some(t) = &d.live {
                    t.presuspend_undo();
                }
            }
        }
    }

    /// A table event raised by a target of table `table_id` of device `m` (`dm_table_event`):
    /// counted only while that table is live. Returns whether it counted.
    pub fn table_event(&mut self, m: u32, table_id: u64) -> bool {
        let Some(d) = self.devices.get_mut(&m) else { return false };
        if d.live.as_ref().is_none_or(|t| t.id() != table_id) {
            return false;
        }
        d.table_event();
        self.changed.insert(m);
        self.global_event += 1;
        true
    }

    /// A table for device `m` that reaches `m` again through the live tables of the devices it
    /// uses would send IO round in a circle: refused with EINVAL. (The kernel does not look, and
    /// such IO recurses until the stack runs out; here a device may never depend on itself.)
    fn refuse_loops(&self, table: &Table, m: u32) -> DmResult<()> {
        let mut seen = std::collections::HashSet::new();
        let mut todo: Vec<u32> = dm_minors(table.devices()).collect();
        while let Some(x) = todo.pop() {
            if x == m {
                return Err(invalid!("table would make dm-{m} use itself through the devices below it"));
            }
            if seen.insert(x) {
                if let Some(t) = self.devices.get(&x).and_then(|d| d.live.as_ref()) {
                    todo.extend(dm_minors(t.devices()));
                }
            }
        }
        Ok(())
    }

    fn size_of(&self, p: &Pdev) -> Sectors {
        match p.kind {
            PdevKind::Dm { minor } => self.devices.get(&minor).map(Device::size).unwrap_or_default(),
            // The size now, from the held fd (`bdev_nr_sectors` at check time).
            _ => self.resolver.size(p).unwrap_or_else(|| p.size()),
        }
    }

    fn resume(&mut self, m: u32, opts: SuspendOpts) -> DmResult<()> {
        if let Some(new) = self.devices.get_mut(&m).expect("found").inactive.take() {
            self.suspend(m, opts);
            // Range checks for tables after the first happen at swap (linux-dm-abi.md §2.5); on
            // failure the new table is discarded and the device stays suspended.
            let checked = new.validate_areas(&|p| self.size_of(p)).and_then(|()| self.refuse_loops(&new, m));
            if let Err(e) = checked {
                self.count_users(&new, -1);
                return Err(e);
            }
            let d = self.devices.get_mut(&m).expect("found");
            if new.size() != d.size() {
                d.geometry = None;
            }
            d.read_only = new.read_only();
            let old = d.live.replace(Arc::new(new));
            if let Some(old) = old {
                self.count_users(&old, -1);
            }
            self.global_event += 1;
        }
        let d = self.devices.get_mut(&m).expect("found");
        if d.suspended {
            match &d.live {
                // A failing preresume leaves the device suspended, with the new table live.
                Some(t) if t.size().0 > 0 => t.resume()?,
                _ => return Err(invalid!("cannot resume {}: no live table", d.name)),
            }
            d.suspended = false;
        }
        Ok(())
    }

    fn load(&mut self, m: u32, specs: &[TargetSpec], read_only: bool) -> DmResult<()> {
        let (by_name, devices) = (&self.by_name, &self.devices);
        // Table parameters are text, so only a UTF-8 name can be named in one.
        let dm_by_name = |n: &str| by_name.get(n.as_bytes()).copied();
        let dm_exists = |x: u32| devices.contains_key(&x);
        let mut env = BuildEnv {
            self_minor: m,
            pdevs: &mut self.pdevs,
            resolver: &*self.resolver,
            dm_by_name: &dm_by_name,
            dm_exists: &dm_exists,
            cache: HashMap::new(),
            plane: self.plane.clone(),
            table_id: 0,
        };
        let table = Table::build(specs, read_only, &self.targets, &mut env)?;
        self.refuse_loops(&table, m)?;
        // table_load's type checks (linux-dm-abi.md §2.5): an immutable live target type is
        // replaced only by itself (or by error targets), and a device keeps its first type.
        let d = &self.devices[&m];
        if let Some(im) = d.live.as_ref().and_then(|t| t.immutable_type()) {
            if table.immutable_type() != Some(im) && !table.all_hybrid() {
                return Err(invalid!("can't replace immutable target type {im}"));
            }
        }
        let rq = table.request_based().or(d.request_based).unwrap_or(false);
        if d.request_based.is_some_and(|cur| cur != rq) {
            return Err(invalid!("can't change device type after initial table load"));
        }
        let first = !self.devices[&m].queue_initialized;
        if first {
            table.validate_areas(&|p| self.size_of(p))?;
        }
        let d = self.devices.get_mut(&m).expect("found");
        d.queue_initialized = true;
        d.request_based = Some(rq);
        self.set_inactive(m, Some(table));
        Ok(())
    }

    fn message(&mut self, key: &DevKey, sector: Sectors, message: &str, qi: bool) -> DmResult<Reply> {
        let m = self.find(key)?;
        let argv = split_args(message);
        let Some(first) = argv.first() else {
            return Err(invalid!("empty message"));
        };
        if first.starts_with('@') {
            return self.core_message(m, &argv, qi);
        }
        let d = &self.devices[&m];
        let Some(live) = d.live.clone() else {
            return Ok(Reply::MessageNoTable);
        };
        let t = live.find(sector).ok_or_else(|| invalid!("message sector {sector} beyond device"))?;
        let lookup = |name: &str| self.device_number_of(name);
        let out = t.target.message_with_devices(&argv, &lookup)?;
        // A message that changes a target's state (a multipath path failing) raises its table
        // event itself, asynchronously, as the kernel's targets do.
        Ok(Reply::Message(self.info(m, qi), out))
    }

    /// The number of the device `name` names, as `dm_get_device` finds it for a target message:
    /// `major:minor`, dmemu's own nodes and names, or a path (a file by the number its table
    /// uses). ENODEV when it names nothing.
    fn device_number_of(&self, name: &str) -> DmResult<DevNum> {
        let nothing = || DmError::NoSuchBlockDevice(format!("{name:?}"));
        if let Some(dev) = DevNum::parse(name) {
            return Ok(dev);
        }
        let dm = |minor: u32| DevNum::new(self.pdevs.dm_major(), minor);
        if let Some(minor) = name.rsplit_once("/mapper/").and_then(|(_, n)| self.by_name.get(n.as_bytes())) {
            return Ok(dm(*minor));
        }
        if let Some(n) = name.strip_prefix("/dev/dm-").and_then(|n| n.parse::<u32>().ok()) {
            if self.devices.contains_key(&n) {
                return Ok(dm(n));
            }
        }
        let r = self.resolver.resolve_path(name, false).map_err(|_| nothing())?;
        match r.identity {
            Identity::Block(dev) => Ok(dev),
            Identity::File { dev, ino } => self
                .pdevs
                .file_number(dev, ino)
                .map(|minor| DevNum::new(self.pdevs.file_major(), minor))
                .ok_or_else(nothing),
        }
    }

    /// The extension point for targets with a control path of their own (the dm-switch
    /// page-table upload): the targets of concrete type `T` of device `dev`, in the live table,
    /// then in the inactive one. `NoDevice` when no such device exists.
    pub fn targets_of<T: Target>(&self, dev: DevNum) -> DmResult<impl Iterator<Item = &T>> {
        let d = self
            .devices
            .get(&dev.minor)
            .filter(|_| dev.major == self.cfg.major)
            .ok_or_else(|| DmError::NoDevice(dev.to_string()))?;
        Ok(d.live
            .as_deref()
            .into_iter()
            .chain(d.inactive.as_ref())
            .flat_map(|t| t.targets())
            .filter_map(|t| (t.target.as_ref() as &dyn std::any::Any).downcast_ref::<T>()))
    }

    /// Messages to the device core rather than a target (linux-dm-abi.md §2.7).
    fn core_message(&mut self, m: u32, argv: &[String], qi: bool) -> DmResult<Reply> {
        let d = self.devices.get_mut(&m).expect("found");
        match argv[0].to_ascii_lowercase().as_str() {
            "@cancel_deferred_remove" => {
                if argv.len() != 1 {
                    return Err(invalid!("invalid arguments for @cancel_deferred_remove"));
                }
                d.deferred_remove = false;
                self.deferred.remove(&m);
                Ok(Reply::Message(self.info(m, qi), None))
            }
            w if w.starts_with("@stats_") => {
                let size = d.size();
                let out = d.stats.message(argv, size)?;
                Ok(Reply::Message(self.info(m, qi), out))
            }
            w => Err(invalid!("unsupported message {w}")),
        }
    }
}

/// DM_DEV_SET_GEOMETRY limits (linux-dm-abi.md §2.4).
pub fn check_geometry(g: &Geometry) -> DmResult<()> {
    if g.cylinders > 65535 || g.heads > 255 || g.sectors > 255 {
        return Err(invalid!("geometry out of range"));
    }
    if g.start > g.cylinders * g.heads * g.sectors {
        return Err(invalid!("start sector is beyond the geometry limits"));
    }
    Ok(())
}
