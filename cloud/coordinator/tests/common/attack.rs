//! Anonymous QUIC peers that hold half-sent frames, for the flood tests.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Opens an anonymous connection from `endpoint` and starts frames that
/// announce `frame` bytes, sends half of each, and never finishes them;
/// also tries unidirectional streams, which the coordinator never reads.
/// Returns the connection, to keep it open.
async fn hold_half_frames(
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    pin: [u8; 32],
    frame: usize,
) -> Option<quinn::Connection> {
    let config = tern_net::enroll_client_config(pin).unwrap();
    let connecting = endpoint.connect_with(config, addr, tern_net::COORDINATOR_NAME).ok()?;
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting).await.ok()?.ok()?;
    let v = tern_net::wire_version(&conn).ok()?;
    for _ in 0..4 {
        let c = conn.clone();
        tokio::spawn(async move {
            let (mut send, _recv) = c.open_bi().await?;
            let mut head = Vec::from(*b"TN");
            head.extend_from_slice(&v.0.to_le_bytes());
            head.extend_from_slice(&(frame as u32).to_le_bytes());
            send.write_all(&head).await?;
            send.write_all(&vec![7u8; frame / 2]).await?;
            std::future::pending::<()>().await;
            Ok::<_, anyhow::Error>(())
        });
        let c = conn.clone();
        tokio::spawn(async move {
            let mut send = c.open_uni().await?;
            send.write_all(&vec![7u8; 200 << 10]).await?;
            std::future::pending::<()>().await;
            Ok::<_, anyhow::Error>(())
        });
    }
    Some(conn)
}

/// `n` anonymous attackers spread over `addresses` loopback addresses
/// (127.0.0.2 and up), each holding half of a `frame`-byte frame; returns
/// the connections the coordinator let in.
pub async fn attack(quic: &str, ca: &[u8], n: usize, addresses: u8, frame: usize) -> Vec<quinn::Connection> {
    let addr: SocketAddr = quic.parse().unwrap();
    let pin = tern_net::ca_fingerprint(ca);
    let endpoints: Vec<quinn::Endpoint> = (0..addresses)
        .map(|i| quinn::Endpoint::client(SocketAddr::new(IpAddr::from([127, 0, 0, 2 + i]), 0)).unwrap())
        .collect();
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(hold_half_frames(endpoints[i % endpoints.len()].clone(), addr, pin, frame)))
        .collect();
    let mut held = Vec::new();
    for t in tasks {
        if let Some(c) = t.await.unwrap() {
            held.push(c);
        }
    }
    held
}

/// Whether a connection is still open after `wait`.
pub async fn still_open(conn: &quinn::Connection, wait: Duration) -> bool {
    tokio::time::timeout(wait, conn.closed()).await.is_err()
}
