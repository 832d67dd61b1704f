//! Count, mean, variance, minimum and maximum of a stream, mergeable.

use serde::{Deserialize, Serialize};

/// Count, mean, sum of squared deviations (`m2`), minimum and maximum of
/// the values seen: Welford's update for one value, Chan et al.'s for two
/// streams, so that merging two summaries gives the summary of the pooled
/// values (the count, minimum and maximum exactly; the mean and `m2` to
/// floating-point rounding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    /// Values seen.
    pub n: u64,
    /// Their mean (0 when `n` is 0).
    pub mean: f64,
    /// The sum of their squared deviations from the mean.
    pub m2: f64,
    /// The smallest (0 when `n` is 0).
    pub min: f64,
    /// The largest (0 when `n` is 0).
    pub max: f64,
}

impl Moments {
    /// Adds one finite value.
    #[inline]
    pub fn push(&mut self, x: f64) {
        if self.n == 0 {
            *self = Self { n: 1, mean: x, m2: 0.0, min: x, max: x };
            return;
        }
        self.n += 1;
        let d = x - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (x - self.mean);
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    /// The summary of a slice of finite values, in two passes (the sum,
    /// then the squared deviations), which vectorize, instead of one
    /// Welford step per value.
    pub fn of_slice(values: &[f32]) -> Self {
        let Some(first) = values.first() else { return Self::default() };
        let n = values.len() as f64;
        let (mut sum, mut min, mut max) = (0.0f64, *first, *first);
        for x in values {
            sum += f64::from(*x);
            min = min.min(*x);
            max = max.max(*x);
        }
        let mean = sum / n;
        let m2 = values.iter().map(|x| (f64::from(*x) - mean).powi(2)).sum();
        Self { n: values.len() as u64, mean, m2, min: f64::from(min), max: f64::from(max) }
    }

    /// Adds the values `other` summarizes.
    pub fn merge(&mut self, other: &Self) {
        if other.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *other;
            return;
        }
        let (na, nb) = (self.n as f64, other.n as f64);
        let n = na + nb;
        let delta = other.mean - self.mean;
        self.mean += delta * nb / n;
        self.m2 += other.m2 + delta * delta * na * nb / n;
        self.n = self.n.saturating_add(other.n);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Population variance (`m2 / n`, as Model Monitor's `std_dev` is the
    /// population standard deviation); 0 for fewer than two values.
    pub fn variance(&self) -> f64 {
        if self.n < 2 { 0.0 } else { (self.m2 / self.n as f64).max(0.0) }
    }

    /// Population standard deviation.
    pub fn std_dev(&self) -> f64 {
        self.variance().sqrt()
    }

    /// The sum of the values.
    pub fn sum(&self) -> f64 {
        self.mean * self.n as f64
    }

    /// Whether the fields could describe some finite values.
    pub(crate) fn is_valid(&self) -> bool {
        let finite = self.mean.is_finite() && self.m2.is_finite() && self.min.is_finite() && self.max.is_finite();
        finite && self.m2 >= 0.0 && (self.n == 0 || self.min <= self.max)
    }
}
