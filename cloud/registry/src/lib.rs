//! The model registry: models and their versions (digest, signature, model
//! card, metadata, approval status), enrolled devices with their desired
//! state, one-time enrollment tokens, and the content-addressed folder of
//! artifacts. Stored in sled behind [`Registry`]; durable on return.

mod artifacts;
mod rollouts;
mod store;
mod telemetry;
mod types;

pub use artifacts::Artifacts;
pub use rollouts::{Selector, StoredRollout};
pub use store::Registry;
pub use telemetry::{
    ALERTS_KEPT, Alert, CAPTURES_KEPT, QUALITY_RULES, QualityRules, StoredCapture, StoredQuality, StoredWindow, Taken,
    WINDOWS_KEPT,
};
pub use types::{
    Approval, Artifact, Capabilities, CompileReport, Device, EnrollToken, Fit, HistoryEntry, Latency,
    MAX_DEVICE_HISTORY, ModelVersion, NewVersion, OutputError, Report, TargetArtifact,
};

use tern_proto::Sha256Digest;

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No model of that name is registered.
    #[error("no model named {0:?}")]
    UnknownModel(String),
    /// The model exists but not that version.
    #[error("model {name:?} has no version {version}")]
    UnknownVersion {
        /// Model name.
        name: String,
        /// The missing version.
        version: u32,
    },
    /// No device of that id is enrolled.
    #[error("no device {0:?} is enrolled")]
    UnknownDevice(String),
    /// A rollout's selector names what no device has, or its devices are
    /// held by another rollout, or its plan or target set is refused.
    #[error("{0}")]
    Selector(String),
    /// No rollout has that id.
    #[error("no rollout {0}")]
    UnknownRollout(u64),
    /// A device with the requested id exists already.
    #[error("device {0:?} is enrolled already")]
    DeviceExists(String),
    /// Deploying needs an approved version.
    #[error(
        "{name}:{version} is {status}, only approved versions can be deployed (run: tern model approve {name}:{version})"
    )]
    NotApproved {
        /// Model name.
        name: String,
        /// Version.
        version: u32,
        /// Its current status.
        status: Approval,
    },
    /// The device does not have that model assigned.
    #[error("{device} has no version of {model:?} assigned")]
    NotAssigned {
        /// Device id.
        device: String,
        /// Model name.
        model: String,
    },
    /// The device's agent cannot run the version's format.
    #[error(
        "{device}'s agent runs {runs}; {name}:{version} is {format} (register its NNEF form, which every agent runs)"
    )]
    Unsupported {
        /// Device id.
        device: String,
        /// Model name.
        name: String,
        /// Version.
        version: u32,
        /// Its format.
        format: tern_proto::ModelFormat,
        /// What the agent runs.
        runs: String,
    },
    /// The device's agent last spoke a wire version that cannot name an
    /// element type of the version's signature.
    #[error("{device} cannot be sent {name}:{version}: its tensor {tensor} needs wire version {needs}, and {session}")]
    WireTooOld {
        /// Device id.
        device: String,
        /// Model name.
        name: String,
        /// Version.
        version: u32,
        /// The first tensor it cannot carry.
        tensor: String,
        /// What is known of the device's wire version, in words.
        session: String,
        /// The wire version the tensor needs.
        needs: u16,
    },
    /// The device's profile's artifact is listed only at its profile's
    /// path, and its agent speaks wire version 4, which does not look there.
    #[error(
        "{device} cannot be sent {name}:{version}: its {profile} artifact differs from another profile's, so it is listed only at its profile's path, which an agent speaking wire version 4 does not look up; upgrade its agent"
    )]
    ProfilePathOnly {
        /// Device id.
        device: String,
        /// Model name.
        name: String,
        /// Version.
        version: u32,
        /// The device's profile.
        profile: String,
    },
    /// The version has no artifact a device of this profile can be sent.
    #[error(
        "{name}:{version} has no artifact for profile {profile:?} (compiled for {compiled_for}); run: tern compile {name}:{version} --target {profile}"
    )]
    NoArtifact {
        /// Model name.
        name: String,
        /// Version.
        version: u32,
        /// The device's profile.
        profile: String,
        /// The profiles it has artifacts for.
        compiled_for: String,
    },
    /// Storing a compiled artifact would change what assigned devices get.
    #[error(
        "{name}:{version} is assigned to {devices}, whose artifact this would change; unassign it from them first, or register and compile a new version"
    )]
    CompiledInUse {
        /// Model name.
        name: String,
        /// Version.
        version: u32,
        /// The devices, comma-separated.
        devices: String,
    },
    /// The profile's compiled artifact failed its fit check.
    #[error("{name}:{version} does not fit profile {profile:?}: {why}")]
    DoesNotFit {
        /// Model name.
        name: String,
        /// Version.
        version: u32,
        /// The device's profile.
        profile: String,
        /// The numbers against the budget.
        why: String,
    },
    /// Rejecting a version that devices are told to serve needs `force`.
    #[error(
        "{name}:{version} is assigned to {devices}; unassign it first, or reject with --force to unassign it from them"
    )]
    Deployed {
        /// Model name.
        name: String,
        /// Version.
        version: u32,
        /// The devices, comma-separated.
        devices: String,
    },
    /// The token is not one this registry issued.
    #[error("enrollment token not recognised by this coordinator")]
    TokenUnknown,
    /// The token enrolled a device already.
    #[error("enrollment token was already used (by device {0})")]
    TokenUsed(String),
    /// The token's time is up.
    #[error("enrollment token expired {0} s ago; ask for a new one with `tern fleet token`")]
    TokenExpired(u64),
    /// The artifact's bytes do not hash to the digest given with them.
    #[error("upload corrupted: sha256 is {actual}, expected {expected}")]
    DigestMismatch {
        /// What the sender said.
        expected: Sha256Digest,
        /// What arrived.
        actual: Sha256Digest,
    },
    /// No artifact with that digest is stored.
    #[error("no artifact with sha256 {0}")]
    UnknownArtifact(Sha256Digest),
    /// A stored record does not decode.
    #[error("corrupt registry record {key}: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What failed.
        reason: String,
    },
    /// The sled database failed.
    #[error("registry storage: {0}")]
    Storage(#[from] sled::Error),
    /// No alert has that id.
    #[error("no alert {0}")]
    UnknownAlert(u64),
    /// Reading or writing the artifact folder failed.
    #[error("artifact storage: {0}")]
    Io(#[from] std::io::Error),
}

/// Result alias for the registry.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
