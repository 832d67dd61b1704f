//! Golden vectors at registration: inputs (the user's reference set, or
//! seeded random inputs that fit the signature) run through the registry's
//! own load of the model. Agents check a candidate against them before it
//! serves.

use tern_proto::{DType, GoldenCase, MAX_GOLDEN_CASES, Sha256Digest, Tensor, TensorData, TensorSpec};
use tern_runtime::{Backend, run_guarded};

/// Random cases made when the user gives no reference set.
pub const RANDOM_CASES: usize = 4;
/// Output tolerance when the user sets none, in millionths of `1 + |want|`:
/// room for another CPU's float rounding, far below a changed model.
pub const DEFAULT_TOLERANCE_PPM: u32 = 100;

/// SplitMix64: small, seedable and stable across releases, which golden
/// vectors need (a registration must give the same inputs whoever runs it).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Inputs that fit `specs` (dynamic dimensions 1): floats uniform in
/// [0, 1), integers 0 or 1 (valid as indices and flags), booleans random.
fn random_inputs(specs: &[TensorSpec], rng: &mut SplitMix) -> Vec<Tensor> {
    specs
        .iter()
        .map(|s| {
            let shape: Vec<usize> = s.shape.iter().map(|d| d.unwrap_or(1) as usize).collect();
            let n: usize = shape.iter().product();
            let bit = |rng: &mut SplitMix| rng.next() & 1;
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
            };
            Tensor { shape, data }
        })
        .collect()
}

/// The golden cases of a model: each reference input set (checked against
/// the signature), or [`RANDOM_CASES`] seeded from the artifact's digest,
/// with the model's outputs for them.
pub fn compute(
    model: &dyn Backend,
    sha: &Sha256Digest,
    references: Vec<Vec<Tensor>>,
) -> Result<Vec<GoldenCase>, String> {
    if references.len() > MAX_GOLDEN_CASES {
        return Err(format!("at most {MAX_GOLDEN_CASES} reference input sets"));
    }
    let inputs = if references.is_empty() {
        let seed = u64::from_le_bytes(sha.0[..8].try_into().expect("8 bytes"));
        let mut rng = SplitMix(seed);
        (0..RANDOM_CASES).map(|_| random_inputs(model.inputs(), &mut rng)).collect()
    } else {
        for (i, r) in references.iter().enumerate() {
            tern_runtime::check_inputs(model.inputs(), r).map_err(|e| format!("reference set {i}: {e}"))?;
        }
        references
    };
    inputs
        .into_iter()
        .enumerate()
        .map(|(i, inputs)| {
            let outputs = run_guarded(model, inputs.clone()).map_err(|e| format!("case {i}: {e}"))?;
            Ok(GoldenCase { inputs, outputs })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_inputs_are_seeded_and_fit_the_signature() {
        let specs = vec![
            TensorSpec { name: "x".into(), dtype: DType::F32, shape: vec![None, Some(3)] },
            TensorSpec { name: "ids".into(), dtype: DType::I64, shape: vec![Some(2)] },
        ];
        let a = random_inputs(&specs, &mut SplitMix(7));
        assert_eq!(a, random_inputs(&specs, &mut SplitMix(7)));
        assert_ne!(a, random_inputs(&specs, &mut SplitMix(8)));
        assert_eq!((a[0].shape.clone(), a[1].shape.clone()), (vec![1, 3], vec![2]));
        let TensorData::F32(v) = &a[0].data else { panic!() };
        assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
    }
}
