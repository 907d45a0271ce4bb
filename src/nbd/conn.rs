//! The transmission phase of one connection (proto.md "Transmission").
//!
//! The connection's thread reads requests and runs those that cannot wait right there: reads
//! served from memory (`IoHandle::read_nowait`: page cache, tmpfs) and writes without FUA to a
//! device that is not suspended. A thread hand-off costs more than such a request itself
//! (docs/PERFORMANCE.md, "Data plane"). Everything that may wait — a read from disk, FLUSH, FUA,
//! TRIM, WRITE_ZEROES, any IO on a suspended device — goes to this connection's worker threads
//! (started on demand, up to [`super::Tuning::workers`]), so many requests are in flight at once
//! and a slow one does not hold up the rest; so do big writes while the client keeps several
//! requests in flight (their copy overlaps with receiving the next payload). A big write the
//! client waits for alone is spliced from the socket into a pipe and from the pipe into the
//! files, one copy instead of two ([`Pipe`]). Replies are
//! serialized by a writer role that also combines: whoever holds it writes every reply queued
//! meanwhile with one `sendmsg`, and the reader holds its own replies back while further requests
//! are already buffered. The reader never blocks on a full socket: it hands the writer role to a
//! worker instead (a client may send many requests before reading any reply). A request counts
//! against the connection's bound ([`MAX_INFLIGHT`], [`MAX_INFLIGHT_BYTES`]) until its reply is on
//! the socket, so a client that stops reading replies stops being read (as qemu-nbd does).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IoSlice, Read};
use std::os::fd::AsRawFd;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::proto::*;
use super::Export;
use crate::io::{Extent, IoError, IoResult};

/// Requests admitted whose replies are not yet written to the socket, per connection, and their
/// payload bytes: the reader stops reading beyond these, so a client that never reads its replies
/// cannot make us buffer without bound (a request's cost is released only when its reply has
/// been written or dropped with the connection, not when it is queued for the writer).
const MAX_INFLIGHT: usize = 256;
const MAX_INFLIGHT_BYTES: u64 = 256 << 20;
/// Replies the reader may hold back to write together while more requests are already buffered.
const CORK_BYTES: usize = 256 << 10;
/// Bytes of idle buffers kept per connection, and the largest buffer worth keeping.
const POOL_MAX_BUF: usize = 4 << 20;
/// Descriptors in one block-status reply at most (the rest of the range is the client's to ask
/// again).
const MAX_EXTENTS: usize = 4096;
/// `sendmsg` takes at most this many pieces (Linux's IOV_MAX).
const IOV_MAX: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One reply: a header and an optional body (read data, or an error chunk's payload).
struct Reply {
    head: [u8; 28],
    head_len: usize,
    body: Vec<u8>,
    body_len: usize,
    /// Its request's cost under [`MAX_INFLIGHT_BYTES`], released once the reply is written.
    cost: u64,
}

impl Reply {
    fn len(&self) -> usize {
        self.head_len + self.body_len
    }
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
    workers: usize,
    idle: usize,
    /// Requests not yet answered (their replies not yet queued): the reader's hints.
    inflight: usize,
    /// Requests whose replies are not yet written (or dropped), and their bytes: the bound.
    held: usize,
    held_bytes: u64,
    /// The reader waits on `room`.
    reader_waits: bool,
}

/// Work for a worker: a request, or taking over the writer role from the reader.
enum Job {
    Request {
        req: Request,
        data: Vec<u8>,
    },
    /// A write whose payload waits in a pipe.
    Piped {
        req: Request,
        pipe: Pipe,
    },
    WriteOut,
}

struct Out {
    pending: VecDeque<Reply>,
    pending_bytes: usize,
    /// Bytes of `pending[0]` already on the wire.
    sent: usize,
    /// Someone holds the writer role (or a WriteOut job holds it for a worker).
    writing: bool,
    broken: bool,
}

struct Conn<'a> {
    sock: &'a File,
    export: &'a Export,
    max_workers: usize,
    /// Largest write the reader runs itself while more requests wait; 0: none at all.
    inline: usize,
    /// Big writes may go through a pipe (`splice`).
    splice: bool,
    /// Unbuffered payload bytes are taken with `recv(MSG_WAITALL)`.
    waitall: bool,
    /// Bytes of idle buffers kept.
    pool_bytes: usize,
    /// Idle pipes, and how many exist.
    pipes: Mutex<(Vec<Pipe>, usize)>,
    queue: Mutex<Queue>,
    /// Workers wait here for jobs.
    work: Condvar,
    /// The reader waits here for room under the in-flight limits.
    room: Condvar,
    out: Mutex<Out>,
    /// Idle buffers and their total capacity.
    pool: Mutex<(Vec<Vec<u8>>, usize)>,
}

fn io_cost(req: &Request) -> u64 {
    match req.typ {
        CMD_READ | CMD_WRITE => req.len as u64,
        _ => 0,
    }
}

impl Conn<'_> {
    fn buffer(&self, n: usize) -> Vec<u8> {
        let mut b = {
            let mut p = lock(&self.pool);
            let b = p.0.pop().unwrap_or_default();
            p.1 -= b.capacity();
            b
        };
        if b.len() < n {
            // Grows (and zeroes) only the first time a pooled buffer is used at this size.
            b.resize(n, 0);
        }
        b
    }

    fn recycle(&self, b: Vec<u8>) {
        if b.capacity() >= 4096 && b.capacity() <= POOL_MAX_BUF {
            let mut p = lock(&self.pool);
            if p.1 + b.capacity() <= self.pool_bytes {
                p.1 += b.capacity();
                p.0.push(b);
            }
        }
    }

    /// Checks what the protocol lets us check before running a request: the command, its flags,
    /// the payload limit and the range of the export as negotiated.
    fn check(&self, req: &Request) -> Result<(), (u32, &'static str)> {
        let e = self.export;
        let allowed = match req.typ {
            CMD_READ if e.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS if e.meta => CMD_FLAG_REQ_ONE,
            CMD_BLOCK_STATUS => return Err((EINVAL, "no metadata context was negotiated")),
            _ => return Err((EINVAL, "unsupported command")),
        };
        if req.flags & !allowed != 0 {
            return Err((EINVAL, "command flag not valid for this command"));
        }
        if req.typ == CMD_FLUSH {
            return Ok(());
        }
        let writes = matches!(req.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && e.flags & TF_READ_ONLY != 0 {
            return Err((EPERM, "export is read-only"));
        }
        if req.typ == CMD_BLOCK_STATUS && req.len == 0 {
            return Err((EINVAL, "NBD_CMD_BLOCK_STATUS of length 0"));
        }
        if req.typ == CMD_READ && req.len > MAX_PAYLOAD {
            return Err((EINVAL, "read longer than the maximum payload (32 MiB)"));
        }
        if req.offset.checked_add(req.len as u64).is_none_or(|end| end > e.size) {
            // proto.md "Error values": ENOSPC for writes past the end, EINVAL for the rest.
            return Err(match req.typ {
                CMD_WRITE | CMD_WRITE_ZEROES => (ENOSPC, "request beyond the end of the export"),
                _ => (EINVAL, "request beyond the end of the export"),
            });
        }
        Ok(())
    }

    fn error_reply(&self, req: &Request, err: u32, msg: &str) -> Reply {
        let mut r = Reply { head: [0; 28], head_len: 0, body: Vec::new(), body_len: 0, cost: 0 };
        if self.export.structured {
            // proto.md: with structured replies a READ never gets a simple reply, and errors
            // preferably travel as error chunks, which carry a message.
            let msg = &msg.as_bytes()[..msg.len().min(4096)];
            r.head[..20].copy_from_slice(&chunk_header(
                req.cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                6 + msg.len() as u32,
            ));
            r.head_len = 20;
            r.body.extend_from_slice(&err.to_be_bytes());
            r.body.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            r.body.extend_from_slice(msg);
            r.body_len = r.body.len();
        } else {
            r.head[..16].copy_from_slice(&simple_reply(req.cookie, err));
            r.head_len = 16;
        }
        r
    }

    fn ok_reply(&self, req: &Request) -> Reply {
        let mut r = Reply { head: [0; 28], head_len: 16, body: Vec::new(), body_len: 0, cost: 0 };
        if self.export.structured && req.typ == CMD_READ {
            // A zero-length read has no data chunk to send (OFFSET_DATA needs a byte at least).
            r.head[..20].copy_from_slice(&chunk_header(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0));
            r.head_len = 20;
        } else {
            r.head[..16].copy_from_slice(&simple_reply(req.cookie, 0));
        }
        r
    }

    /// Runs a checked request against the device.
    fn run(&self, req: Request, data: Vec<u8>) -> Reply {
        let h = &self.export.handle;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let len = req.len as usize;
        let res = match req.typ {
            CMD_READ if len > 0 => {
                // A read the reader could not finish without waiting brings its buffer along.
                let mut buf = if data.len() >= len {
                    data
                } else {
                    self.recycle(data);
                    self.buffer(len)
                };
                let res = h.read(req.offset, &mut buf[..len]);
                return self.read_reply(&req, buf, res);
            }
            CMD_READ => Ok(()),
            CMD_WRITE => {
                let r = h.write(req.offset, &data[..len], fua);
                self.recycle(data);
                r
            }
            CMD_FLUSH => h.flush(),
            CMD_TRIM => h.discard(req.offset, req.len as u64).and_then(|()| if fua { h.flush() } else { Ok(()) }),
            // NO_HOLE is satisfied as is: the data plane's write-zeroes allocates (ZERO_RANGE).
            CMD_WRITE_ZEROES => h.write_zeroes(req.offset, req.len as u64, fua),
            CMD_BLOCK_STATUS => {
                let max = if req.flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { MAX_EXTENTS };
                match h.extents(req.offset, req.len as u64, max) {
                    Ok(extents) => return self.block_status_reply(&req, &extents),
                    Err(e) => Err(e),
                }
            }
            _ => unreachable!("checked"),
        };
        match res {
            Ok(()) => self.ok_reply(&req),
            Err(e) => self.error_reply(&req, nbd_errno(e.errno()), &e.to_string()),
        }
    }

    /// One NBD_REPLY_TYPE_BLOCK_STATUS chunk for `base:allocation` (proto.md "Structured reply
    /// types"): the context id, then (length, state) descriptors.
    fn block_status_reply(&self, req: &Request, extents: &[Extent]) -> Reply {
        let mut body = Vec::with_capacity(4 + 8 * extents.len());
        body.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
        for e in extents {
            let state = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
            // A request is at most 4 GiB − 1 long and extents are clipped to it.
            body.extend_from_slice(&(e.len as u32).to_be_bytes());
            body.extend_from_slice(&state.to_be_bytes());
        }
        let mut r = Reply { head: [0; 28], head_len: 20, body_len: body.len(), body, cost: 0 };
        r.head[..20].copy_from_slice(&chunk_header(
            req.cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            r.body_len as u32,
        ));
        r
    }

    fn read_reply(&self, req: &Request, buf: Vec<u8>, res: IoResult) -> Reply {
        let len = req.len as usize;
        match res {
            Ok(()) => {
                let mut r = Reply { head: [0; 28], head_len: 0, body: buf, body_len: len, cost: 0 };
                if self.export.structured {
                    r.head[..20].copy_from_slice(&chunk_header(
                        req.cookie,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        8 + req.len,
                    ));
                    r.head[20..28].copy_from_slice(&req.offset.to_be_bytes());
                    r.head_len = 28;
                } else {
                    r.head[..16].copy_from_slice(&simple_reply(req.cookie, 0));
                    r.head_len = 16;
                }
                r
            }
            Err(e) => {
                self.recycle(buf);
                self.error_reply(req, nbd_errno(e.errno()), &e.to_string())
            }
        }
    }

    /// Runs a checked request on the reader's thread if it can finish without waiting: the reply,
    /// or the request back (with any buffer it got) for a worker.
    fn try_inline(&self, req: Request, data: Vec<u8>) -> Result<Reply, (Request, Vec<u8>)> {
        let h = &self.export.handle;
        let len = req.len as usize;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        match req.typ {
            CMD_READ if len > 0 => {
                let mut buf = self.buffer(len);
                match h.read_nowait(req.offset, &mut buf[..len]) {
                    Err(IoError::WouldBlock) => Err((req, buf)),
                    res => Ok(self.read_reply(&req, buf, res)),
                }
            }
            CMD_WRITE if !fua => match h.write_nowait(req.offset, &data[..len]) {
                Err(IoError::WouldBlock) => Err((req, data)),
                res => {
                    self.recycle(data);
                    Ok(match res {
                        Ok(()) => self.ok_reply(&req),
                        Err(e) => self.error_reply(&req, nbd_errno(e.errno()), &e.to_string()),
                    })
                }
            },
            _ => Err((req, data)),
        }
    }

    /// Queues a reply and writes it (with whatever else is queued) unless another thread holds
    /// the writer role, or `flush` is false and little is queued. `wait` false (the reader):
    /// never block on a full socket; returns true when the writer role must go to a worker
    /// (a client may send requests without reading replies until it has sent them all: a
    /// reader blocked on writing would deadlock with it).
    #[must_use]
    fn send(&self, req: &Request, mut r: Reply, flush: bool, wait: bool) -> bool {
        r.cost = io_cost(req);
        let mut o = lock(&self.out);
        if o.broken {
            drop(o);
            self.release(1, r.cost);
            self.recycle(r.body);
            return false;
        }
        o.pending_bytes += r.len();
        o.pending.push_back(r);
        if o.writing || (!flush && o.pending_bytes < CORK_BYTES) {
            return false;
        }
        o.writing = true;
        self.write_out(o, wait)
    }

    /// Writes whatever is queued; see [`Self::send`] for `wait` and the result.
    #[must_use]
    fn flush(&self, wait: bool) -> bool {
        let mut o = lock(&self.out);
        if o.writing || o.pending.is_empty() {
            return false;
        }
        o.writing = true;
        self.write_out(o, wait)
    }

    /// With the writer role held: writes queued replies until none are left. Returns true if
    /// `wait` is false and the socket is full; the role then stays taken for a worker.
    fn write_out<'a>(&'a self, mut o: MutexGuard<'a, Out>, wait: bool) -> bool {
        debug_assert!(o.writing);
        while !o.pending.is_empty() && !o.broken {
            let batch: Vec<Reply> = o.pending.drain(..).collect();
            let skip = std::mem::take(&mut o.sent);
            o.pending_bytes = 0;
            drop(o);
            let res = write_replies(self.sock, &batch, skip, wait);
            o = lock(&self.out);
            match res {
                Ok(None) => self.retire(batch),
                Ok(Some(mut n)) => {
                    // Put back what is not fully written, ahead of anything queued meanwhile.
                    let mut rest = Vec::new();
                    let mut written = Vec::new();
                    for r in batch {
                        if rest.is_empty() && n >= r.len() {
                            n -= r.len();
                            written.push(r);
                        } else {
                            rest.push(r);
                        }
                    }
                    self.retire(written);
                    o.sent = n;
                    o.pending_bytes += rest.iter().map(Reply::len).sum::<usize>() - n;
                    for r in rest.into_iter().rev() {
                        o.pending.push_front(r);
                    }
                    return true;
                }
                Err(e) => {
                    tracing::debug!("nbd: writing replies: {e}");
                    o.broken = true;
                    // Stop the reader too: nobody will hear the replies.
                    // SAFETY: a valid socket fd.
                    unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
                    self.retire(batch);
                }
            }
        }
        let dropped: Vec<Reply> = o.pending.drain(..).collect();
        o.pending_bytes = 0;
        o.sent = 0;
        o.writing = false;
        drop(o);
        self.retire(dropped);
        false
    }

    /// Replies written to the socket, or dropped with a broken connection: their cost is released
    /// and their buffers recycled.
    fn retire(&self, replies: Vec<Reply>) {
        if replies.is_empty() {
            return;
        }
        self.release(replies.len(), replies.iter().map(|r| r.cost).sum());
        replies.into_iter().for_each(|r| self.recycle(r.body));
    }

    /// Gives back the room of `n` requests of `bytes` under the bound.
    fn release(&self, n: usize, bytes: u64) {
        let mut q = lock(&self.queue);
        q.held -= n;
        q.held_bytes -= bytes;
        let wake = q.reader_waits;
        drop(q);
        if wake {
            self.room.notify_one();
        }
    }

    /// A request is answered (its reply queued, or none will come): the reader's hints only.
    fn done(&self) {
        lock(&self.queue).inflight -= 1;
    }

    fn worker(&self) {
        let mut q = lock(&self.queue);
        loop {
            if let Some(job) = q.jobs.pop_front() {
                drop(q);
                match job {
                    Job::Request { req, data } => {
                        let reply = self.run(req, data);
                        let _ = self.send(&req, reply, true, true);
                        self.done();
                    }
                    Job::Piped { req, pipe } => {
                        let fua = req.flags & CMD_FLAG_FUA != 0;
                        let res = self.export.handle.write_from_pipe(req.offset, pipe.fd(), req.len as u64, fua, false);
                        let reply = self.piped_reply(&req, pipe, res);
                        let _ = self.send(&req, reply, true, true);
                        self.done();
                    }
                    Job::WriteOut => {
                        // The reader handed over the writer role it holds.
                        let o = lock(&self.out);
                        let _ = self.write_out(o, true);
                    }
                }
                q = lock(&self.queue);
            } else if q.closed {
                return;
            } else {
                q.idle += 1;
                q = self.work.wait(q).unwrap_or_else(|p| p.into_inner());
                q.idle -= 1;
            }
        }
    }

    /// Hands a job to the workers, starting one if none is idle.
    fn dispatch<'s>(&'s self, s: &'s std::thread::Scope<'s, '_>, job: Job) {
        let mut q = lock(&self.queue);
        q.jobs.push_back(job);
        if q.idle > 0 {
            drop(q);
            self.work.notify_one();
        } else if q.workers < self.max_workers.max(1) {
            q.workers += 1;
            drop(q);
            s.spawn(move || self.worker());
        }
    }
}

/// Writes replies (the first `skip` bytes are already out) with `sendmsg`, as few calls as
/// IOV_MAX allows. `Ok(Some(n))`: `wait` is false and the socket filled up after `n` bytes
/// (counted from the start of the batch).
fn write_replies(sock: &File, batch: &[Reply], skip: usize, wait: bool) -> io::Result<Option<usize>> {
    let flags = libc::MSG_NOSIGNAL | if wait { 0 } else { libc::MSG_DONTWAIT };
    let mut done = skip;
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity((batch.len() * 2).min(IOV_MAX));
    let mut i = 0;
    let mut skip = skip;
    while i < batch.len() {
        iov.clear();
        while i < batch.len() && iov.len() + 2 <= IOV_MAX {
            let r = &batch[i];
            for part in [&r.head[..r.head_len], &r.body[..r.body_len]] {
                if skip >= part.len() {
                    skip -= part.len();
                } else {
                    iov.push(IoSlice::new(&part[skip..]));
                    skip = 0;
                }
            }
            i += 1;
        }
        let mut bufs = &mut iov[..];
        while !bufs.is_empty() {
            // SAFETY: IoSlice is ABI-compatible with iovec; the msghdr points at live slices.
            let n = unsafe {
                let mut m: libc::msghdr = std::mem::zeroed();
                m.msg_iov = bufs.as_mut_ptr().cast();
                m.msg_iovlen = bufs.len() as _;
                libc::sendmsg(sock.as_raw_fd(), &m, flags)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(Some(done)),
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n as usize;
            IoSlice::advance_slices(&mut bufs, n as usize);
        }
    }
    Ok(None)
}

/// A short busy-wait for the next request before sleeping in `read`, for clients that answer
/// each reply with the next request at once (queue depth 1): waking a sleeping thread on another
/// vCPU costs tens of microseconds here, more than the request itself (docs/PERFORMANCE.md). It
/// spins only while the client's recent waits were short, at most [`Spin::LIMIT`] per wait, and
/// yields the CPU meanwhile (a client on the same CPU runs first).
#[derive(Default)]
struct Spin {
    /// The last wait was short: spin before the next.
    hot: bool,
    /// When the current wait began, if it ended up sleeping in `read`.
    slept: Option<std::time::Instant>,
}

impl Spin {
    const LIMIT: std::time::Duration = std::time::Duration::from_micros(50);
    /// A whole wait (spin and sleep) this short still counts as a back-to-back client: a
    /// sleep includes the wake-up.
    const SHORT: std::time::Duration = std::time::Duration::from_micros(100);

    /// Before a `read` that would block.
    fn before(&mut self, sock: &File) {
        let start = std::time::Instant::now();
        if self.hot {
            loop {
                if ready(sock.as_raw_fd(), libc::POLLIN, 0) {
                    return;
                }
                if start.elapsed() > Self::LIMIT {
                    break;
                }
                // SAFETY: no preconditions.
                unsafe { libc::sched_yield() };
            }
        }
        self.slept = Some(start);
    }

    /// After the `read` returned.
    fn after(&mut self) {
        if let Some(t) = self.slept.take() {
            self.hot = t.elapsed() <= Self::SHORT;
        }
    }
}

/// Writes at least this big may take the pipe: below it, the copy costs less than the extra
/// system calls.
const SPLICE_MIN: usize = 64 << 10;
/// Pipes per connection at most: the reader's, and those that wait in workers for a resume.
const MAX_PIPES: usize = 8;
/// The pipe's size: a 1 MiB write fits whole even when the socket hands it over in pieces
/// smaller than a page.
const PIPE_BYTES: libc::c_int = 2 << 20;

/// A write's payload, received.
enum Payload {
    Buf(Vec<u8>),
    /// All of it is in this pipe.
    Piped(Pipe),
}

impl Conn<'_> {
    /// An idle pipe, or a new one while there are fewer than [`MAX_PIPES`].
    /// Whether a write's payload goes socket → pipe → files by `splice`: a big write the client
    /// waits for alone, with its payload still on the way (`buffered` bytes of it read already).
    /// With more in flight the copy into a buffer overlaps with the workers' writes and measured as
    /// fast or faster (docs/PERFORMANCE.md, "Data plane"). A request the checks refuse takes the
    /// buffer path, where it is refused. Cheap tests first: small writes never take the queue's
    /// lock here.
    fn splices(&self, req: &Request, buffered: usize) -> bool {
        let len = req.len as usize;
        self.splice
            && len >= SPLICE_MIN
            && buffered < len
            && req.flags & CMD_FLAG_FUA == 0
            && self.inline > 0
            && self.max_workers > 0
            && lock(&self.queue).inflight == 1
            && self.check(req).is_ok()
    }

    fn take_pipe(&self) -> Option<Pipe> {
        let mut p = lock(&self.pipes);
        if let Some(pipe) = p.0.pop() {
            return Some(pipe);
        }
        if p.1 >= MAX_PIPES {
            return None;
        }
        let pipe = Pipe::new()?;
        p.1 += 1;
        Some(pipe)
    }

    /// Returns a pipe to the pool; one that cannot be emptied is closed instead.
    fn put_pipe(&self, mut pipe: Pipe) {
        if pipe.drain().is_ok() {
            lock(&self.pipes).0.push(pipe);
        } else {
            lock(&self.pipes).1 -= 1;
        }
    }

    /// The reply to a piped write, giving the pipe back.
    fn piped_reply(&self, req: &Request, pipe: Pipe, res: IoResult) -> Reply {
        self.put_pipe(pipe);
        match res {
            Ok(()) => self.ok_reply(req),
            Err(e) => self.error_reply(req, nbd_errno(e.errno()), &e.to_string()),
        }
    }

    /// Reads a write's payload into a buffer.
    fn receive(&self, r: &mut BufReader<&File>, len: usize) -> io::Result<Vec<u8>> {
        let mut data = self.buffer(len);
        if !self.waitall {
            r.read_exact(&mut data[..len])?;
            return Ok(data);
        }
        // What is buffered already, then the rest in one call that returns when all of it has
        // arrived: one wake-up per payload instead of one per piece the socket hands over.
        let pre = r.buffer().len().min(len);
        data[..pre].copy_from_slice(&r.buffer()[..pre]);
        r.consume(pre);
        recv_all(sock_of(r).as_raw_fd(), &mut data[pre..len])?;
        Ok(data)
    }
}

/// The reader's pipe for big writes: the socket's pages are moved into it (no copy), and from
/// it into the page cache of the files (one copy), where reading into a buffer and writing from
/// it copies twice. The payload is whole in the pipe before the request enters the device's
/// gate, so a slow client never holds up a suspend.
struct Pipe {
    rd: std::os::fd::OwnedFd,
    wr: std::os::fd::OwnedFd,
    /// Bytes the pipe holds (at page granularity).
    cap: usize,
}

impl Pipe {
    fn new() -> Option<Pipe> {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: an array of two ints for the new fds.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return None;
        }
        // SAFETY: both fds are new and ours.
        let (rd, wr) =
            unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) };
        // Past /proc/sys/fs/pipe-max-size (1 MiB) only with CAP_SYS_RESOURCE: try smaller then.
        for size in [PIPE_BYTES, PIPE_BYTES / 2] {
            // SAFETY: a valid fd; F_SETPIPE_SZ takes an int.
            let got = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
            if got > 0 {
                return Some(Pipe { rd, wr, cap: got as usize });
            }
        }
        None
    }

    /// Moves a write's payload into the pipe: what the reader has buffered is copied, the rest
    /// spliced from the socket. If the pipe fills up first, falls back to a buffer.
    fn receive(self, c: &Conn<'_>, r: &mut BufReader<&File>, len: usize) -> io::Result<Payload> {
        let sock = sock_of(r).as_raw_fd();
        let pre = r.buffer().len().min(len);
        write_fd(self.wr.as_raw_fd(), &r.buffer()[..pre])?;
        r.consume(pre);
        let mut got = pre;
        while got < len {
            // SAFETY: valid fds, no offsets (a socket and a pipe).
            let n = unsafe {
                libc::splice(
                    sock,
                    std::ptr::null_mut(),
                    self.wr.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - got,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            if n > 0 {
                got += n as usize;
                continue;
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) if ready(self.wr.as_raw_fd(), libc::POLLOUT, 0) => {
                    // The socket has nothing yet: wait for it.
                    ready(sock, libc::POLLIN, -1);
                }
                // The pipe is full (the socket gave small pieces), or this socket cannot splice.
                Some(libc::EAGAIN) | Some(libc::EINVAL) => {
                    let mut data = c.buffer(len);
                    crate::io::read_pipe(self.rd.as_raw_fd(), &mut data[..got])?;
                    c.put_pipe(self);
                    r.read_exact(&mut data[got..len])?;
                    return Ok(Payload::Buf(data));
                }
                _ => return Err(e),
            }
        }
        Ok(Payload::Piped(self))
    }

    fn fd(&self) -> std::os::fd::RawFd {
        self.rd.as_raw_fd()
    }

    /// Empties the pipe (what a failed write left in it).
    fn drain(&mut self) -> io::Result<()> {
        let mut n: libc::c_int = 0;
        // SAFETY: a valid fd and an int out-parameter.
        if unsafe { libc::ioctl(self.rd.as_raw_fd(), libc::FIONREAD, &mut n) } == 0 && n > 0 {
            crate::io::discard_from_pipe(self.rd.as_raw_fd(), n as u64).map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(())
    }
}

fn write_fd(fd: std::os::fd::RawFd, mut b: &[u8]) -> io::Result<()> {
    while !b.is_empty() {
        // SAFETY: a valid fd and a live buffer.
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            b = &b[n as usize..];
        }
    }
    Ok(())
}

/// Whether `fd` is ready for `events` (or has hung up or failed: the next call on it tells)
/// within `timeout` ms (-1: wait for it; a signal also ends the wait).
fn ready(fd: std::os::fd::RawFd, events: libc::c_short, timeout: libc::c_int) -> bool {
    let mut pfd = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout) != 0 }
}

fn sock_of<'a>(r: &BufReader<&'a File>) -> &'a File {
    r.get_ref()
}

/// Fills `b` from a socket with `recv(MSG_WAITALL)` (which may still return early on a signal).
fn recv_all(fd: std::os::fd::RawFd, mut b: &mut [u8]) -> io::Result<()> {
    while !b.is_empty() {
        // SAFETY: a valid fd and a live, exclusively borrowed buffer.
        let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), b.len(), libc::MSG_WAITALL) };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => b = &mut b[n as usize..],
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Bytes the client has sent that we have not read yet.
fn pending(sock: &File) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: a valid socket fd and an int out-parameter.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// Reads a request header; `None` on a clean end of stream between requests.
fn read_request(r: &mut BufReader<&File>) -> io::Result<Option<[u8; REQUEST_LEN]>> {
    let mut h = [0u8; REQUEST_LEN];
    let mut got = 0;
    while got < REQUEST_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if got == 0 && e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(h))
}

/// Serves requests until the client disconnects (NBD_CMD_DISC, end of stream, or a protocol
/// violation that ends the session).
/// `stop` set (the server drains): no further request is started.
pub(super) fn transmit(
    export: &Export,
    sock: &File,
    mut r: BufReader<&File>,
    stop: &std::sync::atomic::AtomicBool,
    tuning: super::Tuning,
) {
    let c = Conn {
        sock,
        export,
        max_workers: tuning.workers,
        inline: tuning.inline,
        splice: tuning.splice,
        waitall: tuning.waitall,
        pool_bytes: tuning.pool_bytes,
        pipes: Mutex::new((Vec::new(), 0)),
        queue: Mutex::new(Queue {
            jobs: VecDeque::new(),
            closed: false,
            workers: 0,
            idle: 0,
            inflight: 0,
            held: 0,
            held_bytes: 0,
            reader_waits: false,
        }),
        work: Condvar::new(),
        room: Condvar::new(),
        out: Mutex::new(Out { pending: VecDeque::new(), pending_bytes: 0, sent: 0, writing: false, broken: false }),
        pool: Mutex::new((Vec::new(), 0)),
    };
    let name = export.handle.name();
    std::thread::scope(|s| {
        if let Err(e) = reader(&c, &mut r, stop, s) {
            match e.kind() {
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                    tracing::debug!("nbd {name}: client went away: {e}")
                }
                _ => tracing::info!("nbd {name}: ending the session: {e}"),
            }
        }
        // In-flight requests still complete and are answered (proto.md "NBD_CMD_DISC": the
        // server MUST handle all outstanding requests), then the workers leave.
        let mut q = lock(&c.queue);
        q.closed = true;
        drop(q);
        c.work.notify_all();
    });
    // The reader's own last replies (the workers have left; blocking is fine now).
    let _ = c.flush(true);
}

/// The reader's side of [`Conn::send`]: never blocks on the socket.
fn reply<'s>(c: &'s Conn<'_>, s: &'s std::thread::Scope<'s, '_>, req: &Request, reply: Reply, flush: bool) {
    if c.send(req, reply, flush, false) {
        c.dispatch(s, Job::WriteOut);
    }
}

fn flush<'s>(c: &'s Conn<'_>, s: &'s std::thread::Scope<'s, '_>) {
    if c.flush(false) {
        c.dispatch(s, Job::WriteOut);
    }
}

fn reader<'s>(
    c: &'s Conn<'_>,
    r: &mut BufReader<&File>,
    stop: &std::sync::atomic::AtomicBool,
    s: &'s std::thread::Scope<'s, '_>,
) -> io::Result<()> {
    let mut spin = Spin::default();
    // The client sends requests before our replies to earlier ones (it keeps several in flight):
    // seen when the next request is already on its way as a spliced write completes, forgotten
    // when we wait for a request with nothing in flight.
    let mut pipelined = false;
    loop {
        if r.buffer().len() < REQUEST_LEN {
            // About to wait for the client: let it have the replies first.
            flush(c, s);
            if r.buffer().is_empty() {
                if pipelined && pending(sock_of(r)) == 0 && lock(&c.queue).inflight == 0 {
                    pipelined = false;
                }
                spin.before(sock_of(r));
            }
        }
        // Draining: requests buffered but not started get no reply (nor do those not yet read).
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let raw = read_request(r)?;
        spin.after();
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let Some(raw) = raw else { return Ok(()) };
        let Some(req) = Request::parse(&raw) else {
            // Nothing after a bad magic can be trusted to be a request boundary.
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad request magic"));
        };
        if req.typ == CMD_DISC {
            tracing::debug!("nbd: NBD_CMD_DISC");
            return Ok(());
        }
        if req.typ == CMD_WRITE && req.len > MAX_PAYLOAD {
            // proto.md "Size constraints": a payload deemed too large may end the session.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("NBD_CMD_WRITE of {} bytes (limit 32 MiB)", req.len),
            ));
        }
        // Wait for room before taking a payload in (or reading further requests): replies not yet
        // written count, so a client that stops reading them stops being read.
        let full =
            |q: &Queue| q.held >= MAX_INFLIGHT || (q.held > 0 && q.held_bytes + io_cost(&req) > MAX_INFLIGHT_BYTES);
        let mut q = lock(&c.queue);
        if full(&q) {
            drop(q);
            flush(c, s);
            q = lock(&c.queue);
            while full(&q) {
                q.reader_waits = true;
                q = c.room.wait(q).unwrap_or_else(|p| p.into_inner());
                q.reader_waits = false;
            }
        }
        q.inflight += 1;
        q.held += 1;
        q.held_bytes += io_cost(&req);
        drop(q);
        let mut data = Vec::new();
        if req.typ == CMD_WRITE {
            let len = req.len as usize;
            if r.buffer().len() < len {
                flush(c, s);
            }
            let pipe = (!pipelined && c.splices(&req, r.buffer().len())).then(|| c.take_pipe()).flatten();
            let received = match pipe {
                Some(p) if len <= p.cap => p.receive(c, r, len),
                other => {
                    if let Some(p) = other {
                        c.put_pipe(p);
                    }
                    c.receive(r, len).map(Payload::Buf)
                }
            };
            match received {
                Err(e) => {
                    // No reply will come.
                    c.done();
                    c.release(1, io_cost(&req));
                    return Err(e);
                }
                Ok(Payload::Buf(d)) => data = d,
                Ok(Payload::Piped(p)) => {
                    let more = r.buffer().len() >= REQUEST_LEN;
                    // A client that has sent its next request before this reply keeps several in
                    // flight: its big writes go to workers from now on, where receiving the next
                    // payload overlaps with writing this one (the pipe would serialize them).
                    pipelined |= more || pending(sock_of(r)) >= REQUEST_LEN;
                    // Right here, unless the device is suspended: then a worker waits for the
                    // resume with it.
                    match c.export.handle.write_from_pipe(req.offset, p.fd(), req.len as u64, false, true) {
                        Err(IoError::WouldBlock) => c.dispatch(s, Job::Piped { req, pipe: p }),
                        res => {
                            reply(c, s, &req, c.piped_reply(&req, p, res), !more);
                            c.done();
                        }
                    }
                    continue;
                }
            }
        }
        // Replies wait while the next request is already here, to go out together.
        let more = r.buffer().len() >= REQUEST_LEN;
        if let Err((err, msg)) = c.check(&req) {
            tracing::debug!("nbd: refusing {req:?}: {} ({msg})", errno_name(err));
            c.recycle(data);
            reply(c, s, &req, c.error_reply(&req, err, msg), !more);
            c.done();
            continue;
        }
        if c.max_workers == 0 {
            // The serial variant (for comparison): everything here, one at a time.
            reply(c, s, &req, c.run(req, data), !more);
            c.done();
            continue;
        }
        // A big write goes to a worker when the client keeps several requests in flight (another
        // one is still running, or the next is already here): its copy into the page cache then
        // overlaps with receiving the next payload. At queue depth 1 the hand-off would only add
        // latency, and reads gain nothing either way (docs/PERFORMANCE.md).
        let big_write = req.typ == CMD_WRITE
            && req.len as usize > c.inline
            && (more || lock(&c.queue).inflight > 1 || pending(sock_of(r)) >= REQUEST_LEN);
        if c.inline == 0 || big_write {
            c.dispatch(s, Job::Request { req, data });
            continue;
        }
        match c.try_inline(req, data) {
            Ok(rep) => {
                reply(c, s, &req, rep, !more);
                c.done();
            }
            Err((req, data)) => c.dispatch(s, Job::Request { req, data }),
        }
    }
}
