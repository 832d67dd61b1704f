//! The local inference API for apps on the device, on 127.0.0.1 and on a
//! Unix socket: `GET /v1/models`, `POST /v1/models/NAME:predict` (each
//! answer with its inference id), `POST /v1/models/NAME:feedback` (the
//! ground truth of an answer), `GET /v1/models/NAME/drift` and
//! `NAME/quality`, and `POST /v1/models/NAME:defer` / `NAME:release` for an
//! app's defer lease.

use crate::gate::{Gate, Timing};
use crate::runner::{LeaseOp, LeaseRequest};
use crate::serve::ConnState;
use crate::update::{Latency, Shadow};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tern_proto::{
    DType, DeviceId, ModelManifest, ModelState, ModelStatus, StatusReport, TENSORS_MEDIA_TYPE, TensorSpec,
    decode_tensors, encode_tensors,
};
use tern_proto::{JsonError, Limits, RequestLimits, decode_json};
use tern_runtime::{Backend, Tensor, TensorData, check_inputs};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

/// A request's body must have arrived this long after its headers, or it is
/// answered 408 and its connection closed.
pub const BODY_DEADLINE: Duration = Duration::from_secs(10);

/// A model that is answering requests.
pub struct Served {
    /// What the registry signed for it.
    pub manifest: ModelManifest,
    /// The loaded model (for its signature).
    pub backend: Arc<dyn Backend>,
    /// Its run slots and bounded queue.
    pub gate: Gate,
    /// What one request may carry.
    pub limits: RequestLimits,
    /// False while its last run failed inside the runtime.
    pub healthy: AtomicBool,
    /// Why the last failed run failed.
    pub last_error: Mutex<Option<String>>,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests that failed inside the runtime.
    pub errors: AtomicU64,
    /// Requests refused because the queue was full.
    pub busy: AtomicU64,
    /// NaN or infinite input elements seen (they are passed on, and counted).
    pub nonfinite_inputs: AtomicU64,
    /// Run times, for the p99 probation is judged on.
    pub latency: Latency,
    /// Where its update stands: [`COMMITTED`], [`ON_PROBATION`] or
    /// [`ROLLING_BACK`].
    pub update: AtomicU8,
    /// Its drift windows, where the version has a baseline.
    pub drift: Option<crate::drift::Drift>,
    /// Its answers awaiting ground truth, quality windows and captures.
    pub quality: Arc<crate::feedback::Quality>,
}

/// The committed version.
pub const COMMITTED: u8 = 0;
/// Serving on probation, not yet committed.
pub const ON_PROBATION: u8 = 1;
/// Still answering after it broke its probation (or was replaced on it),
/// until the committed version is loaded again.
pub const ROLLING_BACK: u8 = 2;

impl Served {
    pub fn new(manifest: ModelManifest, backend: Arc<dyn Backend>, gate: Gate, limits: &Limits) -> Self {
        let limits = RequestLimits::new(backend.inputs(), *limits);
        Self {
            backend,
            gate,
            limits,
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            nonfinite_inputs: AtomicU64::new(0),
            latency: Latency::default(),
            quality: Arc::new(crate::feedback::Quality::new(&manifest, Default::default(), None)),
            manifest,
            update: AtomicU8::new(COMMITTED),
            drift: None,
        }
    }
}

/// The bytes of request data all connections together may hold at once:
/// bodies as they arrive, the inputs decoded from them, and the answers
/// until they have been sent. Room is never waited for: a request that
/// finds none answers 503 at once (so no two requests can each hold part of
/// what they need and wait for the rest), and one that could never fit 413.
pub struct Budget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl Budget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        Self { bytes: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))), total }
    }

    /// Takes `n` more bytes of room, adding them to `held`.
    fn take(&self, held: &mut Option<OwnedSemaphorePermit>, n: usize) -> Result<(), ApiError> {
        let held_now = held.as_ref().map_or(0, |p| p.num_permits());
        if held_now.saturating_add(n) > self.total {
            let m = format!(
                "request needs {} bytes, more than the agent's request memory of {} bytes",
                held_now.saturating_add(n),
                self.total
            );
            return Err(too_large(m));
        }
        let permit =
            u32::try_from(n).ok().and_then(|n| self.bytes.clone().try_acquire_many_owned(n).ok()).ok_or_else(|| {
                let m = format!(
                    "the agent's request memory ({} bytes) is in use by other requests; retry later",
                    self.total
                );
                ApiError(StatusCode::SERVICE_UNAVAILABLE, m)
            })?;
        match held {
            Some(p) => p.merge(permit),
            None => *held = Some(permit),
        }
        Ok(())
    }
}

/// An answer's bytes, with the request memory they take: handed to hyper a
/// piece at a time (it asks for the next only when it has room to write
/// it), each piece a copy, so that once the last is handed over (and the
/// memory given back) at most hyper's write queue of pieces is left in the
/// heap. A client must take the whole answer within `ANSWER_WITHIN`
/// of its first piece, or the connection ends: a slow reader cannot hold
/// the memory for long.
struct Held {
    bytes: Vec<u8>,
    sent: usize,
    started: Option<Instant>,
    _room: Option<OwnedSemaphorePermit>,
}

/// The pieces an answer is handed over in.
const PIECE: usize = 64 << 10;
/// How long a client may take to read a whole answer.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let started = *self.started.get_or_insert_with(Instant::now);
        if self.sent == self.bytes.len() {
            return std::task::Poll::Ready(None);
        }
        if started.elapsed() > ANSWER_WITHIN {
            let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "the client did not take its answer in time");
            return std::task::Poll::Ready(Some(Err(e)));
        }
        let end = self.bytes.len().min(self.sent + PIECE);
        let piece = Bytes::copy_from_slice(&self.bytes[self.sent..end]);
        self.sent = end;
        if self.sent == self.bytes.len() {
            // Handed over in full: the answer and its room go now.
            self.bytes = Vec::new();
            self.sent = 0;
            self._room = None;
        }
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.bytes.len()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact((self.bytes.len() - self.sent) as u64)
    }
}

/// What the API shares with the agent's main loop.
pub struct Shared {
    pub device: DeviceId,
    pub models: RwLock<BTreeMap<String, Arc<Served>>>,
    pub status: watch::Receiver<StatusReport>,
    /// Signalled when a model's health changes, so the status is re-sent.
    pub health_changed: Notify,
    /// Concurrent runs per model.
    pub threads: usize,
    /// Queue slots per model.
    pub queue: usize,
    /// Batch and element limits of requests.
    pub limits: Limits,
    /// Request memory, shared by every connection.
    pub budget: Budget,
    /// Candidates running beside the serving version, by model name.
    pub shadows: RwLock<BTreeMap<String, Arc<Shadow>>>,
    /// Where defer lease requests go (the main loop, once it runs).
    pub leases: std::sync::OnceLock<tokio::sync::mpsc::Sender<LeaseRequest>>,
    /// How versions with a baseline are windowed and alerted on.
    pub monitor: tern_agent_core::monitor::MonitorConfig,
    /// Where their windows and alerts go for the coordinator.
    pub outbox: std::sync::OnceLock<Arc<crate::outbox::Outbox>>,
    /// The bytes each link carried per day (set once at start).
    pub traffic: std::sync::OnceLock<Arc<crate::traffic::Traffic>>,
    /// How long answers wait for their ground truth; quality windows.
    pub feedback: tern_agent_core::feedback::FeedbackConfig,
    /// The capture policy of each model's version in the last verified
    /// desired state, by model name.
    pub capture: RwLock<BTreeMap<String, (u32, tern_proto::CapturePolicy)>>,
    /// Where `capture` is kept across restarts (`None`: not kept).
    pub capture_path: Option<std::path::PathBuf>,
    /// Held while `capture` is written.
    pub capture_writing: Mutex<()>,
    /// The operator's refusal of every capture policy (`--no-capture`).
    pub no_capture: bool,
    /// Versions replaced a while ago: their answers may still get their
    /// ground truth (when, and the version's quality windows).
    pub retired: Mutex<Vec<(Instant, Arc<crate::feedback::Quality>)>>,
}

/// Versions replaced or unloaded that still take feedback, at most, per
/// model and in all.
const RETIRED_PER_MODEL: usize = 2;
const RETIRED: usize = 16;

impl Shared {
    /// Keeps a replaced version's quality windows taking feedback for the
    /// answers it gave, until they have waited long enough.
    pub fn retire(&self, q: Arc<crate::feedback::Quality>) {
        let mut r = self.retired.lock().expect("lock");
        if r.iter().filter(|(_, o)| o.name() == q.name()).count() >= RETIRED_PER_MODEL
            && let Some(i) = r.iter().position(|(_, o)| o.name() == q.name())
        {
            r.remove(i).1.flush();
        }
        r.push((Instant::now(), q));
        while r.len() > RETIRED {
            r.remove(0).1.flush();
        }
    }

    /// Closes the windows of replaced versions that are old or full, and
    /// flushes and forgets those whose answers have waited long enough.
    pub fn tick_retired(&self) {
        let keep = Duration::from_millis(self.feedback.keep_ms);
        let mut r = self.retired.lock().expect("lock");
        r.retain(|(at, q)| {
            if at.elapsed() >= keep {
                q.flush();
                return false;
            }
            q.tick();
            true
        });
    }

    /// Takes the capture policies of a verified desired state and keeps
    /// them on disk (off the runtime), unless the operator refuses them.
    pub fn set_capture(self: &Arc<Self>, policies: BTreeMap<String, (u32, tern_proto::CapturePolicy)>) {
        let policies = if self.no_capture { BTreeMap::new() } else { policies };
        let mut now = self.capture.write().expect("lock");
        if *now == policies {
            return;
        }
        *now = policies;
        drop(now);
        let Some(path) = self.capture_path.clone() else { return };
        let shared = self.clone();
        std::thread::spawn(move || {
            // One write at a time, each of the policies current then: the
            // last to finish writes the newest.
            let _one = shared.capture_writing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let bytes = serde_json::to_vec(&*shared.capture.read().expect("lock")).expect("policies encode");
            if let Err(e) = tern_durable::write_atomic(&path, &bytes, false) {
                tracing::warn!("writing {}: {e}", path.display());
            }
        });
    }
}

impl Shared {
    pub fn new(
        device: DeviceId,
        status: watch::Receiver<StatusReport>,
        threads: usize,
        queue: usize,
        limits: Limits,
        budget: usize,
        monitor: tern_agent_core::monitor::MonitorConfig,
    ) -> Self {
        Self {
            device,
            models: Default::default(),
            status,
            health_changed: Notify::new(),
            threads,
            queue,
            limits,
            budget: Budget::new(budget),
            shadows: Default::default(),
            leases: Default::default(),
            monitor,
            outbox: Default::default(),
            traffic: Default::default(),
            feedback: Default::default(),
            capture: Default::default(),
            capture_path: None,
            capture_writing: Mutex::new(()),
            no_capture: false,
            retired: Default::default(),
        }
    }

    /// The core's status with the health of what is serving folded in.
    pub fn status_with_health(&self, mut status: Vec<ModelStatus>) -> Vec<ModelStatus> {
        let models = self.models.read().expect("lock");
        for st in status.iter_mut().filter(|s| s.state == ModelState::Serving) {
            if let Some(m) = models.get(&st.name).filter(|m| m.manifest.version == st.version)
                && !m.healthy.load(Ordering::Relaxed)
            {
                st.state = ModelState::Unhealthy;
                st.detail = m.last_error.lock().expect("lock").clone();
            }
        }
        status
    }
}

/// An error answer: `{"error": …}` with a fitting status.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn too_large(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::PAYLOAD_TOO_LARGE, msg.into())
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/models", get(list))
        .route("/v1/models/{target}", post(predict))
        .route("/v1/models/{name}/drift", get(drift))
        .route("/v1/models/{name}/quality", get(quality))
        .route("/v1/telemetry", get(telemetry))
        .fallback(|| async {
            ApiError(StatusCode::NOT_FOUND, "no such route; try GET /v1/models or POST /v1/models/NAME:predict".into())
        })
        .with_state(shared)
}

/// `GET /v1/telemetry`: records waiting on disk for the coordinator, those
/// made but not yet on disk, and the bytes each link carried per day (as
/// counted when a session last reported or ended).
async fn telemetry(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let (held, queued, stream) = shared.outbox.get().map_or((0, 0, 0), |o| (o.held(), o.queued(), o.stream()));
    let traffic = shared.traffic.get().map(|t| t.days()).unwrap_or_default();
    Json(serde_json::json!({ "held": held, "queued": queued, "stream": format!("{stream:016x}"), "traffic": traffic }))
}

/// `GET /v1/models/NAME/quality`: answers of the serving version awaiting
/// their ground truth, its last quality window, and its captures.
async fn quality(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let served = shared
        .models
        .read()
        .expect("lock")
        .get(&name)
        .cloned()
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no model named {name:?} is loaded")))?;
    let mut v = served.quality.json();
    v["model"] = json!(name);
    v["version"] = json!(served.manifest.version);
    Ok(Json(v))
}

/// Largest body of a feedback request.
const FEEDBACK_BODY: usize = 64 << 10;

/// `NAME:feedback` with `{"inference_id": ID, "label": N}` (or `labels`,
/// one per row of the answer; `value` / `values` for a regressor): the
/// ground truth of an answer of the serving version, counted once.
async fn feedback(shared: &Shared, name: &str, req: Request) -> Result<Response, ApiError> {
    // The serving version first, then versions replaced or unloaded.
    let serving = shared.models.read().expect("lock").get(name).map(|s| s.quality.clone());
    let retired = shared.retired.lock().expect("lock").iter().rev().map(|(_, q)| q.clone()).collect::<Vec<_>>();
    let candidates: Vec<_> = serving.into_iter().chain(retired.into_iter().filter(|q| q.name() == name)).collect();
    if candidates.is_empty() {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no model named {name:?} is loaded")));
    }
    let mut held = None;
    let body =
        tokio::time::timeout(BODY_DEADLINE, read_body(req.into_body(), FEEDBACK_BODY, &shared.budget, &mut held))
            .await
            .map_err(|_| {
                ApiError(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request body not received within {} s", BODY_DEADLINE.as_secs()),
                )
            })??;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Post {
        inference_id: String,
        label: Option<i64>,
        labels: Option<Vec<i64>>,
        value: Option<f64>,
        values: Option<Vec<f64>>,
    }
    let post: Post = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("expected {{\"inference_id\": ID, \"label\": N}} (or labels, value, values): {e}")))?;
    use tern_agent_core::feedback::{FeedbackError, Truth};
    let truth = match (post.label, post.labels, post.value, post.values) {
        (Some(l), None, None, None) => Truth::Labels(vec![l]),
        (None, Some(l), None, None) => Truth::Labels(l),
        (None, None, Some(v), None) => Truth::Values(vec![v]),
        (None, None, None, Some(v)) => Truth::Values(v),
        _ => return Err(bad("give exactly one of label, labels, value, values")),
    };
    let mut result = Err(FeedbackError::Unknown(post.inference_id.clone()));
    for q in &candidates {
        match q.feedback(&post.inference_id, truth.clone()) {
            Err(FeedbackError::Unknown(_)) => continue,
            other => {
                result = other.map(|n| (n, q.version()));
                break;
            }
        }
    }
    match result {
        Ok((rows, version)) => Ok(Json(json!({ "model": name, "version": version, "counted": rows })).into_response()),
        Err(e @ FeedbackError::Unknown(_)) => Err(ApiError(StatusCode::NOT_FOUND, e.to_string())),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// `GET /v1/models/NAME/drift`: the serving version's drift windows and
/// alerts.
async fn drift(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let served = shared.models.read().expect("lock").get(&name).cloned();
    let served = served.ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no model named {name:?} is loaded")))?;
    match &served.drift {
        Some(d) => Ok(Json(d.json())),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{name}:{} has no baseline (register it with --baseline)", served.manifest.version),
        )),
    }
}

async fn list(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let models = shared.models.read().expect("lock").clone();
    let mut out: Vec<Value> = models
        .values()
        .map(|s| {
            json!({
                "name": s.manifest.name,
                "version": s.manifest.version,
                "format": s.manifest.format,
                "state": if s.healthy.load(Ordering::Relaxed) { ModelState::Serving } else { ModelState::Unhealthy },
                "update": match s.update.load(Ordering::Relaxed) {
                    ON_PROBATION => "probation",
                    ROLLING_BACK => "rolling back",
                    _ => "committed",
                },
                "healthy": s.healthy.load(Ordering::Relaxed),
                "last_error": s.last_error.lock().expect("lock").clone(),
                "threads": s.gate.threads(),
                "queue": s.gate.queue(),
                "max_body": { "json": s.limits.json_body, "binary": s.limits.binary_body },
                "sha256": s.manifest.sha256,
                "format": s.manifest.format,
                "inputs": s.backend.inputs(),
                "outputs": s.backend.outputs(),
                "requests": s.requests.load(Ordering::Relaxed),
                "errors": s.errors.load(Ordering::Relaxed),
                "busy": s.busy.load(Ordering::Relaxed),
                "nonfinite_inputs": s.nonfinite_inputs.load(Ordering::Relaxed),
            })
        })
        .collect();
    // Versions on their way in (or failed) are listed too, so an app can see why.
    for st in
        shared.status.borrow().models.iter().filter(|s| !matches!(s.state, ModelState::Serving | ModelState::Unhealthy))
    {
        out.push(json!({ "name": st.name, "version": st.version, "state": st.state, "detail": st.detail }));
    }
    Json(json!({ "device": shared.device, "models": out }))
}

/// Largest body of a lease request.
const LEASE_BODY: usize = 1024;

/// `NAME:defer` with `{"seconds": N}`: activation of a new version of the
/// model is held back for up to N seconds (at most what the update policy
/// allows); `NAME:release` ends the lease.
async fn lease(shared: &Shared, name: &str, req: Request, defer: bool) -> Result<Response, ApiError> {
    let op = if defer {
        let mut held = None;
        let body = read_body(req.into_body(), LEASE_BODY, &shared.budget, &mut held).await?;
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Ask {
            seconds: u64,
        }
        let ask: Ask = serde_json::from_slice(&body).map_err(|e| bad(format!("expected {{\"seconds\": N}}: {e}")))?;
        LeaseOp::Defer(ask.seconds)
    } else {
        LeaseOp::Release
    };
    let unavailable = || ApiError(StatusCode::SERVICE_UNAVAILABLE, "the agent is starting; try again".into());
    let tx = shared.leases.get().ok_or_else(unavailable)?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    tx.send((name.to_owned(), op, reply)).await.map_err(|_| unavailable())?;
    let answer = answer.await.map_err(|_| unavailable())?;
    let body = match answer {
        Ok(secs) if defer => json!({ "model": name, "granted_seconds": secs }),
        Ok(held) => json!({ "model": name, "released": held == 1 }),
        Err(e @ tern_agent_core::DeferError::NoSuchModel(_)) => {
            return Err(ApiError(StatusCode::NOT_FOUND, e.to_string()));
        }
        Err(e) => return Err(ApiError(StatusCode::CONFLICT, e.to_string())),
    };
    Ok(Json(body).into_response())
}

/// Reads a body of at most `limit` bytes, taking budget for every byte as
/// it arrives.
async fn read_body(
    body: Body,
    limit: usize,
    budget: &Budget,
    held: &mut Option<OwnedSemaphorePermit>,
) -> Result<Vec<u8>, ApiError> {
    let mut body = body;
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| bad(format!("reading the request body: {e}")))?;
        let Ok(chunk) = frame.into_data() else { continue };
        if out.len() + chunk.len() > limit {
            return Err(too_large(format!("request body exceeds the {limit} bytes this model's inputs can take")));
        }
        budget.take(held, chunk.len())?;
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn predict(
    State(shared): State<Arc<Shared>>,
    Path(target): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let Some(name) = target.strip_suffix(":predict") else {
        if let Some(name) = target.strip_suffix(":defer") {
            return lease(&shared, name, req, true).await;
        }
        if let Some(name) = target.strip_suffix(":release") {
            return lease(&shared, name, req, false).await;
        }
        if let Some(name) = target.strip_suffix(":feedback") {
            return feedback(&shared, name, req).await;
        }
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "unknown action in {target:?}; use POST /v1/models/NAME:predict, NAME:feedback, NAME:defer or NAME:release"
            ),
        ));
    };
    // One guard: taking the read lock again while it is held can deadlock
    // behind a waiting writer (a model being swapped in).
    let served = {
        let models = shared.models.read().expect("lock");
        models.get(name).cloned().ok_or_else(|| {
            let loaded: Vec<&str> = models.keys().map(String::as_str).collect();
            let loaded = if loaded.is_empty() { "none".into() } else { loaded.join(", ") };
            ApiError(StatusCode::NOT_FOUND, format!("no model named {name:?} is loaded (loaded: {loaded})"))
        })?
    };
    let (parts, body) = req.into_parts();
    let binary = is_binary(&parts.headers);
    let limit = if binary { served.limits.binary_body } else { served.limits.json_body };
    if let Some(declared) = content_length(&parts.headers)
        && declared > limit
    {
        // At once, unread: the connection closes after this answer.
        return Err(too_large(format!(
            "request body of {declared} bytes exceeds the {limit} bytes this model's inputs can take"
        )));
    }
    let mut held = None;
    let (inputs, start) = tokio::time::timeout(BODY_DEADLINE, async {
        let body = read_body(body, limit, &shared.budget, &mut held).await?;
        let received = Instant::now();
        // Room for the decoded inputs too: binary bodies decode to their own
        // size; JSON to at most 8 bytes per 2-byte element.
        let decoded = if binary { body.len() } else { body.len().saturating_mul(4).min(served.limits.decoded) };
        shared.budget.take(&mut held, decoded)?;
        Ok::<_, ApiError>((decode(&served, binary, &body)?, received))
    })
    .await
    .map_err(|_| {
        ApiError(StatusCode::REQUEST_TIMEOUT, format!("request body not received within {} s", BODY_DEADLINE.as_secs()))
    })??;
    let conn = parts.extensions.get::<Arc<ConnState>>().cloned();
    // A candidate in shadow gets a copy of the inputs when it is idle; it
    // runs on its own thread, and this request never waits for it.
    let shadow = shared.shadows.read().expect("lock").get(name).cloned();
    let claim = shadow.as_ref().and_then(|s| s.claim());
    let copy = claim.as_ref().map(|_| inputs.clone());
    let policy =
        shared.capture.read().expect("lock").get(name).filter(|(v, _)| *v == served.manifest.version).map(|(_, p)| *p);
    let captured = served.quality.draw(policy, &inputs).then(|| inputs.clone());
    let (outputs, timing) = run(&shared, &served, inputs, conn.as_ref()).await?;
    let inference_id = crate::feedback::inference_id();
    served.quality.answered(&inference_id, &outputs);
    if let (Some(p), Some(ins)) = (policy, captured) {
        served.quality.capture(p, &inference_id, &ins, &outputs);
    }
    if let (Some(claim), Some(copy)) = (claim, copy) {
        claim.send(copy, outputs.clone(), timing.ran);
    }
    // Room for the answer before it is made (binary: exact; JSON: at most
    // 26 bytes an element), taken beside the inputs' or, failing that, in
    // their place; what the answer turns out not to need goes back.
    let elements: usize = outputs.iter().map(|t| t.data.len() + t.shape.len()).sum();
    let (per_element, per_tensor) = if binary { (8, 64) } else { (26, 256) };
    let estimate = elements.saturating_mul(per_element).saturating_add(per_tensor * outputs.len() + 128);
    let mut room = None;
    if shared.budget.take(&mut room, estimate).is_err() {
        held = None;
        shared.budget.take(&mut room, estimate)?;
    }
    drop(held);
    let (content_type, bytes) = if binary {
        (TENSORS_MEDIA_TYPE, encode_tensors(&outputs).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?)
    } else {
        let answer = Answer {
            model: name,
            version: served.manifest.version,
            inference_id: &inference_id,
            outputs: outputs.iter().enumerate().map(|(i, t)| Output::of(served.backend.outputs().get(i), t)).collect(),
        };
        let bytes =
            serde_json::to_vec(&answer).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        ("application/json", bytes)
    };
    drop(outputs);
    if let Some(r) = room.as_mut()
        && bytes.len() < r.num_permits()
    {
        drop(r.split(r.num_permits() - bytes.len()));
    }
    let timing = server_timing(timing, start.elapsed());
    let body = Body::new(Held { bytes, sent: 0, started: None, _room: room });
    let mut response = Response::new(body);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert("server-timing", timing);
    if let Ok(v) = HeaderValue::from_str(&inference_id) {
        response.headers_mut().insert("x-tern-inference-id", v);
    }
    Ok(response)
}

/// A predict answer in JSON, written straight from the output tensors.
#[derive(Serialize)]
struct Answer<'a> {
    model: &'a str,
    version: u32,
    inference_id: &'a str,
    outputs: Vec<Output<'a>>,
}

#[derive(Serialize)]
struct Output<'a> {
    name: Option<&'a str>,
    dtype: DType,
    shape: &'a [usize],
    data: Data<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Data<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    I8(&'a [i8]),
    I16(&'a [i16]),
    I32(&'a [i32]),
    I64(&'a [i64]),
    U8(&'a [u8]),
    U16(&'a [u16]),
    U32(&'a [u32]),
    U64(&'a [u64]),
    Bool(&'a [bool]),
    /// `f16` and `bf16`, as the numbers they hold.
    Half(Vec<f32>),
}

impl<'a> Output<'a> {
    fn of(spec: Option<&'a TensorSpec>, t: &'a Tensor) -> Self {
        let data = match &t.data {
            TensorData::F32(v) => Data::F32(v),
            TensorData::F64(v) => Data::F64(v),
            TensorData::I8(v) => Data::I8(v),
            TensorData::I16(v) => Data::I16(v),
            TensorData::I32(v) => Data::I32(v),
            TensorData::I64(v) => Data::I64(v),
            TensorData::U8(v) => Data::U8(v),
            TensorData::U16(v) => Data::U16(v),
            TensorData::U32(v) => Data::U32(v),
            TensorData::U64(v) => Data::U64(v),
            TensorData::Bool(v) => Data::Bool(v),
            TensorData::F16(v) => Data::Half(v.iter().map(|x| x.to_f32()).collect()),
            TensorData::BF16(v) => Data::Half(v.iter().map(|x| x.to_f32()).collect()),
        };
        Self { name: spec.map(|s| s.name.as_str()), dtype: t.dtype(), shape: &t.shape, data }
    }
}

fn is_binary(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with(TENSORS_MEDIA_TYPE))
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The body as checked inputs of `served`.
fn decode(served: &Served, binary: bool, body: &[u8]) -> Result<Vec<Tensor>, ApiError> {
    let specs: &[TensorSpec] = served.backend.inputs();
    let inputs = if binary {
        decode_tensors(body).map_err(|e| bad(format!("bad tensor body: {e}")))?
    } else {
        decode_json(body, specs, &served.limits).map_err(|e| match e {
            JsonError::Bad(m) => bad(m),
            JsonError::TooLarge(m) => too_large(m),
        })?
    };
    check_inputs(specs, &inputs).map_err(|e| bad(e.to_string()))?;
    served.limits.check(specs, &inputs).map_err(|e| too_large(e.0))?;
    Ok(inputs)
}

/// W3C Server-Timing, in milliseconds: waiting for a run slot, the model run,
/// and the whole handler from a received body to an encoded answer.
fn server_timing(t: Timing, handler: Duration) -> HeaderValue {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let v = format!("queue;dur={:.3}, run;dur={:.3}, handler;dur={:.3}", ms(t.queued), ms(t.ran), ms(handler));
    HeaderValue::from_str(&v).expect("ASCII")
}

fn nonfinite(inputs: &[Tensor]) -> u64 {
    inputs
        .iter()
        .map(|t| match &t.data {
            TensorData::F32(v) => v.iter().filter(|x| !x.is_finite()).count(),
            TensorData::F64(v) => v.iter().filter(|x| !x.is_finite()).count(),
            TensorData::F16(v) => v.iter().filter(|x| !x.is_finite()).count(),
            TensorData::BF16(v) => v.iter().filter(|x| !x.is_finite()).count(),
            _ => 0,
        } as u64)
        .sum()
}

/// Runs checked inputs through the model's gate; keeps its counters and
/// health. While the run holds a slot, its connection counts as running a
/// model (and is never evicted).
async fn run(
    shared: &Shared,
    served: &Arc<Served>,
    inputs: Vec<Tensor>,
    conn: Option<&Arc<ConnState>>,
) -> Result<(Vec<Tensor>, Timing), ApiError> {
    let name = &served.manifest.name;
    let bad_values = nonfinite(&inputs);
    if bad_values > 0 {
        served.nonfinite_inputs.fetch_add(bad_values, Ordering::Relaxed);
    }
    if let Some(d) = &served.drift {
        d.inputs(&inputs);
    }
    let (result, timing) =
        served.gate.run(served.backend.as_ref(), inputs, || conn.map(|c| c.busy())).await.map_err(|e| {
            served.busy.fetch_add(1, Ordering::Relaxed);
            ApiError(StatusCode::TOO_MANY_REQUESTS, format!("model {name:?} is {e}; retry later"))
        })?;
    served.requests.fetch_add(1, Ordering::Relaxed);
    served.latency.record(timing.ran);
    let ran_us = timing.ran.as_micros() as u64;
    match result {
        Ok(outputs) => {
            if let Some(d) = &served.drift {
                d.answered(&outputs, ran_us);
            }
            if !served.healthy.swap(true, Ordering::Relaxed) {
                tracing::info!(model = %name, "healthy again");
                shared.health_changed.notify_one();
            }
            Ok((outputs, timing))
        }
        Err(e) => {
            if let Some(d) = &served.drift {
                d.failed(ran_us);
            }
            served.errors.fetch_add(1, Ordering::Relaxed);
            *served.last_error.lock().expect("lock") = Some(e.to_string());
            if served.healthy.swap(false, Ordering::Relaxed) {
                shared.health_changed.notify_one();
            }
            tracing::error!(model = %name, "inference failed: {e}");
            Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        }
    }
}
