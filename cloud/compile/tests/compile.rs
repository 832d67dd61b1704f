//! Compiling real ONNX files from fixtures/: shapes pinned and checked
//! against the source, an input constant in use folded in, each bad
//! option refused with its reason.

use tern_compile::{CompileError, Options, compile};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/../../fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn opts(shapes: &[(&str, &[usize])], consts: &[(&str, &str)]) -> Options {
    Options {
        shapes: shapes.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect(),
        consts: consts.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
        ..Options::default()
    }
}

#[test]
fn an_open_batch_axis_is_pinned_and_the_artifact_agrees_with_the_source() {
    let src = fixture("iris.onnx");
    let c = compile(&src, &opts(&[("X", &[3, 4])], &[])).unwrap();
    assert_eq!(c.inputs[0].shape, vec![Some(3), Some(4)]);
    assert!(!c.errors.is_empty());
    assert!(c.errors.iter().all(|e| e.max_scaled <= 1e-4), "{:?}", c.errors);
}

#[test]
fn bad_options_are_refused_with_their_reason() {
    let src = fixture("mode-if.onnx");
    let e = compile(&src, &opts(&[("image", &[1, 4])], &[])).unwrap_err();
    assert!(matches!(&e, CompileError::NoSuchInput { name, inputs } if name == "image" && inputs.contains("x")), "{e}");
    let e = compile(&src, &opts(&[("x", &[2, 5])], &[])).unwrap_err();
    assert!(matches!(e, CompileError::Shape { .. }), "{e}");
    let e = compile(&src, &opts(&[], &[("mode", "maybe")])).unwrap_err();
    assert!(matches!(&e, CompileError::Const { why, .. } if why.contains("bool")), "{e}");
    let e = compile(&src, &opts(&[], &[("x", "1,2")])).unwrap_err();
    assert!(matches!(&e, CompileError::Const { why, .. } if why.contains("--input-shape")), "{e}");
    let e = compile(b"not a model", &Options::default()).unwrap_err();
    assert!(matches!(e, CompileError::Source(_)), "{e}");
    // The branches' shapes differ: tract names the node that blocks it.
    let e = compile(&src, &opts(&[("x", &[2, 4])], &[])).unwrap_err();
    assert!(matches!(&e, CompileError::Blocked(m) if m.contains("\"y\" If")), "{e}");
}

#[test]
fn an_input_constant_in_use_is_folded_in_and_leaves_the_signature() {
    use tern_proto::{Tensor, TensorData};
    use tern_runtime::Backend as _;
    let src = fixture("scale-by.onnx");
    let c = compile(&src, &opts(&[("x", &[2, 4])], &[("gain", "3")])).unwrap();
    let names: Vec<&str> = c.inputs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["x"], "the gain left the signature");
    assert!(c.errors.iter().all(|e| e.max_scaled <= 1e-4), "{:?}", c.errors);
    // The artifact multiplies by the gain it was compiled with.
    let m = tern_runtime::TractModel::nnef(&c.nnef).unwrap();
    let x = Tensor::new(vec![2, 4], TensorData::F32(vec![1.0; 8])).unwrap();
    assert_eq!(m.run(vec![x]).unwrap()[0].data, TensorData::F32(vec![3.0; 8]));
}

#[test]
fn the_same_infinity_on_both_sides_agrees() {
    // Log(Relu(x - 0.5)) is -inf wherever x <= 0.5, in the source and the
    // artifact.
    let c = compile(&fixture("log-relu.onnx"), &Options::default()).unwrap();
    assert!(c.errors.iter().all(|e| e.max_abs == 0.0 && e.max_scaled == 0.0), "{:?}", c.errors);
}
