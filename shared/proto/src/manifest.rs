use crate::ids::Sha256Digest;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The file format of a model artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// An ONNX protobuf file.
    Onnx,
    /// A tract NNEF archive (tar), the compiled format for devices.
    Nnef,
    /// A built-in model family with its weights (`tern-models`' `.tbm`), run by burn.
    Burn,
}

impl fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelFormat::Onnx => "onnx",
            ModelFormat::Nnef => "nnef",
            ModelFormat::Burn => "burn",
        })
    }
}

impl std::str::FromStr for ModelFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "onnx" => Ok(ModelFormat::Onnx),
            "nnef" => Ok(ModelFormat::Nnef),
            "burn" => Ok(ModelFormat::Burn),
            other => Err(format!("unknown model format {other:?} (onnx, nnef or burn)")),
        }
    }
}

/// The element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// 8-bit signed integer.
    I8,
    /// 16-bit signed integer.
    I16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// 8-bit unsigned integer.
    U8,
    /// 16-bit unsigned integer.
    U16,
    /// 32-bit unsigned integer.
    U32,
    /// 64-bit unsigned integer.
    U64,
    /// Boolean.
    Bool,
    /// 16-bit IEEE 754 float (binary16).
    F16,
    /// bfloat16: f32's sign and exponent, 7 bits of mantissa.
    BF16,
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_name(self);
        f.write_str(s)
    }
}

impl DType {
    /// The first wire version whose manifests may name this element type.
    pub fn since(self) -> crate::WireVersion {
        match self {
            DType::F16 | DType::BF16 => crate::WireVersion::V5,
            _ => crate::WireVersion::V1,
        }
    }
}

fn serde_name(d: &DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::I8 => "i8",
        DType::I16 => "i16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::U8 => "u8",
        DType::U16 => "u16",
        DType::U32 => "u32",
        DType::U64 => "u64",
        DType::Bool => "bool",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}

/// Name, element type and shape of one model input or output. A `None`
/// dimension is dynamic (a batch axis, usually).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorSpec {
    /// The name in the model graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions; `None` where the model leaves it open.
    pub shape: Vec<Option<u64>>,
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}[", self.name, self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match d {
                Some(n) => write!(f, "{n}")?,
                None => f.write_str("?")?,
            }
        }
        f.write_str("]")
    }
}

/// What the registry vouches for about one model version: the agent checks
/// the artifact it downloads against this before loading it.
///
/// Fields added after wire version 1 must have a serde default: a manifest
/// is signed as canonical JSON, and decoders ignore fields they do not know,
/// so new and old agents verify the same signed bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// Model name.
    pub name: String,
    /// Version, counting from 1.
    pub version: u32,
    /// Digest of the artifact's bytes.
    pub sha256: Sha256Digest,
    /// Size of the artifact in bytes.
    pub size: u64,
    /// Artifact format.
    pub format: ModelFormat,
    /// Input signature.
    pub inputs: Vec<TensorSpec>,
    /// Output signature.
    pub outputs: Vec<TensorSpec>,
    /// When the version was registered (Unix seconds).
    pub created_at: u64,
    /// The golden vectors the agent checks the loaded candidate against
    /// before it serves (absent: a run on zeros that must match the
    /// signature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selftest: Option<SelfTestRef>,
    /// How the agent takes this version in: deadlines and health limits
    /// (absent: [`UpdatePolicy::default`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdatePolicy>,
    /// The same model for another backend, which an agent that has that
    /// backend may run instead (onnxruntime where the device has the
    /// library); an agent without it, or from before this field, runs the
    /// artifact above. Same signature, same golden vectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alternative: Option<Alternative>,
    /// The training data's baseline (`tern_drift::ModelBaseline`'s file),
    /// which the agent windows this version's requests against (absent: no
    /// drift statistics). Agents from before this field neither fetch nor
    /// check it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineRef>,
    /// Which share of requests the device captures for upload, and how many
    /// bytes a day at most (absent: none). Set by the fleet per version;
    /// older agents ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CapturePolicy>,
}

/// Data capture on the device (see [`ModelManifest::capture`]). Integers
/// only: the manifest is signed as canonical JSON, which has no floats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CapturePolicy {
    /// Requests captured per million answered (1,000,000: every one).
    pub per_million: u32,
    /// Encoded bytes of inputs and outputs captured per UTC day at most;
    /// past it the device captures nothing more that day.
    pub daily_bytes: u64,
}

/// A model version's baseline file, fetched like an artifact and checked
/// against this digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BaselineRef {
    /// Digest of the file.
    pub sha256: Sha256Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// An artifact of a version for one backend (see
/// [`ModelManifest::alternative`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Alternative {
    /// The backend that runs it: `onnxruntime`.
    pub backend: String,
    /// Digest of the artifact's bytes.
    pub sha256: Sha256Digest,
    /// Size of the artifact in bytes.
    pub size: u64,
    /// Artifact format.
    pub format: ModelFormat,
}

impl ModelManifest {
    /// The first wire version whose agents can read it: the newest
    /// [`DType::since`] of its signature.
    pub fn since(&self) -> crate::WireVersion {
        self.inputs.iter().chain(&self.outputs).map(|s| s.dtype.since()).max().unwrap_or(crate::WireVersion::V1)
    }

    /// Every file an agent may fetch for it: the artifact, its golden
    /// vectors, its alternative, its baseline.
    pub fn files(&self) -> impl Iterator<Item = Sha256Digest> + '_ {
        [
            Some(self.sha256),
            self.selftest.map(|t| t.sha256),
            self.alternative.as_ref().map(|a| a.sha256),
            self.baseline.map(|b| b.sha256),
        ]
        .into_iter()
        .flatten()
    }

    /// The manifest as an agent with `backend` runs it: its alternative for
    /// that backend in place of the artifact (and no alternative left);
    /// `None` if it has none for that backend.
    pub fn for_backend(&self, backend: &str) -> Option<ModelManifest> {
        let alt = self.alternative.as_ref().filter(|a| a.backend == backend)?;
        Some(ModelManifest {
            sha256: alt.sha256,
            size: alt.size,
            format: alt.format,
            alternative: None,
            ..self.clone()
        })
    }

    /// The update policy in force for this version.
    pub fn policy(&self) -> UpdatePolicy {
        self.update.unwrap_or_default()
    }

    /// Whether `other` is the same artifact of the same version (policies
    /// may differ: a new policy is no new update).
    pub fn same_version(&self, other: &ModelManifest) -> bool {
        self.name == other.name && self.version == other.version && self.sha256 == other.sha256
    }
}

/// A file of golden vectors (see [`crate::encode_golden`]), fetched like an
/// artifact and checked against this digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SelfTestRef {
    /// Digest of the file.
    pub sha256: Sha256Digest,
    /// Its size in bytes.
    pub size: u64,
    /// How far an output element may be from the golden one, in millionths:
    /// `|got - want| <= tol * (1 + |want|)` (integers and booleans match exactly).
    pub tolerance_ppm: u32,
}

/// Deadlines and health limits of one update, signed with its manifest.
/// Times are seconds; limits of 0 are off. Canonical JSON has no floats, so
/// shares are per mille.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdatePolicy {
    /// Downloading, retries included.
    pub fetch_secs: u64,
    /// Checking the digests on disk.
    pub verify_secs: u64,
    /// Loading into the runtime.
    pub load_secs: u64,
    /// Running the golden vectors.
    pub selftest_secs: u64,
    /// Requests to compare in shadow before activating (0: no shadow).
    pub shadow_requests: u32,
    /// How long shadow may take to see them.
    pub shadow_secs: u64,
    /// Fewest agreeing answers in shadow, per mille.
    pub shadow_min_agreement_permille: u32,
    /// How shadow tells whether the candidate agrees with the serving version.
    #[serde(skip_serializing_if = "ShadowCompare::is_auto")]
    pub shadow_compare: ShadowCompare,
    /// For [`ShadowCompare::Relative`]: how far a candidate's float output
    /// element may be from the serving one, in millionths of `1 + |serving|`.
    #[serde(skip_serializing_if = "is_default_shadow_tolerance")]
    pub shadow_tolerance_ppm: u32,
    /// Highest p99 run time of the candidate in shadow, per mille of the
    /// serving version's p99 on the same requests (0: off).
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub shadow_max_p99_permille: u32,
    /// Probation window after activation: healthy throughout, it commits.
    pub probation_secs: u64,
    /// Fewest requests on probation before the error rate and p99 count.
    pub probation_min_requests: u32,
    /// Most failed requests on probation, per mille.
    pub probation_max_error_permille: u32,
    /// Highest p99 latency on probation, in milliseconds (0: off).
    pub probation_max_p99_ms: u32,
    /// When the agent may activate (absent: any time). Outside it, the
    /// version is downloaded, self-tested and shadowed, then waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<MaintenanceWindow>,
    /// Longest an app on the device may hold activation back with a defer
    /// lease, counted from when the version was ready (0: apps cannot).
    #[serde(skip_serializing_if = "is_zero")]
    pub max_defer_secs: u64,
    /// Longest a tested version may wait for its maintenance window,
    /// besides `max_defer_secs` (a window opens within a week; this ends a
    /// wait on a device whose local time is unknown).
    #[serde(skip_serializing_if = "is_default_ready")]
    pub ready_secs: u64,
}

/// The default [`UpdatePolicy::ready_secs`]: eight days.
pub const DEFAULT_READY_SECS: u64 = 8 * 24 * 3600;

fn is_default_ready(v: &u64) -> bool {
    *v == DEFAULT_READY_SECS
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// The default [`UpdatePolicy::shadow_tolerance_ppm`]: 1 %.
pub const DEFAULT_SHADOW_TOLERANCE_PPM: u32 = 10_000;

fn is_default_shadow_tolerance(v: &u32) -> bool {
    *v == DEFAULT_SHADOW_TOLERANCE_PPM
}

/// How a candidate's answer in shadow is judged against the serving one's.
/// Integer and boolean outputs always match exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShadowCompare {
    /// The index of the largest element of each row (the last axis) must
    /// match: for classifiers.
    Top1,
    /// Every float element within [`UpdatePolicy::shadow_tolerance_ppm`]:
    /// for regressors, embeddings and boxes.
    Relative,
    /// Top-1 for float outputs whose last axis is over 1 (class scores),
    /// relative error for the other float outputs. A mode this build does
    /// not know (from a newer coordinator) reads as this one.
    #[default]
    #[serde(other)]
    Auto,
}

impl ShadowCompare {
    fn is_auto(&self) -> bool {
        *self == ShadowCompare::Auto
    }
}

/// Minutes in a day.
pub const MINUTES_PER_DAY: u16 = 24 * 60;

/// When updates may activate, in the device's local time: from `from_minute`
/// to `to_minute` after midnight, on the days in `days`. A window whose end
/// is not after its start runs past midnight into the next day (equal: 24
/// hours); `days` names the day it opens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MaintenanceWindow {
    /// Opens this many minutes after local midnight (0 to 1439).
    pub from_minute: u16,
    /// Closes this many minutes after local midnight (0 to 1439).
    pub to_minute: u16,
    /// The days it opens on: bit 0 is Monday, bit 6 Sunday.
    pub days: u8,
}

/// A local time of the week, to the minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalTime {
    /// Day of the week, 0 for Monday to 6 for Sunday.
    pub weekday: u8,
    /// Minutes after midnight (0 to 1439).
    pub minute: u16,
}

impl LocalTime {
    /// Minutes since Monday 00:00.
    fn of_week(self) -> u32 {
        u32::from(self.weekday % 7) * u32::from(MINUTES_PER_DAY) + u32::from(self.minute % MINUTES_PER_DAY)
    }
}

const MINUTES_PER_WEEK: u32 = 7 * MINUTES_PER_DAY as u32;

impl MaintenanceWindow {
    /// Whether it is a window at all: minutes within a day, some day set.
    pub fn is_valid(&self) -> bool {
        self.from_minute < MINUTES_PER_DAY && self.to_minute < MINUTES_PER_DAY && self.days & 0x7f != 0
    }

    fn len(&self) -> u32 {
        let (from, to) = (u32::from(self.from_minute), u32::from(self.to_minute));
        if to > from { to - from } else { to + u32::from(MINUTES_PER_DAY) - from }
    }

    /// Minutes from `at` until the window is next open: 0 while it is. None
    /// for a window that never opens (see [`MaintenanceWindow::is_valid`]).
    pub fn opens_in(&self, at: LocalTime) -> Option<u32> {
        if !self.is_valid() {
            return None;
        }
        let now = at.of_week();
        (0..7u32)
            .filter_map(|day| {
                if self.days & (1 << day) == 0 {
                    return None;
                }
                let start = (day * u32::from(MINUTES_PER_DAY) + u32::from(self.from_minute)) % MINUTES_PER_WEEK;
                // Minutes since its last opening, a week ago at most.
                let since = (now + MINUTES_PER_WEEK - start) % MINUTES_PER_WEEK;
                Some(if since < self.len() { 0 } else { MINUTES_PER_WEEK - since })
            })
            .min()
    }
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        Self {
            fetch_secs: 24 * 3600,
            verify_secs: 600,
            load_secs: 600,
            selftest_secs: 600,
            shadow_requests: 0,
            shadow_secs: 3600,
            shadow_min_agreement_permille: 990,
            shadow_compare: ShadowCompare::Auto,
            shadow_tolerance_ppm: DEFAULT_SHADOW_TOLERANCE_PPM,
            shadow_max_p99_permille: 0,
            probation_secs: 60,
            probation_min_requests: 20,
            probation_max_error_permille: 50,
            probation_max_p99_ms: 0,
            window: None,
            max_defer_secs: 0,
            ready_secs: DEFAULT_READY_SECS,
        }
    }
}

/// The `_type` of a manifest signed as canonical JSON, so that its signature
/// cannot be passed off as one over another kind of signed document.
pub const MANIFEST_TYPE: &str = "tern-model-manifest";

/// How the signed bytes of a manifest are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ManifestEncoding {
    /// postcard of [`crate::v1::ModelManifest`]: what wire version 1 signs
    /// and its agents verify. It has no room for new fields.
    Postcard,
    /// Canonical JSON (see [`crate::canonical_json`]) of the manifest with
    /// `"_type": "tern-model-manifest"`; decoders ignore unknown fields.
    CanonicalJson,
}

/// A manifest that cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The manifest has no form in the requested encoding.
    #[error("cannot encode manifest: {0}")]
    Encode(String),
    /// The signed bytes are not a manifest.
    #[error("signed manifest body is malformed: {0}")]
    Malformed(String),
}

impl ModelManifest {
    /// The bytes the registry signs, in `encoding`.
    pub fn signed_bytes(&self, encoding: ManifestEncoding) -> Result<Vec<u8>, ManifestError> {
        match encoding {
            ManifestEncoding::Postcard => {
                let v1 = crate::v1::ModelManifest::try_from(self).map_err(ManifestError::Encode)?;
                postcard::to_allocvec(&v1).map_err(|e| ManifestError::Encode(e.to_string()))
            }
            ManifestEncoding::CanonicalJson => {
                let mut value = serde_json::to_value(self).map_err(|e| ManifestError::Encode(e.to_string()))?;
                value
                    .as_object_mut()
                    .expect("a manifest is a JSON object")
                    .insert("_type".into(), MANIFEST_TYPE.into());
                crate::canonical_json(&value).map_err(|e| ManifestError::Encode(e.to_string()))
            }
        }
    }

    /// Decodes signed bytes (only once their signature has been checked).
    pub fn from_signed_bytes(bytes: &[u8], encoding: ManifestEncoding) -> Result<Self, ManifestError> {
        let malformed = |e: String| ManifestError::Malformed(e);
        match encoding {
            ManifestEncoding::Postcard => {
                let (v1, rest) = postcard::take_from_bytes::<crate::v1::ModelManifest>(bytes)
                    .map_err(|e| malformed(e.to_string()))?;
                if !rest.is_empty() {
                    return Err(malformed(format!("{} trailing bytes", rest.len())));
                }
                Ok(v1.into())
            }
            ManifestEncoding::CanonicalJson => {
                let mut value: serde_json::Value =
                    serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
                let kind = value.as_object_mut().and_then(|o| o.remove("_type"));
                if kind.as_ref().and_then(|k| k.as_str()) != Some(MANIFEST_TYPE) {
                    return Err(malformed(format!("_type is {kind:?}, not {MANIFEST_TYPE:?}")));
                }
                serde_json::from_value(value).map_err(|e| malformed(e.to_string()))
            }
        }
    }
}

/// A manifest as signed by the registry key: the exact bytes that were
/// signed, so verification never depends on re-encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// How `body` is encoded (wire version 1 only carries postcard).
    pub encoding: ManifestEncoding,
    /// The encoded [`ModelManifest`].
    pub body: Vec<u8>,
    /// First 8 bytes of the SHA-256 of the signing public key.
    pub key_id: [u8; 8],
    /// Ed25519 signature over `body`.
    pub signature: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(weekday: u8, h: u16, m: u16) -> LocalTime {
        LocalTime { weekday, minute: h * 60 + m }
    }

    #[test]
    fn a_window_opens_on_its_days_and_runs_past_midnight() {
        // Monday 23:00 to 01:00.
        let w = MaintenanceWindow { from_minute: 23 * 60, to_minute: 60, days: 1 };
        assert_eq!(w.opens_in(at(0, 23, 0)), Some(0));
        assert_eq!(w.opens_in(at(1, 0, 59)), Some(0), "Tuesday early is Monday's window");
        assert_eq!(w.opens_in(at(1, 1, 0)), Some(7 * 1440 - 120));
        assert_eq!(w.opens_in(at(0, 22, 0)), Some(60));
        assert_eq!(w.opens_in(at(6, 23, 30)), Some(1410));
        assert_eq!(w.opens_in(at(0, 0, 30)), Some(22 * 60 + 30), "Sunday's is not set");
        let all_day = MaintenanceWindow { from_minute: 0, to_minute: 0, days: 0x7f };
        assert_eq!(all_day.opens_in(at(3, 12, 0)), Some(0));
        assert_eq!(MaintenanceWindow { days: 0, ..all_day }.opens_in(at(3, 12, 0)), None);
        assert_eq!(MaintenanceWindow { from_minute: 1440, ..all_day }.opens_in(at(3, 12, 0)), None);
    }

    #[test]
    fn a_policy_without_window_or_defer_encodes_as_before() {
        let json = serde_json::to_value(UpdatePolicy::default()).unwrap();
        assert!(json.get("window").is_none() && json.get("max_defer_secs").is_none(), "{json}");
        let back: UpdatePolicy = serde_json::from_value(json).unwrap();
        assert_eq!(back, UpdatePolicy::default());
    }

    proptest! {
        /// The answer matches walking the week a minute at a time.
        #[test]
        fn opens_in_matches_a_minute_by_minute_walk(
            from in 0u16..1440, to in 0u16..1440, days in 1u8..128, weekday in 0u8..7, minute in 0u16..1440,
        ) {
            let w = MaintenanceWindow { from_minute: from, to_minute: to, days };
            let open_at = |t: u32| {
                let (day, min) = ((t / 1440) % 7, t % 1440);
                let yesterday = (day + 6) % 7;
                let (f, e) = (u32::from(from), u32::from(to));
                if e > f {
                    days & (1 << day) != 0 && (f..e).contains(&min)
                } else {
                    days & (1 << day) != 0 && min >= f || days & (1 << yesterday) != 0 && min < e
                }
            };
            let start = u32::from(weekday) * 1440 + u32::from(minute);
            let walked = (0..=7 * 1440).find(|d| open_at(start + d));
            prop_assert_eq!(w.opens_in(LocalTime { weekday, minute }), walked);
        }
    }
}
