//! Reply side: what each dm_ioctl.c handler writes into the request dictionary (§3.4), and the
//! error behaviour of §4.

use crate::dm::{DevInfo, DmError, Reply};

use super::decode::{get_u32, key};
use super::proplib::{Dict, Value};
use super::{flags, Decoded, NbCmd, NetbsdErrors, PlistReply, Refused};

impl Refused {
    /// The reply to a refused request: copy-in failures copy nothing out in either mode; handler
    /// refusals copy the dictionary out and, in compat mode, return 0 as NetBSD does (§4).
    pub fn encode(&self, mode: NetbsdErrors) -> PlistReply {
        match self {
            Refused::CopyIn { errno, .. } => PlistReply { ret: -1, errno: *errno, xml: Vec::new() },
            Refused::Handler { dict, errno, .. } => PlistReply::finish(dict, *errno, mode),
        }
    }
}

impl Decoded {
    /// A command the engine ran successfully.
    pub fn encode(mut self, reply: &Reply) -> PlistReply {
        write_reply(self.cmd, &mut self.dict, reply);
        PlistReply::finish(&self.dict, 0, NetbsdErrors::Real)
    }

    /// The engine refused the command: the errno NetBSD's handler would have returned, and the
    /// dictionary as it leaves it.
    pub fn encode_error(mut self, err: &DmError, mode: NetbsdErrors) -> PlistReply {
        let errno = match (self.cmd, err) {
            // The lookup already succeeded under the same lock; a device that vanished (or a
            // rename racing it) is "not found" like any other.
            (_, DmError::NoDevice(_)) => {
                set_flags(&mut self.dict, |f| f & !flags::EXISTS);
                libc::ENOENT
            }
            // create: a name or uuid in use sets EXISTS and is EEXIST (§3.4); Linux says EBUSY.
            (NbCmd::Create, DmError::Busy(_)) => {
                set_flags(&mut self.dict, |f| f | flags::EXISTS);
                libc::EEXIST
            }
            (_, e) => e.errno(),
        };
        PlistReply::finish(&self.dict, errno, mode)
    }
}

/// `DM_ADD_FLAG`/`DM_REMOVE_FLAG`: read `flags` (0 if absent), change, write back unsigned.
fn set_flags(dict: &mut Dict, f: impl FnOnce(u32) -> u32) {
    let v = f(get_u32(dict, "flags").unwrap_or(0));
    dict.insert(key("flags"), Value::u(v));
}

fn set(dict: &mut Dict, k: &str, v: Value) {
    dict.insert(key(k), v);
}

/// The device's own flag word (dm_dev.flags) as `suspend` copies it out.
fn device_flags(i: &DevInfo) -> u32 {
    let mut f = 0;
    for (on, bit) in [
        (i.read_only, flags::READONLY),
        (i.suspended, flags::SUSPEND),
        (i.active_present, flags::ACTIVE_PRESENT),
        (i.inactive_present, flags::INACTIVE_PRESENT),
    ] {
        if on {
            f |= bit;
        }
    }
    f
}

fn bit(f: u32, b: u32, on: bool) -> u32 {
    if on {
        f | b
    } else {
        f & !b
    }
}

/// `open_count` is written with the uint32 setter (§3.1); the engine's value is Linux's open count.
fn open_count(i: &DevInfo) -> Value {
    Value::u(u32::try_from(i.open_count).unwrap_or(0))
}

fn uuid(i: &DevInfo) -> Value {
    // dm_dev.uuid is a char array: a device without one reports the empty string.
    Value::String(i.uuid.as_ref().map_or(&[][..], |u| u.as_bytes()).to_vec())
}

/// What each handler writes on success (§3.4).
fn write_reply(cmd: NbCmd, d: &mut Dict, reply: &Reply) {
    match (cmd, reply) {
        (NbCmd::Version, _) => {}
        (NbCmd::Targets, Reply::Versions(list)) => {
            // NetBSD lists targets in registration order; the engine reports newest first, as
            // Linux's LIST_VERSIONS does.
            let entries = list
                .iter()
                .rev()
                .map(|t| {
                    let mut e = Dict::new();
                    e.insert(key("name"), Value::str(&t.name));
                    e.insert(key("ver"), Value::Array(t.version.iter().map(|&n| Value::u(n)).collect()));
                    Value::Dict(e)
                })
                .collect();
            set(d, "cmd_data", Value::Array(entries));
        }
        (NbCmd::Names, Reply::DeviceList(list)) => {
            // NetBSD lists in creation order; minors are the closest the engine keeps (a freed
            // minor is reused, as in Linux).
            let mut list: Vec<_> = list.iter().collect();
            list.sort_by_key(|e| e.dev.minor);
            let entries = list
                .into_iter()
                .map(|e| {
                    let mut ent = Dict::new();
                    ent.insert(key("dev"), Value::u(e.dev.minor));
                    ent.insert(key("name"), Value::String(e.name.as_bytes().to_vec()));
                    Value::Dict(ent)
                })
                .collect();
            set(d, "cmd_data", Value::Array(entries));
        }
        (NbCmd::Create, Reply::Device(i)) => {
            set(d, "minor", Value::u(i.dev.minor));
            set_flags(d, |f| (f | flags::EXISTS) & !flags::INACTIVE_PRESENT);
        }
        (NbCmd::Info | NbCmd::Mknodes, Reply::Device(i)) => {
            set(d, "open_count", open_count(i));
            set(d, "minor", Value::u(i.dev.minor));
            set(d, "uuid", uuid(i));
            set(d, "target_count", Value::u(i.target_count));
            // SUSPEND is added, never removed; the table bits follow the two slots.
            set_flags(d, |f| {
                let f = if i.suspended { f | flags::SUSPEND } else { f };
                let f = bit(f, flags::ACTIVE_PRESENT, i.active_present);
                bit(f, flags::INACTIVE_PRESENT, i.inactive_present)
            });
        }
        (NbCmd::Suspend, Reply::Device(i)) => {
            set(d, "open_count", open_count(i));
            // The caller's flags are replaced by the device's own, plus EXISTS.
            set(d, "flags", Value::u(device_flags(i) | flags::EXISTS));
            set(d, "minor", Value::u(i.dev.minor));
        }
        (NbCmd::Resume, Reply::Device(i)) => {
            set(d, "open_count", open_count(i));
            set_flags(d, |f| f | flags::EXISTS);
            set(d, "minor", Value::u(i.dev.minor));
        }
        (NbCmd::Remove, Reply::Removed { .. }) | (NbCmd::Clear, Reply::Device(_)) => {}
        (NbCmd::Rename, Reply::Renamed(i)) => {
            set(d, "open_count", open_count(i));
            set(d, "minor", Value::u(i.dev.minor));
            set(d, "uuid", uuid(i));
        }
        (NbCmd::Reload, Reply::Device(i)) => {
            set(d, "minor", Value::u(i.dev.minor));
            set_flags(d, |f| f | flags::INACTIVE_PRESENT);
        }
        (NbCmd::Deps, Reply::Deps(i, devs)) => {
            set(d, "minor", Value::u(i.dev.minor));
            set(d, "name", Value::String(i.name.as_bytes().to_vec()));
            set(d, "uuid", uuid(i));
            // NetBSD's dev_t encoding (makedev) equals Linux's "huge" one for 12-bit majors and
            // 20-bit minors.
            let devs = devs.iter().flatten().map(|dev| Value::u(dev.huge_encode())).collect();
            set(d, "cmd_data", Value::Array(devs));
        }
        (NbCmd::Status | NbCmd::Table, Reply::Status(i, targets)) => {
            set_flags(d, |f| {
                // INACTIVE_PRESENT is only looked at when there is no active table.
                let f = if i.active_present {
                    f | flags::ACTIVE_PRESENT
                } else {
                    bit(f & !flags::ACTIVE_PRESENT, flags::INACTIVE_PRESENT, i.inactive_present)
                };
                if i.suspended {
                    f | flags::SUSPEND
                } else {
                    f
                }
            });
            set(d, "minor", Value::u(i.dev.minor));
            let entries = targets
                .iter()
                .flatten()
                .map(|t| {
                    let mut e = Dict::new();
                    e.insert(key("start"), Value::u(t.start.0));
                    e.insert(key("length"), Value::u(t.length.0));
                    e.insert(key("type"), Value::str(&t.target_type));
                    // The active slot's index in NetBSD: not meaningful, and the engine has no
                    // slots, so always 0 (signed: the one decimal number in DM replies).
                    e.insert(key("status"), Value::i(0));
                    e.insert(key("params"), Value::str(&t.text));
                    Value::Dict(e)
                })
                .collect();
            set(d, "cmd_data", Value::Array(entries));
        }
        (cmd, reply) => {
            debug_assert!(false, "{cmd} cannot produce {reply:?}");
            tracing::warn!("{cmd}: unexpected engine reply {reply:?}");
        }
    }
}
