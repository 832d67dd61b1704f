//! Telemetry over MQTT, when the fleet's route says so: the outbox's
//! batches published at QoS 1 under `tern/v1/<device>/`, one in flight,
//! each removed once the coordinator's acknowledgement comes back on
//! `tern/v1/<device>/ack`; the link counts on `tern/v1/<device>/state`
//! (when a connection is up, or before a metered one closes). rumqttc reaches the broker through a relay on
//! 127.0.0.1 that counts the connection's bytes (TCP's own counters, plus
//! the IP and TCP headers of each segment) into the `mqtt` link's traffic.
//! The broker's certificate is checked for `broker.tern` whatever address
//! it is reached at; no SNI goes out (rumqttc names the relay's address),
//! so a broker behind a load balancer that routes by SNI is not reached.

use crate::identity::Identity;
use crate::outbox::Outbox;
use anyhow::{Result, anyhow, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use std::sync::Arc;
use std::time::Duration;
use tern_proto::{Message, TelemetryBody};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The most encoded record bytes one batch carries, as on QUIC.
const BATCH_BYTES: usize = 96 << 10;

/// The most bytes of a packet: a batch, its frame and topic (as the
/// coordinator's brokers take), or an acknowledgement.
const MAX_PACKET: usize = 132 << 10;

/// How long an acknowledgement may take before the batch is sent again;
/// doubled at each miss, up to [`ACK_LONGEST`] (a coordinator away from
/// the broker is not sent the same batch every 30 s all day).
const ACK_WITHIN: Duration = Duration::from_secs(30);

/// The longest wait for an acknowledgement before sending again.
const ACK_LONGEST: Duration = Duration::from_secs(30 * 60);

/// How long a metered connection stays with nothing left to send.
const METERED_SETTLE: Duration = Duration::from_secs(3);

/// MQTT keep-alive: the broker drops a client silent for 1.5 times it.
const KEEP_ALIVE: Duration = Duration::from_secs(120);

/// Sends the outbox over MQTT while the route names a broker, forever.
/// Metered, a connection is opened every `metered` only if there are
/// records, and closed once they are acknowledged.
pub async fn run(
    identity: Arc<Identity>,
    outbox: Arc<Outbox>,
    mut route: watch::Receiver<crate::link::Routed>,
    metered: Option<Duration>,
    traffic: Arc<crate::traffic::Traffic>,
) {
    let mut backoff = Duration::from_secs(1);
    let mut next_metered = Instant::now();
    loop {
        let Some(url) = route.borrow_and_update().mqtt.clone() else {
            if route.changed().await.is_err() {
                return;
            }
            continue;
        };
        // Something to send first: an idle device holds no connection
        // until its first record; metered, not until its next turn.
        if let Some(every) = metered {
            tokio::time::sleep_until(next_metered).await;
            next_metered = Instant::now() + every;
            if outbox.held() == 0 && outbox.queued() == 0 {
                continue;
            }
        } else if outbox.held() == 0 {
            tokio::select! {
                _ = outbox.ready.notified() => {}
                _ = route.changed() => {}
            }
            continue;
        }
        match session(&identity, &outbox, &url, &mut route, metered.is_some(), &traffic).await {
            Ok(()) => backoff = Duration::from_secs(1),
            Err(e) => {
                warn!(broker = %url, "MQTT telemetry: {e:#}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// How often a connection's counts are added to the day's traffic.
const COUNT_EVERY: Duration = Duration::from_secs(10);

/// Listens on 127.0.0.1 for the one connection of a session and relays it
/// to the broker, counting its bytes; its port, and the task (aborted when
/// dropped).
async fn relay(host: String, port: u16, traffic: Arc<crate::traffic::Traffic>) -> Result<(u16, Counter, Abort)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let local = listener.local_addr()?.port();
    let counter = Counter::default();
    let shared = counter.clone();
    let task = tokio::spawn(async move {
        let Ok((mut inner, _)) = listener.accept().await else { return };
        drop(listener);
        let mut outer = match tokio::net::TcpStream::connect((host.as_str(), port)).await {
            Ok(s) => s,
            Err(e) => {
                warn!("MQTT: connecting to {host}:{port}: {e}");
                return;
            }
        };
        let _ = (inner.set_nodelay(true), outer.set_nodelay(true));
        // Declared after `outer`: dropped (and counted) before it closes,
        // also when the session aborts the task.
        *shared.0.lock().expect("lock") = Some(Counted::new(&outer, traffic));
        let _count = Closing(shared.clone());
        let mut every = tokio::time::interval(COUNT_EVERY);
        every.tick().await;
        let copy = tokio::io::copy_bidirectional(&mut inner, &mut outer);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                _ = &mut copy => break,
                _ = every.tick() => shared.add(),
            }
        }
    });
    Ok((local, counter, Abort(task)))
}

/// The relay's connection counts, for the session to bring up to date
/// before it reports them; empty before the connection and after it closes.
#[derive(Clone, Default)]
struct Counter(Arc<std::sync::Mutex<Option<Counted>>>);

impl Counter {
    fn add(&self) {
        if let Some(c) = self.0.lock().expect("lock").as_mut() {
            c.add();
        }
    }
}

/// Counts the last bytes and empties the counter as the connection closes
/// (its fd is not read after).
struct Closing(Counter);

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            c.add();
        }
    }
}

/// A TCP connection's counters, as last added to the traffic.
struct Counted {
    traffic: Arc<crate::traffic::Traffic>,
    #[cfg(target_os = "linux")]
    fd: std::os::fd::RawFd,
    /// IP and TCP header bytes of a segment (with TCP timestamps).
    header: u64,
    last: [u64; 4],
}

impl Counted {
    fn new(s: &tokio::net::TcpStream, traffic: Arc<crate::traffic::Traffic>) -> Self {
        let header = if s.peer_addr().is_ok_and(|a| a.is_ipv6()) { 40 + 32 } else { 20 + 32 };
        Self {
            traffic,
            #[cfg(target_os = "linux")]
            fd: std::os::fd::AsRawFd::as_raw_fd(s),
            header,
            last: [0; 4],
        }
    }

    /// Bytes acknowledged by the peer, bytes received, segments out, in.
    /// No crate the agent has reads TCP_INFO: one getsockopt on the
    /// stream's own fd.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn read(&self) -> Option<[u64; 4]> {
        // SAFETY: tcp_info is plain integers; all zeros is a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `info` is a tcp_info of `len` bytes; the fd is the
        // stream's, open while the relay task holds it.
        let rc =
            unsafe { libc::getsockopt(self.fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
        // Older kernels fill less of the struct than these fields need.
        let needed = std::mem::offset_of!(libc::tcp_info, tcpi_segs_in) + 4;
        (rc == 0 && len as usize >= needed).then(|| {
            [
                info.tcpi_bytes_acked,
                info.tcpi_bytes_received,
                u64::from(info.tcpi_segs_out),
                u64::from(info.tcpi_segs_in),
            ]
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn read(&self) -> Option<[u64; 4]> {
        None
    }

    /// Adds what the connection carried since the last call.
    fn add(&mut self) {
        let Some(now) = self.read() else { return };
        let d: Vec<u64> = now.iter().zip(self.last).map(|(n, l)| n.saturating_sub(l)).collect();
        self.last = now;
        self.traffic.add("mqtt", crate::traffic::today(), d[0] + d[2] * self.header, d[1] + d[3] * self.header);
    }
}

/// Publishes the link counts, this connection's up to now, on `state`.
fn publish_state(
    client: &AsyncClient,
    topic: &str,
    counter: &Counter,
    traffic: &crate::traffic::Traffic,
    wire: tern_proto::WireVersion,
) -> Result<()> {
    counter.add();
    // The heartbeat field is the control session's: 0 says nothing of it.
    let report = tern_proto::TrafficReport { heartbeat_secs: 0, days: traffic.days() };
    client.try_publish(topic, QoS::AtLeastOnce, false, tern_proto::encode_frame(&Message::Traffic(report), wire)?)?;
    Ok(())
}

/// The broker's host and port; an empty host is the coordinator's.
fn broker(url: &str, coordinator: &str) -> Result<(String, u16)> {
    let (host, port) = tern_net::mqtt_address(url)?;
    if !host.is_empty() {
        return Ok((host, port));
    }
    let (host, _) = coordinator.rsplit_once(':').ok_or_else(|| anyhow!("coordinator address {coordinator:?}"))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    Ok((host.to_owned(), port))
}

/// One connection: sends until the route changes or the connection fails
/// (or, `metered`, nothing is left to send).
async fn session(
    identity: &Identity,
    outbox: &Arc<Outbox>,
    url: &str,
    route: &mut watch::Receiver<crate::link::Routed>,
    metered: bool,
    traffic: &Arc<crate::traffic::Traffic>,
) -> Result<()> {
    let id = identity.info.device_id.clone();
    // Frames of the version of the coordinator that gave the route.
    let wire = route.borrow().wire();
    let (host, port) = broker(url, &identity.info.coordinator)?;
    let tls =
        tern_net::mqtt_client_config(&identity.ca_der, &identity.cert_der, &identity.key_der, identity.tls_floor())?;
    // The broker's certificate is checked for `broker.tern` whatever
    // address it is reached at: the relay's is as good.
    let (relay, counter, _relay) = relay(host, port, traffic.clone()).await?;
    let mut opts = MqttOptions::new(id.as_str(), "127.0.0.1", relay);
    opts.set_keep_alive(KEEP_ALIVE);
    opts.set_clean_session(true);
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls))));
    let (client, events) = AsyncClient::new(opts, 8);
    // The event loop runs on its own task: its poll is not cancelled
    // half-way through writing a batch by the other branches below.
    let (tx, mut events_rx) = tokio::sync::mpsc::channel(16);
    let pump = tokio::spawn(pump(events, tx));
    let _stop = Abort(pump);
    let (topic_ack, topic_telemetry, topic_alerts, topic_capture) = (
        format!("tern/v1/{id}/ack"),
        format!("tern/v1/{id}/telemetry"),
        format!("tern/v1/{id}/alerts"),
        format!("tern/v1/{id}/capture"),
    );
    let topic_state = format!("tern/v1/{id}/state");
    // The counts go on `state` once a connection is up, and before a
    // metered one closes; a held connection's reach the coordinator with
    // the control session's heartbeat.
    let mut state_sent = false;
    let ready = outbox.ready.clone();
    // Sending starts once the acknowledgements are subscribed to.
    let mut subscribed = false;
    let mut in_flight: Option<(u64, Instant)> = None;
    let mut ack_within = ACK_WITHIN;
    let mut idle_since = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let close = async |client: &AsyncClient, events_rx: &mut tokio::sync::mpsc::Receiver<_>| {
        let _ = client.try_disconnect();
        // The DISCONNECT is out once the event loop ends.
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while events_rx.recv().await.is_some() {} }).await;
    };
    loop {
        tokio::select! {
            event = events_rx.recv() => match event.ok_or_else(|| anyhow!("the MQTT event loop ended"))?? {
                Event::Incoming(Packet::ConnAck(_)) => {
                    info!(broker = %url, "connected to the MQTT broker");
                    client.try_subscribe(&topic_ack, QoS::AtLeastOnce)?;
                }
                Event::Incoming(Packet::SubAck(s)) => {
                    if s.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                        bail!("the broker refused the subscription to {topic_ack}");
                    }
                    subscribed = true;
                    ready.notify_one();
                }
                Event::Incoming(Packet::Publish(p)) if p.topic == topic_ack => {
                    let Ok(Some((Message::TelemetryAck(a), _))) = tern_proto::decode_frame(&p.payload, MAX_PACKET, wire) else {
                        warn!("ignoring a message on {topic_ack} that is not an acknowledgement");
                        continue;
                    };
                    if a.stream != outbox.stream() {
                        continue;
                    }
                    debug!(up_to = a.up_to, "telemetry acknowledged over MQTT");
                    let o = outbox.clone();
                    tokio::task::spawn_blocking(move || o.acknowledged(a.up_to)).await?;
                    if in_flight.is_some_and(|(sent, _)| a.up_to >= sent) {
                        in_flight = None;
                        ack_within = ACK_WITHIN;
                        idle_since = Instant::now();
                        ready.notify_one();
                    }
                }
                _ => {}
            },
            _ = ready.notified(), if subscribed && in_flight.is_none() => {
                let o = outbox.clone();
                let records = tokio::task::spawn_blocking(move || o.oldest(tern_proto::MAX_TELEMETRY_BATCH, BATCH_BYTES, wire)).await?;
                let Some(last) = records.last() else { continue };
                let alerts = records.iter().any(|r| matches!(r.body, TelemetryBody::Alert(_)));
                let captures = records.iter().any(|r| matches!(r.body, TelemetryBody::Capture(_)));
                in_flight = Some((last.id, Instant::now()));
                debug!(records = records.len(), up_to = last.id, alerts, "sending telemetry over MQTT");
                let batch = tern_proto::TelemetryBatch { stream: outbox.stream(), dropped: outbox.dropped(), records };
                let frame = tern_proto::encode_frame(&Message::Telemetry(batch), wire)?;
                // A batch holding an alert goes on `alerts`, so that a
                // subscriber to alerts alone sees every one; else one
                // holding a capture on `capture`; one batch in flight keeps
                // the topics in order.
                let topic = if alerts { &topic_alerts } else if captures { &topic_capture } else { &topic_telemetry };
                client.try_publish(topic, QoS::AtLeastOnce, false, frame)?;
            }
            _ = tick.tick() => {
                // The bytes each link carried, as the QUIC heartbeat says
                // them: a metered device whose QUIC session is closed
                // still reports what MQTT cost.
                if subscribed && !state_sent && !metered {
                    state_sent = true;
                    publish_state(&client, &topic_state, &counter, traffic, wire)?;
                }
                if in_flight.is_some_and(|(_, at)| at.elapsed() >= ack_within) {
                    if metered {
                        // The coordinator is not taking them now: the next
                        // turn tries again.
                        close(&client, &mut events_rx).await;
                        bail!("no acknowledgement over MQTT within {} s", ack_within.as_secs());
                    }
                    warn!("no acknowledgement over MQTT within {} s; sending the batch again", ack_within.as_secs());
                    ack_within = (ack_within * 2).min(ACK_LONGEST);
                    in_flight = None;
                    ready.notify_one();
                }
                let done = in_flight.is_none() && outbox.held() == 0 && outbox.queued() == 0;
                if !done {
                    idle_since = Instant::now();
                } else if metered && idle_since.elapsed() >= METERED_SETTLE {
                    // What this connection cost, up to now: its close is
                    // counted with the next turn's.
                    if let Err(e) = publish_state(&client, &topic_state, &counter, traffic, wire) {
                        warn!("MQTT: publishing the link counts: {e:#}");
                    }
                    close(&client, &mut events_rx).await;
                    info!("metered MQTT connection closed: nothing more to send");
                    return Ok(());
                }
            }
            changed = route.changed() => {
                // A new broker, or a coordinator of another wire version
                // (frames, and which records it takes, follow it).
                let r = route.borrow().clone();
                if changed.is_err() || r.mqtt.as_deref() != Some(url) || r.wire() != wire {
                    close(&client, &mut events_rx).await;
                    return Ok(());
                }
            }
        }
    }
}

/// Aborts the event loop's task when the session goes.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls the event loop, handing each event on, until it fails or the
/// session is gone; a clean DISCONNECT ends it too.
async fn pump(mut events: rumqttc::EventLoop, tx: tokio::sync::mpsc::Sender<Result<Event>>) {
    loop {
        let event = events.poll().await;
        let end = matches!(event, Err(_) | Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)));
        if tx.send(event.map_err(|e| anyhow!("{e}"))).await.is_err() || end {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::broker;

    #[test]
    fn an_empty_host_is_the_coordinators() {
        assert_eq!(broker("mqtts://:8883", "10.0.0.5:7443").unwrap(), ("10.0.0.5".into(), 8883));
        assert_eq!(broker("mqtts://:8883", "[fd00::1]:7443").unwrap(), ("fd00::1".into(), 8883));
        assert_eq!(broker("mqtts://broker:1884", "10.0.0.5:7443").unwrap(), ("broker".into(), 1884));
    }
}
