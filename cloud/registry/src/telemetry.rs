//! Device telemetry in the registry: drift windows per model version and
//! device (a week of them at five-minute windows), and alerts raised and
//! cleared, acknowledged by operators. A record is kept once: its key is
//! the device, its record stream and its id, and ids at or below the
//! stream's last stored one are dropped as sent again.

use crate::store::{decode, encode};
use crate::{Registry, Result};
use serde::{Deserialize, Serialize};
use tern_proto::{DeviceId, TelemetryBatch, TelemetryBody};

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
    /// Records the device said it dropped.
    pub dropped: u64,
}

#[derive(Serialize, Deserialize)]
struct StreamState {
    stream: u64,
    last: u64,
}

fn window_prefix(model: &str, version: Option<u32>) -> Vec<u8> {
    let mut k = model.as_bytes().to_vec();
    k.push(0);
    if let Some(v) = version {
        k.extend_from_slice(&v.to_be_bytes());
    }
    k
}

fn open_key(device: &DeviceId, model: &str, version: u32, rule: &str, feature: &str) -> Vec<u8> {
    format!("{}\0{model}\0{version}\0{rule}\0{feature}", device.as_str()).into_bytes()
}

impl Registry {
    /// Stores a batch from `device`; `now` in Unix seconds. Windows and
    /// alerts of a model version `keep` refuses are counted as taken (so
    /// they are acknowledged) but not stored.
    pub fn take_telemetry(
        &self,
        device: &DeviceId,
        batch: &TelemetryBatch,
        now: u64,
        keep: impl Fn(&str, u32) -> bool,
    ) -> Result<Taken> {
        let streams = self.db().open_tree("telemetry_streams")?;
        let windows = self.db().open_tree("windows")?;
        let alerts = self.db().open_tree("alerts")?;
        let open = self.db().open_tree("alerts_open")?;
        let key = device.as_str().as_bytes();
        let mut state = match streams.get(key)? {
            Some(raw) => decode::<StreamState>(key, &raw)?,
            None => StreamState { stream: batch.stream, last: 0 },
        };
        // A new stream: the device's buffer was made again (its state
        // wiped); its ids start over.
        if state.stream != batch.stream {
            state = StreamState { stream: batch.stream, last: 0 };
        }
        let mut taken = Taken::default();
        for r in &batch.records {
            if r.id <= state.last {
                taken.again += 1;
                continue;
            }
            state.last = r.id;
            taken.new += 1;
            let wanted = match &r.body {
                TelemetryBody::Window(w) => keep(&w.model, w.version),
                TelemetryBody::Alert(a) => keep(&a.model, a.version),
                TelemetryBody::Dropped(_) => true,
            };
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
                        at_ms: r.at_ms,
                        received_at: now,
                        millis: w.millis,
                        rows: w.rows,
                        requests: w.requests,
                        errors: w.errors,
                        p99_us: w.p99_us,
                        profile: w.profile.clone(),
                    };
                    let mut k = window_prefix(&w.model, Some(w.version));
                    k.push(0);
                    k.extend_from_slice(device.as_str().as_bytes());
                    k.push(0);
                    let per_device = k.clone();
                    k.extend_from_slice(&now.to_be_bytes());
                    k.extend_from_slice(&r.id.to_be_bytes());
                    windows.insert(k, encode(&stored))?;
                    // Oldest first (by the time taken): past the limit they go.
                    let held = windows.scan_prefix(&per_device).keys().count();
                    for old in windows.scan_prefix(&per_device).keys().take(held.saturating_sub(WINDOWS_KEPT)) {
                        windows.remove(old?)?;
                    }
                    taken.windows.push(stored);
                }
                TelemetryBody::Alert(a) => {
                    let ok = open_key(device, &a.model, a.version, &a.rule, &a.feature);
                    match (a.raised, open.get(&ok)?) {
                        // Raised again while open (sent twice): one alert.
                        (true, Some(_)) => {}
                        (true, None) => {
                            let id = self.db().generate_id()?;
                            let alert = Alert {
                                id,
                                device: device.clone(),
                                model: a.model.clone(),
                                version: a.version,
                                rule: a.rule.clone(),
                                feature: a.feature.clone(),
                                value: a.value,
                                threshold: a.threshold,
                                raised_at_ms: r.at_ms,
                                cleared_at_ms: None,
                                acked_at: None,
                            };
                            alerts.insert(id.to_be_bytes(), encode(&alert))?;
                            open.insert(&ok, &id.to_be_bytes())?;
                            taken.raised.push(alert);
                        }
                        (false, Some(id)) => {
                            if let Some(raw) = alerts.get(&id)? {
                                let mut alert: Alert = decode(&id, &raw)?;
                                alert.cleared_at_ms = Some(r.at_ms);
                                alerts.insert(&id, encode(&alert))?;
                            }
                            open.remove(&ok)?;
                        }
                        (false, None) => {}
                    }
                }
                TelemetryBody::Dropped(n) => taken.dropped += n,
            }
        }
        streams.insert(key, encode(&state))?;
        self.sync()?;
        taken.up_to = state.last;
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

    /// Alerts, newest first: the open ones and those not yet acknowledged,
    /// or (`all`) every one.
    pub fn alerts(&self, all: bool) -> Result<Vec<Alert>> {
        let alerts = self.db().open_tree("alerts")?;
        let mut out = Vec::new();
        for kv in alerts.iter().rev() {
            let (k, v) = kv?;
            let a: Alert = decode(&k, &v)?;
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
