//! A `libonnxruntime` that cannot be used (in a process of its own: the
//! library is loaded once per process): the backend is unavailable with a
//! clear error, and every later load says so.
#![cfg(feature = "onnxruntime")]

use tern_runtime::ort_backend::{OrtModel, init};

#[test]
fn a_library_that_is_not_onnxruntime_leaves_the_backend_unavailable_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not a shared library").unwrap();
    let e = init(&fake, &[]).unwrap_err().to_string();
    assert!(e.starts_with("cannot load model: onnxruntime: failed to load from `"), "{e}");
    assert!(e.contains("libonnxruntime.so"), "{e}");
    let model =
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/iris.onnx")).unwrap();
    assert_eq!(OrtModel::onnx(&model, 1).err().unwrap().to_string(), e, "each load gives the reason");
}
