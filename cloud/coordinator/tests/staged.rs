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
/// next version (gently, so the agent reconnects at once rather than after
/// its idle timeout).
fn serving_v1(policy: &str) -> (Coord, tempfile::TempDir, Agent) {
    serving_v1_with(policy, &[], &[])
}

/// The same, with the agent started with `args` and `env`.
fn serving_v1_with(policy: &str, args: &[&str], env: &[(&str, &str)]) -> (Coord, tempfile::TempDir, Agent) {
    let (coord, dir) = coordinator("probation_secs = 1\n");
    let mut agent = Agent::enrolled(&coord, "cam-01");
    agent.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    coord.register_fixture("scorer", "scorer-a.onnx");
    coord.ok(&["fleet", "assign", "cam-01", "scorer:1"]);
    agent.start_with(args);
    agent.wait_serving("scorer", 1);
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    let quic = coord.quic.clone();
    let data = coord.stop_gently();
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
fn a_version_with_the_same_top1_fails_a_relative_shadow_and_passes_a_top1_one() {
    // scorer-a2 answers twice scorer-a's scores: the same class, other values.
    for (how, fails) in [("relative", true), ("top1", false)] {
        let policy = format!("shadow_requests = 5\nshadow_compare = \"{how}\"\nshadow_min_agreement_permille = 800\n");
        let (coord, _dir, agent) = serving_v1(&policy);
        assign_v2(&coord, "scorer-a2.onnx");
        wait_reported(&coord, 2, "v2 in shadow", |m| m["detail"] == "shadow");
        let m = wait_for("v2 out of shadow", Duration::from_secs(30), || {
            assert!(answer(&agent, [0.1, 0.7, 0.2, 0.0]).is_ok());
            std::thread::sleep(Duration::from_millis(20));
            reported(&coord, 2).filter(|m| m["detail"] != "shadow")
        });
        let detail = m["detail"].as_str().unwrap_or_default();
        if fails {
            assert_eq!(m["state"], "failed", "{how}: {m}");
            assert!(detail.starts_with("shadow: agreed with the serving version on 0 of "), "{m}");
        } else {
            assert_eq!(m["state"], "serving", "{how}: {m}");
        }
    }
}

#[test]
fn a_version_much_slower_than_the_serving_one_fails_in_shadow() {
    // scorer-slow takes tens of milliseconds a run, scorer-a microseconds.
    let (coord, _dir, agent) = serving_v1("shadow_requests = 5\nshadow_max_p99_permille = 3000\n");
    assign_v2(&coord, "scorer-slow.onnx");
    wait_reported(&coord, 2, "v2 in shadow", |m| m["detail"] == "shadow");
    let m = wait_for("v2 refused", Duration::from_secs(60), || {
        assert_eq!(answer(&agent, [0.1, 0.7, 0.2, 0.0]), Ok(1), "v1 answers throughout");
        std::thread::sleep(Duration::from_millis(20));
        reported(&coord, 2).filter(|m| m["state"] == "failed")
    });
    let detail = m["detail"].as_str().unwrap();
    assert!(detail.starts_with("shadow: p99 "), "{m}");
    assert!(detail.ends_with("at most 3000‰ allowed)"), "{m}");
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
fn an_agent_killed_during_probation_comes_back_on_the_committed_version_and_tries_again_twice() {
    let (coord, _dir, mut agent) = serving_v1("probation_secs = 300\n");
    assign_v2(&coord, "scorer-a2.onnx");
    for _ in 0..3 {
        agent.wait_answering("scorer", 2);
        agent.proc.as_mut().unwrap().kill9();
        agent.start();
        agent.wait_serving("scorer", 1);
    }
    let m = wait_reported(&coord, 2, "v2 given up", |m| m["state"] == "failed");
    let detail = m["detail"].as_str().unwrap();
    // A candidate serves only once its probation is on disk: the kill,
    // however soon after it answers, is one in probation.
    assert!(detail.starts_with("interrupted in probation: "), "{m}");
    assert!(detail.ends_with(", 3 of 3 times; not tried again until the desired state changes"), "{m}");
    assert_eq!(answer(&agent, [0.1, 0.7, 0.2, 0.0]), Ok(1));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(reported(&coord, 2).unwrap()["state"], "failed", "not tried a fourth time");
    let shown = wait_for("the retries in the history", Duration::from_secs(10), || {
        let out = coord.ok(&["fleet", "show", "cam-01"]);
        out.contains("3 of 3 times").then_some(out)
    });
    assert!(shown.contains("1 of 3 times") && shown.contains("2 of 3 times"), "{shown}");
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

/// "HH:MM" of the UTC time `ahead` from now, and the minute of the day.
fn utc_in(ahead: Duration) -> (String, u64) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap() + ahead;
    let minute = now.as_secs() / 60 % 1440;
    (format!("{:02}:{:02}", minute / 60, minute % 60), minute)
}

#[test]
fn outside_its_maintenance_window_a_tested_version_waits_and_activates_inside_it() {
    // A window opening three hours from now (UTC), an hour long, every day.
    let (from, _) = utc_in(Duration::from_secs(3 * 3600));
    let (to, _) = utc_in(Duration::from_secs(4 * 3600));
    let policy = format!("probation_secs = 1\n[window]\nfrom = \"{from}\"\nto = \"{to}\"\n");
    let (coord, _dir, mut agent) = serving_v1_with(&policy, &[], &[("TZ", "UTC")]);
    assign_v2(&coord, "scorer-a2.onnx");
    let m = wait_reported(&coord, 2, "v2 waiting for its window", |m| {
        m["detail"].as_str().is_some_and(|d| d.starts_with("ready: "))
    });
    let detail = m["detail"].as_str().unwrap();
    // The opening is named as a local time (the window's start), not counted down.
    assert!(detail.starts_with("ready: outside the maintenance window (opens "), "{m}");
    assert!(detail.ends_with(&format!(" {from})")), "{m}");
    // Tested and waiting: v1 answers all the while.
    for _ in 0..20 {
        assert_eq!(answer(&agent, [0.1, 0.7, 0.2, 0.0]), Ok(1));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The same device in a zone 3 h 30 min east of UTC is inside the window.
    // Killed while it waits: waiting ran none of v2's code, so the restart
    // takes it through its checks again instead of giving it up.
    agent.proc.as_mut().unwrap().kill9();
    agent.env = vec![("TZ".into(), "XYZ-3:30".into())];
    agent.start();
    agent.wait_serving("scorer", 2);
    let shown = coord.ok(&["fleet", "show", "cam-01"]);
    assert!(shown.contains("outside the maintenance window"), "{shown}");
    assert!(!agent.logs().contains("interrupted in"), "{}", agent.logs());
}

#[test]
fn an_app_defers_activation_with_a_lease_and_releases_it() {
    let (coord, _dir, agent) = serving_v1("shadow_requests = 3\nprobation_secs = 1\nmax_defer_secs = 60\n");
    // v1 was signed under a policy that lets no app defer.
    let (status, v) = agent.post("/v1/models/scorer:defer", r#"{"seconds": 600}"#);
    assert_eq!(status, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("max_defer_secs is 0"), "{v}");
    assert_eq!(agent.post("/v1/models/nope:defer", r#"{"seconds": 5}"#).0, 404);
    assert_eq!(agent.post("/v1/models/scorer:defer", r#"{"secs": 5}"#).0, 400);
    assign_v2(&coord, "scorer-a2.onnx");
    // In shadow until it has seen three requests: the lease is taken then,
    // under v2's policy, and asked for longer than it allows.
    wait_reported(&coord, 2, "v2 in shadow", |m| m["detail"] == "shadow");
    let (status, v) = agent.post("/v1/models/scorer:defer", r#"{"seconds": 600}"#);
    assert_eq!((status, v["granted_seconds"].as_u64()), (200, Some(60)), "{v}");
    let m = wait_for("v2 deferred", Duration::from_secs(30), || {
        assert_eq!(answer(&agent, [0.1, 0.7, 0.2, 0.0]), Ok(1));
        std::thread::sleep(Duration::from_millis(20));
        reported(&coord, 2).filter(|m| m["detail"].as_str().is_some_and(|d| d.starts_with("ready")))
    });
    assert_eq!(m["detail"], "ready: deferred by an app on the device");
    for _ in 0..10 {
        assert_eq!(answer(&agent, [0.1, 0.7, 0.2, 0.0]), Ok(1), "held back while the lease runs");
    }
    let (status, v) = agent.post("/v1/models/scorer:release", "");
    assert_eq!((status, v["released"].as_bool()), (200, Some(true)), "{v}");
    agent.wait_serving("scorer", 2);
}

#[test]
fn a_version_its_app_health_hook_fails_is_rolled_back_with_the_hook_s_reason() {
    // The app is happy with v1 and finds v2 sees nothing.
    let hook = r#"scorer=exec:test "$TERN_VERSION" != 2 || { echo no detections in 60 frames >&2; exit 1; }"#;
    let (coord, _dir, agent) = serving_v1_with("probation_secs = 30\n", &["--health-hook", hook], &[]);
    assign_v2(&coord, "scorer-a2.onnx");
    let m = wait_reported(&coord, 2, "v2 rolled back", |m| m["state"] == "failed");
    let detail = m["detail"].as_str().unwrap();
    assert!(detail.starts_with("rolled back: probation: the app's health hook failed: "), "{m}");
    assert!(detail.ends_with("exited with 1: no detections in 60 frames"), "{m}");
    agent.wait_serving("scorer", 1);
    let shown = wait_for("the rollback in the history", Duration::from_secs(10), || {
        let out = coord.ok(&["fleet", "show", "cam-01"]);
        out.contains("health hook failed").then_some(out)
    });
    assert!(shown.contains("rolled back"), "{shown}");
}
