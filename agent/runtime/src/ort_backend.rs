//! onnxruntime through `ort` (feature `onnxruntime`): the library is loaded
//! at run time from a path the caller gives (a device's own
//! `libonnxruntime.so`); nothing of it is linked or downloaded at build
//! time, and without it this backend is simply unavailable.

use crate::{Backend, RuntimeError, Tensor, TensorData};
use ort::session::Session;
use ort::value::{DynValue, TensorElementType, ValueType};
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use tern_proto::{DType, TensorSpec};

/// The loaded library's environment, once per process (onnxruntime allows
/// one), or why it could not be loaded.
static ENV: OnceLock<Result<Loaded, String>> = OnceLock::new();

struct Loaded {
    env: ort::environment::Environment,
    what: String,
    providers: Vec<Provider>,
}

/// An execution provider sessions ask for before the CPU one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    TensorRt,
    Cuda,
}

/// Loads `libonnxruntime` from `library` for this process, once; later
/// calls return the first outcome whatever they give. `providers` (from
/// the device profile: `tensorrt`, `cuda`) are asked for first by every
/// session; a library built without one falls back to the CPU. The answer
/// names the library and its build. A library older than the C API this
/// build needs (onnxruntime 1.22) is refused with its version.
pub fn init(library: &Path, providers: &[&str]) -> Result<String, RuntimeError> {
    let outcome = ENV.get_or_init(|| {
        let providers = providers
            .iter()
            .map(|p| match *p {
                "tensorrt" => Ok(Provider::TensorRt),
                "cuda" => Ok(Provider::Cuda),
                other => Err(format!("unknown execution provider {other:?} (known: tensorrt, cuda)")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let env = ort::init_from(library)
            .map_err(|e| format!("{e}"))?
            .with_name("tern")
            .build()
            .map_err(|e| format!("{e}"))?;
        Ok(Loaded { env, what: format!("{} ({})", library.display(), ort::info()), providers })
    });
    match outcome {
        Ok(l) => Ok(l.what.clone()),
        Err(e) => Err(RuntimeError::Load(format!("onnxruntime: {e}"))),
    }
}

/// Whether [`init`] loaded a library in this process.
pub fn loaded() -> bool {
    matches!(ENV.get(), Some(Ok(_)))
}

/// An ONNX model on onnxruntime's CPU execution provider.
pub struct OrtModel {
    session: Mutex<Session>,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
}

fn err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Load(format!("onnxruntime: {e}"))
}

fn run_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Run(format!("onnxruntime: {e}"))
}

fn spec(name: &str, ty: &ValueType) -> Result<TensorSpec, RuntimeError> {
    let ValueType::Tensor { ty, shape, .. } = ty else {
        return Err(err(format!("{name:?} is not a tensor ({ty}); only tensor inputs and outputs are served")));
    };
    let dtype = dtype(*ty).ok_or_else(|| err(format!("{name:?} has element type {ty}, which Tern does not carry")))?;
    let shape = shape.iter().map(|d| u64::try_from(*d).ok()).collect();
    Ok(TensorSpec { name: name.to_owned(), dtype, shape })
}

fn dtype(t: TensorElementType) -> Option<DType> {
    Some(match t {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float64 => DType::F64,
        TensorElementType::Int8 => DType::I8,
        TensorElementType::Int16 => DType::I16,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Uint8 => DType::U8,
        TensorElementType::Uint16 => DType::U16,
        TensorElementType::Uint32 => DType::U32,
        TensorElementType::Uint64 => DType::U64,
        TensorElementType::Bool => DType::Bool,
        TensorElementType::Float16 => DType::F16,
        TensorElementType::Bfloat16 => DType::BF16,
        _ => return None,
    })
}

impl OrtModel {
    /// Loads an ONNX model; [`init`] must have succeeded. `threads` is
    /// onnxruntime's intra-op thread count (0: its default).
    pub fn onnx(bytes: &[u8], threads: usize) -> Result<Self, RuntimeError> {
        let loaded = match ENV.get() {
            Some(Ok(l)) => l,
            Some(Err(e)) => return Err(err(e)),
            None => return Err(RuntimeError::Load("onnxruntime is not loaded in this process".into())),
        };
        let mut builder = Session::builder(&loaded.env).map_err(err)?;
        if !loaded.providers.is_empty() {
            let eps: Vec<ort::ep::ExecutionProviderDispatch> = loaded
                .providers
                .iter()
                .map(|p| match p {
                    Provider::TensorRt => ort::ep::TensorRT::default().build(),
                    Provider::Cuda => ort::ep::CUDA::default().build(),
                })
                .collect();
            builder = builder.with_execution_providers(eps).map_err(err)?;
        }
        if threads > 0 {
            builder = builder.with_intra_threads(threads).map_err(err)?;
        }
        let session = builder.commit_from_memory(bytes).map_err(err)?;
        let inputs = session.inputs().iter().map(|o| spec(o.name(), o.dtype())).collect::<Result<_, _>>()?;
        let outputs = session.outputs().iter().map(|o| spec(o.name(), o.dtype())).collect::<Result<_, _>>()?;
        Ok(Self { session: Mutex::new(session), inputs, outputs })
    }
}

fn value(t: Tensor) -> Result<DynValue, RuntimeError> {
    let shape: Vec<i64> = t.shape.iter().map(|d| *d as i64).collect();
    macro_rules! v {
        ($v:expr) => {
            ort::value::Tensor::from_array((shape, $v)).map(|t| t.into_dyn()).map_err(run_err)
        };
    }
    match t.data {
        TensorData::F32(v) => v!(v),
        TensorData::F64(v) => v!(v),
        TensorData::I8(v) => v!(v),
        TensorData::I16(v) => v!(v),
        TensorData::I32(v) => v!(v),
        TensorData::I64(v) => v!(v),
        TensorData::U8(v) => v!(v),
        TensorData::U16(v) => v!(v),
        TensorData::U32(v) => v!(v),
        TensorData::U64(v) => v!(v),
        TensorData::Bool(v) => v!(v),
        TensorData::F16(v) => v!(v),
        TensorData::BF16(v) => v!(v),
    }
}

fn tensor(name: &str, v: &DynValue) -> Result<Tensor, RuntimeError> {
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return Err(run_err(format!("output {name:?} is not a tensor")));
    };
    macro_rules! t {
        ($t:ty, $d:ident) => {{
            let (shape, data) = v.try_extract_tensor::<$t>().map_err(run_err)?;
            Tensor { shape: shape.iter().map(|d| *d as usize).collect(), data: TensorData::$d(data.to_vec()) }
        }};
    }
    Ok(match ty {
        TensorElementType::Float32 => t!(f32, F32),
        TensorElementType::Float64 => t!(f64, F64),
        TensorElementType::Int8 => t!(i8, I8),
        TensorElementType::Int16 => t!(i16, I16),
        TensorElementType::Int32 => t!(i32, I32),
        TensorElementType::Int64 => t!(i64, I64),
        TensorElementType::Uint8 => t!(u8, U8),
        TensorElementType::Uint16 => t!(u16, U16),
        TensorElementType::Uint32 => t!(u32, U32),
        TensorElementType::Uint64 => t!(u64, U64),
        TensorElementType::Bool => t!(bool, Bool),
        TensorElementType::Float16 => t!(tern_proto::f16, F16),
        TensorElementType::Bfloat16 => t!(tern_proto::bf16, BF16),
        other => return Err(run_err(format!("output {name:?} has element type {other}"))),
    })
}

impl Backend for OrtModel {
    fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        let named: Vec<(String, DynValue)> =
            self.inputs.iter().zip(inputs).map(|(s, t)| Ok((s.name.clone(), value(t)?))).collect::<Result<_, _>>()?;
        // A session runs one request at a time through `ort`'s API. A panic
        // in an earlier run leaves the session as onnxruntime left it.
        let mut session = self.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = session.run(named).map_err(run_err)?;
        self.outputs.iter().map(|o| tensor(&o.name, &out[o.name.as_str()])).collect()
    }
}
