//! Hardware handlers of the `multipath` target, as the hook table of seed 004 (the 2005
//! `dm-hw-handler.h`): a handler is constructed from the table's hardware-handler words, is asked
//! to initialise a priority group's paths before IO goes to them (`pg_init`, asynchronous: IO
//! stays queued until it completes with the seed's error flags), decides what each failed IO
//! means (`err`), and may contribute status words.
//!
//! Today's kernel keeps the table and status words of that design and runs the activation through
//! SCSI device handlers; dmemu has no SCSI layer, so the hooks are a real interface here. Built in:
//! the kernel's handler names `alua`, `emc`, `rdac`, `hp_sw` (accepted and printed as the kernel
//! prints them; on files and dmemu devices their activation succeeds at once) and `userspace`, which
//! forwards every hook to a program connected to the daemon (docs/multipath.md, "The userspace
//! hardware handler").

use std::sync::Arc;

use crate::dm::{DevNum, DmResult, StatusType};
use crate::io::{Op, Services};

pub mod userspace;

bitflags::bitflags! {
    /// The seed's error flags, for `pg_init` completions and `err` decisions (`MP_*`).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct MpFlags: u32 {
        /// Fail the path.
        const FAIL_PATH = 1;
        /// Bypass the path's priority group (try the others first).
        const BYPASS_PG = 2;
        /// Do not retry: fail the IO with its error.
        const ERROR_IO = 4;
    }
}

/// One path of a multipath table, as a handler is told of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathRef {
    /// The path's device.
    pub dev: DevNum,
    /// Its priority group, numbered from 1 in table order.
    pub group: u32,
}

/// How one path's activation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgInitOutcome {
    /// Finished, with the seed's flags (none: the path is ready).
    Done(MpFlags),
    /// Try again (the kernel's `SCSI_DH_RETRY` when `delayed`, `SCSI_DH_IMM_RETRY` otherwise), up to
    /// the table's `pg_init_retries`, after `pg_init_delay_msecs` when `delayed`.
    Retry { delayed: bool },
}

/// Called once when an activation ends, from any thread (possibly before `pg_init` returns).
pub type PgInitDone = Box<dyn FnOnce(PgInitOutcome) + Send>;
/// Called once with the decision on a failed IO, from any thread.
pub type ErrDone = Box<dyn FnOnce(MpFlags) + Send>;

/// A failed IO, for the handler to decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrRequest {
    pub path: PathRef,
    pub op: Op,
    /// Sector and length on the path.
    pub sector: u64,
    pub sectors: u64,
    /// The error as an errno (EIO, ENXIO, ENOSPC, …).
    pub errno: i32,
}

/// What a handler is constructed with.
pub struct HandlerCtx {
    /// Minor of the multipath device whose table names the handler.
    pub minor: u32,
    /// The table's core services (work queue, timers, events).
    pub services: Services,
}

/// The seed's `struct hw_handler_type` methods; construction is [`create`], destruction is
/// `Drop`.
pub trait HwHandler: Send + Sync {
    /// The name printed in TABLE status (`1 <name> `; the kernel drops the handler's arguments).
    fn name(&self) -> &str;

    /// Initialises `path` of priority group `path.group` before IO goes to it; `bypassed` says
    /// whether that group is bypassed. Must call `done` exactly once.
    fn pg_init(&self, path: PathRef, bypassed: bool, done: PgInitDone);

    /// Whether [`HwHandler::err`] always calls `done` before returning. A table whose handler
    /// decides later cannot take `REQ_NOWAIT` IO.
    fn decides_inline(&self) -> bool {
        true
    }

    /// Decides what a failed IO means (the seed's `err` hook). The default is the kernel's:
    /// errors that no other path can fix fail the IO ([`MpFlags::ERROR_IO`]), every other error
    /// fails the path ([`MpFlags::FAIL_PATH`]) and the IO is retried on another one.
    fn err(&self, req: ErrRequest, done: ErrDone) {
        done(default_err(req.errno))
    }

    /// Status words of the handler (`"<n> words… "`), or `None` for the kernel's: `0 ` in INFO,
    /// `1 <name> ` in TABLE.
    fn status(&self, _kind: StatusType) -> Option<String> {
        None
    }
}

/// The kernel's decision without a handler: what `blk_path_error` calls no path error (not
/// supported, no space, target, reservation conflict, medium and protection errors) fails the IO,
/// anything else could be the path.
pub fn default_err(errno: i32) -> MpFlags {
    match errno {
        // BLK_STS_NOTSUPP, BLK_STS_NOSPC, BLK_STS_TARGET (EREMOTEIO), BLK_STS_RESV_CONFLICT
        // (EBADE), BLK_STS_MEDIUM (ENODATA), BLK_STS_PROTECTION (EILSEQ).
        libc::EOPNOTSUPP | libc::ENOSPC | libc::EREMOTEIO | libc::EBADE | libc::ENODATA | libc::EILSEQ => {
            MpFlags::ERROR_IO
        }
        _ => MpFlags::FAIL_PATH,
    }
}

/// A kernel SCSI device handler name, on a path with no SCSI layer: the name is kept for status
/// and activation succeeds at once.
struct Builtin {
    name: &'static str,
}

impl HwHandler for Builtin {
    fn name(&self) -> &str {
        self.name
    }
    fn pg_init(&self, _path: PathRef, _bypassed: bool, done: PgInitDone) {
        done(PgInitOutcome::Done(MpFlags::empty()))
    }
}

/// Constructs the handler the table names (the seed's `ctr`) with its arguments (the words after
/// the name). `Ok(None)` for an unknown name.
pub fn create(name: &str, args: &[String], ctx: HandlerCtx) -> DmResult<Option<Arc<dyn HwHandler>>> {
    Ok(Some(match name {
        "alua" => Arc::new(Builtin { name: "alua" }),
        "emc" => Arc::new(Builtin { name: "emc" }),
        "rdac" => Arc::new(Builtin { name: "rdac" }),
        "hp_sw" => Arc::new(Builtin { name: "hp_sw" }),
        userspace::NAME => userspace::create(args, ctx)?,
        _ => return Ok(None),
    }))
}
