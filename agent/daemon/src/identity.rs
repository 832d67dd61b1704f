//! The device's identity: made at enrollment, read at every start.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tern_durable::write_atomic;
use tern_net::{DeviceKey, FrameReader, NetError, write_msg};
use tern_proto::{DeviceId, EnrollRequest, EnrollTokenText, Message};
use tern_trust::VerifyingKey;

/// Non-secret facts about the enrollment, in `identity/agent.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Config format version.
    pub version: u32,
    /// This device's id.
    pub device_id: DeviceId,
    /// Where the coordinator was reached at enrollment (HOST:PORT).
    pub coordinator: String,
    /// Fleet group.
    pub group: String,
    /// Device profile.
    pub profile: String,
}

/// Everything the agent needs to talk to its coordinator.
pub struct Identity {
    pub info: AgentInfo,
    pub key_der: Vec<u8>,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
    pub registry_key: VerifyingKey,
    /// The latest time (Unix seconds) the agent knows has passed, and where
    /// it keeps it (`identity/time-floor`): the coordinator's certificate
    /// is checked at this time when the clock reads earlier (a device
    /// without a real-time clock reads 1970 after every boot).
    pub time_floor: AtomicU64,
    floor_path: PathBuf,
}

/// The floor is written again once it has moved this far (seconds): an SD
/// card is not written at every session.
const FLOOR_STEP: u64 = 3_600;

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

impl Identity {
    /// Reads the identity written at enrollment.
    pub fn load(data_dir: &Path) -> Result<Self> {
        let d = dir(data_dir);
        let read = |name: &str| {
            std::fs::read(d.join(name)).with_context(|| {
                format!("not enrolled: cannot read {} (run `tern-agent enroll` first)", d.join(name).display())
            })
        };
        let info: AgentInfo = serde_json::from_slice(&read("agent.json")?).context("identity/agent.json is corrupt")?;
        let key: [u8; 32] =
            read("registry.pub")?.try_into().map_err(|_| anyhow::anyhow!("identity/registry.pub is corrupt"))?;
        let floor_path = d.join("time-floor");
        let floor = std::fs::read_to_string(&floor_path).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
        Ok(Self {
            info,
            key_der: read("device.key")?,
            cert_der: read("device.crt")?,
            ca_der: read("ca.crt")?,
            registry_key: VerifyingKey(key),
            time_floor: AtomicU64::new(floor),
            floor_path,
        })
    }

    /// The time the coordinator's or broker's certificate is checked at
    /// when the clock reads earlier: the floor stands in for a clock that
    /// was never set; a set clock is used as it reads (0: no floor), so a
    /// floor pushed too far cannot lock it out.
    pub fn tls_floor(&self) -> u64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now >= tern_trust::tuf::PLAUSIBLE_CLOCK { 0 } else { self.time_floor.load(Ordering::Relaxed) }
    }

    /// After a session's `Welcome`: moves the floor to the clock if it is
    /// set, else to the coordinator's time (a coordinator cannot move the
    /// floor of a device whose clock is set, and a set clock ignores the
    /// floor). Returns the floor to persist, if it moved far enough.
    pub fn advance_floor(&self, server_time: u64) -> Option<(PathBuf, u64)> {
        let now = unix_now();
        let known = if now >= tern_trust::tuf::PLAUSIBLE_CLOCK { now } else { server_time };
        let floor = self.time_floor.load(Ordering::Relaxed);
        (known >= floor.saturating_add(FLOOR_STEP)).then(|| {
            self.time_floor.store(known, Ordering::Relaxed);
            (self.floor_path.clone(), known)
        })
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Resolves HOST:PORT to one socket address.
pub async fn resolve(hostport: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(hostport)
        .await
        .with_context(|| format!("cannot resolve coordinator address {hostport:?} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("{hostport:?} resolves to no address"))
}

/// Enrolls this device: makes its key here, sends a signing request with the
/// one-time token to the coordinator whose CA the token pins, keeps the
/// certificate it gets back.
pub async fn enroll(data_dir: &Path, coordinator: &str, token: &str, device_id: Option<DeviceId>) -> Result<AgentInfo> {
    let d = dir(data_dir);
    if d.join("agent.json").exists() {
        bail!("already enrolled ({} exists); use a fresh --data-dir to enroll again", d.join("agent.json").display());
    }
    let token = EnrollTokenText::decode(token)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    if now >= token.expires_at {
        bail!("enrollment token expired {} s ago; ask for a new one with `tern fleet token`", now - token.expires_at);
    }
    let addr = resolve(coordinator).await?;
    let key = DeviceKey::generate()?;
    let csr = key.csr(device_id.as_ref().map_or("tern-device", |d| d.as_str()))?;

    let endpoint = tern_net::client_endpoint(addr)?;
    let config = tern_net::enroll_client_config(token.ca_sha256)?;
    let connecting = endpoint.connect_with(config, addr, tern_net::COORDINATOR_NAME)?;
    let conn = tokio::time::timeout(Duration::from_secs(15), connecting)
        .await
        .with_context(|| format!("no answer from a coordinator at {addr} within 15 s"))?
        .map_err(NetError::from)
        .with_context(|| {
            format!("TLS handshake with {addr} failed (is this the coordinator that issued the token?)")
        })?;
    let version = tern_net::wire_version(&conn)?;
    let (mut send, recv) = conn.open_bi().await.map_err(NetError::from)?;
    let req = EnrollRequest {
        secret: token.secret,
        csr_der: csr,
        requested_id: device_id,
        agent_version: crate::VERSION.into(),
    };
    write_msg(&mut send, &Message::EnrollRequest(req), version).await?;
    send.finish().ok();
    let reply = tokio::time::timeout(Duration::from_secs(15), FrameReader::new(recv, version).next())
        .await
        .with_context(|| format!("no enrollment answer from {addr} within 15 s"))?
        .context("reading the enrollment answer")?;
    conn.close(0u32.into(), b"enrolled");
    endpoint.wait_idle().await;
    let resp = match reply {
        Some(Message::EnrollResponse(r)) => r,
        Some(Message::Error(e)) => bail!("coordinator refused enrollment: {}", e.message),
        Some(other) => bail!("unexpected answer to enrollment: {}", other.kind()),
        None => bail!("coordinator closed the enrollment stream without an answer"),
    };
    if tern_net::ca_fingerprint(&resp.ca_der) != token.ca_sha256 {
        bail!("coordinator sent a CA certificate that is not the one the token pins");
    }

    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    write_atomic(&d.join("device.key"), &key.pkcs8_der(), true)?;
    write_atomic(&d.join("device.crt"), &resp.cert_der, false)?;
    write_atomic(&d.join("ca.crt"), &resp.ca_der, false)?;
    write_atomic(&d.join("registry.pub"), &resp.registry_key, false)?;
    // The clock passed the coordinator's certificate check: a floor.
    write_atomic(&d.join("time-floor"), now.to_string().as_bytes(), false)?;
    let info = AgentInfo {
        version: 1,
        device_id: resp.device_id,
        coordinator: coordinator.to_owned(),
        group: resp.group,
        profile: resp.profile,
    };
    // agent.json last: its presence means the identity is complete.
    write_atomic(&d.join("agent.json"), &serde_json::to_vec_pretty(&info)?, false)?;
    Ok(info)
}
