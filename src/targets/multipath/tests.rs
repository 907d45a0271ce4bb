//! The multipath state machine without IO: random sequences of path failures, reinstatements,
//! group switches, bypasses, path choices and activation outcomes keep its invariants and never
//! panic (proptest), plus the choice rules on fixed sequences.

use proptest::prelude::*;

use super::*;
use crate::dm::pdev::PdevKind;
use crate::io::DataPlane;

/// A multipath state over `groups` groups of `paths` paths each (devices `251:<n>`), round-robin,
/// with a handler (pg_init on group switches) or without.
fn shared(groups: usize, paths: usize, with_handler: bool, queue_if_no_path: bool) -> Arc<Shared> {
    let mut n = 0;
    let groups = (0..groups)
        .map(|_| {
            let mut selector = selector::create("round-robin", &[]).unwrap().unwrap();
            let paths = (0..paths)
                .map(|i| {
                    selector.add_path(i, &[]).unwrap();
                    n += 1;
                    let dev = Arc::new(Pdev::new(DevNum::new(251, n), PdevKind::Dm { minor: n }, Sectors(8)));
                    Path { dev, active: true, fail_count: 0 }
                })
                .collect();
            Group { selector, paths, bypassed: false }
        })
        .collect::<Vec<_>>();
    let services = DataPlane::detached().services(0, 0);
    let handler = with_handler
        .then(|| handler::create("alua", &[], HandlerCtx { minor: 0, services: services.clone() }).unwrap().unwrap());
    let state = State::new(groups, Some(0), queue_if_no_path);
    let config = Config {
        bio_mode: false,
        retain_attached_hw_handler: false,
        pg_init_retries: 2,
        pg_init_delay_msecs: Some(0),
        handler,
    };
    Arc::new_cyclic(|me| Shared { state: Mutex::new(state), config, services, me: me.clone() })
}

fn route_name(sh: &Shared, acts: &mut Activations) -> (&'static str, Option<PathAt>) {
    let mut st = sh.lock();
    match sh.route(&mut st, 4096, acts) {
        Route::Remap(at, _) => ("remap", Some(at)),
        Route::Held => ("held", None),
        Route::Requeue => ("requeue", None),
        Route::Kill => ("kill", None),
    }
}

/// What every state must satisfy.
fn check(sh: &Shared) {
    let st = sh.lock();
    let active = st.groups.iter().flat_map(|g| &g.paths).filter(|p| p.active).count();
    assert_eq!(st.nr_valid_paths, active);
    if let Some((g, p)) = st.current_path {
        assert!(g < st.groups.len() && p < st.groups[g].paths.len());
    }
    if let Some(g) = st.current_pg {
        assert!(g < st.groups.len());
    }
    if st.pg_init_required {
        assert!(sh.has_handler(), "pg_init required without a handler");
    }
}

#[test]
fn round_robin_alternates_and_a_failed_path_is_skipped() {
    let sh = shared(1, 2, false, false);
    let mut acts = Vec::new();
    let picks: Vec<_> = (0..4).map(|_| route_name(&sh, &mut acts).1).collect();
    assert_eq!(picks, [Some((0, 0)), Some((0, 1)), Some((0, 0)), Some((0, 1))]);
    sh.fail_path(&mut sh.lock(), (0, 0));
    let picks: Vec<_> = (0..3).map(|_| route_name(&sh, &mut acts).1).collect();
    assert_eq!(picks, [Some((0, 1)); 3]);
    sh.fail_path(&mut sh.lock(), (0, 1));
    assert_eq!(route_name(&sh, &mut acts).0, "kill");
    assert!(acts.is_empty());
}

#[test]
fn a_handler_holds_io_until_every_activation_of_the_group_is_done() {
    let sh = shared(2, 2, true, false);
    let mut acts = Vec::new();
    assert_eq!(route_name(&sh, &mut acts).0, "held");
    assert_eq!(acts, vec![((0, 0), 0), ((0, 1), 0)]);
    sh.pg_init_done((0, 0), PgInitOutcome::Done(MpFlags::empty()));
    assert!(sh.lock().queue_io, "one activation of two done");
    sh.pg_init_done((0, 1), PgInitOutcome::Done(MpFlags::empty()));
    assert!(!sh.lock().queue_io);
    assert_eq!(sh.lock().pg_init_count, 1);
    assert_eq!(route_name(&sh, &mut acts).0, "remap");
    // One path's activation bypasses the next group; its other path's clean activation lifts the
    // bypass again (the kernel's `pg_init_done`), and the group is chosen afresh.
    sh.lock().next_pg = Some(1);
    let mut acts = Vec::new();
    assert_eq!(route_name(&sh, &mut acts).0, "held");
    sh.pg_init_done((1, 0), PgInitOutcome::Done(MpFlags::BYPASS_PG));
    sh.pg_init_done((1, 1), PgInitOutcome::Done(MpFlags::empty()));
    let st = sh.lock();
    assert!(!st.groups[1].bypassed && st.current_pg.is_none() && !st.queue_io);
}

#[derive(Clone, Debug)]
enum Op {
    Route,
    Fail(usize, usize),
    Reinstate(usize, usize),
    Bypass(usize, bool),
    Switch(usize),
    PgInit(usize, usize, u8),
    QueueIfNoPath(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Route),
        2 => (0..3usize, 0..3usize).prop_map(|(g, p)| Op::Fail(g, p)),
        2 => (0..3usize, 0..3usize).prop_map(|(g, p)| Op::Reinstate(g, p)),
        1 => (0..3usize, any::<bool>()).prop_map(|(g, b)| Op::Bypass(g, b)),
        1 => (0..3usize).prop_map(Op::Switch),
        2 => (0..3usize, 0..3usize, 0..9u8).prop_map(|(g, p, o)| Op::PgInit(g, p, o)),
        1 => any::<bool>().prop_map(Op::QueueIfNoPath),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_sequence_keeps_the_invariants(with_handler in any::<bool>(), ops in proptest::collection::vec(op(), 1..80)) {
        let sh = shared(3, 3, with_handler, true);
        let mut outstanding: Vec<PathAt> = Vec::new();
        for op in ops {
            match op {
                Op::Route => {
                    let mut acts = Vec::new();
                    let (what, at) = route_name(&sh, &mut acts);
                    outstanding.extend(acts.into_iter().map(|(at, _)| at));
                    if let Some((g, p)) = at {
                        prop_assert!(sh.lock().groups[g].paths[p].active, "{what} to a failed path");
                    }
                }
                Op::Fail(g, p) => sh.fail_path(&mut sh.lock(), (g, p)),
                Op::Reinstate(g, p) => {
                    let acts = sh.reinstate_path(&mut sh.lock(), (g, p)).unwrap();
                    outstanding.extend(acts.into_iter().map(|(at, _)| at));
                }
                Op::Bypass(g, b) => sh.bypass_pg(&mut sh.lock(), g, b),
                Op::Switch(g) => {
                    let mut st = sh.lock();
                    st.current_path = None;
                    st.current_pg = None;
                    st.next_pg = Some(g);
                }
                Op::PgInit(g, p, o) => {
                    // Only activations that were started complete (each exactly once).
                    if let Some(i) = outstanding.iter().position(|&at| at == (g, p)) {
                        outstanding.swap_remove(i);
                        let outcome = match o {
                            0..=3 => PgInitOutcome::Done(MpFlags::empty()),
                            4 => PgInitOutcome::Done(MpFlags::FAIL_PATH),
                            5 => PgInitOutcome::Done(MpFlags::BYPASS_PG),
                            6 => PgInitOutcome::Done(MpFlags::ERROR_IO),
                            7 => PgInitOutcome::Retry { delayed: false },
                            _ => PgInitOutcome::Retry { delayed: true },
                        };
                        sh.pg_init_done((g, p), outcome);
                        // A retry round starts new activations: they are outstanding too.
                        let st = sh.lock();
                        prop_assert!(st.pg_init_in_progress as usize <= outstanding.len() + 9);
                    }
                }
                Op::QueueIfNoPath(on) => sh.set_queue_if_no_path(&mut sh.lock(), on, false),
            }
            check(&sh);
        }
    }
}
