//! The target interface (Linux's `struct target_type`, NetBSD's dm_target.c) and the registry of
//! target types with their versions.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use super::error::{DmError, DmResult};
use super::pdev::{DeviceResolver, Identity, Pdev, PdevRegistry};
use super::types::{DevNum, Sectors, StatusType};
use crate::invalid;

/// Where a stretch of a device goes, as far as one target maps it contiguously. Targets answer
/// [`Target::map`] in sectors (`U` = [`Sectors`]); the data plane carries the same answer in bytes
/// (`U` = `u64`) once a request that need not start on a sector boundary is mapped.
#[derive(Debug)]
pub enum Mapping<'a, U = Sectors> {
    /// `len` units at `at` of `dev`.
    Remap { dev: &'a Arc<Pdev>, at: U, len: U },
    /// `len` units that read as zeroes and swallow writes (`zero`).
    Zero(U),
    /// `len` units where IO fails (`error`).
    Fail(U),
}

/// One constructed target instance in a table.
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

    /// Every underlying device area the target uses: (device, start, length). The kernel's
    /// `iterate_devices`; used for range validation.
    fn iterate_devices(&self, len: Sectors, f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors));

    /// Maps `len` sectors at `offset` (from the target's start) for IO: where they go, for at
    /// most `len` sectors (less where the target's mapping stops being contiguous).
    fn map(&self, offset: Sectors, len: Sectors) -> Mapping<'_>;

    fn presuspend(&self, _noflush: bool) {}
    fn postsuspend(&self) {}
    fn resume(&self) {}
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
}

/// Facts a constructor is given, and its way to name underlying devices.
pub struct CtorCtx<'a, 'b> {
    pub len: Sectors,
    pub read_only: bool,
    pub env: &'a mut BuildEnv<'b>,
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

    fn lookup(&mut self, name: &str) -> DmResult<Arc<Pdev>> {
        let env = &mut *self.env;
        let lookup_failed = || invalid!("device lookup failed for {name:?}");
        if let Some(dev) = DevNum::parse(name) {
            if dev.major == env.pdevs.dm_major() {
                return if (env.dm_exists)(dev.minor) { Ok(env.pdevs.get_dm(dev.minor)) } else { Err(lookup_failed()) };
            }
            if dev.major == env.pdevs.file_major() {
                let path = env.pdevs.file_path(dev.minor).ok_or_else(lookup_failed)?.to_owned();
                let r = env.resolver.resolve_path(&path).map_err(|_| lookup_failed())?;
                return env.pdevs.get_resolved(r);
            }
            let r = env.resolver.resolve_block(dev).map_err(|_| lookup_failed())?;
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
        let r = env.resolver.resolve_path(name).map_err(|e| {
            tracing::debug!("resolving {name:?}: {e}");
            lookup_failed()
        })?;
        // A block node of dmemu's own major (e.g. one libdm made with mknod) is one of ours.
        if let Identity::Block(dev) = r.identity {
            if dev.major == env.pdevs.dm_major() {
                return if (env.dm_exists)(dev.minor) { Ok(env.pdevs.get_dm(dev.minor)) } else { Err(lookup_failed()) };
            }
        }
        env.pdevs.get_resolved(r)
    }
}

pub type Constructor = fn(&mut CtorCtx<'_, '_>, &[String]) -> DmResult<Box<dyn Target>>;

/// A registered target type.
pub struct TargetType {
    pub name: &'static str,
    pub version: [u32; 3],
    pub ctor: Constructor,
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
