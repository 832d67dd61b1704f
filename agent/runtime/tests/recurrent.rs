//! Models whose operators keep a state within one run (GRU, LSTM, Scan) must
//! start every run from the model's initial state: run 100 times on one
//! input, each answer is the same and equals onnxruntime's
//! (fixtures/recurrent.expected.json, from scripts/make-fixtures.py). The
//! compiled NNEF form of each is held to the same.

use serde_json::Value;
use tern_proto::ModelFormat;
use tern_runtime::{Backend, Tensor, TensorData, onnx_to_nnef};

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("recurrent.expected.json")).unwrap()).unwrap()
}

fn input(e: &Value) -> Tensor {
    let shape: Vec<usize> = serde_json::from_value(e["input"]["shape"].clone()).unwrap();
    let data: Vec<f32> = serde_json::from_value(e["input"]["data"].clone()).unwrap();
    Tensor::new(shape, TensorData::F32(data)).unwrap()
}

fn check_runs(name: &str, model: &dyn Backend) {
    let e = expected();
    let want = &e["models"][name];
    let first = model.run(vec![input(&e)]).unwrap();
    for (spec, out) in model.outputs().iter().zip(&first) {
        let w = &want[spec.name.as_str()];
        assert_eq!(out.shape, serde_json::from_value::<Vec<usize>>(w["shape"].clone()).unwrap(), "{name} {spec}");
        let w: Vec<f32> = serde_json::from_value(w["data"].clone()).unwrap();
        let TensorData::F32(got) = &out.data else { panic!("{name}: {} is {:?}", spec.name, out.dtype()) };
        for (g, w) in got.iter().zip(&w) {
            assert!((g - w).abs() < 1e-4, "{name} {}: {g} vs onnxruntime's {w}", spec.name);
        }
    }
    for run in 2..=100 {
        let again = model.run(vec![input(&e)]).unwrap();
        assert_eq!(again, first, "{name}: run {run} differs from run 1");
    }
}

#[test]
fn recurrent_models_start_every_run_from_their_initial_state() {
    for name in ["gru.onnx", "lstm.onnx", "scan.onnx"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let onnx = tern_runtime::load(ModelFormat::Onnx, bytes.clone()).unwrap();
        check_runs(name, onnx.as_ref());
        let nnef = tern_runtime::load(ModelFormat::Nnef, onnx_to_nnef(&bytes, None).unwrap()).unwrap();
        check_runs(name, nnef.as_ref());
    }
}
