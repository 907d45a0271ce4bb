//! `zero` 1.2.0: no arguments; reads return zeroes, writes vanish (linux-dm-abi.md §3.2).

use std::sync::Arc;

use crate::dm::pdev::Pdev;
use crate::dm::target::{CtorCtx, Features, Map, Mapping, Target, TargetType, TypeFlags};
use crate::dm::{DmResult, Sectors, StatusType};
use crate::invalid;
use crate::io::{Bio, Op};

pub static TYPE: TargetType = TargetType { name: "zero", version: [1, 2, 0], ctor, flags: TypeFlags::empty() };

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
    /// Discards are taken (and do nothing); flushes and write-zeroes are not sent here, as in
    /// the kernel (`num_discard_bios = 1`, no flush or write-zeroes bios).
    fn features(&self) -> Features {
        Features {
            flush_bios: 0,
            discard_bios: 1,
            write_zeroes_bios: 0,
            nowait: true,
            pipes: true,
            ..Features::default()
        }
    }

    fn map(&self, mut bio: Bio) -> Map {
        match bio.op() {
            Op::Read | Op::Write | Op::Discard => {
                let r = bio.zero_fill();
                bio.end(r);
                Map::Submitted
            }
            _ => Map::Kill(bio),
        }
    }

    fn query(&self, _offset: Sectors, len: Sectors) -> Mapping<'_> {
        Mapping::Zero(len)
    }
}
