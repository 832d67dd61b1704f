//! The spine end to end, with real processes on loopback: enroll an agent,
//! register and approve a real ONNX model, deploy it over mutual-TLS QUIC,
//! and compare the agent's predictions with onnxruntime's.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("iris.expected.json")).unwrap()).unwrap()
}

fn request_body() -> String {
    let e = expected();
    json!({ "inputs": [{ "name": "X", "shape": e["input"]["shape"], "data": e["input"]["data"] }] }).to_string()
}

fn assert_matches_onnxruntime(answer: &Value) {
    let e = expected();
    let outputs = answer["outputs"].as_array().unwrap();
    assert_eq!(outputs[0]["name"], "label");
    assert_eq!(outputs[0]["data"], e["outputs"]["label"]["data"], "labels differ from onnxruntime");
    assert_eq!(outputs[1]["name"], "probabilities");
    assert_eq!(outputs[1]["shape"], e["outputs"]["probabilities"]["shape"]);
    let got = outputs[1]["data"].as_array().unwrap();
    let want = e["outputs"]["probabilities"]["data"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
        assert!((g - w).abs() < 1e-5, "probability {g} differs from onnxruntime's {w}");
    }
}

#[test]
fn deploy_over_quic_and_predict_like_onnxruntime() {
    let coord = Coord::start();
    let mut agent = Agent::new();
    let out = agent.enroll(&coord.quic, &coord.token(), Some("cam-01"));
    assert!(out.status.success(), "enroll: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "enrolled as cam-01 (group lab, profile rpi4)");
    // The private key was made on the device and is readable by its owner only.
    let key = agent.data().join("identity/device.key");
    assert_eq!(std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&key).unwrap()) & 0o777, 0o600);

    let card = coord.dir.path().join("card.md");
    std::fs::write(&card, "# Iris\nA small classifier.\n").unwrap();
    let v = coord.json(&[
        "model",
        "register",
        "iris",
        "--file",
        fixture("iris.onnx").to_str().unwrap(),
        "--card",
        card.to_str().unwrap(),
        "--meta",
        "owner=ml",
        "--meta",
        "dataset=iris",
    ]);
    assert_eq!(v["version"], 1);
    assert_eq!(v["status"], "pending");
    assert_eq!(v["card"], "# Iris\nA small classifier.\n");
    assert_eq!(v["meta"], json!({ "owner": "ml", "dataset": "iris" }));
    assert_eq!(v["size"], std::fs::metadata(fixture("iris.onnx")).unwrap().len());
    assert_eq!(v["inputs"], json!([{ "name": "X", "dtype": "f32", "shape": [null, 4] }]));
    assert_eq!(v["outputs"][1], json!({ "name": "probabilities", "dtype": "f32", "shape": [null, 3] }));
    let table = coord.ok(&["model", "show", "iris:1"]);
    assert!(table.contains("iris:1  (pending)") && table.contains("X: f32[?,4]"), "{table}");
    coord.ok(&["model", "approve", "iris:1"]);

    agent.start();
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    agent.wait_serving("iris", 1);

    let (status, answer) = agent.post("/v1/models/iris:predict", &request_body());
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["model"].as_str(), answer["version"].as_u64()), (Some("iris"), Some(1)));
    assert_matches_onnxruntime(&answer);
    let (status, answer) = agent.post_unix("/v1/models/iris:predict", &request_body());
    assert_eq!(status, 200, "{answer}");
    assert_matches_onnxruntime(&answer);

    let models = agent.models();
    assert_eq!(models["device"], "cam-01");
    assert_eq!(models["models"][0]["inputs"], json!([{ "name": "X", "dtype": "f32", "shape": [null, 4] }]));

    // The coordinator hears what the agent serves.
    wait_for("status report", Duration::from_secs(10), || {
        let d = coord.device("cam-01");
        (d["reported"][0]["state"] == "serving").then_some(())
    });
    let d = coord.device("cam-01");
    assert_eq!((d["group"].as_str(), d["profile"].as_str()), (Some("lab"), Some("rpi4")));
    assert_eq!(d["desired"], json!({ "iris": 1 }));
    let table = coord.ok(&["fleet", "list"]);
    assert!(table.contains("cam-01") && table.contains("iris:1 serving"), "{table}");

    // Bad requests: clear JSON errors with fitting statuses; the agent stays up.
    let (status, e) = agent.post("/v1/models/nope:predict", &request_body());
    assert_eq!(status, 404);
    assert_eq!(e["error"], "no model named \"nope\" is loaded (loaded: iris)");
    let (status, e) = agent.post("/v1/models/iris:predict", r#"{"inputs":[{"shape":[1,3],"data":[1,2,3]}]}"#);
    assert_eq!(status, 400);
    assert_eq!(e["error"], "input \"X\" expects X: f32[?,4], got f32[1, 3] (model signature: X: f32[?,4])");
    let (status, e) = agent.post("/v1/models/iris:predict", r#"{"inputs":[{"shape":[1,4],"data":[1,2,3]}]}"#);
    assert_eq!((status, e["error"].as_str()), (400, Some("input \"X\": shape [1, 4] needs 4 elements, got 3")));
    let (status, e) = agent.post("/v1/models/iris:predict", "{not json");
    assert_eq!(status, 400);
    assert!(e["error"].as_str().unwrap().starts_with("bad JSON body"), "{e}");
    let (status, e) = agent.post("/v1/models/iris:predict", r#"{"inputs":[{"shape":[1,4],"data":[1,"x",3,4]}]}"#);
    assert_eq!((status, e["error"].as_str()), (400, Some("input \"X\": element 1 (\"x\") is not a number")));
    let (status, answer) = agent.post("/v1/models/iris:predict", &request_body());
    assert_eq!(status, 200, "{answer}");

    // Kill the coordinator, SIGKILL the agent, restart the agent alone:
    // it serves the last verified model from its own disk.
    drop(coord);
    agent.proc.as_mut().unwrap().kill9();
    agent.start();
    agent.wait_serving("iris", 1);
    let (status, answer) = agent.post("/v1/models/iris:predict", &request_body());
    assert_eq!(status, 200, "{answer}");
    assert_matches_onnxruntime(&answer);
}

#[test]
fn agent_gets_desired_state_when_it_connects_later_and_on_upgrade() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-02");
    // Assigned while the agent is not running.
    coord.register_iris("iris");
    coord.ok(&["fleet", "assign", "cam-02", "iris:1"]);
    agent.start();
    agent.wait_serving("iris", 1);
    // A new version while connected replaces the old one.
    let v2 = coord.register_iris("iris");
    assert_eq!(v2, 2);
    coord.ok(&["fleet", "assign", "cam-02", "iris:2"]);
    agent.wait_serving("iris", 2);
    let (status, answer) = agent.post("/v1/models/iris:predict", &request_body());
    assert_eq!((status, answer["version"].as_u64()), (200, Some(2)));

    // The compiled NNEF form of the same model, served next to it.
    let nnef = tern_runtime::onnx_to_nnef(&std::fs::read(fixture("iris.onnx")).unwrap(), None).unwrap();
    let path = coord.dir.path().join("iris.nnef.tar");
    std::fs::write(&path, nnef).unwrap();
    let v = coord.json(&["model", "register", "iris-nnef", "--file", path.to_str().unwrap()]);
    assert_eq!(v["format"], "nnef");
    coord.ok(&["model", "approve", "iris-nnef:1"]);
    coord.ok(&["fleet", "assign", "cam-02", "iris-nnef:1"]);
    agent.wait_serving("iris-nnef", 1);
    let (status, answer) = agent.post("/v1/models/iris-nnef:predict", &request_body());
    assert_eq!(status, 200, "{answer}");
    assert_matches_onnxruntime(&answer);
    agent.wait_serving("iris", 2);
}

/// Starts `agent` while the coordinator cannot serve `sha`'s artifact, so
/// that its download fails and stays a candidate on disk; stops it with
/// SIGKILL, and gives the coordinator its artifact back.
fn leave_a_download_unfinished(coord: &Coord, agent: &mut Agent, sha: &str) {
    let artifact = coord.data().join("artifacts/sha256").join(sha);
    let aside = coord.data().join("aside");
    std::fs::rename(&artifact, &aside).unwrap();
    agent.start();
    wait_for("the download to fail", Duration::from_secs(20), || {
        agent.models()["models"].as_array()?.iter().any(|m| m["state"] == "failed").then_some(())
    });
    // The candidate's slot reaches the disk on the persister thread, which
    // nothing outside the agent can see: a kill before it lands leaves the
    // partial file unreferenced, and the next start rightly removes it.
    std::thread::sleep(Duration::from_millis(500));
    agent.proc.as_mut().unwrap().kill9();
    std::fs::rename(&aside, &artifact).unwrap();
}

#[test]
fn interrupted_download_resumes_and_corrupt_download_is_refetched() {
    let coord = Coord::start();
    let bytes = std::fs::read(fixture("iris.onnx")).unwrap();
    let sha = tern_proto::Sha256Digest::of(&bytes).to_hex();
    coord.register_iris("iris");

    // The agent was killed with half the artifact on disk: after a restart
    // it resumes from there (the candidate is persisted with its slot).
    let mut agent = Agent::enrolled(&coord, "cam-03");
    coord.ok(&["fleet", "assign", "cam-03", "iris:1"]);
    leave_a_download_unfinished(&coord, &mut agent, &sha);
    let partial = agent.data().join("partial");
    std::fs::write(partial.join(&sha), &bytes[..bytes.len() / 2]).unwrap();
    // A quarter of it recorded as fsynced: what follows may be what a power
    // cut left, and is fetched again.
    std::fs::write(partial.join(format!("{sha}.synced")), (bytes.len() / 4).to_string()).unwrap();
    agent.start();
    agent.wait_serving("iris", 1);
    assert!(agent.logs().contains(&format!("resumed_from={}", bytes.len() / 4)), "{}", agent.logs());
    assert!(!partial.join(format!("{sha}.synced")).exists(), "the record goes with the download");

    // A partial file of the right length but wrong bytes fails the digest
    // check, is thrown away, and the artifact is fetched again.
    let mut agent = Agent::enrolled(&coord, "cam-04");
    coord.ok(&["fleet", "assign", "cam-04", "iris:1"]);
    leave_a_download_unfinished(&coord, &mut agent, &sha);
    std::fs::write(agent.data().join("partial").join(&sha), vec![0u8; bytes.len()]).unwrap();
    std::fs::write(agent.data().join("partial").join(format!("{sha}.synced")), bytes.len().to_string()).unwrap();
    agent.start();
    agent.wait_serving("iris", 1);
    assert!(agent.logs().contains("artifact corrupt: sha256 is"), "{}", agent.logs());
    assert_eq!(std::fs::read(agent.data().join("models").join(&sha)).unwrap(), bytes);
}

#[test]
fn two_models_of_one_artifact_download_it_once() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-05");
    coord.register_iris("iris-a");
    coord.register_iris("iris-b");
    coord.ok(&["fleet", "assign", "cam-05", "iris-a:1"]);
    coord.ok(&["fleet", "assign", "cam-05", "iris-b:1"]);
    agent.start();
    agent.wait_serving("iris-a", 1);
    agent.wait_serving("iris-b", 1);
    let downloads = agent.logs().matches("artifact downloaded").count();
    assert_eq!(downloads, 1, "{}", agent.logs());
}

#[test]
fn a_half_precision_model_registers_deploys_and_answers_in_json_and_binary() {
    // fixtures/half.onnx: y = 2x + 0.5 in f16, and y cast to f32. The
    // expected values are onnxruntime's for the same input.
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_fixture("half", "half.onnx");
    agent.start();
    // Only a device known to speak wire version 5 is assigned it.
    coord.wait_wire_version("cam-01", 5);
    coord.ok(&["fleet", "assign", "cam-01", "half:1"]);
    agent.wait_serving("half", 1);
    let want = [2.5f32, 0.700_195_3, -5.5, 200.5];
    let show = coord.json(&["model", "show", "half:1"]);
    assert_eq!(show["inputs"][0]["dtype"], "f16", "{show}");
    let (status, answer) =
        agent.post("/v1/models/half:predict", r#"{"inputs":[{"shape":[1,4],"data":[1,0.1,-3,100]}]}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outputs"][0]["dtype"], "f16", "{answer}");
    assert_eq!(answer["outputs"][1]["dtype"], "f32", "{answer}");
    for out in [&answer["outputs"][0], &answer["outputs"][1]] {
        let got: Vec<f32> = serde_json::from_value(out["data"].clone()).unwrap();
        assert_eq!(got, want, "{answer}");
    }
    let x = [1.0f32, 0.1, -3.0, 100.0].map(tern_proto::f16::from_f32).to_vec();
    let input = tern_proto::Tensor::new(vec![1, 4], tern_proto::TensorData::F16(x)).unwrap();
    let (status, _, body) = agent.post_tensors("/v1/models/half:predict", &[input]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let out = tern_proto::decode_tensors(&body).unwrap();
    assert_eq!(out[0].data, tern_proto::TensorData::F16(want.map(tern_proto::f16::from_f32).to_vec()));
    assert_eq!(out[1].data, tern_proto::TensorData::F32(want.to_vec()));
}
