//! The coordinator against hostile QUIC peers, with real certificates: one
//! address gets a bounded share of the connections without a certificate,
//! which get no unidirectional streams (tests/flood.rs measures a flood of
//! them); a device's certificate carries one control session; refusals are
//! logged with the peer's address, at a bounded rate.

mod common;

use common::attack::{attack, still_open};
use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use tern_proto::{ErrorCode, Message};

fn ca(coord: &Coord) -> Vec<u8> {
    std::fs::read(coord.data().join("ca.crt")).unwrap()
}

#[test]
fn one_address_gets_a_bounded_share_and_unidirectional_streams_get_nothing() {
    let coord = Coord::start_with(&["--max-per-address", "8"]);
    let rt = runtime();
    let held = rt.block_on(attack(&coord.quic, &ca(&coord), 40, 1, 1024));
    std::thread::sleep(Duration::from_millis(500));
    let open = rt.block_on(async {
        let mut n = 0;
        for c in &held {
            if still_open(c, Duration::from_millis(10)).await {
                n += 1;
            }
        }
        n
    });
    assert!(open <= 8, "{open} connections from one address stayed open");
    assert!(coord.status()["anonymous"].as_u64().unwrap() <= 8);

    // No credit for a unidirectional stream, ever.
    let pin = tern_net::ca_fingerprint(&std::fs::read(coord.data().join("ca.crt")).unwrap());
    let addr: SocketAddr = coord.quic.parse().unwrap();
    rt.block_on(async {
        let endpoint = tern_net::client_endpoint(addr).unwrap();
        let conn = endpoint
            .connect_with(tern_net::enroll_client_config(pin).unwrap(), addr, tern_net::COORDINATOR_NAME)
            .unwrap()
            .await
            .unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(1), conn.open_uni()).await.is_err());
    });
}

#[test]
fn a_crowd_of_handshakes_is_asked_to_prove_its_addresses() {
    let coord = Coord::start_with(&["--max-handshakes", "4"]);
    let rt = runtime();
    let held = rt.block_on(attack(&coord.quic, &ca(&coord), 40, 20, 1024));
    // Four handshakes at a time: the rest are refused, not queued.
    assert!(!held.is_empty(), "none of 40 got through");
    assert!(coord.log().contains("handshakes crowded: asking for address validation"), "{}", coord.log());
}

#[test]
fn a_second_session_with_one_devices_certificate_replaces_the_first() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-02");
    coord.register_iris("iris");
    coord.ok(&["fleet", "assign", "cam-02", "iris:1"]);
    let rt = runtime();

    // One connection, many control streams: only the first is a session.
    rt.block_on(async {
        let dev = RawDevice::connect(&coord, &agent, tern_proto::WireVersion::SUPPORTED).await.unwrap();
        // A stream that stalls in its first frame holds up no other stream.
        let (mut stalled, _r) = dev.conn.open_bi().await.unwrap();
        stalled.write_all(b"TN\x02").await.unwrap();
        let (_send, mut reader, first) = dev.ask(&hello("raw")).await.unwrap();
        assert!(matches!(first, Some(Message::Welcome(_))), "{first:?}");
        assert!(desired_of(reader.next().await.unwrap()).is_some());
        for _ in 0..20 {
            let (_s, _r, answer) = dev.ask(&hello("raw")).await.unwrap();
            match answer {
                Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::SessionConflict, "{}", e.message),
                other => panic!("a second control stream got {other:?}"),
            }
        }
        // At most 16 streams at once on a device's connection.
        let fresh = RawDevice::connect(&coord, &agent, tern_proto::WireVersion::SUPPORTED).await.unwrap();
        let mut open = Vec::new();
        for _ in 0..16 {
            let (mut send, recv) =
                tokio::time::timeout(Duration::from_secs(2), fresh.conn.open_bi()).await.unwrap().unwrap();
            send.write_all(b"T").await.unwrap();
            open.push((send, recv));
        }
        assert!(tokio::time::timeout(Duration::from_millis(500), fresh.conn.open_bi()).await.is_err(), "a 17th stream");
    });

    // The real agent, then a clone of it (its key and certificate): the
    // clone's session replaces the agent's, whose connection is closed; the
    // agent reconnects, which closes the clone's in turn.
    agent.start();
    agent.wait_serving("iris", 1);
    rt.block_on(async {
        let clone = RawDevice::connect(&coord, &agent, tern_proto::WireVersion::SUPPORTED).await.unwrap();
        let (_send, _reader, first) = clone.ask(&hello("clone")).await.unwrap();
        assert!(matches!(first, Some(Message::Welcome(_))), "{first:?}");
        tokio::time::timeout(Duration::from_secs(20), clone.conn.closed())
            .await
            .expect("the clone's session stays open");
    });
    let log = coord.log();
    assert!(log.contains("a second session for this device's certificate: closing the older one"), "{log}");
    assert!(log.contains("old=127.0.0.1:") && log.contains("new=127.0.0.1:"), "both addresses are named: {log}");
    assert!(agent.logs().contains("replaced by a newer session"), "{}", agent.logs());
    wait_for("cam-02's own report", Duration::from_secs(20), || {
        let d = coord.device("cam-02");
        (d["agent_version"] == tern_version()).then_some(())
    });
}

fn tern_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[test]
fn refused_peers_are_logged_with_their_address_at_a_bounded_rate() {
    let coord = Coord::start();
    let gone = Agent::enrolled(&coord, "cam-03");
    coord.ok(&["fleet", "remove", "cam-03"]);
    let rt = runtime();
    rt.block_on(async {
        // A certificate of our CA for a removed device: refused, named, logged.
        let refused = match RawDevice::connect(&coord, &gone, tern_proto::WireVersion::SUPPORTED).await {
            Ok(d) => d.ask(&hello("x")).await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "a removed device's certificate got a session");
        // 200 handshakes with a certificate from another CA.
        let addr: SocketAddr = coord.quic.parse().unwrap();
        let fleet_ca = std::fs::read(coord.data().join("ca.crt")).unwrap();
        let (foreign, _) = tern_net::FleetCa::generate("intruder").unwrap();
        let key = tern_net::DeviceKey::generate().unwrap();
        let cert = foreign.issue_device(&key.csr("x").unwrap(), "x", 1).unwrap();
        let config = tern_net::device_client_config(&fleet_ca, &cert, &key.pkcs8_der()).unwrap();
        let endpoint = tern_net::client_endpoint(addr).unwrap();
        for _ in 0..200 {
            if let Ok(c) = endpoint.connect_with(config.clone(), addr, tern_net::COORDINATOR_NAME) {
                let _ = tokio::time::timeout(Duration::from_secs(2), c).await;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let log = coord.log();
    let refused = log.lines().filter(|l| l.contains("certificate of removed device cam-03")).count();
    assert!(refused >= 1 && log.contains("remote=127.0.0.1:"), "{log}");
    let lines = log.lines().filter(|l| l.contains("handshake failed")).count();
    assert!((1..=40).contains(&lines), "{lines} handshake failures logged for 200");
    assert!(!log.lines().any(|l| l.contains("handshake failed") && l.contains("WARN")), "refusals are not warnings");
}

#[test]
fn a_device_gets_a_few_connections_each_of_which_must_open_its_session() {
    let coord = Coord::start();
    let agent = Agent::enrolled(&coord, "cam-05");
    let rt = runtime();
    rt.block_on(async {
        // Six connections with one certificate: the two oldest are closed.
        let mut conns = Vec::new();
        for _ in 0..6 {
            conns.push(RawDevice::connect(&coord, &agent, tern_proto::WireVersion::SUPPORTED).await.unwrap());
        }
        // The coordinator closes them as the newer ones arrive; under a
        // loaded test machine that may take a moment.
        for (i, c) in conns.iter().take(2).enumerate() {
            let closed = tokio::time::timeout(Duration::from_secs(5), c.conn.closed()).await;
            assert!(closed.is_ok(), "connection {i} stayed open");
        }
        let mut open = 0;
        for (i, c) in conns.iter().enumerate().skip(2) {
            let alive = still_open(&c.conn, Duration::from_millis(10)).await;
            assert!(alive, "connection {i}");
            open += usize::from(alive);
        }
        assert_eq!(open, 4);
        // One opens its session; the others, which open none, are closed
        // after 10 s (a session that goes quiet for 90 s would be too).
        let (_send, _reader, first) = conns[5].ask(&hello("raw")).await.unwrap();
        assert!(matches!(first, Some(Message::Welcome(_))));
        tokio::time::timeout(Duration::from_secs(15), conns[2].conn.closed())
            .await
            .expect("a sessionless connection stayed");
        assert!(still_open(&conns[5].conn, Duration::from_millis(10)).await);
    });
}

#[test]
fn removing_a_device_closes_all_its_connections_and_a_stale_one_cannot_act_for_its_successor() {
    let coord = Coord::start();
    let agent = Agent::enrolled(&coord, "cam-06");
    coord.register_iris("iris");
    let rt = runtime();
    rt.block_on(async {
        let session = RawDevice::connect(&coord, &agent, tern_proto::WireVersion::SUPPORTED).await.unwrap();
        let (_send, _reader, first) = session.ask(&hello("raw")).await.unwrap();
        assert!(matches!(first, Some(Message::Welcome(_))));
        let spare = RawDevice::connect(&coord, &agent, tern_proto::WireVersion::SUPPORTED).await.unwrap();
        coord.ok(&["fleet", "remove", "cam-06"]);
        for c in [&session, &spare] {
            tokio::time::timeout(Duration::from_secs(2), c.conn.closed())
                .await
                .expect("a connection of a removed device stayed");
        }
        // The id enrolls again, and is served; the old certificate is not.
        let successor = Agent::enrolled(&coord, "cam-06");
        coord.ok(&["fleet", "assign", "cam-06", "iris:1"]);
        let old = RawDevice::connect(&coord, &agent, tern_proto::WireVersion::SUPPORTED).await;
        if let Ok(old) = old {
            assert!(old.ask(&hello("stale")).await.is_err(), "the removed certificate got a session");
        }
        let new = RawDevice::connect(&coord, &successor, tern_proto::WireVersion::SUPPORTED).await.unwrap();
        let (_s, mut reader, first) = new.ask(&hello("new")).await.unwrap();
        assert!(matches!(first, Some(Message::Welcome(_))));
        assert!(matches!(desired_of(reader.next().await.unwrap()), Some(d) if d.models.len() == 1));
    });
}

#[test]
fn a_control_session_that_goes_quiet_is_closed() {
    let coord = Coord::start_with(&["--session-quiet-secs", "2"]);
    let agent = Agent::enrolled(&coord, "cam-07");
    runtime().block_on(async {
        let dev = RawDevice::connect(&coord, &agent, tern_proto::WireVersion::SUPPORTED).await.unwrap();
        let (mut send, _reader, first) = dev.ask(&hello("raw")).await.unwrap();
        assert!(matches!(first, Some(Message::Welcome(_))));
        // Half a frame, then nothing.
        send.write_all(b"TN\x02\x00\x10\x00\x00\x00abc").await.unwrap();
        tokio::time::timeout(Duration::from_secs(6), dev.conn.closed()).await.expect("a quiet session stayed open");
    });
}

#[test]
fn forged_telemetry_is_acknowledged_and_kept_out() {
    use tern_proto::{AlertChange, TelemetryAck, TelemetryBatch, TelemetryBody, TelemetryRecord, WindowSummary};
    let coord = Coord::start();
    let agent = Agent::enrolled(&coord, "cam-03");
    coord.register_iris("iris");
    let rt = runtime();
    rt.block_on(async {
        let dev = RawDevice::connect(&coord, &agent, tern_proto::WireVersion::SUPPORTED).await.unwrap();
        let (mut send, mut reader, first) = dev.ask(&hello("raw")).await.unwrap();
        assert!(matches!(first, Some(Message::Welcome(_))), "{first:?}");
        let _desired = reader.next().await.unwrap();
        let alert = |id, model: &str, rule: &str, feature: &str, value| TelemetryRecord {
            id,
            at_ms: 1,
            body: TelemetryBody::Alert(AlertChange {
                model: model.into(),
                version: 1,
                rule: rule.into(),
                feature: feature.into(),
                raised: true,
                value,
                threshold: 0.1,
            }),
        };
        let window = TelemetryRecord {
            id: 4,
            at_ms: 1,
            body: TelemetryBody::Window(WindowSummary {
                model: "iris".into(),
                version: 1,
                seq: 0,
                millis: 1,
                rows: 1,
                requests: 1,
                errors: 0,
                p99_us: None,
                profile: vec![0xff; 1000],
            }),
        };
        // Not assigned iris; a model that does not exist; a rule no agent
        // has; NaN; a profile that fits no layout.
        let records = vec![
            alert(1, "iris", "feature_drift", "x", f64::NAN),
            alert(2, "ghost", "feature_drift", "x", 1.0),
            alert(3, "iris", "made_up", "", 1.0),
            window,
        ];
        let batch = TelemetryBatch { stream: 42, dropped: 0, records };
        tern_net::write_msg(&mut send, &Message::Telemetry(batch), dev.version).await.unwrap();
        let mut ack = tokio::time::timeout(Duration::from_secs(10), reader.next()).await.unwrap().unwrap();
        // The telemetry route follows the first state (wire 8).
        if matches!(ack, Some(Message::Route(_))) {
            ack = tokio::time::timeout(Duration::from_secs(10), reader.next()).await.unwrap().unwrap();
        }
        assert_eq!(ack, Some(Message::TelemetryAck(TelemetryAck { stream: 42, up_to: 4 })));
    });
    assert_eq!(coord.json(&["alerts", "list", "--all"]), serde_json::json!([]));
    let (status, windows) = coord.admin_get("/v1/monitor/windows/iris");
    assert_eq!((status, windows.as_str()), (200, "[]"));
    let (status, _) = coord.admin_get("/metrics");
    assert_eq!(status, 200);
}

#[test]
fn forged_quality_counts_and_unasked_captures_are_acknowledged_and_kept_out() {
    use tern_proto::{
        CapturedSample, ModelState, ModelStatus, QualityCounts, QualityWindow, TelemetryBatch, TelemetryBody,
        TelemetryRecord,
    };
    let coord = Coord::start_with(&["--quality-alert", "accuracy=0.9", "--quality-min-rows", "1"]);
    let agent = Agent::enrolled(&coord, "cam-04");
    coord.register_iris("iris");
    // A version the device is never given; it claims to serve it.
    coord.register_iris("other");
    coord.ok(&["fleet", "assign", "cam-04", "iris:1"]);
    let quality = |id, model: &str, confusion: Vec<u64>| TelemetryRecord {
        id,
        at_ms: 1,
        body: TelemetryBody::Quality(QualityWindow {
            model: model.into(),
            version: 1,
            seq: id,
            millis: 1,
            counts: QualityCounts::Classes { classes: 2, confusion, other: 0, other_correct: 0 },
        }),
    };
    let capture = |id, inference_id: String| TelemetryRecord {
        id,
        at_ms: 1,
        body: TelemetryBody::Capture(CapturedSample {
            model: "iris".into(),
            version: 1,
            inference_id,
            inputs: tern_proto::encode_tensors(&[]).unwrap(),
            outputs: tern_proto::encode_tensors(&[]).unwrap(),
        }),
    };
    let rt = runtime();
    let send = |records: Vec<TelemetryRecord>, up_to: u64| {
        rt.block_on(async {
            let dev = RawDevice::connect(&coord, &agent, tern_proto::WireVersion::SUPPORTED).await.unwrap();
            let Message::Hello(mut hello) = hello("raw") else { unreachable!() };
            hello.models =
                vec![ModelStatus { name: "other".into(), version: 1, state: ModelState::Serving, detail: None }];
            let (mut send, mut reader, first) = dev.ask(&Message::Hello(hello)).await.unwrap();
            assert!(matches!(first, Some(Message::Welcome(_))), "{first:?}");
            let batch = TelemetryBatch { stream: 42, dropped: 0, records };
            tern_net::write_msg(&mut send, &Message::Telemetry(batch), dev.version).await.unwrap();
            loop {
                let m = tokio::time::timeout(Duration::from_secs(10), reader.next()).await.unwrap().unwrap();
                if let Some(Message::TelemetryAck(a)) = m {
                    assert_eq!(a.up_to, up_to);
                    break;
                }
            }
        })
    };
    // Counts that overflow a sum; a window of a version it only claims to
    // serve; a capture while the version has no policy; then a real
    // window at 50 %.
    send(
        vec![
            quality(1, "iris", vec![u64::MAX, u64::MAX, 1, 1]),
            quality(2, "other", vec![0, 5, 5, 0]),
            capture(3, "a".into()),
            quality(4, "iris", vec![1, 1, 1, 1]),
        ],
        4,
    );
    let alerts = coord.json(&["alerts", "list"]);
    let alerts = alerts.as_array().unwrap();
    assert_eq!(alerts.len(), 1, "only the real window raised one: {alerts:?}");
    assert_eq!((alerts[0]["model"].as_str(), alerts[0]["value"].as_f64()), (Some("iris"), Some(0.5)));
    let view = coord.json(&["monitor", "quality", "iris:1"]);
    assert_eq!(view["fleet"][0]["metrics"]["rows"], 4, "the forged window is kept out of the merge: {view}");
    let view = coord.json(&["monitor", "quality", "other:1"]);
    assert_eq!(view["windows"], serde_json::json!([]), "{view}");
    // With a policy: an id of 10 kB is kept out, a real one kept.
    coord.ok(&["monitor", "capture", "iris:1", "--share", "1"]);
    send(vec![capture(5, "x".repeat(10_000)), capture(6, "b".into())], 6);
    let (status, body) = coord.admin_get("/v1/models/iris/versions/1/captures");
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> =
        body["captures"].as_array().unwrap().iter().filter_map(|c| c["inference_id"].as_str()).collect();
    assert_eq!(ids, ["b"], "{body}");
}
