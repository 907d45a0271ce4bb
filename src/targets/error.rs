//! `error` 1.7.0: all IO fails (linux-dm-abi.md §3.3). Exactly two words are taken as
//! `<dev> <start>` (only to inherit device limits); any other argument count is accepted and
//! ignored. No status routine, so status and table lines are empty even in the two-word form.

use std::sync::Arc;

use crate::dm::pdev::Pdev;
use crate::dm::target::{parse_sectors, CtorCtx, Features, Map, Target, TargetType, TypeFlags};
use crate::dm::{DmResult, Sectors, StatusType};
use crate::invalid;
use crate::io::Bio;

pub static TYPE: TargetType = TargetType { name: "error", version: [1, 7, 0], ctor, flags: TypeFlags::HYBRID };

pub struct ErrorTarget {
    dev: Option<(Arc<Pdev>, Sectors)>,
}

fn ctor(ctx: &mut CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Box<dyn Target>> {
    let dev = match argv {
        [dev, start] => {
            let start = parse_sectors(start).ok_or_else(|| invalid!("error: invalid device sector"))?;
            Some((ctx.get_device(dev)?, start))
        }
        _ => None,
    };
    Ok(Box::new(ErrorTarget { dev }))
}

impl Target for ErrorTarget {
    fn status(&self, _kind: StatusType, _noflush: bool) -> String {
        String::new()
    }
    fn iterate_devices(&self, len: Sectors, f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors)) {
        if let Some((dev, start)) = &self.dev {
            f(dev, *start, len)
        }
    }
    /// Every IO fails, discards included (`num_discard_bios = 1`); flushes are not sent here.
    fn features(&self) -> Features {
        Features {
            flush_bios: 0,
            discard_bios: 1,
            write_zeroes_bios: 1,
            nowait: true,
            pipes: true,
            ..Features::default()
        }
    }

    fn map(&self, bio: Bio) -> Map {
        Map::Kill(bio)
    }
}
