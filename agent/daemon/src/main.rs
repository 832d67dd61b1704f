//! `tern-agent`: the Tern device daemon. It enrolls with a coordinator,
//! keeps a mutual-TLS QUIC session to it, takes the models it is told to
//! serve (verifying digest and signature), and answers device apps on a
//! local HTTP API and Unix socket.

mod api;
mod drift;
mod feedback;
mod gate;
mod hook;
mod identity;
mod link;
mod models_thread;
#[cfg(feature = "mqtt")]
mod mqtt;
mod outbox;
mod profiles;
mod runner;
mod serve;
mod store;
mod traffic;
mod trust;
mod update;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use tern_agent_core::Slots;
use tern_proto::{DeviceId, ModelFormat, ModelManifest, StatusReport};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// This agent's version, reported to the coordinator.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Parser)]
#[command(name = "tern-agent", version, about = "Tern device agent")]
struct Cli {
    /// Where the agent keeps its identity, state and models.
    #[arg(long, env = "TERN_AGENT_DATA_DIR", default_value = "/var/lib/tern-agent", global = true)]
    data_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Enroll this device with a coordinator using a one-time token.
    Enroll {
        /// The coordinator's QUIC address, HOST:PORT.
        #[arg(long)]
        coordinator: String,
        /// The token printed by `tern fleet token` (or TERN_ENROLL_TOKEN, which
        /// keeps it out of `ps`; it is single-use either way).
        #[arg(long, env = "TERN_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// Ask for this device id (a-z, 0-9, '-', '_'); default: the coordinator picks one.
        #[arg(long)]
        device_id: Option<DeviceId>,
    },
    /// Run the agent: connect, take models, serve the local API.
    Run {
        /// TCP address of the local API.
        #[arg(long, default_value = "127.0.0.1:7171")]
        listen: SocketAddr,
        /// Unix socket of the local API; default: <data-dir>/agent.sock.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Runs per model at once (its thread budget); default: from the
        /// device profile, else one per core.
        #[arg(long)]
        threads: Option<usize>,
        /// Requests a model queues while its budget is in use before answering 429;
        /// default: from the device profile, else 32.
        #[arg(long)]
        queue: Option<usize>,
        /// Largest batch one request may send a model whose first axis is
        /// dynamic (larger ones get 413); default: from the device profile, else 64.
        #[arg(long)]
        max_batch: Option<usize>,
        /// Most elements one input may have when an axis other than the first is
        /// dynamic (more get 413); default 4194304.
        #[arg(long)]
        max_elements: Option<usize>,
        /// Request data (bodies as they arrive, decoded inputs, answers until
        /// sent) all local clients together may make the agent hold, in MiB; a
        /// request that finds no room gets 503 at once, one that could never
        /// fit 413. Default: from the device profile, else 64.
        #[arg(long)]
        request_memory_mb: Option<usize>,
        /// Accept only these artifact formats (comma-separated: onnx, nnef,
        /// burn), e.g. `nnef,burn` to take compiled models only; others are
        /// refused per model, and the coordinator is told up front. Default:
        /// every format this build runs.
        #[arg(long, value_delimiter = ',')]
        formats: Vec<ModelFormat>,
        /// An app's health check of a model's new version while it is on
        /// probation: MODEL=http://HOST:PORT/PATH (healthy on a 2xx answer)
        /// or MODEL=exec:COMMAND (run by /bin/sh with TERN_MODEL and
        /// TERN_VERSION set; healthy on exit status 0). Asked every 2 s; one
        /// failure rolls the version back, and it commits only after an
        /// answer. Repeat for more models.
        #[arg(long, value_parser = hook::parse)]
        health_hook: Vec<(String, hook::Hook)>,
        /// How long one health hook check may take before it counts as failed.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
        health_hook_timeout_ms: u64,
        /// The device's libonnxruntime: loaded at start (default: the device
        /// profile's `onnxruntime`), it runs ONNX artifacts, and the
        /// onnxruntime artifacts a version offers in place of its tract one.
        /// If it cannot be loaded the agent says why and runs tract.
        #[arg(long, env = "TERN_ONNXRUNTIME")]
        onnxruntime: Option<PathBuf>,
        /// A version with a baseline is windowed against it: a window
        /// closes after this many rows (samples) …
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        drift_window_rows: u64,
        /// … or after this many seconds, whichever comes first.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        drift_window_secs: u64,
        /// An alert rule, repeatable: NAME=VALUE, or NAME=off. Thresholds
        /// per window: feature_drift (robust L-infinity of an input feature,
        /// default 0.1), image_shift (an image channel's mean shift in
        /// baseline standard deviations, 0.5), missing_rate (over the
        /// baseline's, 0.1), output_drift (0.1), p99_ms (off), error_rate
        /// (0.05), low_confidence (share of answers under `confidence`,
        /// 0.5, over the baseline's: 0.1); raise_windows (windows in a row
        /// above a threshold that raise an alert, 1), clear_windows (below
        /// clear_ratio × the threshold that clear it, 2; clear_ratio 0.8).
        #[arg(long = "alert")]
        alerts: Vec<String>,
        /// Telemetry records (drift and quality windows, alert changes,
        /// captured samples) kept on disk while the coordinator cannot take
        /// them; past this the oldest are dropped, captures first (and the
        /// count sent).
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        telemetry_buffer: u64,
        /// Of those, captured samples kept at most (each up to 48 KiB; at
        /// most half of --telemetry-buffer); past this the oldest captured
        /// samples are dropped (and counted).
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        capture_buffer: u64,
        /// Answers wait this many seconds for their ground truth
        /// (`NAME:feedback`); at most 4096 per model are kept, the oldest
        /// forgotten first.
        #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=7 * 86_400))]
        feedback_secs: u64,
        /// Capture nothing, whatever capture policy the fleet's manifests
        /// carry (captures are apps' raw inputs).
        #[arg(long)]
        no_capture: bool,
        /// A quality window (answers with their ground truth) closes after
        /// this many rows, or after --drift-window-secs with at least one.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        quality_window_rows: u64,
        /// Send a QUIC keep-alive after this many seconds without traffic
        /// (each costs about 60 bytes each way).
        #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=3_600))]
        keep_alive_secs: u64,
        /// Take the coordinator for gone after this many seconds without
        /// hearing from it (at most 120, the coordinator's own limit; more
        /// than --keep-alive-secs).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(2..=120))]
        idle_timeout_secs: u64,
        /// Report to the coordinator at least this often, in seconds (the
        /// status goes on every change anyway); coordinators of wire
        /// version 6 and older are reported to every 30 s.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=1_200))]
        heartbeat_secs: u64,
        /// For a metered link: hold no session, but open one at start and
        /// then every this many seconds to send what the agent has (drift
        /// windows, alerts, status) and take any new desired state, and
        /// close it once nothing is left to do (downloads included). The
        /// coordinator's changes wait for the next one.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(10..=86_400))]
        metered: Option<u64>,
    },
}

fn main() -> ExitCode {
    models_thread::one_malloc_arena();
    let cli = Cli::parse();
    // `Targets` takes RUST_LOG's `level,target=level` form without the regex
    // engine EnvFilter brings (about 200 KiB on the device).
    let default: tracing_subscriber::filter::Targets = "info,quinn=warn".parse().expect("valid filter");
    let filter = std::env::var("RUST_LOG").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry().with(fmt).with(filter).init();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Enroll { coordinator, token, device_id } => {
                let info = identity::enroll(&cli.data_dir, &coordinator, &token, device_id).await?;
                // A closed stdout is no reason to fail an enrollment that succeeded.
                let _ = writeln!(
                    std::io::stdout(),
                    "enrolled as {} (group {}, profile {})",
                    info.device_id,
                    info.group,
                    info.profile
                );
                Ok(())
            }
            Cmd::Run {
                listen,
                socket,
                threads,
                queue,
                max_batch,
                max_elements,
                request_memory_mb,
                formats,
                health_hook,
                health_hook_timeout_ms,
                onnxruntime,
                drift_window_rows,
                drift_window_secs,
                alerts,
                telemetry_buffer,
                capture_buffer,
                feedback_secs,
                no_capture,
                quality_window_rows,
                keep_alive_secs,
                idle_timeout_secs,
                heartbeat_secs,
                metered,
            } => {
                if keep_alive_secs >= idle_timeout_secs {
                    anyhow::bail!(
                        "--keep-alive-secs ({keep_alive_secs}) must be less than --idle-timeout-secs ({idle_timeout_secs})"
                    );
                }
                let pace = link::Pace {
                    liveness: tern_net::Liveness {
                        keep_alive: std::time::Duration::from_secs(keep_alive_secs),
                        idle: std::time::Duration::from_secs(idle_timeout_secs),
                    },
                    heartbeat: std::time::Duration::from_secs(heartbeat_secs),
                    metered: metered.map(std::time::Duration::from_secs),
                };
                let asked = profiles::Asked { threads, queue, max_batch, max_elements, request_memory_mb };
                let mut monitor = tern_agent_core::monitor::MonitorConfig {
                    window_rows: drift_window_rows,
                    window_ms: drift_window_secs * 1000,
                    ..Default::default()
                };
                for a in &alerts {
                    monitor.rules.set(a).map_err(|e| anyhow::anyhow!("--alert {e}"))?;
                }
                let hooks = runner::Hooks {
                    by_model: health_hook.into_iter().collect(),
                    timeout: std::time::Duration::from_millis(health_hook_timeout_ms),
                };
                let feedback = tern_agent_core::feedback::FeedbackConfig {
                    keep: 4096,
                    keep_ms: feedback_secs * 1000,
                    window_rows: quality_window_rows,
                    window_ms: drift_window_secs * 1000,
                };
                let serving = Serving {
                    no_capture,
                    formats,
                    hooks,
                    onnxruntime,
                    monitor,
                    feedback,
                    telemetry_buffer,
                    capture_buffer,
                    pace,
                };
                run(&cli.data_dir, listen, socket, asked, serving).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The file a panic leaves in the data dir: under `panic=abort` the process
/// ends with the panic, and the next start reads (and removes) it to tell a
/// crash of its own from a kill or a power cut.
const PANICKED: &str = "panicked";

/// The thread and what it said, if the last run ended in a panic.
fn last_panic(data_dir: &Path) -> Option<(String, String)> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(data_dir.join(PANICKED)).ok()?.take(1024).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let (thread, what) = text.split_once('\n').unwrap_or(("", &text));
    Some((thread.trim().to_owned(), what.trim().to_owned()))
}

/// From now on a panic is written down (fsynced) before it ends the
/// process. Only under `panic=abort`: unwinding, a panic may be caught (the
/// models thread does) and the agent go on, and nothing ended.
fn record_panics(data_dir: &Path) {
    if !cfg!(panic = "abort") {
        return;
    }
    let path = data_dir.join(PANICKED);
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        let mut what: String = what.chars().take(300).collect();
        if let Some(at) = info.location() {
            what.push_str(&format!(" at {}:{}", at.file(), at.line()));
        }
        let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
        let _ = tern_durable::write_atomic(&path, format!("{thread}\n{what}").as_bytes(), false);
        default(info);
    }));
}

/// How `run` serves models: formats taken, health hooks, onnxruntime,
/// drift windows and alert rules.
struct Serving {
    no_capture: bool,
    formats: Vec<ModelFormat>,
    hooks: runner::Hooks,
    onnxruntime: Option<PathBuf>,
    monitor: tern_agent_core::monitor::MonitorConfig,
    feedback: tern_agent_core::feedback::FeedbackConfig,
    telemetry_buffer: u64,
    capture_buffer: u64,
    pace: link::Pace,
}

async fn run(
    data_dir: &Path,
    listen: SocketAddr,
    socket: Option<PathBuf>,
    asked: profiles::Asked,
    serving: Serving,
) -> Result<()> {
    let Serving { no_capture, formats, hooks, onnxruntime, monitor, feedback, telemetry_buffer, capture_buffer, pace } =
        serving;
    let identity = Arc::new(identity::Identity::load(data_dir)?);
    let profile = profiles::lookup(&identity.info.profile);
    let onnxruntime = onnxruntime.or_else(|| profile.and_then(|p| p.onnxruntime).map(PathBuf::from));
    let prefer = onnxruntime.and_then(|lib| load_onnxruntime(&lib, profile.map_or(&[], |p| p.onnxruntime_providers)));
    let formats = if formats.is_empty() { tern_runtime::formats() } else { formats };
    if let Some(f) = formats.iter().find(|f| !tern_runtime::supports(**f)) {
        anyhow::bail!("--formats: this agent build cannot run {f} artifacts");
    }
    // Alternatives are ONNX: taken only where ONNX is.
    let prefer = prefer.filter(|_| formats.contains(&ModelFormat::Onnx));
    match &profile {
        Some(p) => {
            info!(profile = %identity.info.profile, description = %p.description, arch = %p.arch, cores = ?p.cores,
                memory_mb = ?p.memory_mb, accelerators = ?p.accelerators, format = p.version, "device profile");
            if p.arch != "any" && p.arch != std::env::consts::ARCH {
                warn!(profile = %identity.info.profile, "profile is for {}, this agent runs on {}", p.arch, std::env::consts::ARCH);
            }
        }
        None => warn!(profile = %identity.info.profile, "unknown device profile; sizing from this machine"),
    }
    let sizing = profiles::sizing(profile, asked);
    let store = Arc::new(store::Store::open(data_dir)?);
    let (persisted, complete) = match store.load() {
        Ok(loaded) => loaded,
        Err(e) => {
            // Better to start, connect and take the models again than to
            // stop here and be unreachable: the files in models/ stay.
            error!("{e:#}: set aside; starting with no models until the coordinator sends them");
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            store.set_aside(now)?;
            // The generation is kept apart from the slots, so it survives.
            store.load()?
        }
    };
    let panicked = last_panic(data_dir);
    if let Some((thread, what)) = &panicked {
        warn!("the agent panicked before this start, on thread {thread}: {what}");
    }
    // Laid on a candidate only if the thread that panicked runs its code in
    // the phase it was in: loads and self-tests on `models`, shadow runs on
    // `shadow`, and, on probation, requests on `api-conn` (which also serve
    // the other models: with several, one of theirs counts too).
    let blame = |phase: &str| {
        let (thread, what) = panicked.as_ref()?;
        let runs = match phase {
            "staged" | "self-test" => "models",
            "shadow" => "shadow",
            "probation" => "api-conn",
            _ => return None,
        };
        (thread == runs).then(|| what.clone())
    };
    let slots = Slots::restore_after(&formats, persisted, std::time::Instant::now(), blame);
    if panicked.is_some() {
        // The verdict on disk before the record of the panic goes.
        match store.write(&slots.persisted(), complete) {
            Ok(()) => {
                if let Err(e) = std::fs::remove_file(data_dir.join(PANICKED)) {
                    error!("cannot remove {}: {e}", data_dir.join(PANICKED).display());
                }
            }
            Err(e) => error!("cannot record what the last panic interrupted: {e:#}"),
        }
    }
    record_panics(data_dir);
    info!(generation = slots.generation(), "agent state restored");
    let report = StatusReport { models: slots.status(), generation: slots.generation(), refused: None };
    let (status_tx, status_rx) = watch::channel(report);
    let (conn_tx, conn_rx) = watch::channel(None);
    let (link_tx, link_rx) = mpsc::channel(16);

    // Built straight into its Arc: `Shared` is large, and a local held
    // across an await would copy it into this future (and its initial
    // value into the binary).
    let mut shared = api::Shared::new(
        identity.info.device_id.clone(),
        status_rx.clone(),
        sizing.threads,
        sizing.queue,
        sizing.limits,
        sizing.request_memory,
        monitor,
    );
    shared.feedback = feedback;
    shared.no_capture = no_capture;
    // The capture policies of the last verified desired state, until the
    // next one: a restart offline keeps capturing as the fleet asked.
    let capture_path = data_dir.join("capture.json");
    if !no_capture && let Ok(bytes) = std::fs::read(&capture_path) {
        match serde_json::from_slice(&bytes) {
            Ok(kept) => *shared.capture.write().expect("lock") = kept,
            Err(e) => warn!("{}: {e}; no capture until the next desired state", capture_path.display()),
        }
    }
    shared.capture_path = Some(capture_path);
    let shared = Arc::new(shared);
    let outbox = outbox::Outbox::open(store.clone(), telemetry_buffer, capture_buffer.min(telemetry_buffer / 2))?;
    let _ = shared.outbox.set(outbox.clone());
    let traffic = Arc::new(traffic::Traffic::open(data_dir.join("traffic.json")));
    let _ = shared.traffic.set(traffic.clone());
    tokio::spawn(drift::close_old_windows(shared.clone()));
    let socket = socket.unwrap_or_else(|| data_dir.join("agent.sock"));
    let tcp =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding the local API on {listen}"))?;
    let _ = std::fs::remove_file(&socket);
    let uds = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding the local API on {}", socket.display()))?;
    let http_addr = tcp.local_addr()?;
    tokio::spawn(serve::tcp(tcp, api::router(shared.clone())));
    tokio::spawn(serve::unix(uds, api::router(shared.clone())));
    let api_json = serde_json::json!({ "http": http_addr, "socket": socket, "pid": std::process::id() });
    tern_durable::write_atomic(&data_dir.join("api.json"), &serde_json::to_vec_pretty(&api_json)?, false)?;
    info!(device = %identity.info.device_id, http = %http_addr, socket = %socket.display(),
        max_batch = sizing.limits.max_batch, request_memory = sizing.request_memory, "agent ready");

    let trust = trust::Trust::open(
        identity.registry_key,
        identity.info.device_id.clone(),
        identity.info.profile.clone(),
        &data_dir.join("identity"),
    )?
    .preferring(prefer);
    let live = Arc::new(Mutex::new(BTreeSet::new()));
    let persister = store::Persister::spawn(store.clone(), live.clone())?;
    let work = Arc::new(DaemonWork { store: store.clone(), conn_rx });
    // The steps before this start, so that a crash's last ones still reach
    // the coordinator (which keeps each step once).
    let (history_tx, history_rx) = watch::channel(store.load_history());
    let runner =
        runner::Runner::new(slots, complete, work, shared, trust, persister, live, status_tx, history_tx, hooks);
    let route = Arc::new(link::Route::open(data_dir.join("route.json")));
    #[cfg(feature = "mqtt")]
    tokio::spawn(mqtt::run(identity.clone(), outbox.clone(), route.watch(), pace.metered, traffic.clone()));
    tokio::spawn(link::run(
        identity.clone(),
        formats,
        conn_tx,
        link::Reports { status: status_rx, history: history_rx, outbox, traffic, route },
        pace,
        link_tx,
    ));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    runner.run(link_rx, stop).await;
    info!("agent stopping");
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Downloads over the coordinator session, loads from `models/`.
/// Loads the device's onnxruntime; the backend to prefer if it loaded.
fn load_onnxruntime(lib: &Path, providers: &[&str]) -> Option<String> {
    #[cfg(feature = "onnxruntime")]
    let loaded = match tern_runtime::ort_backend::init(lib, providers) {
        Ok(what) => {
            info!(library = %what, ?providers, "onnxruntime loaded: it runs ONNX artifacts");
            Some("onnxruntime".into())
        }
        Err(e) => {
            warn!("{e}; running tract only");
            None
        }
    };
    #[cfg(not(feature = "onnxruntime"))]
    let loaded = {
        let _ = providers;
        warn!(library = %lib.display(), "this agent build has no onnxruntime backend; running tract only");
        None
    };
    loaded
}

struct DaemonWork {
    store: Arc<store::Store>,
    conn_rx: watch::Receiver<link::Session>,
}

impl runner::Work for DaemonWork {
    fn fetch(&self, m: ModelManifest) -> runner::Fetching {
        let (store, conn_rx) = (self.store.clone(), self.conn_rx.clone());
        Box::pin(async move {
            // A metered session stays up from the first file to the last.
            let _running = link::Downloading::start();
            let artifact = link::Wanted { sha256: m.sha256, size: m.size, what: "artifact" };
            link::fetch(store.clone(), conn_rx.clone(), artifact).await?;
            if let Some(t) = m.selftest {
                let golden = link::Wanted { sha256: t.sha256, size: t.size, what: "golden vectors" };
                link::fetch(store.clone(), conn_rx.clone(), golden).await?;
            }
            if let Some(b) = m.baseline {
                let baseline = link::Wanted { sha256: b.sha256, size: b.size, what: "baseline" };
                link::fetch(store, conn_rx, baseline).await?;
            }
            Ok(())
        })
    }

    /// Hashes its files again: what is on disk now is what was signed.
    fn verify(&self, m: &ModelManifest) -> Result<(), String> {
        let files = std::iter::once(("artifact", m.sha256, m.size))
            .chain(m.selftest.map(|t| ("golden vectors", t.sha256, t.size)))
            .chain(m.baseline.map(|b| ("baseline", b.sha256, b.size)));
        for (what, sha, size) in files {
            let path = self.store.model_path(&sha);
            let len = std::fs::metadata(&path).map_err(|e| format!("{what}: {}: {e}", path.display()))?.len();
            let actual = store::digest_file(&path).map_err(|e| format!("{what}: reading {}: {e}", path.display()))?;
            if actual != sha || len != size {
                let _ = std::fs::remove_file(&path);
                return Err(format!(
                    "{what} on disk is corrupt ({len} bytes, sha256 {actual}); it will be downloaded again"
                ));
            }
        }
        Ok(())
    }

    /// Reads a verified artifact, checks its digest again (the disk may have
    /// changed under us), and loads it.
    fn load(&self, m: &ModelManifest) -> Result<Arc<dyn tern_runtime::Backend>, String> {
        let bytes = self.read_verified(m.sha256, "artifact")?;
        Ok(tern_runtime::load(m.format, bytes).map_err(|e| e.to_string())?.into())
    }

    fn golden(&self, m: &ModelManifest) -> Result<Option<Vec<u8>>, String> {
        m.selftest.map(|t| self.read_verified(t.sha256, "golden vectors")).transpose()
    }

    fn baseline(&self, m: &ModelManifest) -> Result<Option<Vec<u8>>, String> {
        m.baseline.map(|b| self.read_verified(b.sha256, "baseline")).transpose()
    }
}

impl DaemonWork {
    fn read_verified(&self, sha: tern_proto::Sha256Digest, what: &str) -> Result<Vec<u8>, String> {
        let path = self.store.model_path(&sha);
        let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let actual = tern_proto::Sha256Digest::of(&bytes);
        if actual != sha {
            let _ = std::fs::remove_file(&path);
            return Err(format!("stored {what} is corrupt (sha256 {actual}); it will be downloaded again"));
        }
        Ok(bytes)
    }
}
