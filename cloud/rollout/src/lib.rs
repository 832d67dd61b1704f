//! Fleet rollouts without I/O: a [`Plan`] (a model version, cumulative
//! waves, a bake time, gates and an on-failure policy) turned into waves
//! over a target set — a canary holding every device profile and group,
//! then growing shares, devices ordered by a seeded hash — and the
//! [`Rollout`] machine that sends them, judges the devices' reports against
//! the gates and hawkBit's error threshold, fails a device that does not
//! report within its deadline (so a rollout never waits on a silent
//! device; a paused one waits for its operator), and takes pause, resume,
//! abort and rollback. A device on the version already is not touched. Time is passed in as seconds; side
//! effects come out as [`Action`]s, each device assigned at most once.

mod engine;
mod plan;
#[cfg(test)]
mod tests;

pub use engine::{Action, Command, DeviceState, Disallowed, Health, Phase, Report, Rollout, WaveStatus};
pub use plan::{Gates, OnFailure, Plan, PlanError, Target};
