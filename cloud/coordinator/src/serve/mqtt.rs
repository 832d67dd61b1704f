//! The coordinator's MQTT client: takes the telemetry devices publish on
//! `tern/v1/<device>/{telemetry,alerts,capture}` (from the embedded broker or an
//! external one) and acknowledges it on `tern/v1/<device>/ack`.

use super::State;
use anyhow::Result;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use std::sync::Arc;
use std::time::Duration;
use tern_proto::{DeviceId, Message, WireVersion};
use tracing::{debug, info, warn};

/// The wire version of every MQTT message.
/// The oldest wire version of MQTT messages.
const WIRE: WireVersion = WireVersion::V8;

/// The most bytes a device's message may have: as on its control stream.
const MAX_MESSAGE: usize = 128 << 10;

/// Batches being taken at once (each waits on the registry).
const IN_HAND: usize = 64;

/// The device of a topic the coordinator takes telemetry on.
fn device_topic(topic: &str) -> Option<DeviceId> {
    let (id, kind) = topic.strip_prefix("tern/v1/")?.split_once('/')?;
    matches!(kind, "telemetry" | "alerts" | "capture" | "state").then(|| DeviceId::new(id).ok())?
}

/// What the coordinator's client takes in one packet: more than any broker
/// set up by Tern forwards (`broker::MAX_PACKET`, Mosquitto's
/// `max_packet_size`), so an oversized device message is refused there.
const MAX_INCOMING: usize = 256 << 10;

/// Connects to the broker at `host:port` as [`tern_net::COORDINATOR_CLIENT`]
/// and takes telemetry until the process ends (reconnecting as needed).
/// Nothing in the loop waits on the batches it hands off: a message that
/// finds every hand busy is dropped (the device sends it again), and
/// acknowledgements that find the client's queue full are dropped too.
pub async fn run(state: Arc<State>, host: String, port: u16, tls: rustls::ClientConfig) {
    let mut opts = MqttOptions::new(tern_net::COORDINATOR_CLIENT, host.clone(), port);
    opts.set_keep_alive(Duration::from_secs(30));
    // Devices send again what was not acknowledged: nothing need wait at
    // the broker while the coordinator is away.
    opts.set_clean_session(true);
    opts.set_max_packet_size(MAX_INCOMING, MAX_INCOMING);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls))));
    let (client, mut events) = AsyncClient::new(opts, 1024);
    let hands = Arc::new(tokio::sync::Semaphore::new(IN_HAND));
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!(broker = %format!("{host}:{port}"), "connected to the MQTT broker");
                for topic in ["tern/v1/+/telemetry", "tern/v1/+/alerts", "tern/v1/+/capture", "tern/v1/+/state"] {
                    if let Err(e) = client.try_subscribe(topic, QoS::AtLeastOnce) {
                        warn!("subscribing to {topic}: {e}");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Ok(hand) = hands.clone().try_acquire_owned() else {
                    state.metrics.mqtt_refused.inc();
                    debug!(topic = %p.topic, "every hand busy: the MQTT message is dropped (the device sends it again)");
                    continue;
                };
                let (state, client) = (state.clone(), client.clone());
                tokio::spawn(async move {
                    if let Err(e) = take(&state, &client, &p.topic, &p.payload).await {
                        state.metrics.mqtt_refused.inc();
                        debug!(topic = %p.topic, "MQTT message not taken: {e:#}");
                    }
                    drop(hand);
                });
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                if s.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    warn!(
                        "the MQTT broker refused the coordinator's subscription: its ACL must let {} read tern/v1/#",
                        tern_net::COORDINATOR_CLIENT
                    );
                }
            }
            Ok(_) => {}
            Err(e) => {
                warn!(broker = %format!("{host}:{port}"), "MQTT: {e}; connecting again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Takes one device's message: a telemetry batch, acknowledged once stored.
async fn take(state: &Arc<State>, client: &AsyncClient, topic: &str, payload: &[u8]) -> Result<()> {
    let id = device_topic(topic).ok_or_else(|| anyhow::anyhow!("not a device's telemetry topic"))?;
    // Frames of wire 8 on, answered in the device's version: the one of
    // the route it was given.
    let wire = payload
        .get(2..4)
        .map(|v| WireVersion(u16::from_le_bytes([v[0], v[1]])))
        .filter(|v| (WIRE..=state.max_wire).contains(v))
        .ok_or_else(|| anyhow::anyhow!("not a frame of wire 8 to {}", state.max_wire))?;
    let (msg, used) = tern_proto::decode_frame(payload, MAX_MESSAGE, wire)?
        .ok_or_else(|| anyhow::anyhow!("a frame cut short ({} bytes)", payload.len()))?;
    anyhow::ensure!(used == payload.len(), "{} bytes past the frame", payload.len() - used);
    let batch = match msg {
        Message::Telemetry(batch) if !topic.ends_with("/state") => batch,
        // The agent's traffic counts: taken as the larger of each count
        // kept and sent (counts of a day only grow; this message and the
        // control session's may arrive in either order).
        Message::Traffic(t) if topic.ends_with("/state") => {
            // Merged with what the control session reported (the registry
            // keeps the larger count of each link and day).
            let (st, device) = (state.clone(), id.clone());
            let report =
                tern_registry::Report { traffic: Some(super::quic::clean_traffic(t.days)), ..Default::default() };
            tokio::task::spawn_blocking(move || st.registry.seen(device.as_str(), crate::fsutil::unix_now(), &report))
                .await??;
            debug!(device = %id, "traffic over MQTT");
            return Ok(());
        }
        other => anyhow::bail!("{} is not what {topic} carries", other.kind()),
    };
    // A removed device's certificate still passes the broker's TLS (it has
    // no revocation list): `take_telemetry` takes only enrolled devices'.
    let stream = batch.stream;
    let taken = super::quic::take_telemetry(state, &id, "mqtt", batch).await?;
    debug!(device = %id, new = taken.new, again = taken.again, up_to = taken.up_to, "telemetry over MQTT");
    let ack = tern_proto::encode_frame(
        &Message::TelemetryAck(tern_proto::TelemetryAck { stream, up_to: taken.up_to }),
        wire,
    )?;
    client.try_publish(format!("tern/v1/{id}/ack"), QoS::AtLeastOnce, false, ack)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_device_telemetry_topics_are_taken() {
        assert_eq!(device_topic("tern/v1/cam-1/telemetry").map(|d| d.to_string()), Some("cam-1".to_string()));
        assert!(device_topic("tern/v1/cam-1/alerts").is_some());
        assert!(device_topic("tern/v1/cam-1/ack").is_none());
        assert!(device_topic("tern/v1/Cam/telemetry").is_none());
        assert!(device_topic("tern/v1/cam-1/telemetry/x").is_none());
        assert!(device_topic("tern/v2/cam-1/telemetry").is_none());
    }
}
