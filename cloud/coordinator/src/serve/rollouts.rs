//! Drives the rollouts kept in the registry: every few seconds, and at
//! once after a command, each active one hears what its devices reported
//! (their update history), moves on in time, and has its actions carried
//! out. The state with its actions still queued is written before they are
//! carried out, and again after: a coordinator killed in between carries
//! the same actions out once more on restart (assigning a version a device
//! already has is no change), never another wave's.

use super::State;
use crate::fsutil::unix_now;
use anyhow::Result;
use std::sync::Arc;
use tern_registry::StoredRollout;
use tern_rollout::{Action, DeviceState, Health, Report};
use tracing::{info, warn};

/// How often active rollouts are driven.
const EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Drives the rollouts forever.
pub async fn run(state: Arc<State>) {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = drive_all(&state).await {
            warn!("rollouts: {e:#}");
        }
    }
}

/// One round over the active rollouts. The lock is held by the blocking
/// work itself, so a caller that goes away (a cancelled request) cannot let
/// another round start beside it.
pub async fn drive_all(state: &Arc<State>) -> Result<()> {
    let guard = state.rollouts.clone().lock_owned().await;
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        let _one = guard;
        for r in st.registry.rollouts()?.into_iter().filter(|r| !r.rollout.is_finished() || r.rollout.has_actions()) {
            let id = r.id;
            if let Err(e) = drive(&st, r) {
                warn!(rollout = id, "rollout: {e:#}");
            }
        }
        Ok::<_, anyhow::Error>(())
    })
    .await??;
    Ok(())
}

/// What a device's history says of its update to `model:version` since
/// `since` (Unix seconds, by the coordinator's clock): its latest step
/// (`None`: at work on it, or not started).
fn report_of(d: &tern_registry::Device, model: &str, version: u32, since: u64) -> Option<Report> {
    let mut out = None;
    for h in d.history.iter().filter(|h| h.received_at >= since) {
        let e = &h.event;
        if e.name != model || e.version != version {
            continue;
        }
        let why = || e.reason.clone().unwrap_or_else(|| e.phase.clone());
        out = match e.phase.as_str() {
            "committed" => Some(Report::Updated(Health::default())),
            "failed" | "rolled back" | "refused" | "abandoned" => {
                Some(Report::Failed(format!("{}: {}", e.phase, why())))
            }
            "ready" => Some(Report::Waiting),
            _ => None,
        };
    }
    out
}

/// One rollout: reports in, time on; then, as long as the engine has
/// actions, the state is written with them queued before they are carried
/// out (so a crash replays them, never loses them), and written again.
fn drive(state: &State, mut r: StoredRollout) -> Result<()> {
    let now = unix_now();
    let plan = r.rollout.plan().clone();
    let before = r.rollout.clone();
    let sent: Vec<(String, u64)> = r
        .rollout
        .waves()
        .concat()
        .into_iter()
        .filter_map(|d| match r.rollout.device(d) {
            Some(DeviceState::Sent { at, .. }) => Some((d.to_owned(), *at)),
            _ => None,
        })
        .collect();
    for (device, at) in sent {
        match state.registry.device(&device) {
            Ok(d) => {
                // A device that cannot act (offline: no control session,
                // or holding for its window) is not counted down.
                let report = match report_of(&d, &plan.model, plan.version, at) {
                    Some(r) => r,
                    None if state.sessions.is_connected(&d.id) => Report::Active,
                    None => Report::Waiting,
                };
                r.rollout.report(&device, report, now);
            }
            Err(tern_registry::RegistryError::UnknownDevice(_)) => {
                r.rollout.report(&device, Report::Failed("removed from the fleet".into()), now);
            }
            // Read again next round.
            Err(e) => warn!(rollout = r.id, device = %device, "rollout: reading the device: {e}"),
        }
    }
    r.rollout.handle_timeout(now);
    // Nothing new, and nothing left to carry out (a queue written before a
    // crash is carried out now).
    if r.rollout == before && !r.rollout.has_actions() {
        return Ok(());
    }
    let mut carried = 0;
    // Reverts the registry refuses now (the previous version rejected,
    // say) are tried again every round until they go through.
    let mut again = Vec::new();
    while r.rollout.has_actions() {
        state.registry.put_rollout(&r)?;
        let mut batch = Vec::new();
        while let Some(a) = r.rollout.poll_action() {
            batch.push(a);
        }
        for a in batch {
            let result = match &a {
                Action::Assign { device } => {
                    state.registry.assign(device, &plan.model, plan.version).map(|d| Some(d.id))
                }
                Action::Revert { device, previous: Some(v) } => {
                    state.registry.assign(device, &plan.model, *v).map(|d| Some(d.id))
                }
                Action::Revert { device, previous: None } => match state.registry.unassign(device, &plan.model) {
                    Err(tern_registry::RegistryError::NotAssigned { .. }) => Ok(None),
                    other => other.map(|d| Some(d.id)),
                },
            };
            match result {
                Ok(id) => {
                    if let Some(id) = id {
                        state.sessions.wake(&id);
                    }
                    carried += 1;
                }
                Err(e) => {
                    warn!(rollout = r.id, ?a, "rollout action: {e}");
                    // An assignment the registry refuses (the device was
                    // removed, or cannot run the version) fails the device
                    // for the gate; its new actions are written before they
                    // are carried out, in the next pass of this loop.
                    match &a {
                        Action::Assign { device } => {
                            r.rollout.report(device, Report::Failed(format!("not assigned: {e}")), now)
                        }
                        Action::Revert { .. } => {
                            again.push(a.clone());
                            true
                        }
                    };
                }
            }
        }
    }
    if carried > 0 {
        info!(rollout = r.id, actions = carried, phase = ?r.rollout.phase(), "rollout moved on");
    }
    for a in again {
        r.rollout.requeue(a);
    }
    state.registry.put_rollout(&r)?;
    Ok(())
}
