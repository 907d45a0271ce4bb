//! Placeholder: the userspace hardware handler is being written.

use std::sync::Arc;

use super::{HandlerCtx, HwHandler, MpFlags, PathRef, PgInitDone, PgInitOutcome};
use crate::dm::DmResult;

/// The handler's table name.
pub const NAME: &str = "userspace";

struct Userspace;

impl HwHandler for Userspace {
    fn name(&self) -> &str {
        NAME
    }
    fn pg_init(&self, _path: PathRef, _bypassed: bool, done: PgInitDone) {
        done(PgInitOutcome::Done(MpFlags::empty()))
    }
}

pub(super) fn create(_args: &[String], _ctx: HandlerCtx) -> DmResult<Arc<dyn HwHandler>> {
    Ok(Arc::new(Userspace))
}
