use crate::{Backend, RuntimeError, Tensor, TensorData};
use std::sync::Arc;
use tern_proto::{DType, TensorSpec};
use tract_nnef::prelude::*;

type Plan = Arc<TypedRunnableModel>;

/// A model planned by tract, from ONNX or NNEF.
pub struct TractModel {
    plan: Plan,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
}

pub(crate) fn load_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Load(format!("{e:#}"))
}

/// The NNEF framework with the operators ONNX models translate to.
pub(crate) fn nnef() -> tract_nnef::internal::Nnef {
    use tract_onnx_opl::WithOnnx;
    tract_nnef::nnef().with_onnx()
}

impl TractModel {
    /// Loads a tract NNEF archive (tar or tar.gz), as compiled for devices.
    pub fn nnef(bytes: &[u8]) -> Result<Self, RuntimeError> {
        let model = nnef().model_for_read(&mut &*bytes).map_err(load_err)?;
        Self::from_typed(model.into_optimized().map_err(load_err)?)
    }

    /// Parses, types, optimizes and plans an ONNX model. Dimensions the
    /// model leaves open become symbols resolved at each run, so a dynamic
    /// batch axis stays dynamic.
    #[cfg(feature = "onnx")]
    pub fn onnx(bytes: &[u8]) -> Result<Self, RuntimeError> {
        Self::from_typed(crate::onnx::typed(bytes, None)?.into_optimized().map_err(load_err)?)
    }

    /// Loads an artifact of either format.
    pub fn load(format: tern_proto::ModelFormat, bytes: &[u8]) -> Result<Self, RuntimeError> {
        match format {
            tern_proto::ModelFormat::Nnef => Self::nnef(bytes),
            #[cfg(feature = "onnx")]
            tern_proto::ModelFormat::Onnx => Self::onnx(bytes),
            #[cfg(not(feature = "onnx"))]
            tern_proto::ModelFormat::Onnx => {
                Err(RuntimeError::Load("this build cannot parse ONNX; deploy the compiled NNEF artifact".into()))
            }
            tern_proto::ModelFormat::Burn => Err(RuntimeError::Load("a built-in model is not a tract model".into())),
        }
    }

    fn from_typed(typed: TypedModel) -> Result<Self, RuntimeError> {
        let inputs = typed
            .input_outlets()
            .map_err(load_err)?
            .iter()
            .map(|o| spec(&typed, *o, typed.node(o.node).name.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = typed
            .output_outlets()
            .map_err(load_err)?
            .iter()
            .map(|o| {
                let name = typed.outlet_label(*o).map(str::to_owned).unwrap_or_else(|| typed.node(o.node).name.clone());
                spec(&typed, *o, name)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let plan = typed.into_runnable().map_err(load_err)?;
        Ok(Self { plan, inputs, outputs })
    }
}

pub(crate) fn spec(model: &TypedModel, outlet: OutletId, name: String) -> Result<TensorSpec, RuntimeError> {
    let fact = model.outlet_fact(outlet).map_err(load_err)?;
    let dtype = to_dtype(fact.datum_type)
        .ok_or_else(|| RuntimeError::Load(format!("{name:?} has unsupported element type {:?}", fact.datum_type)))?;
    let shape = fact.shape.iter().map(|d| d.to_i64().ok().map(|v| v as u64)).collect();
    Ok(TensorSpec { name, dtype, shape })
}

pub(crate) fn to_dtype(dt: DatumType) -> Option<DType> {
    Some(match dt {
        DatumType::F32 => DType::F32,
        DatumType::F64 => DType::F64,
        DatumType::I8 => DType::I8,
        DatumType::I16 => DType::I16,
        DatumType::I32 => DType::I32,
        // tract may type integer outputs computed from shapes as TDim; they
        // leave the model as i64.
        DatumType::I64 | DatumType::TDim => DType::I64,
        DatumType::U8 => DType::U8,
        DatumType::U16 => DType::U16,
        DatumType::U32 => DType::U32,
        DatumType::U64 => DType::U64,
        DatumType::Bool => DType::Bool,
        DatumType::F16 => DType::F16,
        _ => return None,
    })
}

pub(crate) fn to_tract(t: Tensor) -> Result<TValue, RuntimeError> {
    let shape = t.shape;
    let r = match t.data {
        TensorData::F32(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v).map(|a| a.into_tvalue()),
        TensorData::F64(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v).map(|a| a.into_tvalue()),
        TensorData::I8(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v).map(|a| a.into_tvalue()),
        TensorData::I16(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v).map(|a| a.into_tvalue()),
        TensorData::I32(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v).map(|a| a.into_tvalue()),
        TensorData::I64(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v).map(|a| a.into_tvalue()),
        TensorData::U8(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v).map(|a| a.into_tvalue()),
        TensorData::U16(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v).map(|a| a.into_tvalue()),
        TensorData::U32(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v).map(|a| a.into_tvalue()),
        TensorData::U64(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v).map(|a| a.into_tvalue()),
        TensorData::Bool(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v).map(|a| a.into_tvalue()),
        TensorData::F16(v) => tract_ndarray::ArrayD::from_shape_vec(shape, v).map(|a| a.into_tvalue()),
        TensorData::BF16(_) => return Err(RuntimeError::Signature("tract has no bf16 tensors".into())),
    };
    r.map_err(|e| RuntimeError::Signature(format!("tensor data does not fit its shape: {e}")))
}

pub(crate) fn from_tract(v: &TValue) -> Result<Tensor, RuntimeError> {
    let shape = v.shape().to_vec();
    let run = |e: TractError| RuntimeError::Run(e.to_string());
    let cast;
    let v = if v.datum_type() == DatumType::TDim {
        cast = v.cast_to::<i64>().map_err(run)?;
        &*cast
    } else {
        &**v
    };
    let view = v.try_as_plain_ram().map_err(run)?;
    let data = match v.datum_type() {
        DatumType::F32 => TensorData::F32(view.as_slice::<f32>().map_err(run)?.to_vec()),
        DatumType::F64 => TensorData::F64(view.as_slice::<f64>().map_err(run)?.to_vec()),
        DatumType::I8 => TensorData::I8(view.as_slice::<i8>().map_err(run)?.to_vec()),
        DatumType::I16 => TensorData::I16(view.as_slice::<i16>().map_err(run)?.to_vec()),
        DatumType::I32 => TensorData::I32(view.as_slice::<i32>().map_err(run)?.to_vec()),
        DatumType::I64 => TensorData::I64(view.as_slice::<i64>().map_err(run)?.to_vec()),
        DatumType::U8 => TensorData::U8(view.as_slice::<u8>().map_err(run)?.to_vec()),
        DatumType::U16 => TensorData::U16(view.as_slice::<u16>().map_err(run)?.to_vec()),
        DatumType::U32 => TensorData::U32(view.as_slice::<u32>().map_err(run)?.to_vec()),
        DatumType::U64 => TensorData::U64(view.as_slice::<u64>().map_err(run)?.to_vec()),
        DatumType::Bool => TensorData::Bool(view.as_slice::<bool>().map_err(run)?.to_vec()),
        DatumType::F16 => TensorData::F16(view.as_slice::<tern_proto::f16>().map_err(run)?.to_vec()),
        other => return Err(RuntimeError::Run(format!("model produced unsupported element type {other:?}"))),
    };
    Ok(Tensor { shape, data })
}

impl Backend for TractModel {
    fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        let inputs = inputs.into_iter().map(to_tract).collect::<Result<TVec<_>, _>>()?;
        // A fresh run state every time: operators such as GRU, LSTM and Scan
        // keep their state from one run into the next within a state, so a
        // reused one would answer from the second request on as if the
        // inputs had been concatenated. (Reuse saved under 1 % on the CNN
        // benchmark; bench/examples/state_reuse.rs.)
        let outputs = self.plan.run(inputs).map_err(|e| RuntimeError::Run(format!("{e:#}")))?;
        outputs.iter().map(from_tract).collect()
    }
}
