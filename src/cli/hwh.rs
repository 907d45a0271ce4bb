//! `dmemu hwh DEVICE... [--pg-init ACTION]... [--err ACTION]... [--timeout-ms N]`: the reference
//! program of the `userspace` multipath hardware handler (docs/multipath-hwh.md). It registers for
//! the devices and answers their `pg_init` and `err` requests from scripted sequences, printing one
//! line per request and answer on standard output, for tests of failover software to read.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmemu::client::hwh::{connect, HwhWriter};
use dmemu::targets::multipath::handler::userspace::wire::{escape, op_name, parse_flags, Command, Message};
use dmemu::targets::multipath::handler::{default_err, MpFlags};

use super::Result;

#[derive(clap::Args, Debug)]
pub struct HwhArgs {
    /// Control socket path (default: $DMEMU_SOCKET, else a per-user default).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// How to answer pg_init requests, one ACTION per request in turn, the last one repeating
    /// (default: ok). ACTION: ok, fail, bypass, error-io, retry, retry-delayed, or a flags number
    /// (1 fail path, 2 bypass group, 4 error IO), optionally after `sleep=<ms>:`.
    #[arg(long = "pg-init", value_name = "ACTION", value_parser = parse_pg_init)]
    pub pg_init: Vec<Action>,
    /// How to answer err requests, as --pg-init (no retries); `default` gives the kernel's
    /// decision for the error (the default).
    #[arg(long = "err", value_name = "ACTION", value_parser = parse_err)]
    pub err: Vec<Action>,
    /// How long the daemon lets a request wait for this program's answer, in milliseconds (0: no
    /// limit; default: the daemon's 60000).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// The devices to handle: names or /dev/mapper/NAME.
    #[arg(required = true, value_name = "DEVICE")]
    pub devices: Vec<String>,
}

/// One scripted answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    sleep: Duration,
    what: What,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum What {
    Flags(MpFlags),
    Retry {
        delayed: bool,
    },
    /// The kernel's decision for the error (err); no flags (pg_init).
    Default,
}

fn parse_action(s: &str, retries: bool) -> std::result::Result<Action, String> {
    let (sleep, rest) = match s.strip_prefix("sleep=") {
        Some(r) => {
            let (ms, rest) = r.split_once(':').ok_or_else(|| format!("{s:?}: want sleep=<ms>:<action>"))?;
            let ms: u64 = ms.parse().map_err(|_| format!("{s:?}: {ms:?} is not a number of milliseconds"))?;
            (Duration::from_millis(ms), rest)
        }
        None => (Duration::ZERO, s),
    };
    let what = match rest {
        "ok" => What::Flags(MpFlags::empty()),
        "fail" => What::Flags(MpFlags::FAIL_PATH),
        "bypass" => What::Flags(MpFlags::BYPASS_PG),
        "error-io" => What::Flags(MpFlags::ERROR_IO),
        "default" => What::Default,
        "retry" | "retry-delayed" if !retries => return Err(format!("{rest}: only pg_init requests can be retried")),
        "retry" => What::Retry { delayed: false },
        "retry-delayed" => What::Retry { delayed: true },
        n => What::Flags(parse_flags(n).map_err(|e| format!("{s:?}: not an action ({e})"))?),
    };
    Ok(Action { sleep, what })
}

fn parse_pg_init(s: &str) -> std::result::Result<Action, String> {
    parse_action(s, true)
}

fn parse_err(s: &str) -> std::result::Result<Action, String> {
    parse_action(s, false)
}

/// The answer's word in the output.
fn flags_word(f: MpFlags) -> String {
    match f.bits() {
        0 => "ok".into(),
        1 => "fail".into(),
        2 => "bypass".into(),
        4 => "error-io".into(),
        n => n.to_string(),
    }
}

/// A request as printed: its line without the id.
fn describe(m: &Message) -> String {
    match m {
        Message::PgInit { name, group, dev, bypassed, args, .. } => {
            let mut s = format!("pg_init {} {group} {dev} {}", escape(name), *bypassed as u8);
            for a in args {
                s.push(' ');
                s.push_str(&escape(a.as_bytes()));
            }
            s
        }
        Message::Err { name, group, dev, op, sector, sectors, errno, .. } => {
            format!("err {} {group} {dev} {} {sector} {sectors} {errno}", escape(name), op_name(*op))
        }
        other => other.to_string(),
    }
}

/// What a reply from the daemon answers, in the order the commands were sent.
enum Expect {
    Register(String),
    Answer(String),
}

/// The sending side, shared by the reading loop and delayed answers.
struct Out {
    writer: HwhWriter,
    expect: std::collections::VecDeque<Expect>,
    /// Requests whose answer is being delayed, with their description.
    waiting: HashMap<u64, String>,
}

fn print(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

impl Out {
    /// Sends an answer and prints it.
    fn answer(&mut self, desc: &str, cmd: Command, word: &str) {
        if self.writer.send(&cmd).is_err() {
            return; // The reading loop sees the connection end.
        }
        self.expect.push_back(Expect::Answer(format!("{desc} -> {word}")));
        print(&format!("{desc} -> {word}"));
    }
}

/// The `n`th action of a sequence (the last one repeats).
fn nth(seq: &[Action], n: usize, fallback: What) -> Action {
    seq.get(n.min(seq.len().saturating_sub(1))).cloned().unwrap_or(Action { sleep: Duration::ZERO, what: fallback })
}

pub fn run(a: HwhArgs) -> Result {
    let socket = a.socket.clone().unwrap_or_else(dmemu::client::daemon::default_socket);
    let (mut reader, writer) = connect(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    let out = Arc::new(Mutex::new(Out { writer, expect: Default::default(), waiting: HashMap::new() }));
    {
        let mut o = out.lock().unwrap();
        for dev in &a.devices {
            let name = dev.strip_prefix("/dev/mapper/").unwrap_or(dev).as_bytes().to_vec();
            o.writer.send(&Command::Register { name, timeout_ms: a.timeout_ms })?;
            o.expect.push_back(Expect::Register(dev.clone()));
        }
    }
    let (mut pg_n, mut err_n) = (0usize, 0usize);
    loop {
        let Some(msg) = reader.recv()? else {
            return Err("the daemon closed the connection".into());
        };
        match &msg {
            Message::Ok { .. } | Message::Error { .. } => {
                let expected = out.lock().unwrap().expect.pop_front();
                let refused = match &msg {
                    Message::Error { errno, text } => Some(format!("{text} (errno {errno})")),
                    _ => None,
                };
                match (expected, refused) {
                    (Some(Expect::Register(dev)), None) => print(&format!("registered {dev}")),
                    (Some(Expect::Register(dev)), Some(why)) => return Err(format!("register {dev}: {why}").into()),
                    (Some(Expect::Answer(what)), Some(why)) => eprintln!("dmemu: answer {what:?} refused: {why}"),
                    (Some(Expect::Answer(_)), None) => {}
                    (None, _) => eprintln!("dmemu: unexpected reply {msg}"),
                }
            }
            Message::PgInit { id, .. } | Message::Err { id, .. } => {
                let (action, cmd_word) = if matches!(msg, Message::PgInit { .. }) {
                    pg_n += 1;
                    let act = nth(&a.pg_init, pg_n - 1, What::Flags(MpFlags::empty()));
                    let cw = match act.what {
                        What::Flags(f) => (Command::Done { id: *id, flags: f }, flags_word(f)),
                        What::Default => (Command::Done { id: *id, flags: MpFlags::empty() }, "ok".into()),
                        What::Retry { delayed } => (
                            Command::Retry { id: *id, delayed },
                            if delayed { "retry-delayed" } else { "retry" }.into(),
                        ),
                    };
                    (act, cw)
                } else {
                    err_n += 1;
                    let act = nth(&a.err, err_n - 1, What::Default);
                    let Message::Err { errno, .. } = msg else { unreachable!() };
                    let flags = match act.what {
                        What::Flags(f) => f,
                        _ => default_err(errno),
                    };
                    (act, (Command::Done { id: *id, flags }, flags_word(flags)))
                };
                let (id, desc) = (*id, describe(&msg));
                let (cmd, word) = cmd_word;
                if action.sleep.is_zero() {
                    out.lock().unwrap().answer(&desc, cmd, &word);
                } else {
                    out.lock().unwrap().waiting.insert(id, desc);
                    let out = out.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(action.sleep);
                        let mut o = out.lock().unwrap();
                        // A request the daemon cancelled meanwhile is not answered.
                        if let Some(desc) = o.waiting.remove(&id) {
                            o.answer(&desc, cmd, &word);
                        }
                    });
                }
            }
            Message::Cancel { id, reason } => {
                let desc = out.lock().unwrap().waiting.remove(id);
                match desc {
                    Some(desc) => print(&format!("{desc} -> {reason}")),
                    None => print(&msg.to_string()),
                }
            }
            Message::Released { .. } => print(&msg.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse() {
        let a = |s| parse_pg_init(s).unwrap();
        assert_eq!(a("ok"), Action { sleep: Duration::ZERO, what: What::Flags(MpFlags::empty()) });
        assert_eq!(a("sleep=500:fail").sleep, Duration::from_millis(500));
        assert_eq!(a("sleep=500:fail").what, What::Flags(MpFlags::FAIL_PATH));
        assert_eq!(a("6").what, What::Flags(MpFlags::BYPASS_PG | MpFlags::ERROR_IO));
        assert_eq!(a("retry-delayed").what, What::Retry { delayed: true });
        assert!(parse_err("retry").is_err());
        assert_eq!(parse_err("default").unwrap().what, What::Default);
        for bad in ["", "8", "sleep=:ok", "sleep=5", "sleep=x:ok", "maybe"] {
            assert!(parse_pg_init(bad).is_err(), "{bad:?}");
        }
        let seq = [a("fail"), a("ok")];
        assert_eq!(nth(&seq, 0, What::Default).what, What::Flags(MpFlags::FAIL_PATH));
        assert_eq!(nth(&seq, 5, What::Default).what, What::Flags(MpFlags::empty()));
        assert_eq!(nth(&[], 5, What::Default).what, What::Default);
        assert_eq!(flags_word(MpFlags::FAIL_PATH | MpFlags::BYPASS_PG), "3");
    }
}
