//! The typed commands both wire forms decode into, and the typed replies they encode from.
//! Nothing here knows about bytes or plists (the wire never reaches the engine).

use super::types::{DevKey, DevNum, DmName, DmUuid, Geometry, Sectors, StatusType};

/// One target line of a table load, before its constructor has run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    pub start: Sectors,
    pub length: Sectors,
    pub target_type: String,
    /// The raw parameter string (split into words by the engine, linux-dm-abi.md §2.8).
    pub params: String,
}

/// What DM_DEV_RENAME sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RenameTo {
    Name(DmName),
    Uuid(DmUuid),
}

/// Suspend options (DM_DEV_SUSPEND with DM_SUSPEND_FLAG, or the suspend half of a resume).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SuspendOpts {
    pub noflush: bool,
    pub skip_lockfs: bool,
}

/// Every device-mapper operation, one variant per Linux command (linux-dm-abi.md §1.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Version,
    RemoveAll {
        deferred: bool,
    },
    /// Lists devices whose name and uuid bytes start with the given prefixes (empty = all).
    ListDevices {
        name_prefix: Vec<u8>,
        uuid_prefix: Vec<u8>,
        with_uuid: bool,
    },
    DevCreate {
        name: DmName,
        uuid: Option<DmUuid>,
        minor: Option<u32>,
    },
    DevRemove {
        key: DevKey,
        deferred: bool,
    },
    /// Rename locates the device by name only (linux-dm-abi.md §2.4).
    DevRename {
        /// Name bytes, without the NUL.
        name: Vec<u8>,
        to: RenameTo,
    },
    DevSuspend {
        key: DevKey,
        opts: SuspendOpts,
    },
    DevResume {
        key: DevKey,
        opts: SuspendOpts,
    },
    DevStatus {
        key: DevKey,
    },
    /// Wait until the device's event counter differs from `event_nr`, then report table status.
    /// The engine never blocks: the server checks [`crate::dm::Engine::event_nr`] and waits itself.
    DevWait {
        key: DevKey,
        event_nr: u32,
        status: StatusType,
        noflush: bool,
    },
    TableLoad {
        key: DevKey,
        targets: Vec<TargetSpec>,
        read_only: bool,
    },
    TableClear {
        key: DevKey,
    },
    TableDeps {
        key: DevKey,
    },
    TableStatus {
        key: DevKey,
        status: StatusType,
        noflush: bool,
    },
    ListVersions,
    TargetMsg {
        key: DevKey,
        sector: Sectors,
        message: String,
    },
    SetGeometry {
        key: DevKey,
        geometry: Geometry,
    },
    ArmPoll,
    GetTargetVersion {
        name: String,
    },
}

impl Command {
    /// The device a command names, if it names one by key.
    pub fn key(&self) -> Option<&DevKey> {
        match self {
            Command::DevRemove { key, .. }
            | Command::DevSuspend { key, .. }
            | Command::DevResume { key, .. }
            | Command::DevStatus { key }
            | Command::DevWait { key, .. }
            | Command::TableLoad { key, .. }
            | Command::TableClear { key }
            | Command::TableDeps { key }
            | Command::TableStatus { key, .. }
            | Command::TargetMsg { key, .. }
            | Command::SetGeometry { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Commands that change state; the server refuses them to unprivileged peers.
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Command::RemoveAll { .. }
                | Command::DevCreate { .. }
                | Command::DevRemove { .. }
                | Command::DevRename { .. }
                | Command::DevSuspend { .. }
                | Command::DevResume { .. }
                | Command::TableLoad { .. }
                | Command::TableClear { .. }
                | Command::TargetMsg { .. }
                | Command::SetGeometry { .. }
        )
    }
}

/// A command plus the options that shape every device reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    /// DM_QUERY_INACTIVE_TABLE_FLAG: report on the inactive table (linux-dm-abi.md §2.3).
    pub query_inactive: bool,
}

impl Request {
    pub fn new(command: Command) -> Self {
        Self { command, query_inactive: false }
    }
}

/// The device state every device reply carries (the kernel's `__dev_status`, linux-dm-abi.md §2.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevInfo {
    pub name: DmName,
    pub uuid: Option<DmUuid>,
    pub dev: DevNum,
    pub open_count: i32,
    pub event_nr: u32,
    /// Targets of the live table, or of the inactive one when queried.
    pub target_count: u32,
    pub suspended: bool,
    /// Live disk read-only, or the inactive table's mode when queried.
    pub read_only: bool,
    pub active_present: bool,
    pub inactive_present: bool,
    pub deferred_remove: bool,
}

/// One entry of LIST_DEVICES.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameEntry {
    pub dev: DevNum,
    pub name: DmName,
    pub event_nr: u32,
    pub uuid: Option<DmUuid>,
}

/// One target's line in TABLE_STATUS / DEV_WAIT output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetStatus {
    pub start: Sectors,
    pub length: Sectors,
    pub target_type: String,
    pub text: String,
}

/// A registered target type and its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetVersion {
    pub name: String,
    pub version: [u32; 3],
}

/// What a successful command produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// DM_VERSION: nothing beyond the version the codec writes.
    Version,
    /// REMOVE_ALL and SET_GEOMETRY: the kernel copies nothing back but `version` (`data_size = 0`).
    Nothing,
    /// A header-only device reply: create, suspend, resume, status, load, clear.
    Device(DevInfo),
    /// DM_DEV_RENAME: status fill, but the header keeps the name/uuid the caller sent.
    Renamed(DevInfo),
    /// DM_DEV_REMOVE: name/uuid from the lookup; everything else echoes the input.
    /// `deferred` is true when the device was open and is now marked for removal on last close.
    Removed {
        name: DmName,
        uuid: Option<DmUuid>,
        deferred: bool,
    },
    DeviceList(Vec<NameEntry>),
    /// TABLE_DEPS: `None` when the chosen table is absent.
    Deps(DevInfo, Option<Vec<DevNum>>),
    /// TABLE_STATUS and DEV_WAIT: `None` when the chosen table is absent.
    Status(DevInfo, Option<Vec<TargetStatus>>),
    Versions(Vec<TargetVersion>),
    /// GET_TARGET_VERSION: one record.
    TargetVersion(TargetVersion),
    /// TARGET_MSG: `Some(text)` when the target reported output (DM_DATA_OUT_FLAG).
    Message(DevInfo, Option<String>),
    /// TARGET_MSG to a device with no live table: the ioctl returns +2 and copies nothing
    /// (linux-dm-abi.md §2.7).
    MessageNoTable,
    /// DM_DEV_ARM_POLL: the header comes back unchanged.
    ArmPoll,
}
