//! IO through a `switch` over file-backed paths lands each region in the file its page-table entry
//! names, before and after the mapping changes (written with dd on `/dev/mapper/<name>`).

mod common;

use common::fuse::{pattern, Mapper};

const REGION: u64 = 16; // sectors
const REGIONS: u64 = 12;
const PATHS: usize = 3;

fn region_bytes(r: u64) -> std::ops::Range<usize> {
    let (a, b) = (r * REGION * 512, (r + 1) * REGION * 512);
    a as usize..b as usize
}

#[test]
fn switch_io_lands_each_region_in_its_path() {
    let m = Mapper::start();
    let len = REGION * REGIONS;
    let files: Vec<String> = (0..PATHS).map(|i| m.d.file(&format!("p{i}.img"), len)).collect();
    let paths: Vec<String> = files.iter().map(|f| format!("{f} 0")).collect();
    let table = format!("0 {len} switch {PATHS} {REGION} 0 {}", paths.join(" "));
    m.d.dmsetup(&["create", "sw", "--table", &table]).ok();

    // Initial mapping is round-robin: region r → path r mod 3, at the region's own offset.
    let data = pattern((len * 512) as usize, 3);
    let src = m.d.path("src.bin");
    std::fs::write(&src, &data).unwrap();
    let dd = |input: &str, seek: u64, count: u64| {
        m.run(
            "dd",
            &[
                &format!("if={input}"),
                &format!("of={}/mapper/sw", m.d.path("dev").display()),
                "bs=512",
                &format!("seek={seek}"),
                &format!("skip={seek}"),
                &format!("count={count}"),
                "conv=notrunc,fsync",
                "status=none",
            ],
        )
        .ok();
    };
    dd(src.to_str().unwrap(), 0, len);
    let read = |i: usize| std::fs::read(&files[i]).unwrap();
    for r in 0..REGIONS {
        let f = read((r % PATHS as u64) as usize);
        assert_eq!(&f[region_bytes(r)], &data[region_bytes(r)], "region {r}");
        for other in (0..PATHS).filter(|&p| p as u64 != r % PATHS as u64) {
            assert!(read(other)[region_bytes(r)].iter().all(|&b| b == 0), "region {r} leaked into path {other}");
        }
    }

    // Route regions 0 and 1 to path 2 and write them again: the new bytes land in path 2.
    m.d.dmsetup(&["message", "sw", "0", "set_region_mappings", "0:2", ":2"]).ok();
    let data2 = pattern((len * 512) as usize, 99);
    std::fs::write(&src, &data2).unwrap();
    dd(src.to_str().unwrap(), 0, 2 * REGION);
    let p2 = read(2);
    assert_eq!(&p2[region_bytes(0)], &data2[region_bytes(0)]);
    assert_eq!(&p2[region_bytes(1)], &data2[region_bytes(1)]);
    // Path 0 still holds the old region 0 and path 1 the old region 1.
    assert_eq!(&read(0)[region_bytes(0)], &data[region_bytes(0)]);
    assert_eq!(&read(1)[region_bytes(1)], &data[region_bytes(1)]);
}
