//! `dmemu nbsd`: NetBSD's dmctl(8) against the daemon, over the `NETBSD_DM_IOCTL` wire form.
//!
//! Each command builds the dictionary NetBSD's lib/libdm builds (`command`, `version` 4.0.0, the
//! device `name`, `flags` and `cmd_data` where dmctl sets them), sends it in one PLIST frame on a
//! fresh connection (libdm opens the control node per task), and prints what dmctl prints from the
//! reply (netbsd-dm-proplib.md §9). A failed ioctl reports as dmctl's `err(3)` does.

use std::error::Error;
use std::ffi::CStr;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use dmemu::client::Client;
use dmemu::dm::DevNum;
use dmemu::ioctl::netbsd::{externalize, flags, internalize, Dict, Value};

use super::Result;

#[derive(clap::Args, Debug)]
pub struct NbsdArgs {
    /// Control socket path (default: $DMEMU_SOCKET, else a per-user default).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Print every request and reply dictionary on stderr.
    #[arg(long, global = true)]
    pub dump_plist: bool,
    #[command(subcommand)]
    pub cmd: NbsdCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum NbsdCmd {
    /// Print the library's and the driver's protocol versions.
    Version,
    /// List the target types the driver knows.
    Targets,
    /// Create a device without a table.
    Create { name: String },
    /// List devices and their minors.
    Ls,
    /// Print a device's name, uuid, minor, target count and flags.
    Info { name: String },
    /// Rename a device.
    Rename { name: String, new_name: String },
    /// Remove a device.
    Remove { name: String },
    /// Make the loaded table live and resume IO.
    Resume { name: String },
    /// Suspend IO on a device.
    Suspend { name: String },
    /// Print the devices a device's table uses.
    Deps { name: String },
    /// Load a table into the inactive slot: lines `<start> <length> <target> <params…>` from FILE,
    /// or from standard input when FILE is absent or `-`.
    Reload { name: String, file: Option<PathBuf> },
    /// Print a device's table (start, length, target type), as dmctl does.
    Status { name: String },
    /// Same as status.
    Table { name: String },
}

/// A libdm task: the request dictionary, replaced by the reply once run.
struct Task {
    dict: Dict,
}

fn key(k: &str) -> Vec<u8> {
    k.as_bytes().to_vec()
}

impl Task {
    /// `libdm_task_create`: the command string and version 4.0.0 (unsigned, as libdm sets it).
    fn new(command: &str) -> Self {
        let mut dict = Dict::new();
        dict.insert(key("command"), Value::str(command));
        dict.insert(key("version"), Value::Array(vec![Value::u(4u32), Value::u(0u32), Value::u(0u32)]));
        Self { dict }
    }

    fn with(mut self, k: &str, v: Value) -> Self {
        self.dict.insert(key(k), v);
        self
    }

    fn name(self, name: &str) -> Self {
        self.with("name", Value::str(name))
    }

    fn get(&self, k: &str) -> Option<&Value> {
        self.dict.get(k.as_bytes())
    }

    fn u32(&self, k: &str) -> u32 {
        self.get(k).and_then(Value::as_num).and_then(|n| n.as_u32()).unwrap_or(0)
    }

    /// A string as C's printf shows it: `(null)` when the key is missing.
    fn text(&self, k: &str) -> String {
        match self.get(k).and_then(Value::as_bytes) {
            Some(s) => String::from_utf8_lossy(s).into_owned(),
            None => "(null)".into(),
        }
    }

    fn cmd_data(&self) -> Option<&[Value]> {
        match self.get("cmd_data") {
            Some(Value::Array(a)) => Some(a),
            _ => None,
        }
    }

    /// `libdm_task_run`: one ioctl; on failure, dmctl's `err(EXIT_FAILURE, what)`.
    fn run(&mut self, ctx: &Ctx, what: &str) -> Result {
        let fail = |errno: i32| -> Box<dyn Error> { format!("{what}: {}", strerror(errno)).into() };
        let xml = externalize(&self.dict);
        if ctx.dump {
            eprint!("--- request ({} bytes) ---\n{}", xml.len(), String::from_utf8_lossy(&xml[..xml.len() - 1]));
        }
        let os_errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        let mut client = Client::connect(&ctx.socket).map_err(|e| fail(os_errno(e)))?;
        let r = client.plist(&xml).map_err(|e| fail(os_errno(e)))?;
        if ctx.dump {
            let body = r.bytes.strip_suffix(&[0]).unwrap_or(&r.bytes);
            eprint!(
                "--- reply: ret {} errno {} ({} bytes) ---\n{}",
                r.ret,
                r.errno,
                r.bytes.len(),
                String::from_utf8_lossy(body)
            );
        }
        if r.ret < 0 {
            return Err(fail(r.errno));
        }
        // libprop's sendrecv: a reply that is not a dictionary is EIO.
        self.dict = internalize(&r.bytes).map_err(|_| fail(libc::EIO))?;
        Ok(())
    }
}

fn strerror(errno: i32) -> String {
    // SAFETY: strerror returns a valid NUL-terminated string; it is copied at once.
    unsafe { CStr::from_ptr(libc::strerror(errno)) }.to_string_lossy().into_owned()
}

struct Ctx {
    socket: PathBuf,
    dump: bool,
}

pub fn run(args: NbsdArgs) -> Result {
    let ctx = Ctx { socket: args.socket.unwrap_or_else(dmemu::client::daemon::default_socket), dump: args.dump_plist };
    let mut out = io::stdout().lock();
    match args.cmd {
        NbsdCmd::Version => {
            let mut t = Task::new("version");
            let v = |t: &Task| -> Vec<i32> {
                let a = match t.get("version") {
                    Some(Value::Array(a)) => a.as_slice(),
                    _ => &[],
                };
                (0..3).map(|i| a.get(i).and_then(Value::as_num).and_then(|n| n.as_u32()).unwrap_or(0) as i32).collect()
            };
            let lib = v(&t);
            writeln!(out, "Library protocol version {}:{}:{}", lib[0], lib[1], lib[2])?;
            out.flush()?;
            t.run(&ctx, "dmctl_get_version: libdm_task_run failed.")?;
            let k = v(&t);
            writeln!(out, "Kernel protocol version {}:{}:{}", k[0], k[1], k[2])?;
        }
        NbsdCmd::Targets => {
            let mut t = Task::new("targets");
            t.run(&ctx, "dmctl_get_targets: libdm_task_run failed.")?;
            for e in t.cmd_data().unwrap_or_default() {
                let Value::Dict(e) = e else { continue };
                let e = Task { dict: e.clone() };
                let ver = match e.get("ver") {
                    Some(Value::Array(a)) => {
                        a.iter().map(|n| n.as_num().and_then(|n| n.as_u32()).unwrap_or(0) as i32).collect()
                    }
                    _ => vec![],
                };
                let ver = |i: usize| ver.get(i).copied().unwrap_or(0);
                write!(out, "Target name: {}\nTarget version {}.{}.{}\n\n", e.text("name"), ver(0), ver(1), ver(2))?;
            }
        }
        NbsdCmd::Create { name } => {
            Task::new("create").name(&name).run(&ctx, "dmctl_create_dev: libdm_task_run failed.")?
        }
        NbsdCmd::Ls => {
            let mut t = Task::new("names");
            t.run(&ctx, "dmctl_list_devices: libdm_task_run failed.")?;
            for e in t.cmd_data().unwrap_or_default() {
                let Value::Dict(e) = e else { continue };
                let e = Task { dict: e.clone() };
                writeln!(out, "Device name: {}, device minor: {} ", e.text("name"), e.u32("dev") as i32)?;
            }
        }
        NbsdCmd::Info { name } => {
            let mut t = Task::new("info").name(&name);
            t.run(&ctx, "dmctl_get_device_info: libdm_task_run failed")?;
            write!(
                out,
                "Printing Device info for:\nDevice name: \t\t{}\nDevice uuid: \t\t{}\nDevice minor: \t\t{}\nDevice target number: \t{}\nDevice flags: \t\t{}\n",
                t.text("name"),
                t.text("uuid"),
                t.u32("minor") as i32,
                t.u32("target_count") as i32,
                t.u32("flags") as i32
            )?;
        }
        NbsdCmd::Rename { name, new_name } => Task::new("rename")
            .name(&name)
            .with("cmd_data", Value::Array(vec![Value::str(&new_name)]))
            .run(&ctx, "dmctl_dev_rename: libdm_task_run failed.")?,
        NbsdCmd::Remove { name } => {
            Task::new("remove").name(&name).run(&ctx, "dmctl_dev_remove: libdm_task_run failed.")?
        }
        NbsdCmd::Resume { name } => {
            Task::new("resume").name(&name).run(&ctx, "dmctl_dev_resume: libdm_task_run failed.")?
        }
        NbsdCmd::Suspend { name } => Task::new("suspend")
            .name(&name)
            .with("flags", Value::u(flags::SUSPEND))
            .run(&ctx, "dmctl_dev_suspend: libdm_task_run failed.")?,
        NbsdCmd::Deps { name } => {
            let mut t = Task::new("deps").name(&name);
            t.run(&ctx, "dmctl_dev_deps: libdm_task_run failed.")?;
            if let Some(devs) = t.cmd_data() {
                writeln!(out, "Device {name} dependencies ")?;
                // libdm's iterator reads 0 at the end of the array.
                for d in devs.iter().map(|v| v.as_num().and_then(|n| n.as_u64()).unwrap_or(0)).take_while(|&d| d != 0) {
                    let d = DevNum::huge_decode(d);
                    writeln!(out, "major: {} minor: {}", d.major, d.minor)?;
                }
            }
        }
        NbsdCmd::Reload { name, file } => {
            let table = read_table(file.as_deref())?;
            Task::new("reload")
                .name(&name)
                .with("cmd_data", Value::Array(table))
                .run(&ctx, "libdm_task_run: from dmctl_table_reload failed.")?;
        }
        // dmctl's `status` sends the `table` command (§9).
        NbsdCmd::Status { name } | NbsdCmd::Table { name } => {
            let mut t = Task::new("table").name(&name).with("flags", Value::u(flags::STATUS_TABLE));
            t.run(&ctx, "libdm_task_run")?;
            if let Some(entries) = t.cmd_data() {
                writeln!(out, "Getting device table for device {name}")?;
                for e in entries {
                    let Value::Dict(e) = e else { continue };
                    let e = Task { dict: e.clone() };
                    let n = |k: &str| e.get(k).and_then(Value::as_num).and_then(|n| n.as_u64()).unwrap_or(0);
                    writeln!(out, "{:>10} {:>10} {}", n("start"), n("length"), e.text("type"))?;
                }
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// dmctl's table lines, `sscanf("%llu %llu %s %n")`: start, length, target type, and the rest of
/// the line (after the blanks that follow the type) as parameters. Blank lines are skipped.
fn read_table(file: Option<&Path>) -> Result<Vec<Value>> {
    let reader: Box<dyn BufRead> = match file {
        Some(p) if p != Path::new("-") => {
            Box::new(io::BufReader::new(std::fs::File::open(p).map_err(|e| format!("Cannot open table file: {e}"))?))
        }
        _ => Box::new(io::stdin().lock()),
    };
    let mut entries = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = || format!("table line {}: expected <start> <length> <target> [params]: {line:?}", n + 1);
        let mut rest = line.as_str();
        let mut word = || {
            let s = rest.trim_start();
            let end = s.find(|c: char| c.is_ascii_whitespace()).unwrap_or(s.len());
            rest = &s[end..];
            (!s.is_empty()).then(|| &s[..end])
        };
        let start: u64 = word().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let length: u64 = word().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let ty = word().ok_or_else(bad)?.to_owned();
        let params = rest.trim_start();
        let mut e = Dict::new();
        e.insert(key("start"), Value::u(start));
        e.insert(key("length"), Value::u(length));
        e.insert(key("type"), Value::str(&ty));
        e.insert(key("params"), Value::str(params));
        entries.push(Value::Dict(e));
    }
    Ok(entries)
}
