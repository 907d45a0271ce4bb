//! `dmemu switch upload DEV --page-size N [--pte-bits B] MAP`: loads a switch device's page table
//! (docs/protocols.md, "The dm-switch page-table upload") through [`dmemu::client::switch`].

use std::io::Read;
use std::path::PathBuf;

use dmemu::client::switch::{switch_info, upload_genl, upload_messages, GenlUpload, SwitchInfo};
use dmemu::client::Client;

use super::Result;

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

/// Reads MAP: text path indices, or raw packed words.
fn read_map(a: &UploadArgs, info: &SwitchInfo, bits: u8) -> Result<Vec<u32>> {
    let mut data = Vec::new();
    if a.map == "-" {
        std::io::stdin().read_to_end(&mut data)?;
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
const PROGRESS_MIN_REGIONS: u64 = 1 << 19;

pub fn run(args: SwitchArgs) -> Result {
    let SwitchCmd::Upload(a) = args.cmd;
    let socket = a.socket.clone().unwrap_or_else(dmemu::client::daemon::default_socket);
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
        let to = GenlUpload { dev: info.dev, dev_count, page_size: a.page_size, bits, userland };
        upload_genl(&mut c, &to, &entries, progress)?
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
