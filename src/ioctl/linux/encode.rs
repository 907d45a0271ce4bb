//! Reply side: what the kernel's handlers leave in the ioctl buffer and what `ctl_ioctl` copies
//! back (linux-dm-abi.md §2.1 steps 7–9, §2.3, §2.4, §2.6, §2.7).
//!
//! The output is built on a copy of the caller's input, as the kernel builds it on its copy: bytes
//! the kernel never writes (record padding, the `dm_target_deps` padding word, the tail of a
//! name field after its NUL) come back as the caller sent them.

use core::mem::{offset_of, size_of};
use core::slice;

use zerocopy::IntoBytes;

use crate::dm::{DevInfo, DevNum, DmError, DmName, DmUuid, NameEntry, Reply, TargetStatus, TargetVersion};
use crate::ioctl::layout::{
    align8, ioc_type, DmFlags, DmIoctl, DmNameList, DmNameListTrailer, DmTargetDeps, DmTargetSpec, DmTargetVersions,
    DM_ALIGN, DM_IOCTL_MIN_SIZE, DM_IOCTL_SIZE, DM_IOCTL_TYPE, DM_MAX_TYPE_NAME, DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID,
    DM_NAME_LIST_FLAG_HAS_UUID, DM_NAME_LIST_NAME_OFFSET, DM_NAME_LIST_TRAILER_SIZE, DM_TARGET_DEPS_DEV_OFFSET,
    DM_TARGET_SPEC_SIZE, DM_TARGET_VERSIONS_NAME_OFFSET, DM_VERSION, DM_VERSION_BYTES,
};
use crate::ioctl::reader::field_str;

use super::decode::{copy_params, dispatch};
use super::{DecodedIoctl, Encoded};

/// The reply to DM_VERSION: only `version` is written (§2.4).
pub fn encode_version() -> Encoded {
    Encoded { ret: 0, errno: 0, bytes: version_bytes() }
}

/// A failed request (refused by [`super::decode`] or by the engine): `ioctl()` returns -1 and the
/// caller's buffer holds only what the kernel wrote before failing: nothing if the ioctl type is
/// wrong or the version unreadable, else `version` (written back even when the version check
/// itself fails), or all zeros once DM_SECURE_DATA_FLAG made `copy_params` wipe the buffer
/// (version included, as the wipe comes after it).
///
/// `EACCES` writes nothing either: the kernel's capability check comes before everything else.
pub fn encode_error(request: u64, buf: &[u8], error: &DmError) -> Encoded {
    let unwritten =
        matches!(error, DmError::Access) || ioc_type(request) != DM_IOCTL_TYPE || buf.len() < DM_VERSION_BYTES;
    let bytes = if unwritten {
        Vec::new()
    } else {
        let wiped = match dispatch(request, buf) {
            Ok(Some(cmd)) => copy_params(cmd, buf).ok().filter(|c| c.secure_data).map(|c| c.param_size),
            _ => None,
        };
        writeback(Vec::new(), wiped)
    };
    Encoded { ret: -1, errno: error.errno(), bytes }
}

impl DecodedIoctl {
    /// The engine refused this (decoded) command: [`encode_error`] without re-reading the buffer.
    pub fn encode_error(&self, error: &DmError) -> Encoded {
        let bytes = if matches!(error, DmError::Access) {
            Vec::new()
        } else {
            writeback(Vec::new(), self.secure_data.then_some(self.param_size))
        };
        Encoded { ret: -1, errno: error.errno(), bytes }
    }
}

/// A successful command's reply.
pub fn encode(reply: &Reply, decoded: &DecodedIoctl) -> Encoded {
    let mut h = decoded.header;
    h.version = DM_VERSION;
    // ctl_ioctl sets the output length to the bare header before the handler runs (§2.1 step 7).
    h.data_size = to_u32(DM_IOCTL_MIN_SIZE);
    let mut out = decoded.input.clone();
    let mut ret = 0;
    let payload = out.get_mut(DM_IOCTL_SIZE..).unwrap_or_default();
    match reply {
        // REMOVE_ALL and SET_GEOMETRY set data_size = 0: nothing but the version comes back.
        Reply::Version | Reply::Nothing => h.data_size = 0,
        Reply::Device(info) => device(&mut h, info),
        // dm_hash_rename does no lookup: name/uuid keep what the caller sent and
        // INACTIVE_PRESENT is not touched (§2.4 DM_DEV_RENAME).
        Reply::Renamed(info) => status_fill(&mut h, info),
        Reply::Removed { name, uuid, deferred } => {
            // No status fill: event_nr, dev and open_count echo the input (§2.4 DM_DEV_REMOVE).
            set_names(&mut h, name, uuid.as_ref());
            if !deferred {
                h.set_flags(h.flags() - DmFlags::DEFERRED_REMOVE);
            }
        }
        Reply::DeviceList(entries) => list_devices(&mut h, payload, entries),
        Reply::Deps(info, devs) => {
            device(&mut h, info);
            if let Some(devs) = devs {
                deps(&mut h, payload, devs);
            }
        }
        Reply::Status(info, targets) => {
            device(&mut h, info);
            if let Some(targets) = targets {
                status(&mut h, payload, targets);
            }
        }
        Reply::Versions(list) => versions(&mut h, payload, list),
        Reply::TargetVersion(v) => versions(&mut h, payload, slice::from_ref(v)),
        Reply::Message(info, text) => {
            // get_result_buffer runs before anything else in target_message.
            h.data_start = to_u32(DM_IOCTL_SIZE);
            device(&mut h, info);
            if let Some(text) = text {
                message_text(&mut h, payload, text);
            }
        }
        // A message to a device without a live table: the ioctl returns +2 and, since only a zero
        // return copies anything, the caller sees just the version (§2.7).
        Reply::MessageNoTable => {
            ret = 2;
            h.data_size = 0;
        }
        Reply::ArmPoll => {}
    }
    let n = out.len().min(DM_IOCTL_SIZE);
    if let (Some(dst), Some(src)) = (out.get_mut(..n), h.as_bytes().get(..n)) {
        dst.copy_from_slice(src);
    }
    out.truncate(usize::try_from(h.data_size).unwrap_or(usize::MAX));
    let wiped = decoded.secure_data.then_some(decoded.param_size);
    Encoded { ret, errno: 0, bytes: writeback(out, wiped) }
}

/// The caller's buffer after the ioctl, from its start: the bytes copied back, over the wiped
/// `param_size` bytes with DM_SECURE_DATA_FLAG, else over the version check_version wrote.
fn writeback(mut copied: Vec<u8>, wiped: Option<usize>) -> Vec<u8> {
    match wiped {
        Some(len) => {
            if copied.len() < len {
                copied.resize(len, 0);
            }
            copied
        }
        None if copied.is_empty() => version_bytes(),
        None => copied,
    }
}

fn version_bytes() -> Vec<u8> {
    DM_VERSION.as_bytes().to_vec()
}

/// A device reply after a lookup: status fill, the lookup's INACTIVE_PRESENT, name and uuid.
fn device(h: &mut DmIoctl, info: &DevInfo) {
    status_fill(h, info);
    let mut f = h.flags();
    f.set(DmFlags::INACTIVE_PRESENT, info.inactive_present);
    h.set_flags(f);
    set_names(h, &info.name, info.uuid.as_ref());
}

/// `__dev_status` (§2.3). DEFERRED_REMOVE is only ever set here (an input bit is echoed) and
/// UEVENT_GENERATED is never set (interposition.md §1.1 item 10); unknown bits pass through.
fn status_fill(h: &mut DmIoctl, info: &DevInfo) {
    let mut f =
        h.flags() - (DmFlags::SUSPEND | DmFlags::READONLY | DmFlags::ACTIVE_PRESENT | DmFlags::INTERNAL_SUSPEND);
    f.set(DmFlags::SUSPEND, info.suspended);
    f.set(DmFlags::READONLY, info.read_only);
    f.set(DmFlags::ACTIVE_PRESENT, info.active_present);
    if info.deferred_remove {
        f |= DmFlags::DEFERRED_REMOVE;
    }
    h.set_flags(f);
    h.dev = info.dev.huge_encode();
    h.open_count = info.open_count;
    h.event_nr = info.event_nr;
    h.target_count = info.target_count;
}

/// What the lookup writes back: `strscpy` of the real name and uuid (the rest of each field keeps
/// the caller's bytes), an empty uuid when the device has none (§2.2).
fn set_names(h: &mut DmIoctl, name: &DmName, uuid: Option<&DmUuid>) {
    strscpy(&mut h.name, name.as_bytes());
    match uuid {
        Some(u) => strscpy(&mut h.uuid, u.as_bytes()),
        None => h.uuid[0] = 0,
    }
}

/// The kernel's `strscpy`: as much of `s` as fits with a NUL, nothing written after the NUL.
fn strscpy<S: AsRef<[u8]> + ?Sized>(field: &mut [u8], s: &S) {
    let src = c_bytes(s);
    let n = src.len().min(field.len().saturating_sub(1));
    if let (Some(dst), Some(src)) = (field.get_mut(..n), src.get(..n)) {
        dst.copy_from_slice(src);
    }
    if let Some(nul) = field.get_mut(n) {
        *nul = 0;
    }
}

/// A string or bytes as the C string the kernel would hold: up to its first NUL.
fn c_bytes<S: AsRef<[u8]> + ?Sized>(s: &S) -> &[u8] {
    field_str(s.as_ref())
}

fn to_u32(n: usize) -> u32 {
    // Every size here is bounded by the 1 GiB data_size limit.
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Copies `bytes` to `off` in the payload. Callers check the space first; a write that would
/// still not fit is dropped rather than panicking.
fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    match off.checked_add(bytes.len()).and_then(|end| buf.get_mut(off..end)) {
        Some(dst) => dst.copy_from_slice(bytes),
        None => debug_assert!(false, "payload write {off}+{} past {}", bytes.len(), buf.len()),
    }
}

fn put_cstr(buf: &mut [u8], off: usize, s: &[u8]) {
    put(buf, off, s);
    put(buf, off.saturating_add(s.len()), &[0]);
}

fn buffer_full(h: &mut DmIoctl) {
    h.set_flags(h.flags() | DmFlags::BUFFER_FULL);
}

/// Offsets in the payload are relative to 312, which is 8-aligned, so aligning them aligns the
/// kernel's pointers too.
const _: () = assert!(DM_IOCTL_SIZE.is_multiple_of(DM_ALIGN));

/// DM_LIST_DEVICES (§2.4, record layout §1.3).
fn list_devices(h: &mut DmIoctl, payload: &mut [u8], entries: &[NameEntry]) {
    h.data_start = to_u32(DM_IOCTL_SIZE);
    let with_uuid = h.flags().contains(DmFlags::UUID);
    let uuid_of = |e| listed_uuid(e, with_uuid);
    let needed = entries
        .iter()
        .map(|e| {
            align8(DM_NAME_LIST_NAME_OFFSET + c_bytes(e.name.as_bytes()).len() + 1)
                + DM_NAME_LIST_TRAILER_SIZE
                + uuid_of(e).map_or(0, |u| align8(u.len() + 1))
        })
        .fold(0usize, usize::saturating_add);
    if payload.len() < needed || payload.len() < size_of::<u64>() {
        return buffer_full(h);
    }
    // With no devices data_size is 312: the zero `dev` the kernel writes at 312 is not copied.
    h.data_size = to_u32(DM_IOCTL_SIZE + needed);
    let mut off = 0usize;
    let mut prev: Option<usize> = None;
    for e in entries {
        if let Some(p) = prev {
            put(payload, p + offset_of!(DmNameList, next), &to_u32(off - p).to_ne_bytes());
        }
        let name = c_bytes(e.name.as_bytes());
        put(payload, off, DmNameList { dev: e.dev.huge_encode(), next: 0 }.as_bytes());
        put_cstr(payload, off + DM_NAME_LIST_NAME_OFFSET, name);
        let trailer = align8(off + DM_NAME_LIST_NAME_OFFSET + name.len() + 1);
        let uuid = uuid_of(e);
        // The uuid flags appear only when the caller asked for uuids.
        let flags = match (with_uuid, uuid) {
            (false, _) => 0,
            (true, Some(_)) => DM_NAME_LIST_FLAG_HAS_UUID,
            (true, None) => DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID,
        };
        put(payload, trailer, DmNameListTrailer { event_nr: e.event_nr, flags }.as_bytes());
        let mut end = trailer + DM_NAME_LIST_TRAILER_SIZE;
        if let Some(u) = uuid {
            put_cstr(payload, end, u);
            end = align8(end + u.len() + 1);
        }
        prev = Some(off);
        off = end;
    }
}

/// The uuid a name-list record carries: only when the caller asked for uuids.
fn listed_uuid(e: &NameEntry, with_uuid: bool) -> Option<&[u8]> {
    e.uuid.as_ref().filter(|_| with_uuid).map(|u| c_bytes(u.as_bytes()))
}

/// DM_TABLE_DEPS with a table (§2.4): `count`, the caller's padding word, then the devices.
fn deps(h: &mut DmIoctl, payload: &mut [u8], devs: &[DevNum]) {
    h.data_start = to_u32(DM_IOCTL_SIZE);
    let needed = devs.len().saturating_mul(size_of::<u64>()).saturating_add(DM_TARGET_DEPS_DEV_OFFSET);
    if payload.len() < needed {
        return buffer_full(h);
    }
    put(payload, offset_of!(DmTargetDeps, count), &to_u32(devs.len()).to_ne_bytes());
    for (i, d) in devs.iter().enumerate() {
        put(payload, DM_TARGET_DEPS_DEV_OFFSET + i * size_of::<u64>(), &d.huge_encode().to_ne_bytes());
    }
    h.data_size = to_u32(DM_IOCTL_SIZE + needed);
}

/// TABLE_STATUS / DEV_WAIT with a table: `retrieve_status` (§2.6).
fn status(h: &mut DmIoctl, payload: &mut [u8], targets: &[TargetStatus]) {
    h.data_start = to_u32(DM_IOCTL_SIZE);
    let mut pos = 0usize;
    let mut used = None;
    for t in targets {
        // After an odd-sized buffer's last record the aligned position can pass the end, where
        // the kernel's size_t arithmetic would wrap; dmemu reports the buffer full.
        let remaining = payload.len().saturating_sub(pos);
        if remaining <= DM_TARGET_SPEC_SIZE {
            buffer_full(h);
            break;
        }
        let text = c_bytes(&t.text);
        // The target's DMEMIT truncates to the space left, so text that does not fit shows up
        // as text that exactly fills it: BUFFER_FULL either way.
        if text.len() + 1 >= remaining - DM_TARGET_SPEC_SIZE {
            buffer_full(h);
            break;
        }
        let end = pos + DM_TARGET_SPEC_SIZE + text.len() + 1;
        // `next` is measured from the first spec, and the last one points past its padded end.
        let next = align8(end);
        let mut target_type = [0u8; DM_MAX_TYPE_NAME];
        strscpy(&mut target_type, &t.target_type);
        let spec =
            DmTargetSpec { sector_start: t.start.0, length: t.length.0, status: 0, next: to_u32(next), target_type };
        put(payload, pos, spec.as_bytes());
        put_cstr(payload, pos + DM_TARGET_SPEC_SIZE, text);
        // data_size ends just past the last NUL, unpadded.
        used = Some(DM_IOCTL_SIZE + end);
        pos = next;
    }
    if let Some(used) = used {
        h.data_size = to_u32(used);
    }
    // The table's count even when the output was cut short.
    h.target_count = to_u32(targets.len());
}

/// DM_LIST_VERSIONS and DM_GET_TARGET_VERSION (§2.4).
fn versions(h: &mut DmIoctl, payload: &mut [u8], list: &[TargetVersion]) {
    h.data_start = to_u32(DM_IOCTL_SIZE);
    // list_version_get_needed's estimate (7 spare bytes per record) is also what data_size reports.
    let needed = list
        .iter()
        .map(|v| DM_TARGET_VERSIONS_NAME_OFFSET + c_bytes(&v.name).len() + 1 + (DM_ALIGN - 1))
        .fold(0usize, usize::saturating_add);
    if payload.len() < needed {
        return buffer_full(h);
    }
    h.data_size = to_u32(DM_IOCTL_SIZE + needed);
    let mut off = 0usize;
    let mut prev: Option<usize> = None;
    for v in list {
        if let Some(p) = prev {
            put(payload, p + offset_of!(DmTargetVersions, next), &to_u32(off - p).to_ne_bytes());
        }
        let name = c_bytes(&v.name);
        put(payload, off, DmTargetVersions { next: 0, version: v.version }.as_bytes());
        put_cstr(payload, off + DM_TARGET_VERSIONS_NAME_OFFSET, name);
        prev = Some(off);
        off = align8(off + DM_TARGET_VERSIONS_NAME_OFFSET + name.len() + 1);
    }
}

/// DM_TARGET_MSG output text at 312 (§2.7).
fn message_text(h: &mut DmIoctl, payload: &mut [u8], text: &str) {
    h.set_flags(h.flags() | DmFlags::DATA_OUT);
    let text = c_bytes(text);
    // dm_message_test_buffer_overflow: no room at all, or the text and its NUL fill the buffer.
    if payload.is_empty() || text.len() + 1 >= payload.len() {
        return buffer_full(h);
    }
    put_cstr(payload, 0, text);
    h.data_size = to_u32(DM_IOCTL_SIZE + text.len() + 1);
}

#[cfg(test)]
mod tests;
