//! The agent's sans-IO core: one slot per model name (active, previous,
//! candidate) and the staged-update machine that moves a candidate from the
//! desired state through download, verification, self-test, shadow, a wait
//! for the maintenance window or an app's defer lease, and probation to
//! committed, or rolls it back. It does no I/O and reads no clock: the
//! daemon feeds it the desired state, the results of the work it asked for,
//! `now` and the local time; it answers
//! with [`Action`]s to perform and a status to report. The daemon serves only
//! what the core told it to install, and persists what [`Slots::persisted`]
//! returns, so a restart finds every model the agent knew about.
//!
//! [`monitor`] windows a served version's requests against its training
//! baseline and raises and clears alerts, with the same discipline;
//! [`feedback`] counts the ground truth apps post for past answers into
//! model-quality windows.

pub mod feedback;
pub mod monitor;
#[cfg(test)]
mod monitor_tests;
mod slots;

pub use slots::{
    Action, DeferError, Disallowed, Event, HEALTH_EVERY, HEALTH_GRACE, Health, HookVerdict, MAX_BACKOFF,
    MAX_TRANSITIONS, MIN_BACKOFF, Persisted, PersistedSlot, Phase, READY_EVERY, ShadowReport, Slot, Slots, Stage,
    Transition,
};
