//! The local inference API for apps on the device, on 127.0.0.1 and on a
//! Unix socket: `GET /v1/models`, `POST /v1/models/NAME:predict`.

use crate::gate::{Gate, Timing};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tern_proto::{
    DType, DeviceId, ModelManifest, ModelState, ModelStatus, TENSORS_MEDIA_TYPE, TensorSpec, decode_tensors,
    encode_tensors,
};
use tern_runtime::{Backend, Tensor, TensorData, check_inputs};
use tokio::sync::{Notify, watch};

/// Largest request body (a batch of images fits; a runaway client does not).
const MAX_BODY: usize = 64 << 20;

/// A model that is answering requests.
pub struct Served {
    /// What the registry signed for it.
    pub manifest: ModelManifest,
    /// The loaded model (for its signature).
    pub backend: Arc<dyn Backend>,
    /// Its run slots and bounded queue.
    pub gate: Gate,
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
    pub fn new(manifest: ModelManifest, backend: Arc<dyn Backend>, gate: Gate) -> Self {
        Self {
            manifest,
            backend,
            gate,
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            nonfinite_inputs: AtomicU64::new(0),
        }
    }
}

/// What the API shares with the agent's main loop.
pub struct Shared {
    pub device: DeviceId,
    pub models: RwLock<BTreeMap<String, Arc<Served>>>,
    pub status: watch::Receiver<Vec<ModelStatus>>,
    /// Signalled when a model's health changes, so the status is re-sent.
    pub health_changed: Notify,
    /// Worker threads per model.
    pub threads: usize,
    /// Queue slots per model.
    pub queue: usize,
}

impl Shared {
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

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/models", get(list))
        .route("/v1/models/{target}", post(predict).layer(DefaultBodyLimit::max(MAX_BODY)))
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
    for st in shared.status.borrow().iter().filter(|s| !matches!(s.state, ModelState::Serving | ModelState::Unhealthy))
    {
        out.push(json!({ "name": st.name, "version": st.version, "state": st.state, "detail": st.detail }));
    }
    Json(json!({ "device": shared.device, "models": out }))
}

#[derive(Deserialize)]
pub struct PredictRequest {
    inputs: Vec<JsonTensor>,
}

#[derive(Deserialize)]
struct JsonTensor {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    dtype: Option<DType>,
    shape: Vec<usize>,
    data: Value,
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

fn convert(input: &str, values: &[&Value], dtype: DType) -> Result<TensorData, ApiError> {
    fn ints<T: TryFrom<i64> + TryFrom<u64>>(input: &str, values: &[&Value], dtype: DType) -> Result<Vec<T>, ApiError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let n = if let Some(n) = v.as_i64() {
                    T::try_from(n).ok()
                } else {
                    v.as_u64().and_then(|n| T::try_from(n).ok())
                };
                n.ok_or_else(|| bad(format!("input {input:?}: element {i} ({v}) is not a {dtype}")))
            })
            .collect()
    }
    let floats = || -> Result<Vec<f64>, ApiError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_f64().ok_or_else(|| bad(format!("input {input:?}: element {i} ({v}) is not a number"))))
            .collect()
    };
    Ok(match dtype {
        DType::F32 => TensorData::F32(floats()?.into_iter().map(|x| x as f32).collect()),
        DType::F64 => TensorData::F64(floats()?),
        DType::I8 => TensorData::I8(ints(input, values, dtype)?),
        DType::I16 => TensorData::I16(ints(input, values, dtype)?),
        DType::I32 => TensorData::I32(ints(input, values, dtype)?),
        DType::I64 => TensorData::I64(ints(input, values, dtype)?),
        DType::U8 => TensorData::U8(ints(input, values, dtype)?),
        DType::U16 => TensorData::U16(ints(input, values, dtype)?),
        DType::U32 => TensorData::U32(ints(input, values, dtype)?),
        DType::U64 => TensorData::U64(ints(input, values, dtype)?),
        DType::Bool => TensorData::Bool(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_bool().ok_or_else(|| bad(format!("input {input:?}: element {i} ({v}) is not a bool")))
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// JSON tensors to runtime tensors, in the model's input order. Unnamed
/// inputs are taken in order; the element type defaults to the model's.
fn to_tensors(req: PredictRequest, specs: &[TensorSpec]) -> Result<Vec<Tensor>, ApiError> {
    let named = req.inputs.iter().all(|t| t.name.is_some()) && !req.inputs.is_empty();
    let mut ordered: Vec<(usize, JsonTensor)> = Vec::with_capacity(req.inputs.len());
    for (i, t) in req.inputs.into_iter().enumerate() {
        let ix = if named {
            let name = t.name.as_deref().expect("checked");
            specs.iter().position(|s| s.name == name).ok_or_else(|| {
                let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
                bad(format!("model has no input {name:?} (inputs: {})", names.join(", ")))
            })?
        } else {
            i
        };
        ordered.push((ix, t));
    }
    ordered.sort_by_key(|(ix, _)| *ix);
    ordered
        .into_iter()
        .map(|(ix, t)| {
            let spec = specs.get(ix);
            let name = spec.map_or("?", |s| s.name.as_str());
            let dtype = t.dtype.or(spec.map(|s| s.dtype)).unwrap_or(DType::F32);
            let mut values = Vec::new();
            flatten(&t.data, &mut values);
            let data = convert(name, &values, dtype)?;
            Tensor::new(t.shape, data).map_err(|e| bad(format!("input {name:?}: {e}")))
        })
        .collect()
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

async fn predict(
    State(shared): State<Arc<Shared>>,
    Path(target): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let start = Instant::now();
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
    let binary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(TENSORS_MEDIA_TYPE));
    let inputs = if binary {
        decode_tensors(&body).map_err(|e| bad(format!("bad tensor body: {e}")))?
    } else {
        let req: PredictRequest = serde_json::from_slice(&body).map_err(|e| bad(format!("bad JSON body: {e}")))?;
        to_tensors(req, served.backend.inputs())?
    };
    check_inputs(served.backend.inputs(), &inputs).map_err(|e| bad(e.to_string()))?;
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
