//! The delay target without an engine: a detached data plane, real files below, bios whose
//! completions report on a channel.

use std::sync::mpsc::{channel, Receiver, Sender};

use super::*;
use crate::dm::pdev::PdevKind;
use crate::dm::DevNum;
use crate::io::bio::{BioFlags, Buf};
use crate::io::core::{Completion, Frame};
use crate::io::{DataPlane, IoError, IoResult};

/// A fresh file of `sectors` sectors as a Pdev numbered `251:minor` (an [`Unlink`] removes it).
fn file(tag: &str, minor: u32, sectors: u64) -> Arc<Pdev> {
    let path = std::env::temp_dir().join(format!("dmemu-delay-unit-{}-{tag}-{minor}", std::process::id()));
    std::fs::File::create(&path).unwrap().set_len(sectors * 512).unwrap();
    let path = path.to_string_lossy().into_owned();
    let f = crate::io::Backing::open(&path, true).unwrap();
    Arc::new(Pdev::with_file(DevNum::new(251, minor), PdevKind::File { path }, Sectors(sectors), f))
}

/// Removes the files of [`file`] when dropped.
struct Unlink(Vec<Arc<Pdev>>);

impl Drop for Unlink {
    fn drop(&mut self) {
        for p in &self.0 {
            if let PdevKind::File { path } = &p.kind {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn delay(classes: [(Arc<Pdev>, u64, u32); 3], argc: usize) -> Delay {
    let services = DataPlane::detached().services(0, 0);
    let queue = Queue { held: VecDeque::new(), queued: [0; 3], may_delay: true, timer: None };
    Delay {
        classes: classes.map(|(dev, offset, delay_ms)| Class { dev, offset: Sectors(offset), delay_ms }),
        argc,
        shared: Arc::new(Shared { queue: Mutex::new(queue), services }),
    }
}

/// A bio tagged `tag` whose completion sends `(tag, result)`.
fn bio(op: Op, sector: u64, sectors: u64, tag: u32, tx: &Sender<(u32, IoResult)>) -> Bio {
    let buf = if op.has_data() { Buf::Owned(vec![tag as u8; (sectors * 512) as usize]) } else { Buf::None };
    let tx = tx.clone();
    let done = Completion::Call(Box::new(move |_, r| {
        let _ = tx.send((tag, r));
    }));
    Bio::new(op, BioFlags::empty(), sector, sectors, buf, Frame::Submitter(done))
}

/// Maps a bio as the core does: a remapped one is submitted now.
fn map(d: &Delay, b: Bio) -> &'static str {
    match d.map(b) {
        Map::Remapped(b) => {
            d.shared.services.submit(b);
            "remapped"
        }
        Map::Submitted => "held",
        Map::Kill(b) => {
            b.end(Err(IoError::Failed));
            "killed"
        }
        Map::Requeue(_) => "requeued",
    }
}

fn next(rx: &Receiver<(u32, IoResult)>) -> (u32, IoResult) {
    rx.recv_timeout(Duration::from_secs(30)).expect("a completion")
}

fn info(d: &Delay) -> String {
    d.status(StatusType::Info, false)
}

#[test]
fn zero_delay_passes_straight_through_and_is_not_counted() {
    let f = file("zero", 0, 64);
    let _u = Unlink(vec![f.clone()]);
    let d = delay([(f.clone(), 8, 0), (f.clone(), 8, 0), (f.clone(), 8, 0)], 3);
    let (tx, rx) = channel();
    assert_eq!(map(&d, bio(Op::Write, 0, 8, 0x5a, &tx)), "remapped");
    assert_eq!(next(&rx), (0x5a, Ok(())));
    assert_eq!(info(&d), "0 0 0");
    let PdevKind::File { path } = &f.kind else { unreachable!() };
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes[8 * 512..16 * 512].iter().all(|&b| b == 0x5a), "written at the class offset");
    assert!(bytes[..8 * 512].iter().all(|&b| b == 0));
}

#[test]
fn held_bios_are_counted_per_class_and_issued_after_their_delay() {
    let f = file("held", 0, 64);
    let _u = Unlink(vec![f.clone()]);
    let d = delay([(f.clone(), 0, 150), (f.clone(), 0, 150), (f.clone(), 0, 150)], 3);
    let (tx, rx) = channel();
    let start = Instant::now();
    assert_eq!(map(&d, bio(Op::Read, 0, 1, 1, &tx)), "held");
    assert_eq!(map(&d, bio(Op::Write, 1, 1, 2, &tx)), "held");
    assert_eq!(map(&d, bio(Op::Discard, 2, 1, 3, &tx)), "held");
    assert_eq!(map(&d, bio(Op::Flush, 0, 0, 4, &tx)), "held");
    assert_eq!(info(&d), "1 2 1");
    let order: Vec<u32> = (0..4)
        .map(|_| {
            let (t, r) = next(&rx);
            r.unwrap();
            t
        })
        .collect();
    assert!(start.elapsed() >= Duration::from_millis(150));
    // Same delay: expiry order is arrival order, and one thread issues them in queue order.
    assert_eq!(order, [1, 2, 3, 4]);
    assert_eq!(info(&d), "0 0 0");
}

#[test]
fn a_later_bio_with_a_shorter_delay_goes_first() {
    let f = file("order", 0, 64);
    let _u = Unlink(vec![f.clone()]);
    let d = delay([(f.clone(), 0, 20), (f.clone(), 0, 400), (f.clone(), 0, 400)], 6);
    let (tx, rx) = channel();
    assert_eq!(map(&d, bio(Op::Write, 0, 1, 1, &tx)), "held");
    assert_eq!(map(&d, bio(Op::Read, 0, 1, 2, &tx)), "held");
    assert_eq!(info(&d), "1 1 0");
    assert_eq!(next(&rx).0, 2, "the read's timer re-armed the earlier expiry");
    assert_eq!(info(&d), "0 1 0");
    assert_eq!(next(&rx).0, 1);
    assert_eq!(info(&d), "0 0 0");
}

#[test]
fn presuspend_releases_everything_and_resume_delays_again() {
    let f = file("suspend", 0, 64);
    let _u = Unlink(vec![f.clone()]);
    let d = delay([(f.clone(), 0, 60_000), (f.clone(), 0, 60_000), (f.clone(), 0, 60_000)], 3);
    let (tx, rx) = channel();
    map(&d, bio(Op::Write, 0, 1, 1, &tx));
    map(&d, bio(Op::Read, 0, 1, 2, &tx));
    assert_eq!(info(&d), "1 1 0");
    d.presuspend(false);
    assert_eq!(info(&d), "0 0 0");
    let mut got = [next(&rx), next(&rx)];
    got.sort_by_key(|g| g.0);
    assert_eq!(got, [(1, Ok(())), (2, Ok(()))]);
    // Off until resume: straight through.
    assert_eq!(map(&d, bio(Op::Write, 0, 1, 3, &tx)), "remapped");
    assert_eq!(next(&rx), (3, Ok(())));
    d.resume();
    assert_eq!(map(&d, bio(Op::Write, 0, 1, 4, &tx)), "held");
    assert_eq!(info(&d), "0 1 0");
    d.presuspend(true);
    assert_eq!(next(&rx), (4, Ok(())));
}

#[test]
fn a_sector_past_two_to_the_64_fails_without_waiting() {
    let f = file("overflow", 0, 64);
    let _u = Unlink(vec![f.clone()]);
    let d = delay([(f.clone(), u64::MAX - 1, 60_000), (f.clone(), 0, 60_000), (f.clone(), 0, 60_000)], 3);
    let (tx, rx) = channel();
    assert_eq!(map(&d, bio(Op::Read, 4, 1, 1, &tx)), "killed");
    assert_eq!(next(&rx), (1, Err(IoError::Failed)));
    assert_eq!(info(&d), "0 0 0");
    assert!(matches!(d.query(Sectors(4), Sectors(1)), Mapping::Opaque(Sectors(1))));
}

#[test]
fn table_status_keeps_the_shape_of_the_line() {
    let (a, b, c) = (file("shape", 0, 8), file("shape", 1, 8), file("shape", 2, 8));
    let _u = Unlink(vec![a.clone(), b.clone(), c.clone()]);
    let classes = || [(a.clone(), 1, 10), (b.clone(), 2, 20), (c.clone(), 3, 30)];
    assert_eq!(delay(classes(), 3).status(StatusType::Table, false), "251:0 1 10");
    assert_eq!(delay(classes(), 6).status(StatusType::Table, false), "251:0 1 10 251:1 2 20");
    assert_eq!(delay(classes(), 9).status(StatusType::Table, false), "251:0 1 10 251:1 2 20 251:2 3 30");
    assert_eq!(delay(classes(), 9).status(StatusType::Ima, false), "");
    let mut areas = Vec::new();
    delay(classes(), 9).iterate_devices(Sectors(5), &mut |p, at, len| areas.push((p.dev.minor, at.0, len.0)));
    assert_eq!(areas, [(0, 1, 5), (1, 2, 5), (2, 3, 5)]);
}

#[test]
fn an_armed_timer_does_not_keep_a_dropped_target_alive() {
    let f = file("drop", 0, 64);
    let _u = Unlink(vec![f.clone()]);
    let d = delay([(f.clone(), 0, 60_000), (f.clone(), 0, 60_000), (f.clone(), 0, 60_000)], 3);
    let (tx, rx) = channel();
    assert_eq!(map(&d, bio(Op::Write, 0, 1, 1, &tx)), "held");
    assert!(d.shared.lock().timer.is_some());
    let weak = Arc::downgrade(&d.shared);
    // (With a core, a held bio keeps its table alive until released; here nothing does.)
    drop(d);
    assert!(weak.upgrade().is_none(), "the pending timer holds only a Weak");
    // The held bio went with the queue: dropped bios fail rather than hang.
    assert_eq!(next(&rx), (1, Err(IoError::Failed)));
}
