//! SageMaker Model Monitor's files, field for field: `statistics.json` (a
//! baseline's statistics, with KLL sketches), `constraints.json` (what a
//! dataset must satisfy) and `constraint_violations.json` (what it did
//! not). Unknown fields are refused rather than dropped, so a file of
//! another schema is an error that names the place (serde_json's line and
//! column) and an import followed by an export loses nothing.

use crate::profile::{CategoricalSummary, Feature, Kind, Layout, NumericSummary, Profile, Summary};
use crate::{Baseline, DriftError, Kll, ModelBaseline, Moments, Source};
use serde::{Deserialize, Serialize};

/// `statistics.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statistics {
    /// The schema's version (0).
    pub version: f64,
    /// Dataset-level statistics.
    pub dataset: Dataset,
    /// Per feature.
    pub features: Vec<FeatureStatistics>,
}

/// `statistics.json`'s `dataset`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    /// Rows in the dataset.
    pub item_count: f64,
}

/// How Model Monitor typed a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InferredType {
    /// Whole numbers.
    Integral,
    /// Other numbers.
    Fractional,
    /// Text (Tern reads it as category codes).
    String,
    /// Not typed.
    Unknown,
}

/// One feature's statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureStatistics {
    /// The column's name.
    pub name: String,
    /// Its type.
    pub inferred_type: InferredType,
    /// For `Integral` and `Fractional`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numerical_statistics: Option<NumericalStatistics>,
    /// For `String`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string_statistics: Option<StringStatistics>,
}

/// Present and missing counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Common {
    /// Values present.
    pub num_present: f64,
    /// Values missing.
    pub num_missing: f64,
}

/// A numeric feature's statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumericalStatistics {
    /// Counts.
    pub common: Common,
    /// Mean of the present values.
    pub mean: f64,
    /// Their sum.
    pub sum: f64,
    /// Their (population) standard deviation.
    pub std_dev: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
    /// Buckets and sketch.
    pub distribution: NumericDistribution,
}

/// `distribution` of a numeric feature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumericDistribution {
    /// The KLL sketch and buckets from it.
    pub kll: KllDistribution,
}

/// `distribution.kll`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KllDistribution {
    /// Counts between bounds.
    pub buckets: Vec<Bucket>,
    /// The sketch.
    pub sketch: SketchData,
}

/// One bucket of a numeric distribution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    /// Its lower bound.
    pub lower_bound: f64,
    /// Its upper bound.
    pub upper_bound: f64,
    /// Values in it.
    pub count: f64,
}

/// `sketch`: its parameters and levels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SketchData {
    /// `c` and `k`.
    pub parameters: SketchParameters,
    /// Items per level, level 0 first (an item of level `h` weighs `2^h`).
    pub data: Vec<Vec<f64>>,
}

/// A KLL sketch's parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SketchParameters {
    /// How much smaller each level is than the one above it.
    pub c: f64,
    /// The top level's size.
    pub k: f64,
}

/// A string feature's statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringStatistics {
    /// Counts.
    pub common: Common,
    /// Distinct values.
    pub distinct_count: f64,
    /// Per value.
    pub distribution: StringDistribution,
}

/// `distribution` of a string feature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringDistribution {
    /// Its values.
    pub categorical: Categorical,
}

/// `distribution.categorical`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Categorical {
    /// One per value.
    pub buckets: Vec<ValueCount>,
}

/// One value of a string feature and its count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueCount {
    /// The value.
    pub value: String,
    /// How often it appeared.
    pub count: f64,
}

/// `constraints.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// The schema's version (0).
    pub version: f64,
    /// Per feature.
    pub features: Vec<FeatureConstraints>,
    /// How datasets are checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitoring_config: Option<MonitoringConfig>,
}

/// One feature's constraints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureConstraints {
    /// The column's name.
    pub name: String,
    /// Its type.
    pub inferred_type: InferredType,
    /// The share of values that must be present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completeness: Option<f64>,
    /// Numeric constraints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_constraints: Option<NumConstraints>,
    /// String constraints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string_constraints: Option<StringConstraints>,
    /// This feature's own settings, in place of `monitoring_config`'s.
    #[serde(default, rename = "monitoringConfigOverrides", skip_serializing_if = "Option::is_none")]
    pub monitoring_config_overrides: Option<MonitoringConfig>,
}

/// `num_constraints`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumConstraints {
    /// Whether every value must be ≥ 0 (kept; Model Monitor lists no
    /// violation type for it, and Tern checks none).
    pub is_non_negative: bool,
}

/// `string_constraints`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringConstraints {
    /// The values seen in the baseline.
    pub domains: Vec<String>,
}

/// `monitoring_config` (and a feature's overrides of it). Absent fields
/// take Model Monitor's defaults ([`MonitoringConfig::effective`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringConfig {
    /// `Enabled` or `Disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluate_constraints: Option<String>,
    /// `Enabled` or `Disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_metrics: Option<String>,
    /// The share of values of the baseline's type a column must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datatype_check_threshold: Option<f64>,
    /// The share of a string column's values that must be in its domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_content_threshold: Option<f64>,
    /// The drift check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution_constraints: Option<DistributionConstraints>,
}

/// `distribution_constraints`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributionConstraints {
    /// `Enabled` or `Disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perform_comparison: Option<String>,
    /// The L∞ distance above which a numeric feature has drifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison_threshold: Option<f64>,
    /// `Simple` (the distance) or `Robust` (less the KS critical value).
    /// Model Monitor's own documentation spells it `comparion_method`;
    /// both are read.
    #[serde(default, alias = "comparion_method", skip_serializing_if = "Option::is_none")]
    pub comparison_method: Option<String>,
    /// The distance above which a categorical feature has drifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub categorical_comparison_threshold: Option<f64>,
    /// `LInfinity` or `JensenShannonDivergence`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub categorical_drift_method: Option<String>,
}

/// The settings a check uses, Model Monitor's defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Effective {
    /// Constraints are checked at all.
    pub evaluate: bool,
    /// See [`MonitoringConfig::datatype_check_threshold`].
    pub datatype_check_threshold: f64,
    /// See [`MonitoringConfig::domain_content_threshold`].
    pub domain_content_threshold: f64,
    /// Drift is checked.
    pub compare: bool,
    /// See [`DistributionConstraints::comparison_threshold`].
    pub comparison_threshold: f64,
    /// `Robust` (true) or `Simple`.
    pub robust: bool,
    /// See [`DistributionConstraints::categorical_comparison_threshold`].
    pub categorical_comparison_threshold: f64,
    /// Jensen–Shannon (true) or L∞ for categories.
    pub categorical_js: bool,
}

impl MonitoringConfig {
    /// `self` over `base` (a feature's overrides over the file's config),
    /// then Model Monitor's defaults.
    pub fn effective(&self, base: Option<&MonitoringConfig>) -> Result<Effective, DriftError> {
        let d = |c: &MonitoringConfig| c.distribution_constraints.clone().unwrap_or_default();
        let (own, under) = (d(self), base.map(d).unwrap_or_default());
        let pick_s = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        let enabled = |v: Option<String>, what: &str| match v.as_deref() {
            None | Some("Enabled") => Ok(true),
            Some("Disabled") => Ok(false),
            Some(other) => {
                Err(DriftError::Invalid(format!("{what}: {other:?} is neither \"Enabled\" nor \"Disabled\"")))
            }
        };
        let evaluate = enabled(
            pick_s(&self.evaluate_constraints, &base.and_then(|b| b.evaluate_constraints.clone())),
            "evaluate_constraints",
        )?;
        let compare = enabled(pick_s(&own.perform_comparison, &under.perform_comparison), "perform_comparison")?;
        let robust = match pick_s(&own.comparison_method, &under.comparison_method).as_deref() {
            None | Some("Robust") => true,
            Some("Simple") => false,
            Some(other) => return Err(DriftError::Invalid(format!("comparison_method: {other:?} (Simple or Robust)"))),
        };
        let categorical_js = match pick_s(&own.categorical_drift_method, &under.categorical_drift_method).as_deref() {
            None | Some("LInfinity") => false,
            Some("JensenShannonDivergence") => true,
            Some(other) => {
                return Err(DriftError::Invalid(format!(
                    "categorical_drift_method: {other:?} (LInfinity or JensenShannonDivergence)"
                )));
            }
        };
        let num = |a: Option<f64>, b: Option<f64>, default: f64| a.or(b).unwrap_or(default);
        Ok(Effective {
            evaluate,
            datatype_check_threshold: num(
                self.datatype_check_threshold,
                base.and_then(|b| b.datatype_check_threshold),
                1.0,
            ),
            domain_content_threshold: num(
                self.domain_content_threshold,
                base.and_then(|b| b.domain_content_threshold),
                1.0,
            ),
            compare,
            comparison_threshold: num(own.comparison_threshold, under.comparison_threshold, 0.1),
            robust,
            categorical_comparison_threshold: num(
                own.categorical_comparison_threshold,
                under.categorical_comparison_threshold,
                0.1,
            ),
            categorical_js,
        })
    }
}

/// `constraint_violations.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Violations {
    /// Each violation.
    pub violations: Vec<Violation>,
}

/// One violation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Violation {
    /// The feature.
    pub feature_name: String,
    /// `data_type_check`, `completeness_check`, `baseline_drift_check`,
    /// `missing_column_check`, `extra_column_check` or
    /// `categorical_values_check`.
    pub constraint_check_type: String,
    /// What was found.
    pub description: String,
}

impl Violation {
    /// A violation of `check` by `feature`.
    pub fn new(feature: &str, check: &str, description: String) -> Self {
        Self { feature_name: feature.to_owned(), constraint_check_type: check.to_owned(), description }
    }
}

fn numeric_code(value: &str, feature: &str) -> Result<f64, DriftError> {
    value.trim().parse::<f64>().ok().filter(|v| v.is_finite()).ok_or_else(|| {
        DriftError::Invalid(format!(
            "feature {feature:?}: category {value:?} is not a number (Tern's inputs are tensors: categories are numeric codes)"
        ))
    })
}

fn count(x: f64, what: &str, feature: &str) -> Result<u64, DriftError> {
    if x.is_finite() && x >= 0.0 && x < 2f64.powi(63) {
        Ok(x.round() as u64)
    } else {
        Err(DriftError::Invalid(format!("feature {feature:?}: {what} {x} is not a count")))
    }
}

/// Spreads `total` over `weights` in proportion, rounding so that the
/// parts add up to it exactly (largest remainders).
fn apportion(weights: &[f64], total: u64) -> Vec<u64> {
    let sum: f64 = weights.iter().sum();
    if sum <= 0.0 {
        return vec![0; weights.len()];
    }
    let exact: Vec<f64> = weights.iter().map(|w| w / sum * total as f64).collect();
    let mut parts: Vec<u64> = exact.iter().map(|x| x.floor() as u64).collect();
    let mut short = total.saturating_sub(parts.iter().sum());
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|a, b| (exact[*b] - exact[*b].floor()).total_cmp(&(exact[*a] - exact[*a].floor())));
    for i in order.into_iter().cycle().take(weights.len() * 2) {
        if short == 0 {
            break;
        }
        parts[i] += 1;
        short -= 1;
    }
    parts
}

impl Statistics {
    /// A baseline from Model Monitor's statistics, each feature read from
    /// the column of `input` at its position in the file. Numeric features
    /// are binned on the file's buckets (bucket `i` becomes the bin
    /// `(upper_{i-1}, upper_i]`, the first one `[lower_0, upper_0]`, with
    /// one empty bin below and one above: Model Monitor's buckets are
    /// contiguous) with its counts spread to add up to
    /// `num_present` (Model Monitor's come from the sketch and may not);
    /// the KLL sketch is kept where its weights add up to `num_present`.
    /// String features become categorical ones whose values must be
    /// numeric codes. Returns the baseline and what was left out.
    pub fn to_baseline(&self, input: &str) -> Result<(ModelBaseline, Vec<String>), DriftError> {
        let mut features = Vec::new();
        let mut summaries = Vec::new();
        let mut sources = Vec::new();
        let mut notes = Vec::new();
        for (column, f) in self.features.iter().enumerate() {
            let name = &f.name;
            let bad = |why: String| DriftError::Invalid(format!("feature {name:?}: {why}"));
            let (kind, summary) = match (&f.numerical_statistics, &f.string_statistics) {
                (Some(s), None) => {
                    let n = count(s.common.num_present, "num_present", name)?;
                    let missing = count(s.common.num_missing, "num_missing", name)?;
                    let buckets = &s.distribution.kll.buckets;
                    if buckets.is_empty() || buckets.len() > crate::MAX_BINS - 2 {
                        return Err(bad(format!("{} buckets (1 to {})", buckets.len(), crate::MAX_BINS - 2)));
                    }
                    let mut cuts = vec![buckets[0].lower_bound.next_down()];
                    cuts.extend(buckets.iter().map(|b| b.upper_bound));
                    if !cuts.iter().all(|c| c.is_finite()) || !cuts.windows(2).all(|w| w[0] < w[1]) {
                        return Err(bad("bucket bounds are not finite and increasing".into()));
                    }
                    let weights: Vec<f64> = buckets.iter().map(|b| b.count.max(0.0)).collect();
                    let mut counts = vec![0];
                    counts.extend(apportion(&weights, n));
                    counts.push(0);
                    let var = s.std_dev * s.std_dev;
                    let moments = if n == 0 {
                        Moments::default()
                    } else {
                        Moments { n, mean: s.mean, m2: var * n as f64, min: s.min, max: s.max }
                    };
                    let sketch = match Kll::from_levels(
                        s.distribution.kll.sketch.parameters.k as u16,
                        s.distribution.kll.sketch.data.clone(),
                    ) {
                        Ok(k) if k.n() == n => Some(k),
                        Ok(k) => {
                            notes.push(format!("{name}: sketch of {} values for {n} present: left out", k.n()));
                            None
                        }
                        Err(e) => {
                            notes.push(format!("{name}: sketch left out: {e}"));
                            None
                        }
                    };
                    (Kind::Numeric { cuts }, Summary::Numeric(NumericSummary { counts, moments, missing, sketch }))
                }
                (None, Some(s)) => {
                    let missing = count(s.common.num_missing, "num_missing", name)?;
                    let mut values: Vec<(f64, u64)> = s
                        .distribution
                        .categorical
                        .buckets
                        .iter()
                        .map(|b| Ok((numeric_code(&b.value, name)? + 0.0, count(b.count, "count", name)?)))
                        .collect::<Result<_, DriftError>>()?;
                    values.sort_by(|a, b| a.0.total_cmp(&b.0));
                    if values.windows(2).any(|w| w[0].0 == w[1].0) {
                        return Err(bad("a category appears twice".into()));
                    }
                    if values.len() > crate::MAX_CATEGORIES {
                        return Err(bad(format!("{} categories (at most {})", values.len(), crate::MAX_CATEGORIES)));
                    }
                    let mut counts: Vec<u64> = values.iter().map(|v| v.1).collect();
                    counts.push(0);
                    (
                        Kind::Categorical { values: values.iter().map(|v| v.0).collect() },
                        Summary::Categorical(CategoricalSummary { counts, missing }),
                    )
                }
                _ => return Err(bad("needs exactly one of numerical_statistics and string_statistics".into())),
            };
            features.push(Feature { name: name.clone(), kind });
            summaries.push(summary);
            sources.push(Source::InputColumn { input: input.to_owned(), column: column as u32 });
        }
        let baseline = Baseline::new(Layout::of(features)?, Profile { features: summaries })?;
        Ok((ModelBaseline::new(baseline, sources)?, notes))
    }

    /// Model Monitor's statistics of a baseline's numeric and categorical
    /// features (images and model outputs have no counterpart, and are
    /// left out: their names are returned). A numeric feature's buckets are
    /// its bins that hold the reference range (the first one's lower bound
    /// is the smallest value); a categorical one's values are written as
    /// numbers.
    pub fn of(model: &ModelBaseline) -> (Statistics, Vec<String>) {
        let b = &model.baseline;
        let mut features = Vec::new();
        let mut left_out = Vec::new();
        let mut rows = 0u64;
        for ((f, s), source) in b.layout.features().iter().zip(&b.profile.features).zip(&model.sources) {
            if !matches!(source, Source::InputColumn { .. }) {
                left_out.push(f.name.clone());
                continue;
            }
            match (&f.kind, s) {
                (Kind::Numeric { cuts }, Summary::Numeric(n)) => {
                    rows = rows.max(n.moments.n + n.missing);
                    let m = &n.moments;
                    let mut buckets = Vec::new();
                    // Contiguous, as Model Monitor's: each lower bound is the
                    // upper bound before it; the first is the smallest value.
                    for i in 1..cuts.len() {
                        let lower_bound = if i == 1 { cuts[0].next_up() } else { cuts[i - 1] };
                        buckets.push(Bucket { lower_bound, upper_bound: cuts[i], count: n.counts[i] as f64 });
                    }
                    let sketch = n.sketch.as_ref();
                    let integral = m.n > 0
                        && sketch.is_some_and(|k| k.levels().flatten().all(|x| x.fract() == 0.0))
                        && m.min.fract() == 0.0
                        && m.max.fract() == 0.0;
                    features.push(FeatureStatistics {
                        name: f.name.clone(),
                        inferred_type: if integral { InferredType::Integral } else { InferredType::Fractional },
                        numerical_statistics: Some(NumericalStatistics {
                            common: Common { num_present: m.n as f64, num_missing: n.missing as f64 },
                            mean: m.mean,
                            sum: m.sum(),
                            std_dev: m.std_dev(),
                            min: m.min,
                            max: m.max,
                            distribution: NumericDistribution {
                                kll: KllDistribution {
                                    buckets,
                                    sketch: SketchData {
                                        parameters: SketchParameters {
                                            c: crate::kll::SHRINK,
                                            k: f64::from(sketch.map_or(crate::BASELINE_K, |k| k.k())),
                                        },
                                        data: sketch
                                            .map_or_else(Vec::new, |k| k.levels().map(<[f64]>::to_vec).collect()),
                                    },
                                },
                            },
                        }),
                        string_statistics: None,
                    });
                }
                (Kind::Categorical { values }, Summary::Categorical(c)) => {
                    let seen: u64 = c.counts.iter().sum();
                    rows = rows.max(seen + c.missing);
                    let buckets: Vec<ValueCount> = values
                        .iter()
                        .zip(&c.counts)
                        .map(|(v, n)| ValueCount { value: format!("{v}"), count: *n as f64 })
                        .collect();
                    features.push(FeatureStatistics {
                        name: f.name.clone(),
                        inferred_type: InferredType::String,
                        numerical_statistics: None,
                        string_statistics: Some(StringStatistics {
                            common: Common { num_present: seen as f64, num_missing: c.missing as f64 },
                            distinct_count: values.len() as f64,
                            distribution: StringDistribution { categorical: Categorical { buckets } },
                        }),
                    });
                }
                _ => left_out.push(f.name.clone()),
            }
        }
        (Statistics { version: 0.0, dataset: Dataset { item_count: rows as f64 }, features }, left_out)
    }
}

fn completeness(s: &Summary) -> Option<f64> {
    let (missing, seen) = match s {
        Summary::Numeric(n) => (n.missing, n.moments.n),
        Summary::Categorical(c) => (c.missing, c.counts.iter().sum()),
        _ => return None,
    };
    let all = missing + seen;
    (all > 0).then(|| seen as f64 / all as f64)
}

impl Constraints {
    /// What Model Monitor's baselining job suggests for a baseline: each
    /// feature's completeness as observed, `is_non_negative` from its
    /// minimum, a categorical feature's values as its domain, and the
    /// default monitoring config (Robust, thresholds 0.1).
    pub fn suggest(model: &ModelBaseline) -> Self {
        let (stats, _) = Statistics::of(model);
        let b = &model.baseline;
        let features = stats
            .features
            .iter()
            .map(|f| {
                let i = b.layout.index(&f.name).expect("a feature of the baseline");
                let s = &b.profile.features[i];
                FeatureConstraints {
                    name: f.name.clone(),
                    inferred_type: f.inferred_type,
                    completeness: completeness(s),
                    num_constraints: f
                        .numerical_statistics
                        .as_ref()
                        .map(|n| NumConstraints { is_non_negative: n.common.num_present == 0.0 || n.min >= 0.0 }),
                    string_constraints: f.string_statistics.as_ref().map(|s| StringConstraints {
                        domains: s.distribution.categorical.buckets.iter().map(|b| b.value.clone()).collect(),
                    }),
                    monitoring_config_overrides: None,
                }
            })
            .collect();
        Constraints {
            version: 0.0,
            features,
            monitoring_config: Some(MonitoringConfig {
                evaluate_constraints: Some("Enabled".into()),
                emit_metrics: Some("Enabled".into()),
                datatype_check_threshold: Some(1.0),
                domain_content_threshold: Some(1.0),
                distribution_constraints: Some(DistributionConstraints {
                    perform_comparison: Some("Enabled".into()),
                    comparison_threshold: Some(0.1),
                    comparison_method: Some("Robust".into()),
                    categorical_comparison_threshold: Some(0.1),
                    categorical_drift_method: Some("LInfinity".into()),
                }),
            }),
        }
    }

    /// Checks that every feature named is one of the baseline's, and that
    /// every setting is one Model Monitor knows.
    pub fn check(&self, model: &ModelBaseline) -> Result<(), DriftError> {
        let global = self.monitoring_config.clone().unwrap_or_default();
        global.effective(None)?;
        for f in &self.features {
            if model.baseline.layout.index(&f.name).is_none() {
                return Err(DriftError::NoFeature(format!("{:?} (named in the constraints)", f.name)));
            }
            if let Some(c) = f.completeness
                && !(0.0..=1.0).contains(&c)
            {
                return Err(DriftError::Invalid(format!("feature {:?}: completeness {c} is not in [0, 1]", f.name)));
            }
            f.monitoring_config_overrides.clone().unwrap_or_default().effective(Some(&global))?;
        }
        Ok(())
    }

    /// The violations of a window (a profile on `model`'s layout) against
    /// these constraints and the baseline: completeness, drift, values
    /// outside a categorical feature's domain.
    pub fn violations(&self, model: &ModelBaseline, window: &Profile) -> Result<Violations, DriftError> {
        self.check(model)?;
        let global = self.monitoring_config.clone().unwrap_or_default();
        let distances = model.baseline.compare(window)?;
        let mut out = Vec::new();
        for f in &self.features {
            let i = model.baseline.layout.index(&f.name).expect("checked");
            let e = f.monitoring_config_overrides.clone().unwrap_or_default().effective(Some(&global))?;
            if !e.evaluate {
                continue;
            }
            let d = &distances[i];
            let w = &window.features[i];
            if let (Some(want), Some(got)) = (f.completeness, completeness(w))
                && got < want
            {
                out.push(Violation::new(
                    &f.name,
                    "completeness_check",
                    format!("Data completeness {got:.6} is below the baseline's {want:.6}"),
                ));
            }
            if let (Summary::Categorical(c), Some(_)) = (w, &f.string_constraints) {
                let seen: u64 = c.counts.iter().sum();
                let unseen = *c.counts.last().unwrap_or(&0);
                if seen > 0 {
                    let inside = 1.0 - unseen as f64 / seen as f64;
                    if inside < e.domain_content_threshold {
                        out.push(Violation::new(
                            &f.name,
                            "categorical_values_check",
                            format!(
                                "{:.6} of the values are in the baseline's domain, below the threshold {}",
                                inside, e.domain_content_threshold
                            ),
                        ));
                    }
                }
            }
            if !e.compare {
                continue;
            }
            let (distance, threshold, method) = match &model.baseline.layout.features()[i].kind {
                Kind::Categorical { .. } if e.categorical_js => {
                    (d.js, e.categorical_comparison_threshold, "Jensen-Shannon divergence")
                }
                Kind::Categorical { .. } => (d.linf, e.categorical_comparison_threshold, "L-infinity distance"),
                _ if e.robust => (d.linf_robust, e.comparison_threshold, "robust L-infinity distance"),
                _ => (d.linf, e.comparison_threshold, "L-infinity distance"),
            };
            if let Some(x) = distance
                && x > threshold
            {
                out.push(Violation::new(
                    &f.name,
                    "baseline_drift_check",
                    format!("Baseline drift {method}: {x:.6} exceeds threshold: {threshold}"),
                ));
            }
        }
        Ok(Violations { violations: out })
    }
}
