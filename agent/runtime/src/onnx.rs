//! ONNX parsing (feature `onnx`): loading for the coordinator and for
//! devices that take ONNX, and translation to NNEF, the format devices run.

use crate::tract_backend::{from_tract, load_err, to_dtype, to_tract};
use crate::{RuntimeError, Tensor};
use std::collections::BTreeMap;
use tern_proto::TensorSpec;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// tract's ONNX parser. Models run on the thread that calls them (the
/// agent's API threads; the coordinator's golden vectors and checks too),
/// so the one operator that would spread over rayon's global pool, the
/// flash attention kernel behind ONNX `Attention`, is held to the calling
/// thread for the whole process; `TRACT_FLASH_SDPA_ST=0` in the environment
/// overrides that.
fn parser() -> tract_onnx::Onnx {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails if the knob is not registered (tract renamed it) or another
        // config in the process set it otherwise; `attention.rs` notices
        // the first, and in the second that config stands.
        let set = tract_onnx::tract_core::knobs::set_config_global("TRACT_FLASH_SDPA_ST", "true");
        debug_assert!(set.is_ok(), "{set:?}");
    });
    tract_onnx::onnx()
}

/// Parses an ONNX model into a decluttered typed model. Dimensions left open
/// (unnamed, or given as -1) become symbols (`N` for the first axis), unless
/// `pinned` gives the input shapes, which then replace the model's own.
pub(crate) fn typed(bytes: &[u8], pinned: Option<&[Vec<usize>]>) -> Result<TypedModel, RuntimeError> {
    let mut model = parser().model_for_read(&mut &*bytes).map_err(load_err)?;
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

/// The inputs an ONNX model declares, as it declares them: dimensions it
/// leaves open (unnamed, named or -1) are `None`.
pub fn onnx_inputs(bytes: &[u8]) -> Result<Vec<TensorSpec>, RuntimeError> {
    let model = parser().model_for_read(&mut &*bytes).map_err(load_err)?;
    (0..model.inputs.len())
        .map(|ix| {
            let fact = model.input_fact(ix).map_err(load_err)?;
            let name = model.node(model.inputs[ix].node).name.clone();
            let dt = fact
                .datum_type
                .concretize()
                .ok_or_else(|| RuntimeError::Load(format!("input {name:?} has no element type")))?;
            let dtype = to_dtype(dt)
                .ok_or_else(|| RuntimeError::Load(format!("input {name:?} has unsupported element type {dt:?}")))?;
            let rank = fact
                .shape
                .rank()
                .concretize()
                .ok_or_else(|| RuntimeError::Load(format!("input {name:?} has no fixed rank")))?;
            let shape = (0..rank as usize)
                .map(|ax| {
                    fact.shape
                        .dim(ax)
                        .and_then(|d| d.concretize())
                        .and_then(|d| d.to_i64().ok())
                        .filter(|v| *v >= 0)
                        .map(|v| v as u64)
                })
                .collect();
            Ok(TensorSpec { name, dtype, shape })
        })
        .collect()
}

/// Compiles an ONNX model for a device: each input in `shapes` gets that
/// shape, each input in `consts` becomes that constant (no longer an
/// input, so a branch on it is resolved and shapes that follow from it are
/// folded), each `If` whose condition is then known (on a constant, or on
/// a dimension of a pinned shape, as PyTorch's exports test whether an axis
/// is 1) is replaced by the branch it takes, each output a `ZipMap` makes a
/// map of becomes the tensor it maps (see [`plain_output_rewrites`]), the
/// model's metadata properties are left out, then tract types, declutters
/// and writes it as NNEF (tar).
/// Names are the model's input names; the caller checks them first.
pub fn compile_onnx(
    bytes: &[u8],
    shapes: &BTreeMap<String, Vec<usize>>,
    consts: &BTreeMap<String, Tensor>,
) -> Result<Vec<u8>, RuntimeError> {
    let onnx = parser();
    let mut proto = onnx.proto_model_for_read(&mut &*bytes).map_err(load_err)?;
    plain_outputs(&mut proto);
    resolve_ifs(&mut proto, shapes, consts);
    // tract writes ONNX metadata into the NNEF as string properties without
    // escaping a `'` (PP-OCRv4's recognizer keeps its character list there)
    // and then cannot read the archive back; the source, with its metadata,
    // stays in the registry.
    proto.metadata_props.clear();
    let mut model = onnx.model_for_proto_model(&proto).map_err(load_err)?;
    pin(&mut model, shapes)?;
    set_consts(&mut model, consts)?;
    // An uploaded model that makes tract's typing panic is refused with an
    // error, not a crash of `tern compile` (where panics unwind).
    let typed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model.into_typed().and_then(|m| m.into_decluttered())
    }))
    .map_err(|_| RuntimeError::Load("tract panicked typing the model".into()))?
    .map_err(load_err)?;
    crate::tract_backend::nnef().write_to_tar(&typed, Vec::new()).map_err(load_err)
}

/// The source as onnxruntime should run it on a device, with the compiled
/// artifact's signature: its outputs as [`compile_onnx`] makes them plain
/// tensors, each input in `consts` made an initializer holding
/// that value (no longer an input), each `If` known at compile time
/// replaced by the branch it takes (see [`compile_onnx`]), and each input
/// in `shapes` declared with that shape.
pub fn onnx_with_consts(
    bytes: &[u8],
    consts: &BTreeMap<String, Tensor>,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<Vec<u8>, RuntimeError> {
    use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
    use tract_onnx::pb::{TensorProto, TensorShapeProto, type_proto};
    let mut proto = parser().proto_model_for_read(&mut &*bytes).map_err(load_err)?;
    plain_outputs(&mut proto);
    resolve_ifs(&mut proto, shapes, consts);
    let graph = proto.graph.as_mut().ok_or_else(|| RuntimeError::Load("the model has no graph".into()))?;
    for (name, t) in consts {
        let before = graph.input.len();
        graph.input.retain(|i| i.name != *name);
        if graph.input.len() == before {
            return Err(RuntimeError::Load(format!("the model has no input {name:?}")));
        }
        let (data_type, raw_data) = raw(t);
        graph.initializer.retain(|i| i.name != *name);
        graph.initializer.push(TensorProto {
            dims: t.shape.iter().map(|d| *d as i64).collect(),
            data_type,
            raw_data,
            name: name.clone(),
            ..TensorProto::default()
        });
    }
    for (name, shape) in shapes {
        let input = graph
            .input
            .iter_mut()
            .find(|i| i.name == *name)
            .ok_or_else(|| RuntimeError::Load(format!("the model has no input {name:?}")))?;
        let Some(type_proto::Value::TensorType(t)) = input.r#type.as_mut().and_then(|t| t.value.as_mut()) else {
            return Err(RuntimeError::Load(format!("input {name:?} is not a tensor")));
        };
        let dim = shape
            .iter()
            .map(|d| Dimension { value: Some(dimension::Value::DimValue(*d as i64)), ..Dimension::default() })
            .collect();
        t.shape = Some(TensorShapeProto { dim });
    }
    Ok(prost::Message::encode_to_vec(&proto))
}

/// What [`compile_onnx`] rewrites in `bytes`' outputs, one line each:
/// every graph output that an ONNX-ML `ZipMap` makes of a probability
/// tensor (skl2onnx's classifiers by default: a sequence of one map from
/// class to probability per row) becomes that tensor, under the output's
/// name, a column per class in the order the line gives. Outputs that are
/// not tensors otherwise are left for tract to refuse.
pub fn plain_output_rewrites(bytes: &[u8]) -> Result<Vec<String>, RuntimeError> {
    let mut proto = parser().proto_model_for_read(&mut &*bytes).map_err(load_err)?;
    Ok(plain_outputs(&mut proto))
}

/// See [`plain_output_rewrites`]. A `ZipMap` whose map has another
/// consumer, or that has no class labels, is left as it is.
fn plain_outputs(proto: &mut tract_onnx::pb::ModelProto) -> Vec<String> {
    use tract_onnx::pb::{NodeProto, TypeProto, type_proto};
    let Some(graph) = proto.graph.as_mut() else { return vec![] };
    let mut said = vec![];
    for ix in 0..graph.output.len() {
        let name = graph.output[ix].name.clone();
        let zipmap = |n: &NodeProto| {
            n.op_type == "ZipMap" && n.domain == "ai.onnx.ml" && n.output.first() == Some(&name) && n.input.len() == 1
        };
        let Some(at) = graph.node.iter().position(zipmap) else { continue };
        if graph.node.iter().any(|n| n.input.contains(&name)) {
            continue;
        }
        let attr = |a: &str| graph.node[at].attribute.iter().find(|x| x.name == a);
        let labels: Vec<String> = match (attr("classlabels_int64s"), attr("classlabels_strings")) {
            (Some(a), _) if !a.ints.is_empty() => a.ints.iter().map(i64::to_string).collect(),
            (_, Some(a)) if !a.strings.is_empty() => {
                a.strings.iter().map(|s| format!("{:?}", String::from_utf8_lossy(s))).collect()
            }
            _ => continue,
        };
        let node = graph.node.remove(at);
        graph.node.insert(
            at,
            NodeProto {
                input: node.input.clone(),
                output: vec![name.clone()],
                name: format!("{name}.tensor"),
                op_type: "Identity".into(),
                ..NodeProto::default()
            },
        );
        graph.value_info.retain(|v| v.name != name);
        let tensor = type_proto::Tensor { elem_type: 1, shape: None };
        graph.output[ix].r#type =
            Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)), ..TypeProto::default() });
        said.push(format!(
            "output {name:?}: the ZipMap (one map from class to probability per row) is replaced by the f32 probability tensor it maps, one column per class; column i is class {}",
            labels.join(", ")
        ));
    }
    said
}

/// Decodes a serialized ONNX `TensorProto` (the `.pb` files of ONNX's
/// test data, or a reference input written with `onnx.numpy_helper`).
pub fn onnx_tensor(bytes: &[u8]) -> Result<Tensor, RuntimeError> {
    let proto: tract_onnx::pb::TensorProto = prost::Message::decode(bytes).map_err(load_err)?;
    // tract's loader reaches `unimplemented!` for raw string bytes; with
    // panic=abort that would end the process.
    if proto.data_type == tract_onnx::pb::tensor_proto::DataType::String as i32 && !proto.raw_data.is_empty() {
        return Err(RuntimeError::Load("a string TensorProto with raw_data".into()));
    }
    if proto.data_type == tract_onnx::pb::tensor_proto::DataType::Bfloat16 as i32 {
        return bf16_tensor(&proto);
    }
    let t = tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::FopenDataResolver, &proto, None)
        .map_err(load_err)?;
    from_tract(&t.into_tvalue()).map_err(|e| RuntimeError::Load(e.to_string()))
}

/// A bfloat16 `TensorProto`, which tract's loader does not know: two
/// bytes an element in `raw_data`, or each in the low half of an `int32_data`.
fn bf16_tensor(proto: &tract_onnx::pb::TensorProto) -> Result<Tensor, RuntimeError> {
    let shape = proto
        .dims
        .iter()
        .map(|d| usize::try_from(*d).map_err(|_| RuntimeError::Load(format!("dimension {d} in a TensorProto"))))
        .collect::<Result<Vec<usize>, _>>()?;
    let bits: Vec<u16> = if proto.raw_data.is_empty() {
        proto.int32_data.iter().map(|x| *x as u16).collect()
    } else if proto.raw_data.len().is_multiple_of(2) {
        proto.raw_data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
    } else {
        return Err(RuntimeError::Load(format!("{} raw bytes of bfloat16", proto.raw_data.len())));
    };
    let data = tern_proto::TensorData::BF16(bits.into_iter().map(tern_proto::bf16::from_bits).collect());
    Tensor::new(shape, data).map_err(RuntimeError::Load)
}

/// ONNX's element type code and little-endian bytes of `t`.
fn raw(t: &Tensor) -> (i32, Vec<u8>) {
    use tern_proto::TensorData as D;
    fn le<T: Copy, const N: usize>(v: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|x| f(*x)).collect()
    }
    match &t.data {
        D::F32(v) => (1, le(v, f32::to_le_bytes)),
        D::U8(v) => (2, v.clone()),
        D::I8(v) => (3, le(v, i8::to_le_bytes)),
        D::U16(v) => (4, le(v, u16::to_le_bytes)),
        D::I16(v) => (5, le(v, i16::to_le_bytes)),
        D::I32(v) => (6, le(v, i32::to_le_bytes)),
        D::I64(v) => (7, le(v, i64::to_le_bytes)),
        D::Bool(v) => (9, v.iter().map(|b| u8::from(*b)).collect()),
        D::F64(v) => (11, le(v, f64::to_le_bytes)),
        D::U32(v) => (12, le(v, u32::to_le_bytes)),
        D::U64(v) => (13, le(v, u64::to_le_bytes)),
        D::F16(v) => (10, le(v, tern_proto::f16::to_le_bytes)),
        D::BF16(v) => (16, le(v, tern_proto::bf16::to_le_bytes)),
    }
}

/// Rounds of [`resolve_ifs`]' analysis: each inlines the `If`s whose
/// condition the last one found, which may make nested ones known.
const IF_ROUNDS: usize = 16;
/// Top-level `If`s past which none is resolved (left to tract): finding a
/// condition looks through the graph, and real exports have a few.
const MAX_IFS: usize = 256;

/// Replaces each `If` whose condition is known before any input is given
/// by the branch it takes, in the protobuf, before tract types it: tract
/// types both branches of an `If`, and refuses one whose branches differ in
/// shape (a mode flag that switches the output, a squeeze only when an axis
/// is 1) even when the condition is known. A condition is known when it
/// follows from `consts` alone, or when tract's analysis of the model, with
/// `shapes` pinned and `consts` set, gives it a value. Returns how many were
/// folded; an `If` left is for tract to type or report.
fn resolve_ifs(
    proto: &mut tract_onnx::pb::ModelProto,
    shapes: &BTreeMap<String, Vec<usize>>,
    consts: &BTreeMap<String, Tensor>,
) -> usize {
    let Some(graph) = proto.graph.as_mut() else { return 0 };
    if graph.node.iter().filter(|n| n.op_type == "If").count() > MAX_IFS {
        return 0;
    }
    let mut folded = fold_ifs(graph, |g, cond| known_bool(g, consts, cond, 0));
    for _ in 0..IF_ROUNDS {
        let known = analysed_conditions(proto, shapes, consts);
        let Some(graph) = proto.graph.as_mut() else { break };
        let n = fold_ifs(graph, |_, cond| known.get(cond).copied());
        if n == 0 {
            break;
        }
        folded += n;
    }
    folded
}

/// The value tract's analysis gives each top-level `If`'s condition, by
/// the condition's tensor name, where it gives one. Nothing when the model
/// does not load (its error is reported when it is typed).
fn analysed_conditions(
    proto: &tract_onnx::pb::ModelProto,
    shapes: &BTreeMap<String, Vec<usize>>,
    consts: &BTreeMap<String, Tensor>,
) -> BTreeMap<String, bool> {
    let Some(graph) = proto.graph.as_ref() else { return BTreeMap::new() };
    let conds: std::collections::BTreeSet<&str> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "If" && n.domain.is_empty())
        .filter_map(|n| n.input.first().map(String::as_str))
        .collect();
    if conds.is_empty() {
        return BTreeMap::new();
    }
    let Ok(mut model) = parser().model_for_proto_model(proto) else { return BTreeMap::new() };
    if pin(&mut model, shapes).is_err() || set_consts(&mut model, consts).is_err() {
        return BTreeMap::new();
    }
    // Only with every input's shape known: with a dimension left symbolic,
    // tract could decide a condition on symbols the inputs share (two
    // inputs' lengths equal), which the artifacts would not enforce.
    let concrete = (0..model.inputs.len()).all(|ix| {
        model
            .input_fact(ix)
            .ok()
            .and_then(|f| f.shape.concretize())
            .is_some_and(|dims| dims.iter().all(|d| d.to_i64().is_ok()))
    });
    if !concrete {
        return BTreeMap::new();
    }
    // Obstinate: a node that fails to analyse (often the `If` itself) does
    // not stop the facts before it, the condition among them. A panic in
    // tract's analysis of an uploaded model leaves its `If`s to tract's
    // own typing, which reports them.
    let analysed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = model.analyse(true);
    }));
    if analysed.is_err() {
        return BTreeMap::new();
    }
    let mut known = BTreeMap::new();
    for node in model.nodes() {
        for (ix, output) in node.outputs.iter().enumerate() {
            let Some(label) = model.outlet_label(OutletId::new(node.id, ix)).filter(|l| conds.contains(l)) else {
                continue;
            };
            let value = output.fact.value.concretize().filter(|v| v.len() == 1);
            if let Some(b) = value.and_then(|v| v.cast_to::<bool>().ok().and_then(|b| truth(&b))) {
                known.insert(label.to_owned(), b);
            }
        }
    }
    known
}

fn truth(t: &tract_onnx::prelude::Tensor) -> Option<bool> {
    t.try_as_plain_ram().ok()?.as_slice::<bool>().ok()?.first().copied()
}

/// Makes each input in `consts` that constant, out of the inputs.
fn set_consts(model: &mut InferenceModel, consts: &BTreeMap<String, Tensor>) -> Result<(), RuntimeError> {
    for (name, value) in consts {
        let id = model.node_id_by_name(name).map_err(load_err)?;
        let t = to_tract(value.clone())?.into_arc_tensor();
        model.node_mut(id).op = Box::new(tract_onnx::tract_core::ops::konst::Const::new(t.clone()).map_err(load_err)?);
        model
            .set_outlet_fact(OutletId::new(id, 0), InferenceFact::from(TypedFact::try_from(t).map_err(load_err)?))
            .map_err(load_err)?;
        model.inputs.retain(|o| o.node != id);
    }
    Ok(())
}

/// Replaces each top-level `If` for whose condition (by name) `known`
/// gives a value by the branch it takes, the `If`s nested in a taken
/// branch included. A branch that defines a name (node, output or
/// initializer) the graph already has is left folded in its `If`: tract
/// keys initializers by name, and inlining it would shadow the outer one
/// for every consumer. Returns how many were folded.
fn fold_ifs(
    graph: &mut tract_onnx::pb::GraphProto,
    known: impl Fn(&tract_onnx::pb::GraphProto, &str) -> Option<bool>,
) -> usize {
    use tract_onnx::pb::NodeProto;
    let cond = |graph: &tract_onnx::pb::GraphProto, node: &NodeProto| {
        if node.op_type != "If" || !node.domain.is_empty() {
            return None;
        }
        known(graph, node.input.first()?)
    };
    let mut folded = 0;
    let mut at = 0;
    // Every name the graph defines, kept as branches are inlined (the
    // folded `If`'s own name stays: a harmless over-approximation).
    let mut outer: std::collections::BTreeSet<String> = graph
        .initializer
        .iter()
        .map(|t| t.name.clone())
        .chain(graph.input.iter().map(|i| i.name.clone()))
        .chain(graph.node.iter().flat_map(|n| n.output.iter().cloned().chain([n.name.clone()])))
        .filter(|n| !n.is_empty())
        .collect();
    // Each fold removes one `If` from the finite protobuf tree and the
    // nodes it inlines are looked at next: the loop ends.
    while at < graph.node.len() {
        let Some(taken) = cond(graph, &graph.node[at]) else {
            at += 1;
            continue;
        };
        let which = if taken { "then_branch" } else { "else_branch" };
        let node = &graph.node[at];
        let Some(branch) = node.attribute.iter().find(|a| a.name == which).and_then(|a| a.g.as_ref()) else {
            // Malformed: left for tract to report.
            at += 1;
            continue;
        };
        let defines: Vec<String> = branch
            .initializer
            .iter()
            .map(|t| t.name.clone())
            .chain(branch.node.iter().flat_map(|n| n.output.iter().cloned().chain([n.name.clone()])))
            .filter(|n| !n.is_empty())
            .collect();
        if defines.iter().any(|n| outer.contains(n)) {
            at += 1;
            continue;
        }
        outer.extend(defines);
        let branch = branch.clone();
        let node = graph.node.remove(at);
        let mut inlined = branch.node;
        for (out, from) in node.output.iter().zip(&branch.output) {
            inlined.push(NodeProto {
                input: vec![from.name.clone()],
                output: vec![out.clone()],
                name: format!("{}.{}", node.name, out),
                op_type: "Identity".into(),
                ..NodeProto::default()
            });
        }
        graph.initializer.extend(branch.initializer);
        graph.node.splice(at..at, inlined);
        folded += 1;
    }
    folded
}

/// The value of boolean `name` when it follows from `consts` alone: a
/// declared constant itself, or `Equal`, `Not` or `Identity` of such values
/// and the graph's constants (a sample rate compared with 16000).
fn known_bool(
    graph: &tract_onnx::pb::GraphProto,
    consts: &BTreeMap<String, Tensor>,
    name: &str,
    depth: usize,
) -> Option<bool> {
    if depth > 16 {
        return None;
    }
    if let Some(t) = consts.get(name) {
        return match &t.data {
            tern_proto::TensorData::Bool(v) if v.len() == 1 => Some(v[0]),
            _ => None,
        };
    }
    let node = graph.node.iter().find(|n| n.output.iter().any(|o| o == name))?;
    if !node.domain.is_empty() {
        return None;
    }
    match node.op_type.as_str() {
        "Identity" => known_bool(graph, consts, node.input.first()?, depth + 1),
        "Not" => known_bool(graph, consts, node.input.first()?, depth + 1).map(|b| !b),
        "Equal" => {
            let a = known_scalar(graph, consts, node.input.first()?)?;
            let b = known_scalar(graph, consts, node.input.get(1)?)?;
            Some(match (a, b) {
                // Integers as integers: past 2^53 two differ as f64 cannot.
                (Scalar::Int(a), Scalar::Int(b)) => a == b,
                (a, b) => a.as_f64() == b.as_f64(),
            })
        }
        _ => None,
    }
}

/// A one-element number.
#[derive(Clone, Copy)]
enum Scalar {
    Int(i64),
    Float(f64),
}

impl Scalar {
    fn as_f64(self) -> f64 {
        match self {
            Scalar::Int(i) => i as f64,
            Scalar::Float(x) => x,
        }
    }
}

/// A one-element number from `consts`, an initializer or a `Constant` node.
fn known_scalar(graph: &tract_onnx::pb::GraphProto, consts: &BTreeMap<String, Tensor>, name: &str) -> Option<Scalar> {
    use tern_proto::TensorData as D;
    if let Some(t) = consts.get(name) {
        let one = |n: usize| (n == 1).then_some(());
        return match &t.data {
            D::F32(v) => one(v.len()).map(|_| Scalar::Float(f64::from(v[0]))),
            D::F64(v) => one(v.len()).map(|_| Scalar::Float(v[0])),
            D::I32(v) => one(v.len()).map(|_| Scalar::Int(i64::from(v[0]))),
            D::I64(v) => one(v.len()).map(|_| Scalar::Int(v[0])),
            _ => None,
        };
    }
    if let Some(t) = graph.initializer.iter().find(|t| t.name == name) {
        return proto_scalar(t);
    }
    let node = graph.node.iter().find(|n| n.op_type == "Constant" && n.output.iter().any(|o| o == name))?;
    node.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref()).and_then(proto_scalar)
}

fn proto_scalar(t: &tract_onnx::pb::TensorProto) -> Option<Scalar> {
    if t.dims.iter().try_fold(1i64, |n, d| n.checked_mul(*d)) != Some(1) {
        return None;
    }
    let raw = |n: usize| t.raw_data.get(..n);
    match t.data_type {
        1 => t
            .float_data
            .first()
            .map(|x| f64::from(*x))
            .or_else(|| Some(f64::from(f32::from_le_bytes(raw(4)?.try_into().ok()?))))
            .map(Scalar::Float),
        6 => t
            .int32_data
            .first()
            .map(|x| i64::from(*x))
            .or_else(|| Some(i64::from(i32::from_le_bytes(raw(4)?.try_into().ok()?))))
            .map(Scalar::Int),
        7 => t
            .int64_data
            .first()
            .copied()
            .or_else(|| Some(i64::from_le_bytes(raw(8)?.try_into().ok()?)))
            .map(Scalar::Int),
        11 => t
            .double_data
            .first()
            .copied()
            .or_else(|| Some(f64::from_le_bytes(raw(8)?.try_into().ok()?)))
            .map(Scalar::Float),
        _ => None,
    }
}

fn pin(model: &mut InferenceModel, shapes: &BTreeMap<String, Vec<usize>>) -> Result<(), RuntimeError> {
    for (name, shape) in shapes {
        let ix = model
            .inputs
            .iter()
            .position(|o| model.node(o.node).name == *name)
            .ok_or_else(|| RuntimeError::Load(format!("the model has no input {name:?}")))?;
        let dt = model.input_fact(ix).map_err(load_err)?.datum_type.concretize();
        let dt = dt.ok_or_else(|| RuntimeError::Load(format!("input {name:?} has no element type")))?;
        model.set_input_fact(ix, InferenceFact::dt_shape(dt, shape.clone())).map_err(load_err)?;
    }
    Ok(())
}

/// A source ONNX model run by tract's inference-level interpreter: each
/// operator evaluated as the ONNX graph states it, with no typing passes,
/// decluttering or optimization. Compiled artifacts are checked against it.
pub struct ReferenceModel {
    plan: Arc<tract_onnx::tract_hir::infer::InferenceSimplePlan>,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
}

impl ReferenceModel {
    /// The source model with the inputs in `shapes` pinned (as the
    /// compiled one is), all its inputs still inputs.
    pub fn onnx(bytes: &[u8], shapes: &BTreeMap<String, Vec<usize>>) -> Result<Self, RuntimeError> {
        let onnx = parser();
        let mut proto = onnx.proto_model_for_read(&mut &*bytes).map_err(load_err)?;
        plain_outputs(&mut proto);
        let mut model = onnx.model_for_proto_model(&proto).map_err(load_err)?;
        pin(&mut model, shapes)?;
        let inputs = onnx_inputs(bytes)?;
        let outputs = model
            .output_outlets()
            .map_err(load_err)?
            .iter()
            .map(|o| {
                let name = model.outlet_label(*o).map(str::to_owned).unwrap_or_else(|| model.node(o.node).name.clone());
                let fact = model.outlet_fact(*o).map_err(load_err)?;
                let dtype = fact.datum_type.concretize().and_then(to_dtype).unwrap_or(tern_proto::DType::F32);
                Ok(TensorSpec { name, dtype, shape: vec![] })
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        let plan = model.into_runnable().map_err(load_err)?;
        Ok(Self { plan, inputs, outputs })
    }

    /// Runs the model on `inputs`, in the model's input order.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        let inputs = inputs.into_iter().map(to_tract).collect::<Result<TVec<_>, _>>()?;
        let outputs = self.plan.run(inputs).map_err(|e| RuntimeError::Run(format!("{e:#}")))?;
        outputs.iter().map(from_tract).collect()
    }

    /// The inputs as the model declares them.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// The outputs' names and element types (shapes are not inferred).
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }
}
