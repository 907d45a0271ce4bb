//! Bringing devices back from the state record at start-up (docs/reliability.md): each device is
//! recreated with its minor, name and uuid, its live table loaded and resumed (devices below
//! first, so tables stack as they did), its inactive table loaded, then suspended again if it
//! was, with its event counter and flags as recorded. Everything goes through the engine's own
//! commands, so a restored table passes the same checks as a new one; what fails is logged and
//! that device comes back without the table (never a half-built one).

use std::collections::HashSet;

use super::record::{DeviceRecord, TableRecord};
use crate::dm::{Command, DevKey, DmName, DmUuid, Engine, Request, Sectors, SuspendOpts, TargetSpec};

fn run(engine: &mut Engine, command: Command) -> Result<(), String> {
    engine.execute(Request::new(command)).map(|_| ()).map_err(|e| e.to_string())
}

fn specs(t: &TableRecord) -> Vec<TargetSpec> {
    t.lines
        .iter()
        .map(|(start, len, ty, text)| TargetSpec {
            start: Sectors(*start),
            length: Sectors(*len),
            target_type: ty.clone(),
            params: text.clone(),
        })
        .collect()
}

/// The dmemu devices a recorded table names (`major:minor` words with dmemu's major).
fn dm_deps(t: &TableRecord, major: u32) -> Vec<u32> {
    t.lines
        .iter()
        .flat_map(|(_, _, _, text)| text.split(' '))
        .filter_map(|w| w.split_once(':'))
        .filter_map(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .filter(|&(a, _)| a == major)
        .map(|(_, b)| b)
        .collect()
}

/// Restores the recorded devices; `after_each` runs after each device's live table is in place
/// (the daemon publishes it, so devices above see its limits). Returns how many came back.
pub fn restore(engine: &mut Engine, records: Vec<DeviceRecord>, after_each: &mut dyn FnMut(&mut Engine)) -> usize {
    let major = engine.config().major;
    let mut created = Vec::new();
    for r in records {
        let name = match DmName::new(&r.name) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("state record of dm-{}: bad name: {e}", r.minor);
                continue;
            }
        };
        let uuid = match r.uuid.as_deref().map(DmUuid::new).transpose() {
            Ok(u) => u,
            Err(e) => {
                tracing::error!("state record of dm-{}: bad uuid: {e}", r.minor);
                continue;
            }
        };
        match run(engine, Command::DevCreate { name, uuid, minor: Some(r.minor) }) {
            Ok(()) => created.push(r),
            Err(e) => tracing::error!("restoring dm-{}: create failed: {e}", r.minor),
        }
    }
    let key = |r: &DeviceRecord| DevKey::Dev(crate::dm::DevNum::new(major, r.minor));
    // Live tables, devices below before devices above; a table naming a device that never gets
    // one goes last and passes or fails the checks as it would.
    let mut live: HashSet<u32> = HashSet::new();
    let mut pending: Vec<&DeviceRecord> = created.iter().filter(|r| r.live.is_some()).collect();
    let wanted: HashSet<u32> = pending.iter().map(|r| r.minor).collect();
    while !pending.is_empty() {
        let ready = |r: &DeviceRecord| {
            dm_deps(r.live.as_ref().expect("pending have live tables"), major)
                .iter()
                .all(|m| live.contains(m) || !wanted.contains(m))
        };
        let (mut now, later): (Vec<&DeviceRecord>, Vec<&DeviceRecord>) = pending.iter().partition(|r| ready(r));
        pending = later;
        if now.is_empty() {
            // A cycle or a device that failed below: the rest in minor order.
            now = std::mem::take(&mut pending);
        }
        for r in now {
            let t = r.live.as_ref().expect("pending have live tables");
            let res = run(engine, Command::TableLoad { key: key(r), targets: specs(t), read_only: t.read_only })
                .and_then(|()| run(engine, Command::DevResume { key: key(r), opts: SuspendOpts::default() }));
            match res {
                Ok(()) => {
                    live.insert(r.minor);
                }
                Err(e) => tracing::error!("restoring dm-{}: live table not restored: {e}", r.minor),
            }
            after_each(engine);
        }
    }
    for r in &created {
        if let Some(t) = &r.inactive {
            if let Err(e) = run(engine, Command::TableLoad { key: key(r), targets: specs(t), read_only: t.read_only }) {
                tracing::error!("restoring dm-{}: inactive table not restored: {e}", r.minor);
            }
        }
        if r.suspended {
            if let Err(e) = run(engine, Command::DevSuspend { key: key(r), opts: SuspendOpts::default() }) {
                tracing::error!("restoring dm-{}: suspend failed: {e}", r.minor);
            }
        }
        if let Some(geometry) = r.geometry {
            if let Err(e) = run(engine, Command::SetGeometry { key: key(r), geometry }) {
                tracing::error!("restoring dm-{}: geometry not restored: {e}", r.minor);
            }
        }
        engine.restore_marks(r.minor, r.event_nr, r.bdev_read_only, r.deferred_remove, r.read_ahead_kb);
    }
    after_each(engine);
    created.len()
}
