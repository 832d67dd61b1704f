//! Distances between a baseline distribution and a window's: PSI,
//! Jensen–Shannon, the Kolmogorov–Smirnov statistic, Model Monitor's L∞
//! and the mean shift. The formulas are in docs/drift.md.

use crate::kll::Kll;
use crate::moments::Moments;

/// The share a bin with no values counts as in PSI, so that an empty bin
/// on one side gives a large finite term instead of an infinite one.
pub const PSI_FLOOR: f64 = 1e-4;

/// Model Monitor's (Deequ's) default `c(α)` for the robust L∞ distance,
/// α = 0.003.
pub const DEFAULT_C_ALPHA: f64 = 1.8;

fn shares(counts: &[u64]) -> Option<Vec<f64>> {
    let total: u64 = counts.iter().sum();
    (total > 0).then(|| counts.iter().map(|c| *c as f64 / total as f64).collect())
}

/// Population stability index of `current` against `baseline` (counts on
/// the same bins): `Σ (c_i - b_i) ln(c_i / b_i)` over the bins' shares,
/// each share floored at [`PSI_FLOOR`]. `None` when either side is empty
/// or the bins differ.
pub fn psi(baseline: &[u64], current: &[u64]) -> Option<f64> {
    if baseline.len() != current.len() {
        return None;
    }
    let (b, c) = (shares(baseline)?, shares(current)?);
    Some(
        b.iter()
            .zip(&c)
            .map(|(b, c)| {
                let (b, c) = (b.max(PSI_FLOOR), c.max(PSI_FLOOR));
                (c - b) * (c / b).ln()
            })
            .sum(),
    )
}

/// Jensen–Shannon divergence, base 2 (so in `[0, 1]`), of the two
/// distributions the counts give: `½ KL(B‖M) + ½ KL(C‖M)`, `M = (B+C)/2`;
/// a bin empty on one side adds only the other side's term (`0 ln 0 = 0`).
pub fn jensen_shannon(baseline: &[u64], current: &[u64]) -> Option<f64> {
    if baseline.len() != current.len() {
        return None;
    }
    let (b, c) = (shares(baseline)?, shares(current)?);
    let kl = |p: f64, m: f64| if p > 0.0 { p * (p / m).log2() } else { 0.0 };
    let js: f64 = b.iter().zip(&c).map(|(b, c)| 0.5 * kl(*b, (b + c) / 2.0) + 0.5 * kl(*c, (b + c) / 2.0)).sum();
    Some(js.clamp(0.0, 1.0))
}

/// L∞ distance between two category frequency vectors (Deequ's
/// `categoricalDistance`): `max_i |b_i - c_i|` over the shares.
pub fn linf_categorical(baseline: &[u64], current: &[u64]) -> Option<f64> {
    if baseline.len() != current.len() {
        return None;
    }
    let (b, c) = (shares(baseline)?, shares(current)?);
    Some(b.iter().zip(&c).map(|(b, c)| (b - c).abs()).fold(0.0, f64::max))
}

/// The largest gap between the two CDFs the counts on the same bins give
/// (the Kolmogorov–Smirnov statistic at the bins' edges only, so never
/// more than the statistic of the values themselves).
pub fn linf_bins(baseline: &[u64], current: &[u64]) -> Option<f64> {
    if baseline.len() != current.len() {
        return None;
    }
    let (b, c) = (shares(baseline)?, shares(current)?);
    let (mut fb, mut fc, mut d) = (0.0f64, 0.0f64, 0.0f64);
    for (b, c) in b.iter().zip(&c) {
        fb += b;
        fc += c;
        d = d.max((fb - fc).abs());
    }
    Some(d)
}

/// The two-sample Kolmogorov–Smirnov statistic of sorted samples:
/// `sup_x |F_a(x) - F_b(x)|` with `F(x)` the share of values `≤ x`,
/// evaluated at every value of either (as scipy's `ks_2samp` does).
/// `None` when either is empty or holds a value that is not finite.
pub fn ks_sorted(a: &[f64], b: &[f64]) -> Option<f64> {
    let wa: Vec<(f64, u64)> = a.iter().map(|x| (*x, 1)).collect();
    let wb: Vec<(f64, u64)> = b.iter().map(|x| (*x, 1)).collect();
    ks_weighted(&wa, &wb)
}

/// [`ks_sorted`] for weighted items sorted by value.
pub fn ks_weighted(a: &[(f64, u64)], b: &[(f64, u64)]) -> Option<f64> {
    // A NaN would never be passed by `<=`: refused instead of looping.
    if a.iter().chain(b).any(|(x, _)| !x.is_finite()) {
        return None;
    }
    let na: u64 = a.iter().fold(0u64, |s, (_, w)| s.saturating_add(*w));
    let nb: u64 = b.iter().fold(0u64, |s, (_, w)| s.saturating_add(*w));
    if na == 0 || nb == 0 {
        return None;
    }
    let (mut i, mut j, mut ra, mut rb) = (0, 0, 0u64, 0u64);
    let mut d: f64 = 0.0;
    while i < a.len() || j < b.len() {
        let x = match (a.get(i), b.get(j)) {
            (Some(p), Some(q)) => p.0.min(q.0),
            (Some(p), None) => p.0,
            (None, Some(q)) => q.0,
            (None, None) => break,
        };
        while i < a.len() && a[i].0 <= x {
            ra = ra.saturating_add(a[i].1);
            i += 1;
        }
        while j < b.len() && b[j].0 <= x {
            rb = rb.saturating_add(b[j].1);
            j += 1;
        }
        d = d.max((ra as f64 / na as f64 - rb as f64 / nb as f64).abs());
    }
    Some(d)
}

/// The KS statistic between the distributions two sketches estimate,
/// evaluated at every item of either: Deequ's `numericalDistance`
/// ("Simple"), the L∞ distance between the two CDFs. Exact while neither
/// sketch has compacted; otherwise within the sum of the sketches'
/// normalized rank errors.
pub fn ks_sketches(a: &Kll, b: &Kll) -> Option<f64> {
    ks_weighted(&a.weighted(), &b.weighted())
}

/// Model Monitor's "Robust" L∞: the simple distance less the
/// Kolmogorov–Smirnov critical value, `max(0, d - c(α) sqrt((n+m)/(n m)))`,
/// so that small windows do not alarm on sampling noise alone.
pub fn linf_robust(simple: f64, n: u64, m: u64, c_alpha: f64) -> f64 {
    if n == 0 || m == 0 {
        return 0.0;
    }
    let (n, m) = (n as f64, m as f64);
    (simple - c_alpha * ((n + m) / (n * m)).sqrt()).max(0.0)
}

/// `c(α)` for a significance level α: `sqrt(-ln(α/2) / 2)`, as Deequ
/// computes it.
pub fn c_alpha(alpha: f64) -> f64 {
    (-(alpha / 2.0).ln() / 2.0).sqrt()
}

/// How many of the baseline's standard deviations the current mean is
/// from the baseline's: `|μ_c - μ_b| / σ_b`. With `σ_b = 0`: 0 if the
/// means are equal, infinite otherwise. `None` when either is empty.
pub fn mean_shift(baseline: &Moments, current: &Moments) -> Option<f64> {
    if baseline.n == 0 || current.n == 0 {
        return None;
    }
    let diff = (current.mean - baseline.mean).abs();
    let sd = baseline.std_dev();
    Some(if sd > 0.0 {
        diff / sd
    } else if diff == 0.0 {
        0.0
    } else {
        f64::INFINITY
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_distributions_are_at_zero() {
        let c = [5, 10, 0, 3];
        assert_eq!(psi(&c, &c), Some(0.0));
        assert_eq!(jensen_shannon(&c, &c), Some(0.0));
        assert_eq!(linf_categorical(&c, &c), Some(0.0));
        assert_eq!(ks_sorted(&[1.0, 2.0], &[1.0, 2.0]), Some(0.0));
    }

    #[test]
    fn disjoint_distributions_are_at_the_top() {
        assert_eq!(jensen_shannon(&[1, 0], &[0, 1]), Some(1.0));
        assert_eq!(linf_categorical(&[1, 0], &[0, 1]), Some(1.0));
        assert_eq!(ks_sorted(&[1.0, 2.0], &[3.0, 4.0]), Some(1.0));
        // Each side's empty bin counts as 1e-4: 2 (1 - 1e-4) ln(1e4).
        let p = psi(&[1, 0], &[0, 1]).unwrap();
        assert!((p - 2.0 * (1.0 - 1e-4) * 1e4f64.ln()).abs() < 1e-12, "{p}");
    }

    #[test]
    fn a_value_that_is_not_finite_is_refused_not_looped_on() {
        assert_eq!(ks_sorted(&[f64::NAN], &[1.0]), None);
        assert_eq!(ks_sorted(&[1.0], &[f64::INFINITY]), None);
    }

    #[test]
    fn ties_count_at_or_below() {
        // F_a(1) = 2/3, F_b(1) = 1/3: 1/3.
        let d = ks_sorted(&[1.0, 1.0, 2.0], &[1.0, 2.0, 2.0]).unwrap();
        assert!((d - 1.0 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn robust_subtracts_the_critical_value() {
        assert_eq!(linf_robust(0.1, 10, 10, DEFAULT_C_ALPHA), 0.0);
        let r = linf_robust(0.5, 10_000, 10_000, DEFAULT_C_ALPHA);
        assert!((r - (0.5 - 1.8 * (2.0f64 / 10_000.0).sqrt())).abs() < 1e-15);
        assert!((c_alpha(0.003) - 1.8).abs() < 0.05);
    }

    #[test]
    fn mean_shift_of_a_constant_feature() {
        let mut b = Moments::default();
        b.push(1.0);
        b.push(1.0);
        let mut c = Moments::default();
        c.push(1.0);
        assert_eq!(mean_shift(&b, &c), Some(0.0));
        c.push(3.0);
        assert_eq!(mean_shift(&b, &c), Some(f64::INFINITY));
    }
}
