//! Frames over real quinn streams on loopback, with real certificates from
//! a fleet CA: reading survives being cancelled mid-frame (the control loop
//! reads inside `select!` beside timers), reads never run past a frame, and
//! both ends agree on the wire version the handshake picked.

use std::net::SocketAddr;
use std::time::Duration;
use tern_net::{DeviceKey, FleetCa, FrameReader, write_msg};
use tern_proto::{FetchArtifact, Message, Sha256Digest, WireVersion, encode_frame};

struct Pair {
    server: quinn::Endpoint,
    client: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    addr: SocketAddr,
}

fn pair(versions: &[WireVersion]) -> Pair {
    let (ca, _) = FleetCa::generate("test").unwrap();
    let (cert, key) = ca.issue_server(&[]).unwrap();
    let server_config = tern_net::server_config(&cert, &key, ca.cert_der(), versions).unwrap();
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let device = DeviceKey::generate().unwrap();
    let device_cert = ca.issue_device(&device.csr("cam-01").unwrap(), "cam-01", 1).unwrap();
    let client_config = tern_net::device_client_config(ca.cert_der(), &device_cert, &device.pkcs8_der()).unwrap();
    let client = tern_net::client_endpoint(addr).unwrap();
    Pair { server, client, client_config, addr }
}

async fn connect(p: &Pair) -> (quinn::Connection, quinn::Connection) {
    let connecting = p.client.connect_with(p.client_config.clone(), p.addr, tern_net::COORDINATOR_NAME).unwrap();
    let (client, server) = tokio::join!(connecting, async { p.server.accept().await.unwrap().await.unwrap() });
    let server_side = server;
    tern_net::admit_device(&server_side);
    (client.unwrap(), server_side)
}

fn msg(i: u64) -> Message {
    Message::FetchArtifact(FetchArtifact { sha256: Sha256Digest::of(&i.to_le_bytes()), offset: i })
}

#[tokio::test]
async fn frames_arriving_a_byte_at_a_time_survive_a_select_beside_a_timer() {
    let p = pair(WireVersion::SUPPORTED);
    let (client, server) = connect(&p).await;
    let v = tern_net::wire_version(&server).unwrap();
    const N: u64 = 25;
    let writer = tokio::spawn(async move {
        let (mut send, _recv) = client.open_bi().await.unwrap();
        let bytes: Vec<u8> = (0..N).flat_map(|i| encode_frame(&msg(i), v).unwrap()).collect();
        for b in bytes {
            send.write_all(&[b]).await.unwrap();
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        send.finish().unwrap();
        // Keep the connection up until the reader is done.
        client.closed().await;
    });
    let (_send, recv) = server.accept_bi().await.unwrap();
    let mut reader = FrameReader::new(recv, v);
    let mut tick = tokio::time::interval(Duration::from_micros(500));
    let (mut got, mut ticks) = (Vec::new(), 0u32);
    loop {
        tokio::select! {
            m = reader.next() => match m.unwrap() {
                Some(m) => got.push(m),
                None => break,
            },
            _ = tick.tick() => ticks += 1,
        }
    }
    assert_eq!(got, (0..N).map(msg).collect::<Vec<_>>());
    assert!(ticks > 10, "the timer fired {ticks} times: the test did not interleave");
    server.close(0u32.into(), b"done");
    writer.await.unwrap();
}

#[tokio::test]
async fn a_reader_never_holds_more_than_came_nor_reads_past_its_frame() {
    let p = pair(WireVersion::SUPPORTED);
    let (client, server) = connect(&p).await;
    let v = tern_net::wire_version(&client).unwrap();
    let (mut send, _r) = client.open_bi().await.unwrap();
    // A header that announces a 1 MiB frame, then 100 bytes of it.
    let mut head = encode_frame(&msg(0), v).unwrap()[..8].to_vec();
    head[4..8].copy_from_slice(&(tern_proto::MAX_FRAME_LEN as u32).to_le_bytes());
    send.write_all(&head).await.unwrap();
    send.write_all(&[0u8; 100]).await.unwrap();
    let (_s, recv) = server.accept_bi().await.unwrap();
    let mut reader = FrameReader::new(recv, v);
    assert!(tokio::time::timeout(Duration::from_millis(300), reader.next()).await.is_err(), "no whole frame came");
    assert_eq!(reader.buffered(), 108, "the reader holds what came, not the announced megabyte");

    // A frame followed by raw bytes: the reader stops at the frame's end.
    let (mut send, _r) = client.open_bi().await.unwrap();
    send.write_all(&encode_frame(&msg(7), v).unwrap()).await.unwrap();
    send.write_all(b"raw artifact bytes").await.unwrap();
    send.finish().unwrap();
    let (_s, recv) = server.accept_bi().await.unwrap();
    let mut reader = FrameReader::new(recv, v);
    assert_eq!(reader.next().await.unwrap(), Some(msg(7)));
    let mut recv = reader.into_stream();
    assert_eq!(recv.read_to_end(1024).await.unwrap(), b"raw artifact bytes");
}

#[tokio::test]
async fn the_handshake_picks_the_newest_shared_version() {
    for (server_speaks, want) in
        [(WireVersion::SUPPORTED, WireVersion::CURRENT), (&[WireVersion::V1][..], WireVersion::V1)]
    {
        let p = pair(server_speaks);
        let (client, server) = connect(&p).await;
        assert_eq!(tern_net::wire_version(&client).unwrap(), want);
        assert_eq!(tern_net::wire_version(&server).unwrap(), want);
        let (mut send, _r) = client.open_bi().await.unwrap();
        write_msg(&mut send, &msg(3), want).await.unwrap();
        let (_s, recv) = server.accept_bi().await.unwrap();
        assert_eq!(FrameReader::new(recv, want).next().await.unwrap(), Some(msg(3)));
    }
}
