//! `tern`: the Tern coordinator (`tern serve`) and the admin CLI that drives
//! it (`tern model …`, `tern fleet …`, `tern registry …`), plus `tern demo`.

mod baseline;
mod cli;
mod compile;
mod demo;
mod fsutil;
mod monitor;
mod mosquitto;
mod rollout;
mod serve;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "tern", version, about = "Tern coordinator and admin CLI")]
struct Cli {
    /// Coordinator data directory (registry, artifacts, keys, admin token).
    #[arg(long, env = "TERN_DATA_DIR", default_value = "tern-data", global = true)]
    data_dir: PathBuf,
    /// Admin API URL; default: read from <data-dir>/serve.json.
    #[arg(long, env = "TERN_ADMIN", global = true)]
    admin: Option<String>,
    /// File holding the admin token; default: <data-dir>/admin.token. (The
    /// token itself may come from the TERN_ADMIN_TOKEN environment variable;
    /// there is no flag for it, because command lines show in `ps`.)
    #[arg(long, env = "TERN_ADMIN_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Print JSON instead of tables, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the coordinator: QUIC endpoint for agents, admin API for this CLI.
    Serve(serve::ServeArgs),
    /// Register, inspect and approve models.
    #[command(subcommand)]
    Model(cli::ModelCmd),
    /// Enrollment tokens, devices and their desired models.
    #[command(subcommand)]
    Fleet(cli::FleetCmd),
    /// Training baselines in SageMaker Model Monitor's files, and datasets
    /// checked against them.
    #[command(subcommand)]
    Monitor(monitor::MonitorCmd),
    /// Alerts raised on devices: list, acknowledge.
    #[command(subcommand)]
    Alerts(monitor::AlertsCmd),
    /// Staged rollouts over the fleet: waves, gates, pause, resume, abort,
    /// rollback.
    #[command(subcommand)]
    Rollout(rollout::RolloutCmd),
    /// An external MQTT broker for the fleet: `mosquitto-config`.
    #[command(subcommand)]
    Broker(mosquitto::BrokerCmd),
    /// The registry's TUF repository: sign its root offline, export it.
    #[command(subcommand)]
    Registry(cli::RegistryCmd),
    /// Start a coordinator and an agent in a temporary folder, deploy a
    /// model, and print predictions made on the "device".
    Demo(demo::DemoArgs),
    /// Compile a registered version for a device profile (or an ONNX file)
    /// on this machine: input shapes pinned, inputs constant in use folded
    /// in, written as tract NNEF (which every agent runs), checked against
    /// the source on seeded inputs, its latency and memory measured and
    /// judged against the profile's budget, and stored with the version.
    Compile(compile::CompileArgs),
    /// Measure one model in this process (what `tern compile` runs).
    #[command(hide = true)]
    ProbeModel {
        /// The artifact.
        file: PathBuf,
        /// The input set to run it on (binary tensor encoding).
        #[arg(long)]
        inputs: PathBuf,
        /// Run it on onnxruntime from this library instead.
        #[arg(long)]
        onnxruntime: Option<PathBuf>,
        /// Outputs its first answer must match (binary tensor encoding).
        #[arg(long)]
        expect: Option<PathBuf>,
        /// How far from them, in millionths of 1 + |expected|.
        #[arg(long, default_value_t = 100)]
        tolerance_ppm: u32,
    },
}

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(args) => {
            init_logs("info,quinn=warn");
            tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(serve::run(cli.data_dir, args)))
        }
        Cmd::Model(cli::ModelCmd::Pack { weights, out }) => {
            init_logs("warn");
            cli::pack(&weights, &out, cli.json)
        }
        Cmd::Model(cmd) => {
            init_logs("warn");
            cli::Client::new(&cli.data_dir, cli.admin, cli.token_file.as_deref())
                .and_then(|c| cli::model(&c, cmd, cli.json))
        }
        Cmd::Monitor(cmd) => {
            init_logs("warn");
            cli::Client::new(&cli.data_dir, cli.admin, cli.token_file.as_deref())
                .and_then(|c| monitor::run(&c, cmd, cli.json))
        }
        Cmd::Alerts(cmd) => {
            init_logs("warn");
            cli::Client::new(&cli.data_dir, cli.admin, cli.token_file.as_deref())
                .and_then(|c| monitor::alerts(&c, cmd, cli.json))
        }
        Cmd::Rollout(cmd) => {
            init_logs("warn");
            cli::Client::new(&cli.data_dir, cli.admin, cli.token_file.as_deref())
                .and_then(|c| rollout::run(&c, cmd, cli.json))
        }
        Cmd::Broker(cmd) => {
            init_logs("warn");
            cli::Client::new(&cli.data_dir, cli.admin, cli.token_file.as_deref())
                .and_then(|c| mosquitto::run(&c, cmd, cli.json))
        }
        Cmd::Fleet(cmd) => {
            init_logs("warn");
            cli::Client::new(&cli.data_dir, cli.admin, cli.token_file.as_deref())
                .and_then(|c| cli::fleet(&c, cmd, cli.json))
        }
        Cmd::Registry(cli::RegistryCmd::SignRoot { key, generate, previous_key, days }) => {
            init_logs("warn");
            cli::sign_root(&cli.data_dir, &key, generate, previous_key.as_deref(), days, cli.json)
        }
        Cmd::Registry(cli::RegistryCmd::ExportTuf { dir }) => {
            init_logs("warn");
            cli::Client::new(&cli.data_dir, cli.admin, cli.token_file.as_deref())
                .and_then(|c| cli::export_tuf(&c, &dir, cli.json))
        }
        Cmd::Demo(args) => {
            init_logs("warn");
            demo::run(args)
        }
        Cmd::Compile(args) => {
            init_logs("warn");
            let (data_dir, admin, token_file) = (cli.data_dir, cli.admin, cli.token_file);
            compile::run(args, || cli::Client::new(&data_dir, admin, token_file.as_deref()), cli.json)
        }
        Cmd::ProbeModel { file, inputs, onnxruntime, expect, tolerance_ppm } => {
            init_logs("warn");
            compile::probe_model(&file, &inputs, onnxruntime.as_deref(), expect.as_deref(), tolerance_ppm)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
