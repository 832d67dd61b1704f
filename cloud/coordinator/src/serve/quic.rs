//! The agent-facing QUIC side: enrollment on connections without a client
//! certificate; control and artifact streams for enrolled devices.

use super::State;
use crate::fsutil::unix_now;
use anyhow::{Context, Result, anyhow};
use quinn::{Connection, RecvStream, SendStream};
use std::sync::Arc;
use tern_net::{read_msg, write_msg};
use tern_proto::{
    ArtifactHeader, DeviceId, EnrollRequest, EnrollResponse, ErrorCode, FetchArtifact, Message, Sha256Digest, Welcome,
    WireError,
};
use tern_registry::{Device, RegistryError};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::{debug, info, warn};

/// Device certificates are valid this long; renewal is a later step.
const DEVICE_CERT_DAYS: i64 = 3650;

pub async fn accept_loop(endpoint: quinn::Endpoint, state: Arc<State>) {
    while let Some(incoming) = endpoint.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    if let Err(e) = handle_connection(conn, state).await {
                        debug!(%remote, "connection ended: {e:#}");
                    }
                }
                Err(e) => warn!(%remote, "handshake failed: {e}"),
            }
        });
    }
}

async fn handle_connection(conn: Connection, state: Arc<State>) -> Result<()> {
    let Some(cert) = tern_net::peer_cert(&conn) else {
        return enrollment(conn, state).await;
    };
    let fingerprint = Sha256Digest::of(&cert);
    let Some(device) = state.registry.device_by_cert(&fingerprint)? else {
        // Signed by our CA but not (or no longer) a device of this registry.
        conn.close(1u32.into(), b"unknown device certificate");
        return Err(anyhow!("certificate {fingerprint} belongs to no enrolled device"));
    };
    let id = device.id.clone();
    info!(device = %id, remote = %conn.remote_address(), "device connected");
    loop {
        let (send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                info!(device = %id, "device disconnected: {e}");
                return Ok(());
            }
        };
        let first = read_msg(&mut recv).await;
        let state = state.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let result = match first {
                Ok(Some(Message::Hello(h))) => control(state, &id, h, send, recv).await,
                Ok(Some(Message::FetchArtifact(f))) => artifact(state, &id, f, send).await,
                Ok(Some(other)) => {
                    reject(send, ErrorCode::BadRequest, format!("{} cannot open a stream", other.kind())).await
                }
                Ok(None) => Ok(()),
                Err(e) => reject(send, ErrorCode::BadRequest, e.to_string()).await,
            };
            if let Err(e) = result {
                debug!(device = %id, "stream ended: {e:#}");
            }
        });
    }
}

async fn reject(mut send: SendStream, code: ErrorCode, message: String) -> Result<()> {
    warn!(?code, "refusing request: {message}");
    write_msg(&mut send, &Message::Error(WireError::new(code, message))).await?;
    send.finish()?;
    Ok(())
}

async fn enrollment(conn: Connection, state: Arc<State>) -> Result<()> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let reply = match read_msg(&mut recv).await {
        Ok(Some(Message::EnrollRequest(req))) => match enroll(&state, req) {
            Ok(resp) => Message::EnrollResponse(resp),
            Err(e) => {
                warn!(remote = %conn.remote_address(), "enrollment refused: {}", e.message);
                Message::Error(e)
            }
        },
        Ok(Some(other)) => Message::Error(WireError::new(
            ErrorCode::Unauthorized,
            format!("{} needs a device certificate; enroll first", other.kind()),
        )),
        Ok(None) => return Ok(()),
        Err(e) => Message::Error(WireError::new(ErrorCode::BadRequest, e.to_string())),
    };
    write_msg(&mut send, &reply).await?;
    send.finish()?;
    // Dropping the connection now could discard the reply: let the agent
    // read it and close, or give up after a while.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed()).await;
    Ok(())
}

fn wire(e: RegistryError) -> WireError {
    let code = match &e {
        RegistryError::TokenUnknown => ErrorCode::TokenUnknown,
        RegistryError::TokenUsed(_) => ErrorCode::TokenUsed,
        RegistryError::TokenExpired(_) => ErrorCode::TokenExpired,
        RegistryError::DeviceExists(_) => ErrorCode::DeviceExists,
        _ => ErrorCode::Internal,
    };
    WireError::new(code, e.to_string())
}

fn enroll(state: &State, req: EnrollRequest) -> Result<EnrollResponse, WireError> {
    let now = unix_now();
    // Check first so that a refused token costs no certificate.
    let token = state.registry.check_token(&req.secret, now).map_err(wire)?;
    let id = match req.requested_id {
        Some(id) => id,
        None => DeviceId::new(format!("dev-{}", hex::encode(super::random::<5>()))).expect("valid generated id"),
    };
    if state.registry.device(id.as_str()).is_ok() {
        return Err(wire(RegistryError::DeviceExists(id.to_string())));
    }
    let cert = state
        .ca
        .issue_device(&req.csr_der, id.as_str(), DEVICE_CERT_DAYS)
        .map_err(|e| WireError::new(ErrorCode::BadRequest, format!("certificate request refused: {e}")))?;
    let device =
        state.registry.enroll(&req.secret, id, Sha256Digest::of(&cert), &req.agent_version, now).map_err(wire)?;
    info!(device = %device.id, group = %token.group, profile = %token.profile, "device enrolled");
    Ok(EnrollResponse {
        device_id: device.id,
        cert_der: cert,
        ca_der: state.ca.cert_der().to_vec(),
        registry_key: state.signer.verifying_key().0,
        group: device.group,
        profile: device.profile,
    })
}

async fn control(
    state: Arc<State>,
    id: &DeviceId,
    hello: tern_proto::Hello,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<()> {
    let mut changes = state.changes.subscribe();
    state.registry.seen(id.as_str(), unix_now(), Some(&hello.agent_version), Some(&hello.models))?;
    write_msg(&mut send, &Message::Welcome(Welcome { device_id: id.clone(), server_time: unix_now() })).await?;
    write_msg(&mut send, &Message::Desired(state.desired(id.as_str())?)).await?;
    loop {
        tokio::select! {
            msg = read_msg(&mut recv) => match msg.context("control stream")? {
                Some(Message::Status(report)) => {
                    let d: Device = state.registry.seen(id.as_str(), unix_now(), None, Some(&report.models))?;
                    debug!(device = %d.id, models = ?report.models, "status");
                }
                Some(other) => {
                    let m = format!("{} is not allowed on the control stream", other.kind());
                    write_msg(&mut send, &Message::Error(WireError::new(ErrorCode::BadRequest, m.clone()))).await?;
                    return Err(anyhow!(m));
                }
                None => return Ok(()),
            },
            changed = changes.recv() => {
                let relevant = match changed {
                    Ok(dev) => &dev == id,
                    // Missed notifications: resend to be safe.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                };
                if relevant {
                    write_msg(&mut send, &Message::Desired(state.desired(id.as_str())?)).await?;
                }
            }
        }
    }
}

async fn artifact(state: Arc<State>, id: &DeviceId, req: FetchArtifact, mut send: SendStream) -> Result<()> {
    // A device may fetch only artifacts of versions assigned to it.
    let device = state.registry.device(id.as_str())?;
    let assigned = device
        .desired
        .iter()
        .any(|(name, version)| state.registry.version(name, *version).is_ok_and(|v| v.sha256 == req.sha256));
    if !assigned {
        return reject(send, ErrorCode::NotFound, format!("artifact {} is not assigned to {id}", req.sha256)).await;
    }
    let path = state.artifacts.path(&req.sha256);
    let mut file = tokio::fs::File::open(&path).await.with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().await?.len();
    if req.offset > size {
        return reject(send, ErrorCode::BadRequest, format!("offset {} is past the end ({size} bytes)", req.offset))
            .await;
    }
    write_msg(&mut send, &Message::ArtifactHeader(ArtifactHeader { sha256: req.sha256, size, offset: req.offset }))
        .await?;
    file.seek(std::io::SeekFrom::Start(req.offset)).await?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        send.write_all(&buf[..n]).await?;
    }
    send.finish()?;
    debug!(device = %id, sha256 = %req.sha256, offset = req.offset, size, "artifact sent");
    Ok(())
}
