//! The tract ONNX backend against predictions that onnxruntime made for the
//! same model (fixtures/iris.expected.json, from scripts/make-fixtures.py).

use serde_json::Value;
use tern_proto::DType;
use tern_runtime::{Backend, RuntimeError, Tensor, TensorData, TractOnnx, check_inputs};

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

#[test]
fn iris_matches_onnxruntime() {
    let model = TractOnnx::load(&std::fs::read(fixture("iris.onnx")).unwrap()).unwrap();
    assert_eq!(model.inputs().len(), 1);
    assert_eq!(model.inputs()[0].dtype, DType::F32);
    assert_eq!(model.inputs()[0].shape, [None, Some(4)]);
    let names: Vec<_> = model.outputs().iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["label", "probabilities"]);

    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("iris.expected.json")).unwrap()).unwrap();
    let shape: Vec<usize> = serde_json::from_value(expected["input"]["shape"].clone()).unwrap();
    let data: Vec<f32> = serde_json::from_value(expected["input"]["data"].clone()).unwrap();
    let input = Tensor::new(shape, TensorData::F32(data)).unwrap();
    check_inputs(model.inputs(), std::slice::from_ref(&input)).unwrap();
    let out = model.run(vec![input]).unwrap();

    let want_labels: Vec<i64> = serde_json::from_value(expected["outputs"]["label"]["data"].clone()).unwrap();
    assert_eq!(out[0].data, TensorData::I64(want_labels));
    let want_probs: Vec<f32> = serde_json::from_value(expected["outputs"]["probabilities"]["data"].clone()).unwrap();
    let TensorData::F32(got) = &out[1].data else { panic!("probabilities are {:?}", out[1].dtype()) };
    assert_eq!(out[1].shape, [8, 3]);
    for (g, w) in got.iter().zip(&want_probs) {
        assert!((g - w).abs() < 1e-5, "{g} vs {w}");
    }
}

#[test]
fn unsupported_operator_is_a_load_error() {
    let err = TractOnnx::load(&std::fs::read(fixture("unsupported-scaler.onnx")).unwrap()).err().unwrap();
    assert!(matches!(&err, RuntimeError::Load(m) if m.contains("Scaler")), "{err}");
}

#[test]
fn garbage_is_a_load_error() {
    let err = TractOnnx::load(b"definitely not protobuf").err().unwrap();
    assert!(matches!(err, RuntimeError::Load(_)), "{err}");
}

#[test]
fn wrong_shape_and_dtype_name_the_signature() {
    let model = TractOnnx::load(&std::fs::read(fixture("iris.onnx")).unwrap()).unwrap();
    let bad = Tensor::new(vec![1, 3], TensorData::F32(vec![1.0; 3])).unwrap();
    let err = check_inputs(model.inputs(), &[bad]).unwrap_err();
    assert_eq!(err.to_string(), "input \"X\" expects X: f32[?,4], got f32[1, 3] (model signature: X: f32[?,4])");
    let bad = Tensor::new(vec![1, 4], TensorData::I64(vec![1; 4])).unwrap();
    assert!(check_inputs(model.inputs(), &[bad]).is_err());
    assert!(check_inputs(model.inputs(), &[]).unwrap_err().to_string().starts_with("expected 1 input(s)"));
}
