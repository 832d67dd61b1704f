//! `tern-compile-bench`: one real model through `tern compile` and the
//! fleet, then three paths timed in one interleaved run on the same seeded
//! inputs — a `tern-agent` without onnxruntime serving the compiled tract
//! NNEF, a `tern-agent` with the library serving the onnxruntime artifact
//! (both over their Unix sockets, one thread), and onnxruntime from Python
//! on the same ONNX the second agent runs (one thread). Appends one row to
//! a markdown table; fails if the answers disagree beyond `--tolerance`.

use anyhow::{Context, Result, ensure};
use clap::Parser;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
use tern_bench::{Http1, Procs, cli, stats, time_runs, wait_for};
use tern_proto::{Tensor, TensorData, TensorSpec, decode_tensors, encode_tensors};

/// The onnxruntime the Python side must have: the wheel whose library the
/// agent and `tern compile` load in `scripts/compile-bench`.
const PYTHON_ORT: &str = "1.32.0";

#[derive(Parser)]
#[command(about = "Compile a real model with `tern compile`, serve it on tract and on onnxruntime, time both agents \
                   and onnxruntime from Python")]
struct Args {
    /// The ONNX source.
    #[arg(long)]
    model: PathBuf,
    /// Name for the table.
    #[arg(long)]
    name: String,
    /// An input's shape, repeatable (as `tern compile --input-shape`).
    #[arg(long = "input-shape")]
    shapes: Vec<String>,
    /// An input that is constant in use, repeatable (as `tern compile --const`).
    #[arg(long = "const")]
    consts: Vec<String>,
    /// The libonnxruntime the second agent and `tern compile` load.
    #[arg(long)]
    onnxruntime: PathBuf,
    /// Python with onnxruntime and numpy (the one whose wheel ships that library).
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Timed runs per path.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u16).range(1..))]
    iters: u16,
    /// Untimed runs first, per path and round.
    #[arg(long, default_value_t = 30)]
    warmup: usize,
    /// Rounds; the paths take turns each round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Where `tern` and `tern-agent` are; default: next to this binary.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Append the row here (`--header` prints the table's header).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the table's header and exit.
    #[arg(long)]
    header: bool,
    /// Largest |Δ| accepted between the agents' answers and onnxruntime's
    /// from Python, scaled by 1 + |onnxruntime's|.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
}

const HEADER: &str = "| model | flags | compile s | source bytes | NNEF bytes | max scaled error (compile) | tract agent p50 ms | onnxruntime agent p50 ms | onnxruntime from Python p50 ms | onnxruntime agent / Python (round trip over the socket / in-process call) | tract agent / onnxruntime from Python | inside the onnxruntime agent: run / handler p50 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n";

fn connect(socket: &Path) -> Result<Http1<UnixStream>> {
    let stream = UnixStream::connect(socket)?;
    Ok(Http1 { read: BufReader::new(stream.try_clone()?), write: stream, timings: vec![] })
}

/// numpy's name for an element type.
fn numpy(t: &Tensor) -> &'static str {
    match &t.data {
        TensorData::F32(_) => "<f4",
        TensorData::F64(_) => "<f8",
        TensorData::F16(_) => "<f2",
        TensorData::I8(_) => "i1",
        TensorData::I16(_) => "<i2",
        TensorData::I32(_) => "<i4",
        TensorData::I64(_) => "<i8",
        TensorData::U8(_) => "u1",
        TensorData::U16(_) => "<u2",
        TensorData::U32(_) => "<u4",
        TensorData::U64(_) => "<u8",
        TensorData::Bool(_) => "?",
        // numpy has no bfloat16.
        TensorData::BF16(_) => "bf16",
    }
}

/// Raw little-endian bytes of `t` as numpy reads them with [`numpy`].
fn raw_bytes(t: &Tensor) -> Vec<u8> {
    fn le<T: Copy, const N: usize>(v: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|x| f(*x)).collect()
    }
    match &t.data {
        TensorData::F32(v) => le(v, f32::to_le_bytes),
        TensorData::F64(v) => le(v, f64::to_le_bytes),
        TensorData::F16(v) => le(v, tern_proto::f16::to_le_bytes),
        TensorData::BF16(v) => le(v, tern_proto::bf16::to_le_bytes),
        TensorData::I8(v) => le(v, i8::to_le_bytes),
        TensorData::I16(v) => le(v, i16::to_le_bytes),
        TensorData::I32(v) => le(v, i32::to_le_bytes),
        TensorData::I64(v) => le(v, i64::to_le_bytes),
        TensorData::U8(v) => v.clone(),
        TensorData::U16(v) => le(v, u16::to_le_bytes),
        TensorData::U32(v) => le(v, u32::to_le_bytes),
        TensorData::U64(v) => le(v, u64::to_le_bytes),
        TensorData::Bool(v) => v.iter().map(|b| u8::from(*b)).collect(),
    }
}

/// Writes `tensors` as raw files beside a JSON list the Python side reads.
fn write_tensors(dir: &Path, stem: &str, tensors: &[Tensor], names: &[String]) -> Result<Vec<Value>> {
    tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let file = dir.join(format!("{stem}{i}.raw"));
            std::fs::write(&file, raw_bytes(t))?;
            Ok(json!({ "name": names.get(i), "dtype": numpy(t), "shape": t.shape, "file": file }))
        })
        .collect()
}

/// Largest `|got − want| / (1 + |want|)` over all outputs; infinite when
/// their count or shapes differ.
fn scaled_diff(want: &[Tensor], got: &[Tensor]) -> f64 {
    if want.len() != got.len() {
        return f64::INFINITY;
    }
    want.iter().zip(got).fold(0.0, |m, (w, g)| {
        if w.shape != g.shape {
            return f64::INFINITY;
        }
        w.data.to_f64().iter().zip(g.data.to_f64()).fold(m, |m, (w, g)| m.max((w - g).abs() / (1.0 + w.abs())))
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.header {
        print!("{HEADER}");
        return Ok(());
    }
    let iters = usize::from(args.iters);
    let bin = match &args.bin_dir {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.parent().context("exe dir")?.to_path_buf(),
    };
    let source = std::fs::read(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let tmp = tempfile::tempdir()?;
    let lib = args.onnxruntime.to_str().context("library path")?;
    let (coord, tract_dir, ort_dir) =
        (tmp.path().join("coordinator"), tmp.path().join("tract"), tmp.path().join("ort"));
    let log = |n: &str| std::fs::File::create(tmp.path().join(n));
    let mut procs = Procs(Vec::new());
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
    for (id, dir) in [("tract", &tract_dir), ("ort", &ort_dir)] {
        let token = cli(&bin, &coord, &["fleet", "token", "--group", "bench", "--profile", "generic-linux"])?;
        let out = Command::new(bin.join("tern-agent"))
            .args(["enroll", "--device-id", id, "--coordinator", ep["quic"].as_str().unwrap_or_default()])
            .args(["--token", token.trim(), "--data-dir"])
            .arg(dir)
            .output()?;
        ensure!(out.status.success(), "enroll {id}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut register = vec!["model", "register", "bench", "--file", args.model.to_str().context("path")?];
    for s in &args.shapes {
        register.extend(["--input-shape", s.as_str()]);
    }
    cli(&bin, &coord, &register)?;
    cli(&bin, &coord, &["model", "approve", "bench:1"])?;
    let mut compile = vec!["--json", "compile", "bench:1", "--target", "generic-linux", "--onnxruntime", lib];
    compile.extend(["--prefer", "onnxruntime"]);
    for s in &args.shapes {
        compile.extend(["--input-shape", s.as_str()]);
    }
    for c in &args.consts {
        compile.extend(["--const", c.as_str()]);
    }
    let started = Instant::now();
    let compiled: Value = serde_json::from_str(&cli(&bin, &coord, &compile)?)?;
    let compile_s = started.elapsed().as_secs_f64();
    ensure!(
        compiled["report"]["backend"] == "onnxruntime",
        "onnxruntime cannot run it: {}",
        compiled["onnxruntime_error"]
    );
    let mut sockets = BTreeMap::new();
    for (id, dir, extra) in [("tract", &tract_dir, vec![]), ("ort", &ort_dir, vec!["--onnxruntime", lib])] {
        cli(&bin, &coord, &["fleet", "assign", id, "bench:1"])?;
        procs.0.push(
            Command::new(bin.join("tern-agent"))
                .args(["run", "--listen", "127.0.0.1:0", "--threads", "1"])
                .args(&extra)
                .arg("--data-dir")
                .arg(dir)
                .env("RUST_LOG", "warn")
                .stderr(log(&format!("{id}.log"))?)
                .stdout(Stdio::null())
                .spawn()?,
        );
        let api: Value = wait_for("agent", || serde_json::from_slice(&std::fs::read(dir.join("api.json")).ok()?).ok())?;
        let http = api["http"].as_str().context("http")?.to_owned();
        let client = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
        let served = wait_for("the model to be served", || {
            let v: Value = client.get(format!("http://{http}/v1/models")).call().ok()?.body_mut().read_json().ok()?;
            v["models"].as_array()?.iter().find(|m| m["state"] == "serving").cloned()
        })?;
        sockets.insert(id, (PathBuf::from(api["socket"].as_str().context("socket")?), served));
    }
    let (tract_socket, tract_served) = &sockets["tract"];
    let (ort_socket, ort_served) = &sockets["ort"];
    ensure!(tract_served["format"] == "nnef" && ort_served["format"] == "onnx", "{tract_served} / {ort_served}");

    // The same seeded inputs on every path, in the compiled signature.
    let specs: Vec<TensorSpec> = serde_json::from_value(ort_served["inputs"].clone())?;
    let inputs = tern_runtime::random_inputs(&specs, &mut tern_runtime::SplitMix(0xbe4c));
    let body = encode_tensors(&inputs).map_err(anyhow::Error::msg)?;
    let path = "/v1/models/bench:predict";
    let (mut tract_agent, mut ort_agent) = (connect(tract_socket)?, connect(ort_socket)?);
    let tract_out = decode_tensors(&tract_agent.post(path, &body)?).map_err(anyhow::Error::msg)?;
    let ort_out = decode_tensors(&ort_agent.post(path, &body)?).map_err(anyhow::Error::msg)?;
    ort_agent.timings.clear();

    // onnxruntime from Python on the ONNX the second agent runs: the source
    // at the shapes and constants the stored report names (the flags, the
    // registration's shapes or the profile's batch), built as the registry
    // builds it.
    let report = &compiled["report"];
    let opts = tern_compile::Options {
        shapes: serde_json::from_value(report["shapes"].clone())?,
        consts: serde_json::from_value(report["consts"].clone())?,
        ..tern_compile::Options::default()
    };
    let (_, consts) = tern_compile::prepare(&source, &opts)?;
    let onnx = tmp.path().join("served.onnx");
    std::fs::write(&onnx, tern_runtime::onnx_with_consts(&source, &consts, &opts.shapes)?)?;
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let spec = json!({
        "inputs": write_tensors(tmp.path(), "in", &inputs, &names)?,
        "reference": write_tensors(tmp.path(), "ref", &ort_out, &[])?,
    });
    let spec_file = tmp.path().join("spec.json");
    std::fs::write(&spec_file, serde_json::to_vec(&spec)?)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ort_multi.py");
    let rounds = args.rounds.max(1);
    let per_round = iters.div_ceil(rounds);
    let mut python = Value::Null;
    let (mut tract_ms, mut ort_ms, mut py_ms) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        tract_ms.extend(time_runs(per_round, args.warmup, || tract_agent.post(path, &body).map(drop))?);
        let mark = ort_agent.timings.len();
        ort_ms.extend(time_runs(per_round, args.warmup, || ort_agent.post(path, &body).map(drop))?);
        ort_agent.timings.drain(mark..mark + args.warmup);
        let out = Command::new(&args.python)
            .arg(&script)
            .arg(&onnx)
            .args([per_round.to_string(), args.warmup.to_string()])
            .arg(&spec_file)
            .output()
            .with_context(|| format!("running {}", args.python.display()))?;
        ensure!(out.status.success(), "onnxruntime from Python failed: {}", String::from_utf8_lossy(&out.stderr));
        python = serde_json::from_slice(&out.stdout)?;
        ensure!(python["version"] == PYTHON_ORT, "Python has onnxruntime {}, not {PYTHON_ORT}", python["version"]);
        py_ms.extend(serde_json::from_value::<Vec<f64>>(python["latencies_ms"].clone())?);
    }
    drop(procs);

    let (t, o, p) = (stats(tract_ms), stats(ort_ms), stats(py_ms));
    let inside = |i: usize| stats(ort_agent.timings.iter().map(|t| t[i]).collect()).p50;
    let max_err =
        report["errors"].as_array().into_iter().flatten().filter_map(|e| e["max_scaled"].as_f64()).fold(0.0, f64::max);
    let flags = args
        .shapes
        .iter()
        .map(|s| format!("--input-shape {s}"))
        .chain(args.consts.iter().map(|c| format!("--const {c}")));
    let row = format!(
        "| {} | `{}` | {compile_s:.1} | {} | {} | {max_err:.1e} | {:.3} | {:.3} | {:.3} | **{:.2}×** | {:.2}× | {:.3} / {:.3} |\n",
        args.name,
        flags.collect::<Vec<_>>().join(" "),
        report["source_bytes"],
        compiled["bytes"],
        t.p50,
        o.p50,
        p.p50,
        o.p50 / p.p50,
        t.p50 / p.p50,
        inside(1),
        inside(2),
    );
    let (agents, tract_vs) =
        (python["max_scaled_diff"].as_f64().unwrap_or(f64::INFINITY), scaled_diff(&ort_out, &tract_out));
    eprintln!(
        "{}: onnxruntime agent vs Python {agents:.2e}, tract agent vs onnxruntime agent {tract_vs:.2e} (scaled); \
         onnxruntime {}; p99 ms: tract agent {:.3}, onnxruntime agent {:.3}, Python {:.3}",
        args.name, python["version"], t.p99, o.p99, p.p99
    );
    ensure!(
        agents <= args.tolerance && tract_vs <= args.tolerance,
        "answers disagree beyond {:e}: onnxruntime agent vs Python {agents:e}, tract vs onnxruntime {tract_vs:e}",
        args.tolerance
    );
    print!("{HEADER}{row}");
    if let Some(out) = &args.out {
        use std::io::Write;
        std::fs::OpenOptions::new().create(true).append(true).open(out)?.write_all(row.as_bytes())?;
    }
    Ok(())
}
