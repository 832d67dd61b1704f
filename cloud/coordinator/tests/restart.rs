//! What an agent serves after a restart (SIGKILL, with and without its
//! coordinator): every model it knew about, the previous version when the
//! committed one no longer loads, nothing it no longer refers to left on
//! disk, and a data dir written by the first release still serving.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;

const IRIS: &str = r#"{"inputs":[{"name":"X","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#;

fn model_entry(agent: &Agent, name: &str) -> Option<Value> {
    agent.models()["models"].as_array()?.iter().find(|m| m["name"] == name).cloned()
}

fn sha_of(coord: &Coord, name: &str, version: u64) -> String {
    coord.json(&["model", "show", &format!("{name}:{version}")])["sha256"].as_str().unwrap().to_owned()
}

/// The digests of a version's artifact and golden vectors.
fn files_of(coord: &Coord, name: &str, version: u64) -> [String; 2] {
    let v = coord.json(&["model", "show", &format!("{name}:{version}")]);
    [v["sha256"].as_str().unwrap().to_owned(), v["selftest"]["sha256"].as_str().unwrap().to_owned()]
}

/// Waits until the agent has persisted (and collected) after its last change.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
fn a_restart_where_one_of_three_models_fails_to_load_keeps_all_three() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_iris("iris");
    coord.register_fixture("fragile", "fragile.onnx");
    coord.register_fixture("slow", "slow.onnx");
    for m in ["iris:1", "fragile:1", "slow:1"] {
        coord.ok(&["fleet", "assign", "cam-01", m]);
    }
    agent.start();
    for m in ["iris", "fragile", "slow"] {
        agent.wait_serving(m, 1);
    }
    settle();
    let fragile = sha_of(&coord, "fragile", 1);
    let quic = coord.quic.clone();
    let coord_dir = coord.stop();

    // Power cut; on the way back, one model's file is damaged.
    agent.proc.as_mut().unwrap().kill9();
    std::fs::write(agent.data().join("models").join(&fragile), b"not the model any more").unwrap();
    agent.start();
    agent.wait_serving("iris", 1);
    agent.wait_serving("slow", 1);
    let f = wait_for("fragile to fail", Duration::from_secs(20), || {
        model_entry(&agent, "fragile").filter(|m| m["state"] == "failed")
    });
    assert!(f["detail"].as_str().unwrap().contains("stored artifact is corrupt"), "{f}");

    // Another restart, still offline: the failed one is not forgotten.
    settle();
    agent.proc.as_mut().unwrap().kill9();
    agent.start();
    agent.wait_serving("iris", 1);
    agent.wait_serving("slow", 1);
    wait_for("fragile to be listed", Duration::from_secs(20), || model_entry(&agent, "fragile"));

    // The coordinator is back: the damaged model comes again and serves.
    let coord = Coord::start_in(coord_dir, &["--quic-listen", &quic]).map_err(|(_, log)| log).unwrap();
    agent.wait_serving("fragile", 1);
    let (status, _) = agent.post("/v1/models/fragile:predict", r#"{"inputs":[{"shape":[1],"data":[2]}]}"#);
    assert_eq!(status, 200);
    drop(coord);
}

#[test]
fn the_previous_version_serves_when_the_committed_one_is_damaged_offline() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-03");
    coord.register_iris("iris");
    let nnef = tern_runtime::onnx_to_nnef(&std::fs::read(fixture("iris.onnx")).unwrap(), None).unwrap();
    let path = coord.dir.path().join("iris.nnef.tar");
    std::fs::write(&path, nnef).unwrap();
    coord.ok(&["model", "register", "iris", "--file", path.to_str().unwrap()]);
    coord.ok(&["model", "approve", "iris:2"]);
    coord.ok(&["fleet", "assign", "cam-03", "iris:1"]);
    agent.start();
    agent.wait_serving("iris", 1);
    coord.ok(&["fleet", "assign", "cam-03", "iris:2"]);
    agent.wait_serving("iris", 2);
    settle();
    let v2 = sha_of(&coord, "iris", 2);
    drop(coord);

    agent.proc.as_mut().unwrap().kill9();
    std::fs::write(agent.data().join("models").join(&v2), b"damaged").unwrap();
    agent.start();
    agent.wait_serving("iris", 1);
    let (status, answer) = agent.post("/v1/models/iris:predict", IRIS);
    assert_eq!((status, answer["version"].as_u64()), (200, Some(1)), "{answer}");
    let all = agent.models();
    let failed = all["models"].as_array().unwrap().iter().find(|m| m["version"] == 2).unwrap();
    assert_eq!(failed["state"], "failed", "{all}");
}

#[test]
fn files_no_slot_refers_to_are_removed() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-04");
    // Three different artifacts of one model: ONNX, NNEF, NNEF with pinned shapes.
    let onnx = std::fs::read(fixture("iris.onnx")).unwrap();
    let files = [
        fixture("iris.onnx"),
        {
            let p = coord.dir.path().join("a.nnef.tar");
            std::fs::write(&p, tern_runtime::onnx_to_nnef(&onnx, None).unwrap()).unwrap();
            p
        },
        {
            let p = coord.dir.path().join("b.nnef.tar");
            std::fs::write(&p, tern_runtime::onnx_to_nnef(&onnx, Some(&[vec![1, 4]])).unwrap()).unwrap();
            p
        },
    ];
    for (i, f) in files.iter().enumerate() {
        coord.ok(&["model", "register", "iris", "--file", f.to_str().unwrap()]);
        coord.ok(&["model", "approve", &format!("iris:{}", i + 1)]);
    }
    agent.start();
    for v in 1..=3u64 {
        coord.ok(&["fleet", "assign", "cam-04", &format!("iris:{v}")]);
        agent.wait_serving("iris", v);
    }
    settle();
    let data = agent.data();
    let on_disk = |sub: &str| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(data.join(sub)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    let mut want: Vec<String> = [files_of(&coord, "iris", 3), files_of(&coord, "iris", 2)].concat();
    want.sort();
    assert_eq!(on_disk("models"), want, "v1 is neither active nor previous: its file goes");

    // A stray download nobody wants is removed at the next start.
    std::fs::write(agent.data().join("partial").join("0".repeat(64)), b"left over").unwrap();
    agent.proc.as_mut().unwrap().kill9();
    agent.start();
    agent.wait_serving("iris", 3);
    settle();
    assert!(on_disk("partial").is_empty(), "{:?}", on_disk("partial"));
    assert_eq!(on_disk("models"), want);

    // Unassigned entirely: nothing stays.
    coord.ok(&["fleet", "unassign", "cam-04", "iris"]);
    wait_for("iris to be unloaded", Duration::from_secs(20), || model_entry(&agent, "iris").is_none().then_some(()));
    settle();
    assert!(on_disk("models").is_empty(), "{:?}", on_disk("models"));
}

/// What agents up to ae5a7d0 kept in `state/`: one sled key, `slots/active`,
/// holding a JSON list of the serving manifests.
fn write_first_release_state(agent: &Agent, manifests: &Value) {
    let state = agent.data().join("state");
    std::fs::remove_dir_all(&state).unwrap();
    let db = sled::open(&state).unwrap();
    db.insert(b"slots/active", serde_json::to_vec(manifests).unwrap()).unwrap();
    db.flush().unwrap();
}

#[test]
fn a_data_dir_of_the_first_release_still_serves() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-05");
    coord.register_iris("iris");
    coord.ok(&["fleet", "assign", "cam-05", "iris:1"]);
    agent.start();
    agent.wait_serving("iris", 1);
    let v = coord.json(&["model", "show", "iris:1"]);
    drop(coord);
    agent.proc.as_mut().unwrap().kill9();

    let manifest = json!([{
        "name": "iris", "version": 1, "sha256": v["sha256"], "size": v["size"], "format": "onnx",
        "inputs": v["inputs"], "outputs": v["outputs"], "created_at": v["created_at"],
    }]);
    write_first_release_state(&agent, &manifest);
    agent.start();
    agent.wait_serving("iris", 1);
    assert!(agent.logs().contains("agent state migrated from schema 1 to 2"), "{}", agent.logs());
    let (status, answer) = agent.post("/v1/models/iris:predict", IRIS);
    assert_eq!(status, 200, "{answer}");
    // Once migrated, restarts read schema 2.
    agent.proc.as_mut().unwrap().kill9();
    agent.start();
    agent.wait_serving("iris", 1);
}

/// The same with a data dir the real first-release agent wrote, when its
/// build is at hand: `TERN_OLD_BIN_DIR=/path/to/old/target/debug`.
#[test]
#[ignore = "needs TERN_OLD_BIN_DIR, a build of commit ae5a7d0; run with --ignored (CI covers the same ground without it)"]
fn a_data_dir_written_by_the_old_agent_binary_still_serves() {
    let old = std::env::var_os("TERN_OLD_BIN_DIR")
        .expect("TERN_OLD_BIN_DIR: a folder with tern and tern-agent built from ae5a7d0");
    let old = std::path::PathBuf::from(old);
    let coord = Coord::start();
    coord.register_iris("iris");
    let agent = Agent::new();
    let token = coord.token();
    let out = std::process::Command::new(old.join("tern-agent"))
        .args(["enroll", "--coordinator", &coord.quic, "--token", &token, "--device-id", "old-01", "--data-dir"])
        .arg(agent.data())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    coord.ok(&["fleet", "assign", "old-01", "iris:1"]);
    let data = agent.data();
    let mut old_agent = Proc(
        std::process::Command::new(old.join("tern-agent"))
            .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the old agent to serve iris", Duration::from_secs(30), || {
        let d = coord.device("old-01");
        d["reported"].as_array()?.iter().any(|r| r["state"] == "serving").then_some(())
    });
    old_agent.kill9();
    drop(coord);
    let mut agent = agent;
    agent.start();
    agent.wait_serving("iris", 1);
    assert_eq!(agent.post("/v1/models/iris:predict", IRIS).0, 200);
}
