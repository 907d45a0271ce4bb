//! A table: ordered targets covering sectors 0..size without gaps (NetBSD's dm_table.c,
//! Linux's dm-table.c).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::command::{TargetSpec, TargetStatus};
use super::error::{DmError, DmResult};
use super::pdev::Pdev;
use super::target::{split_args, BuildEnv, CtorCtx, Features, Target, TargetRegistry, TargetType, TypeFlags};
use super::types::{DevNum, Sectors, StatusType, MAX_TARGETS};
use crate::invalid;

/// One target instance and where it sits in the device.
pub struct TableTarget {
    pub start: Sectors,
    pub len: Sectors,
    pub ty: &'static TargetType,
    pub target: Box<dyn Target>,
    /// What the IO path needs to know of it, asked once at construction.
    pub features: Features,
}

/// Tables are numbered as they are built, so an event a target raises can tell whether its table
/// is still the live one.
static NEXT_TABLE_ID: AtomicU64 = AtomicU64::new(1);

pub struct Table {
    id: u64,
    targets: Vec<TableTarget>,
    read_only: bool,
    /// Request-based (`Some(true)`), bio-based, or either (`None`: only hybrid targets).
    request_based: Option<bool>,
    /// The immutable target type in the table, if any.
    immutable: Option<&'static str>,
    /// Distinct underlying devices, newest first (the kernel pushes at the head of its list, which
    /// is the order TABLE_DEPS reports: linux-dm-abi.md §2.4).
    devices: Vec<Arc<Pdev>>,
}

/// Largest sector count a table may reach (`LLONG_MAX >> 9`, linux-dm-abi.md §2.5).
const MAX_SECTORS: u64 = (i64::MAX as u64) >> 9;

impl Table {
    /// Builds a table from its lines with the kernel's checks (linux-dm-abi.md §2.5), running each
    /// target's constructor.
    pub fn build(
        specs: &[TargetSpec],
        read_only: bool,
        registry: &TargetRegistry,
        env: &mut BuildEnv<'_>,
    ) -> DmResult<Table> {
        if specs.is_empty() {
            return Err(invalid!("table has no targets"));
        }
        if specs.len() > MAX_TARGETS {
            return Err(DmError::Overflow(format!("{} targets", specs.len())));
        }
        let id = NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed);
        env.table_id = id;
        let mut targets: Vec<TableTarget> = Vec::with_capacity(specs.len());
        let mut next_start = 0u64;
        let mut immutable: Option<&'static TargetType> = None;
        for (i, spec) in specs.iter().enumerate() {
            if let Some(first) = targets.first().filter(|t| t.ty.flags.contains(TypeFlags::SINGLETON)) {
                return Err(invalid!("target type {} must appear alone in table", first.ty.name));
            }
            if spec.length.0 == 0 {
                return Err(invalid!("zero-length target {i}"));
            }
            let end = spec
                .start
                .0
                .checked_add(spec.length.0)
                .filter(|&e| e <= MAX_SECTORS)
                .ok_or_else(|| invalid!("target {i} too large"))?;
            let ty = registry.get(&spec.target_type)?;
            // dm_table_add_target's checks, in its order.
            if ty.flags.contains(TypeFlags::SINGLETON) && !targets.is_empty() {
                return Err(invalid!("singleton target type must appear alone in table"));
            }
            match immutable {
                Some(im) if !std::ptr::eq(im, ty) => {
                    return Err(invalid!("immutable target type cannot be mixed with other target types"))
                }
                None if ty.flags.contains(TypeFlags::IMMUTABLE) => {
                    if !targets.is_empty() {
                        return Err(invalid!("immutable target type cannot be mixed with other target types"));
                    }
                    immutable = Some(ty);
                }
                _ => {}
            }
            if spec.start.0 != next_start {
                return Err(invalid!("gap in table at target {i}: starts at {} not {next_start}", spec.start));
            }
            next_start = end;
            let argv = split_args(&spec.params);
            let mut ctx = CtorCtx { len: spec.length, read_only, env: &mut *env };
            let target = (ty.ctor)(&mut ctx, &argv).map_err(|e| {
                tracing::info!("{}: constructor failed: {e}", ty.name);
                e
            })?;
            let features = target.features();
            targets.push(TableTarget { start: spec.start, len: spec.length, ty, target, features });
        }
        // dm_table_determine_type: bio- and request-based targets do not mix; request-based
        // tables have one target.
        let mut request_based = None;
        for t in targets.iter().filter(|t| !t.ty.flags.contains(TypeFlags::HYBRID)) {
            let rq = t.target.request_based();
            if request_based.is_some_and(|r| r != rq) {
                return Err(invalid!("Inconsistent table: different target types can't be mixed up"));
            }
            request_based = Some(rq);
        }
        if request_based == Some(true) && targets.len() > 1 {
            return Err(invalid!("request-based DM doesn't support multiple targets"));
        }
        // Distinct devices, first use last (head insertion order).
        let mut devices: Vec<Arc<Pdev>> = Vec::new();
        let mut seen: HashSet<DevNum> = HashSet::new();
        for t in &targets {
            t.target.iterate_devices(t.len, &mut |p, _, _| {
                if seen.insert(p.dev) {
                    devices.push(p.clone());
                }
            });
        }
        devices.reverse();
        let immutable = immutable.map(|t| t.name);
        Ok(Table { id, targets, read_only, request_based, immutable, devices })
    }

    /// Request-based, bio-based, or either (a table of hybrid targets only).
    pub fn request_based(&self) -> Option<bool> {
        self.request_based
    }
    /// The immutable target type the table holds (`dm_table_get_immutable_target_type`).
    pub fn immutable_type(&self) -> Option<&'static str> {
        self.immutable
    }
    /// Whether every target is hybrid (`dm_table_get_wildcard_target`: the error target).
    pub fn all_hybrid(&self) -> bool {
        self.targets.iter().all(|t| t.ty.flags.contains(TypeFlags::HYBRID))
    }

    pub fn size(&self) -> Sectors {
        self.targets.last().map(|t| Sectors(t.start.0 + t.len.0)).unwrap_or_default()
    }
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    pub fn len(&self) -> usize {
        self.targets.len()
    }
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
    pub fn targets(&self) -> &[TableTarget] {
        &self.targets
    }
    pub fn devices(&self) -> &[Arc<Pdev>] {
        &self.devices
    }
    pub fn deps(&self) -> Vec<DevNum> {
        self.devices.iter().map(|p| p.dev).collect()
    }
    pub fn uses(&self, dev: DevNum) -> bool {
        self.devices.iter().any(|p| p.dev == dev)
    }

    /// The target holding `sector` (binary search over starts).
    pub fn find(&self, sector: Sectors) -> Option<&TableTarget> {
        self.targets.get(self.find_index(sector)?)
    }

    /// The index of the target holding `sector`.
    pub fn find_index(&self, sector: Sectors) -> Option<usize> {
        if sector >= self.size() {
            return None;
        }
        self.targets.partition_point(|t| t.start <= sector).checked_sub(1)
    }

    /// This table's number (unique for the daemon's life).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn status(&self, kind: StatusType, noflush: bool) -> Vec<TargetStatus> {
        self.targets
            .iter()
            .map(|t| TargetStatus {
                start: t.start,
                length: t.len,
                target_type: t.ty.name.to_owned(),
                text: t.target.status(kind, noflush),
            })
            .collect()
    }

    /// Every device area must fit inside its device (`device_area_is_invalid`, linux-dm-abi.md
    /// §2.5). `size_of` gives a device's current size (asked once per device: a million targets
    /// over one file read its size once); zero-sized devices are not checked, as in the kernel.
    pub fn validate_areas(&self, size_of: &dyn Fn(&Pdev) -> Sectors) -> DmResult<()> {
        let mut err = None;
        let mut sizes: HashMap<DevNum, u64> = HashMap::new();
        for t in &self.targets {
            t.target.iterate_devices(t.len, &mut |p, start, len| {
                if err.is_some() {
                    return;
                }
                let size = *sizes.entry(p.dev).or_insert_with(|| size_of(p).0);
                if size == 0 {
                    return;
                }
                if start.0 >= size || start.0.saturating_add(len.0) > size {
                    err = Some(invalid!(
                        "{} too small for target: start={}, len={}, dev_size={}",
                        p.dev,
                        start,
                        len,
                        size
                    ));
                }
            });
        }
        err.map_or(Ok(()), Err)
    }

    pub fn presuspend(&self, noflush: bool) {
        self.targets.iter().for_each(|t| t.target.presuspend(noflush));
    }
    pub fn presuspend_undo(&self) {
        self.targets.iter().for_each(|t| t.target.presuspend_undo());
    }
    pub fn postsuspend(&self) {
        self.targets.iter().for_each(|t| t.target.postsuspend());
    }
    /// Every target's `preresume`, then (all of them having agreed) every target's `resume`
    /// (`dm_table_resume_targets`).
    pub fn resume(&self) -> DmResult<()> {
        for t in &self.targets {
            t.target.preresume().map_err(|e| {
                tracing::info!("{}: preresume failed: {e}", t.ty.name);
                e
            })?;
        }
        self.targets.iter().for_each(|t| t.target.resume());
        Ok(())
    }
}
