//! `zero` 1.2.0: no arguments; reads return zeroes, writes vanish (linux-dm-abi.md §3.2).

use std::sync::Arc;

use crate::dm::pdev::Pdev;
use crate::dm::target::{CtorCtx, Mapping, Target, TargetType};
use crate::dm::{DmResult, Sectors, StatusType};
use crate::invalid;

pub static TYPE: TargetType = TargetType { name: "zero", version: [1, 2, 0], ctor };

pub struct Zero;

fn ctor(_ctx: &mut CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Box<dyn Target>> {
    if !argv.is_empty() {
        return Err(invalid!("zero: no arguments required"));
    }
    Ok(Box::new(Zero))
}

impl Target for Zero {
    /// No status routine in the kernel: every status type is empty.
    fn status(&self, _kind: StatusType, _noflush: bool) -> String {
        String::new()
    }
    fn iterate_devices(&self, _len: Sectors, _f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors)) {}
    fn map(&self, _offset: Sectors, len: Sectors) -> Mapping<'_> {
        Mapping::Zero(len)
    }
}
