//! Which paths are ours (interposition.md §1.4). The common case — any other path — costs a strlen and
//! a few byte comparisons; the daemon is asked for its facts only when a DM sysfs path shows up.

use crate::frame;
use libc::c_char;
use std::ffi::{CStr, CString};

pub enum Target {
    /// Not ours: call the real function with the caller's path.
    Pass,
    /// The DM control node (§1.1 item 2: libdm uses `dm_dir()/control`, which may not be under /dev).
    Control,
    /// `/proc/devices`, which must list device-mapper (§1.1 item 5).
    ProcDevices,
    /// A DM sysfs path, rewritten into the daemon's mirror (§1.2, docs/control-socket.md "sysfs tree").
    Redirect(CString),
}

/// Sysfs prefixes that name a DM device by kernel name.
const DM_SYSFS: [&[u8]; 3] = [
    b"/sys/block/dm-",
    b"/sys/class/block/dm-",
    b"/sys/devices/virtual/block/dm-",
];

/// # Safety
/// `path` must be NULL or NUL-terminated.
pub unsafe fn classify(path: *const c_char) -> Target {
    if path.is_null() {
        return Target::Pass;
    }
    // SAFETY: caller's contract.
    let b = unsafe { CStr::from_ptr(path) }.to_bytes();
    if control_path(b) {
        Target::Control
    } else if b == b"/proc/devices" {
        Target::ProcDevices
    } else if b.starts_with(b"/sys/") {
        sysfs(b)
    } else {
        Target::Pass
    }
}

fn control_path(b: &[u8]) -> bool {
    b.ends_with(b"/mapper/control") || b == b"/dev/device-mapper"
}

/// Just the control-node test of [`classify`], for calls that have nothing to redirect (mknod).
///
/// # Safety
/// `path` must be NULL or NUL-terminated.
pub unsafe fn is_control(path: *const c_char) -> bool {
    // SAFETY: caller's contract.
    !path.is_null() && control_path(unsafe { CStr::from_ptr(path) }.to_bytes())
}

fn sysfs(b: &[u8]) -> Target {
    let ours = if let Some(rest) = b.strip_prefix(b"/sys/dev/block/") {
        // "<major>:<minor>…": ours only if major is the DM major.
        let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 10 || rest.get(digits) != Some(&b':') {
            return Target::Pass;
        }
        let major: u64 = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(u64::MAX);
        match frame::facts() {
            Some(f) if u64::from(f.major) == major => Some(f),
            _ => None,
        }
    } else if DM_SYSFS.iter().any(|p| b.starts_with(p)) {
        frame::facts()
    } else {
        None
    };
    let Some(f) = ours else { return Target::Pass };
    let mut p = Vec::with_capacity(f.run_dir.len() + b.len() + 1);
    p.extend_from_slice(&f.run_dir);
    p.extend_from_slice(b);
    // Neither part contains NUL (run_dir was checked, `b` came from a C string).
    CString::new(p).map_or(Target::Pass, Target::Redirect)
}

/// `/run/udev/control`: libudev's "is udev running" probe. Reporting it absent makes libdm create and
/// remove /dev/mapper nodes itself instead of waiting for a udev that will never act (§1.1 item 10).
///
/// # Safety
/// `path` must be NULL or NUL-terminated.
pub unsafe fn is_udev_control(path: *const c_char) -> bool {
    // SAFETY: caller's contract.
    !path.is_null() && unsafe { CStr::from_ptr(path) }.to_bytes() == b"/run/udev/control"
}
