//! `@stats_*` messages through the real dmstats/dmsetup (counters read zero until the data plane
//! counts IO).

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
