//! Drift statistics without I/O: a model's training baseline, streaming
//! windows on the baseline's bins, mergeable summaries and the distances
//! between them (PSI, Kolmogorov–Smirnov, Jensen–Shannon, Model Monitor's
//! L∞, mean shift). The formulas are in docs/drift.md.

pub mod distance;
pub mod kll;
pub mod model;
pub mod moments;
mod profile;
pub mod quality;
pub mod sagemaker;

pub use distance::{DEFAULT_C_ALPHA, PSI_FLOOR};
pub use kll::Kll;
pub use model::{Binding, Collector, ModelBaseline, Plan, Source};
pub use moments::Moments;
pub use profile::{
    Baseline, BaselineBuilder, CONFIDENCE_BINS, CategoricalSummary, ClassSummary, Distances, Feature, Kind, Layout,
    NumericSummary, Profile, Summary,
};

/// Bins a numeric feature may have.
pub const MAX_BINS: usize = 64;
/// Categories a categorical feature may list (the rest count as unseen).
pub const MAX_CATEGORIES: usize = 256;
/// Classes a classifier's output may have.
pub const MAX_CLASSES: usize = 4096;
/// Channels an image input may have.
pub const MAX_CHANNELS: usize = 64;
/// Features (inputs and outputs) a layout may have.
pub const MAX_FEATURES: usize = 4096;
/// The `k` of a baseline's sketches: a rank error of about 0.1 %.
pub const BASELINE_K: u16 = 2048;
/// The `k` of a window's sketches on a device: a rank error of about 1 %.
pub const WINDOW_K: u16 = 200;
/// Bins a numeric feature gets when the caller does not say.
pub const DEFAULT_BINS: usize = 10;

/// What can go wrong building, merging, comparing or decoding summaries.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    /// A feature of the reference data had no finite value to place bins by.
    #[error("feature {feature:?} has no finite value in the reference data")]
    NoValues {
        /// The feature's name.
        feature: String,
    },
    /// A caller asked for more bins, categories, classes, channels or
    /// features than a summary may hold.
    #[error("{what}: {got} is over the limit of {max}")]
    TooMany {
        /// What there were too many of.
        what: String,
        /// How many were asked for.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// Two features in a layout have the same name.
    #[error("feature {0:?} appears twice")]
    DuplicateFeature(String),
    /// A feature index or name that the layout does not have.
    #[error("no feature {0} in the layout")]
    NoFeature(String),
    /// A value or call that does not match the feature's kind.
    #[error("feature {feature:?} is {kind}, not {wanted}")]
    WrongKind {
        /// The feature's name.
        feature: String,
        /// Its kind.
        kind: &'static str,
        /// The kind the call needed.
        wanted: &'static str,
    },
    /// A summary (decoded, or given to merge) that does not fit the layout
    /// or is not self-consistent.
    #[error("summary does not fit its layout: {0}")]
    Invalid(String),
    /// Bytes that are not an encoded summary or layout.
    #[error("cannot decode drift summary: {0}")]
    Decode(#[from] postcard::Error),
}
