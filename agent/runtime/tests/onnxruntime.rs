//! The optional onnxruntime backend (feature `onnxruntime`) on the library
//! the `onnxruntime` wheel on PyPI ships (`scripts/fetch-models` puts it in
//! target/models/onnxruntime/; `TERN_ONNXRUNTIME` points elsewhere): the
//! same answers as tract on real models, and clear errors for a library
//! that is not there.
#![cfg(feature = "onnxruntime")]

use tern_proto::DType;
use tern_runtime::ort_backend::{OrtModel, init};
use tern_runtime::{Backend, SplitMix, TractModel, random_inputs};

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

fn library() -> std::path::PathBuf {
    let path = std::env::var_os("TERN_ONNXRUNTIME").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/models/onnxruntime/libonnxruntime.so")
    });
    assert!(path.is_file(), "{} is missing: run scripts/fetch-models (scripts/test does)", path.display());
    path
}

/// One process, one environment: every case runs in this one test.
#[test]
fn onnxruntime_loads_from_the_wheel_s_library_and_agrees_with_tract() {
    // Not loaded yet: a clear error, not a crash.
    let e = OrtModel::onnx(&std::fs::read(fixture("iris.onnx")).unwrap(), 1).err().unwrap();
    assert_eq!(e.to_string(), "cannot load model: onnxruntime is not loaded in this process");
    let what = init(&library(), &[]).unwrap();
    assert!(what.contains("libonnxruntime.so (ORT Build Info: "), "{what}");
    // Later calls keep the first library, whatever they name.
    assert_eq!(init(std::path::Path::new("/nonexistent/libonnxruntime.so"), &["cuda"]).unwrap(), what);

    let mut rng = SplitMix(7);
    for (name, threads) in [("iris.onnx", 1), ("scorer-a.onnx", 0), ("lstm.onnx", 1), ("half.onnx", 1)] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let ort = OrtModel::onnx(&bytes, threads).unwrap();
        let tract = TractModel::onnx(&bytes).unwrap();
        let names = |b: &dyn Backend| b.outputs().iter().map(|o| (o.name.clone(), o.dtype)).collect::<Vec<_>>();
        assert_eq!(names(&ort), names(&tract), "{name}");
        let dtype = if name == "half.onnx" { DType::F16 } else { DType::F32 };
        assert_eq!((ort.inputs()[0].dtype, tract.inputs()[0].dtype), (dtype, dtype), "{name}");
        for _ in 0..3 {
            let inputs = random_inputs(tract.inputs(), &mut rng);
            let (a, b) = (ort.run(inputs.clone()).unwrap(), tract.run(inputs).unwrap());
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.shape, y.shape, "{name}");
                match (&x.data, &y.data) {
                    (tern_proto::TensorData::F32(p), tern_proto::TensorData::F32(q)) => {
                        for (p, q) in p.iter().zip(q) {
                            assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{name}: {p} vs {q}");
                        }
                    }
                    (p, q) => assert_eq!(p, q, "{name}"),
                }
            }
        }
    }
    // The source with a constant folded in and its shape pinned (what
    // agents with onnxruntime get): the compiled signature, the branch
    // the constant takes.
    for (sr, width) in [(16000i64, 4), (8000, 1)] {
        let consts =
            [("sr".to_string(), tern_proto::Tensor { shape: vec![], data: tern_proto::TensorData::I64(vec![sr]) })];
        let shapes = [("x".to_string(), vec![2, 4])];
        let onnx = tern_runtime::onnx_with_consts(
            &std::fs::read(fixture("rate-if.onnx")).unwrap(),
            &consts.into_iter().collect(),
            &shapes.into_iter().collect(),
        )
        .unwrap();
        let ort = OrtModel::onnx(&onnx, 1).unwrap();
        assert_eq!(ort.inputs().iter().map(|s| s.to_string()).collect::<Vec<_>>(), ["x: f32[2,4]"], "sr={sr}");
        let x = tern_proto::Tensor { shape: vec![2, 4], data: tern_proto::TensorData::F32(vec![1.0; 8]) };
        assert_eq!(ort.run(vec![x]).unwrap()[0].shape, vec![2, width], "sr={sr}");
    }
    // bf16 in and out, which tract cannot run (fixtures/bf16.onnx: x + 0.5).
    let ort = OrtModel::onnx(&std::fs::read(fixture("bf16.onnx")).unwrap(), 1).unwrap();
    assert_eq!((ort.inputs()[0].dtype, ort.outputs()[0].dtype), (DType::BF16, DType::BF16));
    let x = [1.0f32, 0.1, -3.0, 100.0].map(tern_proto::bf16::from_f32);
    let want = x.map(|v| tern_proto::bf16::from_f32(v.to_f32() + 0.5)).to_vec();
    let input = tern_proto::Tensor::new(vec![1, 4], tern_proto::TensorData::BF16(x.to_vec())).unwrap();
    assert_eq!(ort.run(vec![input]).unwrap()[0].data, tern_proto::TensorData::BF16(want));
    assert!(TractModel::onnx(&std::fs::read(fixture("bf16.onnx")).unwrap()).is_err(), "tract has no bf16");
    // Bytes that are not a model: refused with onnxruntime's reason.
    let e = OrtModel::onnx(b"not a model", 1).err().unwrap().to_string();
    assert!(e.starts_with("cannot load model: onnxruntime: "), "{e}");
}
