//! `tern compile`: a source model compiled on this machine for a device
//! profile with `tern-compile` (shapes pinned, declared constants folded,
//! NNEF written), checked against the source, measured (latency here, and
//! peak memory in a child process that loads and runs it), judged against
//! the profile's budget, and stored with the version in the registry; or,
//! with `--file`, an ONNX file compiled into `--out`.

use crate::cli::{Client, out};
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tern_proto::{ModelRef, Sha256Digest};
use tern_registry::{CompileReport, Fit, Latency, ModelVersion, OutputError};

/// Compile a model for a device profile.
#[derive(clap::Args)]
pub struct CompileArgs {
    /// A registered version, NAME:VERSION: compiled for --target and stored
    /// with it in the registry.
    model: Option<String>,
    /// The device profile to compile for (firmware-targets/profiles): its
    /// batch pin, speed factor and budget.
    #[arg(long)]
    target: Option<String>,
    /// Instead of a registered version, an ONNX file on this machine.
    #[arg(long, conflicts_with = "model")]
    file: Option<PathBuf>,
    /// Also write the compiled tract NNEF archive here (refused if it
    /// exists); needed with --file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// An input's shape, repeatable: --input-shape image=1,3,320,320.
    /// Added to the shapes given at registration (a flag replaces the one
    /// of its input); an open first axis none names gets the profile's batch.
    #[arg(long = "input-shape", value_parser = parse_shape)]
    shapes: Vec<(String, Vec<usize>)>,
    /// An input that is constant in use, repeatable: --const mode=true,
    /// --const rate=16000 (comma-separated for several elements). It
    /// leaves the signature. Added to those declared at registration (a
    /// flag replaces the one of its input).
    #[arg(long = "const", value_parser = parse_const)]
    consts: Vec<(String, String)>,
    /// Largest accepted |compiled − source| / (1 + |source|) per element.
    #[arg(long, default_value_t = tern_compile::DEFAULT_TOLERANCE)]
    tolerance: f64,
    /// Seeded random input sets to compare the artifact with the source on.
    #[arg(long, default_value_t = tern_compile::DEFAULT_CASES as u16, value_parser = clap::value_parser!(u16).range(1..=1000))]
    cases: u16,
    /// Seed of those inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A libonnxruntime on this machine (e.g. the one the `onnxruntime`
    /// wheel ships): the source with its constants folded is also run on
    /// onnxruntime, one thread, checked against the compiled artifact and
    /// timed.
    #[arg(long, env = "TERN_ONNXRUNTIME")]
    onnxruntime: Option<PathBuf>,
    /// Which backend agents that have onnxruntime should run: the faster
    /// one here (`fastest`), or `onnxruntime` or `tract` whatever the times.
    #[arg(long, value_enum, default_value_t = Prefer::Fastest)]
    prefer: Prefer,
}

/// See [`CompileArgs::prefer`].
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Prefer {
    Fastest,
    Onnxruntime,
    Tract,
}

pub(crate) fn parse_shape(s: &str) -> Result<(String, Vec<usize>), String> {
    let (name, dims) =
        s.split_once('=').filter(|(n, _)| !n.is_empty()).ok_or(format!("expected IN=D,D,…, got {s:?}"))?;
    let dims = dims
        .split(',')
        .map(|d| d.trim().parse::<usize>().map_err(|_| format!("{d:?} in {s:?} is not a dimension")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_owned(), dims))
}

pub(crate) fn parse_const(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(n, _)| !n.is_empty())
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .ok_or(format!("expected IN=VALUE, got {s:?}"))
}

/// The steps a bar is shown over.
const STEPS: u64 = 5;

/// Runs `tern compile`.
pub fn run(args: CompileArgs, client: impl FnOnce() -> Result<Client>, json_out: bool) -> Result<()> {
    let profile = args.target.as_deref().map(tern_compile::profiles::get).transpose()?;
    if let Some(out) = &args.out {
        anyhow::ensure!(!out.exists(), "{} exists: give another --out", out.display());
    }
    let pb = ProgressBar::new(STEPS);
    pb.set_style(ProgressStyle::with_template("{bar:20} {pos}/{len} {msg}").expect("template"));
    let (source, version, client) = match (&args.model, &args.file) {
        (Some(model), _) => {
            let Some(target) = &args.target else { bail!("give the device profile to compile {model} for: --target") };
            let r: ModelRef = model.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let v = r.version;
            let client = client()?;
            pb.set_message(format!("fetching {model}"));
            let record: ModelVersion = client.get(&format!("/v1/models/{}/versions/{v}", r.name))?;
            let source = client.get_bytes(&format!("/v1/artifacts/{}", record.sha256.to_hex()))?;
            tern_compile::profiles::get(target)?;
            (source, Some(record), Some(client))
        }
        (None, Some(file)) => {
            anyhow::ensure!(args.out.is_some(), "give --out FILE for the compiled artifact of {}", file.display());
            (std::fs::read(file).with_context(|| format!("reading {}", file.display()))?, None, None)
        }
        (None, None) => {
            bail!("give a registered version (NAME:VERSION --target PROFILE) or --file MODEL.onnx --out FILE")
        }
    };
    pb.inc(1);

    // Shapes and consts: those given at registration, each one the flags
    // name replaced; then the profile's batch for an open first axis no
    // shape names.
    let mut shapes: BTreeMap<String, Vec<usize>> =
        version.as_ref().map(|v| v.compile_shapes.clone()).unwrap_or_default();
    shapes.extend(args.shapes);
    if let Some(batch) = profile.as_ref().and_then(|p| p.compile.batch) {
        let declared = tern_runtime::onnx_inputs(&source).map_err(|e| anyhow::anyhow!("{e}"))?;
        for spec in &declared {
            if !shapes.contains_key(&spec.name)
                && spec.shape.first() == Some(&None)
                && spec.shape[1..].iter().all(Option::is_some)
            {
                let mut dims = vec![batch];
                dims.extend(spec.shape[1..].iter().map(|d| d.unwrap_or(1) as usize));
                shapes.insert(spec.name.clone(), dims);
            }
        }
    }
    let mut consts: BTreeMap<String, String> = version.as_ref().map(|v| v.compile_consts.clone()).unwrap_or_default();
    consts.extend(args.consts);
    let opts = tern_compile::Options {
        shapes,
        consts,
        tolerance: args.tolerance,
        cases: usize::from(args.cases),
        seed: args.seed,
    };
    pb.set_message("compiling and checking against the source");
    let c = tern_compile::compile(&source, &opts).context("compiling")?;
    pb.inc(1);

    pb.set_message("measuring latency and memory in a child process");
    let work = tempfile::tempdir()?;
    let artifact = work.path().join("model.nnef.tar");
    std::fs::write(&artifact, &c.nnef)?;
    // One input set for every backend: the compiled signature's, and for
    // the source the same with the declared constants in their places.
    let inputs = tern_runtime::random_inputs(&c.inputs, &mut tern_runtime::SplitMix(opts.seed ^ 0x5eed));
    let inputs_file = work.path().join("inputs.tensors");
    std::fs::write(&inputs_file, tern_proto::encode_tensors(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?)?;
    let probe = probe_child(&artifact, &inputs_file, None)?;
    let mut latency = BTreeMap::from([("tract".to_string(), probe.latency())]);
    // With onnxruntime here: the source with the declared constants folded
    // in (the compiled signature) is timed on it, checked against the
    // compiled artifact's answers, and offered to agents that have it when
    // it is the faster.
    let mut alternative = false;
    let mut onnxruntime_failed = None;
    if let Some(lib) = &args.onnxruntime {
        let onnx =
            tern_runtime::onnx_with_consts(&source, &c.consts, &opts.shapes).map_err(|e| anyhow::anyhow!("{e}"))?;
        let onnx_file = work.path().join("model.onnx");
        std::fs::write(&onnx_file, &onnx)?;
        let compiled = tern_runtime::TractModel::nnef(&c.nnef).map_err(|e| anyhow::anyhow!("{e}"))?;
        let want = tern_runtime::run_guarded(&compiled, inputs.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let want_file = work.path().join("want.tensors");
        std::fs::write(&want_file, tern_proto::encode_tensors(&want).map_err(|e| anyhow::anyhow!("{e}"))?)?;
        let tolerance_ppm = (opts.tolerance * 1e6).round().clamp(0.0, u32::MAX as f64) as u32;
        // A model onnxruntime cannot run (or answers otherwise) is stored
        // for tract alone, and the report says why.
        match probe_child(&onnx_file, &inputs_file, Some((lib, &want_file, tolerance_ppm))) {
            Ok(ort) => {
                latency.insert("onnxruntime".into(), ort.latency());
                alternative = match args.prefer {
                    Prefer::Fastest => ort.p50_us < probe.p50_us,
                    Prefer::Onnxruntime => true,
                    Prefer::Tract => false,
                };
            }
            Err(e) => onnxruntime_failed = Some(format!("{e:#}")),
        }
    } else {
        anyhow::ensure!(args.prefer != Prefer::Onnxruntime, "--prefer onnxruntime needs --onnxruntime LIB to check it");
    }
    pb.inc(1);
    let fit = profile.as_ref().map(|p| {
        let s = &p.compile;
        let peak_model_bytes = probe.peak_rss_bytes.saturating_sub(probe.rss_before_bytes);
        let estimated_p99_us = s.estimate_p99_us(probe.p99_us);
        Fit {
            peak_model_bytes,
            process_peak_rss_bytes: probe.peak_rss_bytes,
            host_p99_us: probe.p99_us,
            speed_factor: s.speed_factor,
            estimated_p99_us,
            max_model_memory_mb: s.max_model_memory_mb,
            max_p99_ms: s.max_p99_ms,
            refused: s.refusal(peak_model_bytes, estimated_p99_us),
        }
    });
    let report = CompileReport {
        shapes: opts.shapes.clone(),
        consts: opts.consts.clone(),
        rewrites: c.rewrites.clone(),
        source_bytes: c.source_bytes as u64,
        errors: c
            .errors
            .iter()
            .map(|e| OutputError { output: e.name.clone(), max_abs: e.max_abs, max_scaled: e.max_scaled })
            .collect(),
        cases: u32::from(args.cases),
        tolerance: opts.tolerance,
        backend: if alternative { "onnxruntime".into() } else { "tract".into() },
        latency,
        fit,
    };
    pb.inc(1);

    let sha256 = Sha256Digest::of(&c.nnef);
    let stored = match (&client, &version, &args.target) {
        (Some(client), Some(v), Some(target)) => {
            pb.set_message(format!("storing the artifact for {target}"));
            client.upload(c.nnef.clone())?;
            // The registry builds the alternative from the source itself.
            let alternative = alternative.then(|| json!({ "backend": "onnxruntime" }));
            let path = format!("/v1/models/{}/versions/{}/targets/{target}", v.name, v.version);
            let body = json!({ "sha256": sha256, "report": report, "alternative": alternative });
            let v: ModelVersion = client.send("PUT", &path, &body)?;
            Some(v)
        }
        _ => None,
    };
    // Written once the registry has taken it, so a refusal leaves nothing.
    if let Some(out) = &args.out {
        tern_durable::write_atomic(out, &c.nnef, false).with_context(|| format!("writing {}", out.display()))?;
    }
    pb.finish_and_clear();
    // The registry judged the fit with its own copy of the profile.
    let report = match (&stored, &args.target) {
        (Some(v), Some(t)) => v.targets.get(t).map(|a| a.report.clone()).unwrap_or(report),
        _ => report,
    };
    let inputs: Vec<String> = c.inputs.iter().map(|s| s.to_string()).collect();
    if json_out {
        let doc = json!({
            "model": args.model,
            "target": args.target,
            "path": args.out,
            "sha256": sha256,
            "bytes": c.nnef.len(),
            "inputs": inputs,
            "report": report,
            "probe": probe,
            "onnxruntime_error": onnxruntime_failed,
        });
        out(serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    print_report(&report, c.nnef.len() as u64, &inputs, &probe);
    if let Some(e) = &onnxruntime_failed {
        out(format!("onnxruntime: {e}; agents run it on tract"));
    }
    match (&stored, &args.target, &args.out) {
        (Some(v), Some(t), _) => {
            out(format!("stored as {}:{}'s artifact for {t} (sha256 {sha256})", v.name, v.version))
        }
        (_, _, Some(o)) => out(format!("wrote {}", o.display())),
        _ => {}
    }
    if let Some(why) = report.fit.as_ref().and_then(|f| f.refused.as_ref()) {
        let target = args.target.unwrap_or_default();
        match stored {
            Some(_) => out(format!("does not fit {target}: {why}; devices of that profile will not be assigned it")),
            None => out(format!("does not fit {target}: {why}")),
        }
    }
    Ok(())
}

fn print_report(r: &CompileReport, bytes: u64, inputs: &[String], probe: &Probe) {
    out(format!("compiled: {bytes} bytes (the source is {} bytes); inputs: {}", r.source_bytes, inputs.join(", ")));
    for line in &r.rewrites {
        out(format!("rewritten: {line}"));
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING).set_header(["output", "max abs error", "max scaled error"]);
    for e in &r.errors {
        t.add_row([e.output.clone(), format!("{:.3e}", e.max_abs), format!("{:.3e}", e.max_scaled)]);
    }
    out(format!("against the source on {} seeded input sets (tolerance {:e}):\n{t}", r.cases, r.tolerance));
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING).set_header([
        "backend (this machine, one thread)",
        "p50",
        "p99",
        "runs",
    ]);
    for (backend, l) in &r.latency {
        let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
        t.add_row([backend.clone(), ms(l.p50_us), ms(l.p99_us), l.runs.to_string()]);
    }
    out(t);
    out(format!(
        "the compiled model took {:.1} MiB in a child process on tract (its peak RSS {:.1} MiB); agents run it on {}",
        probe.peak_rss_bytes.saturating_sub(probe.rss_before_bytes) as f64 / (1 << 20) as f64,
        probe.peak_rss_bytes as f64 / (1 << 20) as f64,
        r.backend,
    ));
    if let Some(f) = &r.fit {
        out(format!(
            "estimated p99 on the target: {:.2} ms ({}x this machine's; an estimate), budget {}; model memory budget {}: {}",
            f.estimated_p99_us as f64 / 1000.0,
            f.speed_factor,
            f.max_p99_ms.map_or("none".into(), |m| format!("{m} ms")),
            f.max_model_memory_mb.map_or("none".into(), |m| format!("{m} MiB")),
            if f.refused.is_some() { "does not fit" } else { "fits" },
        ));
    }
}

/// What the child process measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct Probe {
    /// Its resident set before it read the model.
    pub rss_before_bytes: u64,
    /// Its peak resident set after loading and running it.
    pub peak_rss_bytes: u64,
    /// Median run time.
    pub p50_us: u64,
    /// 99th percentile run time.
    pub p99_us: u64,
    /// Runs timed.
    pub runs: u32,
}

impl Probe {
    fn latency(&self) -> Latency {
        Latency { p50_us: self.p50_us, p99_us: self.p99_us, runs: self.runs }
    }
}

/// Runs `tern probe-model FILE --inputs INPUTS [--onnxruntime LIB --expect
/// OUTPUTS --tolerance-ppm T]` and reads its answer.
fn probe_child(file: &Path, inputs: &Path, onnxruntime: Option<(&Path, &Path, u32)>) -> Result<Probe> {
    let exe = std::env::current_exe().context("finding this program to run the probe")?;
    let mut cmd = Command::new(exe);
    cmd.arg("probe-model").arg(file).arg("--inputs").arg(inputs);
    if let Some((lib, expect, ppm)) = onnxruntime {
        cmd.arg("--onnxruntime").arg(lib).arg("--expect").arg(expect).arg("--tolerance-ppm").arg(ppm.to_string());
    }
    let out = cmd.output().context("starting the probe")?;
    if !out.status.success() {
        bail!("the probe failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).context("reading the probe's answer")
}

/// Measures a model in this process (the child `tern compile` starts):
/// loads it with the agents' loader (or on onnxruntime, one thread, from
/// `onnxruntime`), runs it on `inputs` for about a second (at least 10
/// runs, at most 1,000), prints a [`Probe`] as JSON. With `expect`, the
/// first answer must match those outputs within `tolerance_ppm`.
pub fn probe_model(
    file: &Path,
    inputs: &Path,
    onnxruntime: Option<&Path>,
    expect: Option<&Path>,
    tolerance_ppm: u32,
) -> Result<()> {
    let rss_before_bytes = status_kib("VmRSS")? * 1024;
    let inputs = std::fs::read(inputs).with_context(|| format!("reading {}", inputs.display()))?;
    let inputs = tern_proto::decode_tensors(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let model: Box<dyn tern_runtime::Backend> = match onnxruntime {
        Some(lib) => {
            tern_runtime::ort_backend::init(lib, &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
            // One thread, as the agent runs it.
            Box::new(tern_runtime::ort_backend::OrtModel::onnx(&bytes, 1).map_err(|e| anyhow::anyhow!("{e}"))?)
        }
        None => tern_runtime::load(tern_runtime::sniff_format(&bytes), bytes).map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    tern_runtime::check_inputs(model.inputs(), &inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(expect) = expect {
        let want = std::fs::read(expect).with_context(|| format!("reading {}", expect.display()))?;
        let want = tern_proto::decode_tensors(&want).map_err(|e| anyhow::anyhow!("{e}"))?;
        let got = tern_runtime::run_guarded(model.as_ref(), inputs.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        tern_proto::compare_outputs(&got, &want, tolerance_ppm)
            .map_err(|e| anyhow::anyhow!("its answers differ from the compiled artifact's: {e}"))?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 10 || (times.len() < 1000 && start.elapsed() < Duration::from_secs(1)) {
        let t = Instant::now();
        tern_runtime::run_guarded(model.as_ref(), inputs.clone())
            .map_err(|e| anyhow::anyhow!("run {}: {e}", times.len()))?;
        times.push(t.elapsed().as_micros() as u64);
    }
    let peak_rss_bytes = status_kib("VmHWM")? * 1024;
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let probe = Probe { rss_before_bytes, peak_rss_bytes, p50_us: at(0.5), p99_us: at(0.99), runs: times.len() as u32 };
    out(serde_json::to_string(&probe)?);
    Ok(())
}

fn status_kib(field: &str) -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))
}
