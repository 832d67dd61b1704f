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
                // Rounded to nearest, u close to 1 would become 1: kept below it.
                DType::F16 => TensorData::F16(
                    (0..n)
                        .map(|_| tern_proto::f16::from_f64(rng.unit()).min(tern_proto::f16::from_bits(0x3bff)))
                        .collect(),
                ),
                DType::BF16 => TensorData::BF16(
                    (0..n)
                        .map(|_| tern_proto::bf16::from_f64(rng.unit()).min(tern_proto::bf16::from_bits(0x3f7f)))
                        .collect(),
                ),
            };
            Tensor { shape, data }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_inputs_stay_below_one() {
        let spec = |dtype| TensorSpec { name: "x".into(), dtype, shape: vec![Some(1 << 16)] };
        let mut rng = SplitMix(3);
        for t in random_inputs(&[spec(DType::F16), spec(DType::BF16)], &mut rng) {
            let v = t.data.to_f64();
            assert!(v.iter().all(|x| (0.0..1.0).contains(x)), "{:?}", v.iter().copied().fold(0.0, f64::max));
        }
    }
}
