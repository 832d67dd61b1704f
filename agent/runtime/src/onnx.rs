//! ONNX parsing (feature `onnx`): loading for the coordinator and for
//! devices that take ONNX, and translation to NNEF, the format devices run.

use crate::RuntimeError;
use crate::tract_backend::load_err;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// Parses an ONNX model into a decluttered typed model. Dimensions left open
/// (unnamed, or given as -1) become symbols (`N` for the first axis), unless
/// `pinned` gives the input shapes, which then replace the model's own.
pub(crate) fn typed(bytes: &[u8], pinned: Option<&[Vec<usize>]>) -> Result<TypedModel, RuntimeError> {
    let mut model = tract_onnx::onnx().model_for_read(&mut &*bytes).map_err(load_err)?;
    if let Some(shapes) = pinned
        && shapes.len() != model.inputs.len()
    {
        return Err(RuntimeError::Load(format!(
            "model has {} inputs, {} shapes given",
            model.inputs.len(),
            shapes.len()
        )));
    }
    for ix in 0..model.inputs.len() {
        let fact = model.input_fact(ix).map_err(load_err)?.clone();
        let dt = fact
            .datum_type
            .concretize()
            .ok_or_else(|| RuntimeError::Load(format!("input {ix} has no element type")))?;
        let rank = fact
            .shape
            .rank()
            .concretize()
            .ok_or_else(|| RuntimeError::Load(format!("input {ix} has no fixed rank")))?;
        if let Some(shape) = pinned.map(|p| &p[ix]) {
            model.set_input_fact(ix, InferenceFact::dt_shape(dt, shape.clone())).map_err(load_err)?;
            continue;
        }
        let dims: TVec<TDim> = (0..rank as usize)
            .map(|ax| {
                let known =
                    fact.shape.dim(ax).and_then(|d| d.concretize()).filter(|d| !matches!(d.to_i64(), Ok(v) if v < 0));
                known.unwrap_or_else(|| {
                    let name = if ax == 0 { "N".to_owned() } else { format!("in{ix}_d{ax}") };
                    model.sym(&name).into()
                })
            })
            .collect();
        model.set_input_fact(ix, InferenceFact::dt_shape(dt, dims)).map_err(load_err)?;
    }
    model.into_typed().and_then(|m| m.into_decluttered()).map_err(load_err)
}

/// Translates an ONNX model to a tract NNEF archive (tar), checking on the
/// way that tract can load it. `pinned` fixes the input shapes, which lets
/// tract optimize for them (a device serving one camera resolution).
pub fn onnx_to_nnef(bytes: &[u8], pinned: Option<&[Vec<usize>]>) -> Result<Vec<u8>, RuntimeError> {
    let model = typed(bytes, pinned)?;
    crate::tract_backend::nnef().write_to_tar(&model, Vec::new()).map_err(load_err)
}
