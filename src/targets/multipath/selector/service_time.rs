//! `service-time` 0.3.0 (the kernel's `dm-ps-service-time.c`; linux-dm-abi.md §4.2).
//!
//! Each path has a relative throughput (0..=100, default 1) and a count of bytes in flight;
//! the chosen path is the one whose estimated service time for the incoming IO,
//! `(in flight + incoming) / throughput`, is least, compared as the kernel's `st_compare_load`
//! does — including its C integer conversions: the in-flight count is a wrapping signed 32-bit
//! `atomic_t`, widened with its sign to 64 bits, and every 64-bit difference is truncated to the
//! 32-bit `int` the kernel returns. The chosen path moves to the tail of the list.

use super::{bad, repeat_count, PathIdx, PathLists, PathSelector};
use crate::dm::{DmResult, StatusType};

/// The largest relative throughput.
const MAX_RELATIVE_THROUGHPUT: u32 = 100;
/// log2 of a power of two above [`MAX_RELATIVE_THROUGHPUT`].
const MAX_RELATIVE_THROUGHPUT_SHIFT: u32 = 7;
/// Sizes from here on are shifted down before being multiplied by a throughput.
const MAX_INFLIGHT_SIZE: u64 = u64::MAX >> MAX_RELATIVE_THROUGHPUT_SHIFT;

pub(super) fn create(_args: &[String]) -> DmResult<Box<dyn PathSelector>> {
    Ok(Box::new(ServiceTime { paths: PathLists::new() }))
}

struct PathInfo {
    repeat_count: u32,
    relative_throughput: u32,
    /// Bytes in flight.
    in_flight_size: i32,
}

struct ServiceTime {
    paths: PathLists<PathInfo>,
}

/// The kernel's `st_compare_load`: negative when `pi1` is the better path for an IO of
/// `incoming` bytes, positive when `pi2` is, 0 for no difference.
fn compare_load(pi1: &PathInfo, pi2: &PathInfo, incoming: u64) -> i32 {
    // `size_t sz = atomic_read(..)`: the int is sign-extended.
    let mut sz1 = pi1.in_flight_size as i64 as u64;
    let mut sz2 = pi2.in_flight_size as i64 as u64;
    let (t1, t2) = (pi1.relative_throughput, pi2.relative_throughput);

    // Same throughput: the less loaded path.
    if t1 == t2 {
        return sz1.wrapping_sub(sz2) as i32;
    }
    // Same load, or one path without throughput: the higher throughput.
    if sz1 == sz2 || t1 == 0 || t2 == 0 {
        return t2.wrapping_sub(t1) as i32;
    }
    // (sz1 + incoming) / t1 against (sz2 + incoming) / t2, cross-multiplied.
    sz1 = sz1.wrapping_add(incoming);
    sz2 = sz2.wrapping_add(incoming);
    if sz1 >= MAX_INFLIGHT_SIZE || sz2 >= MAX_INFLIGHT_SIZE {
        sz1 >>= MAX_RELATIVE_THROUGHPUT_SHIFT;
        sz2 >>= MAX_RELATIVE_THROUGHPUT_SHIFT;
    }
    let st1 = sz1.wrapping_mul(u64::from(t2));
    let st2 = sz2.wrapping_mul(u64::from(t1));
    if st1 != st2 {
        return st1.wrapping_sub(st2) as i32;
    }
    // Same service time: the higher throughput.
    t2.wrapping_sub(t1) as i32
}

impl PathSelector for ServiceTime {
    fn name(&self) -> &'static str {
        "service-time"
    }
    fn table_args(&self) -> u32 {
        2
    }
    fn info_args(&self) -> u32 {
        2
    }

    fn add_path(&mut self, path: PathIdx, args: &[String]) -> DmResult<()> {
        let repeat_count = repeat_count(args, 2, "service-time", true)?;
        let mut relative_throughput = 1;
        if let Some(word) = args.get(1) {
            relative_throughput = crate::targets::sscanf::u(word)
                .filter(|&t| t <= MAX_RELATIVE_THROUGHPUT)
                .ok_or_else(|| bad("service-time ps: invalid relative_throughput value"))?;
        }
        self.paths.add(path, PathInfo { repeat_count, relative_throughput, in_flight_size: 0 });
        Ok(())
    }

    fn fail_path(&mut self, path: PathIdx) {
        self.paths.fail(path);
    }

    fn reinstate_path(&mut self, path: PathIdx) -> DmResult<()> {
        self.paths.move_tail(path);
        Ok(())
    }

    fn select_path(&mut self, nr_bytes: u64, _now_ns: u64) -> Option<PathIdx> {
        self.paths.choose_best(|pi, best| compare_load(pi, best, nr_bytes) < 0)
    }

    fn start_io(&mut self, path: PathIdx, nr_bytes: u64, _now_ns: u64) {
        if let Some(pi) = self.paths.get_mut(path) {
            // `atomic_add(nr_bytes, ..)` takes an int.
            pi.in_flight_size = pi.in_flight_size.wrapping_add(nr_bytes as i32);
        }
    }

    fn end_io(&mut self, path: PathIdx, nr_bytes: u64, _start_ns: u64, _now_ns: u64) {
        if let Some(pi) = self.paths.get_mut(path) {
            pi.in_flight_size = pi.in_flight_size.wrapping_sub(nr_bytes as i32);
        }
    }

    fn status(&self, path: Option<PathIdx>, kind: StatusType) -> String {
        let Some(path) = path else { return "0 ".to_string() };
        match (kind, self.paths.get(path)) {
            (StatusType::Info, Some(pi)) => format!("{} {} ", pi.in_flight_size, pi.relative_throughput),
            (StatusType::Table, Some(pi)) => format!("{} {} ", pi.repeat_count, pi.relative_throughput),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{drive, err_text, words};
    use super::*;

    fn st(per_path: &[&str]) -> Box<dyn PathSelector> {
        let mut s = create(&[]).unwrap();
        for (p, w) in per_path.iter().enumerate() {
            s.add_path(p, &words(w)).unwrap();
        }
        s
    }

    fn pi(in_flight_size: i32, relative_throughput: u32) -> PathInfo {
        PathInfo { repeat_count: 1, relative_throughput, in_flight_size }
    }

    #[test]
    fn words_and_status() {
        let s = st(&["", "0", "5 0", "1 100"]);
        assert_eq!((s.name(), s.table_args(), s.info_args()), ("service-time", 2, 2));
        let table: String = (0..4).map(|p| s.status(Some(p), StatusType::Table)).collect();
        assert_eq!(table, "1 1 0 1 1 0 1 100 ");
        let info: String = (0..4).map(|p| s.status(Some(p), StatusType::Info)).collect();
        assert_eq!(info, "0 1 0 1 0 0 0 100 ");
        assert_eq!(s.status(Some(0), StatusType::Ima), "");
        assert_eq!(s.status(None, StatusType::Table), "0 ");
        assert_eq!(s.status(None, StatusType::Info), "0 ");

        let mut s = st(&[]);
        let e = |s: &mut Box<dyn PathSelector>, w: &str| err_text(s.add_path(0, &words(w)).unwrap_err());
        assert_eq!(e(&mut s, "1 1 1"), "service-time ps: incorrect number of arguments");
        assert_eq!(e(&mut s, "a 1"), "service-time ps: invalid repeat count");
        assert_eq!(e(&mut s, "1 101"), "service-time ps: invalid relative_throughput value");
        assert_eq!(e(&mut s, "1 x"), "service-time ps: invalid relative_throughput value");
        // The repeat count is checked first.
        assert_eq!(e(&mut s, "x 101"), "service-time ps: invalid repeat count");
    }

    #[test]
    fn in_flight_accounting() {
        let mut s = st(&["", "1 3"]);
        s.start_io(1, 4096, 0);
        s.start_io(1, 512, 0);
        s.end_io(1, 4096, 0, 0);
        s.end_io(0, 100, 0, 0);
        assert_eq!(s.status(Some(1), StatusType::Info), "512 3 ");
        assert_eq!(s.status(Some(0), StatusType::Info), "-100 1 ");
        // An IO size beyond int wraps as the kernel's atomic_add does.
        s.start_io(1, (1 << 32) + 1, 0);
        assert_eq!(s.status(Some(1), StatusType::Info), "513 3 ");
    }

    #[test]
    fn compare_rules() {
        // Equal throughput: the less loaded (the difference is the result).
        assert_eq!(compare_load(&pi(10, 5), &pi(30, 5), 1 << 40), -20);
        assert_eq!(compare_load(&pi(30, 5), &pi(10, 5), 0), 20);
        // ... with the int difference wrapping.
        assert_eq!(compare_load(&pi(i32::MAX, 1), &pi(-1, 1), 0), i32::MIN);
        // Equal load: the higher throughput.
        assert_eq!(compare_load(&pi(7, 10), &pi(7, 40), 0), 30);
        assert_eq!(compare_load(&pi(7, 40), &pi(7, 10), 0), -30);
        // Zero throughput loses whatever the loads.
        assert_eq!(compare_load(&pi(1_000_000, 1), &pi(0, 0), 0), -1);
        assert_eq!(compare_load(&pi(0, 0), &pi(1_000_000, 1), 0), 1);
        // Service time: (100 + 100) / 1 against (1000 + 100) / 10.
        assert_eq!(compare_load(&pi(100, 1), &pi(1000, 10), 100), 200 * 10 - 1100);
        // Equal service time: (10 + 0) / 1 and (20 + 0) / 2, the higher throughput.
        assert_eq!(compare_load(&pi(10, 1), &pi(20, 2), 0), 1);
        // The 64-bit difference is truncated to an int: 2^32 - 1 reads as -1.
        assert_eq!(compare_load(&pi(1, 1), &pi(2, 2), (1 << 32) - 1), -1);
        assert_eq!(compare_load(&pi(1, 1), &pi(2, 2), 1 << 32), 0);
        // Overflow shift: 2^60 and 2^60 + 1 both become 2^53, so 2^53 * 2 - 2^53 * 3 = -2^53,
        // whose low 32 bits are 0 (unshifted it would be -2^60 - 3, i.e. -3).
        assert_eq!(compare_load(&pi(0, 3), &pi(1, 2), 1 << 60), 0);
        // A negative in-flight count is a huge size_t and triggers the shift too:
        // (2^64 - 1) >> 7 = 2^57 - 1 against 0, times 50: low 32 bits 2^32 - 50.
        assert_eq!(compare_load(&pi(-1, 100), &pi(0, 50), 0), -50);
    }

    #[test]
    fn selection() {
        // Paths 0 and 1 throughput 1, path 2 throughput 2, path 3 throughput 0.
        let mut s = st(&["", "", "1 2", "1 0"]);
        // All idle: equal load, the highest throughput.
        assert_eq!(s.select_path(4096, 0), Some(2));
        s.start_io(2, 4096, 0);
        // List 0 1 3 2. Path 2 against path 0: (4096 + 4096) * 1 = 8192 and (0 + 4096) * 2 =
        // 8192, the same service time, so the higher throughput (path 2) again.
        assert_eq!(s.select_path(4096, 0), Some(2));
        s.start_io(2, 4096, 0);
        // Path 2 has 8192 in flight: (8192 + 4096) * 1 > (0 + 4096) * 2, so path 0.
        assert_eq!(s.select_path(4096, 0), Some(0));
        s.start_io(0, 4096, 0);
        // Same throughput, 4096 against 0 in flight: path 1.
        assert_eq!(s.select_path(4096, 0), Some(1));
        s.start_io(1, 4096, 0);
        s.fail_path(0);
        s.fail_path(1);
        s.fail_path(2);
        // Only the zero-throughput path is left.
        assert_eq!(s.select_path(4096, 0), Some(3));
        s.reinstate_path(1).unwrap();
        assert_eq!(s.select_path(4096, 0), Some(1));
        s.fail_path(1);
        s.fail_path(3);
        assert_eq!(s.select_path(4096, 0), None);
    }

    #[test]
    fn ties_rotate() {
        let mut s = st(&["", "", ""]);
        let picks: Vec<_> = (0..4).map(|_| s.select_path(512, 0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0]);
    }

    /// A fixed pseudo-random run against a model of the kernel's code, with sizes that wrap the
    /// in-flight int and trigger the overflow shift.
    #[test]
    fn long_run() {
        let mut s = st(&["1 0", "1 1", "1 50", "1 100"]);
        let sizes = [512, 4096, 65536, 1 << 20, (1 << 31) + 5, 1 << 60];
        let (picks, info) = drive(s.as_mut(), 4, &sizes, 2, 300, 1000);
        assert_eq!(
            picks,
            "3322323222221122233133313321223112222222212322333111113333321213122333322322222222221122111111111111\
             111111111111113333331133333333111111111111111133"
        );
        assert_eq!(info, "0 0 6707752 1 1245696 50 3356672 100 ");
    }
}
