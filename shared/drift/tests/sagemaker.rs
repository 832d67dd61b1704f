//! Model Monitor's files: read, turned into a baseline and back field for
//! field, other schemas refused with the place named, and violations of a
//! window in `constraint_violations.json`'s shape.

use tern_drift::sagemaker::{Constraints, Statistics};
use tern_drift::{BaselineBuilder, ModelBaseline, Source};

fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/model-monitor").join(name);
    std::fs::read_to_string(path).unwrap()
}

fn statistics() -> Statistics {
    serde_json::from_str(&fixture("statistics.json")).unwrap()
}

#[test]
fn statistics_become_a_baseline_and_come_back_field_for_field() {
    let stats = statistics();
    let (model, notes) = stats.to_baseline("x").unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(model.sources[1], Source::InputColumn { input: "x".into(), column: 1 });
    let tern_drift::Summary::Numeric(age) = &model.baseline.profile.features[0] else { panic!() };
    assert_eq!(age.counts, vec![0, 3, 2, 2, 2, 0]);
    assert_eq!((age.moments.n, age.missing, age.moments.min, age.moments.max), (9, 1, 21.0, 61.0));
    assert_eq!(age.sketch.as_ref().unwrap().n(), 9);
    // Through Tern's own file, and back out.
    let model = ModelBaseline::decode(&model.encode()).unwrap();
    let (back, left_out) = Statistics::of(&model);
    assert!(left_out.is_empty());
    let mut want = stats.clone();
    // Tern's sketch shrinks by 2/3 where Model Monitor's does by 0.64.
    let n = want.features[0].numerical_statistics.as_mut().unwrap();
    n.distribution.kll.sketch.parameters.c = 2.0 / 3.0;
    let (got, want) = (serde_json::to_value(&back).unwrap(), serde_json::to_value(&want).unwrap());
    let close = |a: &serde_json::Value, b: &serde_json::Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-9;
    let (g, w) = (&got["features"][0]["numerical_statistics"], &want["features"][0]["numerical_statistics"]);
    for field in ["mean", "sum", "std_dev"] {
        assert!(close(&g[field], &w[field]), "{field}: {} vs {}", g[field], w[field]);
    }
    let strip = |mut v: serde_json::Value| {
        for field in ["mean", "sum", "std_dev"] {
            v["features"][0]["numerical_statistics"][field] = serde_json::Value::Null;
        }
        v
    };
    assert_eq!(strip(got), strip(want));
}

#[test]
fn another_schema_is_refused_naming_the_place() {
    let text = fixture("statistics.json").replace("\"num_missing\": 1.0", "\"num_missing\": 1.0, \"num_nulls\": 0");
    let e = serde_json::from_str::<Statistics>(&text).unwrap_err().to_string();
    assert!(e.contains("unknown field `num_nulls`") && e.contains("line 9"), "{e}");
    let e = serde_json::from_str::<Constraints>(&fixture("statistics.json")).unwrap_err().to_string();
    assert!(e.contains("unknown field `dataset`"), "{e}");
    let text = fixture("statistics.json").replace("\"value\": \"1\"", "\"value\": \"gold\"");
    let e = serde_json::from_str::<Statistics>(&text).unwrap().to_baseline("x").unwrap_err().to_string();
    assert!(e.contains("\"plan\"") && e.contains("\"gold\" is not a number"), "{e}");
    // Constraints on a feature the baseline does not have, or a method
    // Model Monitor does not know.
    let (model, _) = statistics().to_baseline("x").unwrap();
    let c: Constraints = serde_json::from_str(&fixture("constraints.json").replace("\"plan\"", "\"tier\"")).unwrap();
    assert!(c.check(&model).unwrap_err().to_string().contains("\"tier\""));
    let c: Constraints = serde_json::from_str(&fixture("constraints.json").replace("\"Robust\"", "\"Fancy\"")).unwrap();
    assert!(c.check(&model).unwrap_err().to_string().contains("\"Fancy\""));
}

#[test]
fn constraints_come_back_field_for_field() {
    let text = fixture("constraints.json");
    let c: Constraints = serde_json::from_str(&text).unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&c).unwrap(), want);
    // The misspelling in Model Monitor's own documentation is read too.
    let c: Constraints = serde_json::from_str(&text.replace("comparison_method", "comparion_method")).unwrap();
    let d = c.monitoring_config.unwrap().distribution_constraints.unwrap();
    assert_eq!(d.comparison_method.as_deref(), Some("Robust"));
}

#[test]
fn a_drifted_incomplete_window_violates_its_constraints() {
    let (model, _) = statistics().to_baseline("x").unwrap();
    let c: Constraints = serde_json::from_str(&fixture("constraints.json")).unwrap();
    let layout = &model.baseline.layout;
    // Like the baseline: no violations.
    let mut same = model.baseline.window(Some(200), 1);
    for (age, plan) in [
        (21.0, 0.0),
        (26.0, 0.0),
        (31.0, 0.0),
        (36.0, 0.0),
        (41.0, 0.0),
        (46.0, 1.0),
        (51.0, 1.0),
        (56.0, 1.0),
        (61.0, 2.0),
        (f64::NAN, 2.0),
    ] {
        same.observe_row(layout, &[age, plan]).unwrap();
    }
    assert_eq!(c.violations(&model, &same).unwrap().violations, vec![]);
    // Older, half missing, and a plan outside the domain.
    let mut w = model.baseline.window(Some(200), 1);
    for i in 0..40 {
        let age = if i % 2 == 0 { f64::NAN } else { 70.0 + f64::from(i) };
        w.observe_row(layout, &[age, if i < 36 { 0.0 } else { 7.0 }]).unwrap();
    }
    let v = c.violations(&model, &w).unwrap();
    let got: Vec<(&str, &str)> =
        v.violations.iter().map(|v| (v.feature_name.as_str(), v.constraint_check_type.as_str())).collect();
    assert_eq!(
        got,
        vec![
            ("age", "completeness_check"),
            ("age", "baseline_drift_check"),
            ("plan", "categorical_values_check"),
            ("plan", "baseline_drift_check"),
        ]
    );
    let json = serde_json::to_value(&v).unwrap();
    assert!(json["violations"][1]["description"].as_str().unwrap().starts_with("Baseline drift"), "{json}");
}

#[test]
fn suggested_constraints_follow_the_baseline() {
    let ages: Vec<f64> = (0..100).map(|i| f64::from(i % 50) + if i == 3 { f64::NAN } else { 0.0 }).collect();
    let mut b = BaselineBuilder::new();
    b.numeric("age", &ages, 10).unwrap();
    b.categorical("plan", &[0.0, 1.0, 1.0, 2.0]).unwrap();
    b.classes("output:p", 2, [[0.2f32, 0.8].as_slice()]).unwrap();
    let col = |c| Source::InputColumn { input: "x".into(), column: c };
    let model =
        ModelBaseline::new(b.build().unwrap(), vec![col(0), col(1), Source::OutputScores { output: "p".into() }])
            .unwrap();
    let c = Constraints::suggest(&model);
    assert_eq!(c.features.len(), 2, "outputs have no Model Monitor counterpart");
    assert_eq!(c.features[0].completeness, Some(0.99));
    assert!(c.features[0].num_constraints.as_ref().unwrap().is_non_negative);
    assert_eq!(c.features[1].string_constraints.as_ref().unwrap().domains, vec!["0", "1", "2"]);
    c.check(&model).unwrap();
    let (s, left_out) = Statistics::of(&model);
    assert_eq!(left_out, vec!["output:p"]);
    // What Tern writes, Tern reads back to the same baseline.
    let (again, _) = s.to_baseline("x").unwrap();
    assert_eq!(again.baseline.profile.features[1], model.baseline.profile.features[1]);
}
