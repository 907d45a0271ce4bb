//! Which paths are ours (interposition.md §1.4). The common case — any other path — costs a strlen and
//! a few byte comparisons; the daemon is asked for its facts only when a DM sysfs path shows up.

use crate::daemon;
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
    /// A DM block node (`/dev/mapper/<name>`, `$DM_DEV_DIR/mapper/<name>`, `/dev/dm-N`) while the
    /// daemon serves device files (§1.6 "Data plane", docs/control-socket.md "The FUSE directory").
    Block(BlockPath),
}

pub struct BlockPath {
    /// The device's file in the daemon's FUSE directory.
    pub fuse: CString,
    /// libdm keeps real nodes at this path (its node directory, as root): what stands there
    /// decides whether the node "exists" — see [`crate::blockdev`].
    pub managed: bool,
}

/// Sysfs prefixes that name a DM device by kernel name.
const DM_SYSFS: [&[u8]; 3] = [b"/sys/block/dm-", b"/sys/class/block/dm-", b"/sys/devices/virtual/block/dm-"];

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
        block(b).map_or(Target::Pass, Target::Block)
    }
}

/// `<dir>/mapper/<name>` with `<dir>` one of `/dev` and `$DM_DEV_DIR`, or `/dev/dm-<N>`; None (costing
/// a memrchr and a few comparisons for the common path) for anything else or while the daemon
/// serves no device files.
fn block(b: &[u8]) -> Option<BlockPath> {
    if let Some(n) = b.strip_prefix(b"/dev/dm-") {
        if n.is_empty() || n.len() > 7 || !n.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let f = daemon::facts()?;
        let fuse_dir = f.fuse_dir.as_ref()?;
        let name = dm_name(&f.run_dir, n)?;
        return Some(BlockPath { fuse: join(fuse_dir, &name)?, managed: false });
    }
    let slash = b.iter().rposition(|&c| c == b'/')?;
    let (dir, name) = (&b[..slash], &b[slash + 1..]);
    let parent = dir.strip_suffix(b"/mapper")?;
    if name.is_empty() || name == b"." || name == b".." || name == b"control" {
        return None;
    }
    let dev_dir = dm_dev_dir();
    let is_dev = parent == b"/dev";
    let is_dm_dev_dir = dev_dir.as_deref() == Some(parent);
    if !is_dev && !is_dm_dev_dir {
        return None;
    }
    let f = daemon::facts()?;
    let fuse_dir = f.fuse_dir.as_ref()?;
    // libdm makes nodes in $DM_DEV_DIR/mapper (/dev/mapper without it), but only root can.
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let managed = root && (is_dm_dev_dir || (is_dev && dev_dir.is_none()));
    Some(BlockPath { fuse: join(fuse_dir, name)?, managed })
}

/// `$DM_DEV_DIR` without trailing slashes (None when unset, empty or `/dev`).
fn dm_dev_dir() -> Option<Vec<u8>> {
    // SAFETY: getenv with a NUL-terminated name; the result is copied at once.
    let p = unsafe { libc::getenv(c"DM_DEV_DIR".as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: getenv returns a NUL-terminated string.
    let mut v = unsafe { CStr::from_ptr(p) }.to_bytes();
    while v.len() > 1 && v.ends_with(b"/") {
        v = &v[..v.len() - 1];
    }
    (!v.is_empty() && v != b"/dev").then(|| v.to_vec())
}

fn join(dir: &[u8], name: &[u8]) -> Option<CString> {
    let mut p = Vec::with_capacity(dir.len() + name.len() + 2);
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    CString::new(p).ok()
}

/// The name of `dm-<n>` from the daemon's sysfs tree (`<run_dir>/sys/block/dm-<n>/dm/name`).
fn dm_name(run_dir: &[u8], n: &[u8]) -> Option<Vec<u8>> {
    let mut p = run_dir.to_vec();
    p.extend_from_slice(b"/sys/block/dm-");
    p.extend_from_slice(n);
    p.extend_from_slice(b"/dm/name");
    let p = CString::new(p).ok()?;
    let mut name = crate::sys::keep_errno(|| crate::sys::read_small(&p))?;
    // The file is the name's raw bytes and one newline: any other byte, whitespace included, may
    // be part of the name.
    if name.last() == Some(&b'\n') {
        name.pop();
    }
    (!name.is_empty() && !name.contains(&b'/')).then_some(name)
}

fn control_path(b: &[u8]) -> bool {
    b.ends_with(b"/mapper/control") || b == b"/dev/device-mapper"
}

/// Makes the directory of a control node at `path` (`…/mapper`) if it is missing: with the kernel
/// the node's directory always exists (the node lives in it), and libdm then makes its device nodes
/// there. Failures are left for those mknods to report. errno is left untouched.
///
/// # Safety
/// `path` must be NULL or NUL-terminated.
pub unsafe fn make_control_dir(path: *const c_char) {
    if path.is_null() {
        return;
    }
    // SAFETY: caller's contract.
    let p = unsafe { CStr::from_ptr(path) }.to_bytes();
    let Some(dir) = p.strip_suffix(b"/control").filter(|d| d.ends_with(b"/mapper")) else { return };
    crate::sys::keep_errno(|| {
        // Every prefix ending before a '/', then the directory itself (mkdir -p).
        let ends = dir.iter().enumerate().filter(|&(i, &c)| c == b'/' && i > 0).map(|(i, _)| i).chain([dir.len()]);
        for end in ends {
            if let Ok(c) = CString::new(&dir[..end]) {
                // SAFETY: a NUL-terminated path; mkdir is not one of the functions we interpose.
                unsafe { libc::mkdir(c.as_ptr(), 0o755) };
            }
        }
    });
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
        let major: u64 = std::str::from_utf8(&rest[..digits]).ok().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
        match daemon::facts() {
            Some(f) if u64::from(f.major) == major => Some(f),
            _ => None,
        }
    } else if DM_SYSFS.iter().any(|p| b.starts_with(p)) {
        daemon::facts()
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

/// The `*at` calls: a relative `path` under a directory fd (`openat(fd_of("/sys/dev/block"),
/// "252:0", O_PATH)`, as libudev walks a sysfs path one component at a time) names one of our
/// paths when the directory's path joined with it does. Returns that absolute path, to be used
/// instead of `(dirfd, path)`; None (the common case, costing a scan of `path`) otherwise.
///
/// Only a relative path that could name a DM device or a `major:minor` link (it holds `dm-` or a
/// `:`) costs the look at `/proc/self/fd/<dirfd>`.
///
/// # Safety
/// `path` must be NULL or NUL-terminated.
pub unsafe fn resolve_at(dirfd: libc::c_int, path: *const c_char) -> Option<CString> {
    if dirfd == libc::AT_FDCWD || path.is_null() {
        return None;
    }
    // SAFETY: caller's contract.
    let rel = unsafe { CStr::from_ptr(path) }.to_bytes();
    if rel.is_empty() || rel[0] == b'/' || !(rel.contains(&b':') || rel.windows(3).any(|w| w == b"dm-")) {
        return None;
    }
    let dir = crate::sys::keep_errno(|| fd_path(dirfd))?;
    // Real directories only: our own tree's paths are not under /sys or /dev.
    let under = |top: &[u8]| dir.strip_prefix(top).is_some_and(|r| r.is_empty() || r[0] == b'/');
    if !(under(b"/sys") || under(b"/dev")) {
        return None;
    }
    let mut abs = dir;
    if abs.last() != Some(&b'/') {
        abs.push(b'/');
    }
    abs.extend_from_slice(rel);
    let abs = CString::new(abs).ok()?;
    // SAFETY: a NUL-terminated path.
    match unsafe { classify(abs.as_ptr()) } {
        Target::Pass => None,
        _ => Some(abs),
    }
}

/// The path an fd was opened with (`/proc/self/fd/<fd>`), read with a raw syscall.
fn fd_path(fd: libc::c_int) -> Option<Vec<u8>> {
    let link = CString::new(format!("/proc/self/fd/{fd}")).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: a NUL-terminated path and a buffer of the size we pass.
    let n = unsafe { libc::syscall(libc::SYS_readlinkat, libc::AT_FDCWD, link.as_ptr(), buf.as_mut_ptr(), buf.len()) };
    let n = usize::try_from(n).ok().filter(|&n| n > 0 && n < buf.len())?;
    buf.truncate(n);
    buf.starts_with(b"/").then_some(buf)
}

/// Whether an fd is open on something in the daemon's sysfs tree (`<run_dir>/sys/…`), which then
/// reports itself as sysfs to `fstatfs`: libudev takes a directory for a device only on sysfs.
pub fn fd_in_sysfs_tree(fd: libc::c_int) -> bool {
    let Some(p) = crate::sys::keep_errno(|| fd_path(fd)) else { return false };
    // Cheap first: every path in the tree has a "/sys" component.
    if !p.windows(5).any(|w| w == b"/sys/") && !p.ends_with(b"/sys") {
        return false;
    }
    let Some(f) = daemon::facts() else { return false };
    p.strip_prefix(&f.run_dir[..]).and_then(|r| r.strip_prefix(b"/sys")).is_some_and(|r| r.is_empty() || r[0] == b'/')
}
