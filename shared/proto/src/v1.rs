//! Wire version 1, frozen: the messages exactly as agents and coordinators
//! up to commit ae5a7d0 encode them (postcard, field for field and variant
//! for variant; `tests/golden.rs` holds their bytes). Nothing here changes
//! again; the current messages convert to and from these, so a connection
//! that negotiated version 1 keeps working with the old side.
//!
//! Going up ([`From`]) never fails. Going down ([`TryFrom`]) drops what
//! version 1 cannot say (capabilities, generations) and maps newer enum
//! variants to the nearest old one; it fails only for a manifest signed in
//! an encoding version-1 agents cannot verify.

use crate::ids::{DeviceId, Sha256Digest};
use serde::{Deserialize, Serialize};

/// Version 1's messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Message {
    EnrollRequest(EnrollRequest),
    EnrollResponse(EnrollResponse),
    Hello(Hello),
    Welcome(Welcome),
    Desired(DesiredState),
    Status(StatusReport),
    FetchArtifact(FetchArtifact),
    ArtifactHeader(ArtifactHeader),
    Error(WireError),
}

/// Version 1's enrollment request (unchanged since).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct EnrollRequest {
    pub secret: [u8; 16],
    pub csr_der: Vec<u8>,
    pub requested_id: Option<DeviceId>,
    pub agent_version: String,
}

/// Version 1's enrollment answer (unchanged since).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct EnrollResponse {
    pub device_id: DeviceId,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
    pub registry_key: [u8; 32],
    pub group: String,
    pub profile: String,
}

/// Version 1's `Hello`: no versions, formats or backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Hello {
    pub agent_version: String,
    pub models: Vec<ModelStatus>,
}

/// Version 1's `Welcome`: no wire version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Welcome {
    pub device_id: DeviceId,
    pub server_time: u64,
}

/// Version 1's desired state: postcard-signed manifests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DesiredState {
    pub generation: u64,
    pub models: Vec<SignedManifest>,
}

/// Version 1's signed manifest: `body` is postcard of [`ModelManifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SignedManifest {
    pub body: Vec<u8>,
    pub key_id: [u8; 8],
    pub signature: Vec<u8>,
}

/// Version 1's model states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum ModelState {
    Downloading,
    Verifying,
    Loading,
    Serving,
    Unhealthy,
    Failed,
}

/// Version 1's per-model status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ModelStatus {
    pub name: String,
    pub version: u32,
    pub state: ModelState,
    pub detail: Option<String>,
}

/// Version 1's status report: no generation, no refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct StatusReport {
    pub models: Vec<ModelStatus>,
}

/// Version 1's artifact request (unchanged since).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct FetchArtifact {
    pub sha256: Sha256Digest,
    pub offset: u64,
}

/// Version 1's artifact header (unchanged since).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ArtifactHeader {
    pub sha256: Sha256Digest,
    pub size: u64,
    pub offset: u64,
}

/// Version 1's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    TokenUnknown,
    TokenUsed,
    TokenExpired,
    DeviceExists,
    NotFound,
    Internal,
}

/// Version 1's error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

/// Version 1's manifest, the postcard body its agents verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ModelManifest {
    pub name: String,
    pub version: u32,
    pub sha256: Sha256Digest,
    pub size: u64,
    pub format: ModelFormat,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub created_at: u64,
}

/// Version 1's artifact formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum ModelFormat {
    Onnx,
    Nnef,
    Burn,
}

/// Version 1's element types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum DType {
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
}

/// Version 1's tensor signature.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Option<u64>>,
}

// ---- up: version 1 → current, never fails ----

use crate::manifest as cur_m;
use crate::msg as cur;

impl From<Message> for cur::Message {
    fn from(m: Message) -> Self {
        match m {
            Message::EnrollRequest(r) => cur::Message::EnrollRequest(cur::EnrollRequest {
                secret: r.secret,
                csr_der: r.csr_der,
                requested_id: r.requested_id,
                agent_version: r.agent_version,
            }),
            Message::EnrollResponse(r) => cur::Message::EnrollResponse(cur::EnrollResponse {
                device_id: r.device_id,
                cert_der: r.cert_der,
                ca_der: r.ca_der,
                registry_key: r.registry_key,
                group: r.group,
                profile: r.profile,
            }),
            Message::Hello(h) => cur::Message::Hello(cur::Hello {
                agent_version: h.agent_version,
                models: h.models.into_iter().map(Into::into).collect(),
                wire_versions: Vec::new(),
                formats: Vec::new(),
                backends: Vec::new(),
            }),
            Message::Welcome(w) => cur::Message::Welcome(cur::Welcome {
                device_id: w.device_id,
                server_time: w.server_time,
                wire_version: 1,
            }),
            Message::Desired(d) => cur::Message::Desired(cur::DesiredState {
                generation: d.generation,
                models: d
                    .models
                    .into_iter()
                    .map(|s| cur_m::SignedManifest {
                        encoding: cur_m::ManifestEncoding::Postcard,
                        body: s.body,
                        key_id: s.key_id,
                        signature: s.signature,
                    })
                    .collect(),
            }),
            Message::Status(s) => cur::Message::Status(cur::StatusReport {
                models: s.models.into_iter().map(Into::into).collect(),
                generation: 0,
                refused: None,
            }),
            Message::FetchArtifact(f) => {
                cur::Message::FetchArtifact(cur::FetchArtifact { sha256: f.sha256, offset: f.offset })
            }
            Message::ArtifactHeader(h) => {
                cur::Message::ArtifactHeader(cur::ArtifactHeader { sha256: h.sha256, size: h.size, offset: h.offset })
            }
            Message::Error(e) => cur::Message::Error(cur::WireError { code: e.code.into(), message: e.message }),
        }
    }
}

impl From<ModelStatus> for cur::ModelStatus {
    fn from(s: ModelStatus) -> Self {
        let state = match s.state {
            ModelState::Downloading => cur::ModelState::Downloading,
            ModelState::Verifying => cur::ModelState::Verifying,
            ModelState::Loading => cur::ModelState::Loading,
            ModelState::Serving => cur::ModelState::Serving,
            ModelState::Unhealthy => cur::ModelState::Unhealthy,
            ModelState::Failed => cur::ModelState::Failed,
        };
        cur::ModelStatus { name: s.name, version: s.version, state, detail: s.detail }
    }
}

impl From<ErrorCode> for cur::ErrorCode {
    fn from(c: ErrorCode) -> Self {
        match c {
            ErrorCode::BadRequest => cur::ErrorCode::BadRequest,
            ErrorCode::Unauthorized => cur::ErrorCode::Unauthorized,
            ErrorCode::TokenUnknown => cur::ErrorCode::TokenUnknown,
            ErrorCode::TokenUsed => cur::ErrorCode::TokenUsed,
            ErrorCode::TokenExpired => cur::ErrorCode::TokenExpired,
            ErrorCode::DeviceExists => cur::ErrorCode::DeviceExists,
            ErrorCode::NotFound => cur::ErrorCode::NotFound,
            ErrorCode::Internal => cur::ErrorCode::Internal,
        }
    }
}

impl From<ModelManifest> for cur_m::ModelManifest {
    fn from(m: ModelManifest) -> Self {
        cur_m::ModelManifest {
            name: m.name,
            version: m.version,
            sha256: m.sha256,
            size: m.size,
            format: match m.format {
                ModelFormat::Onnx => cur_m::ModelFormat::Onnx,
                ModelFormat::Nnef => cur_m::ModelFormat::Nnef,
                ModelFormat::Burn => cur_m::ModelFormat::Burn,
            },
            inputs: m.inputs.into_iter().map(Into::into).collect(),
            outputs: m.outputs.into_iter().map(Into::into).collect(),
            created_at: m.created_at,
            selftest: None,
            update: None,
            alternative: None,
            baseline: None,
            capture: None,
        }
    }
}

impl From<TensorSpec> for cur_m::TensorSpec {
    fn from(t: TensorSpec) -> Self {
        let dtype = match t.dtype {
            DType::F32 => cur_m::DType::F32,
            DType::F64 => cur_m::DType::F64,
            DType::I8 => cur_m::DType::I8,
            DType::I16 => cur_m::DType::I16,
            DType::I32 => cur_m::DType::I32,
            DType::I64 => cur_m::DType::I64,
            DType::U8 => cur_m::DType::U8,
            DType::U16 => cur_m::DType::U16,
            DType::U32 => cur_m::DType::U32,
            DType::U64 => cur_m::DType::U64,
            DType::Bool => cur_m::DType::Bool,
        };
        cur_m::TensorSpec { name: t.name, dtype, shape: t.shape }
    }
}

// ---- down: current → version 1 ----

impl TryFrom<&cur::Message> for Message {
    type Error = String;

    fn try_from(m: &cur::Message) -> Result<Self, String> {
        Ok(match m {
            cur::Message::EnrollRequest(r) => Message::EnrollRequest(EnrollRequest {
                secret: r.secret,
                csr_der: r.csr_der.clone(),
                requested_id: r.requested_id.clone(),
                agent_version: r.agent_version.clone(),
            }),
            cur::Message::EnrollResponse(r) => Message::EnrollResponse(EnrollResponse {
                device_id: r.device_id.clone(),
                cert_der: r.cert_der.clone(),
                ca_der: r.ca_der.clone(),
                registry_key: r.registry_key,
                group: r.group.clone(),
                profile: r.profile.clone(),
            }),
            cur::Message::Hello(h) => Message::Hello(Hello {
                agent_version: h.agent_version.clone(),
                models: h.models.iter().map(Into::into).collect(),
            }),
            cur::Message::Welcome(w) => {
                Message::Welcome(Welcome { device_id: w.device_id.clone(), server_time: w.server_time })
            }
            cur::Message::Desired(d) => Message::Desired(DesiredState {
                generation: d.generation,
                models: d
                    .models
                    .iter()
                    .map(|s| match s.encoding {
                        cur_m::ManifestEncoding::Postcard => Ok(SignedManifest {
                            body: s.body.clone(),
                            key_id: s.key_id,
                            signature: s.signature.clone(),
                        }),
                        other => Err(format!("a manifest signed as {other:?} cannot travel in wire v1")),
                    })
                    .collect::<Result<_, _>>()?,
            }),
            cur::Message::Status(s) => {
                Message::Status(StatusReport { models: s.models.iter().map(Into::into).collect() })
            }
            cur::Message::FetchArtifact(f) => {
                Message::FetchArtifact(FetchArtifact { sha256: f.sha256, offset: f.offset })
            }
            cur::Message::ArtifactHeader(h) => {
                Message::ArtifactHeader(ArtifactHeader { sha256: h.sha256, size: h.size, offset: h.offset })
            }
            cur::Message::Error(e) => Message::Error(WireError { code: e.code.into(), message: e.message.clone() }),
            cur::Message::History(_) => return Err("History is not in wire v1".into()),
            cur::Message::SignedDesired(_) => return Err("SignedDesired is not in wire v1".into()),
            cur::Message::Telemetry(_) => return Err("Telemetry is not in wire v1".into()),
            cur::Message::TelemetryAck(_) => return Err("TelemetryAck is not in wire v1".into()),
            cur::Message::Traffic(_) => return Err("Traffic is not in wire v1".into()),
            cur::Message::Route(_) => return Err("Route is not in wire v1".into()),
        })
    }
}

impl From<&cur::ModelStatus> for ModelStatus {
    fn from(s: &cur::ModelStatus) -> Self {
        let state = match s.state {
            cur::ModelState::Downloading => ModelState::Downloading,
            cur::ModelState::Verifying => ModelState::Verifying,
            cur::ModelState::Loading => ModelState::Loading,
            cur::ModelState::Serving => ModelState::Serving,
            cur::ModelState::Unhealthy => ModelState::Unhealthy,
            cur::ModelState::Failed => ModelState::Failed,
        };
        ModelStatus { name: s.name.clone(), version: s.version, state, detail: s.detail.clone() }
    }
}

impl From<cur::ErrorCode> for ErrorCode {
    fn from(c: cur::ErrorCode) -> Self {
        match c {
            cur::ErrorCode::BadRequest | cur::ErrorCode::SessionConflict => ErrorCode::BadRequest,
            cur::ErrorCode::Unauthorized | cur::ErrorCode::Revoked => ErrorCode::Unauthorized,
            cur::ErrorCode::TokenUnknown => ErrorCode::TokenUnknown,
            cur::ErrorCode::TokenUsed => ErrorCode::TokenUsed,
            cur::ErrorCode::TokenExpired => ErrorCode::TokenExpired,
            cur::ErrorCode::DeviceExists => ErrorCode::DeviceExists,
            cur::ErrorCode::NotFound => ErrorCode::NotFound,
            cur::ErrorCode::Internal | cur::ErrorCode::Busy => ErrorCode::Internal,
        }
    }
}

impl TryFrom<&cur_m::ModelManifest> for ModelManifest {
    type Error = String;

    fn try_from(m: &cur_m::ModelManifest) -> Result<Self, String> {
        Ok(ModelManifest {
            name: m.name.clone(),
            version: m.version,
            sha256: m.sha256,
            size: m.size,
            format: match m.format {
                cur_m::ModelFormat::Onnx => ModelFormat::Onnx,
                cur_m::ModelFormat::Nnef => ModelFormat::Nnef,
                cur_m::ModelFormat::Burn => ModelFormat::Burn,
            },
            inputs: m.inputs.iter().map(TensorSpec::try_from).collect::<Result<_, _>>()?,
            outputs: m.outputs.iter().map(TensorSpec::try_from).collect::<Result<_, _>>()?,
            created_at: m.created_at,
        })
    }
}

impl TryFrom<&cur_m::TensorSpec> for TensorSpec {
    type Error = String;

    fn try_from(t: &cur_m::TensorSpec) -> Result<Self, String> {
        let dtype = match t.dtype {
            cur_m::DType::F32 => DType::F32,
            cur_m::DType::F64 => DType::F64,
            cur_m::DType::I8 => DType::I8,
            cur_m::DType::I16 => DType::I16,
            cur_m::DType::I32 => DType::I32,
            cur_m::DType::I64 => DType::I64,
            cur_m::DType::U8 => DType::U8,
            cur_m::DType::U16 => DType::U16,
            cur_m::DType::U32 => DType::U32,
            cur_m::DType::U64 => DType::U64,
            cur_m::DType::Bool => DType::Bool,
            cur_m::DType::F16 | cur_m::DType::BF16 => {
                return Err(format!("{}: version 1 has no {} tensors", t.name, t.dtype));
            }
        };
        Ok(TensorSpec { name: t.name.clone(), dtype, shape: t.shape.clone() })
    }
}
