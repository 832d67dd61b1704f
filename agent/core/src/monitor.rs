//! Drift windows and alert rules for one served model version, sans-IO: the
//! daemon feeds it each request's inputs and answer, run times and `now`
//! (milliseconds on a monotonic clock); it closes a window by row count or
//! by age, compares it with the version's baseline and says which alerts
//! were raised or cleared. Alerts have hysteresis: one is raised after
//! [`Rules::raise_windows`] windows in a row above its threshold and
//! cleared after [`Rules::clear_windows`] windows in a row below
//! [`Rules::clear_ratio`] of it, so a metric near its threshold does not
//! flap.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tern_drift::{Binding, Distances, Kind, ModelBaseline, Profile, Summary};
use tern_proto::{Tensor, TensorSpec};

/// Run times a window keeps for its p99 (more requests in one window are
/// counted but not timed).
pub const MAX_TIMED: usize = 65_536;

/// When windows close and what raises alerts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorConfig {
    /// A window closes when it has counted this many rows…
    pub window_rows: u64,
    /// …or is this old (milliseconds), whichever comes first.
    pub window_ms: u64,
    /// The alert rules.
    pub rules: Rules,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self { window_rows: 1000, window_ms: 5 * 60 * 1000, rules: Rules::default() }
    }
}

/// Alert thresholds, per window. A threshold of `None` turns its rule off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rules {
    /// An input feature's robust L∞ distance (Model Monitor's "Robust"
    /// comparison: the distance less the KS critical value) above this.
    pub feature_drift: Option<f64>,
    /// An image input's channel mean moved by more than this many of the
    /// baseline's standard deviations.
    pub image_shift: Option<f64>,
    /// A feature's missing rate above the baseline's by more than this.
    pub missing_rate: Option<f64>,
    /// An output's robust L∞ distance above this.
    pub output_drift: Option<f64>,
    /// The p99 run time above this many milliseconds.
    pub p99_ms: Option<f64>,
    /// The share of failed requests above this.
    pub error_rate: Option<f64>,
    /// The share of answers whose confidence is below
    /// [`Rules::confidence`] above the baseline's by more than this.
    pub low_confidence: Option<f64>,
    /// The confidence under which an answer counts as low.
    pub confidence: f64,
    /// Windows in a row above a threshold that raise its alert.
    pub raise_windows: u32,
    /// Windows in a row below `clear_ratio` × the threshold that clear it.
    pub clear_windows: u32,
    /// Where, as a share of the threshold, a raised alert starts counting
    /// towards clearing.
    pub clear_ratio: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            feature_drift: Some(0.1),
            image_shift: Some(0.5),
            missing_rate: Some(0.1),
            output_drift: Some(0.1),
            p99_ms: None,
            error_rate: Some(0.05),
            low_confidence: Some(0.1),
            confidence: 0.5,
            raise_windows: 1,
            clear_windows: 2,
            clear_ratio: 0.8,
        }
    }
}

impl Rules {
    /// Sets one rule from `NAME=VALUE` (`off` turns a threshold off), as
    /// the agent's `--alert` flag gives it.
    pub fn set(&mut self, setting: &str) -> Result<(), String> {
        let (name, value) = setting.split_once('=').ok_or_else(|| format!("{setting:?}: give NAME=VALUE"))?;
        let number = || match value.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
            _ => Err(format!("{name}: {value:?} is not a non-negative number")),
        };
        let threshold = || if value == "off" { Ok(None) } else { number().map(Some) };
        let count = || match value.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!("{name}: {value:?} is not a whole number of windows (1 or more)")),
        };
        match name {
            "feature_drift" => self.feature_drift = threshold()?,
            "image_shift" => self.image_shift = threshold()?,
            "missing_rate" => self.missing_rate = threshold()?,
            "output_drift" => self.output_drift = threshold()?,
            "p99_ms" => self.p99_ms = threshold()?,
            "error_rate" => self.error_rate = threshold()?,
            "low_confidence" => self.low_confidence = threshold()?,
            "confidence" => self.confidence = number()?.min(1.0),
            "raise_windows" => self.raise_windows = count()?,
            "clear_windows" => self.clear_windows = count()?,
            "clear_ratio" => self.clear_ratio = number()?.min(1.0),
            other => {
                return Err(format!(
                    "unknown alert setting {other:?} (feature_drift, image_shift, missing_rate, output_drift, p99_ms, error_rate, low_confidence, confidence, raise_windows, clear_windows, clear_ratio)"
                ));
            }
        }
        Ok(())
    }
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// [`Rules::feature_drift`] or [`Rules::image_shift`].
    FeatureDrift,
    /// [`Rules::missing_rate`].
    MissingRate,
    /// [`Rules::output_drift`].
    OutputDrift,
    /// [`Rules::p99_ms`].
    P99Latency,
    /// [`Rules::error_rate`].
    ErrorRate,
    /// [`Rules::low_confidence`].
    LowConfidence,
}

impl Rule {
    /// Its name, as telemetry and the APIs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Rule::FeatureDrift => "feature_drift",
            Rule::MissingRate => "missing_rate",
            Rule::OutputDrift => "output_drift",
            Rule::P99Latency => "p99_latency",
            Rule::ErrorRate => "error_rate",
            Rule::LowConfidence => "low_confidence",
        }
    }
}

/// One alert: a rule, on one feature (or the whole model).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AlertKey {
    /// The rule.
    pub rule: Rule,
    /// The feature it is about; empty for the model's latency and errors.
    pub feature: String,
}

/// Where one alert stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum AlertState {
    /// Not raised; `above` windows in a row were over the threshold.
    Quiet {
        /// Windows in a row over the threshold.
        above: u32,
    },
    /// Raised; `below` windows in a row were under the clearing level.
    Firing {
        /// Windows in a row under the clearing level.
        below: u32,
    },
}

/// What one window said about one alert's metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Over the threshold.
    Above,
    /// At or under the threshold, over the clearing level.
    Band,
    /// At or under the clearing level.
    Below,
    /// The window had nothing to measure it on.
    NoData,
}

/// A change of an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// It was raised.
    Raised,
    /// It was cleared.
    Cleared,
}

impl AlertState {
    /// The state after a window's reading, and the change it made.
    pub fn next(self, reading: Reading, rules: &Rules) -> (AlertState, Option<Change>) {
        match (reading, self) {
            (Reading::Above, AlertState::Quiet { above }) if above + 1 >= rules.raise_windows => {
                (AlertState::Firing { below: 0 }, Some(Change::Raised))
            }
            (Reading::Above, AlertState::Quiet { above }) => (AlertState::Quiet { above: above + 1 }, None),
            (Reading::Band | Reading::Below, AlertState::Quiet { .. }) => (AlertState::Quiet { above: 0 }, None),
            (Reading::Above | Reading::Band, AlertState::Firing { .. }) => (AlertState::Firing { below: 0 }, None),
            (Reading::Below, AlertState::Firing { below }) if below + 1 >= rules.clear_windows => {
                (AlertState::Quiet { above: 0 }, Some(Change::Cleared))
            }
            (Reading::Below, AlertState::Firing { below }) => (AlertState::Firing { below: below + 1 }, None),
            (Reading::NoData, state) => (state, None),
        }
    }
}

/// An alert that changed when a window closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// Which alert.
    pub key: AlertKey,
    /// Raised or cleared.
    pub change: Change,
    /// The metric in the window that changed it.
    pub value: f64,
    /// Its threshold.
    pub threshold: f64,
}

/// A closed window: what was counted, its distances from the baseline, and
/// what it did to the alerts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowReport {
    /// Windows closed before it, for this version.
    pub seq: u64,
    /// When it opened and closed (the caller's milliseconds).
    pub opened_ms: u64,
    /// When it closed.
    pub closed_ms: u64,
    /// Rows counted.
    pub rows: u64,
    /// Requests answered or failed.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Requests whose tensors did not fit the baseline's binding (not
    /// counted).
    pub skipped: u64,
    /// The p99 run time, microseconds (none without requests).
    pub p99_us: Option<u64>,
    /// Per feature.
    pub distances: Vec<Distances>,
    /// Alerts raised or cleared by it.
    pub changes: Vec<AlertEvent>,
    /// The window's summaries (mergeable; what a device sends).
    pub profile: Profile,
}

/// A version's drift windows and alerts.
pub struct Monitor {
    baseline: ModelBaseline,
    binding: Binding,
    config: MonitorConfig,
    seed: u64,
    seq: u64,
    window: Profile,
    opened_ms: u64,
    rows: u64,
    requests: u64,
    errors: u64,
    skipped: u64,
    timed_us: Vec<u64>,
    alerts: BTreeMap<AlertKey, AlertState>,
}

impl Monitor {
    /// Starts windowing a version with this baseline and signature at `now_ms`.
    /// `seed` draws the windows' sketch coins (give each device its own).
    pub fn new(
        baseline: ModelBaseline,
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
        config: MonitorConfig,
        seed: u64,
        now_ms: u64,
    ) -> Result<Self, tern_drift::DriftError> {
        let binding = baseline.bind(inputs, outputs)?;
        let window = baseline.baseline.window(Some(tern_drift::WINDOW_K), seed);
        Ok(Self {
            baseline,
            binding,
            config,
            seed,
            seq: 0,
            window,
            opened_ms: now_ms,
            rows: 0,
            requests: 0,
            errors: 0,
            skipped: 0,
            timed_us: Vec::new(),
            alerts: BTreeMap::new(),
        })
    }

    /// The baseline it compares with.
    pub fn baseline(&self) -> &ModelBaseline {
        &self.baseline
    }

    /// Whether its answers must be shown to it ([`Monitor::observe_outputs`]).
    pub fn reads_outputs(&self) -> bool {
        self.binding.reads_outputs()
    }

    /// Counts a request's inputs as it arrives.
    pub fn observe_inputs(&mut self, inputs: &[Tensor]) {
        match self.binding.observe_inputs(&self.baseline.baseline, &mut self.window, inputs) {
            Ok(rows) => self.rows += rows,
            Err(_) => self.skipped += 1,
        }
    }

    /// Counts a request's answer and how long the run took.
    pub fn observe_outputs(&mut self, outputs: &[Tensor], ran_us: u64) {
        self.ran(ran_us);
        if self.binding.observe_outputs(&self.baseline.baseline, &mut self.window, outputs).is_err() {
            self.skipped += 1;
        }
    }

    /// Counts a failed request.
    pub fn observe_error(&mut self, ran_us: u64) {
        self.ran(ran_us);
        self.errors += 1;
    }

    fn ran(&mut self, us: u64) {
        self.requests += 1;
        if self.timed_us.len() < MAX_TIMED {
            self.timed_us.push(us);
        }
    }

    /// The alerts raised now.
    pub fn firing(&self) -> impl Iterator<Item = &AlertKey> {
        self.alerts.iter().filter(|(_, s)| matches!(s, AlertState::Firing { .. })).map(|(k, _)| k)
    }

    /// Rows counted in the open window.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// When the open window closes by age.
    pub fn deadline_ms(&self) -> u64 {
        self.opened_ms.saturating_add(self.config.window_ms)
    }

    /// Closes the window if it is full or old at `now_ms`, and opens the
    /// next.
    pub fn poll(&mut self, now_ms: u64) -> Option<WindowReport> {
        (self.rows >= self.config.window_rows || now_ms >= self.deadline_ms()).then(|| self.close(now_ms))
    }

    /// Closes the window now, however full, and opens the next.
    pub fn close(&mut self, now_ms: u64) -> WindowReport {
        let fresh = self.baseline.baseline.window(Some(tern_drift::WINDOW_K), self.seed.wrapping_add(self.seq + 1));
        let profile = std::mem::replace(&mut self.window, fresh);
        let distances = self.baseline.baseline.compare(&profile).expect("a window on the baseline's own layout");
        let p99_us = p99(&mut self.timed_us);
        let mut report = WindowReport {
            seq: self.seq,
            opened_ms: self.opened_ms,
            closed_ms: now_ms,
            rows: self.rows,
            requests: self.requests,
            errors: self.errors,
            skipped: self.skipped,
            p99_us,
            distances,
            changes: Vec::new(),
            profile,
        };
        for (key, value, threshold) in self.readings(&report) {
            let rules = &self.config.rules;
            let reading = match value {
                None => Reading::NoData,
                Some(v) if v > threshold => Reading::Above,
                Some(v) if v > threshold * rules.clear_ratio => Reading::Band,
                Some(_) => Reading::Below,
            };
            let state = self.alerts.entry(key.clone()).or_insert(AlertState::Quiet { above: 0 });
            let (next, change) = state.next(reading, rules);
            *state = next;
            if let Some(change) = change {
                // Finite on the wire: a constant baseline channel gives an infinite shift.
                let value = value.map_or(0.0, |v| if v.is_nan() { 0.0 } else { v.clamp(-f64::MAX, f64::MAX) });
                report.changes.push(AlertEvent { key, change, value, threshold });
            }
        }
        self.seq += 1;
        self.opened_ms = now_ms;
        (self.rows, self.requests, self.errors, self.skipped) = (0, 0, 0, 0);
        self.timed_us.clear();
        report
    }

    /// Each rule's metric in a window (`None`: nothing to measure).
    fn readings(&self, w: &WindowReport) -> Vec<(AlertKey, Option<f64>, f64)> {
        let rules = &self.config.rules;
        let mut out = Vec::new();
        let key = |rule, feature: &str| AlertKey { rule, feature: feature.to_owned() };
        let features = self.baseline.baseline.layout.features();
        for (i, d) in w.distances.iter().enumerate() {
            let kind = &features[i].kind;
            let output = matches!(
                self.baseline.sources[i],
                tern_drift::Source::OutputScores { .. } | tern_drift::Source::OutputColumn { .. }
            );
            let base = &self.baseline.baseline.profile.features[i];
            match (kind, output) {
                (Kind::Image { .. }, _) => {
                    if let Some(t) = rules.image_shift {
                        out.push((key(Rule::FeatureDrift, &d.feature), d.mean_shift.map(f64::abs), t));
                    }
                }
                (_, false) => {
                    if let Some(t) = rules.feature_drift {
                        out.push((key(Rule::FeatureDrift, &d.feature), d.linf_robust, t));
                    }
                }
                (_, true) => {
                    if let Some(t) = rules.output_drift {
                        out.push((key(Rule::OutputDrift, &d.feature), d.linf_robust, t));
                    }
                }
            }
            if let Some(t) = rules.missing_rate
                && !matches!(kind, Kind::Image { .. })
            {
                let baseline_rate = missing_rate(base).unwrap_or(0.0);
                out.push((key(Rule::MissingRate, &d.feature), d.missing_rate.map(|r| r - baseline_rate), t));
            }
            if let (Some(t), Summary::Classes(b), Summary::Classes(c)) =
                (rules.low_confidence, base, &w.profile.features[i])
            {
                let now = c.share_below(rules.confidence);
                let then = b.share_below(rules.confidence).unwrap_or(0.0);
                out.push((key(Rule::LowConfidence, &d.feature), now.map(|s| s - then), t));
            }
        }
        if let Some(t) = rules.p99_ms {
            out.push((key(Rule::P99Latency, ""), w.p99_us.map(|us| us as f64 / 1000.0), t));
        }
        if let Some(t) = rules.error_rate {
            let rate = (w.requests > 0).then(|| w.errors as f64 / w.requests as f64);
            out.push((key(Rule::ErrorRate, ""), rate, t));
        }
        out
    }
}

fn missing_rate(s: &Summary) -> Option<f64> {
    let (missing, seen) = match s {
        Summary::Numeric(n) => (n.missing, n.moments.n),
        Summary::Categorical(c) => (c.missing, c.counts.iter().sum()),
        Summary::Classes(c) => (c.missing, c.counts.iter().sum()),
        Summary::Image(_) => return None,
    };
    let all = missing as f64 + seen as f64;
    (all > 0.0).then(|| missing as f64 / all)
}

/// The 99th percentile (nearest rank) of `xs`, reordering them.
fn p99(xs: &mut [u64]) -> Option<u64> {
    if xs.is_empty() {
        return None;
    }
    let rank = (xs.len() * 99).div_ceil(100).max(1) - 1;
    Some(*xs.select_nth_unstable(rank).1)
}
