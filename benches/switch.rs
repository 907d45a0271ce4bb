//! Switch-target benchmarks: `cargo bench --bench switch`. Results and the exact command:
//! docs/PERFORMANCE.md, "switch".
//!
//! One run measures, on the same routing (N regions over P paths, a pseudo-random path per
//! region):
//! * memory and load time of the switch's page table against the same routing loaded as an
//!   N-line `linear` table through `DM_TABLE_LOAD` — each in its own `dmemu serve` process, through
//!   the real socket;
//! * the full upload, by `IpcPgTable` chunks (RFC form) and by `set_region_mappings` messages
//!   (upstream form), through the same daemon;
//! * lookups per second on one core, in-process (no socket: the data plane calls
//!   [`Target::map`] in the daemon's address space);
//! * lookups per second while another core uploads whole tables as fast as it can.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::{pin_to_cpu, spawn_daemon, work_dir, Result};
use dmemu::client::switch::{upload_genl, upload_messages, GenlUpload};
use dmemu::client::{Client, IoctlBuf};
use dmemu::dm::pdev::{Pdev, PdevKind};
use dmemu::dm::target::Target;
use dmemu::dm::{DevNum, Sectors};
use dmemu::ioctl::dm_switch::{self, IpcPgTable, MAX_ENTRY_BYTES};
use dmemu::ioctl::layout::{DmCmd, DmFlags};
use dmemu::targets::switch::Switch;

#[derive(Parser, Debug)]
#[command(about = "dmemu's switch-target benchmarks (docs/PERFORMANCE.md, \"switch\")")]
struct BenchSwitchArgs {
    /// Regions in the table.
    #[arg(long, default_value_t = 1_048_576)]
    pub regions: u32,
    /// Paths (member devices).
    #[arg(long, default_value_t = 16)]
    pub paths: u32,
    /// Region (page) size in sectors.
    #[arg(long, default_value_t = 8)]
    pub region_size: u32,
    /// Lookups per in-process measurement.
    #[arg(long, default_value_t = 200_000_000)]
    pub lookups: u64,
    /// Repetitions of each upload (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeat: u32,
    /// Where daemons keep sockets, sysfs trees and the sparse backing files (default: /dev/shm).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Skip the N-line linear table comparison.
    #[arg(long)]
    pub no_linear: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The routing every figure uses: a fixed pseudo-random path per region.
fn routing(regions: u32, paths: u32) -> Vec<u32> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..regions)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 32) % paths as u64) as u32
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Socketed {
    switch_rss: u64,
    switch_table_bytes: u64,
    switch_create: Duration,
    genl: Vec<Duration>,
    genl_msgs: u64,
    genl_bytes: u64,
    messages: Vec<Duration>,
    message_encode: Duration,
    message_count: u64,
    message_bytes: u64,
    linear: Option<(Duration, Duration, u64)>,
}

/// Everything that goes through a real daemon: the switch device (RFC and upstream forms) and the
/// linear table.
fn socketed(a: &BenchSwitchArgs, dir: &Path, entries: &[u32]) -> Result<Socketed> {
    let bits = (32 - (a.paths - 1).leading_zeros()).max(1) as u8;
    let len = a.regions as u64 * a.region_size as u64;
    let files: Vec<String> = (0..a.paths)
        .map(|i| {
            let f = dir.join(format!("path{i}.img"));
            std::fs::File::create(&f)?.set_len(len * 512)?;
            Ok(f.to_string_lossy().into_owned())
        })
        .collect::<std::io::Result<_>>()?;
    let sock = dir.join("switch.sock");
    let d = spawn_daemon(&sock, false)?;
    let mut c = Client::connect(&sock)?;
    let rfc_params: String = std::iter::once(format!("{} {}", a.paths, a.region_size))
        .chain(files.iter().map(|f| format!("{f} 0")))
        .collect::<Vec<_>>()
        .join(" ");
    let before = d.rss();
    let t = Instant::now();
    c.run(&IoctlBuf::new(DmCmd::DevCreate).name("rfc"))?.check("create")?;
    c.run(&IoctlBuf::new(DmCmd::TableLoad).name("rfc").table([(0, len, "switch", rfc_params.as_str())]))?
        .check("load")?;
    c.run(&IoctlBuf::new(DmCmd::DevSuspend).name("rfc"))?.check("resume")?;
    let switch_create = t.elapsed();
    let dev = DevNum::huge_decode(c.run(&IoctlBuf::new(DmCmd::DevStatus).name("rfc"))?.header().dev);
    let to = GenlUpload { dev, dev_count: a.paths as u16, page_size: a.region_size, bits, userland: [0, 0] };
    let mut genl = Vec::new();
    let mut stats = Default::default();
    for _ in 0..a.repeat.max(1) {
        stats = upload_genl(&mut c, &to, entries, |_, _| {})?;
        genl.push(stats.elapsed);
    }
    // The daemon's growth for the whole device with its table, after the uploads' transient copies.
    let switch_rss = d.rss().saturating_sub(before);
    c.run(&IoctlBuf::new(DmCmd::TableStatus).name("rfc"))?.check("status")?;

    let up_params: String = std::iter::once(format!("{} {} 0", a.paths, a.region_size))
        .chain(files.iter().map(|f| format!("{f} 0")))
        .collect::<Vec<_>>()
        .join(" ");
    c.run(&IoctlBuf::new(DmCmd::DevCreate).name("up"))?.check("create")?;
    c.run(&IoctlBuf::new(DmCmd::TableLoad).name("up").table([(0, len, "switch", up_params.as_str())]))?
        .check("load")?;
    c.run(&IoctlBuf::new(DmCmd::DevSuspend).name("up"))?.check("resume")?;
    let mut messages = Vec::new();
    let mut mstats = Default::default();
    for _ in 0..a.repeat.max(1) {
        mstats = upload_messages(&mut c, "up", 0, entries, |_, _| {})?;
        messages.push(mstats.elapsed);
    }
    drop(d);

    let linear = if a.no_linear { None } else { Some(linear_table(a, dir, &files, entries)?) };
    let per_word = 64 / bits as u64;
    Ok(Socketed {
        switch_rss,
        switch_table_bytes: (a.regions as u64).div_ceil(per_word) * 8,
        switch_create,
        genl,
        genl_msgs: stats.messages,
        genl_bytes: stats.bytes,
        messages,
        message_encode: mstats.encode,
        message_count: mstats.messages,
        message_bytes: mstats.bytes,
        linear,
    })
}

/// The same routing as an N-line linear table: (load, resume, resident bytes).
fn linear_table(
    a: &BenchSwitchArgs,
    dir: &Path,
    files: &[String],
    entries: &[u32],
) -> Result<(Duration, Duration, u64)> {
    let sock = dir.join("linear.sock");
    let d = spawn_daemon(&sock, false)?;
    let mut c = Client::connect(&sock)?;
    let rs = a.region_size as u64;
    let params: Vec<String> =
        entries.iter().enumerate().map(|(i, &p)| format!("{} {}", files[p as usize], i as u64 * rs)).collect();
    let bytes = IoctlBuf::new(DmCmd::TableLoad)
        .name("lin")
        .table(params.iter().enumerate().map(|(i, p)| (i as u64 * rs, rs, "linear", p.as_str())))
        .bytes();
    drop(params);
    c.run(&IoctlBuf::new(DmCmd::DevCreate).name("lin"))?.check("create")?;
    let before = d.rss();
    let t = Instant::now();
    c.ioctl(DmCmd::TableLoad.request(), &bytes)?.check("load")?;
    let load = t.elapsed();
    let t = Instant::now();
    c.run(&IoctlBuf::new(DmCmd::DevSuspend).name("lin"))?.check("resume")?;
    let resume = t.elapsed();
    let after = d.rss();
    let st = c.run(&IoctlBuf::new(DmCmd::DevStatus).name("lin"))?;
    if st.header().target_count != entries.len() as u32 || !st.header().flags().contains(DmFlags::ACTIVE_PRESENT) {
        return Err("linear table not live after resume".into());
    }
    Ok((load, resume, after.saturating_sub(before)))
}

fn fake_paths(n: u32) -> Vec<(Arc<Pdev>, Sectors)> {
    (0..n)
        .map(|i| {
            (
                Arc::new(Pdev::new(DevNum::new(8, i), PdevKind::Block { path: format!("/dev/p{i}") }, Sectors(0))),
                Sectors(0),
            )
        })
        .collect()
}

/// The upload as the daemon applies it, without the socket: `IpcPgTable` chunks through the
/// codec's checks into the switch.
struct Chunks(Vec<Vec<u8>>);

impl Chunks {
    fn new(entries: &[u32], bits: u8, paths: u16, page_size: u32) -> Self {
        let per_chunk = MAX_ENTRY_BYTES / 4 * (32 / bits as usize);
        Self(
            entries
                .chunks(per_chunk)
                .enumerate()
                .map(|(i, c)| {
                    let h = IpcPgTable {
                        page_total: entries.len() as u32,
                        page_offset: (i * per_chunk) as u32,
                        page_count: c.len() as u32,
                        page_size,
                        dev_count: paths,
                        pte_bits: bits,
                        ..Default::default()
                    };
                    dm_switch::page_table_message(&h, &dm_switch::pack_entries(c.iter().copied(), bits))
                })
                .collect(),
        )
    }
    fn apply(&self, sw: &Switch) {
        for m in &self.0 {
            let r = dm_switch::get_page_tbl(m, |_, u| sw.upload_page_table(u).expect("RFC form"));
            assert_eq!(r.status, 0, "{}", r.error());
        }
    }
}

/// A pseudo-random offset below `len` (an LCG step and a multiply-shift range reduction: no
/// division, so the loop measures the lookup).
#[inline(always)]
fn next(x: &mut u64, len: u64) -> u64 {
    *x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*x as u128 * len as u128) >> 64) as u64
}

/// Random-offset lookups through one guard, in batches of `batch` (the kernel's RCU section per
/// bio batch); returns lookups per second.
/// Random-offset lookups through one guard per batch of `batch` (the kernel's RCU section per bio
/// batch); returns lookups per second and each batch's duration in nanoseconds.
fn lookups_batched(sw: &Switch, n: u64, len: u64, batch: u64) -> (f64, Vec<u32>) {
    let mut x = 0x1234_5678u64;
    let mut acc = 0usize;
    let mut done = 0u64;
    let mut times = Vec::with_capacity((n / batch + 1) as usize);
    let t = Instant::now();
    let mut last = t;
    while done < n {
        let l = sw.lookup();
        for _ in 0..batch {
            acc = acc.wrapping_add(l.path(next(&mut x, len)).0);
        }
        drop(l);
        done += batch;
        let now = Instant::now();
        times.push((now - last).as_nanos().min(u32::MAX as u128) as u32);
        last = now;
    }
    std::hint::black_box(acc);
    (done as f64 / t.elapsed().as_secs_f64(), times)
}

/// The `q` quantile of batch times, in microseconds.
fn quantile_us(v: &mut [u32], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q) as usize] as f64 / 1e3
}

/// Random-offset `Target::map` calls, one guard and one counter update each.
fn maps(sw: &Switch, n: u64, len: u64) -> f64 {
    let mut x = 0x1234_5678u64;
    let mut acc = 0u64;
    let t = Instant::now();
    for _ in 0..n {
        if let dmemu::dm::target::Mapping::Remap { at: sector, .. } = sw.query(Sectors(next(&mut x, len)), Sectors(8)) {
            acc = acc.wrapping_add(sector.0);
        }
    }
    std::hint::black_box(acc);
    n as f64 / t.elapsed().as_secs_f64()
}

/// Lookup rates (per second) in the three kinds of window.
#[derive(Default)]
struct Windows {
    quiet: f64,
    busy: f64,
    control: f64,
    busy_uploads: u64,
    /// Durations of each batch of 1024 lookups, in nanoseconds.
    quiet_times: Vec<u32>,
    busy_times: Vec<u32>,
    control_times: Vec<u32>,
    quiet_map: f64,
    busy_map: f64,
    control_map: f64,
}

struct InProcess {
    batched: f64,
    batched_seq: f64,
    per_call_map: f64,
    upload: Duration,
    w: Windows,
}

fn in_process(a: &BenchSwitchArgs, entries: &[u32]) -> InProcess {
    let bits = (32 - (a.paths - 1).leading_zeros()).max(1) as u8;
    let len = a.regions as u64 * a.region_size as u64;
    let sw = Arc::new(Switch::rfc(fake_paths(a.paths), a.region_size, Sectors(len)));
    let chunks = Chunks::new(entries, bits, a.paths as u16, a.region_size);
    chunks.apply(&sw);
    let mut ups = Vec::new();
    for _ in 0..a.repeat.max(1) {
        let t = Instant::now();
        chunks.apply(&sw);
        ups.push(t.elapsed());
    }
    pin_to_cpu(0);
    let (batched, _) = lookups_batched(&sw, a.lookups, len, 1024);
    let batched_seq = {
        let t = Instant::now();
        let l = sw.lookup();
        let (mut acc, mut o) = (0usize, 0u64);
        for _ in 0..a.lookups {
            acc = acc.wrapping_add(l.path(o).0);
            o += a.region_size as u64;
            if o >= len {
                o = 0;
            }
        }
        std::hint::black_box(acc);
        a.lookups as f64 / t.elapsed().as_secs_f64()
    };
    let per_call_map = maps(&sw, a.lookups / 4, len);
    // Alternate quiet, busy (uploads on CPU 1) and control (CPU 1 copying the same amount of
    // memory with no switch involved) windows, so drift hits all alike and the control separates
    // what the uploads' memory traffic costs a sibling CPU from anything the table protocol does.
    let window = a.lookups / 4;
    let mut w = Windows::default();
    let rounds = 3;
    for _ in 0..rounds {
        let (q, qt) = lookups_batched(&sw, window, len, 1024);
        w.quiet += q;
        w.quiet_times.extend(qt);
        w.quiet_map += maps(&sw, window / 4, len);
        for control in [false, true] {
            let stop = Arc::new(AtomicBool::new(false));
            let count = Arc::new(AtomicU64::new(0));
            let writer = {
                let (sw, stop, count) = (sw.clone(), stop.clone(), count.clone());
                let chunks = Chunks(chunks.0.clone());
                let bytes = sw.table_bytes();
                std::thread::spawn(move || {
                    pin_to_cpu(1);
                    let (src, mut dst) = (vec![1u8; bytes], vec![0u8; bytes]);
                    while !stop.load(Ordering::Relaxed) {
                        if control {
                            // One upload's worth of copying: a table-sized copy per chunk.
                            for _ in 0..chunks.0.len() {
                                dst.copy_from_slice(&src);
                                std::hint::black_box(&mut dst);
                            }
                        } else {
                            chunks.apply(&sw);
                        }
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                })
            };
            while count.load(Ordering::Relaxed) == 0 {
                std::hint::spin_loop();
            }
            let c0 = count.load(Ordering::Relaxed);
            let (b, bt) = lookups_batched(&sw, window, len, 1024);
            let m = maps(&sw, window / 4, len);
            let done = count.load(Ordering::Relaxed) - c0;
            stop.store(true, Ordering::Relaxed);
            writer.join().expect("writer");
            if control {
                (w.control, w.control_map) = (w.control + b, w.control_map + m);
                w.control_times.extend(bt);
            } else {
                (w.busy, w.busy_map, w.busy_uploads) = (w.busy + b, w.busy_map + m, w.busy_uploads + done);
                w.busy_times.extend(bt);
            }
        }
    }
    let r = rounds as f64;
    for v in [&mut w.quiet, &mut w.busy, &mut w.control, &mut w.quiet_map, &mut w.busy_map, &mut w.control_map] {
        *v /= r;
    }
    InProcess { batched, batched_seq, per_call_map, upload: median(ups), w }
}

fn main() -> Result {
    let a = BenchSwitchArgs::parse();
    let dir = work_dir(a.dir.clone(), "bench-switch")?;
    let n = a.regions as f64;
    println!("routing: {} regions of {} sectors over {} paths, pseudo-random", a.regions, a.region_size, a.paths);
    let entries = routing(a.regions, a.paths);
    let s = socketed(&a, &dir, &entries);
    let _ = std::fs::remove_dir_all(&dir);
    let s = s?;
    println!(
        "switch (RFC form) through the daemon: create+load+resume {:.2} ms; page table {} bytes = {:.3} bytes/region; daemon RSS growth {:.3} bytes/region",
        ms(s.switch_create),
        s.switch_table_bytes,
        s.switch_table_bytes as f64 / n,
        s.switch_rss as f64 / n
    );
    println!(
        "full upload by IpcPgTable: {} messages, {} bytes; median {:.2} ms of {} (min {:.2} ms)",
        s.genl_msgs,
        s.genl_bytes,
        ms(median(s.genl.clone())),
        s.genl.len(),
        ms(*s.genl.iter().min().expect("one run"))
    );
    println!(
        "full upload by set_region_mappings: {} messages, {} bytes; median {:.2} ms of {} (min {:.2} ms; building the text {:.2} ms of it)",
        s.message_count,
        s.message_bytes,
        ms(median(s.messages.clone())),
        s.messages.len(),
        ms(*s.messages.iter().min().expect("one run")),
        ms(s.message_encode)
    );
    if let Some((load, resume, rss)) = s.linear {
        println!(
            "same routing as a {}-line linear table: DM_TABLE_LOAD {:.1} ms + resume {:.1} ms; daemon RSS growth {:.1} bytes/region",
            a.regions,
            ms(load),
            ms(resume),
            rss as f64 / n
        );
        println!(
            "ratios: memory linear/switch-table {:.0}x (linear/switch-RSS {:.0}x); load time linear (load+resume) / switch (create+IpcPgTable upload) {:.0}x",
            rss as f64 / s.switch_table_bytes as f64,
            rss as f64 / s.switch_rss.max(1) as f64,
            (load + resume).as_secs_f64() / (s.switch_create + median(s.genl.clone())).as_secs_f64()
        );
    }
    let mut p = in_process(&a, &entries);
    println!("in-process upload (codec checks + apply, no socket): median {:.2} ms", ms(p.upload));
    println!(
        "lookups on CPU 0: random offsets {:.0} M/s (one guard per 1024); sequential regions {:.0} M/s (one guard); Target::map per call {:.0} M/s (guard + counter each)",
        p.batched / 1e6,
        p.batched_seq / 1e6,
        p.per_call_map / 1e6
    );
    let w = &mut p.w;
    println!(
        "lookups during uploads (writer on CPU 1, {} full uploads in the busy windows): batched {:.0} M/s quiet, {:.0} M/s busy ({:.2}), {:.0} M/s beside a plain memcpy of the same volume ({:.2}); busy / control {:.2}",
        w.busy_uploads,
        w.quiet / 1e6,
        w.busy / 1e6,
        w.busy / w.quiet,
        w.control / 1e6,
        w.control / w.quiet,
        w.busy / w.control
    );
    for (name, v) in [("quiet", &mut w.quiet_times), ("busy", &mut w.busy_times), ("control", &mut w.control_times)] {
        println!(
            "  batch of 1024 lookups, {name}: median {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, max {:.0} µs ({} batches)",
            quantile_us(v, 0.5),
            quantile_us(v, 0.99),
            quantile_us(v, 0.999),
            quantile_us(v, 1.0),
            v.len()
        );
    }
    println!(
        "  Target::map per call: {:.0} M/s quiet, {:.0} M/s busy ({:.2}), {:.0} M/s control ({:.2}); busy / control {:.2}",
        w.quiet_map / 1e6,
        w.busy_map / 1e6,
        w.busy_map / w.quiet_map,
        w.control_map / 1e6,
        w.control_map / w.quiet_map,
        w.busy_map / w.control_map
    );
    Ok(())
}
