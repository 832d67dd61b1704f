//! `tern monitor`: a version's baseline in SageMaker Model Monitor's files
//! (export and import of `statistics.json` / `constraints.json`), and a
//! dataset checked against it into `constraint_violations.json`.

use crate::cli::{Client, out};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::path::{Path, PathBuf};
use tern_drift::sagemaker::{Constraints, Statistics, Violation, Violations};
use tern_drift::{ModelBaseline, Source};
use tern_proto::ModelRef;
use tern_registry::ModelVersion;

#[derive(Subcommand)]
pub enum MonitorCmd {
    /// The fleet's drift from a version's baseline: the devices' windows of
    /// the last --secs merged, per feature its distance, threshold and
    /// status, and a sparkline of the distance over the span.
    Drift {
        /// NAME or NAME:VERSION (default: the newest version with windows).
        target: String,
        /// Only devices of this group.
        #[arg(long)]
        group: Option<String>,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// The span, in seconds back from now.
        #[arg(long, default_value_t = 3600)]
        secs: u64,
        /// Buckets of the sparkline.
        #[arg(long, default_value_t = 24)]
        buckets: usize,
    },
    /// Write a version's baseline as Model Monitor's statistics.json and
    /// constraints.json into DIR (the imported constraints, or those Model
    /// Monitor's baselining would suggest). Image inputs and model outputs
    /// have no counterpart there and are left out (named).
    ExportConstraints {
        /// NAME:VERSION.
        target: ModelRef,
        /// The folder to write both files into (made if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Set a version's constraints from Model Monitor's constraints.json
    /// (read field for field: a field of another schema is an error naming
    /// its line and column; every feature must be one of the baseline's).
    ImportConstraints {
        /// NAME:VERSION.
        target: ModelRef,
        /// The constraints.json.
        file: PathBuf,
    },
    /// Check a CSV dataset (a header naming the baseline's features)
    /// against a version's baseline and constraints, and write the
    /// violations as Model Monitor's constraint_violations.json.
    Check {
        /// NAME:VERSION.
        target: ModelRef,
        /// The dataset.
        #[arg(long)]
        data: PathBuf,
        /// Where to write constraint_violations.json (default: print the
        /// violations only).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Model quality from the ground truth apps post for past answers
    /// (`POST /v1/models/NAME:feedback` on the device): each device's
    /// quality windows (accuracy, macro F1; RMSE, MAE for a regressor),
    /// and the fleet's, all windows merged, per version.
    Quality {
        /// NAME or NAME:VERSION.
        target: String,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
    },
    /// Ask devices serving a version to capture a share of its requests
    /// and answers for upload (for retraining and audit), within a daily
    /// byte budget each; `--off` ends it.
    Capture {
        /// NAME:VERSION.
        target: ModelRef,
        /// The share of requests captured: above 0 (at least one in a
        /// million) up to 1.
        #[arg(long, required_unless_present = "off")]
        share: Option<f64>,
        /// Bytes of inputs and outputs each device captures per UTC day
        /// at most.
        #[arg(long, default_value_t = 1_000_000)]
        daily_bytes: u64,
        /// Capture nothing more.
        #[arg(long, conflicts_with = "share")]
        off: bool,
    },
    /// The samples devices captured of a version, oldest first, as JSON
    /// lines (one capture each: device, inference id, input and output
    /// tensors) to --out or stdout.
    Captures {
        /// NAME:VERSION.
        target: ModelRef,
        /// The file to write (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        /// At most this many.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
}

/// A Model Monitor file, parsed field for field, its errors naming the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{}: not Model Monitor's {what} schema", path.display()))
}

fn baseline(c: &Client, v: &ModelVersion) -> Result<ModelBaseline> {
    let Some(full) = v.baseline_full else {
        bail!("{}:{} has no baseline: register it with --baseline", v.name, v.version)
    };
    let bytes = c.get_bytes(&format!("/v1/artifacts/{}", full.sha256.to_hex()))?;
    Ok(ModelBaseline::decode(&bytes)?)
}

fn constraints(c: &Client, v: &ModelVersion, model: &ModelBaseline) -> Result<Constraints> {
    match v.constraints {
        Some(sha) => Ok(serde_json::from_slice(&c.get_bytes(&format!("/v1/artifacts/{}", sha.to_hex()))?)?),
        None => Ok(Constraints::suggest(model)),
    }
}

/// Alerts raised on devices.
#[derive(Subcommand)]
pub enum AlertsCmd {
    /// Alerts open or not yet acknowledged (all of them with --all).
    List {
        /// Every alert kept.
        #[arg(long)]
        all: bool,
    },
    /// Acknowledge an alert.
    Ack {
        /// Its id (from `tern alerts list`).
        id: u64,
    },
}

/// A sparkline of `values` against `threshold`: eight heights up to twice
/// the threshold (or the largest value, if higher), a space where a bucket
/// had no data.
pub fn sparkline(values: &[Option<f64>], threshold: f64) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let top = values.iter().flatten().copied().fold(threshold * 2.0, f64::max).max(f64::MIN_POSITIVE);
    values
        .iter()
        .map(|v| match v {
            None => ' ',
            Some(x) => BARS[((x.max(0.0) / top * 7.0).round() as usize).min(7)],
        })
        .collect()
}

pub fn alerts(c: &Client, cmd: AlertsCmd, json: bool) -> Result<()> {
    match cmd {
        AlertsCmd::List { all } => {
            let alerts: Vec<tern_registry::Alert> = c.get(&format!("/v1/alerts?all={all}"))?;
            if json {
                return crate::cli::print_json(&alerts);
            }
            let mut t = crate::cli::table(&["id", "device", "model", "rule", "feature", "value", "threshold", "state"]);
            for a in &alerts {
                let state = match (a.cleared_at_ms, a.acked_at) {
                    (None, None) => "open",
                    (None, Some(_)) => "open, acked",
                    (Some(_), None) => "cleared",
                    (Some(_), Some(_)) => "cleared, acked",
                };
                t.add_row(vec![
                    a.id.to_string(),
                    a.device.to_string(),
                    format!("{}:{}", a.model, a.version),
                    a.rule.clone(),
                    a.feature.clone(),
                    format!("{:.3}", a.value),
                    format!("{}", a.threshold),
                    state.into(),
                ]);
            }
            out(t);
        }
        AlertsCmd::Ack { id } => {
            let a: tern_registry::Alert = c.send("POST", &format!("/v1/alerts/{id}/ack"), &serde_json::json!({}))?;
            if json {
                return crate::cli::print_json(&a);
            }
            out(format!("alert {id} acknowledged ({} on {}: {} {})", a.rule, a.device, a.model, a.feature));
        }
    }
    Ok(())
}

pub fn run(c: &Client, cmd: MonitorCmd, json: bool) -> Result<()> {
    match cmd {
        MonitorCmd::Drift { target, group, device, secs, buckets } => {
            let (name, version) = match target.split_once(':') {
                Some((n, v)) => (n.to_owned(), Some(v.parse::<u32>().with_context(|| format!("version {v:?}"))?)),
                None => (target.clone(), None),
            };
            ModelRef::check_name(&name)?;
            let mut q = format!("secs={secs}&buckets={buckets}");
            if let Some(v) = version {
                q += &format!("&version={v}");
            }
            for (k, v) in [("group", &group), ("device", &device)] {
                if let Some(v) = v {
                    anyhow::ensure!(
                        v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                        "--{k} {v:?}: letters, digits, - and _ only"
                    );
                    q += &format!("&{k}={v}");
                }
            }
            let view: serde_json::Value = c.get(&format!("/v1/monitor/drift/{name}?{q}"))?;
            if json {
                return crate::cli::print_json(&view);
            }
            out(format!(
                "{}:{} — {} devices, {} windows, {} rows in the last {} s ({} s a bar)",
                view["model"].as_str().unwrap_or(""),
                view["version"],
                view["devices"],
                view["windows"],
                view["rows"],
                view["secs"],
                view["bucket_secs"]
            ));
            let mut t = crate::cli::table(&["feature", "kind", "n", "distance", "threshold", "status", "over time"]);
            for f in view["features"].as_array().into_iter().flatten() {
                let threshold = f["threshold"].as_f64().unwrap_or(0.1);
                let series: Vec<Option<f64>> =
                    f["series"].as_array().into_iter().flatten().map(serde_json::Value::as_f64).collect();
                t.add_row(vec![
                    f["feature"].as_str().unwrap_or("").to_owned(),
                    f["kind"].as_str().unwrap_or("").to_owned(),
                    f["n"].to_string(),
                    f["distance"].as_f64().map_or("-".into(), |d| format!("{d:.3}")),
                    format!("{threshold}"),
                    f["status"].as_str().unwrap_or("").to_owned(),
                    sparkline(&series, threshold),
                ]);
            }
            out(t);
        }
        MonitorCmd::Quality { target, device } => {
            let (name, version) = match target.split_once(':') {
                Some((n, v)) => (n.to_owned(), Some(v.parse::<u32>().with_context(|| format!("version {v:?}"))?)),
                None => (target.clone(), None),
            };
            ModelRef::check_name(&name)?;
            let mut q = Vec::new();
            if let Some(v) = version {
                q.push(format!("version={v}"));
            }
            if let Some(d) = &device {
                tern_proto::DeviceId::new(d).with_context(|| format!("--device {d:?}"))?;
                q.push(format!("device={d}"));
            }
            let view: serde_json::Value = c.get(&format!("/v1/monitor/quality/{name}?{}", q.join("&")))?;
            if json {
                return crate::cli::print_json(&view);
            }
            let metric = |m: &serde_json::Value, k: &str| m[k].as_f64().map_or("-".into(), |x| format!("{x:.3}"));
            let mut t = crate::cli::table(&[
                "version", "truth", "windows", "left out", "rows", "accuracy", "f1", "rmse", "mae",
            ]);
            for f in view["fleet"].as_array().into_iter().flatten() {
                let m = &f["metrics"];
                t.add_row(vec![
                    f["version"].to_string(),
                    f["kind"].as_str().unwrap_or("").to_owned(),
                    f["windows"].to_string(),
                    f["skipped"].to_string(),
                    m["rows"].to_string(),
                    metric(m, "accuracy"),
                    metric(m, "f1"),
                    metric(m, "rmse"),
                    metric(m, "mae"),
                ]);
            }
            out(format!("{name}: the fleet, its windows merged per version and kind of truth (labels or values)"));
            out(t);
            let mut t = crate::cli::table(&["device", "version", "closed", "rows", "accuracy", "f1", "rmse"]);
            for w in view["windows"].as_array().into_iter().flatten() {
                let m = &w["metrics"];
                t.add_row(vec![
                    w["device"].as_str().unwrap_or("").to_owned(),
                    w["version"].to_string(),
                    crate::cli::ago(w["at_ms"].as_u64().map(|ms| ms / 1000)),
                    m["rows"].to_string(),
                    metric(m, "accuracy"),
                    metric(m, "f1"),
                    metric(m, "rmse"),
                ]);
            }
            out(t);
        }
        MonitorCmd::Capture { target, share, daily_bytes, off } => {
            let path = format!("/v1/models/{}/versions/{}/capture", target.name, target.version);
            let v: ModelVersion = if off {
                c.send("DELETE", &path, &())?
            } else {
                let share = share.expect("required unless --off");
                anyhow::ensure!(
                    share <= 1.0 && (share * 1e6).round() >= 1.0,
                    "--share {share}: one in a million (0.000001) at least, at most 1"
                );
                let policy = tern_proto::CapturePolicy { per_million: (share * 1e6).round() as u32, daily_bytes };
                c.send("PUT", &path, &policy)?
            };
            if json {
                return crate::cli::print_json(&v);
            }
            match v.capture {
                Some(p) => out(format!(
                    "{target}: devices capture {:.4} % of requests, at most {} bytes a day each",
                    f64::from(p.per_million) / 1e4,
                    p.daily_bytes
                )),
                None => out(format!("{target}: no capture")),
            }
        }
        MonitorCmd::Captures { target, out: path, limit } => {
            let mut w: Box<dyn std::io::Write> = match &path {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let (mut after, mut written) = (None::<u64>, 0usize);
            while written < limit {
                let page = (limit - written).min(1000);
                let mut q = format!("limit={page}");
                if let Some(a) = after {
                    q += &format!("&after={a}");
                }
                let v: serde_json::Value =
                    c.get(&format!("/v1/models/{}/versions/{}/captures?{q}", target.name, target.version))?;
                let list = v["captures"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    break;
                }
                for item in &list {
                    serde_json::to_writer(&mut w, item)?;
                    w.write_all(b"\n")?;
                }
                written += list.len();
                after = v["next"].as_u64();
            }
            w.flush()?;
            if let Some(p) = &path {
                eprintln!("wrote {written} captures to {}", p.display());
            }
        }
        MonitorCmd::ExportConstraints { target, out: dir } => {
            let v: ModelVersion = c.get(&format!("/v1/models/{}/versions/{}", target.name, target.version))?;
            let model = baseline(c, &v)?;
            let (stats, left_out) = Statistics::of(&model);
            let cons = constraints(c, &v, &model)?;
            std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
            for (name, body) in [
                ("statistics.json", serde_json::to_vec_pretty(&stats)?),
                ("constraints.json", serde_json::to_vec_pretty(&cons)?),
            ] {
                let path = dir.join(name);
                std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
            }
            if json {
                return crate::cli::print_json(&serde_json::json!({
                    "statistics": dir.join("statistics.json"),
                    "constraints": dir.join("constraints.json"),
                    "features": stats.features.len(),
                    "left_out": left_out,
                    "constraints_imported": v.constraints.is_some(),
                }));
            }
            out(format!(
                "wrote {} and {} ({} features; constraints {})",
                dir.join("statistics.json").display(),
                dir.join("constraints.json").display(),
                stats.features.len(),
                if v.constraints.is_some() { "as imported" } else { "suggested from the baseline" }
            ));
            if !left_out.is_empty() {
                out(format!("left out (no Model Monitor counterpart): {}", left_out.join(", ")));
            }
        }
        MonitorCmd::ImportConstraints { target, file } => {
            let cons: Constraints = read_json(&file, "constraints.json")?;
            let v: ModelVersion =
                c.send("PUT", &format!("/v1/models/{}/versions/{}/constraints", target.name, target.version), &cons)?;
            if json {
                return crate::cli::print_json(&v);
            }
            out(format!("{target}: {} feature constraints imported", cons.features.len()));
        }
        MonitorCmd::Check { target, data, out: path } => {
            let v: ModelVersion = c.get(&format!("/v1/models/{}/versions/{}", target.name, target.version))?;
            let model = baseline(c, &v)?;
            let cons = constraints(c, &v, &model)?;
            let violations = check_csv(&model, &cons, &data)?;
            if let Some(p) = &path {
                std::fs::write(p, serde_json::to_vec_pretty(&violations)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            if json {
                return crate::cli::print_json(&violations);
            }
            if violations.violations.is_empty() {
                out(format!("{target}: no violations in {}", data.display()));
            } else {
                let mut t = crate::cli::table(&["feature", "check", "description"]);
                for x in &violations.violations {
                    t.add_row(vec![x.feature_name.clone(), x.constraint_check_type.clone(), x.description.clone()]);
                }
                out(t);
            }
        }
    }
    Ok(())
}

/// A CSV's violations: columns missing from it or extra in it, values of
/// another type than a numeric feature's, then the constraints' checks on
/// the window its rows make.
pub fn check_csv(model: &ModelBaseline, cons: &Constraints, data: &Path) -> Result<Violations> {
    let shown = data.display().to_string();
    let bytes = std::fs::read(data).with_context(|| format!("reading {shown}"))?;
    let (mut reader, header) = crate::baseline::csv_reader(&bytes, false, &shown)?;
    let layout = &model.baseline.layout;
    let mut extra = Vec::new();
    let mut columns = Vec::new();
    for (j, h) in header.iter().enumerate() {
        match layout.index(h) {
            Some(i) if matches!(model.sources[i], Source::InputColumn { .. }) => columns.push((j, i)),
            _ => extra.push(h.clone()),
        }
    }
    let mut v = Vec::new();
    for (f, s) in layout.features().iter().zip(&model.sources) {
        if matches!(s, Source::InputColumn { .. }) && !header.contains(&f.name) {
            v.push(Violation::new(
                &f.name,
                "missing_column_check",
                format!("column {:?} is not in the dataset", f.name),
            ));
        }
    }
    for h in &extra {
        v.push(Violation::new(h, "extra_column_check", format!("column {h:?} is not in the baseline")));
    }
    let global = cons.monitoring_config.clone().unwrap_or_default();
    let mut window = model.baseline.window(Some(tern_drift::BASELINE_K), 1);
    let mut mistyped = vec![0u64; layout.features().len()];
    let mut present = vec![0u64; layout.features().len()];
    for (r, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{shown}: reading row {}", r + 1))?;
        for &(j, i) in &columns {
            let field = record.get(j).unwrap_or("").trim();
            let x = if crate::baseline::is_missing(field) {
                f64::NAN
            } else {
                present[i] += 1;
                match field.parse::<f64>() {
                    Ok(x) => x,
                    Err(_) => {
                        mistyped[i] += 1;
                        continue;
                    }
                }
            };
            window.observe(layout, i, x)?;
        }
    }
    for (i, f) in layout.features().iter().enumerate() {
        if present[i] == 0 {
            continue;
        }
        let threshold = cons
            .features
            .iter()
            .find(|c| c.name == f.name)
            .map(|c| c.monitoring_config_overrides.clone().unwrap_or_default().effective(Some(&global)))
            .transpose()?
            .map_or(1.0, |e| e.datatype_check_threshold);
        let typed = 1.0 - mistyped[i] as f64 / present[i] as f64;
        if typed < threshold {
            v.push(Violation::new(
                &f.name,
                "data_type_check",
                format!("{typed:.6} of its values are numbers, below the threshold {threshold}"),
            ));
        }
    }
    v.extend(cons.violations(model, &window)?.violations);
    Ok(Violations { violations: v })
}
