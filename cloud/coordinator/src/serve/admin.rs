//! The admin API (HTTP/JSON) the CLI talks to. Every route but `/v1/health`
//! needs `Authorization: Bearer <admin token>`.

use super::{State, golden};
use crate::fsutil::unix_now;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State as Ext};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use tern_proto::{
    BaselineRef, DeviceId, EnrollTokenText, MAX_GOLDEN_BYTES, MAX_GOLDEN_CASES, ManifestEncoding, ModelFormat,
    ModelRef, SelfTestRef, Sha256Digest, TensorSpec, decode_tensors, encode_golden,
};
use tern_registry::{
    Approval, CompileReport, Device, EnrollToken, ModelVersion, NewVersion, OutputError, RegistryError, TargetArtifact,
};
use tern_runtime::sniff_format;
use tracing::info;

/// Largest model upload accepted.
const MAX_UPLOAD: usize = 1 << 30;

/// An error answer: a status and one line for a person, as `{"error": …}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match &e {
            RegistryError::UnknownModel(_)
            | RegistryError::UnknownVersion { .. }
            | RegistryError::UnknownDevice(_)
            | RegistryError::UnknownArtifact(_)
            | RegistryError::UnknownAlert(_)
            | RegistryError::UnknownRollout(_)
            | RegistryError::NotAssigned { .. } => StatusCode::NOT_FOUND,
            RegistryError::Selector(_) => StatusCode::BAD_REQUEST,
            RegistryError::NotApproved { .. }
            | RegistryError::DeviceExists(_)
            | RegistryError::Unsupported { .. }
            | RegistryError::WireTooOld { .. }
            | RegistryError::ProfilePathOnly { .. }
            | RegistryError::NoArtifact { .. }
            | RegistryError::DoesNotFit { .. }
            | RegistryError::CompiledInUse { .. }
            | RegistryError::Deployed { .. } => StatusCode::CONFLICT,
            RegistryError::DigestMismatch { .. } => StatusCode::BAD_REQUEST,
            RegistryError::TokenUnknown | RegistryError::TokenUsed(_) | RegistryError::TokenExpired(_) => {
                StatusCode::BAD_REQUEST
            }
            RegistryError::Corrupt { .. } | RegistryError::Storage(_) | RegistryError::Io(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError(status, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs registry work (sled writes, fsyncs) off the async runtime.
async fn blocking<T: Send + 'static>(
    state: &Arc<State>,
    f: impl FnOnce(&State) -> Result<T, RegistryError> + Send + 'static,
) -> ApiResult<T> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

pub fn router(state: Arc<State>) -> Router {
    let authed = Router::new()
        .route("/v1/artifacts", post(upload).layer(DefaultBodyLimit::max(MAX_UPLOAD)))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}", get(show_model))
        .route("/v1/models/{name}/versions", post(register))
        .route("/v1/models/{name}/versions/{version}", get(show_version))
        .route("/v1/models/{name}/versions/{version}/{decision}", post(decide))
        .route("/v1/models/{name}/versions/{version}/targets/{profile}", put(set_target))
        .route(
            "/v1/models/{name}/versions/{version}/constraints",
            put(set_constraints).delete(clear_constraints).layer(DefaultBodyLimit::max(MAX_CONSTRAINTS_BYTES)),
        )
        .route("/v1/models/{name}/versions/{version}/capture", put(set_capture).delete(clear_capture))
        .route("/v1/models/{name}/versions/{version}/captures", get(list_captures))
        .route("/v1/monitor/quality/{name}", get(quality_view))
        .route("/v1/rollouts", get(list_rollouts).post(start_rollout))
        .route("/v1/rollouts/{id}", get(show_rollout))
        .route("/v1/rollouts/{id}/{command}", post(command_rollout))
        .route("/v1/devices/{id}/group", put(set_group))
        .route("/v1/devices/{id}/tags", post(tag_device))
        .route("/v1/tokens", post(new_token))
        .route("/v1/broker/server-certificate", post(broker_certificate))
        .route("/metrics", get(metrics))
        .route("/v1/alerts", get(list_alerts))
        .route("/v1/alerts/{id}/ack", post(ack_alert))
        .route("/v1/monitor/drift/{name}", get(drift_view))
        .route("/v1/monitor/windows/{name}", get(list_windows))
        .route("/v1/status", get(status))
        .route("/v1/tuf", get(tuf_repository))
        .route("/v1/artifacts/{sha256}", get(artifact))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{id}", get(show_device).delete(remove_device))
        .route("/v1/devices/{id}/models/{name}", put(assign).delete(unassign))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/v1/health", get(|| async { Json(json!({ "ok": true })) }))
        .merge(authed)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API route".into()) })
        .with_state(state)
}

async fn auth(Ext(state): Ext<Arc<State>>, req: Request, next: Next) -> Response {
    let given =
        req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Compare digests so the time taken says nothing about the token. A
    // request without one never passes, whatever the token is (and the
    // coordinator refuses to start with an empty one).
    let ok = given.is_some_and(|g| {
        !state.admin_token.is_empty()
            && Sha256Digest::of(g.as_bytes()) == Sha256Digest::of(state.admin_token.as_bytes())
    });
    if !ok {
        return ApiError(StatusCode::UNAUTHORIZED, "missing or wrong admin token".into()).into_response();
    }
    next.run(req).await
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    body.map(|Json(b)| b).map_err(|e| bad(format!("bad JSON body: {}", e.body_text())))
}

#[derive(Serialize)]
struct Uploaded {
    sha256: Sha256Digest,
    size: u64,
}

async fn upload(
    Ext(state): Ext<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Uploaded>)> {
    let expected = match headers.get("x-tern-sha256") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<Sha256Digest>().ok())
                .ok_or_else(|| bad("x-tern-sha256 must be 64 hex characters"))?,
        ),
        None => None,
    };
    let size = body.len() as u64;
    let sha256 = tokio::task::spawn_blocking(move || state.artifacts.put(&body, expected))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok((StatusCode::CREATED, Json(Uploaded { sha256, size })))
}

#[derive(Deserialize)]
struct RegisterBody {
    sha256: Sha256Digest,
    #[serde(default)]
    card: Option<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    /// Uploaded files of reference inputs (binary tensor encoding), one
    /// golden case each; none: seeded random inputs.
    #[serde(default)]
    references: Vec<Sha256Digest>,
    /// Golden output tolerance in millionths.
    #[serde(default)]
    tolerance_ppm: Option<u32>,
    /// Input shapes to compile it for (and to check that compiling helps
    /// a source raw tract refuses).
    #[serde(default)]
    shapes: BTreeMap<String, Vec<usize>>,
    /// Inputs constant in use (`--const`), for the same check and as
    /// `tern compile`'s default.
    #[serde(default)]
    consts: BTreeMap<String, String>,
    /// An uploaded training baseline (`tern_drift::ModelBaseline`'s file).
    #[serde(default)]
    baseline: Option<Sha256Digest>,
}

/// Refuses a manifest without a canonical form in every encoding its
/// agents may take: postcard (version 1) only where version 1 can name its
/// tensors (newer ones are never sent to version-1 agents).
fn check_canonical(m: &tern_proto::ModelManifest) -> ApiResult<()> {
    let encodings: &[ManifestEncoding] = if m.since() == tern_proto::WireVersion::V1 {
        &[ManifestEncoding::CanonicalJson, ManifestEncoding::Postcard]
    } else {
        &[ManifestEncoding::CanonicalJson]
    };
    for &encoding in encodings {
        m.signed_bytes(encoding).map_err(|e| {
            ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("model refused ({}): its manifest {e}", m.format))
        })?;
    }
    Ok(())
}

/// The golden vectors of `model` (encoded), on `references` or, with none,
/// on seeded inputs: of those, as many as fit (none if not even one does,
/// and agents then run it once on zeros). Reference sets the user chose are
/// all kept or refused.
fn golden_vectors(
    model: &dyn tern_runtime::Backend,
    sha: &Sha256Digest,
    references: Vec<Vec<tern_proto::Tensor>>,
    format: ModelFormat,
    hint: &str,
) -> ApiResult<Option<Vec<u8>>> {
    let random = references.is_empty();
    let mut cases = golden::compute(model, sha, references).map_err(|e| {
        let hint = if random { hint } else { "" };
        let what = if random { "seeded random inputs that fit its signature" } else { "its reference inputs" };
        ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("model refused ({format}): it failed on {what}: {e}{hint}"))
    })?;
    loop {
        match encode_golden(&cases) {
            Ok(g) => return Ok(Some(g)),
            Err(_) if random && cases.len() > 1 => cases.truncate(cases.len() / 2),
            Err(e) if random => {
                tracing::warn!("no golden vectors: {e} for one seeded case");
                return Ok(None);
            }
            Err(e) => {
                let m = format!("model refused ({format}): {e}; use fewer or smaller reference sets");
                return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, m));
            }
        }
    }
}

/// Stores golden vectors in the artifact store.
async fn store_golden(
    state: &Arc<State>,
    golden: Option<Vec<u8>>,
    tolerance_ppm: u32,
) -> ApiResult<Option<SelfTestRef>> {
    let Some(golden) = golden else { return Ok(None) };
    let size = golden.len() as u64;
    let st = state.clone();
    let sha256 = tokio::task::spawn_blocking(move || st.artifacts.put(&golden, None))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Some(SelfTestRef { sha256, size, tolerance_ppm }))
}

/// The most bytes of a baseline as uploaded (with its sketches).
const MAX_BASELINE_BYTES: u64 = 64 << 20;
/// The most bytes one window on a baseline may take (a telemetry record
/// travels in a frame of at most 128 KiB with others).
const MAX_WINDOW_BYTES: usize = 64 << 10;
/// The most bytes of the baseline devices get (without sketches): it
/// travels to every device with the version.
const MAX_DEVICE_BASELINE_BYTES: usize = 1 << 20;

/// Checks an uploaded baseline against the model's signature and stores
/// the copy devices get, without its sketches: `(full, device)`.
async fn store_baseline(
    state: &Arc<State>,
    sha: Sha256Digest,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
) -> ApiResult<(BaselineRef, BaselineRef)> {
    let path = state.artifacts.path(&sha);
    let size = tokio::fs::metadata(&path)
        .await
        .map_err(|_| ApiError(StatusCode::NOT_FOUND, format!("no baseline with sha256 {sha}; upload it first")))?
        .len();
    if size > MAX_BASELINE_BYTES {
        return Err(bad(format!("baseline of {size} bytes is over {MAX_BASELINE_BYTES}")));
    }
    let bytes = tokio::fs::read(&path).await.map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        let full = tern_drift::ModelBaseline::decode(&bytes).map_err(|e| bad(format!("baseline {sha}: {e}")))?;
        full.bind(&inputs, &outputs).map_err(|e| bad(format!("baseline does not fit the model: {e}")))?;
        // A device sends each window in one telemetry record, which must fit
        // in one frame.
        let window = full.max_window_bytes();
        if window > MAX_WINDOW_BYTES {
            return Err(bad(format!(
                "a window on this baseline can take {window} bytes, over the {MAX_WINDOW_BYTES} a device may send: fewer features, bins or categories"
            )));
        }
        let device = full.without_sketches().encode();
        if device.len() > MAX_DEVICE_BASELINE_BYTES {
            return Err(bad(format!(
                "the devices' baseline is {} bytes, over {MAX_DEVICE_BASELINE_BYTES}: fewer features or bins",
                device.len()
            )));
        }
        let device_ref = BaselineRef { sha256: st.artifacts.put(&device, None)?, size: device.len() as u64 };
        Ok((BaselineRef { sha256: sha, size }, device_ref))
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

async fn register(
    Ext(state): Ext<Arc<State>>,
    Path(name): Path<String>,
    body: Result<Json<RegisterBody>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<ModelVersion>)> {
    let body = json_body(body)?;
    ModelRef::check_name(&name).map_err(|e| bad(e.to_string()))?;
    let path = state.artifacts.path(&body.sha256);
    let bytes = tokio::fs::read(&path).await.map_err(|_| {
        ApiError(StatusCode::NOT_FOUND, format!("no artifact with sha256 {}; upload it first", body.sha256))
    })?;
    let size = bytes.len() as u64;
    let mut references = Vec::new();
    if body.references.len() > MAX_GOLDEN_CASES {
        return Err(bad(format!("at most {MAX_GOLDEN_CASES} reference input sets")));
    }
    let mut total = 0u64;
    for sha in &body.references {
        let path = state.artifacts.path(sha);
        total += tokio::fs::metadata(&path).await.map_or(0, |m| m.len());
        if total > MAX_GOLDEN_BYTES {
            return Err(bad(format!(
                "reference inputs over {MAX_GOLDEN_BYTES} bytes in all; use fewer or smaller ones"
            )));
        }
        let bytes = tokio::fs::read(&path).await.map_err(|_| {
            ApiError(StatusCode::NOT_FOUND, format!("no reference inputs with sha256 {sha}; upload them first"))
        })?;
        references.push(decode_tensors(&bytes).map_err(|e| bad(format!("reference inputs {sha}: {e}")))?);
    }
    // The same loader as on the device: a model the agents cannot run is
    // refused here, unless compiling makes it loadable (then only its
    // compiled artifacts reach devices). Its answers on the golden inputs
    // are what agents check.
    let format = sniff_format(&bytes);
    let sha = body.sha256;
    let shapes = body.shapes.clone();
    let consts = body.consts.clone();
    let given_references = !references.is_empty();
    let (signature, needs_compiling, golden) = tokio::task::spawn_blocking(move || {
        if !shapes.is_empty() || !consts.is_empty() {
            if format != ModelFormat::Onnx {
                return Err(bad(format!("input shapes and consts are for ONNX sources; this is {format}")));
            }
            let opts =
                tern_compile::Options { shapes: shapes.clone(), consts: consts.clone(), ..tern_compile::Options::default() };
            let flags = if consts.is_empty() { "--input-shape" } else { "--input-shape / --const" };
            tern_compile::prepare(&bytes, &opts).map_err(|e| bad(format!("{flags}: {e}")))?;
        }
        let model = match tern_runtime::load(format, bytes.clone()) {
            Ok(m) => m,
            Err(e) if format == ModelFormat::Onnx && given_references => {
                return Err(ApiError(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("model refused ({format}): {e}; reference inputs are for sources agents run as they are (its compiled artifacts get seeded golden vectors)"),
                ));
            }
            Err(e) if format == ModelFormat::Onnx => {
                let raw = e.to_string();
                let (inputs, outputs) = tern_compile::probe(&bytes, &shapes, &consts).map_err(|c| {
                    ApiError(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("model refused ({format}): {raw}; and compiling does not help: {c}"),
                    )
                })?;
                let mut why = format!("raw tract refuses it: {raw}");
                for line in tern_runtime::plain_output_rewrites(&bytes).unwrap_or_default() {
                    why += &format!("; compiling rewrites {line}");
                }
                return Ok::<_, ApiError>(((inputs, outputs), Some(why), None));
            }
            Err(e) => {
                return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("model refused ({format}): {e}")));
            }
        };
        let golden = golden_vectors(model.as_ref(), &sha, references, format, "; give inputs it can run with --reference FILE")?;
        Ok(((model.inputs().to_vec(), model.outputs().to_vec()), None, golden))
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let tolerance_ppm = body.tolerance_ppm.unwrap_or(golden::DEFAULT_TOLERANCE_PPM);
    let (inputs, outputs) = signature;
    let baseline = match body.baseline {
        Some(sha) => Some(store_baseline(&state, sha, inputs.clone(), outputs.clone()).await?),
        None => None,
    };
    let selftest = store_golden(&state, golden, tolerance_ppm).await?;
    let new = NewVersion {
        sha256: body.sha256,
        size,
        format,
        inputs,
        outputs,
        card: body.card,
        meta: body.meta,
        selftest,
        tolerance_ppm: needs_compiling.as_ref().map(|_| tolerance_ppm),
        needs_compiling,
        compile_shapes: body.shapes,
        compile_consts: body.consts,
        baseline: baseline.map(|(_, device)| device),
        baseline_full: baseline.map(|(full, _)| full),
        now: unix_now(),
    };
    // Every agent must be able to verify its manifest: refuse what has no
    // canonical form (a control character in a tensor name, say).
    let probe = tern_proto::ModelManifest {
        name: name.clone(),
        version: 1,
        sha256: new.sha256,
        size,
        format,
        inputs: new.inputs.clone(),
        outputs: new.outputs.clone(),
        created_at: new.now,
        selftest: new.selftest,
        update: Some(state.policy),
        alternative: None,
        baseline: new.baseline,
        capture: None,
    };
    check_canonical(&probe)?;
    let n = name.clone();
    let v = blocking(&state, move |s| s.registry.register(&n, new)).await?;
    info!(model = %name, version = v.version, sha256 = %v.sha256, "model version registered");
    Ok((StatusCode::CREATED, Json(v)))
}

#[derive(Deserialize)]
struct TargetBody {
    /// The compiled artifact, uploaded.
    sha256: Sha256Digest,
    report: CompileReport,
    /// The same model for onnxruntime, uploaded.
    #[serde(default)]
    alternative: Option<AlternativeBody>,
}

/// Asks for an alternative for `backend`: the registry builds it.
#[derive(Deserialize)]
struct AlternativeBody {
    backend: String,
}

/// Stores a compiled artifact for one profile: loaded with the agents'
/// loader, its golden vectors computed here, its fit judged against this
/// coordinator's copy of the profile from the measured numbers.
async fn set_target(
    Ext(state): Ext<Arc<State>>,
    Path((name, version, profile)): Path<(String, u32, String)>,
    body: Result<Json<TargetBody>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<ModelVersion>)> {
    let body = json_body(body)?;
    let settings =
        tern_compile::profiles::get(&profile).map_err(|e| ApiError(StatusCode::NOT_FOUND, e.to_string()))?.compile;
    let (n, v) = (name.clone(), version);
    let record = blocking(&state, move |s| s.registry.version(&n, v)).await?;
    let mut report = body.report;
    if report.fit.is_none() {
        return Err(bad(
            "a compiled artifact needs its fit check: store it with `tern compile NAME:V --target PROFILE`",
        ));
    }
    match (&body.alternative, report.backend.as_str()) {
        (None, "tract") | (Some(_), "tract" | "onnxruntime") => {}
        (None, other) => return Err(bad(format!("backend {other:?} needs its artifact (alternative)"))),
        (Some(_), other) => return Err(bad(format!("backend {other:?}: agents run tract or onnxruntime"))),
    }
    if record.format != ModelFormat::Onnx {
        return Err(bad(format!(
            "{}:{} is {}: only ONNX sources are compiled",
            record.name, record.version, record.format
        )));
    }
    let read = |sha: Sha256Digest, what: &'static str| {
        let path = state.artifacts.path(&sha);
        async move {
            tokio::fs::read(&path)
                .await
                .map_err(|_| ApiError(StatusCode::NOT_FOUND, format!("no {what} with sha256 {sha}; upload it first")))
        }
    };
    let source = read(record.sha256, "source").await?;
    let bytes = read(body.sha256, "artifact").await?;
    if let Some(a) = body.alternative.as_ref().filter(|a| a.backend != "onnxruntime") {
        return Err(bad(format!("alternative for backend {:?}: only onnxruntime has one", a.backend)));
    }
    let wants_alternative = body.alternative.is_some();
    let size = bytes.len() as u64;
    let format = sniff_format(&bytes);
    let sha = body.sha256;
    // The registry's own check, on its own seeded inputs: the artifact
    // against the source at the shapes and constants it was compiled for
    // (what the client measured is not taken on its word), and the
    // onnxruntime alternative must be exactly the source with those
    // constants folded in.
    let opts = tern_compile::Options {
        shapes: report.shapes.clone(),
        consts: report.consts.clone(),
        tolerance: report.tolerance,
        cases: tern_compile::DEFAULT_CASES,
        seed: u64::from_le_bytes(super::random::<8>()),
    };
    let (inputs, outputs, golden, errors, alternative) = tokio::task::spawn_blocking(move || {
        let refused = |e: tern_compile::CompileError| {
            ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("artifact refused: {e}"))
        };
        let errors = tern_compile::check(&source, &bytes, &opts).map_err(refused)?;
        let rewrites = tern_runtime::plain_output_rewrites(&source)
            .map_err(|e| refused(tern_compile::CompileError::Source(e.to_string())))?;
        // The onnxruntime alternative: the source with the declared
        // constants folded in and the shapes pinned, built here.
        let alternative = if wants_alternative {
            let (_, consts) = tern_compile::prepare(&source, &opts).map_err(refused)?;
            let onnx = tern_runtime::onnx_with_consts(&source, &consts, &opts.shapes)
                .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("alternative refused: {e}")))?;
            Some(onnx)
        } else {
            None
        };
        let model = tern_runtime::load(format, bytes)
            .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("artifact refused ({format}): {e}")))?;
        let golden = golden_vectors(model.as_ref(), &sha, Vec::new(), format, "")?;
        Ok::<_, ApiError>((model.inputs().to_vec(), model.outputs().to_vec(), golden, (errors, rewrites), alternative))
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let alternative = match alternative {
        Some(onnx) => {
            let size = onnx.len() as u64;
            let st = state.clone();
            let sha256 = tokio::task::spawn_blocking(move || st.artifacts.put(&onnx, None))
                .await
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
            Some(tern_proto::Alternative { backend: "onnxruntime".into(), sha256, size, format: ModelFormat::Onnx })
        }
        None => None,
    };
    let (errors, rewrites) = errors;
    report.rewrites = rewrites;
    report.errors = errors
        .into_iter()
        .map(|e| OutputError { output: e.name, max_abs: e.max_abs, max_scaled: e.max_scaled })
        .collect();
    report.cases = tern_compile::DEFAULT_CASES as u32;
    if let Some(fit) = &mut report.fit {
        fit.speed_factor = settings.speed_factor;
        fit.estimated_p99_us = settings.estimate_p99_us(fit.host_p99_us);
        fit.max_model_memory_mb = settings.max_model_memory_mb;
        fit.max_p99_ms = settings.max_p99_ms;
        fit.refused = settings.refusal(fit.peak_model_bytes, fit.estimated_p99_us);
    }
    let tolerance_ppm =
        record.selftest.map(|t| t.tolerance_ppm).or(record.tolerance_ppm).unwrap_or(golden::DEFAULT_TOLERANCE_PPM);
    let selftest = store_golden(&state, golden, tolerance_ppm).await?;
    let target = TargetArtifact {
        sha256: sha,
        size,
        format,
        inputs,
        outputs,
        selftest,
        compiled_at: unix_now(),
        report,
        alternative,
    };
    check_canonical(&tern_proto::ModelManifest { update: Some(state.policy), ..target.manifest(&record) })?;
    let p = profile.clone();
    let v = blocking(&state, move |s| s.registry.set_target(&name, version, &p, target)).await?;
    info!(model = %v.name, version, %profile, sha256 = %sha, "compiled artifact stored");
    Ok((StatusCode::CREATED, Json(v)))
}

async fn list_models(Ext(state): Ext<Arc<State>>) -> ApiResult<Json<Vec<ModelVersion>>> {
    Ok(Json(state.registry.all_versions()?))
}

async fn show_model(Ext(state): Ext<Arc<State>>, Path(name): Path<String>) -> ApiResult<Json<Vec<ModelVersion>>> {
    Ok(Json(state.registry.versions(&name)?))
}

async fn show_version(
    Ext(state): Ext<Arc<State>>,
    Path((name, version)): Path<(String, u32)>,
) -> ApiResult<Json<ModelVersion>> {
    Ok(Json(state.registry.version(&name, version)?))
}

#[derive(Deserialize)]
struct DecideQuery {
    #[serde(default)]
    force: bool,
}

/// The answer to approve / reject: the version, and the devices a forced
/// rejection unassigned it from.
#[derive(Serialize)]
struct Decided {
    #[serde(flatten)]
    version: ModelVersion,
    unassigned_from: Vec<DeviceId>,
}

async fn decide(
    Ext(state): Ext<Arc<State>>,
    Path((name, version, decision)): Path<(String, u32, String)>,
    Query(q): Query<DecideQuery>,
) -> ApiResult<Json<Decided>> {
    let status = match decision.as_str() {
        "approve" => Approval::Approved,
        "reject" => Approval::Rejected,
        other => {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("unknown decision {other:?}: use approve or reject")));
        }
    };
    let n = name.clone();
    let (v, changed) =
        blocking(&state, move |s| s.registry.set_status(&n, version, status, unix_now(), q.force)).await?;
    for d in &changed {
        state.sessions.wake(&d.id);
    }
    let unassigned_from: Vec<DeviceId> = changed.into_iter().map(|d| d.id).collect();
    info!(model = %name, version, %status, unassigned_from = ?unassigned_from, "approval changed");
    Ok(Json(Decided { version: v, unassigned_from }))
}

async fn metrics(Ext(state): Ext<Arc<State>>) -> ApiResult<Response> {
    let alerts = blocking(&state, |s| s.registry.alerts(false)).await?;
    let text = state.metrics.render(state.sessions.len(), &alerts);
    Ok(([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
        .into_response())
}

#[derive(Deserialize)]
struct AlertsQuery {
    #[serde(default)]
    all: bool,
}

async fn list_alerts(
    Ext(state): Ext<Arc<State>>,
    Query(q): Query<AlertsQuery>,
) -> ApiResult<Json<Vec<tern_registry::Alert>>> {
    Ok(Json(blocking(&state, move |s| s.registry.alerts(q.all)).await?))
}

async fn ack_alert(Ext(state): Ext<Arc<State>>, Path(id): Path<u64>) -> ApiResult<Json<tern_registry::Alert>> {
    let a = blocking(&state, move |s| s.registry.ack_alert(id, unix_now())).await?;
    info!(alert = id, model = %a.model, device = %a.device, "alert acknowledged");
    Ok(Json(a))
}

#[derive(Deserialize)]
struct WindowsQuery {
    version: Option<u32>,
    device: Option<String>,
}

/// The windows kept of a model, oldest first, without their summaries.
async fn list_windows(
    Ext(state): Ext<Arc<State>>,
    Path(name): Path<String>,
    Query(q): Query<WindowsQuery>,
) -> ApiResult<Json<Vec<tern_registry::StoredWindow>>> {
    let mut w = blocking(&state, move |s| s.registry.windows(&name, q.version, q.device.as_deref())).await?;
    w.iter_mut().for_each(|w| w.profile.clear());
    Ok(Json(w))
}

async fn drift_view(
    Ext(state): Ext<Arc<State>>,
    Path(name): Path<String>,
    Query(q): Query<super::drift::Query>,
) -> ApiResult<Json<super::drift::View>> {
    let st = state.clone();
    let v = tokio::task::spawn_blocking(move || super::drift::view(&st, &name, &q, unix_now()))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, format!("{e:#}")))?;
    Ok(Json(v))
}

/// The most bytes of a `constraints.json`.
const MAX_CONSTRAINTS_BYTES: usize = 4 << 20;

/// `PUT .../constraints`: Model Monitor constraints for a version with a
/// baseline, checked field for field and against its features.
async fn set_constraints(
    Ext(state): Ext<Arc<State>>,
    Path((name, version)): Path<(String, u32)>,
    body: Bytes,
) -> ApiResult<Json<ModelVersion>> {
    if body.len() > MAX_CONSTRAINTS_BYTES {
        return Err(bad(format!("constraints of {} bytes are over {MAX_CONSTRAINTS_BYTES}", body.len())));
    }
    let constraints: tern_drift::sagemaker::Constraints =
        serde_json::from_slice(&body).map_err(|e| bad(format!("not Model Monitor's constraints.json schema: {e}")))?;
    let n = name.clone();
    let record = blocking(&state, move |s| s.registry.version(&n, version)).await?;
    let Some(full) = record.baseline_full else {
        return Err(bad(format!("{name}:{version} has no baseline: register it with --baseline")));
    };
    let bytes = tokio::fs::read(state.artifacts.path(&full.sha256))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("reading its baseline: {e}")))?;
    let st = state.clone();
    let sha = tokio::task::spawn_blocking(move || {
        let model = tern_drift::ModelBaseline::decode(&bytes)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("its baseline: {e}")))?;
        constraints.check(&model).map_err(|e| bad(format!("constraints do not fit the baseline: {e}")))?;
        Ok::<_, ApiError>(st.artifacts.put(&body, None)?)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let n = name.clone();
    let v = blocking(&state, move |s| s.registry.set_constraints(&n, version, Some(sha))).await?;
    info!(model = %name, version, constraints = %sha, "constraints imported");
    Ok(Json(v))
}

async fn clear_constraints(
    Ext(state): Ext<Arc<State>>,
    Path((name, version)): Path<(String, u32)>,
) -> ApiResult<Json<ModelVersion>> {
    Ok(Json(blocking(&state, move |s| s.registry.set_constraints(&name, version, None)).await?))
}

/// `PUT .../capture` with `{"per_million": N, "daily_bytes": B}`: devices
/// serving the version capture that share of requests, at most B bytes a
/// day each; they are sent the state again.
async fn set_capture(
    Ext(state): Ext<Arc<State>>,
    Path((name, version)): Path<(String, u32)>,
    Json(policy): Json<tern_proto::CapturePolicy>,
) -> ApiResult<Json<ModelVersion>> {
    if !(1..=1_000_000).contains(&policy.per_million) || policy.daily_bytes == 0 {
        return Err(bad(format!(
            "per_million {} and daily_bytes {}: 1 to 1000000 (every request), and at least one byte; DELETE ends capture",
            policy.per_million, policy.daily_bytes
        )));
    }
    capture(&state, name, version, Some(policy)).await
}

async fn clear_capture(
    Ext(state): Ext<Arc<State>>,
    Path((name, version)): Path<(String, u32)>,
) -> ApiResult<Json<ModelVersion>> {
    capture(&state, name, version, None).await
}

async fn capture(
    state: &Arc<State>,
    name: String,
    version: u32,
    policy: Option<tern_proto::CapturePolicy>,
) -> ApiResult<Json<ModelVersion>> {
    let n = name.clone();
    let (v, changed) = blocking(state, move |s| s.registry.set_capture(&n, version, policy)).await?;
    for d in &changed {
        state.sessions.wake(&d.id);
    }
    info!(model = %name, version, ?policy, devices = changed.len(), "capture policy set");
    Ok(Json(v))
}

#[derive(Deserialize)]
struct CapturesQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// Captured samples, oldest first, their tensors decoded.
async fn list_captures(
    Ext(state): Ext<Arc<State>>,
    Path((name, version)): Path<(String, u32)>,
    Query(q): Query<CapturesQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let n = name.clone();
    let mut found = blocking(&state, move |s| s.registry.captures(&n, version, q.after, limit)).await?;
    // A page holds at most PAGE_BYTES of tensors (at least one capture).
    const PAGE_BYTES: usize = 4 << 20;
    let mut bytes = 0;
    let keep = found
        .iter()
        .take_while(|(_, c)| {
            bytes += c.inputs.len() + c.outputs.len();
            bytes <= PAGE_BYTES
        })
        .count()
        .max(1);
    found.truncate(keep);
    let tensors = |bytes: &[u8]| -> Value {
        match tern_proto::decode_tensors(bytes) {
            Ok(ts) => Value::Array(ts.iter().map(tensor_json).collect()),
            Err(e) => json!({ "error": e }),
        }
    };
    let next = found.last().map(|(seq, _)| *seq);
    let captures: Vec<Value> = found
        .iter()
        .map(|(seq, c)| {
            json!({
                "seq": seq,
                "device": c.device,
                "record": c.record,
                "at_ms": c.at_ms,
                "received_at": c.received_at,
                "inference_id": c.inference_id,
                "inputs": tensors(&c.inputs),
                "outputs": tensors(&c.outputs),
            })
        })
        .collect();
    Ok(Json(json!({ "model": name, "version": version, "captures": captures, "next": next })))
}

#[derive(Deserialize)]
struct QualityQuery {
    version: Option<u32>,
    device: Option<String>,
    /// The latest windows listed (all are merged).
    limit: Option<usize>,
}

/// Quality windows with their metrics, and the merge of them all per
/// version.
async fn quality_view(
    Ext(state): Ext<Arc<State>>,
    Path(name): Path<String>,
    Query(q): Query<QualityQuery>,
) -> ApiResult<Json<Value>> {
    let n = name.clone();
    let limit = q.limit.unwrap_or(500).clamp(1, 10_000);
    let windows = blocking(&state, move |s| s.registry.quality(&n, q.version, q.device.as_deref())).await?;
    // Per version and kind (labels, values): the merge and its windows.
    let kind = |c: &tern_proto::QualityCounts| match c {
        tern_proto::QualityCounts::Classes { .. } => "labels",
        tern_proto::QualityCounts::Values { .. } => "values",
    };
    let mut merged: BTreeMap<(u32, &str), (tern_proto::QualityCounts, u64, u64)> = BTreeMap::new();
    for w in &windows {
        match merged.get_mut(&(w.version, kind(&w.counts))) {
            Some((m, n, skipped)) => {
                *n += 1;
                // Only sums past what a merge may hold are left out.
                if !tern_drift::quality::merge(m, &w.counts) {
                    *skipped += 1;
                }
            }
            None => _ = merged.insert((w.version, kind(&w.counts)), (w.counts.clone(), 1, 0)),
        }
    }
    let rows: Vec<Value> = windows[windows.len().saturating_sub(limit)..]
        .iter()
        .map(|w| {
            json!({
                "device": w.device,
                "version": w.version,
                "at_ms": w.at_ms,
                "received_at": w.received_at,
                "secs": w.millis as f64 / 1000.0,
                "metrics": tern_drift::quality::metrics(&w.counts),
            })
        })
        .collect();
    let fleet: Vec<Value> = merged
        .iter()
        .map(|((v, kind), (c, n, skipped))| {
            json!({
                "version": v,
                "kind": kind,
                "windows": n,
                "skipped": skipped,
                "metrics": tern_drift::quality::metrics(c),
            })
        })
        .collect();
    let r = state.quality_rules;
    Ok(Json(json!({
        "model": name,
        "rules": { "accuracy": r.accuracy, "f1": r.f1, "rmse": r.rmse, "min_rows": r.min_rows },
        "windows": rows,
        "fleet": fleet,
    })))
}

/// A tensor as JSON, each element as the number it is (integers stay
/// integers; `f16` and `bf16` as the floats they hold).
fn tensor_json(t: &tern_proto::Tensor) -> Value {
    use tern_proto::TensorData as D;
    let data = match &t.data {
        D::F32(v) => json!(v),
        D::F64(v) => json!(v),
        D::I8(v) => json!(v),
        D::I16(v) => json!(v),
        D::I32(v) => json!(v),
        D::I64(v) => json!(v),
        D::U8(v) => json!(v),
        D::U16(v) => json!(v),
        D::U32(v) => json!(v),
        D::U64(v) => json!(v),
        D::Bool(v) => json!(v),
        D::F16(v) => json!(v.iter().map(|x| x.to_f32()).collect::<Vec<_>>()),
        D::BF16(v) => json!(v.iter().map(|x| x.to_f32()).collect::<Vec<_>>()),
    };
    json!({ "dtype": t.dtype(), "shape": t.shape, "data": data })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRollout {
    plan: tern_rollout::Plan,
    #[serde(default)]
    select: tern_registry::Selector,
}

/// A rollout as the API shows it: the stored state and, per wave, its
/// standing.
fn rollout_json(r: &tern_registry::StoredRollout) -> Value {
    let waves: Vec<Value> = (0..r.rollout.waves().len())
        .map(|w| {
            let s = r.rollout.wave_status(w);
            json!({
                "devices": s.devices, "pending": s.pending, "waiting": s.waiting, "succeeded": s.succeeded,
                "failed": s.failed, "reverted": s.reverted, "failed_share": s.failed_share,
            })
        })
        .collect();
    let failed: Vec<Value> = r
        .rollout
        .waves()
        .concat()
        .into_iter()
        .filter_map(|d| match r.rollout.device(d) {
            Some(tern_rollout::DeviceState::Failed(why)) => Some(json!({ "device": d, "reason": why })),
            _ => None,
        })
        .collect();
    json!({
        "id": r.id,
        "created_at": r.created_at,
        "select": r.selector,
        "plan": r.rollout.plan(),
        "phase": r.rollout.phase(),
        "waves": waves,
        "failed": failed,
        "max_failed": r.rollout.plan().gates.max_failed,
    })
}

async fn start_rollout(
    Ext(state): Ext<Arc<State>>,
    body: Result<Json<StartRollout>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let StartRollout { plan, select } = json_body(body)?;
    let r = {
        let _one = state.rollouts.lock().await;
        blocking(&state, move |s| s.registry.start_rollout(select, plan, unix_now())).await?
    };
    info!(rollout = r.id, model = %r.rollout.plan().model, version = r.rollout.plan().version,
        devices = r.rollout.waves().concat().len(), "rollout started");
    super::rollouts::drive_all(&state)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    let r = blocking(&state, move |s| s.registry.rollout(r.id)).await?;
    Ok((StatusCode::CREATED, Json(rollout_json(&r))))
}

async fn list_rollouts(Ext(state): Ext<Arc<State>>) -> ApiResult<Json<Vec<Value>>> {
    let all = blocking(&state, |s| s.registry.rollouts()).await?;
    Ok(Json(all.iter().map(rollout_json).collect()))
}

async fn show_rollout(Ext(state): Ext<Arc<State>>, Path(id): Path<u64>) -> ApiResult<Json<Value>> {
    let r = blocking(&state, move |s| s.registry.rollout(id)).await?;
    Ok(Json(rollout_json(&r)))
}

async fn command_rollout(
    Ext(state): Ext<Arc<State>>,
    Path((id, command)): Path<(u64, String)>,
) -> ApiResult<Json<Value>> {
    let command = match command.as_str() {
        "pause" => tern_rollout::Command::Pause,
        "resume" => tern_rollout::Command::Resume,
        "abort" => tern_rollout::Command::Abort,
        "rollback" => tern_rollout::Command::Rollback,
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("unknown command {other:?}: pause, resume, abort or rollback"),
            ));
        }
    };
    {
        let _one = state.rollouts.lock().await;
        let mut r = blocking(&state, move |s| s.registry.rollout(id)).await?;
        r.rollout.command(command, unix_now()).map_err(|e| ApiError(StatusCode::CONFLICT, e.to_string()))?;
        blocking(&state, move |s| s.registry.put_rollout(&r)).await?;
    }
    info!(rollout = id, ?command, "rollout command");
    super::rollouts::drive_all(&state)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    let r = blocking(&state, move |s| s.registry.rollout(id)).await?;
    Ok(Json(rollout_json(&r)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    group: String,
}

async fn set_group(
    Ext(state): Ext<Arc<State>>,
    Path(id): Path<String>,
    body: Result<Json<GroupBody>, JsonRejection>,
) -> ApiResult<Json<tern_registry::Device>> {
    let GroupBody { group } = json_body(body)?;
    check_label(&group)?;
    Ok(Json(blocking(&state, move |s| s.registry.set_group(&id, &group)).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TagBody {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

async fn tag_device(
    Ext(state): Ext<Arc<State>>,
    Path(id): Path<String>,
    body: Result<Json<TagBody>, JsonRejection>,
) -> ApiResult<Json<tern_registry::Device>> {
    let TagBody { add, remove } = json_body(body)?;
    if add.len() + remove.len() > 64 {
        return Err(bad("at most 64 tags at once"));
    }
    add.iter().chain(&remove).try_for_each(|t| check_label(t))?;
    Ok(Json(blocking(&state, move |s| s.registry.tag(&id, &add, &remove)).await?))
}

/// A group or tag: 1 to 64 of letters, digits, `-`, `_`, `.`.
fn check_label(s: &str) -> ApiResult<()> {
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(bad(format!("{s:?}: 1 to 64 letters, digits, -, _ or .")));
    }
    Ok(())
}

#[derive(Deserialize)]
struct BrokerBody {
    names: Vec<String>,
}

/// A server certificate from the fleet CA for an external MQTT broker
/// (`tern broker mosquitto-config`): valid for `broker.tern`, which the
/// fleet's MQTT clients check, and the names asked for (never for the
/// coordinator's name); with the CA certificate, PEM.
async fn broker_certificate(
    Ext(state): Ext<Arc<State>>,
    body: Result<Json<BrokerBody>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let body = json_body(body)?;
    if body.names.len() > 16 || body.names.iter().any(|n| n.is_empty() || n.len() > 253) {
        return Err(bad("names: at most 16, each 1 to 253 characters"));
    }
    let (cert, key) = state.ca.issue_broker(&body.names).map_err(|e| bad(format!("names {:?}: {e}", body.names)))?;
    info!(names = ?body.names, "server certificate issued for an MQTT broker");
    Ok(Json(json!({
        "ca": super::pem("CERTIFICATE", state.ca.cert_der()),
        "cert": super::pem("CERTIFICATE", &cert),
        "key": super::pem("PRIVATE KEY", &key),
    })))
}

#[derive(Deserialize)]
struct TokenBody {
    group: String,
    profile: String,
    ttl_secs: u64,
}

async fn new_token(
    Ext(state): Ext<Arc<State>>,
    body: Result<Json<TokenBody>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let body = json_body(body)?;
    if body.group.is_empty() || body.profile.is_empty() {
        return Err(bad("group and profile must not be empty"));
    }
    let now = unix_now();
    let secret = super::random::<16>();
    let expires_at = now.saturating_add(body.ttl_secs);
    let token = EnrollToken {
        group: body.group.clone(),
        profile: body.profile.clone(),
        created_at: now,
        expires_at,
        used_by: None,
    };
    blocking(&state, move |s| s.registry.add_token(&secret, &token)).await?;
    let text = EnrollTokenText { secret, ca_sha256: tern_net::ca_fingerprint(state.ca.cert_der()), expires_at };
    info!(group = %body.group, profile = %body.profile, expires_at, "enrollment token issued");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "token": text.encode(), "expires_at": expires_at, "group": body.group, "profile": body.profile })),
    ))
}

/// Signs new timestamp, snapshot and targets metadata over the approved
/// versions, and returns them with every root.
async fn tuf_repository(Ext(state): Ext<Arc<State>>) -> ApiResult<Json<super::tuf::Built>> {
    let state = state.clone();
    let built = tokio::task::spawn_blocking(move || {
        let versions = state.registry.all_versions().map_err(|e| e.to_string())?;
        state.tuf.build(&versions, unix_now()).map_err(|e| format!("{e:#}"))
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError(StatusCode::CONFLICT, e))?;
    Ok(Json(built))
}

/// An artifact's bytes, by digest.
async fn artifact(Ext(state): Ext<Arc<State>>, Path(sha256): Path<String>) -> ApiResult<Response> {
    let digest: tern_proto::Sha256Digest =
        sha256.parse().map_err(|_| bad(format!("{sha256:?} is not a sha256 digest")))?;
    let path = state.artifacts.path(&digest);
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|_| ApiError(StatusCode::NOT_FOUND, format!("no artifact {}", digest.to_hex())))?;
    Ok(bytes.into_response())
}

/// What the coordinator holds open now.
async fn status(Ext(state): Ext<Arc<State>>) -> Json<serde_json::Value> {
    Json(json!({
        "connections": state.counters.total(),
        "handshaking": state.counters.handshaking(),
        "anonymous": state.counters.anonymous(),
        "sessions": state.sessions.len(),
    }))
}

/// Every device, without its update history (`GET /v1/devices/{id}` has it).
async fn list_devices(Ext(state): Ext<Arc<State>>) -> ApiResult<Json<Vec<Device>>> {
    let mut ds = state.registry.devices()?;
    ds.iter_mut().for_each(|d| d.history.clear());
    Ok(Json(ds))
}

async fn show_device(Ext(state): Ext<Arc<State>>, Path(id): Path<String>) -> ApiResult<Json<Device>> {
    Ok(Json(state.registry.device(&id)?))
}

#[derive(Deserialize)]
struct AssignBody {
    version: u32,
}

async fn assign(
    Ext(state): Ext<Arc<State>>,
    Path((id, name)): Path<(String, String)>,
    body: Result<Json<AssignBody>, JsonRejection>,
) -> ApiResult<Json<Device>> {
    let body = json_body(body)?;
    let (i, n) = (id.clone(), name.clone());
    let device = blocking(&state, move |s| s.registry.assign(&i, &n, body.version)).await?;
    info!(device = %id, model = %name, version = body.version, generation = device.generation, "desired state changed");
    // An offline device gets the state when it connects.
    state.sessions.wake(&device.id);
    Ok(Json(device))
}

async fn unassign(Ext(state): Ext<Arc<State>>, Path((id, name)): Path<(String, String)>) -> ApiResult<Json<Device>> {
    let (i, n) = (id.clone(), name.clone());
    let device = blocking(&state, move |s| s.registry.unassign(&i, &n)).await?;
    info!(device = %id, model = %name, generation = device.generation, "model unassigned");
    state.sessions.wake(&device.id);
    Ok(Json(device))
}

async fn remove_device(Ext(state): Ext<Arc<State>>, Path(id): Path<String>) -> ApiResult<Json<Device>> {
    let i = id.clone();
    let device = blocking(&state, move |s| s.registry.remove_device(&i)).await?;
    state.sessions.kick(&device.id, super::sessions::close::REVOKED, "this device was removed from the fleet");
    super::limits::Slot::forget_device(&state.counters, device.id.as_str());
    info!(device = %id, "device removed; its certificate is refused from now on");
    Ok(Json(device))
}
