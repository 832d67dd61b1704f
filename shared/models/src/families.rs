use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::activation::{relu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// Widest layer a spec may ask for.
pub const MAX_WIDTH: usize = 1 << 16;
/// Most layers a spec may ask for.
pub const MAX_LAYERS: usize = 64;
/// Most parameters (weights and biases) a spec may ask for: 64 Mi floats.
pub const MAX_PARAMS: usize = 1 << 26;

/// A spec that cannot describe a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A layer width of zero or above [`MAX_WIDTH`].
    #[error("layer width {0} is outside 1..={MAX_WIDTH}")]
    Width(usize),
    /// More than [`MAX_LAYERS`] layers.
    #[error("{0} layers; at most {MAX_LAYERS}")]
    Layers(usize),
    /// More than [`MAX_PARAMS`] parameters.
    #[error("{0} parameters; at most {MAX_PARAMS}")]
    Params(u64),
    /// Weights given for a different number of layers than the family has.
    #[error("the family has {expected} layers, the weights {got}")]
    LayerCount {
        /// Layers of the family.
        expected: usize,
        /// Layers given.
        got: usize,
    },
    /// A layer's weights are not `[in][out]` plus `[out]`.
    #[error("layer {index} must have a {inputs}×{outputs} weight and {outputs} biases")]
    LayerShape {
        /// Layer, from the input.
        index: usize,
        /// Its input width.
        inputs: usize,
        /// Its output width.
        outputs: usize,
    },
}

/// What an [`Mlp`] puts on its last layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Head {
    /// Class probabilities (classification).
    Softmax,
    /// The raw values (regression, or logits).
    Identity,
}

/// Shape of a multi-layer perceptron over tabular rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlpSpec {
    /// Features per row.
    pub inputs: usize,
    /// Widths of the hidden layers, each followed by ReLU.
    pub hidden: Vec<usize>,
    /// Values per row out of the last layer.
    pub outputs: usize,
    /// What the last layer's values become.
    pub head: Head,
}

/// Shape of a dense autoencoder that scores rows by reconstruction error
/// (anomaly detection on sensor rows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoencoderSpec {
    /// Features per row.
    pub inputs: usize,
    /// Encoder widths down to the code; the decoder mirrors them back.
    pub encoder: Vec<usize>,
}

/// The built-in model families. New families go at the end: artifacts
/// store the variant index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    /// [`Mlp`].
    Mlp(MlpSpec),
    /// [`Autoencoder`].
    Autoencoder(AutoencoderSpec),
}

impl Family {
    /// `(in, out)` of every linear layer, in order.
    pub fn layers(&self) -> Vec<(usize, usize)> {
        match self {
            Family::Mlp(s) => chain(s.inputs, s.hidden.iter().copied().chain([s.outputs])),
            Family::Autoencoder(s) => {
                let back = s.encoder.iter().rev().skip(1).copied().chain([s.inputs]);
                chain(s.inputs, s.encoder.iter().copied().chain(back))
            }
        }
    }

    /// Checks widths, depth and parameter count before anything is allocated.
    pub fn validate(&self) -> Result<(), SpecError> {
        let layers = self.layers();
        if layers.len() > MAX_LAYERS {
            return Err(SpecError::Layers(layers.len()));
        }
        if let Family::Autoencoder(s) = self
            && s.encoder.is_empty()
        {
            return Err(SpecError::Layers(0));
        }
        // u64 and checked: `in * out` of two 65,536-wide layers is 2^32,
        // which wraps to 0 in a 32-bit usize (armv7) and would pass the limit.
        let mut params = 0u64;
        for &(i, o) in &layers {
            for w in [i, o] {
                if !(1..=MAX_WIDTH).contains(&w) {
                    return Err(SpecError::Width(w));
                }
            }
            let layer = (i as u64).checked_mul(o as u64).and_then(|w| w.checked_add(o as u64)).unwrap_or(u64::MAX);
            params = params.saturating_add(layer);
        }
        if params > MAX_PARAMS as u64 {
            return Err(SpecError::Params(params));
        }
        Ok(())
    }

    /// Features per input row.
    pub fn inputs(&self) -> usize {
        match self {
            Family::Mlp(s) => s.inputs,
            Family::Autoencoder(s) => s.inputs,
        }
    }
}

fn chain(first: usize, rest: impl Iterator<Item = usize>) -> Vec<(usize, usize)> {
    let mut prev = first;
    rest.map(|w| (std::mem::replace(&mut prev, w), w)).collect()
}

fn linears(layers: &[(usize, usize)], device: &Device) -> Vec<Linear> {
    layers.iter().map(|&(i, o)| LinearConfig::new(i, o).with_initializer(Initializer::Zeros).init(device)).collect()
}

/// ReLU between layers, none after the last.
fn dense(layers: &[Linear], mut x: Tensor<2>) -> Tensor<2> {
    for (i, layer) in layers.iter().enumerate() {
        x = layer.forward(x);
        if i + 1 < layers.len() {
            x = relu(x);
        }
    }
    x
}

/// Multi-layer perceptron: linear layers with ReLU between them.
#[derive(Module, Debug)]
pub struct Mlp {
    /// The layers, input first.
    pub layers: Vec<Linear>,
}

impl Mlp {
    /// Values of the last layer, `[rows, outputs]`, before the head.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        dense(&self.layers, x)
    }
}

/// Dense autoencoder.
#[derive(Module, Debug)]
pub struct Autoencoder {
    /// Input down to the code.
    pub encoder: Vec<Linear>,
    /// Code back up to the input width.
    pub decoder: Vec<Linear>,
}

impl Autoencoder {
    /// The reconstruction of `x`, `[rows, inputs]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        // The code is a hidden layer too: ReLU on it as well.
        let code = relu(dense(&self.encoder, x));
        dense(&self.decoder, code)
    }
}

/// A model of one of the families, with its spec.
#[derive(Debug)]
pub enum BuiltIn {
    /// A perceptron and what its head does.
    Mlp(Mlp, Head),
    /// An autoencoder.
    Autoencoder(Autoencoder),
}

impl BuiltIn {
    /// A model of `family` with zero weights, for a record to replace.
    pub(crate) fn zeroed(family: &Family, device: &Device) -> Result<Self, SpecError> {
        family.validate()?;
        let layers = family.layers();
        Ok(match family {
            Family::Mlp(s) => BuiltIn::Mlp(Mlp { layers: linears(&layers, device) }, s.head),
            Family::Autoencoder(s) => {
                let (enc, dec) = layers.split_at(s.encoder.len());
                BuiltIn::Autoencoder(Autoencoder { encoder: linears(enc, device), decoder: linears(dec, device) })
            }
        })
    }

    /// Names of the outputs [`BuiltIn::run`] returns, in order.
    pub fn output_names(family: &Family) -> &'static [&'static str] {
        match family {
            Family::Mlp(MlpSpec { head: Head::Softmax, .. }) => &["probabilities"],
            Family::Mlp(_) => &["output"],
            Family::Autoencoder(_) => &["reconstruction", "score"],
        }
    }

    /// Runs `rows × inputs` values (row-major). Returns each output's data
    /// and shape: MLP `[rows, outputs]`; autoencoder the reconstruction
    /// `[rows, inputs]` and the per-row mean squared error `[rows]`.
    pub fn run(&self, values: Vec<f32>, rows: usize, device: &Device) -> Vec<(Vec<f32>, Vec<usize>)> {
        let cols = values.len().checked_div(rows).unwrap_or(0);
        let x = Tensor::<2>::from_data(TensorData::new(values, [rows, cols]), device);
        match self {
            BuiltIn::Mlp(m, head) => {
                let y = m.forward(x);
                let y = if *head == Head::Softmax { softmax(y, 1) } else { y };
                vec![to_vec(y)]
            }
            BuiltIn::Autoencoder(a) => {
                let y = a.forward(x.clone());
                let score = (y.clone() - x).powi_scalar(2).mean_dim(1).reshape([rows]);
                vec![to_vec(y), to_vec(score)]
            }
        }
    }

    pub(crate) fn into_record(self) -> burn::store::ModuleRecord {
        match self {
            BuiltIn::Mlp(m, _) => m.into_record(),
            BuiltIn::Autoencoder(a) => a.into_record(),
        }
    }

    pub(crate) fn load_record(self, record: burn::store::ModuleRecord) -> Result<Self, String> {
        Ok(match self {
            BuiltIn::Mlp(m, head) => BuiltIn::Mlp(m.try_load_record(record).map_err(|e| e.to_string())?, head),
            BuiltIn::Autoencoder(a) => BuiltIn::Autoencoder(a.try_load_record(record).map_err(|e| e.to_string())?),
        })
    }
}

fn to_vec<const D: usize>(t: Tensor<D>) -> (Vec<f32>, Vec<usize>) {
    let shape = t.dims().to_vec();
    let data = t.into_data();
    let values = data.try_into_vec::<f32>().unwrap_or_default();
    (values, shape)
}

/// One dense layer's trained values, as other tools export them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerWeights {
    /// `[in][out]` (scikit-learn's `coefs_` layout, burn's row layout).
    pub weight: Vec<Vec<f32>>,
    /// `[out]`.
    pub bias: Vec<f32>,
}

/// A family and the trained values of all its layers (encoder then decoder
/// for an autoencoder): how weights trained elsewhere become a built-in model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    /// Family and shape.
    pub family: Family,
    /// Every layer, input first.
    pub layers: Vec<LayerWeights>,
}

impl Weights {
    /// Builds the model and serializes it as a `.tbm` artifact.
    pub fn into_artifact(self, device: &Device) -> Result<Vec<u8>, crate::ArtifactError> {
        let family = self.family.clone();
        crate::Artifact::encode(&family, self.build(device)?)
    }

    /// Builds the model, checking every layer against the family's shape.
    pub fn build(self, device: &Device) -> Result<BuiltIn, SpecError> {
        self.family.validate()?;
        let shapes = self.family.layers();
        if shapes.len() != self.layers.len() {
            return Err(SpecError::LayerCount { expected: shapes.len(), got: self.layers.len() });
        }
        let mut linears = Vec::with_capacity(shapes.len());
        for (index, (&(i, o), layer)) in shapes.iter().zip(self.layers).enumerate() {
            let rows_ok = layer.weight.len() == i && layer.weight.iter().all(|r| r.len() == o);
            if !rows_ok || layer.bias.len() != o {
                return Err(SpecError::LayerShape { index, inputs: i, outputs: o });
            }
            let weight: Vec<f32> = layer.weight.into_iter().flatten().collect();
            linears.push(Linear {
                weight: Param::from_tensor(Tensor::from_data(TensorData::new(weight, [i, o]), device)),
                bias: Some(Param::from_tensor(Tensor::from_data(TensorData::new(layer.bias, [o]), device))),
            });
        }
        Ok(match &self.family {
            Family::Mlp(s) => BuiltIn::Mlp(Mlp { layers: linears }, s.head),
            Family::Autoencoder(s) => {
                let decoder = linears.split_off(s.encoder.len());
                BuiltIn::Autoencoder(Autoencoder { encoder: linears, decoder })
            }
        })
    }
}
