//! The daemon's [`DeviceResolver`]: looks paths and block numbers up in the real filesystem and
//! opens them, once per table load. Identity and size come from the opened fd, so what a table
//! names at load is what its IO reaches, whatever happens to the path afterwards.

use crate::dm::pdev::{DeviceResolver, Handle, Identity, Pdev, Resolved};
use crate::dm::{DevNum, DmError, DmResult, Sectors};
use crate::io::{Backing, OpenError};

pub struct FsResolver;

fn devnum(rdev: u64) -> DevNum {
    DevNum::new(libc::major(rdev), libc::minor(rdev))
}

/// What an opened device is: identity and size from its fd.
fn resolved(path: &str, f: Backing) -> DmResult<Resolved> {
    let fail = |e: std::io::Error| DmError::NoSuchBlockDevice(format!("{path}: {e}"));
    let (dev, ino, rdev) = f.identity().map_err(fail)?;
    let size = f.size().map_err(fail)?;
    let identity = match rdev {
        Some(rdev) => Identity::Block(devnum(rdev)),
        None => Identity::File { dev, ino },
    };
    let writable = f.writable();
    Ok(Resolved { identity, path: path.to_owned(), size, handle: Handle::Open(f), writable })
}

fn open(path: &str, writable: bool) -> DmResult<Resolved> {
    match Backing::open(path, writable) {
        Ok(f) => resolved(path, f),
        // A block node whose major has no driver may be one of dmemu's own devices, which the
        // engine reaches without an fd: it is told the number.
        Err(OpenError { error, block: Some(rdev) }) if error.raw_os_error() == Some(libc::ENXIO) => {
            let identity = Identity::Block(devnum(rdev));
            Ok(Resolved { identity, path: path.to_owned(), size: Sectors(0), handle: Handle::NoDriver, writable })
        }
        Err(e) => Err(DmError::NoSuchBlockDevice(format!("{path}: {}", e.error))),
    }
}

impl DeviceResolver for FsResolver {
    fn resolve_path(&self, path: &str, writable: bool) -> DmResult<Resolved> {
        open(path, writable)
    }

    fn resolve_block(&self, dev: DevNum, writable: bool) -> DmResult<Resolved> {
        let r = open(&format!("/dev/block/{dev}"), writable)?;
        match r.identity {
            Identity::Block(d) if d == dev => Ok(r),
            _ => Err(DmError::NoSuchBlockDevice(format!("{dev}: no such block device"))),
        }
    }

    fn reopen(&self, p: &Pdev, writable: bool) -> DmResult<Resolved> {
        let f = p.file().ok_or_else(|| DmError::NoSuchBlockDevice(format!("{}: not open", p.dev)))?;
        let path = match &p.kind {
            crate::dm::pdev::PdevKind::File { path } | crate::dm::pdev::PdevKind::Block { path } => path.as_str(),
            crate::dm::pdev::PdevKind::Dm { .. } => "",
        };
        let g = f.reopen(writable).map_err(|e| DmError::NoSuchBlockDevice(format!("{}: {e}", p.dev)))?;
        resolved(path, g)
    }

    fn size(&self, p: &Pdev) -> Option<Sectors> {
        p.file()?.size().ok()
    }
}
