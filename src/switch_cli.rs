//! `dmemu switch upload DEV --page-size N [--pte-bits B] MAP`: loads a switch device's page table
//! (docs/protocols.md). An RFC-form switch gets the binary `IpcPgTable` upload in chunks of at most
//! 65,480 bytes; an upstream-form one gets `set_region_mappings` messages of at most 65,480 bytes.
//! The functions here are also what the switch benchmarks and tests drive.

use std::io::{self, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use zerocopy::FromBytes;

use crate::client::{Client, IoctlBuf};
use crate::dm::DevNum;
use crate::ioctl::dm_switch::{self, IpcPgTable, ReplyMsg, MAX_ENTRY_BYTES, MAX_IPC_MSG_LEN};
use crate::ioctl::layout::{DmCmd, DmFlags, DmTargetSpec, DM_IOCTL_SIZE, DM_TARGET_SPEC_SIZE};
use crate::server::frame::{self, Kind, HEADER_LEN};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(clap::Args, Debug)]
pub struct SwitchArgs {
    #[command(subcommand)]
    pub cmd: SwitchCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum SwitchCmd {
    /// Load a switch device's page table: one path index per region.
    Upload(UploadArgs),
}

#[derive(clap::Args, Debug)]
pub struct UploadArgs {
    /// Control socket path (default: $DMEMU_SOCKET, else a per-user default).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The device: a name, /dev/mapper/NAME or MAJOR:MINOR.
    pub dev: String,
    /// Region (page) size in sectors; must match the device's table.
    #[arg(long)]
    pub page_size: u32,
    /// Entry width in bits (default: the smallest that holds the device's path count). RFC-form
    /// devices only: upstream-form widths are fixed by the table.
    #[arg(long)]
    pub pte_bits: Option<u8>,
    /// The two userland words the RFC status shows (decimal or 0x-hex).
    #[arg(long, num_args = 2, value_names = ["W0", "W1"], value_parser = parse_word)]
    pub userland: Option<Vec<u32>>,
    /// MAP holds raw packed entries (the RFC's `ptbl_buff` layout: `32 / pte_bits` per native
    /// 32-bit word, least significant first) instead of text.
    #[arg(long)]
    pub raw: bool,
    /// With --raw: how many entries MAP holds (default: the device's region count).
    #[arg(long)]
    pub regions: Option<u64>,
    /// The map: decimal path indices separated by whitespace, one per region from region 0 ("-":
    /// standard input).
    pub map: String,
}

fn parse_word(s: &str) -> std::result::Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?}: {e}"))
}

/// The switch target of a device's live table, as `TABLE_STATUS` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchInfo {
    pub name: String,
    pub dev: DevNum,
    /// Where the switch target starts and how long it is.
    pub start: u64,
    pub len: u64,
    /// `true` for the RFC form (even argument count).
    pub rfc: bool,
    pub paths: u64,
    pub region_size: u64,
}

impl SwitchInfo {
    pub fn regions(&self) -> u64 {
        self.len.div_ceil(self.region_size)
    }
    /// The smallest entry width that holds the path count.
    pub fn default_bits(&self) -> u8 {
        (64 - self.paths.saturating_sub(1).leading_zeros()).max(1) as u8
    }
}

fn check_ioctl(r: &crate::client::IoctlResult, what: &str) -> Result {
    if r.ret < 0 {
        return Err(format!("{what}: {}", io::Error::from_raw_os_error(r.errno)).into());
    }
    Ok(())
}

/// Finds the device (by name or number) and the first switch target of its live table.
pub fn switch_info(c: &mut Client, dev: &str) -> Result<SwitchInfo> {
    let key = |cmd: DmCmd| match DevNum::parse(dev) {
        Some(d) => {
            let mut b = IoctlBuf::new(cmd);
            b.header.dev = d.huge_encode();
            b
        }
        None => IoctlBuf::new(cmd).name(dev.rsplit_once("/mapper/").map_or(dev, |(_, n)| n)),
    };
    let st = c.run(&key(DmCmd::DevStatus))?;
    check_ioctl(&st, dev)?;
    let h = st.header();
    let name =
        String::from_utf8_lossy(&h.name[..h.name.iter().position(|&c| c == 0).unwrap_or(h.name.len())]).into_owned();
    let devnum = DevNum::huge_decode(h.dev);
    let r = c.run(&key(DmCmd::TableStatus).flags(DmFlags::STATUS_TABLE))?;
    check_ioctl(&r, dev)?;
    let h = r.header();
    let mut at = DM_IOCTL_SIZE;
    for _ in 0..h.target_count {
        let spec = r
            .bytes
            .get(at..at + DM_TARGET_SPEC_SIZE)
            .and_then(|b| DmTargetSpec::read_from_bytes(b).ok())
            .ok_or("short TABLE_STATUS reply")?;
        let params = &r.bytes[at + DM_TARGET_SPEC_SIZE..];
        let params = String::from_utf8_lossy(&params[..params.iter().position(|&c| c == 0).unwrap_or(params.len())])
            .into_owned();
        let ty = &spec.target_type[..spec.target_type.iter().position(|&c| c == 0).unwrap_or(16)];
        if ty == b"switch" {
            let w: Vec<&str> = params.split_whitespace().collect();
            let num = |i: usize| w.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or("unexpected switch table line");
            return Ok(SwitchInfo {
                name,
                dev: devnum,
                start: spec.sector_start,
                len: spec.length,
                rfc: w.len().is_multiple_of(2),
                paths: num(0)?,
                region_size: num(1)?,
            });
        }
        at = DM_IOCTL_SIZE + spec.next as usize;
    }
    Err(format!("{dev}: no switch target in the live table").into())
}

/// Sends one GENL frame and returns the netlink messages of its GENL_REPLY (EVENT frames skipped).
pub fn genl(c: &mut Client, msg: &[u8]) -> Result<Vec<ReplyMsg>> {
    let s = c.stream();
    frame::write_frame(s, Kind::Genl, &[msg])?;
    loop {
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h)?;
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let kind = u16::from_le_bytes([h[4], h[5]]);
        let payload = frame::read_payload(s, len)?;
        if kind == Kind::Event as u16 {
            continue;
        }
        if kind != Kind::GenlReply as u16 {
            return Err(format!("unexpected reply frame kind {kind:#x}").into());
        }
        return Ok(dm_switch::parse_reply(&payload)?);
    }
}

/// What an upload did.
#[derive(Clone, Copy, Debug, Default)]
pub struct UploadStats {
    pub messages: u64,
    pub bytes: u64,
    /// The whole upload, encoding included.
    pub elapsed: Duration,
    /// Of which building the messages (messages only: the binary chunks are packed as they go).
    pub encode: Duration,
}

/// The RFC upload: `entries` (one path index per region, each < 2^bits) in `IpcPgTable` chunks
/// of at most [`MAX_IPC_MSG_LEN`] bytes. `progress(done, total)` runs after each chunk.
#[allow(clippy::too_many_arguments)]
pub fn upload_genl(
    c: &mut Client,
    dev: DevNum,
    dev_count: u16,
    page_size: u32,
    bits: u8,
    userland: [u32; 2],
    entries: &[u32],
    mut progress: impl FnMut(u64, u64),
) -> Result<UploadStats> {
    let total = u32::try_from(entries.len()).map_err(|_| "more than 2^32-1 regions")?;
    let per_chunk = MAX_ENTRY_BYTES / 4 * (32 / bits as usize);
    let t = Instant::now();
    let mut stats = UploadStats::default();
    let mut seq = 1u32;
    for (i, chunk) in entries.chunks(per_chunk.max(1)).enumerate() {
        let h = IpcPgTable {
            userland,
            dev_major: dev.major,
            dev_minor: dev.minor,
            page_total: total,
            page_offset: (i * per_chunk) as u32,
            page_count: chunk.len() as u32,
            page_size,
            dev_count,
            pte_bits: bits,
            ..Default::default()
        };
        let msg = dm_switch::page_table_message(&h, &dm_switch::pack_entries(chunk.iter().copied(), bits));
        debug_assert!(msg.len() <= MAX_IPC_MSG_LEN);
        let req = dm_switch::upload_request(seq, &msg);
        seq = seq.wrapping_add(1);
        let reply = genl(c, &req)?;
        match reply.first() {
            Some(ReplyMsg::Response(r)) if r.status == 0 => {}
            Some(ReplyMsg::Response(r)) => {
                return Err(format!(
                    "upload refused ({}): {}",
                    io::Error::from_raw_os_error(r.status as i32),
                    r.error()
                )
                .into())
            }
            Some(ReplyMsg::Error(e)) => {
                return Err(format!("upload refused: {}", io::Error::from_raw_os_error(-e)).into())
            }
            other => return Err(format!("unexpected reply {other:?}").into()),
        }
        stats.messages += 1;
        stats.bytes += msg.len() as u64;
        progress(((i * per_chunk) + chunk.len()) as u64, total as u64);
    }
    stats.elapsed = t.elapsed();
    Ok(stats)
}

/// `set_region_mappings` arguments for `entries` from region `first`, in messages of at most
/// `max_len` bytes: `idx:path` to start each message, `:path` after, and `R<n>,<m>` where the last
/// n ≤ 16 entries repeat for at least 4 more regions.
pub fn mapping_messages(entries: &[u32], first: u64, max_len: usize) -> Vec<String> {
    const KEYWORD: &str = "set_region_mappings";
    let mut out = Vec::new();
    let mut cur = String::from(KEYWORD);
    // Whether the current message has an argument (then the kernel's cursor is at i − 1).
    let mut started = false;
    let mut arg = String::new();
    let mut i = 0usize;
    while i < entries.len() {
        // The longest periodic continuation of what is already in the table.
        let mut best = (0usize, 0usize);
        if started {
            for n in 1..=i.min(16) {
                // Only runs of at least 4 are worth an R; most candidates fail on the first entry.
                if entries.len() - i < 4 || (0..4).any(|k| entries[i + k] != entries[i + k - n]) {
                    continue;
                }
                let m =
                    4 + entries[i + 4..].iter().enumerate().take_while(|&(k, &v)| v == entries[i + 4 + k - n]).count();
                if m > best.1 {
                    best = (n, m);
                }
            }
        }
        arg.clear();
        let step = if best.1 >= 4 {
            arg.push('R');
            push_hex(&mut arg, best.0 as u64);
            arg.push(',');
            push_hex(&mut arg, best.1 as u64);
            best.1
        } else if started {
            arg.push(':');
            push_hex(&mut arg, entries[i] as u64);
            1
        } else {
            push_hex(&mut arg, first + i as u64);
            arg.push(':');
            push_hex(&mut arg, entries[i] as u64);
            1
        };
        if started && cur.len() + 1 + arg.len() > max_len {
            out.push(std::mem::replace(&mut cur, String::from(KEYWORD)));
            started = false;
            continue;
        }
        cur.push(' ');
        cur.push_str(&arg);
        started = true;
        i += step;
    }
    if started {
        out.push(cur);
    }
    out
}

/// Lowercase hex without a prefix (the message grammar's numbers).
fn push_hex(s: &mut String, v: u64) {
    let digits = (64 - v.leading_zeros()).div_ceil(4).max(1);
    for k in (0..digits).rev() {
        s.push(char::from_digit(((v >> (4 * k)) & 0xf) as u32, 16).expect("a hex digit"));
    }
}

/// The upstream upload: `entries` through `set_region_mappings` messages to the switch target at
/// sector `start` of device `name`.
pub fn upload_messages(
    c: &mut Client,
    name: &str,
    start: u64,
    entries: &[u32],
    mut progress: impl FnMut(u64, u64),
) -> Result<UploadStats> {
    let t = Instant::now();
    let mut stats = UploadStats::default();
    let msgs = mapping_messages(entries, 0, MAX_IPC_MSG_LEN);
    stats.encode = t.elapsed();
    let n = msgs.len() as u64;
    for (i, m) in msgs.into_iter().enumerate() {
        let b = IoctlBuf::new(DmCmd::TargetMsg).name(name).message(start, &m);
        check_ioctl(&c.run(&b)?, "set_region_mappings")?;
        stats.messages += 1;
        stats.bytes += m.len() as u64;
        progress((i as u64 + 1) * entries.len() as u64 / n, entries.len() as u64);
    }
    stats.elapsed = t.elapsed();
    Ok(stats)
}

/// Reads MAP: text path indices, or raw packed words.
fn read_map(a: &UploadArgs, info: &SwitchInfo, bits: u8) -> Result<Vec<u32>> {
    let mut data = Vec::new();
    if a.map == "-" {
        io::stdin().read_to_end(&mut data)?;
    } else {
        data = std::fs::read(&a.map).map_err(|e| format!("{}: {e}", a.map))?;
    }
    if !a.raw {
        let text =
            String::from_utf8(data).map_err(|_| format!("{}: not text (use --raw for packed entries)", a.map))?;
        return text
            .split_ascii_whitespace()
            .enumerate()
            .map(|(i, w)| {
                w.parse::<u32>().map_err(|_| format!("{}: entry {i}: {w:?} is not a path index", a.map).into())
            })
            .collect();
    }
    let n = a.regions.unwrap_or_else(|| info.regions());
    let per_word = 32 / bits as u64;
    let need = n.div_ceil(per_word) * 4;
    if (data.len() as u64) < need {
        return Err(format!("{}: {} bytes hold fewer than {n} entries of {bits} bits", a.map, data.len()).into());
    }
    let mask = if bits >= 32 { u32::MAX } else { (1u32 << bits) - 1 };
    Ok((0..n)
        .map(|i| {
            let w = (i / per_word) as usize * 4;
            let word = u32::from_ne_bytes(data[w..w + 4].try_into().expect("4 bytes"));
            (word >> ((i % per_word) as u32 * bits as u32)) & mask
        })
        .collect())
}

/// Tables of at least this many regions get progress lines on standard error.
pub const PROGRESS_MIN_REGIONS: u64 = 1 << 19;

pub fn run(args: SwitchArgs, default_socket: PathBuf) -> Result {
    let SwitchCmd::Upload(a) = args.cmd;
    let socket = a.socket.clone().unwrap_or(default_socket);
    let mut c = Client::connect(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    let info = switch_info(&mut c, &a.dev)?;
    if info.region_size != a.page_size as u64 {
        return Err(
            format!("{}: --page-size {} does not match the table's {}", a.dev, a.page_size, info.region_size).into()
        );
    }
    let bits = match (a.pte_bits, info.rfc) {
        (Some(b), true) if (1..=32).contains(&b) => b,
        (Some(b), true) => return Err(format!("--pte-bits {b}: must be 1..=32").into()),
        (Some(b), false) if b != info.default_bits() => {
            return Err(format!("{}: an upstream-form switch has {}-bit entries", a.dev, info.default_bits()).into())
        }
        _ => info.default_bits(),
    };
    let entries = read_map(&a, &info, bits)?;
    let limit = if info.rfc {
        if bits >= 32 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    } else {
        info.paths - 1
    };
    if let Some((i, v)) = entries.iter().enumerate().find(|(_, &v)| v as u64 > limit) {
        return Err(format!("{}: entry {i} is {v}, more than {limit}", a.map).into());
    }
    if entries.len() as u64 != info.regions() {
        eprintln!("dmemu: {}: the map has {} entries, the device {} regions", a.dev, entries.len(), info.regions());
    }
    // Progress at every tenth of a big table.
    let mut shown = 0u64;
    let progress = |done: u64, total: u64| {
        let tenth = done * 10 / total.max(1);
        if total >= PROGRESS_MIN_REGIONS && tenth > shown {
            shown = tenth;
            eprintln!("{}: {done}/{total} regions ({}%)", info.name, done * 100 / total.max(1));
        }
    };
    let stats = if info.rfc {
        let dev_count = u16::try_from(info.paths).map_err(|_| "more than 65535 paths")?;
        let userland = a.userland.as_deref().map_or([0; 2], |u| [u[0], u[1]]);
        upload_genl(&mut c, info.dev, dev_count, a.page_size, bits, userland, &entries, progress)?
    } else {
        if a.userland.is_some() {
            return Err(format!("{}: --userland needs an RFC-form switch", a.dev).into());
        }
        if entries.len() as u64 > info.regions() {
            return Err(format!(
                "{}: the map has {} entries, the device only {} regions",
                a.dev,
                entries.len(),
                info.regions()
            )
            .into());
        }
        upload_messages(&mut c, &info.name, info.start, &entries, progress)?
    };
    println!(
        "{}: {} regions in {} {} ({} bytes, {:.1} ms)",
        info.name,
        entries.len(),
        stats.messages,
        if info.rfc { "IpcPgTable messages" } else { "set_region_mappings messages" },
        stats.bytes,
        stats.elapsed.as_secs_f64() * 1e3
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays messages the way the kernel reads them (cursor reset per message).
    fn replay(msgs: &[String], n: usize) -> Vec<u32> {
        let mut e = vec![u32::MAX; n];
        for m in msgs {
            let mut cur = 0usize;
            for a in m.split(' ').skip(1) {
                if let Some(r) = a.strip_prefix('R') {
                    let (p, k) = r.split_once(',').unwrap();
                    let (p, k) = (usize::from_str_radix(p, 16).unwrap(), usize::from_str_radix(k, 16).unwrap());
                    for _ in 0..k {
                        cur += 1;
                        e[cur] = e[cur - p];
                    }
                } else {
                    let (i, p) = a.split_once(':').unwrap();
                    cur = if i.is_empty() { cur + 1 } else { usize::from_str_radix(i, 16).unwrap() };
                    e[cur] = u32::from_str_radix(p, 16).unwrap();
                }
            }
        }
        e
    }

    #[test]
    fn messages_cover_the_map_within_the_size_bound() {
        let maps: Vec<Vec<u32>> = vec![
            (0..1000).map(|i| i % 3).collect(),
            (0..5000u32).map(|i| i.wrapping_mul(2654435761) >> 28).collect(),
            vec![5; 77],
            vec![1],
            (0..300).map(|i| if i % 50 < 25 { i % 4 } else { 7 }).collect(),
        ];
        for m in maps {
            for max in [40, 100, 65480] {
                let msgs = mapping_messages(&m, 0, max);
                assert!(msgs.iter().all(|s| s.len() <= max), "{msgs:?}");
                assert_eq!(replay(&msgs, m.len()), m, "max {max}");
            }
        }
        // Round-robin compresses to a few arguments.
        let rr: Vec<u32> = (0..100_000).map(|i| i % 16).collect();
        assert!(mapping_messages(&rr, 0, 65480)[0].len() < 200);
    }
}
