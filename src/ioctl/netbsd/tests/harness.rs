//! One abstract operation, spelled both ways: as the dictionary a NetBSD libdm/LVM2 client sends
//! and as the `struct dm_ioctl` buffer libdevmapper sends, each run through its codec into its own
//! engine; plus readable renderings of both replies.

use std::fmt::Write as _;

use crate::client::IoctlBuf;
use crate::dm::pdev::{DeviceResolver, Identity, Resolved};
use crate::dm::target::TargetRegistry;
use crate::dm::{DevNum, DmError, DmResult, Engine, EngineConfig, Reply, StatusType};
use crate::ioctl::layout::{DmCmd, DmFlags, DmIoctl, DM_IOCTL_SIZE};
use crate::ioctl::linux::fixtures::{reply_header, u32_at, u64_at};
use crate::ioctl::linux::{self, Encoded};
use crate::ioctl::netbsd::{decode, externalize, flags, internalize, Dict, NetbsdErrors, PlistReply, Value};
use crate::targets;

pub const MAJOR: u32 = 252;
pub const FILE_MAJOR: u32 = 251;

/// `/f/<ino>/<sectors>` is a regular file of that size; nothing else exists.
struct FakeFiles;

impl DeviceResolver for FakeFiles {
    fn resolve_path(&self, path: &str, _writable: bool) -> DmResult<Resolved> {
        let missing = || DmError::NoSuchBlockDevice(path.into());
        let mut it = path.strip_prefix("/f/").ok_or_else(missing)?.split('/');
        let ino = it.next().and_then(|s| s.parse().ok()).ok_or_else(missing)?;
        let size = it.next().and_then(|s| s.parse().ok()).ok_or_else(missing)?;
        Ok(Resolved::unopened(Identity::File { dev: 1, ino }, path.into(), crate::dm::Sectors(size)))
    }
    fn resolve_block(&self, dev: DevNum, _writable: bool) -> DmResult<Resolved> {
        Err(DmError::NoSuchBlockDevice(dev.to_string()))
    }
}

/// An engine with a fixed target set (snapshots do not move when targets are added).
pub fn engine() -> Engine {
    let mut r = TargetRegistry::default();
    for t in [&targets::error::TYPE, &targets::linear::TYPE, &targets::striped::TYPE, &targets::zero::TYPE] {
        r.register(t);
    }
    Engine::new(EngineConfig { major: MAJOR, file_major: FILE_MAJOR }, r, Box::new(FakeFiles))
}

/// How a request names its device.
#[derive(Clone, Debug)]
pub enum Sel {
    Name(String),
    Uuid(String),
    Minor(u32),
}

pub fn name(s: &str) -> Sel {
    Sel::Name(s.into())
}

/// One table line.
#[derive(Clone, Debug)]
pub struct Line {
    pub start: u64,
    pub len: u64,
    pub ty: String,
    pub params: String,
}

pub fn line(start: u64, len: u64, ty: &str, params: &str) -> Line {
    Line { start, len, ty: ty.into(), params: params.into() }
}

#[derive(Clone, Debug)]
pub enum Op {
    Version,
    Targets,
    Names,
    Create {
        name: String,
        uuid: Option<String>,
    },
    Info(Sel),
    Mknodes(Sel),
    Suspend(Sel),
    Resume(Sel),
    Remove(Sel),
    Clear(Sel),
    Deps {
        sel: Sel,
        inactive: bool,
    },
    /// `table`: with STATUS_TABLE; `command` is "status" or "table" (NetBSD decides by the flag).
    Status {
        sel: Sel,
        command: &'static str,
        table: bool,
        inactive: bool,
    },
    Rename {
        name: String,
        new: String,
    },
    Reload {
        sel: Sel,
        lines: Vec<Line>,
    },
}

pub fn create(n: &str) -> Op {
    Op::Create { name: n.into(), uuid: None }
}

pub fn reload(n: &str, lines: &[Line]) -> Op {
    Op::Reload { sel: name(n), lines: lines.to_vec() }
}

fn k(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

impl Op {
    /// The NetBSD dictionary, as LVM2's NetBSD port sends it: version 4.0.0 and `flags` with
    /// EXISTS always set (§3.2), keys only where the command uses them.
    pub fn dict(&self) -> Dict {
        let mut d = Dict::new();
        let mut f = flags::EXISTS;
        let sel = |d: &mut Dict, s: &Sel| match s {
            Sel::Name(n) => d.insert(k("name"), Value::str(n)),
            Sel::Uuid(u) => d.insert(k("uuid"), Value::str(u)),
            Sel::Minor(m) => d.insert(k("minor"), Value::u(*m)),
        };
        let command = match self {
            Op::Version => "version",
            Op::Targets => "targets",
            Op::Names => "names",
            Op::Create { name, uuid } => {
                d.insert(k("name"), Value::str(name));
                if let Some(u) = uuid {
                    d.insert(k("uuid"), Value::str(u));
                }
                "create"
            }
            Op::Info(s) => {
                sel(&mut d, s);
                "info"
            }
            Op::Mknodes(s) => {
                sel(&mut d, s);
                "mknodes"
            }
            Op::Suspend(s) => {
                sel(&mut d, s);
                f |= flags::SUSPEND;
                "suspend"
            }
            Op::Resume(s) => {
                sel(&mut d, s);
                "resume"
            }
            Op::Remove(s) => {
                sel(&mut d, s);
                "remove"
            }
            Op::Clear(s) => {
                sel(&mut d, s);
                "clear"
            }
            Op::Deps { sel: s, inactive } => {
                sel(&mut d, s);
                if *inactive {
                    f |= flags::QUERY_INACTIVE_TABLE;
                }
                "deps"
            }
            Op::Status { sel: s, command, table, inactive } => {
                sel(&mut d, s);
                if *table {
                    f |= flags::STATUS_TABLE;
                }
                if *inactive {
                    f |= flags::QUERY_INACTIVE_TABLE;
                }
                command
            }
            Op::Rename { name, new } => {
                d.insert(k("name"), Value::str(name));
                d.insert(k("cmd_data"), Value::Array(vec![Value::str(new)]));
                "rename"
            }
            Op::Reload { sel: s, lines } => {
                sel(&mut d, s);
                let entries = lines
                    .iter()
                    .map(|l| {
                        let mut e = Dict::new();
                        e.insert(k("start"), Value::u(l.start));
                        e.insert(k("length"), Value::u(l.len));
                        e.insert(k("type"), Value::str(&l.ty));
                        e.insert(k("params"), Value::str(&l.params));
                        Value::Dict(e)
                    })
                    .collect();
                d.insert(k("cmd_data"), Value::Array(entries));
                "reload"
            }
        };
        d.insert(k("command"), Value::str(command));
        d.insert(k("flags"), Value::u(f));
        d.insert(k("version"), Value::Array(vec![Value::u(4u32), Value::u(0u32), Value::u(0u32)]));
        d
    }

    /// The libdevmapper buffer for the same operation.
    pub fn linux(&self) -> IoctlBuf {
        let sel = |b: IoctlBuf, s: &Sel| match s {
            Sel::Name(n) => b.name(n),
            Sel::Uuid(u) => b.uuid(u),
            Sel::Minor(m) => {
                let mut b = b;
                b.header.dev = DevNum::new(MAJOR, *m).huge_encode();
                b
            }
        };
        match self {
            Op::Version => IoctlBuf::new(DmCmd::Version),
            Op::Targets => IoctlBuf::new(DmCmd::ListVersions),
            Op::Names => IoctlBuf::new(DmCmd::ListDevices),
            Op::Create { name, uuid } => {
                let b = IoctlBuf::new(DmCmd::DevCreate).name(name);
                match uuid {
                    Some(u) => b.uuid(u),
                    None => b,
                }
            }
            Op::Info(s) | Op::Mknodes(s) => sel(IoctlBuf::new(DmCmd::DevStatus), s),
            Op::Suspend(s) => sel(IoctlBuf::new(DmCmd::DevSuspend), s).flags(DmFlags::SUSPEND),
            Op::Resume(s) => sel(IoctlBuf::new(DmCmd::DevSuspend), s),
            Op::Remove(s) => sel(IoctlBuf::new(DmCmd::DevRemove), s),
            Op::Clear(s) => sel(IoctlBuf::new(DmCmd::TableClear), s),
            Op::Deps { sel: s, inactive } => {
                let b = sel(IoctlBuf::new(DmCmd::TableDeps), s);
                if *inactive {
                    b.flags(DmFlags::QUERY_INACTIVE_TABLE)
                } else {
                    b
                }
            }
            Op::Status { sel: s, table, inactive, .. } => {
                let mut b = sel(IoctlBuf::new(DmCmd::TableStatus), s);
                if *table {
                    b = b.flags(DmFlags::STATUS_TABLE);
                }
                if *inactive {
                    b = b.flags(DmFlags::QUERY_INACTIVE_TABLE);
                }
                b
            }
            Op::Rename { name, new } => IoctlBuf::new(DmCmd::DevRename).name(name).string(new),
            Op::Reload { sel: s, lines } => sel(IoctlBuf::new(DmCmd::TableLoad), s)
                .table(lines.iter().map(|l| (l.start, l.len, l.ty.as_str(), l.params.as_str()))),
        }
    }
}

/// One NETBSD_DM_IOCTL through the codec and the engine, as the daemon runs it.
pub fn run_netbsd(e: &mut Engine, payload: &[u8], privileged: bool, mode: NetbsdErrors) -> PlistReply {
    match decode(payload, e, privileged) {
        Err(r) => r.encode(mode),
        Ok(mut d) => match d.request.take() {
            None => d.encode(&Reply::Version),
            Some(req) => match e.execute(req) {
                Ok(r) => d.encode(&r),
                Err(err) => d.encode_error(&err, mode),
            },
        },
    }
}

/// One Linux ioctl through the codec and the engine, as the daemon runs it.
pub fn run_linux(e: &mut Engine, b: &IoctlBuf) -> Encoded {
    let bytes = b.bytes();
    let request = b.cmd.request();
    match linux::decode(request, &bytes) {
        Ok(linux::Decoded::Version) => linux::encode_version(),
        Ok(linux::Decoded::Command(d)) => match e.execute(d.request.clone()) {
            Ok(r) => linux::encode(&r, &d),
            Err(err) => d.encode_error(&err),
        },
        Err(err) => {
            let error = match &err.lookup_first {
                Some(key) if e.event_nr(key).is_err() => DmError::NoDevice(format!("{key:?}")),
                _ => err.error.clone(),
            };
            linux::encode_error(request, &bytes, &error)
        }
    }
}

pub fn errno_name(e: i32) -> String {
    let name = match e {
        0 => "0",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        _ => return e.to_string(),
    };
    name.into()
}

/// The reply text without its NUL (checked to be there).
pub fn xml_text(xml: &[u8]) -> String {
    match xml.split_last() {
        None => "(nothing copied out)\n".into(),
        Some((0, body)) => String::from_utf8_lossy(body).into_owned(),
        Some(_) => panic!("reply without its NUL"),
    }
}

pub fn render_request(xml: &[u8]) -> String {
    match xml.last() {
        Some(0) => format!("== NetBSD request: pref_len {} ==\n{}", xml.len(), xml_text(xml)),
        _ => format!(
            "== NetBSD request: pref_len {}, no NUL (the kernel adds one) ==\n{}\n",
            xml.len(),
            String::from_utf8_lossy(xml)
        ),
    }
}

pub fn render_netbsd(title: &str, r: &PlistReply) -> String {
    format!(
        "== {title}: ret {} errno {}, pref_len {} ==\n{}",
        r.ret,
        errno_name(r.errno),
        r.xml.len(),
        xml_text(&r.xml)
    )
}

/// What a Linux reply says, decoded.
pub struct LinuxView {
    pub cmd: DmCmd,
    pub ret: i32,
    pub errno: i32,
    /// `None` when only `version` came back.
    pub header: Option<DmIoctl>,
    pub names: Vec<(DevNum, String)>,
    pub targets: Vec<(u64, u64, String, String)>,
    pub deps: Vec<DevNum>,
    pub versions: Vec<(String, [u32; 3])>,
}

fn cstr(b: &[u8], off: usize) -> String {
    let s = b.get(off..).unwrap_or_default();
    let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    String::from_utf8_lossy(&s[..end]).into_owned()
}

impl LinuxView {
    pub fn new(cmd: DmCmd, e: &Encoded) -> Self {
        let b = &e.bytes;
        let mut v = LinuxView {
            cmd,
            ret: e.ret,
            errno: e.errno,
            header: None,
            names: vec![],
            targets: vec![],
            deps: vec![],
            versions: vec![],
        };
        if b.len() <= 12 {
            return v;
        }
        let h = reply_header(b);
        v.header = Some(h);
        if e.ret != 0 || b.len() <= DM_IOCTL_SIZE {
            return v;
        }
        let at = h.data_start as usize;
        match cmd {
            DmCmd::ListDevices => {
                let mut off = at;
                loop {
                    v.names.push((DevNum::huge_decode(u64_at(b, off)), cstr(b, off + 12)));
                    let next = u32_at(b, off + 8) as usize;
                    if next == 0 {
                        break;
                    }
                    off += next;
                }
            }
            DmCmd::TableStatus => {
                let mut off = at;
                for _ in 0..h.target_count {
                    let ty = cstr(b, off + 24);
                    v.targets.push((u64_at(b, off), u64_at(b, off + 8), ty, cstr(b, off + 40)));
                    off = at + u32_at(b, off + 20) as usize;
                }
            }
            DmCmd::TableDeps => {
                let n = u32_at(b, at) as usize;
                v.deps = (0..n).map(|i| DevNum::huge_decode(u64_at(b, at + 8 + 8 * i))).collect();
            }
            DmCmd::ListVersions => {
                let mut off = at;
                loop {
                    let ver = [u32_at(b, off + 4), u32_at(b, off + 8), u32_at(b, off + 12)];
                    v.versions.push((cstr(b, off + 16), ver));
                    let next = u32_at(b, off) as usize;
                    if next == 0 {
                        break;
                    }
                    off += next;
                }
            }
            _ => {}
        }
        v
    }
}

impl std::fmt::Display for LinuxView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "== Linux {}: ret {} errno {} ==", self.cmd, self.ret, errno_name(self.errno))?;
        let Some(h) = &self.header else {
            return writeln!(f, "(version only)");
        };
        let fl = h.flags();
        let names: Vec<&str> = fl.iter_names().map(|(n, _)| n).collect();
        writeln!(
            f,
            "version {}.{}.{}, data_size {}, flags {:#x} [{}]",
            h.version[0],
            h.version[1],
            h.version[2],
            h.data_size,
            fl.bits(),
            names.join("|")
        )?;
        let dev = DevNum::huge_decode(h.dev);
        writeln!(
            f,
            "dev {dev}, open_count {}, event_nr {}, target_count {}",
            h.open_count, h.event_nr, h.target_count
        )?;
        writeln!(f, "name {:?}, uuid {:?}", cstr(&h.name, 0), cstr(&h.uuid, 0))?;
        for (d, n) in &self.names {
            writeln!(f, "device {d} {n:?}")?;
        }
        for (s, l, t, p) in &self.targets {
            writeln!(f, "target {s} {l} {t} {p:?}")?;
        }
        for d in &self.deps {
            writeln!(f, "dep {d}")?;
        }
        for (n, v) in &self.versions {
            writeln!(f, "type {n} {}.{}.{}", v[0], v[1], v[2])?;
        }
        Ok(())
    }
}

/// Two engines fed the same operations, one per face, plus a third for compat-mode replies.
pub struct Pair {
    pub linux: Engine,
    pub netbsd: Engine,
    pub compat: Engine,
}

impl Pair {
    pub fn new() -> Self {
        Self { linux: engine(), netbsd: engine(), compat: engine() }
    }

    /// Runs setup operations on all engines; each must succeed everywhere.
    pub fn setup(&mut self, ops: &[Op]) -> &mut Self {
        for op in ops {
            let l = run_linux(&mut self.linux, &op.linux());
            assert_eq!((l.ret, l.errno), (0, 0), "linux setup {op:?}");
            let x = externalize(&op.dict());
            for e in [&mut self.netbsd, &mut self.compat] {
                let r = run_netbsd(e, &x, true, NetbsdErrors::Real);
                assert_eq!((r.ret, r.errno), (0, 0), "netbsd setup {op:?}: {}", xml_text(&r.xml));
            }
        }
        self
    }

    /// The snapshot text of one operation: the request, both NetBSD error modes (when they
    /// differ), and the Linux reply.
    pub fn snapshot(&mut self, op: &Op) -> String {
        let linux = LinuxView::new(op.linux().cmd, &run_linux(&mut self.linux, &op.linux()));
        let mut s = self.snapshot_netbsd(&externalize(&op.dict()), true);
        write!(s, "{linux}").unwrap();
        s
    }

    /// The NetBSD part only (requests that have no Linux spelling).
    pub fn snapshot_netbsd(&mut self, xml: &[u8], privileged: bool) -> String {
        let real = run_netbsd(&mut self.netbsd, xml, privileged, NetbsdErrors::Real);
        let compat = run_netbsd(&mut self.compat, xml, privileged, NetbsdErrors::Compat);
        let mut s = render_request(xml);
        s += &render_netbsd("NetBSD reply", &real);
        if compat != real {
            assert_eq!(compat.xml, real.xml, "the modes differ only in ret/errno");
            writeln!(s, "== compat mode: ret {} errno {}, same dictionary ==", compat.ret, errno_name(compat.errno))
                .unwrap();
        }
        s
    }
}

/// A reply dictionary, parsed back (and checked to be proplib-exact on the way).
pub fn parse_reply(r: &PlistReply) -> Dict {
    let d = internalize(&r.xml).expect("reply parses");
    assert_eq!(externalize(&d), r.xml, "reply re-externalizes byte for byte");
    d
}

/// The table lines of an engine's device (live, or inactive).
pub fn table_lines(e: &Engine, minor: u32, inactive: bool) -> Option<Vec<String>> {
    let d = e.device(minor)?;
    let t = if inactive { d.inactive.as_ref() } else { d.live.as_deref() };
    t.map(|t| {
        t.status(StatusType::Table, false)
            .into_iter()
            .map(|s| format!("{} {} {} {}", s.start, s.length, s.target_type, s.text))
            .collect()
    })
}
