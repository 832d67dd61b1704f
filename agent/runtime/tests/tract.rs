//! The tract ONNX backend against predictions that onnxruntime made for the
//! same model (fixtures/iris.expected.json, from scripts/make-fixtures.py).

use serde_json::Value;
use tern_proto::DType;
use tern_runtime::{Backend, RuntimeError, Tensor, TensorData, TractModel, check_inputs};

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

#[test]
fn iris_matches_onnxruntime() {
    let model = TractModel::onnx(&std::fs::read(fixture("iris.onnx")).unwrap()).unwrap();
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
    let err = TractModel::onnx(&std::fs::read(fixture("unsupported-scaler.onnx")).unwrap()).err().unwrap();
    assert!(matches!(&err, RuntimeError::Load(m) if m.contains("Scaler")), "{err}");
}

#[test]
fn garbage_is_a_load_error() {
    let err = TractModel::onnx(b"definitely not protobuf").err().unwrap();
    assert!(matches!(err, RuntimeError::Load(_)), "{err}");
}

#[test]
fn wrong_shape_and_dtype_name_the_signature() {
    let model = TractModel::onnx(&std::fs::read(fixture("iris.onnx")).unwrap()).unwrap();
    let bad = Tensor::new(vec![1, 3], TensorData::F32(vec![1.0; 3])).unwrap();
    let err = check_inputs(model.inputs(), &[bad]).unwrap_err();
    assert_eq!(err.to_string(), "input \"X\" expects X: f32[?,4], got f32[1, 3] (model signature: X: f32[?,4])");
    let bad = Tensor::new(vec![1, 4], TensorData::I64(vec![1; 4])).unwrap();
    assert!(check_inputs(model.inputs(), &[bad]).is_err());
    assert!(check_inputs(model.inputs(), &[]).unwrap_err().to_string().starts_with("expected 1 input(s)"));
}

#[test]
fn nnef_translation_runs_like_the_onnx_source() {
    let onnx = std::fs::read(fixture("iris.onnx")).unwrap();
    let nnef = tern_runtime::onnx_to_nnef(&onnx, None).unwrap();
    assert_eq!(tern_runtime::sniff_format(&nnef), tern_proto::ModelFormat::Nnef);
    assert_eq!(tern_runtime::sniff_format(&onnx), tern_proto::ModelFormat::Onnx);
    let a = TractModel::onnx(&onnx).unwrap();
    let b = TractModel::nnef(&nnef).unwrap();
    assert_eq!(a.inputs(), b.inputs());
    assert_eq!(
        a.outputs().iter().map(|o| (o.dtype, &o.shape)).collect::<Vec<_>>(),
        b.outputs().iter().map(|o| (o.dtype, &o.shape)).collect::<Vec<_>>()
    );
    let x = Tensor::new(vec![3, 4], TensorData::F32(vec![5.1, 3.5, 1.4, 0.2, 6.4, 3.2, 4.5, 1.5, 6.9, 3.1, 5.4, 2.1]))
        .unwrap();
    assert_eq!(a.run(vec![x.clone()]).unwrap(), b.run(vec![x]).unwrap());
}

#[test]
fn corrupt_nnef_is_a_load_error() {
    let nnef = tern_runtime::onnx_to_nnef(&std::fs::read(fixture("iris.onnx")).unwrap(), None).unwrap();
    let err = TractModel::nnef(&nnef[..nnef.len() / 2]).err().unwrap();
    assert!(matches!(err, RuntimeError::Load(_)), "{err}");
}

#[test]
fn fragile_model_fails_at_run_time_not_load_time() {
    let model = TractModel::onnx(&std::fs::read(fixture("fragile.onnx")).unwrap()).unwrap();
    let ok = model.run(vec![Tensor::new(vec![1], TensorData::I64(vec![2])).unwrap()]).unwrap();
    assert_eq!(ok[0].data, TensorData::F32(vec![3.0]));
    let bad = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model.run(vec![Tensor::new(vec![1], TensorData::I64(vec![7])).unwrap()])
    }));
    // tract reports the bad index as an error or a panic; the pool turns either into an error.
    assert!(!matches!(bad, Ok(Ok(_))), "an out-of-range gather succeeded: {bad:?}");
}

#[test]
fn pinned_shapes_replace_open_dimensions() {
    let onnx = std::fs::read(fixture("iris.onnx")).unwrap();
    let nnef = tern_runtime::onnx_to_nnef(&onnx, Some(&[vec![2, 4]])).unwrap();
    let m = TractModel::nnef(&nnef).unwrap();
    assert_eq!(m.inputs()[0].shape, [Some(2), Some(4)]);
    assert!(tern_runtime::onnx_to_nnef(&onnx, Some(&[])).is_err());
}

#[test]
fn reused_run_states_give_the_same_answers_as_fresh_ones() {
    let bytes = std::fs::read(fixture("iris.onnx")).unwrap();
    let reused = TractModel::onnx(&bytes).unwrap();
    let batches = [
        Tensor::new(vec![1, 4], TensorData::F32(vec![5.1, 3.5, 1.4, 0.2])).unwrap(),
        Tensor::new(vec![3, 4], TensorData::F32(vec![6.4, 3.2, 4.5, 1.5, 6.9, 3.1, 5.4, 2.1, 5.0, 3.0, 1.6, 0.2]))
            .unwrap(),
        Tensor::new(vec![2, 4], TensorData::F32(vec![6.9, 3.1, 5.4, 2.1, 5.1, 3.5, 1.4, 0.2])).unwrap(),
    ];
    for round in 0..3 {
        for b in &batches {
            let fresh = TractModel::onnx(&bytes).unwrap().run(vec![b.clone()]).unwrap();
            assert_eq!(reused.run(vec![b.clone()]).unwrap(), fresh, "round {round}, shape {:?}", b.shape);
        }
    }
}

#[test]
fn onnx_tensor_protos_decode_and_bad_ones_are_errors_not_panics() {
    use tract_onnx::pb::TensorProto;
    let enc = |t: TensorProto| prost::Message::encode_to_vec(&t);
    let ints = enc(TensorProto { dims: vec![2], data_type: 7, int64_data: vec![3, -1], ..TensorProto::default() });
    assert_eq!(tern_runtime::onnx_tensor(&ints).unwrap(), Tensor::new(vec![2], TensorData::I64(vec![3, -1])).unwrap());
    let raw = [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    let floats = enc(TensorProto { dims: vec![1, 2], data_type: 1, raw_data: raw, ..TensorProto::default() });
    assert_eq!(
        tern_runtime::onnx_tensor(&floats).unwrap(),
        Tensor::new(vec![1, 2], TensorData::F32(vec![1.5, -2.0])).unwrap()
    );
    let strings =
        enc(TensorProto { dims: vec![1], data_type: 8, string_data: vec![b"a".to_vec()], ..TensorProto::default() });
    let raw_strings =
        enc(TensorProto { dims: vec![1], data_type: 8, raw_data: b"abc".to_vec(), ..TensorProto::default() });
    let short = enc(TensorProto { dims: vec![4], data_type: 1, raw_data: vec![0; 3], ..TensorProto::default() });
    let unknown = enc(TensorProto { dims: vec![1], data_type: 9999, ..TensorProto::default() });
    for bad in [strings, raw_strings, short, unknown, vec![0xff, 0xff, 0xff]] {
        assert!(matches!(tern_runtime::onnx_tensor(&bad), Err(RuntimeError::Load(_))), "{bad:?}");
    }
}

#[test]
fn attention_loads_from_onnx_but_compiling_it_to_nnef_is_refused_naming_the_operator() {
    let bytes = std::fs::read(fixture("attention.onnx")).unwrap();
    TractModel::onnx(&bytes).unwrap();
    let err = tern_runtime::compile_onnx(&bytes, &Default::default(), &Default::default()).unwrap_err();
    assert!(matches!(&err, RuntimeError::Load(m) if m.contains("SDPA")), "{err}");
}

#[test]
fn half_precision_tensors_go_in_and_out_of_tract_and_bfloat16_is_refused_by_name() {
    use tern_proto::{bf16, f16};
    let model = TractModel::onnx(&std::fs::read(fixture("half.onnx")).unwrap()).unwrap();
    assert_eq!(model.inputs()[0].dtype, DType::F16);
    assert_eq!(model.outputs().iter().map(|o| o.dtype).collect::<Vec<_>>(), [DType::F16, DType::F32]);
    let x = [1.0f32, 0.1, -3.0, 100.0].map(f16::from_f32).to_vec();
    let out = model.run(vec![Tensor::new(vec![1, 4], TensorData::F16(x)).unwrap()]).unwrap();
    // onnxruntime's answer for the same input.
    let want = [2.5f32, 0.700_195_3, -5.5, 200.5];
    assert_eq!(out[0].data, TensorData::F16(want.map(f16::from_f32).to_vec()));
    assert_eq!(out[1].data, TensorData::F32(want.to_vec()));
    let b = Tensor::new(vec![1, 4], TensorData::BF16(vec![bf16::ONE; 4])).unwrap();
    let e = model.run(vec![b]).unwrap_err();
    assert!(e.to_string().contains("bf16"), "{e}");
}

#[test]
fn bfloat16_tensor_protos_decode_from_raw_bytes_and_from_int32_data() {
    use tract_onnx::pb::TensorProto;
    let enc = |t: TensorProto| prost::Message::encode_to_vec(&t);
    let want = Tensor::new(vec![2], TensorData::BF16(vec![tern_proto::bf16::ONE, tern_proto::bf16::NEG_ONE])).unwrap();
    let raw = enc(TensorProto {
        dims: vec![2],
        data_type: 16,
        raw_data: vec![0x80, 0x3f, 0x80, 0xbf],
        ..TensorProto::default()
    });
    assert_eq!(tern_runtime::onnx_tensor(&raw).unwrap(), want);
    let ints =
        enc(TensorProto { dims: vec![2], data_type: 16, int32_data: vec![0x3f80, 0xbf80], ..TensorProto::default() });
    assert_eq!(tern_runtime::onnx_tensor(&ints).unwrap(), want);
    let odd =
        enc(TensorProto { dims: vec![2], data_type: 16, raw_data: vec![0x80, 0x3f, 0x80], ..TensorProto::default() });
    let short = enc(TensorProto { dims: vec![3], data_type: 16, int32_data: vec![0x3f80], ..TensorProto::default() });
    let negative = enc(TensorProto { dims: vec![-1], data_type: 16, ..TensorProto::default() });
    for bad in [odd, short, negative] {
        assert!(matches!(tern_runtime::onnx_tensor(&bad), Err(RuntimeError::Load(_))), "{bad:?}");
    }
}

#[test]
fn a_model_whose_metadata_holds_a_quote_compiles_to_nnef_that_reads_back() {
    // tract writes ONNX metadata as NNEF string properties without
    // escaping `'`, and then cannot parse its own archive; compiling leaves
    // the metadata with the source.
    let src = std::fs::read(fixture("iris-metadata.onnx")).unwrap();
    let shapes = std::collections::BTreeMap::from([("X".to_owned(), vec![1, 4])]);
    let nnef = tern_runtime::compile_onnx(&src, &shapes, &Default::default()).unwrap();
    let model = TractModel::nnef(&nnef).unwrap();
    let x = Tensor { shape: vec![1, 4], data: TensorData::F32(vec![5.0, 3.0, 1.5, 0.2]) };
    assert_eq!(model.run(vec![x]).unwrap()[0].data, TensorData::I64(vec![0]));
}
