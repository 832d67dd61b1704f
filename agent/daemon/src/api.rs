//! The local inference API for apps on the device, on 127.0.0.1 and on a
//! Unix socket: `GET /v1/models`, `POST /v1/models/NAME:predict`.

use crate::gate::{Gate, Timing};
use crate::serve::ConnState;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tern_proto::{
    DeviceId, ModelManifest, ModelState, ModelStatus, StatusReport, TENSORS_MEDIA_TYPE, TensorSpec, decode_tensors,
    encode_tensors,
};
use tern_proto::{JsonError, Limits, RequestLimits, decode_json};
use tern_runtime::{Backend, Tensor, TensorData, check_inputs};
use tokio::sync::{Notify, Semaphore, SemaphorePermit, watch};

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
}

impl Served {
    pub fn new(manifest: ModelManifest, backend: Arc<dyn Backend>, gate: Gate, limits: &Limits) -> Self {
        let limits = RequestLimits::new(backend.inputs(), *limits);
        Self {
            manifest,
            backend,
            gate,
            limits,
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            nonfinite_inputs: AtomicU64::new(0),
        }
    }
}

/// The bytes of request data all connections together may hold at once:
/// bodies as they arrive, and the inputs decoded from them until their
/// answer is sent. A request waits for room (within its deadline); one
/// that could never fit is refused at once.
pub struct Budget {
    bytes: Semaphore,
    total: usize,
}

impl Budget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        Self { bytes: Semaphore::new(total.min(Semaphore::MAX_PERMITS)), total }
    }

    /// Waits for `n` more bytes of room, adding them to `held`; `waiting` is
    /// set while it waits.
    async fn take<'a>(
        &'a self,
        held: &mut Option<SemaphorePermit<'a>>,
        n: usize,
        waiting: &AtomicBool,
    ) -> Result<(), ApiError> {
        let held_now = held.as_ref().map_or(0, |p| p.num_permits());
        if held_now + n > self.total {
            return Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request needs {} bytes, more than the agent's request memory of {} bytes",
                    held_now + n,
                    self.total
                ),
            ));
        }
        let Ok(n) = u32::try_from(n) else {
            return Err(ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("request of {n} bytes is too large")));
        };
        waiting.store(true, Ordering::Relaxed);
        let permit = self.bytes.acquire_many(n).await.expect("never closed");
        waiting.store(false, Ordering::Relaxed);
        match held {
            Some(p) => p.merge(permit),
            None => *held = Some(permit),
        }
        Ok(())
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
}

impl Shared {
    pub fn new(
        device: DeviceId,
        status: watch::Receiver<StatusReport>,
        threads: usize,
        queue: usize,
        limits: Limits,
        budget: usize,
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
        .fallback(|| async {
            ApiError(StatusCode::NOT_FOUND, "no such route; try GET /v1/models or POST /v1/models/NAME:predict".into())
        })
        .with_state(shared)
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
                "healthy": s.healthy.load(Ordering::Relaxed),
                "last_error": s.last_error.lock().expect("lock").clone(),
                "threads": s.gate.threads(),
                "queue": s.gate.queue(),
                "max_body": { "json": s.limits.json_body, "binary": s.limits.binary_body },
                "sha256": s.manifest.sha256,
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

/// Reads a body of at most `limit` bytes, holding budget for every byte as
/// it arrives.
async fn read_body<'a>(
    body: Body,
    limit: usize,
    budget: &'a Budget,
    held: &mut Option<SemaphorePermit<'a>>,
    waiting: &AtomicBool,
) -> Result<Vec<u8>, ApiError> {
    let mut body = body;
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| bad(format!("reading the request body: {e}")))?;
        let Ok(chunk) = frame.into_data() else { continue };
        if out.len() + chunk.len() > limit {
            return Err(too_large(format!("request body exceeds the {limit} bytes this model's inputs can take")));
        }
        budget.take(held, chunk.len(), waiting).await?;
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
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("unknown action in {target:?}; use POST /v1/models/NAME:predict"),
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
    let waiting = AtomicBool::new(false);
    let (inputs, start) = tokio::time::timeout(BODY_DEADLINE, async {
        let body = read_body(body, limit, &shared.budget, &mut held, &waiting).await?;
        let received = Instant::now();
        // Room for the decoded inputs too: binary bodies decode to their own
        // size; JSON to at most 8 bytes per 2-byte element.
        let decoded = if binary { body.len() } else { body.len().saturating_mul(4).min(served.limits.decoded) };
        shared.budget.take(&mut held, decoded, &waiting).await?;
        Ok::<_, ApiError>((decode(&served, binary, &body)?, received))
    })
    .await
    .map_err(|_| {
        if waiting.load(Ordering::Relaxed) {
            // Other requests held the memory all along.
            let m = format!("the agent's request memory stayed in use for {} s; retry later", BODY_DEADLINE.as_secs());
            ApiError(StatusCode::SERVICE_UNAVAILABLE, m)
        } else {
            let m = format!("request body not received within {} s", BODY_DEADLINE.as_secs());
            ApiError(StatusCode::REQUEST_TIMEOUT, m)
        }
    })??;
    let _busy = parts.extensions.get::<Arc<ConnState>>().map(|c| c.busy());
    let (outputs, timing) = run(&shared, &served, inputs).await?;
    let mut response = if binary {
        let bytes = encode_tensors(&outputs).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        ([(header::CONTENT_TYPE, TENSORS_MEDIA_TYPE)], bytes).into_response()
    } else {
        let specs = served.backend.outputs();
        let outputs: Vec<Value> = outputs.iter().enumerate().map(|(i, t)| tensor_json(specs.get(i), t)).collect();
        Json(json!({ "model": name, "version": served.manifest.version, "outputs": outputs })).into_response()
    };
    response.headers_mut().insert("server-timing", server_timing(timing, start.elapsed()));
    Ok(response)
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

fn tensor_json(spec: Option<&TensorSpec>, t: &Tensor) -> Value {
    let data = match &t.data {
        TensorData::F32(v) => json!(v),
        TensorData::F64(v) => json!(v),
        TensorData::I8(v) => json!(v),
        TensorData::I16(v) => json!(v),
        TensorData::I32(v) => json!(v),
        TensorData::I64(v) => json!(v),
        TensorData::U8(v) => json!(v),
        TensorData::U16(v) => json!(v),
        TensorData::U32(v) => json!(v),
        TensorData::U64(v) => json!(v),
        TensorData::Bool(v) => json!(v),
    };
    json!({ "name": spec.map(|s| s.name.as_str()), "dtype": t.dtype(), "shape": t.shape, "data": data })
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
            _ => 0,
        } as u64)
        .sum()
}

/// Runs checked inputs through the model's gate; keeps its counters and health.
async fn run(shared: &Shared, served: &Arc<Served>, inputs: Vec<Tensor>) -> Result<(Vec<Tensor>, Timing), ApiError> {
    let name = &served.manifest.name;
    let bad_values = nonfinite(&inputs);
    if bad_values > 0 {
        served.nonfinite_inputs.fetch_add(bad_values, Ordering::Relaxed);
    }
    let (result, timing) = served.gate.run(served.backend.as_ref(), inputs).await.map_err(|e| {
        served.busy.fetch_add(1, Ordering::Relaxed);
        ApiError(StatusCode::TOO_MANY_REQUESTS, format!("model {name:?} is {e}; retry later"))
    })?;
    served.requests.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(outputs) => {
            if !served.healthy.swap(true, Ordering::Relaxed) {
                tracing::info!(model = %name, "healthy again");
                shared.health_changed.notify_one();
            }
            Ok((outputs, timing))
        }
        Err(e) => {
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
