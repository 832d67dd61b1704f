//! A served version's drift windows ([`tern_agent_core::monitor`]) in the
//! request path: inputs counted as they arrive, answers and failures after
//! the run, windows closed by row count inline and by age on a timer; the
//! last windows and the alerts raised kept for `GET /v1/models/NAME/drift`.

use crate::outbox::Outbox;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tern_agent_core::monitor::{Change, Monitor, MonitorConfig, WindowReport};
use tern_drift::ModelBaseline;
use tern_proto::{AlertChange, ModelManifest, MonitorStarted, TelemetryBody, Tensor, WindowSummary};
use tracing::{info, warn};

/// Closed windows kept for the local API.
const RECENT: usize = 16;

/// One version's windows.
pub struct Drift {
    name: String,
    version: u32,
    epoch: Instant,
    inner: Mutex<Inner>,
    outbox: Option<Arc<Outbox>>,
}

struct Inner {
    monitor: Monitor,
    recent: VecDeque<(u64, WindowReport)>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Drift {
    /// Windows for `m`, from its verified baseline file.
    pub fn new(
        m: &ModelManifest,
        baseline: &[u8],
        config: MonitorConfig,
        seed: u64,
        outbox: Option<Arc<Outbox>>,
    ) -> Result<Self, String> {
        let baseline = ModelBaseline::decode(baseline).map_err(|e| format!("baseline: {e}"))?;
        let monitor = Monitor::new(baseline, &m.inputs, &m.outputs, config, seed, 0).map_err(|e| e.to_string())?;
        if let Some(o) = &outbox {
            // Alerts of the model raised before this start stand no more.
            o.push(TelemetryBody::Started(MonitorStarted { model: m.name.clone(), version: m.version }));
        }
        Ok(Self {
            name: m.name.clone(),
            version: m.version,
            epoch: Instant::now(),
            inner: Mutex::new(Inner { monitor, recent: VecDeque::new() }),
            outbox,
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Counts a request's inputs.
    pub fn inputs(&self, inputs: &[Tensor]) {
        self.inner.lock().expect("lock").monitor.observe_inputs(inputs);
    }

    /// Counts an answer and closes the window if it is full.
    pub fn answered(&self, outputs: &[Tensor], ran_us: u64) {
        let mut inner = self.inner.lock().expect("lock");
        inner.monitor.observe_outputs(outputs, ran_us);
        self.poll(&mut inner);
    }

    /// Counts a failed request and closes the window if it is full.
    pub fn failed(&self, ran_us: u64) {
        let mut inner = self.inner.lock().expect("lock");
        inner.monitor.observe_error(ran_us);
        self.poll(&mut inner);
    }

    /// Closes the window if it is full or old.
    pub fn tick(&self) {
        let mut inner = self.inner.lock().expect("lock");
        self.poll(&mut inner);
    }

    fn poll(&self, inner: &mut Inner) {
        let Some(report) = inner.monitor.poll(self.now_ms()) else { return };
        for c in &report.changes {
            let (rule, feature) = (&c.key.rule, &c.key.feature);
            match c.change {
                Change::Raised => {
                    warn!(model = %self.name, version = self.version, ?rule, feature = %feature, value = c.value, threshold = c.threshold, "alert raised")
                }
                Change::Cleared => {
                    info!(model = %self.name, version = self.version, ?rule, feature = %feature, value = c.value, "alert cleared")
                }
            }
        }
        if let Some(outbox) = &self.outbox {
            let profile =
                if report.rows == 0 { Vec::new() } else { report.profile.clone().without_sketches().encode() };
            outbox.push(TelemetryBody::Window(WindowSummary {
                model: self.name.clone(),
                version: self.version,
                seq: report.seq,
                millis: report.closed_ms.saturating_sub(report.opened_ms),
                rows: report.rows,
                requests: report.requests,
                errors: report.errors,
                p99_us: report.p99_us,
                profile,
            }));
            for c in &report.changes {
                outbox.push(TelemetryBody::Alert(AlertChange {
                    model: self.name.clone(),
                    version: self.version,
                    rule: c.key.rule.name().to_owned(),
                    feature: c.key.feature.clone(),
                    raised: c.change == Change::Raised,
                    value: c.value,
                    threshold: c.threshold,
                }));
            }
        }
        if inner.recent.len() == RECENT {
            inner.recent.pop_front();
        }
        inner.recent.push_back((unix_now(), report));
    }

    /// The open window, the last closed ones and the alerts raised now.
    pub fn json(&self) -> Value {
        let inner = self.inner.lock().expect("lock");
        let now = self.now_ms();
        let windows: Vec<Value> = inner
            .recent
            .iter()
            .rev()
            .map(|(closed_at, w)| {
                json!({
                    "seq": w.seq,
                    "closed_at": closed_at,
                    "secs": w.closed_ms.saturating_sub(w.opened_ms) as f64 / 1000.0,
                    "rows": w.rows,
                    "requests": w.requests,
                    "errors": w.errors,
                    "skipped": w.skipped,
                    "p99_us": w.p99_us,
                    "distances": w.distances,
                    "changes": w.changes,
                })
            })
            .collect();
        json!({
            "model": self.name,
            "version": self.version,
            "open": {
                "rows": inner.monitor.rows(),
                "closes_in_secs": inner.monitor.deadline_ms().saturating_sub(now) as f64 / 1000.0,
            },
            "alerts": inner.monitor.firing().collect::<Vec<_>>(),
            "windows": windows,
        })
    }
}

/// Closes windows by age: every second, each served version's.
pub async fn close_old_windows(shared: std::sync::Arc<crate::api::Shared>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let served: Vec<_> = shared.models.read().expect("lock").values().cloned().collect();
        for s in served {
            if let Some(d) = &s.drift {
                d.tick();
            }
            s.quality.tick();
        }
        shared.tick_retired();
    }
}
