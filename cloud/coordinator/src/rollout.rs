//! `tern rollout …`: start a plan over the devices a selector picks, watch
//! it wave by wave, pause, resume, abort, roll back; `tern fleet tag` and
//! `group` set what selectors pick on.

use crate::cli::{Client, out, print_json};
use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::{Value, json};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Start a rollout from a plan (TOML: model, version, waves in
    /// cumulative percent, bake_secs, deadline_secs, max_wait_secs, seed,
    /// on_failure = "pause" | "rollback", [gates] max_failed (the share of
    /// a wave's devices that may fail; the gates min_shadow_agreement,
    /// max_error_rate, max_p99_ms and max_drift are read but agents do not
    /// report those values yet); and [select] group, tags, profile). Refused before any device is
    /// touched if the version is not approved, the selector names what no
    /// device has, the target set is empty, the waves do not reach 100 %,
    /// or an active rollout of the model holds one of its devices.
    Start {
        /// The plan.
        plan: PathBuf,
        /// Only devices of this group (over the plan's).
        #[arg(long)]
        group: Option<String>,
        /// Only devices with this tag, repeatable (added to the plan's).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Only devices of this profile (over the plan's).
        #[arg(long)]
        profile: Option<String>,
    },
    /// One rollout: its phase and each wave's devices pending, waiting,
    /// healthy, failed (against the gate's share) and reverted.
    Status {
        /// Its id.
        id: u64,
    },
    /// Stop sending new waves; devices keep what they have.
    Pause {
        /// Its id.
        id: u64,
    },
    /// Go on from a pause (past a failed gate too: the operator's call).
    Resume {
        /// Its id.
        id: u64,
    },
    /// Stop for good where it is.
    Abort {
        /// Its id.
        id: u64,
    },
    /// Put every device the rollout touched back on its previous version
    /// (also after it finished or was aborted).
    Rollback {
        /// Its id.
        id: u64,
    },
    /// Every rollout, newest last.
    List,
}

pub fn run(c: &Client, cmd: RolloutCmd, as_json: bool) -> Result<()> {
    let r: Value = match cmd {
        RolloutCmd::Start { plan, group, tags, profile } => {
            let text = std::fs::read_to_string(&plan).with_context(|| format!("reading {}", plan.display()))?;
            let mut table: toml::Table = toml::from_str(&text).with_context(|| format!("{}", plan.display()))?;
            let mut select = match table.remove("select") {
                Some(toml::Value::Table(t)) => t,
                Some(_) => anyhow::bail!("{}: [select] is a table", plan.display()),
                None => toml::Table::new(),
            };
            if let Some(g) = group {
                select.insert("group".into(), g.into());
            }
            if let Some(p) = profile {
                select.insert("profile".into(), p.into());
            }
            if !tags.is_empty() {
                let mut all: Vec<toml::Value> = match select.remove("tags") {
                    Some(toml::Value::Array(a)) => a,
                    _ => Vec::new(),
                };
                all.extend(tags.into_iter().map(toml::Value::from));
                select.insert("tags".into(), toml::Value::Array(all));
            }
            let body = json!({ "plan": table, "select": select });
            c.send("POST", "/v1/rollouts", &body)?
        }
        RolloutCmd::Status { id } => c.get(&format!("/v1/rollouts/{id}"))?,
        RolloutCmd::Pause { id } => c.send("POST", &format!("/v1/rollouts/{id}/pause"), &json!({}))?,
        RolloutCmd::Resume { id } => c.send("POST", &format!("/v1/rollouts/{id}/resume"), &json!({}))?,
        RolloutCmd::Abort { id } => c.send("POST", &format!("/v1/rollouts/{id}/abort"), &json!({}))?,
        RolloutCmd::Rollback { id } => c.send("POST", &format!("/v1/rollouts/{id}/rollback"), &json!({}))?,
        RolloutCmd::List => {
            let all: Value = c.get("/v1/rollouts")?;
            if as_json {
                return print_json(&all);
            }
            let mut t = crate::cli::table(&["id", "model", "phase", "waves", "devices", "failed"]);
            for r in all.as_array().into_iter().flatten() {
                let devices: u64 =
                    r["waves"].as_array().into_iter().flatten().filter_map(|w| w["devices"].as_u64()).sum();
                t.add_row(vec![
                    r["id"].to_string(),
                    format!("{}:{}", r["plan"]["model"].as_str().unwrap_or(""), r["plan"]["version"]),
                    phase(&r["phase"]),
                    r["waves"].as_array().map_or(0, Vec::len).to_string(),
                    devices.to_string(),
                    r["failed"].as_array().map_or(0, Vec::len).to_string(),
                ]);
            }
            out(t);
            return Ok(());
        }
    };
    if as_json {
        return print_json(&r);
    }
    show(&r);
    Ok(())
}

/// A phase as a word or two.
fn phase(p: &Value) -> String {
    match p {
        Value::String(s) => s.to_lowercase(),
        Value::Object(o) => {
            let (name, v) = o.iter().next().map(|(k, v)| (k.to_lowercase(), v)).unwrap_or_default();
            match (v.get("wave").and_then(Value::as_u64), v.get("reason").and_then(Value::as_str)) {
                (Some(w), Some(why)) => format!("{name} in wave {}: {why}", w + 1),
                (Some(w), None) => format!("{name} wave {}", w + 1),
                _ => name,
            }
        }
        _ => String::new(),
    }
}

fn show(r: &Value) {
    out(format!(
        "rollout {} of {}:{}: {}",
        r["id"],
        r["plan"]["model"].as_str().unwrap_or(""),
        r["plan"]["version"],
        phase(&r["phase"])
    ));
    let gate = r["max_failed"].as_f64().unwrap_or(0.0) * 100.0;
    let mut t = crate::cli::table(&["wave", "devices", "pending", "waiting", "healthy", "failed", "gate", "reverted"]);
    for (i, w) in r["waves"].as_array().into_iter().flatten().enumerate() {
        t.add_row(vec![
            (i + 1).to_string(),
            w["devices"].to_string(),
            w["pending"].to_string(),
            w["waiting"].to_string(),
            w["succeeded"].to_string(),
            format!("{} ({:.1} %)", w["failed"], w["failed_share"].as_f64().unwrap_or(0.0) * 100.0),
            format!("≤ {gate:.1} %"),
            w["reverted"].to_string(),
        ]);
    }
    out(t);
    for f in r["failed"].as_array().into_iter().flatten() {
        out(format!("  {}: {}", f["device"].as_str().unwrap_or(""), f["reason"].as_str().unwrap_or("")));
    }
}
