//! The model registry: models and their versions (digest, signature, model
//! card, metadata, approval status), enrolled devices with their desired
//! state, one-time enrollment tokens, and the content-addressed folder of
//! artifacts. Stored in sled behind [`Registry`]; durable on return.

mod artifacts;
mod store;
mod types;

pub use artifacts::Artifacts;
pub use store::Registry;
pub use types::{Approval, Device, EnrollToken, ModelVersion, NewVersion};

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
    /// Reading or writing the artifact folder failed.
    #[error("artifact storage: {0}")]
    Io(#[from] std::io::Error),
}

/// Result alias for the registry.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
