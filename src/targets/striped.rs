//! `striped` 1.6.0: `<#stripes> <chunk_size> {<dev> <offset>}×#stripes` (the kernel's
//! dm-stripe.c). Chunk size need not be a power of two; the target length must divide evenly into
//! stripes and each stripe into chunks.

use std::sync::Arc;

use crate::dm::pdev::Pdev;
use crate::dm::target::{parse_sectors, parse_u64, CtorCtx, Features, Map, Mapping, Target, TargetType, TypeFlags};
use crate::dm::{DmResult, Sectors, StatusType};
use crate::invalid;
use crate::io::{Bio, Op};

pub static TYPE: TargetType = TargetType { name: "striped", version: [1, 6, 0], ctor, flags: TypeFlags::empty() };

pub struct Striped {
    chunk: u64,
    /// Length of each stripe (target length / stripes).
    width: Sectors,
    stripes: Vec<(Arc<Pdev>, Sectors)>,
}

fn ctor(ctx: &mut CtorCtx<'_, '_>, argv: &[String]) -> DmResult<Box<dyn Target>> {
    if argv.len() < 2 {
        return Err(invalid!("striped: not enough arguments"));
    }
    let n = parse_u64(&argv[0])
        .filter(|&n| n >= 1 && n <= u32::MAX as u64)
        .ok_or_else(|| invalid!("striped: invalid stripe count"))?;
    let chunk = parse_u64(&argv[1])
        .filter(|&c| c >= 1 && c <= u32::MAX as u64)
        .ok_or_else(|| invalid!("striped: invalid chunk_size"))?;
    if !ctx.len.0.is_multiple_of(n) {
        return Err(invalid!("striped: target length not divisible by number of stripes"));
    }
    let width = ctx.len.0 / n;
    if !width.is_multiple_of(chunk) {
        return Err(invalid!("striped: target length not divisible by chunk size"));
    }
    if argv.len() as u64 != 2 + 2 * n {
        return Err(invalid!("striped: not enough destinations specified"));
    }
    let mut stripes = Vec::with_capacity(n as usize);
    for pair in argv[2..].chunks(2) {
        let offset = parse_sectors(&pair[1]).ok_or_else(|| invalid!("striped: invalid stripe offset"))?;
        stripes.push((ctx.get_device(&pair[0])?, offset));
    }
    Ok(Box::new(Striped { chunk, width: Sectors(width), stripes }))
}

impl Striped {
    /// Stripe index and sector within the stripe for a target offset (dm-stripe's
    /// `stripe_map_sector`).
    fn locate(&self, offset: u64) -> (usize, u64) {
        let n = self.stripes.len() as u64;
        let chunk_nr = offset / self.chunk;
        let within = offset % self.chunk;
        let stripe = chunk_nr % n;
        ((stripe) as usize, (chunk_nr / n) * self.chunk + within)
    }
}

impl Target for Striped {
    fn status(&self, kind: StatusType, _noflush: bool) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        match kind {
            StatusType::Info => {
                let _ = write!(s, "{} ", self.stripes.len());
                for (d, _) in &self.stripes {
                    let _ = write!(s, "{} ", d.dev);
                }
                s.push_str("1 ");
                s.extend(self.stripes.iter().map(|_| 'A'));
            }
            StatusType::Table => {
                let _ = write!(s, "{} {}", self.stripes.len(), self.chunk);
                for (d, off) in &self.stripes {
                    let _ = write!(s, " {} {}", d.dev, off);
                }
            }
            StatusType::Ima => {
                let _ = write!(
                    s,
                    "target_name=striped,target_version=1.6.0,stripes={},chunk_size={},",
                    self.stripes.len(),
                    self.chunk
                );
                for (i, (d, off)) in self.stripes.iter().enumerate() {
                    let _ = write!(
                        s,
                        "stripe_{i}_device_name={},stripe_{i}_physical_start={},stripe_{i}_status=A,",
                        d.dev, off
                    );
                }
                s.pop();
                s.push(';');
            }
        }
        s
    }

    fn iterate_devices(&self, _len: Sectors, f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors)) {
        for (d, off) in &self.stripes {
            f(d, *off, self.width)
        }
    }

    /// IO is split at chunk boundaries; every stripe gets a flush (`num_flush_bios = stripes`).
    /// Discards and write-zeroes are split by chunk like other IO, so each piece goes to its
    /// stripe as a plain remap.
    fn features(&self) -> Features {
        Features {
            flush_bios: self.stripes.len() as u32,
            max_io_len: Some(self.chunk),
            nowait: true,
            pipes: true,
            ..Features::default()
        }
    }

    fn map(&self, mut bio: Bio) -> Map {
        if bio.op() == Op::Flush {
            let (dev, _) = &self.stripes[bio.clone_index() as usize % self.stripes.len()];
            bio.remap(dev, Sectors(0));
            return Map::Remapped(bio);
        }
        let (i, sector) = self.locate(bio.sector().0);
        let (dev, off) = &self.stripes[i];
        match off.0.checked_add(sector).and_then(|s| bio.remap_at(dev, s)) {
            Some(()) => Map::Remapped(bio),
            None => Map::Kill(bio),
        }
    }

    fn query(&self, offset: Sectors, len: Sectors) -> Mapping<'_> {
        let (i, sector) = self.locate(offset.0);
        let (dev, off) = &self.stripes[i];
        let to_chunk_end = self.chunk - offset.0 % self.chunk;
        match off.0.checked_add(sector) {
            Some(at) => Mapping::Remap { dev, at: Sectors(at), len: Sectors(len.0.min(to_chunk_end)) },
            None => Mapping::Opaque(len),
        }
    }
}
