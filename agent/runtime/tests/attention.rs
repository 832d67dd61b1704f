//! ONNX `Attention` (tract-onnx's `transformers` operators) loads, answers
//! as softmax(Q·Kᵀ/√d)·V, and runs on the calling thread: tract's flash
//! attention would otherwise start rayon's global pool. One test in its own
//! binary, so the thread count is this test's alone.

use tern_proto::ModelFormat;
use tern_runtime::{SplitMix, Tensor, TensorData, random_inputs};

const HEADS: usize = 4;
const SEQ: usize = 64;
const DIM: usize = 16;

#[cfg(target_os = "linux")]
fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line["Threads:".len()..].trim().parse().unwrap()
}

fn reference(q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; HEADS * SEQ * DIM];
    let scale = 1.0 / (DIM as f32).sqrt();
    for h in 0..HEADS {
        let at = |t: &[f32], s: usize, d: usize| t[(h * SEQ + s) * DIM + d];
        for i in 0..SEQ {
            let scores: Vec<f32> =
                (0..SEQ).map(|j| (0..DIM).map(|d| at(q, i, d) * at(k, j, d)).sum::<f32>() * scale).collect();
            let max = scores.iter().copied().fold(f32::MIN, f32::max);
            let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            for d in 0..DIM {
                out[(h * SEQ + i) * DIM + d] = (0..SEQ).map(|j| exp[j] / sum * at(v, j, d)).sum();
            }
        }
    }
    out
}

#[test]
#[cfg(target_os = "linux")]
fn attention_answers_right_on_the_calling_thread() {
    let bytes =
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/attention.onnx")).unwrap();
    let before = threads();
    let model = tern_runtime::load(ModelFormat::Onnx, bytes).unwrap();
    let inputs = random_inputs(model.inputs(), &mut SplitMix(7));
    let f = |t: &Tensor| match &t.data {
        TensorData::F32(v) => v.clone(),
        other => panic!("{other:?}"),
    };
    let want = reference(&f(&inputs[0]), &f(&inputs[1]), &f(&inputs[2]));
    for _ in 0..3 {
        let got = model.run(inputs.clone()).unwrap();
        assert_eq!(got[0].shape, [1, HEADS, SEQ, DIM]);
        for (g, w) in f(&got[0]).iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 + 1e-4 * w.abs(), "{g} vs {w}");
        }
    }
    assert_eq!(threads(), before, "running the model started threads");
}
