use super::*;
use tern_proto::{ModelFormat, Sha256Digest};

const ALL: &[ModelFormat] = &[ModelFormat::Onnx, ModelFormat::Nnef, ModelFormat::Burn];

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
    }
}

fn drain(s: &mut Slots) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

fn fetched(name: &str, version: u32) -> Event {
    Event::Fetched { name: name.into(), version }
}

fn fetch_failed(name: &str, version: u32) -> Event {
    Event::FetchFailed { name: name.into(), version, reason: "connection lost".into() }
}

fn loaded(name: &str, version: u32) -> Event {
    Event::Loaded { name: name.into(), version }
}

fn load_failed(name: &str, version: u32) -> Event {
    Event::LoadFailed { name: name.into(), version, reason: "bad".into() }
}

/// Slots serving `models`, with the actions that got them there drained.
fn serving(models: &[ModelManifest]) -> Slots {
    let t0 = Instant::now();
    let mut s = Slots::new(ALL);
    s.set_desired(1, models.to_vec());
    for x in models {
        s.handle(fetched(&x.name, x.version), t0).unwrap();
        s.handle(loaded(&x.name, x.version), t0).unwrap();
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

#[test]
fn desired_model_is_fetched_loaded_installed_and_served() {
    let t0 = Instant::now();
    let mut s = Slots::new(ALL);
    s.set_desired(1, vec![m("iris", 1)]);
    assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 1)), Action::Persist]);
    assert_eq!(s.status()[0].state, ModelState::Downloading);
    assert!(s.handle(fetched("iris", 1), t0).unwrap());
    assert_eq!(drain(&mut s), [Action::Load(m("iris", 1))]);
    assert!(s.handle(loaded("iris", 1), t0).unwrap());
    assert_eq!(drain(&mut s), [Action::Install(m("iris", 1)), Action::Persist]);
    assert!(s.slot("iris").unwrap().serving());
    assert_eq!(s.status()[0].state, ModelState::Serving);
    // The same desired state again changes nothing but the generation.
    s.set_desired(2, vec![m("iris", 1)]);
    assert_eq!(drain(&mut s), [Action::Persist]);
    assert_eq!(s.generation(), 2);
    // And the same generation again nothing at all (every reconnect).
    s.set_desired(2, vec![m("iris", 1)]);
    assert!(drain(&mut s).is_empty());
}

#[test]
fn upgrade_keeps_old_version_serving_until_new_one_loads() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)]);
    s.set_desired(5, vec![m("iris", 2)]);
    assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 2)), Action::Persist]);
    s.handle(fetched("iris", 2), t0).unwrap();
    s.handle(load_failed("iris", 2), t0).unwrap();
    assert_eq!(drain(&mut s), [Action::Load(m("iris", 2))], "no install of a failed load");
    assert_eq!(s.slot("iris").unwrap().active(), Some(&m("iris", 1)));
    let st = s.status();
    assert_eq!((st[0].version, st[0].state), (1, ModelState::Serving));
    assert_eq!((st[1].version, st[1].state, st[1].detail.as_deref()), (2, ModelState::Failed, Some("bad")));
    // Retried later, it loads and the old version becomes the previous one.
    s.handle_timeout(t0 + MIN_BACKOFF);
    s.handle(fetched("iris", 2), t0).unwrap();
    s.handle(loaded("iris", 2), t0).unwrap();
    let slot = s.slot("iris").unwrap();
    assert_eq!((slot.active(), slot.previous()), (Some(&m("iris", 2)), Some(&m("iris", 1))));
}

#[test]
fn a_load_that_finishes_after_a_newer_one_is_never_installed() {
    let t0 = Instant::now();
    let mut s = Slots::new(ALL);
    s.set_desired(1, vec![m("iris", 1)]);
    s.handle(fetched("iris", 1), t0).unwrap();
    drain(&mut s); // Load(v1) is now running, slowly.
    s.set_desired(2, vec![m("iris", 2)]);
    s.handle(fetched("iris", 2), t0).unwrap();
    s.handle(loaded("iris", 2), t0).unwrap();
    assert!(drain(&mut s).contains(&Action::Install(m("iris", 2))));
    // v1's load completes last: stale, nothing to install.
    assert!(!s.handle(loaded("iris", 1), t0).unwrap());
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.slot("iris").unwrap().active(), Some(&m("iris", 2)));
}

#[test]
fn failures_back_off_in_virtual_time() {
    let t0 = Instant::now();
    let mut s = Slots::new(ALL);
    s.set_desired(1, vec![m("iris", 1)]);
    drain(&mut s);
    s.handle(fetch_failed("iris", 1), t0).unwrap();
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    s.handle_timeout(t0 + Duration::from_secs(1));
    assert!(drain(&mut s).is_empty());
    s.handle_timeout(t0 + Duration::from_secs(2));
    assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 1))]);
    let t1 = t0 + Duration::from_secs(2);
    s.handle(fetch_failed("iris", 1), t1).unwrap();
    assert_eq!(s.poll_timeout(), Some(t1 + Duration::from_secs(4)));
    for _ in 0..20 {
        let t = s.poll_timeout().unwrap();
        s.handle_timeout(t);
        drain(&mut s);
        s.handle(fetch_failed("iris", 1), t).unwrap();
        assert!(s.poll_timeout().unwrap() - t <= MAX_BACKOFF);
    }
}

#[test]
fn every_event_in_every_candidate_phase() {
    // (phase reached by these steps, event, allowed?)
    let t0 = Instant::now();
    let to_phase = |phase: &str| {
        let mut s = Slots::new(ALL);
        s.set_desired(1, vec![m("iris", 1)]);
        match phase {
            "fetching" => {}
            "loading" => {
                s.handle(fetched("iris", 1), t0).unwrap();
            }
            "failed" => {
                s.handle(fetch_failed("iris", 1), t0).unwrap();
            }
            _ => unreachable!(),
        }
        drain(&mut s);
        s
    };
    let table: &[(&str, Event, Result<(), &str>)] = &[
        ("fetching", fetched("iris", 1), Ok(())),
        ("fetching", fetch_failed("iris", 1), Ok(())),
        ("fetching", loaded("iris", 1), Err("fetching")),
        ("fetching", load_failed("iris", 1), Err("fetching")),
        ("loading", fetched("iris", 1), Err("loading")),
        ("loading", fetch_failed("iris", 1), Err("loading")),
        ("loading", loaded("iris", 1), Ok(())),
        ("loading", load_failed("iris", 1), Ok(())),
        ("failed", fetched("iris", 1), Err("failed")),
        ("failed", fetch_failed("iris", 1), Err("failed")),
        ("failed", loaded("iris", 1), Err("failed")),
        ("failed", load_failed("iris", 1), Err("failed")),
    ];
    for (phase, event, want) in table {
        let mut s = to_phase(phase);
        let got = s.handle(event.clone(), t0);
        match want {
            Ok(()) => assert_eq!(got, Ok(true), "{event:?} while {phase}"),
            Err(state) => {
                let e = got.unwrap_err();
                assert_eq!(e.state, *state, "{event:?} while {phase}");
                assert!(e.to_string().ends_with(&format!("is not allowed while {state}")), "{e}");
            }
        }
    }
    // Refused: a format this agent does not run; every event is disallowed.
    for event in [fetched("iris", 1), fetch_failed("iris", 1), loaded("iris", 1), load_failed("iris", 1)] {
        let mut s = Slots::new(&[ModelFormat::Nnef]);
        s.set_desired(1, vec![m("iris", 1)]);
        assert_eq!(s.handle(event, t0).unwrap_err().state, "refused");
    }
    // The serving version: no event is expected for it.
    for event in [fetched("iris", 1), fetch_failed("iris", 1), loaded("iris", 1), load_failed("iris", 1)] {
        let mut s = serving(&[m("iris", 1)]);
        assert_eq!(s.handle(event, t0).unwrap_err().state, "serving");
    }
    // Events for versions or names nobody waits for are stale, not errors.
    let mut s = to_phase("loading");
    assert_eq!(s.handle(loaded("iris", 7), t0), Ok(false));
    assert_eq!(s.handle(fetched("other", 1), t0), Ok(false));
}

#[test]
fn older_generations_are_ignored_even_after_a_restart() {
    let mut s = Slots::new(ALL);
    s.set_desired(2, vec![m("iris", 2)]);
    drain(&mut s);
    s.set_desired(1, vec![m("iris", 1)]);
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.slot("iris").unwrap().candidate().unwrap().0.version, 2);
    let mut s = Slots::restore(ALL, s.persisted());
    drain(&mut s);
    s.set_desired(1, vec![]);
    assert!(drain(&mut s).is_empty(), "a replayed older state must not unload anything");
    assert_eq!(s.generation(), 2);
}

#[test]
fn undesired_model_is_unloaded() {
    let mut s = serving(&[m("iris", 1), m("cnn", 1)]);
    s.set_desired(2, vec![m("iris", 1)]);
    assert_eq!(drain(&mut s), [Action::Unload("cnn".into()), Action::Persist]);
    assert_eq!(persisted_names(&s.persisted()), [("iris".into(), Some(1), None, None)]);
}

#[test]
fn a_format_this_agent_cannot_run_is_refused_alone() {
    let mut s = Slots::new(&[ModelFormat::Nnef, ModelFormat::Burn]);
    let mut nnef = m("cnn", 1);
    nnef.format = ModelFormat::Nnef;
    s.set_desired(1, vec![m("iris", 1), nnef.clone()]);
    assert_eq!(drain(&mut s), [Action::Fetch(nnef), Action::Persist]);
    let iris = s.status().into_iter().find(|x| x.name == "iris").unwrap();
    assert_eq!(iris.state, ModelState::Failed);
    assert_eq!(iris.detail.as_deref(), Some("iris:1 is onnx; this agent build runs nnef, burn"));
    assert!(s.poll_timeout().is_none(), "a refusal is not retried");
    // Not persisted as a candidate: a restart does not try it again.
    assert_eq!(persisted_names(&s.persisted())[1], ("iris".into(), None, None, None));
}

#[test]
fn a_refused_state_is_reported_until_a_newer_one_applies() {
    let mut s = serving(&[m("iris", 1)]);
    s.refuse(2, "manifest signature is invalid".into());
    assert_eq!(s.refusal().unwrap().generation, 2);
    assert!(s.slot("iris").unwrap().serving());
    s.set_desired(3, vec![m("iris", 1)]);
    assert!(s.refusal().is_none());
}

#[test]
fn restart_with_three_models_where_one_fails_to_load_keeps_all_three() {
    let t0 = Instant::now();
    let before = serving(&[m("a", 1), m("b", 1), m("c", 1)]).persisted();
    let mut s = Slots::restore(ALL, before.clone());
    assert_eq!(s.generation(), 1);
    assert_eq!(drain(&mut s), [Action::Load(m("a", 1)), Action::Load(m("b", 1)), Action::Load(m("c", 1))]);
    assert!(s.status().iter().all(|x| x.state == ModelState::Loading));
    s.handle(loaded("a", 1), t0).unwrap();
    s.handle(load_failed("b", 1), t0).unwrap();
    s.handle(loaded("c", 1), t0).unwrap();
    assert_eq!(
        drain(&mut s),
        [Action::Install(m("a", 1)), Action::Persist, Action::Install(m("c", 1))],
        "b is not installed"
    );
    // b stays, as a candidate to fetch again; nothing is dropped from disk.
    let after = s.persisted();
    assert_eq!(
        persisted_names(&after),
        [("a".into(), Some(1), None, None), ("b".into(), None, None, Some(1)), ("c".into(), Some(1), None, None)]
    );
    let b = s.status().into_iter().find(|x| x.name == "b").unwrap();
    assert_eq!((b.state, b.detail.as_deref()), (ModelState::Failed, Some("bad")));
    s.handle_timeout(t0 + MIN_BACKOFF);
    assert_eq!(drain(&mut s), [Action::Fetch(m("b", 1))]);
    // And a restart in the middle of that loses nothing either.
    let mut again = Slots::restore(ALL, after);
    assert_eq!(drain(&mut again).len(), 3);
}

#[test]
fn after_a_restart_a_version_that_no_longer_loads_falls_back_on_the_previous_one() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)]);
    s.set_desired(2, vec![m("iris", 2)]);
    s.handle(fetched("iris", 2), t0).unwrap();
    s.handle(loaded("iris", 2), t0).unwrap();
    let persisted = s.persisted();
    assert_eq!(persisted_names(&persisted), [("iris".into(), Some(2), Some(1), None)]);

    let mut s = Slots::restore(ALL, persisted);
    assert_eq!(drain(&mut s), [Action::Load(m("iris", 2))]);
    s.handle(load_failed("iris", 2), t0).unwrap();
    assert_eq!(drain(&mut s), [Action::Load(m("iris", 1)), Action::Persist]);
    s.handle(loaded("iris", 1), t0).unwrap();
    assert_eq!(drain(&mut s), [Action::Install(m("iris", 1))]);
    let st = s.status();
    assert_eq!((st[0].version, st[0].state), (1, ModelState::Serving));
    assert_eq!((st[1].version, st[1].state), (2, ModelState::Failed));
    // v2 is fetched again, and once it loads it serves with v1 behind it.
    s.handle_timeout(t0 + MIN_BACKOFF);
    s.handle(fetched("iris", 2), t0).unwrap();
    s.handle(loaded("iris", 2), t0).unwrap();
    let slot = s.slot("iris").unwrap();
    assert_eq!((slot.active(), slot.previous()), (Some(&m("iris", 2)), Some(&m("iris", 1))));
}

#[test]
fn a_download_in_progress_resumes_after_a_restart() {
    let mut s = serving(&[m("iris", 1)]);
    s.set_desired(2, vec![m("iris", 2)]);
    drain(&mut s);
    let mut s = Slots::restore(ALL, s.persisted());
    assert_eq!(drain(&mut s), [Action::Load(m("iris", 1)), Action::Fetch(m("iris", 2))]);
    assert_eq!(s.referenced().len(), 2);
}

#[test]
fn referenced_artifacts_are_every_manifest_in_every_slot() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)]);
    for v in 2..=3 {
        s.set_desired(v as u64, vec![m("iris", v)]);
        s.handle(fetched("iris", v), t0).unwrap();
        s.handle(loaded("iris", v), t0).unwrap();
    }
    s.set_desired(9, vec![m("iris", 4)]);
    let want: BTreeSet<_> = [3, 2, 4].iter().map(|v| m("iris", *v).sha256).collect();
    assert_eq!(s.referenced(), want, "active 3, previous 2, candidate 4; 1 is gone");
}

#[test]
fn a_restart_with_fewer_formats_loads_nothing_it_no_longer_runs() {
    let t0 = Instant::now();
    let mut s = serving(&[m("iris", 1)]);
    let mut nnef = m("iris", 2);
    nnef.format = ModelFormat::Nnef;
    s.set_desired(2, vec![nnef.clone()]);
    s.handle(fetched("iris", 2), t0).unwrap();
    s.handle(loaded("iris", 2), t0).unwrap();
    s.set_desired(3, vec![nnef.clone(), m("cnn", 1)]);
    s.handle(fetched("cnn", 1), t0).unwrap();
    s.handle(loaded("cnn", 1), t0).unwrap();
    let persisted = s.persisted();
    // Restarted taking NNEF only: iris:2 loads, its ONNX previous is dropped;
    // cnn (ONNX) is not loaded and says why.
    let mut s = Slots::restore(&[ModelFormat::Nnef], persisted);
    assert_eq!(drain(&mut s), [Action::Load(nnef)]);
    assert!(s.slot("iris").unwrap().previous().is_none());
    let c = s.status().into_iter().find(|x| x.name == "cnn").unwrap();
    assert_eq!((c.state, c.detail.as_deref()), (ModelState::Failed, Some("cnn:1 is onnx; this agent build runs nnef")));
    assert!(s.referenced().contains(&m("iris", 2).sha256));
}
