//! A rollout's state machine: waves sent, devices' reports judged against
//! the gates, deadlines and bake times in time the caller passes in
//! (seconds), and the operator's commands as explicit `(command, phase)`
//! transitions.

use crate::plan::{OnFailure, Plan, PlanError, Target};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// What a device measured of the new version, where it did.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Health {
    /// Agreement with the serving version in shadow (0 to 1).
    pub shadow_agreement: Option<f64>,
    /// Error rate on probation (0 to 1).
    pub error_rate: Option<f64>,
    /// p99 latency on probation (milliseconds).
    pub p99_ms: Option<f64>,
    /// Drift distance of its first window.
    pub drift: Option<f64>,
}

/// A device's word on its update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Report {
    /// It committed the version, having measured this.
    Updated(Health),
    /// Its update failed (a self-test, shadow or probation failure; a
    /// rollback by itself), for this reason.
    Failed(String),
    /// It cannot act now: it holds the version until its maintenance
    /// window opens, or it is offline. Its deadline does not run meanwhile
    /// (up to the plan's `max_wait_secs`).
    Waiting,
    /// It is online and at work on the update: a wait ends, and its
    /// deadline runs on.
    Active,
}

/// Where a device stands in the rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceState {
    /// In a wave not reached yet.
    Queued,
    /// Sent the version at `at`; `waiting_since` while it waits for its
    /// window, and the time it waited before.
    Sent {
        /// When it was sent.
        at: u64,
        /// Since when it has been waiting for its window.
        waiting_since: Option<u64>,
        /// Seconds it waited before.
        waited: u64,
    },
    /// It reported the version healthy.
    Succeeded,
    /// It failed, for this reason (a success reported after its deadline
    /// changes nothing).
    Failed(String),
    /// Put back on its previous version.
    Reverted,
}

impl DeviceState {
    fn touched(&self) -> bool {
        !matches!(self, DeviceState::Queued)
    }
}

/// Where the rollout stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// Wave `wave` is sent; its devices are reporting.
    Running {
        /// The wave.
        wave: usize,
    },
    /// Wave `wave` reported healthy; the next starts at `until`.
    Baking {
        /// The wave.
        wave: usize,
        /// When the bake ends.
        until: u64,
    },
    /// Stopped in wave `wave`, by an operator or a failed gate.
    Paused {
        /// The wave.
        wave: usize,
        /// Why.
        reason: String,
    },
    /// Every wave went through.
    Done,
    /// Stopped for good where it was; devices keep what they have.
    Aborted,
    /// Every device touched was put back on its previous version.
    RolledBack,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Running { .. } => "running",
            Phase::Baking { .. } => "baking",
            Phase::Paused { .. } => "paused",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
            Phase::RolledBack => "rolled back",
        }
    }
}

/// What an operator asks of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Stop sending; devices keep what they have.
    Pause,
    /// Go on from where it paused.
    Resume,
    /// Stop for good.
    Abort,
    /// Put every device touched back on its previous version.
    Rollback,
}

/// A command the rollout's phase does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{command:?} is not allowed while the rollout is {phase}")]
pub struct Disallowed {
    /// The command.
    pub command: Command,
    /// The phase's name.
    pub phase: &'static str,
}

/// A side effect for the caller to carry out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Assign the plan's version to the device.
    Assign {
        /// The device.
        device: String,
    },
    /// Put the device back on `previous` (`None`: unassign the model).
    Revert {
        /// The device.
        device: String,
        /// Its version before the rollout.
        previous: Option<u32>,
    },
}

/// One wave's standing, for status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveStatus {
    /// Its devices.
    pub devices: usize,
    /// Sent, not yet reported.
    pub pending: usize,
    /// Waiting for their maintenance window.
    pub waiting: usize,
    /// Healthy.
    pub succeeded: usize,
    /// Failed (by report, gate or deadline).
    pub failed: usize,
    /// Put back.
    pub reverted: usize,
    /// Failed share against the gate's.
    pub failed_share: f64,
}

/// A rollout: its plan, waves, devices and phase. Serializable, so the
/// caller can keep it durably and go on after a restart; nothing in it
/// refers to a clock but the times passed in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    plan: Plan,
    targets: Vec<Target>,
    waves: Vec<Vec<usize>>,
    devices: Vec<DeviceState>,
    phase: Phase,
    actions: VecDeque<Action>,
    /// Waves an operator resumed past their failed gate: not judged again.
    #[serde(default)]
    overridden: Vec<usize>,
    /// The wave whose gate failure paused the rollout, if one did.
    #[serde(default)]
    gate_paused: Option<usize>,
}

impl Rollout {
    /// Plans `plan` over `targets` and sends the canary at `now`; refused
    /// before any action if the plan or the target set is.
    pub fn start(plan: Plan, targets: Vec<Target>, now: u64) -> Result<Self, PlanError> {
        let waves = plan.waves(&targets)?;
        let devices = vec![DeviceState::Queued; targets.len()];
        let mut r = Rollout {
            plan,
            targets,
            waves,
            devices,
            phase: Phase::Running { wave: 0 },
            actions: VecDeque::new(),
            overridden: Vec::new(),
            gate_paused: None,
        };
        // A device on the version already is not touched: it counts as
        // updated in its wave.
        for (i, t) in r.targets.iter().enumerate() {
            if t.previous == Some(r.plan.version) {
                r.devices[i] = DeviceState::Succeeded;
            }
        }
        r.send(0, now);
        r.evaluate(now);
        Ok(r)
    }

    /// The plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The waves, as device ids.
    pub fn waves(&self) -> Vec<Vec<&str>> {
        self.waves.iter().map(|w| w.iter().map(|&i| self.targets[i].device.as_str()).collect()).collect()
    }

    /// Where a device stands (`None`: not in the rollout).
    pub fn device(&self, id: &str) -> Option<&DeviceState> {
        self.index(id).map(|i| &self.devices[i])
    }

    fn index(&self, id: &str) -> Option<usize> {
        self.targets.iter().position(|t| t.device == id)
    }

    /// Whether it will do nothing more.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Aborted | Phase::RolledBack)
    }

    /// The next side effect to carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Rollout::handle_timeout`] should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        match &self.phase {
            Phase::Baking { until, .. } => Some(*until),
            Phase::Running { wave } => self.waves[*wave]
                .iter()
                .filter_map(|&i| match &self.devices[i] {
                    DeviceState::Sent { at, waiting_since: None, waited } => {
                        Some(at.saturating_add(*waited).saturating_add(self.plan.deadline_secs))
                    }
                    DeviceState::Sent { waiting_since: Some(since), .. } => {
                        Some(since.saturating_add(self.plan.max_wait_secs))
                    }
                    _ => None,
                })
                .min(),
            _ => None,
        }
    }

    /// Whether actions wait to be carried out.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// Puts back an action the caller could not carry out (a revert the
    /// registry refused for now), to be handed out again.
    pub fn requeue(&mut self, action: Action) {
        self.actions.push_back(action);
    }

    fn send(&mut self, wave: usize, now: u64) {
        for &i in &self.waves[wave] {
            if self.devices[i] == DeviceState::Queued {
                self.devices[i] = DeviceState::Sent { at: now, waiting_since: None, waited: 0 };
                self.actions.push_back(Action::Assign { device: self.targets[i].device.clone() });
            }
        }
    }

    /// Takes a device's report at `now`. Reports of devices not in the
    /// rollout, or not sent the version, are ignored (`false`).
    pub fn report(&mut self, device: &str, report: Report, now: u64) -> bool {
        let Some(i) = self.index(device) else { return false };
        let next = match (&self.devices[i], report) {
            (DeviceState::Sent { at, waited, waiting_since }, Report::Waiting) => {
                DeviceState::Sent { at: *at, waited: *waited, waiting_since: Some(waiting_since.unwrap_or(now)) }
            }
            (DeviceState::Sent { waiting_since: None, .. }, Report::Active) => return false,
            (DeviceState::Sent { at, waited, waiting_since: Some(since) }, Report::Active) => DeviceState::Sent {
                at: *at,
                waited: waited.saturating_add(now.saturating_sub(*since)),
                waiting_since: None,
            },
            (DeviceState::Sent { .. }, Report::Updated(h)) => match self.judge(&h) {
                Ok(()) => DeviceState::Succeeded,
                Err(reason) => DeviceState::Failed(reason),
            },
            (DeviceState::Sent { .. } | DeviceState::Succeeded, Report::Failed(reason)) => DeviceState::Failed(reason),
            // A late success after its deadline: recorded as failed still
            // for the wave that judged it; nothing else.
            (DeviceState::Queued | DeviceState::Reverted | DeviceState::Failed(_), _)
            | (DeviceState::Succeeded, Report::Updated(_) | Report::Waiting | Report::Active) => return false,
        };
        self.devices[i] = next;
        self.evaluate(now);
        true
    }

    /// Fails devices past their deadline and ends a bake at `now`.
    pub fn handle_timeout(&mut self, now: u64) {
        if let Phase::Running { wave } = self.phase {
            for &i in &self.waves[wave] {
                let late = match &self.devices[i] {
                    DeviceState::Sent { at, waiting_since: None, waited } => (now
                        >= at.saturating_add(*waited).saturating_add(self.plan.deadline_secs))
                    .then(|| format!("no report within {} s of the update", self.plan.deadline_secs)),
                    DeviceState::Sent { waiting_since: Some(since), .. } => {
                        (now >= since.saturating_add(self.plan.max_wait_secs)).then(|| {
                            format!(
                                "could not act for {} s (offline, or waiting for its maintenance window)",
                                self.plan.max_wait_secs
                            )
                        })
                    }
                    _ => None,
                };
                if let Some(reason) = late {
                    self.devices[i] = DeviceState::Failed(reason);
                }
            }
        }
        self.evaluate(now);
    }

    /// A device's measurements against the gates.
    fn judge(&self, h: &Health) -> Result<(), String> {
        let g = &self.plan.gates;
        let below = |v: Option<f64>, min: Option<f64>, what: &str| match (v, min) {
            // A NaN measurement fails too.
            (Some(v), Some(m)) if v.is_nan() || v < m => Err(format!("{what} {v:.3} below {m}")),
            _ => Ok(()),
        };
        let above = |v: Option<f64>, max: Option<f64>, what: &str| match (v, max) {
            (Some(v), Some(m)) if v.is_nan() || v > m => Err(format!("{what} {v:.3} above {m}")),
            _ => Ok(()),
        };
        below(h.shadow_agreement, g.min_shadow_agreement, "shadow agreement")?;
        above(h.error_rate, g.max_error_rate, "error rate")?;
        above(h.p99_ms, g.max_p99_ms, "p99 ms")?;
        above(h.drift, g.max_drift, "drift")
    }

    /// Moves the phase on after a change: a wave past its error threshold
    /// fails, a wave all reported healthy bakes, a bake over starts the
    /// next wave.
    fn evaluate(&mut self, now: u64) {
        loop {
            match self.phase.clone() {
                Phase::Running { wave } | Phase::Baking { wave, .. } if self.over_threshold(wave) => {
                    let s = self.wave_status(wave);
                    let reason = format!(
                        "wave {}: {} of {} devices failed ({:.1} %, the gate is {:.1} %)",
                        wave + 1,
                        s.failed,
                        s.devices,
                        s.failed_share * 100.0,
                        self.plan.gates.max_failed * 100.0
                    );
                    match self.plan.on_failure {
                        OnFailure::Pause => {
                            self.phase = Phase::Paused { wave, reason };
                            self.gate_paused = Some(wave);
                        }
                        OnFailure::Rollback => self.roll_back(),
                    }
                    return;
                }
                Phase::Running { wave } => {
                    let decided = self.waves[wave]
                        .iter()
                        .all(|&i| matches!(self.devices[i], DeviceState::Succeeded | DeviceState::Failed(_)));
                    if !decided {
                        return;
                    }
                    self.phase = Phase::Baking { wave, until: now.saturating_add(self.plan.bake_secs) };
                }
                Phase::Baking { wave, until } if now >= until => {
                    if wave + 1 == self.waves.len() {
                        self.phase = Phase::Done;
                        return;
                    }
                    self.phase = Phase::Running { wave: wave + 1 };
                    self.send(wave + 1, now);
                }
                _ => return,
            }
        }
    }

    fn over_threshold(&self, wave: usize) -> bool {
        !self.overridden.contains(&wave) && self.wave_status(wave).failed_share > self.plan.gates.max_failed
    }

    fn roll_back(&mut self) {
        for i in 0..self.targets.len() {
            if self.devices[i].touched() && self.devices[i] != DeviceState::Reverted {
                self.devices[i] = DeviceState::Reverted;
                let t = &self.targets[i];
                self.actions.push_back(Action::Revert { device: t.device.clone(), previous: t.previous });
            }
        }
        self.phase = Phase::RolledBack;
    }

    /// Carries out an operator's command at `now`.
    pub fn command(&mut self, command: Command, now: u64) -> Result<(), Disallowed> {
        let disallowed = |phase: &Phase| Disallowed { command, phase: phase.name() };
        match (command, self.phase.clone()) {
            (Command::Pause, Phase::Running { wave } | Phase::Baking { wave, .. }) => {
                self.phase = Phase::Paused { wave, reason: "paused by an operator".into() };
            }
            (Command::Resume, Phase::Paused { wave, .. }) => {
                self.phase = Phase::Running { wave };
                // Devices of the wave not sent yet (none, unless restored
                // from an older state) are sent now; deadlines run on.
                self.send(wave, now);
                // Resuming the wave whose failed gate paused it goes on past
                // the failure: the operator's call, not judged again. A
                // wave that failed while an operator had paused it is
                // judged now, as the plan says.
                if self.gate_paused.take() == Some(wave) && self.over_threshold(wave) {
                    self.overridden.push(wave);
                }
                self.evaluate(now);
            }
            (Command::Abort, Phase::Running { .. } | Phase::Baking { .. } | Phase::Paused { .. }) => {
                self.phase = Phase::Aborted;
            }
            (Command::Rollback, Phase::Running { .. } | Phase::Baking { .. } | Phase::Paused { .. })
            | (Command::Rollback, Phase::Done | Phase::Aborted) => self.roll_back(),
            (_, phase) => return Err(disallowed(&phase)),
        }
        Ok(())
    }

    /// A wave's standing.
    pub fn wave_status(&self, wave: usize) -> WaveStatus {
        let mut s = WaveStatus {
            devices: self.waves[wave].len(),
            pending: 0,
            waiting: 0,
            succeeded: 0,
            failed: 0,
            reverted: 0,
            failed_share: 0.0,
        };
        for &i in &self.waves[wave] {
            match &self.devices[i] {
                DeviceState::Queued => {}
                DeviceState::Sent { waiting_since: Some(_), .. } => s.waiting += 1,
                DeviceState::Sent { .. } => s.pending += 1,
                DeviceState::Succeeded => s.succeeded += 1,
                DeviceState::Failed(_) => s.failed += 1,
                DeviceState::Reverted => s.reverted += 1,
            }
        }
        s.failed_share = s.failed as f64 / s.devices.max(1) as f64;
        s
    }
}
