//! `tern-agent`: the Tern device daemon. It enrolls with a coordinator,
//! keeps a mutual-TLS QUIC session to it, takes the models it is told to
//! serve (verifying digest and signature), and answers device apps on a
//! local HTTP API and Unix socket.

mod api;
mod gate;
mod identity;
mod link;
mod profiles;
mod serve;
mod store;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use tern_agent_core::{Action, Event, Slots};
use tern_proto::{DeviceId, ModelManifest};
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

#[derive(Subcommand)]
enum Cmd {
    /// Enroll this device with a coordinator using a one-time token.
    Enroll {
        /// The coordinator's QUIC address, HOST:PORT.
        #[arg(long)]
        coordinator: String,
        /// The token printed by `tern fleet token`.
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
    },
}

fn main() -> ExitCode {
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
            Cmd::Run { listen, socket, threads, queue } => run(&cli.data_dir, listen, socket, threads, queue).await,
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

async fn run(
    data_dir: &Path,
    listen: SocketAddr,
    socket: Option<PathBuf>,
    threads: Option<usize>,
    queue: Option<usize>,
) -> Result<()> {
    let identity = Arc::new(identity::Identity::load(data_dir)?);
    let profile = profiles::lookup(&identity.info.profile);
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
    let (threads, queue) = profiles::budget(profile.as_ref(), threads, queue);
    let store = Arc::new(store::Store::open(data_dir)?);
    let mut slots = Slots::restore(store.active()?);
    let (status_tx, status_rx) = watch::channel(slots.status());
    let (conn_tx, conn_rx) = watch::channel(None);
    let (link_tx, mut link_rx) = mpsc::channel(16);
    let (done_tx, mut done_rx) = mpsc::channel::<Event>(64);

    let shared = Arc::new(api::Shared {
        device: identity.info.device_id.clone(),
        models: Default::default(),
        status: status_rx.clone(),
        health_changed: Default::default(),
        threads,
        queue,
    });
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
    info!(device = %identity.info.device_id, http = %http_addr, socket = %socket.display(), "agent ready");

    tokio::spawn(link::run(identity.clone(), conn_tx, status_rx, link_tx));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        while let Some(action) = slots.poll_action() {
            execute(action, &slots, &store, &shared, &conn_rx, &done_tx);
        }
        status_tx.send_if_modified(|s| {
            let now = shared.status_with_health(slots.status());
            let changed = *s != now;
            *s = now;
            changed
        });
        let timeout = slots.poll_timeout();
        tokio::select! {
            Some(link::FromLink::Desired(d)) = link_rx.recv() => apply_desired(&mut slots, &identity, d),
            Some(ev) = done_rx.recv() => {
                if let Err(e) = slots.handle(ev, Instant::now()) {
                    error!("{e}");
                }
            }
            _ = sleep_until(timeout) => slots.handle_timeout(Instant::now()),
            _ = shared.health_changed.notified() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("agent stopping");
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Verifies every manifest of a desired state; one bad signature and the
/// whole state is refused, so a forged state cannot unload a good model.
fn apply_desired(slots: &mut Slots, identity: &identity::Identity, desired: tern_proto::DesiredState) {
    let verified: Result<Vec<ModelManifest>, String> = desired
        .models
        .iter()
        .map(|signed| {
            let m = identity.registry_key.verify(signed).map_err(|e| e.to_string())?;
            if !tern_runtime::supports(m.format) {
                return Err(format!("{}:{} is {}, which this agent build cannot run", m.name, m.version, m.format));
            }
            Ok(m)
        })
        .collect();
    match verified {
        Ok(models) => {
            info!(generation = desired.generation, models = ?models.iter().map(|m| format!("{}:{}", m.name, m.version)).collect::<Vec<_>>(), "desired state");
            slots.set_desired(desired.generation, models);
        }
        Err(e) => error!(generation = desired.generation, "refusing desired state: {e}"),
    }
}

fn execute(
    action: Action,
    slots: &Slots,
    store: &Arc<store::Store>,
    shared: &Arc<api::Shared>,
    conn_rx: &watch::Receiver<Option<quinn::Connection>>,
    done: &mpsc::Sender<Event>,
) {
    match action {
        Action::Fetch(m) => {
            let (store, conn_rx, done) = (store.clone(), conn_rx.clone(), done.clone());
            tokio::spawn(async move {
                let (name, version) = (m.name.clone(), m.version);
                let ev = match link::fetch(&store, conn_rx, &m).await {
                    Ok(()) => Event::Fetched { name, version },
                    Err(reason) => {
                        warn!(model = %m.name, version, "fetch failed: {reason}");
                        Event::FetchFailed { name, version, reason }
                    }
                };
                let _ = done.send(ev).await;
            });
        }
        Action::Load(m) => {
            let (store, shared, done) = (store.clone(), shared.clone(), done.clone());
            tokio::task::spawn_blocking(move || {
                let (name, version) = (m.name.clone(), m.version);
                let ev = match load(&store, &m) {
                    Ok(backend) => {
                        let gate = gate::Gate::new(shared.threads, shared.queue);
                        let served = Arc::new(api::Served::new(m, backend, gate));
                        // In-flight requests finish on the old version, which is dropped after.
                        shared.models.write().expect("lock").insert(name.clone(), served);
                        info!(model = %name, version, threads = shared.threads, queue = shared.queue, "serving");
                        Event::Loaded { name, version }
                    }
                    Err(reason) => {
                        warn!(model = %name, version, "load failed: {reason}");
                        Event::LoadFailed { name, version, reason }
                    }
                };
                let _ = done.blocking_send(ev);
            });
        }
        Action::Unload(name) => {
            shared.models.write().expect("lock").remove(&name);
            info!(model = %name, "unloaded: no longer desired");
        }
        Action::Persist => {
            if let Err(e) = store.set_active(&slots.active()) {
                // Serving continues from memory; the next persist retries.
                error!("cannot persist the active models: {e:#}");
            }
        }
    }
}

/// Reads a verified artifact, checks its digest again (the disk may have
/// changed under us), and loads it.
fn load(store: &store::Store, m: &ModelManifest) -> Result<Arc<dyn tern_runtime::Backend>, String> {
    let path = store.model_path(&m.sha256);
    let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let actual = tern_proto::Sha256Digest::of(&bytes);
    if actual != m.sha256 {
        let _ = std::fs::remove_file(&path);
        return Err(format!("stored artifact is corrupt (sha256 {actual}); it will be downloaded again"));
    }
    Ok(tern_runtime::load(m.format, bytes).map_err(|e| e.to_string())?.into())
}
