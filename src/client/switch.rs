//! The dm-switch page-table upload from the client side (docs/protocols.md, "The dm-switch
//! page-table upload"): an RFC-form switch gets the binary `IpcPgTable` upload in generic-netlink
//! frames of at most 65,480 bytes; an upstream-form one gets `set_region_mappings` messages of at
//! most 65,480 bytes. `dmemu switch upload`, the switch benchmarks and the tests drive these.

use std::time::{Duration, Instant};

use dmemu_frame::Kind;
use zerocopy::FromBytes;

use super::{Client, ClientError, IoctlBuf};
use crate::dm::DevNum;
use crate::ioctl::dm_switch::{self, IpcPgTable, ReplyMsg, MAX_ENTRY_BYTES, MAX_IPC_MSG_LEN};
use crate::ioctl::layout::{DmCmd, DmFlags, DmTargetSpec, DM_IOCTL_SIZE, DM_TARGET_SPEC_SIZE};

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

/// Finds the device (by name or number) and the first switch target of its live table.
pub fn switch_info(c: &mut Client, dev: &str) -> Result<SwitchInfo, ClientError> {
    let key = |cmd: DmCmd| match DevNum::parse(dev) {
        Some(d) => {
            let mut b = IoctlBuf::new(cmd);
            b.header.dev = d.huge_encode();
            b
        }
        None => IoctlBuf::new(cmd).name(dev.rsplit_once("/mapper/").map_or(dev, |(_, n)| n)),
    };
    let st = c.run(&key(DmCmd::DevStatus))?.check(dev)?;
    let h = st.header();
    let name =
        String::from_utf8_lossy(&h.name[..h.name.iter().position(|&c| c == 0).unwrap_or(h.name.len())]).into_owned();
    let devnum = DevNum::huge_decode(h.dev);
    let r = c.run(&key(DmCmd::TableStatus).flags(DmFlags::STATUS_TABLE))?.check(dev)?;
    let h = r.header();
    let mut at = DM_IOCTL_SIZE;
    for _ in 0..h.target_count {
        let spec = r
            .bytes
            .get(at..at + DM_TARGET_SPEC_SIZE)
            .and_then(|b| DmTargetSpec::read_from_bytes(b).ok())
            .ok_or_else(|| ClientError::Protocol("short TABLE_STATUS reply".into()))?;
        let params = &r.bytes[at + DM_TARGET_SPEC_SIZE..];
        let params = String::from_utf8_lossy(&params[..params.iter().position(|&c| c == 0).unwrap_or(params.len())])
            .into_owned();
        let ty = &spec.target_type[..spec.target_type.iter().position(|&c| c == 0).unwrap_or(16)];
        if ty == b"switch" {
            let w: Vec<&str> = params.split_whitespace().collect();
            let num = |i: usize| {
                w.get(i)
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| ClientError::Protocol(format!("unexpected switch table line {params:?}")))
            };
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
    Err(ClientError::Invalid(format!("{dev}: no switch target in the live table")))
}

/// Sends one GENL frame and returns the netlink messages of its GENL_REPLY (EVENT frames skipped).
pub fn genl(c: &mut Client, msg: &[u8]) -> Result<Vec<ReplyMsg>, ClientError> {
    let payload = c.exchange(Kind::Genl, msg, Kind::GenlReply)?;
    dm_switch::parse_reply(&payload).map_err(|e| ClientError::Protocol(e.to_string()))
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

/// Where an RFC upload goes and how its entries are packed.
#[derive(Clone, Copy, Debug)]
pub struct GenlUpload {
    pub dev: DevNum,
    /// The switch's path count.
    pub dev_count: u16,
    /// Region size in sectors (carried, not checked, as in the RFC).
    pub page_size: u32,
    /// Entry width, 1..=32.
    pub bits: u8,
    /// The two words the RFC status shows.
    pub userland: [u32; 2],
}

/// The RFC upload: `entries` (one path index per region, each < 2^bits) in `IpcPgTable` chunks
/// of at most [`MAX_IPC_MSG_LEN`] bytes. `progress(done, total)` runs after each chunk.
pub fn upload_genl(
    c: &mut Client,
    to: &GenlUpload,
    entries: &[u32],
    mut progress: impl FnMut(u64, u64),
) -> Result<UploadStats, ClientError> {
    let GenlUpload { dev, dev_count, page_size, bits, userland } = *to;
    let total = u32::try_from(entries.len()).map_err(|_| ClientError::Invalid("more than 2^32-1 regions".into()))?;
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
                return Err(ClientError::Errno {
                    what: format!("upload refused ({})", r.error()),
                    errno: r.status as i32,
                })
            }
            Some(ReplyMsg::Error(e)) => return Err(ClientError::Errno { what: "upload refused".into(), errno: -e }),
            other => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
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
) -> Result<UploadStats, ClientError> {
    let t = Instant::now();
    let mut stats = UploadStats::default();
    let msgs = mapping_messages(entries, 0, MAX_IPC_MSG_LEN);
    stats.encode = t.elapsed();
    let n = msgs.len() as u64;
    for (i, m) in msgs.into_iter().enumerate() {
        let b = IoctlBuf::new(DmCmd::TargetMsg).name(name).message(start, &m);
        c.run(&b)?.check("set_region_mappings")?;
        stats.messages += 1;
        stats.bytes += m.len() as u64;
        progress((i as u64 + 1) * entries.len() as u64 / n, entries.len() as u64);
    }
    stats.elapsed = t.elapsed();
    Ok(stats)
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
