//! Enrollment and mutual TLS: single-use, expiring, unforgeable tokens that
//! pin the coordinator's CA; peers without a certificate from the fleet CA
//! get nothing; oversize frames are refused.

mod common;

use common::*;
use tern_net::{DeviceKey, FleetCa, FrameReader, write_msg};
use tern_proto::{EnrollTokenText, MAX_FRAME_LEN, Message, WireVersion};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

#[test]
fn tokens_are_single_use_expiring_unforgeable_and_pinned() {
    let coord = Coord::start();
    let token = coord.token();

    let a = Agent::new();
    assert!(a.enroll(&coord.quic, &token, Some("cam-a")).status.success());

    // Reused.
    let b = Agent::new();
    let out = b.enroll(&coord.quic, &token, Some("cam-b"));
    assert!(!out.status.success());
    assert_eq!(
        stderr(&out),
        "error: coordinator refused enrollment: enrollment token was already used (by device cam-a)"
    );
    assert!(!b.data().join("identity/agent.json").exists());

    // Forged: a well-formed token with a secret the coordinator never issued.
    let mut forged = EnrollTokenText::decode(&token).unwrap();
    forged.secret[0] ^= 0xff;
    let out = b.enroll(&coord.quic, &forged.encode(), Some("cam-b"));
    assert_eq!(
        stderr(&out),
        "error: coordinator refused enrollment: enrollment token not recognised by this coordinator"
    );

    // Malformed.
    let out = b.enroll(&coord.quic, "tern1_not-a-token", None);
    assert!(stderr(&out).starts_with("error: malformed enrollment token"), "{}", stderr(&out));

    // Expired.
    let expired = coord.ok(&["fleet", "token", "--group", "lab", "--profile", "rpi4", "--ttl", "0"]);
    let out = b.enroll(&coord.quic, expired.trim(), None);
    assert!(stderr(&out).starts_with("error: enrollment token expired"), "{}", stderr(&out));

    // A device id that is taken.
    let out = b.enroll(&coord.quic, &coord.token(), Some("cam-a"));
    assert_eq!(stderr(&out), "error: coordinator refused enrollment: device \"cam-a\" is enrolled already");

    // A token from another coordinator pins another CA: the agent refuses
    // to talk to this one before sending the secret.
    let other = Coord::start();
    let out = b.enroll(&coord.quic, &other.token(), Some("cam-b"));
    let err = stderr(&out);
    assert!(
        err.contains("TLS handshake with") && err.contains("not from the CA pinned by the enrollment token"),
        "{err}"
    );

    // None of this enrolled anything or spent the good tokens.
    let devices = coord.json(&["fleet", "list"]);
    assert_eq!(devices.as_array().unwrap().len(), 1);
    assert!(b.enroll(&other.quic, &other.token(), Some("cam-b")).status.success());
}

fn quic_addr(coord: &Coord) -> std::net::SocketAddr {
    coord.quic.parse().unwrap()
}

#[test]
fn foreign_certificates_and_missing_certificates_get_nothing() {
    let coord = Coord::start();
    let _agent = Agent::enrolled(&coord, "cam-01");
    let fleet_ca = std::fs::read(coord.data().join("ca.crt")).unwrap();
    let addr = quic_addr(&coord);

    runtime().block_on(async {
        // A device certificate from a CA of our own making, presented to the real coordinator.
        let (foreign, _) = FleetCa::generate("intruder").unwrap();
        let key = DeviceKey::generate().unwrap();
        let cert = foreign.issue_device(&key.csr("cam-01").unwrap(), "cam-01", 30).unwrap();
        let config = tern_net::device_client_config(&fleet_ca, &cert, &key.pkcs8_der()).unwrap();
        let endpoint = tern_net::client_endpoint(addr).unwrap();
        let result = async {
            let conn = endpoint.connect_with(config, addr, tern_net::COORDINATOR_NAME)?.await?;
            // TLS 1.3: the client may finish before the server checks its certificate;
            // the first stream then fails.
            let v = tern_net::wire_version(&conn)?;
            let (mut send, recv) = conn.open_bi().await?;
            write_msg(&mut send, &hello("x"), v).await?;
            Ok::<_, anyhow::Error>(FrameReader::new(recv, v).next().await?)
        }
        .await;
        let err = format!("{:#}", result.expect_err("a foreign certificate must be refused"));
        assert!(err.contains("invalid peer certificate: UnknownIssuer"), "{err}");

        // No certificate at all: only enrollment is allowed.
        let pin = tern_net::ca_fingerprint(&fleet_ca);
        let conn = endpoint
            .connect_with(tern_net::enroll_client_config(pin).unwrap(), addr, tern_net::COORDINATOR_NAME)
            .unwrap()
            .await
            .unwrap();
        let v = tern_net::wire_version(&conn).unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        write_msg(&mut send, &hello("x"), v).await.unwrap();
        match FrameReader::new(recv, v).next().await.unwrap() {
            Some(Message::Error(e)) => assert_eq!(e.message, "Hello needs a device certificate; enroll first"),
            other => panic!("expected an error, got {other:?}"),
        }
    });
    assert_eq!(coord.json(&["fleet", "list"]).as_array().unwrap().len(), 1);
}

#[test]
fn oversize_frame_is_refused_and_the_coordinator_carries_on() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.register_iris("iris");
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    let id = agent.data().join("identity");
    let read = |n: &str| std::fs::read(id.join(n)).unwrap();
    let config = tern_net::device_client_config(&read("ca.crt"), &read("device.crt"), &read("device.key")).unwrap();
    let addr = quic_addr(&coord);

    runtime().block_on(async {
        let endpoint = tern_net::client_endpoint(addr).unwrap();
        let conn = endpoint.connect_with(config, addr, tern_net::COORDINATOR_NAME).unwrap().await.unwrap();
        let v = tern_net::wire_version(&conn).unwrap();
        assert_eq!(v, WireVersion::CURRENT);
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let mut header = Vec::from(*b"TN");
        header.extend_from_slice(&v.0.to_le_bytes());
        header.extend_from_slice(&(MAX_FRAME_LEN as u32 + 1).to_le_bytes());
        send.write_all(&header).await.unwrap();
        match FrameReader::new(recv, v).next().await.unwrap() {
            Some(Message::Error(e)) => {
                assert_eq!(
                    e.message,
                    // A device's frames may be 128 KiB (the protocol allows 1 MiB).
                    format!("frame of {} bytes exceeds the limit of {} bytes", MAX_FRAME_LEN + 1, 128 << 10)
                )
            }
            other => panic!("expected an error, got {other:?}"),
        }
        // Garbage that is not a Tern frame at all.
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        match FrameReader::new(recv, v).next().await.unwrap() {
            Some(Message::Error(e)) => assert!(e.message.starts_with("not a Tern frame"), "{}", e.message),
            other => panic!("expected an error, got {other:?}"),
        }
    });

    // The same connection's device still gets its model, and the registry is intact.
    agent.start();
    agent.wait_serving("iris", 1);
    assert_eq!(coord.json(&["model", "list"]).as_array().unwrap().len(), 1);
}
