use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use tern_proto::{
    BaselineRef, CapturePolicy, DeviceId, LinkDay, ModelFormat, ModelManifest, ModelStatus, Refusal, SelfTestRef,
    Sha256Digest, TensorSpec, UpdateEvent,
};

/// Whether a version may be deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Approval {
    /// Registered, awaiting a decision.
    Pending,
    /// May be deployed.
    Approved,
    /// May not be deployed.
    Rejected,
}

impl fmt::Display for Approval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Approval::Pending => "pending",
            Approval::Approved => "approved",
            Approval::Rejected => "rejected",
        })
    }
}

/// What a caller supplies to register a version; the registry numbers it.
#[derive(Debug, Clone)]
pub struct NewVersion {
    /// Digest of an artifact already in the artifact store.
    pub sha256: Sha256Digest,
    /// Its size.
    pub size: u64,
    /// Its format.
    pub format: ModelFormat,
    /// Input signature read from the model.
    pub inputs: Vec<TensorSpec>,
    /// Output signature read from the model.
    pub outputs: Vec<TensorSpec>,
    /// Model card (markdown).
    pub card: Option<String>,
    /// Free-form metadata.
    pub meta: BTreeMap<String, String>,
    /// Its golden vectors, in the artifact store.
    pub selftest: Option<SelfTestRef>,
    /// See [`ModelVersion::needs_compiling`].
    pub needs_compiling: Option<String>,
    /// See [`ModelVersion::compile_shapes`].
    pub compile_shapes: BTreeMap<String, Vec<usize>>,
    /// See [`ModelVersion::compile_consts`].
    pub compile_consts: BTreeMap<String, String>,
    /// See [`ModelVersion::tolerance_ppm`].
    pub tolerance_ppm: Option<u32>,
    /// See [`ModelVersion::baseline`].
    pub baseline: Option<BaselineRef>,
    /// See [`ModelVersion::baseline_full`].
    pub baseline_full: Option<BaselineRef>,
    /// Registration time (Unix seconds).
    pub now: u64,
}

/// One registered version of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// Model name.
    pub name: String,
    /// Version, from 1.
    pub version: u32,
    /// Artifact digest.
    pub sha256: Sha256Digest,
    /// Artifact size in bytes.
    pub size: u64,
    /// Artifact format.
    pub format: ModelFormat,
    /// Input signature.
    pub inputs: Vec<TensorSpec>,
    /// Output signature.
    pub outputs: Vec<TensorSpec>,
    /// Model card (markdown).
    pub card: Option<String>,
    /// Free-form metadata.
    pub meta: BTreeMap<String, String>,
    /// When it was registered (Unix seconds).
    pub created_at: u64,
    /// Approval status.
    pub status: Approval,
    /// When the status last changed (Unix seconds).
    pub status_changed_at: u64,
    /// Golden vectors the agent checks the version against before serving
    /// it (absent for versions registered before there were any).
    #[serde(default)]
    pub selftest: Option<SelfTestRef>,
    /// Why the source does not run on an agent as registered (raw tract
    /// refuses it) although `tern compile` makes it loadable; devices get
    /// only its compiled artifacts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs_compiling: Option<String>,
    /// Input shapes given at registration: what `tern compile` pins when
    /// its command line gives none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub compile_shapes: BTreeMap<String, Vec<usize>>,
    /// Inputs declared constant at registration (`--const`): what `tern
    /// compile` folds in when its command line declares none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub compile_consts: BTreeMap<String, String>,
    /// The golden tolerance given at registration of a source that needs
    /// compiling (it has no golden vectors of its own): its compiled
    /// artifacts' self-tests use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance_ppm: Option<u32>,
    /// Compiled artifacts by device profile (`tern compile NAME:V --target
    /// PROFILE`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, TargetArtifact>,
    /// The training data's baseline (`--baseline` at registration)
    /// without its quantile sketches: the file every manifest of the
    /// version sends devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineRef>,
    /// The same baseline as uploaded, with its sketches: what the
    /// coordinator compares fleet windows against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_full: Option<BaselineRef>,
    /// Model Monitor constraints imported for it (a `constraints.json` in
    /// the artifact store), which `tern monitor check` and
    /// `export-constraints` use in place of suggested ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Sha256Digest>,
    /// The data capture its manifests ask devices for (`tern monitor
    /// capture`); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CapturePolicy>,
}

/// What a device of one profile is sent for a version.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Artifact<'a> {
    /// The registered source, as it is.
    Source,
    /// The artifact compiled for the device's profile.
    Compiled(&'a TargetArtifact),
}

impl ModelVersion {
    /// The manifest of the source as registered (without an update policy:
    /// the coordinator adds its own).
    pub fn manifest(&self) -> ModelManifest {
        ModelManifest {
            name: self.name.clone(),
            version: self.version,
            sha256: self.sha256,
            size: self.size,
            format: self.format,
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            created_at: self.created_at,
            selftest: self.selftest,
            update: None,
            alternative: None,
            baseline: self.baseline,
            capture: self.capture,
        }
    }

    /// What a device of `profile` gets: its profile's compiled artifact;
    /// the source only while the version has no compiled artifact at all
    /// and the source runs as registered.
    pub fn artifact_for(&self, profile: &str) -> crate::Result<Artifact<'_>> {
        if let Some(t) = self.targets.get(profile) {
            return Ok(Artifact::Compiled(t));
        }
        if self.targets.is_empty() && self.needs_compiling.is_none() {
            return Ok(Artifact::Source);
        }
        Err(crate::RegistryError::NoArtifact {
            name: self.name.clone(),
            version: self.version,
            profile: profile.to_owned(),
            compiled_for: if self.targets.is_empty() {
                "no profile yet".into()
            } else {
                self.targets.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        })
    }

    /// Whether what a device of `profile` gets is also listed at the
    /// version's plain target path (`NAME/V/model.EXT`), the only one an
    /// agent speaking wire version 4 looks up: the source, or a compiled
    /// artifact in another format than the source's that every profile's
    /// artifact of that format equals.
    pub fn plain_path_serves(&self, profile: &str) -> bool {
        match self.artifact_for(profile) {
            Ok(Artifact::Source) => true,
            Ok(Artifact::Compiled(t)) => self.plain_target(t.format).is_some_and(|p| p.sha256 == t.sha256),
            Err(_) => false,
        }
    }

    /// The compiled artifact listed at the plain target path of `format`:
    /// one every profile's artifact of that format equals, in a format
    /// other than the source's (whose path lists the source).
    pub fn plain_target(&self, format: ModelFormat) -> Option<&TargetArtifact> {
        if format == self.format {
            return None;
        }
        let mut same = self.targets.values().filter(|t| t.format == format);
        let first = same.next()?;
        same.all(|t| t.sha256 == first.sha256).then_some(first)
    }

    /// The manifest a device of `profile` is sent.
    pub fn manifest_for(&self, profile: &str) -> crate::Result<ModelManifest> {
        Ok(match self.artifact_for(profile)? {
            Artifact::Source => self.manifest(),
            Artifact::Compiled(t) => t.manifest(self),
        })
    }
}

/// An artifact compiled from a version's source for one device profile,
/// with what `tern compile` measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetArtifact {
    /// Artifact digest.
    pub sha256: Sha256Digest,
    /// Artifact size in bytes.
    pub size: u64,
    /// Artifact format.
    pub format: ModelFormat,
    /// Its input signature (pinned shapes; declared constants gone).
    pub inputs: Vec<TensorSpec>,
    /// Its output signature.
    pub outputs: Vec<TensorSpec>,
    /// Its golden vectors, computed by the registry from the artifact.
    pub selftest: Option<SelfTestRef>,
    /// When it was stored (Unix seconds).
    pub compiled_at: u64,
    /// What `tern compile` reported.
    pub report: CompileReport,
    /// The same model for another backend (onnxruntime), which agents that
    /// have it run instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alternative: Option<tern_proto::Alternative>,
}

impl TargetArtifact {
    /// The manifest of `version` that sends this artifact.
    pub fn manifest(&self, version: &ModelVersion) -> ModelManifest {
        ModelManifest {
            sha256: self.sha256,
            size: self.size,
            format: self.format,
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            selftest: self.selftest,
            alternative: self.alternative.clone(),
            ..version.manifest()
        }
    }
}

/// What `tern compile` measured for one artifact.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CompileReport {
    /// Input shapes it was compiled for.
    #[serde(default)]
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// Inputs folded in as constants.
    #[serde(default)]
    pub consts: BTreeMap<String, String>,
    /// Outputs made plain tensors, one line each (`tern_runtime::plain_output_rewrites`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewrites: Vec<String>,
    /// The source's size in bytes.
    pub source_bytes: u64,
    /// Error per output against the source, over `cases` seeded input sets.
    pub errors: Vec<OutputError>,
    /// Seeded input sets compared.
    pub cases: u32,
    /// The tolerance it passed.
    pub tolerance: f64,
    /// The backend the agent should run it on.
    pub backend: String,
    /// Latency per backend, measured on the compiling machine.
    #[serde(default)]
    pub latency: BTreeMap<String, Latency>,
    /// The fit check against the profile's budget.
    #[serde(default)]
    pub fit: Option<Fit>,
}

/// How far one compiled output is from the source's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputError {
    /// The output's name.
    pub output: String,
    /// Largest `|compiled − source|`.
    pub max_abs: f64,
    /// Largest `|compiled − source| / (1 + |source|)`.
    pub max_scaled: f64,
}

/// Latency of one backend, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Runs measured.
    pub runs: u32,
}

/// A compiled artifact against its profile's budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fit {
    /// Memory the model took in a child process that loaded and ran it
    /// (peak resident set after, minus resident set before the load).
    pub peak_model_bytes: u64,
    /// That process's peak resident set with the model loaded.
    pub process_peak_rss_bytes: u64,
    /// p99 on the compiling machine, in microseconds.
    pub host_p99_us: u64,
    /// The profile's speed factor (device time / this machine's time).
    pub speed_factor: f64,
    /// `host_p99_us × speed_factor`: an estimate, not a measurement.
    pub estimated_p99_us: u64,
    /// The profile's budget for one model's memory, in MiB.
    pub max_model_memory_mb: Option<u64>,
    /// The profile's p99 budget, in milliseconds.
    pub max_p99_ms: Option<u64>,
    /// Why it does not fit; `None`: it fits.
    pub refused: Option<String>,
}

/// What a device's agent said it can do, in its last `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Artifact formats its build runs.
    pub formats: Vec<ModelFormat>,
    /// Its inference backends.
    pub backends: Vec<String>,
    /// The wire version of its session.
    pub wire_version: u16,
}

/// An enrolled device. Fields added after the first release have serde
/// defaults, so records written by an older coordinator still read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Its id, also its certificate's common name.
    pub id: DeviceId,
    /// Fleet group.
    pub group: String,
    /// Device profile (hardware class).
    pub profile: String,
    /// When it enrolled (Unix seconds).
    pub enrolled_at: u64,
    /// SHA-256 of its certificate: how a connection is tied to the device.
    pub cert_sha256: Sha256Digest,
    /// When it was last heard from (Unix seconds).
    pub last_seen: Option<u64>,
    /// Agent version it last reported.
    pub agent_version: Option<String>,
    /// Desired model versions, by model name.
    pub desired: BTreeMap<String, u32>,
    /// Increases with every change to `desired`.
    pub generation: u64,
    /// What the agent last reported.
    pub reported: Vec<ModelStatus>,
    /// The generation of the desired state the agent last said it applied
    /// (`None` until it says; agents of wire version 1 never do).
    #[serde(default)]
    pub reported_generation: Option<u64>,
    /// The desired state the agent last refused as a whole, and why.
    #[serde(default)]
    pub refused: Option<Refusal>,
    /// What its agent can run (`None` until an agent of wire version 2 or
    /// later says).
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// Its most recent update steps, oldest first (at most
    /// [`MAX_DEVICE_HISTORY`]; agents of wire version 3 on report them).
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    /// The bytes its agent counted per link and day (UTC) in its latest
    /// report: today's and the day before (agents of wire version 7 on).
    #[serde(default)]
    pub traffic: Vec<LinkDay>,
    /// The versions it was assigned before its current ones, newest last
    /// (at most [`MAX_PAST_ASSIGNMENTS`]): the coordinator's own record of
    /// what the device may still send telemetry of. `None` on a record
    /// written before it was kept.
    #[serde(default)]
    pub past: Option<Vec<(String, u32)>>,
    /// Its tags (`tern fleet tag`), which rollouts select on.
    #[serde(default)]
    pub tags: std::collections::BTreeSet<String>,
}

/// Earlier assignments kept per device.
pub const MAX_PAST_ASSIGNMENTS: usize = 16;

impl Device {
    /// Keeps `model:version`, just replaced or unassigned, among its past
    /// assignments.
    pub fn remember(&mut self, model: &str, version: u32) {
        let past = self.past.get_or_insert_with(Vec::new);
        past.retain(|(m, v)| !(m == model && *v == version));
        past.push((model.to_owned(), version));
        let over = past.len().saturating_sub(MAX_PAST_ASSIGNMENTS);
        past.drain(..over);
    }

    /// Whether the device may send telemetry of `model:version`: the
    /// coordinator gave it the version, now or before; or the device says
    /// it has it while the coordinator's own record cannot tell (a record
    /// from before past assignments were kept, or a registry restored
    /// from an older backup, behind the generation the device applied).
    pub fn may_report(&self, model: &str, version: u32) -> bool {
        let given = self.desired.get(model) == Some(&version)
            || self.past.iter().flatten().any(|(m, v)| m == model && *v == version);
        let behind = self.past.is_none() || self.reported_generation.is_some_and(|g| g > self.generation);
        given || (behind && self.reported.iter().any(|m| m.name == model && m.version == version))
    }

    /// Takes an agent's traffic report: per link and day the larger of the
    /// count kept and the count reported (a day's counts only grow, and
    /// the control session's and MQTT's reports may arrive in either
    /// order), keeping only the report's newest day and the one before.
    pub fn merge_traffic(&mut self, days: &[LinkDay]) {
        let Some(newest) = days.iter().map(|d| d.day).max() else { return };
        let mut merged: Vec<LinkDay> =
            self.traffic.iter().filter(|d| d.day <= newest && d.day + 1 >= newest).cloned().collect();
        for d in days.iter().filter(|d| d.day + 1 >= newest) {
            match merged.iter_mut().find(|k| k.link == d.link && k.day == d.day) {
                Some(k) => (k.sent, k.received) = (k.sent.max(d.sent), k.received.max(d.received)),
                None => merged.push(d.clone()),
            }
        }
        self.traffic = merged;
    }

    /// Moves the generation on for a change to `desired`: past what the
    /// agent reported applying too, so that after the registry is restored
    /// from an older backup a new change is not taken for a replay (the
    /// agent ignores generations below the one it applied).
    pub fn next_generation(&mut self) {
        // A report is the device's word: one of u64::MAX must not wrap.
        self.generation = self.generation.max(self.reported_generation.unwrap_or(0)).saturating_add(1);
    }
}

/// Update steps kept per device.
pub const MAX_DEVICE_HISTORY: usize = 200;

/// One update step a device reported, and when it arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The step, as the device reported it (its `at_ms` by its own clock).
    #[serde(flatten)]
    pub event: UpdateEvent,
    /// When the coordinator received it (Unix seconds).
    pub received_at: u64,
}

/// What a device reported, for [`crate::Registry::seen`].
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Its agent's version (from a `Hello`).
    pub agent_version: Option<String>,
    /// Its models' states.
    pub models: Option<Vec<ModelStatus>>,
    /// The generation it applied.
    pub generation: Option<u64>,
    /// A desired state it refused (`Some(None)`: none now).
    pub refused: Option<Option<Refusal>>,
    /// What it can run; taken, `None` included, whenever `agent_version`
    /// is (both come with a `Hello`).
    pub capabilities: Option<Capabilities>,
    /// Its recent update steps; those already kept are not kept twice.
    pub history: Option<Vec<UpdateEvent>>,
    /// Its traffic counts, which replace those kept.
    pub traffic: Option<Vec<LinkDay>>,
}

/// A one-time enrollment token, stored by the hash of its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollToken {
    /// Group a device enrolled with it joins.
    pub group: String,
    /// Profile a device enrolled with it gets.
    pub profile: String,
    /// Issue time (Unix seconds).
    pub created_at: u64,
    /// Expiry (Unix seconds).
    pub expires_at: u64,
    /// The device that used it.
    pub used_by: Option<DeviceId>,
}
