//! The admin CLI: a thin client of the admin API that prints tables for
//! people and JSON (`--json`) for scripts.

use crate::fsutil::unix_now;
use crate::serve::Endpoints;
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tern_proto::{ModelRef, Sha256Digest};
use tern_registry::{Device, ModelVersion};

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Upload a model as the next version of NAME: ONNX, a tract NNEF archive
    /// or a built-in model (.tbm); the coordinator loads it first and refuses
    /// what agents could not run.
    Register {
        /// Model name.
        name: String,
        /// The .onnx, .nnef.tgz or .tbm file.
        #[arg(long)]
        file: PathBuf,
        /// A model card (markdown).
        #[arg(long)]
        card: Option<PathBuf>,
        /// Metadata, repeatable: --meta owner=vision --meta dataset=iris.
        #[arg(long = "meta", value_parser = parse_kv)]
        meta: Vec<(String, String)>,
        /// Reference inputs for the golden vectors agents self-test the
        /// version on, repeatable: a file of one input set in the binary
        /// tensor encoding (application/x-tern-tensors). Without: four
        /// seeded random input sets that fit the signature.
        #[arg(long = "reference")]
        references: Vec<PathBuf>,
        /// How far an agent's outputs may be from the golden ones, in
        /// millionths of 1 + |golden| (integer outputs match exactly).
        #[arg(long, default_value_t = 100)]
        tolerance_ppm: u32,
        /// An input's shape, repeatable: --input-shape x=1,3,320,320. What
        /// `tern compile` pins by default; and for a source that raw tract
        /// refuses, the shapes registration checks that compiling helps at
        /// (without: open dimensions pinned to 1).
        #[arg(long = "input-shape", value_parser = crate::compile::parse_shape)]
        shapes: Vec<(String, Vec<usize>)>,
        /// An input constant in use, repeatable: --const sr=16000. What
        /// `tern compile` folds in by default; and for a source raw tract
        /// refuses, declared constant in the check that compiling helps
        /// (an `If` on it resolved).
        #[arg(long = "const", value_parser = crate::compile::parse_const)]
        consts: Vec<(String, String)>,
        /// The training data's baseline, computed here and registered with
        /// the version (devices window their requests against it): a CSV
        /// with a header, one column per feature of the model's one input,
        /// in order (an empty cell or NaN is missing), or a .npy of input
        /// samples ([samples, …]: rank-2 inputs by column, NCHW images by
        /// channel). Complete rows are run through the model for its
        /// output distribution (where raw tract runs it). Or SageMaker Model
        /// Monitor's statistics.json (its features the columns of the
        /// model's one input, in order; no outputs).
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// A baseline CSV column that holds category codes, repeatable.
        #[arg(long = "categorical", requires = "baseline")]
        categorical: Vec<String>,
        /// Quantile bins per numeric baseline feature.
        #[arg(long, default_value_t = tern_drift::DEFAULT_BINS, requires = "baseline", value_parser = parse_bins)]
        bins: usize,
    },
    /// All models and versions.
    List,
    /// One model (all versions) or one version: NAME or NAME:VERSION.
    Show {
        /// NAME or NAME:VERSION.
        target: String,
    },
    /// Allow a version to be deployed.
    Approve {
        /// NAME:VERSION.
        target: ModelRef,
    },
    /// Forbid a version from being deployed. Refused while devices are
    /// assigned it, unless --force, which unassigns it from them (they stop
    /// serving that model).
    Reject {
        /// NAME:VERSION.
        target: ModelRef,
        /// Unassign it from every device it is assigned to.
        #[arg(long)]
        force: bool,
    },
    /// Build a built-in model (.tbm, run by burn on agents) from a family
    /// and weights trained elsewhere, given as JSON:
    /// {"family": {"Mlp": {"inputs": 4, "hidden": [16], "outputs": 3, "head": "Softmax"}},
    ///  "layers": [{"weight": [[..in..]..out], "bias": [..out]}, ...]}
    /// (`weight` is [in][out], scikit-learn's `coefs_` layout). Works offline.
    Pack {
        /// The weights JSON.
        weights: PathBuf,
        /// Where to write the .tbm artifact.
        #[arg(long, short)]
        out: PathBuf,
    },
}

/// `tern model pack`.
pub fn pack(weights: &Path, out_path: &Path, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(weights).with_context(|| format!("reading {}", weights.display()))?;
    let w: tern_models::Weights =
        serde_json::from_str(&text).with_context(|| format!("{} is not a family with weights", weights.display()))?;
    let family = w.family.clone();
    let bytes =
        w.into_artifact(&tern_models::cpu_device()).with_context(|| format!("weights in {}", weights.display()))?;
    tern_durable::write_atomic(out_path, &bytes, false).with_context(|| format!("writing {}", out_path.display()))?;
    let summary = json!({
        "path": out_path,
        "size": bytes.len(),
        "sha256": Sha256Digest::of(&bytes).to_hex(),
        "family": family,
    });
    if json {
        return print_json(&summary);
    }
    out(format!("wrote {} ({} bytes), {:?}", out_path.display(), bytes.len(), family));
    Ok(())
}

#[derive(Subcommand)]
pub enum FleetCmd {
    /// Print a single-use enrollment token for one device.
    Token {
        /// Group the device joins.
        #[arg(long)]
        group: String,
        /// Device profile (hardware class), e.g. rpi4, jetson-orin.
        #[arg(long)]
        profile: String,
        /// How long the token stays valid, in seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        ttl: u64,
    },
    /// Set the model version a device should serve.
    Assign {
        /// Device id.
        device: String,
        /// NAME:VERSION (must be approved, in a format the device's agent runs).
        model: ModelRef,
    },
    /// Stop a device from serving a model.
    Unassign {
        /// Device id.
        device: String,
        /// Model name.
        model: String,
    },
    /// Remove a device from the fleet: its certificate is refused from now
    /// on and its session is closed at once. It may enroll again with a new
    /// token (and a new key).
    Remove {
        /// Device id.
        device: String,
    },
    /// Enrolled devices with group, profile, last contact and models.
    List,
    /// Add tags to a device (or, with --remove, take them off): rollouts
    /// select on them.
    Tag {
        /// Device id.
        device: String,
        /// Tags: 1 to 64 letters, digits, -, _ or . each.
        #[arg(required = true)]
        tags: Vec<String>,
        /// Take these tags off.
        #[arg(long)]
        remove: bool,
    },
    /// Move a device to another group.
    Group {
        /// Device id.
        device: String,
        /// The group.
        group: String,
    },
    /// One device: what it serves, what it should, and its update history
    /// (each step with its reason and the device's time; agents of wire
    /// version 3 on report it).
    Show {
        /// Device id.
        device: String,
    },
}

/// A Unix time in milliseconds as RFC 3339 UTC, to the second.
fn utc(ms: u64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| ms.to_string())
}

/// Bytes in decimal units, as link budgets are written.
fn decimal_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.1} GB", n as f64 / 1e9),
    }
}

/// Per link, the last whole day the device reported (else today so far):
/// `quic 2026-12-02 ↑412.1 kB ↓380.2 kB`.
fn traffic_lines(days: &[tern_proto::LinkDay]) -> Vec<String> {
    let mut links: Vec<&str> = days.iter().map(|d| d.link.as_str()).collect();
    links.sort_unstable();
    links.dedup();
    links
        .into_iter()
        .filter_map(|link| {
            let mut of: Vec<_> = days.iter().filter(|d| d.link == link).collect();
            of.sort_by_key(|d| std::cmp::Reverse(d.day));
            let (d, so_far) = match of.as_slice() {
                [today, before, ..] if before.day.checked_add(1) == Some(today.day) => (*before, ""),
                [today, ..] => (*today, " so far"),
                [] => return None,
            };
            let date = utc(u64::from(d.day) * 86_400_000);
            let date = date.split('T').next().unwrap_or_default();
            Some(format!(
                "{} {date}{so_far} ↑{} ↓{}",
                printable(link),
                decimal_bytes(d.sent),
                decimal_bytes(d.received)
            ))
        })
        .collect()
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// An admin API client.
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    /// Finds the coordinator: explicit flags first, then the data dir. The
    /// token comes from `token_file`, else TERN_ADMIN_TOKEN, else
    /// `<data_dir>/admin.token`.
    pub fn new(data_dir: &Path, admin: Option<String>, token_file: Option<&Path>) -> Result<Self> {
        let base = match admin {
            Some(a) => a.trim_end_matches('/').to_owned(),
            None => {
                let path = data_dir.join("serve.json");
                let raw = std::fs::read(&path).with_context(|| {
                    format!(
                        "no coordinator found: {} is missing (start `tern serve`, or pass --admin URL)",
                        path.display()
                    )
                })?;
                let e: Endpoints =
                    serde_json::from_slice(&raw).with_context(|| format!("reading {}", path.display()))?;
                format!("http://{}", e.admin)
            }
        };
        let read = |path: &Path| -> Result<String> {
            Ok(std::fs::read_to_string(path)
                .with_context(|| {
                    format!(
                        "no admin token: cannot read {} (pass --token-file or set TERN_ADMIN_TOKEN)",
                        path.display()
                    )
                })?
                .trim()
                .to_owned())
        };
        let token = match (token_file, std::env::var("TERN_ADMIN_TOKEN").ok().filter(|t| !t.is_empty())) {
            (Some(path), _) => read(path)?,
            (None, Some(t)) => t,
            (None, None) => read(&data_dir.join("admin.token"))?,
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into();
        Ok(Self { base, token, agent })
    }

    fn finish<T: DeserializeOwned>(
        &self,
        what: &str,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T> {
        let mut resp = resp.with_context(|| format!("cannot reach the coordinator at {}", self.base))?;
        let status = resp.status();
        let body: Value =
            resp.body_mut().read_json().with_context(|| format!("{what}: unreadable answer ({status})"))?;
        if !status.is_success() {
            let msg = body.get("error").and_then(Value::as_str).unwrap_or("no details");
            bail!("{msg}");
        }
        serde_json::from_value(body).with_context(|| format!("{what}: unexpected answer"))
    }

    pub(crate) fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(path, resp)
    }

    /// A raw answer (an artifact's bytes).
    pub(crate) fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let mut resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .call()
            .with_context(|| format!("cannot reach the coordinator at {}", self.base))?;
        if !resp.status().is_success() {
            let body: Value = resp.body_mut().read_json().unwrap_or_default();
            bail!("{}", body.get("error").and_then(Value::as_str).unwrap_or("no details"));
        }
        Ok(resp.body_mut().with_config().limit(1 << 30).read_to_vec()?)
    }

    pub(crate) fn send<T: DeserializeOwned>(&self, method: &str, path: &str, body: &impl Serialize) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let resp = match method {
            "PUT" => self.agent.put(url).header("authorization", auth).send_json(body),
            "DELETE" => self.agent.delete(url).header("authorization", auth).call(),
            _ => self.agent.post(url).header("authorization", auth).send_json(body),
        };
        self.finish(path, resp)
    }

    pub(crate) fn upload(&self, bytes: Vec<u8>) -> Result<Sha256Digest> {
        let digest = Sha256Digest::of(&bytes);
        let pb = ProgressBar::new(bytes.len() as u64);
        pb.set_style(
            ProgressStyle::with_template("uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec}").expect("template"),
        );
        let mut reader = pb.wrap_read(Cursor::new(bytes));
        let resp = self
            .agent
            .post(format!("{}/v1/artifacts", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .header("x-tern-sha256", digest.to_hex())
            .send(ureq::SendBody::from_reader(&mut reader));
        pb.finish_and_clear();
        let v: Value = self.finish("upload", resp)?;
        Ok(serde_json::from_value(v["sha256"].clone())?)
    }
}

impl Client {
    /// Issues an enrollment token and returns the API's answer.
    pub fn token_json(&self, group: &str, profile: &str, ttl: u64) -> Result<Value> {
        self.send("POST", "/v1/tokens", &json!({ "group": group, "profile": profile, "ttl_secs": ttl }))
    }
}

/// Prints a line to stdout. A reader that went away (`tern … | head`) is
/// not an error: the command still finishes its work (and the demo still
/// stops its processes) instead of panicking.
pub fn out(text: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

pub(crate) fn print_json(v: &impl Serialize) -> Result<()> {
    out(serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    t
}

pub(crate) fn ago(t: Option<u64>) -> String {
    let Some(t) = t else { return "never".into() };
    let d = unix_now().saturating_sub(t);
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

fn signature(specs: &[tern_proto::TensorSpec]) -> String {
    specs.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
}

fn show_version(v: &ModelVersion) {
    out(format!("{}:{}  ({})", v.name, v.version, v.status));
    out(format!("  sha256   {}", v.sha256));
    out(format!("  size     {} bytes, {}", v.size, v.format));
    out(format!("  inputs   {}", signature(&v.inputs)));
    out(format!("  outputs  {}", signature(&v.outputs)));
    out(format!("  created  {} ({})", v.created_at, ago(Some(v.created_at))));
    match &v.selftest {
        Some(t) => out(format!(
            "  golden   {} ({} bytes, tolerance {} ppm)",
            &t.sha256.to_hex()[..12],
            t.size,
            t.tolerance_ppm
        )),
        None => out("  golden   none (agents run it once on zeros)"),
    }
    for (k, val) in &v.meta {
        out(format!("  meta     {k}={val}"));
    }
    if let Some(why) = &v.needs_compiling {
        out(format!("  needs compiling (devices get only its compiled artifacts): {}", printable(why)));
    }
    if !v.compile_shapes.is_empty() {
        let shapes: Vec<String> = v.compile_shapes.iter().map(|(n, d)| format!("{n}={d:?}")).collect();
        out(format!("  compile shapes  {}", shapes.join(" ")));
    }
    if !v.compile_consts.is_empty() {
        let consts: Vec<String> = v.compile_consts.iter().map(|(n, c)| format!("{n}={c}")).collect();
        out(format!("  compile consts  {}", consts.join(" ")));
    }
    if !v.targets.is_empty() {
        let mut t =
            table(&["target", "format", "size", "backend", "max error", "p50 here", "est. p99", "model memory", "fit"]);
        for (profile, a) in &v.targets {
            let r = &a.report;
            let err = r.errors.iter().map(|e| e.max_scaled).fold(0.0f64, f64::max);
            let lat = r.latency.get(&r.backend);
            let fit = r.fit.as_ref();
            t.add_row(vec![
                profile.clone(),
                a.format.to_string(),
                a.size.to_string(),
                r.backend.clone(),
                format!("{err:.1e}"),
                lat.map_or("-".into(), |l| format!("{:.2} ms", l.p50_us as f64 / 1000.0)),
                fit.map_or("-".into(), |f| format!("{:.2} ms", f.estimated_p99_us as f64 / 1000.0)),
                fit.map_or("-".into(), |f| format!("{:.1} MiB", f.peak_model_bytes as f64 / (1 << 20) as f64)),
                fit.map_or("not checked".into(), |f| f.refused.clone().map_or("fits".into(), |w| format!("no: {w}"))),
            ]);
        }
        out(format!(
            "  compiled artifacts (p50 on the compiling machine; p99 estimated with the profile's speed factor):\n{t}"
        ));
    }
    if let Some(card) = &v.card {
        out(format!("\n{card}"));
    }
}

fn parse_bins(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=tern_drift::MAX_BINS - 2).contains(&n) => Ok(n),
        _ => Err(format!("give 1 to {} bins", tern_drift::MAX_BINS - 2)),
    }
}

pub fn model(c: &Client, cmd: ModelCmd, json: bool) -> Result<()> {
    match cmd {
        ModelCmd::Register {
            name,
            file,
            card,
            meta,
            references,
            tolerance_ppm,
            shapes,
            consts,
            baseline,
            categorical,
            bins,
        } => {
            ModelRef::check_name(&name)?;
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let card = card
                .map(|p| std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display())))
                .transpose()?;
            let mut refs = Vec::new();
            for p in &references {
                let r = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                tern_proto::decode_tensors(&r).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                refs.push(c.upload(r)?);
            }
            let shapes: BTreeMap<String, Vec<usize>> = shapes.into_iter().collect();
            let consts: BTreeMap<String, String> = consts.into_iter().collect();
            let baseline = baseline
                .map(|data| {
                    let model = crate::baseline::load(&bytes, &shapes, &consts)?;
                    let opts = crate::baseline::Options { categorical, bins };
                    crate::baseline::build(&data, &model, &opts)
                })
                .transpose()?;
            let baseline_sha = baseline.as_ref().map(|(b, _)| c.upload(b.encode())).transpose()?;
            let sha256 = c.upload(bytes)?;
            let meta: BTreeMap<String, String> = meta.into_iter().collect();
            let v: ModelVersion = c.send(
                "POST",
                &format!("/v1/models/{name}/versions"),
                &json!({ "sha256": sha256, "card": card, "meta": meta, "references": refs, "tolerance_ppm": tolerance_ppm, "shapes": shapes, "consts": consts, "baseline": baseline_sha }),
            )?;
            if json {
                return print_json(&v);
            }
            out(format!("registered {}:{} (pending approval)", v.name, v.version));
            if let Some((_, r)) = &baseline {
                out(format!(
                    "baseline: {} rows, {} run through the model, {} features{}",
                    r.rows,
                    r.run,
                    r.features.len(),
                    r.outputs_skipped.as_ref().map(|w| format!(" (no outputs: {w})")).unwrap_or_default()
                ));
            }
            show_version(&v);
        }
        ModelCmd::List => {
            let vs: Vec<ModelVersion> = c.get("/v1/models")?;
            if json {
                return print_json(&vs);
            }
            let mut t = table(&["model", "version", "status", "size", "sha256", "inputs", "registered"]);
            for v in &vs {
                t.add_row(vec![
                    v.name.clone(),
                    v.version.to_string(),
                    v.status.to_string(),
                    v.size.to_string(),
                    v.sha256.to_hex()[..12].to_owned(),
                    signature(&v.inputs),
                    ago(Some(v.created_at)),
                ]);
            }
            out(t);
        }
        ModelCmd::Show { target } => {
            if let Ok(r) = target.parse::<ModelRef>() {
                let v: ModelVersion = c.get(&format!("/v1/models/{}/versions/{}", r.name, r.version))?;
                if json {
                    return print_json(&v);
                }
                show_version(&v);
                return Ok(());
            }
            ModelRef::check_name(&target)?;
            let vs: Vec<ModelVersion> = c.get(&format!("/v1/models/{target}"))?;
            if json {
                return print_json(&vs);
            }
            for v in &vs {
                show_version(v);
                out("");
            }
        }
        ModelCmd::Approve { target } => decide(c, &target, "approve", false, json)?,
        ModelCmd::Pack { weights, out } => pack(&weights, &out, json)?,
        ModelCmd::Reject { target, force } => decide(c, &target, "reject", force, json)?,
    }
    Ok(())
}

fn decide(c: &Client, r: &ModelRef, decision: &str, force: bool, json: bool) -> Result<()> {
    let path = format!("/v1/models/{}/versions/{}/{decision}?force={force}", r.name, r.version);
    let v: Value = c.send("POST", &path, &json!({}))?;
    if json {
        return print_json(&v);
    }
    out(format!("{}:{} is now {}", r.name, r.version, v["status"].as_str().unwrap_or("?")));
    let from: Vec<&str> = v["unassigned_from"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if !from.is_empty() {
        out(format!("unassigned from {}", from.join(", ")));
    }
    Ok(())
}

/// Device-supplied text, safe to print: control characters (which could
/// move a terminal's cursor or rewrite the screen) and the invisible ones
/// that reorder or hide text (bidirectional overrides, zero-width marks)
/// are dropped.
fn printable(s: &str) -> String {
    let invisible =
        |c: char| matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}');
    s.chars().filter(|c| !c.is_control() && !invisible(*c)).collect()
}

pub fn fleet(c: &Client, cmd: FleetCmd, json: bool) -> Result<()> {
    match cmd {
        FleetCmd::Token { group, profile, ttl } => {
            let v = c.token_json(&group, &profile, ttl)?;
            if json {
                return print_json(&v);
            }
            out(v["token"].as_str().unwrap_or_default());
        }
        FleetCmd::Assign { device, model } => {
            let d: Device = c.send(
                "PUT",
                &format!("/v1/devices/{device}/models/{}", model.name),
                &json!({ "version": model.version }),
            )?;
            if json {
                return print_json(&d);
            }
            out(format!("{} should now serve {model} (desired state generation {})", d.id, d.generation));
        }
        FleetCmd::Unassign { device, model } => {
            let d: Device = c.send("DELETE", &format!("/v1/devices/{device}/models/{model}"), &json!({}))?;
            if json {
                return print_json(&d);
            }
            out(format!("{} no longer serves {model} (desired state generation {})", d.id, d.generation));
        }
        FleetCmd::Tag { device, tags, remove } => {
            let body = if remove { json!({ "remove": tags }) } else { json!({ "add": tags }) };
            let d: Device = c.send("POST", &format!("/v1/devices/{device}/tags"), &body)?;
            if json {
                return print_json(&d);
            }
            out(format!("{}: tags {}", d.id, d.tags.iter().cloned().collect::<Vec<_>>().join(", ")));
        }
        FleetCmd::Group { device, group } => {
            let d: Device = c.send("PUT", &format!("/v1/devices/{device}/group"), &json!({ "group": group }))?;
            if json {
                return print_json(&d);
            }
            out(format!("{}: group {}", d.id, d.group));
        }
        FleetCmd::Remove { device } => {
            let d: Device = c.send("DELETE", &format!("/v1/devices/{device}"), &json!({}))?;
            if json {
                return print_json(&d);
            }
            out(format!("removed {}; its certificate is refused from now on", d.id));
        }
        FleetCmd::Show { device } => {
            let d: Device = c.get(&format!("/v1/devices/{device}"))?;
            if json {
                return print_json(&d);
            }
            out(format!("{}  (group {}, profile {})", d.id, printable(&d.group), printable(&d.profile)));
            out(format!("  last seen  {}", ago(d.last_seen)));
            let desired: Vec<String> = d.desired.iter().map(|(n, v)| format!("{n}:{v}")).collect();
            out(format!("  desired    {} (generation {})", desired.join(", "), d.generation));
            for m in &d.reported {
                let detail = m.detail.as_deref().map(|x| format!(" ({})", printable(x))).unwrap_or_default();
                out(format!("  reported   {}:{} {}{detail}", printable(&m.name), m.version, m.state));
            }
            if d.history.is_empty() {
                out("  no update history (the agent reports it on wire version 3 on)");
                return Ok(());
            }
            let mut t = table(&["device time (UTC)", "model", "step", "reason"]);
            for h in &d.history {
                let e = &h.event;
                t.add_row(vec![
                    utc(e.at_ms),
                    format!("{}:{}", printable(&e.name), e.version),
                    printable(&e.phase),
                    e.reason.as_deref().map(printable).unwrap_or_default(),
                ]);
            }
            out(t);
        }
        FleetCmd::List => {
            let ds: Vec<Device> = c.get("/v1/devices")?;
            if json {
                return print_json(&ds);
            }
            let mut t = table(&["device", "group", "profile", "last seen", "serving", "desired", "agent", "bytes/day"]);
            for d in &ds {
                let mut serving: Vec<String> = d
                    .reported
                    .iter()
                    .map(|m| match &m.detail {
                        Some(detail) => {
                            format!("{}:{} {} ({})", printable(&m.name), m.version, m.state, printable(detail))
                        }
                        None => format!("{}:{} {}", printable(&m.name), m.version, m.state),
                    })
                    .collect();
                if let Some(r) = &d.refused {
                    serving.push(format!("refused desired state {}: {}", r.generation, printable(&r.reason)));
                }
                let mut desired: Vec<String> = d.desired.iter().map(|(n, v)| format!("{n}:{v}")).collect();
                match d.reported_generation {
                    Some(g) if g == d.generation => desired.push(format!("(generation {g}, applied)")),
                    Some(g) if g > d.generation => desired
                        .push(format!("(generation {}, device ahead at {g}: it ignores older states)", d.generation)),
                    Some(g) => desired.push(format!("(generation {}, device at {g})", d.generation)),
                    None => {}
                }
                let agent = printable(d.agent_version.as_deref().unwrap_or_default());
                let agent = match &d.capabilities {
                    Some(c) => {
                        let formats: Vec<String> = c.formats.iter().map(|f| f.to_string()).collect();
                        format!("{agent}\nwire v{}, runs {}", c.wire_version, formats.join(", "))
                    }
                    None => agent,
                };
                t.add_row(vec![
                    d.id.to_string(),
                    printable(&d.group),
                    printable(&d.profile),
                    ago(d.last_seen),
                    serving.join("\n"),
                    desired.join("\n"),
                    agent,
                    traffic_lines(&d.traffic).join("\n"),
                ]);
            }
            out(t);
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum RegistryCmd {
    /// Sign the next version of the registry's TUF root metadata with a root
    /// key kept off the coordinator (a PKCS#8 Ed25519 file on removable
    /// media, say). The root names that key and the coordinator's online
    /// timestamp, snapshot and targets keys. Works on the data dir directly;
    /// `tern serve` must have run once with it (it makes the online keys).
    SignRoot {
        /// The root key (PKCS#8 DER).
        #[arg(long)]
        key: PathBuf,
        /// Make a new root key at --key first (refused if the file exists).
        #[arg(long)]
        generate: bool,
        /// The previous root's key, when --key is a new one: a rotated root
        /// must be signed by the old root key too.
        #[arg(long)]
        previous_key: Option<PathBuf>,
        /// How long the root is valid, in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
    },
    /// Write the registry's TUF repository to DIR: every root
    /// (`N.root.json`), freshly signed `timestamp.json`, `snapshot.json` and
    /// `targets.json` listing each approved version, and the artifacts under
    /// `targets/NAME/VERSION/`. Any TUF client can refresh from it.
    ExportTuf {
        /// Where to write it (made if missing).
        dir: PathBuf,
    },
}

/// `tern registry sign-root`, on the data dir.
pub fn sign_root(
    data_dir: &Path,
    key: &Path,
    generate: bool,
    previous: Option<&Path>,
    days: u64,
    json: bool,
) -> Result<()> {
    use tern_trust::SigningKey;
    if generate {
        if key.exists() {
            bail!("{} exists; not overwriting a key (drop --generate to use it)", key.display());
        }
        let (_, der) = SigningKey::generate()?;
        tern_durable::write_atomic(key, &der, true).with_context(|| format!("writing {}", key.display()))?;
    }
    let load = |p: &Path| -> Result<SigningKey> {
        let der = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        SigningKey::from_pkcs8(&der).with_context(|| format!("{} is not a PKCS#8 Ed25519 key", p.display()))
    };
    let new = load(key)?;
    let old = previous.map(load).transpose()?;
    let repo = crate::serve::tuf::TufRepo::open(data_dir, false)?;
    let signers: Vec<&SigningKey> = std::iter::once(&new).chain(old.as_ref()).collect();
    let version = repo.sign_root(&[&new], &signers, days, unix_now())?;
    let path = data_dir.join("tuf").join(format!("{version}.root.json"));
    if json {
        return print_json(&json!({ "version": version, "path": path }));
    }
    out(format!("signed root version {version}: {}", path.display()));
    Ok(())
}

/// `tern registry export-tuf DIR`, through the admin API.
pub fn export_tuf(c: &Client, dir: &Path, json: bool) -> Result<()> {
    let built: crate::serve::tuf::Built = c.get("/v1/tuf")?;
    std::fs::create_dir_all(dir.join("targets")).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        tern_durable::write_atomic(&path, bytes, false).with_context(|| format!("writing {}", path.display()))
    };
    let Some(last_root) = built.roots.last() else { bail!("the coordinator sent no root") };
    // Artifacts first, then metadata bottom-up, so that a client reading
    // the folder meanwhile never finds a timestamp naming what is not there.
    let pb = ProgressBar::new(built.files.len() as u64);
    pb.set_style(ProgressStyle::with_template("artifacts {bar:30} {pos}/{len}").expect("template"));
    for (path, sha) in &built.files {
        let plain = path.split('/').all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\\'));
        if !plain {
            bail!("refusing target path {path:?}: it would leave {}", dir.display());
        }
        let bytes = c.get_bytes(&format!("/v1/artifacts/{}", sha.to_hex()))?;
        if Sha256Digest::of(&bytes) != *sha {
            bail!("artifact of {path} does not match its digest {sha}");
        }
        write(&format!("targets/{path}"), &bytes)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    for (i, root) in built.roots.iter().enumerate() {
        write(&format!("{}.root.json", i + 1), root.as_bytes())?;
    }
    write("root.json", last_root.as_bytes())?;
    write("targets.json", built.targets.as_bytes())?;
    write("snapshot.json", built.snapshot.as_bytes())?;
    write("timestamp.json", built.timestamp.as_bytes())?;
    if json {
        let targets: Vec<&String> = built.files.iter().map(|(p, _)| p).collect();
        return print_json(&json!({ "dir": dir, "roots": built.roots.len(), "targets": targets }));
    }
    out(format!(
        "wrote {}: {} root version(s), timestamp, snapshot, targets and {} artifact(s)",
        dir.display(),
        built.roots.len(),
        built.files.len()
    ));
    Ok(())
}
