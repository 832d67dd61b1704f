//! Layouts (what each feature is and how it is binned), the summaries of
//! a dataset or a window on them, the baseline, and the comparison.

use serde::{Deserialize, Serialize};

use crate::distance;
use crate::kll::Kll;
use crate::moments::Moments;
use crate::{DriftError, MAX_BINS, MAX_CATEGORIES, MAX_CHANNELS, MAX_CLASSES, MAX_FEATURES};

/// Bins of a classifier's confidence histogram: `[0, 0.1)`, …, `[0.9, 1]`.
pub const CONFIDENCE_BINS: usize = 10;
/// The longest feature name.
const MAX_NAME: usize = 256;

/// What a feature is, and the bins its values are counted in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Kind {
    /// A number. Bin 0 holds values `≤ cuts[0]`, bin `i` values in
    /// `(cuts[i-1], cuts[i]]`, the last values `> cuts[last]`.
    Numeric {
        /// Strictly increasing, finite.
        cuts: Vec<f64>,
    },
    /// A code from a known set; any other value counts as unseen (the
    /// last count).
    Categorical {
        /// Strictly increasing, finite.
        values: Vec<f64>,
    },
    /// An image input: the mean and spread of its pixels per channel.
    Image {
        /// Channels.
        channels: u16,
    },
    /// A classifier's scores: which class wins, and with what confidence.
    Classes {
        /// Classes.
        classes: u32,
    },
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Numeric { .. } => "numeric",
            Kind::Categorical { .. } => "categorical",
            Kind::Image { .. } => "an image",
            Kind::Classes { .. } => "a classifier output",
        }
    }
}

/// A named feature: an input column, an image input, or an output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Feature {
    /// Its name (a CSV header, an input or output name).
    pub name: String,
    /// What it is.
    pub kind: Kind,
}

/// The features a baseline and its windows summarize, in order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    features: Vec<Feature>,
}

impl Layout {
    /// The features.
    pub fn features(&self) -> &[Feature] {
        &self.features
    }

    /// The index of the feature named `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.features.iter().position(|f| f.name == name)
    }

    /// A layout of `features`, checked.
    pub(crate) fn of(features: Vec<Feature>) -> Result<Self, DriftError> {
        let layout = Self { features };
        layout.check()?;
        Ok(layout)
    }

    /// A layout whose bins are not placed yet (for binding only).
    pub(crate) fn unchecked(features: Vec<Feature>) -> Self {
        Self { features }
    }

    fn check(&self) -> Result<(), DriftError> {
        if self.features.len() > MAX_FEATURES {
            return Err(too_many("features", self.features.len(), MAX_FEATURES));
        }
        let mut names: Vec<&str> = self.features.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(DriftError::DuplicateFeature(w[0].to_owned()));
        }
        for f in &self.features {
            let bad = |why: String| Err(DriftError::Invalid(format!("feature {:?}: {why}", f.name)));
            if f.name.is_empty() || f.name.len() > MAX_NAME {
                return bad(format!("a name must have 1 to {MAX_NAME} bytes"));
            }
            match &f.kind {
                Kind::Numeric { cuts } if cuts.len() >= MAX_BINS => return bad(format!("{} cuts", cuts.len())),
                Kind::Numeric { cuts } | Kind::Categorical { values: cuts } if !increasing(cuts) => {
                    return bad("bin edges or categories are not finite and strictly increasing".into());
                }
                Kind::Categorical { values } if values.len() > MAX_CATEGORIES => {
                    return bad(format!("{} categories", values.len()));
                }
                Kind::Image { channels } if *channels == 0 || usize::from(*channels) > MAX_CHANNELS => {
                    return bad(format!("{channels} channels"));
                }
                Kind::Classes { classes } if *classes == 0 || *classes as usize > MAX_CLASSES => {
                    return bad(format!("{classes} classes"));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn increasing(xs: &[f64]) -> bool {
    xs.iter().all(|x| x.is_finite()) && xs.windows(2).all(|w| w[0] < w[1])
}

fn too_many(what: &str, got: usize, max: usize) -> DriftError {
    DriftError::TooMany { what: what.to_owned(), got, max }
}

/// A numeric feature's summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NumericSummary {
    /// Values per bin (one more than the cuts).
    pub counts: Vec<u64>,
    /// Count, mean, spread, range of the finite values.
    pub moments: Moments,
    /// Values that were missing (NaN) or infinite.
    pub missing: u64,
    /// Their quantile sketch, where the summary keeps one.
    pub sketch: Option<Kll>,
}

/// A categorical feature's summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CategoricalSummary {
    /// Values per known category, then the count of unseen ones.
    pub counts: Vec<u64>,
    /// Values that were missing (NaN).
    pub missing: u64,
}

/// A classifier output's summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassSummary {
    /// Answers per winning class.
    pub counts: Vec<u64>,
    /// Answers per tenth of the winning class's confidence.
    pub confidence: Vec<u64>,
    /// Answers whose scores were empty or not finite.
    pub missing: u64,
}

impl ClassSummary {
    /// The share of answers whose confidence is below `threshold`,
    /// counted by whole tenths (`threshold` rounds down to one).
    pub fn share_below(&self, threshold: f64) -> Option<f64> {
        let total: u64 = self.confidence.iter().sum();
        let bins = ((threshold.clamp(0.0, 1.0) * CONFIDENCE_BINS as f64).floor() as usize).min(CONFIDENCE_BINS);
        (total > 0).then(|| self.confidence[..bins].iter().sum::<u64>() as f64 / total as f64)
    }
}

/// One feature's summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Summary {
    /// Of a numeric feature.
    Numeric(NumericSummary),
    /// Of a categorical feature.
    Categorical(CategoricalSummary),
    /// Of an image input: per channel.
    Image(Vec<Moments>),
    /// Of a classifier's output.
    Classes(ClassSummary),
}

impl Summary {
    fn empty(kind: &Kind, sketch: Option<(u16, u64)>) -> Self {
        match kind {
            Kind::Numeric { cuts } => Summary::Numeric(NumericSummary {
                counts: vec![0; cuts.len() + 1],
                moments: Moments::default(),
                missing: 0,
                sketch: sketch.map(|(k, seed)| Kll::new(k, seed)),
            }),
            Kind::Categorical { values } => {
                Summary::Categorical(CategoricalSummary { counts: vec![0; values.len() + 1], missing: 0 })
            }
            Kind::Image { channels } => Summary::Image(vec![Moments::default(); usize::from(*channels)]),
            Kind::Classes { classes } => Summary::Classes(ClassSummary {
                counts: vec![0; *classes as usize],
                confidence: vec![0; CONFIDENCE_BINS],
                missing: 0,
            }),
        }
    }

    fn merge(&mut self, other: &Self, name: &str) -> Result<(), DriftError> {
        let mismatch = || DriftError::Invalid(format!("feature {name:?}: the summaries have different shapes"));
        let add = |a: &mut Vec<u64>, b: &[u64]| {
            if a.len() != b.len() {
                return Err(mismatch());
            }
            a.iter_mut().zip(b).for_each(|(a, b)| *a = a.saturating_add(*b));
            Ok(())
        };
        match (self, other) {
            (Summary::Numeric(a), Summary::Numeric(b)) => {
                add(&mut a.counts, &b.counts)?;
                a.moments.merge(&b.moments);
                a.missing = a.missing.saturating_add(b.missing);
                a.sketch = match (a.sketch.take(), &b.sketch) {
                    (Some(mut x), Some(y)) => {
                        x.merge(y);
                        Some(x)
                    }
                    // A sketch of only some of the values would be wrong.
                    _ => None,
                };
            }
            (Summary::Categorical(a), Summary::Categorical(b)) => {
                add(&mut a.counts, &b.counts)?;
                a.missing = a.missing.saturating_add(b.missing);
            }
            (Summary::Image(a), Summary::Image(b)) => {
                if a.len() != b.len() {
                    return Err(mismatch());
                }
                a.iter_mut().zip(b).for_each(|(a, b)| a.merge(b));
            }
            (Summary::Classes(a), Summary::Classes(b)) => {
                add(&mut a.counts, &b.counts)?;
                add(&mut a.confidence, &b.confidence)?;
                a.missing = a.missing.saturating_add(b.missing);
            }
            _ => return Err(mismatch()),
        }
        Ok(())
    }

    fn check(&self, kind: &Kind) -> Result<(), String> {
        let sum = |c: &[u64]| c.iter().try_fold(0u64, |s, x| s.checked_add(*x)).ok_or("counts overflow");
        match (kind, self) {
            (Kind::Numeric { cuts }, Summary::Numeric(s)) => {
                if s.counts.len() != cuts.len() + 1 {
                    return Err(format!("{} counts for {} bins", s.counts.len(), cuts.len() + 1));
                }
                if !s.moments.is_valid() {
                    return Err("its moments are not finite or out of order".into());
                }
                if sum(&s.counts)? != s.moments.n {
                    return Err("its bin counts do not add up to its count".into());
                }
                s.moments.n.checked_add(s.missing).ok_or("counts overflow")?;
                if let Some(sketch) = &s.sketch {
                    sketch.validate()?;
                    if sketch.n() != s.moments.n {
                        return Err("its sketch saw a different number of values".into());
                    }
                }
            }
            (Kind::Categorical { values }, Summary::Categorical(s)) => {
                if s.counts.len() != values.len() + 1 {
                    return Err(format!("{} counts for {} categories and unseen", s.counts.len(), values.len()));
                }
                sum(&s.counts)?.checked_add(s.missing).ok_or("counts overflow")?;
            }
            (Kind::Image { channels }, Summary::Image(s)) => {
                if s.len() != usize::from(*channels) || s.iter().any(|m| !m.is_valid()) {
                    return Err("its channels do not match or are not finite".into());
                }
            }
            (Kind::Classes { classes }, Summary::Classes(s)) => {
                if s.counts.len() != *classes as usize || s.confidence.len() != CONFIDENCE_BINS {
                    return Err("its class or confidence counts have the wrong length".into());
                }
                if sum(&s.counts)? != sum(&s.confidence)? {
                    return Err("its class and confidence counts do not add up to the same".into());
                }
                sum(&s.counts)?.checked_add(s.missing).ok_or("counts overflow")?;
            }
            _ => return Err(format!("the summary is not of {}", kind.name())),
        }
        Ok(())
    }
}

/// The summaries of a dataset or a window, one per feature of a layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// In the layout's order.
    pub features: Vec<Summary>,
}

impl Profile {
    /// An empty profile; numeric features keep a sketch of size `k` (none
    /// when `None`), its coins drawn by `seed` (give each device its own).
    pub fn new(layout: &Layout, sketch_k: Option<u16>, seed: u64) -> Self {
        let features = layout
            .features
            .iter()
            .enumerate()
            .map(|(i, f)| Summary::empty(&f.kind, sketch_k.map(|k| (k, seed.wrapping_add(i as u64)))))
            .collect();
        Self { features }
    }

    /// Counts one value of numeric or categorical feature `i` (NaN as
    /// missing; an infinite number as missing in a numeric feature and
    /// unseen in a categorical one).
    #[inline]
    pub fn observe(&mut self, layout: &Layout, i: usize, x: f64) -> Result<(), DriftError> {
        let (feature, summary) = self.pair(layout, i)?;
        match (&feature.kind, summary) {
            (Kind::Numeric { cuts }, Summary::Numeric(s)) => {
                if x.is_finite() {
                    // A profile made on another layout has other bins.
                    let Some(count) = s.counts.get_mut(cuts.partition_point(|c| *c < x)) else {
                        return Err(DriftError::Invalid(format!("feature {:?}: not this layout's bins", feature.name)));
                    };
                    *count += 1;
                    s.moments.push(x);
                    if let Some(sketch) = &mut s.sketch {
                        sketch.push(x);
                    }
                } else {
                    s.missing += 1;
                }
            }
            (Kind::Categorical { values }, Summary::Categorical(s)) => {
                if x.is_nan() {
                    s.missing += 1;
                } else {
                    // -0.0 is the category 0.0.
                    let x = x + 0.0;
                    let at = values.binary_search_by(|v| v.total_cmp(&x)).unwrap_or(values.len());
                    let Some(count) = s.counts.get_mut(at) else {
                        return Err(DriftError::Invalid(format!(
                            "feature {:?}: not this layout's categories",
                            feature.name
                        )));
                    };
                    *count += 1;
                }
            }
            (kind, _) => return Err(wrong_kind(feature, kind, "numeric or categorical")),
        }
        Ok(())
    }

    /// Counts one row: `row[j]` is a value of feature `j`, for the first
    /// `row.len()` features, which must be numeric or categorical.
    pub fn observe_row(&mut self, layout: &Layout, row: &[f64]) -> Result<(), DriftError> {
        row.iter().enumerate().try_for_each(|(i, x)| self.observe(layout, i, *x))
    }

    /// Counts one image's pixels of channel `channel` of feature `i`
    /// (non-finite pixels are skipped).
    pub fn observe_channel(
        &mut self,
        layout: &Layout,
        i: usize,
        channel: usize,
        pixels: &[f32],
    ) -> Result<(), DriftError> {
        let (feature, summary) = self.pair(layout, i)?;
        let Summary::Image(channels) = summary else {
            return Err(wrong_kind(feature, &feature.kind, "an image"));
        };
        let m = channels.get_mut(channel).ok_or_else(|| DriftError::NoFeature(format!("{i} channel {channel}")))?;
        if pixels.iter().all(|p| p.is_finite()) {
            m.merge(&Moments::of_slice(pixels));
        } else {
            let finite: Vec<f32> = pixels.iter().copied().filter(|p| p.is_finite()).collect();
            m.merge(&Moments::of_slice(&finite));
        }
        Ok(())
    }

    /// Counts one answer of classifier output `i`: the winning class and
    /// its confidence. Scores that are probabilities (each in `[0, 1]`,
    /// summing to 1 within 1e-3) are taken as they are; others (logits)
    /// through a softmax first.
    pub fn observe_scores(&mut self, layout: &Layout, i: usize, scores: &[f32]) -> Result<(), DriftError> {
        let (feature, summary) = self.pair(layout, i)?;
        let Summary::Classes(s) = summary else {
            return Err(wrong_kind(feature, &feature.kind, "a classifier output"));
        };
        if scores.is_empty() || scores.len() > s.counts.len() || scores.iter().any(|x| !x.is_finite()) {
            s.missing += 1;
            return Ok(());
        }
        let (best, top) =
            scores.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (j, x)| if *x > b.1 { (j, *x) } else { b });
        let sum: f64 = scores.iter().map(|x| f64::from(*x)).sum();
        let probabilities = scores.iter().all(|x| (0.0..=1.0).contains(x)) && (sum - 1.0).abs() <= 1e-3;
        let confidence = if probabilities {
            f64::from(top)
        } else {
            1.0 / scores.iter().map(|x| f64::from(x - top).exp()).sum::<f64>()
        };
        let bin = ((confidence * CONFIDENCE_BINS as f64) as usize).min(CONFIDENCE_BINS - 1);
        let Some(tenth) = s.confidence.get_mut(bin) else {
            return Err(DriftError::Invalid(format!(
                "feature {:?}: not {CONFIDENCE_BINS} confidence bins",
                feature.name
            )));
        };
        *tenth += 1;
        s.counts[best] += 1;
        Ok(())
    }

    fn pair<'a>(&'a mut self, layout: &'a Layout, i: usize) -> Result<(&'a Feature, &'a mut Summary), DriftError> {
        match (layout.features.get(i), self.features.get_mut(i)) {
            (Some(f), Some(s)) => Ok((f, s)),
            _ => Err(DriftError::NoFeature(i.to_string())),
        }
    }

    /// Adds what `other` (a profile on the same layout) counted.
    pub fn merge(&mut self, layout: &Layout, other: &Profile) -> Result<(), DriftError> {
        if self.features.len() != other.features.len() || self.features.len() != layout.features.len() {
            return Err(DriftError::Invalid(format!(
                "{} and {} features for a layout of {}",
                self.features.len(),
                other.features.len(),
                layout.features.len()
            )));
        }
        for ((a, b), f) in self.features.iter_mut().zip(&other.features).zip(&layout.features) {
            a.merge(b, &f.name)?;
        }
        Ok(())
    }

    /// The same profile without its sketches (what a device sends where
    /// bytes matter: distances against the histograms only).
    pub fn without_sketches(mut self) -> Self {
        for s in &mut self.features {
            if let Summary::Numeric(n) = s {
                n.sketch = None;
            }
        }
        self
    }

    /// Checks that the profile fits `layout` and is self-consistent.
    pub fn check(&self, layout: &Layout) -> Result<(), DriftError> {
        if self.features.len() != layout.features.len() {
            return Err(DriftError::Invalid(format!(
                "{} summaries for {} features",
                self.features.len(),
                layout.features.len()
            )));
        }
        for (s, f) in self.features.iter().zip(&layout.features) {
            s.check(&f.kind).map_err(|why| DriftError::Invalid(format!("feature {:?}: {why}", f.name)))?;
        }
        Ok(())
    }

    /// The profile as bytes (postcard).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a profile always encodes")
    }

    /// A profile from bytes that came from elsewhere, checked against
    /// `layout`.
    pub fn decode(bytes: &[u8], layout: &Layout) -> Result<Self, DriftError> {
        let profile: Profile = postcard::from_bytes(bytes)?;
        profile.check(layout)?;
        Ok(profile)
    }
}

fn wrong_kind(feature: &Feature, kind: &Kind, wanted: &'static str) -> DriftError {
    DriftError::WrongKind { feature: feature.name.clone(), kind: kind.name(), wanted }
}

/// A model's training baseline: the layout and the reference data's
/// profile on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// What each feature is and how it is binned.
    pub layout: Layout,
    /// The reference data's summaries.
    pub profile: Profile,
}

/// How far one feature of a window is from the baseline. A distance is
/// `None` where the window (or the baseline) has no values for it, or
/// where it does not apply to the feature's kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distances {
    /// The feature's name.
    pub feature: String,
    /// Values the window counted (answers, for an output; pixels of the
    /// first channel, for an image).
    pub n: u64,
    /// The share of the window's values that were missing.
    pub missing_rate: Option<f64>,
    /// Population stability index over the bins (or categories, classes).
    pub psi: Option<f64>,
    /// Jensen–Shannon divergence, base 2, over the same.
    pub js: Option<f64>,
    /// Model Monitor's L∞ distance: for a numeric feature the largest gap
    /// between the two CDFs (the Kolmogorov–Smirnov statistic), from the
    /// sketches where both sides have one and from the bins otherwise; for
    /// categories and classes the largest gap between shares.
    pub linf: Option<f64>,
    /// [`Distances::linf`] less the Kolmogorov–Smirnov critical value at
    /// Model Monitor's default `c(α)` (its "Robust" method).
    pub linf_robust: Option<f64>,
    /// How far a numeric [`Distances::linf`] can be from the exact
    /// statistic of the values summarized, with probability ≥ 99 %: the
    /// sum of the sketches' normalized rank-error bounds, each at every
    /// point at once (0 while they are exact; the bins' resolution when
    /// compared without sketches is not included).
    pub linf_error: Option<f64>,
    /// The mean's shift in the baseline's standard deviations (for an
    /// image, the largest over its channels).
    pub mean_shift: Option<f64>,
}

impl Baseline {
    /// A baseline from its parts, checked.
    pub fn new(layout: Layout, profile: Profile) -> Result<Self, DriftError> {
        layout.check()?;
        profile.check(&layout)?;
        Ok(Self { layout, profile })
    }

    /// An empty window on the baseline's bins (see [`Profile::new`]).
    pub fn window(&self, sketch_k: Option<u16>, seed: u64) -> Profile {
        Profile::new(&self.layout, sketch_k, seed)
    }

    /// The baseline as bytes (postcard).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a baseline always encodes")
    }

    /// A baseline from bytes that came from elsewhere, checked.
    pub fn decode(bytes: &[u8]) -> Result<Self, DriftError> {
        let Baseline { layout, profile } = postcard::from_bytes(bytes)?;
        Self::new(layout, profile)
    }

    /// Each feature's distances between the baseline and `window`.
    pub fn compare(&self, window: &Profile) -> Result<Vec<Distances>, DriftError> {
        window.check(&self.layout)?;
        Ok(self
            .layout
            .features
            .iter()
            .zip(self.profile.features.iter().zip(&window.features))
            .map(|(f, (b, w))| distances(&f.name, b, w))
            .collect())
    }
}

/// `missing / (missing + seen)`, in floating point (the sum may not fit).
fn rate(missing: u64, seen: u64) -> Option<f64> {
    let whole = missing as f64 + seen as f64;
    (whole > 0.0).then(|| missing as f64 / whole)
}

fn distances(name: &str, baseline: &Summary, window: &Summary) -> Distances {
    let mut d = Distances {
        feature: name.to_owned(),
        n: 0,
        missing_rate: None,
        psi: None,
        js: None,
        linf: None,
        linf_robust: None,
        linf_error: None,
        mean_shift: None,
    };
    match (baseline, window) {
        (Summary::Numeric(b), Summary::Numeric(w)) => {
            d.n = w.moments.n;
            d.missing_rate = rate(w.missing, w.moments.n);
            d.psi = distance::psi(&b.counts, &w.counts);
            d.js = distance::jensen_shannon(&b.counts, &w.counts);
            (d.linf, d.linf_error) = match (&b.sketch, &w.sketch) {
                // The statistic is a supremum over x: each sketch's bound
                // holds at all of its `n + 1` steps at once by the union
                // bound at δ = 0.005 / (n + 1), so both at ≥ 99 %.
                (Some(bs), Some(ws)) => (
                    distance::ks_sketches(bs, ws),
                    Some(
                        bs.normalized_error_bound(0.005 / (bs.n() as f64 + 1.0))
                            + ws.normalized_error_bound(0.005 / (ws.n() as f64 + 1.0)),
                    ),
                ),
                _ => (distance::linf_bins(&b.counts, &w.counts), None),
            };
            d.linf_robust =
                d.linf.map(|l| distance::linf_robust(l, b.moments.n, w.moments.n, distance::DEFAULT_C_ALPHA));
            d.mean_shift = distance::mean_shift(&b.moments, &w.moments);
        }
        (Summary::Categorical(b), Summary::Categorical(w)) => counted(&mut d, &b.counts, &w.counts, w.missing),
        (Summary::Classes(b), Summary::Classes(w)) => counted(&mut d, &b.counts, &w.counts, w.missing),
        (Summary::Image(b), Summary::Image(w)) => {
            d.n = w.first().map_or(0, |m| m.n);
            d.mean_shift = b
                .iter()
                .zip(w)
                .filter_map(|(b, w)| distance::mean_shift(b, w))
                .fold(None, |acc: Option<f64>, x| Some(acc.map_or(x, |a| a.max(x))));
        }
        // compare() checked the window against the layout; a baseline
        // built by hand whose profile does not fit it gets no distances.
        _ => {}
    }
    d
}

/// The distances of counts over categories (or classes).
fn counted(d: &mut Distances, baseline: &[u64], window: &[u64], missing: u64) {
    let seen: u64 = window.iter().sum();
    d.n = seen;
    d.missing_rate = rate(missing, seen);
    d.psi = distance::psi(baseline, window);
    d.js = distance::jensen_shannon(baseline, window);
    d.linf = distance::linf_categorical(baseline, window);
    d.linf_robust = d.linf.map(|l| distance::linf_robust(l, baseline.iter().sum(), seen, distance::DEFAULT_C_ALPHA));
}

/// Builds a baseline from reference data, one feature at a time.
#[derive(Debug, Default)]
pub struct BaselineBuilder {
    layout: Layout,
    profile: Vec<Summary>,
}

impl BaselineBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, name: &str, kind: Kind, summary: Summary) -> Result<&mut Self, DriftError> {
        if self.layout.index(name).is_some() {
            return Err(DriftError::DuplicateFeature(name.to_owned()));
        }
        if self.layout.features.len() == MAX_FEATURES {
            return Err(too_many("features", MAX_FEATURES + 1, MAX_FEATURES));
        }
        self.layout.features.push(Feature { name: name.to_owned(), kind });
        self.profile.push(summary);
        Ok(self)
    }

    /// A numeric feature, binned at quantiles of `values`: `bins` bins of
    /// about equal counts between the smallest and the largest value (ties
    /// merge bins), and one bin each for values below and above that range
    /// (empty in the baseline). NaN and infinite values count as missing.
    pub fn numeric(&mut self, name: &str, values: &[f64], bins: usize) -> Result<&mut Self, DriftError> {
        if bins == 0 || bins > MAX_BINS - 2 {
            return Err(too_many("bins", bins, MAX_BINS - 2));
        }
        let mut sorted: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        sorted.sort_unstable_by(f64::total_cmp);
        let (Some(&lo), Some(&hi)) = (sorted.first(), sorted.last()) else {
            return Err(DriftError::NoValues { feature: name.to_owned() });
        };
        let n = sorted.len();
        let mut cuts = vec![lo.next_down()];
        cuts.extend((1..bins).map(|j| sorted[(j * n).div_ceil(bins) - 1]));
        cuts.push(hi);
        cuts.dedup();
        self.numeric_with_cuts(name, cuts, values)
    }

    /// A numeric feature on cuts the caller chose (see [`Kind::Numeric`]).
    pub fn numeric_with_cuts(&mut self, name: &str, cuts: Vec<f64>, values: &[f64]) -> Result<&mut Self, DriftError> {
        let kind = Kind::Numeric { cuts };
        let layout = Layout { features: vec![Feature { name: name.to_owned(), kind: kind.clone() }] };
        layout.check()?;
        let mut p = Profile::new(&layout, Some(crate::BASELINE_K), 0);
        for x in values {
            p.observe(&layout, 0, *x)?;
        }
        self.add(name, kind, p.features.remove(0))
    }

    /// A categorical feature: its most frequent distinct values (up to
    /// [`MAX_CATEGORIES`]) become its categories, the rest count as
    /// unseen; NaN counts as missing.
    pub fn categorical(&mut self, name: &str, values: &[f64]) -> Result<&mut Self, DriftError> {
        let mut sorted: Vec<f64> = values.iter().filter(|x| !x.is_nan()).map(|x| x + 0.0).collect();
        sorted.sort_unstable_by(f64::total_cmp);
        let mut freq: Vec<(f64, u64)> = Vec::new();
        for x in sorted.into_iter().filter(|x| x.is_finite()) {
            match freq.last_mut() {
                Some((v, c)) if *v == x => *c += 1,
                _ => freq.push((x, 1)),
            }
        }
        if freq.is_empty() {
            return Err(DriftError::NoValues { feature: name.to_owned() });
        }
        freq.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.total_cmp(&b.0)));
        freq.truncate(MAX_CATEGORIES);
        let mut categories: Vec<f64> = freq.into_iter().map(|(v, _)| v).collect();
        categories.sort_unstable_by(f64::total_cmp);
        let kind = Kind::Categorical { values: categories };
        let layout = Layout { features: vec![Feature { name: name.to_owned(), kind: kind.clone() }] };
        layout.check()?;
        let mut p = Profile::new(&layout, None, 0);
        for x in values {
            p.observe(&layout, 0, *x)?;
        }
        self.add(name, kind, p.features.remove(0))
    }

    /// A feature counted elsewhere on its final bins.
    pub(crate) fn profiled(&mut self, name: &str, kind: Kind, summary: Summary) -> Result<&mut Self, DriftError> {
        Layout::of(vec![Feature { name: name.to_owned(), kind: kind.clone() }])?;
        self.add(name, kind, summary)
    }

    /// An image input: `channels[c]` holds every reference pixel of
    /// channel `c`.
    pub fn image(&mut self, name: &str, channels: &[&[f32]]) -> Result<&mut Self, DriftError> {
        if channels.is_empty() || channels.len() > MAX_CHANNELS {
            return Err(too_many("channels", channels.len(), MAX_CHANNELS));
        }
        let kind = Kind::Image { channels: channels.len() as u16 };
        let layout = Layout { features: vec![Feature { name: name.to_owned(), kind: kind.clone() }] };
        let mut p = Profile::new(&layout, None, 0);
        for (c, pixels) in channels.iter().enumerate() {
            p.observe_channel(&layout, 0, c, pixels)?;
        }
        self.add(name, kind, p.features.remove(0))
    }

    /// A classifier's output over `classes` classes, from its answers on
    /// the reference data (see [`Profile::observe_scores`]).
    pub fn classes<'a>(
        &mut self,
        name: &str,
        classes: u32,
        answers: impl IntoIterator<Item = &'a [f32]>,
    ) -> Result<&mut Self, DriftError> {
        let kind = Kind::Classes { classes };
        let layout = Layout { features: vec![Feature { name: name.to_owned(), kind: kind.clone() }] };
        layout.check()?;
        let mut p = Profile::new(&layout, None, 0);
        for scores in answers {
            p.observe_scores(&layout, 0, scores)?;
        }
        self.add(name, kind, p.features.remove(0))
    }

    /// The baseline.
    pub fn build(self) -> Result<Baseline, DriftError> {
        Baseline::new(self.layout, Profile { features: self.profile })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline() -> Baseline {
        let values: Vec<f64> = (0..1000).map(f64::from).collect();
        let mut b = BaselineBuilder::new();
        b.numeric("x", &values, 10).unwrap();
        b.categorical("kind", &[1.0, 1.0, 2.0, 3.0]).unwrap();
        b.classes("out", 3, [[0.7f32, 0.2, 0.1].as_slice(), &[0.1, 0.8, 0.1]]).unwrap();
        b.image("pixels", &[&[0.5f32, 0.7], &[0.1, 0.3]]).unwrap();
        b.build().unwrap()
    }

    #[test]
    fn quantile_cuts_split_the_reference_evenly() {
        let b = baseline();
        let Kind::Numeric { cuts } = &b.layout.features()[0].kind else { panic!() };
        assert_eq!(cuts.len(), 11);
        assert_eq!(cuts[0], (0.0f64).next_down());
        assert_eq!(cuts[1], 99.0);
        assert_eq!(*cuts.last().unwrap(), 999.0);
        let Summary::Numeric(s) = &b.profile.features[0] else { panic!() };
        assert_eq!(s.counts[0], 0);
        assert_eq!(&s.counts[1..11], &[100; 10]);
        assert_eq!(s.counts[11], 0);
    }

    #[test]
    fn a_constant_feature_gets_below_at_and_above_bins() {
        let mut b = BaselineBuilder::new();
        b.numeric("c", &[4.0; 10], 10).unwrap();
        let b = b.build().unwrap();
        let mut w = b.window(None, 1);
        for x in [3.0, 4.0, 5.0, 4.0] {
            w.observe(&b.layout, 0, x).unwrap();
        }
        let Summary::Numeric(s) = &w.features[0] else { panic!() };
        assert_eq!(s.counts, vec![1, 2, 1]);
        assert_eq!(b.compare(&w).unwrap()[0].mean_shift, Some(0.0));
    }

    #[test]
    fn the_same_data_is_at_zero_distance() {
        let b = baseline();
        let mut w = b.window(Some(crate::BASELINE_K), 7);
        for x in 0..1000 {
            w.observe(&b.layout, 0, f64::from(x)).unwrap();
        }
        for x in [1.0, 1.0, 2.0, 3.0] {
            w.observe(&b.layout, 1, x).unwrap();
        }
        w.observe_scores(&b.layout, 2, &[0.7, 0.2, 0.1]).unwrap();
        w.observe_scores(&b.layout, 2, &[0.1, 0.8, 0.1]).unwrap();
        w.observe_channel(&b.layout, 3, 0, &[0.5, 0.7]).unwrap();
        w.observe_channel(&b.layout, 3, 1, &[0.1, 0.3]).unwrap();
        for d in b.compare(&w).unwrap() {
            for v in [d.psi, d.js, d.linf, d.mean_shift].into_iter().flatten() {
                assert!(v.abs() < 1e-12, "{d:?}");
            }
        }
    }

    #[test]
    fn unseen_categories_and_missing_values_are_counted() {
        let b = baseline();
        let mut w = b.window(None, 1);
        for x in [1.0, 9.0, f64::NAN, f64::INFINITY] {
            w.observe(&b.layout, 1, x).unwrap();
        }
        let Summary::Categorical(s) = &w.features[1] else { panic!() };
        assert_eq!(s.counts, vec![1, 0, 0, 2]);
        assert_eq!(s.missing, 1);
        w.observe(&b.layout, 0, f64::NAN).unwrap();
        let d = b.compare(&w).unwrap();
        assert_eq!(d[0].missing_rate, Some(1.0));
        assert_eq!(d[1].missing_rate, Some(0.25));
    }

    #[test]
    fn negative_zero_is_the_category_zero() {
        let mut b = BaselineBuilder::new();
        b.categorical("c", &[-0.0, 0.0, 0.0, 1.0]).unwrap();
        let b = b.build().unwrap();
        let mut w = b.window(None, 1);
        for x in [0.0, -0.0, 1.0] {
            w.observe(&b.layout, 0, x).unwrap();
        }
        let Summary::Categorical(s) = &w.features[0] else { panic!() };
        assert_eq!(s.counts, vec![2, 1, 0]);
    }

    #[test]
    fn a_decoded_missing_count_that_would_overflow_is_refused() {
        let b = baseline();
        let mut w = b.window(None, 1);
        w.observe(&b.layout, 0, 5.0).unwrap();
        let Summary::Numeric(s) = &mut w.features[0] else { panic!() };
        s.missing = u64::MAX;
        assert!(matches!(Profile::decode(&w.encode(), &b.layout), Err(DriftError::Invalid(_))));
    }

    #[test]
    fn logits_go_through_a_softmax() {
        let b = baseline();
        let mut w = b.window(None, 1);
        w.observe_scores(&b.layout, 2, &[0.0, 0.0, 10.0]).unwrap();
        w.observe_scores(&b.layout, 2, &[0.4, 0.3, 0.3]).unwrap();
        w.observe_scores(&b.layout, 2, &[f32::NAN, 0.0, 0.0]).unwrap();
        let Summary::Classes(s) = &w.features[2] else { panic!() };
        assert_eq!(s.counts, vec![1, 0, 1]);
        assert_eq!(s.confidence[9], 1);
        assert_eq!(s.confidence[4], 1);
        assert_eq!(s.missing, 1);
        assert_eq!(s.share_below(0.5), Some(0.5));
    }

    #[test]
    fn a_call_on_the_wrong_kind_is_refused() {
        let b = baseline();
        let mut w = b.window(None, 1);
        assert!(matches!(w.observe(&b.layout, 2, 1.0), Err(DriftError::WrongKind { .. })));
        assert!(matches!(w.observe(&b.layout, 9, 1.0), Err(DriftError::NoFeature(_))));
        assert!(matches!(w.observe_scores(&b.layout, 0, &[1.0]), Err(DriftError::WrongKind { .. })));
    }

    #[test]
    fn decode_refuses_what_does_not_fit() {
        let b = baseline();
        let back = Baseline::decode(&b.encode()).unwrap();
        assert_eq!(back, b);
        let mut w = b.window(Some(64), 1);
        w.observe(&b.layout, 0, 5.0).unwrap();
        assert_eq!(Profile::decode(&w.encode(), &b.layout).unwrap(), w);
        let mut bad = w.clone();
        let Summary::Numeric(s) = &mut bad.features[0] else { panic!() };
        s.counts[3] += 1;
        assert!(matches!(Profile::decode(&bad.encode(), &b.layout), Err(DriftError::Invalid(_))));
        let other = Layout { features: b.layout.features()[..2].to_vec() };
        assert!(Profile::decode(&w.encode(), &other).is_err());
        assert!(matches!(Profile::decode(&[0xff, 0xff], &b.layout), Err(DriftError::Decode(_))));
        let dup = Layout { features: vec![b.layout.features()[0].clone(), b.layout.features()[0].clone()] };
        assert!(matches!(dup.check(), Err(DriftError::DuplicateFeature(_))));
    }
}
