//! Device-mapper-type ioctls (`_IOC_TYPE` 0xfd) on a dm device's block device: the kernel's
//! `dm_blk_ioctl` → `dm_prepare_ioctl` → the target's `prepare_ioctl` (drivers/md/dm.c). The one
//! such ioctl a target acts on is `DM_MPATH_PROBE_PATHS` (linux-dm-abi.md §4.6), which the
//! multipath target runs itself; a target that passes ioctls down hands any other one to the
//! device below, where a dmemu device answers the same way and anything else says `ENOTTY`.

use crate::dm::pdev::PdevKind;
use crate::dm::target::Mapping;
use crate::dm::{Engine, Sectors};
use crate::targets::multipath::{Multipath, ProbeHandle};

/// `_IO(0xfd, 18)`.
pub const DM_MPATH_PROBE_PATHS: u32 = 0xfd12;

/// The device-mapper ioctl type (`DM_IOCTL`).
pub const DM_IOCTL_TYPE: u32 = 0xfd;

/// What the engine says about one device's ioctl, decided under the lock.
pub enum Step {
    /// The answer: 0 or an errno.
    Done(i32),
    /// The multipath target's probe, to run once the lock is released.
    Probe(ProbeHandle),
    /// Passed down to this dmemu device.
    Forward(u32),
}

/// Targets with a `prepare_ioctl` that passes ioctls to their (first) device: the kernel's
/// linear, flakey, dust and switch (delay, striped, zero and error have none).
const FORWARDING: [&str; 4] = ["linear", "flakey", "dust", "switch"];

/// One level of `dm_prepare_ioctl` for `request` on dm-`minor`. `privileged` stands for
/// CAP_SYS_RAWIO, which an ioctl passed to only part of the device below needs.
pub fn step(engine: &Engine, minor: u32, request: u32, privileged: bool) -> Step {
    let Some(d) = engine.device(minor) else { return Step::Done(libc::ENXIO) };
    // No table, an empty one, or more than one target: not for any target to handle.
    let Some(live) = d.live.as_ref().filter(|t| t.len() == 1 && t.size().0 > 0) else {
        return Step::Done(libc::ENOTTY);
    };
    let t = &live.targets()[0];
    let any = t.target.as_ref() as &dyn std::any::Any;
    if let Some(mp) = any.downcast_ref::<Multipath>() {
        if d.suspended {
            return Step::Done(libc::EAGAIN);
        }
        // multipath_prepare_ioctl: a DM_IOCTL-type ioctl is its own to answer, never passed down.
        return match request {
            DM_MPATH_PROBE_PATHS => Step::Probe(mp.probe_handle()),
            _ => Step::Done(libc::ENOTTY),
        };
    }
    if !FORWARDING.contains(&t.ty.name) {
        return Step::Done(libc::ENOTTY);
    }
    if d.suspended {
        return Step::Done(libc::EAGAIN);
    }
    // The device at the target's first sector and where the target starts on it.
    let below = match t.target.query(Sectors(0), Sectors(1)) {
        Mapping::Remap { dev, at, .. } => Some((dev.clone(), at)),
        _ => {
            let mut first = None;
            t.target.iterate_devices(t.len, &mut |dev, start, _| {
                first.get_or_insert((dev.clone(), start));
            });
            first
        }
    };
    let Some((dev, start)) = below else { return Step::Done(libc::ENOTTY) };
    let PdevKind::Dm { minor: lower } = dev.kind else {
        // A regular file (or a real block device, which dmemu does not pass ioctls to): the
        // answer a regular file gives.
        return Step::Done(libc::ENOTTY);
    };
    let lower_size = engine.device(lower).map_or(Sectors(0), |l| l.size());
    // Only an ioctl to the whole device below is passed on without CAP_SYS_RAWIO (linear's "the
    // device sizes match exactly"; switch compares length plus start).
    let whole = if t.ty.name == "switch" {
        t.len.0.checked_add(start.0) == Some(lower_size.0)
    } else {
        start.0 == 0 && t.len == lower_size
    };
    if !whole && !privileged {
        // -ENOIOCTLCMD, which the ioctl syscall reports as ENOTTY.
        return Step::Done(libc::ENOTTY);
    }
    Step::Forward(lower)
}
