//! The coordinator's Prometheus metrics (`GET /metrics` on the admin
//! listener, text exposition): devices connected, telemetry records and
//! bytes per device, records devices dropped, alerts raised per model and
//! rule and open now, batches per link, MQTT messages refused, per model version and feature the largest L∞
//! distance from the baseline among the devices' latest windows, and what
//! became of webhook notices.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use tern_proto::DeviceId;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabel {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabel {
    link: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabel {
    model: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriftLabel {
    model: String,
    version: String,
    feature: String,
}

/// A feature's distance in one device's window.
pub struct Distance {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u32,
    /// Feature.
    pub feature: String,
    /// L∞ from the baseline.
    pub linf: f64,
}

/// The metrics.
pub struct Metrics {
    registry: Registry,
    connected: Gauge,
    records: Family<DeviceLabel, Counter>,
    bytes: Family<DeviceLabel, Counter>,
    dropped: Family<DeviceLabel, Counter>,
    batches: Family<LinkLabel, Counter>,
    /// MQTT messages under device topics that were not taken.
    pub mqtt_refused: Counter,
    raised: Family<AlertLabel, Counter>,
    open: Family<ModelLabel, Gauge>,
    drift: Family<DriftLabel, Gauge<f64, AtomicU64>>,
    /// Per (model, version, feature), each device's latest L∞.
    latest: Mutex<HashMap<DriftLabel, HashMap<String, f64>>>,
    /// What became of webhook notices.
    pub webhook: super::webhook::Outcomes,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tern");
        let m = Self {
            connected: Gauge::default(),
            records: Family::default(),
            bytes: Family::default(),
            dropped: Family::default(),
            batches: Family::default(),
            mqtt_refused: Counter::default(),
            raised: Family::default(),
            open: Family::default(),
            drift: Family::default(),
            latest: Mutex::new(HashMap::new()),
            webhook: Default::default(),
            registry: Registry::default(),
        };
        registry.register("devices_connected", "Devices with a control session", m.connected.clone());
        registry.register("telemetry_records", "Telemetry records taken, per device", m.records.clone());
        registry.register("telemetry_bytes", "Encoded telemetry record bytes taken, per device", m.bytes.clone());
        registry.register("telemetry_dropped", "Records devices dropped from full buffers", m.dropped.clone());
        registry.register("telemetry_batches", "Telemetry batches taken, per link (quic, mqtt)", m.batches.clone());
        registry.register(
            "mqtt_refused",
            "MQTT messages under device topics not taken (undecodable, unknown device, not telemetry)",
            m.mqtt_refused.clone(),
        );
        registry.register("alerts_raised", "Alerts raised on devices, per model and rule", m.raised.clone());
        registry.register("alerts_open", "Alerts raised and not cleared, per model", m.open.clone());
        registry.register(
            "drift_linf",
            "Largest L-infinity distance from the baseline among the devices' latest windows",
            m.drift.clone(),
        );
        registry.register("webhook_delivered", "Alert notices the webhook took", m.webhook.delivered.clone());
        registry.register("webhook_failed", "Alert notices given up on", m.webhook.failed.clone());
        registry.register("webhook_dropped", "Alert notices dropped, the queue full", m.webhook.dropped.clone());
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Counts what a device's batch brought.
    pub fn telemetry(
        &self,
        device: &DeviceId,
        link: &str,
        taken: &tern_registry::Taken,
        bytes: u64,
        distances: &[Distance],
    ) {
        self.batches.get_or_create(&LinkLabel { link: link.to_owned() }).inc();
        let d = DeviceLabel { device: device.to_string() };
        self.records.get_or_create(&d).inc_by(taken.new);
        self.bytes.get_or_create(&d).inc_by(bytes);
        if taken.dropped > 0 {
            self.dropped.get_or_create(&d).inc_by(taken.dropped);
        }
        for a in &taken.raised {
            self.raised.get_or_create(&AlertLabel { model: a.model.clone(), rule: a.rule.clone() }).inc();
        }
        let mut latest = self.latest.lock().expect("lock");
        for x in distances {
            let label =
                DriftLabel { model: x.model.clone(), version: x.version.to_string(), feature: x.feature.clone() };
            let per_device = latest.entry(label.clone()).or_default();
            per_device.insert(device.to_string(), x.linf);
            let worst = per_device.values().copied().fold(0.0, f64::max);
            self.drift.get_or_create(&label).set(worst);
        }
    }

    /// The text exposition, with the gauges read now.
    pub fn render(&self, connected: usize, open: &[tern_registry::Alert]) -> String {
        self.connected.set(connected as i64);
        self.open.clear();
        for a in open.iter().filter(|a| a.cleared_at_ms.is_none()) {
            self.open.get_or_create(&ModelLabel { model: a.model.clone() }).inc();
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
