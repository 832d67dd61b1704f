use crate::monitor::*;
use tern_drift::{Collector, ModelBaseline, Plan, Source};
use tern_proto::{DType, Tensor, TensorData, TensorSpec};

fn signature() -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    let spec = |name: &str, dtype, shape: Vec<Option<u64>>| TensorSpec { name: name.into(), dtype, shape };
    (vec![spec("x", DType::F32, vec![None, Some(2)])], vec![spec("p", DType::F32, vec![None, Some(2)])])
}

/// `rows` rows: column `a` over [shift, 1 + shift), `b` over [0, 1); the
/// answer is class 1 with confidence `conf`.
fn request(rows: usize, start: usize, shift: f32, conf: f32) -> (Vec<Tensor>, Vec<Tensor>) {
    let mut x = Vec::new();
    let mut p = Vec::new();
    for r in start..start + rows {
        x.extend([((r * 37) % 100) as f32 / 100.0 + shift, ((r * 53) % 100) as f32 / 100.0]);
        p.extend([1.0 - conf, conf]);
    }
    (
        vec![Tensor::new(vec![rows, 2], TensorData::F32(x)).unwrap()],
        vec![Tensor::new(vec![rows, 2], TensorData::F32(p)).unwrap()],
    )
}

fn baseline() -> ModelBaseline {
    let (inputs, outputs) = signature();
    let col = |c| Source::InputColumn { input: "x".into(), column: c };
    let plan = vec![
        ("a".into(), col(0), Plan::Numeric { bins: 10 }),
        ("b".into(), col(1), Plan::Numeric { bins: 10 }),
        ("output:p".into(), Source::OutputScores { output: "p".into() }, Plan::Classes),
    ];
    let mut c = Collector::new(plan, &inputs, &outputs).unwrap();
    let (i, o) = request(2000, 0, 0.0, 0.9);
    c.push(&i, Some(&o)).unwrap();
    c.finish().unwrap().without_sketches()
}

fn monitor(config: MonitorConfig) -> Monitor {
    let (inputs, outputs) = signature();
    Monitor::new(baseline(), &inputs, &outputs, config, 7, 0).unwrap()
}

fn feed(m: &mut Monitor, rows: usize, start: usize, shift: f32, conf: f32) {
    let (i, o) = request(rows, start, shift, conf);
    m.observe_inputs(&i);
    m.observe_outputs(&o, 1000);
}

fn config(rows: u64) -> MonitorConfig {
    MonitorConfig { window_rows: rows, window_ms: 60_000, rules: Rules::default() }
}

#[test]
fn a_window_closes_by_rows_or_by_age() {
    let mut m = monitor(config(100));
    feed(&mut m, 60, 0, 0.0, 0.9);
    assert!(m.poll(1).is_none());
    feed(&mut m, 60, 60, 0.0, 0.9);
    let w = m.poll(2).expect("120 rows close a window of 100");
    assert_eq!((w.seq, w.rows, w.requests, w.opened_ms, w.closed_ms), (0, 120, 2, 0, 2));
    assert_eq!(m.rows(), 0);
    feed(&mut m, 10, 0, 0.0, 0.9);
    assert!(m.poll(60_001).is_none(), "60 s after it opened at 2 ms");
    let w = m.poll(60_002).expect("a minute old");
    assert_eq!((w.seq, w.rows, w.opened_ms), (1, 10, 2));
    // An empty window closes too (a heartbeat), and changes no alert.
    let w = m.poll(120_002).unwrap();
    assert_eq!(w.rows, 0);
    assert!(w.changes.is_empty());
}

#[test]
fn a_shifted_feature_raises_its_alert_alone_and_it_clears_after_two_quiet_windows() {
    let mut m = monitor(config(400));
    let mut now = 0;
    let mut window = |m: &mut Monitor, shift: f32, start: usize| {
        feed(m, 400, start, shift, 0.9);
        now += 1;
        m.poll(now).unwrap()
    };
    let w = window(&mut m, 0.0, 5);
    assert!(w.changes.is_empty(), "{:?}", w.changes);
    let w = window(&mut m, 0.6, 11);
    let raised: Vec<_> = w.changes.iter().map(|c| (c.key.rule, c.key.feature.as_str(), c.change)).collect();
    assert_eq!(raised, vec![(Rule::FeatureDrift, "a", Change::Raised)]);
    assert_eq!(m.firing().count(), 1);
    // Still shifted: no new event. Back to normal: clears on the second window.
    assert!(window(&mut m, 0.6, 17).changes.is_empty());
    assert!(window(&mut m, 0.0, 23).changes.is_empty());
    let w = window(&mut m, 0.0, 29);
    assert_eq!(w.changes.len(), 1);
    assert_eq!((w.changes[0].key.feature.as_str(), w.changes[0].change), ("a", Change::Cleared));
    assert_eq!(m.firing().count(), 0);
}

#[test]
fn low_confidence_errors_and_latency_raise_their_alerts() {
    let mut c = config(100);
    c.rules.p99_ms = Some(50.0);
    c.rules.confidence = 0.7;
    let mut m = monitor(c);
    let (i, o) = request(100, 0, 0.0, 0.9);
    m.observe_inputs(&i);
    m.observe_outputs(&o, 80_000);
    m.observe_error(10);
    let w = m.poll(1).unwrap();
    let mut raised: Vec<_> = w.changes.iter().map(|c| c.key.rule).collect();
    raised.sort();
    // As confident as the baseline; slow and failing.
    assert_eq!(raised, vec![Rule::P99Latency, Rule::ErrorRate]);
    assert_eq!(w.p99_us, Some(80_000));
    let (i, o) = request(100, 0, 0.0, 0.6);
    m.observe_inputs(&i);
    m.observe_outputs(&o, 1000);
    let w = m.poll(2).unwrap();
    let changed: Vec<_> = w.changes.iter().map(|c| (c.key.rule, c.change)).collect();
    assert!(changed.contains(&(Rule::LowConfidence, Change::Raised)), "{changed:?}");
    assert!(!changed.iter().any(|(r, _)| *r == Rule::OutputDrift), "the same class wins: {changed:?}");
}

#[test]
fn missing_values_raise_the_missing_rate_alert() {
    let mut m = monitor(config(100));
    let x: Vec<f32> = (0..200).map(|i| if i % 2 == 0 && i < 100 { f32::NAN } else { 0.5 }).collect();
    m.observe_inputs(&[Tensor::new(vec![100, 2], TensorData::F32(x)).unwrap()]);
    let w = m.poll(1).unwrap();
    let keys: Vec<_> = w.changes.iter().map(|c| (c.key.rule, c.key.feature.as_str())).collect();
    assert!(keys.contains(&(Rule::MissingRate, "a")), "{keys:?}");
    assert!(!keys.contains(&(Rule::MissingRate, "b")), "{keys:?}");
}

#[test]
fn a_request_that_does_not_fit_is_skipped_and_counted() {
    let mut m = monitor(config(100));
    m.observe_inputs(&[Tensor::new(vec![3, 1], TensorData::F32(vec![0.0; 3])).unwrap()]);
    let w = m.close(1);
    assert_eq!((w.rows, w.skipped), (0, 1));
}

#[test]
fn hysteresis_raises_after_n_above_and_ignores_the_band() {
    let rules = Rules { raise_windows: 2, clear_windows: 2, ..Rules::default() };
    let mut s = AlertState::Quiet { above: 0 };
    let mut step = |r| {
        let (n, c) = s.next(r, &rules);
        s = n;
        c
    };
    assert_eq!(step(Reading::Above), None);
    assert_eq!(step(Reading::Band), None, "the count restarts");
    assert_eq!(step(Reading::Above), None);
    assert_eq!(step(Reading::NoData), None, "no data keeps the count");
    assert_eq!(step(Reading::Above), Some(Change::Raised));
    assert_eq!(step(Reading::Below), None);
    assert_eq!(step(Reading::Band), None, "in the band it stays raised and the count restarts");
    assert_eq!(step(Reading::Below), None);
    assert_eq!(step(Reading::Below), Some(Change::Cleared));
}

#[test]
fn rules_are_set_from_the_command_line() {
    let mut r = Rules::default();
    r.set("feature_drift=0.25").unwrap();
    r.set("p99_ms=40").unwrap();
    r.set("error_rate=off").unwrap();
    r.set("raise_windows=3").unwrap();
    assert_eq!((r.feature_drift, r.p99_ms, r.error_rate, r.raise_windows), (Some(0.25), Some(40.0), None, 3));
    assert!(r.set("feature_drift").unwrap_err().contains("NAME=VALUE"));
    assert!(r.set("feature_drift=-1").unwrap_err().contains("non-negative"));
    assert!(r.set("raise_windows=0").is_err());
    assert!(r.set("drift=1").unwrap_err().contains("unknown alert setting"));
}
