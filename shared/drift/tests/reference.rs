//! The statistics agree with an independent computation on the same data
//! (fixtures/drift.expected.json, made by `scripts/make-fixtures.py drift`
//! with scipy and numpy).

use serde_json::Value;
use tern_drift::distance::ks_sorted;
use tern_drift::{BaselineBuilder, Kind, Summary};

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/drift.expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn counts(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

#[test]
fn numeric_distances_match_scipy_and_the_documented_formulas() {
    let f = fixture();
    let (a, b) = (floats(&f["a"]), floats(&f["b"]));
    let mut builder = BaselineBuilder::new();
    builder.numeric("x", &a, f["bins"].as_u64().unwrap() as usize).unwrap();
    let baseline = builder.build().unwrap();
    let Kind::Numeric { cuts } = &baseline.layout.features()[0].kind else { panic!() };
    assert_eq!(cuts, &floats(&f["cuts"]));
    // The window's sketch has not compacted at 1,100 values: exact.
    let mut window = baseline.window(Some(tern_drift::BASELINE_K), 1);
    for x in &b {
        window.observe(&baseline.layout, 0, *x).unwrap();
    }
    let (Summary::Numeric(bs), Summary::Numeric(ws)) = (&baseline.profile.features[0], &window.features[0]) else {
        panic!()
    };
    assert_eq!(bs.counts, counts(&f["counts_a"]));
    assert_eq!(ws.counts, counts(&f["counts_b"]));
    let d = &baseline.compare(&window).unwrap()[0];
    let ks = f["ks"].as_f64().unwrap();
    assert!((d.linf.unwrap() - ks).abs() < 1e-9, "{:?} vs scipy {ks}", d.linf);
    assert_eq!(d.linf_error, Some(0.0));
    let (mut sa, mut sb) = (a.clone(), b.clone());
    sa.sort_unstable_by(f64::total_cmp);
    sb.sort_unstable_by(f64::total_cmp);
    assert!((ks_sorted(&sa, &sb).unwrap() - ks).abs() < 1e-9);
    let psi = f["psi"].as_f64().unwrap();
    assert!((d.psi.unwrap() - psi).abs() < 1e-12, "{:?} vs {psi}", d.psi);
    let js = f["js"].as_f64().unwrap();
    assert!((d.js.unwrap() - js).abs() < 1e-12, "{:?} vs scipy {js}", d.js);
    let shift = f["mean_shift"].as_f64().unwrap();
    assert!((d.mean_shift.unwrap() - shift).abs() < 1e-9, "{:?} vs {shift}", d.mean_shift);
}

#[test]
fn a_window_with_a_small_sketch_stays_within_its_stated_error() {
    let f = fixture();
    let (a, b) = (floats(&f["a"]), floats(&f["b"]));
    let mut builder = BaselineBuilder::new();
    builder.numeric("x", &a, 10).unwrap();
    let baseline = builder.build().unwrap();
    let mut window = baseline.window(Some(16), 1);
    for x in &b {
        window.observe(&baseline.layout, 0, *x).unwrap();
    }
    let d = &baseline.compare(&window).unwrap()[0];
    let ks = f["ks"].as_f64().unwrap();
    let err = d.linf_error.unwrap();
    assert!(err > 0.0);
    assert!((d.linf.unwrap() - ks).abs() <= err, "{:?} vs scipy {ks}, stated error {err}", d.linf);
}

#[test]
fn categorical_linf_is_model_monitors() {
    let f = fixture();
    let mut builder = BaselineBuilder::new();
    builder.categorical("c", &floats(&f["categorical_a"])).unwrap();
    let baseline = builder.build().unwrap();
    let mut window = baseline.window(None, 1);
    for x in floats(&f["categorical_b"]) {
        window.observe(&baseline.layout, 0, x).unwrap();
    }
    let d = &baseline.compare(&window).unwrap()[0];
    let linf = f["categorical_linf"].as_f64().unwrap();
    assert!((d.linf.unwrap() - linf).abs() < 1e-12, "{:?} vs {linf}", d.linf);
}
