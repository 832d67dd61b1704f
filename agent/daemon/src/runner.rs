//! The agent's main loop: one `select!` over the link, the results of work
//! in flight, retry timers and health changes. It feeds the core
//! (`tern_agent_core::Slots`) and carries out the actions the core emits,
//! and nothing else: a model is served only when the core says `Install`,
//! so a load that finishes after a newer one is dropped, never installed.

use crate::api::{self, Served, Shared};
use crate::gate::Gate;
use crate::hook::Hook;
use crate::link::FromLink;
use crate::models_thread::ModelsThread;
use crate::store::Persister;
use crate::trust::{Incoming, Trust};
use crate::update;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tern_agent_core::{Action, DeferError, Event, Health, HookVerdict, Phase, Slots};
use tern_proto::{LocalTime, MAX_HISTORY, ModelManifest, Sha256Digest, StatusReport, UpdateEvent};
use tern_runtime::Backend;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

/// A download in flight.
pub type Fetching = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The work the core asks for, done for real by the daemon (downloads over
/// QUIC, files in `models/`) and by a stand-in in tests.
pub trait Work: Send + Sync + 'static {
    /// Downloads the artifact of `m` and its golden vectors into `models/`.
    fn fetch(&self, m: ModelManifest) -> Fetching;
    /// Checks both files on disk against `m`'s digests. Blocks: run off the runtime.
    fn verify(&self, m: &ModelManifest) -> Result<(), String>;
    /// Loads the verified artifact of `m`. Blocks: run off the runtime.
    fn load(&self, m: &ModelManifest) -> Result<Arc<dyn Backend>, String>;
    /// The verified golden vectors of `m`, if it has any. Blocks.
    fn golden(&self, m: &ModelManifest) -> Result<Option<Vec<u8>>, String>;
    /// The verified baseline of `m`, if it has one. Blocks (a file of at
    /// most 1 MiB).
    fn baseline(&self, m: &ModelManifest) -> Result<Option<Vec<u8>>, String> {
        let _ = m;
        Ok(None)
    }
}

/// The result of a piece of work, back on the main loop.
enum Done {
    Fetched(Sha256Digest, Result<(), String>),
    /// An event with nothing attached (verify, self-test and shadow outcomes).
    Event(Event),
    Loaded(Event, Option<Arc<dyn Backend>>),
    /// An app health hook answered for (name, hook run id).
    Hook(String, u64, Result<(), String>),
    /// The slots of this generation are on disk.
    Durable(u64),
    /// A candidate to install once its probation was on disk, or not.
    Installable(Box<ModelManifest>, Arc<dyn Backend>, Result<(), String>),
}

/// The main loop's state.
pub struct Runner<W: Work> {
    slots: Slots,
    work: Arc<W>,
    shared: Arc<Shared>,
    trust: Trust,
    persister: Persister,
    live: Arc<Mutex<BTreeSet<Sha256Digest>>>,
    status: watch::Sender<StatusReport>,
    /// The most recent update steps, for the coordinator (wire v3 on).
    history: watch::Sender<Vec<UpdateEvent>>,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    /// Models loaded and not yet installed, by (name, version): kept while
    /// the core holds them (self-test, shadow) and until it installs them.
    loaded: HashMap<(String, u32), Arc<dyn Backend>>,
    /// Downloads in flight, by digest, with the versions waiting for each:
    /// one download per artifact, however many slots want it.
    fetching: HashMap<Sha256Digest, Vec<(String, u32)>>,
    /// Where verifying, loading and self-testing run, one at a time.
    models_thread: ModelsThread,
    hooks: Hooks,
    hook_runs: HashMap<String, HookRun>,
    next_hook_run: u64,
    leases: mpsc::Receiver<LeaseRequest>,
    /// When the local time was last given to the core.
    clock_read: Option<Instant>,
    /// The newest generation known to be on disk: the one reported, so
    /// that what the coordinator is told never goes back after a power cut.
    durable_generation: u64,
    /// The persister's snapshot last waited for (see [`crate::store::Durable::seq`]).
    awaited: u64,
}

/// Runs `f`, turning a panic (where panics unwind) into an error: a panic
/// in the runtime while loading or testing a candidate fails that step.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
        Err(format!("the runtime panicked: {}", what.unwrap_or_default()))
    })
}

/// The local time of the week, from the C library (TZ, else
/// /etc/localtime, read again each call so that a changed zone is seen);
/// none if it cannot tell.
#[allow(unsafe_code)]
pub fn local_time() -> Option<LocalTime> {
    unsafe extern "C" {
        fn tzset();
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    let t = libc::time_t::try_from(now).ok()?;
    // SAFETY: `tm` is plain data that localtime_r fills in; both pointers
    // are valid for the call, and localtime_r (unlike localtime) keeps no
    // pointer to them. tzset only reads the environment and zone files.
    let tm = unsafe {
        tzset();
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return None;
        }
        tm
    };
    // tm_wday counts from Sunday.
    let weekday = u8::try_from((tm.tm_wday + 6) % 7).ok()?;
    let minute = u16::try_from(tm.tm_hour * 60 + tm.tm_min).ok()?;
    Some(LocalTime { weekday, minute })
}

/// How often the local time is read again (the core counts on from the
/// last reading in between).
const LOCAL_TIME_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// How often an app's health hook is asked about a version on probation.
pub const HOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The app health hooks of the models that have one.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// By model name.
    pub by_model: HashMap<String, Hook>,
    /// How long one check may take.
    pub timeout: std::time::Duration,
}

/// One model's hook checks for its version on one probation.
struct HookRun {
    /// Tells this probation's answers from those of an earlier one.
    id: u64,
    version: u32,
    running: bool,
    verdict: HookVerdict,
    next_at: Instant,
}

/// What an app asks of a model's defer lease through the local API.
#[derive(Debug)]
pub enum LeaseOp {
    /// Hold activation back for this many seconds.
    Defer(u64),
    /// End the lease.
    Release,
}

/// A lease request with where its answer goes: the seconds granted (or, for
/// a release, 1 if a lease was held and 0 if not).
pub type LeaseRequest = (String, LeaseOp, tokio::sync::oneshot::Sender<Result<u64, DeferError>>);

impl<W: Work> Runner<W> {
    /// A runner over restored `slots`. `live` is shared with the persister:
    /// what the slots refer to now, so it never removes a file in use.
    /// `complete`: the slots are all the agent had (false after its state
    /// could not be read: then nothing on disk is removed at start).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        slots: Slots,
        complete: bool,
        work: Arc<W>,
        shared: Arc<Shared>,
        trust: Trust,
        persister: Persister,
        live: Arc<Mutex<BTreeSet<Sha256Digest>>>,
        status: watch::Sender<StatusReport>,
        history: watch::Sender<Vec<UpdateEvent>>,
        hooks: Hooks,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::channel(64);
        let (lease_tx, leases) = mpsc::channel(16);
        let _ = shared.leases.set(lease_tx);
        let durable_generation = slots.generation();
        let runner = Self {
            durable_generation,
            awaited: 0,
            slots,
            work,
            shared,
            trust,
            persister,
            live,
            status,
            history,
            done_tx,
            done_rx,
            loaded: HashMap::new(),
            fetching: HashMap::new(),
            models_thread: ModelsThread::spawn(),
            hooks,
            hook_runs: HashMap::new(),
            next_hook_run: 0,
            leases,
            clock_read: None,
        };
        // Whatever no restored slot names is removed before any download
        // starts, unless the slots were lost (then nothing is, until a
        // desired state says what to keep).
        *runner.live.lock().expect("lock") = runner.slots.referenced();
        if complete {
            runner.persister.collect(runner.slots.persisted());
        }
        runner
    }

    /// Runs until `stop` completes or the link goes away.
    pub async fn run(mut self, mut link: mpsc::Receiver<FromLink>, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        loop {
            self.execute();
            self.read_clock(false);
            let timeout = self.slots.poll_timeout();
            tokio::select! {
                msg = link.recv() => match msg {
                    Some(FromLink::Desired(d)) => self.apply_desired(d),
                    None => break,
                },
                Some(done) = self.done_rx.recv() => self.done(done),
                _ = sleep_until(timeout) => {
                    // Read again: a window is judged on the time now (the
                    // monotonic clock stops while a device sleeps).
                    self.read_clock(true);
                    self.slots.handle_timeout(Instant::now());
                }
                _ = self.shared.health_changed.notified() => {}
                Some((name, op, reply)) = self.leases.recv() => {
                    self.read_clock(true);
                    let now = Instant::now();
                    let answer = match op {
                        LeaseOp::Defer(secs) => self.slots.defer(&name, secs, now),
                        LeaseOp::Release => self.slots.release(&name, now).map(u64::from),
                    };
                    match &answer {
                        Ok(secs) => debug!(model = %name, ?op, granted = secs, "defer lease"),
                        Err(e) => debug!(model = %name, ?op, "defer lease refused: {e}"),
                    }
                    let _ = reply.send(answer);
                }
                _ = &mut stop => {
                    self.stop_cleanly().await;
                    break;
                }
            }
        }
    }

    /// On a stop asked for (SIGTERM, Ctrl-C): what is being tried is written
    /// back as pending, so that the restart tries it again rather than take
    /// the stop for a crash, and the last state is on disk before the
    /// process ends (waited for at most 10 s).
    async fn stop_cleanly(&mut self) {
        self.persister.persist(self.slots.persisted_for_stop());
        let durable = self.persister.durable();
        let wait = tokio::task::spawn_blocking(move || durable.wait());
        match tokio::time::timeout(std::time::Duration::from_secs(10), wait).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => error!("stopping: {e}"),
            _ => error!("stopping: the agent's state was not written within 10 s"),
        }
    }

    fn is_candidate(&self, m: &ModelManifest) -> bool {
        self.slots.slot(&m.name).and_then(|s| s.candidate()).is_some_and(|(c, _)| c.same_version(m))
    }

    /// Whether `m` is what the runner serves under its name.
    fn installed(&self, m: &ModelManifest) -> bool {
        self.shared.models.read().expect("lock").get(&m.name).is_some_and(|s| s.manifest.same_version(m))
    }

    /// Serves `backend` under `m`'s name in place of what serves now.
    fn install(&mut self, m: ModelManifest, backend: Arc<dyn Backend>) {
        let (name, version) = (m.name.clone(), m.version);
        let gate = Gate::new(self.shared.threads, self.shared.queue);
        let drift = match self.work.baseline(&m) {
            Ok(Some(bytes)) => {
                let seed = u64::from_le_bytes(
                    Sha256Digest::of(self.shared.device.as_str().as_bytes()).0[..8].try_into().expect("8 bytes"),
                );
                crate::drift::Drift::new(
                    &m,
                    &bytes,
                    self.shared.monitor.clone(),
                    seed ^ u64::from(version),
                    self.shared.outbox.get().cloned(),
                )
                .inspect_err(|e| warn!(model = %name, version, "no drift statistics: {e}"))
                .ok()
            }
            Ok(None) => None,
            Err(e) => {
                warn!(model = %name, version, "no drift statistics: {e}");
                None
            }
        };
        let quality =
            Arc::new(crate::feedback::Quality::new(&m, self.shared.feedback, self.shared.outbox.get().cloned()));
        let mut served = Served::new(m, backend, gate, &self.shared.limits);
        served.drift = drift;
        served.quality = quality;
        let served = Arc::new(served);
        self.shared.shadows.write().expect("lock").remove(&name);
        // In-flight requests finish on the old version, which the freeing
        // thread frees after the last of them.
        let old = self.shared.models.write().expect("lock").insert(name.clone(), served);
        if let Some(old) = old {
            self.shared.retire(old.quality.clone());
        }
        info!(model = %name, version, threads = self.shared.threads, queue = self.shared.queue, "serving");
    }

    /// Takes a desired state once [`Trust`] verifies it; otherwise the
    /// whole state is refused (and reported), so a forged or replayed state
    /// cannot unload a good model. Formats this build cannot run are the
    /// core's to refuse, model by model.
    fn apply_desired(&mut self, incoming: Incoming) {
        let generation = incoming.state.generation;
        let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        match self.trust.check(&incoming, clock) {
            Ok(models) => {
                // Queued before the slots this state changes: on disk first.
                if let Some(t) = self.trust.unsaved() {
                    self.persister.persist_trust(self.slots.persisted(), t);
                }
                let names: Vec<String> = models.iter().map(|m| format!("{}:{}", m.name, m.version)).collect();
                self.shared.set_capture(
                    models.iter().filter_map(|m| Some((m.name.clone(), (m.version, m.capture?)))).collect(),
                );
                info!(generation, models = ?names, "desired state");
                self.slots.set_desired(generation, models, Instant::now());
            }
            Err(e) => {
                error!(generation, "refusing desired state: {e}");
                self.slots.refuse(generation, e);
            }
        }
    }

    fn done(&mut self, done: Done) {
        let now = Instant::now();
        match done {
            Done::Fetched(sha, result) => {
                for (name, version) in self.fetching.remove(&sha).unwrap_or_default() {
                    let ev = match &result {
                        Ok(()) => Event::Fetched { name, version },
                        Err(reason) => {
                            warn!(model = %name, version, "fetch failed: {reason}");
                            Event::FetchFailed { name, version, reason: reason.clone() }
                        }
                    };
                    self.handle(ev, now);
                }
            }
            Done::Event(ev) => self.handle(ev, now),
            Done::Hook(name, id, result) => {
                if let Some(run) = self.hook_runs.get_mut(&name).filter(|r| r.id == id) {
                    let version = run.version;
                    run.running = false;
                    run.next_at = now + HOOK_EVERY;
                    match result {
                        Ok(()) if run.verdict == HookVerdict::Pending => run.verdict = HookVerdict::Passed,
                        Ok(()) => {}
                        Err(reason) => {
                            warn!(model = %name, version, "health hook: {reason}");
                            run.verdict = HookVerdict::Failed(reason);
                        }
                    }
                }
            }
            Done::Durable(generation) => self.durable_generation = self.durable_generation.max(generation),
            Done::Installable(m, backend, on_disk) => {
                let m = *m;
                // What the core says serves under the name now (the state
                // may have moved on while the write was waited for).
                let slot = self.slots.slot(&m.name);
                let served = slot.and_then(|s| s.served()).is_some_and(|s| s.same_version(&m));
                let on_probation = served && self.is_candidate(&m);
                // A first install committed as it stood (the desired state
                // moved on meanwhile): nothing else serves, so it must.
                let committed = served && !on_probation && !self.installed(&m);
                match on_disk {
                    Ok(()) if on_probation || committed => self.install(m, backend),
                    Err(_) if committed => self.install(m, backend),
                    Err(reason) if on_probation => {
                        error!(model = %m.name, version = m.version, "not serving the candidate: {reason}");
                        let ev = Event::InstallFailed { name: m.name, version: m.version, reason };
                        self.handle(ev, now);
                    }
                    _ => {}
                }
            }
            Done::Loaded(ev, backend) => {
                let (Event::Loaded { name, version } | Event::LoadFailed { name, version, .. }) = &ev else {
                    unreachable!("loads report Loaded or LoadFailed")
                };
                if let Some(b) = backend {
                    self.loaded.insert((name.clone(), *version), b);
                }
                self.handle(ev, now);
            }
        }
    }

    fn handle(&mut self, ev: Event, now: Instant) {
        if let Err(e) = self.slots.handle(ev, now) {
            error!("{e}");
        }
    }

    /// Logs the core's recorded update steps and adds them to the history
    /// sent to the coordinator, stamped with the wall clock.
    fn record_history(&mut self) {
        let (wall, mono) = (std::time::SystemTime::now(), Instant::now());
        let mut added = Vec::new();
        while let Some(t) = self.slots.poll_transition() {
            let at = wall - mono.saturating_duration_since(t.at);
            let at_ms = at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            match &t.reason {
                Some(reason) => info!(model = %t.name, version = t.version, "update: {}: {reason}", t.phase),
                None => info!(model = %t.name, version = t.version, "update: {}", t.phase),
            }
            let mut reason = t.reason;
            if let Some(r) = &mut reason {
                shorten(r);
            }
            added.push(UpdateEvent { at_ms, name: t.name, version: t.version, phase: t.phase, reason });
        }
        if !added.is_empty() {
            self.history.send_modify(|h| {
                h.extend(added);
                let excess = h.len().saturating_sub(MAX_HISTORY);
                h.drain(..excess);
            });
            self.persister.persist_history(self.slots.persisted(), self.history.borrow().clone());
        }
    }

    /// Gives the core the local time, if `now` or none was given for a while.
    fn read_clock(&mut self, now: bool) {
        let at = Instant::now();
        if now || self.clock_read.is_none_or(|t| at.duration_since(t) >= LOCAL_TIME_EVERY) {
            match local_time() {
                Some(local) => self.slots.set_local_time(at, local),
                None if self.clock_read.is_none() => {
                    warn!("cannot read the local time: maintenance windows stay closed")
                }
                None => {}
            }
            self.clock_read = Some(at);
        }
    }

    /// What `m`'s hook said so far on this probation, starting a check if
    /// one is due.
    fn ask_hook(&mut self, m: &ModelManifest) -> HookVerdict {
        let Some(hook) = self.hooks.by_model.get(&m.name).cloned() else { return HookVerdict::Unset };
        let now = Instant::now();
        // Each probation starts afresh (runs of ended ones are dropped in
        // `execute`, so a version on probation again is asked again).
        if self.hook_runs.get(&m.name).is_none_or(|r| r.version != m.version) {
            self.next_hook_run += 1;
            let run = HookRun {
                id: self.next_hook_run,
                version: m.version,
                running: false,
                verdict: HookVerdict::Pending,
                next_at: now,
            };
            self.hook_runs.insert(m.name.clone(), run);
        }
        let run = self.hook_runs.get_mut(&m.name).expect("inserted above");
        if !run.running && run.next_at <= now && !matches!(run.verdict, HookVerdict::Failed(_)) {
            run.running = true;
            let (done, timeout) = (self.done_tx.clone(), self.hooks.timeout);
            let (name, version, id) = (m.name.clone(), m.version, run.id);
            tokio::spawn(async move {
                let result = crate::hook::check(&hook, &name, version, timeout).await;
                let _ = done.send(Done::Hook(name, id, result)).await;
            });
        }
        run.verdict.clone()
    }

    /// Runs `f` on the models thread and feeds the event it makes back to the loop.
    fn on_models_thread(&self, f: impl FnOnce() -> Event + Send + 'static) {
        let done = self.done_tx.clone();
        self.models_thread.run(move || {
            let _ = done.blocking_send(Done::Event(f()));
        });
    }

    /// Carries out what the core asked for, then publishes the status.
    fn execute(&mut self) {
        // Before any download or load starts, so the persister never
        // removes a file that work is about to use.
        *self.live.lock().expect("lock") = self.slots.referenced();
        while let Some(action) = self.slots.poll_action() {
            match action {
                Action::Fetch(m) => {
                    let waiting = self.fetching.entry(m.sha256).or_default();
                    let first = waiting.is_empty();
                    if !waiting.iter().any(|(n, v)| *n == m.name && *v == m.version) {
                        waiting.push((m.name.clone(), m.version));
                    }
                    if !first {
                        continue; // that artifact is on its way already
                    }
                    let (work, done) = (self.work.clone(), self.done_tx.clone());
                    tokio::spawn(async move {
                        let sha = m.sha256;
                        let result = work.fetch(m).await;
                        let _ = done.send(Done::Fetched(sha, result)).await;
                    });
                }
                Action::Verify(m) => {
                    let work = self.work.clone();
                    self.on_models_thread(move || {
                        let (name, version) = (m.name.clone(), m.version);
                        match guarded(|| work.verify(&m)) {
                            Ok(()) => Event::Verified { name, version },
                            Err(reason) => {
                                warn!(model = %name, version, "verification failed: {reason}");
                                Event::VerifyFailed { name, version, reason }
                            }
                        }
                    });
                }
                Action::Load(m) => {
                    // A candidate's, not before the slots that say it is being
                    // tried are on disk; a committed version's at once (a
                    // failing disk must not keep a known-good version down).
                    let durable = self.is_candidate(&m).then(|| self.persister.durable());
                    let (work, done) = (self.work.clone(), self.done_tx.clone());
                    let home = self.models_thread.clone();
                    self.models_thread.run(move || {
                        let (name, version) = (m.name.clone(), m.version);
                        let on_disk = durable.map_or(Ok(()), |d| d.wait());
                        let result = match on_disk.and_then(|()| guarded(|| work.load(&m))) {
                            Ok(backend) => Done::Loaded(Event::Loaded { name, version }, Some(home.adopt(backend))),
                            Err(reason) => {
                                warn!(model = %name, version, "load failed: {reason}");
                                Done::Loaded(Event::LoadFailed { name, version, reason }, None)
                            }
                        };
                        let _ = done.blocking_send(result);
                    });
                }
                Action::SelfTest(m) => {
                    let Some(backend) = self.loaded.get(&(m.name.clone(), m.version)).cloned() else {
                        error!(model = %m.name, version = m.version, "asked to self-test a model that is not loaded");
                        continue;
                    };
                    let work = self.work.clone();
                    self.on_models_thread(move || {
                        let (name, version) = (m.name.clone(), m.version);
                        let result = guarded(|| {
                            work.golden(&m).and_then(|g| update::selftest(&m, backend.as_ref(), g.as_deref()))
                        });
                        match result {
                            Ok(()) => {
                                info!(model = %name, version, "self-test passed");
                                Event::SelfTestPassed { name, version }
                            }
                            Err(reason) => {
                                warn!(model = %name, version, "self-test failed: {reason}");
                                Event::SelfTestFailed { name, version, reason }
                            }
                        }
                    });
                }
                Action::Shadow(m) => {
                    let Some(backend) = self.loaded.get(&(m.name.clone(), m.version)).cloned() else {
                        error!(model = %m.name, version = m.version, "asked to shadow a model that is not loaded");
                        continue;
                    };
                    let done = self.done_tx.clone();
                    let (name, version) = (m.name.clone(), m.version);
                    let report = move |report| {
                        let ev = Event::Shadowed { name: name.clone(), version, report };
                        let _ = done.blocking_send(Done::Event(ev));
                    };
                    match update::Shadow::start(m.clone(), backend, report) {
                        Ok(shadow) => {
                            info!(model = %m.name, version = m.version, "shadowing the serving version");
                            self.shared.shadows.write().expect("lock").insert(m.name.clone(), Arc::new(shadow));
                        }
                        Err(e) => {
                            error!(model = %m.name, "cannot start the shadow thread: {e}");
                            let reason = format!("cannot start the shadow thread: {e}");
                            let ev = Event::ShadowFailed { name: m.name.clone(), version: m.version, reason };
                            let done = self.done_tx.clone();
                            tokio::spawn(async move { done.send(Done::Event(ev)).await });
                        }
                    }
                }
                Action::Install(m) => match self.loaded.remove(&(m.name.clone(), m.version)) {
                    // A candidate serves only once its probation (a trying
                    // stage) is on disk, so that a crash while it serves is
                    // counted against it however soon it comes: waited for
                    // off the loop, as a load waits.
                    Some(backend) if self.is_candidate(&m) => {
                        let durable = self.persister.durable();
                        let done = self.done_tx.clone();
                        tokio::task::spawn_blocking(move || {
                            let on_disk = durable.wait();
                            let _ = done.blocking_send(Done::Installable(Box::new(m), backend, on_disk));
                        });
                    }
                    Some(backend) => self.install(m, backend),
                    None => {
                        error!(model = %m.name, version = m.version, "asked to install a model that was not loaded")
                    }
                },
                Action::CheckHealth(m) => {
                    let served = self.shared.models.read().expect("lock").get(&m.name).cloned();
                    if let Some(s) = served.filter(|s| s.manifest.same_version(&m)) {
                        let health = Health {
                            requests: s.requests.load(Ordering::Relaxed),
                            errors: s.errors.load(Ordering::Relaxed),
                            p99_us: s.latency.p99_us(),
                            hook: self.ask_hook(&m),
                        };
                        self.handle(Event::Health { name: m.name, version: m.version, health }, Instant::now());
                    }
                }
                Action::Unload(name) => {
                    self.shared.shadows.write().expect("lock").remove(&name);
                    let gone = self.shared.models.write().expect("lock").remove(&name);
                    if let Some(old) = gone {
                        self.shared.retire(old.quality.clone());
                        info!(model = %name, "unloaded");
                    }
                }
                Action::Persist => {
                    // What was let go of since the start of this round (a
                    // commit here drops the version before last) may go now.
                    *self.live.lock().expect("lock") = self.slots.referenced();
                    // The steps that led here are queued first: the writer
                    // writes history before slots, so no state reaches the
                    // disk without the step that made it (a SIGKILL between
                    // the two writes lost a commit's step).
                    self.record_history();
                    self.persister.persist(self.slots.persisted());
                }
            }
        }
        // What the core no longer holds is dropped: a stale load, a
        // candidate that failed its self-test, a shadow whose update ended.
        let holding = self.slots.holding();
        self.loaded.retain(|key, _| {
            let keep = holding.contains(key);
            if !keep {
                info!(model = %key.0, version = key.1, "dropped a loaded version the agent no longer wants");
            }
            keep
        });
        // A shadow runs only while its version is in shadow (not once it
        // waits to activate); hook checks only while it is on probation.
        let slots = &self.slots;
        self.hook_runs.retain(|name, r| {
            let candidate = slots.slot(name).and_then(|slot| slot.candidate());
            candidate.is_some_and(|(m, phase)| m.version == r.version && matches!(phase, Phase::Probation { .. }))
        });
        self.shared.shadows.write().expect("lock").retain(|name, s| {
            let candidate = slots.slot(name).and_then(|slot| slot.candidate());
            candidate.is_some_and(|(m, phase)| m.version == s.manifest.version && *phase == Phase::Shadow)
        });
        for (name, served) in self.shared.models.read().expect("lock").iter() {
            let slot = self.slots.slot(name);
            let update = match slot.and_then(|s| s.served()) {
                Some(m) if m.same_version(&served.manifest) && slot.is_some_and(|s| s.serving()) => api::COMMITTED,
                Some(m) if m.same_version(&served.manifest) => api::ON_PROBATION,
                _ => api::ROLLING_BACK,
            };
            served.update.store(update, Ordering::Relaxed);
        }
        self.record_history();
        let generation = self.slots.generation();
        if generation > self.durable_generation {
            // The Persist for it was sent above, in this round or before.
            let durable = self.persister.durable();
            if durable.seq() > self.awaited {
                self.awaited = durable.seq();
                let done = self.done_tx.clone();
                tokio::task::spawn_blocking(move || {
                    if durable.wait().is_ok() {
                        let _ = done.blocking_send(Done::Durable(generation));
                    }
                });
            }
        }
        let mut report = StatusReport {
            models: self.shared.status_with_health(self.slots.status()),
            generation: self.durable_generation,
            refused: self.slots.refusal().cloned(),
        };
        // Reasons can be long (a runtime's error chain); a report stays well
        // within what the coordinator takes in one frame.
        for m in &mut report.models {
            if let Some(d) = &mut m.detail {
                shorten(d);
            }
        }
        if let Some(r) = &mut report.refused {
            shorten(&mut r.reason);
        }
        self.status.send_if_modified(|s| {
            let changed = *s != report;
            *s = report;
            changed
        });
    }
}

/// What a status says about one model at most, in characters.
const DETAIL_CHARS: usize = 300;

fn shorten(s: &mut String) {
    if let Some((cut, _)) = s.char_indices().nth(DETAIL_CHARS) {
        s.truncate(cut);
        s.push('…');
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SlotStore;
    use std::time::Duration;
    use tern_agent_core::Persisted;
    use tern_proto::Limits;
    use tern_proto::{
        DType, DeviceId, GoldenCase, ManifestEncoding, ModelFormat, SelfTestRef, TensorSpec, encode_golden,
    };
    use tern_runtime::{RuntimeError, Tensor, TensorData};
    use tern_trust::SigningKey;

    fn spec() -> Vec<TensorSpec> {
        vec![TensorSpec { name: "X".into(), dtype: DType::F32, shape: vec![None, Some(4)] }]
    }

    /// A backend that multiplies its input by a factor.
    struct Scale(f32, Vec<TensorSpec>);

    impl Backend for Scale {
        fn inputs(&self) -> &[TensorSpec] {
            &self.1
        }
        fn outputs(&self) -> &[TensorSpec] {
            &self.1
        }
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
            let TensorData::F32(v) = &inputs[0].data else { unreachable!() };
            let data = TensorData::F32(v.iter().map(|x| x * self.0).collect());
            Ok(vec![Tensor::new(inputs[0].shape.clone(), data).unwrap()])
        }
    }

    /// Downloads succeed at once; loading `slow` takes 600 ms; each version
    /// loads as `Scale(factor[version])`; golden vectors say `Scale(1.0)`.
    struct Stand {
        slow: Option<u32>,
        factor: fn(u32) -> f32,
    }

    fn golden() -> Vec<u8> {
        let x = Tensor::new(vec![1, 4], TensorData::F32(vec![1.0, 2.0, 3.0, 4.0])).unwrap();
        encode_golden(&[GoldenCase { inputs: vec![x.clone()], outputs: vec![x] }]).unwrap()
    }

    impl Work for Stand {
        fn fetch(&self, _m: ModelManifest) -> Fetching {
            Box::pin(async { Ok(()) })
        }
        fn verify(&self, _m: &ModelManifest) -> Result<(), String> {
            Ok(())
        }
        fn load(&self, m: &ModelManifest) -> Result<Arc<dyn Backend>, String> {
            if self.slow == Some(m.version) {
                std::thread::sleep(Duration::from_millis(600));
            }
            Ok(Arc::new(Scale((self.factor)(m.version), spec())))
        }
        fn golden(&self, m: &ModelManifest) -> Result<Option<Vec<u8>>, String> {
            Ok(m.selftest.map(|_| golden()))
        }
    }

    struct Discard;

    impl SlotStore for Discard {
        fn write(&mut self, _p: &Persisted, _complete: bool) -> anyhow::Result<()> {
            Ok(())
        }
        fn collect(&mut self, _keep: &BTreeSet<Sha256Digest>, _live: &Mutex<BTreeSet<Sha256Digest>>) {}
    }

    /// Each write waits until the test lets it through.
    struct Gated(std::sync::mpsc::Receiver<()>);

    impl SlotStore for Gated {
        fn write(&mut self, _p: &Persisted, _complete: bool) -> anyhow::Result<()> {
            let _ = self.0.recv();
            Ok(())
        }
        fn collect(&mut self, _keep: &BTreeSet<Sha256Digest>, _live: &Mutex<BTreeSet<Sha256Digest>>) {}
    }

    fn manifest(version: u32) -> ModelManifest {
        let g = golden();
        ModelManifest {
            name: "iris".into(),
            version,
            sha256: Sha256Digest::of(&version.to_le_bytes()),
            size: 1,
            format: ModelFormat::Onnx,
            inputs: spec(),
            outputs: spec(),
            created_at: 0,
            selftest: Some(SelfTestRef { sha256: Sha256Digest::of(&g), size: g.len() as u64, tolerance_ppm: 100 }),
            update: None,
            alternative: None,
            baseline: None,
            capture: None,
        }
    }

    struct Agent {
        shared: Arc<Shared>,
        status: watch::Receiver<StatusReport>,
        link: mpsc::Sender<FromLink>,
        key: SigningKey,
        task: tokio::task::JoinHandle<()>,
    }

    impl Agent {
        fn start(work: Stand) -> Self {
            Self::start_with(work, Discard)
        }

        fn start_with(work: Stand, store: impl SlotStore) -> Self {
            let (key, _) = SigningKey::generate().unwrap();
            let report = StatusReport { models: vec![], generation: 0, refused: None };
            let (status_tx, status) = watch::channel(report);
            let limits = Limits::default();
            let shared = Arc::new(Shared::new(
                DeviceId::new("cam-01").unwrap(),
                status.clone(),
                1,
                1,
                limits,
                1 << 20,
                Default::default(),
            ));
            let live = Arc::new(Mutex::new(BTreeSet::new()));
            let persister = Persister::spawn(store, live.clone()).unwrap();
            let slots = Slots::new(&[ModelFormat::Onnx]);
            let (history, _) = watch::channel(Vec::new());
            let runner = Runner::new(
                slots,
                true,
                Arc::new(work),
                shared.clone(),
                Trust::new(key.verifying_key(), DeviceId::new("cam-01").unwrap()),
                persister,
                live,
                status_tx,
                history,
                Hooks::default(),
            );
            let (link, link_rx) = mpsc::channel(4);
            let task = tokio::spawn(runner.run(link_rx, std::future::pending()));
            Self { shared, status, link, key, task }
        }

        async fn desire(&self, generation: u64, m: ModelManifest) {
            let signed = self.key.sign(&m, ManifestEncoding::CanonicalJson).unwrap();
            let state = tern_proto::DesiredState { generation, models: vec![signed] };
            let incoming = Incoming { state, signed: None, wire: tern_proto::WireVersion::V3 };
            self.link.send(FromLink::Desired(incoming)).await.unwrap();
        }

        fn served(&self) -> Option<u32> {
            self.shared.models.read().unwrap().get("iris").map(|s| s.manifest.version)
        }

        async fn until(&self, what: &str, mut f: impl FnMut(&Self) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !f(self) {
                assert!(Instant::now() < deadline, "{what}: {:?}", self.status.borrow());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_generation_is_reported_only_once_it_is_on_disk() {
        let (go, gate) = std::sync::mpsc::channel();
        let agent = Agent::start_with(Stand { slow: None, factor: |_| 1.0 }, Gated(gate));
        agent.desire(3, manifest(1)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A power cut now would bring the agent back below generation 3.
        assert_eq!(agent.status.borrow().generation, 0, "generation 3 reported before it was written");
        for _ in 0..64 {
            go.send(()).unwrap();
        }
        agent.until("generation 3 reported", |a| a.status.borrow().generation == 3).await;
        agent.until("v1 serves", |a| a.served() == Some(1)).await;
    }

    /// Holds every write that puts a candidate on probation until the test
    /// lets it through.
    struct HoldProbation(std::sync::mpsc::Receiver<()>);

    impl SlotStore for HoldProbation {
        fn write(&mut self, p: &Persisted, _complete: bool) -> anyhow::Result<()> {
            let probation = |s: &tern_agent_core::PersistedSlot| matches!(&s.stage, tern_agent_core::Stage::Trying { phase } if phase == "probation");
            if p.slots.iter().any(probation) {
                let _ = self.0.recv();
            }
            Ok(())
        }
        fn collect(&mut self, _keep: &BTreeSet<Sha256Digest>, _live: &Mutex<BTreeSet<Sha256Digest>>) {}
    }

    /// Fails every write that would put a candidate on probation beside a
    /// committed version (a disk that fills just then).
    struct FullAtProbation;

    impl SlotStore for FullAtProbation {
        fn write(&mut self, p: &Persisted, _complete: bool) -> anyhow::Result<()> {
            let probation = |s: &tern_agent_core::PersistedSlot| {
                s.active.is_some()
                    && matches!(&s.stage, tern_agent_core::Stage::Trying { phase } if phase == "probation")
            };
            if p.slots.iter().any(probation) {
                anyhow::bail!("No space left on device (os error 28)");
            }
            Ok(())
        }
        fn collect(&mut self, _keep: &BTreeSet<Sha256Digest>, _live: &Mutex<BTreeSet<Sha256Digest>>) {}
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_candidate_whose_probation_cannot_be_written_never_serves() {
        let agent = Agent::start_with(Stand { slow: None, factor: |_| 1.0 }, FullAtProbation);
        let quick = |v| ModelManifest {
            update: Some(tern_proto::UpdatePolicy { probation_secs: 0, ..Default::default() }),
            alternative: None,
            baseline: None,
            capture: None,
            ..manifest(v)
        };
        agent.desire(1, quick(1)).await;
        let committed = |a: &Agent| {
            a.served() == Some(1)
                && a.status
                    .borrow()
                    .models
                    .iter()
                    .any(|m| m.version == 1 && m.state == tern_proto::ModelState::Serving && m.detail.is_none())
        };
        agent.until("v1 committed", committed).await;
        agent.desire(2, quick(2)).await;
        let retrying =
            |a: &Agent| {
                a.status.borrow().models.iter().any(|m| {
                    m.version == 2 && m.detail.as_deref().is_some_and(|d| d.contains("No space left on device"))
                })
            };
        agent.until("v2 not served, to be tried again", retrying).await;
        assert_eq!(agent.served(), Some(1), "v2 served without its probation on disk");
        agent.task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_version_committed_while_its_probation_was_being_written_serves() {
        let (go, gate) = std::sync::mpsc::channel();
        // v2 loads slowly: long enough to see what serves before it.
        let agent = Agent::start_with(Stand { slow: Some(2), factor: |_| 1.0 }, HoldProbation(gate));
        agent.desire(1, manifest(1)).await;
        let on_probation = |a: &Agent| {
            a.status.borrow().models.iter().any(|m| m.version == 1 && m.detail.as_deref() == Some("probation"))
        };
        agent.until("v1 on probation, its install waiting for the disk", on_probation).await;
        assert_eq!(agent.served(), None);
        // Another version meanwhile: v1, the only one, is committed as it stands.
        agent.desire(2, manifest(2)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..64 {
            go.send(()).unwrap();
        }
        agent.until("v1 serves", |a| a.served() == Some(1)).await;
        agent.until("then v2", |a| a.served() == Some(2)).await;
        agent.task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_load_of_an_older_version_never_replaces_a_newer_one() {
        let agent = Agent::start(Stand { slow: Some(1), factor: |_| 1.0 });
        agent.desire(1, manifest(1)).await;
        // v1 is loading (slowly) when v2 is asked for; v2 loads at once.
        tokio::time::sleep(Duration::from_millis(150)).await;
        agent.desire(2, manifest(2)).await;
        agent.until("v2 serves", |a| a.served() == Some(2)).await;
        // Past the end of v1's slow load: v2 still serves, and says so.
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(agent.served(), Some(2), "the stale v1 load replaced v2");
        let st = agent.status.borrow().clone();
        assert_eq!((st.generation, st.models.len(), st.models[0].version), (2, 1, 2), "{st:?}");
        agent.task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_candidate_that_answers_other_than_its_golden_vectors_never_serves() {
        // v1 computes what its golden vectors say; v2 doubles everything.
        let agent = Agent::start(Stand { slow: None, factor: |v| v as f32 });
        agent.desire(1, manifest(1)).await;
        agent.until("v1 serves", |a| a.served() == Some(1)).await;
        agent.desire(2, manifest(2)).await;
        let failed = |a: &Agent| {
            a.status.borrow().models.iter().any(|m| m.version == 2 && m.state == tern_proto::ModelState::Failed)
        };
        agent.until("v2 fails", failed).await;
        let st = agent.status.borrow().clone();
        let v2 = st.models.iter().find(|m| m.version == 2).unwrap();
        assert_eq!(
            v2.detail.as_deref(),
            Some("self-test failed: case 0, output 0, element 0: 2, golden 1 (tolerance 100 ppm)"),
            "{st:?}"
        );
        assert_eq!(agent.served(), Some(1), "v1 keeps serving");
        assert!(agent.shared.shadows.read().unwrap().is_empty());
        agent.task.abort();
    }
}
