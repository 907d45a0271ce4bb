//! Hand-built request buffers for the codec tests, laid out the way libdevmapper lays them out.

use zerocopy::{FromZeros, IntoBytes};

use crate::dm::{DevInfo, DevNum, DmName, DmUuid};
use crate::ioctl::layout::{align8, DmCmd, DmFlags, DmIoctl, DmTargetSpec, DM_IOCTL_SIZE};

use super::{decode, Decoded, DecodedIoctl};

/// A header as libdm sends it: version 4.0.0, `data_start` 312, its private EXISTS bit set.
pub(crate) fn header() -> DmIoctl {
    let mut h = DmIoctl::new_zeroed();
    h.version = [4, 0, 0];
    h.data_start = DM_IOCTL_SIZE as u32;
    h.set_flags(DmFlags::EXISTS);
    h
}

pub(crate) fn with_name(mut h: DmIoctl, name: &str) -> DmIoctl {
    set_field(&mut h.name, name.as_bytes());
    h
}

pub(crate) fn with_uuid(mut h: DmIoctl, uuid: &str) -> DmIoctl {
    set_field(&mut h.uuid, uuid.as_bytes());
    h
}

pub(crate) fn set_field(field: &mut [u8], s: &[u8]) {
    field.fill(0);
    field[..s.len()].copy_from_slice(s);
}

/// Header + payload (placed at 312), `data_size` = the total.
pub(crate) fn buf(mut h: DmIoctl, payload: &[u8]) -> Vec<u8> {
    h.data_size = (DM_IOCTL_SIZE + payload.len()) as u32;
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Header + `size - 312` bytes of `fill` (libdm zero-fills; tests use a marker to see echoes).
pub(crate) fn sized(h: DmIoctl, size: usize, fill: u8) -> Vec<u8> {
    let mut v = buf(h, &vec![fill; size.saturating_sub(DM_IOCTL_SIZE)]);
    v.truncate(size);
    v[12..16].copy_from_slice(&(size as u32).to_ne_bytes());
    v
}

/// One libdm-style target spec: `next` relative to this spec, parameters padded to 8.
pub(crate) fn spec(start: u64, len: u64, ty: &str, params: &str, last: bool) -> Vec<u8> {
    let mut target_type = [0u8; 16];
    target_type[..ty.len()].copy_from_slice(ty.as_bytes());
    let total = align8(40 + params.len() + 1);
    let s = DmTargetSpec {
        sector_start: start,
        length: len,
        status: 0,
        next: if last { 0 } else { total as u32 },
        target_type,
    };
    let mut v = s.as_bytes().to_vec();
    v.extend_from_slice(params.as_bytes());
    v.resize(total, 0);
    v
}

pub(crate) fn table(targets: &[(u64, u64, &str, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, (s, l, t, p)) in targets.iter().enumerate() {
        v.extend(spec(*s, *l, t, p, i + 1 == targets.len()));
    }
    v
}

pub(crate) fn decoded(cmd: DmCmd, b: &[u8]) -> DecodedIoctl {
    match decode(cmd.request(), b) {
        Ok(Decoded::Command(d)) => d,
        other => panic!("{cmd} did not decode: {other:?}"),
    }
}

pub(crate) fn info(name: &str, minor: u32) -> DevInfo {
    DevInfo {
        name: DmName::new(name).unwrap(),
        uuid: None,
        dev: DevNum::new(252, minor),
        open_count: 0,
        event_nr: 0,
        target_count: 0,
        suspended: false,
        read_only: false,
        active_present: false,
        inactive_present: false,
        deferred_remove: false,
    }
}

pub(crate) fn uuid(s: &str) -> Option<DmUuid> {
    Some(DmUuid::new(s).unwrap())
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}

pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
}

/// The reply header, read back.
pub(crate) fn reply_header(b: &[u8]) -> DmIoctl {
    let mut raw = [0u8; DM_IOCTL_SIZE];
    let n = b.len().min(DM_IOCTL_SIZE);
    raw[..n].copy_from_slice(&b[..n]);
    zerocopy::transmute!(raw)
}
