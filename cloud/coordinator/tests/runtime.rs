//! The agent under strain: a model that fails inside the runtime, and more
//! concurrent requests than a model's workers and queue can hold.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn runtime_failure_marks_the_model_unhealthy_and_the_agent_stays_up() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_fixture("fragile", "fragile.onnx");
    coord.register_iris("iris");
    coord.ok(&["fleet", "assign", "cam-01", "fragile:1"]);
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    agent.start();
    agent.wait_serving("fragile", 1);
    agent.wait_serving("iris", 1);

    let (status, ok) = agent.post("/v1/models/fragile:predict", r#"{"inputs":[{"shape":[1],"data":[2]}]}"#);
    assert_eq!((status, ok["outputs"][0]["data"][0].as_f64()), (200, Some(3.0)));

    // Index 7 of a 4-element table: the signature matches, the run fails.
    let (status, err) = agent.post("/v1/models/fragile:predict", r#"{"inputs":[{"shape":[1],"data":[7]}]}"#);
    assert_eq!(status, 500, "{err}");
    assert!(err["error"].as_str().unwrap().starts_with("model failed while running"), "{err}");
    let m = agent.models()["models"].as_array().unwrap().iter().find(|m| m["name"] == "fragile").cloned().unwrap();
    assert_eq!(
        (m["state"].as_str(), m["healthy"].as_bool(), m["errors"].as_u64()),
        (Some("unhealthy"), Some(false), Some(1))
    );
    wait_for("the coordinator to hear of it", Duration::from_secs(10), || {
        let d = coord.device("cam-01");
        d["reported"].as_array()?.iter().any(|r| r["name"] == "fragile" && r["state"] == "unhealthy").then_some(())
    });
    assert!(coord.ok(&["fleet", "list"]).contains("fragile:1 unhealthy"));

    // The agent and its other model are fine; a good request heals the model.
    let (status, _) = agent.post("/v1/models/iris:predict", r#"{"inputs":[{"shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#);
    assert_eq!(status, 200);
    let (status, _) = agent.post("/v1/models/fragile:predict", r#"{"inputs":[{"shape":[1],"data":[0]}]}"#);
    assert_eq!(status, 200);
    wait_for("the coordinator to see it healthy", Duration::from_secs(10), || {
        let d = coord.device("cam-01");
        d["reported"].as_array()?.iter().any(|r| r["name"] == "fragile" && r["state"] == "serving").then_some(())
    });
}

#[test]
fn a_full_queue_answers_429_and_memory_stays_bounded() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_fixture("slow", "slow.onnx");
    coord.ok(&["fleet", "assign", "cam-01", "slow:1"]);
    agent.start_with(&["--threads", "1", "--queue", "1"]);
    agent.wait_serving("slow", 1);
    let m = &agent.models()["models"][0];
    assert_eq!((m["threads"].as_u64(), m["queue"].as_u64()), (Some(1), Some(1)));

    let before = peak_rss_kib(agent.pid());
    let agent = std::sync::Arc::new(agent);
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let agent = agent.clone();
            std::thread::spawn(move || {
                agent.post("/v1/models/slow:predict", r#"{"inputs":[{"shape":[1],"data":[0.5]}]}"#)
            })
        })
        .collect();
    let answers: Vec<(u16, serde_json::Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let busy: Vec<_> = answers.iter().filter(|(s, _)| *s == 429).collect();
    assert!(ok >= 1, "{answers:?}");
    assert!(!busy.is_empty(), "twelve concurrent requests on 1 worker + 1 slot never got 429: {answers:?}");
    assert_eq!(ok + busy.len(), 12, "{answers:?}");
    assert_eq!(busy[0].1["error"], "model \"slow\" is busy: 1 requests already queued; retry later");
    for (s, a) in &answers {
        if *s == 200 {
            assert_eq!(a["outputs"][0]["data"][0].as_f64(), Some(0.5 * 2048.0 * 2048.0));
        }
    }
    let m = &agent.models()["models"][0];
    assert_eq!(m["busy"].as_u64(), Some(busy.len() as u64));
    assert_eq!(m["requests"].as_u64(), Some(ok as u64));
    // Each run of this model expands to 16 MiB; one runs at a time, so
    // twelve requests at once cost about one run, not twelve (192 MiB).
    let grew = peak_rss_kib(agent.pid()) - before;
    assert!(grew < 48 << 10, "twelve requests raised the agent's peak RSS by {} MiB", grew >> 10);
}

#[test]
fn binary_tensors_and_non_finite_inputs() {
    use tern_proto::{Tensor, TensorData, decode_tensors};
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_iris("iris");
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    agent.start();
    agent.wait_serving("iris", 1);

    let x = Tensor::new(vec![2, 4], TensorData::F32(vec![5.1, 3.5, 1.4, 0.2, 6.9, 3.1, 5.4, 2.1])).unwrap();
    let (status, ct, body, timing) = agent.post_tensors_timed("/v1/models/iris:predict", &[x]);
    // Server-Timing: "queue;dur=Q, run;dur=R, handler;dur=H" in ms, the run inside the handler.
    let durs: Vec<(String, f64)> = timing
        .split(", ")
        .map(|p| {
            let (name, dur) = p.split_once(";dur=").unwrap_or_else(|| panic!("bad Server-Timing {timing:?}"));
            (name.to_owned(), dur.parse().unwrap())
        })
        .collect();
    let names: Vec<&str> = durs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["queue", "run", "handler"], "{timing}");
    assert!(durs[1].1 > 0.0 && durs[1].1 <= durs[2].1, "{timing}");
    assert_eq!((status, ct.as_str()), (200, tern_proto::TENSORS_MEDIA_TYPE));
    let out = decode_tensors(&body).unwrap();
    assert_eq!(out[0].data, TensorData::I64(vec![0, 2]));
    assert_eq!(out[1].shape, [2, 3]);

    // NaN and infinity pass through to the model and are counted.
    let x = Tensor::new(vec![1, 4], TensorData::F32(vec![f32::NAN, f32::INFINITY, 1.0, 1.0])).unwrap();
    let (status, _, _) = agent.post_tensors("/v1/models/iris:predict", &[x]);
    assert_eq!(status, 200);
    assert_eq!(agent.models()["models"][0]["nonfinite_inputs"].as_u64(), Some(2));

    // Wrong element type in a binary body: 400 naming the signature.
    let x = Tensor::new(vec![1, 4], TensorData::F64(vec![1.0; 4])).unwrap();
    let (status, _, body) = agent.post_tensors("/v1/models/iris:predict", &[x]);
    let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 400);
    assert_eq!(err["error"], "input \"X\" expects X: f32[?,4], got f64[1, 4] (model signature: X: f32[?,4])");

    // A body that is not the format at all.
    let mut resp = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
        .post(format!("{}/v1/models/iris:predict", agent.http))
        .header("content-type", tern_proto::TENSORS_MEDIA_TYPE)
        .send(&b"TT\x01\x01\x01\x02\x05"[..])
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let err: serde_json::Value = resp.body_mut().read_json().unwrap();
    assert!(err["error"].as_str().unwrap().starts_with("bad tensor body: truncated"), "{err}");
}
