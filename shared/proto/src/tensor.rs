//! Dense tensors, and their binary encoding for the agent's local API.

use crate::DType;
use half::{bf16, f16};

/// A dense tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements; `data.len()` is the product of `shape`.
    pub data: TensorData,
}

/// The elements of a tensor, by type.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    Bool(Vec<bool>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl TensorData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::I16(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::U16(v) => v.len(),
            TensorData::U32(v) => v.len(),
            TensorData::U64(v) => v.len(),
            TensorData::Bool(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F64(_) => DType::F64,
            TensorData::I8(_) => DType::I8,
            TensorData::I16(_) => DType::I16,
            TensorData::I32(_) => DType::I32,
            TensorData::I64(_) => DType::I64,
            TensorData::U8(_) => DType::U8,
            TensorData::U16(_) => DType::U16,
            TensorData::U32(_) => DType::U32,
            TensorData::U64(_) => DType::U64,
            TensorData::Bool(_) => DType::Bool,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
        }
    }

    /// The elements as `f64`, for comparing and summarising. `i64` and
    /// `u64` beyond 2^53 lose their low bits; booleans are 0 and 1.
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            TensorData::F32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::F64(v) => v.clone(),
            TensorData::I8(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::I16(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::I32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::I64(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::U8(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::U16(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::U32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::U64(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::Bool(v) => v.iter().map(|x| f64::from(u8::from(*x))).collect(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
        }
    }

    /// Whether the element type is a floating-point one.
    pub fn is_float(&self) -> bool {
        matches!(self, TensorData::F32(_) | TensorData::F64(_) | TensorData::F16(_) | TensorData::BF16(_))
    }
}

impl Tensor {
    /// Builds a tensor, checking that the element count matches the shape.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self, String> {
        let want = shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d));
        match want {
            Some(n) if n == data.len() => Ok(Self { shape, data }),
            Some(n) => Err(format!("shape {shape:?} needs {n} elements, got {}", data.len())),
            None => Err(format!("shape {shape:?} is too large")),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
}

/// The media type of the binary tensor encoding.
pub const TENSORS_MEDIA_TYPE: &str = "application/x-tern-tensors";

const TENSORS_MAGIC: [u8; 2] = *b"TT";
const TENSORS_VERSION: u8 = 1;

fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F32 => 1,
        DType::F64 => 2,
        DType::I8 => 3,
        DType::I16 => 4,
        DType::I32 => 5,
        DType::I64 => 6,
        DType::U8 => 7,
        DType::U16 => 8,
        DType::U32 => 9,
        DType::U64 => 10,
        DType::Bool => 11,
        DType::F16 => 12,
        DType::BF16 => 13,
    }
}

fn dtype_of(code: u8) -> Option<(DType, usize)> {
    Some(match code {
        1 => (DType::F32, 4),
        2 => (DType::F64, 8),
        3 => (DType::I8, 1),
        4 => (DType::I16, 2),
        5 => (DType::I32, 4),
        6 => (DType::I64, 8),
        7 => (DType::U8, 1),
        8 => (DType::U16, 2),
        9 => (DType::U32, 4),
        10 => (DType::U64, 8),
        11 => (DType::Bool, 1),
        12 => (DType::F16, 2),
        13 => (DType::BF16, 2),
        _ => return None,
    })
}

macro_rules! le_bytes {
    ($out:expr, $v:expr) => {
        for x in $v {
            $out.extend_from_slice(&x.to_le_bytes());
        }
    };
}

macro_rules! from_le {
    ($bytes:expr, $t:ty) => {
        $bytes
            .chunks_exact(std::mem::size_of::<$t>())
            .map(|c| <$t>::from_le_bytes(c.try_into().expect("exact chunk")))
            .collect()
    };
}

/// Encodes tensors as `"TT" | version 1 | count u8`, then per tensor
/// `dtype u8 | rank u8 | rank × dim u32 LE | elements little-endian`.
/// Booleans are one byte, 0 or 1; `f16` and `bf16` their two bytes of bits.
pub fn encode_tensors(tensors: &[Tensor]) -> Result<Vec<u8>, String> {
    let count = u8::try_from(tensors.len()).map_err(|_| "at most 255 tensors".to_string())?;
    let mut out =
        Vec::with_capacity(4 + tensors.iter().map(|t| 2 + 4 * t.shape.len() + 8 * t.data.len()).sum::<usize>());
    out.extend_from_slice(&TENSORS_MAGIC);
    out.push(TENSORS_VERSION);
    out.push(count);
    for t in tensors {
        out.push(dtype_code(t.dtype()));
        out.push(u8::try_from(t.shape.len()).map_err(|_| "at most 255 dimensions".to_string())?);
        for d in &t.shape {
            out.extend_from_slice(&u32::try_from(*d).map_err(|_| format!("dimension {d} too large"))?.to_le_bytes());
        }
        match &t.data {
            TensorData::F32(v) => le_bytes!(out, v),
            TensorData::F64(v) => le_bytes!(out, v),
            TensorData::I8(v) => le_bytes!(out, v),
            TensorData::I16(v) => le_bytes!(out, v),
            TensorData::I32(v) => le_bytes!(out, v),
            TensorData::I64(v) => le_bytes!(out, v),
            TensorData::U8(v) => out.extend_from_slice(v),
            TensorData::U16(v) => le_bytes!(out, v),
            TensorData::U32(v) => le_bytes!(out, v),
            TensorData::U64(v) => le_bytes!(out, v),
            TensorData::Bool(v) => out.extend(v.iter().map(|b| u8::from(*b))),
            TensorData::F16(v) => le_bytes!(out, v),
            TensorData::BF16(v) => le_bytes!(out, v),
        }
    }
    Ok(out)
}

/// Decodes [`encode_tensors`]' format. Sizes are checked against the bytes
/// present before anything is allocated, so a short body claiming a huge
/// tensor costs nothing.
pub fn decode_tensors(bytes: &[u8]) -> Result<Vec<Tensor>, String> {
    let mut rest = bytes;
    let mut take = |n: usize, what: &str| -> Result<&[u8], String> {
        if rest.len() < n {
            return Err(format!("truncated: {what} needs {n} bytes, {} left", rest.len()));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let head = take(4, "header")?;
    if head[..2] != TENSORS_MAGIC {
        return Err(format!("not a tensor body (expected magic \"TT\", got {:02x?})", &head[..2]));
    }
    if head[2] != TENSORS_VERSION {
        return Err(format!("unsupported tensor encoding version {}", head[2]));
    }
    let count = head[3] as usize;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let h = take(2, "tensor header")?;
        let (dtype, size) = dtype_of(h[0]).ok_or_else(|| format!("tensor {i}: unknown element type code {}", h[0]))?;
        let rank = h[1] as usize;
        let dims = take(4 * rank, "dimensions")?;
        let shape: Vec<usize> =
            dims.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4")) as usize).collect();
        let numel = shape
            .iter()
            .try_fold(1usize, |a, d| a.checked_mul(*d))
            .ok_or_else(|| format!("tensor {i}: shape {shape:?} is too large"))?;
        let len = numel.checked_mul(size).ok_or_else(|| format!("tensor {i}: shape {shape:?} is too large"))?;
        let raw = take(len, "elements")?;
        let data = match dtype {
            DType::F32 => TensorData::F32(from_le!(raw, f32)),
            DType::F64 => TensorData::F64(from_le!(raw, f64)),
            DType::I8 => TensorData::I8(from_le!(raw, i8)),
            DType::I16 => TensorData::I16(from_le!(raw, i16)),
            DType::I32 => TensorData::I32(from_le!(raw, i32)),
            DType::I64 => TensorData::I64(from_le!(raw, i64)),
            DType::U8 => TensorData::U8(raw.to_vec()),
            DType::U16 => TensorData::U16(from_le!(raw, u16)),
            DType::U32 => TensorData::U32(from_le!(raw, u32)),
            DType::U64 => TensorData::U64(from_le!(raw, u64)),
            DType::Bool => TensorData::Bool(
                raw.iter()
                    .map(|b| match b {
                        0 => Ok(false),
                        1 => Ok(true),
                        other => Err(format!("tensor {i}: boolean byte {other} is neither 0 nor 1")),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            DType::F16 => TensorData::F16(from_le!(raw, f16)),
            DType::BF16 => TensorData::BF16(from_le!(raw, bf16)),
        };
        out.push(Tensor { shape, data });
    }
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes after {count} tensors", rest.len()));
    }
    Ok(out)
}
