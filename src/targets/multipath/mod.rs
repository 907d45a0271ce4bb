//! `multipath` 1.15.0 (linux-dm-abi.md §4, the kernel's `dm-mpath.c`, seed 004's hardware-handler
//! hooks). Being written.

pub mod handler;
pub mod selector;

use std::sync::Arc;

use crate::dm::pdev::Pdev;
use crate::dm::target::{Map, Target};
use crate::dm::{Sectors, StatusType};
use crate::io::Bio;

/// A multipath table's target (placeholder while it is written).
pub struct Multipath {
    probe: ProbeHandle,
}

/// What `DM_MPATH_PROBE_PATHS` runs, outside the engine's lock (linux-dm-abi.md §4.6).
#[derive(Clone)]
pub struct ProbeHandle(Arc<()>);

impl ProbeHandle {
    /// Reads the first block of every active path of the current group, failing the paths that
    /// error; `Err(errno)`: ENOTCONN when no usable path is left. Blocks while it reads.
    pub fn probe(&self) -> Result<(), i32> {
        let _ = &self.0;
        Err(libc::ENOTCONN)
    }
}

impl Multipath {
    /// The handle `DM_MPATH_PROBE_PATHS` uses once the engine's lock is released.
    pub fn probe_handle(&self) -> ProbeHandle {
        self.probe.clone()
    }
}

impl Target for Multipath {
    fn status(&self, _kind: StatusType, _noflush: bool) -> String {
        String::new()
    }
    fn iterate_devices(&self, _len: Sectors, _f: &mut dyn FnMut(&Arc<Pdev>, Sectors, Sectors)) {}
    fn map(&self, bio: Bio) -> Map {
        Map::Kill(bio)
    }
}
