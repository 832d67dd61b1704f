use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};
use tern_proto::{
    LocalTime, MAX_GOLDEN_BYTES, MINUTES_PER_DAY, ModelFormat, ModelManifest, ModelState, ModelStatus, Refusal,
    Sha256Digest, UpdatePolicy,
};

/// First retry delay after a failure; doubles per attempt up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(2);
/// Longest delay between retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often a version on probation has its health checked.
pub const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// How long past the end of probation the last health report may take
/// before the update counts as failed.
pub const HEALTH_GRACE: Duration = Duration::from_secs(30);
/// How often a version waiting to activate looks again (the daemon gives
/// the local time anew each time).
pub const READY_EVERY: Duration = Duration::from_secs(60);

/// Where a candidate version is on its way to being committed. Every
/// non-terminal phase has a deadline (from the manifest's
/// [`tern_proto::UpdatePolicy`]); past it the update fails and the
/// committed version keeps (or goes back to) serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The daemon is downloading the artifact and its golden vectors.
    Fetching,
    /// The daemon is checking their digests on disk.
    Verifying,
    /// Verified on disk; the daemon is loading it into the runtime (not
    /// serving). From here on the agent is running the candidate's code, so
    /// this is persisted before the load starts: a crash from here on is the
    /// candidate's fault until shown otherwise.
    Staged,
    /// Loaded; the daemon is running the golden vectors on it.
    SelfTest,
    /// Running beside the serving version on live requests, whose answers
    /// still come from the serving version.
    Shadow,
    /// Tested (and shadowed), loaded, not serving: waits for the maintenance
    /// window to open or an app's defer lease to end.
    Ready {
        /// What it waits for.
        reason: String,
        /// When it got here.
        since: Instant,
        /// Since when an app's lease has held it, if one has: the policy's
        /// `max_defer_secs` counts from then.
        deferred: Option<Instant>,
        /// When it looks again.
        check_at: Instant,
    },
    /// Serving, on probation until `until`: healthy throughout, it commits.
    Probation {
        /// End of the window.
        until: Instant,
        /// When its health is next checked.
        check_at: Instant,
    },
    /// A step failed in a way that may pass (a cut link, a full disk);
    /// fetched again at `retry_at`, within the download's deadline.
    Retrying {
        /// Why.
        reason: String,
        /// When the next attempt starts.
        retry_at: Instant,
    },
    /// Terminal: given up before it served; not tried again until the
    /// desired state names another version.
    Failed {
        /// Why.
        reason: String,
    },
    /// Terminal: it served on probation and broke a limit; the committed
    /// version serves again. Not tried again until the desired state changes.
    RolledBack {
        /// Why.
        reason: String,
    },
    /// This agent cannot run it (its format); not retried until the
    /// desired state changes, and not persisted.
    Refused {
        /// Why.
        reason: String,
    },
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Fetching => "fetching",
            Phase::Verifying => "verifying",
            Phase::Staged => "staged",
            Phase::SelfTest => "self-test",
            Phase::Shadow => "shadow",
            Phase::Ready { .. } => "ready",
            Phase::Probation { .. } => "probation",
            Phase::Retrying { .. } => "retrying",
            Phase::Failed { .. } => "failed",
            Phase::RolledBack { .. } => "rolled back",
            Phase::Refused { .. } => "refused",
        }
    }

    fn terminal(&self) -> bool {
        matches!(self, Phase::Failed { .. } | Phase::RolledBack { .. } | Phase::Refused { .. })
    }

    /// Whether the agent has started running the candidate's code.
    fn trying(&self) -> bool {
        matches!(self, Phase::Staged | Phase::SelfTest | Phase::Shadow | Phase::Probation { .. })
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a version did on probation so far (since it was installed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Health {
    /// Requests answered or failed.
    pub requests: u64,
    /// Requests the runtime failed.
    pub errors: u64,
    /// 99th percentile of run time, in microseconds (0 without requests).
    pub p99_us: u64,
    /// What the app's health hook said.
    pub hook: HookVerdict,
}

/// What an app's health hook said of a version on probation since it was
/// installed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HookVerdict {
    /// No hook is set for the model.
    #[default]
    Unset,
    /// Set, and no answer yet: the version does not commit before one.
    Pending,
    /// Every answer so far said healthy.
    Passed,
    /// An answer said unhealthy, or none came in time: why.
    Failed(String),
}

/// What shadowing showed so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShadowReport {
    /// Live requests handed to the candidate (one may still be running).
    pub offered: u64,
    /// Live requests run on both versions.
    pub compared: u64,
    /// Of those, where the candidate agreed with the serving version.
    pub agreed: u64,
    /// 99th percentile of the candidate's run time on them, in microseconds.
    pub candidate_p99_us: u64,
    /// 99th percentile of the serving version's run time on the same
    /// requests, in microseconds.
    pub serving_p99_us: u64,
    /// When the run now under way on the candidate started, if one is.
    pub running_since: Option<Instant>,
}

/// How long a shadow run may have been under way when shadow ends before
/// it counts against the candidate: ten serving p99s, and never less than
/// this. A run merely started late is left out of the verdict instead.
pub const SHADOW_RUN_GRACE: Duration = Duration::from_secs(5);

/// What the daemon reports back about work it was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The artifact (and golden vectors) are downloaded.
    Fetched {
        /// Model name.
        name: String,
        /// Version fetched.
        version: u32,
    },
    /// Download failed.
    FetchFailed {
        /// Model name.
        name: String,
        /// Version attempted.
        version: u32,
        /// Why.
        reason: String,
    },
    /// The files on disk match the manifest's digests.
    Verified {
        /// Model name.
        name: String,
        /// Version verified.
        version: u32,
    },
    /// They do not (or cannot be read).
    VerifyFailed {
        /// Model name.
        name: String,
        /// Version checked.
        version: u32,
        /// Why.
        reason: String,
    },
    /// The runtime loaded the model; the daemon holds it until told to
    /// [`Action::Install`] it (or drops it once [`Slots::holding`] no
    /// longer names it).
    Loaded {
        /// Model name.
        name: String,
        /// Version loaded.
        version: u32,
    },
    /// The runtime refused the model; what serves keeps serving.
    LoadFailed {
        /// Model name.
        name: String,
        /// Version attempted.
        version: u32,
        /// Why.
        reason: String,
    },
    /// Every golden vector gave its outputs within tolerance.
    SelfTestPassed {
        /// Model name.
        name: String,
        /// Version tested.
        version: u32,
    },
    /// One did not, or a run failed.
    SelfTestFailed {
        /// Model name.
        name: String,
        /// Version tested.
        version: u32,
        /// Which vector and output, and by how much.
        reason: String,
    },
    /// Shadowing so far.
    Shadowed {
        /// Model name.
        name: String,
        /// Version shadowing.
        version: u32,
        /// The comparison.
        report: ShadowReport,
    },
    /// The daemon could not start serving the version on probation (its
    /// probation could not be written to disk): what served before serves on.
    InstallFailed {
        /// Model name.
        name: String,
        /// Version that was to serve.
        version: u32,
        /// Why.
        reason: String,
    },
    /// The shadow could not run at all (its thread did not start).
    ShadowFailed {
        /// Model name.
        name: String,
        /// Version that was to shadow.
        version: u32,
        /// Why.
        reason: String,
    },
    /// Health of the version on probation, asked for with
    /// [`Action::CheckHealth`].
    Health {
        /// Model name.
        name: String,
        /// Version on probation.
        version: u32,
        /// Its numbers since it was installed.
        health: Health,
    },
}

impl Event {
    fn target(&self) -> (&str, u32) {
        match self {
            Event::Fetched { name, version }
            | Event::FetchFailed { name, version, .. }
            | Event::Verified { name, version }
            | Event::VerifyFailed { name, version, .. }
            | Event::Loaded { name, version }
            | Event::LoadFailed { name, version, .. }
            | Event::SelfTestPassed { name, version }
            | Event::SelfTestFailed { name, version, .. }
            | Event::Shadowed { name, version, .. }
            | Event::ShadowFailed { name, version, .. }
            | Event::InstallFailed { name, version, .. }
            | Event::Health { name, version, .. } => (name, *version),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Event::Fetched { .. } => "fetched",
            Event::FetchFailed { .. } => "fetch-failed",
            Event::Verified { .. } => "verified",
            Event::VerifyFailed { .. } => "verify-failed",
            Event::Loaded { .. } => "loaded",
            Event::LoadFailed { .. } => "load-failed",
            Event::SelfTestPassed { .. } => "self-test-passed",
            Event::SelfTestFailed { .. } => "self-test-failed",
            Event::Shadowed { .. } => "shadowed",
            Event::ShadowFailed { .. } => "shadow-failed",
            Event::InstallFailed { .. } => "install-failed",
            Event::Health { .. } => "health",
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
    /// The phase it arrived in ("serving" for the committed version).
    pub state: String,
}

/// A defer lease that cannot be granted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeferError {
    /// The desired state names no such model.
    #[error("no model named {0:?} on this device")]
    NoSuchModel(String),
    /// Its update policy lets no app defer (`max_defer_secs` is 0).
    #[error("the update policy of {0:?} lets no app defer its updates (max_defer_secs is 0)")]
    NotAllowed(String),
    /// The version waiting has been held back for all its policy allows.
    #[error("the version of {name:?} waiting to activate has been deferred for the {max} s its policy allows")]
    Exhausted {
        /// Model name.
        name: String,
        /// The policy's `max_defer_secs`.
        max: u64,
    },
}

/// Work for the daemon. The daemon carries out these and nothing else: a
/// result the core has not turned into an `Install` is never served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Download (resuming if possible) the artifact and its golden vectors,
    /// then report [`Event::Fetched`] or [`Event::FetchFailed`].
    Fetch(ModelManifest),
    /// Check both files on disk against the manifest, then report
    /// [`Event::Verified`] or [`Event::VerifyFailed`].
    Verify(ModelManifest),
    /// Load this verified artifact (without serving it), then report
    /// [`Event::Loaded`] or [`Event::LoadFailed`]. Starts only once every
    /// [`Action::Persist`] emitted before it is durable.
    Load(ModelManifest),
    /// Run the golden vectors on what was loaded, then report
    /// [`Event::SelfTestPassed`] or [`Event::SelfTestFailed`].
    SelfTest(ModelManifest),
    /// Run what was loaded beside the serving version on live requests;
    /// report [`Event::Shadowed`] as comparisons come in.
    Shadow(ModelManifest),
    /// Serve what was loaded for this manifest in place of whatever serves
    /// under its name now (and stop any shadow of it).
    Install(ModelManifest),
    /// Report [`Event::Health`] for the version serving under this manifest.
    CheckHealth(ModelManifest),
    /// Stop serving this model: nothing under its name may serve.
    Unload(String),
    /// The persisted state changed: write [`Slots::persisted`].
    Persist,
}

/// A slot's committed version.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Active {
    manifest: ModelManifest,
    /// Whether the daemon serves it now: false from a restart until it is
    /// loaded again, and while a candidate is on probation.
    installed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidate {
    manifest: ModelManifest,
    phase: Phase,
    attempts: u32,
    /// When the current phase must be left by (for `Fetching` and
    /// `Retrying`: the whole download, retries included).
    deadline: Option<Instant>,
    /// The download's deadline, kept across retries; none for the committed
    /// version fetched again (its file was lost): that is never given up.
    fetch_deadline: Option<Instant>,
    /// It failed at the download's deadline: the next desired state (each
    /// connection brings one) starts the download again.
    rearm: bool,
    /// The last failure was the download's (not a digest or a load).
    last_fetch: bool,
    /// Digest and load failures so far: after [`MAX_BAD_ATTEMPTS`] it is
    /// given up (a download may fail for as long as its deadline allows).
    bad: u32,
    /// How many times the agent stopped while running it (persisted).
    interrupted: u32,
    /// The last shadow report: what a shadow out of time is judged on.
    shadowed: ShadowReport,
}

/// Digest or load failures after which an update is given up.
pub const MAX_BAD_ATTEMPTS: u32 = 5;

/// How many times a candidate may be found interrupted while it ran (a
/// crash, a power cut) before it is given up, as a bootloader counts boot
/// attempts: an agent killed by chance tries again, one the candidate
/// itself brings down does not loop.
pub const MAX_TRIES: u32 = 3;

impl Candidate {
    fn new(manifest: ModelManifest, phase: Phase, now: Instant) -> Self {
        let fetch_deadline = Some(after(now, manifest.policy().fetch_secs));
        let deadline = if phase.terminal() { None } else { fetch_deadline };
        Self {
            manifest,
            phase,
            attempts: 0,
            deadline,
            fetch_deadline,
            rearm: false,
            last_fetch: false,
            bad: 0,
            interrupted: 0,
            shadowed: ShadowReport::default(),
        }
    }

    fn enter(&mut self, phase: Phase, now: Instant) {
        let p = self.manifest.policy();
        if phase == Phase::Shadow {
            self.shadowed = ShadowReport::default();
        }
        self.deadline = match &phase {
            Phase::Fetching | Phase::Retrying { .. } => self.fetch_deadline,
            Phase::Verifying => Some(after(now, p.verify_secs)),
            Phase::Staged => Some(after(now, p.load_secs)),
            Phase::SelfTest => Some(after(now, p.selftest_secs)),
            Phase::Shadow => Some(after(now, p.shadow_secs)),
            Phase::Ready { since, .. } => Some(*since + secs(p.ready_secs) + secs(p.max_defer_secs)),
            Phase::Probation { until, .. } => Some(*until + HEALTH_GRACE),
            Phase::Failed { .. } | Phase::RolledBack { .. } | Phase::Refused { .. } => None,
        };
        self.phase = phase;
    }
}

/// The longest any policy time counts: ten years (a larger one in a signed
/// policy must not overflow the clock).
const MAX_POLICY_SECS: u64 = 10 * 365 * 24 * 3600;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s.min(MAX_POLICY_SECS))
}

fn after(now: Instant, s: u64) -> Instant {
    now + secs(s)
}

/// One model name's slot: the committed version, the one before it, and
/// the one on its way in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Slot {
    active: Option<Active>,
    previous: Option<ModelManifest>,
    candidate: Option<Candidate>,
    /// An update that ended (failed or rolled back) whose place as the
    /// candidate went to the committed version being fetched again: kept so
    /// that the same desired state does not start it again.
    given_up: Option<(ModelManifest, Phase)>,
    /// Until when an app on the device holds activation back (not
    /// persisted: a lease does not outlive the agent process).
    lease: Option<Instant>,
}

impl Slot {
    /// The committed version (serving, standing by during a probation, or
    /// being loaded again).
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

    /// The version the daemon serves under this name, if any.
    pub fn served(&self) -> Option<&ModelManifest> {
        match &self.candidate {
            Some(Candidate { manifest, phase: Phase::Probation { .. }, .. }) => Some(manifest),
            _ => self.active.as_ref().filter(|a| a.installed).map(|a| &a.manifest),
        }
    }
}

/// How far a persisted candidate had got.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Stage {
    /// Not yet running its code (downloading or verifying): resumed.
    #[default]
    Pending,
    /// Being loaded, tested or on probation: found after a restart, the
    /// agent stopped while running it; tried again after a pause until it
    /// has been interrupted [`MAX_TRIES`] times, then given up.
    Trying {
        /// The phase's name.
        phase: String,
    },
    /// Given up (failed, or rolled back when `rolled_back`).
    GaveUp {
        /// Why.
        reason: String,
        /// Whether it had served on probation.
        rolled_back: bool,
    },
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
    /// How far the candidate had got.
    pub stage: Stage,
    /// An ended update kept aside (see [`Slot`]), with its verdict (a
    /// [`Stage::GaveUp`]).
    pub given_up: Option<(ModelManifest, Stage)>,
    /// How many times the agent stopped while running the candidate,
    /// before the stop that left it [`Stage::Trying`] if it is.
    pub interrupted: u32,
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
    transitions: VecDeque<Transition>,
    /// Reasons to attach to the steps recorded next (a commit, or a phase
    /// entered without a reason of its own).
    notes: Vec<(String, u32, String)>,
    /// The device's local time when last given, and the instant it was read.
    clock: Option<(Instant, LocalTime)>,
}

/// A candidate's (version, phase, reason), and the committed version.
type Snapshot = (Option<(u32, &'static str, Option<String>)>, Option<u32>);

fn reason_of(p: &Phase) -> Option<String> {
    match p {
        Phase::Retrying { reason, .. }
        | Phase::Failed { reason }
        | Phase::RolledBack { reason }
        | Phase::Refused { reason }
        | Phase::Ready { reason, .. } => Some(reason.clone()),
        _ => None,
    }
}

/// Transitions kept until the daemon takes them.
pub const MAX_TRANSITIONS: usize = 256;

/// One step of an update, for the device's history: the phase a version
/// entered (or `committed`, or `abandoned` when the desired state moved on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// The phase entered.
    pub phase: String,
    /// Why, for failures, retries, refusals and rollbacks.
    pub reason: Option<String>,
    /// When.
    pub at: Instant,
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
            transitions: VecDeque::new(),
            notes: Vec::new(),
            clock: None,
        }
    }

    /// Slots restored from what was persisted: each committed version is
    /// loaded again (`Load`, then `Install` once loaded), each pending
    /// candidate's download resumes (`Fetch`), a candidate the agent was
    /// running when it stopped is tried again after a pause, or given up
    /// once that has happened [`MAX_TRIES`] times (its code may be what
    /// stops it), and previous versions stay as fallbacks.
    pub fn restore(formats: &[ModelFormat], persisted: Persisted, now: Instant) -> Self {
        Self::restore_after(formats, persisted, now, |_| None)
    }

    /// [`Slots::restore`] after the agent may have panicked, which with
    /// `panic=abort` ends the process: `blame(phase)` is what the panic said
    /// if it came from running the candidate in that phase (the daemon
    /// knows which thread runs what). Such a candidate is given up at once,
    /// not tried again. Otherwise (a SIGKILL, an out-of-memory kill, a power
    /// cut, a panic elsewhere) the stop may have been chance, and it is
    /// tried again up to [`MAX_TRIES`].
    pub fn restore_after(
        formats: &[ModelFormat],
        persisted: Persisted,
        now: Instant,
        blame: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let mut s = Self::new(formats);
        s.generation = persisted.generation;
        let mut persist = false;
        for p in persisted.slots {
            // What this agent no longer runs (it was started with fewer
            // formats) is neither loaded nor kept to fall back on.
            let mut slot = Slot { previous: p.previous.filter(|m| s.refusal_of(m).is_none()), ..Slot::default() };
            slot.given_up = p.given_up.map(|(m, stage)| {
                let phase = match stage {
                    Stage::GaveUp { reason, rolled_back: true } => Phase::RolledBack { reason },
                    Stage::GaveUp { reason, .. } => Phase::Failed { reason },
                    other => Phase::Failed { reason: format!("{other:?}") },
                };
                (m, phase)
            });
            if let Some(m) = p.active {
                match s.refusal_of(&m) {
                    None => {
                        s.actions.push_back(Action::Load(m.clone()));
                        slot.active = Some(Active { manifest: m, installed: false });
                    }
                    Some(reason) if p.candidate.is_none() => {
                        slot.candidate = Some(Candidate::new(m, Phase::Refused { reason }, now));
                    }
                    Some(_) => {}
                }
            }
            if let Some(m) = p.candidate {
                let mut interrupted = p.interrupted;
                let was_trying = matches!(p.stage, Stage::Trying { .. });
                let phase = match (s.refusal_of(&m), p.stage) {
                    (Some(reason), _) => Phase::Refused { reason },
                    (None, Stage::Pending) if golden_too_large(&m).is_some() => {
                        Phase::Refused { reason: golden_too_large(&m).expect("checked") }
                    }
                    (None, Stage::Pending) => {
                        s.actions.push_back(Action::Fetch(m.clone()));
                        Phase::Fetching
                    }
                    (None, Stage::Trying { phase }) if let Some(what) = blame(&phase) => Phase::Failed {
                        reason: format!(
                            "crashed in {phase}: the agent panicked while it was running this version ({what}); not tried again until the desired state changes"
                        ),
                    },
                    (None, Stage::Trying { phase }) => {
                        interrupted += 1;
                        let why = format!(
                            "interrupted in {phase}: the agent stopped (a crash or a power cut) while it was running this version, {interrupted} of {MAX_TRIES} times"
                        );
                        if interrupted >= MAX_TRIES {
                            Phase::Failed { reason: format!("{why}; not tried again until the desired state changes") }
                        } else {
                            Phase::Retrying { reason: why, retry_at: now + backoff(interrupted) }
                        }
                    }
                    (None, Stage::GaveUp { reason, rolled_back: false }) => Phase::Failed { reason },
                    (None, Stage::GaveUp { reason, rolled_back: true }) => Phase::RolledBack { reason },
                };
                // Decided now, and written at once: the next start must not
                // count this interruption again.
                if was_trying && s.refusal_of(&m).is_none() {
                    let t = Transition {
                        name: p.name.clone(),
                        version: m.version,
                        phase: phase.name().into(),
                        reason: reason_of(&phase),
                        at: now,
                    };
                    s.transitions.push_back(t);
                    persist = true;
                }
                let mut c = Candidate::new(m, phase, now);
                c.interrupted = interrupted;
                slot.candidate = Some(c);
            }
            s.slots.insert(p.name, slot);
        }
        if persist {
            s.actions.push_back(Action::Persist);
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
                .map(|(name, s)| {
                    let cand = s.candidate.as_ref().filter(|c| !matches!(c.phase, Phase::Refused { .. }));
                    let stage = match cand.map(|c| (&c.phase, c.rearm)) {
                        Some((p, _)) if p.trying() => Stage::Trying { phase: p.name().into() },
                        // A download out of time is resumed by the next start.
                        Some((Phase::Failed { .. }, true)) => Stage::Pending,
                        Some((p, _)) => gave_up(p),
                        None => Stage::Pending,
                    };
                    PersistedSlot {
                        name: name.clone(),
                        active: s.active.as_ref().map(|a| a.manifest.clone()),
                        previous: s.previous.clone(),
                        candidate: cand.map(|c| c.manifest.clone()),
                        stage,
                        given_up: s.given_up.as_ref().map(|(m, p)| (m.clone(), gave_up(p))),
                        interrupted: cand.map_or(0, |c| c.interrupted),
                    }
                })
                .collect(),
        }
    }

    /// What to persist when the agent stops on purpose: a candidate in
    /// shadow or on probation (long phases, which a reboot may well fall
    /// into) is written back as pending, so that a clean restart tries it
    /// again instead of taking the stop for a crash. One being loaded or
    /// self-tested stays "trying": a stop then (a watchdog's, say) may be
    /// its doing, and it must not be tried on every boot.
    pub fn persisted_for_stop(&self) -> Persisted {
        let mut p = self.persisted();
        for s in &mut p.slots {
            if matches!(&s.stage, Stage::Trying { phase } if phase == "shadow" || phase == "probation") {
                s.stage = Stage::Pending;
            }
        }
        p
    }

    /// The files any slot refers to (artifacts and golden vectors): what
    /// must stay on disk.
    pub fn referenced(&self) -> BTreeSet<Sha256Digest> {
        let mut out = BTreeSet::new();
        for s in self.slots.values() {
            let ms =
                s.active.iter().map(|a| &a.manifest).chain(&s.previous).chain(s.candidate.iter().map(|c| &c.manifest));
            for m in ms {
                out.insert(m.sha256);
                out.extend(m.selftest.map(|t| t.sha256));
            }
        }
        out
    }

    /// The loaded, not yet installed versions the daemon must keep: those
    /// being tested, shadowing or waiting to activate.
    pub fn holding(&self) -> BTreeSet<(String, u32)> {
        self.slots
            .iter()
            .filter_map(|(name, s)| s.candidate.as_ref().map(|c| (name, c)))
            .filter(|(_, c)| matches!(c.phase, Phase::SelfTest | Phase::Shadow | Phase::Ready { .. }))
            .map(|(name, c)| (name.clone(), c.manifest.version))
            .collect()
    }

    fn refusal_of(&self, m: &ModelManifest) -> Option<String> {
        (!self.formats.contains(&m.format)).then(|| {
            let runs: Vec<String> = self.formats.iter().map(|f| f.to_string()).collect();
            format!("{}:{} is {}; this agent build runs {}", m.name, m.version, m.format, runs.join(", "))
        })
    }

    fn set_desired_inner(&mut self, generation: u64, desired: Vec<ModelManifest>, now: Instant) {
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
            if slot.served().is_some() || slot.active.is_some() {
                self.actions.push_back(Action::Unload(name));
            }
        }
        for (name, manifest) in wanted {
            let refusal = self.refusal_of(&manifest);
            let slot = self.slots.entry(name).or_default();
            if slot.given_up.as_ref().is_some_and(|(m, _)| m.same_version(&manifest)) {
                continue; // ended already; the committed version is on its way back
            }
            slot.given_up = None;
            if slot.active.as_ref().is_some_and(|a| a.manifest.same_version(&manifest)) {
                if let Some(old) = slot.candidate.take() {
                    abandon(slot, old, &mut self.actions);
                }
                continue;
            }
            if let Some(c) = slot.candidate.as_mut().filter(|c| c.manifest.same_version(&manifest)) {
                // A download that ran out of time while the device was cut
                // off starts again once the coordinator is back.
                if c.rearm && refusal.is_none() {
                    let interrupted = c.interrupted;
                    *c = Candidate::new(manifest.clone(), Phase::Fetching, now);
                    c.interrupted = interrupted;
                    self.actions.push_back(Action::Fetch(manifest));
                }
                continue;
            }
            let phase = match refusal.or_else(|| golden_too_large(&manifest)) {
                Some(reason) => Phase::Refused { reason },
                None => {
                    self.actions.push_back(Action::Fetch(manifest.clone()));
                    Phase::Fetching
                }
            };
            if let Some(old) = slot.candidate.replace(Candidate::new(manifest, phase, now)) {
                abandon(slot, old, &mut self.actions);
            }
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

    fn handle_inner(&mut self, event: Event, now: Instant) -> Result<bool, Disallowed> {
        let (name, version) = event.target();
        let disallowed = |state: String| Disallowed { event: event.kind(), name: name.to_owned(), version, state };
        let Some(slot) = self.slots.get_mut(name) else {
            return Ok(false);
        };
        if let Some(cand) = slot.candidate.as_mut().filter(|c| c.manifest.version == version) {
            if matches!(cand.phase, Phase::Failed { .. } | Phase::RolledBack { .. }) {
                return Ok(false); // work that was in flight when the update ended
            }
            // The shadow thread reports until it is dropped: after shadow
            // ended, what it says is stale.
            if matches!(event, Event::Shadowed { .. } | Event::ShadowFailed { .. }) && cand.phase != Phase::Shadow {
                return Ok(false);
            }
            let m = cand.manifest.clone();
            let policy = m.policy();
            let actions = &mut self.actions;
            match (&event, &cand.phase) {
                (Event::Fetched { .. }, Phase::Fetching) => {
                    cand.enter(Phase::Verifying, now);
                    actions.push_back(Action::Verify(m));
                }
                (Event::Verified { .. }, Phase::Verifying) => {
                    // Durable before the load starts: see `Phase::Staged`.
                    cand.enter(Phase::Staged, now);
                    actions.push_back(Action::Persist);
                    actions.push_back(Action::Load(m));
                }
                (Event::FetchFailed { reason, .. }, Phase::Fetching)
                | (Event::VerifyFailed { reason, .. }, Phase::Verifying)
                | (Event::LoadFailed { reason, .. }, Phase::Staged) => {
                    cand.attempts += 1;
                    cand.last_fetch = matches!(event, Event::FetchFailed { .. });
                    cand.bad += u32::from(!cand.last_fetch);
                    let was_staged = cand.phase == Phase::Staged;
                    if cand.bad >= MAX_BAD_ATTEMPTS {
                        let reason = format!("gave up after {} failed checks or loads; last: {reason}", cand.bad);
                        cand.enter(Phase::Failed { reason }, now);
                        actions.push_back(Action::Persist);
                    } else {
                        let retry_at = now + backoff(cand.attempts);
                        cand.enter(Phase::Retrying { reason: reason.clone(), retry_at }, now);
                        if was_staged {
                            actions.push_back(Action::Persist);
                        }
                    }
                }
                (Event::Loaded { .. }, Phase::Staged) => {
                    cand.enter(Phase::SelfTest, now);
                    actions.push_back(Action::Persist);
                    actions.push_back(Action::SelfTest(m));
                }
                (Event::SelfTestPassed { .. }, Phase::SelfTest) => {
                    // Shadowing needs a serving version to compare with.
                    if policy.shadow_requests > 0 && slot.active.as_ref().is_some_and(|a| a.installed) {
                        cand.enter(Phase::Shadow, now);
                        actions.push_back(Action::Persist);
                        actions.push_back(Action::Shadow(m));
                    } else {
                        activate_or_wait(slot, self.clock, now, actions);
                    }
                }
                (Event::SelfTestFailed { reason, .. }, Phase::SelfTest) => {
                    cand.enter(Phase::Failed { reason: format!("self-test failed: {reason}") }, now);
                    actions.push_back(Action::Persist);
                }
                (Event::InstallFailed { reason, .. }, Phase::Probation { .. }) => {
                    // Never served: the committed version still does. Tried
                    // again (a disk that fills may empty), as a failed load is.
                    if let Some(a) = slot.active.as_mut() {
                        a.installed = true;
                    }
                    let cand = slot.candidate.as_mut().expect("matched above");
                    cand.attempts += 1;
                    cand.bad += 1;
                    // Its download is long done: the retry gets a deadline of
                    // its own, not what is left of the first one.
                    cand.fetch_deadline = Some(after(now, policy.fetch_secs));
                    cand.last_fetch = false;
                    if cand.bad >= MAX_BAD_ATTEMPTS {
                        let reason = format!("gave up after {} failed checks or loads; last: {reason}", cand.bad);
                        cand.enter(Phase::Failed { reason }, now);
                    } else {
                        let retry_at = now + backoff(cand.attempts);
                        cand.enter(Phase::Retrying { reason: reason.clone(), retry_at }, now);
                    }
                    actions.push_back(Action::Persist);
                }
                (Event::ShadowFailed { reason, .. }, Phase::Shadow) => {
                    cand.enter(Phase::Failed { reason: format!("shadow: {reason}") }, now);
                    actions.push_back(Action::Persist);
                }
                (Event::Shadowed { report, .. }, Phase::Shadow) => {
                    cand.shadowed = *report;
                    if report.compared >= u64::from(policy.shadow_requests) {
                        end_shadow(slot, self.clock, now, actions, &mut self.notes, false);
                    }
                }
                (Event::Health { health, .. }, Phase::Probation { until, .. }) => {
                    if let Some(reason) = breach(&policy, health) {
                        roll_back(slot, reason, now, actions);
                    } else if now >= *until && health.hook != HookVerdict::Pending {
                        // Too little traffic to judge by is no reason to
                        // hold a version back for ever; the history says so.
                        let min = u64::from(policy.probation_min_requests);
                        if health.requests < min {
                            let note = format!(
                                "on {} requests, fewer than the {min} its error and p99 limits need",
                                health.requests
                            );
                            self.notes.push((name.to_owned(), version, note));
                        }
                        commit(slot, actions);
                    }
                }
                (_, phase) => return Err(disallowed(phase.to_string())),
            }
            return Ok(true);
        }
        let Some(active) = slot.active.as_mut().filter(|a| a.manifest.version == version) else {
            return Ok(false);
        };
        // A shadow's last report after its version committed: stale.
        if matches!(event, Event::Shadowed { .. } | Event::ShadowFailed { .. }) {
            return Ok(false);
        }
        match (&event, active.installed) {
            // The committed version, loaded again after a restart or a rollback.
            (Event::Loaded { .. }, false) => {
                active.installed = true;
                self.actions.push_back(Action::Install(active.manifest.clone()));
            }
            // It no longer loads (its file is gone or corrupt, or this build
            // cannot run it): fall back on the previous version, and try
            // the failed one again as a candidate if nothing else is on the way.
            (Event::LoadFailed { reason, .. }, false) => {
                let failed = slot.active.take().expect("matched above").manifest;
                if let Some(previous) = slot.previous.take() {
                    self.actions.push_back(Action::Load(previous.clone()));
                    slot.active = Some(Active { manifest: previous, installed: false });
                } else if slot.served().is_none() {
                    self.actions.push_back(Action::Unload(name.to_owned()));
                }
                // Fetched again, without a deadline, unless another version
                // is on its way: a candidate whose update ended is no such
                // thing, and gives way.
                if slot.candidate.as_ref().is_none_or(|c| c.phase.terminal()) {
                    if let Some(ended) = slot.candidate.take().filter(|c| !matches!(c.phase, Phase::Refused { .. })) {
                        slot.given_up = Some((ended.manifest, ended.phase));
                    }
                    let mut c = Candidate::new(failed, Phase::Fetching, now);
                    c.fetch_deadline = None;
                    c.attempts = 1;
                    c.enter(Phase::Retrying { reason: reason.clone(), retry_at: now + backoff(1) }, now);
                    slot.candidate = Some(c);
                } else if slot.previous.is_none() {
                    slot.previous = Some(failed);
                }
                self.actions.push_back(Action::Persist);
            }
            (_, true) => return Err(disallowed("serving".into())),
            (_, false) => return Err(disallowed("loading again".into())),
        }
        Ok(true)
    }

    fn handle_timeout_inner(&mut self, now: Instant) {
        for slot in self.slots.values_mut() {
            let Some(c) = slot.candidate.as_mut() else { continue };
            if c.deadline.is_some_and(|d| d <= now) && c.phase == Phase::Shadow {
                // "N requests or T seconds": at T it is judged on what it saw.
                end_shadow(slot, self.clock, now, &mut self.actions, &mut self.notes, true);
                continue;
            }
            if c.deadline.is_some_and(|d| d <= now) {
                let phase = c.phase.name();
                let reason = format!("{phase} passed its deadline");
                if matches!(c.phase, Phase::Probation { .. }) {
                    roll_back(slot, format!("{reason} (no health report)"), now, &mut self.actions);
                } else {
                    let reason = match &c.phase {
                        Phase::Retrying { reason: last, .. } => format!("{reason}; last error: {last}"),
                        _ => reason,
                    };
                    c.rearm =
                        matches!(c.phase, Phase::Fetching) || matches!(c.phase, Phase::Retrying { .. }) && c.last_fetch;
                    c.enter(Phase::Failed { reason }, now);
                    self.actions.push_back(Action::Persist);
                }
                continue;
            }
            match &mut c.phase {
                Phase::Retrying { retry_at, .. } if *retry_at <= now => {
                    c.enter(Phase::Fetching, now);
                    self.actions.push_back(Action::Fetch(c.manifest.clone()));
                }
                Phase::Probation { check_at, .. } if *check_at <= now => {
                    *check_at = now + HEALTH_EVERY;
                    self.actions.push_back(Action::CheckHealth(c.manifest.clone()));
                }
                Phase::Ready { check_at, .. } if *check_at <= now => {
                    activate_or_wait(slot, self.clock, now, &mut self.actions);
                }
                _ => {}
            }
        }
    }

    /// Applies a desired state (manifests already verified). Older
    /// generations than the last applied are ignored: the stream may replay.
    /// A manifest this agent cannot run is refused on its own, with the
    /// reason in its status; the others go ahead. A candidate the new state
    /// no longer names is abandoned; if it was on probation, the committed
    /// version is loaded to serve again.
    pub fn set_desired(&mut self, generation: u64, desired: Vec<ModelManifest>, now: Instant) {
        let before = self.phases();
        self.set_desired_inner(generation, desired, now);
        self.record(before, now);
    }

    /// Feeds back the outcome of an action. Outcomes for a version that is
    /// no longer expected (superseded, or its update already ended) are
    /// stale and ignored (`Ok(false)`): a load that finishes after a newer
    /// one is never installed.
    pub fn handle(&mut self, event: Event, now: Instant) -> Result<bool, Disallowed> {
        let before = self.phases();
        let r = self.handle_inner(event, now);
        self.record(before, now);
        r
    }

    /// Restarts failed downloads whose retry time has come, asks for the
    /// health of versions on probation, and fails updates past a deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        let before = self.phases();
        self.handle_timeout_inner(now);
        self.record(before, now);
    }

    /// Each slot's candidate (version, phase, reason) and committed version.
    fn phases(&self) -> BTreeMap<String, Snapshot> {
        self.slots
            .iter()
            .map(|(name, s)| {
                let cand = s.candidate.as_ref().map(|c| (c.manifest.version, c.phase.name(), reason_of(&c.phase)));
                (name.clone(), (cand, s.active.as_ref().map(|a| a.manifest.version)))
            })
            .collect()
    }

    /// Queues a [`Transition`] for every candidate whose phase changed since
    /// `before` (at most [`MAX_TRANSITIONS`] kept; the oldest go first).
    fn record(&mut self, before: BTreeMap<String, Snapshot>, now: Instant) {
        let after = self.phases();
        let notes = std::mem::take(&mut self.notes);
        let mut push = |name: &str, version: u32, phase: &str, reason: Option<String>| {
            if self.transitions.len() == MAX_TRANSITIONS {
                self.transitions.pop_front();
            }
            self.transitions.push_back(Transition { name: name.into(), version, phase: phase.into(), reason, at: now });
        };
        for (name, (cand, active)) in &after {
            let (old_cand, _) = before.get(name).cloned().unwrap_or((None, None));
            if cand.as_ref().map(|c| (c.0, c.1)) != old_cand.as_ref().map(|c| (c.0, c.1))
                && let Some((v, phase, reason)) = cand
            {
                let note = || notes.iter().find(|(n, nv, _)| n == name && nv == v).map(|(_, _, r)| r.clone());
                push(name, *v, phase, reason.clone().or_else(note));
            }
            if let Some((v, _, _)) = old_cand
                && cand.as_ref().is_none_or(|c| c.0 != v)
            {
                if *active == Some(v) {
                    let note = notes.iter().find(|(n, nv, _)| n == name && *nv == v).map(|(_, _, r)| r.clone());
                    push(name, v, "committed", note);
                } else {
                    push(name, v, "abandoned", Some("the desired state names another version".into()));
                }
            }
        }
        for (name, (old_cand, _)) in &before {
            if !after.contains_key(name)
                && let Some((v, _, _)) = old_cand
            {
                push(name, *v, "abandoned", Some("the model is no longer desired".into()));
            }
        }
    }

    /// Gives the device's local time, read at `now`, against which
    /// maintenance windows are checked (until the next reading, it is
    /// counted on from this one).
    pub fn set_local_time(&mut self, now: Instant, local: LocalTime) {
        self.clock = Some((now, local));
    }

    /// An app on the device holds activation of `name` back for `wanted`
    /// seconds from `now`, at most the policy's `max_defer_secs` (which also
    /// caps the whole wait of one version, renewals included). Returns the
    /// seconds granted. A version already serving is not taken back.
    pub fn defer(&mut self, name: &str, wanted: u64, now: Instant) -> Result<u64, DeferError> {
        let slot = self.slots.get_mut(name).ok_or_else(|| DeferError::NoSuchModel(name.into()))?;
        let policy = slot
            .candidate
            .as_ref()
            .map(|c| c.manifest.policy())
            .or_else(|| slot.active.as_ref().map(|a| a.manifest.policy()))
            .ok_or_else(|| DeferError::NoSuchModel(name.into()))?;
        if policy.max_defer_secs == 0 {
            return Err(DeferError::NotAllowed(name.into()));
        }
        // A version already held by a lease has only what is left of its allowance.
        let left = match slot.candidate.as_ref().map(|c| &c.phase) {
            Some(Phase::Ready { deferred: Some(d), .. }) => {
                (*d + secs(policy.max_defer_secs)).saturating_duration_since(now).as_secs()
            }
            _ => policy.max_defer_secs,
        };
        if left == 0 {
            return Err(DeferError::Exhausted { name: name.into(), max: policy.max_defer_secs });
        }
        let granted = wanted.min(left).min(MAX_POLICY_SECS);
        // Leases of several apps: the longest holds.
        let until = now + Duration::from_secs(granted);
        slot.lease = Some(slot.lease.map_or(until, |l| l.max(until)));
        Ok(slot.lease.map_or(0, |l| l.saturating_duration_since(now).as_secs()))
    }

    /// Ends an app's defer lease on `name`; a version waiting only for it
    /// activates now. Returns whether a lease was held.
    pub fn release(&mut self, name: &str, now: Instant) -> Result<bool, DeferError> {
        let slot = self.slots.get_mut(name).ok_or_else(|| DeferError::NoSuchModel(name.into()))?;
        let held = slot.lease.take().is_some_and(|until| until > now);
        if slot.candidate.as_ref().is_some_and(|c| matches!(c.phase, Phase::Ready { .. })) {
            let before = self.phases();
            let slot = self.slots.get_mut(name).expect("looked up above");
            activate_or_wait(slot, self.clock, now, &mut self.actions);
            self.record(before, now);
        }
        Ok(held)
    }

    /// The next recorded transition, oldest first.
    pub fn poll_transition(&mut self) -> Option<Transition> {
        self.transitions.pop_front()
    }

    /// When [`Slots::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.slots
            .values()
            .filter_map(|s| s.candidate.as_ref())
            .flat_map(|c| {
                let step = match &c.phase {
                    Phase::Retrying { retry_at, .. } => Some(*retry_at),
                    Phase::Probation { check_at, .. } | Phase::Ready { check_at, .. } => Some(*check_at),
                    _ => None,
                };
                [step, c.deadline]
            })
            .flatten()
            .min()
    }

    /// The next piece of work, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// What to tell the coordinator: committed versions (serving, or loading
    /// again), and candidates with their phase. The wire's states predate
    /// the update phases: tests report as `verifying`, probation as
    /// `serving`, each with the phase in `detail`.
    pub fn status(&self) -> Vec<ModelStatus> {
        let mut out = Vec::new();
        for (name, slot) in &self.slots {
            let probation = matches!(slot.candidate.as_ref().map(|c| &c.phase), Some(Phase::Probation { .. }));
            if let Some(a) = &slot.active
                && (!probation || a.installed)
            {
                let state = if a.installed { ModelState::Serving } else { ModelState::Loading };
                out.push(ModelStatus { name: name.clone(), version: a.manifest.version, state, detail: None });
            }
            if let Some((m, phase)) = &slot.given_up {
                let detail = match phase {
                    Phase::RolledBack { reason } => format!("rolled back: {reason}"),
                    other => reason_of(other).unwrap_or_default(),
                };
                out.push(ModelStatus {
                    name: name.clone(),
                    version: m.version,
                    state: ModelState::Failed,
                    detail: Some(detail),
                });
            }
            if let Some(c) = &slot.candidate {
                let standby = slot.active.as_ref().map(|a| a.manifest.version);
                let (state, detail) = match &c.phase {
                    Phase::Fetching => (ModelState::Downloading, None),
                    Phase::Verifying => (ModelState::Verifying, None),
                    Phase::Staged => (ModelState::Loading, None),
                    Phase::SelfTest => (ModelState::Verifying, Some("self-test".to_string())),
                    Phase::Shadow => (ModelState::Verifying, Some("shadow".to_string())),
                    Phase::Ready { reason, .. } => (ModelState::Verifying, Some(format!("ready: {reason}"))),
                    Phase::Probation { .. } => (
                        ModelState::Serving,
                        Some(match standby {
                            Some(v) => format!("probation; version {v} stands by"),
                            None => "probation".to_string(),
                        }),
                    ),
                    Phase::Retrying { reason, .. } => (ModelState::Failed, Some(format!("{reason} (will retry)"))),
                    Phase::Failed { reason } | Phase::Refused { reason } => (ModelState::Failed, Some(reason.clone())),
                    Phase::RolledBack { reason } => (ModelState::Failed, Some(format!("rolled back: {reason}"))),
                };
                out.push(ModelStatus { name: name.clone(), version: c.manifest.version, state, detail });
            }
        }
        out
    }
}

/// Why a new candidate's golden vectors are refused before download, if
/// they are (a committed version never runs them again, and is not refused).
fn golden_too_large(m: &ModelManifest) -> Option<String> {
    m.selftest.filter(|t| t.size > MAX_GOLDEN_BYTES).map(|t| {
        format!(
            "{}:{} has {} bytes of golden vectors; this agent takes at most {MAX_GOLDEN_BYTES}",
            m.name, m.version, t.size
        )
    })
}

/// How a phase is persisted once its update ended.
fn gave_up(p: &Phase) -> Stage {
    match p {
        Phase::Failed { reason } => Stage::GaveUp { reason: reason.clone(), rolled_back: false },
        Phase::RolledBack { reason } => Stage::GaveUp { reason: reason.clone(), rolled_back: true },
        _ => Stage::Pending,
    }
}

/// Why `health` breaks `policy`'s probation limits, if it does.
fn breach(policy: &tern_proto::UpdatePolicy, health: &Health) -> Option<String> {
    if let HookVerdict::Failed(reason) = &health.hook {
        return Some(format!("probation: the app's health hook failed: {reason}"));
    }
    if health.requests < u64::from(policy.probation_min_requests.max(1)) {
        return None;
    }
    let permille = health.errors.saturating_mul(1000) / health.requests;
    if permille > u64::from(policy.probation_max_error_permille) {
        return Some(format!(
            "probation: {} of {} requests failed ({permille}‰, at most {}‰ allowed)",
            health.errors, health.requests, policy.probation_max_error_permille
        ));
    }
    let max_us = u64::from(policy.probation_max_p99_ms) * 1000;
    if max_us > 0 && health.p99_us > max_us {
        return Some(format!(
            "probation: p99 latency {:.1} ms over {} requests (at most {} ms allowed)",
            health.p99_us as f64 / 1000.0,
            health.requests,
            policy.probation_max_p99_ms
        ));
    }
    None
}

/// The device's local time at `now`, from the last reading.
fn local_at((read, local): (Instant, LocalTime), now: Instant) -> LocalTime {
    let minutes = now.saturating_duration_since(read).as_secs() / 60;
    let of_day = (u64::from(local.minute) + minutes) % u64::from(MINUTES_PER_DAY);
    let days = (u64::from(local.minute) + minutes) / u64::from(MINUTES_PER_DAY);
    LocalTime { weekday: ((u64::from(local.weekday) + days) % 7) as u8, minute: of_day as u16 }
}

const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// What keeps a tested candidate from activating at `now`, if anything:
/// why, when to look again, and whether it is an app's lease (counted
/// against `max_defer_secs` from `deferred`, or from now if it starts now).
fn hold(
    policy: &UpdatePolicy,
    lease: Option<Instant>,
    deferred: Option<Instant>,
    clock: Option<(Instant, LocalTime)>,
    now: Instant,
) -> Option<(String, Instant, bool)> {
    if let Some(w) = policy.window {
        let local = clock.map(|c| local_at(c, now));
        let reason = match local.map(|l| (l, w.opens_in(l))) {
            Some((_, Some(0))) => None,
            // The opening as a local time (not a countdown): the status
            // does not change every minute of a long wait.
            Some((l, Some(m))) => {
                let at = local_at((now, l), now + Duration::from_secs(u64::from(m) * 60));
                let day = WEEKDAYS[usize::from(at.weekday % 7)];
                Some(format!(
                    "outside the maintenance window (opens {day} {:02}:{:02})",
                    at.minute / 60,
                    at.minute % 60
                ))
            }
            Some((_, None)) => Some("the maintenance window never opens".to_string()),
            None => Some("outside the maintenance window (the device's local time is unknown)".to_string()),
        };
        if let Some(reason) = reason {
            return Some((reason, now + READY_EVERY, false));
        }
    }
    let limit = deferred.unwrap_or(now) + secs(policy.max_defer_secs);
    match lease {
        Some(until) if until > now && now < limit => {
            Some(("deferred by an app on the device".to_string(), until.min(limit).min(now + READY_EVERY), true))
        }
        _ => None,
    }
}

/// A candidate that passed its tests activates, or waits in
/// [`Phase::Ready`] for the window or a lease.
fn activate_or_wait(
    slot: &mut Slot,
    clock: Option<(Instant, LocalTime)>,
    now: Instant,
    actions: &mut VecDeque<Action>,
) {
    // With nothing serving under the name (a first install, or the
    // committed version fetched again) there is nothing to disrupt.
    if slot.served().is_none() {
        return start_probation(slot, now, actions);
    }
    let lease = slot.lease;
    let cand = slot.candidate.as_mut().expect("a candidate");
    let deferred = match &cand.phase {
        Phase::Ready { deferred, .. } => *deferred,
        _ => None,
    };
    match hold(&cand.manifest.policy(), lease, deferred, clock, now) {
        None => start_probation(slot, now, actions),
        Some((reason, check_at, by_lease)) => {
            let deferred = if by_lease { deferred.or(Some(now)) } else { deferred };
            match &mut cand.phase {
                Phase::Ready { reason: r, check_at: c, deferred: d, .. } => (*r, *c, *d) = (reason, check_at, deferred),
                _ => {
                    cand.enter(Phase::Ready { reason, since: now, deferred, check_at }, now);
                    actions.push_back(Action::Persist);
                }
            }
        }
    }
}

/// Shadow is over (it saw the requests its policy asks for, or its time
/// ran out): the candidate goes on if it agreed often enough and was not
/// too slow beside the serving version, else the update fails. What it
/// showed is noted on the next step of the history.
fn end_shadow(
    slot: &mut Slot,
    clock: Option<(Instant, LocalTime)>,
    now: Instant,
    actions: &mut VecDeque<Action>,
    notes: &mut Vec<(String, u32, String)>,
    out_of_time: bool,
) {
    let cand = slot.candidate.as_mut().expect("a candidate");
    let p = cand.manifest.policy();
    let r = cand.shadowed;
    let key = (cand.manifest.name.clone(), cand.manifest.version);
    let seen = if out_of_time {
        format!("shadow ended at its {} s limit after {} of {} requests", p.shadow_secs, r.compared, p.shadow_requests)
    } else {
        "shadow".to_string()
    };
    // A run under way for far longer than the serving version takes is a
    // candidate that hangs or crawls; one merely started late is left out.
    let grace = SHADOW_RUN_GRACE.max(Duration::from_micros(r.serving_p99_us.saturating_mul(10)));
    // One under way within its grace: the verdict waits for it, until the
    // grace is over (a bounded extension of shadow's deadline).
    if let Some(since) = r.running_since.filter(|s| out_of_time && now.saturating_duration_since(*s) <= grace) {
        cand.deadline = Some(since + grace + Duration::from_millis(1));
        return;
    }
    if let Some(since) = r.running_since.filter(|s| now.saturating_duration_since(*s) > grace) {
        let reason = format!(
            "{seen}: a run on a live request had been under way for {} s on the candidate (at most {} s allowed)",
            now.saturating_duration_since(since).as_secs(),
            grace.as_secs()
        );
        cand.enter(Phase::Failed { reason }, now);
        return actions.push_back(Action::Persist);
    }
    if r.compared == 0 {
        // No live request came: nothing speaks against it, and its
        // self-test passed; probation judges it on what it serves.
        notes.push((key.0, key.1, format!("{seen}; nothing to compare, went on on its self-test")));
        return activate_or_wait(slot, clock, now, actions);
    }
    let permille = r.agreed.saturating_mul(1000) / r.compared;
    let agreed = format!("agreed with the serving version on {} of {} requests ({permille}‰", r.agreed, r.compared);
    if permille < u64::from(p.shadow_min_agreement_permille) {
        let reason = format!("{seen}: {agreed}, at least {}‰ needed)", p.shadow_min_agreement_permille);
        cand.enter(Phase::Failed { reason }, now);
        return actions.push_back(Action::Persist);
    }
    let slowdown = r.candidate_p99_us.saturating_mul(1000) / r.serving_p99_us.max(1);
    let latency =
        format!("p99 {} µs beside the serving version's {} µs ({slowdown}‰", r.candidate_p99_us, r.serving_p99_us);
    // No latency to judge before a second run (the first is the warm-up).
    let timed = r.candidate_p99_us > 0 && r.serving_p99_us > 0;
    if p.shadow_max_p99_permille > 0 && timed && slowdown > u64::from(p.shadow_max_p99_permille) {
        let reason = format!("{seen}: {latency}, at most {}‰ allowed)", p.shadow_max_p99_permille);
        cand.enter(Phase::Failed { reason }, now);
        return actions.push_back(Action::Persist);
    }
    notes.push((key.0, key.1, format!("{seen}: {agreed}), {latency})")));
    activate_or_wait(slot, clock, now, actions);
}

/// The candidate starts serving, on probation; the committed version stands by.
fn start_probation(slot: &mut Slot, now: Instant, actions: &mut VecDeque<Action>) {
    let cand = slot.candidate.as_mut().expect("a candidate");
    let until = now + secs(cand.manifest.policy().probation_secs);
    cand.enter(Phase::Probation { until, check_at: now + HEALTH_EVERY.min(until - now) }, now);
    actions.push_back(Action::Persist);
    actions.push_back(Action::Install(cand.manifest.clone()));
    if let Some(a) = slot.active.as_mut() {
        a.installed = false;
    }
}

/// Probation passed: the candidate is the committed version.
fn commit(slot: &mut Slot, actions: &mut VecDeque<Action>) {
    let cand = slot.candidate.take().expect("a candidate");
    if let Some(old) = slot.active.take() {
        slot.previous = Some(old.manifest);
    }
    slot.active = Some(Active { manifest: cand.manifest, installed: true });
    actions.push_back(Action::Persist);
}

/// Probation failed: the committed version is loaded to serve again (or, if
/// there is none, nothing serves under the name).
fn roll_back(slot: &mut Slot, reason: String, now: Instant, actions: &mut VecDeque<Action>) {
    let cand = slot.candidate.as_mut().expect("a candidate");
    cand.enter(Phase::RolledBack { reason }, now);
    restore_committed(slot, actions);
    actions.push_back(Action::Persist);
}

/// A candidate the desired state no longer names: if it served (on
/// probation), the committed version takes over again; if there is none, it
/// is committed as it stands (it has served within its limits so far), so
/// that the device keeps a model while the next one comes.
fn abandon(slot: &mut Slot, old: Candidate, actions: &mut VecDeque<Action>) {
    if !matches!(old.phase, Phase::Probation { .. }) {
        return;
    }
    if slot.active.is_none() {
        slot.active = Some(Active { manifest: old.manifest, installed: true });
    } else {
        restore_committed(slot, actions);
    }
}

fn restore_committed(slot: &mut Slot, actions: &mut VecDeque<Action>) {
    match slot.active.as_ref() {
        Some(a) if !a.installed => actions.push_back(Action::Load(a.manifest.clone())),
        Some(_) => {}
        None => {
            let name = slot.candidate.as_ref().map(|c| c.manifest.name.clone());
            actions.extend(name.map(Action::Unload));
        }
    }
}

#[cfg(test)]
#[path = "slots_tests.rs"]
mod tests;
