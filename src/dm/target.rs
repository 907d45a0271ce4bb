//! The target interface (Linux's `struct target_type`, NetBSD's dm_target.c) and the registry of
//! target types with their versions.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use super::error::{DmError, DmResult};
use super::pdev::{DeviceResolver, Identity, Pdev, PdevRegistry};
use super::types::{DevNum, Sectors, StatusType};
use crate::invalid;
use crate::io::{Bio, DataPlane, IoResult, Services};

/// Where a stretch of a device lives, as far as one target maps it contiguously: the answer to a
/// query ([`Target::query`], block status), which is not IO and moves no counter. Targets answer
/// in sectors (`U` = [`Sectors`]); the data plane carries the answer in bytes (`U` = `u64`).
#[derive(Debug)]
pub enum Mapping<'a, U = Sectors> {
    /// `len` units at `at` of `dev`.
    Remap { dev: &'a Arc<Pdev>, at: U, len: U },
    /// `len` units that read as zeroes and hold no data (`zero`).
    Zero(U),
    /// `len` units whose allocation the target cannot tell (reported as data).
    Opaque(U),
}

/// What a target's `map` did with a bio (the kernel's `DM_MAPIO_*`).
#[derive(Debug)]
pub enum Map {
    /// `DM_MAPIO_REMAPPED`: the bio, pointed at a device with [`Bio::remap`]; the core submits it.
    Remapped(Bio),
    /// `DM_MAPIO_SUBMITTED`: the target took the bio and will end it ([`Bio::end`]) or submit it
    /// ([`Services::submit`]) later, from any thread. A bio completed on the spot (the zero
    /// target's reads) is ended before returning this.
    Submitted,
    /// `DM_MAPIO_REQUEUE`: the core holds the whole original IO until the device resumes, if a
    /// noflush suspend is under way; otherwise it fails (the kernel's rule).
    Requeue(Bio),
    /// `DM_MAPIO_KILL`: the bio fails with EIO.
    Kill(Bio),
}

/// What a target's `end_io` decided (the kernel's `DM_ENDIO_*`).
#[derive(Debug)]
pub enum EndIo {
    /// `DM_ENDIO_DONE`: completion goes on with this result.
    Done(Bio, IoResult),
    /// `DM_ENDIO_INCOMPLETE`: the target keeps the bio and ends or resubmits it later.
    Incomplete,
    /// `DM_ENDIO_REQUEUE`: as [`Map::Requeue`].
    Requeue(Bio),
}

/// What the core needs to know about a target to route IO to it, asked once per table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// Empty flushes sent to the target per flush (`num_flush_bios`); 0: flushes skip it.
    pub flush_bios: u32,
    /// Discards per discarded range (`num_discard_bios`); 0: discards fail with EOPNOTSUPP.
    pub discard_bios: u32,
    /// Write-zeroes per range (`num_write_zeroes_bios`); 0: EOPNOTSUPP (front ends then write
    /// zeroes, as `blkdev_issue_zeroout` falls back).
    pub write_zeroes_bios: u32,
    /// IO is split at multiples of this many sectors from the target's start (`max_io_len`).
    pub max_io_len: Option<u64>,
    /// `end_io` wants every bio this target remapped.
    pub end_io: bool,
    /// `map` never waits and never keeps a bio (`DM_TARGET_NOWAIT`): a table of such targets takes
    /// `REQ_NOWAIT` IO; any other target makes the device answer it with EAGAIN.
    pub nowait: bool,
    /// `map` copes with a write payload still in a pipe (remaps it, or zero-fills it); other
    /// targets get the payload in memory.
    pub pipes: bool,
}

impl Default for Features {
    /// A target that remaps one device: flushes, discards and write-zeroes pass through it.
    fn default() -> Self {
        Self {
            flush_bios: 1,
            discard_bios: 1,
            write_zeroes_bios: 1,
            max_io_len: None,
            end_io: false,
            nowait: false,
            pipes: false,
        }
    }
}

/// A device's queue limits as far as one target sets them (`io_hints`), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub io_min: u32,
    pub io_opt: u32,
    /// Discards are supported (every target takes them).
    pub discard: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self { logical_block_size: 512, physical_block_size: 512, io_min: 512, io_opt: 0, discard: true }
    }
}

impl Limits {
    /// `blk_stack_limits`: a device over `lower` must honour its blocks.
    pub fn stack(&mut self, lower: &Limits) {
        self.logical_block_size = self.logical_block_size.max(lower.logical_block_size);
        self.physical_block_size = self.physical_block_size.max(lower.physical_block_size);
        self.io_min = self.io_min.max(lower.io_min);
        self.io_opt = self.io_opt.max(lower.io_opt);
        self.discard &= lower.discard;
    }
}

/// One constructed target instance in a table (the kernel's `struct target_type` methods).
///
/// A target with a control path of its own beside table, status and messages (the dm-switch
/// page-table upload) is reached through [`Engine::targets_of`](super::Engine::targets_of), which
/// finds a device's targets of one concrete type: `Any` is the whole extension point, so no such
/// path adds a method here.
pub trait Target: Any + Send + Sync {
    /// Status text (INFO = `dmsetup status`, TABLE = `dmsetup table`, IMA).
    fn status(&self, kind: StatusType, noflush: bool) -> String;

    /// Handles DM_TARGET_MSG. `Ok(Some(text))` reports output (DM_DATA_OUT_FLAG).
    fn message(&self, _argv: &[String]) -> DmResult<Option<String>> {
        Err(invalid!("target does not accept messages"))
    }

    /// [`Target::message`] for targets whose messages name devices (multipath's `fail_path
    /// <dev>`): `lookup` resolves a name as `dm_get_device` would, to its number (ENODEV when
    /// it names nothing). The default ignores it.
    fn message_with_devices(
        &self,
        argv: &[String],
        _lookup: &dyn Fn(&str) -> DmResult<DevNum>,
    ) -> DmResult<Option<String>> {
        self.message(argv)
    }

    /// Every underlying device area the target uses: (device, start, length). The kernel's
    /// `iterate_devices`; used for range validation.
    fn iterate_devices(&self, len: Sectors, f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors));

    /// How IO reaches this target; see [`Features`].
    fn features(&self) -> Features {
        Features::default()
    }

    /// Adjusts the device's limits (`io_hints`).
    fn io_hints(&self, _limits: &mut Limits) {}

    /// The kernel's `map`: the bio's sector is relative to the target's start, and the bio lies
    /// within the target and within one `max_io_len` unit.
    fn map(&self, bio: Bio) -> Map;

    /// The kernel's `end_io`, for targets whose [`Features::end_io`] is set: sees each bio this
    /// target remapped, with its result, after the device below completed it. The bio's sector is
    /// back where `map` saw it; [`Bio::take_private`] returns what `map` set.
    fn end_io(&self, bio: Bio, result: IoResult) -> EndIo {
        EndIo::Done(bio, result)
    }

    /// Where `len` sectors at `offset` (from the target's start) live, for block status: no IO,
    /// no counters. `len` is at most what is left of the target.
    fn query(&self, _offset: Sectors, len: Sectors) -> Mapping<'_> {
        Mapping::Opaque(len)
    }

    /// Before the device stops taking IO (held IO should be released now).
    fn presuspend(&self, _noflush: bool) {}
    /// A suspend that called `presuspend` was abandoned (interrupted while waiting for IO).
    fn presuspend_undo(&self) {}
    /// After the device's in-flight IO has drained.
    fn postsuspend(&self) {}
    /// Before the table goes live on resume; an error fails the resume (the device stays
    /// suspended).
    fn preresume(&self) -> DmResult<()> {
        Ok(())
    }
    fn resume(&self) {}

    /// Whether this instance is request-based (the kernel's `clone_and_map_rq` targets:
    /// multipath unless `queue_mode bio`). A device keeps the type of its first table
    /// (linux-dm-abi.md §2.5); dmemu's IO path itself is the same for both.
    fn request_based(&self) -> bool {
        false
    }
}

/// What building one table needs from the engine: the pdev registry, the outside world, and
/// which dmemu devices exist.
pub struct BuildEnv<'a> {
    /// Minor of the device the table is loaded into (a target may not use it).
    pub self_minor: u32,
    pub pdevs: &'a mut PdevRegistry,
    pub resolver: &'a dyn DeviceResolver,
    /// Resolves a dmemu device name (from `/dev/mapper/<name>`) to its minor.
    pub dm_by_name: &'a dyn Fn(&str) -> Option<u32>,
    /// Whether a dmemu device with this minor exists.
    pub dm_exists: &'a dyn Fn(u32) -> bool,
    /// Resolution cache for one table build, so a million lines naming one file stat it once.
    pub cache: HashMap<String, Arc<Pdev>>,
    /// The data plane, whose services targets get.
    pub plane: DataPlane,
    /// The number of the table being built (set by the table).
    pub table_id: u64,
}

/// Facts a constructor is given, its way to name underlying devices, and the core services for
/// targets that own their IO (dm-io, kcopyd, work queue, timers, table events).
pub struct CtorCtx<'a, 'b> {
    pub len: Sectors,
    pub read_only: bool,
    pub env: &'a mut BuildEnv<'b>,
}

impl CtorCtx<'_, '_> {
    /// The core services, bound to the table being built (its events go to its device while it
    /// is live).
    pub fn services(&self) -> Services {
        self.env.plane.services(self.env.self_minor, self.env.table_id)
    }
}

impl CtorCtx<'_, '_> {
    /// The kernel's `dm_get_device`: `major:minor` or a path; dmemu devices by number, by
    /// `/dev/mapper/<name>` or `/dev/dm-<minor>`.
    pub fn get_device(&mut self, name: &str) -> DmResult<Arc<Pdev>> {
        if let Some(p) = self.env.cache.get(name) {
            return Ok(p.clone());
        }
        let p = self.lookup(name)?;
        if p.dev == DevNum::new(self.env.pdevs.dm_major(), self.env.self_minor) {
            return Err(invalid!("device {name} is the device being loaded"));
        }
        self.env.cache.insert(name.to_owned(), p.clone());
        Ok(p)
    }

    /// Resolves `name` and opens what it names, in this table's mode, once; a device some table
    /// already holds in a mode that will do is shared (the kernel's `find_table_device`).
    fn lookup(&mut self, name: &str) -> DmResult<Arc<Pdev>> {
        let writable = !self.read_only;
        let env = &mut *self.env;
        let lookup_failed = || invalid!("device lookup failed for {name:?}");
        if let Some(dev) = DevNum::parse(name) {
            if dev.major == env.pdevs.dm_major() {
                return if (env.dm_exists)(dev.minor) { Ok(env.pdevs.get_dm(dev.minor)) } else { Err(lookup_failed()) };
            }
            // A number names a device, not a path: a held one is that device.
            if let Some(p) = env.pdevs.held(dev, writable) {
                if let Some(s) = env.resolver.size(&p) {
                    p.set_size(s);
                }
                return Ok(p);
            }
            if let Some(p) = env.pdevs.held(dev, false) {
                let r = env.resolver.reopen(&p, writable).map_err(|e| {
                    tracing::debug!("reopening {name:?}: {e}");
                    lookup_failed()
                })?;
                return env.pdevs.get_resolved(r);
            }
            if dev.major == env.pdevs.file_major() {
                // Held by no table: the path last seen for it, if that still names the same file.
                let path = env.pdevs.file_path(dev.minor).ok_or_else(lookup_failed)?.to_owned();
                let r = env.resolver.resolve_path(&path, writable).map_err(|_| lookup_failed())?;
                if !env.pdevs.is_file_numbered(dev.minor, r.identity) {
                    tracing::debug!("{path:?}, last seen as {dev}, now names another file");
                    return Err(lookup_failed());
                }
                return env.pdevs.get_resolved(r);
            }
            let r = env.resolver.resolve_block(dev, writable).map_err(|_| lookup_failed())?;
            return env.pdevs.get_resolved(r);
        }
        if let Some(rest) = name.rsplit_once("/mapper/").map(|(_, n)| n) {
            if let Some(minor) = (env.dm_by_name)(rest) {
                return Ok(env.pdevs.get_dm(minor));
            }
        }
        if let Some(n) = name.strip_prefix("/dev/dm-").and_then(|n| n.parse::<u32>().ok()) {
            if (env.dm_exists)(n) {
                return Ok(env.pdevs.get_dm(n));
            }
        }
        let r = env.resolver.resolve_path(name, writable).map_err(|e| {
            tracing::debug!("resolving {name:?}: {e}");
            lookup_failed()
        })?;
        // A block node of dmemu's own major (e.g. one libdm made with mknod) is one of ours.
        if let Identity::Block(dev) = r.identity {
            if dev.major == env.pdevs.dm_major() {
                return if (env.dm_exists)(dev.minor) { Ok(env.pdevs.get_dm(dev.minor)) } else { Err(lookup_failed()) };
            }
        }
        env.pdevs.get_resolved(r).map_err(|e| {
            tracing::debug!("opening {name:?}: {e}");
            lookup_failed()
        })
    }
}

pub type Constructor = fn(&mut CtorCtx<'_, '_>, &[String]) -> DmResult<Box<dyn Target>>;

bitflags::bitflags! {
    /// What a target type demands of the table it is in (the kernel's `DM_TARGET_*` features).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct TypeFlags: u8 {
        /// Must be the only target of its table (`DM_TARGET_SINGLETON`).
        const SINGLETON = 1;
        /// A device whose live table has it takes only tables of the same type
        /// (`DM_TARGET_IMMUTABLE`).
        const IMMUTABLE = 2;
        /// Works bio- or request-based, whichever the device is (`error`, a "hybrid" target:
        /// it has both `map` and `clone_and_map_rq`); a table of only such targets never changes
        /// a device's type.
        const HYBRID = 4;
    }
}

/// A registered target type.
pub struct TargetType {
    pub name: &'static str,
    pub version: [u32; 3],
    pub ctor: Constructor,
    pub flags: TypeFlags,
}

/// Target types in registration order. LIST_VERSIONS reports newest first, as the kernel's
/// registry list does (linux-dm-abi.md §2.4).
#[derive(Default)]
pub struct TargetRegistry {
    types: Vec<&'static TargetType>,
}

impl TargetRegistry {
    pub fn register(&mut self, t: &'static TargetType) {
        self.types.push(t);
    }
    pub fn get(&self, name: &str) -> DmResult<&'static TargetType> {
        self.types
            .iter()
            .copied()
            .find(|t| t.name == name)
            .ok_or_else(|| DmError::Invalid(format!("unknown target type {name:?}")))
    }
    /// Newest registration first.
    pub fn list(&self) -> impl Iterator<Item = &'static TargetType> + '_ {
        self.types.iter().rev().copied()
    }
}

/// Splits a parameter string into words as the kernel's `dm_split_args` does
/// (linux-dm-abi.md §2.8): whitespace separates, a backslash makes the next character literal.
/// The kernel's `isspace` in the ASCII range (includes vertical tab, unlike Rust's
/// `is_ascii_whitespace`).
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

pub fn split_args(s: &str) -> Vec<String> {
    // Fast path: without backslashes this is plain whitespace splitting (table loads of a
    // million lines spend real time here).
    if !s.contains('\\') {
        return s.split(is_space).filter(|w| !w.is_empty()).map(str::to_owned).collect();
    }
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                cur.push(n);
            }
            in_word = true;
        } else if is_space(c) {
            if in_word {
                words.push(std::mem::take(&mut cur));
                in_word = false;
            }
        } else {
            cur.push(c);
            in_word = true;
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// Parses a sector count as the kernel's `sscanf("%llu%c")` does: a decimal number and nothing else.
pub fn parse_sectors(s: &str) -> Option<Sectors> {
    parse_u64(s).map(Sectors)
}

/// Decimal unsigned integer, optional leading `+`, nothing after (kstrtoull base 10).
pub fn parse_u64(s: &str) -> Option<u64> {
    let d = s.strip_prefix('+').unwrap_or(s);
    if d.is_empty() || !d.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    d.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_args_handles_escapes() {
        assert_eq!(split_args("  a b\\ c  d\\\\e "), vec!["a", "b c", "d\\e"]);
        assert!(split_args("   ").is_empty());
        assert_eq!(split_args("a\x0bb"), vec!["a", "b"]);
    }
}
