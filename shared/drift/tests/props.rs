//! Properties of the summaries and distances: merging device summaries
//! gives the summary of the pooled data, the sketch keeps its error bound,
//! the distances stay in range, decoding never panics.

use proptest::prelude::*;
use tern_drift::distance::{jensen_shannon, ks_sketches, ks_sorted, linf_bins, linf_categorical, psi};
use tern_drift::{Baseline, BaselineBuilder, Kll, Profile, Summary};

fn baseline() -> Baseline {
    let reference: Vec<f64> = (0..500).map(|i| f64::from(i % 97) * 0.37 - 5.0).collect();
    let mut b = BaselineBuilder::new();
    b.numeric("x", &reference, 8).unwrap();
    b.categorical("c", &[0.0, 1.0, 1.0, 2.0, 3.0]).unwrap();
    b.classes("out", 3, [[0.2f32, 0.5, 0.3].as_slice()]).unwrap();
    b.image("img", &[&[0.5f32], &[0.25]]).unwrap();
    b.build().unwrap()
}

/// A value, sometimes missing, with many ties.
fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => (-100i32..100).prop_map(|i| f64::from(i) / 8.0),
        2 => -1e3f64..1e3,
        1 => Just(f64::NAN),
    ]
}

#[derive(Clone, Debug)]
struct Row {
    x: f64,
    c: f64,
    scores: [f32; 3],
    pixels: Vec<f32>,
}

fn row() -> impl Strategy<Value = Row> {
    (value(), value(), prop::array::uniform3(-5.0f32..5.0), prop::collection::vec(-1.0f32..1.0, 0..6))
        .prop_map(|(x, c, scores, pixels)| Row { x, c, scores, pixels })
}

fn observe(b: &Baseline, w: &mut Profile, rows: &[Row]) {
    for r in rows {
        w.observe(&b.layout, 0, r.x).unwrap();
        w.observe(&b.layout, 1, r.c).unwrap();
        w.observe_scores(&b.layout, 2, &r.scores).unwrap();
        w.observe_channel(&b.layout, 3, 0, &r.pixels).unwrap();
        w.observe_channel(&b.layout, 3, 1, &r.pixels).unwrap();
    }
}

fn close(a: f64, b: f64, scale: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + scale)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn merged_windows_equal_the_pooled_window(rows in prop::collection::vec(row(), 0..400), cuts in prop::collection::vec(0usize..400, 0..5)) {
        let b = baseline();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(rows.len())).collect();
        cuts.push(0);
        cuts.push(rows.len());
        cuts.sort_unstable();
        let mut merged = b.window(Some(32), 1_000);
        for (i, part) in cuts.windows(2).enumerate() {
            let mut w = b.window(Some(32), i as u64);
            observe(&b, &mut w, &rows[part[0]..part[1]]);
            merged.merge(&b.layout, &w).unwrap();
        }
        let mut pooled = b.window(None, 0);
        observe(&b, &mut pooled, &rows);
        for (m, p) in merged.features.iter().zip(&pooled.features) {
            match (m, p) {
                (Summary::Numeric(m), Summary::Numeric(p)) => {
                    prop_assert_eq!(&m.counts, &p.counts);
                    prop_assert_eq!(m.missing, p.missing);
                    prop_assert_eq!((m.moments.n, m.moments.min, m.moments.max), (p.moments.n, p.moments.min, p.moments.max));
                    let scale = p.moments.max.abs().max(p.moments.min.abs());
                    prop_assert!(close(m.moments.mean, p.moments.mean, scale));
                    prop_assert!(close(m.moments.variance(), p.moments.variance(), scale * scale));
                    // The merged sketch saw every value, within its bound.
                    let sketch = m.sketch.as_ref().unwrap();
                    prop_assert_eq!(sketch.n(), p.moments.n);
                    let mut all: Vec<f64> = rows.iter().map(|r| r.x).filter(|x| x.is_finite()).collect();
                    all.sort_unstable_by(f64::total_cmp);
                    for x in all.iter().step_by(all.len() / 20 + 1) {
                        let truth = all.partition_point(|v| v <= x) as u64;
                        prop_assert!(sketch.rank(*x).abs_diff(truth) <= sketch.worst_rank_error());
                    }
                }
                (Summary::Image(m), Summary::Image(p)) => {
                    for (m, p) in m.iter().zip(p) {
                        prop_assert_eq!((m.n, m.min, m.max), (p.n, p.min, p.max));
                        prop_assert!(close(m.mean, p.mean, 1.0));
                        prop_assert!(close(m.m2, p.m2, p.n as f64));
                    }
                }
                // Categories and classes are counts only: exactly equal.
                (m, p) => prop_assert_eq!(m, p),
            }
        }
        merged.check(&b.layout).unwrap();
    }

    #[test]
    fn merged_sketches_stay_within_their_bounds(parts in prop::collection::vec(prop::collection::vec(-1e4f64..1e4, 0..3000), 1..5), k in 8u16..300) {
        let mut merged = Kll::new(k, 0);
        let mut all = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let mut s = Kll::new(k, 1 + i as u64);
            part.iter().for_each(|x| s.push(*x));
            merged.merge(&s);
            all.extend_from_slice(part);
        }
        all.sort_unstable_by(f64::total_cmp);
        prop_assert_eq!(merged.n(), all.len() as u64);
        // δ = 1e-9 per probe: a failure here is a broken bound, not luck.
        let bound = merged.rank_error_bound(1e-9);
        for x in all.iter().step_by(all.len() / 50 + 1) {
            let truth = all.partition_point(|v| v <= x) as u64;
            let err = merged.rank(*x).abs_diff(truth);
            prop_assert!(err <= merged.worst_rank_error(), "off by {} > worst {}", err, merged.worst_rank_error());
            prop_assert!(err as f64 <= bound, "off by {} > bound {}", err, bound);
        }
    }

    #[test]
    fn uncompacted_sketches_give_the_exact_ks(a in prop::collection::vec(value(), 1..300), b in prop::collection::vec(value(), 1..300)) {
        let finite = |v: &[f64]| { let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect(); v.sort_unstable_by(f64::total_cmp); v };
        let (a, b) = (finite(&a), finite(&b));
        let (mut sa, mut sb) = (Kll::new(2048, 1), Kll::new(2048, 2));
        a.iter().for_each(|x| sa.push(*x));
        b.iter().for_each(|x| sb.push(*x));
        prop_assert_eq!(ks_sketches(&sa, &sb), ks_sorted(&a, &b));
    }

    #[test]
    fn distances_stay_in_range(a in prop::collection::vec(0u64..50, 1..20), extra in prop::collection::vec(0u64..50, 20)) {
        let b: Vec<u64> = extra[..a.len()].to_vec();
        if let Some(p) = psi(&a, &b) { prop_assert!(p >= 0.0, "psi {}", p); }
        if let Some(j) = jensen_shannon(&a, &b) { prop_assert!((0.0..=1.0).contains(&j), "js {}", j); }
        for d in [linf_categorical(&a, &b), linf_bins(&a, &b)].into_iter().flatten() {
            prop_assert!((0.0..=1.0 + 1e-12).contains(&d), "linf {}", d);
        }
        let nonempty = a.iter().sum::<u64>() > 0;
        prop_assert_eq!(psi(&a, &a), nonempty.then_some(0.0));
        prop_assert_eq!(jensen_shannon(&a, &a), nonempty.then_some(0.0));
    }

    #[test]
    fn binned_linf_never_exceeds_the_exact_ks(a in prop::collection::vec(-50f64..50.0, 1..300), b in prop::collection::vec(-60f64..60.0, 1..300)) {
        let mut builder = BaselineBuilder::new();
        builder.numeric("x", &a, 10).unwrap();
        let base = builder.build().unwrap();
        let mut w = base.window(None, 0);
        b.iter().for_each(|x| w.observe(&base.layout, 0, *x).unwrap());
        let (Summary::Numeric(bs), Summary::Numeric(ws)) = (&base.profile.features[0], &w.features[0]) else { unreachable!() };
        let sort = |v: &[f64]| { let mut v = v.to_vec(); v.sort_unstable_by(f64::total_cmp); v };
        let exact = ks_sorted(&sort(&a), &sort(&b)).unwrap();
        prop_assert!(linf_bins(&bs.counts, &ws.counts).unwrap() <= exact + 1e-12);
    }

    #[test]
    fn decoding_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let b = baseline();
        let _ = Profile::decode(&bytes, &b.layout);
        let _ = Baseline::decode(&bytes);
    }

    #[test]
    fn a_window_survives_its_codec(rows in prop::collection::vec(row(), 0..100)) {
        let b = baseline();
        let mut w = b.window(Some(16), 9);
        observe(&b, &mut w, &rows);
        let back = Profile::decode(&w.encode(), &b.layout).unwrap();
        // NaN-free: every missing value was counted, not stored.
        prop_assert_eq!(back, w);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Quality counts of device windows merged equal the counts of the
    /// pooled pairs, exactly for a classifier, and so do the metrics.
    #[test]
    fn merged_quality_counts_equal_the_pooled_counts(
        pairs in prop::collection::vec((-2i64..80, -2i64..80), 0..300),
        values in prop::collection::vec((-1e3f64..1e3, -1e3f64..1e3), 0..300),
        cut in 0usize..300,
    ) {
        use tern_drift::quality::*;
        let (mut pooled, mut left, mut right) = (empty_classes(), empty_classes(), empty_classes());
        for (i, (p, a)) in pairs.iter().enumerate() {
            add_label(&mut pooled, *p, *a);
            add_label(if i < cut { &mut left } else { &mut right }, *p, *a);
        }
        prop_assert!(merge(&mut left, &right));
        prop_assert_eq!(&left, &pooled);
        prop_assert_eq!(metrics(&left), metrics(&pooled));
        if let Some(a) = metrics(&pooled).accuracy {
            prop_assert!((0.0..=1.0).contains(&a));
        }
        if let Some(f) = metrics(&pooled).f1 {
            prop_assert!((0.0..=1.0).contains(&f));
        }
        let (mut pooled, mut left, mut right) = (empty_values(), empty_values(), empty_values());
        for (i, (p, a)) in values.iter().enumerate() {
            add_value(&mut pooled, *p, *a);
            add_value(if i < cut { &mut left } else { &mut right }, *p, *a);
        }
        prop_assert!(merge(&mut left, &right));
        let (m, q) = (metrics(&left), metrics(&pooled));
        prop_assert_eq!(m.rows, q.rows);
        if let (Some(a), Some(b)) = (m.rmse, q.rmse) {
            prop_assert!(close(a, b, b));
        }
    }
}
