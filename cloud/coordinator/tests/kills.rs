//! The agent SIGKILLed at seeded random instants while it takes updates:
//! after every restart it serves a version it verified (answering as that
//! version does, never from a partial file), the generation it applied
//! never goes backwards, and `models/` holds only files whose digest is
//! their name. `TERN_SOAK_KILLS=200` for the long run (CI: 16).

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

#[test]
fn sigkill_at_random_instants_of_updates_never_leaves_a_partial_or_older_state() {
    let kills: u64 = std::env::var("TERN_SOAK_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
    let (coord, mut agent) = serving(&[], "scorer-a.onnx", "scorer");
    let mut rng = Rng(0x7e57_5eed);
    let mut applied = 0u64;
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..kills {
        // A new version every time, so that each one is an update of its
        // own (a version given up is not tried again): scorer-a and
        // scorer-a2 in turn, odd versions answering x, even ones 2x.
        let next = i + 2;
        let file = if next % 2 == 1 { "scorer-a.onnx" } else { "scorer-a2.onnx" };
        assert_eq!(coord.register_fixture("scorer", file), next);
        coord.ok(&["fleet", "assign", "cam-01", &format!("scorer:{next}")]);
        std::thread::sleep(Duration::from_millis(rng.below(2500)));
        if let Some(g) = coord.device("cam-01")["reported_generation"].as_u64() {
            applied = applied.max(g);
        }
        agent.proc.as_mut().unwrap().kill9();
        agent.start();
        // What the coordinator was told must be on the disk the agent came back to.
        let restored = agent.restored_generation();
        assert!(restored >= applied, "kill {i}: the agent reported generation {applied}, came back at {restored}");
        // It serves again, a version it verified, answering as that version.
        let (version, scores) =
            wait_for("an answer after the restart", Duration::from_secs(30), || scorer_answer(&agent));
        let factor = if version % 2 == 1 { 1.0 } else { 2.0 };
        let want: Vec<f64> = [0.1, 0.7, 0.2].iter().map(|x| x * factor).collect();
        assert!(scores.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "v{version} answered {scores:?}");
        // The generation it applied never goes back.
        let d: Value = wait_for("a status", Duration::from_secs(30), || {
            Some(coord.device("cam-01")).filter(|d| d["reported_generation"].as_u64().is_some())
        });
        let g = d["reported_generation"].as_u64().unwrap();
        assert!(g >= applied, "generation went back from {applied} to {g}");
        applied = g;
        // Only verified files in models/.
        for e in std::fs::read_dir(agent.data().join("models")).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let digest = tern_proto::Sha256Digest::of(&std::fs::read(e.path()).unwrap()).to_hex();
            assert_eq!(name, digest, "a file in models/ that is not what its name says");
        }
        let m = agent.models();
        let state =
            m["models"].as_array().unwrap().iter().find(|m| m["name"] == "scorer" && m["version"] == next).map_or(
                "not yet".to_string(),
                |m| {
                    let state = m["update"].as_str().or(m["state"].as_str()).unwrap_or("?");
                    match m["detail"].as_str() {
                        Some(d) if d.ends_with("(will retry)") => format!("{state}, to be tried again"),
                        _ => state.to_string(),
                    }
                },
            );
        *outcomes.entry(format!("the new version {state}")).or_default() += 1;
    }
    // And it still takes updates once left alone.
    let v = coord.register_fixture("scorer", "scorer-a.onnx");
    coord.ok(&["fleet", "assign", "cam-01", &format!("scorer:{v}")]);
    agent.wait_serving("scorer", v);
    eprintln!("{kills} kills; the new version right after each restart: {outcomes:?}");
}
