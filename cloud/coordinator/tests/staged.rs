//! Staged updates with real processes: a new version is self-tested on its
//! golden vectors, shadowed beside the serving one on live requests, served
//! on probation and committed, or refused or rolled back with the reason in
//! the fleet's view, while the committed version keeps answering.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

/// A coordinator whose manifests carry `policy` (TOML), with its folder.
fn coordinator(policy: &str) -> (Coord, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    (Coord::start_with(&["--update-policy", path.to_str().unwrap()]), dir)
}

/// `x` as one row of the scorer's input.
fn row(x: [f32; 4]) -> String {
    format!(r#"{{"inputs":[{{"shape":[1,4],"data":[{},{},{},{}]}}]}}"#, x[0], x[1], x[2], x[3])
}

/// Which version answered, or the error status.
fn answer(agent: &Agent, x: [f32; 4]) -> Result<u64, u16> {
    match agent.post("/v1/models/scorer:predict", &row(x)) {
        (200, v) => Ok(v["version"].as_u64().unwrap()),
        (status, _) => Err(status),
    }
}

/// What the coordinator last heard about `scorer:version` from cam-01.
fn reported(coord: &Coord, version: u64) -> Option<Value> {
    coord.device("cam-01")["reported"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == "scorer" && m["version"] == version)
        .cloned()
}

fn wait_reported(coord: &Coord, version: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(30), || reported(coord, version).filter(|m| f(m)))
}

/// cam-01 serving scorer:1 (scorer-a), committed after a probation of a
/// second; then the coordinator is restarted to send `policy` with the
/// next version.
fn serving_v1(policy: &str) -> (Coord, tempfile::TempDir, Agent) {
    let (coord, dir) = coordinator("probation_secs = 1\n");
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_fixture("scorer", "scorer-a.onnx");
    coord.ok(&["fleet", "assign", "cam-01", "scorer:1"]);
    agent.start();
    agent.wait_serving("scorer", 1);
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    let quic = coord.quic.clone();
    let data = coord.stop();
    let args = ["--quic-listen", quic.as_str(), "--update-policy", path.to_str().unwrap()];
    let coord = Coord::start_in(data, &args).map_err(|(_, log)| log).unwrap();
    (coord, dir, agent)
}

fn assign_v2(coord: &Coord, file: &str) {
    assert_eq!(coord.register_fixture("scorer", file), 2);
    coord.ok(&["fleet", "assign", "cam-01", "scorer:2"]);
}

#[test]
fn an_update_is_self_tested_shadowed_served_on_probation_then_committed() {
    let (coord, _dir, agent) = serving_v1("shadow_requests = 5\nprobation_secs = 2\n");
    let v = coord.json(&["model", "show", "scorer:1"]);
    assert_eq!(v["selftest"]["tolerance_ppm"], 100, "golden vectors made at registration: {v}");
    assign_v2(&coord, "scorer-a2.onnx");
    wait_for("v2 in shadow", Duration::from_secs(30), || reported(&coord, 2).filter(|m| m["detail"] == "shadow"));
    // In shadow, every answer still comes from v1; v2 agrees on the class.
    let mut answered = Vec::new();
    wait_for("v2 out of shadow", Duration::from_secs(30), || {
        answered.push(answer(&agent, [0.1, 0.7, 0.2, 0.0]).unwrap());
        std::thread::sleep(Duration::from_millis(20));
        (answered.last() == Some(&2)).then_some(())
    });
    let from_v1 = answered.iter().take_while(|v| **v == 1).count();
    assert!(from_v1 >= 5, "v1 answered while v2 was compared on 5 requests: {answered:?}");
    // On probation, then committed: v1 is the previous version now.
    agent.wait_serving("scorer", 2);
    let m = wait_reported(&coord, 2, "v2 committed", |m| m["state"] == "serving" && m["detail"].is_null());
    assert_eq!(m["state"], "serving");
    let logs = agent.logs();
    for step in [
        "update: verifying",
        "update: staged",
        "self-test passed",
        "update: shadow",
        "update: probation",
        "update: committed",
    ] {
        assert!(logs.contains(step), "no {step:?} in the agent's log:\n{logs}");
    }
}

#[test]
fn a_version_that_fails_its_self_test_never_serves() {
    let (coord, _dir, agent) = serving_v1("probation_secs = 1\n");
    assign_v2(&coord, "scorer-noisy.onnx");
    let m = wait_for("v2 failed", Duration::from_secs(30), || {
        assert_eq!(answer(&agent, [0.1, 0.7, 0.2, 0.0]), Ok(1), "only v1 answers meanwhile");
        reported(&coord, 2).filter(|m| m["state"] == "failed")
    });
    let detail = m["detail"].as_str().unwrap();
    assert!(detail.starts_with("self-test failed: case 0, output 0, element "), "{m}");
    assert_eq!(answer(&agent, [0.1, 0.7, 0.2, 0.0]), Ok(1), "v1 keeps answering");
    // Not tried again: a restart keeps the verdict and serves v1.
    let mut agent = agent;
    agent.proc.as_mut().unwrap().kill9();
    agent.start();
    agent.wait_serving("scorer", 1);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(reported(&coord, 2).unwrap()["detail"], m["detail"]);
    let logs = agent.logs();
    let tests = logs.lines().filter(|l| l.contains("update: self-test") && l.contains("version=2")).count();
    assert_eq!(tests, 1, "not tested again: {logs}");
}

#[test]
fn a_version_that_disagrees_in_shadow_is_refused() {
    let (coord, _dir, agent) = serving_v1("shadow_requests = 5\nshadow_min_agreement_permille = 800\n");
    assign_v2(&coord, "scorer-b.onnx");
    wait_reported(&coord, 2, "v2 in shadow", |m| m["detail"] == "shadow");
    // Inputs on which scorer-b picks another class than scorer-a.
    let m = wait_for("v2 refused", Duration::from_secs(30), || {
        assert_eq!(answer(&agent, [0.9, 0.1, 0.1, 0.0]), Ok(1));
        std::thread::sleep(Duration::from_millis(20));
        reported(&coord, 2).filter(|m| m["state"] == "failed")
    });
    let detail = m["detail"].as_str().unwrap();
    assert!(detail.starts_with("shadow: agreed with the serving version on 0 of "), "{m}");
    assert!(detail.ends_with("(0‰, at least 800‰ needed)"), "{m}");
    assert_eq!(answer(&agent, [0.9, 0.1, 0.1, 0.0]), Ok(1));
}

#[test]
fn errors_on_probation_roll_back_to_the_committed_version() {
    let policy = "probation_secs = 30\nprobation_min_requests = 5\nprobation_max_error_permille = 100\n";
    let (coord, _dir, agent) = serving_v1(policy);
    assign_v2(&coord, "scorer-fragile.onnx");
    agent.wait_answering("scorer", 2);
    // x[3] = 5 indexes past scorer-fragile's table: every request fails on v2.
    let m = wait_for("v2 rolled back", Duration::from_secs(30), || {
        let _ = answer(&agent, [0.1, 0.7, 0.2, 5.0]);
        reported(&coord, 2).filter(|m| m["state"] == "failed")
    });
    let detail = m["detail"].as_str().unwrap();
    assert!(detail.starts_with("rolled back: probation: "), "{m}");
    assert!(detail.contains("requests failed"), "{m}");
    agent.wait_serving("scorer", 1);
    assert_eq!(answer(&agent, [0.1, 0.7, 0.2, 5.0]), Ok(1), "v1 answers what v2 could not");
    let shown = wait_for("the rollback in the history", Duration::from_secs(10), || {
        let out = coord.ok(&["fleet", "show", "cam-01"]);
        out.contains("rolled back").then_some(out)
    });
    assert!(shown.contains("requests failed"), "{shown}");
}

#[test]
fn a_slow_version_breaks_its_p99_limit_and_is_rolled_back() {
    let policy = "probation_secs = 30\nprobation_min_requests = 5\nprobation_max_p99_ms = 5\n";
    let (coord, _dir, agent) = serving_v1(policy);
    assign_v2(&coord, "scorer-slow.onnx");
    agent.wait_answering("scorer", 2);
    let m = wait_for("v2 rolled back", Duration::from_secs(60), || {
        let _ = answer(&agent, [0.1, 0.7, 0.2, 0.0]);
        reported(&coord, 2).filter(|m| m["state"] == "failed")
    });
    let detail = m["detail"].as_str().unwrap();
    assert!(detail.starts_with("rolled back: probation: p99 latency "), "{m}");
    assert!(detail.ends_with("(at most 5 ms allowed)"), "{m}");
    agent.wait_serving("scorer", 1);
}

#[test]
fn an_agent_killed_during_probation_comes_back_on_the_committed_version() {
    let (coord, _dir, mut agent) = serving_v1("probation_secs = 300\n");
    assign_v2(&coord, "scorer-a2.onnx");
    agent.wait_answering("scorer", 2);
    agent.proc.as_mut().unwrap().kill9();
    agent.start();
    agent.wait_serving("scorer", 1);
    let m = wait_reported(&coord, 2, "v2 given up", |m| m["state"] == "failed");
    assert!(m["detail"].as_str().unwrap().starts_with("interrupted in probation: the agent stopped"), "{m}");
    assert_eq!(answer(&agent, [0.1, 0.7, 0.2, 0.0]), Ok(1));
}

#[test]
fn a_clean_stop_during_probation_is_not_taken_for_a_crash() {
    let (coord, _dir, mut agent) = serving_v1("probation_secs = 300\n");
    assign_v2(&coord, "scorer-a2.onnx");
    agent.wait_answering("scorer", 2);
    let pid = agent.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    wait_for("the agent to stop", Duration::from_secs(15), || agent.proc.as_mut().unwrap().exited());
    assert!(agent.logs().contains("agent stopping"), "{}", agent.logs());
    agent.start();
    // Tried again from the start, not given up: on probation once more.
    agent.wait_answering("scorer", 2);
    let m = reported(&coord, 2).unwrap();
    assert_eq!(m["state"], "serving", "{m}");
    assert!(!agent.logs().contains("interrupted in"), "{}", agent.logs());
}
