//! Inference ids, ground truth and data capture in the request path: every
//! answer gets an id and its prediction is kept for a while
//! ([`tern_agent_core::feedback`]); `POST /v1/models/NAME:feedback` counts
//! the truth for it into quality windows, which go to the coordinator with
//! the telemetry; a share of requests and answers is captured under the
//! version's signed capture policy, within its daily byte budget.

use crate::outbox::Outbox;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use tern_agent_core::feedback::{Feedback, FeedbackConfig, FeedbackError, QualityReport, Truth, prediction};
use tern_proto::{
    CapturePolicy, CapturedSample, MAX_CAPTURE_BYTES, ModelManifest, QualityWindow, TelemetryBody, Tensor,
    encode_tensors,
};
use tracing::{debug, info};

/// Random per agent start, so ids from before a restart are never reused.
fn boot() -> u64 {
    static BOOT: OnceLock<u64> = OnceLock::new();
    *BOOT.get_or_init(|| {
        let mut b = [0u8; 8];
        use std::io::Read;
        // Without /dev/urandom the clock still differs between starts.
        if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_err() {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            b = (t.as_nanos() as u64).to_le_bytes();
        }
        u64::from_le_bytes(b)
    })
}

/// A new inference id: unique on this device.
pub fn inference_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{:016x}{:08x}", boot(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// One served version's predictions, quality windows and captures.
pub struct Quality {
    name: String,
    version: u32,
    epoch: Instant,
    inner: Mutex<Feedback>,
    last: Mutex<Option<QualityReport>>,
    outbox: Option<Arc<Outbox>>,
    capture: Mutex<CaptureDay>,
    rng: AtomicU64,
    /// Samples captured, and skipped for their size or the day's budget.
    pub captured: AtomicU64,
    /// See `captured`.
    pub capture_skipped: AtomicU64,
}

#[derive(Default)]
struct CaptureDay {
    day: u64,
    bytes: u64,
}

/// Today, in days since 1970 (UTC, by the device's clock).
pub fn today() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400)
}

/// Bytes `t` takes in a binary tensor body, about (for a size check before
/// anything is copied).
fn estimate(ts: &[Tensor]) -> usize {
    use tern_proto::TensorData as D;
    let width = |d: &D| match d {
        D::I8(_) | D::U8(_) | D::Bool(_) => 1,
        D::I16(_) | D::U16(_) | D::F16(_) | D::BF16(_) => 2,
        D::I32(_) | D::U32(_) | D::F32(_) => 4,
        D::I64(_) | D::U64(_) | D::F64(_) => 8,
    };
    ts.iter().map(|t| t.data.len() * width(&t.data) + 8 * t.shape.len() + 16).sum()
}

impl Quality {
    /// For `m`, its windows going to `outbox`.
    pub fn new(m: &ModelManifest, config: FeedbackConfig, outbox: Option<Arc<Outbox>>) -> Self {
        // The day's captures so far, whichever version or start made them.
        let day = today();
        let bytes = outbox.as_ref().map_or(0, |o| o.captured_on(&m.name, day));
        Self {
            name: m.name.clone(),
            version: m.version,
            epoch: Instant::now(),
            inner: Mutex::new(Feedback::new(config, 0)),
            last: Mutex::new(None),
            outbox,
            capture: Mutex::new(CaptureDay { day, bytes }),
            rng: AtomicU64::new(boot() ^ u64::from(m.version).rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15),
            captured: AtomicU64::new(0),
            capture_skipped: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Keeps what `outputs` predict under `id`.
    pub fn answered(&self, id: &str, outputs: &[Tensor]) {
        if let Some(p) = prediction(outputs) {
            self.inner.lock().expect("lock").predicted(id.to_owned(), p, self.now_ms());
        }
    }

    /// Counts the truth for answer `id`; the rows counted.
    pub fn feedback(&self, id: &str, truth: Truth) -> Result<u64, FeedbackError> {
        let mut inner = self.inner.lock().expect("lock");
        let n = inner.feedback(id, truth, self.now_ms())?;
        self.poll(&mut inner);
        Ok(n)
    }

    /// The version this counts for.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The model this counts for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the window if it is full or old.
    pub fn tick(&self) {
        let mut inner = self.inner.lock().expect("lock");
        self.poll(&mut inner);
    }

    /// Closes the window now if it counted anything (the version is gone
    /// and its answers have waited long enough).
    pub fn flush(&self) {
        let mut inner = self.inner.lock().expect("lock");
        let report = inner.flush(self.now_ms());
        self.report(report);
    }

    fn poll(&self, inner: &mut Feedback) {
        let report = inner.poll(self.now_ms());
        self.report(report);
    }

    fn report(&self, report: Option<QualityReport>) {
        let Some(report) = report else { return };
        let m = tern_drift::quality::metrics(&report.counts);
        info!(model = %self.name, version = self.version, rows = m.rows, accuracy = ?m.accuracy, f1 = ?m.f1, rmse = ?m.rmse, "quality window closed");
        if let Some(o) = &self.outbox {
            o.push(TelemetryBody::Quality(QualityWindow {
                model: self.name.clone(),
                version: self.version,
                seq: report.seq,
                millis: report.closed_ms.saturating_sub(report.opened_ms),
                counts: report.counts.clone(),
            }));
        }
        *self.last.lock().expect("lock") = Some(report);
    }

    /// Answers waiting for feedback, and the last window's metrics.
    pub fn json(&self) -> serde_json::Value {
        let kept = self.inner.lock().expect("lock").kept();
        let last = self
            .last
            .lock()
            .expect("lock")
            .as_ref()
            .map(|r| serde_json::json!({ "seq": r.seq, "metrics": tern_drift::quality::metrics(&r.counts) }));
        serde_json::json!({
            "awaiting_feedback": kept,
            "last_window": last,
            "captured": self.captured.load(Ordering::Relaxed),
            "capture_skipped": self.capture_skipped.load(Ordering::Relaxed),
        })
    }

    /// Whether to capture this request under `policy`: drawn at its share,
    /// with the inputs small enough and the day's budget not spent.
    pub fn draw(&self, policy: Option<CapturePolicy>, inputs: &[Tensor]) -> bool {
        let Some(p) = policy.filter(|p| p.per_million > 0 && p.daily_bytes > 0) else { return false };
        // splitmix64: a fresh draw per request, no lock.
        let mut z = self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        if z % 1_000_000 >= u64::from(p.per_million) {
            return false;
        }
        let day = self.capture.lock().expect("lock");
        let spent = if day.day == today() { day.bytes } else { 0 };
        let fits = estimate(inputs) <= MAX_CAPTURE_BYTES && spent < p.daily_bytes;
        if !fits {
            self.capture_skipped.fetch_add(1, Ordering::Relaxed);
        }
        fits
    }

    /// Captures a drawn request with its answer, if the two fit one record
    /// and the day's budget.
    pub fn capture(&self, policy: CapturePolicy, id: &str, inputs: &[Tensor], outputs: &[Tensor]) {
        let Some(outbox) = &self.outbox else { return };
        let (Ok(ins), Ok(outs)) = (encode_tensors(inputs), encode_tensors(outputs)) else { return };
        let bytes = (ins.len() + outs.len()) as u64;
        {
            let mut day = self.capture.lock().expect("lock");
            let now = today();
            if day.day != now {
                *day = CaptureDay { day: now, bytes: 0 };
            }
            if bytes as usize > MAX_CAPTURE_BYTES || day.bytes + bytes > policy.daily_bytes {
                self.capture_skipped.fetch_add(1, Ordering::Relaxed);
                debug!(model = %self.name, bytes, "sample not captured: over its size or the day's budget");
                return;
            }
            day.bytes += bytes;
        }
        self.captured.fetch_add(1, Ordering::Relaxed);
        outbox.push(TelemetryBody::Capture(CapturedSample {
            model: self.name.clone(),
            version: self.version,
            inference_id: id.to_owned(),
            inputs: ins,
            outputs: outs,
        }));
    }
}
