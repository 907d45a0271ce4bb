//! `linear` 1.5.0: `<dev> <offset>` (linux-dm-abi.md §3.1).

use std::sync::Arc;

use crate::dm::pdev::Pdev;
use crate::dm::target::{parse_sectors, CtorCtx, Features, Map, Mapping, Target, TargetType, TypeFlags};
use crate::dm::{DmResult, Sectors, StatusType};
use crate::invalid;
use crate::io::Bio;

pub static TYPE: TargetType = TargetType { name: "linear", version: [1, 5, 0], ctor, flags: TypeFlags::empty() };

pub struct Linear {
    dev: Arc<Pdev>,
    offset: Sectors,
}

fn ctor(ctx: &mut CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Box<dyn Target>> {
    let [dev, offset] = argv else {
        return Err(invalid!("linear: invalid argument count"));
    };
    let offset = parse_sectors(offset).ok_or_else(|| invalid!("linear: invalid device sector"))?;
    let dev = ctx.get_device(dev)?;
    Ok(Box::new(Linear { dev, offset }))
}

impl Target for Linear {
    fn status(&self, kind: StatusType, _noflush: bool) -> String {
        match kind {
            StatusType::Info => String::new(),
            StatusType::Table => format!("{} {}", self.dev.dev, self.offset),
            StatusType::Ima => {
                format!("target_name=linear,target_version=1.5.0,device_name={},start={};", self.dev.dev, self.offset)
            }
        }
    }

    fn iterate_devices(&self, len: Sectors, f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors)) {
        f(&self.dev, self.offset, len)
    }

    fn features(&self) -> Features {
        Features { nowait: true, pipes: true, ..Features::default() }
    }

    /// `sector' = offset + (sector − target start)`, checked: a sector past 2^64 fails the bio.
    fn map(&self, mut bio: Bio) -> Map {
        match bio.remap_offset(&self.dev, self.offset) {
            Some(()) => Map::Remapped(bio),
            None => Map::Kill(bio),
        }
    }

    fn query(&self, offset: Sectors, len: Sectors) -> Mapping<'_> {
        match self.offset.0.checked_add(offset.0) {
            Some(at) => Mapping::Remap { dev: &self.dev, at: Sectors(at), len },
            None => Mapping::Opaque(len),
        }
    }
}
