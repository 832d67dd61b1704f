//! The agent's main loop: one `select!` over the link, the results of work
//! in flight, retry timers and health changes. It feeds the core
//! (`tern_agent_core::Slots`) and carries out the actions the core emits,
//! and nothing else: a model is served only when the core says `Install`,
//! so a load that finishes after a newer one is dropped, never installed.

use crate::api::{Served, Shared};
use crate::gate::Gate;
use crate::link::FromLink;
use crate::store::Persister;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tern_agent_core::{Action, Event, Slots};
use tern_proto::{DesiredState, ModelManifest, Sha256Digest, StatusReport};
use tern_runtime::Backend;
use tern_trust::VerifyingKey;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// A download in flight.
pub type Fetching = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The work the core asks for, done for real by the daemon (downloads over
/// QUIC, loads from `models/`) and by a stand-in in tests.
pub trait Work: Send + Sync + 'static {
    /// Downloads and verifies the artifact of `m` into `models/`.
    fn fetch(&self, m: ModelManifest) -> Fetching;
    /// Loads the verified artifact of `m`. Blocks: run off the runtime.
    fn load(&self, m: &ModelManifest) -> Result<Arc<dyn Backend>, String>;
}

/// The result of a piece of work, back on the main loop.
enum Done {
    Fetched(Sha256Digest, Result<(), String>),
    Loaded(Event, Option<Arc<dyn Backend>>),
}

/// The main loop's state.
pub struct Runner<W: Work> {
    slots: Slots,
    work: Arc<W>,
    shared: Arc<Shared>,
    registry_key: VerifyingKey,
    persister: Persister,
    live: Arc<Mutex<BTreeSet<Sha256Digest>>>,
    status: watch::Sender<StatusReport>,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    /// Models loaded and not yet installed, by (name, version).
    loaded: HashMap<(String, u32), Arc<dyn Backend>>,
    /// Downloads in flight, by digest, with the versions waiting for each:
    /// one download per artifact, however many slots want it.
    fetching: HashMap<Sha256Digest, Vec<(String, u32)>>,
}

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
        registry_key: VerifyingKey,
        persister: Persister,
        live: Arc<Mutex<BTreeSet<Sha256Digest>>>,
        status: watch::Sender<StatusReport>,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::channel(64);
        let runner = Self {
            slots,
            work,
            shared,
            registry_key,
            persister,
            live,
            status,
            done_tx,
            done_rx,
            loaded: HashMap::new(),
            fetching: HashMap::new(),
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
            let timeout = self.slots.poll_timeout();
            tokio::select! {
                msg = link.recv() => match msg {
                    Some(FromLink::Desired(d)) => self.apply_desired(d),
                    None => break,
                },
                Some(done) = self.done_rx.recv() => self.done(done),
                _ = sleep_until(timeout) => self.slots.handle_timeout(Instant::now()),
                _ = self.shared.health_changed.notified() => {}
                _ = &mut stop => break,
            }
        }
    }

    /// Verifies every manifest of a desired state: one bad signature and
    /// the whole state is refused (and reported), so a forged state cannot
    /// unload a good model. Formats this build cannot run are the core's to
    /// refuse, model by model.
    fn apply_desired(&mut self, desired: DesiredState) {
        let verified: Result<Vec<ModelManifest>, String> =
            desired.models.iter().map(|signed| self.registry_key.verify(signed).map_err(|e| e.to_string())).collect();
        match verified {
            Ok(models) => {
                let names: Vec<String> = models.iter().map(|m| format!("{}:{}", m.name, m.version)).collect();
                info!(generation = desired.generation, models = ?names, "desired state");
                self.slots.set_desired(desired.generation, models);
            }
            Err(e) => {
                error!(generation = desired.generation, "refusing desired state: {e}");
                self.slots.refuse(desired.generation, e);
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
            Done::Loaded(ev, backend) => {
                let (Event::Loaded { name, version } | Event::LoadFailed { name, version, .. }) = &ev else {
                    unreachable!("loads report Loaded or LoadFailed")
                };
                let key = (name.clone(), *version);
                if let Some(b) = backend {
                    self.loaded.insert(key.clone(), b);
                }
                self.handle(ev, now);
                self.execute();
                // Not installed: the core did not accept it (a newer version
                // won, or the model is no longer desired). Dropped here.
                if self.loaded.remove(&key).is_some() {
                    info!(model = %key.0, version = key.1, "dropped a load the agent no longer wants");
                }
            }
        }
    }

    fn handle(&mut self, ev: Event, now: Instant) {
        if let Err(e) = self.slots.handle(ev, now) {
            error!("{e}");
        }
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
                Action::Load(m) => {
                    let (work, done) = (self.work.clone(), self.done_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let (name, version) = (m.name.clone(), m.version);
                        let result = match work.load(&m) {
                            Ok(backend) => Done::Loaded(Event::Loaded { name, version }, Some(backend)),
                            Err(reason) => {
                                warn!(model = %name, version, "load failed: {reason}");
                                Done::Loaded(Event::LoadFailed { name, version, reason }, None)
                            }
                        };
                        let _ = done.blocking_send(result);
                    });
                }
                Action::Install(m) => match self.loaded.remove(&(m.name.clone(), m.version)) {
                    Some(backend) => {
                        let (name, version) = (m.name.clone(), m.version);
                        let gate = Gate::new(self.shared.threads, self.shared.queue);
                        let served = Arc::new(Served::new(m, backend, gate, &self.shared.limits));
                        // In-flight requests finish on the old version, which is dropped after.
                        self.shared.models.write().expect("lock").insert(name.clone(), served);
                        info!(model = %name, version, threads = self.shared.threads, queue = self.shared.queue, "serving");
                    }
                    None => {
                        error!(model = %m.name, version = m.version, "asked to install a model that was not loaded")
                    }
                },
                Action::Unload(name) => {
                    if self.shared.models.write().expect("lock").remove(&name).is_some() {
                        info!(model = %name, "unloaded: no longer desired");
                    }
                }
                Action::Persist => self.persister.persist(self.slots.persisted()),
            }
        }
        let mut report = StatusReport {
            models: self.shared.status_with_health(self.slots.status()),
            generation: self.slots.generation(),
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
    use tern_proto::{DType, DeviceId, ManifestEncoding, ModelFormat, TensorSpec};
    use tern_runtime::{RuntimeError, Tensor};
    use tern_trust::SigningKey;

    /// A backend that only says which version it is.
    struct Tagged(Vec<TensorSpec>);

    impl Backend for Tagged {
        fn inputs(&self) -> &[TensorSpec] {
            &self.0
        }
        fn outputs(&self) -> &[TensorSpec] {
            &self.0
        }
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
            Ok(inputs)
        }
    }

    /// Downloads succeed at once; loading version 1 is slow.
    struct SlowFirstLoad;

    impl Work for SlowFirstLoad {
        fn fetch(&self, _m: ModelManifest) -> Fetching {
            Box::pin(async { Ok(()) })
        }
        fn load(&self, m: &ModelManifest) -> Result<Arc<dyn Backend>, String> {
            if m.version == 1 {
                std::thread::sleep(Duration::from_millis(600));
            }
            Ok(Arc::new(Tagged(vec![])))
        }
    }

    struct Discard;

    impl SlotStore for Discard {
        fn write(&mut self, _p: &Persisted, _complete: bool) -> anyhow::Result<()> {
            Ok(())
        }
        fn collect(&mut self, _keep: &BTreeSet<Sha256Digest>, _live: &Mutex<BTreeSet<Sha256Digest>>) {}
    }

    fn manifest(version: u32) -> ModelManifest {
        ModelManifest {
            name: "iris".into(),
            version,
            sha256: Sha256Digest::of(&version.to_le_bytes()),
            size: 1,
            format: ModelFormat::Onnx,
            inputs: vec![TensorSpec { name: "X".into(), dtype: DType::F32, shape: vec![None, Some(4)] }],
            outputs: vec![],
            created_at: 0,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_load_of_an_older_version_never_replaces_a_newer_one() {
        let (key, _) = SigningKey::generate().unwrap();
        let report = StatusReport { models: vec![], generation: 0, refused: None };
        let (status_tx, status_rx) = watch::channel(report);
        let shared = Arc::new(Shared::new(
            DeviceId::new("cam-01").unwrap(),
            status_rx.clone(),
            1,
            1,
            Limits::default(),
            1 << 20,
        ));
        let live = Arc::new(Mutex::new(BTreeSet::new()));
        let persister = Persister::spawn(Discard, live.clone()).unwrap();
        let slots = Slots::new(&[ModelFormat::Onnx]);
        let runner = Runner::new(
            slots,
            true,
            Arc::new(SlowFirstLoad),
            shared.clone(),
            key.verifying_key(),
            persister,
            live,
            status_tx,
        );
        let (link_tx, link_rx) = mpsc::channel(4);
        let loop_task = tokio::spawn(runner.run(link_rx, std::future::pending()));
        let desired = |generation, version| {
            let signed = key.sign(&manifest(version), ManifestEncoding::CanonicalJson).unwrap();
            FromLink::Desired(DesiredState { generation, models: vec![signed] })
        };
        link_tx.send(desired(1, 1)).await.unwrap();
        // v1 is loading (slowly) when v2 is asked for; v2 loads at once.
        tokio::time::sleep(Duration::from_millis(150)).await;
        link_tx.send(desired(2, 2)).await.unwrap();
        let served = || shared.models.read().unwrap().get("iris").map(|s| s.manifest.version);
        let deadline = Instant::now() + Duration::from_secs(5);
        while served() != Some(2) {
            assert!(Instant::now() < deadline, "v2 never served");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Past the end of v1's slow load: v2 still serves, and says so.
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(served(), Some(2), "the stale v1 load replaced v2");
        let st = status_rx.borrow().clone();
        assert_eq!((st.generation, st.models.len(), st.models[0].version), (2, 1, 2), "{st:?}");
        loop_task.abort();
    }
}
