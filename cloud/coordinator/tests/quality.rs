//! Ground truth and data capture end to end: every answer carries an
//! inference id, an app posts the truth for it, the agent's quality windows
//! reach the coordinator (over QUIC, and over MQTT), which keeps them,
//! merges them for the fleet and raises and clears accuracy alerts; a
//! version's capture policy reaches the agent in its signed manifest and
//! the captured samples come back within the daily budget.

mod common;
use common::*;
use serde_json::Value;
use std::time::Duration;

const SETOSA: &str = r#"{"inputs":[{"shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#;

/// Asks once and posts `label` as the truth; the inference id.
fn ask_and_tell(agent: &Agent, label: i64) -> String {
    let (status, answer) = agent.post("/v1/models/iris:predict", SETOSA);
    assert_eq!(status, 200, "{answer}");
    let id = answer["inference_id"].as_str().expect("an inference id").to_owned();
    let (status, fb) = agent.post("/v1/models/iris:feedback", &format!(r#"{{"inference_id":"{id}","label":{label}}}"#));
    assert_eq!((status, fb["counted"].as_u64()), (200, Some(1)), "{fb}");
    id
}

fn quality_alerts(coord: &Coord, all: bool) -> Vec<Value> {
    let args: &[&str] = if all { &["alerts", "list", "--all"] } else { &["alerts", "list"] };
    let list = coord.json(args);
    list.as_array().unwrap().iter().filter(|a| a["rule"] == "accuracy").cloned().collect()
}

fn run(coord: &Coord, agent: &mut Agent, extra: &[&str]) {
    coord.register_iris("iris");
    // Set before the assignment: the first desired state carries it.
    coord.ok(&["monitor", "capture", "iris:1", "--share", "1", "--daily-bytes", "1000"]);
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    let mut args = vec!["--quality-window-rows", "20", "--feedback-secs", "4"];
    args.extend_from_slice(extra);
    agent.start_with(&args);
    agent.wait_serving("iris", 1);

    // Bad feedback is refused and counts nothing.
    let (status, answer) = agent.post("/v1/models/iris:predict", SETOSA);
    assert_eq!(status, 200);
    let id = answer["inference_id"].as_str().unwrap().to_owned();
    let (status, e) = agent.post("/v1/models/iris:feedback", &format!(r#"{{"inference_id":"{id}","labels":[0,0]}}"#));
    assert_eq!(status, 400, "{e}");
    let (status, e) = agent.post("/v1/models/iris:feedback", &format!(r#"{{"inference_id":"{id}","value":1.5}}"#));
    assert_eq!(status, 400, "a classifier takes labels: {e}");
    let (status, e) = agent.post("/v1/models/iris:feedback", r#"{"inference_id":"nope","label":0}"#);
    assert_eq!(status, 404, "{e}");
    let (status, _) = agent.post("/v1/models/iris:feedback", &format!(r#"{{"inference_id":"{id}","label":0}}"#));
    assert_eq!(status, 200);
    let (status, e) = agent.post("/v1/models/iris:feedback", &format!(r#"{{"inference_id":"{id}","label":0}}"#));
    assert_eq!(status, 404, "counted once: {e}");

    // 19 more told wrong: a window of 20 at 5 % accuracy raises an alert.
    let mut ids = vec![id];
    for _ in 0..19 {
        ids.push(ask_and_tell(agent, 2));
    }
    let raised = wait_for("an accuracy alert", Duration::from_secs(30), || {
        quality_alerts(coord, false).into_iter().find(|a| a["cleared_at_ms"].is_null())
    });
    assert_eq!((raised["device"].as_str(), raised["threshold"].as_f64()), (Some("cam-01"), Some(0.9)), "{raised}");
    assert!((raised["value"].as_f64().unwrap() - 0.05).abs() < 1e-9, "{raised}");
    // 20 told right: accuracy 1, past the clearing level, and it clears.
    for _ in 0..20 {
        ids.push(ask_and_tell(agent, 0));
    }
    wait_for("the alert cleared", Duration::from_secs(30), || {
        quality_alerts(coord, true).iter().all(|a| !a["cleared_at_ms"].is_null()).then_some(())
    });
    assert_eq!(quality_alerts(coord, true).len(), 1, "raised once");
    let view = coord.json(&["monitor", "quality", "iris:1"]);
    assert_eq!(view["windows"].as_array().unwrap().len(), 2, "{view}");
    let fleet = &view["fleet"][0]["metrics"];
    assert_eq!(fleet["rows"], 40, "{view}");
    assert!((fleet["accuracy"].as_f64().unwrap() - 21.0 / 40.0).abs() < 1e-9, "{view}");
    let table = coord.ok(&["monitor", "quality", "iris"]);
    assert!(table.contains("0.525") && table.contains("cam-01"), "{table}");

    // Every request was drawn; the day's 1000 bytes stopped the captures
    // well before the 40 requests, and the ones kept came back.
    let (_, local) = agent.get("/v1/models/iris/quality");
    let captured = local["captured"].as_u64().unwrap();
    assert!((5..40).contains(&captured), "{local}");
    assert_eq!(local["captured"].as_u64().unwrap() + local["capture_skipped"].as_u64().unwrap(), 40, "{local}");
    let file = coord.dir.path().join("captures.jsonl");
    let lines = wait_for("the captures", Duration::from_secs(30), || {
        coord.ok(&["monitor", "captures", "iris:1", "--out", file.to_str().unwrap()]);
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (lines.len() as u64 == captured).then_some(lines)
    });
    for (c, id) in lines.iter().zip(&ids) {
        assert_eq!(c["inference_id"].as_str(), Some(id.as_str()), "in order of the requests: {c}");
        assert_eq!(c["device"], "cam-01");
        assert_eq!(c["inputs"][0]["shape"], serde_json::json!([1, 4]));
        assert_eq!(c["inputs"][0]["data"][0].as_f64().map(|x| (x * 10.0).round()), Some(51.0), "{c}");
        assert_eq!(c["outputs"][0]["data"][0], 0.0, "{c}");
    }
    // The policy and the day's bytes are kept on disk: after a SIGKILL
    // and a restart the day's budget is still spent.
    let kept: Value = serde_json::from_slice(&std::fs::read(agent.data().join("capture.json")).unwrap()).unwrap();
    assert_eq!(kept["iris"], serde_json::json!([1, { "per_million": 1_000_000, "daily_bytes": 1000 }]), "{kept}");
    agent.proc.as_mut().unwrap().kill9();
    agent.start_with(&args);
    agent.wait_serving("iris", 1);
    agent.post("/v1/models/iris:predict", SETOSA);
    let (_, local) = agent.get("/v1/models/iris/quality");
    assert_eq!((local["captured"].as_u64(), local["capture_skipped"].as_u64()), (Some(0), Some(1)), "{local}");
    let lines_after = {
        coord.ok(&["monitor", "captures", "iris:1", "--out", file.to_str().unwrap()]);
        std::fs::read_to_string(&file).unwrap().lines().count() as u64
    };
    assert_eq!(lines_after, captured, "nothing more captured that day");
    // Capture off: a new state, and nothing more is captured.
    coord.ok(&["monitor", "capture", "iris:1", "--off"]);
    let before = coord.device("cam-01")["generation"].as_u64().unwrap();
    wait_for("the new state applied", Duration::from_secs(20), || {
        (coord.device("cam-01")["reported_generation"].as_u64()? >= before).then_some(())
    });
    agent.post("/v1/models/iris:predict", SETOSA);
    let (_, after) = agent.get("/v1/models/iris/quality");
    assert_eq!(
        (after["captured"].as_u64(), after["capture_skipped"].as_u64()),
        (local["captured"].as_u64(), local["capture_skipped"].as_u64()),
        "{after}"
    );
    wait_for("capture.json emptied", Duration::from_secs(10), || {
        let kept: Value = serde_json::from_slice(&std::fs::read(agent.data().join("capture.json")).ok()?).ok()?;
        (kept == serde_json::json!({})).then_some(())
    });

    // An answer of version 1 takes its truth after version 2 replaced it,
    // and its window reaches the coordinator once the answers have waited
    // their --feedback-secs.
    let (_, answer) = agent.post("/v1/models/iris:predict", SETOSA);
    let old = answer["inference_id"].as_str().unwrap().to_owned();
    assert_eq!(coord.register_iris("iris"), 2);
    coord.ok(&["fleet", "assign", "cam-01", "iris:2"]);
    agent.wait_serving("iris", 2);
    let (status, fb) = agent.post("/v1/models/iris:feedback", &format!(r#"{{"inference_id":"{old}","label":0}}"#));
    assert_eq!((status, fb["version"].as_u64()), (200, Some(1)), "{fb}");
    wait_for("version 1's last window", Duration::from_secs(30), || {
        let view = coord.json(&["monitor", "quality", "iris:1"]);
        (view["windows"].as_array()?.len() == 3).then_some(())
    });
}

#[test]
fn ground_truth_becomes_quality_windows_and_alerts_and_captures_keep_to_their_budget() {
    let coord = Coord::start_with(&["--quality-alert", "accuracy=0.9", "--quality-min-rows", "10"]);
    let mut agent = Agent::enrolled(&coord, "cam-01");
    run(&coord, &mut agent, &[]);
    // The binary answer carries the id in a header, and it takes feedback.
    let t = tern_proto::Tensor::new(vec![1, 4], tern_proto::TensorData::F32(vec![5.1, 3.5, 1.4, 0.2])).unwrap();
    let resp = ureq::post(format!("{}/v1/models/iris:predict", agent.http))
        .header("content-type", tern_proto::TENSORS_MEDIA_TYPE)
        .send(&tern_proto::encode_tensors(&[t]).unwrap()[..])
        .unwrap();
    let id = resp.headers().get("x-tern-inference-id").expect("the id header").to_str().unwrap().to_owned();
    let (status, fb) = agent.post("/v1/models/iris:feedback", &format!(r#"{{"inference_id":"{id}","label":0}}"#));
    assert_eq!(status, 200, "{fb}");
}

#[test]
fn over_mqtt_too() {
    let coord =
        Coord::start_with(&["--telemetry", "mqtt", "--quality-alert", "accuracy=0.9", "--quality-min-rows", "10"]);
    let mut agent = Agent::enrolled(&coord, "cam-01");
    run(&coord, &mut agent, &["--heartbeat-secs", "2"]);
    // The MQTT link's bytes are counted (TCP's counters and headers; the
    // TLS handshake with its certificates alone is over a kB each way) and
    // reported with the QUIC link's.
    let mqtt_sent = |days: &Value| {
        days.as_array()?.iter().find(|d| d["link"] == "mqtt").and_then(|d| d["sent"].as_u64()).filter(|s| *s > 1000)
    };
    wait_for("the agent's MQTT bytes", Duration::from_secs(30), || mqtt_sent(&agent.get("/v1/telemetry").1["traffic"]));
    wait_for("MQTT bytes at the coordinator", Duration::from_secs(30), || {
        mqtt_sent(&coord.device("cam-01")["traffic"])
    });
    let (_, metrics) = coord.admin_get("/metrics");
    assert!(metrics.contains(r#"tern_telemetry_batches_total{link="mqtt"}"#), "{metrics}");
    assert!(agent.logs().contains("sending telemetry over MQTT"), "over MQTT");
}

#[test]
fn an_agent_restarted_offline_keeps_its_capture_policy_and_the_day_s_budget() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_iris("iris");
    coord.ok(&["monitor", "capture", "iris:1", "--share", "1", "--daily-bytes", "300"]);
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    agent.start();
    agent.wait_serving("iris", 1);
    let skipped = || agent.get("/v1/models/iris/quality").1["capture_skipped"].as_u64().unwrap();
    while skipped() == 0 {
        agent.post("/v1/models/iris:predict", SETOSA);
    }
    let captured = agent.get("/v1/models/iris/quality").1["captured"].as_u64().unwrap();
    assert!(captured > 0);
    // The coordinator goes away; the agent is killed and starts again
    // offline: it captures under the kept policy, and the day is spent.
    wait_for("the captures on disk", Duration::from_secs(10), || {
        (agent.get("/v1/telemetry").1["queued"] == 0).then_some(())
    });
    let _dir = coord.stop();
    agent.proc.as_mut().unwrap().kill9();
    agent.start();
    agent.wait_answering("iris", 1);
    agent.post("/v1/models/iris:predict", SETOSA);
    let (_, local) = agent.get("/v1/models/iris/quality");
    assert_eq!((local["captured"].as_u64(), local["capture_skipped"].as_u64()), (Some(0), Some(1)), "{local}");
}

#[test]
fn the_mqtt_link_s_bytes_reach_the_coordinator_on_the_state_topic() {
    // The control session reports traffic at its start and every 300 s
    // (the default heartbeat): the MQTT link's bytes, counted from its
    // first connection on, arrive sooner only on `tern/v1/<id>/state`.
    let coord = Coord::start_with(&["--telemetry", "mqtt", "--quality-min-rows", "1"]);
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_iris("iris");
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    agent.start_with(&["--quality-window-rows", "1"]);
    agent.wait_serving("iris", 1);
    ask_and_tell(&agent, 0);
    wait_for("MQTT bytes at the coordinator", Duration::from_secs(30), || {
        let days = coord.device("cam-01")["traffic"].clone();
        days.as_array()?.iter().find(|d| d["link"] == "mqtt").and_then(|d| d["sent"].as_u64()).filter(|s| *s > 1000)
    });
}
