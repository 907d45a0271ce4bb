//! The lines of the userspace hardware handler's protocol (docs/multipath-hwh.md): what a handler
//! program sends ([`Command`]) and what the daemon sends it ([`Message`]), each one line of ASCII
//! words separated by spaces, one line per frame (`HWH` one way, `HWH_MSG` the other).
//!
//! Device names and handler arguments are bytes that may hold spaces or anything else: on the wire
//! every byte that is not printable ASCII (`!` to `~`), and every `%`, is written `%XX` (two hex
//! digits), so a word never holds a space and plain names read as themselves.

use std::fmt;

use crate::dm::DevNum;
use crate::io::Op;
use crate::targets::multipath::handler::MpFlags;

/// A name or argument as one wire word.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The bytes of a wire word (`%XX` decoded).
pub fn unescape(word: &str) -> Result<Vec<u8>, String> {
    let raw = word.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let b = hex
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad escape in {word:?}"))?;
            out.push(b);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// What a handler program asks of the daemon. Every command is answered, in order, with
/// [`Message::Ok`] or [`Message::Error`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `register <name> [timeout_ms=N]`: send this session the requests of the device now called
    /// `name` (answered `ok <minor>`). `timeout_ms` bounds each request (0: no bound; default
    /// 60000).
    Register { name: Vec<u8>, timeout_ms: Option<u64> },
    /// `unregister <name>`: stop (answered `ok <minor>`).
    Unregister { name: Vec<u8> },
    /// `done <id> <flags>`: the answer to a `pg_init` or `err` request.
    Done { id: u64, flags: MpFlags },
    /// `retry <id>` / `retry_delayed <id>`: a `pg_init` is to be tried again.
    Retry { id: u64, delayed: bool },
}

/// What the daemon sends a handler program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// `ok [<minor>]`: the command succeeded (`register` and `unregister` give the minor).
    Ok { minor: Option<u32> },
    /// `error <errno> <text>`: the command failed (the text runs to the end of the line).
    Error { errno: i32, text: String },
    /// `pg_init <id> <name> <group> <maj:min> <bypassed 0|1> [<handler args>…]`.
    PgInit { id: u64, name: Vec<u8>, group: u32, dev: DevNum, bypassed: bool, args: Vec<String> },
    /// `err <id> <name> <group> <maj:min> <op> <sector> <sectors> <errno>`.
    Err { id: u64, name: Vec<u8>, group: u32, dev: DevNum, op: Op, sector: u64, sectors: u64, errno: i32 },
    /// `cancel <id> <reason>`: the request ended without the program's answer (`timeout`,
    /// `dropped` when its table went away); an answer to it now gets `error`.
    Cancel { id: u64, reason: String },
    /// `released <name> <reason>`: this session no longer gets the device's requests (`replaced`
    /// by another session's registration, `removed` with the device).
    Released { name: Vec<u8>, reason: String },
}

pub fn op_name(op: Op) -> &'static str {
    match op {
        Op::Read => "read",
        Op::Write => "write",
        Op::Flush => "flush",
        Op::Discard => "discard",
        Op::WriteZeroes => "write_zeroes",
    }
}

fn parse_op(w: &str) -> Result<Op, String> {
    Ok(match w {
        "read" => Op::Read,
        "write" => Op::Write,
        "flush" => Op::Flush,
        "discard" => Op::Discard,
        "write_zeroes" => Op::WriteZeroes,
        _ => return Err(format!("unknown operation {w:?}")),
    })
}

/// The seed's flags from their decimal bitmask; unknown bits are refused.
pub fn parse_flags(w: &str) -> Result<MpFlags, String> {
    let v: u32 = num(w, "flags")?;
    MpFlags::from_bits(v).ok_or_else(|| format!("flags {v}: only bits 1, 2 and 4 exist"))
}

fn num<T: std::str::FromStr>(w: &str, what: &str) -> Result<T, String> {
    // Plain decimal digits only (no sign, no spaces).
    if w.is_empty() || !w.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("{what}: {w:?} is not a decimal number"));
    }
    w.parse().map_err(|_| format!("{what}: {w:?} is out of range"))
}

fn dev(w: &str) -> Result<DevNum, String> {
    DevNum::parse(w).ok_or_else(|| format!("{w:?} is not major:minor"))
}

fn bool01(w: &str) -> Result<bool, String> {
    match w {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(format!("{w:?} is not 0 or 1")),
    }
}

/// The words of a line (one trailing newline allowed).
fn words(line: &str) -> Vec<&str> {
    line.strip_suffix('\n').unwrap_or(line).split_ascii_whitespace().collect()
}

/// Exactly `n` words after the command word, or an error naming the command's form.
fn arity<'a>(w: &'a [&'a str], n: usize, form: &str) -> Result<&'a [&'a str], String> {
    if w.len() != n + 1 {
        return Err(format!("usage: {form}"));
    }
    Ok(&w[1..])
}

impl Command {
    pub fn parse(line: &str) -> Result<Self, String> {
        let w = words(line);
        let Some(&cmd) = w.first() else {
            return Err("empty line".into());
        };
        Ok(match cmd {
            "register" => {
                if !(2..=3).contains(&w.len()) {
                    return Err("usage: register <name> [timeout_ms=N]".into());
                }
                let timeout_ms = match w.get(2) {
                    None => None,
                    Some(opt) => match opt.strip_prefix("timeout_ms=") {
                        Some(v) => Some(num(v, "timeout_ms")?),
                        None => return Err(format!("unknown option {opt:?}")),
                    },
                };
                Command::Register { name: unescape(w[1])?, timeout_ms }
            }
            "unregister" => Command::Unregister { name: unescape(arity(&w, 1, "unregister <name>")?[0])? },
            "done" => {
                let a = arity(&w, 2, "done <id> <flags>")?;
                Command::Done { id: num(a[0], "id")?, flags: parse_flags(a[1])? }
            }
            "retry" | "retry_delayed" => {
                let a = arity(&w, 1, &format!("{cmd} <id>"))?;
                Command::Retry { id: num(a[0], "id")?, delayed: cmd == "retry_delayed" }
            }
            _ => return Err(format!("unknown command {:?}", cmd.escape_debug().to_string())),
        })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Register { name, timeout_ms: None } => write!(f, "register {}", escape(name)),
            Command::Register { name, timeout_ms: Some(t) } => write!(f, "register {} timeout_ms={t}", escape(name)),
            Command::Unregister { name } => write!(f, "unregister {}", escape(name)),
            Command::Done { id, flags } => write!(f, "done {id} {}", flags.bits()),
            Command::Retry { id, delayed: false } => write!(f, "retry {id}"),
            Command::Retry { id, delayed: true } => write!(f, "retry_delayed {id}"),
        }
    }
}

impl Message {
    pub fn parse(line: &str) -> Result<Self, String> {
        let w = words(line);
        let Some(&kind) = w.first() else {
            return Err("empty line".into());
        };
        Ok(match kind {
            "ok" => match w.len() {
                1 => Message::Ok { minor: None },
                2 => Message::Ok { minor: Some(num(w[1], "minor")?) },
                _ => return Err("usage: ok [<minor>]".into()),
            },
            "error" => {
                let Some(&errno) = w.get(1) else {
                    return Err("usage: error <errno> <text>".into());
                };
                let line = line.strip_suffix('\n').unwrap_or(line);
                // The text is everything after the errno word, spaces kept.
                let text = line.trim_start()["error".len()..].trim_start()[errno.len()..].trim_start();
                Message::Error { errno: num(errno, "errno")?, text: text.to_owned() }
            }
            "pg_init" => {
                if w.len() < 6 {
                    return Err("usage: pg_init <id> <name> <group> <maj:min> <bypassed> [<args>…]".into());
                }
                let args = w[6..]
                    .iter()
                    .map(|a| String::from_utf8(unescape(a)?).map_err(|_| format!("argument {a:?} is not UTF-8")))
                    .collect::<Result<_, _>>()?;
                Message::PgInit {
                    id: num(w[1], "id")?,
                    name: unescape(w[2])?,
                    group: num(w[3], "group")?,
                    dev: dev(w[4])?,
                    bypassed: bool01(w[5])?,
                    args,
                }
            }
            "err" => {
                let a = arity(&w, 8, "err <id> <name> <group> <maj:min> <op> <sector> <sectors> <errno>")?;
                Message::Err {
                    id: num(a[0], "id")?,
                    name: unescape(a[1])?,
                    group: num(a[2], "group")?,
                    dev: dev(a[3])?,
                    op: parse_op(a[4])?,
                    sector: num(a[5], "sector")?,
                    sectors: num(a[6], "sectors")?,
                    errno: num(a[7], "errno")?,
                }
            }
            "cancel" => {
                let a = arity(&w, 2, "cancel <id> <reason>")?;
                Message::Cancel { id: num(a[0], "id")?, reason: a[1].to_owned() }
            }
            "released" => {
                let a = arity(&w, 2, "released <name> <reason>")?;
                Message::Released { name: unescape(a[0])?, reason: a[1].to_owned() }
            }
            _ => return Err(format!("unknown message {:?}", kind.escape_debug().to_string())),
        })
    }

    /// The request id of a `pg_init` or `err` line.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            Message::PgInit { id, .. } | Message::Err { id, .. } => Some(*id),
            _ => None,
        }
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Ok { minor: None } => write!(f, "ok"),
            Message::Ok { minor: Some(m) } => write!(f, "ok {m}"),
            // One line whatever the text holds.
            Message::Error { errno, text } => write!(f, "error {errno} {}", text.replace(['\n', '\r'], " ")),
            Message::PgInit { id, name, group, dev, bypassed, args } => {
                write!(f, "pg_init {id} {} {group} {dev} {}", escape(name), *bypassed as u8)?;
                for a in args {
                    write!(f, " {}", escape(a.as_bytes()))?;
                }
                Ok(())
            }
            Message::Err { id, name, group, dev, op, sector, sectors, errno } => {
                write!(f, "err {id} {} {group} {dev} {} {sector} {sectors} {errno}", escape(name), op_name(*op))
            }
            Message::Cancel { id, reason } => write!(f, "cancel {id} {reason}"),
            Message::Released { name, reason } => write!(f, "released {} {reason}", escape(name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_and_keeps_plain_names() {
        assert_eq!(escape(b"mpath0"), "mpath0");
        assert_eq!(escape(b"a b%c\n\xff"), "a%20b%25c%0A%FF");
        for raw in [&b"a b%c\n\xff"[..], b"", b"%%", b"x%2"] {
            assert_eq!(unescape(&escape(raw)).unwrap(), raw);
        }
        assert_eq!(unescape("%2f%2F").unwrap(), b"//");
        for bad in ["%", "%2", "%zz", "a%2g", "%+1"] {
            assert!(unescape(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn commands_parse_and_format() {
        let cases = [
            ("register mp", Command::Register { name: b"mp".to_vec(), timeout_ms: None }),
            ("register my%20dev timeout_ms=250", Command::Register { name: b"my dev".to_vec(), timeout_ms: Some(250) }),
            ("unregister mp", Command::Unregister { name: b"mp".to_vec() }),
            ("done 7 0", Command::Done { id: 7, flags: MpFlags::empty() }),
            (
                "done 18446744073709551615 5",
                Command::Done { id: u64::MAX, flags: MpFlags::FAIL_PATH | MpFlags::ERROR_IO },
            ),
            ("retry 3", Command::Retry { id: 3, delayed: false }),
            ("retry_delayed 3", Command::Retry { id: 3, delayed: true }),
        ];
        for (line, cmd) in cases {
            assert_eq!(Command::parse(line).unwrap(), cmd, "{line}");
            assert_eq!(cmd.to_string(), line);
            assert_eq!(Command::parse(&format!("{line}\n")).unwrap(), cmd);
        }
    }

    #[test]
    fn malformed_commands_are_refused() {
        for bad in [
            "",
            "\n",
            "hello",
            "register",
            "register a b",
            "register a timeout_ms=",
            "register a timeout_ms=-1",
            "register a timeout_ms=99999999999999999999999",
            "unregister",
            "done",
            "done 1",
            "done x 0",
            "done 1 8",
            "done 1 -1",
            "done 1 0 0",
            "done +1 0",
            "retry",
            "retry 1 2",
            "register %zz",
            "DONE 1 0",
        ] {
            assert!(Command::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn messages_parse_and_format() {
        let dev = DevNum::new(253, 1);
        let cases = [
            ("ok", Message::Ok { minor: None }),
            ("ok 4", Message::Ok { minor: Some(4) }),
            ("error 6 no such device: a  b", Message::Error { errno: 6, text: "no such device: a  b".into() }),
            ("error 22 ", Message::Error { errno: 22, text: String::new() }),
            (
                "pg_init 1 mp 2 253:1 0",
                Message::PgInit { id: 1, name: b"mp".to_vec(), group: 2, dev, bypassed: false, args: vec![] },
            ),
            (
                "pg_init 9 m%20p 1 253:1 1 a%20b c",
                Message::PgInit {
                    id: 9,
                    name: b"m p".to_vec(),
                    group: 1,
                    dev,
                    bypassed: true,
                    args: vec!["a b".into(), "c".into()],
                },
            ),
            (
                "err 5 mp 1 253:1 write_zeroes 8 16 5",
                Message::Err {
                    id: 5,
                    name: b"mp".to_vec(),
                    group: 1,
                    dev,
                    op: Op::WriteZeroes,
                    sector: 8,
                    sectors: 16,
                    errno: 5,
                },
            ),
            ("cancel 5 timeout", Message::Cancel { id: 5, reason: "timeout".into() }),
            ("released mp replaced", Message::Released { name: b"mp".to_vec(), reason: "replaced".into() }),
        ];
        for (line, msg) in cases {
            assert_eq!(Message::parse(line).unwrap(), msg, "{line}");
            assert_eq!(msg.to_string(), line);
        }
        for op in [Op::Read, Op::Write, Op::Flush, Op::Discard, Op::WriteZeroes] {
            assert_eq!(parse_op(op_name(op)).unwrap(), op);
        }
        let multi = Message::Error { errno: 5, text: "a\nb".into() }.to_string();
        assert_eq!(multi, "error 5 a b");
    }

    #[test]
    fn malformed_messages_are_refused() {
        for bad in [
            "",
            "ok x",
            "ok 1 2",
            "error",
            "error x text",
            "pg_init 1 mp 1 253:1",
            "pg_init 1 mp 1 253 0",
            "pg_init 1 mp 1 253:1 2",
            "pg_init 1 mp 1 253:1 0 %ff",
            "err 1 mp 1 253:1 trim 0 8 5",
            "err 1 mp 1 253:1 read 0 8",
            "cancel 1",
            "released mp",
            "bogus",
        ] {
            assert!(Message::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(Message::parse("pg_init 3 mp 1 1:2 0").unwrap().request_id(), Some(3));
        assert_eq!(Message::parse("ok").unwrap().request_id(), None);
    }
}
