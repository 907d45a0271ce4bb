//! Request side: `ctl_ioctl`'s checks in the kernel's order (linux-dm-abi.md §2.1), then the
//! per-command parsing of `drivers/md/dm-ioctl.c`.

use core::mem::offset_of;

use crate::dm::{
    Command, DevKey, DevNum, DmError, DmName, DmUuid, Geometry, RenameTo, Request, Sectors, StatusType, SuspendOpts,
    TargetSpec,
};
use crate::ioctl::layout::{
    ioc_nr, ioc_type, DmCmd, DmFlags, DmIoctl, DmTargetMsg, DmTargetSpec, DM_IOCTL_MIN_SIZE, DM_IOCTL_SIZE,
    DM_IOCTL_TYPE, DM_MAX_DATA_SIZE, DM_MAX_TARGETS, DM_NAME_LEN, DM_TARGET_MSG_MESSAGE_OFFSET, DM_TARGET_SPEC_ALIGN,
    DM_TARGET_SPEC_SIZE, DM_UUID_LEN, DM_VERSION_MAJOR, DM_VERSION_MINOR,
};
use crate::ioctl::reader::{field_str, offset_add, Reader};

use super::{DecodeError, Decoded, DecodedIoctl};

/// Decodes one control-node ioctl: `request` is the `ioctl()` request code, `buf` the bytes the
/// caller's buffer holds (the shim sends exactly the `data_size` its header claims).
pub fn decode(request: u64, buf: &[u8]) -> Result<Decoded, DecodeError> {
    let Some(cmd) = dispatch(request, buf)? else {
        return Ok(Decoded::Version);
    };
    let in_cmd = |e: DmError| DecodeError { error: e, cmd: Some(cmd), lookup_first: None };
    let Copied { mut header, param_size, secure_data } = copy_params(cmd, buf).map_err(in_cmd)?;
    let params = Reader::new(buf).bytes(0, param_size).map_err(|e| in_cmd(fault(e)))?;
    validate_params(cmd, &mut header).map_err(in_cmd)?;
    let command = command(cmd, &header, Reader::new(params)).map_err(|e| DecodeError { cmd: Some(cmd), ..e })?;
    let request = Request { command, query_inactive: header.flags().contains(DmFlags::QUERY_INACTIVE_TABLE) };
    // Only replies with a payload show the caller's bytes past the header (§2.1 step 9).
    let keep = if cmd.has_payload() { param_size } else { DM_IOCTL_MIN_SIZE };
    let input = params.get(..keep).unwrap_or(params).to_vec();
    Ok(Decoded::Command(DecodedIoctl { request, nr: cmd.nr(), cmd, header, input, param_size, secure_data }))
}

/// Steps 2–4 of §2.1: ioctl type, interface version, command number. `Ok(None)` is DM_VERSION,
/// which stops right after the version check.
pub(super) fn dispatch(request: u64, buf: &[u8]) -> Result<Option<DmCmd>, DmError> {
    let ty = ioc_type(request);
    if ty != DM_IOCTL_TYPE {
        return Err(DmError::NotTty(format!("ioctl type {ty:#x} is not device-mapper's")));
    }
    let version: [u32; 3] = Reader::new(buf).read(offset_of!(DmIoctl, version)).map_err(fault)?;
    // The patchlevel is ignored (check_version).
    if version[0] != DM_VERSION_MAJOR || version[1] > DM_VERSION_MINOR {
        return Err(DmError::Invalid(format!(
            "ioctl interface mismatch: caller {}.{}.{}, dmemu {DM_VERSION_MAJOR}.{DM_VERSION_MINOR}",
            version[0], version[1], version[2]
        )));
    }
    match ioc_nr(request) {
        0 => Ok(None),
        // nr 18 (DM_MPATH_PROBE_PATHS) is a block-device ioctl: no control handler (§2.1 step 4).
        nr => {
            DmCmd::from_nr(nr).map(Some).ok_or_else(|| DmError::NotTty(format!("unknown device-mapper command {nr}")))
        }
    }
}

/// What `copy_params` leaves: the header, the buffer size the handler sees, the wipe flag.
pub(super) struct Copied {
    pub header: DmIoctl,
    pub param_size: usize,
    pub secure_data: bool,
}

/// Step 5 of §2.1.
pub(super) fn copy_params(cmd: DmCmd, buf: &[u8]) -> Result<Copied, DmError> {
    let r = Reader::new(buf);
    let data_size: u32 = r.read(offset_of!(DmIoctl, data_size)).map_err(fault)?;
    if !(DM_IOCTL_MIN_SIZE as u32..=DM_MAX_DATA_SIZE).contains(&data_size) {
        return Err(DmError::Invalid(format!("invalid data_size {data_size} in the ioctl structure")));
    }
    // The no-params commands read and use only the bare header, whatever data_size says.
    let param_size = if cmd.no_params() { DM_IOCTL_MIN_SIZE } else { usize::try_from(data_size).unwrap_or(usize::MAX) };
    let params = r
        .bytes(0, param_size)
        .map_err(|_| DmError::Fault(format!("data_size {data_size} but the caller sent {} bytes", buf.len())))?;
    // The header struct is 312 bytes; its last 7 (`data`) may lie past a 305-byte buffer.
    let mut raw = [0u8; DM_IOCTL_SIZE];
    raw.iter_mut().zip(params).for_each(|(d, s)| *d = *s);
    let mut header: DmIoctl = Reader::new(&raw).read(0).map_err(fault)?;
    header.data_size = u32::try_from(param_size).unwrap_or(data_size);
    let secure_data = header.flags().contains(DmFlags::SECURE_DATA);
    Ok(Copied { header, param_size, secure_data })
}

/// Step 6 of §2.1 (`validate_params`).
fn validate_params(cmd: DmCmd, h: &mut DmIoctl) -> Result<(), DmError> {
    h.set_flags(h.flags() - DmFlags::INPUT_CLEARED);
    if cmd.ignores_params() {
        return Ok(());
    }
    let (has_name, has_uuid) = (h.name[0] != 0, h.uuid[0] != 0);
    if cmd == DmCmd::DevCreate {
        if !has_name {
            return Err(DmError::Invalid("name not supplied when creating device".into()));
        }
    } else if has_name && has_uuid {
        return Err(DmError::Invalid("only supply one of name or uuid".into()));
    }
    // Over-long strings are truncated here, silently (§2.4 DM_DEV_CREATE).
    h.name[DM_NAME_LEN - 1] = 0;
    h.uuid[DM_UUID_LEN - 1] = 0;
    Ok(())
}

/// The per-command part: what each handler reads from the header and payload.
fn command(cmd: DmCmd, h: &DmIoctl, params: Reader<'_>) -> Result<Command, DecodeError> {
    let flags = h.flags();
    let deferred = flags.contains(DmFlags::DEFERRED_REMOVE);
    let noflush = flags.contains(DmFlags::NOFLUSH);
    // TABLE_LOAD, TARGET_MSG and DEV_SET_GEOMETRY find the device before reading their payload.
    let after_lookup = |key: &DevKey| {
        let key = key.clone();
        move |error: DmError| DecodeError { error, cmd: None, lookup_first: Some(key) }
    };
    Ok(match cmd {
        DmCmd::Version => Command::Version,
        DmCmd::RemoveAll => Command::RemoveAll { deferred },
        DmCmd::ListDevices => Command::ListDevices {
            name_prefix: list_prefix(&h.name),
            uuid_prefix: list_prefix(&h.uuid),
            with_uuid: flags.contains(DmFlags::UUID),
        },
        DmCmd::DevCreate => create(h)?,
        DmCmd::DevRemove => Command::DevRemove { key: lookup_key(h)?, deferred },
        DmCmd::DevRename => rename(h, params)?,
        DmCmd::DevSuspend => {
            let key = lookup_key(h)?;
            let opts = SuspendOpts { noflush, skip_lockfs: flags.contains(DmFlags::SKIP_LOCKFS) };
            if flags.contains(DmFlags::SUSPEND) {
                Command::DevSuspend { key, opts }
            } else {
                Command::DevResume { key, opts }
            }
        }
        DmCmd::DevStatus => Command::DevStatus { key: lookup_key(h)? },
        DmCmd::DevWait => {
            Command::DevWait { key: lookup_key(h)?, event_nr: h.event_nr, status: status_type(flags), noflush }
        }
        DmCmd::TableLoad => {
            let key = lookup_key(h)?;
            let targets = table(h, params).map_err(after_lookup(&key))?;
            Command::TableLoad { key, targets, read_only: flags.contains(DmFlags::READONLY) }
        }
        DmCmd::TableClear => Command::TableClear { key: lookup_key(h)? },
        DmCmd::TableDeps => Command::TableDeps { key: lookup_key(h)? },
        DmCmd::TableStatus => Command::TableStatus { key: lookup_key(h)?, status: status_type(flags), noflush },
        DmCmd::ListVersions => Command::ListVersions,
        DmCmd::TargetMsg => {
            let key = lookup_key(h)?;
            let (sector, message) = message(h, params).map_err(after_lookup(&key))?;
            Command::TargetMsg { key, sector, message }
        }
        DmCmd::DevSetGeometry => {
            let key = lookup_key(h)?;
            let geometry = geometry(h, params).map_err(after_lookup(&key))?;
            Command::SetGeometry { key, geometry }
        }
        DmCmd::DevArmPoll => Command::ArmPoll,
        // The type name travels in `name`; an unknown one is EINVAL (§2.4).
        DmCmd::GetTargetVersion => {
            Command::GetTargetVersion { name: utf8(field_str(&h.name), "target type")?.to_owned() }
        }
    })
}

/// The key `__find_device_hash_cell` uses (§2.2): uuid, else name, else dev, as raw bytes (the
/// kernel `strcmp`s them). Forbidden mixes and no key at all are "not found".
fn lookup_key(h: &DmIoctl) -> Result<DevKey, DmError> {
    let (name, uuid) = (field_str(&h.name), field_str(&h.uuid));
    if !uuid.is_empty() {
        if !name.is_empty() || h.dev != 0 {
            return Err(DmError::NoDevice("invalid ioctl structure: uuid with name or dev".into()));
        }
        Ok(DevKey::Uuid(uuid.to_vec()))
    } else if !name.is_empty() {
        if h.dev != 0 {
            return Err(DmError::NoDevice("invalid ioctl structure: name with dev".into()));
        }
        Ok(DevKey::Name(name.to_vec()))
    } else if h.dev != 0 {
        Ok(DevKey::Dev(DevNum::huge_decode(h.dev)))
    } else {
        Err(DmError::NoDevice("no name, uuid or dev given".into()))
    }
}

fn utf8<'a>(b: &'a [u8], what: &str) -> Result<&'a str, DmError> {
    std::str::from_utf8(b)
        .map_err(|_| DmError::Invalid(format!("{what} {:?} is not UTF-8", b.escape_ascii().to_string())))
}

/// A LIST_DEVICES filter. The kernel compares `strnlen(field)` bytes, so an unterminated field is
/// a prefix one byte longer than any name (uuid) can be (validate_params leaves it unterminated for
/// this command), and matches nothing.
fn list_prefix(field: &[u8]) -> Vec<u8> {
    field_str(field).to_vec()
}

fn status_type(flags: DmFlags) -> StatusType {
    if flags.contains(DmFlags::STATUS_TABLE) {
        StatusType::Table
    } else if flags.contains(DmFlags::IMA_MEASUREMENT) {
        StatusType::Ima
    } else {
        StatusType::Info
    }
}

/// DM_DEV_CREATE (§2.4): `check_name` on the (already truncated) name, uuid if non-empty, the
/// minor from `dev` with DM_PERSISTENT_DEV_FLAG (major bits ignored). Both are bytes: any byte
/// but `/` (name) and NUL (either) may appear.
fn create(h: &DmIoctl) -> Result<Command, DmError> {
    let name = DmName::new(field_str(&h.name))?;
    let uuid = match field_str(&h.uuid) {
        [] => None,
        u => Some(DmUuid::new(u)?),
    };
    let minor = h.flags().contains(DmFlags::PERSISTENT_DEV).then(|| DevNum::huge_decode(h.dev).minor);
    Ok(Command::DevCreate { name, uuid, minor })
}

/// DM_DEV_RENAME (§2.4): the new name (or uuid, with DM_UUID_FLAG) at `data_start`; the device is
/// found by `name` alone. All string checks come before any lookup.
fn rename(h: &DmIoctl, params: Reader<'_>) -> Result<Command, DmError> {
    let new = string_at(h.data_start, params, "new name or uuid")?;
    let change_uuid = h.flags().contains(DmFlags::UUID);
    let max = if change_uuid { DM_UUID_LEN - 1 } else { DM_NAME_LEN - 1 };
    if new.is_empty() || new.len() > max {
        return Err(DmError::Invalid(format!("invalid new name or uuid length {}", new.len())));
    }
    let to = if change_uuid { RenameTo::Uuid(DmUuid::new(new)?) } else { RenameTo::Name(DmName::new(new)?) };
    Ok(Command::DevRename { name: field_str(&h.name).to_vec(), to })
}

/// The string RENAME and SET_GEOMETRY carry at `data_start`: it must start at or after offset 305
/// (not 312) and be NUL-terminated inside the buffer (the kernel's `invalid_str`).
fn string_at<'a>(data_start: u32, params: Reader<'a>, what: &str) -> Result<&'a [u8], DmError> {
    let off = usize::try_from(data_start).unwrap_or(usize::MAX);
    if off < DM_IOCTL_MIN_SIZE {
        return Err(DmError::Invalid(format!("{what} at data_start {off} overlaps the header")));
    }
    params.cstr(off).map_err(|e| DmError::Invalid(format!("{what}: {e}")))
}

/// DM_TABLE_LOAD's `populate_table` / `next_target` (§2.5). Per-target semantics (zero length,
/// gaps, unknown types, constructors) are the engine's.
fn table(h: &DmIoctl, params: Reader<'_>) -> Result<Vec<TargetSpec>, DmError> {
    let count = h.target_count;
    // dm_table_create refuses the count before populate_table sees it.
    if count > DM_MAX_TARGETS {
        return Err(DmError::Overflow(format!("{count} targets")));
    }
    if count == 0 {
        return Err(DmError::Invalid("no targets specified".into()));
    }
    let end = params.len();
    // Every spec takes at least 41 bytes, so the buffer bounds what is worth reserving.
    let most = end / (DM_TARGET_SPEC_SIZE + 1);
    let mut targets = Vec::with_capacity(usize::try_from(count).unwrap_or(usize::MAX).min(most));
    // The walk starts from the dm_ioctl itself: the first spec is `data_start` from offset 0 and
    // must not overlap the 312-byte struct; each later `next` is relative to the current spec and
    // must clear its parameter string.
    let mut spec_off = 0usize;
    let mut next = h.data_start;
    let mut min_next = DM_IOCTL_SIZE;
    for i in 0..count {
        let rel = usize::try_from(next).unwrap_or(usize::MAX);
        if rel < min_next {
            let what = if i == 0 { "struct dm_ioctl" } else { "the previous target" };
            return Err(DmError::Invalid(format!("target {i}: spec at +{rel} overlaps {what}")));
        }
        // Room for a whole spec plus at least one parameter byte.
        if end.saturating_sub(spec_off).saturating_sub(DM_TARGET_SPEC_SIZE) <= rel {
            return Err(DmError::Invalid(format!(
                "target {i}: spec at +{rel} from offset {spec_off} extends beyond the {end}-byte buffer"
            )));
        }
        if rel % DM_TARGET_SPEC_ALIGN != 0 {
            return Err(DmError::Invalid(format!("target {i}: spec at +{rel} is not 8-byte aligned")));
        }
        spec_off = offset_add(spec_off, next).unwrap_or(usize::MAX);
        let bad = |e| DmError::Invalid(format!("target {i}: {e}"));
        let spec: DmTargetSpec = params.read(spec_off).map_err(bad)?;
        let args = params.cstr(spec_off + DM_TARGET_SPEC_SIZE).map_err(bad)?;
        min_next = DM_TARGET_SPEC_SIZE + args.len() + 1;
        // `target_type` is used as a plain C string: without a NUL in its 16 bytes it runs on into
        // the (terminated) parameters, as in the kernel.
        let ty = params.cstr(spec_off + offset_of!(DmTargetSpec, target_type)).map_err(bad)?;
        targets.push(TargetSpec {
            start: Sectors(spec.sector_start),
            length: Sectors(spec.length),
            target_type: utf8(ty, "target type")?.to_owned(),
            params: utf8(args, "target parameters")?.to_owned(),
        });
        next = spec.next;
    }
    Ok(targets)
}

/// DM_TARGET_MSG (§2.7): `dm_target_msg` at the *input* `data_start` (≥ 305), message
/// NUL-terminated inside the buffer. Splitting and the empty-message check are the engine's.
fn message(h: &DmIoctl, params: Reader<'_>) -> Result<(Sectors, String), DmError> {
    let off = usize::try_from(h.data_start).unwrap_or(usize::MAX);
    if off < DM_IOCTL_MIN_SIZE {
        return Err(DmError::Invalid(format!("target message at data_start {off} overlaps the header")));
    }
    let bad = |e| DmError::Invalid(format!("invalid target message parameters: {e}"));
    let text = params.cstr(off.saturating_add(DM_TARGET_MSG_MESSAGE_OFFSET)).map_err(bad)?;
    let msg: DmTargetMsg = params.read(off).map_err(bad)?;
    Ok((Sectors(msg.sector), utf8(text, "target message")?.to_owned()))
}

/// DM_DEV_SET_GEOMETRY (§2.4). The range checks of `dev_set_geometry` and `dm_set_geometry` are
/// made here too so that a malformed request never reaches the engine (which checks again).
fn geometry(h: &DmIoctl, params: Reader<'_>) -> Result<Geometry, DmError> {
    let s = string_at(h.data_start, params, "geometry")?;
    let [cylinders, heads, sectors, start] = scan_geometry(s)
        .ok_or_else(|| DmError::Invalid(format!("unable to interpret geometry {:?}", s.escape_ascii().to_string())))?;
    if cylinders > 65535 || heads > 255 || sectors > 255 {
        return Err(DmError::Invalid("geometry exceeds range limits".into()));
    }
    if start > cylinders * heads * sectors {
        return Err(DmError::Invalid("start sector is beyond the geometry limits".into()));
    }
    Ok(Geometry { cylinders, heads, sectors, start })
}

/// The kernel's `sscanf(s, "%lu %lu %lu %lu%c", …) == 4`: each number may be preceded by kernel
/// whitespace, must start with a digit (no sign), and wraps modulo 2^64 like `simple_strntoull`;
/// any byte after the fourth number, whitespace included, feeds `%c` and makes it five.
fn scan_geometry(mut s: &[u8]) -> Option<[u64; 4]> {
    let mut out = [0u64; 4];
    for slot in &mut out {
        s = skip_spaces(s);
        let mut digits = 0usize;
        while let Some((&b, rest)) = s.split_first() {
            if !b.is_ascii_digit() {
                break;
            }
            *slot = slot.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
            digits += 1;
            s = rest;
        }
        if digits == 0 {
            return None;
        }
    }
    s.is_empty().then_some(out)
}

/// The kernel's `isspace`: the C locale set plus 0xa0 (Latin-1 NBSP, `_S` in lib/ctype.c).
fn is_kernel_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0xa0)
}

fn skip_spaces(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| is_kernel_space(b)).count();
    s.get(n..).unwrap_or_default()
}

fn fault(e: impl std::fmt::Display) -> DmError {
    DmError::Fault(e.to_string())
}

#[cfg(test)]
mod tests;
