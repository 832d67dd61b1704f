//! The agent's session with the coordinator over mutual-TLS QUIC: a
//! reconnecting control stream, and artifact downloads on streams of their
//! own that resume from what is already on disk.

use crate::identity::{Identity, resolve};
use crate::store::Store;
use crate::traffic::{Meter, Traffic, today};
use crate::trust::Incoming;
use anyhow::{Context, Result, anyhow, bail};
use std::sync::Arc;
use std::time::Duration;
use tern_net::{FrameReader, NetError, write_msg};
use tern_proto::{
    ErrorCode, FetchArtifact, Hello, Message, ModelFormat, Sha256Digest, StatusReport, UpdateEvent, UpdateHistory,
    WireVersion,
};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// The live session: its connection and the wire version it negotiated.
pub type Session = Option<(quinn::Connection, WireVersion)>;

/// How long the coordinator has to answer a `Hello` or a download request.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);
/// How long a session must have lasted for the back-off to start over.
const STEADY: Duration = Duration::from_secs(30);

/// A number in [0, 1) that differs between devices and attempts.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let mix = (u64::from(nanos) ^ u64::from(std::process::id())).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mix >> 11) as f64 / (1u64 << 53) as f64
}

/// What a report may take on the wire: the coordinator refuses a device's
/// frames above 128 KiB.
const REPORT_BYTES: usize = 120 << 10;

/// A report that fits in [`REPORT_BYTES`]: the details go first, then the
/// models past what fits (the coordinator keeps a few hundred at most anyway).
fn fitted(mut report: StatusReport, version: WireVersion) -> StatusReport {
    let size = |r: &StatusReport| {
        tern_proto::encode_frame(&Message::Status(r.clone()), version).map_or(usize::MAX, |f| f.len())
    };
    if size(&report) > REPORT_BYTES {
        report.models.iter_mut().for_each(|m| m.detail = None);
    }
    while size(&report) > REPORT_BYTES && !report.models.is_empty() {
        report.models.truncate(report.models.len() / 2);
    }
    report
}

/// What the link tells the main loop.
pub enum FromLink {
    /// The coordinator sent a desired state.
    Desired(crate::trust::Incoming),
}

/// What the agent reports, as the main loop publishes it.
pub struct Reports {
    /// The status: on every change (and, on sessions of wire version 6
    /// and older, every 30 s).
    pub status: watch::Receiver<StatusReport>,
    /// The recent update steps: on every change, on sessions of wire
    /// version 3 on (older coordinators cannot take them).
    pub history: watch::Receiver<Vec<UpdateEvent>>,
    /// Telemetry to send, on sessions of wire version 6 on.
    pub outbox: Arc<crate::outbox::Outbox>,
    /// The bytes the link carried, counted here and sent on sessions of
    /// wire version 7 on.
    pub traffic: Arc<Traffic>,
    /// Where telemetry goes, as the coordinator last said.
    pub route: Arc<Route>,
}

/// Where the agent sends telemetry: what the coordinator said on its last
/// session of wire version 8 or later (kept in `route.json`, so a restart
/// or a metered wake-up sends where the fleet wants before any session);
/// QUIC on sessions of older coordinators, which cannot say.
pub struct Route {
    tx: watch::Sender<Routed>,
    path: std::path::PathBuf,
    /// Held while writing: each write takes the route current then, so
    /// writes finishing out of order still leave the last one on disk.
    writing: Arc<std::sync::Mutex<()>>,
}

/// A route and the wire version of the coordinator that gave it, which
/// its MQTT messages are frames of (`route.json`; one written before wire
/// 9 has no `wire`, and was given by a coordinator of wire 8).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Routed {
    /// See [`tern_proto::TelemetryRoute::mqtt`].
    pub mqtt: Option<String>,
    /// The coordinator's wire version.
    #[serde(default = "wire_8")]
    pub wire: u16,
}

fn wire_8() -> u16 {
    8
}

impl Routed {
    /// The wire version its messages are frames of: the coordinator's,
    /// at most this build's.
    pub fn wire(&self) -> WireVersion {
        WireVersion(self.wire.clamp(8, WireVersion::CURRENT.0))
    }
}

impl Route {
    /// The route kept at `path`; QUIC if none is (or it is unreadable).
    pub fn open(path: std::path::PathBuf) -> Route {
        let kept = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        Route { tx: watch::Sender::new(kept), path, writing: Arc::default() }
    }

    /// Follows changes.
    pub fn watch(&self) -> watch::Receiver<Routed> {
        self.tx.subscribe()
    }

    /// Whether telemetry goes over MQTT (never in a build without it).
    pub fn mqtt(&self) -> bool {
        cfg!(feature = "mqtt") && self.tx.borrow().mqtt.is_some()
    }

    /// Takes what the coordinator said; written down when it changed.
    fn set(&self, route: tern_proto::TelemetryRoute, wire: WireVersion) {
        if !cfg!(feature = "mqtt") && route.mqtt.is_some() {
            warn!("the coordinator asks for telemetry over MQTT, which this build leaves out: sending it over QUIC");
        }
        let route = Routed { mqtt: route.mqtt, wire: wire.0 };
        if !self.tx.send_if_modified(|r| std::mem::replace(r, route.clone()) != route) {
            return;
        }
        info!(mqtt = ?route.mqtt, "telemetry route changed");
        let (path, current, writing) = (self.path.clone(), self.tx.subscribe(), self.writing.clone());
        tokio::task::spawn_blocking(move || {
            let _held = writing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let route = current.borrow().clone();
            match serde_json::to_vec(&route) {
                Ok(bytes) => {
                    if let Err(e) = tern_durable::write_atomic(&path, &bytes, false) {
                        warn!("writing {}: {e}", path.display());
                    }
                }
                Err(e) => warn!("encoding the route: {e}"),
            }
        });
    }
}

/// How the link keeps its session alive.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// QUIC keep-alives and idle timeout.
    pub liveness: tern_net::Liveness,
    /// The longest the control stream stays silent on sessions of wire
    /// version 7 on (on older ones, 30 s: their coordinators expect it).
    pub heartbeat: Duration,
    /// Metered: no session is held; one is opened this often (and at
    /// start) to send what the agent has and take any new desired state,
    /// and closed once nothing is left to do.
    pub metered: Option<Duration>,
}

/// How long a metered session must have had nothing to do before it is
/// closed: long enough for a desired state just taken to start its
/// downloads.
const METERED_SETTLE: Duration = Duration::from_secs(3);

/// Downloads running now (a metered session stays up for them).
static DOWNLOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a download as running while it lives.
pub struct Downloading;

impl Downloading {
    /// Counts one more running.
    pub fn start() -> Downloading {
        DOWNLOADS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Downloading
    }
}

impl Drop for Downloading {
    fn drop(&mut self) {
        DOWNLOADS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The heartbeat coordinators of wire version 6 and older expect.
const OLD_HEARTBEAT: Duration = Duration::from_secs(30);

/// How connections to coordinators of wire version 6 and older are kept
/// alive: their idle timeout is 20 s.
const OLDER_LIVENESS: tern_net::Liveness =
    tern_net::Liveness { keep_alive: Duration::from_secs(5), idle: Duration::from_secs(20) };

/// Whether the last coordinator this agent connected to spoke wire 6 or
/// older.
static OLDER_COORDINATOR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Counts what a connection carried into [`Traffic`]; the rest of it, and
/// the counts written down, when the session ends whichever way.
struct Counting {
    conn: quinn::Connection,
    meter: Meter,
    traffic: Arc<Traffic>,
    saved_at: Option<std::time::Instant>,
}

/// How often a session of wire 6 or older (a status every 30 s) writes the
/// counts down: each write is two fsyncs, and flash wears. From wire 7 on
/// they are written with every heartbeat.
const SAVE_EVERY: Duration = Duration::from_secs(300);

impl Counting {
    fn count(&mut self) {
        let (sent, received) = self.meter.take(&self.conn);
        self.traffic.add("quic", today(), sent, received);
    }

    /// Counts, and writes the counts down off the runtime if `now` or if
    /// they were not written in the last [`SAVE_EVERY`].
    fn save(&mut self, now: bool) {
        self.count();
        if !now && self.saved_at.is_some_and(|at| at.elapsed() < SAVE_EVERY) {
            return;
        }
        self.saved_at = Some(std::time::Instant::now());
        let traffic = self.traffic.clone();
        tokio::task::spawn_blocking(move || traffic.save());
    }
}

impl Drop for Counting {
    /// Written at once: a drop as the agent stops comes when the runtime
    /// takes no more blocking work (and the file is a few hundred bytes).
    fn drop(&mut self) {
        self.count();
        self.traffic.save();
    }
}

/// The most encoded record bytes one telemetry batch carries (the
/// coordinator refuses a device's frames above 128 KiB).
const TELEMETRY_BYTES: usize = 96 << 10;

/// Keeps a session with the coordinator up, forever. Publishes the live
/// connection (for downloads) on `conn_tx`; sends the reports; forwards
/// desired states to `to_main`.
pub async fn run(
    identity: Arc<Identity>,
    formats: Vec<ModelFormat>,
    conn_tx: watch::Sender<Session>,
    mut reports: Reports,
    pace: Pace,
    to_main: mpsc::Sender<FromLink>,
) {
    let mut backoff = Duration::from_millis(250);
    // A metered link retries no more often than it would connect anyway.
    let longest = pace.metered.unwrap_or(Duration::from_secs(30)).max(Duration::from_secs(30));
    loop {
        let mut welcomed = None;
        let opened = tokio::time::Instant::now();
        let ended = session(&identity, &formats, &conn_tx, &mut reports, pace, &to_main, &mut welcomed).await;
        if let (Some(every), Ok(())) = (pace.metered, &ended) {
            conn_tx.send_replace(None);
            backoff = Duration::from_millis(250);
            info!(next_in = ?every.saturating_sub(opened.elapsed()), "metered session closed: nothing more to send");
            tokio::time::sleep_until(opened + every).await;
            continue;
        }
        // A session that stayed up a while starts the back-off over (a
        // coordinator restarted now and then is not one that stays down);
        // one that fails soon after its Welcome, every time, does not.
        if welcomed.is_some_and(|at: std::time::Instant| at.elapsed() >= STEADY) {
            backoff = Duration::from_millis(250);
        }
        // Up to a quarter more, so that a fleet cut off at once does not
        // come back at once.
        let wait = backoff + backoff.mul_f64(jitter() * 0.25);
        if let Err(e) = ended {
            warn!("coordinator session: {e:#}; retrying in {wait:?}");
        }
        conn_tx.send_replace(None);
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(longest);
    }
}

async fn session(
    identity: &Identity,
    formats: &[ModelFormat],
    conn_tx: &watch::Sender<Session>,
    reports: &mut Reports,
    pace: Pace,
    to_main: &mpsc::Sender<FromLink>,
    welcomed: &mut Option<std::time::Instant>,
) -> Result<()> {
    let Reports { status: status_rx, history: history_rx, outbox, traffic, route } = reports;
    let addr = resolve(&identity.info.coordinator).await?;
    let floor = identity.tls_floor();
    let config = tern_net::device_client_config_at_least(
        &identity.ca_der,
        &identity.cert_der,
        &identity.key_der,
        floor,
        if OLDER_COORDINATOR.load(std::sync::atomic::Ordering::Relaxed) { OLDER_LIVENESS } else { pace.liveness },
    )?;
    let endpoint = tern_net::client_endpoint(addr)?;
    let conn = endpoint
        .connect_with(config, addr, tern_net::COORDINATOR_NAME)
        .map_err(NetError::from)?
        .await
        .map_err(NetError::from)
        .with_context(|| format!("connecting to {addr}"))?;
    let mut counting =
        Counting { conn: conn.clone(), meter: Meter::default(), traffic: traffic.clone(), saved_at: None };
    let version = tern_net::wire_version(&conn)?;
    // A coordinator of wire 6 or older drops a connection idle for 20 s:
    // the agent connects again with the keep-alive it expects, and goes
    // back to its own once a coordinator speaks 7.
    let older = version < WireVersion::V7;
    let was_older = OLDER_COORDINATOR.swap(older, std::sync::atomic::Ordering::Relaxed);
    if older && !was_older && pace.liveness.keep_alive > OLDER_LIVENESS.keep_alive {
        conn.close(0u32.into(), b"reconnecting with a shorter keep-alive");
        bail!(
            "the coordinator speaks wire {version}, which drops connections idle for 20 s; connecting again with a 5 s keep-alive"
        );
    }
    let (mut send, recv) = conn.open_bi().await.map_err(NetError::from)?;
    let mut reader = FrameReader::new(recv, version);
    let hello = Hello {
        agent_version: crate::VERSION.into(),
        models: fitted(status_rx.borrow_and_update().clone(), version).models,
        wire_versions: WireVersion::SUPPORTED.iter().map(|v| v.0).collect(),
        formats: formats.to_vec(),
        backends: tern_runtime::backends().iter().map(|b| b.to_string()).collect(),
    };
    write_msg(&mut send, &Message::Hello(hello), version).await?;
    let answer = tokio::time::timeout(ANSWER_WITHIN, reader.next())
        .await
        .map_err(|_| anyhow!("no Welcome from the coordinator within {} s", ANSWER_WITHIN.as_secs()))??;
    match answer {
        Some(Message::Welcome(w)) => {
            if version >= WireVersion::V2 && w.wire_version != version.0 {
                bail!("coordinator answered in wire v{} on a {version} connection", w.wire_version);
            }
            info!(device = %w.device_id, %addr, wire = %version, "connected to coordinator");
            *welcomed = Some(std::time::Instant::now());
            if let Some((path, floor)) = identity.advance_floor(w.server_time) {
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = tern_durable::write_atomic(&path, floor.to_string().as_bytes(), false) {
                        warn!("writing {}: {e}", path.display());
                    }
                });
            }
        }
        Some(Message::Error(e)) if e.code == ErrorCode::Revoked => {
            bail!("coordinator refused the session: this device was removed from the fleet ({})", e.message)
        }
        Some(Message::Error(e)) => bail!("coordinator refused the session: {}", e.message),
        Some(other) => bail!("expected Welcome, got {}", other.kind()),
        None => bail!("coordinator closed the session"),
    }
    conn_tx.send_replace(Some((conn.clone(), version)));
    if version < WireVersion::V8 {
        route.set(tern_proto::TelemetryRoute::default(), version);
    }
    let mut route_rx = route.watch();
    // What the agent applied, at once: a Hello cannot say it.
    let report = status_rx.borrow_and_update().clone();
    write_msg(&mut send, &Message::Status(fitted(report, version)), version).await?;
    let history = version >= WireVersion::V3;
    let steps = history_rx.borrow_and_update().clone();
    if history && !steps.is_empty() {
        write_msg(&mut send, &Message::History(UpdateHistory { events: steps }), version).await?;
    }
    // From wire 7 on the heartbeat is the traffic report, and says how
    // often it comes; before, it is the status, every 30 s.
    let counts = version >= WireVersion::V7;
    let every = if counts { pace.heartbeat } else { pace.heartbeat.min(OLD_HEARTBEAT) };
    let traffic_report = |counting: &mut Counting| {
        counting.count();
        let heartbeat_secs = u32::try_from(every.as_secs()).unwrap_or(u32::MAX);
        Message::Traffic(tern_proto::TrafficReport { heartbeat_secs, days: counting.traffic.days() })
    };
    if counts {
        write_msg(&mut send, &traffic_report(&mut counting), version).await?;
    }
    let mut heartbeat = tokio::time::interval(every);
    heartbeat.tick().await;
    // Metered: when anything last happened on the session.
    let mut busy_at = tokio::time::Instant::now();
    let mut settle = tokio::time::interval(Duration::from_secs(1));
    let telemetry = version >= WireVersion::V6;
    // The highest id sent and not yet acknowledged: one batch in flight.
    let mut in_flight: Option<u64> = None;
    let ready = outbox.ready.clone();
    // Whatever is buffered goes first.
    ready.notify_one();
    loop {
        // `reader.next()` is cancel-safe: a status tick that wins mid-frame
        // loses none of the frame's bytes.
        tokio::select! {
            msg = reader.next() => match msg.inspect(|_| busy_at = tokio::time::Instant::now())? {
                Some(Message::Desired(state)) => {
                    debug!(generation = state.generation, models = state.models.len(), "desired state received");
                    let incoming = Incoming { state, signed: None, wire: version };
                    to_main.send(FromLink::Desired(incoming)).await.map_err(|_| anyhow!("agent is stopping"))?;
                }
                Some(Message::SignedDesired(s)) => {
                    debug!(generation = s.state.generation, models = s.state.models.len(), tuf = s.tuf.is_some(),
                        "signed desired state received");
                    let incoming = Incoming { state: s.state, signed: Some((s.signature, s.tuf)), wire: version };
                    to_main.send(FromLink::Desired(incoming)).await.map_err(|_| anyhow!("agent is stopping"))?;
                }
                Some(Message::Route(r)) if version >= WireVersion::V8 => {
                    debug!(mqtt = ?r.mqtt, "telemetry route received");
                    route.set(r, version);
                }
                Some(Message::TelemetryAck(a)) if telemetry && a.stream == outbox.stream() => {
                    debug!(up_to = a.up_to, "telemetry acknowledged");
                    let o = outbox.clone();
                    tokio::task::spawn_blocking(move || o.acknowledged(a.up_to)).await?;
                    if in_flight.is_some_and(|sent| a.up_to >= sent) {
                        in_flight = None;
                        ready.notify_one();
                    }
                }
                Some(Message::Error(e)) => warn!("coordinator: {}", e.message),
                Some(other) => warn!("ignoring unexpected {} on the control stream", other.kind()),
                None => return Ok(()),
            },
            // A batch sent here stays in flight until acknowledged here,
            // whatever the route does meanwhile (the coordinator keeps each
            // record once, whichever way it came).
            _ = route_rx.changed() => ready.notify_one(),
            _ = ready.notified(), if telemetry && in_flight.is_none() && !route.mqtt() => {
                let o = outbox.clone();
                let records = tokio::task::spawn_blocking(move || o.oldest(tern_proto::MAX_TELEMETRY_BATCH, TELEMETRY_BYTES, version)).await?;
                if let Some(last) = records.last() {
                    in_flight = Some(last.id);
                    debug!(records = records.len(), up_to = last.id, "sending telemetry");
                    let batch = tern_proto::TelemetryBatch { stream: outbox.stream(), dropped: outbox.dropped(), records };
                    write_msg(&mut send, &Message::Telemetry(batch), version).await?;
                }
            }
            changed = status_rx.changed() => {
                changed.map_err(|_| anyhow!("agent is stopping"))?;
                busy_at = tokio::time::Instant::now();
                let report = status_rx.borrow_and_update().clone();
                write_msg(&mut send, &Message::Status(fitted(report, version)), version).await?;
            }
            changed = history_rx.changed(), if history => {
                changed.map_err(|_| anyhow!("agent is stopping"))?;
                busy_at = tokio::time::Instant::now();
                let events = history_rx.borrow_and_update().clone();
                write_msg(&mut send, &Message::History(UpdateHistory { events }), version).await?;
            }
            _ = settle.tick(), if pace.metered.is_some() => {
                // Below wire 6 records stay buffered whatever happens.
                // Over MQTT, the outbox is that link's to empty.
                let sent_all = !telemetry
                    || (in_flight.is_none() && (route.mqtt() || (outbox.held() == 0 && outbox.queued() == 0)));
                let idle = sent_all && DOWNLOADS.load(std::sync::atomic::Ordering::SeqCst) == 0;
                if !idle {
                    busy_at = tokio::time::Instant::now();
                } else if busy_at.elapsed() >= METERED_SETTLE {
                    // What changed last is sent before the session goes.
                    if counts {
                        write_msg(&mut send, &traffic_report(&mut counting), version).await?;
                    }
                    // Closed once the coordinator has acknowledged every
                    // byte (it ends the session when it reads the end).
                    send.finish().ok();
                    let _ = tokio::time::timeout(ANSWER_WITHIN, send.stopped()).await;
                    conn.close(0u32.into(), b"metered: nothing more to send");
                    return Ok(());
                }
            }
            _ = heartbeat.tick() => {
                let msg = if counts {
                    traffic_report(&mut counting)
                } else {
                    Message::Status(fitted(status_rx.borrow().clone(), version))
                };
                write_msg(&mut send, &msg, version).await?;
                counting.save(counts);
            }
        }
    }
}

/// One file to download: an artifact or its golden vectors.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    /// Its digest, by which the coordinator serves it.
    pub sha256: Sha256Digest,
    /// Its size, as the signed manifest says.
    pub size: u64,
    /// What it is, for the log.
    pub what: &'a str,
}

/// Bytes free on the file system holding `path`'s folder, to users other
/// than root (an agent running as root is kept out of the reserved blocks
/// too: the system needs them more than a download does).
#[allow(unsafe_code)]
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::ffi::CString::new(path.parent()?.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is a NUL-terminated path and `st` a buffer of the right type.
    (unsafe { libc::statvfs(dir.as_ptr(), &mut st) } == 0)
        .then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// How often a download fsyncs what it wrote and records that length (see
/// [`Store::resume_offset`]): a power cut costs at most this much again.
const CHECKPOINT_EVERY: u64 = 4 << 20;

/// Makes the first `at` bytes of a download durable, then records `at`.
async fn checkpoint(file: &mut tokio::fs::File, record: std::path::PathBuf, at: u64) -> std::io::Result<()> {
    file.sync_data().await?;
    tokio::task::spawn_blocking(move || tern_durable::write_atomic(&record, at.to_string().as_bytes(), false))
        .await
        .map_err(std::io::Error::other)?
}

/// Downloads a file the manifest names into `partial/`, resuming from the
/// part of it known to be on disk, and promotes it to `models/` once its
/// digest matches.
pub async fn fetch(store: Arc<Store>, mut conn_rx: watch::Receiver<Session>, file: Wanted<'_>) -> Result<(), String> {
    let sha = file.sha256;
    if store.model_path(&sha).is_file() {
        return Ok(());
    }
    let (conn, version) = conn_rx
        .wait_for(Option::is_some)
        .await
        .map_err(|_| "agent is stopping".to_string())?
        .clone()
        .expect("waited for Some");
    download(&store, &conn, version, file).await.map_err(|e| format!("{}: {e:#}", file.what))?;
    // Hashing the whole file is blocking work: off the runtime.
    tokio::task::spawn_blocking(move || store.promote(&sha)).await.map_err(|e| e.to_string())?
}

async fn download(store: &Store, conn: &quinn::Connection, version: WireVersion, want: Wanted<'_>) -> Result<()> {
    let partial = store.partial_path(&want.sha256);
    let synced = store.synced_path(&want.sha256);
    let offset = store.resume_offset(&want.sha256, want.size);
    let (mut send, recv) = conn.open_bi().await.map_err(NetError::from)?;
    write_msg(&mut send, &Message::FetchArtifact(FetchArtifact { sha256: want.sha256, offset }), version).await?;
    send.finish().ok();
    let mut reader = FrameReader::new(recv, version);
    let header = tokio::time::timeout(ANSWER_WITHIN, reader.next())
        .await
        .map_err(|_| anyhow!("no answer to the download request within {} s", ANSWER_WITHIN.as_secs()))??;
    let header = match header {
        Some(Message::ArtifactHeader(h)) => h,
        Some(Message::Error(e)) => bail!("coordinator refused the download: {}", e.message),
        Some(other) => bail!("expected ArtifactHeader, got {}", other.kind()),
        None => bail!("coordinator closed the download stream"),
    };
    if header.size != want.size || header.offset != offset || header.sha256 != want.sha256 {
        bail!(
            "coordinator offered {} bytes from {}, the manifest says {} bytes",
            header.size,
            header.offset,
            want.size
        );
    }
    // What does not fit is not fetched only to be thrown away (and fetched
    // again at every retry).
    // The part of the file past the offset is written over: its space counts.
    let reused = tokio::fs::metadata(&partial).await.map_or(0, |m| m.len().saturating_sub(offset));
    if let Some(free) = free_bytes(&partial)
        && free.saturating_add(reused) < want.size - offset
    {
        bail!("disk full: {} bytes to fetch, {} free", want.size - offset, free.saturating_add(reused));
    }
    // The frame reader stopped at the header's end: the raw bytes follow.
    let mut recv = reader.into_stream();
    // Written at the offset asked for, not appended: bytes of the file past
    // it (from an attempt that died mid-write) are overwritten.
    let mut file = tokio::fs::OpenOptions::new().create(true).write(true).truncate(false).open(&partial).await?;
    file.set_len(offset).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut got = offset;
    // A full disk keeps nothing of the download: the space goes back to the
    // models, the store and the other downloads, and the retry starts over.
    let full = async |e: std::io::Error, at: u64| -> anyhow::Error {
        if e.kind() != std::io::ErrorKind::StorageFull && e.raw_os_error() != Some(libc::EDQUOT) {
            return e.into();
        }
        store.drop_partial(&want.sha256);
        anyhow!("disk full at byte {at} of {} (the partial download was removed)", want.size)
    };
    let mut checked = offset;
    loop {
        let chunk = match recv.read_chunk(256 * 1024, true).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                // What arrived before the cut is kept for the next attempt.
                if let Err(e) = checkpoint(&mut file, synced, got).await {
                    warn!("cannot record the download's progress: {e}");
                }
                bail!("download interrupted at byte {got}: {e}");
            }
        };
        got += chunk.bytes.len() as u64;
        if got > want.size {
            bail!("coordinator sent more than the {} bytes of the manifest", want.size);
        }
        if let Err(e) = file.write_all(&chunk.bytes).await {
            return Err(full(e, got - chunk.bytes.len() as u64).await);
        }
        if got - checked >= CHECKPOINT_EVERY {
            if let Err(e) = checkpoint(&mut file, synced.clone(), got).await {
                return Err(full(e, got).await);
            }
            checked = got;
        }
    }
    if let Err(e) = file.sync_all().await {
        return Err(full(e, got).await);
    }
    if got != want.size {
        if let Err(e) = checkpoint(&mut file, synced, got).await {
            warn!("cannot record the download's progress: {e}");
        }
        bail!("download ended at byte {got} of {}; will resume", want.size);
    }
    info!(bytes = got - offset, resumed_from = offset, "{} downloaded", want.what);
    Ok(())
}
