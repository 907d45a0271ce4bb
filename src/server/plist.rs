//! The NetBSD form on the control socket: a `PLIST` frame (the caller's `pref_len` bytes of XML)
//! answered by a `PLIST_REPLY` (docs/control-socket.md). Decoding, the engine run and encoding
//! happen under one lock, since NetBSD's fallback lookup (minor, name, uuid) is resolved against
//! the engine while decoding.

use std::io;

use super::{Conn, Daemon, State};
use crate::dm::{DevNum, Engine, Reply};
use crate::ioctl::netbsd::{self, Devices, Found};
use dmemu_frame::{self as frame, Kind};

/// The lookups NetBSD's `dm_dev_lookup` makes, against the engine's devices.
impl Devices for Engine {
    fn by_minor(&self, minor: u32) -> Option<Found> {
        self.device(minor)
            .map(|d| Found { dev: DevNum::new(self.config().major, d.minor), name: d.name.as_bytes().to_vec() })
    }
    fn by_name(&self, name: &[u8]) -> Option<Found> {
        self.devices().find(|d| d.name.as_bytes() == name).and_then(|d| self.by_minor(d.minor))
    }
    fn by_uuid(&self, uuid: &[u8]) -> Option<Found> {
        self.devices()
            .find(|d| d.uuid.as_ref().is_some_and(|u| u.as_bytes() == uuid))
            .and_then(|d| self.by_minor(d.minor))
    }
}

impl Daemon {
    /// Answers one PLIST frame.
    pub(super) fn plist(&self, conn: &Conn, payload: &[u8], privileged: bool) -> io::Result<()> {
        let mut st = self.lock();
        let before = st.engine.global_event();
        let reply = self.run_plist(&mut st, payload, privileged);
        let after = st.engine.global_event();
        drop(st);
        if after != before {
            self.broadcast_events(after);
        }
        self.reply(conn, Kind::PlistReply, &frame::status_reply(reply.ret, reply.errno, &reply.xml))
    }

    /// One request through the proplib codec and the engine.
    fn run_plist(&self, st: &mut State, payload: &[u8], privileged: bool) -> netbsd::PlistReply {
        let mode = self.netbsd_errors;
        let mut decoded = match netbsd::decode(payload, &st.engine, privileged) {
            Ok(d) => d,
            Err(e) => {
                tracing::info!("NETBSD_DM_IOCTL refused: {e}");
                return e.encode(mode);
            }
        };
        let cmd = decoded.cmd;
        // Moved out: a table load can be large, and encoding needs only the dictionary.
        let Some(req) = decoded.request.take() else {
            return decoded.encode(&Reply::Version);
        };
        let mutates = req.command.mutates();
        let result = st.engine.execute(req);
        if mutates {
            st.sync(&self.io);
        }
        match result {
            Ok(reply) => {
                tracing::debug!("proplib {cmd} ok");
                decoded.encode(&reply)
            }
            Err(e) => {
                tracing::info!("proplib {cmd} failed: {e}");
                decoded.encode_error(&e, mode)
            }
        }
    }
}
