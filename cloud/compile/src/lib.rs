//! Compilation of a source model for a device target, as SageMaker Neo
//! did: the input shapes made concrete, inputs the user declares constant
//! folded in (a branch on them resolved, and any other branch a pinned
//! shape decides), map outputs made plain tensors, tract's declutter passes
//! run, the result written as NNEF, then run beside the source on seeded inputs and
//! refused if its outputs differ beyond a tolerance.

pub mod profiles;

pub use profiles::Profile;

use std::collections::BTreeMap;
use tern_proto::{DType, Tensor, TensorData, TensorSpec};
use tern_runtime::{Backend, ReferenceModel, SplitMix, TractModel, random_inputs};

/// Output tolerance when the user sets none: `|compiled − source|` at most
/// this times `1 + |source|`, as for golden vectors (100 ppm).
pub const DEFAULT_TOLERANCE: f64 = 1e-4;
/// Seeded input sets compared when the user sets none.
pub const DEFAULT_CASES: usize = 4;

/// What to compile for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Input name → shape; replaces the shape the model declares.
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// Input name → value (comma-separated, in the input's element type):
    /// the input becomes that constant and leaves the signature.
    pub consts: BTreeMap<String, String>,
    /// See [`DEFAULT_TOLERANCE`].
    pub tolerance: f64,
    /// Seeded input sets to compare on.
    pub cases: usize,
    /// Seed of those inputs.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            shapes: BTreeMap::new(),
            consts: BTreeMap::new(),
            tolerance: DEFAULT_TOLERANCE,
            cases: DEFAULT_CASES,
            seed: 0,
        }
    }
}

/// How far one compiled output is from the source's, over all cases.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputError {
    /// The output's name in the source model.
    pub name: String,
    /// Largest `|compiled − source|`.
    pub max_abs: f64,
    /// Largest `|compiled − source| / (1 + |source|)`, what the tolerance
    /// bounds.
    pub max_scaled: f64,
}

/// A compiled artifact and what was measured on the way.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The tract NNEF archive (tar).
    pub nnef: Vec<u8>,
    /// The source's size in bytes.
    pub source_bytes: usize,
    /// The compiled artifact's input signature.
    pub inputs: Vec<TensorSpec>,
    /// Error per output against the source.
    pub errors: Vec<OutputError>,
    /// The declared constants, parsed: the source's inputs they replace.
    pub consts: BTreeMap<String, Tensor>,
    /// Outputs made plain tensors, one line each
    /// ([`tern_runtime::plain_output_rewrites`]).
    pub rewrites: Vec<String>,
}

/// Why a model did not compile. Each is found before the artifact is
/// kept; nothing is written on error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompileError {
    /// No built-in device profile has that name.
    #[error("no device profile {name:?} (built in: {known})")]
    UnknownProfile {
        /// The name given.
        name: String,
        /// The profiles there are.
        known: String,
    },
    /// The source is not an ONNX model tract can parse.
    #[error("cannot read the source model: {0}")]
    Source(String),
    /// A shape or const names an input the model does not have.
    #[error("the model has no input {name:?} (its inputs: {inputs})")]
    NoSuchInput {
        /// The name given.
        name: String,
        /// The model's inputs with their signatures.
        inputs: String,
    },
    /// A shape that does not fit the input's rank or fixed dimensions.
    #[error("shape {given:?} does not fit input {spec}")]
    Shape {
        /// The shape given.
        given: Vec<usize>,
        /// The input as the model declares it.
        spec: String,
    },
    /// A const whose value does not parse as the input's element type or
    /// does not fill its shape.
    #[error("const {name}={value:?}: {why}")]
    Const {
        /// The input.
        name: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// tract cannot make the model concrete: the message names the node
    /// and operator that block it.
    #[error("cannot compile: {0}")]
    Blocked(String),
    /// A tolerance that is not a number in (0, 1].
    #[error("tolerance {0:e}: give a number above 0 and at most 1")]
    Tolerance(f64),
    /// The source could not be run to check the compiled artifact against.
    #[error("cannot run the source model to check against: {0}")]
    Reference(String),
    /// A compiled output differs from the source's beyond the tolerance.
    #[error(
        "output {output:?} differs from the source's by {max_scaled:.3e} of 1+|source| (max abs {max_abs:.3e}), above the tolerance {tolerance:e}"
    )]
    Mismatch {
        /// The output.
        output: String,
        /// See [`OutputError::max_abs`].
        max_abs: f64,
        /// See [`OutputError::max_scaled`].
        max_scaled: f64,
        /// The tolerance in force.
        tolerance: f64,
    },
}

/// Most elements one pinned input may have (a quarter GiB of f32): shapes
/// are the user's, and the source and the artifact are run on them.
pub const MAX_INPUT_ELEMENTS: usize = 1 << 26;

/// Checks `opts` against the source's inputs: every shape and const names
/// one, shapes fit its rank and fixed dimensions and stay under
/// [`MAX_INPUT_ELEMENTS`], consts parse. Returns the declared inputs and
/// the parsed consts.
pub fn prepare(source: &[u8], opts: &Options) -> Result<(Vec<TensorSpec>, BTreeMap<String, Tensor>), CompileError> {
    let declared = tern_runtime::onnx_inputs(source).map_err(|e| CompileError::Source(e.to_string()))?;
    let listing = || declared.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ");
    let find = |name: &str| {
        declared
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| CompileError::NoSuchInput { name: name.to_owned(), inputs: listing() })
    };
    for (name, shape) in &opts.shapes {
        let spec = find(name)?;
        let fits = spec.shape.len() == shape.len()
            && spec.shape.iter().zip(shape).all(|(d, g)| d.is_none_or(|d| d == *g as u64));
        let elements = shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
        if !fits || elements.is_none_or(|n| n > MAX_INPUT_ELEMENTS) {
            return Err(CompileError::Shape { given: shape.clone(), spec: spec.to_string() });
        }
    }
    let mut consts = BTreeMap::new();
    for (name, value) in &opts.consts {
        let spec = find(name)?;
        let shape = opts.shapes.get(name).cloned();
        consts.insert(name.clone(), parse_const(spec, shape, value)?);
    }
    if !(opts.tolerance.is_finite() && opts.tolerance > 0.0 && opts.tolerance <= 1.0) {
        return Err(CompileError::Tolerance(opts.tolerance));
    }
    Ok((declared, consts))
}

/// Compiles an ONNX source with `opts`; see the crate's description.
pub fn compile(source: &[u8], opts: &Options) -> Result<Compiled, CompileError> {
    let (declared, consts) = prepare(source, opts)?;
    let nnef =
        tern_runtime::compile_onnx(source, &opts.shapes, &consts).map_err(|e| CompileError::Blocked(e.to_string()))?;
    let (inputs, errors) = check_prepared(source, &nnef, opts, &declared, &consts)?;
    let rewrites = tern_runtime::plain_output_rewrites(source).map_err(|e| CompileError::Source(e.to_string()))?;
    Ok(Compiled { nnef, source_bytes: source.len(), inputs, errors, consts, rewrites })
}

/// Runs a compiled artifact beside its source on `opts`' seeded inputs and
/// returns its error per output; refused above `opts.tolerance`. What the
/// registry does with an artifact `tern compile` hands it.
pub fn check(source: &[u8], nnef: &[u8], opts: &Options) -> Result<Vec<OutputError>, CompileError> {
    let (declared, consts) = prepare(source, opts)?;
    check_prepared(source, nnef, opts, &declared, &consts).map(|(_, e)| e)
}

fn check_prepared(
    source: &[u8],
    nnef: &[u8],
    opts: &Options,
    declared: &[TensorSpec],
    consts: &BTreeMap<String, Tensor>,
) -> Result<(Vec<TensorSpec>, Vec<OutputError>), CompileError> {
    let compiled = TractModel::nnef(nnef).map_err(|e| CompileError::Blocked(e.to_string()))?;
    let reference = ReferenceModel::onnx(source, &opts.shapes).map_err(|e| CompileError::Reference(e.to_string()))?;
    let mut errors: Vec<OutputError> = reference
        .outputs()
        .iter()
        .map(|o| OutputError { name: o.name.clone(), max_abs: 0.0, max_scaled: 0.0 })
        .collect();
    let mut rng = SplitMix(opts.seed);
    for case in 0..opts.cases {
        let inputs = random_inputs(compiled.inputs(), &mut rng);
        let mut free = inputs.iter().cloned();
        let full: Vec<Tensor> = declared
            .iter()
            .map(|s| consts.get(&s.name).cloned().or_else(|| free.next()))
            .collect::<Option<_>>()
            .ok_or_else(|| CompileError::Blocked("the compiled model has fewer inputs than the source".into()))?;
        let want = reference.run(full).map_err(|e| CompileError::Reference(format!("case {case}: {e}")))?;
        let got = tern_runtime::run_guarded(&compiled, inputs)
            .map_err(|e| CompileError::Blocked(format!("the compiled model fails on case {case}: {e}")))?;
        if want.len() != got.len() {
            return Err(CompileError::Blocked(format!(
                "the compiled model has {} outputs, the source {}",
                got.len(),
                want.len()
            )));
        }
        for ((w, g), err) in want.iter().zip(&got).zip(&mut errors) {
            let (abs, scaled) = distance(w, g).ok_or_else(|| CompileError::Mismatch {
                output: err.name.clone(),
                max_abs: f64::INFINITY,
                max_scaled: f64::INFINITY,
                tolerance: opts.tolerance,
            })?;
            err.max_abs = err.max_abs.max(abs);
            err.max_scaled = err.max_scaled.max(scaled);
        }
    }
    if let Some(e) = errors.iter().find(|e| e.max_scaled > opts.tolerance) {
        return Err(CompileError::Mismatch {
            output: e.name.clone(),
            max_abs: e.max_abs,
            max_scaled: e.max_scaled,
            tolerance: opts.tolerance,
        });
    }
    Ok((compiled.inputs().to_vec(), errors))
}

/// Whether compiling makes a source loadable that the agent's loader
/// refuses as it is: compiled with `shapes`, then, if that fails and some
/// input still has open dimensions, with each of those pinned to 1; with
/// `consts` declared constant (an `If` on one resolved) either way. On
/// success, the source's signature (inputs, outputs; the constants still
/// among the inputs, as the source declares them).
pub fn probe(
    source: &[u8],
    shapes: &BTreeMap<String, Vec<usize>>,
    consts: &BTreeMap<String, String>,
) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>), CompileError> {
    let declared = tern_runtime::onnx_inputs(source).map_err(|e| CompileError::Source(e.to_string()))?;
    let once = |shapes: &BTreeMap<String, Vec<usize>>| {
        compile(source, &Options { shapes: shapes.clone(), consts: consts.clone(), cases: 1, ..Options::default() })
    };
    if let Some(e) = once(shapes).err() {
        let mut pinned = shapes.clone();
        for spec in declared.iter().filter(|s| !shapes.contains_key(&s.name) && s.shape.iter().any(Option::is_none)) {
            pinned.insert(spec.name.clone(), spec.shape.iter().map(|d| d.map_or(1, |d| d as usize)).collect());
        }
        if pinned == *shapes {
            return Err(e);
        }
        once(&pinned).map_err(|_| e)?;
    }
    let reference =
        ReferenceModel::onnx(source, &BTreeMap::new()).map_err(|e| CompileError::Reference(e.to_string()))?;
    Ok((declared, reference.outputs().to_vec()))
}

/// `(max abs, max scaled)` error of `got` against `want`; `None` when
/// their element types or shapes differ.
fn distance(want: &Tensor, got: &Tensor) -> Option<(f64, f64)> {
    if want.shape != got.shape || want.dtype() != got.dtype() {
        return None;
    }
    let (w, g) = (want.data.to_f64(), got.data.to_f64());
    // Never NaN, which `max` would pass over: the golden check's rule.
    Some(w.iter().zip(&g).fold((0.0f64, 0.0f64), |(a, s), (w, g)| {
        let (d, scaled) = tern_proto::element_error(*w, *g);
        (a.max(d), s.max(scaled))
    }))
}

/// Parses a const for `spec`. Its shape: `shape` if given, else the
/// declared one when fully known, else all ones when one value is given.
fn parse_const(spec: &TensorSpec, shape: Option<Vec<usize>>, value: &str) -> Result<Tensor, CompileError> {
    let err = |why: String| CompileError::Const { name: spec.name.clone(), value: value.to_owned(), why };
    let parts: Vec<&str> = value.split(',').map(str::trim).collect();
    let shape = match shape {
        Some(s) => s,
        None => match spec.shape.iter().map(|d| d.map(|d| d as usize)).collect::<Option<Vec<_>>>() {
            Some(s) => s,
            None if parts.len() == 1 => vec![1; spec.shape.len()],
            None => return Err(err(format!("input {spec} has open dimensions: give its shape with --input-shape"))),
        },
    };
    let n = shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d)).filter(|n| *n <= MAX_INPUT_ELEMENTS);
    let Some(n) = n else {
        return Err(err(format!("shape {shape:?} has more than {MAX_INPUT_ELEMENTS} elements")));
    };
    if n != parts.len() {
        return Err(err(format!("{} values for shape {shape:?} ({n} needed)", parts.len())));
    }
    fn all<T: std::str::FromStr>(parts: &[&str]) -> Option<Vec<T>> {
        parts.iter().map(|p| p.parse().ok()).collect()
    }
    let bad = || err(format!("not a list of {} values", spec.dtype));
    let data = match spec.dtype {
        DType::F32 => TensorData::F32(all(&parts).ok_or_else(bad)?),
        DType::F64 => TensorData::F64(all(&parts).ok_or_else(bad)?),
        DType::I8 => TensorData::I8(all(&parts).ok_or_else(bad)?),
        DType::I16 => TensorData::I16(all(&parts).ok_or_else(bad)?),
        DType::I32 => TensorData::I32(all(&parts).ok_or_else(bad)?),
        DType::I64 => TensorData::I64(all(&parts).ok_or_else(bad)?),
        DType::U8 => TensorData::U8(all(&parts).ok_or_else(bad)?),
        DType::U16 => TensorData::U16(all(&parts).ok_or_else(bad)?),
        DType::U32 => TensorData::U32(all(&parts).ok_or_else(bad)?),
        DType::U64 => TensorData::U64(all(&parts).ok_or_else(bad)?),
        DType::F16 => TensorData::F16(all(&parts).ok_or_else(bad)?),
        DType::BF16 => TensorData::BF16(all(&parts).ok_or_else(bad)?),
        DType::Bool => TensorData::Bool(
            parts
                .iter()
                .map(|p| match *p {
                    "true" | "1" => Some(true),
                    "false" | "0" => Some(false),
                    _ => None,
                })
                .collect::<Option<_>>()
                .ok_or_else(bad)?,
        ),
    };
    Ok(Tensor { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::TensorData;

    fn t(v: Vec<f32>) -> Tensor {
        Tensor::new(vec![v.len()], TensorData::F32(v)).unwrap()
    }

    #[test]
    fn a_value_that_is_not_finite_on_one_side_is_the_worst_error() {
        let inf = f32::INFINITY;
        assert_eq!(distance(&t(vec![inf, -inf, f32::NAN, 1.0]), &t(vec![inf, -inf, f32::NAN, 1.0])), Some((0.0, 0.0)));
        for (w, g) in [(inf, 1.0), (1.0, inf), (-inf, inf), (f32::NAN, 1.0), (1.0, f32::NAN), (inf, f32::NAN)] {
            assert_eq!(
                distance(&t(vec![0.5, w]), &t(vec![0.5, g])),
                Some((f64::INFINITY, f64::INFINITY)),
                "{w} vs {g}"
            );
        }
        let (abs, scaled) = distance(&t(vec![3.0]), &t(vec![3.5])).unwrap();
        assert_eq!((abs, scaled), (0.5, 0.125));
    }
}
