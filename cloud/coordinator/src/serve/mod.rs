//! `tern serve`: the coordinator process. One data dir holds the registry
//! (sled), the artifacts (content-addressed files) and the keys; a QUIC
//! endpoint serves agents and an HTTP admin API on loopback serves the CLI.

mod admin;
mod keys;
mod quic;

pub use keys::random;

use crate::fsutil::unix_now;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tern_durable::write_atomic;
use tern_net::FleetCa;
use tern_proto::{DesiredState, DeviceId};
use tern_registry::{Artifacts, Registry, RegistryError};
use tern_trust::SigningKey;
use tokio::sync::broadcast;
use tracing::info;

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
}

/// What a running coordinator writes to `<data-dir>/serve.json`, so the CLI
/// (and tests) can find it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    /// Bound QUIC address.
    pub quic: SocketAddr,
    /// Bound admin API address.
    pub admin: SocketAddr,
    /// Process id.
    pub pid: u32,
}

/// State shared by the QUIC and admin sides.
pub struct State {
    pub registry: Registry,
    pub artifacts: Artifacts,
    pub signer: SigningKey,
    pub ca: FleetCa,
    pub admin_token: String,
    /// Notifies device sessions that a device's desired state changed.
    pub changes: broadcast::Sender<DeviceId>,
}

impl State {
    /// The signed desired state of a device.
    pub fn desired(&self, id: &str) -> Result<DesiredState, RegistryError> {
        let device = self.registry.device(id)?;
        let models = device
            .desired
            .iter()
            .map(|(name, version)| Ok(self.signer.sign(&self.registry.version(name, *version)?.manifest())))
            .collect::<Result<Vec<_>, RegistryError>>()?;
        Ok(DesiredState { generation: device.generation, models })
    }
}

/// Runs the coordinator until SIGINT or SIGTERM.
pub async fn run(data_dir: PathBuf, args: ServeArgs) -> Result<()> {
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let keys = keys::Keys::load_or_create(&data_dir, &args.fleet)?;
    let registry = Registry::open(data_dir.join("registry")).context("opening the registry")?;
    let artifacts = Artifacts::open(data_dir.join("artifacts")).context("opening the artifact store")?;

    let (server_cert, server_key) = keys.ca.issue_server(&args.names)?;
    let server_config = tern_net::server_config(&server_cert, &server_key, keys.ca.cert_der())?;
    let endpoint = quinn::Endpoint::server(server_config, args.quic_listen)
        .with_context(|| format!("binding QUIC on {}", args.quic_listen))?;
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding the admin API on {}", args.admin_listen))?;

    let endpoints = Endpoints { quic: endpoint.local_addr()?, admin: admin.local_addr()?, pid: std::process::id() };
    write_atomic(&data_dir.join("serve.json"), &serde_json::to_vec_pretty(&endpoints)?, false)?;
    info!(quic = %endpoints.quic, admin = %endpoints.admin, data_dir = %data_dir.display(), "coordinator ready");

    let state = Arc::new(State {
        registry,
        artifacts,
        signer: keys.signer,
        ca: keys.ca,
        admin_token: keys.admin_token,
        changes: broadcast::channel(1024).0,
    });
    tokio::spawn(quic::accept_loop(endpoint.clone(), state.clone()));
    let app = admin::router(state.clone());
    axum::serve(admin, app).with_graceful_shutdown(shutdown()).await.context("admin API")?;
    endpoint.close(0u32.into(), b"coordinator shutting down");
    state.registry.sync()?;
    info!(at = unix_now(), "coordinator stopped");
    Ok(())
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
