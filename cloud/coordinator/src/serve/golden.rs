//! Golden vectors at registration: inputs (the user's reference set, or
//! seeded random inputs that fit the signature) run through the registry's
//! own load of the model. Agents check a candidate against them before it
//! serves.

use tern_proto::{GoldenCase, MAX_GOLDEN_CASES, Sha256Digest, Tensor};
use tern_runtime::{Backend, SplitMix, random_inputs, run_guarded};

/// Random cases made when the user gives no reference set.
pub const RANDOM_CASES: usize = 4;
/// Output tolerance when the user sets none, in millionths of `1 + |want|`:
/// room for another CPU's float rounding, far below a changed model.
pub const DEFAULT_TOLERANCE_PPM: u32 = 100;

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
    use tern_proto::{DType, TensorData, TensorSpec};

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
