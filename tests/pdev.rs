//! Underlying devices' lifecycle, as the kernel's `dm_get_device`/`dm_put_device`: a table's files
//! are resolved and opened once, when it is loaded, held while any table (live or inactive) or IO
//! uses them, and closed when the last one goes; the range check reads each device's size as it
//! is then. Real daemon, real dmsetup, real NBD clients (qemu-io).

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::{Daemon, Out};
use dmemu::client::{Client, IoctlBuf};
use dmemu::ioctl::layout::DmCmd;

fn qemu_io(d: &Daemon, name: &str, cmds: &[&str]) -> Out {
    qemu_io_with(d, name, &[], cmds)
}

/// `qemu-io -r`: a read-only device's export takes no read-write client.
fn qemu_io_ro(d: &Daemon, name: &str, cmds: &[&str]) -> Out {
    qemu_io_with(d, name, &["-r"], cmds)
}

fn qemu_io_with(d: &Daemon, name: &str, opts: &[&str], cmds: &[&str]) -> Out {
    let mut args = vec!["-f", "raw"];
    args.extend(opts);
    for c in cmds {
        args.extend(["-c", c]);
    }
    let uri = d.nbd_uri(name);
    args.push(&uri);
    d.run("qemu-io", &args)
}

#[track_caller]
fn io_ok(o: &Out) {
    assert!(o.code == 0 && !o.stdout.contains("failed") && !o.stdout.contains("Pattern verification"), "{o:?}");
}

fn fill(path: &Path, byte: u8, len: usize) {
    std::fs::write(path, vec![byte; len]).unwrap();
}

fn read_at(path: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, at).unwrap();
    b
}

/// What the daemon's fds point at (`readlink` of `/proc/<pid>/fd/*`), with each fd's open flags.
fn daemon_fds(d: &Daemon) -> Vec<(String, u32)> {
    let dir = format!("/proc/{}/fd", d.pid());
    let mut v = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        let fdinfo = format!("/proc/{}/fdinfo/{}", d.pid(), e.file_name().to_string_lossy());
        let flags = std::fs::read_to_string(fdinfo)
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("flags:").map(|f| f.trim().to_owned())))
            .and_then(|f| u32::from_str_radix(&f, 8).ok())
            .unwrap_or(0);
        v.push((target.to_string_lossy().into_owned(), flags));
    }
    v
}

/// Access modes (`O_RDONLY`, `O_RDWR`) of the daemon's fds on `path`.
fn modes_on(d: &Daemon, path: &Path) -> Vec<u32> {
    let p = path.to_string_lossy();
    let mut v: Vec<u32> =
        daemon_fds(d).into_iter().filter(|(t, _)| *t == p).map(|(_, f)| f & libc::O_ACCMODE as u32).collect();
    v.sort();
    v
}

/// Removes a device, waiting for an NBD client that just left to close it.
fn remove(c: &mut Client, name: &str) {
    for _ in 0..500 {
        let r = c.run(&IoctlBuf::new(DmCmd::DevRemove).name(name)).unwrap();
        if r.ret >= 0 {
            return;
        }
        assert_eq!(r.errno, libc::EBUSY, "remove {name}");
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{name} stayed open");
}

fn create(c: &mut Client, name: &str, len: u64, line: &str) {
    c.run(&IoctlBuf::new(DmCmd::DevCreate).name(name)).unwrap().check("create").unwrap();
    c.run(&IoctlBuf::new(DmCmd::TableLoad).name(name).table([(0, len, "linear", line)]))
        .unwrap()
        .check("load")
        .unwrap();
    c.run(&IoctlBuf::new(DmCmd::DevSuspend).name(name)).unwrap().check("resume").unwrap();
}

#[test]
fn removed_devices_close_their_files() {
    let d = Daemon::start();
    let mut c = Client::connect(&d.socket).unwrap();
    let cycle = |c: &mut Client, i: usize| {
        let f = d.path(&format!("c{i}.img"));
        fill(&f, (i % 251) as u8, 64 << 10);
        create(c, "cyc", 128, &format!("{} 0", f.display()));
        io_ok(&qemu_io(&d, "cyc", &[&format!("read -P {} 0 64k", i % 251)]));
        remove(c, "cyc");
        std::fs::remove_file(&f).unwrap();
    };
    // The first cycle starts whatever the daemon keeps for good (NBD workers, pools).
    cycle(&mut c, 0);
    let before = daemon_fds(&d).len();
    for i in 1..=64 {
        cycle(&mut c, i);
    }
    // The last NBD connection's socket closes when the daemon's connection thread sees the
    // client go, which may be a moment after qemu-io exits.
    let mut fds = daemon_fds(&d);
    for _ in 0..100 {
        if fds.len() <= before {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        fds = daemon_fds(&d);
    }
    let deleted: Vec<_> = fds.iter().filter(|(t, _)| t.ends_with(" (deleted)")).collect();
    assert!(deleted.is_empty(), "fds on deleted files: {deleted:?}");
    assert!(fds.len() <= before, "fds grew from {before} to {}: {fds:?}", fds.len());
    // The same with an inactive table that is cleared, and one replaced by another load.
    let f = d.path("inactive.img");
    let g = d.path("other.img");
    fill(&f, 1, 4096);
    fill(&g, 2, 4096);
    c.run(&IoctlBuf::new(DmCmd::DevCreate).name("ina")).unwrap().check("create").unwrap();
    let load = |c: &mut Client, p: &Path| {
        let line = format!("{} 0", p.display());
        c.run(&IoctlBuf::new(DmCmd::TableLoad).name("ina").table([(0, 8, "linear", line.as_str())]))
            .unwrap()
            .check("load")
            .unwrap();
    };
    load(&mut c, &f);
    assert_eq!(modes_on(&d, &f).len(), 1, "an inactive table holds its file open");
    load(&mut c, &g);
    assert!(modes_on(&d, &f).is_empty(), "the replaced table closed its file");
    c.run(&IoctlBuf::new(DmCmd::TableClear).name("ina")).unwrap().check("clear").unwrap();
    assert!(modes_on(&d, &g).is_empty(), "the cleared table closed its file");
}

/// A path in a table names the file it resolves to at load: swapping the path afterwards (for a
/// symlink to another file) changes nothing for the device.
#[test]
fn a_path_swapped_after_load_does_not_redirect_io() {
    let d = Daemon::start();
    let dir = d.path("attacker");
    std::fs::create_dir(&dir).unwrap();
    let secret = d.path("secret.img");
    fill(&secret, 0x99, 1 << 20);
    let orig = dir.join("orig.img");
    fill(&orig, 0x11, 1 << 20);
    let link = dir.join("link.img");
    std::os::unix::fs::symlink(&orig, &link).unwrap();
    let plain = dir.join("plain.img");
    fill(&plain, 0x22, 1 << 20);

    d.dmsetup(&["create", "vl", "--table", &format!("0 2048 linear {} 0", link.display())]).ok();
    d.dmsetup(&["create", "vp", "--table", &format!("0 2048 linear {} 0", plain.display())]).ok();
    // No IO yet: the swap happens between load and first use.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    std::fs::remove_file(&plain).unwrap();
    std::os::unix::fs::symlink(&secret, &plain).unwrap();

    io_ok(&qemu_io(&d, "vl", &["read -P 0x11 0 1M", "write -P 0x33 0 64k", "flush"]));
    io_ok(&qemu_io(&d, "vp", &["read -P 0x22 0 1M", "write -P 0x44 64k 64k", "flush"]));
    assert!(read_at(&secret, 0, 1 << 20).iter().all(|&b| b == 0x99), "the other file is untouched");
    assert_eq!(read_at(&orig, 0, 65536), vec![0x33; 65536], "the write reached the file named at load");
    io_ok(&qemu_io(&d, "vp", &["read -P 0x22 0 64k", "read -P 0x44 64k 64k"]));

    // The file's pseudo number names the held file, not whatever its path names now.
    let num = d.dmsetup(&["table", "vl"]).ok().split(' ').nth(3).unwrap().to_owned();
    d.dmsetup(&["create", "again", "--table", &format!("0 2048 linear {num} 0")]).ok();
    io_ok(&qemu_io(&d, "again", &["read -P 0x33 0 64k", "read -P 0x11 64k 64k"]));
    assert_eq!(d.dmsetup(&["table", "again"]).ok(), format!("0 2048 linear {num} 0\n"));
    // Once no table holds it, the number no longer finds it: its last path names another file.
    d.dmsetup(&["remove", "again"]).ok();
    d.dmsetup(&["remove", "vl"]).ok();
    let o = d.dmsetup(&["create", "stale", "--table", &format!("0 2048 linear {num} 0")]);
    assert!(o.err().contains("Invalid argument"), "{o:?}");
    assert!(read_at(&secret, 0, 1 << 20).iter().all(|&b| b == 0x99));
}

/// A read-only table opens its files for reading only (FMODE_READ); a read-write table over the
/// same file gets a read-write open of its own, and each goes with the tables that hold it.
#[test]
fn read_only_tables_open_read_only() {
    let d = Daemon::start();
    let f = d.path("f.img");
    fill(&f, 0x5a, 1 << 20);
    let (ro, rw) = (libc::O_RDONLY as u32, libc::O_RDWR as u32);
    d.dmsetup(&["create", "r", "--readonly", "--table", &format!("0 2048 linear {} 0", f.display())]).ok();
    assert_eq!(modes_on(&d, &f), vec![ro]);
    io_ok(&qemu_io_ro(&d, "r", &["read -P 0x5a 0 1M"]));
    d.dmsetup(&["create", "w", "--table", &format!("0 2048 linear {} 0", f.display())]).ok();
    assert_eq!(modes_on(&d, &f), vec![ro, rw], "the read-write table upgraded to a read-write open");
    io_ok(&qemu_io(&d, "w", &["write -P 0x6b 0 4k", "flush"]));
    io_ok(&qemu_io_ro(&d, "r", &["read -P 0x6b 0 4k"]));
    // Another read-only table shares an open that can read.
    d.dmsetup(&["create", "r2", "--readonly", "--table", &format!("0 2048 linear {} 0", f.display())]).ok();
    assert_eq!(modes_on(&d, &f).len(), 2);
    d.dmsetup(&["remove", "w"]).ok();
    d.dmsetup(&["remove", "r2"]).ok();
    assert_eq!(modes_on(&d, &f), vec![ro]);
    d.dmsetup(&["remove", "r"]).ok();
    assert!(modes_on(&d, &f).is_empty());

    // A read-write table over a file that cannot be opened for writing fails to load, as the
    // kernel's open for FMODE_WRITE fails; a read-only one loads. A running program's file refuses
    // O_RDWR (ETXTBSY) even to root.
    let prog = d.path("prog");
    std::fs::copy("/bin/sleep", &prog).unwrap();
    let mut running = std::process::Command::new(&prog).arg("60").spawn().unwrap();
    let busy = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(5));
        std::fs::OpenOptions::new().read(true).write(true).open(&prog).is_err()
    });
    if busy {
        let line = format!("0 8 linear {} 0", prog.display());
        let o = d.dmsetup(&["create", "text", "--table", &line]);
        assert!(o.err().contains("Invalid argument"), "{o:?}");
        d.dmsetup(&["create", "text", "--readonly", "--table", &line]).ok();
        assert_eq!(modes_on(&d, &prog), vec![ro]);
    }
    running.kill().unwrap();
    running.wait().unwrap();
}

/// The range check at load reads each device's size as it is then, not as it was when the file
/// was first named.
#[test]
fn the_range_check_sees_the_size_at_this_load() {
    let d = Daemon::start();
    let e = d.path("e.img");
    std::fs::File::create(&e).unwrap();
    let ep = e.display().to_string();
    // A zero-sized device is not range-checked (device_area_is_invalid skips it).
    d.dmsetup(&["create", "hold", "--table", &format!("0 4000 linear {ep} 0")]).ok();
    // The file is 1 MiB now, while "hold" still holds it.
    std::fs::OpenOptions::new().write(true).open(&e).unwrap().set_len(1 << 20).unwrap();
    let o = d.dmsetup(&["create", "past", "--table", &format!("0 4000 linear {ep} 0")]);
    assert!(o.err().contains("Invalid argument"), "4000 sectors do not fit in 2048: {o:?}");
    assert!(d.log().contains("too small for target"), "{}", d.log());
    d.dmsetup(&["create", "fits", "--table", &format!("0 8 linear {ep} 2040")]).ok();
    let o = d.dmsetup(&["create", "offset", "--table", &format!("0 8 linear {ep} 2048")]);
    assert!(o.err().contains("Invalid argument"), "{o:?}");
    // Grown to 4 MiB: 4000 sectors fit now.
    std::fs::OpenOptions::new().write(true).open(&e).unwrap().set_len(4 << 20).unwrap();
    d.dmsetup(&["create", "grown", "--table", &format!("0 4000 linear {ep} 0")]).ok();
    // Shrunk to 1 MiB again: refused again.
    std::fs::OpenOptions::new().write(true).open(&e).unwrap().set_len(1 << 20).unwrap();
    let o = d.dmsetup(&["create", "shrunk", "--table", &format!("0 4000 linear {ep} 0")]);
    assert!(o.err().contains("Invalid argument"), "{o:?}");

    // Tables after a device's first are checked at resume, against the size then.
    d.dmsetup(&["load", "fits", "--table", &format!("0 4000 linear {ep} 0")]).ok();
    let o = d.dmsetup(&["resume", "fits"]);
    assert!(o.err().contains("Invalid argument"), "{o:?}");
    d.dmsetup(&["load", "fits", "--table", &format!("0 4000 linear {ep} 0")]).ok();
    std::fs::OpenOptions::new().write(true).open(&e).unwrap().set_len(4 << 20).unwrap();
    d.dmsetup(&["resume", "fits"]).ok();
    assert_eq!(d.dmsetup(&["table", "fits"]).ok().split(' ').nth(1), Some("4000"));
}

/// Only regular files and block devices are devices: a FIFO, a directory or a character device is
/// refused at load, without opening it (a FIFO's open would wait for a writer).
#[test]
fn paths_that_are_not_devices_are_refused_without_opening_them() {
    let d = Daemon::start();
    let fifo = d.path("fifo");
    let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let dir = d.path("subdir");
    std::fs::create_dir(&dir).unwrap();
    for (p, ro) in
        [(fifo.as_path(), true), (fifo.as_path(), false), (dir.as_path(), true), (Path::new("/dev/null"), true)]
    {
        let line = format!("0 8 linear {} 0", p.display());
        let mut args = vec!["create", "x", "--table", &line];
        if ro {
            args.push("--readonly");
        }
        let o = d.dmsetup(&args);
        assert!(o.err().contains("Invalid argument"), "{p:?}: {o:?}");
    }
    assert!(d.alive());
}
