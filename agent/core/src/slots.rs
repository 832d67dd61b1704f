use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};
use tern_proto::{ModelFormat, ModelManifest, ModelState, ModelStatus, Refusal, Sha256Digest};

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
    /// This agent cannot run it (its format); not retried until the
    /// desired state changes.
    Refused {
        /// Why.
        reason: String,
    },
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Fetching => f.write_str("fetching"),
            Phase::Loading => f.write_str("loading"),
            Phase::Failed { .. } => f.write_str("failed"),
            Phase::Refused { .. } => f.write_str("refused"),
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
    /// The runtime loaded the model; the daemon holds it until told to
    /// [`Action::Install`] it (or drops it if the core does not).
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
    /// The phase it arrived in ("serving" for the installed version).
    pub state: String,
}

/// Work for the daemon. The daemon carries out these and nothing else: a
/// result the core has not turned into an `Install` is never served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Download (resuming if possible) and check this artifact, then report
    /// [`Event::Fetched`] or [`Event::FetchFailed`].
    Fetch(ModelManifest),
    /// Load this verified artifact (without serving it), then report
    /// [`Event::Loaded`] or [`Event::LoadFailed`].
    Load(ModelManifest),
    /// Serve what was loaded for this manifest in place of whatever serves
    /// under its name now.
    Install(ModelManifest),
    /// Stop serving this model: it is no longer desired.
    Unload(String),
    /// The persisted state changed: write [`Slots::persisted`].
    Persist,
}

/// A slot's committed version.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Active {
    manifest: ModelManifest,
    /// False from a restart until the daemon has loaded it again.
    installed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidate {
    manifest: ModelManifest,
    phase: Phase,
    attempts: u32,
}

/// One model name's slot: the committed version, the one before it, and
/// the one on its way in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Slot {
    active: Option<Active>,
    previous: Option<ModelManifest>,
    candidate: Option<Candidate>,
}

impl Slot {
    /// The committed version (serving, or being loaded again after a restart).
    pub fn active(&self) -> Option<&ModelManifest> {
        self.active.as_ref().map(|a| &a.manifest)
    }

    /// Whether the committed version is loaded and serving.
    pub fn serving(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.installed)
    }

    /// The version that was committed before the active one.
    pub fn previous(&self) -> Option<&ModelManifest> {
        self.previous.as_ref()
    }

    /// The version on its way in, and its phase.
    pub fn candidate(&self) -> Option<(&ModelManifest, &Phase)> {
        self.candidate.as_ref().map(|c| (&c.manifest, &c.phase))
    }
}

/// One slot as persisted: every manifest it holds, so that nothing is lost
/// whatever was in flight when the agent stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistedSlot {
    /// Model name.
    pub name: String,
    /// The committed version.
    pub active: Option<ModelManifest>,
    /// The version before it, to fall back on.
    pub previous: Option<ModelManifest>,
    /// The desired version not yet committed.
    pub candidate: Option<ModelManifest>,
}

/// Everything the agent persists about its models.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Persisted {
    /// Generation of the last desired state applied.
    pub generation: u64,
    /// Every slot.
    pub slots: Vec<PersistedSlot>,
}

/// All model slots of one agent, reconciling towards the desired state.
#[derive(Debug)]
pub struct Slots {
    slots: BTreeMap<String, Slot>,
    generation: u64,
    refused: Option<Refusal>,
    formats: Vec<ModelFormat>,
    actions: VecDeque<Action>,
}

fn backoff(attempts: u32) -> Duration {
    MIN_BACKOFF.saturating_mul(1 << attempts.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

impl Slots {
    /// Empty slots for an agent that runs artifacts of `formats`.
    pub fn new(formats: &[ModelFormat]) -> Self {
        Self {
            slots: BTreeMap::new(),
            generation: 0,
            refused: None,
            formats: formats.to_vec(),
            actions: VecDeque::new(),
        }
    }

    /// Slots restored from what was persisted: each committed version is
    /// loaded again (`Load`, then `Install` once loaded), each candidate's
    /// download resumes (`Fetch`), and previous versions stay as fallbacks.
    pub fn restore(formats: &[ModelFormat], persisted: Persisted) -> Self {
        let mut s = Self::new(formats);
        s.generation = persisted.generation;
        for p in persisted.slots {
            // What this agent no longer runs (it was started with fewer
            // formats) is neither loaded nor kept to fall back on.
            let mut slot = Slot { previous: p.previous.filter(|m| s.refusal_of(m).is_none()), ..Slot::default() };
            if let Some(m) = p.active {
                match s.refusal_of(&m) {
                    None => {
                        s.actions.push_back(Action::Load(m.clone()));
                        slot.active = Some(Active { manifest: m, installed: false });
                    }
                    Some(reason) if p.candidate.is_none() => {
                        slot.candidate = Some(Candidate { manifest: m, phase: Phase::Refused { reason }, attempts: 0 });
                    }
                    Some(_) => {}
                }
            }
            if let Some(m) = p.candidate {
                let phase = s.refusal_of(&m).map_or(Phase::Fetching, |reason| Phase::Refused { reason });
                if phase == Phase::Fetching {
                    s.actions.push_back(Action::Fetch(m.clone()));
                }
                slot.candidate = Some(Candidate { manifest: m, phase, attempts: 0 });
            }
            s.slots.insert(p.name, slot);
        }
        s
    }

    /// The generation of the last desired state applied.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The desired state refused as a whole last, if none has been applied since.
    pub fn refusal(&self) -> Option<&Refusal> {
        self.refused.as_ref()
    }

    /// One slot.
    pub fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.get(name)
    }

    /// What to persist.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            generation: self.generation,
            slots: self
                .slots
                .iter()
                .map(|(name, s)| PersistedSlot {
                    name: name.clone(),
                    active: s.active.as_ref().map(|a| a.manifest.clone()),
                    previous: s.previous.clone(),
                    candidate: s
                        .candidate
                        .as_ref()
                        .filter(|c| !matches!(c.phase, Phase::Refused { .. }))
                        .map(|c| c.manifest.clone()),
                })
                .collect(),
        }
    }

    /// The artifacts any slot refers to: what must stay on disk.
    pub fn referenced(&self) -> BTreeSet<Sha256Digest> {
        let mut out = BTreeSet::new();
        for s in self.slots.values() {
            out.extend(s.active.iter().map(|a| a.manifest.sha256));
            out.extend(s.previous.iter().map(|m| m.sha256));
            out.extend(s.candidate.iter().map(|c| c.manifest.sha256));
        }
        out
    }

    fn refusal_of(&self, m: &ModelManifest) -> Option<String> {
        (!self.formats.contains(&m.format)).then(|| {
            let runs: Vec<String> = self.formats.iter().map(|f| f.to_string()).collect();
            format!("{}:{} is {}; this agent build runs {}", m.name, m.version, m.format, runs.join(", "))
        })
    }

    /// Applies a desired state (manifests already verified). Older
    /// generations than the last applied are ignored: the stream may replay.
    /// A manifest this agent cannot run is refused on its own, with the
    /// reason in its status; the others go ahead.
    pub fn set_desired(&mut self, generation: u64, desired: Vec<ModelManifest>) {
        if generation < self.generation {
            return;
        }
        let before = self.persisted();
        self.generation = generation;
        if self.refused.as_ref().is_some_and(|r| r.generation <= generation) {
            self.refused = None;
        }
        let wanted: BTreeMap<String, ModelManifest> = desired.into_iter().map(|m| (m.name.clone(), m)).collect();
        let gone: Vec<String> = self.slots.keys().filter(|n| !wanted.contains_key(*n)).cloned().collect();
        for name in gone {
            let slot = self.slots.remove(&name).expect("key from the map");
            if slot.active.is_some() {
                self.actions.push_back(Action::Unload(name));
            }
        }
        for (name, manifest) in wanted {
            let refusal = self.refusal_of(&manifest);
            let slot = self.slots.entry(name).or_default();
            if slot.active.as_ref().is_some_and(|a| a.manifest == manifest) {
                slot.candidate = None;
                continue;
            }
            if slot.candidate.as_ref().is_some_and(|c| c.manifest == manifest) {
                continue;
            }
            let phase = match refusal {
                Some(reason) => Phase::Refused { reason },
                None => {
                    self.actions.push_back(Action::Fetch(manifest.clone()));
                    Phase::Fetching
                }
            };
            slot.candidate = Some(Candidate { manifest, phase, attempts: 0 });
        }
        // Written only when it changed: an agent told the same again (as at
        // every reconnect) does not touch its disk.
        if self.persisted() != before {
            self.actions.push_back(Action::Persist);
        }
    }

    /// Records a desired state refused as a whole (a bad signature): the
    /// slots keep the last good one, and the status says why.
    pub fn refuse(&mut self, generation: u64, reason: String) {
        self.refused = Some(Refusal { generation, reason });
    }

    /// Feeds back the outcome of an action. Outcomes for a version that is
    /// no longer expected are stale and ignored (`Ok(false)`): a load that
    /// finishes after a newer one is never installed.
    pub fn handle(&mut self, event: Event, now: Instant) -> Result<bool, Disallowed> {
        let (name, version) = event.target();
        let disallowed = |state: String| Disallowed { event: event.kind(), name: name.to_owned(), version, state };
        let Some(slot) = self.slots.get_mut(name) else {
            return Ok(false);
        };
        if let Some(cand) = slot.candidate.as_mut().filter(|c| c.manifest.version == version) {
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
                    if let Some(old) = slot.active.take() {
                        slot.previous = Some(old.manifest);
                    }
                    slot.active = Some(Active { manifest: cand.manifest.clone(), installed: true });
                    self.actions.push_back(Action::Install(cand.manifest));
                    self.actions.push_back(Action::Persist);
                }
                (_, phase) => return Err(disallowed(phase.to_string())),
            }
            return Ok(true);
        }
        let Some(active) = slot.active.as_mut().filter(|a| a.manifest.version == version) else {
            return Ok(false);
        };
        match (&event, active.installed) {
            // The committed version, loaded again after a restart.
            (Event::Loaded { .. }, false) => {
                active.installed = true;
                self.actions.push_back(Action::Install(active.manifest.clone()));
            }
            // It no longer loads (its file is gone or corrupt, or this build
            // cannot run it): fall back on the previous version, and try
            // the failed one again as a candidate if nothing newer is on the way.
            (Event::LoadFailed { reason, .. }, false) => {
                let failed = slot.active.take().expect("matched above").manifest;
                if let Some(previous) = slot.previous.take() {
                    self.actions.push_back(Action::Load(previous.clone()));
                    slot.active = Some(Active { manifest: previous, installed: false });
                }
                if slot.candidate.is_none() {
                    let retry_at = now + backoff(1);
                    let phase = Phase::Failed { reason: reason.clone(), retry_at };
                    slot.candidate = Some(Candidate { manifest: failed, phase, attempts: 1 });
                } else if slot.previous.is_none() {
                    slot.previous = Some(failed);
                }
                self.actions.push_back(Action::Persist);
            }
            (_, true) => return Err(disallowed("serving".into())),
            (_, false) => return Err(disallowed("loading after a restart".into())),
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

    /// What to tell the coordinator: committed versions (serving, or loading
    /// again after a restart), and candidates with their phase.
    pub fn status(&self) -> Vec<ModelStatus> {
        let mut out = Vec::new();
        for (name, slot) in &self.slots {
            if let Some(a) = &slot.active {
                let state = if a.installed { ModelState::Serving } else { ModelState::Loading };
                out.push(ModelStatus { name: name.clone(), version: a.manifest.version, state, detail: None });
            }
            if let Some(c) = &slot.candidate {
                let (state, detail) = match &c.phase {
                    Phase::Fetching => (ModelState::Downloading, None),
                    Phase::Loading => (ModelState::Loading, None),
                    Phase::Failed { reason, .. } | Phase::Refused { reason } => {
                        (ModelState::Failed, Some(reason.clone()))
                    }
                };
                out.push(ModelStatus { name: name.clone(), version: c.manifest.version, state, detail });
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "slots_tests.rs"]
mod tests;
