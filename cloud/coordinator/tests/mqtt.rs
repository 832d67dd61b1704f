//! Telemetry over MQTT, on the embedded broker (rmqtt) and on a real
//! Mosquitto (Debian's, which `scripts/test` installs) configured by
//! `tern broker mosquitto-config`: drift windows delivered once and in
//! order through an agent SIGKILL and a coordinator restart, each device
//! kept to its own topics, clients without a fleet certificate refused.

mod common;

use common::{Agent, Coord, Proc, Rng, fixture, wait_for};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A baseline for iris.onnx (four features), seeded.
fn baseline_csv(path: &Path) {
    let mut rng = Rng(7);
    let mut text = String::from("sepal_length,sepal_width,petal_length,petal_width\n");
    for _ in 0..200 {
        let row: Vec<String> =
            (0..4).map(|i| format!("{:.3}", 1.0 + i as f64 + rng.below(1000) as f64 / 500.0)).collect();
        text.push_str(&row.join(","));
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// Registers iris with a baseline, approves it, enrolls `id` with it
/// assigned, and starts the agent with windows of ten rows.
fn serving(coord: &Coord, id: &str) -> Agent {
    let csv = coord.dir.path().join("baseline.csv");
    if !csv.exists() {
        baseline_csv(&csv);
        let model = fixture("iris.onnx");
        coord.ok(&[
            "model",
            "register",
            "iris",
            "--file",
            model.to_str().unwrap(),
            "--baseline",
            csv.to_str().unwrap(),
        ]);
        coord.ok(&["model", "approve", "iris:1"]);
    }
    let mut agent = Agent::enrolled(coord, id);
    coord.ok(&["fleet", "assign", id, "iris:1"]);
    agent.start_with(&["--drift-window-rows", "10"]);
    agent.wait_serving("iris", 1);
    agent
}

/// Asks for `windows` windows of ten rows.
fn stream(agent: &Agent, windows: usize) {
    let mut rng = Rng(11);
    for _ in 0..windows {
        let data: Vec<f64> = (0..40).map(|i| 1.0 + (i % 4) as f64 + rng.below(1000) as f64 / 500.0).collect();
        let body = serde_json::json!({ "inputs": [{ "shape": [10, 4], "data": data }] }).to_string();
        let (status, answer) = agent.post("/v1/models/iris:predict", &body);
        assert_eq!(status, 200, "{answer}");
    }
}

fn wait_delivered(agent: &Agent) {
    wait_for("telemetry delivered", Duration::from_secs(60), || {
        let (_, t) = agent.get("/v1/telemetry");
        (t["held"] == 0 && t["queued"] == 0).then_some(())
    });
}

fn written(agent: &Agent) -> Value {
    wait_for("telemetry written", Duration::from_secs(10), || {
        let (_, t) = agent.get("/v1/telemetry");
        (t["queued"] == 0).then(|| t["held"].clone())
    })
}

/// The record ids of the device's windows the coordinator holds, oldest first.
fn stored(coord: &Coord, id: &str) -> Vec<u64> {
    let (status, body) = coord.admin_get(&format!("/v1/monitor/windows/iris?device={id}"));
    assert_eq!(status, 200, "{body}");
    let windows: Vec<Value> = serde_json::from_str(&body).unwrap();
    windows.iter().map(|w| w["record"].as_u64().unwrap()).collect()
}

/// The value of a counter in the coordinator's metrics (0 if absent).
fn metric(coord: &Coord, line_start: &str) -> u64 {
    let (status, text) = coord.admin_get("/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0)
}

/// Records go over MQTT only, each once and in order, through a
/// coordinator stopped and an agent SIGKILLed with records buffered.
fn delivered_once_in_order(coord: Coord, restart: impl FnOnce(tempfile::TempDir) -> Coord) {
    let mut agent = serving(&coord, "cam-01");
    stream(&agent, 3);
    wait_delivered(&agent);
    assert_eq!(stored(&coord, "cam-01").len(), 3);
    let over_mqtt = metric(&coord, "tern_telemetry_batches_total{link=\"mqtt\"}");
    assert!(over_mqtt >= 1, "{}", coord.admin_get("/metrics").1);
    assert_eq!(metric(&coord, "tern_telemetry_batches_total{link=\"quic\"}"), 0, "none over QUIC");
    assert!(agent.logs().contains("connected to the MQTT broker"), "{}", agent.logs());
    let dir = coord.stop_gently();
    // Offline: three windows buffered, then the agent killed.
    stream(&agent, 3);
    assert_eq!(written(&agent), 3);
    agent.proc.as_mut().unwrap().kill9();
    agent.start_with(&["--drift-window-rows", "10"]);
    agent.wait_answering("iris", 1);
    assert_eq!(written(&agent), 4, "the three windows and the restart's record survived SIGKILL");
    let coord = restart(dir);
    wait_delivered(&agent);
    let records = stored(&coord, "cam-01");
    assert_eq!(records.len(), 6, "every window once: {records:?}");
    assert!(records.windows(2).all(|p| p[0] < p[1]), "in order: {records:?}");
    assert_eq!(metric(&coord, "tern_telemetry_batches_total{link=\"quic\"}"), 0, "none over QUIC");
}

#[test]
fn telemetry_goes_over_the_embedded_broker_once_and_in_order() {
    let coord = Coord::start_with(&["--telemetry", "mqtt"]);
    let (quic, mqtt) = (coord.quic.clone(), coord.mqtt.clone().expect("the embedded broker runs"));
    delivered_once_in_order(coord, |dir| {
        Coord::start_in(dir, &["--telemetry", "mqtt", "--quic-listen", &quic, "--mqtt-listen", &mqtt])
            .map_err(|(_, log)| log)
            .unwrap()
    });
}

/// Mosquitto started on the config `tern broker mosquitto-config` wrote.
fn mosquitto(coord: &Coord) -> (Proc, u16) {
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"].into_iter().find(|p| Path::new(p).exists());
    let bin = bin.expect("Mosquitto is not installed: scripts/test installs it (apt-get install mosquitto)");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = coord.dir.path().join("mosquitto");
    let listen = format!("127.0.0.1:{port}");
    let said = coord.ok(&["broker", "mosquitto-config", "--out", out.to_str().unwrap(), "--listen", &listen]);
    assert!(said.contains("mosquitto -c"), "{said}");
    let mut conf = std::fs::read_to_string(out.join("mosquitto.conf")).unwrap();
    assert!(conf.contains("require_certificate true") && conf.contains("use_identity_as_username true"), "{conf}");
    // As root, Mosquitto would drop to its own user, which cannot read the
    // test's key in a folder of root's.
    let uid = std::process::Command::new("id").arg("-u").output().unwrap().stdout;
    if String::from_utf8_lossy(&uid).trim() == "0" {
        conf.push_str("user root\n");
        std::fs::write(out.join("mosquitto.conf"), conf).unwrap();
    }
    let log = std::fs::File::create(coord.dir.path().join("mosquitto.log")).unwrap();
    let child = std::process::Command::new(bin)
        .args(["-c", out.join("mosquitto.conf").to_str().unwrap()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let proc = Proc(child);
    wait_for("Mosquitto listening", Duration::from_secs(10), || std::net::TcpStream::connect(&listen).ok());
    (proc, port)
}

#[test]
fn telemetry_goes_over_mosquitto_once_and_in_order() {
    // Its broker outlives the coordinator's restart.
    let first = Coord::start_with(&["--mqtt-listen", "off"]);
    let (broker, port) = mosquitto(&first);
    let url = format!("mqtts://127.0.0.1:{port}");
    let dir = first.stop_gently();
    let coord = Coord::start_in(dir, &["--mqtt-url", &url, "--telemetry", "mqtt"]).map_err(|(_, l)| l).unwrap();
    assert!(coord.mqtt.is_none(), "no embedded broker with --mqtt-url");
    let quic = coord.quic.clone();
    delivered_once_in_order(coord, |dir| {
        Coord::start_in(dir, &["--mqtt-url", &url, "--telemetry", "mqtt", "--quic-listen", &quic])
            .map_err(|(_, log)| log)
            .unwrap()
    });
    drop(broker);
}

/// A device's TLS configuration, from its identity.
fn device_tls(agent: &Agent) -> rustls::ClientConfig {
    let d = agent.data().join("identity");
    let read = |n: &str| std::fs::read(d.join(n)).unwrap();
    tern_net::mqtt_client_config(&read("ca.crt"), &read("device.crt"), &read("device.key"), 0).unwrap()
}

/// Connects as `client_id`; `Err` if the broker refuses the connection.
async fn connect(port: u16, client_id: &str, tls: rustls::ClientConfig) -> Result<(AsyncClient, EventLoop), String> {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls))));
    let (client, mut events) = AsyncClient::new(opts, 16);
    let connected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match connected {
        Ok(Ok(())) => Ok((client, events)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no CONNACK within 5 s".into()),
    }
}

/// What arrives on `events` within `within`: the first SUBACK's codes,
/// the payloads published to us, and whether the broker cut us off.
async fn gather(
    events: &mut EventLoop,
    within: Duration,
) -> (Option<Vec<rumqttc::SubscribeReasonCode>>, Vec<String>, bool) {
    let (mut suback, mut got, mut cut) = (None, Vec::new(), false);
    let _ = tokio::time::timeout(within, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    if suback.is_none() {
                        suback = Some(s.return_codes);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => got.push(String::from_utf8_lossy(&p.payload).into_owned()),
                Ok(_) => {}
                Err(ConnectionError::MqttState(_) | ConnectionError::Io(_)) | Err(_) => {
                    cut = true;
                    return;
                }
            }
        }
    })
    .await;
    (suback, got, cut)
}

/// Each device keeps to `tern/v1/<its id>/`; another CA's certificate
/// does not connect.
async fn topics_are_kept(port: u16, a: &Agent, b: &Agent, embedded: bool) {
    let short = Duration::from_secs(2);
    let (cb, mut eb) = connect(port, "cam-b", device_tls(b)).await.expect("B connects as itself");
    cb.subscribe("tern/v1/cam-b/#", QoS::AtLeastOnce).await.unwrap();
    let (suback, _, _) = gather(&mut eb, short).await;
    assert!(suback.unwrap().iter().all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure)), "B's own topics");

    let (ca, mut ea) = connect(port, "cam-a", device_tls(a)).await.expect("A connects as itself");
    ca.subscribe("tern/v1/cam-b/#", QoS::AtLeastOnce).await.unwrap();
    let (suback, _, _) = gather(&mut ea, short).await;
    let refused = suback.unwrap().iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
    // Mosquitto 2.0.11 grants an MQTT 3.1.1 subscription its ACL denies,
    // and delivers nothing on it (checked below).
    assert!(refused || !embedded, "A may not subscribe under B");
    // Nothing of B's reaches A's subscription.
    cb.publish("tern/v1/cam-b/state", QoS::AtLeastOnce, false, "for B only").await.unwrap();
    let (_, got, _) = gather(&mut eb, short).await;
    assert_eq!(got, vec!["for B only".to_string()]);
    let (_, got, _) = gather(&mut ea, short).await;
    assert!(got.is_empty(), "A read B's topic: {got:?}");
    ca.publish("tern/v1/cam-b/state", QoS::AtLeastOnce, false, "from A").await.unwrap();
    let (_, _, cut) = gather(&mut ea, short).await;
    if embedded {
        assert!(cut, "the embedded broker disconnects a device publishing under another's id");
    }
    cb.publish("tern/v1/cam-b/state", QoS::AtLeastOnce, false, "from B").await.unwrap();
    let (_, got, _) = gather(&mut eb, short).await;
    assert_eq!(got, vec!["from B".to_string()], "B sees its own message and never A's");

    // A claiming B's client id: refused (embedded), or given its own id
    // (Mosquitto's use_username_as_clientid); B's session stays either way.
    let claimed = connect(port, "cam-b", device_tls(a)).await;
    if embedded {
        assert!(claimed.is_err(), "A took B's client id");
    }
    cb.publish("tern/v1/cam-b/state", QoS::AtLeastOnce, false, "still B").await.unwrap();
    let (_, got, cut) = gather(&mut eb, short).await;
    assert!(!cut && got == vec!["still B".to_string()], "B was cut off: {got:?}");

    // A will under B's topics: refused (embedded), or never delivered.
    let mut opts = MqttOptions::new("cam-a", "127.0.0.1", port);
    opts.set_last_will(rumqttc::LastWill::new("tern/v1/cam-b/state", "A's will", QoS::AtLeastOnce, false));
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(device_tls(a)))));
    let (_willing, mut ew) = AsyncClient::new(opts, 16);
    let (_, _, cut) = gather(&mut ew, short).await;
    if embedded {
        assert!(cut, "a will under another device's topic connected");
    }
    drop(ew);
    let (_, got, _) = gather(&mut eb, short).await;
    assert!(got.is_empty(), "A's will reached B's topic: {got:?}");

    // A certificate of another CA, for the same id.
    let other = tern_net::FleetCa::generate("other").unwrap().0;
    let key = tern_net::DeviceKey::generate().unwrap();
    let cert = other.issue_device(&key.csr("cam-a").unwrap(), "cam-a", 30).unwrap();
    let ca_der = std::fs::read(a.data().join("identity/ca.crt")).unwrap();
    let tls = tern_net::mqtt_client_config(&ca_der, &cert, &key.pkcs8_der(), 0).unwrap();
    let foreign = connect(port, "cam-a", tls).await;
    assert!(foreign.is_err(), "a certificate of another CA connected");
}

#[test]
fn devices_keep_to_their_own_topics_on_the_embedded_broker() {
    let coord = Coord::start();
    let port: u16 = coord.mqtt.as_deref().unwrap().rsplit(':').next().unwrap().parse().unwrap();
    let (a, b) = (Agent::enrolled(&coord, "cam-a"), Agent::enrolled(&coord, "cam-b"));
    common::runtime().block_on(topics_are_kept(port, &a, &b, true));
}

#[test]
fn devices_keep_to_their_own_topics_on_mosquitto() {
    let coord = Coord::start_with(&["--mqtt-listen", "off"]);
    let (_broker, port) = mosquitto(&coord);
    let (a, b) = (Agent::enrolled(&coord, "cam-a"), Agent::enrolled(&coord, "cam-b"));
    common::runtime().block_on(topics_are_kept(port, &a, &b, false));
}
