//! The IO a target receives: one in-flight request, owned (the kernel's `struct bio` together with
//! the dm core's per-target clone around it; `include/linux/device-mapper.h`, `blk_types.h`).
//!
//! A [`Bio`] carries its operation, its place (a start sector and a length in sectors, on the device
//! it is addressed to), its data, and the stack of what must happen when it completes: the
//! submitter's completion at the bottom, then one frame per device it entered (the pass through
//! that device's suspend gate, its statistics) and one per target whose `end_io` asked to see it.
//! Completing a bio ([`Bio::end`]) unwinds that stack exactly once: it consumes the bio. A bio
//! dropped without being completed completes itself with EIO, so a target that loses one fails the
//! IO instead of hanging its submitter.
//!
//! Data is addressed in whole 512-byte sectors, as the block layer's; a front end that accepts
//! byte offsets reads and writes the partial sectors around a request itself.

use std::any::Any;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use smallvec::SmallVec;

use super::core::{self, Frame, TargetFrame};
use super::{IoError, IoResult};
use crate::dm::pdev::Pdev;
use crate::dm::Sectors;

/// What a bio does, by what it does to the bytes. Everything but a read is of the write
/// direction, as in the kernel (an empty flush is `REQ_OP_WRITE | REQ_PREFLUSH` there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// An empty flush: everything completed before it is durable once it completes.
    Flush,
    Discard,
    WriteZeroes,
}

impl Op {
    pub fn is_write(self) -> bool {
        self != Op::Read
    }
    /// Whether the bio carries data (reads fill it, writes take it).
    pub fn has_data(self) -> bool {
        matches!(self, Op::Read | Op::Write)
    }
}

bitflags::bitflags! {
    /// `REQ_*` modifiers that dmemu honours.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct BioFlags: u8 {
        /// Durable when it completes (`REQ_FUA`).
        const FUA = 1;
        /// Fail with [`IoError::WouldBlock`] rather than wait (`REQ_NOWAIT`): for a suspended
        /// device, data not in memory, or a table with a target that may hold IO.
        const NOWAIT = 2;
    }
}

/// Where a bio's bytes are.
pub(crate) enum Buf {
    None,
    /// Memory the bio does not own: the submitter's (kept until the bio completes: the synchronous
    /// API waits for that) or a parent bio's (kept in its join until every child has completed).
    /// `writable`: the memory may be written (a read's destination).
    Ref {
        ptr: NonNull<u8>,
        len: usize,
        writable: bool,
    },
    Owned(Vec<u8>),
    /// A write's payload waiting in a pipe: taken off in order, as the bio's pieces are written.
    Pipe {
        fd: RawFd,
        len: u64,
    },
}

// SAFETY: `Ref` points at memory that outlives the bio (see above) and is reached only through the
// bio, which is used by one thread at a time.
unsafe impl Send for Buf {}

impl Buf {
    fn len(&self) -> u64 {
        match self {
            Buf::None => 0,
            Buf::Ref { len, .. } => *len as u64,
            Buf::Owned(v) => v.len() as u64,
            Buf::Pipe { len, .. } => *len,
        }
    }

    /// `n` bytes at `at` of this buffer, for a child bio. Pipes are taken in order: a child of a
    /// piped bio is the next `n` bytes in the pipe.
    fn slice(&mut self, at: u64, n: u64) -> Buf {
        match self {
            Buf::None => Buf::None,
            Buf::Ref { ptr, writable, .. } => Buf::Ref {
                // SAFETY: `at + n` lies within the referenced memory (the caller checks ranges).
                ptr: unsafe { NonNull::new_unchecked(ptr.as_ptr().add(at as usize)) },
                len: n as usize,
                writable: *writable,
            },
            Buf::Owned(v) => Buf::Ref {
                // SAFETY: as above; the vector's heap block stays where it is while the parent
                // waits in its join.
                ptr: unsafe { NonNull::new_unchecked(v.as_mut_ptr().add(at as usize)) },
                len: n as usize,
                writable: true,
            },
            Buf::Pipe { fd, .. } => Buf::Pipe { fd: *fd, len: n },
        }
    }
}

/// Per-target data carried from `map` to `end_io` (the kernel's `per_io_data_size`).
pub type Private = Box<dyn Any + Send>;

pub(crate) struct Inner {
    pub(crate) op: Op,
    pub(crate) flags: BioFlags,
    /// First sector, on the device the bio is addressed to; relative to the target's start while a
    /// target maps it.
    pub(crate) sector: u64,
    /// Length in sectors (0 for an empty flush).
    pub(crate) sectors: u64,
    pub(crate) buf: Buf,
    /// Where a remapped bio goes next.
    pub(crate) dev: Option<Arc<Pdev>>,
    pub(crate) private: Option<Private>,
    pub(crate) clone_index: u32,
    pub(crate) frames: SmallVec<[Frame; 3]>,
    /// While a target's `end_io` runs: that target's frame, to put back if the target keeps the
    /// bio and submits it again (the kernel's clone keeps its `bi_end_io` across a retry).
    pub(crate) reentry: Option<TargetFrame>,
}

/// One in-flight request. See the module documentation.
pub struct Bio(pub(crate) Box<Inner>);

impl Bio {
    pub(crate) fn new(op: Op, flags: BioFlags, sector: u64, sectors: u64, buf: Buf, bottom: Frame) -> Self {
        let mut frames = SmallVec::new();
        frames.push(bottom);
        Bio(Box::new(Inner {
            op,
            flags,
            sector,
            sectors,
            buf,
            dev: None,
            private: None,
            clone_index: 0,
            frames,
            reentry: None,
        }))
    }

    pub fn op(&self) -> Op {
        self.0.op
    }
    pub fn flags(&self) -> BioFlags {
        self.0.flags
    }
    pub fn set_flags(&mut self, f: BioFlags) {
        self.0.flags = f;
    }
    /// First sector: relative to the target's start inside `map`, on the device it was remapped to
    /// in `end_io`.
    pub fn sector(&self) -> Sectors {
        Sectors(self.0.sector)
    }
    pub fn sectors(&self) -> Sectors {
        Sectors(self.0.sectors)
    }
    /// Length in bytes.
    pub fn bytes(&self) -> u64 {
        self.0.sectors * Sectors::SIZE
    }
    /// The device a remapped bio goes to (set by [`Bio::remap`]).
    pub fn device(&self) -> Option<&Arc<Pdev>> {
        self.0.dev.as_ref()
    }

    /// Points the bio at `sector` of `dev` (the kernel's `bio_set_dev` and `bi_sector`): what a
    /// target does before returning [`crate::dm::target::Map::Remapped`].
    pub fn remap(&mut self, dev: &Arc<Pdev>, sector: Sectors) {
        self.0.dev = Some(dev.clone());
        self.0.sector = sector.0;
    }

    /// Remaps to `sector` of `dev` if the bio's bytes there have an address (below 2^64);
    /// `None` leaves the bio as it was. Sector arithmetic is checked, never wrapping.
    pub fn remap_at(&mut self, dev: &Arc<Pdev>, sector: u64) -> Option<()> {
        sector.checked_add(self.0.sectors)?.checked_mul(Sectors::SIZE)?;
        self.remap(dev, Sectors(sector));
        Some(())
    }

    /// Remaps to `base + sector()` of `dev` (a linear mapping), checked as [`Bio::remap_at`].
    pub fn remap_offset(&mut self, dev: &Arc<Pdev>, base: Sectors) -> Option<()> {
        self.remap_at(dev, base.0.checked_add(self.0.sector)?)
    }

    /// Which of a target's duplicate bios this is (`dm_bio_get_target_bio_nr`): flushes go out
    /// `num_flush_bios` times, numbered from 0.
    pub fn clone_index(&self) -> u32 {
        self.0.clone_index
    }

    /// The data a write carries, if it is in memory (see [`Bio::materialize`] for a piped payload).
    pub fn data(&self) -> Option<&[u8]> {
        match &self.0.buf {
            // SAFETY: see `Buf::Ref`.
            Buf::Ref { ptr, len, .. } => Some(unsafe { std::slice::from_raw_parts(ptr.as_ptr(), *len) }),
            Buf::Owned(v) => Some(v),
            Buf::None | Buf::Pipe { .. } => None,
        }
    }

    /// A read's destination (or data the bio owns), to fill or change; `None` for a write's
    /// borrowed data, which is the submitter's and must not change (take [`Bio::own_data`]).
    pub fn data_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.0.buf {
            // SAFETY: see `Buf::Ref`; writable memory is the bio's alone while it is in flight.
            Buf::Ref { ptr, len, writable: true } => {
                Some(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), *len) })
            }
            Buf::Owned(v) => Some(v),
            _ => None,
        }
    }

    /// A write's data as the bio's own copy, to change without touching the submitter's (flakey's
    /// corrupted clone, crypt's ciphertext). A piped payload is read off its pipe.
    pub fn own_data(&mut self) -> IoResult<&mut Vec<u8>> {
        let owned = match &mut self.0.buf {
            Buf::Owned(_) => None,
            Buf::None => Some(Vec::new()),
            Buf::Ref { ptr, len, .. } => {
                // SAFETY: see `Buf::Ref`.
                Some(unsafe { std::slice::from_raw_parts(ptr.as_ptr(), *len) }.to_vec())
            }
            Buf::Pipe { fd, len } => {
                let mut v = vec![0u8; *len as usize];
                super::leaf::read_pipe(*fd, &mut v).map_err(IoError::from)?;
                Some(v)
            }
        };
        if let Some(v) = owned {
            self.0.buf = Buf::Owned(v);
        }
        match &mut self.0.buf {
            Buf::Owned(v) => Ok(v),
            _ => unreachable!("just made owned"),
        }
    }

    /// Takes a piped payload off its pipe into memory, so the bio can wait or be copied; a bio
    /// with its data in memory is left as it is.
    pub fn materialize(&mut self) -> IoResult {
        if matches!(self.0.buf, Buf::Pipe { .. }) {
            self.own_data()?;
        }
        Ok(())
    }

    pub(crate) fn is_piped(&self) -> bool {
        matches!(self.0.buf, Buf::Pipe { .. })
    }

    /// Completes the bio as the `zero` target does: a read reads zeroes; a write is swallowed (a
    /// piped payload is still taken off its pipe).
    pub fn zero_fill(&mut self) -> IoResult {
        match &mut self.0.buf {
            Buf::Pipe { fd, len } => super::leaf::discard_from_pipe(*fd, *len),
            _ if self.0.op == Op::Read => {
                if let Some(d) = self.data_mut() {
                    d.fill(0);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Per-target data for `end_io`.
    pub fn set_private(&mut self, p: Private) {
        self.0.private = Some(p);
    }
    pub fn take_private(&mut self) -> Option<Private> {
        self.0.private.take()
    }

    /// Ends the bio with `result` (the kernel's `bio_endio`): its completion stack unwinds from
    /// the top, through every `end_io` and device it passed, to its submitter.
    pub fn end(self, result: IoResult) {
        core::complete(self, result)
    }

    /// A bio of `sectors` sectors from `offset` sectors into this one, sharing its data, that
    /// completes into `join`. The parent must wait in the join until every child has completed.
    pub(crate) fn child(&mut self, offset: u64, sectors: u64, bottom: Frame) -> Bio {
        let (at, n) = if self.0.op.has_data() { (offset * Sectors::SIZE, sectors * Sectors::SIZE) } else { (0, 0) };
        debug_assert!(at + n <= self.0.buf.len());
        let buf = self.0.buf.slice(at, n);
        Bio::new(self.0.op, self.0.flags, self.0.sector + offset, sectors, buf, bottom)
    }

    /// Gives up an owned buffer (what the asynchronous API hands back).
    pub fn take_buffer(&mut self) -> Option<Vec<u8>> {
        match std::mem::replace(&mut self.0.buf, Buf::None) {
            Buf::Owned(v) => Some(v),
            other => {
                self.0.buf = other;
                None
            }
        }
    }
}

impl Drop for Bio {
    fn drop(&mut self) {
        if !self.0.frames.is_empty() {
            // Lost without completing: fail it, so its submitter hears back exactly once.
            let inner = std::mem::replace(
                &mut self.0,
                Box::new(Inner {
                    op: Op::Read,
                    flags: BioFlags::empty(),
                    sector: 0,
                    sectors: 0,
                    buf: Buf::None,
                    dev: None,
                    private: None,
                    clone_index: 0,
                    frames: SmallVec::new(),
                    reentry: None,
                }),
            );
            tracing::warn!("a bio was dropped without completing; failing it with EIO");
            core::complete(Bio(inner), Err(IoError::Failed));
        }
    }
}

impl std::fmt::Debug for Bio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bio({:?} {:?} {}+{})", self.0.op, self.0.flags, self.0.sector, self.0.sectors)
    }
}

/// A bio for unit tests of targets: nobody waits for it.
#[cfg(test)]
pub(crate) fn test_bio(op: Op, sector: u64, sectors: u64) -> Bio {
    let buf = if op.has_data() { Buf::Owned(vec![0; (sectors * Sectors::SIZE) as usize]) } else { Buf::None };
    Bio::new(op, BioFlags::empty(), sector, sectors, buf, Frame::Submitter(core::Completion::Call(Box::new(|_, _| {}))))
}
