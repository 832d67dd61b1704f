//! Golden vectors: inputs and the outputs the registry's own load of a
//! model gave for them, which an agent checks a candidate against before it
//! serves it.

use crate::tensor::{Tensor, TensorData, decode_tensors, encode_tensors};

const GOLDEN_MAGIC: [u8; 2] = *b"TG";
const GOLDEN_VERSION: u8 = 1;
/// Most cases one file may hold.
pub const MAX_GOLDEN_CASES: usize = 64;
/// Largest golden file: what a registration may make and an agent takes.
pub const MAX_GOLDEN_BYTES: u64 = 16 << 20;

/// One input set and the outputs it must give.
#[derive(Debug, Clone, PartialEq)]
pub struct GoldenCase {
    /// The model's inputs, in signature order.
    pub inputs: Vec<Tensor>,
    /// What the registry's load of the model answered.
    pub outputs: Vec<Tensor>,
}

/// Encodes cases as `"TG" | version 1 | cases u16 LE`, then per case
/// `len u32 LE | inputs | len u32 LE | outputs`, each in the binary tensor
/// encoding.
pub fn encode_golden(cases: &[GoldenCase]) -> Result<Vec<u8>, String> {
    if cases.len() > MAX_GOLDEN_CASES {
        return Err(format!("at most {MAX_GOLDEN_CASES} golden cases"));
    }

    let mut out = Vec::new();
    out.extend_from_slice(&GOLDEN_MAGIC);
    out.push(GOLDEN_VERSION);
    out.extend_from_slice(&(cases.len() as u16).to_le_bytes());
    for c in cases {
        for part in [&c.inputs, &c.outputs] {
            let bytes = encode_tensors(part)?;
            let len = u32::try_from(bytes.len()).map_err(|_| "a golden case over 4 GiB".to_string())?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&bytes);
            if out.len() as u64 > MAX_GOLDEN_BYTES {
                return Err(format!("golden vectors over {MAX_GOLDEN_BYTES} bytes"));
            }
        }
    }
    Ok(out)
}

/// Decodes [`encode_golden`]'s format; sizes are checked against the bytes
/// present before anything is allocated.
pub fn decode_golden(bytes: &[u8]) -> Result<Vec<GoldenCase>, String> {
    if bytes.len() as u64 > MAX_GOLDEN_BYTES {
        return Err(format!("golden file of {} bytes; at most {MAX_GOLDEN_BYTES}", bytes.len()));
    }
    let mut rest = bytes;
    let mut take = |n: usize, what: &str| -> Result<&[u8], String> {
        if rest.len() < n {
            return Err(format!("golden file truncated: {what} needs {n} bytes, {} left", rest.len()));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let head = take(5, "header")?;
    if head[..2] != GOLDEN_MAGIC {
        return Err(format!("not a golden file (expected magic \"TG\", got {:02x?})", &head[..2]));
    }
    if head[2] != GOLDEN_VERSION {
        return Err(format!("unsupported golden file version {}", head[2]));
    }
    let count = u16::from_le_bytes([head[3], head[4]]) as usize;
    if count > MAX_GOLDEN_CASES {
        return Err(format!("{count} golden cases; at most {MAX_GOLDEN_CASES}"));
    }
    let mut cases = Vec::with_capacity(count);
    for i in 0..count {
        let mut part = || -> Result<Vec<Tensor>, String> {
            let len = take(4, "length")?;
            let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
            decode_tensors(take(len, "tensors")?).map_err(|e| format!("golden case {i}: {e}"))
        };
        let inputs = part()?;
        let outputs = part()?;
        cases.push(GoldenCase { inputs, outputs });
    }
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes after {count} golden cases", rest.len()));
    }
    Ok(cases)
}

/// Two steps of f16 (10 mantissa bits) and of bf16 (7), relative.
const F16_FLOOR: f64 = 2.0 / 1024.0;
const BF16_FLOOR: f64 = 2.0 / 128.0;

/// How far `got` is from `want`, as `(|got − want|, |got − want| / (1 + |want|))`:
/// 0 where they are equal (the same infinity included) or both NaN, infinite
/// where anything else on either side is not finite.
pub fn element_error(want: f64, got: f64) -> (f64, f64) {
    if want == got || (want.is_nan() && got.is_nan()) {
        (0.0, 0.0)
    } else if !want.is_finite() || !got.is_finite() {
        (f64::INFINITY, f64::INFINITY)
    } else {
        let d = (got - want).abs();
        (d, d / (1.0 + want.abs()))
    }
}

/// Checks `got` against `want`: same count, shapes and types; finite floats
/// within `tolerance_ppm` millionths of `1 + |want|` (for `f16` and `bf16`
/// at least two steps of the type), infinities equal, NaN where NaN,
/// everything else exact. The
/// error names the first output and element that differ.
pub fn compare_outputs(got: &[Tensor], want: &[Tensor], tolerance_ppm: u32) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} outputs, golden has {}", got.len(), want.len()));
    }
    let tol = f64::from(tolerance_ppm) * 1e-6;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.shape != w.shape {
            return Err(format!("output {i}: shape {:?}, golden {:?}", g.shape, w.shape));
        }
        let first_far_within = |a: &mut dyn Iterator<Item = (f64, f64)>, tol: f64| {
            a.enumerate().find(|(_, (g, w))| element_error(*w, *g).1 > tol)
        };
        let first_far = |a: &mut dyn Iterator<Item = (f64, f64)>| first_far_within(a, tol);
        let far = match (&g.data, &w.data) {
            (TensorData::F32(a), TensorData::F32(b)) => {
                first_far(&mut a.iter().zip(b).map(|(x, y)| (f64::from(*x), f64::from(*y))))
            }
            (TensorData::F64(a), TensorData::F64(b)) => first_far(&mut a.iter().copied().zip(b.iter().copied())),
            // Never finer than two steps of the type: another backend or
            // CPU rounds a half-precision result a step differently.
            (TensorData::F16(a), TensorData::F16(b)) => {
                first_far_within(&mut a.iter().zip(b).map(|(x, y)| (x.to_f64(), y.to_f64())), tol.max(F16_FLOOR))
            }
            (TensorData::BF16(a), TensorData::BF16(b)) => {
                first_far_within(&mut a.iter().zip(b).map(|(x, y)| (x.to_f64(), y.to_f64())), tol.max(BF16_FLOOR))
            }
            (a, b) if a.dtype() != b.dtype() => {
                return Err(format!("output {i}: {}, golden {}", a.dtype(), b.dtype()));
            }
            (a, b) if a == b => None,
            _ => return Err(format!("output {i}: integer or boolean elements differ from the golden ones")),
        };
        if let Some((at, (g, w))) = far {
            return Err(format!("output {i}, element {at}: {g}, golden {w} (tolerance {tolerance_ppm} ppm)"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: Vec<f32>) -> Tensor {
        Tensor::new(vec![v.len()], TensorData::F32(v)).unwrap()
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let cases = vec![GoldenCase { inputs: vec![t(vec![1.0, 2.0])], outputs: vec![t(vec![0.5])] }];
        let bytes = encode_golden(&cases).unwrap();
        assert_eq!(decode_golden(&bytes).unwrap(), cases);
        assert!(decode_golden(&bytes[..bytes.len() - 1]).unwrap_err().contains("truncated"));
        let mut more = bytes.clone();
        more.push(0);
        assert!(decode_golden(&more).unwrap_err().contains("trailing"));
        let mut huge = bytes;
        huge[3] = 0xff;
        assert!(decode_golden(&huge).unwrap_err().contains("at most"));
    }

    #[test]
    fn compares_within_tolerance_only() {
        let want = [t(vec![1.0, -2.0])];
        assert!(compare_outputs(&[t(vec![1.00005, -2.0001])], &want, 100).is_ok());
        let e = compare_outputs(&[t(vec![1.0, -2.1])], &want, 100).unwrap_err();
        assert!(e.contains("element 1"), "{e}");
        assert!(compare_outputs(&[t(vec![1.0])], &want, 100).unwrap_err().contains("shape"));
        let ints = |v| Tensor::new(vec![1], TensorData::I64(vec![v])).unwrap();
        assert!(compare_outputs(&[ints(3)], &[ints(3)], 0).is_ok());
        assert!(compare_outputs(&[ints(3)], &[ints(4)], 1_000_000).is_err());
        assert!(compare_outputs(&[t(vec![f32::NAN])], &[t(vec![f32::NAN])], 0).is_ok());
        assert!(compare_outputs(&[t(vec![f32::INFINITY])], &[t(vec![f32::INFINITY])], 0).is_ok());
        assert!(compare_outputs(&[t(vec![f32::INFINITY])], &[t(vec![-f32::INFINITY])], 100).is_err());
        let h = |v: &[f32]| {
            Tensor::new(vec![v.len()], TensorData::F16(v.iter().map(|x| half::f16::from_f32(*x)).collect()))
        };
        let want = [h(&[1.0, f32::NAN]).unwrap()];
        assert!(compare_outputs(&[h(&[1.0, f32::NAN]).unwrap()], &want, 0).is_ok());
        // One or two steps off passes even at a tolerance finer than a step.
        assert!(compare_outputs(&[h(&[1.001, f32::NAN]).unwrap()], &want, 100).is_ok());
        assert!(compare_outputs(&[h(&[1.002, f32::NAN]).unwrap()], &want, 0).is_ok());
        assert!(compare_outputs(&[h(&[1.01, f32::NAN]).unwrap()], &want, 1000).unwrap_err().contains("element 0"));
        let b = Tensor::new(vec![1], TensorData::BF16(vec![half::bf16::from_f32(f32::NAN)])).unwrap();
        assert!(compare_outputs(std::slice::from_ref(&b), std::slice::from_ref(&b), 0).is_ok());
    }
}
