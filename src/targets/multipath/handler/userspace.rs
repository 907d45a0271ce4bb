//! The `userspace` hardware handler (docs/multipath-hwh.md): every `pg_init` and every error
//! decision of a device whose table names it (`1 userspace`, or `N userspace <args>…`) goes to the
//! handler program registered for that device over the control socket (`HWH` frames), so tests of
//! failover software can make activation slow or fail, ask for retries, bypass groups and decode
//! errors their own way. `dmemu hwh` is the reference program.
//!
//! Requests go to the session registered for the device's minor (a rename keeps it), through the
//! process-wide [`hub`]; its rules (no program, timeouts, disconnects, dropped tables) are in
//! [`Hub`]'s module documentation. The handler's arguments are handed to the program in each
//! `pg_init` line; TABLE status shows `1 userspace` as the kernel shows a handler.

mod hub;
pub mod wire;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

pub use hub::{Answer, Hub, Refusal, SessionId, Sink};

use super::{ErrDone, ErrRequest, HandlerCtx, HwHandler, PathRef, PgInitDone};
use crate::dm::DmResult;
use crate::io::Services;
use hub::Ask;

/// The handler's table name.
pub const NAME: &str = "userspace";

/// How long a request waits for its program's answer when the registration does not say (ALUA's
/// default failover timeout).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's hub (one daemon per process).
pub fn hub() -> &'static Arc<Hub> {
    static HUB: LazyLock<Arc<Hub>> = LazyLock::new(Hub::new);
    &HUB
}

struct Userspace {
    hub: Arc<Hub>,
    /// This instance, among the hub's requests.
    id: u64,
    minor: u32,
    services: Services,
    args: Vec<String>,
}

impl HwHandler for Userspace {
    fn name(&self) -> &str {
        NAME
    }

    fn pg_init(&self, path: PathRef, bypassed: bool, done: PgInitDone) {
        let ask = Ask::PgInit { path, bypassed, args: &self.args, done };
        self.hub.ask(self.minor, self.id, &self.services, ask);
    }

    fn decides_inline(&self) -> bool {
        false
    }

    fn err(&self, req: ErrRequest, done: ErrDone) {
        self.hub.ask(self.minor, self.id, &self.services, Ask::Err { req, done });
    }
}

impl Drop for Userspace {
    fn drop(&mut self) {
        self.hub.handler_dropped(self.id, &self.services);
    }
}

fn with_hub(hub: Arc<Hub>, args: &[String], ctx: HandlerCtx) -> Arc<dyn HwHandler> {
    let id = hub.new_handler();
    Arc::new(Userspace { hub, id, minor: ctx.minor, services: ctx.services, args: args.to_vec() })
}

/// Any arguments are accepted: they are the program's to interpret.
pub(super) fn create(args: &[String], ctx: HandlerCtx) -> DmResult<Arc<dyn HwHandler>> {
    Ok(with_hub(hub().clone(), args, ctx))
}

#[cfg(test)]
mod tests;
