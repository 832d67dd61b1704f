//! Device telemetry in the registry: drift windows per model version and
//! device (the latest [`WINDOWS_KEPT`]), and alerts raised and cleared,
//! acknowledged by operators (the latest [`ALERTS_KEPT`]), model-quality
//! windows (with alerts the coordinator raises on them under
//! [`QualityRules`]) and captured samples (the latest [`CAPTURES_KEPT`] per
//! version). A record is kept once: its key is
//! the device, its record stream and its id, and ids at or below the
//! stream's last stored one are dropped as sent again.

use crate::store::{decode, encode};
use crate::{Registry, Result};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::TransactionalTree;
use tern_proto::{AlertChange, DeviceId, QualityCounts, TelemetryBatch, TelemetryBody};

/// Marks the alert stored under `id` cleared at `at_ms`; it, as now stored.
fn clear(alerts: &TransactionalTree, id: &[u8], at_ms: u64) -> std::result::Result<Option<Alert>, TxError> {
    if let Some(raw) = alerts.get(id)? {
        // One that does not read back is left as it is.
        if let Ok(mut alert) = decode::<Alert>(id, &raw) {
            alert.cleared_at_ms = Some(at_ms);
            alerts.insert(id, encode(&alert))?;
            return Ok(Some(alert));
        }
    }
    Ok(None)
}

/// Windows kept per model version and device; older ones are dropped.
pub const WINDOWS_KEPT: usize = 2016;

/// A drift window as the coordinator keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredWindow {
    /// The device.
    pub device: DeviceId,
    /// Its record id on the device.
    #[serde(default)]
    pub record: u64,
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u32,
    /// When the device closed it (its clock, Unix milliseconds).
    pub at_ms: u64,
    /// When the coordinator took it (Unix seconds).
    pub received_at: u64,
    /// How long it was open (milliseconds).
    pub millis: u64,
    /// Rows counted.
    pub rows: u64,
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// p99 run time (microseconds).
    pub p99_us: Option<u64>,
    /// The window's summaries (`tern_drift::Profile`, postcard).
    pub profile: Vec<u8>,
}

/// An alert raised on a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Its id in the registry.
    pub id: u64,
    /// The device.
    pub device: DeviceId,
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u32,
    /// The rule.
    pub rule: String,
    /// The feature (empty: the whole model).
    pub feature: String,
    /// The metric that raised it, and its threshold.
    pub value: f64,
    /// Its threshold.
    pub threshold: f64,
    /// When it was raised (device clock, Unix milliseconds).
    pub raised_at_ms: u64,
    /// When it was cleared, if it was.
    pub cleared_at_ms: Option<u64>,
    /// When an operator acknowledged it (Unix seconds).
    pub acked_at: Option<u64>,
}

/// A model-quality window as the coordinator keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredQuality {
    /// The device.
    pub device: DeviceId,
    /// Its record id on the device.
    pub record: u64,
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u32,
    /// When the device closed it (its clock, never after the arrival; Unix
    /// milliseconds).
    pub at_ms: u64,
    /// When the coordinator took it (Unix seconds).
    pub received_at: u64,
    /// How long it was open (milliseconds).
    pub millis: u64,
    /// What it counted.
    pub counts: QualityCounts,
}

/// A captured request and answer as the coordinator keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCapture {
    /// The device.
    pub device: DeviceId,
    /// Its record id on the device.
    pub record: u64,
    /// When the device captured it (its clock, Unix milliseconds).
    pub at_ms: u64,
    /// When the coordinator took it (Unix seconds).
    pub received_at: u64,
    /// The inference id the app was answered with.
    pub inference_id: String,
    /// The inputs, a binary tensor body.
    pub inputs: Vec<u8>,
    /// The outputs, a binary tensor body.
    pub outputs: Vec<u8>,
}

/// Captured samples kept per model version; older ones are dropped.
pub const CAPTURES_KEPT: usize = 10_000;

/// When the coordinator raises and clears an alert on a device's quality
/// window (rules `accuracy`, `f1`: below the threshold; `rmse`: above it).
/// An alert clears on a window back past the clearing level: a quarter of
/// the way from the threshold to a perfect score for accuracy and F1, 0.8
/// × the threshold for RMSE, so that a metric hovering at the threshold
/// does not flap. Windows with fewer than `min_rows` pairs are kept but
/// not judged.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QualityRules {
    /// Lowest accuracy.
    pub accuracy: Option<f64>,
    /// Lowest macro F1.
    pub f1: Option<f64>,
    /// Highest RMSE.
    pub rmse: Option<f64>,
    /// Pairs a window needs to be judged.
    pub min_rows: u64,
}

/// The coordinator's quality rule names.
pub const QUALITY_RULES: [&str; 3] = ["accuracy", "f1", "rmse"];

impl QualityRules {
    /// Each rule's (name, value, past its threshold, back past its
    /// clearing level, threshold) on a window's metrics.
    fn judge(&self, m: &tern_drift::quality::Metrics) -> Vec<(&'static str, f64, bool, bool, f64)> {
        let low = |t: Option<f64>, v: Option<f64>, name| {
            let (t, v) = (t?, v?);
            Some((name, v, v < t, v >= t + (1.0 - t) / 4.0, t))
        };
        let high = |t: Option<f64>, v: Option<f64>, name| {
            let (t, v) = (t?, v?);
            Some((name, v, v > t, v <= 0.8 * t, t))
        };
        if m.rows < self.min_rows.max(1) {
            return Vec::new();
        }
        [low(self.accuracy, m.accuracy, "accuracy"), low(self.f1, m.f1, "f1"), high(self.rmse, m.rmse, "rmse")]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// What one batch added.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Taken {
    /// The highest id of the stream now stored (what to acknowledge).
    pub up_to: u64,
    /// Records new to the registry.
    pub new: u64,
    /// Records it already had.
    pub again: u64,
    /// Windows stored.
    pub windows: Vec<StoredWindow>,
    /// Alerts raised.
    pub raised: Vec<Alert>,
    /// Alerts cleared (by the device, or ended by a restart).
    pub cleared: Vec<Alert>,
    /// Records the device dropped since its last batch.
    pub dropped: u64,
    /// Quality windows stored.
    pub quality: Vec<StoredQuality>,
    /// Captured samples stored.
    pub captures: u64,
    /// The version prefixes captures were stored under (for retention).
    capture_keys: Vec<Vec<u8>>,
}

/// Alerts kept; past this the oldest cleared ones go.
pub const ALERTS_KEPT: usize = 10_000;

#[derive(Serialize, Deserialize)]
struct StreamState {
    stream: u64,
    last: u64,
    /// The device's running count of dropped records, as last seen.
    #[serde(default)]
    dropped: u64,
}

fn window_prefix(model: &str, version: Option<u32>) -> Vec<u8> {
    let mut k = model.as_bytes().to_vec();
    k.push(0);
    if let Some(v) = version {
        k.extend_from_slice(&v.to_be_bytes());
    }
    k
}

fn device_windows(model: &str, version: u32, device: &DeviceId) -> Vec<u8> {
    let mut k = window_prefix(model, Some(version));
    k.push(0);
    k.extend_from_slice(device.as_str().as_bytes());
    k.push(0);
    k
}

fn capture_prefix(model: &str, version: u32) -> Vec<u8> {
    let mut k = window_prefix(model, Some(version));
    k.push(0);
    k
}

/// Whether an open alert's key is of a coordinator quality rule (its rule
/// the fourth field).
fn is_quality_key(k: &[u8]) -> bool {
    k.split(|b| *b == 0).nth(3).is_some_and(|rule| QUALITY_RULES.iter().any(|q| q.as_bytes() == rule))
}

fn open_key(device: &DeviceId, model: &str, version: u32, rule: &str, feature: &str) -> Vec<u8> {
    format!("{}\0{model}\0{version}\0{rule}\0{feature}", device.as_str()).into_bytes()
}

/// A float that JSON can hold (serde_json writes NaN and infinities as
/// `null`, which then does not read back).
fn finite(x: f64) -> f64 {
    if x.is_nan() { 0.0 } else { x.clamp(-f64::MAX, f64::MAX) }
}

/// Removes the oldest records under each of `prefixes` past `keep`.
fn trim(tree: &sled::Tree, prefixes: impl Iterator<Item = Vec<u8>>, keep: usize) -> Result<()> {
    let prefixes: std::collections::BTreeSet<Vec<u8>> = prefixes.collect();
    for prefix in prefixes {
        let held = tree.scan_prefix(&prefix).keys().count();
        for old in tree.scan_prefix(&prefix).keys().take(held.saturating_sub(keep)) {
            tree.remove(old?)?;
        }
    }
    Ok(())
}

/// An open alert's key and id.
type OpenAlert = (sled::IVec, sled::IVec);

type TxError = sled::transaction::ConflictableTransactionError<crate::RegistryError>;

impl Registry {
    /// Stores a batch from `device`; `now` in Unix seconds. Records `keep`
    /// refuses (a version the device was not given, a rule or feature it
    /// does not have, a profile that does not fit) are counted as taken, so
    /// that they are acknowledged, but not stored. One batch is stored
    /// whole or not at all, one batch at a time. `keep` runs before the
    /// transaction and may read the registry.
    pub fn take_telemetry(
        &self,
        device: &DeviceId,
        batch: &TelemetryBatch,
        now: u64,
        keep: impl Fn(&TelemetryBody) -> bool,
    ) -> Result<Taken> {
        self.take_telemetry_judged(device, batch, now, &QualityRules::default(), keep)
    }

    /// [`Registry::take_telemetry`], raising and clearing alerts on the
    /// quality windows under `rules`.
    pub fn take_telemetry_judged(
        &self,
        device: &DeviceId,
        batch: &TelemetryBatch,
        now: u64,
        rules: &QualityRules,
        keep: impl Fn(&TelemetryBody) -> bool,
    ) -> Result<Taken> {
        let _one_at_a_time = self.telemetry_lock().lock().expect("lock");
        let streams = self.db().open_tree("telemetry_streams")?;
        let windows = self.db().open_tree("windows")?;
        let alerts = self.db().open_tree("alerts")?;
        let open = self.db().open_tree("alerts_open")?;
        let quality = self.db().open_tree("quality")?;
        let captures = self.db().open_tree("captures")?;
        let key = device.as_str().as_bytes();
        // Judged before: sled holds every tree while a transaction runs, so
        // `keep` (which may read the registry) cannot run inside one.
        let wanted: Vec<bool> = batch.records.iter().map(|r| keep(&r.body)).collect();
        let mut ids = Vec::new();
        // What a `Started` ends, read before: a transaction cannot scan.
        // By the record's place in the batch: records sent again are
        // skipped below, and must not shift the scans onto later ones.
        let mut standing: Vec<Option<(Vec<u8>, Vec<OpenAlert>)>> = vec![None; batch.records.len()];
        for (i, r) in batch.records.iter().enumerate() {
            match &r.body {
                TelemetryBody::Alert(AlertChange { raised: true, .. }) => ids.push(self.db().generate_id()?),
                // One id for each rule it may raise, or for the capture.
                TelemetryBody::Quality(_) => {
                    for _ in QUALITY_RULES {
                        ids.push(self.db().generate_id()?);
                    }
                }
                TelemetryBody::Capture(_) => ids.push(self.db().generate_id()?),
                TelemetryBody::Started(s) => {
                    let prefix = format!("{}\0{}\0", device.as_str(), s.model).into_bytes();
                    let now_open = open.scan_prefix(&prefix).collect::<std::result::Result<_, _>>()?;
                    standing[i] = Some((prefix, now_open));
                }
                _ => {}
            }
        }
        let trees = (&streams, &windows, &alerts, &open, &quality, &captures);
        let result = trees.transaction(|(streams, windows, alerts, open, quality, captures)| {
            let mut state = match streams.get(key)? {
                Some(raw) => decode::<StreamState>(key, &raw).map_err(TxError::Abort)?,
                None => StreamState { stream: batch.stream, last: 0, dropped: 0 },
            };
            // A new stream: the device's buffer was made again (its state
            // wiped); its ids start over.
            if state.stream != batch.stream {
                state = StreamState { stream: batch.stream, last: 0, dropped: 0 };
            }
            let mut taken = Taken { dropped: batch.dropped.saturating_sub(state.dropped), ..Taken::default() };
            state.dropped = state.dropped.max(batch.dropped);
            let mut ids = ids.iter();
            // Alerts this batch opened, which a later `Started` ends too.
            let mut opened: Vec<(Vec<u8>, [u8; 8])> = Vec::new();
            for (i, (r, wanted)) in batch.records.iter().zip(&wanted).enumerate() {
                if r.id <= state.last {
                    taken.again += 1;
                    continue;
                }
                state.last = r.id;
                taken.new += 1;
                if !wanted {
                    continue;
                }
                match &r.body {
                    TelemetryBody::Window(w) => {
                        let stored = StoredWindow {
                            device: device.clone(),
                            record: r.id,
                            model: w.model.clone(),
                            version: w.version,
                            // The device's clock, never after the arrival.
                            at_ms: r.at_ms.min(now.saturating_mul(1000)),
                            received_at: now,
                            millis: w.millis,
                            rows: w.rows,
                            requests: w.requests,
                            errors: w.errors,
                            p99_us: w.p99_us,
                            profile: w.profile.clone(),
                        };
                        let mut k = device_windows(&w.model, w.version, device);
                        k.extend_from_slice(&batch.stream.to_be_bytes());
                        k.extend_from_slice(&r.id.to_be_bytes());
                        windows.insert(k, encode(&stored))?;
                        taken.windows.push(stored);
                    }
                    TelemetryBody::Alert(a) => {
                        let ok = open_key(device, &a.model, a.version, &a.rule, &a.feature);
                        match (a.raised, open.get(&ok)?) {
                            // Raised again while open: one alert.
                            (true, Some(_)) => {}
                            (true, None) => {
                                let id = *ids.next().expect("an id per raised alert");
                                let alert = Alert {
                                    id,
                                    device: device.clone(),
                                    model: a.model.clone(),
                                    version: a.version,
                                    rule: a.rule.clone(),
                                    feature: a.feature.clone(),
                                    value: finite(a.value),
                                    threshold: finite(a.threshold),
                                    raised_at_ms: r.at_ms,
                                    cleared_at_ms: None,
                                    acked_at: None,
                                };
                                alerts.insert(&id.to_be_bytes(), encode(&alert))?;
                                open.insert(ok.clone(), &id.to_be_bytes())?;
                                opened.push((ok, id.to_be_bytes()));
                                taken.raised.push(alert);
                            }
                            (false, Some(id)) => {
                                taken.cleared.extend(clear(alerts, &id, r.at_ms)?);
                                open.remove(ok)?;
                            }
                            (false, None) => {}
                        }
                    }
                    TelemetryBody::Quality(q) => {
                        let mut rule_ids: Vec<u64> = ids.by_ref().take(QUALITY_RULES.len()).copied().collect();
                        let stored = StoredQuality {
                            device: device.clone(),
                            record: r.id,
                            model: q.model.clone(),
                            version: q.version,
                            at_ms: r.at_ms.min(now.saturating_mul(1000)),
                            received_at: now,
                            millis: q.millis,
                            counts: q.counts.clone(),
                        };
                        let mut k = device_windows(&q.model, q.version, device);
                        k.extend_from_slice(&batch.stream.to_be_bytes());
                        k.extend_from_slice(&r.id.to_be_bytes());
                        quality.insert(k, encode(&stored))?;
                        let metrics = tern_drift::quality::metrics(&q.counts);
                        for (rule, value, past, back, threshold) in rules.judge(&metrics) {
                            let ok = open_key(device, &q.model, q.version, rule, "");
                            match (open.get(&ok)?, past, back) {
                                (None, true, _) => {
                                    let id = rule_ids.pop().expect("an id per rule");
                                    let alert = Alert {
                                        id,
                                        device: device.clone(),
                                        model: q.model.clone(),
                                        version: q.version,
                                        rule: rule.to_owned(),
                                        feature: String::new(),
                                        value: finite(value),
                                        threshold,
                                        raised_at_ms: stored.at_ms,
                                        cleared_at_ms: None,
                                        acked_at: None,
                                    };
                                    alerts.insert(&id.to_be_bytes(), encode(&alert))?;
                                    open.insert(ok.clone(), &id.to_be_bytes())?;
                                    opened.push((ok, id.to_be_bytes()));
                                    taken.raised.push(alert);
                                }
                                (Some(id), _, true) => {
                                    taken.cleared.extend(clear(alerts, &id, stored.at_ms)?);
                                    open.remove(ok)?;
                                }
                                _ => {}
                            }
                        }
                        taken.quality.push(stored);
                    }
                    TelemetryBody::Capture(c) => {
                        let seq = *ids.next().expect("an id per capture");
                        let stored = StoredCapture {
                            device: device.clone(),
                            record: r.id,
                            at_ms: r.at_ms.min(now.saturating_mul(1000)),
                            received_at: now,
                            inference_id: c.inference_id.clone(),
                            inputs: c.inputs.clone(),
                            outputs: c.outputs.clone(),
                        };
                        let mut k = capture_prefix(&c.model, c.version);
                        k.extend_from_slice(&seq.to_be_bytes());
                        let bytes = postcard::to_stdvec(&stored).map_err(|e| {
                            TxError::Abort(crate::RegistryError::Corrupt {
                                key: "capture".into(),
                                reason: e.to_string(),
                            })
                        })?;
                        captures.insert(k, bytes)?;
                        taken.captures += 1;
                        taken.capture_keys.push(capture_prefix(&c.model, c.version));
                    }
                    TelemetryBody::Started(_) => {
                        // Every alert of the model the device raised ends;
                        // the coordinator's quality alerts stand on their
                        // windows.
                        let (prefix, before) = standing[i].as_ref().expect("one scan per Started");
                        for (ok, id) in before.iter().filter(|(k, _)| !is_quality_key(k)) {
                            if open.get(ok)?.is_some() {
                                taken.cleared.extend(clear(alerts, id, r.at_ms)?);
                                open.remove(ok)?;
                            }
                        }
                        for (ok, id) in opened.iter().filter(|(k, _)| k.starts_with(prefix) && !is_quality_key(k)) {
                            if open.get(ok.as_slice())?.is_some() {
                                taken.cleared.extend(clear(alerts, id, r.at_ms)?);
                                open.remove(ok.as_slice())?;
                            }
                        }
                    }
                }
            }
            streams.insert(key, encode(&state))?;
            taken.up_to = state.last;
            Ok(taken)
        });
        let taken = result.map_err(|e| match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => crate::RegistryError::Storage(e),
        })?;
        // Retention, after: a crash here only keeps a few more. Each
        // prefix once, however many records of it the batch held.
        let window_prefixes = taken.windows.iter().map(|w| device_windows(&w.model, w.version, device));
        trim(&windows, window_prefixes, WINDOWS_KEPT)?;
        let quality_prefixes = taken.quality.iter().map(|q| device_windows(&q.model, q.version, device));
        trim(&quality, quality_prefixes, WINDOWS_KEPT)?;
        trim(&captures, taken.capture_keys.iter().cloned(), CAPTURES_KEPT)?;
        if !taken.raised.is_empty() && alerts.len() > ALERTS_KEPT {
            let over = alerts.len() - ALERTS_KEPT;
            let mut gone = 0;
            for kv in alerts.iter() {
                let (k, v) = kv?;
                if gone == over {
                    break;
                }
                if decode::<Alert>(&k, &v).is_ok_and(|a| a.cleared_at_ms.is_some()) {
                    alerts.remove(k)?;
                    gone += 1;
                }
            }
        }
        self.sync()?;
        Ok(taken)
    }

    /// The windows of `model` (one version or all), oldest first by when
    /// they were taken, of one device or all.
    pub fn windows(&self, model: &str, version: Option<u32>, device: Option<&str>) -> Result<Vec<StoredWindow>> {
        let windows = self.db().open_tree("windows")?;
        let mut out = Vec::new();
        for kv in windows.scan_prefix(window_prefix(model, version)) {
            let (k, v) = kv?;
            let w: StoredWindow = decode(&k, &v)?;
            if w.model == model && device.is_none_or(|d| w.device.as_str() == d) {
                out.push(w);
            }
        }
        out.sort_by_key(|w| (w.received_at, w.at_ms));
        Ok(out)
    }

    /// The quality windows of `model` (one version or all), of one device or
    /// all, oldest first by when they were taken.
    pub fn quality(&self, model: &str, version: Option<u32>, device: Option<&str>) -> Result<Vec<StoredQuality>> {
        let tree = self.db().open_tree("quality")?;
        let mut out = Vec::new();
        for kv in tree.scan_prefix(window_prefix(model, version)) {
            let (k, v) = kv?;
            let q: StoredQuality = decode(&k, &v)?;
            if q.model == model && device.is_none_or(|d| q.device.as_str() == d) {
                out.push(q);
            }
        }
        out.sort_by_key(|q| (q.received_at, q.at_ms));
        Ok(out)
    }

    /// Captured samples of `model:version` in the order they were stored,
    /// after the one numbered `after` (from the first with `None`): at most
    /// `limit`, each with its number.
    pub fn captures(
        &self,
        model: &str,
        version: u32,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, StoredCapture)>> {
        let tree = self.db().open_tree("captures")?;
        let prefix = capture_prefix(model, version);
        let mut from = prefix.clone();
        if let Some(after) = after {
            let Some(next) = after.checked_add(1) else { return Ok(Vec::new()) };
            from.extend_from_slice(&next.to_be_bytes());
        }
        let mut out = Vec::new();
        for kv in tree.range(from..) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) || out.len() == limit {
                break;
            }
            let Some(seq) = k.get(prefix.len()..).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes)
            else {
                continue;
            };
            // One record that does not read back hides no other.
            if let Ok(c) = postcard::from_bytes::<StoredCapture>(&v) {
                out.push((seq, c));
            }
        }
        Ok(out)
    }

    /// Alerts, newest first: the open ones and those not yet acknowledged,
    /// or (`all`) every one.
    pub fn alerts(&self, all: bool) -> Result<Vec<Alert>> {
        let alerts = self.db().open_tree("alerts")?;
        let mut out = Vec::new();
        for kv in alerts.iter().rev() {
            let (k, v) = kv?;
            // One record that does not read back hides no other.
            let Ok(a) = decode::<Alert>(&k, &v) else { continue };
            if all || a.cleared_at_ms.is_none() || a.acked_at.is_none() {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Marks an alert acknowledged at `now` (Unix seconds).
    pub fn ack_alert(&self, id: u64, now: u64) -> Result<Alert> {
        let alerts = self.db().open_tree("alerts")?;
        let key = id.to_be_bytes();
        let Some(raw) = alerts.get(key)? else { return Err(crate::RegistryError::UnknownAlert(id)) };
        let mut a: Alert = decode(&key, &raw)?;
        a.acked_at.get_or_insert(now);
        alerts.insert(key, encode(&a))?;
        self.sync()?;
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::{MonitorStarted, TelemetryRecord, WindowSummary};

    fn window(id: u64) -> TelemetryRecord {
        let w = WindowSummary {
            model: "m".into(),
            version: 1,
            seq: id,
            millis: 10,
            rows: 5,
            requests: 1,
            errors: 0,
            p99_us: Some(3),
            profile: vec![],
        };
        TelemetryRecord { id, at_ms: id * 1000, body: TelemetryBody::Window(w) }
    }

    fn alert(id: u64, raised: bool, value: f64) -> TelemetryRecord {
        let a = AlertChange {
            model: "m".into(),
            version: 1,
            rule: "feature_drift".into(),
            feature: "x".into(),
            raised,
            value,
            threshold: 0.1,
        };
        TelemetryRecord { id, at_ms: id * 1000, body: TelemetryBody::Alert(a) }
    }

    fn batch(stream: u64, dropped: u64, records: Vec<TelemetryRecord>) -> TelemetryBatch {
        TelemetryBatch { stream, dropped, records }
    }

    #[test]
    fn records_sent_again_are_kept_once_and_a_new_stream_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path().join("db")).unwrap();
        let dev: DeviceId = "cam-1".parse().unwrap();
        let all = |_: &TelemetryBody| true;
        let t = r.take_telemetry(&dev, &batch(7, 0, vec![window(1), window(2)]), 100, all).unwrap();
        assert_eq!((t.up_to, t.new, t.again), (2, 2, 0));
        let t = r.take_telemetry(&dev, &batch(7, 3, vec![window(2), window(3)]), 101, all).unwrap();
        assert_eq!((t.up_to, t.new, t.again, t.dropped), (3, 1, 1, 3));
        let t = r.take_telemetry(&dev, &batch(7, 3, vec![window(4)]), 102, all).unwrap();
        assert_eq!(t.dropped, 0, "the running count did not grow");
        let records: Vec<u64> = r.windows("m", Some(1), None).unwrap().iter().map(|w| w.record).collect();
        assert_eq!(records, vec![1, 2, 3, 4]);
        // The device's state was wiped: its ids start again on a new stream.
        let t = r.take_telemetry(&dev, &batch(8, 0, vec![window(1)]), 103, all).unwrap();
        assert_eq!((t.up_to, t.new), (1, 1));
        assert_eq!(r.windows("m", Some(1), Some("cam-1")).unwrap().len(), 5);
        // Refused records are acknowledged but not kept.
        let t = r.take_telemetry(&dev, &batch(8, 0, vec![window(2)]), 104, |_| false).unwrap();
        assert_eq!((t.up_to, t.new, t.windows.len()), (2, 1, 0));
        assert_eq!(r.windows("m", None, None).unwrap().len(), 5);
    }

    #[test]
    fn alerts_open_once_clear_and_end_when_the_monitor_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path().join("db")).unwrap();
        let dev: DeviceId = "cam-1".parse().unwrap();
        let all = |_: &TelemetryBody| true;
        // An infinite value (a constant baseline channel) is stored finite.
        let t = r.take_telemetry(&dev, &batch(1, 0, vec![alert(1, true, f64::INFINITY), alert(2, true, 0.3)]), 1, all);
        assert_eq!(t.unwrap().raised.len(), 1, "raised twice while open: one alert");
        let open = r.alerts(false).unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].value, f64::MAX);
        r.take_telemetry(&dev, &batch(1, 0, vec![alert(3, false, 0.0)]), 2, all).unwrap();
        assert_eq!(r.alerts(false).unwrap()[0].cleared_at_ms, Some(3000));
        let a = r.ack_alert(open[0].id, 5).unwrap();
        assert_eq!(a.acked_at, Some(5));
        assert!(r.alerts(false).unwrap().is_empty(), "cleared and acknowledged");
        assert_eq!(r.alerts(true).unwrap().len(), 1);
        // Raised again, then the agent restarts: the alert ends.
        r.take_telemetry(&dev, &batch(1, 0, vec![alert(4, true, 0.5)]), 6, all).unwrap();
        let started = TelemetryRecord {
            id: 5,
            at_ms: 9000,
            body: TelemetryBody::Started(MonitorStarted { model: "m".into(), version: 2 }),
        };
        r.take_telemetry(&dev, &batch(1, 0, vec![started]), 7, all).unwrap();
        let all_alerts = r.alerts(true).unwrap();
        assert!(all_alerts.iter().all(|a| a.cleared_at_ms.is_some()), "{all_alerts:?}");
        assert!(matches!(r.ack_alert(999, 1), Err(crate::RegistryError::UnknownAlert(999))));
    }

    fn quality(id: u64, right: u64, wrong: u64) -> TelemetryRecord {
        let counts =
            QualityCounts::Classes { classes: 2, confusion: vec![right, wrong, 0, 0], other: 0, other_correct: 0 };
        let q = tern_proto::QualityWindow { model: "m".into(), version: 1, seq: id, millis: 10, counts };
        TelemetryRecord { id, at_ms: id * 1000, body: TelemetryBody::Quality(q) }
    }

    #[test]
    fn quality_windows_raise_an_alert_below_the_threshold_and_clear_past_the_clearing_level() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path().join("db")).unwrap();
        let dev: DeviceId = "cam-1".parse().unwrap();
        let rules = QualityRules { accuracy: Some(0.9), min_rows: 10, ..QualityRules::default() };
        let take = |records, now| r.take_telemetry_judged(&dev, &batch(1, 0, records), now, &rules, |_| true).unwrap();
        // Too few rows to judge, then 50 % right.
        assert!(take(vec![quality(1, 1, 4)], 1).raised.is_empty());
        let t = take(vec![quality(2, 10, 10)], 2);
        assert_eq!(t.raised.len(), 1);
        assert_eq!((t.raised[0].rule.as_str(), t.raised[0].value, t.raised[0].threshold), ("accuracy", 0.5, 0.9));
        // Back above the threshold but short of its clearing level (0.925):
        // still open, and not raised twice.
        let t = take(vec![quality(3, 92, 8), quality(4, 10, 10)], 3);
        assert!(t.raised.is_empty() && t.cleared.is_empty(), "{t:?}");
        let t = take(vec![quality(5, 99, 1)], 4);
        assert_eq!(t.cleared.len(), 1);
        assert!(r.alerts(false).unwrap().iter().all(|a| a.cleared_at_ms.is_some()));
        assert_eq!(r.quality("m", Some(1), Some("cam-1")).unwrap().len(), 5);
    }

    #[test]
    fn captures_are_listed_in_order_after_a_number() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path().join("db")).unwrap();
        let dev: DeviceId = "cam-1".parse().unwrap();
        let capture = |id: u64| TelemetryRecord {
            id,
            at_ms: id,
            body: TelemetryBody::Capture(tern_proto::CapturedSample {
                model: "m".into(),
                version: 1,
                inference_id: format!("i{id}"),
                inputs: vec![1, 2],
                outputs: vec![3],
            }),
        };
        let t = r.take_telemetry(&dev, &batch(1, 0, vec![capture(1), capture(2), capture(3)]), 1, |_| true).unwrap();
        assert_eq!(t.captures, 3);
        let all = r.captures("m", 1, None, 10).unwrap();
        let ids: Vec<&str> = all.iter().map(|(_, c)| c.inference_id.as_str()).collect();
        assert_eq!(ids, ["i1", "i2", "i3"]);
        let rest = r.captures("m", 1, Some(all[0].0), 1).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].1.inference_id, "i2");
        assert!(r.captures("m", 2, None, 10).unwrap().is_empty());
    }

    #[test]
    fn a_started_record_sent_again_does_not_shift_the_next_one_onto_its_model() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path().join("db")).unwrap();
        let dev: DeviceId = "cam-1".parse().unwrap();
        let started = |id, model: &str| TelemetryRecord {
            id,
            at_ms: id * 1000,
            body: TelemetryBody::Started(MonitorStarted { model: model.into(), version: 1 }),
        };
        r.take_telemetry(&dev, &batch(1, 0, vec![alert(1, true, 0.5), started(2, "x")]), 1, |_| true).unwrap();
        assert_eq!(r.alerts(false).unwrap().len(), 1);
        // The acknowledgement was lost: 2 comes again, with m's restart.
        let t = r.take_telemetry(&dev, &batch(1, 0, vec![started(2, "x"), started(3, "m")]), 2, |_| true).unwrap();
        assert_eq!(t.cleared.len(), 1, "m's alert ends with m's restart");
        assert!(r.alerts(true).unwrap().iter().all(|a| a.cleared_at_ms.is_some()));
    }
}
