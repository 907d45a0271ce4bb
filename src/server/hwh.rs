//! Userspace hardware handler sessions on the control socket (docs/multipath-hwh.md): a connection
//! that sends an `HWH` frame becomes a handler program's session. Each `HWH` frame is one command
//! line, answered in order by one `HWH_MSG` line (`ok …` / `error …`); the `pg_init`, `err`,
//! `cancel` and `released` lines of the hub arrive in `HWH_MSG` frames in between, whenever the
//! hub decides them. Lines go out through a queue and a writer thread of the session's own, so
//! neither the hub nor a handler's caller ever waits for a slow program.

use std::io;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use dmemu_frame::{self as frame, Kind};

use super::{Conn, Daemon};
use crate::dm::{DevKey, Escaped};
use crate::targets::multipath::handler::userspace::wire::{Command, Message};
use crate::targets::multipath::handler::userspace::{self, Answer, Hub, Refusal, SessionId, Sink};

/// One connection's session; dropping it (the connection ended) ends the session in the hub.
pub(super) struct Session {
    id: SessionId,
    hub: Arc<Hub>,
    sink: Sink,
}

impl Session {
    /// Opens a session whose lines go to `conn`.
    pub(super) fn open(conn: Arc<Conn>) -> io::Result<Self> {
        let hub = userspace::hub().clone();
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::Builder::new().name("dmemu-hwh".into()).spawn(move || {
            for line in rx {
                let mut w = conn.writer.lock().unwrap_or_else(|p| p.into_inner());
                if frame::write_frame(&mut *w, Kind::HwhMsg, &[line.as_bytes()]).is_err() {
                    // The connection is gone; its reader ends the session.
                    break;
                }
            }
        })?;
        let sink: Sink = Arc::new(move |o| {
            let _ = tx.send(o);
        });
        let id = hub.open_session(sink.clone());
        tracing::info!("hardware handler session {id} opened");
        Ok(Self { id, hub, sink })
    }

    fn send(&self, m: &Message) {
        (self.sink)(m.to_string())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.hub.close_session(self.id);
        tracing::info!("hardware handler session {} closed", self.id);
    }
}

fn refused(r: Refusal) -> Option<Message> {
    Some(Message::Error { errno: r.errno, text: r.text })
}

impl Daemon {
    /// One `HWH` frame: a command line of session `s`. Malformed lines are answered with `error`
    /// and logged; nothing a program sends ends the daemon or the session.
    pub(super) fn hwh_line(&self, s: &Session, payload: &[u8], privileged: bool) {
        let parsed = std::str::from_utf8(payload).map_err(|_| "not UTF-8 text".to_owned()).and_then(Command::parse);
        let reply = match parsed {
            Ok(cmd) => self.hwh_command(s, cmd, privileged),
            Err(text) => {
                tracing::warn!("hardware handler session {}: line \"{}\" refused: {text}", s.id, Escaped(payload));
                Some(Message::Error { errno: libc::EINVAL, text })
            }
        };
        if let Some(m) = reply {
            if let Message::Error { errno, text } = &m {
                tracing::info!("hardware handler session {}: error {errno}: {text}", s.id);
            }
            s.send(&m);
        }
    }

    /// Runs a command; the reply, or `None` when the hub has sent it (`register`).
    fn hwh_command(&self, s: &Session, cmd: Command, privileged: bool) -> Option<Message> {
        let answer = |id, a| match s.hub.answer(s.id, id, a) {
            Ok(()) => Some(Message::Ok { minor: None }),
            Err(r) => refused(r),
        };
        match cmd {
            Command::Register { name, timeout_ms } => {
                if !privileged {
                    return refused(Refusal { errno: libc::EACCES, text: "permission denied".into() });
                }
                let timeout = match timeout_ms {
                    None => Some(userspace::DEFAULT_TIMEOUT),
                    Some(0) => None,
                    Some(ms) => Some(Duration::from_millis(ms)),
                };
                // The registration is made under the engine's lock, which removals also hold
                // when they tell the hub: a device cannot vanish between lookup and registration.
                let st = self.lock();
                let Some(minor) = st.engine.lookup(&DevKey::Name(name.clone())) else {
                    return refused(Refusal { errno: libc::ENXIO, text: format!("no device \"{}\"", Escaped(&name)) });
                };
                let r = s.hub.register(s.id, minor, &name, timeout);
                drop(st);
                match r {
                    Ok(()) => {
                        tracing::info!(
                            "hardware handler session {} registered for {} (dm-{minor}, timeout {timeout:?})",
                            s.id,
                            Escaped(&name)
                        );
                        None
                    }
                    Err(r) => refused(r),
                }
            }
            Command::Unregister { name } => {
                let minor = self.lock().engine.lookup(&DevKey::Name(name.clone()));
                let Some(minor) = minor else {
                    return refused(Refusal { errno: libc::ENXIO, text: format!("no device \"{}\"", Escaped(&name)) });
                };
                match s.hub.unregister(s.id, minor) {
                    Ok(()) => Some(Message::Ok { minor: Some(minor) }),
                    Err(r) => refused(r),
                }
            }
            Command::Done { id, flags } => answer(id, Answer::Done(flags)),
            Command::Retry { id, delayed } => answer(id, Answer::Retry { delayed }),
        }
    }
}
