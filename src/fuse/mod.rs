//! `/dev/mapper` for unmodified tools: a FUSE directory (`dmemu serve --fuse-dir DIR`) with one file
//! per active device, whose reads and writes go through the data plane. The LD_PRELOAD shim
//! redirects opens of `/dev/mapper/<name>` and `/dev/dm-N` here and makes the files look like block
//! devices (stat, BLK* ioctls); see docs/control-socket.md "The FUSE directory".
//!
//! Contract with the shim: a device's inode number is its minor + [`INO_BASE`], so an open fd
//! tells the shim the minor without asking anyone.
//!
//! Every attribute and directory entry has a zero TTL, so sizes follow resume/resize and files
//! come and go with live tables without invalidation notices. Each FUSE open holds an
//! [`IoHandle`] (an opener of the device, as a real open of the node is) until release.
//! Reads, writes, fsync and fallocate run on a separate worker pool: IO to a suspended device
//! blocks until resume, and the FUSE threads must stay free meanwhile, since the resume itself
//! (libdm's node bookkeeping under the shim) stats these files.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig, MountOption,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyWrite,
    Request, SessionACL,
};

use crate::io::{ActiveDevice, DataPlane, IoError, IoHandle};

/// A device's inode is `minor + INO_BASE` (1 is the root directory).
pub const INO_BASE: u64 = 2;
const ROOT: u64 = 1;
/// Logical block size the files enforce for fallocate, as the shim reports in BLKSSZGET.
const SECTOR: u64 = 512;
/// Largest read/write the kernel sends us in one request.
const MAX_IO: u32 = 1 << 20;
/// Worker threads for IO, grown on demand while none is idle.
const MAX_WORKERS: usize = 64;
const FUSE_THREADS: usize = 4;
const TTL: Duration = Duration::ZERO;

type Job = Box<dyn FnOnce() + Send>;

/// A pool that starts another thread whenever a job arrives and every worker is busy (some may be
/// parked on a suspended device), up to [`MAX_WORKERS`].
struct Pool {
    tx: Mutex<Sender<Job>>,
    rx: Arc<Mutex<Receiver<Job>>>,
    idle: Arc<AtomicUsize>,
    total: AtomicUsize,
}

impl Pool {
    fn new() -> Self {
        let (tx, rx) = channel();
        Self {
            tx: Mutex::new(tx),
            rx: Arc::new(Mutex::new(rx)),
            idle: Arc::new(AtomicUsize::new(0)),
            total: AtomicUsize::new(0),
        }
    }

    fn run(&self, job: impl FnOnce() + Send + 'static) {
        if self.idle.load(Ordering::Acquire) == 0 && self.total.load(Ordering::Relaxed) < MAX_WORKERS {
            self.total.fetch_add(1, Ordering::Relaxed);
            let (rx, idle) = (self.rx.clone(), self.idle.clone());
            let spawned = std::thread::Builder::new().name("dmemu-fuse-io".into()).spawn(move || loop {
                idle.fetch_add(1, Ordering::AcqRel);
                let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                idle.fetch_sub(1, Ordering::AcqRel);
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            });
            if spawned.is_err() {
                self.total.fetch_sub(1, Ordering::Relaxed);
            }
        }
        // The receiver lives as long as any worker; with none at all, run inline rather than lose
        // the reply.
        if let Err(e) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(Box::new(job)) {
            (e.0)();
        }
    }
}

struct DevFs {
    io: DataPlane,
    handles: Mutex<HashMap<u64, Arc<IoHandle>>>,
    next_fh: AtomicU64,
    pool: Pool,
    uid: u32,
    gid: u32,
    born: SystemTime,
}

fn errno(e: &IoError) -> Errno {
    Errno::from_i32(e.errno())
}

impl DevFs {
    fn attr(&self, ino: u64, kind: FileType, size: u64) -> FileAttr {
        let dir = kind == FileType::Directory;
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: 0,
            atime: self.born,
            mtime: self.born,
            ctime: self.born,
            crtime: self.born,
            kind,
            perm: if dir { 0o755 } else { 0o660 },
            nlink: if dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn device_attr(&self, d: &ActiveDevice) -> FileAttr {
        self.attr(u64::from(d.minor) + INO_BASE, FileType::RegularFile, d.size)
    }

    fn by_minor(&self, ino: u64) -> Option<ActiveDevice> {
        let minor = ino.checked_sub(INO_BASE)?;
        self.io.active_devices().into_iter().find(|d| u64::from(d.minor) == minor)
    }

    fn handle(&self, fh: FileHandle) -> Option<Arc<IoHandle>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).get(&fh.0).cloned()
    }
}

impl Filesystem for DevFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Best effort: older kernels cap these themselves.
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        match self.io.active_devices().into_iter().find(|d| d.name == name.as_bytes()) {
            Some(d) => reply.entry(&TTL, &self.device_attr(&d), fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT {
            return reply.attr(&TTL, &self.attr(ROOT, FileType::Directory, 0));
        }
        // A device that is gone (or lost its table) keeps a size-0 inode rather than an error,
        // which would make the kernel mark the inode bad while fds may still hold it.
        let size = self.by_minor(ino.0).map_or(0, |d| d.size);
        reply.attr(&TTL, &self.attr(ino.0, FileType::RegularFile, size));
    }

    /// Truncation (O_TRUNC, ftruncate) and chmod/chown mean nothing to a block device: ignored.
    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.getattr(req, ino, fh, reply)
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        // File names are the device names' raw bytes, as the kernel's /dev/mapper nodes are.
        let mut entries =
            vec![(ROOT, FileType::Directory, OsString::from(".")), (ROOT, FileType::Directory, OsString::from(".."))];
        entries.extend(
            self.io
                .active_devices()
                .into_iter()
                .map(|d| (u64::from(d.minor) + INO_BASE, FileType::RegularFile, OsString::from_vec(d.name))),
        );
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let Some(d) = self.by_minor(ino.0) else { return reply.error(Errno::ENXIO) };
        let Some(h) = self.io.open(&d.name) else { return reply.error(Errno::ENXIO) };
        if h.minor() != d.minor {
            // Renamed between the two looks: not the device this inode names.
            return reply.error(Errno::ENXIO);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, Arc::new(h));
        // No page cache: every read and write reaches the table, as on a block device without
        // buffering, and other front ends (NBD) see the same bytes.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let Some(h) = self.handle(fh) else { return reply.error(Errno::EBADF) };
        self.pool.run(move || {
            // Reads at or past the end return nothing, as a block device's do.
            let len = h.size().saturating_sub(offset).min(u64::from(size)) as usize;
            let mut buf = vec![0u8; len];
            match h.read(offset, &mut buf) {
                Ok(()) => reply.data(&buf),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(h) = self.handle(fh) else { return reply.error(Errno::EBADF) };
        let data = data.to_vec();
        // O_SYNC/O_DSYNC opens get each write on stable storage, as the block layer's FUA does.
        let fua = flags.0 & libc::O_DSYNC != 0;
        self.pool.run(move || {
            // Block device rules: at the end ENOSPC, across it a short write.
            let size = h.size();
            if offset >= size && !data.is_empty() {
                return reply.error(Errno::ENOSPC);
            }
            let n = (size - offset.min(size)).min(data.len() as u64) as usize;
            match h.write(offset, &data[..n], fua) {
                Ok(()) => reply.written(n as u32),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// close(2) of one fd: nothing is buffered here.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Dropping the handle closes the device (its open count goes down).
        let h = self.handles.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        drop(h);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let Some(h) = self.handle(fh) else { return reply.error(Errno::EBADF) };
        self.pool.run(move || match h.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        });
    }

    /// The block device's fallocate modes: PUNCH_HOLE|KEEP_SIZE discards (the shim's BLKDISCARD),
    /// ZERO_RANGE writes zeroes (BLKZEROOUT); ranges must be whole sectors inside the device.
    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(h) = self.handle(fh) else { return reply.error(Errno::EBADF) };
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero = mode & !libc::FALLOC_FL_KEEP_SIZE == libc::FALLOC_FL_ZERO_RANGE;
        if mode != PUNCH && !zero {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        self.pool.run(move || {
            if !offset.is_multiple_of(SECTOR)
                || !length.is_multiple_of(SECTOR)
                || offset.checked_add(length).is_none_or(|end| end > h.size())
            {
                return reply.error(Errno::EINVAL);
            }
            let r = if zero { h.write_zeroes(offset, length, false) } else { h.discard(offset, length) };
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// The shim answers the block ioctls itself; anything that reaches us is unknown.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }
}

/// A mounted FUSE directory; dropping it (or [`FuseMount::unmount`]) detaches the mount.
pub struct FuseMount {
    dir: PathBuf,
    _session: fuser::BackgroundSession,
}

impl FuseMount {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Lazily detaches the mount (fds still open keep working until closed).
    pub fn unmount(&self) {
        unmount(&self.dir);
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// `umount2(dir, MNT_DETACH)`, or for an unprivileged daemon (EPERM) the setuid helper's lazy
/// unmount; errors are ignored (nothing mounted is fine).
pub fn unmount(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return };
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0
        || io::Error::last_os_error().raw_os_error() != Some(libc::EPERM)
    {
        return;
    }
    for helper in ["fusermount3", "fusermount"] {
        let quiet = std::process::Stdio::null;
        let st = std::process::Command::new(helper)
            .args(["-u", "-z", "--"])
            .arg(dir)
            .stdout(quiet())
            .stderr(quiet())
            .status();
        if st.is_ok_and(|s| s.success()) {
            return;
        }
    }
}

/// Mounts the device directory on `dir` (created if missing) and serves it on background threads.
pub fn mount(dir: &Path, io: DataPlane) -> io::Result<FuseMount> {
    // A daemon killed without unmounting leaves a dead mount here ("transport endpoint is not
    // connected"): detach it and reuse the directory.
    if std::fs::metadata(dir).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN)) {
        unmount(dir);
    }
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    // SAFETY: plain id queries.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let fs = DevFs {
        io,
        handles: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        pool: Pool::new(),
        uid,
        // Group "disk", as udev gives block nodes, when we may.
        gid: if uid == 0 { 6 } else { gid },
        born: SystemTime::now(),
    };
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("dmemu".into()),
        MountOption::Subtype("dmemu".into()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::NoAtime,
    ];
    // As root, other users may open the files as they could 0660 root:disk nodes (the kernel checks
    // the modes: default_permissions); otherwise FUSE's default, the owner only.
    cfg.acl = if uid == 0 { SessionACL::All } else { SessionACL::Owner };
    cfg.n_threads = Some(FUSE_THREADS);
    cfg.clone_fd = true;
    let session = fuser::Session::new(fs, &dir, &cfg)?.spawn()?;
    Ok(FuseMount { dir, _session: session })
}
