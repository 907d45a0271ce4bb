//! The dmsetup compatibility suite: Debian's unmodified `/usr/sbin/dmsetup` (libdevmapper
//! 1.02.185) against a real `dmemu serve`, through the real shim. Every case asserts stdout, stderr
//! and the exit code exactly; the expected text is what dmsetup prints against the kernel's
//! device-mapper (linux-dm-abi.md §2–§3), with underlying files shown as their pseudo
//! `major:minor` (docs/pdev-numbers.md).

mod common;

use common::{Daemon, Out, DMSETUP};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const EBUSY: &str = "Device or resource busy";
const ENXIO: &str = "No such device or address";
const EINVAL: &str = "Invalid argument";

// ---- assertions -------------------------------------------------------------------------------

/// Asserts exit 0, empty stderr and exactly `stdout`.
#[track_caller]
fn ok(out: Out, stdout: &str) {
    assert_eq!((out.code, out.stdout.as_str(), out.stderr.as_str()), (0, stdout, ""), "{out:#?}");
}

/// Asserts exit 1, empty stdout and exactly `stderr`.
#[track_caller]
fn fails(out: Out, stderr: &str) {
    assert_eq!((out.code, out.stdout.as_str(), out.stderr.as_str()), (1, "", stderr), "{out:#?}");
}

/// libdevmapper's report of a failed ioctl: `on <name> <uuid><(maj:min)> failed`, then dmsetup's
/// own last line. `ident` is everything after the name's space (uuid and/or `(maj:min)`, often "").
fn ioctl_failed(cmd: &str, name: &str, ident: &str, errno: &str) -> String {
    format!("device-mapper: {cmd} ioctl on {name} {ident} failed: {errno}\nCommand failed.\n")
}

/// Runs a dmsetup command that must fail with `stderr`, then checks the daemon is still serving.
#[track_caller]
fn refused(d: &Daemon, args: &[&str], stderr: &str) {
    fails(d.dmsetup(args), stderr);
    assert!(d.alive(), "daemon died after dmsetup {args:?}");
}

/// `dmsetup info NAME` as dmsetup prints it (`_display_info_long`).
#[derive(Clone, Copy)]
struct Info<'a> {
    name: &'a str,
    state: &'a str,
    tables: &'a str,
    open: u32,
    event: u32,
    minor: u32,
    targets: u32,
    uuid: &'a str,
}

impl<'a> Info<'a> {
    /// A device with a live table and nothing else going on.
    fn live(name: &'a str, minor: u32, targets: u32) -> Self {
        Info { name, state: "ACTIVE", tables: "LIVE", open: 0, event: 0, minor, targets, uuid: "" }
    }

    fn text(&self, major: u32) -> String {
        let uuid = if self.uuid.is_empty() { String::new() } else { format!("UUID: {}\n", self.uuid) };
        format!(
            "Name:              {}\nState:             {}\nRead Ahead:        256\nTables present:    {}\n\
             Open count:        {}\nEvent number:      {}\nMajor, minor:      {major}, {}\n\
             Number of targets: {}\n{uuid}\n",
            self.name, self.state, self.tables, self.open, self.event, self.minor, self.targets
        )
    }
}

#[track_caller]
fn info_is(d: &Daemon, i: Info) {
    ok(d.dmsetup(&["info", i.name]), &i.text(d.major()));
}

/// `dmsetup info -c` with the fields that need only the ioctl (not sysfs, not the node):
/// `name:attr:open:targets:event:major:minor`. Used for devices that never had a table loaded,
/// whose long `info` differs (see `info_before_the_first_table_load`).
#[track_caller]
fn brief_is(d: &Daemon, name: &str, expected: &str) {
    let fields = "name,attr,open,segments,events,major,minor";
    ok(d.dmsetup(&["info", "-c", "--noheadings", "-o", fields, name]), &format!("{name}:{expected}\n"));
}

/// `(major, minor)` of a glibc `dev_t`.
fn split_dev(rdev: u64) -> (u32, u32) {
    (((rdev >> 8) & 0xfff | (rdev >> 32) & !0xfff) as u32, (rdev & 0xff | (rdev >> 12) & !0xff) as u32)
}

/// Asserts `<run dir>/dev/mapper/NAME` is a block node for `major:minor`.
#[track_caller]
fn assert_node(d: &Daemon, name: &str, minor: u32) {
    let p = d.path(&format!("dev/mapper/{name}"));
    let m = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(m.file_type().is_block_device(), "{} is not a block device", p.display());
    assert_eq!(split_dev(m.rdev()), (d.major(), minor), "rdev of {}", p.display());
}

/// Makes a block node (the suite runs as root, as libdm's own node handling needs).
fn mknod_block(path: &std::path::Path, major: u32, minor: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and plain integers.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o660, libc::makedev(major, minor)) };
    assert_eq!(r, 0, "mknod {}: {}", path.display(), std::io::Error::last_os_error());
}

fn node_exists(d: &Daemon, name: &str) -> bool {
    d.path(&format!("dev/mapper/{name}")).symlink_metadata().is_ok()
}

/// Creates NAME with TABLE and asserts dmsetup is silent about it.
#[track_caller]
fn create(d: &Daemon, name: &str, table: &str) {
    ok(d.dmsetup(&["create", name, "--table", table]), "");
}

/// Three stacked linear devices over a 64 MiB file: `a` (252:0) over the file, `b` (252:1) over
/// `a`, `c` (252:2, uuid `UUID-C`) over `b`.
fn stack(d: &Daemon) {
    let f = d.file("disk.img", 131072);
    create(d, "a", &format!("0 131072 linear {f} 0"));
    create(d, "b", "0 65536 linear /dev/mapper/a 0");
    let major = d.major();
    ok(d.dmsetup(&["create", "c", "-u", "UUID-C", "--table", &format!("0 32768 linear {major}:1 0")]), "");
}

// ---- waiting for DM_DEV_WAIT ------------------------------------------------------------------

/// Starts `dmsetup ARGS` without waiting for it.
fn spawn_dmsetup(d: &Daemon, args: &[&str]) -> Child {
    d.exec_command(DMSETUP)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dmemu exec")
}

/// Daemon threads asleep in futex(2): a connection thread serving a pending DM_DEV_WAIT sleeps on
/// the engine's event condvar, idle connection threads sleep in read(2).
fn daemon_futex_sleepers(d: &Daemon) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", d.pid())) else { return 0 };
    tasks
        .flatten()
        .filter(|t| {
            let sc = std::fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
            sc.split_whitespace().next() == Some(&libc::SYS_futex.to_string())
        })
        .count()
}

/// Runs `dmsetup ARGS` (a `wait`) in the background and returns once the daemon holds its
/// DM_DEV_WAIT: one more daemon thread than before sleeps in futex, for several polls in a row.
fn start_waiter(d: &Daemon, args: &[&str]) -> Child {
    let baseline = (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(5));
            daemon_futex_sleepers(d)
        })
        .max()
        .unwrap();
    let mut child = spawn_dmsetup(d, args);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut streak = 0;
    while streak < 10 {
        if let Some(status) = child.try_wait().unwrap() {
            let out = finish(child);
            panic!("dmsetup {args:?} returned ({status}) before it was woken: {out:#?}");
        }
        assert!(Instant::now() < deadline, "dmsetup {args:?} never blocked in DM_DEV_WAIT");
        streak = if daemon_futex_sleepers(d) > baseline { streak + 1 } else { 0 };
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Collects a background dmsetup's result (it must end within 30 s).
fn finish(mut child: Child) -> Out {
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("background dmsetup still blocked after 30 s: {}", String::from_utf8_lossy(&o.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let o = child.wait_with_output().unwrap();
    Out {
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        code: o.status.code().unwrap_or(-1),
    }
}

// ---- the tests --------------------------------------------------------------------------------

#[test]
fn version() {
    let d = Daemon::start();
    let [maj, min, patch] = dmemu::ioctl::layout::DM_VERSION;
    ok(
        d.dmsetup(&["version"]),
        &format!("Library version:   1.02.185 (2022-05-18)\nDriver version:    {maj}.{min}.{patch}\n"),
    );
}

#[test]
fn targets() {
    let d = Daemon::start();
    // LIST_VERSIONS reports newest registration first: error, linear, striped are registered at
    // init (so they come last, in reverse), module targets after them (§2.4).
    ok(
        d.dmsetup(&["targets"]),
        "mirror           v1.15.0\n\
         multipath        v1.15.0\n\
         delay            v1.5.0\n\
         dust             v1.0.0\n\
         flakey           v1.5.0\n\
         switch           v1.1.0\n\
         zero             v1.2.0\n\
         striped          v1.6.0\n\
         linear           v1.5.0\n\
         error            v1.7.0\n",
    );
}

#[test]
fn create_variants() {
    let d = Daemon::start();
    let major = d.major();
    let f = d.file("disk.img", 131072);

    // --table: the file prints as its pseudo number.
    create(&d, "lin", &format!("0 131072 linear {f} 0"));
    ok(d.dmsetup(&["table", "lin"]), "0 131072 linear 251:0 0\n");
    info_is(&d, Info::live("lin", 0, 1));
    assert_node(&d, "lin", 0);

    // -u UUID
    ok(d.dmsetup(&["create", "withuuid", "-u", "LVM-abc", "--table", "0 100 zero"]), "");
    info_is(&d, Info { uuid: "LVM-abc", ..Info::live("withuuid", 1, 1) });

    // --readonly
    ok(d.dmsetup(&["create", "ro", "--readonly", "--table", "0 100 zero"]), "");
    info_is(&d, Info { state: "ACTIVE (READ-ONLY)", ..Info::live("ro", 2, 1) });
    ok(d.dmsetup(&["info", "-c", "--noheadings", "-o", "attr", "ro"]), "L--r\n");

    // --notable: no table, not suspended, no node until a resume (libdm adds nodes on resume)...
    ok(d.dmsetup(&["create", "empty", "--notable"]), "");
    brief_is(&d, "empty", &format!("---w:0:0:0:{major}:3"));
    assert!(!node_exists(&d, "empty"));
    // ...unless --addnodeoncreate.
    ok(d.dmsetup(&["create", "early", "--notable", "--addnodeoncreate"]), "");
    assert_node(&d, "early", 4);

    // The table from stdin, two targets.
    ok(d.dmsetup_stdin(&["create", "stdin"], "0 100 zero\n100 50 error\n"), "");
    ok(d.dmsetup(&["table", "stdin"]), "0 100 zero \n100 50 error \n");
    info_is(&d, Info::live("stdin", 5, 2));

    ok(
        d.dmsetup(&["ls"]),
        &format!(
            "early\t({major}:4)\nempty\t({major}:3)\nlin\t({major}:0)\nro\t({major}:2)\nstdin\t({major}:5)\nwithuuid\t({major}:1)\n"
        ),
    );
}

#[test]
fn info_before_the_first_table_load() {
    // Since Linux 5.15 ("dm: delay registering the gendisk") a new device gets its gendisk, hence
    // its sysfs directory and an openable node, only at its first table load. Until then libdm
    // finds no read-ahead: `info` leaves that line out and reports the failed open of the node.
    let d = Daemon::start();
    ok(d.dmsetup(&["create", "x", "--notable"]), "");
    let fresh = Info { tables: "None", ..Info::live("x", 0, 0) };
    let out = d.dmsetup(&["info", "x"]);
    let stderr = format!("{}: open failed: No such file or directory\n", d.path("dev/mapper/x").display());
    let stdout = fresh.text(d.major()).replace("Read Ahead:        256\n", "");
    assert_eq!((out.code, out.stdout.as_str(), out.stderr.as_str()), (0, stdout.as_str(), stderr.as_str()), "{out:#?}");
    // Loaded once, the disk exists, even after the table is cleared again.
    ok(d.dmsetup(&["load", "x", "--table", "0 8 zero"]), "");
    info_is(&d, Info { tables: "INACTIVE", ..fresh });
    ok(d.dmsetup(&["clear", "x"]), "");
    info_is(&d, fresh);
}

#[test]
fn ls() {
    let d = Daemon::start();
    let major = d.major();
    ok(d.dmsetup(&["ls"]), "No devices found\n");
    stack(&d);
    create(&d, "z", "0 100 zero");
    // Listed in name order (the kernel's rb-tree).
    ok(d.dmsetup(&["ls"]), &format!("a\t({major}:0)\nb\t({major}:1)\nc\t({major}:2)\nz\t({major}:3)\n"));
    ok(d.dmsetup(&["ls", "-o", "blkdevname"]), "a\t(dm-0)\nb\t(dm-1)\nc\t(dm-2)\nz\t(dm-3)\n");
    ok(d.dmsetup(&["ls", "--target", "linear"]), &format!("a\t({major}, 0)\nb\t({major}, 1)\nc\t({major}, 2)\n"));
    ok(d.dmsetup(&["ls", "--target", "zero"]), &format!("z\t({major}, 3)\n"));
    ok(d.dmsetup(&["ls", "--target", "striped"]), "");
}

#[test]
fn ls_tree_of_stacked_devices() {
    let d = Daemon::start();
    let major = d.major();
    stack(&d);
    ok(d.dmsetup(&["create", "z", "--readonly", "--table", "0 100 zero"]), "");
    ok(
        d.dmsetup(&["ls", "--tree", "-o", "utf"]),
        &format!("c ({major}:2)\n └─b ({major}:1)\n    └─a ({major}:0)\n       └─ (251:0)\nz ({major}:3)\n"),
    );
    ok(
        d.dmsetup(&["ls", "--tree", "-o", "ascii,blkdevname"]),
        &format!("c <dm-2> ({major}:2)\n `-b <dm-1> ({major}:1)\n    `-a <dm-0> ({major}:0)\n       `- (251:0)\nz <dm-3> ({major}:3)\n"),
    );
    ok(
        d.dmsetup(&["ls", "--tree", "-o", "ascii,active,rw,open,uuid"]),
        &format!(
            "c ({major}:2) [ACTIVE, RW, 0, UUID-C]\n `-b ({major}:1) [ACTIVE, RW, 1, ]\n    `-a ({major}:0) [ACTIVE, RW, 1, ]\n       \
             `- (251:0)\nz ({major}:3) [ACTIVE, RO, 0, ]\n"
        ),
    );
    ok(
        d.dmsetup(&["ls", "--tree", "-o", "ascii,inverted"]),
        &format!(" (251:0)\n `-a ({major}:0)\n    `-b ({major}:1)\n       `-c ({major}:2)\nz ({major}:3)\n"),
    );
}

#[test]
fn info() {
    let d = Daemon::start();
    let major = d.major();
    stack(&d);
    // Open count: a table holding a device opens it (docs/pdev-numbers.md).
    info_is(&d, Info { open: 1, ..Info::live("a", 0, 1) });
    let all = [
        Info { open: 1, ..Info::live("a", 0, 1) },
        Info { open: 1, ..Info::live("b", 1, 1) },
        Info { uuid: "UUID-C", ..Info::live("c", 2, 1) },
    ];
    ok(d.dmsetup(&["info"]), &all.iter().map(|i| i.text(major)).collect::<String>());

    let cols = ["info", "-c", "-o", "name,uuid,attr,open,segments,events,major,minor"];
    ok(
        d.dmsetup(&cols),
        &format!(
            "Name             UUID                             Stat Open Targ Event  Maj Min\n\
             a                                                 L--w    1    1      0 {major:>3}   0\n\
             b                                                 L--w    1    1      0 {major:>3}   1\n\
             c                UUID-C                           L--w    0    1      0 {major:>3}   2\n"
        ),
    );
    ok(
        d.dmsetup(&[&cols[..], &["b"]].concat()),
        &format!(
            "Name             UUID                             Stat Open Targ Event  Maj Min\n\
             b                                                 L--w    1    1      0 {major:>3}   1\n"
        ),
    );
    ok(d.dmsetup(&["info", "-c", "--noheadings", "-o", "name,uuid,attr", "c"]), "c:UUID-C:L--w\n");
    ok(
        d.dmsetup(&["info", "-c", "--noheadings", "--separator", " ", "-o", "name,open,segments,events,major,minor"]),
        &format!("a 1 1 0 {major} 0\nb 1 1 0 {major} 1\nc 0 1 0 {major} 2\n"),
    );
    refused(&d, &["info", "nosuch"], "Device does not exist.\nCommand failed.\n");
}

#[test]
fn table_and_status() {
    let d = Daemon::start();
    stack(&d);
    let major = d.major();
    ok(d.dmsetup(&["table", "a"]), "0 131072 linear 251:0 0\n");
    ok(d.dmsetup(&["table", "--showkeys", "b"]), &format!("0 65536 linear {major}:0 0\n"));
    // linear has no status text: "start length linear " with the trailing space (§3.1).
    ok(d.dmsetup(&["status", "a"]), "0 131072 linear \n");
    ok(
        d.dmsetup(&["table"]),
        &format!("a: 0 131072 linear 251:0 0\nb: 0 65536 linear {major}:0 0\nc: 0 32768 linear {major}:1 0\n"),
    );
    ok(d.dmsetup(&["status"]), "a: 0 131072 linear \nb: 0 65536 linear \nc: 0 32768 linear \n");

    create(&d, "z", "0 100 zero\n100 100 error");
    ok(d.dmsetup(&["table", "--target", "zero", "z"]), "0 100 zero \n");
    ok(d.dmsetup(&["status", "--target", "error", "z"]), "100 100 error \n");
    ok(d.dmsetup(&["table", "--target", "linear", "z"]), "");
    ok(d.dmsetup(&["table", "--target", "zero"]), "z: 0 100 zero \n");

    // --inactive shows the loaded table, the plain form the live one.
    ok(d.dmsetup(&["load", "a", "--table", "0 1000 zero"]), "");
    ok(d.dmsetup(&["table", "a"]), "0 131072 linear 251:0 0\n");
    ok(d.dmsetup(&["table", "--inactive", "a"]), "0 1000 zero \n");
    ok(d.dmsetup(&["status", "--inactive", "a"]), "0 1000 zero \n");
    // No table: an empty line.
    ok(d.dmsetup(&["create", "none", "--notable"]), "");
    ok(d.dmsetup(&["table", "none"]), "\n");
    ok(d.dmsetup(&["status", "none"]), "\n");
    ok(d.dmsetup(&["table", "--inactive", "none"]), "\n");
}

#[test]
fn striped() {
    let d = Daemon::start();
    let f0 = d.file("d0.img", 8192);
    let f1 = d.file("d1.img", 8192);
    create(&d, "st", &format!("0 16384 striped 2 128 {f0} 0 {f1} 0"));
    ok(d.dmsetup(&["table", "st"]), "0 16384 striped 2 128 251:0 0 251:1 0\n");
    // INFO: stripe count, each device, then "1 <health chars>" (dm-stripe.c).
    ok(d.dmsetup(&["status", "st"]), "0 16384 striped 2 251:0 251:1 1 AA\n");
    // The table's device list has the newest device first (§2.4 DM_TABLE_DEPS).
    ok(d.dmsetup(&["deps", "st"]), "2 dependencies\t: (251, 1) (251, 0)\n");
    ok(d.dmsetup(&["info", "-c", "--noheadings", "-o", "name,segments,attr", "st"]), "st:1:L--w\n");
}

#[test]
fn deps() {
    let d = Daemon::start();
    let major = d.major();
    stack(&d);
    ok(d.dmsetup(&["deps", "b"]), &format!("1 dependencies\t: ({major}, 0)\n"));
    ok(d.dmsetup(&["deps", "-o", "devname", "b"]), "1 dependencies\t: (a)\n");
    ok(d.dmsetup(&["deps", "-o", "blkdevname", "b"]), "1 dependencies\t: (dm-0)\n");
    // A regular file has no sysfs entry: its number is printed whatever the -o.
    ok(d.dmsetup(&["deps", "-o", "devname", "a"]), "1 dependencies\t: (251, 0)\n");
    ok(
        d.dmsetup(&["deps"]),
        &format!(
            "a: 1 dependencies\t: (251, 0)\nb: 1 dependencies\t: ({major}, 0)\nc: 1 dependencies\t: ({major}, 1)\n"
        ),
    );
    ok(d.dmsetup(&["create", "none", "--notable"]), "");
    ok(d.dmsetup(&["deps", "none"]), "0 dependencies\t:\n");
    ok(d.dmsetup(&["load", "none", "--table", "0 8 linear /dev/mapper/c 0"]), "");
    ok(d.dmsetup(&["deps", "none"]), "0 dependencies\t:\n");
    ok(d.dmsetup(&["deps", "--inactive", "-o", "devname", "none"]), "1 dependencies\t: (c)\n");
}

#[test]
fn load_reload_clear() {
    let d = Daemon::start();
    let f = d.file("disk.img", 131072);
    create(&d, "l", &format!("0 1000 linear {f} 0"));

    ok(d.dmsetup(&["reload", "l", "--table", &format!("0 2000 linear {f} 100")]), "");
    info_is(&d, Info { tables: "LIVE & INACTIVE", ..Info::live("l", 0, 1) });
    ok(d.dmsetup(&["info", "-c", "--noheadings", "-o", "attr", "l"]), "LI-w\n");
    ok(d.dmsetup(&["table", "l"]), "0 1000 linear 251:0 0\n");
    ok(d.dmsetup(&["table", "--inactive", "l"]), "0 2000 linear 251:0 100\n");

    // clear drops the inactive table only.
    ok(d.dmsetup(&["clear", "l"]), "");
    info_is(&d, Info::live("l", 0, 1));
    ok(d.dmsetup(&["table", "--inactive", "l"]), "\n");

    // load (the same command) then resume swaps; a swap does not move the event counter (§2.9).
    ok(d.dmsetup(&["load", "l", "--table", &format!("0 2000 linear {f} 100")]), "");
    ok(d.dmsetup(&["resume", "l"]), "");
    info_is(&d, Info::live("l", 0, 1));
    ok(d.dmsetup(&["table", "l"]), "0 2000 linear 251:0 100\n");

    // Into a device without a table: INACTIVE only; target count follows --inactive (§2.3).
    ok(d.dmsetup(&["create", "e", "--notable"]), "");
    ok(d.dmsetup_stdin(&["load", "e"], "0 10 zero\n10 10 error\n"), "");
    let e = Info { tables: "INACTIVE", ..Info::live("e", 1, 0) };
    info_is(&d, e);
    ok(d.dmsetup(&["info", "--inactive", "e"]), &Info { targets: 2, ..e }.text(d.major()));
    ok(d.dmsetup(&["info", "-c", "--noheadings", "-o", "attr", "e"]), "-I-w\n");
    ok(d.dmsetup(&["clear", "e"]), "");
    info_is(&d, Info { tables: "None", ..e });

    // A failed load keeps the previous inactive table.
    ok(d.dmsetup(&["load", "l", "--table", "0 8 zero"]), "");
    refused(&d, &["load", "l", "--table", "0 8 nosuchtarget"], &ioctl_failed("reload", "l", "", EINVAL));
    ok(d.dmsetup(&["table", "--inactive", "l"]), "0 8 zero \n");
}

#[test]
fn suspend_resume() {
    let d = Daemon::start();
    create(&d, "s", "0 100 zero");
    let live = Info::live("s", 0, 1);
    let suspended = Info { state: "SUSPENDED", ..live };

    ok(d.dmsetup(&["suspend", "s"]), "");
    info_is(&d, suspended);
    ok(d.dmsetup(&["info", "-c", "--noheadings", "-o", "attr", "s"]), "L-sw\n");
    // Suspending a suspended device is not an error.
    ok(d.dmsetup(&["suspend", "s"]), "");
    ok(d.dmsetup(&["resume", "s"]), "");
    info_is(&d, live);

    ok(d.dmsetup(&["suspend", "--noflush", "s"]), "");
    info_is(&d, suspended);
    ok(d.dmsetup(&["resume", "s"]), "");
    info_is(&d, live);
    // Resuming an active device without an inactive table is a no-op.
    ok(d.dmsetup(&["resume", "s"]), "");
    info_is(&d, live);

    // A suspended device with no table cannot be resumed (EINVAL, §2.4 DM_DEV_SUSPEND).
    ok(d.dmsetup(&["create", "n", "--notable"]), "");
    ok(d.dmsetup(&["suspend", "n"]), "");
    brief_is(&d, "n", &format!("--sw:0:0:0:{}:1", d.major()));
    refused(&d, &["resume", "n"], &ioctl_failed("resume", "n", "", EINVAL));
}

#[test]
fn rename_and_setuuid() {
    let d = Daemon::start();
    create(&d, "old", "0 100 zero");
    ok(d.dmsetup(&["rename", "old", "new"]), "");
    // A rename fires a table event on the live table (§2.4 DM_DEV_RENAME).
    info_is(&d, Info { event: 1, ..Info::live("new", 0, 1) });
    assert_node(&d, "new", 0);
    assert!(!node_exists(&d, "old"));
    fails(d.dmsetup(&["info", "old"]), "Device does not exist.\nCommand failed.\n");

    ok(d.dmsetup(&["rename", "new", "--setuuid", "UUID-1"]), "");
    info_is(&d, Info { event: 2, uuid: "UUID-1", ..Info::live("new", 0, 1) });
    // A uuid is set once (EINVAL), a taken name or uuid is EBUSY, a missing device ENXIO.
    refused(&d, &["rename", "new", "--setuuid", "UUID-2"], &ioctl_failed("rename", "new", "", EINVAL));
    create(&d, "other", "0 100 zero");
    refused(&d, &["rename", "other", "new"], &ioctl_failed("rename", "other", "", EBUSY));
    refused(&d, &["rename", "other", "--setuuid", "UUID-1"], &ioctl_failed("rename", "other", "", EBUSY));
    refused(&d, &["rename", "nosuch", "x"], &ioctl_failed("rename", "nosuch", "", ENXIO));
    info_is(&d, Info::live("other", 1, 1));

    // Without a live table there is no table event: the counter stays.
    ok(d.dmsetup(&["create", "bare", "--notable"]), "");
    ok(d.dmsetup(&["rename", "bare", "bare2"]), "");
    brief_is(&d, "bare2", &format!("---w:0:0:0:{}:2", d.major()));
}

#[test]
fn message() {
    let d = Daemon::start();
    let f = d.file("disk.img", 1000);
    create(&d, "l", &format!("0 1000 linear {f} 0"));
    ok(d.dmsetup(&["message", "l", "0", "@cancel_deferred_remove"]), "");
    // linear has no message handler; unknown core messages are EINVAL too (§2.7).
    refused(&d, &["message", "l", "0", "hello"], &ioctl_failed("message", "l", "", EINVAL));
    refused(&d, &["message", "l", "0", "@bogus"], &ioctl_failed("message", "l", "", EINVAL));
    refused(&d, &["message", "nosuch", "0", "@cancel_deferred_remove"], &ioctl_failed("message", "nosuch", "", ENXIO));
    // No live table: the kernel returns +2, which libdm takes for success.
    ok(d.dmsetup(&["create", "bare", "--notable"]), "");
    ok(d.dmsetup(&["message", "bare", "0", "hello"]), "");
    ok(d.dmsetup(&["message", "bare", "0", "@cancel_deferred_remove"]), "");
}

#[test]
fn setgeometry() {
    let d = Daemon::start();
    create(&d, "g", "0 2048 zero");
    ok(d.dmsetup(&["setgeometry", "g", "100", "16", "63", "0"]), "");
    info_is(&d, Info::live("g", 0, 1));
    // heads > 255, start beyond cylinders*heads*sectors (§2.4 DM_DEV_SET_GEOMETRY).
    refused(&d, &["setgeometry", "g", "100", "300", "63", "0"], &ioctl_failed("setgeometry", "g", "", EINVAL));
    refused(&d, &["setgeometry", "g", "1", "1", "1", "2"], &ioctl_failed("setgeometry", "g", "", EINVAL));
    refused(&d, &["setgeometry", "g", "65536", "1", "1", "0"], &ioctl_failed("setgeometry", "g", "", EINVAL));
    refused(&d, &["setgeometry", "nosuch", "1", "1", "1", "0"], &ioctl_failed("setgeometry", "nosuch", "", ENXIO));
    info_is(&d, Info::live("g", 0, 1));
}

#[test]
fn wait_is_woken_by_rename() {
    let d = Daemon::start();
    create(&d, "w", "0 100 zero");
    let waiter = start_waiter(&d, &["wait", "w", "0"]);
    ok(d.dmsetup(&["rename", "w", "w2"]), "");
    // The waiter found the device before the rename; it is woken by the table event and succeeds
    // (dev_wait looks the device up once, §2.4 DM_DEV_WAIT).
    ok(finish(waiter), "");
    info_is(&d, Info { event: 1, ..Info::live("w2", 0, 1) });
}

#[test]
fn wait_is_woken_by_removal() {
    let d = Daemon::start();
    ok(d.dmsetup(&["create", "r", "-u", "UUID-R", "--table", "0 100 zero"]), "");
    let waiter = start_waiter(&d, &["wait", "-u", "UUID-R", "0"]);
    ok(d.dmsetup(&["remove", "r"]), "");
    // Removal fires a table event on the live table before the device goes (§2.4 DM_DEV_REMOVE).
    ok(finish(waiter), "");
}

#[test]
fn wait_by_uuid_and_for_a_past_event() {
    let d = Daemon::start();
    ok(d.dmsetup(&["create", "u", "-u", "UUID-U", "--table", "0 100 zero"]), "");
    let waiter = start_waiter(&d, &["wait", "-u", "UUID-U", "0"]);
    ok(d.dmsetup(&["rename", "u", "u2"]), "");
    ok(finish(waiter), "");
    // The counter already differs from the argument: no blocking; -v prints the device.
    ok(d.dmsetup(&["wait", "u2", "0"]), "");
    let after = Info { event: 1, uuid: "UUID-U", ..Info::live("u2", 0, 1) };
    ok(d.dmsetup(&["wait", "-v", "u2", "0"]), &after.text(d.major()));
    ok(d.dmsetup(&["wait", "-v", "-u", "UUID-U", "7"]), &after.text(d.major()));
    refused(&d, &["wait", "nosuch", "0"], &ioctl_failed("waitevent", "nosuch", "", ENXIO));
}

#[test]
fn mknodes() {
    let d = Daemon::start();
    create(&d, "m0", "0 100 zero");
    create(&d, "m1", "0 100 zero");
    assert_node(&d, "m0", 0);
    assert_node(&d, "m1", 1);

    // A missing node is made again, a node with the wrong number is replaced, an entry for no
    // device goes.
    std::fs::remove_file(d.path("dev/mapper/m0")).unwrap();
    std::fs::remove_file(d.path("dev/mapper/m1")).unwrap();
    mknod_block(&d.path("dev/mapper/m1"), d.major(), 7);
    assert_eq!(split_dev(std::fs::metadata(d.path("dev/mapper/m1")).unwrap().rdev()), (d.major(), 7));
    std::fs::write(d.path("dev/mapper/stale"), b"").unwrap();
    ok(d.dmsetup(&["mknodes"]), "");
    assert_node(&d, "m0", 0);
    assert_node(&d, "m1", 1);
    assert!(!node_exists(&d, "stale"));

    // One device by name.
    std::fs::remove_file(d.path("dev/mapper/m1")).unwrap();
    ok(d.dmsetup(&["mknodes", "m1"]), "");
    assert_node(&d, "m1", 1);
}

/// Asserts the device list is empty and no node is left under `<run dir>/dev/mapper`.
#[track_caller]
fn all_gone(d: &Daemon) {
    ok(d.dmsetup(&["ls"]), "No devices found\n");
    let left: Vec<_> = std::fs::read_dir(d.path("dev/mapper")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "nodes left behind: {left:?}");
}

#[test]
fn remove_deferred() {
    let d = Daemon::start();
    create(&d, "a", "0 100 zero");
    create(&d, "b", "0 100 linear /dev/mapper/a 0");
    // a is held by b's table: EBUSY, unless deferred (§2.4 DM_DEV_REMOVE).
    refused(&d, &["remove", "a"], &ioctl_failed("remove", "a", "", EBUSY));
    ok(d.dmsetup(&["remove", "--deferred", "a"]), "");
    let held = Info { open: 1, ..Info::live("a", 0, 1) };
    info_is(&d, Info { state: "ACTIVE (DEFERRED REMOVE)", ..held });
    // @cancel_deferred_remove takes the mark back; mark it again.
    ok(d.dmsetup(&["message", "a", "0", "@cancel_deferred_remove"]), "");
    info_is(&d, held);
    ok(d.dmsetup(&["remove", "--deferred", "a"]), "");
    // The holder goes: a goes with it.
    ok(d.dmsetup(&["remove", "b"]), "");
    fails(d.dmsetup(&["info", "a"]), "Device does not exist.\nCommand failed.\n");
    all_gone(&d);
    // A deferred removal of a device nobody holds is immediate.
    create(&d, "free", "0 100 zero");
    ok(d.dmsetup(&["remove", "--deferred", "free"]), "");
    all_gone(&d);
}

#[test]
fn remove_deferred_down_a_stack() {
    let d = Daemon::start();
    stack(&d);
    // a (held by b) and b (held by c) both wait for their last close.
    ok(d.dmsetup(&["remove", "--deferred", "a"]), "");
    ok(d.dmsetup(&["remove", "--deferred", "b"]), "");
    info_is(&d, Info { state: "ACTIVE (DEFERRED REMOVE)", open: 1, ..Info::live("a", 0, 1) });
    info_is(&d, Info { state: "ACTIVE (DEFERRED REMOVE)", open: 1, ..Info::live("b", 1, 1) });
    // Removing c closes b, whose removal closes a: both go.
    ok(d.dmsetup(&["remove", "c"]), "");
    all_gone(&d);
}

#[test]
fn remove_retry() {
    let d = Daemon::start();
    create(&d, "a", "0 100 zero");
    create(&d, "b", "0 100 linear /dev/mapper/a 0");
    // libdm tries 25 times on EBUSY, reporting each failure.
    let busy = "device-mapper: remove ioctl on a  failed: Device or resource busy\n".repeat(25) + "Command failed.\n";
    refused(&d, &["remove", "--retry", "a"], &busy);
    ok(d.dmsetup(&["remove", "--retry", "b"]), "");
    ok(d.dmsetup(&["remove", "--retry", "a"]), "");
    all_gone(&d);
    refused(&d, &["remove", "nosuch"], &ioctl_failed("remove", "nosuch", "", ENXIO));
}

#[test]
fn remove_all() {
    let d = Daemon::start();
    stack(&d);
    create(&d, "z", "0 100 zero");
    ok(d.dmsetup(&["create", "n", "--notable", "--addnodeoncreate"]), "");
    // Held devices are skipped, then retried once their holders are gone (dm_hash_remove_all).
    ok(d.dmsetup(&["remove_all"]), "");
    all_gone(&d);
    ok(d.dmsetup(&["remove_all"]), "");
}

#[test]
fn create_errors() {
    let d = Daemon::start();
    let major = d.major();
    let f = d.file("disk.img", 131072);
    ok(d.dmsetup(&["create", "a", "-u", "UUID-A", "--table", "0 100 zero"]), "");

    refused(&d, &["create", "a", "--table", "0 100 zero"], &ioctl_failed("create", "a", "", EBUSY));
    refused(
        &d,
        &["create", "b", "-u", "UUID-A", "--table", "0 100 zero"],
        &ioctl_failed("create", "b", "UUID-A", EBUSY),
    );

    // Table errors are EINVAL from the load; libdm then removes the half-made device, so minor 1
    // is free again for the next attempt.
    let bad_load = |name: &str| ioctl_failed("reload", name, &format!("({major}:1)"), EINVAL);
    for (name, table) in [
        ("gap", "0 100 zero\n200 100 zero".to_string()),
        ("notzero", "100 100 zero".to_string()),
        ("overlap", "0 100 zero\n50 100 zero".to_string()),
        ("empty", "0 0 zero".to_string()),
        ("unknown", "0 100 nosuchtarget".to_string()),
        ("toosmall", format!("0 131073 linear {f} 0")),
        ("beyond", format!("0 100 linear {f} 131000")),
        ("argc", format!("0 100 linear {f}")),
        ("zeroargs", "0 100 zero 1".to_string()),
        ("self", format!("0 100 linear {major}:1 0")),
    ] {
        refused(&d, &["create", name, "--table", &table], &bad_load(name));
        assert!(!node_exists(&d, name));
    }
    ok(d.dmsetup(&["ls"]), &format!("a\t({major}:0)\n"));
    info_is(&d, Info { uuid: "UUID-A", ..Info::live("a", 0, 1) });
}

#[test]
fn commands_on_a_missing_device() {
    let d = Daemon::start();
    let gone = |cmd: &str| ioctl_failed(cmd, "nosuch", "", ENXIO);
    refused(&d, &["table", "nosuch"], &gone("table"));
    refused(&d, &["deps", "nosuch"], &gone("deps"));
    refused(&d, &["load", "nosuch", "--table", "0 1 zero"], &gone("reload"));
    refused(&d, &["suspend", "nosuch"], &gone("suspend"));
    refused(&d, &["resume", "nosuch"], &gone("resume"));
    refused(&d, &["clear", "nosuch"], &gone("clear"));
    refused(&d, &["remove", "nosuch"], &gone("remove"));
    // info and status treat ENXIO as "absent" (libdm).
    refused(&d, &["info", "nosuch"], "Device does not exist.\nCommand failed.\n");
    refused(&d, &["status", "nosuch"], "Device does not exist.\nCommand failed.\n");
}
