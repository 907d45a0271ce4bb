//! Control-plane benchmarks: `cargo bench --bench control -- [--pin] [--stacking-only] [--scale-only]`.
//! Results and the exact commands: docs/PERFORMANCE.md.
//!
//! Every figure runs against a real daemon process (`dmemu serve`) through the real socket, and
//! the peer it is compared with runs in the same invocation.

mod common;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use common::{pin_to_cpu, spawn_daemon, spawn_server, unpin, vm_rss_kib, work_dir, Result};
use dmemu::client::{Client, IoctlBuf};
use dmemu::ioctl::layout::{DmCmd, DmFlags};
use dmemu_frame::{self as frame, Kind};

#[derive(Parser, Debug)]
#[command(about = "dmemu's control-plane benchmarks (docs/PERFORMANCE.md)")]
struct BenchArgs {
    /// DEV_STATUS round trips per measurement.
    #[arg(long, default_value_t = 20_000)]
    pub round_trips: u32,
    /// create+load+resume+remove cycles.
    #[arg(long, default_value_t = 2_000)]
    pub cycles: u32,
    /// Targets in the big linear table.
    #[arg(long, default_value_t = 1_048_576)]
    pub targets: u32,
    /// Pin the client and both servers to CPU 0 (as well as the unpinned run).
    #[arg(long)]
    pub pin: bool,
    /// Where daemons keep their sockets and sysfs trees (default: /dev/shm, a tmpfs like the
    /// /run a real daemon uses; else the temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Only the data plane's stacking cost (in-process reads through 1, 2, 3 linear layers).
    #[arg(long)]
    pub stacking_only: bool,
    /// Only the cost of a command against the number of idle devices (create+remove with 0, 100,
    /// 1,000 and 5,000 others; `remove_all` of 5,000).
    #[arg(long)]
    pub scale_only: bool,
    /// Internal: serve a bare echo on this socket (the round-trip peer).
    #[arg(long, hide = true)]
    pub echo_server: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The peer: reads a frame, answers with a reply frame of the same size as dmemu's DEV_STATUS
/// reply, with no decoding at all.
fn echo_server(path: &Path) -> Result {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    for s in l.incoming() {
        let mut s = s?;
        std::thread::spawn(move || {
            let mut reply = vec![0u8; 8 + 305];
            while let Ok((_, p)) = frame::read_frame(&mut s, frame::MAX_IOCTL_PAYLOAD) {
                let n = p.len().min(reply.len());
                reply[..n].copy_from_slice(&p[..n]);
                if frame::write_frame(&mut s, Kind::IoctlReply, &[&reply]).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

fn rate(n: u32, t: Duration) -> f64 {
    n as f64 / t.as_secs_f64()
}

/// DEV_STATUS round trips on one connection against the bare echo, same message sizes.
fn round_trips(dir: &Path, n: u32, pin: bool) -> Result<(f64, f64)> {
    if pin {
        pin_to_cpu(0);
    }
    let dm_sock = dir.join(if pin { "rt-pinned.sock" } else { "rt.sock" });
    let echo_sock = dir.join(if pin { "echo-pinned.sock" } else { "echo.sock" });
    let _d = spawn_daemon(&dm_sock, pin)?;
    let _e = spawn_server(&std::env::current_exe()?, &["--echo-server"], &echo_sock, pin)?;
    let mut c = Client::connect(&dm_sock)?;
    c.run(&IoctlBuf::new(DmCmd::DevCreate).name("rt"))?.check("create")?;
    let status = IoctlBuf { size: 312, ..IoctlBuf::new(DmCmd::DevStatus).name("rt") };
    let req = status.bytes();
    let mut e = Client::connect(&echo_sock)?;
    // Warm up both, then alternate measurement blocks so drift hits both alike.
    for _ in 0..1000 {
        c.ioctl(DmCmd::DevStatus.request(), &req)?;
        e.ioctl(DmCmd::DevStatus.request(), &req)?;
    }
    let (mut td, mut te) = (Duration::ZERO, Duration::ZERO);
    let blocks = 10;
    for _ in 0..blocks {
        let t = Instant::now();
        for _ in 0..n / blocks {
            let r = c.ioctl(DmCmd::DevStatus.request(), &req)?;
            debug_assert_eq!(r.ret, 0);
        }
        td += t.elapsed();
        let t = Instant::now();
        for _ in 0..n / blocks {
            e.ioctl(DmCmd::DevStatus.request(), &req)?;
        }
        te += t.elapsed();
    }
    if pin {
        unpin();
    }
    Ok((rate(n, td), rate(n, te)))
}

/// Decode + engine + encode of one DEV_STATUS in-process: the daemon's own cost per round trip.
fn in_process_status(n: u32) -> Result<f64> {
    use dmemu::dm::{Engine, EngineConfig};
    use dmemu::ioctl::linux;
    let mut e = Engine::new(
        EngineConfig { major: 252, file_major: 251 },
        dmemu::targets::registry(),
        Box::new(dmemu::server::resolver::FsResolver),
    );
    let create = IoctlBuf::new(DmCmd::DevCreate).name("rt").bytes();
    let Ok(linux::Decoded::Command(d)) = linux::decode(DmCmd::DevCreate.request(), &create) else {
        return Err("decode create".into());
    };
    e.execute(d.request).map_err(|e| e.to_string())?;
    let req = IoctlBuf { size: 312, ..IoctlBuf::new(DmCmd::DevStatus).name("rt") }.bytes();
    let t = Instant::now();
    for _ in 0..n {
        let Ok(linux::Decoded::Command(mut d)) = linux::decode(DmCmd::DevStatus.request(), &req) else {
            return Err("decode status".into());
        };
        let r = std::mem::replace(&mut d.request, dmemu::dm::Request::new(dmemu::dm::Command::Version));
        let reply = e.execute(r).map_err(|e| e.to_string())?;
        std::hint::black_box(linux::encode(&reply, &d));
    }
    Ok(t.elapsed().as_secs_f64() * 1e9 / n as f64)
}

fn cycles(dir: &Path, n: u32) -> Result<f64> {
    let sock = dir.join("cycles.sock");
    let _d = spawn_daemon(&sock, false)?;
    let mut c = Client::connect(&sock)?;
    let t = Instant::now();
    for _ in 0..n {
        c.run(&IoctlBuf::new(DmCmd::DevCreate).name("cyc"))?.check("create")?;
        c.run(&IoctlBuf::new(DmCmd::TableLoad).name("cyc").table([(0, 2048, "zero", "")]))?.check("load")?;
        c.run(&IoctlBuf::new(DmCmd::DevSuspend).name("cyc"))?.check("resume")?;
        c.run(&IoctlBuf::new(DmCmd::DevRemove).name("cyc"))?.check("remove")?;
    }
    Ok(rate(n, t.elapsed()))
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 1000 / hz)
}

/// The cost of a command next to idle devices: one daemon; idle devices (each with a live
/// `zero` table) are added between measurements, so every figure comes from the same process.
/// Each measurement: create+load+resume+remove cycles (wall ms and daemon CPU ms per cycle).
/// Then `remove_all` of every idle device.
fn print_scale(dir: &Path) -> Result {
    let sock = dir.join("scale.sock");
    let d = spawn_daemon(&sock, false)?;
    let pid = d.0.id();
    let mut c = Client::connect(&sock)?;
    let mut idle = 0u32;
    let mut base = None;
    for target in [0u32, 100, 1000, 5000] {
        while idle < target {
            let name = format!("idle{idle}");
            c.run(&IoctlBuf::new(DmCmd::DevCreate).name(&name))?.check("create")?;
            c.run(&IoctlBuf::new(DmCmd::TableLoad).name(&name).table([(0, 2048, "zero", "")]))?.check("load")?;
            c.run(&IoctlBuf::new(DmCmd::DevSuspend).name(&name))?.check("resume")?;
            idle += 1;
        }
        let n = 1000;
        let (t, cpu) = (Instant::now(), cpu_time(pid));
        for _ in 0..n {
            c.run(&IoctlBuf::new(DmCmd::DevCreate).name("cyc"))?.check("create")?;
            c.run(&IoctlBuf::new(DmCmd::TableLoad).name("cyc").table([(0, 2048, "zero", "")]))?.check("load")?;
            c.run(&IoctlBuf::new(DmCmd::DevSuspend).name("cyc"))?.check("resume")?;
            c.run(&IoctlBuf::new(DmCmd::DevRemove).name("cyc"))?.check("remove")?;
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
        let cpu_ms = (cpu_time(pid) - cpu).as_secs_f64() * 1000.0 / n as f64;
        let b = *base.get_or_insert(ms);
        println!(
            "create+load+resume+remove next to {idle} idle devices: {ms:.3} ms ({:.2}× of none), daemon CPU {cpu_ms:.3} ms",
            ms / b
        );
    }
    if std::env::var_os("SCALE_PAUSE").is_some() {
        eprintln!("daemon pid {pid}; remove_all in 15 s");
        std::thread::sleep(Duration::from_secs(15));
    }
    let (t, cpu) = (Instant::now(), cpu_time(pid));
    c.run(&IoctlBuf::new(DmCmd::RemoveAll))?.check("remove_all")?;
    println!(
        "remove_all of {idle} devices: {:.3} s, daemon CPU {:.3} s",
        t.elapsed().as_secs_f64(),
        (cpu_time(pid) - cpu).as_secs_f64()
    );
    Ok(())
}

struct BigTable {
    encode: Duration,
    load: Duration,
    resume: Duration,
    rss_per_target: f64,
}

fn big_table(dir: &Path, n: u32) -> Result<BigTable> {
    let sock = dir.join("big.sock");
    let d = spawn_daemon(&sock, false)?;
    let file = dir.join("big.img");
    std::fs::File::create(&file)?.set_len(n as u64 * 8 * 512)?;
    let path = file.to_string_lossy().into_owned();
    let t = Instant::now();
    let offsets: Vec<String> = (0..n as u64).map(|i| format!("{path} {}", i * 8)).collect();
    let buf = IoctlBuf::new(DmCmd::TableLoad)
        .name("big")
        .table(offsets.iter().enumerate().map(|(i, p)| (i as u64 * 8, 8, "linear", p.as_str())));
    let bytes = buf.bytes();
    drop(offsets);
    let encode = t.elapsed();
    let mut c = Client::connect(&sock)?;
    c.run(&IoctlBuf::new(DmCmd::DevCreate).name("big"))?.check("create")?;
    std::thread::sleep(Duration::from_millis(200));
    let before = vm_rss_kib(d.0.id());
    let t = Instant::now();
    c.ioctl(DmCmd::TableLoad.request(), &bytes)?.check("load")?;
    let load = t.elapsed();
    let t = Instant::now();
    c.run(&IoctlBuf::new(DmCmd::DevSuspend).name("big"))?.check("resume")?;
    let resume = t.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let after = vm_rss_kib(d.0.id());
    let st = c.run(&IoctlBuf::new(DmCmd::DevStatus).name("big"))?;
    if st.header().target_count != n || !st.header().flags().contains(DmFlags::ACTIVE_PRESENT) {
        return Err("big table not live after resume".into());
    }
    let _ = std::fs::remove_file(&file);
    Ok(BigTable { encode, load, resume, rss_per_target: (after.saturating_sub(before) * 1024) as f64 / n as f64 })
}

/// The data plane's own cost per request through 1, 2 and 3 stacked `linear` layers, in-process
/// (a daemon in this process, IO through [`dmemu::io::IoHandle`], no socket): reads at
/// pseudo-random offsets of a file in the page cache. Returns (layers, ns per 4 KiB read, ns per
/// 1 MiB read), medians of alternating blocks.
fn stacking(dir: &Path) -> Result<Vec<(usize, f64, f64)>> {
    use dmemu::dm::{DevNum, Engine, EngineConfig};
    use dmemu::server::{Daemon, ServeConfig};
    const SECTORS: u64 = 128 << 11; // 128 MiB
    let file = dir.join("stack.img");
    {
        let mut f = std::fs::File::create(&file)?;
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..SECTORS / 2048 {
            f.write_all(&chunk)?;
        }
    }
    let socket = dir.join("stack.sock");
    let cfg = ServeConfig {
        socket: socket.clone(),
        run_dir: dir.join("stack-run"),
        engine: EngineConfig { major: 251, file_major: 250 },
        netbsd_errors: Default::default(),
        fuse_dir: None,
    };
    let engine = Engine::new(cfg.engine, dmemu::targets::registry(), Box::new(dmemu::server::resolver::FsResolver));
    let d = Daemon::new(&cfg, engine)?;
    let (d2, s2) = (d.clone(), socket.clone());
    std::thread::spawn(move || d2.serve(&s2));
    let mut c = (0..200)
        .find_map(|_| {
            let c = Client::connect(&socket).ok();
            if c.is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            c
        })
        .ok_or("in-process daemon did not start")?;
    let mut below = file.to_string_lossy().into_owned();
    let mut handles = Vec::new();
    for name in ["stack1", "stack2", "stack3"] {
        let args = format!("{below} 0");
        c.run(&IoctlBuf::new(DmCmd::DevCreate).name(name))?.check("create")?;
        c.run(&IoctlBuf::new(DmCmd::TableLoad).name(name).table([(0, SECTORS, "linear", args.as_str())]))?
            .check("load")?;
        let st = c.run(&IoctlBuf::new(DmCmd::DevSuspend).name(name))?.check("resume")?;
        below = DevNum::huge_decode(st.header().dev).to_string();
        handles.push(d.io().open(name).ok_or("device not open for IO")?);
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |span: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % span
    };
    let bytes = SECTORS * 512;
    let mut small = vec![0u8; 4096];
    let mut big = vec![0u8; 1 << 20];
    let (mut t4k, mut t1m) = (vec![Vec::new(); 3], vec![Vec::new(); 3]);
    for _round in 0..7 {
        for (i, h) in handles.iter().enumerate() {
            let n = 100_000;
            let t = Instant::now();
            for _ in 0..n {
                h.read(next(bytes / 4096) * 4096, &mut small).map_err(|e| e.to_string())?;
            }
            t4k[i].push(t.elapsed().as_nanos() as f64 / n as f64);
            let n = 300;
            let t = Instant::now();
            for _ in 0..n {
                h.read(next(bytes >> 20) << 20, &mut big).map_err(|e| e.to_string())?;
            }
            t1m[i].push(t.elapsed().as_nanos() as f64 / n as f64);
        }
    }
    drop(handles);
    let _ = std::fs::remove_file(&file);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(t4k.into_iter().zip(t1m).enumerate().map(|(i, (a, b))| (i + 1, median(a), median(b))).collect())
}

fn main() -> Result {
    let args = BenchArgs::parse();
    if let Some(p) = args.echo_server {
        return echo_server(&p);
    }
    let dir = work_dir(args.dir.clone(), "bench")?;
    let print_stacking = |dir: &Path| -> Result {
        let v = stacking(dir)?;
        for (layers, ns4k, ns1m) in &v {
            println!(
                "data plane in-process, {layers} linear layer(s): {:.0} ns per 4 KiB read, {:.1} µs per 1 MiB read",
                ns4k,
                ns1m / 1000.0
            );
        }
        let (a, b) = (v[0], v[2]);
        println!(
            "data plane: each extra layer adds {:.0} ns per 4 KiB read, {:.0} ns per 1 MiB read",
            (b.1 - a.1) / 2.0,
            (b.2 - a.2) / 2.0
        );
        Ok(())
    };
    if args.scale_only {
        print_scale(&dir)?;
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    if args.stacking_only {
        print_stacking(&dir)?;
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    let mut runs = vec![false];
    if args.pin {
        runs.push(true);
    }
    for pin in runs {
        let (dm, echo) = round_trips(&dir, args.round_trips, pin)?;
        println!(
            "DEV_STATUS round trips ({}): dmemu {:.0}/s, bare echo {:.0}/s, ratio {:.2}",
            if pin { "client and servers pinned to CPU 0" } else { "unpinned" },
            dm,
            echo,
            dm / echo
        );
    }
    println!("DEV_STATUS decode+execute+encode in-process: {:.0} ns each", in_process_status(args.round_trips * 10)?);
    println!("create+load+resume+remove cycles: {:.0}/s", cycles(&dir, args.cycles)?);
    let b = big_table(&dir, args.targets)?;
    println!(
        "{}-target linear table: load {:.3} s, resume {:.3} s, load+resume {:.3} s, {:.1} resident bytes/target (buffer built client-side in {:.3} s)",
        args.targets,
        b.load.as_secs_f64(),
        b.resume.as_secs_f64(),
        (b.load + b.resume).as_secs_f64(),
        b.rss_per_target,
        b.encode.as_secs_f64()
    );
    print_stacking(&dir)?;
    print_scale(&dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::io::stdout().flush();
    Ok(())
}
