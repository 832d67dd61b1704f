use crate::{Backend, RuntimeError, Tensor, TensorData};
use tern_models::{Artifact, BuiltIn, Device, Family};
use tern_proto::{DType, TensorSpec};

/// A built-in model family (`tern-models`) run by burn on the CPU.
pub struct BurnModel {
    model: BuiltIn,
    device: Device,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
}

impl BurnModel {
    /// Loads a `.tbm` artifact: family, shape and weights. Takes the bytes
    /// so that their buffer becomes the weights' (see `Artifact::decode`).
    pub fn load(bytes: Vec<u8>) -> Result<Self, RuntimeError> {
        let device = tern_models::cpu_device();
        let Artifact { family, model } =
            Artifact::decode(bytes, &device).map_err(|e| RuntimeError::Load(e.to_string()))?;
        let (inputs, outputs) = signature(&family);
        Ok(Self { model, device, inputs, outputs })
    }
}

fn signature(family: &Family) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    let rows = |width: Option<usize>| {
        let mut shape = vec![None];
        shape.extend(width.map(|w| Some(w as u64)));
        shape
    };
    let inputs = vec![TensorSpec { name: "input".into(), dtype: DType::F32, shape: rows(Some(family.inputs())) }];
    let widths: Vec<Option<usize>> = match family {
        Family::Mlp(s) => vec![Some(s.outputs)],
        Family::Autoencoder(s) => vec![Some(s.inputs), None],
    };
    let outputs = BuiltIn::output_names(family)
        .iter()
        .zip(widths)
        .map(|(name, w)| TensorSpec { name: (*name).into(), dtype: DType::F32, shape: rows(w) })
        .collect();
    (inputs, outputs)
}

impl Backend for BurnModel {
    fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        let Some(Tensor { shape, data: TensorData::F32(values) }) = inputs.into_iter().next() else {
            return Err(RuntimeError::Signature(format!("expected one input, {}", self.inputs[0])));
        };
        let rows = shape.first().copied().unwrap_or(0);
        if rows == 0 {
            return Err(RuntimeError::Signature("expected at least one row".into()));
        }
        Ok(self
            .model
            .run(values, rows, &self.device)
            .into_iter()
            .map(|(values, shape)| Tensor { shape, data: TensorData::F32(values) })
            .collect())
    }
}
