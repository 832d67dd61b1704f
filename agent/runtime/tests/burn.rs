//! The burn backend through the `Backend` trait: signature, outputs
//! against onnxruntime on the same networks, and refusals.

use serde_json::Value;
use tern_proto::{DType, ModelFormat};
use tern_runtime::{RuntimeError, Tensor, TensorData, check_inputs};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/../../fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).expect(name)
}

fn artifact(weights: &str) -> Vec<u8> {
    let w: tern_models::Weights = serde_json::from_str(&fixture(weights)).unwrap();
    w.into_artifact(&tern_models::cpu_device()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn autoencoder_serves_through_the_backend_trait() {
    let bytes = artifact("iris-autoencoder.weights.json");
    assert_eq!(tern_runtime::sniff_format(&bytes), ModelFormat::Burn);
    let model = tern_runtime::load(ModelFormat::Burn, bytes.clone()).unwrap();
    assert_eq!(model.inputs().len(), 1);
    assert_eq!(model.inputs()[0].to_string(), "input: f32[?,4]");
    let names: Vec<_> = model.outputs().iter().map(|o| o.to_string()).collect();
    assert_eq!(names, ["reconstruction: f32[?,4]", "score: f32[?]"]);

    let e: Value = serde_json::from_str(&fixture("builtin.expected.json")).unwrap();
    let input = Tensor { shape: vec![8, 4], data: TensorData::F32(floats(&e["input"]["data"])) };
    check_inputs(model.inputs(), std::slice::from_ref(&input)).unwrap();
    let out = model.run(vec![input]).unwrap();
    let TensorData::F32(score) = &out[1].data else { panic!("score is {:?}", out[1].dtype()) };
    assert_eq!(out[1].shape, [8]);
    for (got, want) in score.iter().zip(floats(&e["autoencoder"]["score"])) {
        assert!((got - want).abs() < 1e-4, "{got} vs onnxruntime {want}");
    }
}

#[test]
fn wrong_inputs_are_refused_before_the_model_runs() {
    let model = tern_runtime::load(ModelFormat::Burn, artifact("iris-mlp.weights.json")).unwrap();
    let narrow = Tensor { shape: vec![1, 3], data: TensorData::F32(vec![1.0; 3]) };
    let err = check_inputs(model.inputs(), &[narrow]).unwrap_err();
    assert_eq!(
        err,
        RuntimeError::Signature(
            "input \"input\" expects input: f32[?,4], got f32[1, 3] (model signature: input: f32[?,4])".into()
        )
    );
    let ints = Tensor { shape: vec![1, 4], data: TensorData::I64(vec![1; 4]) };
    assert!(check_inputs(model.inputs(), &[ints]).is_err());
    assert_eq!(model.outputs()[0].dtype, DType::F32);
}

#[test]
fn a_corrupt_artifact_is_a_load_error() {
    let bytes = artifact("iris-mlp.weights.json");
    let err = tern_runtime::load(ModelFormat::Burn, bytes[..bytes.len() - 10].to_vec()).err().unwrap();
    assert!(matches!(err, RuntimeError::Load(ref m) if m.contains("bad weights")), "{err}");
}
