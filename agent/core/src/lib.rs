//! The agent's sans-IO core: one slot per model name (active, previous,
//! candidate) and the machine that moves a candidate from the desired state
//! to serving. It does no I/O and reads no clock: the daemon feeds it the
//! desired state, the results of the work it asked for, and `now`; it answers
//! with [`Action`]s to perform and a status to report.

mod slots;

pub use slots::{Action, Disallowed, Event, Phase, Slot, Slots};
