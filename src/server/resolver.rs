//! The daemon's [`DeviceResolver`]: looks paths and block numbers up in the real filesystem.

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use crate::dm::pdev::{DeviceResolver, Identity, Resolved};
use crate::dm::{DevNum, DmError, DmResult, Sectors};

pub struct FsResolver;

fn major(rdev: u64) -> u32 {
    libc::major(rdev)
}
fn minor(rdev: u64) -> u32 {
    libc::minor(rdev)
}

fn block_size(dev: DevNum) -> Option<Sectors> {
    let s = std::fs::read_to_string(format!("/sys/dev/block/{dev}/size")).ok()?;
    s.trim().parse().ok().map(Sectors)
}

impl DeviceResolver for FsResolver {
    fn resolve_path(&self, path: &str) -> DmResult<Resolved> {
        let md = std::fs::metadata(path).map_err(|e| DmError::NoSuchBlockDevice(format!("{path}: {e}")))?;
        let ft = md.file_type();
        if ft.is_file() {
            Ok(Resolved {
                identity: Identity::File { dev: md.dev(), ino: md.ino() },
                path: path.to_owned(),
                size: Sectors(md.size() / Sectors::SIZE),
            })
        } else if ft.is_block_device() {
            let dev = DevNum::new(major(md.rdev()), minor(md.rdev()));
            Ok(Resolved {
                identity: Identity::Block(dev),
                path: path.to_owned(),
                size: block_size(dev).unwrap_or_default(),
            })
        } else {
            Err(DmError::NoSuchBlockDevice(format!("{path}: not a block device or regular file")))
        }
    }

    fn resolve_block(&self, dev: DevNum) -> DmResult<Resolved> {
        let size = block_size(dev).ok_or_else(|| DmError::NoSuchBlockDevice(format!("{dev}: no such block device")))?;
        Ok(Resolved { identity: Identity::Block(dev), path: format!("/dev/block/{dev}"), size })
    }
}
