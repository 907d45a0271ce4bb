//! The daemon: the control socket (one connection = one open of `/dev/mapper/control`), the
//! engine behind one lock, event delivery, and the sysfs tree.

mod bdev_ioctl;
mod hwh;
mod plist;
pub mod record;
pub mod resolver;
mod restore;
pub mod signals;
pub mod sysfs;

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::dm::{Command, DevKey, DevNum, DmError, DmResult, Engine, EngineConfig, Reply, Request};
use crate::io::DataPlane;
use crate::ioctl::linux;
pub use crate::ioctl::netbsd::NetbsdErrors;
use dmemu_frame::{self as frame, hello, Kind, HEADER_LEN};

/// Daemon settings.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub socket: PathBuf,
    pub run_dir: PathBuf,
    pub engine: EngineConfig,
    /// How NETBSD_DM_IOCTL reports failed commands (`--netbsd-errors`).
    pub netbsd_errors: NetbsdErrors,
    /// Where the FUSE device files are mounted (`--fuse-dir`), told to clients in HELLO.
    pub fuse_dir: Option<PathBuf>,
}

struct State {
    engine: Engine,
    sysfs: sysfs::Sysfs,
    record: record::StateRecord,
}

impl State {
    fn sync(&mut self, io: &DataPlane) {
        sync(&mut self.engine, &mut self.sysfs, &self.record, io);
    }
}

/// Brings the data plane, the state record and the sysfs tree in line with the engine for the
/// devices that changed since the last sync (O(1) in the number of other devices).
fn sync(engine: &mut Engine, sysfs: &mut sysfs::Sysfs, record: &record::StateRecord, io: &DataPlane) {
    // File numbers before the tables that name them.
    let files = engine.pdevs_mut().take_new_file_numbers();
    if !files.is_empty() {
        if let Err(e) = record.append_files(&files) {
            tracing::error!("state record of file numbers not updated: {e}");
        }
    }
    let changed = engine.take_changed();
    let handlers = crate::targets::multipath::handler::userspace::hub();
    for &m in &changed {
        // The record first: once a command is answered, a daemon restarted after any death
        // brings its effect back (docs/reliability.md).
        let recorded = match engine.device(m) {
            Some(d) => {
                // Handler programs are told of requests by the device's current name.
                handlers.device_changed(m, Some(d.name.as_bytes()));
                io.publish_with_stats(
                    m,
                    d.name.as_bytes(),
                    d.live.clone(),
                    d.suspended,
                    d.disk_read_only(),
                    d.stats.set(),
                );
                record.write_device(d)
            }
            None => {
                handlers.device_changed(m, None);
                io.forget(m);
                record.remove_device(m)
            }
        };
        if let Err(e) = recorded {
            tracing::error!("state record of dm-{m} not updated (a restart would not restore it as it is): {e}");
        }
    }
    // After the data plane, which works out each device's limits.
    sysfs.sync(engine, &changed, &|m| io.limits(m));
}

/// Per-connection poll state: the global event counter saved at connect or DM_DEV_ARM_POLL.
struct PollState {
    /// The connection issued DM_DEV_ARM_POLL at least once. Only such connections get EVENT
    /// frames: clients that poll the control fd (multipathd) arm first, and the frames would be
    /// pure overhead for the rest (docs/control-socket.md).
    armed: bool,
    saved: u64,
    /// An EVENT frame is outstanding for the current condition.
    sent: bool,
}

struct Conn {
    writer: Mutex<UnixStream>,
    poll: Mutex<PollState>,
}

pub struct Daemon {
    state: Mutex<State>,
    /// Signalled whenever the global event counter moves (DEV_WAIT sleepers).
    events: Condvar,
    conns: Mutex<Vec<Arc<Conn>>>,
    hello: String,
    owner_uid: u32,
    io: DataPlane,
    netbsd_errors: NetbsdErrors,
}

/// Table loads with at least this many lines hand freed memory back to the system afterwards.
const BIG_LOAD: usize = 4096;

/// How often a blocked DEV_WAIT looks for a CANCEL frame or a vanished client.
const WAIT_SLICE: Duration = Duration::from_millis(50);

fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid socket fd and an out-buffer of the size we pass.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

/// Reads a frame header; `None` on a clean EOF at a frame boundary.
fn read_header(stream: &mut UnixStream) -> io::Result<Option<[u8; HEADER_LEN]>> {
    let mut raw = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match stream.read(&mut raw[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("connection closed after {got} bytes of a frame header"),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if got == 0 && e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(raw))
}

/// Whether the socket has something to read (a frame or EOF) right now.
fn readable(s: &UnixStream) -> bool {
    let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}

impl Daemon {
    pub fn new(cfg: &ServeConfig, engine: Engine) -> io::Result<Arc<Self>> {
        let sysfs = sysfs::Sysfs::new(&cfg.run_dir, cfg.engine.major)?;
        let (major, file_major) = (cfg.engine.major.to_string(), cfg.engine.file_major.to_string());
        let run_dir = cfg.run_dir.display().to_string();
        let fuse_dir = cfg.fuse_dir.as_ref().map(|d| d.display().to_string());
        let mut facts = vec![
            (hello::MAJOR, major.as_str()),
            (hello::FILE_MAJOR, file_major.as_str()),
            (hello::RUN_DIR, run_dir.as_str()),
            (hello::VERSION, env!("CARGO_PKG_VERSION")),
        ];
        if let Some(d) = &fuse_dir {
            facts.push((hello::FUSE_DIR, d));
        }
        let hello = hello::encode(&facts);
        let record = record::StateRecord::open(&cfg.run_dir)?;
        let records = record.devices();
        let files = record.files();
        let mut engine = engine;
        let daemon = Arc::new_cyclic(|me: &std::sync::Weak<Daemon>| {
            let opener = me.clone();
            // Front ends opening a device count as openers of its block device.
            let io = DataPlane::new(Box::new(move |minor, open| {
                if let Some(d) = opener.upgrade() {
                    let mut st = d.lock();
                    st.engine.adjust_opens(minor, if open { 1 } else { -1 });
                    st.sync(&d.io);
                }
            }));
            // Table events raised by targets (delivered on a worker, never under the lock).
            let raiser = me.clone();
            io.set_event_sink(Box::new(move |minor, table| {
                if let Some(d) = raiser.upgrade() {
                    let mut st = d.lock();
                    if st.engine.table_event(minor, table) {
                        st.sync(&d.io);
                        let global = st.engine.global_event();
                        drop(st);
                        d.broadcast_events(global);
                    }
                }
            }));
            engine.set_data_plane(io.clone());
            Self {
                state: Mutex::new(State { engine, sysfs, record }),
                events: Condvar::new(),
                conns: Mutex::new(Vec::new()),
                hello,
                owner_uid: unsafe { libc::geteuid() },
                io,
                netbsd_errors: cfg.netbsd_errors,
            }
        });
        let mut st = daemon.lock();
        let State { engine, sysfs, record } = &mut *st;
        for n in files {
            let minor = n.minor;
            if let Err(e) = engine.pdevs_mut().restore_file_number(n) {
                tracing::error!("state record: file number {minor} not restored: {e}");
            }
        }
        if !records.is_empty() {
            let wanted = records.len();
            let io = &daemon.io;
            let back = restore::restore(engine, records, &mut |e| sync(e, sysfs, record, io));
            tracing::info!("restored {back} of {wanted} device(s) from the state record in {}", cfg.run_dir.display());
        }
        drop(st);
        Ok(daemon)
    }

    /// The data plane, for front ends (NBD, FUSE).
    pub fn io(&self) -> &DataPlane {
        &self.io
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock must not take every other client down with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds the socket (mode 0600) and serves forever.
    pub fn serve(self: &Arc<Self>, socket: &Path) -> io::Result<()> {
        let listener = bind_control(socket)?;
        self.accept_loop(listener)
    }

    pub fn accept_loop(self: &Arc<Self>, listener: UnixListener) -> io::Result<()> {
        // Out of descriptors, accept fails until a client leaves: wait instead of spinning.
        let mut backoff = crate::listen::AcceptBackoff::new("control socket");
        for stream in listener.incoming() {
            match stream {
                Ok(s) => {
                    backoff.succeeded();
                    let me = self.clone();
                    if let Err(e) = std::thread::Builder::new().spawn(move || me.connection(s)) {
                        tracing::warn!("no thread for a control client: {e}");
                    }
                }
                Err(e) => std::thread::sleep(backoff.failed(&e)),
            }
        }
        Ok(())
    }

    fn connection(self: Arc<Self>, mut stream: UnixStream) {
        let uid = peer_uid(&stream);
        let privileged = matches!(uid, Some(u) if u == 0 || u == self.owner_uid);
        let Ok(writer) = stream.try_clone() else { return };
        let saved = self.lock().engine.global_event();
        let conn = Arc::new(Conn {
            writer: Mutex::new(writer),
            poll: Mutex::new(PollState { armed: false, saved, sent: false }),
        });
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).push(conn.clone());
        tracing::debug!("client connected (uid {uid:?})");
        if let Err(e) = self.serve_connection(&mut stream, &conn, privileged) {
            // A client that exits with unread EVENT frames resets the connection: that is a normal
            // close, as is EOF.
            if !matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) {
                tracing::warn!("client connection closed: {e}");
            }
        }
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).retain(|c| !Arc::ptr_eq(c, &conn));
    }

    fn serve_connection(&self, stream: &mut UnixStream, conn: &Arc<Conn>, privileged: bool) -> io::Result<()> {
        // A hardware handler session, from the connection's first HWH frame; ends with the
        // connection (docs/multipath-hwh.md).
        let mut hwh: Option<hwh::Session> = None;
        loop {
            let Some(raw) = read_header(stream)? else {
                return Ok(());
            };
            let (kind, h) = frame::parse_request_header(&raw)?;
            if kind == Kind::Plist && h.len as usize >= crate::ioctl::netbsd::proplib::COPYIN_LIMIT {
                // proplib refuses before copying in: E2BIG, without holding the plist in memory.
                io::copy(&mut (&mut *stream).take(h.len as u64), &mut io::sink())?;
                tracing::info!("plist of {} bytes refused: beyond proplib's copy-in limit", h.len);
                self.reply(conn, Kind::PlistReply, &frame::status_reply(-1, libc::E2BIG, &[]))?;
                continue;
            }
            let payload = frame::read_payload(stream, h.len)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("truncated {kind:?} frame: {e}")))?;
            match kind {
                Kind::Hello => self.send(conn, Kind::HelloReply, &[self.hello.as_bytes()])?,
                Kind::Cancel => {}
                Kind::Ioctl => {
                    let Some((req, buf)) = payload.split_first_chunk::<8>() else {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "IOCTL frame shorter than its request number",
                        ));
                    };
                    let Some(enc) = self.ioctl(stream, conn, u64::from_le_bytes(*req), buf, privileged)? else {
                        return Ok(());
                    };
                    self.reply(conn, Kind::IoctlReply, &frame::status_reply(enc.ret, enc.errno, &enc.bytes))?;
                }
                Kind::Plist => self.plist(conn, &payload, privileged)?,
                Kind::Genl => {
                    // The RFC dm-switch page-table upload (docs/protocols.md); the engine keeps the
                    // lock only while the new table is built.
                    let reply = crate::ioctl::dm_switch::serve(&payload, privileged, |dev, upload| {
                        crate::targets::switch::upload(&self.lock().engine, dev, upload)
                    });
                    self.send(conn, Kind::GenlReply, &[&reply])?;
                }
                Kind::BlkRoSet => {
                    let errno = self.blk_ro_set(&payload, privileged);
                    let ret = if errno == 0 { 0 } else { -1 };
                    self.send(conn, Kind::BlkRoSetReply, &[&frame::status_reply(ret, errno, &[])])?;
                }
                Kind::DmBlkIoctl => {
                    let errno = self.dm_blk_ioctl(&payload, privileged);
                    let ret = if errno == 0 { 0 } else { -1 };
                    self.send(conn, Kind::DmBlkIoctlReply, &[&frame::status_reply(ret, errno, &[])])?;
                }
                Kind::Hwh => {
                    let session = match hwh {
                        Some(ref s) => s,
                        None => hwh.insert(hwh::Session::open(conn.clone())?),
                    };
                    self.hwh_line(session, &payload, privileged);
                }
                _ => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected frame kind {kind:?}"))),
            }
        }
    }

    /// `BLKROSET` (block/ioctl.c `blkdev_roset`): CAP_SYS_ADMIN or EACCES; the flag stays on the
    /// block device across table swaps, makes it read-only to IO and shows as the disk's RO state
    /// (DM_READONLY_FLAG, sysfs `ro`). Returns the errno, 0 on success.
    fn blk_ro_set(&self, payload: &[u8], privileged: bool) -> i32 {
        let (Some(minor), Some(value)) = (payload.get(0..4), payload.get(4..8)) else {
            tracing::warn!("BLKROSET frame of {} bytes (want 8)", payload.len());
            return libc::EINVAL;
        };
        if !privileged {
            return libc::EACCES;
        }
        let minor = u32::from_le_bytes(minor.try_into().expect("4 bytes"));
        let read_only = i32::from_le_bytes(value.try_into().expect("4 bytes")) != 0;
        let mut st = self.lock();
        if !st.engine.set_bdev_read_only(minor, read_only) {
            return libc::ENXIO;
        }
        st.sync(&self.io);
        tracing::debug!("BLKROSET dm-{minor} {}", read_only as u8);
        0
    }

    /// A device-mapper-type ioctl on a device's block device (`DM_MPATH_PROBE_PATHS`; [`bdev_ioctl`]):
    /// open to anyone who holds the node open, as the kernel's. The multipath probe reads from the
    /// paths, so it runs with the engine's lock released. Returns the errno, 0 on success.
    fn dm_blk_ioctl(&self, payload: &[u8], privileged: bool) -> i32 {
        let (Some(minor), Some(request)) = (payload.get(0..4), payload.get(4..8)) else {
            tracing::warn!("DM_BLK_IOCTL frame of {} bytes (want 8)", payload.len());
            return libc::EINVAL;
        };
        let mut minor = u32::from_le_bytes(minor.try_into().expect("4 bytes"));
        let request = u32::from_le_bytes(request.try_into().expect("4 bytes"));
        if (request >> 8) & 0xff != bdev_ioctl::DM_IOCTL_TYPE {
            return libc::ENOTTY;
        }
        // Each level is one device down a stack; tables cannot form a cycle, so this ends.
        loop {
            let step = bdev_ioctl::step(&self.lock().engine, minor, request, privileged);
            match step {
                bdev_ioctl::Step::Done(errno) => return errno,
                bdev_ioctl::Step::Forward(lower) => minor = lower,
                bdev_ioctl::Step::Probe(handle) => {
                    let r = handle.probe();
                    tracing::debug!("DM_MPATH_PROBE_PATHS on dm-{minor}: {r:?}");
                    return r.err().unwrap_or(0);
                }
            }
        }
    }

    fn send(&self, conn: &Conn, kind: Kind, parts: &[&[u8]]) -> io::Result<()> {
        let mut w = conn.writer.lock().unwrap_or_else(|p| p.into_inner());
        frame::write_frame(&mut *w, kind, parts)
    }

    /// Sends a reply, followed in the same write by an EVENT frame while the connection's poll
    /// condition holds (the client drains EVENT frames before each request, so the condition is
    /// re-raised after every reply; one write so a poll right after the reply already sees it).
    fn reply(&self, conn: &Conn, kind: Kind, payload: &[u8]) -> io::Result<()> {
        let global = self.lock().engine.global_event();
        let mut out = Vec::with_capacity(2 * HEADER_LEN + payload.len());
        out.extend_from_slice(&frame::header(kind, payload.len()));
        out.extend_from_slice(payload);
        let mut p = conn.poll.lock().unwrap_or_else(|p| p.into_inner());
        if p.armed && p.saved != global {
            p.sent = true;
            out.extend_from_slice(&frame::header(Kind::Event, 0));
        }
        drop(p);
        let mut w = conn.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(&out)
    }

    /// Tells every connection whose poll condition just became true. Never blocks: a client that
    /// does not read its socket (or is mid-reply) gets its EVENT after its next reply instead.
    fn broadcast_events(&self, global: u64) {
        self.events.notify_all();
        let conns: Vec<Arc<Conn>> = self.conns.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for c in conns {
            let mut p = c.poll.lock().unwrap_or_else(|p| p.into_inner());
            if !p.armed || p.saved == global || p.sent {
                continue;
            }
            let Ok(w) = c.writer.try_lock() else { continue };
            let h = frame::header(Kind::Event, 0);
            // SAFETY: a valid socket fd and a 16-byte buffer. A unix stream socket takes a frame this
            // small whole or not at all, so the stream never holds half an EVENT.
            let n = unsafe {
                libc::send(w.as_raw_fd(), h.as_ptr().cast(), h.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            p.sent = n == h.len() as isize;
        }
    }

    /// A suspend, or a resume that swaps tables, first stops the device's IO as the kernel's
    /// `__dm_suspend` does: the targets' `presuspend` (which releases IO they hold), then the
    /// in-flight IO drains (outside the engine lock, so other devices keep being served); the
    /// command itself then runs `postsuspend`. The wait is interruptible, as the kernel's: a
    /// CANCEL from the client abandons the suspend (`presuspend_undo`) and the ioctl fails EINTR.
    fn suspend_io(&self, stream: &mut UnixStream, cmd: &Command) -> io::Result<Drained> {
        let Some((minor, noflush)) = self.lock().engine.begin_suspend(cmd) else {
            return Ok(Drained::Done);
        };
        let mut spoke = false;
        let drained = self.io.drain(minor, noflush, &mut || {
            spoke = readable(stream);
            spoke
        });
        if drained {
            return Ok(Drained::Done);
        }
        self.lock().engine.abandon_suspend(minor);
        tracing::info!("suspend of dm-{minor} interrupted while its IO drained");
        Ok(match wait_interrupted(stream)? {
            WaitEnd::Gone => Drained::Gone,
            _ => Drained::Cancelled,
        })
    }

    /// One ioctl, in the kernel's order (dm-ioctl.c `ctl_ioctl`): check and validate the buffer
    /// (decode), check the caller's privilege, handle the command, copy the reply out (encode).
    /// `None` means the client went away while its DM_DEV_WAIT slept.
    fn ioctl(
        &self,
        stream: &mut UnixStream,
        conn: &Conn,
        request: u64,
        buf: &[u8],
        privileged: bool,
    ) -> io::Result<Option<linux::Encoded>> {
        let mut decoded = match self.decode(request, buf) {
            Ok(d) => d,
            Err(refusal) => return Ok(Some(refusal)),
        };
        let cmd_name = linux::command_name(decoded.nr);
        if decoded.request.command.mutates() && !privileged {
            tracing::info!("{cmd_name} refused: caller is not privileged");
            return Ok(Some(decoded.encode_error(&DmError::Access)));
        }
        match self.suspend_io(stream, &decoded.request.command)? {
            Drained::Done => {}
            Drained::Cancelled => return Ok(Some(decoded.encode_error(&DmError::Interrupted))),
            Drained::Gone => return Ok(None),
        }
        let st = self.lock();
        let before = st.engine.global_event();
        let (st, woken_by_removal) = match self.dev_wait(stream, st, &mut decoded)? {
            WaitEnd::Run(st) => (st, None),
            WaitEnd::Removed(st, reply) => (st, Some(reply)),
            WaitEnd::Cancelled => return Ok(Some(decoded.encode_error(&DmError::Interrupted))),
            WaitEnd::Gone => return Ok(None),
        };
        if matches!(decoded.request.command, Command::ArmPoll) {
            let mut p = conn.poll.lock().unwrap_or_else(|p| p.into_inner());
            *p = PollState { armed: true, saved: before, sent: false };
        }
        let (result, after) = self.handle(st, &mut decoded, woken_by_removal);
        if after != before {
            self.broadcast_events(after);
        }
        Ok(Some(match result {
            Ok(reply) => {
                tracing::debug!("{cmd_name} ok");
                linux::encode(&reply, &decoded)
            }
            Err(e) => {
                tracing::info!("{cmd_name} failed: {e}");
                decoded.encode_error(&e)
            }
        }))
    }

    /// Check and validate: the buffer decoded into a command, or the encoded refusal.
    fn decode(&self, request: u64, buf: &[u8]) -> Result<linux::DecodedIoctl, linux::Encoded> {
        match linux::decode(request, buf) {
            Ok(linux::Decoded::Version) => Err(linux::encode_version()),
            Ok(linux::Decoded::Command(d)) => Ok(d),
            Err(e) => {
                // The kernel looks the device up before parsing some payloads: a missing device
                // then wins with ENXIO.
                let err = match &e.lookup_first {
                    Some(key) if self.lock().engine.event_nr(key).is_err() => DmError::NoDevice(format!("{key:?}")),
                    _ => e.error.clone(),
                };
                tracing::info!("ioctl {request:#x} refused: {e}");
                Err(linux::encode_error(request, buf, &err))
            }
        }
    }

    /// DM_DEV_WAIT's sleep (any other command runs at once). The kernel looks a waiter's device up
    /// once and sleeps on it: a rename or a removal wakes it with that device's status
    /// (linux-dm-abi.md §2.4, §2.9), whatever its name is now. The engine lock is released while
    /// sleeping; every [`WAIT_SLICE`] the client's socket is checked for a CANCEL or a hang-up.
    fn dev_wait<'a>(
        &'a self,
        stream: &mut UnixStream,
        mut st: MutexGuard<'a, State>,
        decoded: &mut linux::DecodedIoctl,
    ) -> io::Result<WaitEnd<'a>> {
        let qi = decoded.request.query_inactive;
        let Command::DevWait { key, event_nr, .. } = &mut decoded.request.command else {
            return Ok(WaitEnd::Run(st));
        };
        let Some(minor) = st.engine.lookup(key) else {
            return Ok(WaitEnd::Run(st));
        };
        *key = DevKey::Dev(DevNum::new(st.engine.config().major, minor));
        let mut last = st.engine.dev_info(minor, qi);
        loop {
            match (st.engine.device(minor), last.take()) {
                (None, Some(mut info)) => {
                    // Removal fired a table event on the live table before the device went.
                    if info.active_present {
                        info.event_nr = info.event_nr.wrapping_add(1);
                    }
                    return Ok(WaitEnd::Removed(st, Reply::Status(info, None)));
                }
                (Some(d), _) if d.event_nr != *event_nr => return Ok(WaitEnd::Run(st)),
                _ => last = st.engine.dev_info(minor, qi),
            }
            st = self.events.wait_timeout(st, WAIT_SLICE).unwrap_or_else(|p| p.into_inner()).0;
            if readable(stream) {
                drop(st);
                return wait_interrupted(stream);
            }
        }
    }

    /// Handle: runs the command in the engine (or answers a removed waiter), then brings sysfs and
    /// the data plane in line. Returns the result and the global event counter after it.
    fn handle(
        &self,
        mut st: MutexGuard<'_, State>,
        decoded: &mut linux::DecodedIoctl,
        woken_by_removal: Option<Reply>,
    ) -> (DmResult<Reply>, u64) {
        let mutates = decoded.request.command.mutates();
        // Move the command out (a table load can hold a million lines); encoding needs only the
        // header and input bytes.
        let req = std::mem::replace(&mut decoded.request, Request::new(Command::Version));
        let big_load = matches!(&req.command, Command::TableLoad { targets, .. } if targets.len() >= BIG_LOAD);
        let result = match woken_by_removal {
            Some(reply) => Ok(reply),
            None => st.engine.execute(req),
        };
        if mutates {
            st.sync(&self.io);
        }
        let after = st.engine.global_event();
        drop(st);
        if big_load {
            // The decoded lines of a big table were freed below the new table's allocations, where
            // malloc cannot return them to the system by itself (docs/PERFORMANCE.md).
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
        (result, after)
    }
}

/// Binds the control socket, mode 0600 from the start (a stale socket replaced, a live one an
/// error: [`crate::listen::bind_unix`]).
pub fn bind_control(socket: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let listener = crate::listen::bind_unix(socket, 0o600)?;
    tracing::info!("serving device-mapper control on {}", socket.display());
    Ok(listener)
}

/// How draining a device's IO for a suspend ended.
enum Drained {
    Done,
    /// The client sent CANCEL: EINTR.
    Cancelled,
    /// The client hung up.
    Gone,
}

/// How a DM_DEV_WAIT's sleep ended.
enum WaitEnd<'a> {
    /// Not a wait, or the event number moved, or no such device: run the command.
    Run(MutexGuard<'a, State>),
    /// The device was removed while its waiter slept: this is the answer.
    Removed(MutexGuard<'a, State>, Reply),
    /// The client sent CANCEL (a signal interrupted its ioctl): EINTR.
    Cancelled,
    /// The client hung up.
    Gone,
}

/// The client spoke while its DM_DEV_WAIT slept: a CANCEL, a hang-up, or a protocol error (a
/// connection has one request in flight at a time).
fn wait_interrupted<'a>(stream: &mut UnixStream) -> io::Result<WaitEnd<'a>> {
    let mut raw = [0u8; HEADER_LEN];
    if stream.read_exact(&mut raw).is_err() {
        tracing::warn!("client closed its connection while its DM_DEV_WAIT was pending");
        return Ok(WaitEnd::Gone);
    }
    let (kind, _) = frame::parse_request_header(&raw)?;
    if kind != Kind::Cancel {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "request sent while DM_DEV_WAIT was pending"));
    }
    Ok(WaitEnd::Cancelled)
}

/// Picks block majors the real /proc/devices does not list, from 254 down as Linux allocates
/// dynamic majors: the first for dmemu's devices, the next for regular-file pdevs.
pub fn free_majors(proc_devices: &str) -> (u32, u32) {
    let mut used = std::collections::HashSet::new();
    let mut in_block = false;
    for line in proc_devices.lines() {
        if line.starts_with("Block devices") {
            in_block = true;
            continue;
        }
        if in_block {
            if let Some(n) = line.split_whitespace().next().and_then(|n| n.parse::<u32>().ok()) {
                used.insert(n);
            }
        }
    }
    let mut free = (234..=254u32).rev().filter(|m| !used.contains(m));
    let a = free.next().unwrap_or(252);
    let b = free.next().unwrap_or(251);
    (a, b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn majors_skip_listed_block_majors() {
        let pd = "Character devices:\n252 dax\n\nBlock devices:\n  7 loop\n253 zram\n254 virtblk\n259 blkext\n";
        assert_eq!(super::free_majors(pd), (252, 251));
    }
}
