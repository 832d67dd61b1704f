use super::*;
use tern_proto::{LocalTime, MaintenanceWindow, ModelFormat, SelfTestRef, Sha256Digest, UpdatePolicy};

const ALL: &[ModelFormat] = &[ModelFormat::Onnx, ModelFormat::Nnef, ModelFormat::Burn];

/// The policy of the test manifests: three shadow comparisons, 10 s of
/// probation, short deadlines, apps may defer for 50 s.
fn policy() -> UpdatePolicy {
    UpdatePolicy {
        fetch_secs: 100,
        verify_secs: 10,
        load_secs: 20,
        selftest_secs: 30,
        shadow_requests: 3,
        shadow_secs: 40,
        shadow_min_agreement_permille: 900,
        shadow_compare: tern_proto::ShadowCompare::Auto,
        shadow_tolerance_ppm: 10_000,
        shadow_max_p99_permille: 2000,
        probation_secs: 10,
        probation_min_requests: 5,
        probation_max_error_permille: 100,
        probation_max_p99_ms: 50,
        window: None,
        max_defer_secs: 50,
        ready_secs: 10 * 24 * 3600,
    }
}

/// A shadow report: `compared`, `agreed`, and the candidate's p99 when the
/// serving version's is 100 µs.
fn shadowed(compared: u64, agreed: u64, candidate_p99_us: u64) -> ShadowReport {
    ShadowReport { offered: compared, compared, agreed, candidate_p99_us, serving_p99_us: 100, running_since: None }
}

fn m(name: &str, version: u32) -> ModelManifest {
    ModelManifest {
        name: name.into(),
        version,
        sha256: Sha256Digest::of(format!("{name}{version}").as_bytes()),
        size: 10,
        format: ModelFormat::Onnx,
        inputs: vec![],
        outputs: vec![],
        created_at: 0,
        selftest: Some(SelfTestRef {
            sha256: Sha256Digest::of(format!("golden {name}{version}").as_bytes()),
            size: 5,
            tolerance_ppm: 100,
        }),
        update: Some(policy()),
        alternative: None,
        baseline: None,
        capture: None,
    }
}

fn drain(s: &mut Slots) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

fn ev(kind: &str, name: &str, version: u32) -> Event {
    let (name, reason) = (name.to_string(), format!("{kind} went wrong"));
    match kind {
        "fetched" => Event::Fetched { name, version },
        "fetch-failed" => Event::FetchFailed { name, version, reason },
        "verified" => Event::Verified { name, version },
        "verify-failed" => Event::VerifyFailed { name, version, reason },
        "loaded" => Event::Loaded { name, version },
        "load-failed" => Event::LoadFailed { name, version, reason },
        "self-test-passed" => Event::SelfTestPassed { name, version },
        "self-test-failed" => Event::SelfTestFailed { name, version, reason },
        "shadowed" => Event::Shadowed { name, version, report: shadowed(3, 3, 100) },
        "shadow-failed" => Event::ShadowFailed { name, version, reason },
        "install-failed" => Event::InstallFailed { name, version, reason },
        "health" => Event::Health {
            name,
            version,
            health: Health { requests: 10, errors: 0, p99_us: 1000, ..Health::default() },
        },
        other => unreachable!("{other}"),
    }
}

const EVENTS: &[&str] = &[
    "fetched",
    "fetch-failed",
    "verified",
    "verify-failed",
    "loaded",
    "load-failed",
    "self-test-passed",
    "self-test-failed",
    "shadowed",
    "shadow-failed",
    "install-failed",
    "health",
];

fn ok(s: &mut Slots, kind: &str, name: &str, version: u32, now: Instant) {
    assert_eq!(s.handle(ev(kind, name, version), now), Ok(true), "{kind} for {name}:{version}");
}

/// Takes a fresh candidate to just before probation (no shadow: nothing serves).
fn to_probation(s: &mut Slots, name: &str, version: u32, now: Instant) {
    for kind in ["fetched", "verified", "loaded", "self-test-passed"] {
        ok(s, kind, name, version, now);
    }
}

fn healthy(name: &str, version: u32) -> Event {
    Event::Health {
        name: name.into(),
        version,
        health: Health { requests: 100, errors: 0, p99_us: 2000, ..Health::default() },
    }
}

/// Slots serving (committed) `models`, with the actions that got them there drained.
fn serving(models: &[ModelManifest], t0: Instant) -> Slots {
    let mut s = Slots::new(ALL);
    s.set_desired(1, models.to_vec(), t0);
    for x in models {
        to_probation(&mut s, &x.name, x.version, t0);
    }
    let end = t0 + Duration::from_secs(10);
    for x in models {
        s.handle(healthy(&x.name, x.version), end).unwrap();
        assert!(s.slot(&x.name).unwrap().candidate().is_none(), "committed");
    }
    drain(&mut s);
    s
}

/// A slot as (name, active, previous, candidate) versions.
type Versions = (String, Option<u32>, Option<u32>, Option<u32>);

fn persisted_names(p: &Persisted) -> Vec<Versions> {
    p.slots
        .iter()
        .map(|s| {
            let v = |m: &Option<ModelManifest>| m.as_ref().map(|m| m.version);
            (s.name.clone(), v(&s.active), v(&s.previous), v(&s.candidate))
        })
        .collect()
}

fn phase_of(s: &Slots, name: &str) -> String {
    s.slot(name).unwrap().candidate().map_or("none".into(), |(_, p)| p.to_string())
}

fn status_of(s: &Slots, name: &str, version: u32) -> (ModelState, Option<String>) {
    let st = s.status().into_iter().find(|x| x.name == name && x.version == version).expect("reported");
    (st.state, st.detail)
}

#[test]
fn an_update_goes_through_every_stage_and_commits_after_probation() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)], t0);
    s.set_desired(2, vec![m("iris", 2)], t0);
    assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 2)), Action::Persist]);
    assert_eq!(status_of(&s, "iris", 2).0, ModelState::Downloading);
    ok(&mut s, "fetched", "iris", 2, t0);
    assert_eq!(drain(&mut s), [Action::Verify(m("iris", 2))]);
    ok(&mut s, "verified", "iris", 2, t0);
    // Persisted as being tried before any of its code runs.
    assert_eq!(drain(&mut s), [Action::Persist, Action::Load(m("iris", 2))]);
    assert_eq!(s.persisted().slots[0].stage, Stage::Trying { phase: "staged".into() });
    // Each stage that runs its code is written down as it starts, so that
    // a restart says where it stopped.
    ok(&mut s, "loaded", "iris", 2, t0);
    assert_eq!(drain(&mut s), [Action::Persist, Action::SelfTest(m("iris", 2))]);
    assert_eq!(s.holding(), [("iris".to_string(), 2)].into());
    ok(&mut s, "self-test-passed", "iris", 2, t0);
    assert_eq!(drain(&mut s), [Action::Persist, Action::Shadow(m("iris", 2))]);
    assert_eq!(status_of(&s, "iris", 2), (ModelState::Verifying, Some("shadow".into())));
    assert_eq!(s.slot("iris").unwrap().served(), Some(&m("iris", 1)), "v1 answers while v2 shadows");
    let partial = shadowed(2, 2, 100);
    s.handle(Event::Shadowed { name: "iris".into(), version: 2, report: partial }, t0).unwrap();
    assert_eq!(phase_of(&s, "iris"), "shadow", "not enough comparisons yet");
    ok(&mut s, "shadowed", "iris", 2, t0);
    assert_eq!(drain(&mut s), [Action::Persist, Action::Install(m("iris", 2))]);
    assert!(s.holding().is_empty());
    assert_eq!(s.slot("iris").unwrap().served(), Some(&m("iris", 2)));
    assert_eq!(status_of(&s, "iris", 2), (ModelState::Serving, Some("probation; version 1 stands by".into())));
    assert_eq!(s.status().len(), 1, "the standby version is not reported as serving");
    // Health is asked for every second; healthy before the end, it stays on probation.
    assert_eq!(s.poll_timeout(), Some(t0 + HEALTH_EVERY));
    s.handle_timeout(t0 + HEALTH_EVERY);
    assert_eq!(drain(&mut s), [Action::CheckHealth(m("iris", 2))]);
    s.handle(healthy("iris", 2), t0 + HEALTH_EVERY).unwrap();
    assert_eq!(phase_of(&s, "iris"), "probation");
    // At the end of the window it commits, with v1 as the previous version.
    s.handle(healthy("iris", 2), t0 + Duration::from_secs(10)).unwrap();
    assert_eq!(drain(&mut s), [Action::Persist]);
    let slot = s.slot("iris").unwrap();
    assert_eq!((slot.active(), slot.previous(), slot.serving()), (Some(&m("iris", 2)), Some(&m("iris", 1)), true));
    assert_eq!(persisted_names(&s.persisted()), [("iris".into(), Some(2), Some(1), None)]);
    assert_eq!(s.poll_timeout(), None, "nothing left to time");
}

/// Slots serving iris:1 with iris:2 in `phase`.
fn to_phase(phase: &str, t0: Instant) -> Slots {
    if phase == "refused" {
        let mut s = Slots::new(&[ModelFormat::Nnef]);
        s.set_desired(1, vec![m("iris", 2)], t0);
        return s;
    }
    let mut s = serving(&[m("iris", 1)], t0);
    s.set_desired(2, vec![m("iris", 2)], t0);
    if phase == "ready" {
        s.defer("iris", 1000, t0).unwrap();
    }
    for kind in steps_to(phase) {
        ok(&mut s, kind, "iris", 2, t0);
    }
    if phase == "rolled back" {
        let bad = Health { requests: 10, errors: 10, p99_us: 0, ..Health::default() };
        s.handle(Event::Health { name: "iris".into(), version: 2, health: bad }, t0).unwrap();
    }
    assert_eq!(phase_of(&s, "iris"), phase);
    drain(&mut s);
    s
}

/// The events that take a new candidate from fetching to `phase`.
fn steps_to(phase: &str) -> &'static [&'static str] {
    match phase {
        "fetching" => &[],
        "retrying" => &["fetch-failed"],
        "verifying" => &["fetched"],
        "staged" => &["fetched", "verified"],
        "self-test" => &["fetched", "verified", "loaded"],
        "shadow" => &["fetched", "verified", "loaded", "self-test-passed"],
        "probation" | "ready" => &["fetched", "verified", "loaded", "self-test-passed", "shadowed"],
        "failed" => &["fetched", "verified", "loaded", "self-test-failed"],
        "rolled back" => &["fetched", "verified", "loaded", "self-test-passed", "shadowed"],
        other => unreachable!("{other}"),
    }
}

#[test]
fn every_event_in_every_phase() {
    let t0 = Instant::now();
    let allowed: &[(&str, &[&str])] = &[
        ("fetching", &["fetched", "fetch-failed"]),
        ("verifying", &["verified", "verify-failed"]),
        ("staged", &["loaded", "load-failed"]),
        ("self-test", &["self-test-passed", "self-test-failed"]),
        ("shadow", &["shadowed", "shadow-failed"]),
        ("probation", &["health", "install-failed"]),
        ("ready", &[]),
        ("retrying", &[]),
        ("refused", &[]),
    ];
    for (phase, ok_events) in allowed {
        for kind in EVENTS {
            let mut s = to_phase(phase, t0);
            let got = s.handle(ev(kind, "iris", 2), t0);
            if ok_events.contains(kind) {
                assert_eq!(got, Ok(true), "{kind} while {phase}");
            } else if kind.starts_with("shadow") {
                // A shadow thread's words outside shadow: stale.
                assert_eq!(got, Ok(false), "{kind} while {phase}");
            } else {
                let e = got.expect_err(&format!("{kind} while {phase} must be disallowed"));
                assert_eq!((e.event, e.state.as_str()), (*kind, *phase));
                assert!(e.to_string().ends_with(&format!("is not allowed while {phase}")), "{e}");
            }
        }
    }
    // An update that ended ignores the results of work still in flight.
    for phase in ["failed", "rolled back"] {
        for kind in EVENTS {
            let mut s = to_phase(phase, t0);
            assert_eq!(s.handle(ev(kind, "iris", 2), t0), Ok(false), "{kind} while {phase}");
            assert_eq!(phase_of(&s, "iris"), phase);
        }
    }
    // The committed version, serving: no event is expected for it (but
    // the last words of the shadow it went through, which are stale).
    for kind in EVENTS {
        let mut s = serving(&[m("iris", 1)], t0);
        let got = s.handle(ev(kind, "iris", 1), t0);
        if kind.starts_with("shadow") {
            assert_eq!(got, Ok(false), "{kind}");
        } else {
            assert_eq!(got.unwrap_err().state, "serving", "{kind}");
        }
    }
    // Loading again after a restart: only the load's outcome is.
    for kind in EVENTS {
        let mut s = Slots::restore(ALL, serving(&[m("iris", 1)], t0).persisted(), t0);
        let got = s.handle(ev(kind, "iris", 1), t0);
        if matches!(*kind, "loaded" | "load-failed") {
            assert_eq!(got, Ok(true), "{kind}");
        } else if kind.starts_with("shadow") {
            assert_eq!(got, Ok(false), "{kind}");
        } else {
            assert_eq!(got.unwrap_err().state, "loading again", "{kind}");
        }
    }
    // Events for versions or names nobody waits for are stale, not errors.
    let mut s = to_phase("staged", t0);
    assert_eq!(s.handle(ev("loaded", "iris", 7), t0), Ok(false));
    assert_eq!(s.handle(ev("fetched", "other", 1), t0), Ok(false));
}

#[test]
fn every_deadline_fails_its_update_and_the_committed_version_keeps_serving() {
    let t0 = Instant::now();
    // (phase, seconds after entering it that it may last, the phase it is
    // in then: a retry that came due went back to fetching)
    for (phase, secs, at_deadline) in [
        ("fetching", 100, "fetching"),
        ("retrying", 100, "fetching"),
        ("verifying", 10, "verifying"),
        ("staged", 20, "staged"),
        ("self-test", 30, "self-test"),
    ] {
        let mut s = to_phase(phase, t0);
        let deadline = t0 + Duration::from_secs(secs);
        s.handle_timeout(deadline - Duration::from_millis(1));
        assert_ne!(phase_of(&s, "iris"), "failed", "{phase} before its deadline");
        drain(&mut s);
        s.handle_timeout(deadline);
        assert_eq!(phase_of(&s, "iris"), "failed", "{phase}");
        let (state, detail) = status_of(&s, "iris", 2);
        assert_eq!(state, ModelState::Failed);
        assert!(detail.as_deref().unwrap().starts_with(&format!("{at_deadline} passed its deadline")), "{detail:?}");
        assert_eq!(drain(&mut s), [Action::Persist], "{phase}");
        assert_eq!(s.slot("iris").unwrap().served(), Some(&m("iris", 1)), "{phase}");
        assert!(s.holding().is_empty());
        // Not tried again: nothing is timed any more, a replay changes nothing.
        assert_eq!(s.poll_timeout(), None, "{phase}");
        s.set_desired(3, vec![m("iris", 2)], deadline);
        if at_deadline == "fetching" {
            // A download out of time (the device was cut off, say) starts
            // again with the next desired state: each connection brings one.
            assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 2)), Action::Persist], "{phase}");
            assert_eq!(phase_of(&s, "iris"), "fetching");
        } else {
            assert_eq!(drain(&mut s), [Action::Persist], "{phase}: the generation only");
            assert_eq!(phase_of(&s, "iris"), "failed");
        }
    }
    // A wait to activate ends at the latest after ready_secs and the defer
    // allowance: a window that never opens, a local time never given.
    let window = MaintenanceWindow { from_minute: 0, to_minute: 60, days: 1 };
    let mut s = tested_with_window(window, t0, None);
    drain(&mut s);
    s.handle_timeout(t0 + Duration::from_secs(10 * 24 * 3600 + 49));
    assert_eq!(phase_of(&s, "iris"), "ready", "the local time is unknown");
    s.handle_timeout(t0 + Duration::from_secs(10 * 24 * 3600 + 50));
    assert_eq!(phase_of(&s, "iris"), "failed");
    assert!(status_of(&s, "iris", 2).1.unwrap().starts_with("ready passed its deadline"));
    assert_eq!(drain(&mut s), [Action::Persist]);
    assert_eq!(s.slot("iris").unwrap().served(), Some(&m("iris", 1)));
    // Probation whose health never comes: rolled back at the end of the grace.
    let mut s = to_phase("probation", t0);
    let end = t0 + Duration::from_secs(10) + HEALTH_GRACE;
    s.handle_timeout(end);
    assert_eq!(phase_of(&s, "iris"), "rolled back");
    assert!(status_of(&s, "iris", 2).1.unwrap().contains("probation passed its deadline (no health report)"));
    assert_eq!(drain(&mut s), [Action::Load(m("iris", 1)), Action::Persist]);
}

#[test]
fn a_candidate_that_fails_self_test_never_serves_and_is_not_tried_again() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)], t0);
    s.set_desired(2, vec![m("iris", 2)], t0);
    for kind in ["fetched", "verified", "loaded"] {
        ok(&mut s, kind, "iris", 2, t0);
    }
    drain(&mut s);
    let reason = "case 0, output 0, element 3: 0.9, golden 0.1".to_string();
    s.handle(Event::SelfTestFailed { name: "iris".into(), version: 2, reason }, t0).unwrap();
    assert_eq!(drain(&mut s), [Action::Persist], "no install");
    assert!(s.holding().is_empty(), "the loaded candidate is dropped");
    let detail = status_of(&s, "iris", 2).1.unwrap();
    assert_eq!(detail, "self-test failed: case 0, output 0, element 3: 0.9, golden 0.1");
    assert_eq!(status_of(&s, "iris", 1).0, ModelState::Serving);
    // A restart keeps the verdict.
    let mut s = Slots::restore(ALL, s.persisted(), t0);
    assert_eq!(drain(&mut s), [Action::Load(m("iris", 1))]);
    assert_eq!(status_of(&s, "iris", 2).1.unwrap(), detail);
}

#[test]
fn shadow_disagreement_fails_the_update() {
    let t0 = Instant::now();
    let mut s = to_phase("shadow", t0);
    let report = shadowed(10, 8, 100);
    s.handle(Event::Shadowed { name: "iris".into(), version: 2, report }, t0).unwrap();
    assert_eq!(drain(&mut s), [Action::Persist]);
    let detail = status_of(&s, "iris", 2).1.unwrap();
    assert_eq!(detail, "shadow: agreed with the serving version on 8 of 10 requests (800‰, at least 900‰ needed)");
    assert_eq!(s.slot("iris").unwrap().served(), Some(&m("iris", 1)));
}

#[test]
fn a_candidate_that_cannot_be_installed_leaves_the_committed_version_serving_and_is_tried_again() {
    let t0 = Instant::now();
    let mut s = to_phase("probation", t0);
    ok(&mut s, "install-failed", "iris", 2, t0);
    assert_eq!(drain(&mut s), [Action::Persist]);
    assert_eq!(phase_of(&s, "iris"), "retrying");
    assert_eq!(s.slot("iris").unwrap().served(), Some(&m("iris", 1)), "what served before serves on");
    assert_eq!(s.poll_timeout(), Some(t0 + backoff(1)));
    // Long after the download's deadline (it waited for a window), the
    // retry still gets its own.
    let later = t0 + Duration::from_secs(1000);
    let mut s = to_phase("probation", t0);
    ok(&mut s, "install-failed", "iris", 2, later);
    s.handle_timeout(later + backoff(1));
    assert_eq!(phase_of(&s, "iris"), "fetching");
}

#[test]
fn a_candidate_too_slow_beside_the_serving_version_fails_in_shadow() {
    let t0 = Instant::now();
    // At most 2000‰ of the serving p99 (100 µs): 200 µs goes on, 201 does not.
    let mut s = to_phase("shadow", t0);
    s.handle(Event::Shadowed { name: "iris".into(), version: 2, report: shadowed(3, 3, 200) }, t0).unwrap();
    assert_eq!(phase_of(&s, "iris"), "probation");
    let t = transitions(&mut s);
    let step = t.iter().find(|t| t.0 == 2 && t.1 == "probation").unwrap();
    assert_eq!(
        step.2.as_deref(),
        Some(
            "shadow: agreed with the serving version on 3 of 3 requests (1000‰), p99 200 µs beside the serving version's 100 µs (2000‰)"
        )
    );
    let mut s = to_phase("shadow", t0);
    s.handle(Event::Shadowed { name: "iris".into(), version: 2, report: shadowed(3, 3, 201) }, t0).unwrap();
    assert_eq!(drain(&mut s), [Action::Persist]);
    let detail = status_of(&s, "iris", 2).1.unwrap();
    assert_eq!(detail, "shadow: p99 201 µs beside the serving version's 100 µs (2010‰, at most 2000‰ allowed)");
    assert_eq!(s.slot("iris").unwrap().served(), Some(&m("iris", 1)));
}

#[test]
fn a_shadow_out_of_time_is_judged_on_what_it_compared() {
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(40);
    // Two of the three requests came, both agreed: it goes on.
    let mut s = to_phase("shadow", t0);
    s.handle(Event::Shadowed { name: "iris".into(), version: 2, report: shadowed(2, 2, 100) }, t0).unwrap();
    transitions(&mut s);
    s.handle_timeout(end - Duration::from_millis(1));
    assert_eq!(phase_of(&s, "iris"), "shadow");
    s.handle_timeout(end);
    assert_eq!(phase_of(&s, "iris"), "probation");
    let t = transitions(&mut s);
    assert!(
        t[0].2.as_deref().unwrap().starts_with("shadow ended at its 40 s limit after 2 of 3 requests: agreed with"),
        "{t:?}"
    );
    // Two came and one agreed: it fails, saying so.
    let mut s = to_phase("shadow", t0);
    s.handle(Event::Shadowed { name: "iris".into(), version: 2, report: shadowed(2, 1, 100) }, t0).unwrap();
    s.handle_timeout(end);
    assert_eq!(phase_of(&s, "iris"), "failed");
    let detail = status_of(&s, "iris", 2).1.unwrap();
    assert_eq!(
        detail,
        "shadow ended at its 40 s limit after 2 of 3 requests: agreed with the serving version on 1 of 2 requests (500‰, at least 900‰ needed)"
    );
    // One started just before the end is waited for, within its grace: if
    // it ends, it counts; if not, the candidate fails at the grace's end.
    let mut s = to_phase("shadow", t0);
    let late = ShadowReport { offered: 3, running_since: Some(end - Duration::from_secs(1)), ..shadowed(2, 2, 100) };
    s.handle(Event::Shadowed { name: "iris".into(), version: 2, report: late }, t0).unwrap();
    s.handle_timeout(end);
    assert_eq!(phase_of(&s, "iris"), "shadow", "waits for the run under way");
    assert_eq!(s.poll_timeout(), Some(end + Duration::from_secs(4) + Duration::from_millis(1)));
    s.handle(Event::Shadowed { name: "iris".into(), version: 2, report: shadowed(3, 3, 100) }, end).unwrap();
    assert_eq!(phase_of(&s, "iris"), "probation");
    let mut s = to_phase("shadow", t0);
    s.handle(Event::Shadowed { name: "iris".into(), version: 2, report: late }, t0).unwrap();
    s.handle_timeout(end);
    s.handle_timeout(end + Duration::from_secs(5));
    assert_eq!(phase_of(&s, "iris"), "failed", "it never ended");
    let mut s = to_phase("shadow", t0);
    let stuck = ShadowReport { offered: 3, running_since: Some(end - Duration::from_secs(6)), ..shadowed(2, 2, 100) };
    s.handle(Event::Shadowed { name: "iris".into(), version: 2, report: stuck }, t0).unwrap();
    s.handle_timeout(end);
    assert_eq!(phase_of(&s, "iris"), "failed");
    let detail = status_of(&s, "iris", 2).1.unwrap();
    assert!(
        detail.ends_with("a run on a live request had been under way for 6 s on the candidate (at most 5 s allowed)"),
        "{detail}"
    );
    // What the shadow thread says once shadow ended is stale.
    assert_eq!(s.handle(Event::Shadowed { name: "iris".into(), version: 2, report: stuck }, end), Ok(false));
    // The shadow thread could not start: it fails at once.
    let mut s = to_phase("shadow", t0);
    ok(&mut s, "shadow-failed", "iris", 2, t0);
    assert_eq!(status_of(&s, "iris", 2).1.unwrap(), "shadow: shadow-failed went wrong");
    // None came: nothing to compare, it goes on on its self-test.
    let mut s = to_phase("shadow", t0);
    transitions(&mut s);
    s.handle_timeout(end);
    assert_eq!(phase_of(&s, "iris"), "probation");
    let t = transitions(&mut s);
    assert_eq!(
        t[0].2.as_deref(),
        Some("shadow ended at its 40 s limit after 0 of 3 requests; nothing to compare, went on on its self-test")
    );
}

#[test]
fn no_shadow_without_a_serving_version_to_compare_with() {
    let t0 = Instant::now();
    let mut s = Slots::new(ALL);
    s.set_desired(1, vec![m("iris", 1)], t0);
    to_probation(&mut s, "iris", 1, t0);
    assert_eq!(phase_of(&s, "iris"), "probation");
}

#[test]
fn a_probation_breach_rolls_back_to_the_committed_version() {
    let t0 = Instant::now();
    let cases = [
        (
            Health { requests: 20, errors: 3, p99_us: 1000, ..Health::default() },
            "probation: 3 of 20 requests failed (150‰, at most 100‰ allowed)",
        ),
        (
            Health { requests: 20, errors: 0, p99_us: 80_500, ..Health::default() },
            "probation: p99 latency 80.5 ms over 20 requests (at most 50 ms allowed)",
        ),
    ];
    for (health, why) in cases {
        let mut s = to_phase("probation", t0);
        let t = t0 + Duration::from_secs(3);
        s.handle(Event::Health { name: "iris".into(), version: 2, health }, t).unwrap();
        assert_eq!(drain(&mut s), [Action::Load(m("iris", 1)), Action::Persist]);
        assert_eq!(status_of(&s, "iris", 2), (ModelState::Failed, Some(format!("rolled back: {why}"))));
        // v2 answers until v1 is loaded again, then v1 does.
        assert_eq!(s.slot("iris").unwrap().served(), None);
        ok(&mut s, "loaded", "iris", 1, t);
        assert_eq!(drain(&mut s), [Action::Install(m("iris", 1))]);
        assert_eq!(s.slot("iris").unwrap().served(), Some(&m("iris", 1)));
        let p = s.persisted();
        assert_eq!(persisted_names(&p), [("iris".into(), Some(1), None, Some(2))]);
        assert_eq!(p.slots[0].stage, Stage::GaveUp { reason: why.into(), rolled_back: true });
    }
    // Below the minimum number of requests, errors do not count yet.
    let mut s = to_phase("probation", t0);
    let few = Health { requests: 4, errors: 4, p99_us: 0, ..Health::default() };
    s.handle(Event::Health { name: "iris".into(), version: 2, health: few }, t0).unwrap();
    assert_eq!(phase_of(&s, "iris"), "probation");
}

#[test]
fn a_first_version_that_breaks_probation_leaves_nothing_serving() {
    let t0 = Instant::now();
    let mut s = Slots::new(ALL);
    s.set_desired(1, vec![m("iris", 1)], t0);
    to_probation(&mut s, "iris", 1, t0);
    drain(&mut s);
    let bad = Health { requests: 10, errors: 10, p99_us: 0, ..Health::default() };
    s.handle(Event::Health { name: "iris".into(), version: 1, health: bad }, t0).unwrap();
    assert_eq!(drain(&mut s), [Action::Unload("iris".into()), Action::Persist]);
    assert_eq!(s.slot("iris").unwrap().served(), None);
}

#[test]
fn a_restart_while_the_candidate_runs_tries_it_again_and_gives_it_up_the_third_time() {
    let t0 = Instant::now();
    for phase in ["staged", "self-test", "shadow", "probation"] {
        let mut s = to_phase(phase, t0);
        let mut now = t0;
        for tries in 1..=MAX_TRIES {
            let p = s.persisted();
            assert_eq!(p.slots[0].stage, Stage::Trying { phase: phase.into() });
            assert_eq!(p.slots[0].interrupted, tries - 1, "{phase}: counted on disk");
            s = Slots::restore(ALL, p, now);
            // Only the committed version loads; the decision is written at once.
            assert_eq!(drain(&mut s), [Action::Load(m("iris", 1)), Action::Persist], "{phase}");
            let detail = status_of(&s, "iris", 2).1.unwrap();
            assert!(detail.starts_with(&format!("interrupted in {phase}: the agent stopped")), "{detail}");
            ok(&mut s, "loaded", "iris", 1, now);
            assert_eq!(drain(&mut s), [Action::Install(m("iris", 1))]);
            if tries == MAX_TRIES {
                assert_eq!(phase_of(&s, "iris"), "failed");
                assert!(
                    detail.ends_with(", 3 of 3 times; not tried again until the desired state changes"),
                    "{detail}"
                );
                assert_eq!(s.poll_timeout(), None, "{phase}: not tried a fourth time");
                let p = s.persisted();
                assert!(matches!(p.slots[0].stage, Stage::GaveUp { rolled_back: false, .. }), "{p:?}");
                let mut again = Slots::restore(ALL, p, now);
                assert_eq!(again.slot("iris").unwrap().candidate().unwrap().1.name(), "failed");
                assert!(transitions(&mut again).is_empty(), "a verdict restored is not recorded again");
                assert_eq!(drain(&mut again), [Action::Load(m("iris", 1))], "nor written again");
                break;
            }
            assert_eq!(phase_of(&s, "iris"), "retrying");
            assert!(detail.ends_with(&format!(", {tries} of 3 times (will retry)")), "{detail}");
            // After a pause that grows with each interruption.
            let at = now + backoff(tries);
            assert_eq!(s.poll_timeout(), Some(at), "{phase}");
            now = at;
            s.handle_timeout(now);
            assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 2))]);
            // A restart before its code runs again keeps the count.
            let p = s.persisted();
            assert_eq!((p.slots[0].stage.clone(), p.slots[0].interrupted), (Stage::Pending, tries));
            for kind in steps_to(phase) {
                ok(&mut s, kind, "iris", 2, now);
            }
            assert_eq!(phase_of(&s, "iris"), phase);
            drain(&mut s);
        }
    }
    // After a panic (panic=abort ends the process) it is given up at once.
    for phase in ["staged", "self-test", "shadow", "probation"] {
        let p = to_phase(phase, t0).persisted();
        let mut s = Slots::restore_after(ALL, p.clone(), t0, |_| Some("index out of bounds".into()));
        assert_eq!(drain(&mut s), [Action::Load(m("iris", 1)), Action::Persist], "{phase}");
        assert_eq!(phase_of(&s, "iris"), "failed");
        let detail = status_of(&s, "iris", 2).1.unwrap();
        assert_eq!(
            detail,
            format!(
                "crashed in {phase}: the agent panicked while it was running this version (index out of bounds); not tried again until the desired state changes"
            )
        );
        assert_eq!(s.poll_timeout(), None, "{phase}: not tried again");
        // A panic the daemon does not lay on the candidate is an interruption.
        let s = Slots::restore_after(ALL, p, t0, |_| None);
        assert_eq!(phase_of(&s, "iris"), "retrying", "{phase}");
    }
    // A panic on record does not touch an update whose code had not run.
    let mut s = Slots::restore_after(ALL, to_phase("fetching", t0).persisted(), t0, |_| Some("boom".into()));
    assert_eq!(drain(&mut s), [Action::Load(m("iris", 1)), Action::Fetch(m("iris", 2))]);
    // A new desired state naming another version starts the count again.
    let mut s = to_phase("self-test", t0);
    s = Slots::restore(ALL, s.persisted(), t0);
    s.set_desired(3, vec![m("iris", 3)], t0);
    assert_eq!(s.persisted().slots[0].interrupted, 0);
    // Before its code ran, an update resumes.
    for phase in ["fetching", "verifying", "retrying"] {
        let mut s = Slots::restore(ALL, to_phase(phase, t0).persisted(), t0);
        assert_eq!(drain(&mut s), [Action::Load(m("iris", 1)), Action::Fetch(m("iris", 2))], "{phase}");
    }
}

#[test]
fn a_new_desired_state_during_probation_brings_the_committed_version_back() {
    let t0 = Instant::now();
    // Back to the committed version: the candidate is abandoned.
    let mut s = to_phase("probation", t0);
    s.set_desired(3, vec![m("iris", 1)], t0);
    assert_eq!(drain(&mut s), [Action::Load(m("iris", 1)), Action::Persist]);
    assert!(s.slot("iris").unwrap().candidate().is_none());
    // On to another version: the committed one serves while it comes.
    let mut s = to_phase("probation", t0);
    s.set_desired(3, vec![m("iris", 3)], t0);
    assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 3)), Action::Load(m("iris", 1)), Action::Persist]);
    assert_eq!(s.handle(healthy("iris", 2), t0), Ok(false), "v2's health is stale now");
    // The model no longer desired at all: unloaded.
    let mut s = to_phase("probation", t0);
    s.set_desired(3, vec![], t0);
    assert_eq!(drain(&mut s), [Action::Unload("iris".into()), Action::Persist]);
    // With nothing committed, the version on probation is committed as it
    // stands and serves while the next one comes.
    let mut s = Slots::new(ALL);
    s.set_desired(1, vec![m("iris", 1)], t0);
    to_probation(&mut s, "iris", 1, t0);
    drain(&mut s);
    s.set_desired(2, vec![m("iris", 2)], t0);
    assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 2)), Action::Persist]);
    let slot = s.slot("iris").unwrap();
    assert_eq!((slot.active(), slot.served()), (Some(&m("iris", 1)), Some(&m("iris", 1))));
}

#[test]
fn a_new_policy_for_the_same_version_is_not_a_new_update() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)], t0);
    let mut again = m("iris", 1);
    again.update = Some(UpdatePolicy { probation_secs: 99, ..policy() });
    s.set_desired(2, vec![again], t0);
    assert_eq!(drain(&mut s), [Action::Persist], "only the generation changed");
    let mut s = to_phase("self-test", t0);
    let mut again = m("iris", 2);
    again.update = None;
    s.set_desired(3, vec![again], t0);
    assert_eq!(phase_of(&s, "iris"), "self-test");
}

#[test]
fn failures_before_the_candidate_runs_are_retried_with_backoff_until_the_download_deadline() {
    let t0 = Instant::now();
    let mut s = Slots::new(ALL);
    s.set_desired(1, vec![m("iris", 1)], t0);
    drain(&mut s);
    ok(&mut s, "fetch-failed", "iris", 1, t0);
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    assert_eq!(status_of(&s, "iris", 1), (ModelState::Failed, Some("fetch-failed went wrong (will retry)".into())));
    s.handle_timeout(t0 + Duration::from_secs(1));
    assert!(drain(&mut s).is_empty());
    s.handle_timeout(t0 + Duration::from_secs(2));
    assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 1))]);
    // A digest mismatch and a load failure are retried from the download too.
    let t1 = t0 + Duration::from_secs(2);
    ok(&mut s, "fetched", "iris", 1, t1);
    ok(&mut s, "verify-failed", "iris", 1, t1);
    assert_eq!(s.poll_timeout(), Some(t1 + Duration::from_secs(4)));
    let t2 = t1 + Duration::from_secs(4);
    s.handle_timeout(t2);
    for kind in ["fetched", "verified", "load-failed"] {
        ok(&mut s, kind, "iris", 1, t2);
    }
    assert_eq!(drain(&mut s).last(), Some(&Action::Persist), "no longer being tried: written");
    assert_eq!(s.persisted().slots[0].stage, Stage::Pending);
    // Backoff is capped; the download's deadline (100 s) ends it.
    while phase_of(&s, "iris") != "failed" {
        let t = s.poll_timeout().unwrap();
        assert!(t <= t0 + Duration::from_secs(100));
        s.handle_timeout(t);
        if phase_of(&s, "iris") == "fetching" {
            ok(&mut s, "fetch-failed", "iris", 1, t);
        }
    }
    assert!(status_of(&s, "iris", 1).1.unwrap().starts_with("retrying passed its deadline; last error: "));
}

#[test]
fn a_load_that_finishes_after_a_newer_one_is_never_installed() {
    let t0 = Instant::now();
    let mut s = Slots::new(ALL);
    s.set_desired(1, vec![m("iris", 1)], t0);
    ok(&mut s, "fetched", "iris", 1, t0);
    ok(&mut s, "verified", "iris", 1, t0);
    drain(&mut s); // Load(v1) is now running, slowly.
    s.set_desired(2, vec![m("iris", 2)], t0);
    to_probation(&mut s, "iris", 2, t0);
    assert!(drain(&mut s).contains(&Action::Install(m("iris", 2))));
    // v1's load completes last: stale, nothing to install.
    assert_eq!(s.handle(ev("loaded", "iris", 1), t0), Ok(false));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.slot("iris").unwrap().served(), Some(&m("iris", 2)));
}

#[test]
fn older_generations_are_ignored_even_after_a_restart() {
    let t0 = Instant::now();
    let mut s = Slots::new(ALL);
    s.set_desired(2, vec![m("iris", 2)], t0);
    drain(&mut s);
    s.set_desired(1, vec![m("iris", 1)], t0);
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.slot("iris").unwrap().candidate().unwrap().0.version, 2);
    let mut s = Slots::restore(ALL, s.persisted(), t0);
    drain(&mut s);
    s.set_desired(1, vec![], t0);
    assert!(drain(&mut s).is_empty(), "a replayed older state must not unload anything");
    assert_eq!(s.generation(), 2);
}

#[test]
fn the_same_state_again_touches_nothing() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)], t0);
    s.set_desired(2, vec![m("iris", 1)], t0);
    assert_eq!(drain(&mut s), [Action::Persist]);
    s.set_desired(2, vec![m("iris", 1)], t0);
    assert!(drain(&mut s).is_empty(), "every reconnect sends it again");
}

#[test]
fn undesired_model_is_unloaded() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1), m("cnn", 1)], t0);
    s.set_desired(2, vec![m("iris", 1)], t0);
    assert_eq!(drain(&mut s), [Action::Unload("cnn".into()), Action::Persist]);
    assert_eq!(persisted_names(&s.persisted()), [("iris".into(), Some(1), None, None)]);
}

#[test]
fn a_format_this_agent_cannot_run_is_refused_alone() {
    let t0 = Instant::now();
    let mut s = Slots::new(&[ModelFormat::Nnef, ModelFormat::Burn]);
    let mut nnef = m("cnn", 1);
    nnef.format = ModelFormat::Nnef;
    s.set_desired(1, vec![m("iris", 1), nnef.clone()], t0);
    assert_eq!(drain(&mut s), [Action::Fetch(nnef), Action::Persist]);
    let (state, detail) = status_of(&s, "iris", 1);
    assert_eq!(
        (state, detail.as_deref()),
        (ModelState::Failed, Some("iris:1 is onnx; this agent build runs nnef, burn"))
    );
    assert!(s.poll_timeout().unwrap() >= t0 + Duration::from_secs(100), "only cnn's deadline is timed");
    // Not persisted as a candidate: a restart does not try it again.
    assert_eq!(persisted_names(&s.persisted())[1], ("iris".into(), None, None, None));
}

#[test]
fn a_refused_state_is_reported_until_a_newer_one_applies() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)], t0);
    s.refuse(2, "manifest signature is invalid".into());
    assert_eq!(s.refusal().unwrap().generation, 2);
    assert!(s.slot("iris").unwrap().serving());
    s.set_desired(3, vec![m("iris", 1)], t0);
    assert!(s.refusal().is_none());
}

#[test]
fn restart_with_three_models_where_one_fails_to_load_keeps_all_three() {
    let t0 = Instant::now();
    let before = serving(&[m("a", 1), m("b", 1), m("c", 1)], t0).persisted();
    let mut s = Slots::restore(ALL, before.clone(), t0);
    assert_eq!(s.generation(), 1);
    assert_eq!(drain(&mut s), [Action::Load(m("a", 1)), Action::Load(m("b", 1)), Action::Load(m("c", 1))]);
    assert!(s.status().iter().all(|x| x.state == ModelState::Loading));
    ok(&mut s, "loaded", "a", 1, t0);
    ok(&mut s, "load-failed", "b", 1, t0);
    ok(&mut s, "loaded", "c", 1, t0);
    assert_eq!(
        drain(&mut s),
        [Action::Install(m("a", 1)), Action::Unload("b".into()), Action::Persist, Action::Install(m("c", 1))],
        "b is not installed"
    );
    // b stays, as a candidate to fetch again; nothing is dropped from disk.
    let after = s.persisted();
    assert_eq!(
        persisted_names(&after),
        [("a".into(), Some(1), None, None), ("b".into(), None, None, Some(1)), ("c".into(), Some(1), None, None)]
    );
    assert_eq!(status_of(&s, "b", 1), (ModelState::Failed, Some("load-failed went wrong (will retry)".into())));
    s.handle_timeout(t0 + MIN_BACKOFF);
    assert_eq!(drain(&mut s), [Action::Fetch(m("b", 1))]);
    // And a restart in the middle of that loses nothing either.
    let mut again = Slots::restore(ALL, after, t0);
    assert_eq!(drain(&mut again).len(), 3);
}

#[test]
fn after_a_restart_a_version_that_no_longer_loads_falls_back_on_the_previous_one() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)], t0);
    s.set_desired(2, vec![m("iris", 2)], t0);
    for kind in ["fetched", "verified", "loaded", "self-test-passed", "shadowed"] {
        ok(&mut s, kind, "iris", 2, t0);
    }
    s.handle(healthy("iris", 2), t0 + Duration::from_secs(10)).unwrap();
    let persisted = s.persisted();
    assert_eq!(persisted_names(&persisted), [("iris".into(), Some(2), Some(1), None)]);

    let mut s = Slots::restore(ALL, persisted, t0);
    assert_eq!(drain(&mut s), [Action::Load(m("iris", 2))]);
    ok(&mut s, "load-failed", "iris", 2, t0);
    assert_eq!(drain(&mut s), [Action::Load(m("iris", 1)), Action::Persist]);
    ok(&mut s, "loaded", "iris", 1, t0);
    assert_eq!(drain(&mut s), [Action::Install(m("iris", 1))]);
    assert_eq!(status_of(&s, "iris", 1).0, ModelState::Serving);
    assert_eq!(status_of(&s, "iris", 2).0, ModelState::Failed);
    // v2 is fetched again and goes through the stages like any update.
    s.handle_timeout(t0 + MIN_BACKOFF);
    assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 2))]);
    to_probation(&mut s, "iris", 2, t0);
    assert_eq!(phase_of(&s, "iris"), "shadow");
}

#[test]
fn referenced_files_are_every_artifact_and_golden_file_in_every_slot() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)], t0);
    for v in 2..=3 {
        s.set_desired(v as u64, vec![m("iris", v)], t0);
        for kind in ["fetched", "verified", "loaded", "self-test-passed", "shadowed"] {
            ok(&mut s, kind, "iris", v, t0);
        }
        s.handle(healthy("iris", v), t0 + Duration::from_secs(10)).unwrap();
    }
    s.set_desired(9, vec![m("iris", 4)], t0);
    let want: BTreeSet<_> =
        [3, 2, 4].iter().flat_map(|v| [m("iris", *v).sha256, m("iris", *v).selftest.unwrap().sha256]).collect();
    assert_eq!(s.referenced(), want, "active 3, previous 2, candidate 4; 1 is gone");
}

#[test]
fn a_restart_with_fewer_formats_loads_nothing_it_no_longer_runs() {
    let t0 = Instant::now();
    let mut nnef = m("iris", 2);
    nnef.format = ModelFormat::Nnef;
    let mut s = Slots::new(ALL);
    s.set_desired(1, vec![m("iris", 1)], t0);
    to_probation(&mut s, "iris", 1, t0);
    s.handle(healthy("iris", 1), t0 + Duration::from_secs(10)).unwrap();
    s.set_desired(2, vec![nnef.clone()], t0);
    for kind in ["fetched", "verified", "loaded", "self-test-passed", "shadowed"] {
        ok(&mut s, kind, "iris", 2, t0);
    }
    s.handle(healthy("iris", 2), t0 + Duration::from_secs(10)).unwrap();
    s.set_desired(3, vec![nnef.clone(), m("cnn", 1)], t0);
    to_probation(&mut s, "cnn", 1, t0);
    s.handle(healthy("cnn", 1), t0 + Duration::from_secs(10)).unwrap();
    let persisted = s.persisted();
    // Restarted taking NNEF only: iris:2 loads, its ONNX previous is dropped;
    // cnn (ONNX) is not loaded and says why.
    let mut s = Slots::restore(&[ModelFormat::Nnef], persisted, t0);
    assert_eq!(drain(&mut s), [Action::Load(nnef)]);
    assert!(s.slot("iris").unwrap().previous().is_none());
    let (state, detail) = status_of(&s, "cnn", 1);
    assert_eq!((state, detail.as_deref()), (ModelState::Failed, Some("cnn:1 is onnx; this agent build runs nnef")));
    assert!(s.referenced().contains(&m("iris", 2).sha256));
}

fn transitions(s: &mut Slots) -> Vec<(u32, String, Option<String>)> {
    std::iter::from_fn(|| s.poll_transition()).map(|t| (t.version, t.phase, t.reason)).collect()
}

#[test]
fn every_step_of_an_update_is_recorded_for_the_history() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)], t0);
    transitions(&mut s);
    s.set_desired(2, vec![m("iris", 2)], t0);
    ok(&mut s, "fetch-failed", "iris", 2, t0);
    s.handle_timeout(t0 + MIN_BACKOFF);
    for kind in ["fetched", "verified", "loaded", "self-test-passed", "shadowed"] {
        ok(&mut s, kind, "iris", 2, t0);
    }
    s.handle(healthy("iris", 2), t0 + Duration::from_secs(10)).unwrap();
    let phases: Vec<(u32, String, Option<String>)> = transitions(&mut s);
    let names: Vec<&str> = phases.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        ["fetching", "retrying", "fetching", "verifying", "staged", "self-test", "shadow", "probation", "committed"]
    );
    assert_eq!(phases[1].2.as_deref(), Some("fetch-failed went wrong"));
    // A rollback, and a candidate the desired state moves away from.
    let mut s = to_phase("probation", t0);
    transitions(&mut s);
    let bad = Health { requests: 10, errors: 10, p99_us: 0, ..Health::default() };
    s.handle(Event::Health { name: "iris".into(), version: 2, health: bad }, t0).unwrap();
    let t = transitions(&mut s);
    assert_eq!(
        (t[0].1.as_str(), t[0].2.as_deref()),
        ("rolled back", Some("probation: 10 of 10 requests failed (1000‰, at most 100‰ allowed)"))
    );
    let mut s = to_phase("self-test", t0);
    transitions(&mut s);
    s.set_desired(3, vec![m("iris", 3)], t0);
    let t = transitions(&mut s);
    assert_eq!(
        t,
        [(3, "fetching".into(), None), (2, "abandoned".into(), Some("the desired state names another version".into()))]
    );
    // A restart that finds a candidate being tried records why it gave up.
    let mut s = Slots::restore(ALL, to_phase("self-test", t0).persisted(), t0);
    let t = transitions(&mut s);
    assert_eq!(t.len(), 1);
    assert!(t[0].2.as_deref().unwrap().starts_with("interrupted in self-test"));
}

#[test]
fn a_committed_version_that_cannot_be_loaded_again_is_fetched_again_without_a_deadline() {
    let t0 = Instant::now();
    // v2 broke probation; v1, the committed version, fails to load again.
    let mut s = to_phase("rolled back", t0);
    assert_eq!(s.slot("iris").unwrap().served(), None);
    ok(&mut s, "load-failed", "iris", 1, t0);
    let (m1, phase) = s.slot("iris").unwrap().candidate().unwrap();
    assert_eq!((m1.version, phase.to_string()), (1, "retrying".to_string()), "v1 replaces the ended update");
    // It keeps trying, however long it takes.
    let mut t = t0;
    for _ in 0..2000 {
        t = s.poll_timeout().expect("a retry is always timed");
        s.handle_timeout(t);
        ok(&mut s, "fetch-failed", "iris", 1, t);
    }
    assert!(t > t0 + Duration::from_secs(5 * 24 * 3600), "days past the download deadline of 100 s");
    assert_eq!(phase_of(&s, "iris"), "retrying");
    let t = s.poll_timeout().unwrap();
    s.handle_timeout(t);
    for kind in ["fetched", "verified", "loaded", "self-test-passed"] {
        ok(&mut s, kind, "iris", 1, t);
    }
    assert_eq!(s.slot("iris").unwrap().served(), Some(&m("iris", 1)));
}

#[test]
fn a_commit_on_too_little_traffic_says_so() {
    let t0 = Instant::now();
    let mut s = to_phase("probation", t0);
    transitions(&mut s);
    let quiet = Health { requests: 2, errors: 0, p99_us: 0, ..Health::default() };
    s.handle(Event::Health { name: "iris".into(), version: 2, health: quiet }, t0 + Duration::from_secs(10)).unwrap();
    let t = transitions(&mut s);
    assert_eq!(t[0].1, "committed");
    assert_eq!(t[0].2.as_deref(), Some("on 2 requests, fewer than the 5 its error and p99 limits need"));
}

#[test]
fn policy_times_beyond_any_clock_do_not_overflow() {
    let t0 = Instant::now();
    let mut huge = m("iris", 1);
    huge.update = Some(UpdatePolicy {
        fetch_secs: u64::MAX,
        verify_secs: u64::MAX,
        load_secs: u64::MAX,
        selftest_secs: u64::MAX,
        probation_secs: u64::MAX,
        ..policy()
    });
    let mut s = Slots::new(ALL);
    s.set_desired(1, vec![huge], t0);
    to_probation(&mut s, "iris", 1, t0);
    assert_eq!(phase_of(&s, "iris"), "probation");
    assert!(s.poll_timeout().is_some());
}

#[test]
fn the_same_desired_state_does_not_start_again_an_update_that_ended_while_the_committed_version_comes_back() {
    let t0 = Instant::now();
    // v2 broke probation; v1 (committed) fails to load again.
    let mut s = to_phase("rolled back", t0);
    ok(&mut s, "load-failed", "iris", 1, t0);
    drain(&mut s);
    // Every reconnect replays the desired state, which still names v2.
    s.set_desired(2, vec![m("iris", 2)], t0);
    assert!(drain(&mut s).iter().all(|a| !matches!(a, Action::Fetch(m) if m.version == 2)), "v2 is not tried again");
    assert_eq!(s.slot("iris").unwrap().candidate().unwrap().0.version, 1, "v1 is still on its way back");
    assert!(status_of(&s, "iris", 2).1.unwrap().starts_with("rolled back: probation:"));
    // And after a restart too.
    let mut s = Slots::restore(ALL, s.persisted(), t0);
    drain(&mut s);
    s.set_desired(2, vec![m("iris", 2)], t0);
    assert!(drain(&mut s).iter().all(|a| !matches!(a, Action::Fetch(m) if m.version == 2)));
    // Another version assigned: that one goes ahead.
    s.set_desired(3, vec![m("iris", 3)], t0);
    assert!(drain(&mut s).contains(&Action::Fetch(m("iris", 3))));
}

#[test]
fn digest_and_load_failures_give_up_after_a_few_and_are_not_re_armed() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)], t0);
    s.set_desired(2, vec![m("iris", 2)], t0);
    let mut t = t0;
    for i in 0..MAX_BAD_ATTEMPTS {
        ok(&mut s, "fetched", "iris", 2, t);
        ok(&mut s, "verify-failed", "iris", 2, t);
        if i + 1 < MAX_BAD_ATTEMPTS {
            t = s.poll_timeout().unwrap();
            s.handle_timeout(t);
        }
    }
    assert_eq!(phase_of(&s, "iris"), "failed");
    assert!(status_of(&s, "iris", 2).1.unwrap().starts_with("gave up after 5 failed checks or loads; last: "));
    drain(&mut s);
    s.set_desired(3, vec![m("iris", 2)], t);
    assert!(!drain(&mut s).iter().any(|a| matches!(a, Action::Fetch(_))), "not re-armed");
}

#[test]
fn a_download_out_of_time_is_resumed_after_a_restart() {
    let t0 = Instant::now();
    let mut s = to_phase("fetching", t0);
    s.handle_timeout(t0 + Duration::from_secs(100));
    assert_eq!(phase_of(&s, "iris"), "failed");
    let p = s.persisted();
    assert_eq!(p.slots[0].stage, Stage::Pending);
    let mut s = Slots::restore(ALL, p, t0);
    assert!(drain(&mut s).contains(&Action::Fetch(m("iris", 2))));
}

#[test]
fn a_clean_stop_resumes_shadow_and_probation_but_not_a_load_or_self_test() {
    let t0 = Instant::now();
    for (phase, resumed) in [("staged", false), ("self-test", false), ("shadow", true), ("probation", true)] {
        let p = to_phase(phase, t0).persisted_for_stop();
        let want = if resumed { Stage::Pending } else { Stage::Trying { phase: phase.into() } };
        assert_eq!(p.slots[0].stage, want, "{phase}");
    }
}

#[test]
fn oversized_golden_vectors_refuse_a_new_version_but_not_the_committed_one() {
    let t0 = Instant::now();
    let big = |v| {
        let mut x = m("iris", v);
        x.selftest = Some(SelfTestRef {
            sha256: Sha256Digest::of(b"g"),
            size: tern_proto::MAX_GOLDEN_BYTES + 1,
            tolerance_ppm: 1,
        });
        x
    };
    let mut s = serving(&[m("iris", 1)], t0);
    s.set_desired(2, vec![big(2)], t0);
    assert!(status_of(&s, "iris", 2).1.unwrap().contains("bytes of golden vectors; this agent takes at most"));
    // Committed under an older agent with a larger file: still loaded.
    let mut s = Slots::new(ALL);
    s.set_desired(1, vec![m("iris", 1)], t0);
    to_probation(&mut s, "iris", 1, t0);
    s.handle(healthy("iris", 1), t0 + Duration::from_secs(10)).unwrap();
    let mut p = s.persisted();
    p.slots[0].active = Some(big(1));
    let mut s = Slots::restore(ALL, p, t0);
    assert_eq!(drain(&mut s), [Action::Load(big(1))]);
}

/// iris:1 serving, iris:2 with `window` tested and about to activate.
fn tested_with_window(window: MaintenanceWindow, t0: Instant, local: Option<LocalTime>) -> Slots {
    let mut s = serving(&[m("iris", 1)], t0);
    if let Some(local) = local {
        s.set_local_time(t0, local);
    }
    let v2 = ModelManifest {
        update: Some(UpdatePolicy { window: Some(window), shadow_requests: 0, ..policy() }),
        alternative: None,
        baseline: None,
        capture: None,
        ..m("iris", 2)
    };
    s.set_desired(2, vec![v2], t0);
    for kind in ["fetched", "verified", "loaded"] {
        ok(&mut s, kind, "iris", 2, t0);
    }
    drain(&mut s);
    ok(&mut s, "self-test-passed", "iris", 2, t0);
    s
}

#[test]
fn outside_the_maintenance_window_a_tested_version_waits_loaded_and_activates_when_it_opens() {
    let t0 = Instant::now();
    // 02:00 to 04:00 on weekdays; it is Saturday 01:30.
    let window = MaintenanceWindow { from_minute: 120, to_minute: 240, days: 0b1_1111 };
    let mut s = tested_with_window(window, t0, Some(LocalTime { weekday: 5, minute: 90 }));
    assert_eq!(phase_of(&s, "iris"), "ready");
    let actions = drain(&mut s);
    assert_eq!(actions, [Action::Persist], "downloaded and tested, not installed");
    assert_eq!(s.slot("iris").unwrap().served().map(|m| m.version), Some(1));
    assert_eq!(s.holding(), [("iris".to_string(), 2)].into(), "kept loaded while it waits");
    assert_eq!(status_of(&s, "iris", 2).1.as_deref(), Some("ready: outside the maintenance window (opens Mon 02:00)"),);
    // Persisted as pending: a restart takes it through its checks again
    // rather than giving it up, since waiting runs none of its code.
    assert_eq!(s.persisted().slots[0].stage, Stage::Pending);
    // It looks again every minute, counting the local time on.
    assert_eq!(s.poll_timeout(), Some(t0 + READY_EVERY));
    let monday = t0 + Duration::from_secs((48 * 60 + 29) * 60);
    s.handle_timeout(monday);
    assert_eq!(phase_of(&s, "iris"), "ready", "Monday 01:59");
    // The daemon reads the local time again: a clock step is taken as read.
    s.set_local_time(monday, LocalTime { weekday: 0, minute: 120 });
    assert_eq!(s.poll_timeout(), Some(monday + READY_EVERY));
    s.handle_timeout(monday + READY_EVERY);
    assert_eq!(phase_of(&s, "iris"), "probation");
    let v2 = s.slot("iris").unwrap().served().unwrap().clone();
    assert_eq!(drain(&mut s), [Action::Persist, Action::Install(v2)]);
    let t = transitions(&mut s);
    assert!(t.iter().any(|(v, p, r)| (*v, p.as_str()) == (2, "ready") && r.as_deref().unwrap().starts_with("outside")));
}

#[test]
fn inside_the_window_or_without_one_a_tested_version_activates_at_once() {
    let t0 = Instant::now();
    let window = MaintenanceWindow { from_minute: 23 * 60, to_minute: 60, days: 1 };
    // Tuesday 00:30 is in Monday's window, which runs past midnight.
    let s = tested_with_window(window, t0, Some(LocalTime { weekday: 1, minute: 30 }));
    assert_eq!(phase_of(&s, "iris"), "probation");
    let s = tested_with_window(window, t0, None);
    assert_eq!(
        status_of(&s, "iris", 2).1.as_deref(),
        Some("ready: outside the maintenance window (the device's local time is unknown)")
    );
}

#[test]
fn a_defer_lease_holds_activation_until_released_or_its_maximum() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)], t0);
    assert_eq!(s.defer("nope", 10, t0), Err(DeferError::NoSuchModel("nope".into())));
    // Asked for an hour, granted the policy's 50 s.
    assert_eq!(s.defer("iris", 3600, t0), Ok(50));
    s.set_desired(2, vec![m("iris", 2)], t0);
    to_phase_steps(&mut s, t0);
    assert_eq!(phase_of(&s, "iris"), "ready");
    assert_eq!(status_of(&s, "iris", 2).1.as_deref(), Some("ready: deferred by an app on the device"));
    drain(&mut s);
    // Released: it activates at once.
    assert_eq!(s.release("iris", t0 + Duration::from_secs(5)), Ok(true));
    assert_eq!(phase_of(&s, "iris"), "probation");
    assert_eq!(s.release("iris", t0 + Duration::from_secs(5)), Ok(false), "nothing held any more");
    assert_eq!(s.release("nope", t0), Err(DeferError::NoSuchModel("nope".into())));

    // Renewed for ever, it still activates max_defer_secs after it was ready.
    let mut s = serving(&[m("iris", 1)], t0);
    s.set_desired(2, vec![m("iris", 2)], t0);
    let ready_at = t0 + Duration::from_secs(7);
    to_phase_steps(&mut s, ready_at);
    assert_eq!(phase_of(&s, "iris"), "probation", "no lease yet");
    let mut s = serving(&[m("iris", 1)], t0);
    s.set_desired(2, vec![m("iris", 2)], t0);
    s.defer("iris", 50, t0).unwrap();
    to_phase_steps(&mut s, ready_at);
    let mut now = ready_at;
    while phase_of(&s, "iris") == "ready" {
        assert!(now < ready_at + Duration::from_secs(50), "held past the maximum");
        s.defer("iris", 50, now).unwrap();
        now = s.poll_timeout().unwrap().max(now + Duration::from_secs(1));
        s.handle_timeout(now);
    }
    assert_eq!(now, ready_at + Duration::from_secs(50));
    assert_eq!(phase_of(&s, "iris"), "probation");

    // A policy that allows no deferral refuses the lease.
    let strict = ModelManifest { update: Some(UpdatePolicy { max_defer_secs: 0, ..policy() }), ..m("iris", 1) };
    let mut s = serving(&[strict], t0);
    assert_eq!(s.defer("iris", 10, t0), Err(DeferError::NotAllowed("iris".into())));
}

fn to_phase_steps(s: &mut Slots, now: Instant) {
    for kind in ["fetched", "verified", "loaded", "self-test-passed", "shadowed"] {
        ok(s, kind, "iris", 2, now);
    }
}

#[test]
fn a_version_waiting_to_activate_is_taken_through_its_checks_again_after_a_restart() {
    let t0 = Instant::now();
    let s = to_phase("ready", t0);
    let mut r = Slots::restore(ALL, s.persisted(), t0);
    assert_eq!(phase_of(&r, "iris"), "fetching");
    assert!(drain(&mut r).contains(&Action::Fetch(m("iris", 2))));
}

#[test]
fn an_app_health_hook_that_fails_rolls_back_and_one_not_yet_answered_holds_the_commit() {
    let t0 = Instant::now();
    let health = |hook| Event::Health {
        name: "iris".into(),
        version: 2,
        health: Health { requests: 100, errors: 0, p99_us: 1000, hook },
    };
    let end = t0 + Duration::from_secs(10);
    // Not answered by the end of the window: it waits for the answer.
    let mut s = to_phase("probation", t0);
    s.handle(health(HookVerdict::Pending), end).unwrap();
    assert_eq!(phase_of(&s, "iris"), "probation");
    s.handle(health(HookVerdict::Passed), end + Duration::from_secs(1)).unwrap();
    assert_eq!(s.slot("iris").unwrap().active().map(|m| m.version), Some(2), "committed once it said healthy");
    // Failed: rolled back, whatever the traffic, with the hook's reason.
    let mut s = to_phase("probation", t0);
    let few = Health { requests: 0, errors: 0, p99_us: 0, hook: HookVerdict::Failed("HTTP 503".into()) };
    s.handle(Event::Health { name: "iris".into(), version: 2, health: few }, t0).unwrap();
    assert_eq!(phase_of(&s, "iris"), "rolled back");
    assert_eq!(
        status_of(&s, "iris", 2).1.as_deref(),
        Some("rolled back: probation: the app's health hook failed: HTTP 503")
    );
    assert_eq!(drain(&mut s), [Action::Load(m("iris", 1)), Action::Persist]);
    // Never answered: the probation deadline rolls it back.
    let mut s = to_phase("probation", t0);
    s.handle(health(HookVerdict::Pending), end).unwrap();
    s.handle_timeout(end + HEALTH_GRACE);
    assert_eq!(phase_of(&s, "iris"), "rolled back");
}

#[test]
fn the_defer_allowance_counts_from_when_a_lease_first_holds_the_version() {
    // Ready at t0 outside its window; the window opens an hour later, and
    // only then does an app take a lease: it gets its full 50 s.
    let t0 = Instant::now();
    let window = MaintenanceWindow { from_minute: 61, to_minute: 180, days: 0x7f };
    let mut s = tested_with_window(window, t0, Some(LocalTime { weekday: 0, minute: 1 }));
    assert_eq!(status_of(&s, "iris", 2).1.as_deref(), Some("ready: outside the maintenance window (opens Mon 01:01)"));
    let open = t0 + Duration::from_secs(3600);
    assert_eq!(s.defer("iris", 3600, open), Ok(50));
    s.handle_timeout(open);
    assert_eq!(status_of(&s, "iris", 2).1.as_deref(), Some("ready: deferred by an app on the device"));
    s.handle_timeout(open + Duration::from_secs(49));
    assert_eq!(phase_of(&s, "iris"), "ready");
    assert_eq!(s.defer("iris", 3600, open + Duration::from_secs(40)), Ok(10), "what is left of the allowance");
    // Held for all it may be, a new lease is refused rather than granted and ignored.
    let end = open + Duration::from_secs(50);
    assert_eq!(s.defer("iris", 5, end), Err(DeferError::Exhausted { name: "iris".into(), max: 50 }));
    s.handle_timeout(end);
    assert_eq!(phase_of(&s, "iris"), "probation");
}

#[test]
fn with_nothing_serving_a_tested_version_activates_whatever_the_window() {
    // A first install: nothing to disrupt.
    let t0 = Instant::now();
    let closed = MaintenanceWindow { from_minute: 0, to_minute: 1, days: 1 };
    let v1 = ModelManifest { update: Some(UpdatePolicy { window: Some(closed), ..policy() }), ..m("iris", 1) };
    let mut s = Slots::new(ALL);
    s.set_local_time(t0, LocalTime { weekday: 3, minute: 600 });
    s.set_desired(1, vec![v1], t0);
    to_probation(&mut s, "iris", 1, t0);
    assert_eq!(phase_of(&s, "iris"), "probation");
}
