//! Model quality against the ground truth apps post back (SageMaker Model
//! Monitor's model-quality monitoring): predictions and labels counted into
//! a [`QualityCounts`] (a confusion matrix, or error sums for a regressor),
//! counts merged across windows and devices, and the metrics read from
//! them. Formulas in docs/drift.md.

use tern_proto::{MAX_QUALITY_CLASSES, QualityCounts};

/// Counts of nothing yet, for a classifier.
pub fn empty_classes() -> QualityCounts {
    QualityCounts::Classes { classes: 0, confusion: Vec::new(), other: 0, other_correct: 0 }
}

/// Counts of nothing yet, for a regressor.
pub fn empty_values() -> QualityCounts {
    QualityCounts::Values { n: 0, sum: 0.0, sum_abs: 0.0, sum_sq: 0.0 }
}

/// Grows a `from` × `from` matrix to `to` × `to`, keeping every count.
fn grow(confusion: &mut Vec<u64>, from: u32, to: u32) {
    if to <= from {
        return;
    }
    let (from, to) = (from as usize, to as usize);
    let mut out = vec![0u64; to * to];
    for a in 0..from {
        out[a * to..a * to + from].copy_from_slice(&confusion[a * from..(a + 1) * from]);
    }
    *confusion = out;
}

/// Whether a label has a row and a column of its own.
fn in_matrix(label: i64) -> bool {
    (0..i64::from(MAX_QUALITY_CLASSES)).contains(&label)
}

/// Counts one classifier prediction against its label. Counts of a
/// regressor are left as they are (and `false` returned).
pub fn add_label(c: &mut QualityCounts, predicted: i64, actual: i64) -> bool {
    let QualityCounts::Classes { classes, confusion, other, other_correct } = c else { return false };
    if in_matrix(predicted) && in_matrix(actual) {
        let need = (predicted.max(actual) + 1) as u32;
        grow(confusion, *classes, need);
        *classes = (*classes).max(need);
        confusion[actual as usize * *classes as usize + predicted as usize] += 1;
    } else {
        *other += 1;
        *other_correct += u64::from(predicted == actual);
    }
    true
}

/// Counts one regressor prediction against its value (a pair whose error,
/// its square or the sums would not be finite is not counted). Counts of a
/// classifier are left as they are (and `false` returned).
pub fn add_value(c: &mut QualityCounts, predicted: f64, actual: f64) -> bool {
    let QualityCounts::Values { n, sum, sum_abs, sum_sq } = c else { return false };
    let e = predicted - actual;
    if e.is_finite() && (*sum + e).is_finite() && (*sum_abs + e.abs()).is_finite() && (*sum_sq + e * e).is_finite() {
        *n += 1;
        *sum += e;
        *sum_abs += e.abs();
        *sum_sq += e * e;
    }
    true
}

/// Adds `b` to `a`: equal to counting both windows' pairs in one. `false`
/// (and `a` unchanged) when one is a classifier's and the other a
/// regressor's, or a matrix does not match its class count.
pub fn merge(a: &mut QualityCounts, b: &QualityCounts) -> bool {
    if !well_formed(a) || !well_formed(b) || rows(a) + rows(b) > MAX_ROWS {
        return false;
    }
    match (a, b) {
        (
            QualityCounts::Classes { classes, confusion, other, other_correct },
            QualityCounts::Classes { classes: bc, confusion: bm, other: bo, other_correct: boc },
        ) => {
            let k = (*classes).max(*bc);
            grow(confusion, *classes, k);
            *classes = k;
            let (k, bk) = (k as usize, *bc as usize);
            for r in 0..bk {
                for p in 0..bk {
                    confusion[r * k + p] += bm[r * bk + p];
                }
            }
            *other += bo;
            *other_correct += boc;
            true
        }
        (
            QualityCounts::Values { n, sum, sum_abs, sum_sq },
            QualityCounts::Values { n: bn, sum: bs, sum_abs: ba, sum_sq: bq },
        ) => {
            if !((*sum + bs).is_finite() && (*sum_abs + ba).is_finite() && (*sum_sq + bq).is_finite()) {
                return false;
            }
            *n += bn;
            *sum += bs;
            *sum_abs += ba;
            *sum_sq += bq;
            true
        }
        _ => false,
    }
}

/// Most pairs one set of counts may hold: far more than any fleet counts,
/// and far from where sums of them overflow.
pub const MAX_ROWS: u64 = 1 << 40;

/// Whether the counts are consistent: a matrix of `classes`² within the
/// limit, at most [`MAX_ROWS`] pairs, sums that are finite and not
/// negative where they cannot be (and zero with no pairs).
pub fn well_formed(c: &QualityCounts) -> bool {
    match c {
        QualityCounts::Classes { classes, confusion, other, other_correct } => {
            let total = confusion.iter().try_fold(*other, |t, x| t.checked_add(*x));
            *classes <= MAX_QUALITY_CLASSES
                && confusion.len() == (*classes as usize).pow(2)
                && other_correct <= other
                && total.is_some_and(|t| t <= MAX_ROWS)
        }
        QualityCounts::Values { n, sum, sum_abs, sum_sq } => {
            sum.is_finite()
                && sum_abs.is_finite()
                && sum_sq.is_finite()
                && *sum_abs >= 0.0
                && *sum_sq >= 0.0
                && *n <= MAX_ROWS
                && (*n > 0 || (*sum == 0.0 && *sum_abs == 0.0 && *sum_sq == 0.0))
        }
    }
}

/// Pairs counted (saturating: counts that are not [`well_formed`] may
/// hold anything).
pub fn rows(c: &QualityCounts) -> u64 {
    match c {
        QualityCounts::Classes { confusion, other, .. } => confusion.iter().fold(*other, |t, x| t.saturating_add(*x)),
        QualityCounts::Values { n, .. } => *n,
    }
}

/// The metrics of a window, where they are defined (`None` with no pairs,
/// or for the other kind of model).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Metrics {
    /// Pairs counted.
    pub rows: u64,
    /// Share predicted right.
    pub accuracy: Option<f64>,
    /// Macro-averaged F1 over the labels that occur (as actual or
    /// predicted), when every pair is in the matrix (labels 0 to 63).
    pub f1: Option<f64>,
    /// Root mean squared error.
    pub rmse: Option<f64>,
    /// Mean absolute error.
    pub mae: Option<f64>,
}

/// The metrics of `c`.
pub fn metrics(c: &QualityCounts) -> Metrics {
    let n = rows(c);
    let mut m = Metrics { rows: n, ..Metrics::default() };
    if n == 0 || !well_formed(c) {
        return m;
    }
    match c {
        QualityCounts::Classes { classes, confusion, other, other_correct } => {
            let k = *classes as usize;
            let right: u64 = (0..k).map(|i| confusion[i * k + i]).sum::<u64>() + other_correct;
            m.accuracy = Some(right as f64 / n as f64);
            let mut f1s = Vec::new();
            for i in 0..k {
                let tp = confusion[i * k + i] as f64;
                let actual: u64 = confusion[i * k..(i + 1) * k].iter().sum();
                let predicted: u64 = (0..k).map(|r| confusion[r * k + i]).sum();
                if actual + predicted == 0 {
                    continue;
                }
                f1s.push(2.0 * tp / (actual + predicted) as f64);
            }
            // Pairs outside the matrix are a false negative or positive of
            // a class in it that F1 cannot place: no F1 then.
            if !f1s.is_empty() && *other == 0 {
                m.f1 = Some(f1s.iter().sum::<f64>() / f1s.len() as f64);
            }
        }
        QualityCounts::Values { n, sum_abs, sum_sq, .. } => {
            m.rmse = Some((sum_sq / *n as f64).sqrt());
            m.mae = Some(sum_abs / *n as f64);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_macro_f1_match_a_hand_count() {
        let mut c = empty_classes();
        // actual, predicted
        for (a, p) in [(0, 0), (0, 0), (0, 1), (1, 1), (1, 0), (2, 2)] {
            add_label(&mut c, p, a);
        }
        let m = metrics(&c);
        assert_eq!(m.rows, 6);
        assert!((m.accuracy.unwrap() - 4.0 / 6.0).abs() < 1e-12);
        // class 0: tp 2, actual 3, predicted 3 → 2·2/6; class 1: tp 1, 2, 2 → 0.5; class 2: 1.
        let f1 = (4.0 / 6.0 + 0.5 + 1.0) / 3.0;
        assert!((m.f1.unwrap() - f1).abs() < 1e-12, "{m:?}");
        assert_eq!((m.rmse, m.mae), (None, None));
    }

    #[test]
    fn labels_outside_the_matrix_count_for_accuracy_only() {
        let mut c = empty_classes();
        add_label(&mut c, 1000, 1000);
        add_label(&mut c, -1, 3);
        add_label(&mut c, 1, 1);
        let m = metrics(&c);
        assert_eq!(m.rows, 3);
        assert!((m.accuracy.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.f1, None, "F1 cannot place the pairs outside the matrix");
        assert!(well_formed(&c));
        let huge = QualityCounts::Classes { classes: 1, confusion: vec![u64::MAX], other: 1, other_correct: 0 };
        assert!(!well_formed(&huge));
        assert_eq!(metrics(&huge).accuracy, None, "no metrics of counts that overflow");
    }

    #[test]
    fn regression_errors() {
        let mut c = empty_values();
        add_value(&mut c, 1.0, 0.0);
        add_value(&mut c, 0.0, 3.0);
        add_value(&mut c, f64::NAN, 3.0);
        add_value(&mut c, 1e200, 0.0);
        let m = metrics(&c);
        assert_eq!(m.rows, 2);
        assert!((m.rmse.unwrap() - 5f64.sqrt()).abs() < 1e-12);
        assert!((m.mae.unwrap() - 2.0).abs() < 1e-12);
        assert!(!add_label(&mut c, 1, 1), "a regressor's counts take no labels");
    }

    #[test]
    fn kinds_and_malformed_counts_do_not_merge() {
        let mut a = empty_classes();
        assert!(!merge(&mut a, &empty_values()));
        let bad = QualityCounts::Classes { classes: 2, confusion: vec![1], other: 0, other_correct: 0 };
        assert!(!merge(&mut a, &bad));
        assert_eq!(a, empty_classes());
    }
}
