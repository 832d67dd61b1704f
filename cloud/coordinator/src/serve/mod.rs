//! `tern serve`: the coordinator process. One data dir holds the registry
//! (sled), the artifacts (content-addressed files) and the keys; a QUIC
//! endpoint serves agents and an HTTP admin API on loopback serves the CLI.

mod admin;
mod broker;
mod drift;
mod golden;
mod keys;
mod limits;
mod metrics;
mod mqtt;
mod quic;
mod rollouts;
mod sessions;
pub mod tuf;
mod webhook;

pub use broker::pem;
pub use keys::random;

use crate::fsutil::unix_now;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tern_durable::write_atomic;
use tern_net::FleetCa;
use tern_proto::{
    DesiredState, DeviceId, ManifestEncoding, Message, ModelManifest, SignedDesired, TufMetadata, UpdatePolicy,
    WireVersion,
};
use tern_registry::{Approval, Artifacts, Registry};
use tern_trust::SigningKey;
use tracing::{error, info, warn};

/// Where `tern serve` listens and keeps its data.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// UDP address of the QUIC endpoint agents connect to.
    #[arg(long, default_value = "0.0.0.0:7443")]
    pub quic_listen: SocketAddr,
    /// TCP address of the admin API (keep it on loopback unless it is behind a proxy).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub admin_listen: SocketAddr,
    /// Extra DNS names or IPs for the coordinator's certificate.
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// Fleet name, shown in the CA certificate (first start only).
    #[arg(long, default_value = "default")]
    pub fleet: String,
    /// The newest wire version to speak with agents (1 to 9): older agents
    /// are always served in theirs; pin a lower one to hold a fleet on an
    /// older protocol while it is upgraded (below 5, models with `f16` or
    /// `bf16` tensors are not sent, and agents unload them; below 4,
    /// desired states are not signed as a whole and carry no TUF metadata;
    /// below 3, agents keep their update history to themselves; below 6,
    /// agents keep their drift windows and alerts buffered; below 8, they
    /// send them over QUIC whatever `--telemetry` says; below 9, agents
    /// drop their quality windows and captured samples).
    #[arg(long, default_value_t = WireVersion::CURRENT.0, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub max_wire_version: u16,
    /// Connections at most, devices included.
    #[arg(long, default_value_t = 20_000)]
    pub max_connections: usize,
    /// Handshakes in progress at most (each takes a round trip; 5 s at most).
    #[arg(long, default_value_t = 1024)]
    pub max_handshakes: usize,
    /// Connections at most that have no device certificate (enrolling);
    /// each is closed 30 s after its handshake whatever it does.
    #[arg(long, default_value_t = 256)]
    pub max_anonymous: usize,
    /// Handshakes, and connections without a certificate, from one source
    /// address at most (devices behind one NAT share an address; enrolled
    /// ones are not limited by it once their handshake is done).
    #[arg(long, default_value_t = 32)]
    pub max_per_address: usize,
    /// Close a device's control session after this many seconds without a
    /// frame from it (agents of wire version 6 and older report every 30 s;
    /// newer ones say how often they will, and are given three of those, up
    /// to an hour, never less than this).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub session_quiet_secs: u64,
    /// POST every alert raised or cleared on a device to this URL as JSON
    /// (`{"event": "alert_raised" | "alert_cleared", "alert": {…}}`), in
    /// order; repeatable (a queue each). Plain http only. Failures that may
    /// pass (no connection, timeouts, 408, 429, 5xx) are tried again, 6
    /// times in all, 1 to 16 s apart; at most 1024 notices wait per URL,
    /// past that new ones are dropped (counted in /metrics); those waiting
    /// when the coordinator stops are not sent.
    #[arg(long = "webhook", value_name = "URL", value_parser = webhook::parse_url)]
    pub webhooks: Vec<String>,
    /// TCP address of the embedded MQTT broker: TLS 1.2 or 1.3, only
    /// clients with a certificate of the fleet CA, each device kept to
    /// `tern/v1/<its id>/` (`off`: none; ignored with `--mqtt-url`).
    #[arg(long, default_value = "0.0.0.0:8883", value_parser = parse_listen)]
    pub mqtt_listen: Listen,
    /// An external MQTT broker to use instead (`mqtts://HOST:PORT`): it must
    /// present a certificate of the fleet CA for `broker.tern`, take
    /// the coordinator's client certificate (subject
    /// `client.coordinator.tern`) and keep devices to their topics, as the
    /// Mosquitto setup `tern broker mosquitto-config` writes does.
    #[arg(long, value_name = "URL")]
    pub mqtt_url: Option<String>,
    /// How agents send telemetry (drift and quality windows, alerts,
    /// captured samples): `quic`, on their control stream, or `mqtt`,
    /// published at QoS 1 to the broker (`tern/v1/<device>/telemetry`,
    /// `…/alerts` for a batch holding an alert, `…/capture` for one holding
    /// a capture) and acknowledged on `tern/v1/<device>/ack`. Agents of wire
    /// version 7 and older use QUIC whatever this says; the coordinator
    /// takes both.
    #[arg(long, value_enum, default_value_t = TelemetryLink::Quic)]
    pub telemetry: TelemetryLink,
    /// The broker URL agents are given with `--telemetry mqtt`
    /// (`mqtts://HOST:PORT`; an empty host is the one they reach the
    /// coordinator at). Default: `--mqtt-url`, or the embedded broker's port.
    #[arg(long, value_name = "URL")]
    pub mqtt_advertise: Option<String>,
    /// A model-quality alert the coordinator raises on a device's quality
    /// window (the ground truth apps post for past answers), repeatable:
    /// `accuracy=MIN`, `f1=MIN` (macro F1) or `rmse=MAX`. It clears on a
    /// window a quarter of the way from MIN to 1 (RMSE: at most 0.8 × MAX).
    #[arg(long = "quality-alert", value_name = "RULE=VALUE", value_parser = parse_quality_alert)]
    pub quality_alerts: Vec<(String, f64)>,
    /// Pairs a quality window needs before it is judged.
    #[arg(long, default_value_t = 20)]
    pub quality_min_rows: u64,
    /// How agents take updates (TOML: deadlines in seconds per stage,
    /// shadow and probation limits; keys as in README's "Staged updates");
    /// keys left out keep their defaults, unknown keys and out-of-range
    /// values are refused. Signed into every manifest sent to agents.
    #[arg(long)]
    pub update_policy: Option<PathBuf>,
}

/// How a fleet's agents send telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TelemetryLink {
    /// On the QUIC control stream.
    Quic,
    /// Over the MQTT broker.
    Mqtt,
}

/// An address to listen on, or none (`off`).
#[derive(Debug, Clone, Copy)]
pub struct Listen(pub Option<SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse().map(|a| Listen(Some(a))).map_err(|e| format!("{s:?}: {e} (an address such as 0.0.0.0:8883, or off)"))
}

/// What a running coordinator writes to `<data-dir>/serve.json`, so the CLI
/// (and tests) can find it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    /// Bound QUIC address.
    pub quic: SocketAddr,
    /// Bound admin API address.
    pub admin: SocketAddr,
    /// Bound address of the embedded MQTT broker, if one runs.
    #[serde(default)]
    pub mqtt: Option<SocketAddr>,
    /// Process id.
    pub pid: u32,
}

/// State shared by the QUIC and admin sides.
/// Full baselines by model version (`None`: it has none).
pub type Baselines = std::collections::HashMap<(String, u32), Option<Arc<tern_drift::ModelBaseline>>>;

pub struct State {
    pub registry: Registry,
    pub artifacts: Artifacts,
    pub signer: SigningKey,
    pub ca: FleetCa,
    pub admin_token: String,
    /// Connected devices' control sessions.
    pub sessions: sessions::Sessions,
    /// Connection counts and caps.
    pub counters: Arc<limits::Counters>,
    /// How long a control session may go without a frame.
    pub session_quiet: std::time::Duration,
    /// How agents take updates: signed into every manifest sent.
    pub policy: UpdatePolicy,
    /// The TUF repository of approved artifacts.
    pub tuf: tuf::TufRepo,
    /// What `GET /metrics` shows.
    pub metrics: metrics::Metrics,
    /// Versions' full baselines, read once (`None`: it has none).
    pub baselines: std::sync::Mutex<Baselines>,
    /// Where alerts are POSTed.
    pub webhook: webhook::Webhook,
    /// Where agents of wire 8 on are told to send telemetry.
    pub route: tern_proto::TelemetryRoute,
    /// When quality windows raise and clear alerts.
    pub quality_rules: tern_registry::QualityRules,
    /// The newest wire version spoken (`--max-wire-version`), MQTT too.
    pub max_wire: WireVersion,
    /// Held while rollouts are driven or commanded: one at a time.
    pub rollouts: Arc<tokio::sync::Mutex<()>>,
}

impl State {
    /// The full baseline of `model:version`, if it has one (read from the
    /// artifact store once). Blocks.
    pub fn baseline(&self, model: &str, version: u32) -> Option<Arc<tern_drift::ModelBaseline>> {
        let key = (model.to_owned(), version);
        if let Some(b) = self.baselines.lock().expect("lock").get(&key) {
            return b.clone();
        }
        let record = self.registry.version(model, version).ok()?;
        let b = record.baseline_full.and_then(|r| {
            let bytes = std::fs::read(self.artifacts.path(&r.sha256)).ok()?;
            tern_drift::ModelBaseline::decode(&bytes).ok().map(Arc::new)
        });
        self.baselines.lock().expect("lock").insert(key, b.clone());
        b
    }

    /// The signed desired state of a device, for a session of wire
    /// `version`: postcard-signed manifests for version 1, canonical JSON
    /// after. A version that is not approved is never sent (rejecting an
    /// assigned version unassigns it, so this only guards against a race).
    pub fn desired(&self, id: &str, version: WireVersion) -> anyhow::Result<DesiredState> {
        let device = self.registry.device(id)?;
        let encoding =
            if version == WireVersion::V1 { ManifestEncoding::Postcard } else { ManifestEncoding::CanonicalJson };
        let mut models = Vec::new();
        for (name, v) in &device.desired {
            let record = self.registry.version(name, *v)?;
            if record.status != Approval::Approved {
                warn!(device = %id, model = %name, version = v, status = %record.status, "not sending a version that is not approved");
                continue;
            }
            let manifest = match record.manifest_for(&device.profile) {
                Ok(m) => m,
                Err(e) => {
                    warn!(device = %id, model = %name, version = v, "not sending a version the device cannot be sent: {e}");
                    continue;
                }
            };
            // An agent of wire version 4 looks an artifact up at the plain
            // path only, and refuses the whole state over one it cannot
            // find there (assign refuses such a device; this covers a
            // profile compiled differently after it was assigned).
            if version == WireVersion::V4 && !record.plain_path_serves(&device.profile) {
                warn!(device = %id, model = %name, version = v, "not sending a version whose artifact for this profile is listed only at the profile's path, which a wire-4 agent does not look up");
                continue;
            }
            if manifest.since() > version {
                warn!(device = %id, model = %name, version = v, wire = %version, needs = %manifest.since(), "not sending a version whose tensors this session's wire version cannot name");
                continue;
            }
            let manifest = ModelManifest { update: Some(self.policy), ..manifest };
            models.push(self.signer.sign(&manifest, encoding)?);
        }
        Ok(DesiredState { generation: device.generation, models })
    }

    /// The desired state as a session of wire `version` is sent it: from
    /// version 4 on signed for the device, with the TUF metadata.
    pub fn desired_message(&self, id: &DeviceId, version: WireVersion) -> Result<Message> {
        let state = self.desired(id.as_str(), version)?;
        if version < WireVersion::V4 {
            return Ok(Message::Desired(state));
        }
        let signature = self.signer.sign_state(id, &state);
        let tuf = self.tuf_metadata().unwrap_or_else(|e| {
            // Agents that trust a root refuse the state and say so; the
            // others take it on the registry key's signatures alone.
            error!("signing TUF metadata: {e:#}");
            None
        });
        let msg = Message::SignedDesired(SignedDesired { state, signature, tuf });
        // Metadata past what one frame carries would end every session at
        // its first state: send the state without it, and agents that
        // trust a root report why they refuse it.
        if let Err(e) = tern_proto::encode_frame(&msg, version) {
            error!(device = %id, "the desired state with the TUF metadata does not fit a frame ({e}); sending it without");
            let Message::SignedDesired(mut s) = msg else { unreachable!("built above") };
            s.tuf = None;
            return Ok(Message::SignedDesired(s));
        }
        Ok(msg)
    }

    /// The current timestamp metadata (rebuilt if stale), `None` while the
    /// repository has no root.
    pub fn tuf_timestamp(&self) -> Result<Option<Vec<u8>>> {
        let versions = self.registry.all_versions()?;
        Ok(self.tuf.current(&versions, unix_now())?.map(|b| b.timestamp.into_bytes()))
    }

    /// The TUF repository's current metadata, `None` while it has no root.
    pub fn tuf_metadata(&self) -> Result<Option<TufMetadata>> {
        let versions = self.registry.all_versions()?;
        let Some(built) = self.tuf.current(&versions, unix_now())? else {
            return Ok(None);
        };
        Ok(Some(TufMetadata {
            root_intro: self.signer.sign_root_intro(built.roots[0].as_bytes()),
            roots: built.roots.into_iter().map(String::into_bytes).collect(),
            timestamp: built.timestamp.into_bytes(),
            snapshot: built.snapshot.into_bytes(),
            targets: built.targets.into_bytes(),
        }))
    }
}

/// Runs the coordinator until SIGINT or SIGTERM.
pub async fn run(data_dir: PathBuf, args: ServeArgs) -> Result<()> {
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    // Keys are made on the first start only: a data dir with a registry
    // whose CA or signing key went missing must not get new ones, which
    // would orphan every enrolled device.
    let first_start = !data_dir.join("registry").exists();
    let policy = match &args.update_policy {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            parse_policy(&text).with_context(|| format!("{}: not an update policy", path.display()))?
        }
        None => UpdatePolicy::default(),
    };
    let keys = keys::Keys::load_or_create(&data_dir, &args.fleet, first_start)?;
    let registry = Registry::open(data_dir.join("registry")).context("opening the registry")?;
    let artifacts = Artifacts::open(data_dir.join("artifacts")).context("opening the artifact store")?;
    let tuf = tuf::TufRepo::open(&data_dir, true).context("opening the TUF repository")?;

    let (server_cert, server_key) = keys.ca.issue_server(&args.names)?;
    let versions = WireVersion::up_to(WireVersion(args.max_wire_version));
    let server_config = tern_net::server_config(&server_cert, &server_key, keys.ca.cert_der(), &versions)?;
    let endpoint = quinn::Endpoint::server(server_config, args.quic_listen)
        .with_context(|| format!("binding QUIC on {}", args.quic_listen))?;
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding the admin API on {}", args.admin_listen))?;

    let embedded = match (&args.mqtt_url, args.mqtt_listen.0) {
        (None, Some(listen)) => {
            let (cert, key) = keys.ca.issue_broker(&args.names)?;
            let dir = data_dir.join("broker");
            Some(broker::start(&dir, listen, keys.ca.cert_der(), (&cert, &key), args.max_connections).await?)
        }
        _ => None,
    };
    let broker = match (&args.mqtt_url, embedded) {
        (Some(url), _) => Some(tern_net::mqtt_address(url)?),
        (None, Some(bound)) => {
            let host = if bound.ip().is_unspecified() { "127.0.0.1".to_owned() } else { bound.ip().to_string() };
            Some((host, bound.port()))
        }
        (None, None) => None,
    };
    let route = match args.telemetry {
        TelemetryLink::Quic => tern_proto::TelemetryRoute::default(),
        TelemetryLink::Mqtt => {
            let advertised = match (&args.mqtt_advertise, &args.mqtt_url, embedded) {
                (Some(url), _, _) | (None, Some(url), _) => url.clone(),
                (None, None, Some(bound)) => format!("mqtts://:{}", bound.port()),
                (None, None, None) => anyhow::bail!("--telemetry mqtt needs a broker: --mqtt-listen or --mqtt-url"),
            };
            tern_net::mqtt_address(&advertised)?;
            tern_proto::TelemetryRoute { mqtt: Some(advertised) }
        }
    };

    let endpoints =
        Endpoints { quic: endpoint.local_addr()?, admin: admin.local_addr()?, mqtt: embedded, pid: std::process::id() };
    write_atomic(&data_dir.join("serve.json"), &serde_json::to_vec_pretty(&endpoints)?, false)?;
    info!(quic = %endpoints.quic, admin = %endpoints.admin, mqtt = ?endpoints.mqtt, data_dir = %data_dir.display(),
        wire = ?versions.iter().map(|v| v.0).collect::<Vec<_>>(), telemetry = ?route.mqtt, "coordinator ready");
    let mqtt_client = match &broker {
        Some(_) => {
            let (cert, key) = keys.ca.issue_client(tern_net::COORDINATOR_CLIENT, 825)?;
            Some(tern_net::mqtt_client_config(keys.ca.cert_der(), &cert, &key, 0)?)
        }
        None => None,
    };

    let metrics = metrics::Metrics::default();
    let state = Arc::new(State {
        registry,
        artifacts,
        signer: keys.signer,
        ca: keys.ca,
        admin_token: keys.admin_token,
        sessions: sessions::Sessions::default(),
        counters: limits::Counters::new(limits::Caps {
            connections: args.max_connections,
            handshakes: args.max_handshakes,
            anonymous: args.max_anonymous,
            per_address: args.max_per_address,
        }),
        session_quiet: std::time::Duration::from_secs(args.session_quiet_secs),
        policy,
        tuf,
        webhook: webhook::Webhook::start(args.webhooks.clone(), metrics.webhook.clone())
            .context("starting the webhook thread")?,
        metrics,
        baselines: Default::default(),
        route,
        quality_rules: quality_rules(&args),
        max_wire: WireVersion(args.max_wire_version),
        rollouts: Arc::new(tokio::sync::Mutex::new(())),
    });
    tokio::spawn(quic::accept_loop(endpoint.clone(), state.clone()));
    tokio::spawn(rollouts::run(state.clone()));
    if let (Some((host, port)), Some(tls)) = (broker, mqtt_client) {
        tokio::spawn(mqtt::run(state.clone(), host, port, tls));
    }
    let app = admin::router(state.clone());
    axum::serve(admin, app).with_graceful_shutdown(shutdown()).await.context("admin API")?;
    endpoint.close(0u32.into(), b"coordinator shutting down");
    state.registry.sync()?;
    info!(at = unix_now(), "coordinator stopped");
    Ok(())
}

/// An update policy from TOML; a key it does not know is an error (a typo
/// would otherwise leave a limit at its default unnoticed).
/// `--quality-alert RULE=VALUE`.
fn parse_quality_alert(s: &str) -> Result<(String, f64), String> {
    let (rule, value) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected RULE=VALUE"))?;
    let value: f64 = value.parse().map_err(|e| format!("{s:?}: {e}"))?;
    match rule {
        "accuracy" | "f1" if (0.0..=1.0).contains(&value) => Ok((rule.to_owned(), value)),
        "rmse" if value.is_finite() && value > 0.0 => Ok((rule.to_owned(), value)),
        "accuracy" | "f1" => Err(format!("{s:?}: {rule} is between 0 and 1")),
        "rmse" => Err(format!("{s:?}: rmse is a positive number")),
        _ => Err(format!("{s:?}: unknown rule {rule:?} (accuracy, f1, rmse)")),
    }
}

fn quality_rules(args: &ServeArgs) -> tern_registry::QualityRules {
    let mut r = tern_registry::QualityRules { min_rows: args.quality_min_rows, ..Default::default() };
    for (rule, value) in &args.quality_alerts {
        match rule.as_str() {
            "accuracy" => r.accuracy = Some(*value),
            "f1" => r.f1 = Some(*value),
            _ => r.rmse = Some(*value),
        }
    }
    r
}

fn parse_policy(text: &str) -> Result<UpdatePolicy> {
    let mut table: toml::Table = toml::from_str(text)?;
    // Fields at their defaults are left out of the encoding: set each.
    let every = UpdatePolicy {
        max_defer_secs: 1,
        shadow_compare: tern_proto::ShadowCompare::Top1,
        shadow_tolerance_ppm: 1,
        shadow_max_p99_permille: 1,
        ready_secs: 1,
        ..UpdatePolicy::default()
    };
    let mut known = toml::Table::try_from(every)?;
    known.insert("window".into(), toml::Value::Boolean(true));
    if let Some(k) = table.keys().find(|k| !known.contains_key(*k)) {
        let names: Vec<&str> = known.keys().map(String::as_str).collect();
        anyhow::bail!("unknown key {k:?} (known: {})", names.join(", "));
    }
    // Agents read a mode they do not know as auto: a typo here must not.
    if let Some(v) = table.get("shadow_compare") {
        let modes = ["auto", "top1", "relative"];
        anyhow::ensure!(
            v.as_str().is_some_and(|m| modes.contains(&m)),
            "shadow_compare must be one of {}, not {v}",
            modes.join(", ")
        );
    }
    let window = table.remove("window").map(parse_window).transpose().context("[window]")?;
    let mut p: UpdatePolicy = table.try_into()?;
    p.window = window;
    // Every agent takes this policy as signed: nonsense here would fail
    // every update of the fleet.
    const MONTH: u64 = 31 * 24 * 3600;
    for (key, v) in [
        ("fetch_secs", p.fetch_secs),
        ("verify_secs", p.verify_secs),
        ("load_secs", p.load_secs),
        ("selftest_secs", p.selftest_secs),
        ("shadow_secs", p.shadow_secs),
        ("ready_secs", p.ready_secs),
    ] {
        anyhow::ensure!((1..=MONTH).contains(&v), "{key} must be 1 to {MONTH} seconds, not {v}");
    }
    anyhow::ensure!(p.probation_secs <= MONTH, "probation_secs must be at most {MONTH} seconds");
    anyhow::ensure!(p.max_defer_secs <= MONTH, "max_defer_secs must be at most {MONTH} seconds");
    anyhow::ensure!(
        p.shadow_tolerance_ppm <= 1_000_000,
        "shadow_tolerance_ppm is in millionths: at most 1000000 (100 %), not {}",
        p.shadow_tolerance_ppm
    );
    // The agent reads p99s off log histograms that may be 19 % high: a
    // tighter limit could fail a candidate as fast as the serving version.
    anyhow::ensure!(
        p.shadow_max_p99_permille == 0 || (1250..=1_000_000).contains(&p.shadow_max_p99_permille),
        "shadow_max_p99_permille is per mille of the serving p99: 0 (off) or 1250 to 1000000 (the agent's latency histogram is within 19 %), not {}",
        p.shadow_max_p99_permille
    );
    for (key, v) in [
        ("shadow_min_agreement_permille", p.shadow_min_agreement_permille),
        ("probation_max_error_permille", p.probation_max_error_permille),
    ] {
        anyhow::ensure!(v <= 1000, "{key} is per mille: at most 1000, not {v}");
    }
    Ok(p)
}

/// `[window]` with `from = "HH:MM"`, `to = "HH:MM"` (device local time; a
/// `to` not after `from` runs past midnight) and optionally `days`
/// (`["mon", …, "sun"]`, the days it opens on; default every day).
fn parse_window(v: toml::Value) -> Result<tern_proto::MaintenanceWindow> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Window {
        from: String,
        to: String,
        days: Option<Vec<String>>,
    }
    let w: Window = v.try_into()?;
    let minute = |s: &str| -> Result<u16> {
        let (h, m) = s.split_once(':').with_context(|| format!("{s:?} is not HH:MM"))?;
        let (h, m): (u16, u16) = (h.parse()?, m.parse()?);
        anyhow::ensure!(h < 24 && m < 60 && s.len() == 5, "{s:?} is not a time of day as HH:MM");
        Ok(h * 60 + m)
    };
    const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let days = match &w.days {
        None => 0x7f,
        Some(list) => {
            let mut bits = 0u8;
            for d in list {
                let i = DAYS.iter().position(|x| x.eq_ignore_ascii_case(d));
                let i = i.with_context(|| format!("{d:?} is not a day (mon, tue, wed, thu, fri, sat, sun)"))?;
                bits |= 1 << i;
            }
            anyhow::ensure!(bits != 0, "days is empty: the window would never open");
            bits
        }
    };
    Ok(tern_proto::MaintenanceWindow { from_minute: minute(&w.from)?, to_minute: minute(&w.to)?, days })
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_file_sets_what_it_names_and_refuses_typos() {
        let p = parse_policy("probation_secs = 5\nshadow_requests = 20\n").unwrap();
        assert_eq!((p.probation_secs, p.shadow_requests, p.fetch_secs), (5, 20, UpdatePolicy::default().fetch_secs));
        let e = parse_policy("probation_sec = 5\n").unwrap_err().to_string();
        assert!(e.starts_with("unknown key \"probation_sec\" (known: "), "{e}");
        assert!(parse_policy("probation_secs = -1\n").is_err());
        let e = parse_policy("fetch_secs = 0\n").unwrap_err().to_string();
        assert_eq!(e, "fetch_secs must be 1 to 2678400 seconds, not 0");
        assert!(parse_policy("probation_secs = 99999999999\n").is_err());
        assert!(parse_policy("probation_max_error_permille = 1001\n").is_err());
        assert_eq!(parse_policy("probation_secs = 0\n").unwrap().probation_secs, 0, "commit at the first check");
    }

    #[test]
    fn a_policy_file_sets_how_shadow_compares_and_its_latency_limit() {
        let p = parse_policy(
            "shadow_compare = \"relative\"\nshadow_tolerance_ppm = 50000\nshadow_max_p99_permille = 1500\n",
        )
        .unwrap();
        assert_eq!(p.shadow_compare, tern_proto::ShadowCompare::Relative);
        assert_eq!((p.shadow_tolerance_ppm, p.shadow_max_p99_permille), (50_000, 1500));
        assert_eq!(
            parse_policy("shadow_compare = \"top1\"\n").unwrap().shadow_compare,
            tern_proto::ShadowCompare::Top1
        );
        assert!(parse_policy("shadow_compare = \"argmax\"\n").is_err());
        assert!(parse_policy("shadow_tolerance_ppm = 1000001\n").is_err());
        assert!(parse_policy("shadow_max_p99_permille = 1100\n").is_err(), "within the histogram's error");
        let d = parse_policy("").unwrap();
        assert_eq!((d.shadow_compare, d.shadow_tolerance_ppm), (tern_proto::ShadowCompare::Auto, 10_000));
    }

    #[test]
    fn a_policy_file_sets_a_maintenance_window_and_a_defer_allowance() {
        let p = parse_policy(
            "max_defer_secs = 600\n[window]\nfrom = \"23:30\"\nto = \"04:00\"\ndays = [\"sat\", \"Sun\"]\n",
        )
        .unwrap();
        assert_eq!(p.max_defer_secs, 600);
        assert_eq!(
            p.window,
            Some(tern_proto::MaintenanceWindow { from_minute: 23 * 60 + 30, to_minute: 240, days: 0b110_0000 })
        );
        let every_day = parse_policy("[window]\nfrom = \"02:00\"\nto = \"03:00\"\n").unwrap();
        assert_eq!(every_day.window.unwrap().days, 0x7f);
        for bad in [
            "[window]\nfrom = \"2:00\"\nto = \"03:00\"\n",
            "[window]\nfrom = \"24:00\"\nto = \"03:00\"\n",
            "[window]\nfrom = \"02:00\"\nto = \"03:00\"\ndays = []\n",
            "[window]\nfrom = \"02:00\"\nto = \"03:00\"\ndays = [\"monday\"]\n",
            "[window]\nfrom = \"02:00\"\n",
            "[window]\nfrom = \"02:00\"\nto = \"03:00\"\nzone = \"UTC\"\n",
            "max_defer_secs = 99999999\n",
        ] {
            assert!(parse_policy(bad).is_err(), "{bad}");
        }
    }
}
