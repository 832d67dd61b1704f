use crate::ids::{DeviceId, Sha256Digest};
use crate::manifest::{ModelFormat, SignedManifest};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Every message of the current wire version ([`crate::WireVersion::CURRENT`]);
/// [`crate::v1::Message`] is version 1's. Which ones are allowed depends on
/// the stream: enrollment, the control stream, or an artifact stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Agent → coordinator, on a connection without a client certificate.
    EnrollRequest(EnrollRequest),
    /// Coordinator → agent: the enrolled identity.
    EnrollResponse(EnrollResponse),
    /// Agent → coordinator: first message on the control stream.
    Hello(Hello),
    /// Coordinator → agent: answer to [`Message::Hello`].
    Welcome(Welcome),
    /// Coordinator → agent: the models this device should serve.
    Desired(DesiredState),
    /// Agent → coordinator: what it is serving now.
    Status(StatusReport),
    /// Agent → coordinator: first message on an artifact stream.
    FetchArtifact(FetchArtifact),
    /// Coordinator → agent: precedes the raw artifact bytes.
    ArtifactHeader(ArtifactHeader),
    /// Either way: a request failed.
    Error(WireError),
    /// Agent → coordinator (wire version 3 on): its recent update steps.
    /// New variants go last, so that the older ones encode as before.
    History(UpdateHistory),
    /// Coordinator → agent (wire version 4 on, in place of
    /// [`Message::Desired`]): the desired state signed for this device, with
    /// the registry's TUF metadata.
    SignedDesired(SignedDesired),
    /// Agent → coordinator (wire version 6 on): telemetry records, oldest
    /// first, each with the id the coordinator acknowledges.
    Telemetry(TelemetryBatch),
    /// Coordinator → agent (wire version 6 on): every record up to this id
    /// is stored.
    TelemetryAck(TelemetryAck),
    /// Agent → coordinator (wire version 7 on): the bytes it sent and
    /// received per day on each link, and how often it will speak.
    Traffic(TrafficReport),
    /// Coordinator → agent (wire version 8 on), after the Welcome: where
    /// the agent sends its telemetry.
    Route(TelemetryRoute),
}

impl Message {
    /// The variant's name, for logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::EnrollRequest(_) => "EnrollRequest",
            Message::EnrollResponse(_) => "EnrollResponse",
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Desired(_) => "Desired",
            Message::Status(_) => "Status",
            Message::FetchArtifact(_) => "FetchArtifact",
            Message::ArtifactHeader(_) => "ArtifactHeader",
            Message::Error(_) => "Error",
            Message::History(_) => "History",
            Message::SignedDesired(_) => "SignedDesired",
            Message::Telemetry(_) => "Telemetry",
            Message::TelemetryAck(_) => "TelemetryAck",
            Message::Traffic(_) => "Traffic",
            Message::Route(_) => "Route",
        }
    }

    /// The first wire version that has this message.
    pub fn since(&self) -> crate::WireVersion {
        match self {
            Message::History(_) => crate::WireVersion::V3,
            Message::SignedDesired(_) => crate::WireVersion::V4,
            Message::Telemetry(b) => b.records.iter().map(|r| r.body.since()).max().unwrap_or(crate::WireVersion::V6),
            Message::TelemetryAck(_) => crate::WireVersion::V6,
            Message::Traffic(_) => crate::WireVersion::V7,
            Message::Route(_) => crate::WireVersion::V8,
            _ => crate::WireVersion::V1,
        }
    }
}

/// Where a fleet's agents send telemetry, alerts and captured samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TelemetryRoute {
    /// An MQTT broker (`mqtts://HOST:PORT`): agents publish under
    /// `tern/v1/<device>/` with their fleet certificate and take
    /// acknowledgements on `tern/v1/<device>/ack`; each message is one
    /// frame of wire version 8. `None`: on the QUIC control stream.
    pub mqtt: Option<String>,
}

/// Telemetry records a device sends, oldest first (at most
/// [`MAX_TELEMETRY_BATCH`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    /// The device's record stream: drawn at random when its buffer is made,
    /// so that a device whose state was wiped (and whose ids start again)
    /// is not taken for one sending old records again.
    pub stream: u64,
    /// Records of this stream the device dropped so far, its buffer full
    /// (the oldest go first) or its disk failing: a running count.
    pub dropped: u64,
    /// The records, by increasing id.
    pub records: Vec<TelemetryRecord>,
}

/// Most records one [`TelemetryBatch`] carries.
pub const MAX_TELEMETRY_BATCH: usize = 64;

/// One telemetry record. Ids increase by one per record on a device and
/// are never reused, so the coordinator keeps each once whatever is sent
/// again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRecord {
    /// Its id on the device.
    pub id: u64,
    /// When it was made, by the device's clock (Unix milliseconds).
    pub at_ms: u64,
    /// What it says.
    pub body: TelemetryBody,
}

/// What a telemetry record says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TelemetryBody {
    /// A drift window closed.
    Window(WindowSummary),
    /// An alert was raised or cleared.
    Alert(AlertChange),
    /// The device started windowing a version afresh (it restarted, or
    /// took the version in): no alert of the model raised before is
    /// standing any more.
    Started(MonitorStarted),
    /// (Wire version 9 on.) Predictions the app posted the ground truth
    /// of, counted over a window.
    Quality(QualityWindow),
    /// (Wire version 9 on.) A request and its answer, sampled under the
    /// version's capture policy.
    Capture(CapturedSample),
}

impl TelemetryBody {
    /// The first wire version that has this record.
    pub fn since(&self) -> crate::WireVersion {
        match self {
            TelemetryBody::Quality(_) | TelemetryBody::Capture(_) => crate::WireVersion::V9,
            _ => crate::WireVersion::V6,
        }
    }
}

/// Most classes a [`QualityCounts::Classes`] counts (its matrix is the
/// square of it).
pub const MAX_QUALITY_CLASSES: u32 = 64;

/// See [`TelemetryBody::Quality`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityWindow {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u32,
    /// Quality windows of this version the device closed before it since
    /// it started serving it.
    pub seq: u64,
    /// How long it was open, in milliseconds.
    pub millis: u64,
    /// What was counted.
    pub counts: QualityCounts,
}

/// Predictions against the ground truth, counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum QualityCounts {
    /// A classifier: `confusion[actual * classes + predicted]` counts the
    /// pairs whose labels are both below `classes`; the others (a label
    /// negative or at or above [`MAX_QUALITY_CLASSES`]) only in `other`.
    Classes {
        /// Labels counted one by one (at most [`MAX_QUALITY_CLASSES`]).
        classes: u32,
        /// The confusion matrix, `classes` × `classes`, row-major by the
        /// actual label.
        confusion: Vec<u64>,
        /// Pairs outside the matrix.
        other: u64,
        /// Of those, the ones predicted right.
        other_correct: u64,
    },
    /// A regressor: sums over the rows of the error `predicted - actual`.
    Values {
        /// Rows.
        n: u64,
        /// Sum of errors.
        sum: f64,
        /// Sum of absolute errors.
        sum_abs: f64,
        /// Sum of squared errors.
        sum_sq: f64,
    },
}

/// Largest encoded inputs plus outputs a [`CapturedSample`] carries: one
/// record must fit a telemetry batch.
pub const MAX_CAPTURE_BYTES: usize = 48 << 10;

/// See [`TelemetryBody::Capture`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapturedSample {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u32,
    /// The inference id the app was answered with.
    pub inference_id: String,
    /// The request's inputs, as a binary tensor body
    /// ([`crate::encode_tensors`]).
    pub inputs: Vec<u8>,
    /// The answer's outputs, the same way.
    pub outputs: Vec<u8>,
}

/// See [`TelemetryBody::Started`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorStarted {
    /// Model name.
    pub model: String,
    /// The version now windowed.
    pub version: u32,
}

/// A closed drift window of one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowSummary {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u32,
    /// Windows of this version the device closed before it since it
    /// started serving it.
    pub seq: u64,
    /// How long it was open, in milliseconds.
    pub millis: u64,
    /// Rows counted.
    pub rows: u64,
    /// Requests answered or failed.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// The p99 run time in microseconds.
    pub p99_us: Option<u64>,
    /// The window's summaries on the version's baseline layout
    /// (`tern_drift::Profile`, postcard, without sketches); empty when it
    /// counted no rows.
    pub profile: Vec<u8>,
}

/// An alert raised or cleared on a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertChange {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u32,
    /// The rule (`feature_drift`, `missing_rate`, `output_drift`,
    /// `p99_latency`, `error_rate`, `low_confidence`).
    pub rule: String,
    /// The feature, or empty for the whole model.
    pub feature: String,
    /// Raised (true) or cleared.
    pub raised: bool,
    /// The metric in the window that changed it.
    pub value: f64,
    /// Its threshold.
    pub threshold: f64,
}

/// The coordinator has stored every record up to `up_to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryAck {
    /// The stream the ids are of.
    pub stream: u64,
    /// The highest id stored.
    pub up_to: u64,
}

/// What an agent counted on its links, sent on the control stream at
/// least every `heartbeat_secs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficReport {
    /// The longest the agent stays silent on the control stream: the
    /// coordinator waits a few of these before it takes the session for
    /// dead.
    pub heartbeat_secs: u32,
    /// Per link, today's count and the previous day's (at most
    /// [`MAX_TRAFFIC_DAYS`]).
    pub days: Vec<LinkDay>,
}

/// Most entries one [`TrafficReport`] carries.
pub const MAX_TRAFFIC_DAYS: usize = 8;

/// The bytes one link carried in one day (UTC), counted at the IP layer:
/// what the link's transport sent and received plus its IP and UDP
/// headers, on the sessions it opened (not failed attempts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkDay {
    /// The link: `quic` (the control session and its downloads).
    pub link: String,
    /// The day, as days since 1970-01-01 (UTC) by the device's clock.
    pub day: u32,
    /// Bytes the device sent.
    pub sent: u64,
    /// Bytes the device received.
    pub received: u64,
}

/// The agent's most recent update steps, oldest first. It sends them all
/// each time (at most [`MAX_HISTORY`]); the coordinator keeps each once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateHistory {
    /// The steps.
    pub events: Vec<UpdateEvent>,
}

/// Most events one [`UpdateHistory`] carries.
pub const MAX_HISTORY: usize = 64;

/// One step of a staged update on a device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UpdateEvent {
    /// When, by the device's clock (Unix milliseconds).
    pub at_ms: u64,
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// The phase entered: `fetching`, `verifying`, `staged`, `self-test`,
    /// `shadow`, `probation`, `committed`, `retrying`, `failed`,
    /// `rolled back`, `refused` or `abandoned`.
    pub phase: String,
    /// Why, for failures, retries, refusals and rollbacks.
    pub reason: Option<String>,
}

/// Enrollment: a one-time token and a certificate signing request made from a
/// key that never leaves the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The token's secret part.
    pub secret: [u8; 16],
    /// DER-encoded PKCS#10 certificate signing request.
    pub csr_der: Vec<u8>,
    /// A device id the agent asks for; the coordinator picks one if `None`.
    pub requested_id: Option<DeviceId>,
    /// The agent's version string.
    pub agent_version: String,
}

/// The identity a device gets at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The device's id (its certificate's common name).
    pub device_id: DeviceId,
    /// The device certificate, DER.
    pub cert_der: Vec<u8>,
    /// The fleet CA certificate, DER.
    pub ca_der: Vec<u8>,
    /// The registry's Ed25519 public key, which signs model manifests.
    pub registry_key: [u8; 32],
    /// Fleet group named by the token.
    pub group: String,
    /// Device profile named by the token.
    pub profile: String,
}

/// First message of an enrolled agent's control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's version string.
    pub agent_version: String,
    /// What the agent serves or is working on.
    pub models: Vec<ModelStatus>,
    /// The wire versions the agent speaks, newest first. (Empty when the
    /// session speaks version 1, whose `Hello` cannot say.)
    pub wire_versions: Vec<u16>,
    /// The artifact formats this agent build can run (empty: unknown).
    pub formats: Vec<ModelFormat>,
    /// The inference backends the agent has, e.g. `tract`, `burn-ndarray`.
    pub backends: Vec<String>,
}

/// The coordinator's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The id the coordinator knows this device by.
    pub device_id: DeviceId,
    /// The coordinator's clock (Unix seconds), for the agent's logs.
    pub server_time: u64,
    /// The wire version of this connection: the newest both sides speak
    /// (which the TLS handshake's ALPN already picked; the agent checks).
    pub wire_version: u16,
}

/// The models a device should serve. The agent reconciles towards the latest
/// generation it has received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Increases every time the device's desired state changes.
    pub generation: u64,
    /// One signed manifest per model name.
    pub models: Vec<SignedManifest>,
}

impl DesiredState {
    /// What the registry signs for one device ([`SignedDesired`]): canonical
    /// JSON of `"_type": "tern-desired-state"`, the device, the generation
    /// and the SHA-256 of each signed manifest's body, in order. Binding the
    /// device and the generation is what makes a state for another device,
    /// or an older one replayed (an empty one included), fail to verify or
    /// fall below the generation the agent has applied.
    pub fn statement(&self, device: &DeviceId) -> Vec<u8> {
        let manifests: Vec<String> = self.models.iter().map(|m| Sha256Digest::of(&m.body).to_hex()).collect();
        let value = serde_json::json!({
            "_type": "tern-desired-state",
            "device": device.as_str(),
            "generation": self.generation,
            "manifests": manifests,
        });
        crate::canonical_json(&value).expect("strings and integers only")
    }
}

/// A desired state and the registry key's Ed25519 signature over
/// [`DesiredState::statement`] for the receiving device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDesired {
    /// The state.
    pub state: DesiredState,
    /// The signature (64 bytes).
    pub signature: Vec<u8>,
    /// The registry's TUF metadata, when it has a root.
    pub tuf: Option<TufMetadata>,
}

/// The TUF repository as the coordinator last signed it: every file a
/// client needs to refresh (the spec's workflow, over the control stream
/// instead of HTTP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TufMetadata {
    /// Every `N.root.json`, version 1 first.
    pub roots: Vec<Vec<u8>>,
    /// The registry key's signature over [`root_intro_statement`] of the
    /// first root: how an agent enrolled before the repository existed (it
    /// trusts only the registry key) comes to trust root 1. Agents that hold
    /// a root already ignore it.
    pub root_intro: Vec<u8>,
    /// `timestamp.json`.
    pub timestamp: Vec<u8>,
    /// `snapshot.json`.
    pub snapshot: Vec<u8>,
    /// `targets.json`.
    pub targets: Vec<u8>,
}

/// What the registry key signs to introduce a TUF root to its agents:
/// canonical JSON of `"_type": "tern-root-intro"` and the root file's SHA-256.
pub fn root_intro_statement(root: &[u8]) -> Vec<u8> {
    let value = serde_json::json!({ "_type": "tern-root-intro", "root_sha256": Sha256Digest::of(root).to_hex() });
    crate::canonical_json(&value).expect("strings only")
}

/// Where an agent is with one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    /// Fetching the artifact.
    Downloading,
    /// Checking digest and signature.
    Verifying,
    /// Handing the artifact to the runtime.
    Loading,
    /// Answering predictions.
    Serving,
    /// Loaded, but its last run failed inside the runtime; see `detail`.
    Unhealthy,
    /// The last attempt failed; see `detail`.
    Failed,
}

impl fmt::Display for ModelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelState::Downloading => "downloading",
            ModelState::Verifying => "verifying",
            ModelState::Loading => "loading",
            ModelState::Serving => "serving",
            ModelState::Unhealthy => "unhealthy",
            ModelState::Failed => "failed",
        })
    }
}

/// One model's status on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// Model name.
    pub name: String,
    /// Version the state refers to.
    pub version: u32,
    /// Where the agent is with it.
    pub state: ModelState,
    /// Why it failed, when it did.
    pub detail: Option<String>,
}

/// The agent's periodic and on-change report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Every model the agent knows about.
    pub models: Vec<ModelStatus>,
    /// The generation of the last desired state the agent applied.
    pub generation: u64,
    /// Why the agent refused the newest desired state it received, if it did
    /// (a bad signature: it keeps applying the last good one).
    pub refused: Option<Refusal>,
}

/// A desired state the agent refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The generation it carried.
    pub generation: u64,
    /// Why.
    pub reason: String,
}

/// Asks for an artifact's bytes from `offset` on (for resuming).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchArtifact {
    /// The artifact's digest.
    pub sha256: Sha256Digest,
    /// First byte wanted.
    pub offset: u64,
}

/// Announces `size - offset` raw bytes that follow on the same stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactHeader {
    /// The artifact's digest.
    pub sha256: Sha256Digest,
    /// Total size of the artifact.
    pub size: u64,
    /// Where the bytes that follow start.
    pub offset: u64,
}

/// What went wrong, in a form both a program and a person can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request was malformed or not allowed on this stream.
    BadRequest,
    /// The peer has no valid identity for this request.
    Unauthorized,
    /// The enrollment token is not one this coordinator issued.
    TokenUnknown,
    /// The enrollment token was used already.
    TokenUsed,
    /// The enrollment token has expired.
    TokenExpired,
    /// The requested device id is taken.
    DeviceExists,
    /// The named thing does not exist.
    NotFound,
    /// The coordinator failed; the request may be retried.
    Internal,
    /// The device was removed from the fleet; its certificate is refused.
    Revoked,
    /// A newer session of the same device replaced this one, or one is open
    /// on this connection already.
    SessionConflict,
    /// The coordinator is at a limit; try again later.
    Busy,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Machine-readable kind.
    pub code: ErrorCode,
    /// One line for a person.
    pub message: String,
}

impl WireError {
    /// Builds an error reply.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}
