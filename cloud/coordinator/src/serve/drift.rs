//! The fleet's drift view of one model version (`GET
//! /v1/monitor/drift/{name}`, `tern monitor drift`): the devices' windows
//! of a recent span merged into one (counts add up: the merge of the
//! devices' summaries is the summary of their pooled requests), compared
//! with the full baseline under the version's constraints (imported, or
//! Model Monitor's suggested ones), and the same per time bucket for a
//! sparkline.

use super::State;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tern_drift::sagemaker::{Constraints, MonitoringConfig};
use tern_drift::{Kind, ModelBaseline, Profile};

/// What the view is asked for.
#[derive(Debug, Deserialize)]
pub struct Query {
    /// The version (default: the newest with windows).
    pub version: Option<u32>,
    /// Only devices of this group.
    pub group: Option<String>,
    /// Only this device.
    pub device: Option<String>,
    /// The span, in seconds back from now (default an hour).
    pub secs: Option<u64>,
    /// Buckets of the series (default 24, at most 96).
    pub buckets: Option<usize>,
}

/// One feature's row.
#[derive(Debug, Serialize)]
pub struct FeatureRow {
    /// Its name.
    pub feature: String,
    /// Its kind.
    pub kind: &'static str,
    /// Values the merged window counted.
    pub n: u64,
    /// The distance judged: L∞ (robust for numeric features unless the
    /// constraints say Simple; Jensen–Shannon where they say so for
    /// categories); the mean shift for an image.
    pub distance: Option<f64>,
    /// Its threshold.
    pub threshold: f64,
    /// `ok`, `drift` or `no data`.
    pub status: &'static str,
    /// PSI, for reference.
    pub psi: Option<f64>,
    /// Missing rate.
    pub missing_rate: Option<f64>,
    /// The distance per bucket, oldest first (`None`: no values then).
    pub series: Vec<Option<f64>>,
}

/// The view.
#[derive(Debug, Serialize)]
pub struct View {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u32,
    /// Devices with windows in the span.
    pub devices: usize,
    /// Windows merged.
    pub windows: usize,
    /// Rows they counted.
    pub rows: u64,
    /// The span (seconds) and bucket width.
    pub secs: u64,
    /// Seconds per bucket.
    pub bucket_secs: u64,
    /// Per feature.
    pub features: Vec<FeatureRow>,
}

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Numeric { .. } => "numeric",
        Kind::Categorical { .. } => "categorical",
        Kind::Image { .. } => "image",
        Kind::Classes { .. } => "classes",
    }
}

/// The distance judged for feature `i` and its threshold.
fn judged(model: &ModelBaseline, cons: &Constraints, i: usize, d: &tern_drift::Distances) -> (Option<f64>, f64) {
    let f = &model.baseline.layout.features()[i];
    let global = cons.monitoring_config.clone().unwrap_or_default();
    let over = cons.features.iter().find(|c| c.name == f.name).and_then(|c| c.monitoring_config_overrides.clone());
    let e = over.unwrap_or_else(MonitoringConfig::default).effective(Some(&global)).ok();
    let (robust, js, threshold, cat_threshold) = e.map_or((true, false, 0.1, 0.1), |e| {
        (e.robust, e.categorical_js, e.comparison_threshold, e.categorical_comparison_threshold)
    });
    match &f.kind {
        Kind::Categorical { .. } | Kind::Classes { .. } if js => (d.js, cat_threshold),
        Kind::Categorical { .. } | Kind::Classes { .. } => (d.linf, cat_threshold),
        Kind::Image { .. } => (d.mean_shift, 0.5),
        Kind::Numeric { .. } if robust => (d.linf_robust, threshold),
        Kind::Numeric { .. } => (d.linf, threshold),
    }
}

/// Builds the view. Blocks (reads the registry).
pub fn view(state: &Arc<State>, name: &str, q: &Query, now: u64) -> anyhow::Result<View> {
    let secs = q.secs.unwrap_or(3600).clamp(60, 90 * 86_400);
    let buckets = q.buckets.unwrap_or(24).clamp(1, 96);
    let all = state.registry.windows(name, q.version, q.device.as_deref())?;
    let version = match q.version {
        Some(v) => v,
        None => match all.iter().map(|w| w.version).max() {
            Some(v) => v,
            None => anyhow::bail!("no device has sent drift windows of {name}"),
        },
    };
    let model = state
        .baseline(name, version)
        .ok_or_else(|| anyhow::anyhow!("{name}:{version} has no baseline: register it with --baseline"))?;
    let record = state.registry.version(name, version)?;
    let cons = match record.constraints {
        Some(sha) => serde_json::from_slice(&std::fs::read(state.artifacts.path(&sha))?)?,
        None => Constraints::suggest(&model),
    };
    let mut groups = std::collections::HashMap::new();
    let from = now.saturating_sub(secs);
    let bucket_secs = secs.div_ceil(buckets as u64);
    let layout = &model.baseline.layout;
    let mut total = model.baseline.window(None, 0);
    let mut per_bucket = vec![model.baseline.window(None, 0); buckets];
    let (mut windows, mut rows) = (0, 0);
    let mut devices = std::collections::BTreeSet::new();
    // When the device closed it (its clock, never after the arrival): a
    // window buffered through an outage counts where it was made.
    let closed = |w: &tern_registry::StoredWindow| (w.at_ms / 1000).min(w.received_at);
    for w in all.iter().filter(|w| w.version == version && closed(w) >= from) {
        if let Some(g) = &q.group {
            let group = groups
                .entry(w.device.clone())
                .or_insert_with(|| state.registry.device(w.device.as_str()).map(|d| d.group).unwrap_or_default());
            if group != g {
                continue;
            }
        }
        if w.profile.is_empty() {
            continue;
        }
        let Ok(p) = Profile::decode(&w.profile, layout) else { continue };
        if total.merge(layout, &p).is_err() {
            continue;
        }
        let b = ((closed(w).saturating_sub(from) / bucket_secs) as usize).min(buckets - 1);
        let _ = per_bucket[b].merge(layout, &p);
        windows += 1;
        rows += w.rows;
        devices.insert(w.device.clone());
    }
    let distances = model.baseline.compare(&total)?;
    let series: Vec<Vec<tern_drift::Distances>> =
        per_bucket.iter().map(|p| model.baseline.compare(p)).collect::<Result<_, _>>()?;
    let features = distances
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (distance, threshold) = judged(&model, &cons, i, d);
            let status = match distance {
                None => "no data",
                Some(x) if x > threshold => "drift",
                Some(_) => "ok",
            };
            FeatureRow {
                feature: d.feature.clone(),
                kind: kind_name(&layout.features()[i].kind),
                n: d.n,
                distance,
                threshold,
                status,
                psi: d.psi,
                missing_rate: d.missing_rate,
                series: series.iter().map(|s| judged(&model, &cons, i, &s[i]).0).collect(),
            }
        })
        .collect();
    Ok(View { model: name.to_owned(), version, devices: devices.len(), windows, rows, secs, bucket_secs, features })
}
