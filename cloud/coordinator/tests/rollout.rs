//! Rollouts over real agents: a plan's waves reach every device, a
//! rollback puts them back, and bad plans are refused before any device is
//! touched.

mod common;
use common::*;
use serde_json::Value;
use std::time::Duration;

fn serving_v1(coord: &Coord, ids: &[&str]) -> Vec<Agent> {
    serving_v1_with(coord, ids, &[])
}

fn serving_v1_with(coord: &Coord, ids: &[&str], extra: &[&str]) -> Vec<Agent> {
    coord.register_iris("iris");
    ids.iter()
        .map(|id| {
            let mut a = Agent::enrolled(coord, id);
            coord.ok(&["fleet", "assign", id, "iris:1"]);
            a.start_with(extra);
            a
        })
        .collect::<Vec<_>>()
        .into_iter()
        .inspect(|a| a.wait_serving("iris", 1))
        .collect()
}

fn plan(coord: &Coord, name: &str, body: &str) -> String {
    let path = coord.dir.path().join(name);
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_owned()
}

fn phase(coord: &Coord, id: u64) -> Value {
    coord.json(&["rollout", "status", &id.to_string()])["phase"].clone()
}

#[test]
fn a_plan_goes_wave_by_wave_to_every_device_and_a_rollback_puts_them_back() {
    let coord = Coord::start();
    let agents = serving_v1(&coord, &["cam-01", "cam-02", "cam-03"]);
    coord.ok(&["fleet", "tag", "cam-03", "north"]);
    assert_eq!(coord.register_iris("iris"), 2);
    let good = plan(
        &coord,
        "good.toml",
        "model = \"iris\"\nversion = 2\nwaves = [34, 100]\nbake_secs = 4\ndeadline_secs = 60\n[gates]\nmax_failed = 0.0\n",
    );
    let started = coord.json(&["rollout", "start", &good]);
    let id = started["id"].as_u64().unwrap();
    let waves = started["waves"].as_array().unwrap();
    assert_eq!(waves.iter().map(|w| w["devices"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 1], "{started}");
    // The canary first: the third device is still on version 1 while it
    // bakes.
    wait_for("the canary updated", Duration::from_secs(60), || {
        let s = coord.json(&["rollout", "status", &id.to_string()]);
        (s["waves"][0]["succeeded"] == 2).then_some(())
    });
    let s = coord.json(&["rollout", "status", &id.to_string()]);
    assert!(s["phase"]["Baking"].is_object(), "{s}");
    let on_v1: Vec<&str> =
        ["cam-01", "cam-02", "cam-03"].into_iter().filter(|d| coord.device(d)["desired"]["iris"] == 1).collect();
    assert_eq!(on_v1.len(), 1, "one device waits for the second wave: {on_v1:?}");
    wait_for("every wave through", Duration::from_secs(60), || (phase(&coord, id) == "Done").then_some(()));
    for a in &agents {
        a.wait_serving("iris", 2);
    }
    let table = coord.ok(&["rollout", "list"]);
    assert!(table.contains("iris:2") && table.contains("done"), "{table}");
    // Rolled back after it finished, while version 1 is rejected: the
    // reverts wait; once it is approved again they go through, and every
    // device is on version 1 again.
    coord.ok(&["model", "reject", "iris:1"]);
    coord.ok(&["rollout", "rollback", &id.to_string()]);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(coord.device("cam-01")["desired"]["iris"], 2, "not reverted onto a rejected version");
    coord.ok(&["model", "approve", "iris:1"]);
    for a in &agents {
        a.wait_serving("iris", 1);
    }
    assert_eq!(phase(&coord, id), "RolledBack");
    for id in ["cam-01", "cam-02", "cam-03"] {
        assert_eq!(coord.device(id)["desired"]["iris"], 1);
    }
}

#[test]
fn bad_plans_are_refused_before_any_device_is_touched() {
    let coord = Coord::start();
    let _agents = serving_v1(&coord, &["cam-01", "cam-02"]);
    assert_eq!(coord.register_iris("iris"), 2);
    let generations = || ["cam-01", "cam-02"].map(|d| coord.device(d)["generation"].as_u64().unwrap());
    let before = generations();
    let cases = [
        ("model = \"iris\"\nversion = 2\n[select]\ngroup = \"nowhere\"\n", "no device has group \"nowhere\""),
        ("model = \"iris\"\nversion = 2\n[select]\ntags = [\"south\"]\n", "no device has tag \"south\""),
        ("model = \"iris\"\nversion = 2\nwaves = [10, 50]\n", "the last 100"),
        ("model = \"iris\"\nversion = 9\n", "has no version 9"),
        ("model = \"iris\"\nversion = 2\nwavez = [100]\n", "wavez"),
    ];
    for (i, (body, says)) in cases.iter().enumerate() {
        let err = coord.fails(&["rollout", "start", &plan(&coord, &format!("bad{i}.toml"), body)]);
        assert!(err.contains(says), "{body}: {err}");
    }
    // Not approved.
    let v = coord.json(&["model", "register", "iris", "--file", fixture("iris.onnx").to_str().unwrap()]);
    assert_eq!(v["version"], 3);
    let err = coord.fails(&["rollout", "start", &plan(&coord, "pending.toml", "model = \"iris\"\nversion = 3\n")]);
    assert!(err.contains("pending"), "{err}");
    assert_eq!(generations(), before, "no device touched");
    // One active rollout holds its devices: a second for them is refused.
    let slow = plan(&coord, "slow.toml", "model = \"iris\"\nversion = 2\nwaves = [50, 100]\nbake_secs = 3600\n");
    let id = coord.json(&["rollout", "start", &slow])["id"].as_u64().unwrap();
    let err = coord.fails(&["rollout", "start", &slow]);
    assert!(err.contains(&format!("rollout {id} of iris is active")), "{err}");
    // Paused, it still holds them; aborted, it lets them go.
    coord.ok(&["rollout", "pause", &id.to_string()]);
    let err = coord.fails(&["rollout", "pause", &id.to_string()]);
    assert!(err.contains("not allowed while the rollout is paused"), "{err}");
    assert!(coord.fails(&["rollout", "start", &slow]).contains("active"));
    coord.ok(&["rollout", "abort", &id.to_string()]);
    coord.ok(&["rollout", "start", &slow]);
}

#[test]
fn a_coordinator_killed_mid_rollout_goes_on_and_touches_no_device_twice() {
    let coord = Coord::start();
    let ids = ["cam-01", "cam-02", "cam-03", "cam-04"];
    // Agents that notice the coordinator gone within seconds (it was
    // killed: no connection close reaches them), so that they are back
    // within their deadline.
    let agents = serving_v1_with(&coord, &ids, &["--keep-alive-secs", "1", "--idle-timeout-secs", "4"]);
    assert_eq!(coord.register_iris("iris"), 2);
    let generations: Vec<u64> = ids.iter().map(|d| coord.device(d)["generation"].as_u64().unwrap()).collect();
    let body = "model = \"iris\"\nversion = 2\nwaves = [25, 50, 100]\nbake_secs = 2\ndeadline_secs = 60\n";
    let id = coord.json(&["rollout", "start", &plan(&coord, "plan.toml", body)])["id"].as_u64().unwrap();
    wait_for("the second wave", Duration::from_secs(60), || (phase(&coord, id)["Running"]["wave"] == 1).then_some(()));
    let quic = coord.quic.clone();
    let dir = coord.stop();
    let coord = Coord::start_in(dir, &["--quic-listen", &quic]).map_err(|(_, log)| log).unwrap();
    for _ in 0..45 {
        if phase(&coord, id) == "Done" {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let status = coord.json(&["rollout", "status", &id.to_string()]);
    assert_eq!(status["phase"], "Done", "{status}");
    for a in &agents {
        a.wait_serving("iris", 2);
    }
    // Each device's desired state changed once for the rollout.
    for (d, before) in ids.iter().zip(generations) {
        assert_eq!(coord.device(d)["generation"].as_u64().unwrap(), before + 1, "{d} touched more than once");
    }
}

#[test]
fn a_device_offline_during_its_wave_updates_when_it_returns() {
    let coord = Coord::start();
    let quick = ["--keep-alive-secs", "1", "--idle-timeout-secs", "4"];
    let mut agents = serving_v1_with(&coord, &["cam-01", "cam-02"], &quick);
    assert_eq!(coord.register_iris("iris"), 2);
    // cam-02 goes away before the rollout; its deadline (5 s) would pass
    // long before it returns, were an offline device counted down.
    let a = agents.pop().unwrap();
    let dir = a.dir;
    drop(a.proc);
    wait_for("cam-02 gone", Duration::from_secs(60), || (coord.status()["sessions"] == 1).then_some(()));
    let body = "model = \"iris\"\nversion = 2\nwaves = [100]\nbake_secs = 0\ndeadline_secs = 5\n";
    let id = coord.json(&["rollout", "start", &plan(&coord, "plan.toml", body)])["id"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let s = coord.json(&["rollout", "status", &id.to_string()]);
    assert_eq!((s["waves"][0]["succeeded"].as_u64(), s["waves"][0]["waiting"].as_u64()), (Some(1), Some(1)), "{s}");
    let mut back = Agent::new();
    back.dir = dir;
    back.start_with(&quick);
    back.wait_serving("iris", 2);
    wait_for("the rollout done", Duration::from_secs(30), || (phase(&coord, id) == "Done").then_some(()));
}
