//! The userspace dirty-log protocol's C layouts (linux-dm-abi.md §5.4, §5.5): the current
//! `struct dm_ulog_request` (version 3), seed 002's `struct dm_clog_request` (the June 2009 "cluster
//! log" patch, take 5: no `luid`, no `version`, so every later field sits 8 bytes earlier), and the
//! netlink connector's `struct cn_msg` that carries either, declared once with compile-time size and
//! offset checks; and the request codes.
//!
//! What tells the generations apart: the seed's codes `DM_CLOG_CTR` 1 … `DM_CLOG_IS_REMOTE_RECOVERING`
//! 17 are the same numbers as today's `DM_ULOG_*` (the older 2006 header numbered them differently
//! from 8 on, linux-dm-abi.md §5.5; that numbering is not served), and the seed's connector id
//! (`CN_IDX_DM` 0x7, `CN_VAL_DM_CLUSTER_LOG` 0x1) is today's too. So the generation is fixed by the
//! log type a table names — `clustered-core` / `clustered-disk` speak the seed's layout,
//! `userspace` today's — never guessed from a message.
//!
//! Like the kernel's connector messages these are native-endian (one host).

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::layout::DM_UUID_LEN;

/// `CN_IDX_DM` / `CN_VAL_DM_USERSPACE_LOG`: the connector id of the current protocol.
pub const CN_IDX_DM: u32 = 0x7;
pub const CN_VAL_DM_USERSPACE_LOG: u32 = 0x1;

/// `DM_ULOG_REQUEST_VERSION`.
pub const DM_ULOG_REQUEST_VERSION: u32 = 3;
/// `DM_ULOG_REQUEST_MASK`: the request type is the low 8 bits.
pub const DM_ULOG_REQUEST_MASK: u32 = 0xff;

/// The kernel's one preallocated 512-byte buffer holds a `cn_msg`, a request and its payload, so
/// a payload beyond 332 bytes is refused (`EINVAL`).
pub const DM_ULOG_PREALLOCED_SIZE: usize = 512;
pub const DM_ULOG_MAX_PAYLOAD: usize = DM_ULOG_PREALLOCED_SIZE - size_of::<CnMsg>() - size_of::<DmUlogRequest>();

/// `struct cb_id` + `struct cn_msg` (`include/uapi/linux/connector.h`), 20 bytes, then `len`
/// bytes of data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CnMsg {
    pub idx: u32,
    pub val: u32,
    pub seq: u32,
    pub ack: u32,
    pub len: u16,
    pub flags: u16,
}

const _: () = {
    assert!(size_of::<CnMsg>() == 20);
    assert!(offset_of!(CnMsg, seq) == 8);
    assert!(offset_of!(CnMsg, ack) == 12);
    assert!(offset_of!(CnMsg, len) == 16);
    assert!(offset_of!(CnMsg, flags) == 18);
};

/// `struct dm_ulog_request` (version 3): 160 bytes, alignment 8, then `data_size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DmUlogRequest {
    /// The kernel-local log instance (live and inactive tables may share a uuid).
    pub luid: u64,
    pub uuid: [u8; DM_UUID_LEN],
    pub padding: [u8; 3],
    pub version: u32,
    /// The server's result (0 or a negative errno).
    pub error: i32,
    pub seq: u32,
    pub request_type: u32,
    pub data_size: u32,
}

const _: () = {
    assert!(size_of::<DmUlogRequest>() == 160);
    assert!(core::mem::align_of::<DmUlogRequest>() == 8);
    assert!(offset_of!(DmUlogRequest, uuid) == 8);
    assert!(offset_of!(DmUlogRequest, padding) == 137);
    assert!(offset_of!(DmUlogRequest, version) == 140);
    assert!(offset_of!(DmUlogRequest, error) == 144);
    assert!(offset_of!(DmUlogRequest, seq) == 148);
    assert!(offset_of!(DmUlogRequest, request_type) == 152);
    assert!(offset_of!(DmUlogRequest, data_size) == 156);
    assert!(DM_ULOG_MAX_PAYLOAD == 332);
};

/// Seed 002's `struct dm_clog_request`: 152 bytes (alignment 4), then `data_size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DmClogRequest {
    pub uuid: [u8; DM_UUID_LEN],
    pub padding: [u8; 7],
    pub error: i32,
    pub seq: u32,
    pub request_type: u32,
    pub data_size: u32,
}

const _: () = {
    assert!(size_of::<DmClogRequest>() == 152);
    assert!(offset_of!(DmClogRequest, error) == 136);
    assert!(offset_of!(DmClogRequest, seq) == 140);
    assert!(offset_of!(DmClogRequest, request_type) == 144);
    assert!(offset_of!(DmClogRequest, data_size) == 148);
};

/// The dirty-log operation a request asks for (`DM_ULOG_*` = `DM_CLOG_*` codes 1..=17, in this
/// order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogRequest {
    Ctr = 1,
    Dtr,
    Presuspend,
    Postsuspend,
    Resume,
    GetRegionSize,
    IsClean,
    InSync,
    Flush,
    MarkRegion,
    ClearRegion,
    GetResyncWork,
    SetRegionSync,
    GetSyncCount,
    StatusInfo,
    StatusTable,
    IsRemoteRecovering,
}

const CODES: [LogRequest; 17] = [
    LogRequest::Ctr,
    LogRequest::Dtr,
    LogRequest::Presuspend,
    LogRequest::Postsuspend,
    LogRequest::Resume,
    LogRequest::GetRegionSize,
    LogRequest::IsClean,
    LogRequest::InSync,
    LogRequest::Flush,
    LogRequest::MarkRegion,
    LogRequest::ClearRegion,
    LogRequest::GetResyncWork,
    LogRequest::SetRegionSync,
    LogRequest::GetSyncCount,
    LogRequest::StatusInfo,
    LogRequest::StatusTable,
    LogRequest::IsRemoteRecovering,
];

impl LogRequest {
    /// The request a `request_type` names (its low 8 bits).
    pub fn from_type(request_type: u32) -> Option<Self> {
        let code = (request_type & DM_ULOG_REQUEST_MASK) as usize;
        code.checked_sub(1).and_then(|i| CODES.get(i)).copied()
    }

    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Which layout a log instance speaks, fixed by its table's log type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// `userspace`: [`DmUlogRequest`].
    Ulog,
    /// `clustered-core`, `clustered-disk`: seed 002's [`DmClogRequest`].
    Clog,
}

impl Generation {
    /// The request header's size on the wire.
    pub fn header_len(self) -> usize {
        match self {
            Generation::Ulog => size_of::<DmUlogRequest>(),
            Generation::Clog => size_of::<DmClogRequest>(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_header_sizes() {
        assert_eq!(LogRequest::from_type(1), Some(LogRequest::Ctr));
        assert_eq!(LogRequest::from_type(8), Some(LogRequest::InSync));
        assert_eq!(LogRequest::from_type(17), Some(LogRequest::IsRemoteRecovering));
        assert_eq!(LogRequest::from_type(0), None);
        assert_eq!(LogRequest::from_type(18), None);
        // Only the low 8 bits are the type.
        assert_eq!(LogRequest::from_type(0x100 | 9), Some(LogRequest::Flush));
        for code in 1..=17 {
            assert_eq!(LogRequest::from_type(code).unwrap().code(), code);
        }
        assert_eq!((Generation::Ulog.header_len(), Generation::Clog.header_len()), (160, 152));
    }

    #[test]
    fn a_request_round_trips_through_its_bytes() {
        let mut r = DmUlogRequest::read_from_bytes(&[0u8; 160][..]).unwrap();
        r.luid = 42;
        r.uuid[..4].copy_from_slice(b"LVM-");
        r.version = DM_ULOG_REQUEST_VERSION;
        r.error = -11;
        r.seq = 7;
        r.request_type = 9;
        r.data_size = 16;
        let b = r.as_bytes();
        assert_eq!(&b[8..12], b"LVM-");
        assert_eq!(u32::from_ne_bytes(b[140..144].try_into().unwrap()), 3);
        assert_eq!(i32::from_ne_bytes(b[144..148].try_into().unwrap()), -11);
        assert_eq!(DmUlogRequest::read_from_bytes(b).unwrap(), r);
    }
}

/// The most regions one MARK_REGION / CLEAR_REGION request carries (dm-log-userspace-base.c
/// groups them 32 at a time, well inside [`DM_ULOG_MAX_PAYLOAD`]).
pub const MAX_REGIONS_PER_REQUEST: usize = 32;

/// Why a request could not be built or a reply read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UlogError {
    /// The payload exceeds the 332 bytes the kernel's buffer leaves (`EINVAL`).
    #[error("payload of {0} bytes exceeds the {DM_ULOG_MAX_PAYLOAD}-byte bound")]
    TooBig(usize),
    /// A reply shorter than its fixed layout, or with bytes left over.
    #[error("malformed reply payload")]
    Malformed,
}

/// One request: header fields and payload, for either generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UlogMessage {
    pub luid: u64,
    pub uuid: Vec<u8>,
    pub error: i32,
    pub seq: u32,
    pub request: LogRequest,
    pub data: Vec<u8>,
}

impl UlogMessage {
    /// The request's bytes in `g`'s layout: header, then payload (at most
    /// [`DM_ULOG_MAX_PAYLOAD`]; the uuid is cut to 128 bytes and NUL-terminated).
    pub fn encode(&self, g: Generation) -> Result<Vec<u8>, UlogError> {
        if self.data.len() > DM_ULOG_MAX_PAYLOAD {
            return Err(UlogError::TooBig(self.data.len()));
        }
        let mut uuid = [0u8; DM_UUID_LEN];
        let n = self.uuid.len().min(DM_UUID_LEN - 1);
        uuid[..n].copy_from_slice(&self.uuid[..n]);
        let data_size = self.data.len() as u32;
        let mut out = match g {
            Generation::Ulog => DmUlogRequest {
                luid: self.luid,
                uuid,
                padding: [0; 3],
                version: DM_ULOG_REQUEST_VERSION,
                error: self.error,
                seq: self.seq,
                request_type: self.request.code(),
                data_size,
            }
            .as_bytes()
            .to_vec(),
            Generation::Clog => DmClogRequest {
                uuid,
                padding: [0; 7],
                error: self.error,
                seq: self.seq,
                request_type: self.request.code(),
                data_size,
            }
            .as_bytes()
            .to_vec(),
        };
        out.extend_from_slice(&self.data);
        Ok(out)
    }

    /// Reads a request or reply in `g`'s layout; `None` for a short buffer, an unknown request
    /// type, or a `data_size` that disagrees with the bytes present.
    pub fn decode(g: Generation, bytes: &[u8]) -> Option<Self> {
        let h = g.header_len();
        let (head, data) = (bytes.get(..h)?, &bytes[h..]);
        let (luid, uuid, error, seq, request_type, data_size) = match g {
            Generation::Ulog => {
                let r = DmUlogRequest::read_from_bytes(head).ok()?;
                (r.luid, r.uuid, r.error, r.seq, r.request_type, r.data_size)
            }
            Generation::Clog => {
                let r = DmClogRequest::read_from_bytes(head).ok()?;
                (0, r.uuid, r.error, r.seq, r.request_type, r.data_size)
            }
        };
        if data_size as usize != data.len() {
            return None;
        }
        let end = uuid.iter().position(|&b| b == 0).unwrap_or(uuid.len());
        Some(UlogMessage {
            luid,
            uuid: uuid[..end].to_vec(),
            error,
            seq,
            request: LogRequest::from_type(request_type)?,
            data: data.to_vec(),
        })
    }
}

/// MARK_REGION / CLEAR_REGION payloads: the regions as u64s, at most
/// [`MAX_REGIONS_PER_REQUEST`] per request.
pub fn region_batches(regions: &[u64]) -> Vec<Vec<u8>> {
    regions.chunks(MAX_REGIONS_PER_REQUEST).map(|c| c.iter().flat_map(|r| r.to_ne_bytes()).collect()).collect()
}

/// A reply payload of exactly `N` bytes (GET_REGION_SIZE u64, IS_CLEAN/IN_SYNC s64,
/// GET_RESYNC_WORK `{s64, u64}`, IS_REMOTE_RECOVERING `{s64, u64}`, GET_SYNC_COUNT u64).
pub fn fixed_reply<const N: usize>(data: &[u8]) -> Result<[u8; N], UlogError> {
    data.try_into().map_err(|_| UlogError::Malformed)
}

#[cfg(test)]
mod payload_tests {
    use super::*;

    #[test]
    fn requests_round_trip_in_both_layouts_and_the_payload_bound_holds() {
        let m = UlogMessage {
            luid: 9,
            uuid: b"LVM-abc".to_vec(),
            error: 0,
            seq: 41,
            request: LogRequest::MarkRegion,
            data: region_batches(&[1, 2, 3]).remove(0),
        };
        for g in [Generation::Ulog, Generation::Clog] {
            let b = m.encode(g).unwrap();
            assert_eq!(b.len(), g.header_len() + 24);
            let back = UlogMessage::decode(g, &b).unwrap();
            assert_eq!(back.luid, if g == Generation::Ulog { 9 } else { 0 });
            assert_eq!((back.uuid, back.seq, back.request, back.data), (m.uuid.clone(), 41, m.request, m.data.clone()));
            // data_size must match what is there.
            assert!(UlogMessage::decode(g, &b[..b.len() - 1]).is_none());
        }
        // The clog layout puts seq at 140, where the ulog layout has version.
        let b = m.encode(Generation::Clog).unwrap();
        assert_eq!(u32::from_ne_bytes(b[140..144].try_into().unwrap()), 41);
        let big = UlogMessage { data: vec![0; DM_ULOG_MAX_PAYLOAD + 1], ..m.clone() };
        assert_eq!(big.encode(Generation::Ulog), Err(UlogError::TooBig(333)));
        let at_bound = UlogMessage { data: vec![0; DM_ULOG_MAX_PAYLOAD], ..m };
        assert!(at_bound.encode(Generation::Ulog).is_ok());
    }

    #[test]
    fn regions_go_32_per_request() {
        let regions: Vec<u64> = (0..70).collect();
        let b = region_batches(&regions);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [256, 256, 48]);
        assert!(b.iter().all(|p| p.len() <= DM_ULOG_MAX_PAYLOAD));
        assert_eq!(u64::from_ne_bytes(b[2][..8].try_into().unwrap()), 64);
        assert_eq!(fixed_reply::<8>(&7u64.to_ne_bytes()).map(u64::from_ne_bytes), Ok(7));
        assert_eq!(fixed_reply::<16>(&[0; 8]), Err(UlogError::Malformed));
    }
}
