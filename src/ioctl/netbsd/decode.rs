//! Request side: `dmioctl`'s copy-in, version check and command lookup (netbsd-dm-proplib.md §1.2,
//! §1.3), then what each handler in dm_ioctl.c reads (§3).

use crate::dm::{Command, DevKey, DmName, DmUuid, RenameTo, Request, Sectors, StatusType, SuspendOpts, TargetSpec};

use super::proplib::{internalize, Dict, Num, Value, COPYIN_LIMIT};
use super::{flags, Decoded, Devices, Found, NbCmd, Refused, VERSION};

/// The kernel's longest name, NUL included (DM_NAME_LEN).
const DM_NAME_LEN: usize = 128;

pub(super) fn key(k: &str) -> Vec<u8> {
    k.as_bytes().to_vec()
}

/// `prop_dictionary_get_uint32` (§5.4): absent, not a number, negative or too big all leave the
/// handler's default.
pub(super) fn get_u32(d: &Dict, k: &str) -> Option<u32> {
    d.get(k.as_bytes()).and_then(Value::as_num).and_then(Num::as_u32)
}

fn get_u64(d: &Dict, k: &str) -> Option<u64> {
    d.get(k.as_bytes()).and_then(Value::as_num).and_then(Num::as_u64)
}

/// `prop_dictionary_get_cstring_nocopy`: a string object, else nothing.
pub(super) fn get_str<'a>(d: &'a Dict, k: &str) -> Option<&'a [u8]> {
    d.get(k.as_bytes()).and_then(Value::as_bytes)
}

/// Decodes one `NETBSD_DM_IOCTL` payload (the `pref_len` bytes the caller's plistref names).
/// `privileged` is the kauth decision for the caller.
pub fn decode(payload: &[u8], devices: &dyn Devices, privileged: bool) -> Result<Decoded, Refused> {
    // Copy-in (§1.2): `pref_len >= limit` is E2BIG; unparsable or not a dictionary is EIO.
    if payload.len() >= COPYIN_LIMIT {
        return Err(Refused::CopyIn {
            errno: libc::E2BIG,
            why: format!("plist of {} bytes, limit {COPYIN_LIMIT}", payload.len()),
        });
    }
    let mut dict = internalize(payload).map_err(|e| Refused::CopyIn { errno: libc::EIO, why: e.to_string() })?;
    let refuse = |dict: Dict, cmd, errno, why: String| Err(Refused::Handler { cmd, dict, errno, why });
    // §1.3 step 2: the version check; on failure the dictionary goes back untouched.
    if let Err(why) = check_version(&mut dict) {
        return refuse(dict, None, libc::EIO, why);
    }
    // Step 3: privileged and unknown commands pass the kauth check first, then unknown is EINVAL.
    let cmd = get_str(&dict, "command").and_then(NbCmd::from_bytes);
    if !privileged && cmd.is_none_or(NbCmd::privileged) {
        return refuse(dict, cmd, libc::EPERM, "caller is not privileged".into());
    }
    let Some(cmd) = cmd else {
        let why = match get_str(&dict, "command") {
            Some(s) => format!("unknown command {:?}", String::from_utf8_lossy(s)),
            None => "no command string".into(),
        };
        return refuse(dict, None, libc::EINVAL, why);
    };
    match handler(cmd, &mut dict, devices) {
        Ok(request) => Ok(Decoded { cmd, request, dict }),
        Err((errno, why)) => refuse(dict, Some(cmd), errno, why),
    }
}

/// `dm_check_version`: an array of at least three numbers, major 4, minor ≤ 16; then the first
/// three become 4.16.0 (written unsigned, so in hex).
fn check_version(dict: &mut Dict) -> Result<(), String> {
    let Some(Value::Array(v)) = dict.get_mut(b"version".as_slice()) else {
        return Err("no version array".into());
    };
    let nums: Vec<Option<u32>> = v.iter().take(3).map(|e| e.as_num().and_then(Num::as_u32)).collect();
    let [Some(major), Some(minor), Some(_)] = nums[..] else {
        return Err("version is not three numbers".into());
    };
    if major != VERSION[0] || minor > VERSION[1] {
        return Err(format!("interface mismatch: caller {major}.{minor}, kernel 4.16"));
    }
    for (slot, n) in v.iter_mut().zip(VERSION) {
        *slot = Value::u(n);
    }
    Ok(())
}

type HandlerError = (i32, String);

/// Not found: the handler clears EXISTS in the returned `flags` and fails with ENOENT (§3.2).
fn not_found(dict: &mut Dict) -> HandlerError {
    let f = get_u32(dict, "flags").unwrap_or(0) & !flags::EXISTS;
    dict.insert(key("flags"), Value::u(f));
    (libc::ENOENT, "device not found".into())
}

fn invalid(why: impl Into<String>) -> HandlerError {
    (libc::EINVAL, why.into())
}

/// NetBSD's `dm_dev_lookup` (§3.3): by `minor` if it is > 0, then by `name`, then by `uuid`, each
/// tried only if the one before found nothing. Returns the key that found the device.
fn lookup(dict: &Dict, devices: &dyn Devices) -> Option<(DevKey, Found)> {
    let minor = get_u32(dict, "minor").unwrap_or(0);
    if minor > 0 {
        if let Some(f) = devices.by_minor(minor) {
            return Some((DevKey::Dev(f.dev), f));
        }
    }
    // Strings are bytes, as proplib keeps them (§5.2): names and uuids match byte for byte.
    let text = |k| get_str(dict, k).filter(|s| !s.is_empty());
    if let Some(name) = text("name") {
        if let Some(f) = devices.by_name(name) {
            return Some((DevKey::Name(name.to_vec()), f));
        }
    }
    if let Some(uuid) = text("uuid") {
        if let Some(f) = devices.by_uuid(uuid) {
            return Some((DevKey::Uuid(uuid.to_vec()), f));
        }
    }
    None
}

fn utf8<'a>(s: &'a [u8], what: &str) -> Result<&'a str, HandlerError> {
    std::str::from_utf8(s).map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// What the handler of `cmd` reads, as the engine's command. Keys the kernel writes before it can
/// fail (reload's `minor`) are written here.
fn handler(cmd: NbCmd, dict: &mut Dict, devices: &dyn Devices) -> Result<Option<Request>, HandlerError> {
    let f = get_u32(dict, "flags").unwrap_or(0);
    let opts = SuspendOpts { noflush: f & flags::NOFLUSH != 0, skip_lockfs: f & flags::SKIP_LOCKFS != 0 };
    let status = if f & flags::STATUS_TABLE != 0 { StatusType::Table } else { StatusType::Info };
    let find = |dict: &mut Dict| lookup(dict, devices).ok_or_else(|| not_found(dict));
    let command = match cmd {
        NbCmd::Version => return Ok(None),
        NbCmd::Targets => Command::ListVersions,
        NbCmd::Names => Command::ListDevices { name_prefix: Vec::new(), uuid_prefix: Vec::new(), with_uuid: false },
        NbCmd::Create => {
            // NetBSD accepts any name; the engine keeps Linux's check_name (docs/protocols.md).
            // Bytes pass as proplib carries them, UTF-8 or not (§5.2).
            let name = get_str(dict, "name").unwrap_or_default();
            let name = DmName::new(name).map_err(|e| invalid(e.to_string()))?;
            let uuid = match get_str(dict, "uuid").filter(|u| !u.is_empty()) {
                Some(u) => Some(DmUuid::new(u).map_err(|e| invalid(e.to_string()))?),
                None => None,
            };
            // `minor` is never honoured on create: NetBSD always takes the next minor (§3.3).
            Command::DevCreate { name, uuid, minor: None }
        }
        NbCmd::Info | NbCmd::Mknodes => Command::DevStatus { key: find(dict)?.0 },
        NbCmd::Suspend => Command::DevSuspend { key: find(dict)?.0, opts },
        NbCmd::Resume => Command::DevResume { key: find(dict)?.0, opts },
        NbCmd::Remove => Command::DevRemove { key: find(dict)?.0, deferred: false },
        NbCmd::Clear => Command::TableClear { key: find(dict)?.0 },
        NbCmd::Deps => Command::TableDeps { key: find(dict)?.0 },
        NbCmd::Status | NbCmd::Table => Command::TableStatus { key: find(dict)?.0, status, noflush: opts.noflush },
        NbCmd::Rename => {
            // The new name is cmd_data[0]; its length is checked before the lookup (§3.4).
            let new = match dict.get(b"cmd_data".as_slice()) {
                Some(Value::Array(a)) => a.first().and_then(Value::as_bytes),
                _ => None,
            };
            let Some(new) = new else {
                return Err(invalid("rename without a new name in cmd_data[0]"));
            };
            if new.len() + 1 > DM_NAME_LEN {
                return Err(invalid(format!("new name of {} bytes", new.len())));
            }
            let to = RenameTo::Name(DmName::new(new).map_err(|e| invalid(e.to_string()))?);
            // The engine renames by name (Linux's DM_DEV_RENAME); NetBSD may have found the
            // device by minor or uuid, so the found device's name is what is passed on.
            let (_, found) = find(dict)?;
            Command::DevRename { name: found.name, to }
        }
        NbCmd::Reload => {
            let (dev, found) = find(dict)?;
            // dm_table_load_ioctl writes `minor` before it reads the table.
            dict.insert(key("minor"), Value::u(found.dev.minor));
            let targets = table(dict)?;
            Command::TableLoad { key: dev, targets, read_only: f & flags::READONLY != 0 }
        }
    };
    // Only status/table/deps honour QUERY_INACTIVE_TABLE (§3.2).
    let query_inactive =
        matches!(cmd, NbCmd::Status | NbCmd::Table | NbCmd::Deps) && f & flags::QUERY_INACTIVE_TABLE != 0;
    Ok(Some(Request { command, query_inactive }))
}

/// reload's `cmd_data`: one `{type, start, length, params}` dictionary per target, in order (§3.4).
fn table(dict: &Dict) -> Result<Vec<TargetSpec>, HandlerError> {
    let Some(Value::Array(entries)) = dict.get(b"cmd_data".as_slice()) else {
        return Err(invalid("reload without a cmd_data array"));
    };
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let Value::Dict(e) = e else {
                return Err(invalid(format!("table entry {i} is not a dictionary")));
            };
            let ty = get_str(e, "type").ok_or_else(|| invalid(format!("table entry {i} has no type")))?;
            let params = get_str(e, "params").ok_or_else(|| invalid(format!("table entry {i} has no params")))?;
            Ok(TargetSpec {
                // Absent or out-of-range numbers leave the handler's zero (§5.4).
                start: Sectors(get_u64(e, "start").unwrap_or(0)),
                length: Sectors(get_u64(e, "length").unwrap_or(0)),
                target_type: utf8(ty, "target type")?.to_owned(),
                params: utf8(params, "target parameters")?.to_owned(),
            })
        })
        .collect()
}
