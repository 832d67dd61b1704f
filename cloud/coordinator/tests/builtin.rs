//! Built-in models end to end: `tern model pack` turns trained weights into
//! a `.tbm`, the coordinator checks and registers it, the agent serves it
//! on burn next to a tract model, matching onnxruntime on the same network.

mod common;

use common::*;
use serde_json::Value;

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("builtin.expected.json")).unwrap()).unwrap()
}

fn pack(coord: &Coord, weights: &str) -> std::path::PathBuf {
    let out = coord.dir.path().join(weights.replace(".weights.json", ".tbm"));
    let v = coord.json(&["model", "pack", fixture(weights).to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(v["size"].as_u64(), Some(std::fs::metadata(&out).unwrap().len()));
    out
}

fn assert_close(got: &Value, want: &Value, tol: f64) {
    let (got, want) = (got.as_array().unwrap(), want.as_array().unwrap());
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
        assert!((g - w).abs() <= tol, "agent {g}, onnxruntime {w}");
    }
}

#[test]
fn packed_builtin_models_deploy_and_serve_on_burn() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");

    let mlp = pack(&coord, "iris-mlp.weights.json");
    let v = coord.json(&["model", "register", "iris-burn", "--file", mlp.to_str().unwrap()]);
    assert_eq!(v["format"], "burn");
    assert_eq!(v["inputs"][0]["name"], "input");
    let ae = pack(&coord, "iris-autoencoder.weights.json");
    coord.ok(&["model", "register", "iris-ae", "--file", ae.to_str().unwrap()]);
    assert!(coord.ok(&["model", "show", "iris-ae:1"]).contains("outputs  reconstruction: f32[?,4], score: f32[?]"));
    coord.register_iris("iris");
    for m in ["iris-burn:1", "iris-ae:1", "iris:1"] {
        coord.ok(&["model", "approve", m]);
        coord.ok(&["fleet", "assign", "cam-01", m]);
    }
    agent.start();
    for m in ["iris-burn", "iris-ae", "iris"] {
        agent.wait_serving(m, 1);
    }

    let e = expected();
    let body =
        serde_json::json!({ "inputs": [{ "shape": e["input"]["shape"], "data": e["input"]["data"] }] }).to_string();
    let (status, answer) = agent.post("/v1/models/iris-burn:predict", &body);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outputs"][0]["name"], "probabilities");
    assert_close(&answer["outputs"][0]["data"], &e["mlp"]["probabilities"], 1e-5);
    // The same network as iris.onnx, on tract: both agree with each other.
    let (_, tract) = agent.post("/v1/models/iris:predict", &body);
    assert_close(&answer["outputs"][0]["data"], &tract["outputs"][1]["data"], 1e-5);

    let (status, answer) = agent.post_unix("/v1/models/iris-ae:predict", &body);
    assert_eq!(status, 200, "{answer}");
    assert_close(&answer["outputs"][1]["data"], &e["autoencoder"]["score"], 1e-4);

    let (status, err) = agent.post("/v1/models/iris-ae:predict", r#"{"inputs":[{"shape":[1,3],"data":[1,2,3]}]}"#);
    assert_eq!(status, 400);
    assert!(err["error"].as_str().unwrap().contains("expects input: f32[?,4]"), "{err}");
}

#[test]
fn bad_builtin_models_are_refused() {
    let coord = Coord::start();
    // Weights that do not fit the family they claim.
    let mut w: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("iris-mlp.weights.json")).unwrap()).unwrap();
    w["family"]["Mlp"]["hidden"] = serde_json::json!([15]);
    let path = coord.dir.path().join("bad.weights.json");
    std::fs::write(&path, w.to_string()).unwrap();
    let out = coord.dir.path().join("bad.tbm");
    let err = coord.fails(&["model", "pack", path.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(err.contains("layer 0 must have a 4×15 weight and 15 biases"), "{err}");
    assert!(!out.exists());

    // A truncated artifact: refused at registration, nothing registered.
    let good = std::fs::read(pack(&coord, "iris-mlp.weights.json")).unwrap();
    let cut = coord.dir.path().join("cut.tbm");
    std::fs::write(&cut, &good[..good.len() - 20]).unwrap();
    let err = coord.fails(&["model", "register", "cut", "--file", cut.to_str().unwrap()]);
    assert!(err.starts_with("error: model refused (burn): cannot load model: bad weights"), "{err}");
    assert_eq!(coord.json(&["model", "list"]).as_array().unwrap().len(), 0);
}
