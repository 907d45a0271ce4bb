//! `@stats_*` messages through the real dmstats/dmsetup, and the counters as IO passes.

mod common;

use common::Daemon;

#[test]
fn dmstats_creates_lists_and_reports_regions() {
    let d = Daemon::start();
    let f = d.file("f", 2048);
    d.dmsetup(&["create", "s1", "--table", &format!("0 2048 linear {f} 0")]).ok();
    let created = d.exec("/usr/sbin/dmstats", &["create", "s1", "--areas", "4"], None);
    assert_eq!(created.ok(), "s1: Created new region with 4 area(s) as region ID 0\n");
    assert_eq!(d.dmsetup(&["message", "s1", "0", "@stats_list"]).ok(), "0: 0+2048 512 dmstats -\n");
    let print = d.dmsetup(&["message", "s1", "0", "@stats_print", "0"]);
    let lines: Vec<&str> = print.ok().lines().collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[3], "1536+512 0 0 0 0 0 0 0 0 0 0 0 0 0");
    let missing = d.dmsetup(&["message", "s1", "0", "@stats_delete", "7"]);
    assert!(missing.err().contains("No such file or directory"), "{missing:?}");
    d.dmsetup(&["message", "s1", "0", "@stats_delete", "0"]).ok();
    assert_eq!(d.dmsetup(&["message", "s1", "0", "@stats_list"]).ok(), "");
    let bad = d.dmsetup(&["message", "s1", "0", "@stats_bogus"]);
    assert!(bad.err().contains("Invalid argument"), "{bad:?}");
}

#[test]
fn dmstats_counts_the_io_that_passes() {
    let d = Daemon::start();
    let f = d.file("f", 2048);
    d.dmsetup(&["create", "s2", "--table", &format!("0 2048 linear {f} 0")]).ok();
    d.exec("/usr/sbin/dmstats", &["create", "s2", "--areas", "2"], None).ok();
    let uri = d.nbd_uri("s2");
    let o = d.run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 4k",
            "-c",
            "write -P 2 4k 4k",
            "-c",
            "read -P 1 0 4k",
            "-c",
            "read 600k 8k",
            &uri,
        ],
    );
    assert!(!o.ok().contains("failed"), "{o:?}");
    // Area 0: two writes (16 sectors) and a read (8); area 1: one read of 16 sectors. Merges as
    // dm-stats.c counts them: an IO at sector 0 is "merged" unless the previous one went the same
    // way and ended past 0 (its comparison of a sector with a truth value).
    let print = d.dmsetup(&["message", "s2", "0", "@stats_print", "0"]);
    let lines: Vec<Vec<&str>> = print.ok().lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(&lines[0][..9], ["0+1024", "1", "1", "8", lines[0][4], "2", "1", "16", lines[0][8]], "{print:?}");
    assert_eq!(lines[0][9], "0", "nothing in flight");
    assert_eq!(&lines[1][..4], ["1024+1024", "1", "0", "16"]);
    assert_eq!(&lines[1][5..8], ["0", "0", "0"]);
    let report = d.exec(
        "/usr/sbin/dmstats",
        &[
            "report",
            "--noheadings",
            "-o",
            "area_id,read_count,reads_merged_count,read_sector_count,write_count,writes_merged_count,write_sector_count",
            "--areas",
            "s2",
        ],
        None,
    );
    // Both areas, then the region's totals.
    assert_eq!(report.ok(), "0:1:1:8:2:1:16\n1:1:0:16:0:0:0\n0:2:1:24:2:1:16\n");
    // @stats_clear zeroes what was counted.
    d.dmsetup(&["message", "s2", "0", "@stats_clear", "0"]).ok();
    let print = d.dmsetup(&["message", "s2", "0", "@stats_print", "0", "0", "1"]);
    assert_eq!(print.ok(), "0+1024 0 0 0 0 0 0 0 0 0 0 0 0 0\n");
}
