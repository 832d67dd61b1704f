//! Seeded inputs that fit a signature: golden vectors at registration and
//! the checks of a compiled artifact use the same stream.

use tern_proto::{DType, Tensor, TensorData, TensorSpec};

/// SplitMix64: small, seedable and stable across releases, which golden
/// vectors need (a registration must give the same inputs whoever runs it).
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Inputs that fit `specs` (dynamic dimensions 1): floats uniform in
/// [0, 1), integers 0 or 1 (valid as indices and flags), booleans random.
pub fn random_inputs(specs: &[TensorSpec], rng: &mut SplitMix) -> Vec<Tensor> {
    specs
        .iter()
        .map(|s| {
            let shape: Vec<usize> = s.shape.iter().map(|d| d.unwrap_or(1) as usize).collect();
            let n: usize = shape.iter().product();
            let bit = |rng: &mut SplitMix| rng.next_u64() & 1;
            let data = match s.dtype {
                DType::F32 => TensorData::F32((0..n).map(|_| rng.unit() as f32).collect()),
                DType::F64 => TensorData::F64((0..n).map(|_| rng.unit()).collect()),
                DType::I8 => TensorData::I8((0..n).map(|_| bit(rng) as i8).collect()),
                DType::I16 => TensorData::I16((0..n).map(|_| bit(rng) as i16).collect()),
                DType::I32 => TensorData::I32((0..n).map(|_| bit(rng) as i32).collect()),
                DType::I64 => TensorData::I64((0..n).map(|_| bit(rng) as i64).collect()),
                DType::U8 => TensorData::U8((0..n).map(|_| bit(rng) as u8).collect()),
                DType::U16 => TensorData::U16((0..n).map(|_| bit(rng) as u16).collect()),
                DType::U32 => TensorData::U32((0..n).map(|_| bit(rng) as u32).collect()),
                DType::U64 => TensorData::U64((0..n).map(|_| bit(rng)).collect()),
                DType::Bool => TensorData::Bool((0..n).map(|_| bit(rng) == 1).collect()),
                DType::F16 => TensorData::F16((0..n).map(|_| tern_proto::f16::from_f64(rng.unit())).collect()),
                DType::BF16 => TensorData::BF16((0..n).map(|_| tern_proto::bf16::from_f64(rng.unit())).collect()),
            };
            Tensor { shape, data }
        })
        .collect()
}
