//! The C layouts of `include/uapi/linux/dm-ioctl.h` (linux-dm-abi.md §1), declared once with
//! compile-time size and offset checks. Every byte offset the codec uses comes from here.
//!
//! The wire is native-endian: the shim and the daemon run on the same host (docs/control-socket.md).
//! All structs are read and written by copy (`read_from_bytes` / `as_bytes`), so the alignment of the
//! caller's buffer never matters.

use core::mem::{align_of, offset_of, size_of};

use bitflags::bitflags;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `_IOC_TYPE` of every DM control ioctl.
pub const DM_IOCTL_TYPE: u8 = 0xfd;

/// The interface version dmemu advertises and writes back into every request (§2.1 step 3).
pub const DM_VERSION_MAJOR: u32 = 4;
pub const DM_VERSION_MINOR: u32 = 48;
pub const DM_VERSION_PATCHLEVEL: u32 = 0;
pub const DM_VERSION: [u32; 3] = [DM_VERSION_MAJOR, DM_VERSION_MINOR, DM_VERSION_PATCHLEVEL];

/// `DM_NAME_LEN`: 127 characters + NUL.
pub const DM_NAME_LEN: usize = 128;
/// `DM_UUID_LEN`: 128 characters + NUL.
pub const DM_UUID_LEN: usize = 129;
/// `DM_MAX_TYPE_NAME`: size of `dm_target_spec.target_type`.
pub const DM_MAX_TYPE_NAME: usize = 16;

/// The kernel rejects `data_size > DM_MAX_TARGETS * DM_MAX_TARGET_PARAMS` = 1 GiB (§1.1).
pub const DM_MAX_DATA_SIZE: u32 = 1 << 30;
/// More targets than this in a load is `EOVERFLOW` (§1.1).
pub const DM_MAX_TARGETS: u32 = 1_048_576;
const _: () = assert!(DM_MAX_TARGETS as usize == crate::dm::types::MAX_TARGETS);

/// `offsetof(struct dm_ioctl, data)`: the minimum `data_size`, the header the no-params commands
/// use, and the `data_size` of every header-only reply.
pub const DM_IOCTL_MIN_SIZE: usize = offset_of!(DmIoctl, data);
/// `sizeof(struct dm_ioctl)`: where output payloads start (the reply's `data_start`) and the
/// lowest `data_start` a table load accepts.
pub const DM_IOCTL_SIZE: usize = size_of::<DmIoctl>();
/// The `version` field the kernel writes back on every DM ioctl, success or not.
pub const DM_VERSION_BYTES: usize = size_of::<[u32; 3]>();

/// Payload records are 8-aligned (the kernel's `align_ptr`).
pub const DM_ALIGN: usize = 8;

/// `dm_name_list` trailer flags (only with `DM_UUID_FLAG` in the request).
pub const DM_NAME_LIST_FLAG_HAS_UUID: u32 = 1;
pub const DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID: u32 = 2;

/// `struct dm_ioctl` (312 bytes, align 8; §1.2).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DmIoctl {
    pub version: [u32; 3],
    /// In: total buffer size including this header. Out: bytes of valid output.
    pub data_size: u32,
    /// Offset of the payload from the start of this struct.
    pub data_start: u32,
    pub target_count: u32,
    pub open_count: i32,
    /// See [`DmFlags`].
    pub flags: u32,
    /// In: event to wait for (DEV_WAIT) or udev cookie. Out: the device's event counter.
    pub event_nr: u32,
    pub padding: u32,
    /// Huge-encoded dev_t (§1.7).
    pub dev: u64,
    pub name: [u8; DM_NAME_LEN],
    pub uuid: [u8; DM_UUID_LEN],
    pub data: [u8; 7],
}

impl DmIoctl {
    /// The flags with unknown bits kept (libdm relies on its private bit 2 being echoed: §2.1).
    pub fn flags(&self) -> DmFlags {
        DmFlags::from_bits_retain(self.flags)
    }
    pub fn set_flags(&mut self, flags: DmFlags) {
        self.flags = flags.bits();
    }
}

const _: () = {
    assert!(offset_of!(DmIoctl, version) == 0);
    assert!(offset_of!(DmIoctl, data_size) == 12);
    assert!(offset_of!(DmIoctl, data_start) == 16);
    assert!(offset_of!(DmIoctl, target_count) == 20);
    assert!(offset_of!(DmIoctl, open_count) == 24);
    assert!(offset_of!(DmIoctl, flags) == 28);
    assert!(offset_of!(DmIoctl, event_nr) == 32);
    assert!(offset_of!(DmIoctl, padding) == 36);
    assert!(offset_of!(DmIoctl, dev) == 40);
    assert!(offset_of!(DmIoctl, name) == 48);
    assert!(offset_of!(DmIoctl, uuid) == 176);
    assert!(offset_of!(DmIoctl, data) == 305);
    assert!(size_of::<DmIoctl>() == 312);
    assert!(align_of::<DmIoctl>() == 8);
    assert!(DM_IOCTL_MIN_SIZE == 305 && DM_IOCTL_SIZE == 312 && DM_VERSION_BYTES == 12);
};

/// `struct dm_target_spec` (40 bytes, align 8; §1.3). The NUL-terminated parameter string follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DmTargetSpec {
    pub sector_start: u64,
    pub length: u64,
    /// Written as 0 on output, ignored on input.
    pub status: i32,
    /// Load: offset of the next spec from this one. Status: offset of the next spec from the first
    /// spec (§2.5, §2.6).
    pub next: u32,
    pub target_type: [u8; DM_MAX_TYPE_NAME],
}

/// Where a spec's parameter string starts, relative to the spec.
pub const DM_TARGET_SPEC_SIZE: usize = size_of::<DmTargetSpec>();
/// `dm_target_spec` requires 8-byte alignment: a load's `next` must be a multiple of this.
pub const DM_TARGET_SPEC_ALIGN: usize = align_of::<DmTargetSpec>();

const _: () = {
    assert!(offset_of!(DmTargetSpec, sector_start) == 0);
    assert!(offset_of!(DmTargetSpec, length) == 8);
    assert!(offset_of!(DmTargetSpec, status) == 16);
    assert!(offset_of!(DmTargetSpec, next) == 20);
    assert!(offset_of!(DmTargetSpec, target_type) == 24);
    assert!(DM_TARGET_SPEC_SIZE == 40);
    assert!(DM_TARGET_SPEC_ALIGN == 8);
};

/// `struct dm_target_deps` header (8 bytes); `u64 dev[count]` follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DmTargetDeps {
    pub count: u32,
    /// Not written by the kernel: the caller's bytes are echoed (§2.4 TABLE_DEPS).
    pub padding: u32,
}

/// Where `dev[]` starts in `dm_target_deps`.
pub const DM_TARGET_DEPS_DEV_OFFSET: usize = size_of::<DmTargetDeps>();

const _: () = {
    assert!(offset_of!(DmTargetDeps, count) == 0);
    assert!(offset_of!(DmTargetDeps, padding) == 4);
    assert!(DM_TARGET_DEPS_DEV_OFFSET == 8);
};

/// `struct dm_name_list` up to its name. The C struct is 16 bytes on x86_64 but 12 on i386, so the
/// kernel uses `offsetof(name)` = 12 everywhere (§1.3); `packed(4)` declares exactly that.
#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DmNameList {
    pub dev: u64,
    /// Offset from this record to the next; 0 on the last.
    pub next: u32,
}

/// Where the NUL-terminated name starts in a `dm_name_list` record.
pub const DM_NAME_LIST_NAME_OFFSET: usize = size_of::<DmNameList>();

/// What follows a `dm_name_list` name, at the next 8-aligned offset (ioctl ≥ 4.37); with
/// `DM_NAME_LIST_FLAG_HAS_UUID` the NUL-terminated uuid follows right after.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DmNameListTrailer {
    pub event_nr: u32,
    pub flags: u32,
}

pub const DM_NAME_LIST_TRAILER_SIZE: usize = size_of::<DmNameListTrailer>();

const _: () = {
    assert!(offset_of!(DmNameList, dev) == 0);
    assert!(offset_of!(DmNameList, next) == 8);
    assert!(DM_NAME_LIST_NAME_OFFSET == 12);
    assert!(offset_of!(DmNameListTrailer, flags) == 4);
    assert!(DM_NAME_LIST_TRAILER_SIZE == 8);
};

/// `struct dm_target_versions` up to its name (16 bytes, align 4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DmTargetVersions {
    /// Offset from this record to the next; 0 on the last.
    pub next: u32,
    pub version: [u32; 3],
}

/// Where the NUL-terminated type name starts in a `dm_target_versions` record.
pub const DM_TARGET_VERSIONS_NAME_OFFSET: usize = size_of::<DmTargetVersions>();

const _: () = {
    assert!(offset_of!(DmTargetVersions, next) == 0);
    assert!(offset_of!(DmTargetVersions, version) == 4);
    assert!(DM_TARGET_VERSIONS_NAME_OFFSET == 16);
    assert!(align_of::<DmTargetVersions>() == 4);
};

/// `struct dm_target_msg` up to its message (8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DmTargetMsg {
    pub sector: u64,
}

/// Where the NUL-terminated message starts in `dm_target_msg`.
pub const DM_TARGET_MSG_MESSAGE_OFFSET: usize = size_of::<DmTargetMsg>();

const _: () = assert!(DM_TARGET_MSG_MESSAGE_OFFSET == 8);

bitflags! {
    /// `dm_ioctl.flags` (§1.6). Always build with [`DmFlags::from_bits_retain`]: unknown bits
    /// (libdm's [`DmFlags::EXISTS`] among them) must come back exactly as sent.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct DmFlags: u32 {
        /// In: load the table read-only. Out: disk (or queried inactive table) is read-only.
        const READONLY = 1 << 0;
        /// In (DEV_SUSPEND): suspend; absent = resume. Out: device suspended.
        const SUSPEND = 1 << 1;
        /// Not a kernel flag: libdm's private `DM_EXISTS_FLAG`, set on every request and read back
        /// as "device exists". The kernel never touches it, so neither does dmemu.
        const EXISTS = 1 << 2;
        /// In (DEV_CREATE): take the minor from `dev`.
        const PERSISTENT_DEV = 1 << 3;
        /// In: TABLE_STATUS / DEV_WAIT return table lines instead of status.
        const STATUS_TABLE = 1 << 4;
        /// Out: a live table exists.
        const ACTIVE_PRESENT = 1 << 5;
        /// Out: an inactive (loaded, not resumed) table exists.
        const INACTIVE_PRESENT = 1 << 6;
        /// Out: the output did not fit; retry with a bigger buffer.
        const BUFFER_FULL = 1 << 8;
        /// In: ignored nowadays.
        const SKIP_BDGET = 1 << 9;
        /// In: do not freeze the filesystem on suspend.
        const SKIP_LOCKFS = 1 << 10;
        /// In: suspend without flushing; also a hint to targets' status.
        const NOFLUSH = 1 << 11;
        /// In: report on the inactive table.
        const QUERY_INACTIVE_TABLE = 1 << 12;
        /// Out: a uevent was emitted. dmemu never sets it (interposition.md §1.1 item 10).
        const UEVENT_GENERATED = 1 << 13;
        /// In: RENAME sets the uuid; LIST_DEVICES includes uuids.
        const UUID = 1 << 14;
        /// In: wipe the caller's buffer after copying it in.
        const SECURE_DATA = 1 << 15;
        /// Out: TARGET_MSG produced output text.
        const DATA_OUT = 1 << 16;
        /// In (REMOVE, REMOVE_ALL): defer removal of an open device. Out: removal is pending.
        const DEFERRED_REMOVE = 1 << 17;
        /// Out: device suspended internally.
        const INTERNAL_SUSPEND = 1 << 18;
        /// In: TABLE_STATUS returns the IMA measurement string.
        const IMA_MEASUREMENT = 1 << 19;
    }
}

impl DmFlags {
    /// Bits `validate_params` clears from every request before the handler runs (§2.1 step 6).
    pub const INPUT_CLEARED: DmFlags =
        DmFlags::BUFFER_FULL.union(DmFlags::UEVENT_GENERATED).union(DmFlags::SECURE_DATA).union(DmFlags::DATA_OUT);
}

/// The DM control commands (`_IOC_NR` of the request; §1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DmCmd {
    Version = 0,
    RemoveAll = 1,
    ListDevices = 2,
    DevCreate = 3,
    DevRemove = 4,
    DevRename = 5,
    DevSuspend = 6,
    DevStatus = 7,
    DevWait = 8,
    TableLoad = 9,
    TableClear = 10,
    TableDeps = 11,
    TableStatus = 12,
    ListVersions = 13,
    TargetMsg = 14,
    DevSetGeometry = 15,
    DevArmPoll = 16,
    GetTargetVersion = 17,
}

/// `_IO(0xfd, 18)`: a block-device ioctl on multipath devices, never served by the control node.
pub const DM_MPATH_PROBE_PATHS: u64 = ((DM_IOCTL_TYPE as u64) << 8) | 18;

/// `_IOWR(0xfd, nr, struct dm_ioctl)` = `0xc138fd00 | nr`.
pub const fn dm_ioctl_request(nr: u8) -> u64 {
    const IOC_READ_WRITE: u64 = 3 << 30;
    IOC_READ_WRITE | ((DM_IOCTL_SIZE as u64) << 16) | ((DM_IOCTL_TYPE as u64) << 8) | nr as u64
}

const _: () = assert!(dm_ioctl_request(9) == 0xc138_fd09);

/// `_IOC_TYPE(request)`. The kernel checks only type and nr, never direction or size (§1.4).
pub const fn ioc_type(request: u64) -> u8 {
    (request >> 8) as u8
}

/// `_IOC_NR(request)`.
pub const fn ioc_nr(request: u64) -> u8 {
    request as u8
}

impl DmCmd {
    pub const ALL: [DmCmd; 18] = [
        DmCmd::Version,
        DmCmd::RemoveAll,
        DmCmd::ListDevices,
        DmCmd::DevCreate,
        DmCmd::DevRemove,
        DmCmd::DevRename,
        DmCmd::DevSuspend,
        DmCmd::DevStatus,
        DmCmd::DevWait,
        DmCmd::TableLoad,
        DmCmd::TableClear,
        DmCmd::TableDeps,
        DmCmd::TableStatus,
        DmCmd::ListVersions,
        DmCmd::TargetMsg,
        DmCmd::DevSetGeometry,
        DmCmd::DevArmPoll,
        DmCmd::GetTargetVersion,
    ];

    pub fn from_nr(nr: u8) -> Option<Self> {
        Self::ALL.get(usize::from(nr)).copied()
    }

    pub const fn nr(self) -> u8 {
        self as u8
    }

    /// The request code libdm passes to `ioctl()`.
    pub const fn request(self) -> u64 {
        dm_ioctl_request(self as u8)
    }

    /// The kernel's name for the command, for logs.
    pub const fn name(self) -> &'static str {
        match self {
            DmCmd::Version => "DM_VERSION",
            DmCmd::RemoveAll => "DM_REMOVE_ALL",
            DmCmd::ListDevices => "DM_LIST_DEVICES",
            DmCmd::DevCreate => "DM_DEV_CREATE",
            DmCmd::DevRemove => "DM_DEV_REMOVE",
            DmCmd::DevRename => "DM_DEV_RENAME",
            DmCmd::DevSuspend => "DM_DEV_SUSPEND",
            DmCmd::DevStatus => "DM_DEV_STATUS",
            DmCmd::DevWait => "DM_DEV_WAIT",
            DmCmd::TableLoad => "DM_TABLE_LOAD",
            DmCmd::TableClear => "DM_TABLE_CLEAR",
            DmCmd::TableDeps => "DM_TABLE_DEPS",
            DmCmd::TableStatus => "DM_TABLE_STATUS",
            DmCmd::ListVersions => "DM_LIST_VERSIONS",
            DmCmd::TargetMsg => "DM_TARGET_MSG",
            DmCmd::DevSetGeometry => "DM_DEV_SET_GEOMETRY",
            DmCmd::DevArmPoll => "DM_DEV_ARM_POLL",
            DmCmd::GetTargetVersion => "DM_GET_TARGET_VERSION",
        }
    }

    /// `IOCTL_FLAGS_NO_PARAMS`: only the 305-byte header is read and the handler sees a 305-byte
    /// buffer (§2.1 step 5).
    pub const fn no_params(self) -> bool {
        matches!(
            self,
            DmCmd::RemoveAll
                | DmCmd::DevCreate
                | DmCmd::DevRemove
                | DmCmd::DevSuspend
                | DmCmd::DevStatus
                | DmCmd::TableClear
                | DmCmd::DevArmPoll
        )
    }

    /// `validate_params` stops after clearing the input-only flags: no name/uuid checks and no
    /// forced termination (§2.1 step 6).
    pub const fn ignores_params(self) -> bool {
        matches!(self, DmCmd::RemoveAll | DmCmd::ListDevices | DmCmd::ListVersions)
    }

    /// Commands whose reply can carry a payload after offset 312 (built on the caller's buffer).
    pub const fn has_payload(self) -> bool {
        matches!(
            self,
            DmCmd::ListDevices
                | DmCmd::DevWait
                | DmCmd::TableDeps
                | DmCmd::TableStatus
                | DmCmd::ListVersions
                | DmCmd::TargetMsg
                | DmCmd::GetTargetVersion
        )
    }
}

impl std::fmt::Display for DmCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Rounds an offset up to [`DM_ALIGN`], saturating instead of wrapping.
pub const fn align8(n: usize) -> usize {
    match n.checked_add(DM_ALIGN - 1) {
        Some(m) => m & !(DM_ALIGN - 1),
        None => usize::MAX & !(DM_ALIGN - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_codes_match_the_table() {
        assert_eq!(DmCmd::Version.request(), 0xc138_fd00);
        assert_eq!(DmCmd::TargetMsg.request(), 0xc138_fd0e);
        assert_eq!(DmCmd::GetTargetVersion.request(), 0xc138_fd11);
        assert_eq!(DM_MPATH_PROBE_PATHS, 0xfd12);
        for (i, cmd) in DmCmd::ALL.iter().enumerate() {
            assert_eq!(usize::from(cmd.nr()), i);
            assert_eq!(DmCmd::from_nr(cmd.nr()), Some(*cmd));
            assert_eq!(ioc_nr(cmd.request()), cmd.nr());
            assert_eq!(ioc_type(cmd.request()), DM_IOCTL_TYPE);
        }
        assert_eq!(DmCmd::from_nr(18), None);
    }

    #[test]
    fn flags_match_the_table_and_keep_unknown_bits() {
        assert_eq!(DmFlags::EXISTS.bits(), 0x4);
        assert_eq!(DmFlags::BUFFER_FULL.bits(), 0x100);
        assert_eq!(DmFlags::UUID.bits(), 0x4000);
        assert_eq!(DmFlags::DEFERRED_REMOVE.bits(), 0x20000);
        assert_eq!(DmFlags::IMA_MEASUREMENT.bits(), 0x80000);
        assert_eq!(DmFlags::INPUT_CLEARED.bits(), 0x1_a100);
        let f = DmFlags::from_bits_retain(0x8000_0084);
        assert_eq!((f - DmFlags::EXISTS).bits(), 0x8000_0080);
    }

    #[test]
    fn name_list_header_is_twelve_bytes() {
        let nl = DmNameList { dev: 0x0102_0304_0506_0708, next: 0x1122_3344 };
        let b = nl.as_bytes();
        assert_eq!(b.len(), 12);
        assert_eq!(&b[8..12], &0x1122_3344u32.to_ne_bytes());
    }

    #[test]
    fn align8_rounds_up() {
        assert_eq!(align8(0), 0);
        assert_eq!(align8(1), 8);
        assert_eq!(align8(8), 8);
        assert_eq!(align8(13), 16);
        assert_eq!(align8(usize::MAX), usize::MAX & !7);
    }
}
