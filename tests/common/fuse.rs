//! A daemon serving `/dev/mapper` files through FUSE (`--fuse-dir`), detached on drop even when
//! a test fails.

use super::{Daemon, Out};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A daemon serving device files; the FUSE dir is detached on drop even if the test failed.
pub struct Mapper {
    pub d: Daemon,
    pub fuse: PathBuf,
}

pub fn unmount(dir: &Path) {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; failure (nothing mounted) is fine.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

pub fn mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(dir.to_str().unwrap()))
}

impl Mapper {
    pub fn start() -> Self {
        let fuse = std::env::temp_dir().join(format!(
            "dmemu-fuse-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let d = Daemon::start_with(&["--fuse-dir", fuse.to_str().unwrap()]);
        Mapper { d, fuse }
    }

    /// `prog args` under `dmemu exec`.
    pub fn run(&self, prog: &str, args: &[&str]) -> Out {
        self.d.exec(prog, args, None)
    }

    /// A linear device `name` over a new sparse file of `sectors` (+ `offset`) sectors, mapped
    /// from sector `offset` of the file. Returns the file's path.
    pub fn linear(&self, name: &str, sectors: u64, offset: u64, extra: &[&str]) -> String {
        let file = self.d.file(&format!("{name}.img"), sectors + offset);
        let table = format!("0 {sectors} linear {file} {offset}");
        let mut args = vec!["create", name];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--table", &table]);
        self.d.dmsetup(&args).ok();
        file
    }

    pub fn info_field(&self, name: &str, field: &str) -> String {
        let out = self.d.dmsetup(&["info", "-c", "--noheadings", "-o", field, name]);
        out.ok().trim().to_owned()
    }
}

impl Drop for Mapper {
    fn drop(&mut self) {
        unmount(&self.fuse);
        let _ = std::fs::remove_dir(&self.fuse);
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}
