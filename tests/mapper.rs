//! `/dev/mapper/<name>` for unmodified tools: a daemon with `--fuse-dir`, and dd, blockdev, stat,
//! mkfs.ext4 and e2fsck run under `dmemu exec` (the shim redirects the node to the FUSE file and
//! answers stat and the block ioctls).

mod common;

use common::fuse::{mounted, pattern, unmount, Mapper};
use common::{bin, Daemon};
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn dd_writes_land_at_the_mapped_offset_of_the_backing_file() {
    let m = Mapper::start();
    let file = m.linear("lin", 2048, 100, &[]);
    let pat = pattern(8192, 7);
    let src = m.d.path("pattern");
    std::fs::write(&src, &pat).unwrap();
    // Plain dd, as on a real node (no conv=notrunc: O_TRUNC means nothing to a block device).
    let src_arg = format!("if={}", src.display());
    m.run("dd", &[&src_arg, "of=/dev/mapper/lin", "bs=4096", "seek=3", "status=none"]).ok();
    let back = std::fs::read(&file).unwrap();
    let at = 100 * 512 + 3 * 4096;
    assert_eq!(&back[at..at + pat.len()], &pat[..]);
    assert!(back[..at].iter().all(|&b| b == 0) && back[at + pat.len()..].iter().all(|&b| b == 0));
    assert_eq!(back.len(), (2048 + 100) * 512, "the backing file keeps its size");

    // Reading back through the node, by its kernel name this time.
    let minor = m.info_field("lin", "minor");
    let out = m.d.path("readback");
    let dm = format!("if=/dev/dm-{minor}");
    let of = format!("of={}", out.display());
    m.run("dd", &[&dm, &of, "bs=4096", "skip=3", "count=2", "status=none"]).ok();
    assert_eq!(std::fs::read(&out).unwrap(), pat);
}

#[test]
fn blockdev_and_stat_see_a_block_device() {
    let m = Mapper::start();
    m.linear("bd", 4096, 0, &[]);
    let out = m.run("blockdev", &["--getsize64", "--getss", "--getpbsz", "--getro", "--getsz", "/dev/mapper/bd"]);
    assert_eq!(out.ok(), "2097152\n512\n512\n0\n4096\n");

    let major = m.d.major();
    let minor: u32 = m.info_field("bd", "minor").parse().unwrap();
    let out = m.run("stat", &["-c", "%F %t:%T %a %s", "/dev/mapper/bd", &format!("/dev/dm-{minor}")]);
    let want = format!("block special file {major:x}:{minor:x} 660 0\n");
    assert_eq!(out.ok(), want.repeat(2));
    // libdm's own node (it mknods one in $DM_DEV_DIR/mapper as root) leads to the same device.
    let own = format!("{}/dev/mapper/bd", m.d.dir.display());
    assert_eq!(m.run("stat", &["-c", "%F %t:%T %a %s", &own]).ok(), want);
    assert_eq!(m.run("blockdev", &["--getsize64", &own]).ok(), "2097152\n");
    // sh's `test -b` (stat through another entry point).
    m.run("sh", &["-c", "test -b /dev/mapper/bd && test ! -e /dev/mapper/nonesuch"]).ok();

    // Read-ahead goes through the sysfs tree that dmsetup also reads.
    m.run("blockdev", &["--setra", "1024", "/dev/mapper/bd"]).ok();
    assert_eq!(m.run("blockdev", &["--getra", "/dev/mapper/bd"]).ok(), "1024\n");
    assert!(m.d.dmsetup(&["info", "bd"]).ok().contains("Read Ahead:        1024\n"));

    // A resize shows at once.
    let file = m.d.file("bigger.img", 8192);
    m.d.dmsetup(&["reload", "bd", "--table", &format!("0 8192 linear {file} 0")]).ok();
    m.d.dmsetup(&["resume", "bd"]).ok();
    assert_eq!(m.run("blockdev", &["--getsize64", "/dev/mapper/bd"]).ok(), "4194304\n");
}

#[test]
fn mkfs_ext4_then_e2fsck_is_clean() {
    let m = Mapper::start();
    let file = m.linear("fs", 64 * 2048, 2048, &[]);
    let out = m.run("mkfs.ext4", &["-F", "-q", "/dev/mapper/fs"]);
    out.ok();
    let out = m.run("e2fsck", &["-f", "-n", "/dev/mapper/fs"]);
    let text = out.ok();
    assert!(text.contains("Pass 5: Checking group summary information\n/dev/mapper/fs: 11/"), "{out:#?}");
    let out = m.run("e2fsck", &["-n", "/dev/mapper/fs"]);
    assert!(out.ok().contains("/dev/mapper/fs: clean, 11/"), "{out:#?}");
    // libblkid finds the filesystem; lsblk sees a 64 MiB dm disk.
    assert_eq!(m.run("blkid", &["-o", "value", "-s", "TYPE", "/dev/mapper/fs"]).ok(), "ext4\n");
    assert_eq!(
        m.run("lsblk", &["-dn", "-o", "TYPE,SIZE", "/dev/mapper/fs"]).ok().split_whitespace().collect::<Vec<_>>(),
        ["dm", "64M"]
    );
    // The superblock landed in the backing file behind the table's 1 MiB offset.
    let back = std::fs::read(&file).unwrap();
    let magic = 2048 * 512 + 1024 + 0x38;
    assert_eq!(&back[magic..magic + 2], &[0x53, 0xef]);
    // Nothing holds the device once the tools exited (releases may trail the exit a little).
    wait_open_count(&m, "fs", "0");
}

#[test]
fn read_only_table_refuses_writes() {
    let m = Mapper::start();
    let file = m.linear("ro", 2048, 0, &["--readonly"]);
    std::fs::write(m.d.path("one"), [0xaau8; 4096]).unwrap();
    let src = format!("if={}", m.d.path("one").display());
    let out = m.run("dd", &[&src, "of=/dev/mapper/ro", "bs=4096", "status=none"]);
    assert!(out.err().contains("Operation not permitted"), "{out:#?}");
    assert!(std::fs::read(&file).unwrap().iter().all(|&b| b == 0));
    assert_eq!(m.run("blockdev", &["--getro", "/dev/mapper/ro"]).ok(), "1\n");
    // Reading still works.
    m.run("dd", &["if=/dev/mapper/ro", "of=/dev/null", "bs=4096", "status=none"]).ok();
}

#[test]
fn blkdiscard_zeroout_and_flushbufs_reach_the_backing_file() {
    let m = Mapper::start();
    let file = m.linear("dz", 2048, 8, &[]);
    let pat = pattern(1 << 20, 3);
    let src = m.d.path("pattern");
    std::fs::write(&src, &pat).unwrap();
    let src_arg = format!("if={}", src.display());
    m.run("dd", &[&src_arg, "of=/dev/mapper/dz", "bs=65536", "status=none"]).ok();
    m.run("blockdev", &["--flushbufs", "/dev/mapper/dz"]).ok();
    // BLKDISCARD punches a hole below; BLKZEROOUT (`-z`) writes zeroes.
    m.run("blkdiscard", &["-f", "-o", "65536", "-l", "65536", "/dev/mapper/dz"]).ok();
    m.run("blkdiscard", &["-f", "-z", "-o", "262144", "-l", "4096", "/dev/mapper/dz"]).ok();
    // The kernel's checks: a range not aligned to the logical block size is EINVAL.
    let out = m.run("blkdiscard", &["-f", "-o", "100", "-l", "4096", "/dev/mapper/dz"]);
    assert_ne!(out.code, 0, "{out:#?}");
    let back = std::fs::read(&file).unwrap();
    let dev = &back[8 * 512..];
    assert!(dev[..65536] == pat[..65536]);
    assert!(dev[65536..131072].iter().all(|&b| b == 0), "discarded range reads zeroes");
    assert!(dev[131072..262144] == pat[131072..262144]);
    assert!(dev[262144..266240].iter().all(|&b| b == 0), "zeroed range");
    assert!(dev[266240..] == pat[266240..]);
    assert!(back[..8 * 512].iter().all(|&b| b == 0), "nothing before the table's offset");
}

#[test]
fn blockdev_setro_holds_across_a_table_swap_until_setrw() {
    let m = Mapper::start();
    let file = m.linear("rs", 2048, 0, &[]);
    m.run("blockdev", &["--setro", "/dev/mapper/rs"]).ok();
    assert_eq!(m.run("blockdev", &["--getro", "/dev/mapper/rs"]).ok(), "1\n");
    // The disk's RO state is what DM_DEV_STATUS reports.
    assert!(m.d.dmsetup(&["info", "rs"]).ok().contains("State:             ACTIVE (READ-ONLY)\n"));
    std::fs::write(m.d.path("one"), [0xaau8; 512]).unwrap();
    let src = format!("if={}", m.d.path("one").display());
    let out = m.run("dd", &[&src, "of=/dev/mapper/rs", "bs=512", "status=none"]);
    assert!(out.err().contains("Operation not permitted"), "{out:#?}");
    // A new writable table does not clear the block device's flag (only BLKROSET 0 does).
    m.d.dmsetup(&["reload", "rs", "--table", &format!("0 2048 linear {file} 0")]).ok();
    m.d.dmsetup(&["resume", "rs"]).ok();
    assert_eq!(m.run("blockdev", &["--getro", "/dev/mapper/rs"]).ok(), "1\n");
    m.run("blockdev", &["--setrw", "/dev/mapper/rs"]).ok();
    assert_eq!(m.run("blockdev", &["--getro", "/dev/mapper/rs"]).ok(), "0\n");
    assert!(m.d.dmsetup(&["info", "rs"]).ok().contains("State:             ACTIVE\n"));
    m.run("dd", &[&src, "of=/dev/mapper/rs", "bs=512", "status=none"]).ok();
    assert_eq!(std::fs::read(&file).unwrap()[..512], [0xaa; 512]);
}

fn wait_open_count(m: &Mapper, name: &str, want: &str) {
    for _ in 0..200 {
        if m.info_field(name, "open") == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("open count of {name} never became {want}: {}", m.info_field(name, "open"));
}

#[test]
fn a_process_holding_the_node_open_counts_as_an_opener() {
    let m = Mapper::start();
    m.linear("held", 2048, 0, &[]);
    assert!(m.d.dmsetup(&["info", "held"]).ok().contains("Open count:        0\n"));
    let mut holder = Command::new(bin())
        .args(["exec", "--socket"])
        .arg(&m.d.socket)
        .args(["--", "sh", "-c", "exec 3</dev/mapper/held; echo ready; exec sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let info = m.d.dmsetup(&["info", "held"]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(info.ok().contains("Open count:        1\n"), "{info:#?}");
    wait_open_count(&m, "held", "0");
    m.d.dmsetup(&["remove", "held"]).ok();
    assert!(!m.fuse.join("held").exists(), "the file goes with the device");
    let out = m.run("blockdev", &["--getsize64", "/dev/mapper/held"]);
    assert!(out.err().contains("No such file or directory"), "{out:#?}");
}

#[test]
fn writes_wait_through_a_suspend_and_land_by_the_new_table() {
    let m = Mapper::start();
    let a = m.linear("sw", 2048, 0, &[]);
    let b = m.d.file("b.img", 2048);
    m.d.dmsetup(&["suspend", "sw"]).ok();
    m.d.dmsetup(&["reload", "sw", "--table", &format!("0 2048 linear {b} 0")]).ok();
    std::fs::write(m.d.path("one"), [0x5au8; 4096]).unwrap();
    let src = format!("if={}", m.d.path("one").display());
    let mut writer = Command::new(bin())
        .args(["exec", "--socket"])
        .arg(&m.d.socket)
        .args(["--", "dd", &src, "of=/dev/mapper/sw", "bs=4096", "seek=1", "oflag=direct", "status=none"])
        .spawn()
        .unwrap();
    // The writer has the node open; its write cannot finish while the device is suspended.
    wait_open_count(&m, "sw", "1");
    assert!(writer.try_wait().unwrap().is_none(), "a write completed on a suspended device");
    // The resume's own node bookkeeping stats the node: it must not wait behind the held write.
    m.d.dmsetup(&["resume", "sw"]).ok();
    assert!(writer.wait().unwrap().success());
    assert!(std::fs::read(&a).unwrap().iter().all(|&x| x == 0), "nothing reached the replaced table");
    assert!(std::fs::read(&b).unwrap()[4096..8192].iter().all(|&x| x == 0x5a));
}

#[test]
fn hello_names_the_fuse_dir_and_sigterm_unmounts_it() {
    let m = Mapper::start();
    assert_eq!(m.d.hello("fuse_dir"), m.fuse.to_str().unwrap());
    assert!(mounted(&m.fuse));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(m.d.pid() as i32, libc::SIGTERM) };
    for _ in 0..400 {
        if !mounted(&m.fuse) {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{} still mounted after SIGTERM", m.fuse.display());
}

#[test]
fn without_a_fuse_dir_nodes_are_left_alone() {
    let d = Daemon::start();
    assert!(!d.hello_text().contains("fuse_dir="));
    d.dmsetup(&["create", "plain", "--table", "0 8 zero"]).ok();
    // libdm's own node exists but no driver answers it (ENXIO); /dev/mapper has no such node.
    let out = d.exec("blockdev", &["--getsize64", &format!("{}/dev/mapper/plain", d.dir.display())], None);
    assert!(out.err().contains("No such device or address"), "{out:#?}");
    let out = d.exec("blockdev", &["--getsize64", "/dev/mapper/plain"], None);
    assert!(out.err().contains("No such file or directory"), "{out:#?}");
}

/// The pids of `dmemu serve` processes whose command line names `socket`.
fn daemons_for(socket: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.iter().any(|a| *a == b"serve") && args.iter().any(|a| *a == socket.as_os_str().as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn exec_starts_a_daemon_that_serves_dev_mapper() {
    let dir = std::env::temp_dir().join(format!("dmemu-mapper-exec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("control.sock");
    let fuse = dir.join("fuse");
    let exec = |args: &[&str]| {
        Command::new(bin()).arg("exec").arg("--socket").arg(&socket).arg("--").args(args).output().unwrap()
    };
    let created = exec(&["dmsetup", "create", "auto", "--table", "0 2048 zero"]);
    let size = exec(&["blockdev", "--getsize64", "/dev/mapper/auto"]);
    let pids = daemons_for(&socket);
    for &pid in &pids {
        // SAFETY: the daemon this test started (through dmemu exec).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let mut gone = false;
    for _ in 0..400 {
        if !mounted(&fuse) && daemons_for(&socket).is_empty() {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    unmount(&fuse);
    assert!(created.status.success(), "{created:?}");
    assert_eq!(String::from_utf8_lossy(&size.stdout), "1048576\n", "{size:?}");
    assert_eq!(pids.len(), 1);
    assert!(gone, "the daemon did not exit and unmount {} on SIGTERM", fuse.display());
    let _ = std::fs::remove_dir_all(&dir);
}
