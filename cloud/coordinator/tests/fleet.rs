//! The fleet as an operator runs it: approval governs what is deployed,
//! devices can be unassigned and removed (their certificate refused from
//! then on), a model an agent cannot run is refused up front or, failing
//! that, alone with its reason, each device learns only of its own changes,
//! and the coordinator refuses to start without the keys its fleet trusts.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;
use tern_proto::Message;

const IRIS: &str = r#"{"inputs":[{"name":"X","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#;

fn nnef_iris(coord: &Coord) -> std::path::PathBuf {
    let nnef = tern_runtime::onnx_to_nnef(&std::fs::read(fixture("iris.onnx")).unwrap(), None).unwrap();
    let path = coord.dir.path().join("iris.nnef.tar");
    std::fs::write(&path, nnef).unwrap();
    path
}

#[test]
fn a_model_the_agent_cannot_run_is_refused_alone_and_up_front_once_known() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_iris("iris");
    coord.ok(&["model", "register", "iris-nnef", "--file", nnef_iris(&coord).to_str().unwrap()]);
    coord.ok(&["model", "approve", "iris-nnef:1"]);
    // Assigned before the agent ever connected: the coordinator cannot know
    // yet that this agent takes compiled models only.
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    coord.ok(&["fleet", "assign", "cam-01", "iris-nnef:1"]);
    agent.start_with(&["--formats", "nnef,burn"]);
    // The other model is served; the ONNX one is refused, with the reason,
    // on the device and in the fleet view.
    agent.wait_serving("iris-nnef", 1);
    let why = "iris:1 is onnx; this agent build runs nnef, burn";
    wait_for("the refusal in fleet list", Duration::from_secs(10), || {
        let d = coord.device("cam-01");
        d["reported"]
            .as_array()?
            .iter()
            .any(|r| r["name"] == "iris" && r["state"] == "failed" && r["detail"] == why)
            .then_some(())
    });
    assert!(coord.ok(&["fleet", "list"]).contains(why));
    // Now the coordinator knows what the agent runs, and refuses at once.
    coord.register_iris("iris");
    coord.ok(&["model", "approve", "iris:2"]);
    let err = coord.fails(&["fleet", "assign", "cam-01", "iris:2"]);
    assert_eq!(
        err.trim(),
        "error: cam-01's agent runs nnef, burn; iris:2 is onnx (register its NNEF form, which every agent runs)"
    );
    assert_eq!(coord.device("cam-01")["desired"]["iris"], 1);
}

#[test]
fn approval_governs_what_is_deployed_and_devices_can_be_unassigned_and_removed() {
    let coord = Coord::start();
    let mut a = Agent::enrolled(&coord, "cam-01");
    let mut b = Agent::enrolled(&coord, "cam-02");
    coord.register_iris("iris");
    for id in ["cam-01", "cam-02"] {
        coord.ok(&["fleet", "assign", id, "iris:1"]);
    }
    a.start();
    b.start();
    a.wait_serving("iris", 1);
    b.wait_serving("iris", 1);

    // Rejecting a deployed version says what it would do, and does nothing.
    let err = coord.fails(&["model", "reject", "iris:1"]);
    assert_eq!(
        err.trim(),
        "error: iris:1 is assigned to cam-01, cam-02; unassign it first, or reject with --force to unassign it from them"
    );
    assert_eq!(a.post("/v1/models/iris:predict", IRIS).0, 200);

    // Unassign one device: it stops serving the model.
    coord.ok(&["fleet", "unassign", "cam-02", "iris"]);
    wait_for("cam-02 to unload iris", Duration::from_secs(20), || {
        (b.post("/v1/models/iris:predict", IRIS).0 == 404).then_some(())
    });
    assert!(
        coord.fails(&["fleet", "unassign", "cam-02", "iris"]).contains("cam-02 has no version of \"iris\" assigned")
    );

    // --force: rejected and unassigned everywhere, in one step.
    let out = coord.ok(&["model", "reject", "iris:1", "--force"]);
    assert!(out.contains("iris:1 is now rejected") && out.contains("unassigned from cam-01"), "{out}");
    wait_for("cam-01 to unload iris", Duration::from_secs(20), || {
        (a.post("/v1/models/iris:predict", IRIS).0 == 404).then_some(())
    });
    assert_eq!(coord.device("cam-01")["desired"], json!({}));

    // Remove a device: its session is closed at once and its certificate
    // refused from then on; its id may enroll again.
    let out = coord.ok(&["fleet", "remove", "cam-01"]);
    assert_eq!(out.trim(), "removed cam-01; its certificate is refused from now on");
    wait_for("cam-01 to learn it was removed", Duration::from_secs(20), || {
        a.logs().contains("removed from the fleet").then_some(())
    });
    assert!(coord.device("cam-01").is_null());
    std::thread::sleep(Duration::from_secs(1));
    assert!(coord.log().contains("certificate of removed device cam-01"), "{}", coord.log());
    assert!(coord.device("cam-01").is_null(), "a removed device's reconnect must not bring it back");
    a.proc.as_mut().unwrap().kill9();
    let again = Agent::enrolled(&coord, "cam-01");
    assert!(again.data().join("identity/device.crt").is_file());
}

#[test]
fn each_device_hears_only_of_its_own_changes_and_reports_what_it_applied() {
    let coord = Coord::start();
    let agents: Vec<Agent> = (0..3).map(|i| Agent::enrolled(&coord, &format!("cam-{i}"))).collect();
    coord.register_iris("iris");
    coord.register_iris("iris");
    let token = coord.admin_token();
    let http = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let assign = |id: &str, version: u32| {
        let status = http
            .put(format!("{}/v1/devices/{id}/models/iris", coord.admin))
            .header("authorization", format!("Bearer {token}"))
            .send_json(json!({ "version": version }))
            .unwrap()
            .status();
        assert_eq!(status, 200);
    };
    let rt = runtime();
    rt.block_on(async {
        let mut sessions = Vec::new();
        for a in &agents {
            let dev = RawDevice::connect(&coord, a, tern_proto::WireVersion::SUPPORTED).await.unwrap();
            let (send, mut reader, first) = dev.ask(&hello("raw")).await.unwrap();
            assert!(matches!(first, Some(Message::Welcome(_))));
            assert!(matches!(desired_of(reader.next().await.unwrap()), Some(d) if d.generation == 0));
            sessions.push((dev, send, reader));
        }
        // 300 changes to cam-0 alone.
        let coord_admin = (coord.admin.clone(), token.clone());
        tokio::task::spawn_blocking(move || {
            let http = ureq::Agent::config_builder().build().new_agent();
            for i in 0..300u32 {
                http.put(format!("{}/v1/devices/cam-0/models/iris", coord_admin.0))
                    .header("authorization", format!("Bearer {}", coord_admin.1))
                    .send_json(json!({ "version": 1 + i % 2 }))
                    .unwrap();
            }
        })
        .await
        .unwrap();
        // cam-0 converges on the newest state; the others heard nothing.
        let (_, _, reader) = &mut sessions[0];
        let mut last = 0;
        while last < 300 {
            let msg = tokio::time::timeout(Duration::from_secs(10), reader.next()).await.unwrap().unwrap();
            // The telemetry route follows the first state (wire 8).
            if matches!(msg, Some(Message::Route(_))) {
                continue;
            }
            match desired_of(msg.clone()) {
                Some(d) => last = d.generation,
                None => panic!("{msg:?}"),
            }
        }
        for (_, _, reader) in &mut sessions[1..] {
            let mut heard = tokio::time::timeout(Duration::from_millis(500), reader.next()).await;
            if matches!(heard, Ok(Ok(Some(Message::Route(_))))) {
                heard = tokio::time::timeout(Duration::from_millis(500), reader.next()).await;
            }
            assert!(heard.is_err(), "another device heard of cam-0's change: {heard:?}");
        }
    });
    // A real agent reports the generation it applied.
    let mut agent = Agent::enrolled(&coord, "cam-9");
    assign("cam-9", 1);
    assign("cam-9", 2);
    agent.start();
    agent.wait_serving("iris", 2);
    wait_for("the applied generation", Duration::from_secs(10), || {
        let d = coord.device("cam-9");
        (d["reported_generation"] == 2 && d["generation"] == 2).then_some(())
    });
    assert!(coord.ok(&["fleet", "list"]).contains("(generation 2, applied)"));
}

#[test]
fn the_coordinator_refuses_to_start_without_the_keys_its_fleet_trusts() {
    let coord = Coord::start();
    let _agent = Agent::enrolled(&coord, "cam-01");
    let mut dir = coord.stop();
    for key in ["ca.crt", "ca.key", "registry.key"] {
        let path = dir.path().join("data").join(key);
        let saved = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let (back, log) = match Coord::start_in(dir, &[]) {
            Ok(c) => panic!("started without {key}: {}", c.log()),
            Err(e) => e,
        };
        dir = back;
        assert!(log.contains(&format!("{} is missing, but this data dir has a registry", path.display())), "{log}");
        assert!(!path.exists(), "{key} was made again");
        std::fs::write(&path, saved).unwrap();
    }
    // With every key back, it starts, and the enrolled device is still its own.
    let coord = Coord::start_in(dir, &[]).map_err(|(_, log)| log).unwrap();
    assert!(!coord.device("cam-01").is_null());
}

#[test]
fn an_empty_admin_token_is_refused_and_device_text_is_printed_safely() {
    let coord = Coord::start();
    let agent = Agent::enrolled(&coord, "cam-01");
    // A device that reports terminal escapes: stored and printed without them.
    runtime().block_on(async {
        let dev = RawDevice::connect(&coord, &agent, tern_proto::WireVersion::SUPPORTED).await.unwrap();
        let Message::Hello(mut h) = hello("1.0\x1b[2J\x1b[31mevil") else { unreachable!() };
        h.models.push(tern_proto::ModelStatus {
            name: "m\x07".into(),
            version: 1,
            state: tern_proto::ModelState::Failed,
            detail: Some("bad\x1b]0;title\x07\nnews".into()),
        });
        let (_s, _r, first) = dev.ask(&Message::Hello(h)).await.unwrap();
        assert!(matches!(first, Some(Message::Welcome(_))));
    });
    let table = coord.ok(&["fleet", "list"]);
    assert!(!table.contains('\x1b') && !table.contains('\x07'), "{table:?}");
    assert!(table.contains("1.0[2J[31mevil"), "{table}");

    // An empty token would match a request with none: refused at start.
    let dir = coord.stop();
    std::fs::write(dir.path().join("data/admin.token"), "\n").unwrap();
    let (_, log) = Coord::start_in(dir, &[]).err().expect("started with an empty admin token");
    assert!(log.contains("admin.token is empty"), "{log}");
}

#[test]
fn the_admin_token_is_never_taken_from_the_command_line() {
    let coord = Coord::start();
    let out = std::process::Command::new(tern_bin())
        .args(["--admin", &coord.admin, "--token", &coord.admin_token(), "model", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let help = coord.ok(&["--help"]);
    assert!(help.contains("TERN_ADMIN_TOKEN") && help.contains("--token-file"), "{help}");
    let file = coord.dir.path().join("token");
    std::fs::write(&file, coord.admin_token()).unwrap();
    let out = std::process::Command::new(tern_bin())
        .args(["--admin", &coord.admin, "--token-file", file.to_str().unwrap(), "--json", "model", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn agents_count_their_traffic_per_day_and_say_how_often_they_will_speak() {
    // The coordinator would close a session silent for 2 s; the agent says
    // it reports every 3 s, and is given three of those.
    let coord = Coord::start_with(&["--session-quiet-secs", "2"]);
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_iris("iris");
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    agent.start_with(&["--heartbeat-secs", "3"]);
    agent.wait_serving("iris", 1);
    let model = std::fs::metadata(fixture("iris.onnx")).unwrap().len();
    let quic = |d: &serde_json::Value| {
        let t = d["traffic"].as_array()?.iter().find(|x| x["link"] == "quic")?.clone();
        Some((t["day"].as_u64()?, t["sent"].as_u64()?, t["received"].as_u64()?))
    };
    // The download went over the link: what came in holds the model.
    let (day, sent, _) = wait_for("a traffic report with the download", Duration::from_secs(20), || {
        quic(&coord.device("cam-01")).filter(|(_, _, r)| *r > model)
    });
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(day, now / 86_400, "counted on today's date (UTC)");
    assert!(sent > 1200, "the handshake alone is over 1200 bytes: {sent}");
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(agent.logs().matches("connected to coordinator").count(), 1, "{}", agent.logs());
    assert!(!coord.log().contains("no frame from the device"), "{}", coord.log());
    // The local API counts the same link; the table shows today so far.
    let (_, local) = agent.get("/v1/telemetry");
    assert!(local["traffic"].as_array().unwrap().iter().any(|x| x["link"] == "quic"), "{local}");
    let table = coord.ok(&["fleet", "list"]);
    assert!(table.contains("bytes/day") && table.contains("so far ↑"), "{table}");
    // Killed and started again, the agent counts on from what it wrote down.
    let (_, before, _) = quic(&coord.device("cam-01")).unwrap();
    agent.proc.as_mut().unwrap().kill9();
    agent.start_with(&["--heartbeat-secs", "3"]);
    wait_for("the count to carry on", Duration::from_secs(20), || {
        let (_, after, _) = quic(&coord.device("cam-01"))?;
        (after > before && agent.logs().matches("connected to coordinator").count() == 2).then_some(())
    });
    let saved: Vec<tern_proto::LinkDay> =
        serde_json::from_slice(&std::fs::read(agent.data().join("traffic.json")).unwrap()).unwrap();
    assert!(saved.iter().any(|d| d.link == "quic" && d.sent >= before), "{saved:?}");
}

#[test]
fn a_metered_agent_holds_no_session_and_takes_changes_at_its_next_one() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_iris("iris");
    agent.start_with(&["--metered", "10"]);
    let closed = || {
        let s = coord.status();
        (s["sessions"] == 0 && s["connections"] == 0).then_some(())
    };
    // It reports, then hangs up.
    wait_for("the first session's report", Duration::from_secs(20), || {
        coord.device("cam-01")["traffic"].as_array().filter(|t| !t.is_empty()).map(|_| ())
    });
    wait_for("the session to close", Duration::from_secs(10), closed);
    // A change waits for the next session, which stays up for the download
    // and the report of it.
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    let assigned = std::time::Instant::now();
    agent.wait_serving("iris", 1);
    assert!(assigned.elapsed() < Duration::from_secs(20), "taken after {:?}", assigned.elapsed());
    wait_for("serving reported", Duration::from_secs(20), || {
        let d = coord.device("cam-01");
        d["reported"].as_array()?.iter().any(|m| m["name"] == "iris" && m["state"] == "serving").then_some(())
    });
    wait_for("the session to close again", Duration::from_secs(10), closed);
    // The agent says so once its side is closed, after the coordinator may
    // have counted it gone.
    wait_for("the agent to log the second close", Duration::from_secs(10), || {
        (agent.logs().matches("metered session closed").count() >= 2).then_some(())
    });
    let logs = agent.logs();
    let sessions = logs.matches("connected to coordinator").count();
    let ended = logs.matches("metered session closed").count();
    assert!(sessions >= 2 && ended >= 2, "{sessions} sessions, {ended} closed: {logs}");
    assert!(!logs.contains("retrying"), "a metered session ended in an error: {logs}");
    // The coordinator read each session to its end and closed it.
    let log = coord.log();
    let ends: Vec<&str> = log.lines().filter(|l| l.contains("device disconnected")).collect();
    assert!(ends.len() >= 2 && ends.iter().all(|l| l.contains("disconnected: closed")), "{ends:#?}");
}
