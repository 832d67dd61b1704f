//! Bad input at the admin API gets a clear error and loses nothing already
//! stored: unknown device, unapproved or rejected version, corrupt upload,
//! a model tract cannot load, a wrong admin token.

mod common;

use common::*;
use serde_json::json;

#[test]
fn bad_admin_requests_are_refused_and_nothing_is_lost() {
    let coord = Coord::start();
    let _agent = Agent::enrolled(&coord, "cam-01");
    coord.register_iris("iris");
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    let models_before = coord.json(&["model", "list"]);
    let device_before = coord.device("cam-01");
    let artifact = std::fs::read_dir(coord.data().join("artifacts/sha256")).unwrap().next().unwrap().unwrap().path();
    let artifact_bytes = std::fs::read(&artifact).unwrap();

    // Unknown device.
    let err = coord.fails(&["fleet", "assign", "ghost", "iris:1"]);
    assert_eq!(err.trim(), "error: no device \"ghost\" is enrolled");

    // Unknown model and version.
    assert_eq!(coord.fails(&["fleet", "assign", "cam-01", "nope:1"]).trim(), "error: no model named \"nope\"");
    assert_eq!(coord.fails(&["model", "show", "iris:7"]).trim(), "error: model \"iris\" has no version 7");

    // Unapproved, then rejected, version.
    let v2 = coord.json(&["model", "register", "iris", "--file", fixture("iris.onnx").to_str().unwrap()]);
    assert_eq!((v2["version"].as_u64(), v2["status"].as_str()), (Some(2), Some("pending")));
    let err = coord.fails(&["fleet", "assign", "cam-01", "iris:2"]);
    assert_eq!(
        err.trim(),
        "error: iris:2 is pending, only approved versions can be deployed (run: tern model approve iris:2)"
    );
    coord.ok(&["model", "reject", "iris:2"]);
    assert!(coord.fails(&["fleet", "assign", "cam-01", "iris:2"]).contains("iris:2 is rejected"));

    // A model tract cannot load (a real skl2onnx export with an op tract lacks), and garbage.
    let err =
        coord.fails(&["model", "register", "scaled", "--file", fixture("unsupported-scaler.onnx").to_str().unwrap()]);
    assert!(err.starts_with("error: model refused (onnx): cannot load model:"), "{err}");
    assert!(err.contains("Scaler"), "{err}");
    let junk = coord.dir.path().join("junk.onnx");
    std::fs::write(&junk, b"\x08\x07this is not an onnx file").unwrap();
    let err = coord.fails(&["model", "register", "junk", "--file", junk.to_str().unwrap()]);
    assert!(err.starts_with("error: model refused (onnx): cannot load model:"), "{err}");

    // Corrupt upload: the bytes do not hash to what the client says it sent.
    let token = coord.admin_token();
    let http = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let claimed = tern_proto::Sha256Digest::of(b"the bytes I meant to send");
    let mut resp = http
        .post(format!("{}/v1/artifacts", coord.admin))
        .header("authorization", format!("Bearer {token}"))
        .header("x-tern-sha256", claimed.to_hex())
        .send(&b"the bytes that arrived"[..])
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: serde_json::Value = resp.body_mut().read_json().unwrap();
    let actual = tern_proto::Sha256Digest::of(b"the bytes that arrived");
    assert_eq!(body, json!({ "error": format!("upload corrupted: sha256 is {actual}, expected {claimed}") }));
    assert!(!coord.data().join("artifacts/sha256").join(actual.to_hex()).exists());

    // Registering a digest nobody uploaded.
    let err = http
        .post(format!("{}/v1/models/iris/versions", coord.admin))
        .header("authorization", format!("Bearer {token}"))
        .send_json(json!({ "sha256": actual }))
        .unwrap()
        .body_mut()
        .read_json::<serde_json::Value>()
        .unwrap();
    assert_eq!(err["error"], format!("no artifact with sha256 {actual}; upload it first"));

    // Wrong or missing admin token.
    let out = std::process::Command::new(tern_bin())
        .args(["--admin", &coord.admin, "model", "list"])
        .env("TERN_ADMIN_TOKEN", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "error: missing or wrong admin token");
    let status = http.get(format!("{}/v1/devices", coord.admin)).call().unwrap().status().as_u16();
    assert_eq!(status, 401);

    // Nothing already stored was lost or changed.
    let models_after = coord.json(&["model", "list"]);
    assert_eq!(models_after.as_array().unwrap().len(), 2);
    assert_eq!(models_after[0], models_before[0]);
    assert_eq!(models_after[1]["status"], "rejected");
    let device_after = coord.device("cam-01");
    assert_eq!(device_after["desired"], device_before["desired"]);
    assert_eq!(device_after["generation"], device_before["generation"]);
    assert_eq!(std::fs::read(&artifact).unwrap(), artifact_bytes);
}
