//! `historical-service-time` 0.1.1 (the kernel's `dm-ps-historical-service-time.c`;
//! linux-dm-abi.md §4.2).
//!
//! Each path keeps a time-weighted exponential moving average of its measured service time
//! (10-bit fixed point), its count of outstanding IOs and the time after which it counts as
//! stale (no IO finished within `usable paths × estimate`). Selection prefers, in turn: the
//! less loaded path when the two estimates are within the threshold multiplier of each other;
//! an unloaded stale path (or, both unloaded, the staler); the shorter estimated time
//! `(1 + outstanding) × estimate`, except that a stale winner is limited to equal load. The
//! chosen path moves to the tail of the list.
//!
//! Decay weights come from a table of 64 buckets of 2^24 ns (~16.8 ms): bucket `n` holds
//! `base^(n+1)`, the last bucket 0. Times are the `now_ns`/`start_ns` the target passes. The
//! arithmetic is the kernel's, wrapping where its C wraps and with its signed/unsigned mix.

use super::{bad, PathIdx, PathLists, PathSelector};
use crate::dm::{DmResult, StatusType};

/// Bits of fraction in the fixed-point values.
const FIXED_SHIFT: u32 = 10;
/// The largest fixed-point service time.
const FIXED_MAX: u64 = u64::MAX >> FIXED_SHIFT;
/// 1.0 in fixed point.
const FIXED_1: u64 = 1 << FIXED_SHIFT;
/// The default base weight, ~0.95.
const FIXED_95: u32 = 972;
/// Outstanding counts from here on shift the estimates down before multiplying.
const MAX_INFLIGHT: i64 = FIXED_1 as i64;
/// A weight bucket spans 2^24 ns.
const BUCKET_SHIFT: u32 = 24;
/// Number of weight buckets.
const WEIGHT_COUNT: usize = 64;

/// `x^n` with `x` in fixed point of `frac_bits` bits, by squaring, rounding each product
/// (the scheduler's `fixed_power_int`).
fn fixed_power(mut x: u64, frac_bits: u32, mut n: u32) -> u64 {
    let half = 1u64 << (frac_bits - 1);
    let mut result = 1u64 << frac_bits;
    while n != 0 {
        if n & 1 != 0 {
            result = result.wrapping_mul(x).wrapping_add(half) >> frac_bits;
        }
        n >>= 1;
        if n == 0 {
            break;
        }
        x = x.wrapping_mul(x).wrapping_add(half) >> frac_bits;
    }
    result
}

/// The next moving average: `last × weight + next × (1 − weight)`, rounded.
fn fixed_ema(last: u64, next: u64, weight: u64) -> u64 {
    let sum = last
        .wrapping_mul(weight)
        .wrapping_add(next.wrapping_mul(FIXED_1.wrapping_sub(weight)))
        .wrapping_add(1 << (FIXED_SHIFT - 1));
    sum >> FIXED_SHIFT
}

/// The kernel's `time_after64(a, b)`: `a` is later than `b`.
fn time_after64(a: u64, b: u64) -> bool {
    (b.wrapping_sub(a) as i64) < 0
}

pub(super) fn create(args: &[String]) -> DmResult<Box<dyn PathSelector>> {
    Ok(Box::new(Hst::new(args)?))
}

#[derive(Clone, Debug)]
struct PathInfo {
    /// Fixed point, in ns.
    historical_service_time: u64,
    stale_after: u64,
    last_finish: u64,
    outstanding: u64,
}

struct Hst {
    paths: PathLists<PathInfo>,
    weights: [u32; WEIGHT_COUNT],
    threshold_multiplier: u32,
}

impl Hst {
    /// The selector-level words `[<base_weight> [<threshold_multiplier>]]`.
    fn new(args: &[String]) -> DmResult<Hst> {
        // The kernel's constructor fails with a bare EINVAL; the target supplies the text.
        let fail = || bad("path selector constructor failed");
        if args.len() > 2 {
            return Err(fail());
        }
        let mut base_weight = FIXED_95;
        if let Some(word) = args.first() {
            base_weight = crate::targets::sscanf::u(word).filter(|&b| u64::from(b) < FIXED_1).ok_or_else(fail)?;
        }
        let mut threshold_multiplier = 0;
        if let Some(word) = args.get(1) {
            threshold_multiplier = crate::targets::sscanf::u(word).ok_or_else(fail)?;
        }
        let mut weights = [0u32; WEIGHT_COUNT];
        for (i, w) in weights.iter_mut().enumerate().take(WEIGHT_COUNT - 1) {
            // base < 1024, so every power is at most 1024 and fits.
            *w = fixed_power(u64::from(base_weight), FIXED_SHIFT, i as u32 + 1) as u32;
        }
        Ok(Hst { paths: PathLists::new(), weights, threshold_multiplier })
    }

    /// The weight for a time span.
    fn weight(&self, delta: u64) -> u64 {
        let bucket = (delta >> BUCKET_SHIFT).min(WEIGHT_COUNT as u64 - 1) as usize;
        u64::from(self.weights[bucket])
    }

    #[cfg(test)]
    fn compare(&self, pi1: &PathInfo, pi2: &PathInfo, time_now: u64) -> i64 {
        hst_compare(self.threshold_multiplier, pi1, pi2, time_now)
    }
}

/// `hst_compare` with the selector's threshold multiplier: negative when `pi1` is the better
/// path, positive when `pi2` is, 0 for no difference.
fn hst_compare(threshold_multiplier: u32, pi1: &PathInfo, pi2: &PathInfo, time_now: u64) -> i64 {
    let (mut hst1, mut hst2) = (pi1.historical_service_time, pi2.historical_service_time);
    // The kernel reads these into `long long`.
    let (out1, out2) = (pi1.outstanding as i64, pi2.outstanding as i64);
    // ... and compares them with the unsigned `time_now` as unsigned.
    let (stale1, stale2) = (pi1.stale_after, pi2.stale_after);
    let threshold = u64::from(threshold_multiplier);

    // Estimates too close to call: the less loaded path.
    let over_threshold =
        if hst1 > hst2 { hst1 > threshold.wrapping_mul(hst2) } else { hst2 > threshold.wrapping_mul(hst1) };
    if !over_threshold {
        return out1.wrapping_sub(out2);
    }

    // An unloaded stale path, or of two unloaded paths the staler.
    if (out1 == 0 && stale1 < time_now) || (out2 == 0 && stale2 < time_now) || (out1 == 0 && out2 == 0) {
        let a = if out2 == 0 { stale1 as i64 } else { 0 };
        let b = if out1 == 0 { stale2 as i64 } else { 0 };
        return a.wrapping_sub(b);
    }

    // The estimated service times.
    let pi2_better = if out1 == out2 {
        hst1 > hst2
    } else {
        if out1 >= MAX_INFLIGHT || out2 >= MAX_INFLIGHT {
            hst1 >>= FIXED_SHIFT;
            hst2 >>= FIXED_SHIFT;
        }
        (1i64.wrapping_add(out1) as u64).wrapping_mul(hst1) > (1i64.wrapping_add(out2) as u64).wrapping_mul(hst2)
    };

    // A stale winner is limited to equal usage.
    if pi2_better {
        if stale2 < time_now {
            return out1.wrapping_sub(out2);
        }
        return 1;
    }
    if stale1 < time_now {
        return out1.wrapping_sub(out2);
    }
    -1
}

impl PathSelector for Hst {
    fn name(&self) -> &'static str {
        "historical-service-time"
    }
    fn table_args(&self) -> u32 {
        1
    }
    fn info_args(&self) -> u32 {
        3
    }

    fn add_path(&mut self, path: PathIdx, args: &[String]) -> DmResult<()> {
        // The repeat count is checked but neither clamped nor used (TABLE shows 0).
        super::repeat_count(args, 1, "historical-service-time", false)?;
        self.paths
            .add(path, PathInfo { historical_service_time: FIXED_1, stale_after: 0, last_finish: 0, outstanding: 0 });
        Ok(())
    }

    fn fail_path(&mut self, path: PathIdx) {
        self.paths.fail(path);
    }

    fn reinstate_path(&mut self, path: PathIdx) -> DmResult<()> {
        self.paths.move_tail(path);
        Ok(())
    }

    fn select_path(&mut self, _nr_bytes: u64, now_ns: u64) -> Option<PathIdx> {
        let threshold = self.threshold_multiplier;
        self.paths.choose_best(|pi, best| hst_compare(threshold, pi, best, now_ns) < 0)
    }

    fn start_io(&mut self, path: PathIdx, _nr_bytes: u64, _now_ns: u64) {
        if let Some(pi) = self.paths.get_mut(path) {
            pi.outstanding = pi.outstanding.wrapping_add(1);
        }
    }

    fn end_io(&mut self, path: PathIdx, _nr_bytes: u64, start_ns: u64, now_ns: u64) {
        let valid_count = self.paths.valid_count() as u64;
        let Some(pi) = self.paths.get(path) else { return };
        let mut pi = pi.clone();

        // The service time; when an earlier IO finished after this one started, as if this
        // one had been sent only then.
        let mut start = start_ns;
        if time_after64(pi.last_finish, start) {
            start = pi.last_finish;
        }
        pi.last_finish = now_ns;
        let st = if time_after64(start, now_ns) { 0 } else { now_ns.wrapping_sub(start) };

        pi.outstanding = pi.outstanding.wrapping_sub(1);
        // `st * HST_FIXED_1` wraps in the kernel before the min.
        let next = st.wrapping_mul(FIXED_1).min(FIXED_MAX);
        pi.historical_service_time = fixed_ema(pi.historical_service_time, next, self.weight(st));
        // Fresh again until this many estimates have passed.
        pi.stale_after =
            pi.last_finish.wrapping_add(valid_count.wrapping_mul(pi.historical_service_time >> FIXED_SHIFT));

        if let Some(slot) = self.paths.get_mut(path) {
            *slot = pi;
        }
    }

    fn status(&self, path: Option<PathIdx>, kind: StatusType) -> String {
        let Some(path) = path else {
            return format!("2 {} {} ", self.weights[0], self.threshold_multiplier);
        };
        match (kind, self.paths.get(path)) {
            (StatusType::Info, Some(pi)) => {
                format!("{} {} {} ", pi.historical_service_time, pi.outstanding, pi.stale_after)
            }
            (StatusType::Table, Some(_)) => "0 ".to_string(),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{drive, err_text, words};
    use super::*;

    fn hst(args: &str, paths: usize) -> Box<dyn PathSelector> {
        let mut s = create(&words(args)).unwrap();
        for p in 0..paths {
            s.add_path(p, &[]).unwrap();
        }
        s
    }

    fn info(s: &dyn PathSelector, p: PathIdx) -> String {
        s.status(Some(p), StatusType::Info)
    }

    fn concrete(args: &str) -> Hst {
        Hst::new(&words(args)).unwrap()
    }

    fn pi(hst: u64, outstanding: u64, stale_after: u64) -> PathInfo {
        PathInfo { historical_service_time: hst, stale_after, last_finish: 0, outstanding }
    }

    #[test]
    fn selector_words() {
        assert_eq!(hst("", 0).status(None, StatusType::Table), "2 972 0 ");
        assert_eq!(hst("", 0).status(None, StatusType::Info), "2 972 0 ");
        assert_eq!(hst("0", 0).status(None, StatusType::Info), "2 0 0 ");
        assert_eq!(hst("1023 5", 0).status(None, StatusType::Table), "2 1023 5 ");
        assert_eq!(hst("7 4294967295", 0).status(None, StatusType::Table), "2 7 4294967295 ");
        for bad in ["1024", "x", "1 2 3", "500 y", "-1", "+7", "972 1.5"] {
            let e = create(&words(bad)).err().unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(err_text(e), "path selector constructor failed", "{bad:?}");
        }
        let s = hst("", 0);
        assert_eq!((s.name(), s.table_args(), s.info_args()), ("historical-service-time", 1, 3));
    }

    #[test]
    fn path_words() {
        let mut s = hst("", 0);
        s.add_path(0, &words("5")).unwrap();
        s.add_path(1, &[]).unwrap();
        s.add_path(2, &words("0")).unwrap();
        for p in 0..3 {
            assert_eq!(s.status(Some(p), StatusType::Table), "0 ");
            assert_eq!(info(s.as_ref(), p), "1024 0 0 ");
            assert_eq!(s.status(Some(p), StatusType::Ima), "");
        }
        assert_eq!(
            err_text(s.add_path(3, &words("1 2")).unwrap_err()),
            "historical-service-time ps: incorrect number of arguments"
        );
        assert_eq!(
            err_text(s.add_path(3, &words("z")).unwrap_err()),
            "historical-service-time ps: invalid repeat count"
        );
    }

    #[test]
    fn weights_table() {
        let h = concrete("");
        assert_eq!(h.weights[0], 972);
        // 972^2 / 1024 = 922.6… rounded at each step: (972*972 + 512) >> 10 = 923.
        assert_eq!(h.weights[1], 923);
        assert_eq!(h.weights[WEIGHT_COUNT - 1], 0);
        assert!(h.weights.windows(2).all(|w| w[0] >= w[1]));
        assert_eq!(h.weight(0), 972);
        assert_eq!(h.weight((1 << 24) - 1), 972);
        assert_eq!(h.weight(1 << 24), 923);
        assert_eq!(h.weight(u64::MAX), 0);
        assert_eq!(h.weight(63 << 24), 0);
        assert_eq!(fixed_power(1023, 10, 0), 1024);
        assert_eq!(fixed_power(512, 10, 3), 128);
        assert!(concrete("0").weights.iter().all(|&w| w == 0));
    }

    #[test]
    fn estimator() {
        let mut s = hst("", 2);
        s.start_io(0, 4096, 1_000_000);
        // 1 ms: bucket 0, weight 972: (1024 * 972 + 1 ms * 1024 * (1024 - 972) + 512) >> 10.
        s.end_io(0, 4096, 1_000_000, 2_000_000);
        let h1 = (1024 * 972 + 1_000_000u64 * 1024 * 52 + 512) >> 10;
        assert_eq!(h1, 52_000_972);
        // stale_after = last finish + 2 usable paths * (estimate >> 10).
        assert_eq!(info(s.as_ref(), 0), "52000972 0 2101564 ");

        // IOs that started before the previous one finished are timed from that finish: 1 ms
        // → 3 ms counts from 2 ms (1 ms), then 1 ms → 5 ms from 3 ms (2 ms). One path failed:
        // the usable count is 1.
        s.fail_path(1);
        s.start_io(0, 1, 1_000_000);
        s.start_io(0, 1, 1_000_000);
        s.end_io(0, 1, 1_000_000, 3_000_000);
        let h2 = (h1 * 972 + 1_000_000u64 * 1024 * 52 + 512) >> 10;
        assert_eq!(info(s.as_ref(), 0), format!("{h2} 1 {} ", 3_000_000 + (h2 >> 10)));
        assert_eq!(info(s.as_ref(), 0), "101360298 1 3098984 ");
        s.end_io(0, 1, 1_000_000, 5_000_000);
        assert_eq!(info(s.as_ref(), 0), "200213095 0 5195520 ");

        // A clock that went backwards counts as 0 ns.
        s.start_io(0, 1, 0);
        s.end_io(0, 1, 9_000_000, 4_000_000);
        assert_eq!(info(s.as_ref(), 0), "190046024 0 4185591 ");

        // A longer IO (20 ms, bucket 1) weighs history less: 923.
        s.start_io(0, 1, 0);
        s.end_io(0, 1, 10_000_000, 30_000_000);
        let h5 = (190046024 * 923 + 20_000_000u64 * 1024 * (1024 - 923) + 512) >> 10;
        assert_eq!(info(s.as_ref(), 0), format!("{h5} 0 {} ", 30_000_000 + (h5 >> 10)));
        assert_eq!(info(s.as_ref(), 0), "2191301250 0 32139942 ");

        // Beyond 63 buckets the weight is 0: history is forgotten.
        s.start_io(0, 1, 0);
        s.end_io(0, 1, 30_000_000, 30_000_000 + (64 << 24));
        assert_eq!(info(s.as_ref(), 0), "1099511627776 0 2177483648 ");

        // An end without a start wraps the count as the kernel's u64 does; a 0 ns service time
        // still moves the estimate.
        s.end_io(1, 1, 0, 0);
        assert_eq!(info(s.as_ref(), 1), "972 18446744073709551615 0 ");
    }

    #[test]
    fn huge_service_time_like_the_kernel() {
        let mut s = hst("0", 1);
        // 2^53 ns * 1024 = 2^63 fits but is above the fixed-point maximum: the min applies.
        s.start_io(0, 1, 0);
        s.end_io(0, 1, 0, 1 << 53);
        assert_eq!(info(s.as_ref(), 0), "18014398509481983 0 9024791440785407 ");
        assert_eq!(18014398509481983, FIXED_MAX);
        // 2^54 ns * 1024 wraps to 0 in the kernel before the min.
        let mut s = hst("0", 1);
        s.start_io(0, 1, 0);
        s.end_io(0, 1, 0, 1 << 54);
        assert_eq!(info(s.as_ref(), 0), "0 0 18014398509481984 ");
    }

    #[test]
    fn compare_rules() {
        let h = concrete("");
        let now = 1_000;
        // threshold 0: any nonzero estimate is over the threshold.
        // Both unloaded: the staler (smaller stale_after) is better.
        assert_eq!(h.compare(&pi(1024, 0, 10), &pi(1024, 0, 30), now), -20);
        // One unloaded and stale: chosen, whatever its estimate (0 * 10 - 1 * 5000).
        assert_eq!(h.compare(&pi(100_000, 0, 10), &pi(1024, 3, 5_000), now), -5_000);
        assert_eq!(h.compare(&pi(1024, 3, 5_000), &pi(100_000, 0, 10), now), 5_000);
        // Both loaded and fresh: (1 + out) * estimate.
        assert_eq!(h.compare(&pi(2048, 1, 5_000), &pi(1024, 2, 5_000), now), 1); // 4096 > 3072
        assert_eq!(h.compare(&pi(2048, 1, 5_000), &pi(1024, 4, 5_000), now), -1); // 4096 < 5120
                                                                                  // Equal outstanding: the smaller estimate (ties go to pi1).
        assert_eq!(h.compare(&pi(2000, 2, 5_000), &pi(1000, 2, 5_000), now), 1);
        assert_eq!(h.compare(&pi(1000, 2, 5_000), &pi(1000, 2, 5_000), now), -1);
        // A stale winner only wins on equal usage.
        assert_eq!(h.compare(&pi(2048, 1, 5_000), &pi(1024, 2, 10), now), -1);
        assert_eq!(h.compare(&pi(1024, 2, 10), &pi(4096, 1, 5_000), now), 1);
        // ... a stale loaded winner: difference of outstanding.
        assert_eq!(h.compare(&pi(8192, 1, 5_000), &pi(1024, 3, 10), now), -2);
        // Zero estimates are never over a zero threshold: outstanding decides.
        assert_eq!(h.compare(&pi(0, 5, 0), &pi(0, 2, 0), now), 3);
        // From 1024 outstanding the estimates are shifted down first: 1025 * (1023 >> 10 = 0)
        // against 2 * (1024 >> 10 = 1), so pi1 wins (unshifted, 1025 * 1023 > 2 * 1024).
        assert_eq!(h.compare(&pi(1023, 1024, 5_000), &pi(1024, 1, 5_000), now), -1);
        assert_eq!(h.compare(&pi(1023, 1023, 5_000), &pi(1024, 1, 5_000), now), 1);

        // A threshold: within 2x, outstanding decides.
        let t = concrete("972 2");
        assert_eq!(t.compare(&pi(2000, 1, 0), &pi(1001, 4, 0), now), -3);
        assert_eq!(t.compare(&pi(1001, 4, 0), &pi(2000, 1, 0), now), 3);
        assert_eq!(t.compare(&pi(2003, 1, 5_000), &pi(1001, 4, 5_000), now), -1); // 4006 < 5005
                                                                                  // Threshold 1: equal estimates are not over it.
        let one = concrete("972 1");
        assert_eq!(one.compare(&pi(1024, 0, 0), &pi(1024, 0, 50), now), 0);
    }

    #[test]
    fn selection() {
        let mut s = hst("", 3);
        // Fresh paths, all unloaded, none stale yet (stale_after 0 is not < 0): list order.
        assert_eq!(s.select_path(1, 0), Some(0));
        assert_eq!(s.select_path(1, 0), Some(1));
        s.start_io(1, 1, 0);
        // List 2 0 1: 2 and 0 unloaded, equally stale.
        assert_eq!(s.select_path(1, 0), Some(2));
        s.start_io(2, 1, 0);
        assert_eq!(s.select_path(1, 0), Some(0));
        s.start_io(0, 1, 0);
        // 0 finishes quickly (1 ms), 1 slowly (50 ms); 2 still outstanding.
        s.end_io(0, 1, 0, 1_000_000);
        s.end_io(1, 1, 0, 50_000_000);
        assert_eq!(info(s.as_ref(), 0), "52000972 0 1152346 ");
        assert_eq!(info(s.as_ref(), 1), "7400000876 0 71679689 ");
        assert_eq!(info(s.as_ref(), 2), "1024 1 0 ");
        // At 50 ms both 0 and 1 are unloaded: the staler (0) wins.
        assert_eq!(s.select_path(1, 50_000_000), Some(0));
        s.start_io(0, 1, 50_000_000);
        // List 1 2 0. 2 and 0 have far better estimates than 1, but each is loaded and stale,
        // so each is limited to equal usage and loses to the unloaded 1.
        assert_eq!(s.select_path(1, 50_000_001), Some(1));
        s.fail_path(0);
        s.fail_path(1);
        s.fail_path(2);
        assert_eq!(s.select_path(1, 60_000_000), None);
        s.reinstate_path(2).unwrap();
        assert_eq!(s.select_path(1, 60_000_000), Some(2));
    }

    /// A fixed pseudo-random run against a model of the kernel's code.
    #[test]
    fn long_run() {
        let mut s = hst("", 4);
        let (picks, info) = drive(s.as_mut(), 4, &[512], 3, 300, 1 << 24);
        assert_eq!(
            picks,
            "012301220320110320002222222223222222230000000002111110111333110331031333133333322211212122210220\
             210011010000000000000000000000002200--------------1"
        );
        assert_eq!(
            info,
            "106239387576 23 2568722385 267842386327 8 2431656753 212102107898 10 2353426634 382800183321 8 \
             2979416724 "
        );

        let mut s = hst("900 2", 4);
        let (picks, info) = drive(s.as_mut(), 4, &[512], 4, 300, 1 << 22);
        assert_eq!(
            picks,
            "012303030303030301113013030030110103-----212212222110000333030332320101012011010211113333322222322\
             000303023232311111113131322222"
        );
        assert_eq!(
            info,
            "24022252578 0 707480618 29839626996 10 644422632 31839228373 8 727194328 21890213542 11 596105050 "
        );
    }
}
