//! The agent-facing QUIC side: enrollment on connections without a client
//! certificate; control and artifact streams for enrolled devices.
//!
//! Before a peer has shown a device certificate it is held to little: one
//! stream, small windows (set in `tern-net`), a deadline for the handshake,
//! for its first frame and for the whole enrollment, and caps on such
//! connections in all and per address. A device gets a few connections
//! ([`super::sessions::PER_DEVICE`]), each of which must open its control
//! session within 10 s; up to `tern_net::DEVICE_STREAMS` streams each, every
//! one handled on its own task (one stalled stream blocks no other) with a
//! deadline for its first frame and its certificate checked again; frames of
//! at most 128 KiB; and one control session, closed when it goes quiet.

use super::State;
use super::limits::{LogLimit, Slot};
use super::sessions::close;
use crate::fsutil::unix_now;
use anyhow::{Context, Result, anyhow};
use quinn::{Connection, RecvStream, SendStream};
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};
use tern_net::{FrameReader, write_msg};
use tern_proto::ModelFormat;
use tern_proto::{
    ArtifactHeader, DeviceId, EnrollRequest, EnrollResponse, ErrorCode, FetchArtifact, Message, ModelStatus,
    Sha256Digest, Welcome, WireError, WireVersion,
};
use tern_registry::{Capabilities, Device, RegistryError, Report};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::{debug, info, warn};

/// Device certificates are valid this long; renewal is a later step.
const DEVICE_CERT_DAYS: i64 = 3650;
/// A handshake must complete within this.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(5);
/// A device's connection must open its control session within this.
const SESSION_WITHIN: Duration = Duration::from_secs(10);
/// The largest frame a device may send (a `Hello` or `Status` of a few
/// hundred models).
const DEVICE_MAX_FRAME: usize = 128 << 10;
/// A stream's first frame must arrive within this of the stream opening
/// (and an enrolling peer's stream within this of its handshake).
const FIRST_FRAME_WITHIN: Duration = Duration::from_secs(10);
/// A connection without a certificate is closed this long after its
/// handshake, whatever it is doing.
const ANONYMOUS_FOR: Duration = Duration::from_secs(30);
/// The largest frame a peer without a certificate may send (an enrollment
/// request is about 1 KiB): what it can make the coordinator hold.
const ANONYMOUS_MAX_FRAME: usize = 16 << 10;
/// The steps a device's update history may name.
const UPDATE_PHASES: &[&str] = &[
    "fetching",
    "verifying",
    "staged",
    "self-test",
    "shadow",
    "ready",
    "probation",
    "committed",
    "retrying",
    "failed",
    "rolled back",
    "refused",
    "abandoned",
];
/// What a device may report about itself is cut to this.
const MAX_REPORTED_MODELS: usize = 256;
const MAX_REPORTED_TEXT: usize = 512;

/// Refused peers are logged at most this often, each kind on its own
/// budget: a peer must not be able to flood the log, nor hide one kind of
/// refusal behind a flood of another.
static CONNECTION_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new(20, Duration::from_secs(10)));
static HANDSHAKE_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new(20, Duration::from_secs(10)));
static CERTIFICATE_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new(20, Duration::from_secs(10)));
static ENROLLMENT_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new(20, Duration::from_secs(10)));
static REQUEST_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new(20, Duration::from_secs(10)));
static RETRY_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new(5, Duration::from_secs(10)));

macro_rules! limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limit.allow(Instant::now()) {
            info!(suppressed, $($arg)+);
        }
    };
}

pub async fn accept_loop(endpoint: quinn::Endpoint, state: Arc<State>) {
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        // Under a flood of handshakes, a peer first proves the address is
        // its own (one more round trip), so spoofed sources cost nothing.
        if !incoming.remote_address_validated() && incoming.may_retry() && state.counters.crowded() {
            if let Some(suppressed) = RETRY_LOG.allow(Instant::now()) {
                debug!(suppressed, %remote, "handshakes crowded: asking for address validation");
            }
            let _ = incoming.retry();
            continue;
        }
        let slot = match state.counters.admit(remote.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                limited!(CONNECTION_LOG, %remote, "connection refused: {why}");
                incoming.refuse();
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => return limited!(HANDSHAKE_LOG, %remote, "handshake failed: {e}"),
            };
            let conn = match tokio::time::timeout(HANDSHAKE_WITHIN, connecting).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return limited!(HANDSHAKE_LOG, %remote, "handshake failed: {e}"),
                Err(_) => return limited!(HANDSHAKE_LOG, %remote, "handshake not done within {HANDSHAKE_WITHIN:?}"),
            };
            if let Err(e) = handle_connection(conn, state, slot).await {
                debug!(%remote, "connection ended: {e:#}");
            }
        });
    }
}

async fn handle_connection(conn: Connection, state: Arc<State>, mut slot: Slot) -> Result<()> {
    let version = tern_net::wire_version(&conn)?;
    let Some(cert) = tern_net::peer_cert(&conn) else {
        if let Err(why) = slot.anonymous() {
            limited!(CONNECTION_LOG, remote = %conn.remote_address(), "connection without a certificate closed: {why}");
            conn.close(close::BUSY.into(), b"busy: too many connections without a certificate; try again later");
            return Ok(());
        }
        let enrolled = tokio::time::timeout(ANONYMOUS_FOR, enrollment(&conn, state, version)).await;
        conn.close(0u32.into(), b"enrollment over");
        return enrolled.unwrap_or_else(|_| Err(anyhow!("enrollment not done within {ANONYMOUS_FOR:?}")));
    };
    let remote = conn.remote_address();
    let fingerprint = Sha256Digest::of(&cert);
    let Some(id) = device_of(&state, &conn, &fingerprint)? else {
        return Ok(());
    };
    slot.device(id.as_str());
    tern_net::admit_device(&conn);
    state.sessions.connected(&id, &conn);
    info!(device = %id, %remote, wire = %version, "device connected");
    let ended = device_streams(&state, &conn, &id, version, fingerprint).await;
    state.sessions.disconnected(&id, conn.stable_id());
    info!(device = %id, %remote, "device disconnected: {ended}");
    Ok(())
}

/// The enrolled device a certificate belongs to now; otherwise the
/// connection is closed (with the reason logged) and `None`.
fn device_of(state: &State, conn: &Connection, fingerprint: &Sha256Digest) -> Result<Option<DeviceId>> {
    if let Some(device) = state.registry.device_by_cert(fingerprint)? {
        return Ok(Some(device.id));
    }
    // Signed by our CA but not (or no longer) a device of this registry.
    let (code, why) = match state.registry.revoked(fingerprint)? {
        Some(id) => (close::REVOKED, format!("the certificate of removed device {id}")),
        None => (1, format!("certificate {fingerprint}, which belongs to no enrolled device")),
    };
    limited!(CERTIFICATE_LOG, remote = %conn.remote_address(), "connection refused: {why}");
    conn.close(code.into(), b"this certificate is not one of an enrolled device");
    Ok(None)
}

/// Serves a device connection's streams until it ends; says why it ended.
async fn device_streams(
    state: &Arc<State>,
    conn: &Connection,
    id: &DeviceId,
    version: WireVersion,
    fingerprint: Sha256Digest,
) -> String {
    let session_due = tokio::time::sleep(SESSION_WITHIN);
    tokio::pin!(session_due);
    let mut session_checked = false;
    loop {
        let (send, recv) = tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => return e.to_string(),
            },
            _ = &mut session_due, if !session_checked => {
                session_checked = true;
                if !state.sessions.has_session(id, conn.stable_id()) {
                    conn.close(close::IDLE.into(), b"no control session opened within 10 s");
                    return "no control session within 10 s".into();
                }
                continue;
            }
        };
        // Removed (or re-enrolled under a new certificate) since it connected:
        // nothing more on this connection.
        match device_of(state, conn, &fingerprint) {
            Ok(Some(now)) if &now == id => {}
            Ok(_) => {
                conn.close(close::REVOKED.into(), b"this certificate is no longer the device's");
                return "its certificate is no longer the device's".into();
            }
            Err(e) => {
                conn.close(1u32.into(), b"coordinator error");
                return format!("registry: {e:#}");
            }
        }
        let (state, id, conn) = (state.clone(), id.clone(), conn.clone());
        tokio::spawn(async move {
            if let Err(e) = stream(state, &conn, &id, version, send, recv).await {
                debug!(device = %id, "stream ended: {e:#}");
            }
        });
    }
}

/// One stream of a device: its first frame says what it is for.
async fn stream(
    state: Arc<State>,
    conn: &Connection,
    id: &DeviceId,
    version: WireVersion,
    send: SendStream,
    recv: RecvStream,
) -> Result<()> {
    let mut reader = FrameReader::with_limit(recv, version, DEVICE_MAX_FRAME);
    let remote = conn.remote_address();
    let first = match tokio::time::timeout(FIRST_FRAME_WITHIN, reader.next()).await {
        Ok(first) => first,
        Err(_) => return reject(send, remote, version, ErrorCode::BadRequest, "no request within 10 s".into()).await,
    };
    match first {
        Ok(Some(Message::Hello(h))) => control(state, conn, id, version, h, send, reader).await,
        Ok(Some(Message::FetchArtifact(f))) => artifact(state, id, remote, version, f, send).await,
        Ok(Some(other)) => {
            let m = format!("{} cannot open a stream", other.kind());
            reject(send, remote, version, ErrorCode::BadRequest, m).await
        }
        Ok(None) => Ok(()),
        Err(e) => reject(send, remote, version, ErrorCode::BadRequest, e.to_string()).await,
    }
}

async fn reject(
    mut send: SendStream,
    remote: SocketAddr,
    version: WireVersion,
    code: ErrorCode,
    message: String,
) -> Result<()> {
    reject_on(&mut send, remote, version, code, message).await
}

async fn enrollment(conn: &Connection, state: Arc<State>, version: WireVersion) -> Result<()> {
    let (mut send, recv) = tokio::time::timeout(FIRST_FRAME_WITHIN, conn.accept_bi())
        .await
        .map_err(|_| anyhow!("no enrollment stream within {FIRST_FRAME_WITHIN:?}"))??;
    let mut reader = FrameReader::with_limit(recv, version, ANONYMOUS_MAX_FRAME);
    let first = tokio::time::timeout(FIRST_FRAME_WITHIN, reader.next())
        .await
        .map_err(|_| anyhow!("no enrollment request within {FIRST_FRAME_WITHIN:?}"))?;
    let reply = match first {
        Ok(Some(Message::EnrollRequest(req))) => {
            let st = state.clone();
            match tokio::task::spawn_blocking(move || enroll(&st, req)).await? {
                Ok(resp) => Message::EnrollResponse(resp),
                Err(e) => {
                    limited!(ENROLLMENT_LOG, remote = %conn.remote_address(), "enrollment refused: {}", e.message);
                    Message::Error(e)
                }
            }
        }
        Ok(Some(other)) => Message::Error(WireError::new(
            ErrorCode::Unauthorized,
            format!("{} needs a device certificate; enroll first", other.kind()),
        )),
        Ok(None) => return Ok(()),
        Err(e) => Message::Error(WireError::new(ErrorCode::BadRequest, e.to_string())),
    };
    write_msg(&mut send, &reply, version).await?;
    send.finish()?;
    // Dropping the connection now could discard the reply: let the agent
    // read it and close, or give up after a while.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
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
    let agent_version = clean(&req.agent_version);
    let device = state.registry.enroll(&req.secret, id, Sha256Digest::of(&cert), &agent_version, now).map_err(wire)?;
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

/// A device-supplied string as the registry keeps it: no control
/// characters, at most [`MAX_REPORTED_TEXT`] characters.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(MAX_REPORTED_TEXT).collect()
}

/// Links an agent counts traffic on.
const LINKS: &[&str] = &["quic", "mqtt"];

/// The entries of a traffic report kept: of known links, once per day, a
/// few.
pub(super) fn clean_traffic(days: Vec<tern_proto::LinkDay>) -> Vec<tern_proto::LinkDay> {
    let mut kept: Vec<tern_proto::LinkDay> = Vec::new();
    for d in days.into_iter().filter(|d| LINKS.contains(&d.link.as_str())) {
        if kept.len() < tern_proto::MAX_TRAFFIC_DAYS && !kept.iter().any(|k| k.link == d.link && k.day == d.day) {
            kept.push(d);
        }
    }
    kept
}

/// Three of the agent's heartbeats, and never less than the coordinator's
/// own limit nor more than an hour.
fn silence_for(floor: std::time::Duration, heartbeat_secs: u32) -> std::time::Duration {
    let asked = std::time::Duration::from_secs(3 * u64::from(heartbeat_secs.min(1200)));
    asked.max(floor)
}

fn clean_models(models: Vec<ModelStatus>) -> Vec<ModelStatus> {
    models
        .into_iter()
        .take(MAX_REPORTED_MODELS)
        .map(|m| ModelStatus { name: clean(&m.name), detail: m.detail.as_deref().map(clean), ..m })
        .collect()
}

/// Rules an agent raises alerts on (`tern_agent_core::monitor::Rule`).
const RULES: &[&str] =
    &["feature_drift", "missing_rate", "output_drift", "p99_latency", "error_rate", "low_confidence"];

/// Stores a device's telemetry off the async runtime. Only what the device
/// could have made is kept: records of versions the coordinator gave it
/// (now or among its last assignments; by the device's own word only while
/// the coordinator's record cannot tell: see `Device::may_report`),
/// rules the agent knows, features of the version's baseline, profiles
/// that fit its layout, quality counts that add up, captures of versions
/// with a capture policy (a device cannot make the registry keep records
/// under names or in shapes of its own choosing).
pub(super) async fn take_telemetry(
    state: &Arc<State>,
    id: &DeviceId,
    link: &'static str,
    mut batch: tern_proto::TelemetryBatch,
) -> Result<tern_registry::Taken> {
    use tern_proto::TelemetryBody;
    batch.records.truncate(tern_proto::MAX_TELEMETRY_BATCH);
    let (st, device) = (state.clone(), id.clone());
    let taken = tokio::task::spawn_blocking(move || {
        let id = device;
        let bytes = postcard::to_stdvec(&batch.records).map_or(0, |v| v.len() as u64);
        let d = st.registry.device(id.as_str())?;
        let given = |model: &str, version: u32| d.may_report(model, version);
        let keep = |body: &TelemetryBody| match body {
            TelemetryBody::Window(w) => {
                given(&w.model, w.version)
                    && (w.profile.is_empty()
                        || st
                            .baseline(&w.model, w.version)
                            .is_some_and(|b| tern_drift::Profile::decode(&w.profile, &b.baseline.layout).is_ok()))
            }
            TelemetryBody::Alert(a) => {
                given(&a.model, a.version)
                    && RULES.contains(&a.rule.as_str())
                    && ((a.feature.is_empty() && matches!(a.rule.as_str(), "p99_latency" | "error_rate"))
                        || st
                            .baseline(&a.model, a.version)
                            .is_some_and(|b| b.baseline.layout.index(&a.feature).is_some()))
            }
            TelemetryBody::Started(s) => {
                d.desired.contains_key(&s.model) || d.reported.iter().any(|m| m.name == s.model)
            }
            // A replaced version's last window comes after the device moved
            // on: among its past assignments.
            TelemetryBody::Quality(q) => given(&q.model, q.version) && tern_drift::quality::well_formed(&q.counts),
            // Only while the version has a policy: what devices still hold
            // when it ends is acknowledged and dropped.
            TelemetryBody::Capture(c) => {
                given(&c.model, c.version)
                    && c.inference_id.len() <= 64
                    && st.registry.version(&c.model, c.version).is_ok_and(|v| v.capture.is_some())
                    && c.inputs.len() + c.outputs.len() <= tern_proto::MAX_CAPTURE_BYTES
                    && tern_proto::decode_tensors(&c.inputs).is_ok()
                    && tern_proto::decode_tensors(&c.outputs).is_ok()
            }
        };
        let taken = st.registry.take_telemetry_judged(&id, &batch, unix_now(), &st.quality_rules, keep)?;
        let mut distances = Vec::new();
        for w in taken.windows.iter().filter(|w| !w.profile.is_empty()) {
            let Some(b) = st.baseline(&w.model, w.version) else { continue };
            let Ok(profile) = tern_drift::Profile::decode(&w.profile, &b.baseline.layout) else { continue };
            for d in b.baseline.compare(&profile).unwrap_or_default() {
                if let Some(linf) = d.linf {
                    distances.push(super::metrics::Distance {
                        model: w.model.clone(),
                        version: w.version,
                        feature: d.feature,
                        linf,
                    });
                }
            }
        }
        st.metrics.telemetry(&id, link, &taken, bytes, &distances);
        Ok::<_, anyhow::Error>(taken)
    })
    .await??;
    for a in &taken.raised {
        warn!(device = %a.device, model = %a.model, version = a.version, rule = %a.rule, feature = %a.feature,
            value = a.value, threshold = a.threshold, "alert raised on a device");
        state.webhook.alert("alert_raised", a);
    }
    for a in &taken.cleared {
        state.webhook.alert("alert_cleared", a);
    }
    if taken.dropped > 0 {
        warn!(device = %id, dropped = taken.dropped, "the device's telemetry buffer overflowed");
    }
    Ok(taken)
}

/// Records a report off the async runtime (the registry writes to sled).
async fn seen(state: &Arc<State>, id: &DeviceId, report: Report) -> Result<Device> {
    let (st, id) = (state.clone(), id.to_string());
    Ok(tokio::task::spawn_blocking(move || st.registry.seen(&id, unix_now(), &report)).await??)
}

async fn control(
    state: Arc<State>,
    conn: &Connection,
    id: &DeviceId,
    version: WireVersion,
    hello: tern_proto::Hello,
    mut send: SendStream,
    mut reader: FrameReader,
) -> Result<()> {
    let opened = match state.sessions.open(id, conn) {
        Ok(opened) => opened,
        Err(super::sessions::NotOpened::AlreadyOpen) => {
            let m = "a control session is open on this connection already".to_string();
            return reject(send, conn.remote_address(), version, ErrorCode::SessionConflict, m).await;
        }
        Err(super::sessions::NotOpened::Gone) => {
            conn.close(close::REPLACED.into(), b"this connection is no longer the device's");
            return Ok(());
        }
    };
    let result = session(&state, conn, id, version, hello, &mut send, &mut reader, opened.wake).await;
    // The connection goes with its session: the device reconnects for a new one.
    conn.close(close::IDLE.into(), b"control session ended");
    result
}

#[allow(clippy::too_many_arguments)]
async fn session(
    state: &Arc<State>,
    conn: &Connection,
    id: &DeviceId,
    version: WireVersion,
    hello: tern_proto::Hello,
    send: &mut SendStream,
    reader: &mut FrameReader,
    mut wake: tokio::sync::watch::Receiver<u64>,
) -> Result<()> {
    let mut formats: Vec<ModelFormat> = Vec::new();
    for f in hello.formats.iter().take(16) {
        if !formats.contains(f) {
            formats.push(*f);
        }
    }
    let capabilities = (version >= WireVersion::V2).then(|| Capabilities {
        formats,
        backends: hello.backends.iter().take(16).map(|b| clean(b)).collect(),
        wire_version: version.0,
    });
    if version >= WireVersion::V2 && WireVersion::highest_shared(&[version], &hello.wire_versions) != Some(version) {
        let m = format!("this connection speaks wire {version}, which the agent's Hello does not list");
        return reject_on(send, conn.remote_address(), version, ErrorCode::BadRequest, m).await;
    }
    let report = Report {
        agent_version: Some(clean(&hello.agent_version)),
        models: Some(clean_models(hello.models)),
        capabilities,
        ..Report::default()
    };
    seen(state, id, report).await?;
    // Writes have the quiet deadline too: a device that stops taking them
    // (a window kept shut) is no better than one that stops talking.
    let quiet_for = state.session_quiet;
    let write = async |send: &mut SendStream, msg: Message| -> Result<()> {
        tokio::time::timeout(quiet_for, write_msg(send, &msg, version))
            .await
            .map_err(|_| anyhow!("the device took no frame for {quiet_for:?}"))??;
        Ok(())
    };
    let welcome = Welcome { device_id: id.clone(), server_time: unix_now(), wire_version: version.0 };
    write(send, Message::Welcome(welcome)).await?;
    // Marked before the state is read: a change in between wakes us again.
    wake.mark_unchanged();
    let (msg, mut sent_tuf) = desired_message(state, id, version).await?;
    write(send, msg).await?;
    if version >= WireVersion::V8 {
        write(send, Message::Route(state.route.clone())).await?;
    }
    // How long the device may stay silent: `--session-quiet-secs`, or
    // longer for an agent that says it speaks less often (wire 7 on).
    let mut silence = state.session_quiet;
    let quiet = tokio::time::sleep(silence);
    tokio::pin!(quiet);
    // From wire 4 on: newer TUF metadata (a rotated root, a fresh timestamp
    // before the held one expires) is sent with the state again.
    let mut tuf_check = tokio::time::interval(TUF_CHECK);
    tuf_check.tick().await;
    loop {
        // `reader.next()` is cancel-safe: a wake-up that wins mid-frame
        // loses none of the frame's bytes.
        tokio::select! {
            _ = &mut quiet => {
                conn.close(close::IDLE.into(), b"no frame on the control session for too long");
                return Err(anyhow!("no frame from the device for {silence:?}"));
            }
            msg = reader.next() => match msg.context("control stream")? {
                Some(Message::Status(r)) => {
                    let report = Report {
                        models: Some(clean_models(r.models)),
                        generation: (version >= WireVersion::V2).then_some(r.generation),
                        refused: (version >= WireVersion::V2).then(|| {
                            r.refused.map(|x| tern_proto::Refusal { reason: clean(&x.reason), ..x })
                        }),
                        ..Report::default()
                    };
                    let d = seen(state, id, report).await?;
                    quiet.as_mut().reset(tokio::time::Instant::now() + silence);
                    debug!(device = %d.id, models = ?d.reported, generation = ?d.reported_generation, "status");
                    if d.reported_generation.is_some_and(|g| g > d.generation) {
                        warn!(device = %d.id, applied = ?d.reported_generation, desired = d.generation,
                            "the device applied a newer desired state than the registry holds (restored from a backup?); it will ignore older ones");
                    }
                }
                Some(Message::History(h)) => {
                    // Only steps of the machine: a device cannot fill its
                    // record with text of its own choosing beyond reasons.
                    let events = h
                        .events
                        .into_iter()
                        .take(tern_proto::MAX_HISTORY)
                        .filter(|e| UPDATE_PHASES.contains(&e.phase.as_str()))
                        .map(|e| tern_proto::UpdateEvent {
                            name: clean(&e.name),
                            phase: clean(&e.phase),
                            reason: e.reason.as_deref().map(clean),
                            ..e
                        })
                        .collect();
                    let d = seen(state, id, Report { history: Some(events), ..Report::default() }).await?;
                    quiet.as_mut().reset(tokio::time::Instant::now() + silence);
                    debug!(device = %d.id, steps = d.history.len(), "update history");
                }
                Some(Message::Traffic(t)) if version >= WireVersion::V7 => {
                    silence = silence_for(state.session_quiet, t.heartbeat_secs);
                    let days = clean_traffic(t.days);
                    seen(state, id, Report { traffic: Some(days), ..Report::default() }).await?;
                    quiet.as_mut().reset(tokio::time::Instant::now() + silence);
                    debug!(device = %id, heartbeat_secs = t.heartbeat_secs, "traffic");
                }
                Some(Message::Telemetry(batch)) if version >= WireVersion::V6 => {
                    let stream = batch.stream;
                    let taken = take_telemetry(state, id, "quic", batch).await?;
                    quiet.as_mut().reset(tokio::time::Instant::now() + silence);
                    debug!(device = %id, new = taken.new, again = taken.again, up_to = taken.up_to, "telemetry");
                    write(send, Message::TelemetryAck(tern_proto::TelemetryAck { stream, up_to: taken.up_to })).await?;
                }
                Some(other) => {
                    let m = format!("{} is not allowed on the control stream", other.kind());
                    write(send, Message::Error(WireError::new(ErrorCode::BadRequest, m.clone()))).await?;
                    return Err(anyhow!(m));
                }
                None => return Ok(()),
            },
            changed = wake.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                wake.mark_unchanged();
                let (msg, tuf) = desired_message(state, id, version).await?;
                sent_tuf = tuf;
                write(send, msg).await?;
            }
            _ = tuf_check.tick(), if version >= WireVersion::V4 => {
                // The timestamp alone first: the state is read, signed and
                // encoded only when there is something newer to send.
                let current = {
                    let state = state.clone();
                    // As `desired_message` takes it: an error sends no metadata.
                    tokio::task::spawn_blocking(move || state.tuf_timestamp().unwrap_or(None)).await?
                };
                if current != sent_tuf {
                    let (msg, tuf) = desired_message(state, id, version).await?;
                    sent_tuf = tuf;
                    write(send, msg).await?;
                }
            }
        }
    }
}

/// How often a wire-4 session looks for newer TUF metadata.
const TUF_CHECK: std::time::Duration = std::time::Duration::from_secs(600);

/// The device's desired state for its session, off the async workers (it
/// reads the registry and may sign TUF metadata), and the timestamp it
/// carried.
async fn desired_message(
    state: &Arc<State>,
    id: &DeviceId,
    version: WireVersion,
) -> Result<(Message, Option<Vec<u8>>)> {
    let (state, id) = (state.clone(), id.clone());
    let msg = tokio::task::spawn_blocking(move || state.desired_message(&id, version)).await??;
    let tuf = match &msg {
        Message::SignedDesired(s) => s.tuf.as_ref().map(|t| t.timestamp.clone()),
        _ => None,
    };
    Ok((msg, tuf))
}

async fn reject_on(
    send: &mut SendStream,
    remote: SocketAddr,
    version: WireVersion,
    code: ErrorCode,
    message: String,
) -> Result<()> {
    limited!(REQUEST_LOG, %remote, ?code, "refusing request: {message}");
    write_msg(send, &Message::Error(WireError::new(code, message)), version).await?;
    send.finish()?;
    Ok(())
}

async fn artifact(
    state: Arc<State>,
    id: &DeviceId,
    remote: SocketAddr,
    version: WireVersion,
    req: FetchArtifact,
    mut send: SendStream,
) -> Result<()> {
    // A device may fetch only the files (artifact, golden vectors, the
    // alternative) of the versions assigned to it, as its profile gets them.
    let device = state.registry.device(id.as_str())?;
    let assigned = device.desired.iter().any(|(name, v)| {
        let manifest = state.registry.version(name, *v).ok().and_then(|v| v.manifest_for(&device.profile).ok());
        manifest.is_some_and(|m| m.files().any(|f| f == req.sha256))
    });
    if !assigned {
        let m = format!("artifact {} is not assigned to {id}", req.sha256);
        return reject(send, remote, version, ErrorCode::NotFound, m).await;
    }
    let path = state.artifacts.path(&req.sha256);
    let mut file = tokio::fs::File::open(&path).await.with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().await?.len();
    if req.offset > size {
        let m = format!("offset {} is past the end ({size} bytes)", req.offset);
        return reject(send, remote, version, ErrorCode::BadRequest, m).await;
    }
    let header = ArtifactHeader { sha256: req.sha256, size, offset: req.offset };
    write_msg(&mut send, &Message::ArtifactHeader(header), version).await?;
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
