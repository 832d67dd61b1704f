use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};
use tern_proto::{ModelManifest, ModelState, ModelStatus};

/// First retry delay after a failure; doubles per attempt up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(2);
/// Longest delay between retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Where a candidate version is on its way to serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The daemon is downloading and checking the artifact.
    Fetching,
    /// The daemon is loading the verified artifact into the runtime.
    Loading,
    /// The last attempt failed; retried at `retry_at`.
    Failed {
        /// Why.
        reason: String,
        /// When the next attempt starts.
        retry_at: Instant,
    },
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Fetching => f.write_str("fetching"),
            Phase::Loading => f.write_str("loading"),
            Phase::Failed { .. } => f.write_str("failed"),
        }
    }
}

/// What the daemon reports back about work it was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The artifact is on disk and matches the manifest's digest.
    Fetched {
        /// Model name.
        name: String,
        /// Version fetched.
        version: u32,
    },
    /// Download or verification failed.
    FetchFailed {
        /// Model name.
        name: String,
        /// Version attempted.
        version: u32,
        /// Why.
        reason: String,
    },
    /// The runtime loaded the model and serves it now.
    Loaded {
        /// Model name.
        name: String,
        /// Version loaded.
        version: u32,
    },
    /// The runtime refused the model; the previous version keeps serving.
    LoadFailed {
        /// Model name.
        name: String,
        /// Version attempted.
        version: u32,
        /// Why.
        reason: String,
    },
}

impl Event {
    fn target(&self) -> (&str, u32) {
        match self {
            Event::Fetched { name, version }
            | Event::FetchFailed { name, version, .. }
            | Event::Loaded { name, version }
            | Event::LoadFailed { name, version, .. } => (name, *version),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Event::Fetched { .. } => "fetched",
            Event::FetchFailed { .. } => "fetch-failed",
            Event::Loaded { .. } => "loaded",
            Event::LoadFailed { .. } => "load-failed",
        }
    }
}

/// An event that is not allowed in the candidate's current phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {event} for {name}:{version} is not allowed while {state}")]
pub struct Disallowed {
    /// The event's kind.
    pub event: &'static str,
    /// Model name.
    pub name: String,
    /// Version the event was about.
    pub version: u32,
    /// The phase it arrived in ("no candidate" when there was none).
    pub state: String,
}

/// Work for the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Download (resuming if possible) and check this artifact, then report
    /// [`Event::Fetched`] or [`Event::FetchFailed`].
    Fetch(ModelManifest),
    /// Load this verified artifact and swap it in, then report
    /// [`Event::Loaded`] or [`Event::LoadFailed`].
    Load(ModelManifest),
    /// Stop serving this model: it is no longer desired.
    Unload(String),
    /// The active set changed: persist [`Slots::active`].
    Persist,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidate {
    manifest: ModelManifest,
    phase: Phase,
    attempts: u32,
}

/// One model name's slot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Slot {
    active: Option<ModelManifest>,
    previous: Option<ModelManifest>,
    candidate: Option<Candidate>,
}

impl Slot {
    /// The version serving now.
    pub fn active(&self) -> Option<&ModelManifest> {
        self.active.as_ref()
    }

    /// The version that served before the active one.
    pub fn previous(&self) -> Option<&ModelManifest> {
        self.previous.as_ref()
    }

    /// The version on its way in, and its phase.
    pub fn candidate(&self) -> Option<(&ModelManifest, &Phase)> {
        self.candidate.as_ref().map(|c| (&c.manifest, &c.phase))
    }
}

/// All model slots of one agent, reconciling towards the desired state.
#[derive(Debug, Default)]
pub struct Slots {
    slots: BTreeMap<String, Slot>,
    generation: u64,
    actions: VecDeque<Action>,
}

fn backoff(attempts: u32) -> Duration {
    MIN_BACKOFF.saturating_mul(1 << attempts.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

impl Slots {
    /// Slots restored from what was active when the agent last persisted.
    /// Each restored model must be loaded again, so each yields a `Load`.
    pub fn restore(active: impl IntoIterator<Item = ModelManifest>) -> Self {
        let mut s = Self::default();
        for m in active {
            s.slots.insert(
                m.name.clone(),
                Slot {
                    candidate: Some(Candidate { manifest: m.clone(), phase: Phase::Loading, attempts: 0 }),
                    ..Slot::default()
                },
            );
            s.actions.push_back(Action::Load(m));
        }
        s
    }

    /// The generation of the last desired state applied.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// One slot.
    pub fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.get(name)
    }

    /// The manifests serving now, for persisting.
    pub fn active(&self) -> Vec<ModelManifest> {
        self.slots.values().filter_map(|s| s.active.clone()).collect()
    }

    /// Applies a desired state (manifests already verified). Older
    /// generations than the last applied are ignored: the stream may replay.
    pub fn set_desired(&mut self, generation: u64, desired: Vec<ModelManifest>) {
        if generation < self.generation {
            return;
        }
        self.generation = generation;
        let wanted: BTreeMap<String, ModelManifest> = desired.into_iter().map(|m| (m.name.clone(), m)).collect();
        let gone: Vec<String> = self.slots.keys().filter(|n| !wanted.contains_key(*n)).cloned().collect();
        for name in gone {
            let slot = self.slots.remove(&name).expect("key from the map");
            if slot.active.is_some() {
                self.actions.push_back(Action::Unload(name));
                self.actions.push_back(Action::Persist);
            }
        }
        for (name, manifest) in wanted {
            let slot = self.slots.entry(name).or_default();
            if slot.active.as_ref() == Some(&manifest) {
                slot.candidate = None;
                continue;
            }
            if slot.candidate.as_ref().is_some_and(|c| c.manifest == manifest) {
                continue;
            }
            slot.candidate = Some(Candidate { manifest: manifest.clone(), phase: Phase::Fetching, attempts: 0 });
            self.actions.push_back(Action::Fetch(manifest));
        }
    }

    /// Feeds back the outcome of an action. Outcomes for a version that is
    /// no longer the candidate are stale and ignored (`Ok(false)`).
    pub fn handle(&mut self, event: Event, now: Instant) -> Result<bool, Disallowed> {
        let (name, version) = event.target();
        let disallowed = |state: String| Disallowed { event: event.kind(), name: name.to_owned(), version, state };
        let Some(slot) = self.slots.get_mut(name) else {
            return Ok(false);
        };
        let Some(cand) = slot.candidate.as_mut() else {
            return if slot.active.as_ref().is_some_and(|a| a.version == version) {
                Err(disallowed("serving".into()))
            } else {
                Ok(false)
            };
        };
        if cand.manifest.version != version {
            return Ok(false);
        }
        match (&event, &cand.phase) {
            (Event::Fetched { .. }, Phase::Fetching) => {
                cand.phase = Phase::Loading;
                self.actions.push_back(Action::Load(cand.manifest.clone()));
            }
            (Event::FetchFailed { reason, .. }, Phase::Fetching)
            | (Event::LoadFailed { reason, .. }, Phase::Loading) => {
                cand.attempts += 1;
                cand.phase = Phase::Failed { reason: reason.clone(), retry_at: now + backoff(cand.attempts) };
            }
            (Event::Loaded { .. }, Phase::Loading) => {
                let cand = slot.candidate.take().expect("matched above");
                slot.previous = slot.active.replace(cand.manifest);
                self.actions.push_back(Action::Persist);
            }
            (_, phase) => return Err(disallowed(phase.to_string())),
        }
        Ok(true)
    }

    /// Restarts failed candidates whose retry time has come.
    pub fn handle_timeout(&mut self, now: Instant) {
        for slot in self.slots.values_mut() {
            if let Some(c) = slot.candidate.as_mut()
                && matches!(c.phase, Phase::Failed { retry_at, .. } if retry_at <= now)
            {
                c.phase = Phase::Fetching;
                self.actions.push_back(Action::Fetch(c.manifest.clone()));
            }
        }
    }

    /// When [`Slots::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.slots
            .values()
            .filter_map(|s| match &s.candidate {
                Some(Candidate { phase: Phase::Failed { retry_at, .. }, .. }) => Some(*retry_at),
                _ => None,
            })
            .min()
    }

    /// The next piece of work, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// What to tell the coordinator: serving versions, and candidates with
    /// their phase.
    pub fn status(&self) -> Vec<ModelStatus> {
        let mut out = Vec::new();
        for (name, slot) in &self.slots {
            if let Some(a) = &slot.active {
                out.push(ModelStatus {
                    name: name.clone(),
                    version: a.version,
                    state: ModelState::Serving,
                    detail: None,
                });
            }
            if let Some(c) = &slot.candidate {
                let (state, detail) = match &c.phase {
                    Phase::Fetching => (ModelState::Downloading, None),
                    Phase::Loading => (ModelState::Loading, None),
                    Phase::Failed { reason, .. } => (ModelState::Failed, Some(reason.clone())),
                };
                out.push(ModelStatus { name: name.clone(), version: c.manifest.version, state, detail });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::{ModelFormat, Sha256Digest};

    fn m(name: &str, version: u32) -> ModelManifest {
        ModelManifest {
            name: name.into(),
            version,
            sha256: Sha256Digest::of(format!("{name}{version}").as_bytes()),
            size: 10,
            format: ModelFormat::Onnx,
            inputs: vec![],
            outputs: vec![],
            created_at: 0,
        }
    }

    fn drain(s: &mut Slots) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn fetched(name: &str, version: u32) -> Event {
        Event::Fetched { name: name.into(), version }
    }

    fn loaded(name: &str, version: u32) -> Event {
        Event::Loaded { name: name.into(), version }
    }

    #[test]
    fn desired_model_is_fetched_loaded_and_served() {
        let t0 = Instant::now();
        let mut s = Slots::default();
        s.set_desired(1, vec![m("iris", 1)]);
        assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 1))]);
        assert_eq!(s.status()[0].state, ModelState::Downloading);
        assert!(s.handle(fetched("iris", 1), t0).unwrap());
        assert_eq!(drain(&mut s), [Action::Load(m("iris", 1))]);
        assert!(s.handle(loaded("iris", 1), t0).unwrap());
        assert_eq!(drain(&mut s), [Action::Persist]);
        assert_eq!(s.active(), [m("iris", 1)]);
        assert_eq!(s.status()[0].state, ModelState::Serving);
        // The same desired state again is a no-op.
        s.set_desired(2, vec![m("iris", 1)]);
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn upgrade_keeps_old_version_serving_until_new_one_loads() {
        let t0 = Instant::now();
        let mut s = Slots::restore([m("iris", 1)]);
        assert_eq!(drain(&mut s), [Action::Load(m("iris", 1))]);
        s.handle(loaded("iris", 1), t0).unwrap();
        drain(&mut s);
        s.set_desired(5, vec![m("iris", 2)]);
        assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 2))]);
        s.handle(fetched("iris", 2), t0).unwrap();
        s.handle(Event::LoadFailed { name: "iris".into(), version: 2, reason: "bad".into() }, t0).unwrap();
        assert_eq!(s.slot("iris").unwrap().active(), Some(&m("iris", 1)));
        let st = s.status();
        assert_eq!((st[0].version, st[0].state), (1, ModelState::Serving));
        assert_eq!((st[1].version, st[1].state, st[1].detail.as_deref()), (2, ModelState::Failed, Some("bad")));
    }

    #[test]
    fn failures_back_off_in_virtual_time() {
        let t0 = Instant::now();
        let mut s = Slots::default();
        s.set_desired(1, vec![m("iris", 1)]);
        drain(&mut s);
        let fail = || Event::FetchFailed { name: "iris".into(), version: 1, reason: "connection lost".into() };
        s.handle(fail(), t0).unwrap();
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        s.handle_timeout(t0 + Duration::from_secs(1));
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(t0 + Duration::from_secs(2));
        assert_eq!(drain(&mut s), [Action::Fetch(m("iris", 1))]);
        let t1 = t0 + Duration::from_secs(2);
        s.handle(fail(), t1).unwrap();
        assert_eq!(s.poll_timeout(), Some(t1 + Duration::from_secs(4)));
        for _ in 0..20 {
            let t = s.poll_timeout().unwrap();
            s.handle_timeout(t);
            drain(&mut s);
            s.handle(fail(), t).unwrap();
            assert!(s.poll_timeout().unwrap() - t <= MAX_BACKOFF);
        }
    }

    #[test]
    fn stale_and_disallowed_events() {
        let t0 = Instant::now();
        let mut s = Slots::default();
        s.set_desired(1, vec![m("iris", 1)]);
        // Loaded before fetched: not allowed.
        let err = s.handle(loaded("iris", 1), t0).unwrap_err();
        assert_eq!(err.to_string(), "event loaded for iris:1 is not allowed while fetching");
        // Desired moves on to v2 while v1 downloads: v1's outcome is stale.
        s.set_desired(2, vec![m("iris", 2)]);
        assert!(!s.handle(fetched("iris", 1), t0).unwrap());
        // An older generation replayed is ignored.
        s.set_desired(1, vec![m("iris", 1)]);
        assert_eq!(s.slot("iris").unwrap().candidate().unwrap().0.version, 2);
        assert!(!s.handle(fetched("other", 1), t0).unwrap());
    }

    #[test]
    fn undesired_model_is_unloaded() {
        let t0 = Instant::now();
        let mut s = Slots::default();
        s.set_desired(1, vec![m("iris", 1), m("cnn", 1)]);
        drain(&mut s);
        for n in ["iris", "cnn"] {
            s.handle(fetched(n, 1), t0).unwrap();
            s.handle(loaded(n, 1), t0).unwrap();
        }
        drain(&mut s);
        s.set_desired(2, vec![m("iris", 1)]);
        assert_eq!(drain(&mut s), [Action::Unload("cnn".into()), Action::Persist]);
        assert_eq!(s.active(), [m("iris", 1)]);
    }
}
