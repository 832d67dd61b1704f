//! Tern's built-in model families as burn modules — what the coordinator
//! trains and the agent runs without a graph compiler — and the artifact
//! format (`.tbm`) that carries a family's shape and its weights.
//!
//! burn 0.22 dispatches tensors to a backend at run time through its
//! [`Device`], so the modules are backend-agnostic without a type parameter:
//! the same definitions train on an autodiff device and infer on burn-ndarray
//! (feature `ndarray`, the default) or burn-flex (feature `flex`).

mod artifact;
mod families;

pub use artifact::{Artifact, ArtifactError, MAGIC};
pub use families::{
    Autoencoder, AutoencoderSpec, BuiltIn, Family, Head, LayerWeights, MAX_LAYERS, MAX_PARAMS, MAX_WIDTH, Mlp, MlpSpec,
    SpecError, Weights,
};

pub use burn::tensor::Device;

#[cfg(not(any(feature = "ndarray", feature = "flex")))]
compile_error!("tern-models needs a CPU backend: feature `ndarray` or `flex`");

/// The CPU device built-in models run on in this build.
#[allow(deprecated)] // burn-ndarray is deprecated upstream in favour of burn-flex; both are offered.
pub fn cpu_device() -> Device {
    #[cfg(feature = "flex")]
    return Device::flex();
    #[cfg(not(feature = "flex"))]
    return Device::ndarray();
}
