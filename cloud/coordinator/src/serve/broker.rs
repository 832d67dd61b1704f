//! The embedded MQTT broker (rmqtt): TLS with the fleet CA's client
//! certificates required, the certificate's subject as the username, and
//! hooks that keep every device to its own topics.

use anyhow::{Context, Result};
use async_trait::async_trait;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::types::{AuthResult, PublishAclResult, SubscribeAclResult};
use std::net::SocketAddr;
use std::path::Path;
use tern_net::COORDINATOR_CLIENT;
use tracing::{info, warn};

/// The most bytes one MQTT packet may have: a telemetry batch (at most 96
/// KiB of records) and its topic. Below what the coordinator's client
/// takes, so no device can make the broker forward a packet the client
/// refuses (which would cut it off).
pub const MAX_PACKET: u32 = 132 << 10;

/// Whether `username` (a certificate's subject) may publish to, or
/// subscribe with, `topic`: a device under `tern/v1/<its id>/` only, the
/// coordinator's client under `tern/v1/`. Wildcards in a device's filter
/// are allowed past its own prefix only, and shared or system topics not
/// at all.
pub fn allowed(username: &str, topic: &str) -> bool {
    if username == COORDINATOR_CLIENT {
        return topic.starts_with("tern/v1/");
    }
    tern_proto::DeviceId::new(username).is_ok()
        && topic.strip_prefix("tern/v1/").and_then(|t| t.strip_prefix(username)).is_some_and(|t| t.starts_with('/'))
}

/// Whether a client may connect: it presented a fleet certificate (the
/// TLS listener requires one; its subject is the username) and asks for
/// the client id of that subject, so that no device can take over
/// another's session.
fn may_connect(username: Option<&str>, client_id: &str) -> bool {
    username.is_some_and(|u| u == client_id && (u == COORDINATOR_CLIENT || tern_proto::DeviceId::new(u).is_ok()))
}

/// The hooks enforcing [`allowed`] and [`may_connect`].
struct Acl;

#[async_trait]
impl Handler for Acl {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => {
                let id = info.id();
                let user = id.username.as_deref();
                // A will is published past the publish hook: its topic is
                // checked here.
                let will = info.last_will().map(|w| match w {
                    rmqtt::types::LastWill::V3(w) => w.topic.to_string(),
                    rmqtt::types::LastWill::V5(w) => w.topic.to_string(),
                });
                let ok =
                    may_connect(user, &id.client_id) && will.as_deref().is_none_or(|t| allowed(user.unwrap_or(""), t));
                if !ok {
                    warn!(client = %id.client_id, username = ?user, remote = ?id.remote_addr, will = ?will,
                        "MQTT connection refused: its client id is not its certificate's subject, or its will is not under its topics");
                }
                let result = if ok { AuthResult::Allow(false, None) } else { AuthResult::NotAuthorized };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                let user = session.id.username.as_deref().unwrap_or("");
                let result = if allowed(user, &subscribe.topic_filter) {
                    SubscribeAclResult::new_success(subscribe.opts.qos(), None)
                } else {
                    warn!(client = %session.id.client_id, filter = %subscribe.topic_filter,
                        "MQTT subscription refused: not under the client's own topics");
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(result)))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let user = session.id.username.as_deref().unwrap_or("");
                let result = if allowed(user, &publish.topic) {
                    PublishAclResult::allow()
                } else {
                    warn!(client = %session.id.client_id, topic = %publish.topic,
                        "MQTT publish refused (client disconnected): not under the client's own topics");
                    PublishAclResult::rejected(true, None)
                };
                (false, Some(HookResult::PublishAclResult(result)))
            }
            _ => (true, acc),
        }
    }
}

/// Starts the broker on `listen`, its TLS files written under `dir`;
/// returns the address it is bound to.
pub async fn start(
    dir: &Path,
    listen: SocketAddr,
    ca_der: &[u8],
    server: (&[u8], &[u8]),
    max_connections: usize,
) -> Result<SocketAddr> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca, cert, key) = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    tern_durable::write_atomic(&ca, pem("CERTIFICATE", ca_der).as_bytes(), false)?;
    tern_durable::write_atomic(&cert, pem("CERTIFICATE", server.0).as_bytes(), false)?;
    tern_durable::write_atomic(&key, pem("PRIVATE KEY", server.1).as_bytes(), true)?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let scx = rmqtt::context::ServerContext::new().build().await;
    let register = scx.extends.hook_mgr().register();
    for typ in [Type::ClientAuthenticate, Type::ClientSubscribeCheckAcl, Type::MessagePublishCheckAcl] {
        register.add(typ, Box::new(Acl)).await;
    }
    register.start().await;
    let listener = rmqtt::net::Builder::new()
        .name("tern/tls")
        .laddr(listen)
        // A restart binds again past the last connections' TIME_WAIT.
        .reuseaddr(Some(true))
        .max_connections(max_connections)
        .max_packet_size(MAX_PACKET)
        .allow_anonymous(false)
        .tls_cross_certificate(true)
        .tls_cert(Some(path(&cert)))
        .tls_key(Some(path(&key)))
        .tls_client_ca_certs(Some(path(&ca)))
        .cert_cn_as_username(true)
        .bind()
        .map_err(|e| anyhow::anyhow!("binding the MQTT broker on {listen}: {e}"))?
        .tls()
        .map_err(|e| anyhow::anyhow!("the MQTT broker's TLS: {e}"))?;
    let bound = listener.local_addr().map_err(|e| anyhow::anyhow!("{e}"))?;
    rmqtt::server::MqttServer::new(scx).listener_by_id(listener, 1).build().start();
    info!(mqtt = %bound, "embedded MQTT broker listening (TLS, fleet certificates)");
    Ok(bound)
}

/// `der` as PEM with `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_keep_to_their_own_topics() {
        assert!(allowed("cam-1", "tern/v1/cam-1/telemetry"));
        assert!(allowed("cam-1", "tern/v1/cam-1/#"));
        assert!(!allowed("cam-1", "tern/v1/cam-10/telemetry"), "a prefix of another id");
        assert!(!allowed("cam-1", "tern/v1/cam-2/telemetry"));
        assert!(!allowed("cam-1", "tern/v1/+/telemetry"));
        assert!(!allowed("cam-1", "tern/v1/#"));
        assert!(!allowed("cam-1", "tern/v1/cam-1"));
        assert!(!allowed("cam-1", "$share/g/tern/v1/cam-1/ack"));
        assert!(!allowed("cam-1", "$SYS/#"));
        assert!(!allowed("+", "tern/v1/+/telemetry"), "not a device id");
        assert!(!allowed("", "tern/v1//x"));
        assert!(allowed(COORDINATOR_CLIENT, "tern/v1/+/telemetry"));
        assert!(!allowed(COORDINATOR_CLIENT, "#"));
    }

    #[test]
    fn a_client_connects_only_as_its_certificate_says() {
        assert!(may_connect(Some("cam-1"), "cam-1"));
        assert!(!may_connect(Some("cam-1"), "cam-2"));
        assert!(!may_connect(None, "cam-1"));
        assert!(!may_connect(Some("Tern fleet CA (x)"), "Tern fleet CA (x)"));
        assert!(may_connect(Some(COORDINATOR_CLIENT), COORDINATOR_CLIENT));
    }
}
