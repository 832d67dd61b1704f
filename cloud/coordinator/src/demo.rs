//! `tern demo`: the whole spine on one machine. A coordinator and an agent
//! run as real processes in a temporary folder; the agent enrolls, receives a
//! model over mutual-TLS QUIC and answers predictions on its local API.

use crate::cli::{Client, FleetCmd, ModelCmd, fleet, model, out};
use crate::serve::Endpoints;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Iris classifier from fixtures/ (scikit-learn MLP exported by skl2onnx).
const IRIS_ONNX: &[u8] = include_bytes!("../../../fixtures/iris.onnx");
const SPECIES: [&str; 3] = ["setosa", "versicolor", "virginica"];

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The tern-agent binary; default: next to this one.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Keep the temporary folder (logs, data dirs) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

/// Child processes that are stopped when the demo ends, however it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> Result<Child> {
    let log = std::fs::File::create(log)?;
    Command::new(bin)
        .args(args)
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

fn step(t0: Instant, msg: &str) {
    out(format!("[{:>6.2}s] {msg}", t0.elapsed().as_secs_f64()));
}

pub fn run(args: DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let me = std::env::current_exe()?;
    let agent_bin = args.agent_bin.unwrap_or_else(|| me.with_file_name("tern-agent"));
    if !agent_bin.is_file() {
        bail!(
            "tern-agent not found at {} (build it: cargo build --release -p tern-agent, or pass --agent-bin)",
            agent_bin.display()
        );
    }
    let tmp = tempfile::Builder::new().prefix("tern-demo-").tempdir()?;
    let root = tmp.path().to_path_buf();
    let coord_dir = root.join("coordinator");
    let agent_dir = root.join("agent");
    let mut procs = Procs(Vec::new());

    let serve_args = [
        "serve",
        "--data-dir",
        path_str(&coord_dir)?,
        "--quic-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--mqtt-listen",
        "127.0.0.1:0",
    ];
    procs.0.push(spawn(&me, &serve_args, &root.join("coordinator.log"))?);
    let endpoints: Endpoints = wait_for("the coordinator to start", Duration::from_secs(20), || {
        std::fs::read(coord_dir.join("serve.json")).ok().and_then(|b| serde_json::from_slice(&b).ok())
    })?;
    step(t0, &format!("coordinator up: QUIC {} (mutual TLS), admin API http://{}", endpoints.quic, endpoints.admin));
    let client = Client::new(&coord_dir, None, None)?;

    let token: Value = client_token(&client)?;
    let token = token["token"].as_str().context("token missing")?.to_owned();
    step(t0, &format!("enrollment token: {}…", &token[..24]));

    let enrolled = Command::new(&agent_bin)
        .args([
            "enroll",
            "--coordinator",
            &endpoints.quic.to_string(),
            "--token",
            &token,
            "--data-dir",
            path_str(&agent_dir)?,
            "--device-id",
            "demo-cam-01",
        ])
        .output()?;
    if !enrolled.status.success() {
        bail!("agent enrollment failed: {}", String::from_utf8_lossy(&enrolled.stderr).trim());
    }
    step(t0, "agent enrolled as demo-cam-01 (key made on the device, certificate from the fleet CA)");

    let model_path = root.join("iris.onnx");
    std::fs::write(&model_path, IRIS_ONNX)?;
    let card = root.join("iris.md");
    std::fs::write(
        &card,
        "# Iris MLP\n\nscikit-learn MLPClassifier (16 hidden units) on the Iris data set, exported with skl2onnx.\n",
    )?;
    model(
        &client,
        ModelCmd::Register {
            name: "iris".into(),
            file: model_path,
            card: Some(card),
            meta: vec![("dataset".into(), "iris".into())],
            references: vec![],
            tolerance_ppm: 100,
            shapes: vec![],
            consts: vec![],
            baseline: None,
            categorical: vec![],
            bins: tern_drift::DEFAULT_BINS,
        },
        false,
    )?;
    model(&client, ModelCmd::Approve { target: "iris:1".parse()? }, false)?;

    procs.0.push(spawn(
        &agent_bin,
        &["run", "--data-dir", path_str(&agent_dir)?, "--listen", "127.0.0.1:0"],
        &root.join("agent.log"),
    )?);
    let api: Value = wait_for("the agent's local API", Duration::from_secs(20), || {
        std::fs::read(agent_dir.join("api.json")).ok().and_then(|b| serde_json::from_slice(&b).ok())
    })?;
    let base = format!("http://{}", api["http"].as_str().context("api.json has no http address")?);
    step(t0, &format!("agent running, local API on {base} and {}", api["socket"].as_str().unwrap_or("?")));

    fleet(&client, FleetCmd::Assign { device: "demo-cam-01".into(), model: "iris:1".parse()? }, false)?;
    let http = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let deployed = Instant::now();
    wait_for("the agent to serve iris:1", Duration::from_secs(30), || {
        let v: Value = http.get(format!("{base}/v1/models")).call().ok()?.body_mut().read_json().ok()?;
        v["models"]
            .as_array()?
            .iter()
            .any(|m| m["name"] == "iris" && m["version"] == 1 && m["state"] == "serving")
            .then_some(())
    })?;
    step(
        t0,
        &format!(
            "iris:1 downloaded, verified (sha256 + ed25519) and serving after {:.0} ms",
            deployed.elapsed().as_secs_f64() * 1e3
        ),
    );

    let flowers: [[f32; 4]; 4] =
        [[5.1, 3.5, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5], [6.9, 3.1, 5.4, 2.1], [5.0, 3.0, 1.6, 0.2]];
    let data: Vec<f32> = flowers.iter().flatten().copied().collect();
    let mut resp = http
        .post(format!("{base}/v1/models/iris:predict"))
        .send_json(json!({ "inputs": [{ "name": "X", "shape": [flowers.len(), 4], "data": data }] }))?;
    let answer: Value = resp.body_mut().read_json()?;
    if !resp.status().is_success() {
        bail!("prediction failed: {answer}");
    }
    let labels = answer["outputs"][0]["data"].as_array().context("no labels")?;
    let probs = answer["outputs"][1]["data"].as_array().context("no probabilities")?;
    out(format!("\npredictions from the agent's local API (POST {base}/v1/models/iris:predict):"));
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED).set_header(vec![
        "sepal l",
        "sepal w",
        "petal l",
        "petal w",
        "species",
        "p(setosa)",
        "p(versicolor)",
        "p(virginica)",
    ]);
    for (i, f) in flowers.iter().enumerate() {
        let label = labels[i].as_i64().unwrap_or(-1);
        let mut row: Vec<String> = f.iter().map(|x| format!("{x:.1}")).collect();
        row.push(SPECIES.get(label as usize).unwrap_or(&"?").to_string());
        row.extend((0..3).map(|k| format!("{:.3}", probs[i * 3 + k].as_f64().unwrap_or(f64::NAN))));
        t.add_row(row);
    }
    out(format!("{t}\n"));
    fleet(&client, FleetCmd::List, false)?;
    step(t0, "demo finished");
    drop(procs);
    if args.keep {
        let kept = tmp.keep();
        out(format!("kept {}", kept.display()));
    }
    Ok(())
}

fn client_token(client: &Client) -> Result<Value> {
    client.token_json("demo", "generic-linux", 600)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("temporary path is not UTF-8")
}
