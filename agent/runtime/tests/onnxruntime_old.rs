//! A real `libonnxruntime` older than the C API the backend needs (the
//! onnxruntime 1.19.2 wheel's, which `scripts/fetch-models` fetches), in a
//! process of its own: refused with both versions named (ort reads the
//! library's version string and goes no further), and every later load
//! says so.
#![cfg(feature = "onnxruntime")]

use tern_runtime::ort_backend::{OrtModel, init, loaded};

#[test]
fn an_onnxruntime_older_than_the_api_the_backend_needs_is_refused_with_its_version() {
    let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/models/onnxruntime-1.19/libonnxruntime.so")
        .canonicalize()
        .expect("scripts/fetch-models fetches onnxruntime 1.19.2's library");
    let e = init(&lib, &[]).unwrap_err().to_string();
    assert!(e.contains("expected version >= '1.22.x', but got '1.19.2'"), "{e}");
    assert!(e.contains(lib.to_str().unwrap()), "{e}");
    assert!(!loaded());
    let model =
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/iris.onnx")).unwrap();
    assert_eq!(OrtModel::onnx(&model, 1).err().unwrap().to_string(), e, "each load gives the reason");
}
