//! `tern-bench`: one model, one machine, one run. Measures the latency of
//! raw tract in-process, of a real `tern-agent` answering over its Unix
//! socket and over HTTP on loopback (binary tensor bodies, the model
//! deployed through a real coordinator as pinned-shape NNEF), and of
//! onnxruntime from PyPI in single-thread mode; prints a markdown table,
//! and fails if their outputs differ from raw tract's beyond `--tolerance`.

use anyhow::{Context, Result, ensure};
use clap::Parser;
use serde_json::Value;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tern_bench::{Http1, Procs, cli, stats, time_runs, wait_for};
use tern_proto::{Tensor, TensorData, decode_tensors, encode_tensors};
use tract_onnx::prelude::*;

#[derive(Parser)]
#[command(about = "Benchmark raw tract, the Tern agent (Unix socket, HTTP) and onnxruntime on one model")]
struct Args {
    /// The ONNX model.
    #[arg(long)]
    model: PathBuf,
    /// Input shape, e.g. 1,3,48,192 (one f32 input).
    #[arg(long, value_delimiter = ',', required = true)]
    input_shape: Vec<usize>,
    /// Name for the table.
    #[arg(long)]
    name: String,
    /// Timed runs per path.
    #[arg(long, default_value_t = 300)]
    iters: usize,
    /// Untimed runs first, per path and round.
    #[arg(long, default_value_t = 30)]
    warmup: usize,
    /// Rounds: each path runs iters/rounds times per round, the paths taking
    /// turns, so that drift of the machine falls on every path alike.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Where `tern` and `tern-agent` are; default: next to this binary.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Python with onnxruntime and numpy.
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Append the table to this file as well.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Largest absolute difference from raw tract's outputs accepted for the
    /// agent and for onnxruntime; the benchmark fails above it.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
    /// A libonnxruntime: a second agent, started with it, serves the ONNX
    /// source on onnxruntime, timed over its Unix socket too.
    #[arg(long)]
    onnxruntime: Option<PathBuf>,
}

/// The least any out-of-process server can add on this machine: a one-byte
/// round trip over a Unix socket pair to a thread that busy-works for `work`
/// before answering (no HTTP, no model), minus `work`. Both ends sleep in the
/// kernel while the other works, as the client and the agent do.
fn socket_floor(work: Duration, iters: usize, warmup: usize) -> Result<Vec<f64>> {
    let (mut client, mut server) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        while server.read_exact(&mut b).is_ok() {
            let t = Instant::now();
            while t.elapsed() < work {
                std::hint::spin_loop();
            }
            if server.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut b = [0u8; 1];
    let ms = time_runs(iters, warmup, || {
        client.write_all(&b)?;
        client.read_exact(&mut b)?;
        Ok(())
    })?;
    drop(client);
    echo.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))?;
    Ok(ms.into_iter().map(|m| m - work.as_secs_f64() * 1e3).collect())
}

/// Deterministic input in [0, 1).
fn input_data(n: usize) -> Vec<f32> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

fn first_output_f32(t: &Tensor) -> Vec<f32> {
    match &t.data {
        TensorData::F32(v) => v.clone(),
        TensorData::F64(v) => v.iter().map(|x| *x as f32).collect(),
        TensorData::I64(v) => v.iter().map(|x| *x as f32).collect(),
        other => vec![f32::NAN; other.len()],
    }
}

/// Starts a coordinator and an agent (with `agent_args`), deploys `model`
/// to it, and returns the processes with the agent's HTTP address and
/// socket path.
/// `compile`, if given, are the arguments of a `tern compile bench:1
/// --target generic-linux` run before the assignment.
fn deploy(
    bin: &Path,
    root: &Path,
    model: &Path,
    agent_args: &[&str],
    compile: Option<&[&str]>,
) -> Result<(Procs, String, PathBuf)> {
    let (coord, agent) = (root.join("coordinator"), root.join("agent"));
    let mut procs = Procs(Vec::new());
    let log = |n: &str| std::fs::File::create(root.join(n));
    procs.0.push(
        Command::new(bin.join("tern"))
            .args([
                "serve",
                "--quic-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&coord)
            .stderr(log("coordinator.log")?)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let ep: Value =
        wait_for("coordinator", || serde_json::from_slice(&std::fs::read(coord.join("serve.json")).ok()?).ok())?;
    let token = cli(bin, &coord, &["fleet", "token", "--group", "bench", "--profile", "generic-linux"])?;
    let out = Command::new(bin.join("tern-agent"))
        .args([
            "enroll",
            "--device-id",
            "bench",
            "--coordinator",
            ep["quic"].as_str().unwrap_or_default(),
            "--token",
            token.trim(),
            "--data-dir",
        ])
        .arg(&agent)
        .output()?;
    ensure!(out.status.success(), "enroll: {}", String::from_utf8_lossy(&out.stderr));
    cli(bin, &coord, &["model", "register", "bench", "--file", model.to_str().context("path")?])?;
    cli(bin, &coord, &["model", "approve", "bench:1"])?;
    if let Some(extra) = compile {
        let mut args = vec!["compile", "bench:1", "--target", "generic-linux"];
        args.extend_from_slice(extra);
        cli(bin, &coord, &args)?;
    }
    cli(bin, &coord, &["fleet", "assign", "bench", "bench:1"])?;
    procs.0.push(
        Command::new(bin.join("tern-agent"))
            .args(["run", "--listen", "127.0.0.1:0", "--threads", "1"])
            .args(agent_args)
            .arg("--data-dir")
            .arg(&agent)
            .env("RUST_LOG", "warn")
            .stderr(log("agent.log")?)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let api: Value = wait_for("agent", || serde_json::from_slice(&std::fs::read(agent.join("api.json")).ok()?).ok())?;
    let http = api["http"].as_str().context("http")?.to_owned();
    let http_agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    wait_for("the model to be served", || {
        let v: Value = http_agent.get(format!("http://{http}/v1/models")).call().ok()?.body_mut().read_json().ok()?;
        v["models"].as_array()?.iter().any(|m| m["state"] == "serving").then_some(())
    })?;
    Ok((procs, http, PathBuf::from(api["socket"].as_str().context("socket")?)))
}

fn onnx_input_name(onnx: &[u8]) -> Result<String> {
    let inputs = tern_runtime::onnx_inputs(onnx)?;
    Ok(inputs.first().context("the model has no input")?.name.clone())
}

fn shape_arg_of(shape: &[usize]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = match &args.bin_dir {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.parent().context("exe dir")?.to_path_buf(),
    };
    let shape = args.input_shape.clone();
    let data = input_data(shape.iter().product());
    let input = Tensor::new(shape.clone(), TensorData::F32(data.clone())).map_err(anyhow::Error::msg)?;
    let onnx = std::fs::read(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let tmp = tempfile::tempdir()?;

    // 1. Raw tract, in-process, straight from the ONNX file with the same pinned shape.
    let plan = tract_onnx::onnx()
        .model_for_path(&args.model)?
        .with_input_fact(0, f32::fact(&shape).into())?
        .into_optimized()?
        .into_runnable()?;
    let tract_input: tract_onnx::prelude::Tensor =
        tract_ndarray::ArrayD::from_shape_vec(shape.clone(), data.clone())?.into();
    let reference: Vec<f32> = plan.run(tvec!(tract_input.clone().into_tvalue()))?[0]
        .cast_to::<f32>()?
        .try_as_plain_ram()?
        .as_slice::<f32>()?
        .to_vec();

    // 2. The same model compiled to NNEF with that shape: in-process, and
    //    served by a real agent after deployment through a real coordinator.
    let nnef = tern_runtime::onnx_to_nnef(&onnx, Some(std::slice::from_ref(&shape)))?;
    let nnef_path = tmp.path().join("model.nnef.tar");
    std::fs::write(&nnef_path, &nnef)?;
    let compiled = tern_runtime::TractModel::nnef(&nnef)?;
    let (procs, http, socket) = deploy(&bin, tmp.path(), &nnef_path, &[], None)?;
    let body = encode_tensors(std::slice::from_ref(&input)).map_err(anyhow::Error::msg)?;
    let path = "/v1/models/bench:predict";
    let stream = UnixStream::connect(&socket)?;
    let mut uds = Http1 { read: BufReader::new(stream.try_clone()?), write: stream, timings: vec![] };
    let agent_out = decode_tensors(&uds.post(path, &body)?).map_err(anyhow::Error::msg)?;
    let agent_diff =
        first_output_f32(&agent_out[0]).iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let stream = TcpStream::connect(&http)?;
    stream.set_nodelay(true)?;
    let mut tcp = Http1 { read: BufReader::new(stream.try_clone()?), write: stream, timings: vec![] };

    // 3. onnxruntime from PyPI, single thread, same input, in its own process.
    let input_file = tmp.path().join("input.f32");
    let ref_file = tmp.path().join("reference.f32");
    std::fs::write(&input_file, data.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
    std::fs::write(&ref_file, reference.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ort_bench.py");
    let shape_arg = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
    let rounds = args.rounds.max(1);
    let per_round = args.iters.div_ceil(rounds);
    let ort_round = |ort: &mut Value| -> Result<Vec<f64>> {
        let out = Command::new(&args.python)
            .arg(&script)
            .args([args.model.to_str().context("path")?, &shape_arg, &per_round.to_string(), &args.warmup.to_string()])
            .args([&input_file, &ref_file])
            .output()
            .with_context(|| format!("running {}", args.python.display()))?;
        ensure!(out.status.success(), "onnxruntime benchmark failed: {}", String::from_utf8_lossy(&out.stderr));
        *ort = serde_json::from_slice(&out.stdout)?;
        Ok(serde_json::from_value(ort["latencies_ms"].clone())?)
    };

    // 4. With --onnxruntime: a second agent serving the ONNX source on it.
    let mut ort_agent = match &args.onnxruntime {
        Some(lib) => {
            let root = tmp.path().join("onnxruntime");
            std::fs::create_dir_all(&root)?;
            let lib = lib.to_str().context("path")?;
            // The source, compiled for generic-linux at this shape with its
            // onnxruntime alternative, as `tern compile` stores it.
            let shape = format!("{}={}", onnx_input_name(&onnx)?, shape_arg_of(&shape));
            let compile = ["--input-shape", shape.as_str(), "--onnxruntime", lib, "--prefer", "onnxruntime"];
            let (procs, _, socket) = deploy(&bin, &root, &args.model, &["--onnxruntime", lib], Some(&compile))?;
            let stream = UnixStream::connect(&socket)?;
            let mut c = Http1 { read: BufReader::new(stream.try_clone()?), write: stream, timings: vec![] };
            let out = decode_tensors(&c.post(path, &body)?).map_err(anyhow::Error::msg)?;
            let diff =
                first_output_f32(&out[0]).iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            Some((procs, c, diff))
        }
        None => None,
    };
    let mut over_ort_agent = vec![];

    uds.timings.clear();
    let (mut raw, mut in_process, mut over_uds, mut over_http, mut ort_ms) = (vec![], vec![], vec![], vec![], vec![]);
    let mut floor = vec![];
    let mut ort = Value::Null;
    for _ in 0..rounds {
        raw.extend(time_runs(per_round, args.warmup, || {
            plan.run(tvec!(tract_input.clone().into_tvalue()))?;
            Ok(())
        })?);
        in_process.extend(time_runs(per_round, args.warmup, || {
            tern_runtime::Backend::run(&compiled, vec![input.clone()])?;
            Ok(())
        })?);
        let mark = uds.timings.len();
        over_uds.extend(time_runs(per_round, args.warmup, || uds.post(path, &body).map(drop))?);
        uds.timings.drain(mark..mark + args.warmup);
        over_http.extend(time_runs(per_round, args.warmup, || tcp.post(path, &body).map(drop))?);
        ort_ms.extend(ort_round(&mut ort)?);
        if let Some((_, c, _)) = &mut ort_agent {
            over_ort_agent.extend(time_runs(per_round, args.warmup, || c.post(path, &body).map(drop))?);
        }
        let work = Duration::from_secs_f64(stats(raw.clone()).p50 / 1e3);
        floor.extend(socket_floor(work, per_round, args.warmup)?);
    }
    drop(procs);

    let labels = [
        "raw tract, in-process".to_string(),
        "tern-runtime on the compiled NNEF, in-process".to_string(),
        "tern-agent, Unix socket".to_string(),
        "tern-agent, HTTP (loopback)".to_string(),
        format!("onnxruntime {} (1 thread)", ort["version"].as_str().unwrap_or("?")),
    ];
    let uds_runs = over_uds.len();
    let mut labels = labels.to_vec();
    let mut all = vec![stats(raw), stats(in_process), stats(over_uds), stats(over_http), stats(ort_ms)];
    if ort_agent.is_some() {
        labels.push("tern-agent on onnxruntime (1 thread), Unix socket".into());
        all.push(stats(over_ort_agent));
    }
    let mut table = format!(
        "\n### {} — input {:?}, {} runs per path in {rounds} interleaved rounds ({} warm-up runs each)\n\n| path | p50 ms | p99 ms | throughput /s | p50 vs raw tract |\n|---|---|---|---|---|\n",
        args.name,
        shape,
        per_round * rounds,
        args.warmup
    );
    for (label, s) in labels.iter().zip(&all) {
        table +=
            &format!("| {label} | {:.3} | {:.3} | {:.0} | {:.2}× |\n", s.p50, s.p99, 1e3 / s.mean, s.p50 / all[0].p50);
    }
    ensure!(uds.timings.len() == uds_runs, "the agent sent no Server-Timing with every answer");
    let inside = |i: usize| stats(uds.timings.iter().map(|t| t[i]).collect()).p50;
    let (queue, run, handler) = (inside(0), inside(1), inside(2));
    table += &format!(
        "\nInside the agent (its Server-Timing, Unix socket, p50): model run {run:.3} ms, queue {queue:.3} ms, \
         handler {handler:.3} ms (decode, checks, queue, run, encode); the remaining {:.3} ms of the {:.3} ms \
         round trip is HTTP and the socket.\n",
        all[2].p50 - handler,
        all[2].p50
    );
    let floor = stats(floor);
    table += &format!(
        "\nFloor on this machine: a one-byte round trip over a Unix socket pair, to a thread that busy-works \
         for raw tract's p50 before answering, costs {:.3} ms p50 ({:.3} p99) beyond the work ({:.2}× raw \
         tract before any HTTP or tensor is handled).\n",
        floor.p50,
        floor.p99,
        (all[0].p50 + floor.p50) / all[0].p50
    );
    table += &format!(
        "\nOutputs vs raw tract (tolerance {:.0e}): agent max |Δ| = {agent_diff:.2e}; onnxruntime max |Δ| = {:.2e}.\n",
        args.tolerance,
        ort["max_abs_diff"].as_f64().unwrap_or(f64::NAN)
    );
    if let Some((_, _, diff)) = &ort_agent {
        table += &format!(
            "The agent on onnxruntime: max |Δ| = {diff:.2e}; its p50 is {:.2}× onnxruntime's from Python.\n",
            all[5].p50 / all[4].p50
        );
    }
    print!("{table}");
    if let Some(out) = &args.out {
        std::fs::OpenOptions::new().create(true).append(true).open(out)?.write_all(table.as_bytes())?;
    }
    let ort_diff = ort["max_abs_diff"].as_f64().unwrap_or(f64::INFINITY);
    let agent_diff = agent_diff.max(ort_agent.as_ref().map_or(0.0, |(_, _, d)| *d));
    ensure!(
        f64::from(agent_diff) <= args.tolerance && ort_diff <= args.tolerance,
        "outputs disagree beyond the tolerance of {:e}: agent {agent_diff:e}, onnxruntime {ort_diff:e}",
        args.tolerance
    );
    Ok(())
}
