//! Tern's inference runtime: typed tensors, the [`Backend`] trait every
//! model runner implements, tract backends for NNEF (what devices should
//! receive) and ONNX (feature `onnx`), and burn for the built-in model
//! families of `tern-models` (feature `burn`). The same loader checks models
//! at registration on the coordinator, so a model the agent cannot run is
//! refused before it reaches a device.

#[cfg(feature = "burn")]
mod burn_backend;
mod guard;
mod inputs;
#[cfg(feature = "onnx")]
mod onnx;
#[cfg(feature = "onnxruntime")]
pub mod ort_backend;
mod tract_backend;

#[cfg(feature = "burn")]
pub use burn_backend::BurnModel;
pub use guard::run_guarded;
pub use inputs::{SplitMix, random_inputs};
#[cfg(feature = "onnx")]
pub use onnx::{
    ReferenceModel, compile_onnx, onnx_inputs, onnx_tensor, onnx_to_nnef, onnx_with_consts, plain_output_rewrites,
};
pub use tern_proto::{Tensor, TensorData};
pub use tract_backend::TractModel;

use tern_proto::{ModelFormat, TensorSpec};

/// Errors from loading or running a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The artifact is not a model this backend can load.
    #[error("cannot load model: {0}")]
    Load(String),
    /// The request's tensors do not match the model's signature.
    #[error("{0}")]
    Signature(String),
    /// The model failed while running.
    #[error("model failed while running: {0}")]
    Run(String),
}

/// A loaded model that can answer requests. Implementations are shared
/// between request handlers, so `run` takes `&self`.
pub trait Backend: Send + Sync {
    /// Input signature.
    fn inputs(&self) -> &[TensorSpec];
    /// Output signature.
    fn outputs(&self) -> &[TensorSpec];
    /// Runs the model on inputs already checked with [`check_inputs`].
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError>;
}

/// Tells a built-in model (`TBM`), an NNEF archive (tar, or gzipped tar)
/// and an ONNX protobuf apart by their first bytes.
pub fn sniff_format(bytes: &[u8]) -> ModelFormat {
    let gzip = bytes.starts_with(&[0x1f, 0x8b]);
    let tar = bytes.get(257..262) == Some(b"ustar");
    if bytes.starts_with(b"TBM") {
        ModelFormat::Burn
    } else if gzip || tar {
        ModelFormat::Nnef
    } else {
        ModelFormat::Onnx
    }
}

/// Loads an artifact of any format this build runs; ONNX on onnxruntime
/// (one thread a run) once [`ort_backend::init`] has loaded it in this
/// process, else on tract. It takes the bytes: a
/// built-in model's weights reuse their buffer, and every format frees them
/// once loaded, so a load holds about one copy of the model at its peak.
pub fn load(format: ModelFormat, bytes: Vec<u8>) -> Result<Box<dyn Backend>, RuntimeError> {
    match format {
        #[cfg(feature = "onnxruntime")]
        ModelFormat::Onnx if ort_backend::loaded() => Ok(Box::new(ort_backend::OrtModel::onnx(&bytes, 1)?)),
        ModelFormat::Onnx | ModelFormat::Nnef => Ok(Box::new(TractModel::load(format, &bytes)?)),
        #[cfg(feature = "burn")]
        ModelFormat::Burn => Ok(Box::new(BurnModel::load(bytes)?)),
        #[cfg(not(feature = "burn"))]
        ModelFormat::Burn => Err(RuntimeError::Load("this build has no burn backend for built-in models".into())),
    }
}

/// The artifact formats this build runs.
pub fn formats() -> Vec<ModelFormat> {
    [ModelFormat::Onnx, ModelFormat::Nnef, ModelFormat::Burn].into_iter().filter(|f| supports(*f)).collect()
}

/// The inference backends in this build, by name.
pub fn backends() -> Vec<&'static str> {
    let mut out = vec!["tract-nnef"];
    if cfg!(feature = "onnx") {
        out.push("tract-onnx");
    }
    #[cfg(feature = "onnxruntime")]
    if ort_backend::loaded() {
        out.push("onnxruntime");
    }
    if cfg!(feature = "flex") {
        out.push("burn-flex");
    } else if cfg!(feature = "ndarray") {
        out.push("burn-ndarray");
    }
    out
}

/// Whether this build can run artifacts of `format`.
pub fn supports(format: ModelFormat) -> bool {
    match format {
        ModelFormat::Nnef => true,
        ModelFormat::Onnx => cfg!(feature = "onnx") || onnxruntime_loaded(),
        ModelFormat::Burn => cfg!(feature = "burn"),
    }
}

fn onnxruntime_loaded() -> bool {
    #[cfg(feature = "onnxruntime")]
    return ort_backend::loaded();
    #[cfg(not(feature = "onnxruntime"))]
    false
}

/// Checks count, element type and shape of `inputs` against `specs`, with
/// an error that names the expected signature.
pub fn check_inputs(specs: &[TensorSpec], inputs: &[Tensor]) -> Result<(), RuntimeError> {
    let expected = || specs.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ");
    if specs.len() != inputs.len() {
        return Err(RuntimeError::Signature(format!(
            "expected {} input(s) ({}), got {}",
            specs.len(),
            expected(),
            inputs.len()
        )));
    }
    for (spec, t) in specs.iter().zip(inputs) {
        let shape_ok = spec.shape.len() == t.shape.len()
            && spec.shape.iter().zip(&t.shape).all(|(want, got)| want.is_none_or(|w| w == *got as u64));
        if t.dtype() != spec.dtype || !shape_ok {
            return Err(RuntimeError::Signature(format!(
                "input {:?} expects {}, got {}{:?} (model signature: {})",
                spec.name,
                spec,
                t.dtype(),
                t.shape,
                expected()
            )));
        }
    }
    Ok(())
}
