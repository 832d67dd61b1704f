//! The rollout machine in virtual time.

use crate::plan::tests::fleet;
use crate::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn plan() -> Plan {
    Plan {
        model: "cam".into(),
        version: 2,
        waves: vec![1, 5, 25, 100],
        bake_secs: 60,
        deadline_secs: 300,
        max_wait_secs: 3600,
        gates: Gates { max_failed: 0.05, max_p99_ms: Some(40.0), ..Gates::default() },
        on_failure: OnFailure::Rollback,
        seed: 7,
    }
}

fn healthy() -> Report {
    Report::Updated(Health { p99_ms: Some(12.0), ..Health::default() })
}

/// Every action out, by kind.
fn drain(r: &mut Rollout) -> (Vec<String>, Vec<String>) {
    let (mut assigned, mut reverted) = (Vec::new(), Vec::new());
    while let Some(a) = r.poll_action() {
        match a {
            Action::Assign { device } => assigned.push(device),
            Action::Revert { device, previous } => {
                assert_eq!(previous, Some(1));
                reverted.push(device)
            }
        }
    }
    (assigned, reverted)
}

#[test]
fn a_good_version_goes_through_every_wave_and_each_device_is_assigned_once() {
    let mut r = Rollout::start(plan(), fleet(200), 0).unwrap();
    let mut now = 0;
    let mut assigned_all = Vec::new();
    for wave in 0..r.waves().len() {
        let (assigned, _) = drain(&mut r);
        assert_eq!(assigned.len(), r.waves()[wave].len(), "wave {wave} sent whole");
        assert_eq!(r.phase(), &Phase::Running { wave });
        for d in &assigned {
            now += 1;
            assert!(r.report(d, healthy(), now));
        }
        assert_eq!(r.phase(), &Phase::Baking { wave, until: now + 60 });
        r.handle_timeout(now + 59);
        assert!(matches!(r.phase(), Phase::Baking { .. }), "not before the bake ends");
        now += 60;
        assert_eq!(r.poll_timeout(), Some(now));
        r.handle_timeout(now);
        assigned_all.extend(assigned);
    }
    assert_eq!(r.phase(), &Phase::Done);
    assigned_all.sort();
    assigned_all.dedup();
    assert_eq!(assigned_all.len(), 200);
    assert_eq!(drain(&mut r), (vec![], vec![]));
}

#[test]
fn a_version_failing_on_the_canary_stops_there_and_its_devices_are_rolled_back() {
    let mut r = Rollout::start(plan(), fleet(200), 0).unwrap();
    let (canary, _) = drain(&mut r);
    assert!(canary.len() <= 10, "at most 5 % of the fleet touched: {}", canary.len());
    // One passes, one fails its self-test: 1 of the canary over 5 %.
    r.report(&canary[0], healthy(), 1);
    r.report(&canary[1], Report::Failed("self-test: outputs differ".into()), 2);
    assert_eq!(r.phase(), &Phase::RolledBack);
    let (assigned, mut reverted) = drain(&mut r);
    assert!(assigned.is_empty(), "no further wave");
    reverted.sort();
    let mut touched = canary.clone();
    touched.sort();
    assert_eq!(reverted, touched, "every device touched goes back, once");
    assert!(!r.report(&canary[2], healthy(), 3), "reverted devices' reports change nothing");
    assert_eq!(r.command(Command::Rollback, 4), Err(Disallowed { command: Command::Rollback, phase: "rolled back" }));
}

#[test]
fn a_device_past_its_gate_or_its_deadline_fails_with_the_reason() {
    let gates = Gates { max_failed: 0.5, ..plan().gates };
    let p = Plan { on_failure: OnFailure::Pause, waves: vec![100], gates, ..plan() };
    let mut r = Rollout::start(p, fleet(6), 0).unwrap();
    let (wave, _) = drain(&mut r);
    assert_eq!(wave.len(), 6, "one wave");
    r.report(&wave[0], Report::Updated(Health { p99_ms: Some(55.0), ..Health::default() }), 10);
    assert_eq!(r.device(&wave[0]), Some(&DeviceState::Failed("p99 ms 55.000 above 40".into())));
    for d in &wave[1..5] {
        r.report(d, healthy(), 20);
    }
    // The sixth never reports: failed at its deadline, and the wave (2 of
    // 6 failed, under the 50 % gate) bakes.
    assert_eq!(r.poll_timeout(), Some(300));
    r.handle_timeout(300);
    assert_eq!(r.device(&wave[5]), Some(&DeviceState::Failed("no report within 300 s of the update".into())));
    assert_eq!(r.phase(), &Phase::Baking { wave: 0, until: 360 });
    r.handle_timeout(360);
    assert_eq!(r.phase(), &Phase::Done);
    let s = r.wave_status(0);
    assert_eq!((s.succeeded, s.failed), (4, 2));
}

#[test]
fn a_device_waiting_for_its_window_is_not_counted_down_until_it_waited_too_long() {
    let mut r = Rollout::start(Plan { waves: vec![100], ..plan() }, fleet(3), 0).unwrap();
    let (wave, _) = drain(&mut r);
    r.report(&wave[0], healthy(), 5);
    r.report(&wave[1], healthy(), 5);
    r.report(&wave[2], Report::Waiting, 10);
    r.handle_timeout(1000);
    assert!(matches!(r.device(&wave[2]), Some(DeviceState::Sent { waiting_since: Some(10), .. })));
    assert_eq!(r.wave_status(0).waiting, 1);
    assert_eq!(r.poll_timeout(), Some(3610));
    // Its window opened: it updated.
    r.report(&wave[2], healthy(), 2000);
    assert_eq!(r.phase(), &Phase::Baking { wave: 0, until: 2060 });
    // Another fleet's device waits past the limit: failed, and the 5 %
    // gate rolls the wave back.
    let mut r = Rollout::start(Plan { waves: vec![100], ..plan() }, fleet(3), 0).unwrap();
    let (wave, _) = drain(&mut r);
    r.report(&wave[0], Report::Waiting, 0);
    r.handle_timeout(3600);
    assert!(matches!(r.device(&wave[0]), Some(DeviceState::Reverted)));
    assert_eq!(r.phase(), &Phase::RolledBack);
}

#[test]
fn pause_resume_abort_and_rollback_of_a_finished_rollout() {
    let p = Plan { on_failure: OnFailure::Pause, ..plan() };
    let mut r = Rollout::start(p.clone(), fleet(100), 0).unwrap();
    let (canary, _) = drain(&mut r);
    r.command(Command::Pause, 1).unwrap();
    assert!(matches!(r.phase(), Phase::Paused { wave: 0, .. }));
    // Reports still count while paused; no wave starts.
    for d in &canary {
        r.report(d, healthy(), 2);
    }
    r.handle_timeout(10_000);
    assert!(matches!(r.phase(), Phase::Paused { wave: 0, .. }));
    assert_eq!(r.command(Command::Pause, 3), Err(Disallowed { command: Command::Pause, phase: "paused" }));
    r.command(Command::Resume, 4).unwrap();
    assert_eq!(r.phase(), &Phase::Baking { wave: 0, until: 64 });
    assert_eq!(r.command(Command::Resume, 5), Err(Disallowed { command: Command::Resume, phase: "baking" }));
    r.handle_timeout(64);
    let (second, _) = drain(&mut r);
    assert!(!second.is_empty());
    r.command(Command::Abort, 65).unwrap();
    assert_eq!(r.phase(), &Phase::Aborted);
    r.handle_timeout(100_000);
    assert_eq!(drain(&mut r), (vec![], vec![]), "an aborted rollout does nothing more");
    assert!(r.is_finished());
    // A finished (here aborted) rollout can still be rolled back: every
    // device it touched, canary and second wave.
    r.command(Command::Rollback, 66).unwrap();
    let (_, reverted) = drain(&mut r);
    assert_eq!(reverted.len(), canary.len() + second.len());
    assert_eq!(r.command(Command::Abort, 67), Err(Disallowed { command: Command::Abort, phase: "rolled back" }));
}

#[test]
fn a_failed_wave_paused_can_be_resumed_past_its_failure_by_the_operator() {
    let p = Plan { on_failure: OnFailure::Pause, ..plan() };
    let mut r = Rollout::start(p, fleet(100), 0).unwrap();
    let (canary, _) = drain(&mut r);
    r.report(&canary[0], Report::Failed("shadow agreement 0.42 below 0.9".into()), 1);
    let Phase::Paused { wave: 0, reason } = r.phase().clone() else { panic!("{:?}", r.phase()) };
    assert!(reason.contains("1 of"), "{reason}");
    for d in &canary[1..] {
        r.report(d, healthy(), 2);
    }
    r.command(Command::Resume, 3).unwrap();
    assert_eq!(r.phase(), &Phase::Baking { wave: 0, until: 63 });
    r.handle_timeout(63);
    assert_eq!(r.phase(), &Phase::Running { wave: 1 });
}

#[test]
fn a_rollout_kept_and_restored_goes_on_without_sending_anything_twice() {
    let mut r = Rollout::start(plan(), fleet(50), 0).unwrap();
    let (canary, _) = drain(&mut r);
    r.report(&canary[0], healthy(), 1);
    let kept = serde_json::to_vec(&r).unwrap();
    let mut again: Rollout = serde_json::from_slice(&kept).unwrap();
    assert_eq!(again, r);
    assert_eq!(drain(&mut again), (vec![], vec![]), "what was sent is not sent again");
    for d in &canary[1..] {
        again.report(d, healthy(), 2);
    }
    again.handle_timeout(62);
    let (next, _) = drain(&mut again);
    assert!(next.iter().all(|d| !canary.contains(d)));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever the devices say and whenever: each device is assigned at
    /// most once and reverted at most once, never reverted unless assigned,
    /// and with time passing the rollout always ends or pauses (it never
    /// sticks).
    #[test]
    fn no_device_is_touched_twice_and_no_rollout_sticks(
        n in 1usize..120,
        seed in any::<u64>(),
        outcomes in prop::collection::vec(0u8..6, 120),
        commands in prop::collection::vec((0u8..12, 0u64..5000), 0..4),
        pause_on_failure in any::<bool>(),
    ) {
        let p = Plan {
            seed,
            on_failure: if pause_on_failure { OnFailure::Pause } else { OnFailure::Rollback },
            ..plan()
        };
        let mut r = Rollout::start(p, fleet(n), 0).unwrap();
        let mut assigned: BTreeMap<String, u32> = BTreeMap::new();
        let mut reverted: BTreeMap<String, u32> = BTreeMap::new();
        let mut now = 0;
        for step in 0..400u64 {
            while let Some(a) = r.poll_action() {
                match a {
                    Action::Assign { device } => *assigned.entry(device).or_default() += 1,
                    Action::Revert { device, .. } => {
                        prop_assert!(assigned.contains_key(&device), "reverted {device} never assigned");
                        *reverted.entry(device).or_default() += 1;
                    }
                }
            }
            for (c, at) in &commands {
                if *at / 10 == step {
                    let c = [Command::Pause, Command::Resume, Command::Abort, Command::Rollback][*c as usize % 4];
                    let _ = r.command(c, now);
                }
            }
            for (i, d) in assigned.keys().cloned().collect::<Vec<_>>().iter().enumerate() {
                if !(i as u64 + step).is_multiple_of(7) {
                    continue;
                }
                let report = match outcomes[i % outcomes.len()] {
                    0..=2 => Some(healthy()),
                    3 => Some(Report::Failed("self-test".into())),
                    4 => Some(Report::Waiting),
                    _ => None,
                };
                if let Some(rep) = report {
                    r.report(d, rep, now);
                }
            }
            now += 50;
            r.handle_timeout(now);
            if matches!(r.phase(), Phase::Paused { .. }) && step > 300 {
                let _ = r.command(Command::Abort, now);
            }
        }
        prop_assert!(assigned.values().all(|&c| c == 1), "{assigned:?}");
        prop_assert!(reverted.values().all(|&c| c == 1), "{reverted:?}");
        // 400 steps of 50 s: every deadline (300 s), wait (3600 s) and bake
        // (60 s) of 4 waves is long past.
        prop_assert!(r.is_finished(), "stuck in {:?}", r.phase());
    }
}

#[test]
fn devices_on_the_version_already_are_not_touched_and_count_as_updated() {
    let mut targets = fleet(4);
    targets[1].previous = Some(2);
    let mut r = Rollout::start(Plan { waves: vec![100], ..plan() }, targets, 0).unwrap();
    let (assigned, _) = drain(&mut r);
    assert_eq!(assigned.len(), 3);
    assert!(!assigned.contains(&"cam-0001".to_string()));
    assert_eq!(r.device("cam-0001"), Some(&DeviceState::Succeeded));
    // All on it already: the wave bakes at once, nothing sent.
    let all: Vec<Target> = fleet(2).into_iter().map(|t| Target { previous: Some(2), ..t }).collect();
    let mut r = Rollout::start(Plan { waves: vec![100], ..plan() }, all, 0).unwrap();
    assert_eq!(drain(&mut r), (vec![], vec![]));
    assert_eq!(r.phase(), &Phase::Baking { wave: 0, until: 60 });
}

#[test]
fn failures_while_an_operator_paused_are_judged_at_resume() {
    let p = Plan { on_failure: OnFailure::Rollback, ..plan() };
    let mut r = Rollout::start(p, fleet(100), 0).unwrap();
    let (canary, _) = drain(&mut r);
    r.command(Command::Pause, 1).unwrap();
    r.report(&canary[0], Report::Failed("self-test".into()), 2);
    assert!(matches!(r.phase(), Phase::Paused { .. }), "paused: judged later");
    r.command(Command::Resume, 3).unwrap();
    assert_eq!(r.phase(), &Phase::RolledBack, "the plan's on-failure, not the operator's override");
}

#[test]
fn durations_out_of_range_are_refused() {
    for (p, what) in [
        (Plan { deadline_secs: 0, ..plan() }, "deadline_secs"),
        (Plan { bake_secs: u64::MAX, ..plan() }, "bake_secs"),
        (Plan { max_wait_secs: 31 * 86_400, ..plan() }, "max_wait_secs"),
    ] {
        assert!(matches!(p.check(), Err(PlanError::Duration { what: w, .. }) if w == what), "{what}");
    }
    assert!(Plan { bake_secs: 0, ..plan() }.check().is_ok());
}

#[test]
fn a_wait_ends_when_the_device_is_active_and_its_deadline_runs_on_from_there() {
    let mut r = Rollout::start(Plan { waves: vec![100], ..plan() }, fleet(1), 0).unwrap();
    let (wave, _) = drain(&mut r);
    // Offline from 10 to 1010: its 300 s deadline moves on by 1000 s.
    r.report(&wave[0], Report::Waiting, 10);
    r.report(&wave[0], Report::Active, 1010);
    assert_eq!(r.device(&wave[0]), Some(&DeviceState::Sent { at: 0, waiting_since: None, waited: 1000 }));
    assert_eq!(r.poll_timeout(), Some(1300));
    r.handle_timeout(1299);
    assert!(matches!(r.device(&wave[0]), Some(DeviceState::Sent { .. })));
    r.handle_timeout(1300);
    assert!(matches!(r.device(&wave[0]), Some(DeviceState::Reverted)), "failed at its deadline, rolled back");
}
