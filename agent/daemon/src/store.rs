//! What the agent keeps on disk: its model slots in sled (a schema of its
//! own, versioned and migrated), and artifacts in a content-addressed
//! folder (`partial/` while downloading, `models/` once verified; only
//! verified artifacts ever appear under `models/`). Writes to sled happen on
//! the [`Persister`]'s thread, never on the async runtime, and after each
//! one it removes the artifacts no slot refers to any more.

use crate::trust::TrustFiles;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use tern_agent_core::{Persisted, PersistedSlot, Stage};
use tern_durable::{sync_dir, sync_sled};
use tern_proto::{BaselineRef, DType, ModelFormat, ModelManifest, SelfTestRef, Sha256Digest, TensorSpec, UpdatePolicy};
use tracing::{error, info, warn};

/// Schema 1 (agents up to ae5a7d0): a JSON list of the active manifests.
const ACTIVE_V1: &[u8] = b"slots/active";
/// Schema 2: [`StoredSlots`].
const SLOTS: &[u8] = b"slots/v2";
/// Present while the slots may not name every artifact worth keeping (they
/// were set aside as unreadable, and no desired state has been applied
/// since): nothing is removed from disk meanwhile.
const INCOMPLETE: &[u8] = b"slots/incomplete";
/// The agent's recent update steps (JSON list of `UpdateEvent`, oldest
/// first), so that a restart still reports what came before it.
const HISTORY: &[u8] = b"history/v1";
/// The generation of the last desired state applied (u64, big-endian),
/// written with the slots but kept when they are set aside: the
/// anti-rollback floor outlives a corrupt slots record.
const GENERATION: &[u8] = b"generation/v1";
/// The schema this build writes.
const SCHEMA: u32 = 2;

/// The persisted slots, schema 2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredSlots {
    schema: u32,
    generation: u64,
    slots: Vec<StoredSlot>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredSlot {
    name: String,
    #[serde(default)]
    active: Option<StoredManifest>,
    #[serde(default)]
    previous: Option<StoredManifest>,
    #[serde(default)]
    candidate: Option<StoredManifest>,
    /// How far the candidate had got (absent, from agents before staged
    /// updates: pending, so it is fetched and tested again).
    #[serde(default)]
    stage: StoredStage,
    /// An ended update kept aside, with its verdict.
    #[serde(default)]
    given_up: Option<(StoredManifest, StoredStage)>,
    /// Times the agent stopped while running the candidate (absent when
    /// none, as agents before the count wrote it).
    #[serde(default, skip_serializing_if = "is_zero")]
    interrupted: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// [`Stage`], as stored.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StoredStage {
    #[default]
    Pending,
    Trying {
        phase: String,
    },
    GaveUp {
        reason: String,
        rolled_back: bool,
    },
}

impl From<&Stage> for StoredStage {
    fn from(s: &Stage) -> Self {
        match s {
            Stage::Pending => StoredStage::Pending,
            Stage::Trying { phase } => StoredStage::Trying { phase: phase.clone() },
            Stage::GaveUp { reason, rolled_back } => {
                StoredStage::GaveUp { reason: reason.clone(), rolled_back: *rolled_back }
            }
        }
    }
}

impl From<StoredStage> for Stage {
    fn from(s: StoredStage) -> Self {
        match s {
            StoredStage::Pending => Stage::Pending,
            StoredStage::Trying { phase } => Stage::Trying { phase },
            StoredStage::GaveUp { reason, rolled_back } => Stage::GaveUp { reason, rolled_back },
        }
    }
}

/// A verified manifest as the agent keeps it: its own type, so that the wire
/// manifest can grow without changing what is on disk. Unknown fields are
/// ignored and new ones need a default, so an older or newer agent reads it
/// (and writes back, in its own schema, what it knows of it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredManifest {
    name: String,
    version: u32,
    sha256: Sha256Digest,
    size: u64,
    format: ModelFormat,
    inputs: Vec<StoredSpec>,
    outputs: Vec<StoredSpec>,
    #[serde(default)]
    created_at: u64,
    #[serde(default)]
    selftest: Option<SelfTestRef>,
    #[serde(default)]
    update: Option<UpdatePolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    baseline: Option<BaselineRef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredSpec {
    name: String,
    dtype: DType,
    shape: Vec<Option<u64>>,
}

impl From<&ModelManifest> for StoredManifest {
    fn from(m: &ModelManifest) -> Self {
        let spec = |s: &TensorSpec| StoredSpec { name: s.name.clone(), dtype: s.dtype, shape: s.shape.clone() };
        Self {
            name: m.name.clone(),
            version: m.version,
            sha256: m.sha256,
            size: m.size,
            format: m.format,
            inputs: m.inputs.iter().map(spec).collect(),
            outputs: m.outputs.iter().map(spec).collect(),
            created_at: m.created_at,
            selftest: m.selftest,
            update: m.update,
            baseline: m.baseline,
        }
    }
}

impl From<StoredManifest> for ModelManifest {
    fn from(m: StoredManifest) -> Self {
        let spec = |s: StoredSpec| TensorSpec { name: s.name, dtype: s.dtype, shape: s.shape };
        Self {
            name: m.name,
            version: m.version,
            sha256: m.sha256,
            size: m.size,
            format: m.format,
            inputs: m.inputs.into_iter().map(spec).collect(),
            outputs: m.outputs.into_iter().map(spec).collect(),
            created_at: m.created_at,
            selftest: m.selftest,
            update: m.update,
            // What the agent runs is stored: a chosen alternative is in the
            // fields above already.
            alternative: None,
            baseline: m.baseline,
            // Kept apart, in capture.json: the policy of the last verified
            // desired state, not of the state the slot was filled from.
            capture: None,
        }
    }
}

impl From<&Persisted> for StoredSlots {
    fn from(p: &Persisted) -> Self {
        let m = |m: &Option<ModelManifest>| m.as_ref().map(StoredManifest::from);
        Self {
            schema: SCHEMA,
            generation: p.generation,
            slots: p
                .slots
                .iter()
                .map(|s| StoredSlot {
                    name: s.name.clone(),
                    active: m(&s.active),
                    previous: m(&s.previous),
                    candidate: m(&s.candidate),
                    stage: (&s.stage).into(),
                    given_up: s.given_up.as_ref().map(|(g, st)| (StoredManifest::from(g), st.into())),
                    interrupted: s.interrupted,
                })
                .collect(),
        }
    }
}

impl From<StoredSlots> for Persisted {
    fn from(s: StoredSlots) -> Self {
        Self {
            generation: s.generation,
            slots: s
                .slots
                .into_iter()
                .map(|s| PersistedSlot {
                    name: s.name,
                    active: s.active.map(Into::into),
                    previous: s.previous.map(Into::into),
                    candidate: s.candidate.map(Into::into),
                    stage: s.stage.into(),
                    given_up: s.given_up.map(|(g, st)| (g.into(), st.into())),
                    interrupted: s.interrupted,
                })
                .collect(),
        }
    }
}

/// The agent's durable state.
pub struct Store {
    root: PathBuf,
    db: sled::Db,
}

impl Store {
    /// The tree the telemetry buffer keeps its records in.
    pub fn telemetry(&self) -> Result<sled::Tree> {
        Ok(self.db.open_tree("telemetry")?)
    }

    /// Makes everything written to the store's database durable.
    pub fn sync(&self) -> Result<()> {
        Ok(sync_sled(&self.db, &self.root.join("state"))?)
    }

    /// Opens (creating) the store under `data_dir`, migrating the slots
    /// from an older schema first.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let root = data_dir.to_path_buf();
        for sub in ["models", "partial", "trash"] {
            std::fs::create_dir_all(root.join(sub))
                .with_context(|| format!("creating {}", root.join(sub).display()))?;
        }
        // What a removal was in the middle of when the agent stopped.
        empty_trash(&root.join("trash"));
        // A small cache, and no background flusher waking every 500 ms:
        // every write that must last is flushed and fsynced by `write`.
        let db = sled::Config::new()
            .path(root.join("state"))
            .cache_capacity(1 << 20)
            .flush_every_ms(None)
            .open()
            .context("opening the agent state (sled)")?;
        // Atomic writes never finished (`collect` leaves them alone while
        // the agent runs); only now, holding sled's lock, so that no other
        // agent runs on this dir.
        for sub in ["models", "partial"] {
            for e in std::fs::read_dir(root.join(sub)).into_iter().flatten().flatten() {
                if e.file_name().as_encoded_bytes().starts_with(b".") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let store = Self { root, db };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<()> {
        if self.db.contains_key(SLOTS)? {
            return Ok(());
        }
        let Some(raw) = self.db.get(ACTIVE_V1)? else {
            return Ok(());
        };
        let active: Vec<StoredManifest> =
            serde_json::from_slice(&raw).context("agent state (schema 1): the active slots are corrupt")?;
        let stored = StoredSlots {
            schema: SCHEMA,
            generation: 0,
            slots: active
                .into_iter()
                .map(|m| StoredSlot {
                    name: m.name.clone(),
                    active: Some(m),
                    previous: None,
                    candidate: None,
                    stage: StoredStage::Pending,
                    given_up: None,
                    interrupted: 0,
                })
                .collect(),
        };
        let mut batch = sled::Batch::default();
        batch.insert(SLOTS, serde_json::to_vec(&stored)?);
        batch.remove(ACTIVE_V1);
        self.db.apply_batch(batch)?;
        sync_sled(&self.db, &self.root.join("state"))?;
        info!(models = stored.slots.len(), "agent state migrated from schema 1 to {SCHEMA}");
        Ok(())
    }

    /// The slots as last persisted, and whether they are complete (see
    /// [`INCOMPLETE`]).
    pub fn load(&self) -> Result<(Persisted, bool)> {
        let complete = !self.db.contains_key(INCOMPLETE)?;
        let floor = self.generation_floor()?;
        let Some(raw) = self.db.get(SLOTS)? else {
            return Ok((Persisted { generation: floor, slots: vec![] }, complete));
        };
        let stored: StoredSlots = serde_json::from_slice(&raw).context("agent state: the slots are corrupt")?;
        if stored.schema > SCHEMA {
            warn!(schema = stored.schema, "agent state was written by a newer agent; reading what this one knows");
        } else if stored.schema < SCHEMA {
            bail!("agent state: schema {} under the schema-{SCHEMA} key", stored.schema);
        }
        let mut p: Persisted = stored.into();
        p.generation = p.generation.max(floor);
        Ok((p, complete))
    }

    /// The generation stored apart from the slots (0 before any).
    fn generation_floor(&self) -> Result<u64> {
        Ok(match self.db.get(GENERATION)? {
            Some(raw) => u64::from_be_bytes(
                raw.as_ref()
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("agent state: the generation record is corrupt"))?,
            ),
            None => 0,
        })
    }

    /// Sets unreadable slots aside (under `slots/corrupt/<unix time>`, for a
    /// person to look at), and marks the state incomplete until a desired
    /// state is applied, so that the agent can start without them and
    /// removes no file meanwhile.
    pub fn set_aside(&self, now_unix: u64) -> Result<()> {
        let mut batch = sled::Batch::default();
        if let Some(raw) = self.db.get(SLOTS)? {
            batch.insert(format!("slots/corrupt/{now_unix}").as_bytes(), raw);
            batch.remove(SLOTS);
        }
        batch.insert(INCOMPLETE, b"1".as_slice());
        self.db.apply_batch(batch)?;
        sync_sled(&self.db, &self.root.join("state"))?;
        Ok(())
    }

    /// Persists the slots, durably (sled's flush does not fsync); `complete`
    /// clears the incomplete mark.
    pub fn write(&self, p: &Persisted, complete: bool) -> Result<()> {
        let mut batch = sled::Batch::default();
        batch.insert(SLOTS, serde_json::to_vec(&StoredSlots::from(p))?);
        // Never lowered, whatever `p` says.
        let generation = p.generation.max(self.generation_floor().unwrap_or(0));
        batch.insert(GENERATION, generation.to_be_bytes().as_slice());
        if complete {
            batch.remove(INCOMPLETE);
        }
        self.db.apply_batch(batch)?;
        sync_sled(&self.db, &self.root.join("state"))?;
        Ok(())
    }

    /// The update steps as last persisted (none if unreadable: they are a
    /// record, not state).
    pub fn load_history(&self) -> Vec<tern_proto::UpdateEvent> {
        match self.db.get(HISTORY) {
            Ok(Some(raw)) => serde_json::from_slice(&raw).unwrap_or_else(|e| {
                warn!("agent state: the update history is unreadable ({e}); starting a new one");
                Vec::new()
            }),
            Ok(None) => Vec::new(),
            Err(e) => {
                warn!("agent state: cannot read the update history: {e}");
                Vec::new()
            }
        }
    }

    /// Persists the update steps, durably.
    pub fn write_history(&self, h: &[tern_proto::UpdateEvent]) -> Result<()> {
        self.db.insert(HISTORY, serde_json::to_vec(h)?)?;
        sync_sled(&self.db, &self.root.join("state"))?;
        Ok(())
    }

    /// Where a verified artifact lives.
    pub fn model_path(&self, sha: &Sha256Digest) -> PathBuf {
        self.root.join("models").join(sha.to_hex())
    }

    /// Where a download in progress lives.
    pub fn partial_path(&self, sha: &Sha256Digest) -> PathBuf {
        self.root.join("partial").join(sha.to_hex())
    }

    /// Where a download records how much of it is known to be on disk: the
    /// length of the prefix fsynced, as decimal text.
    pub fn synced_path(&self, sha: &Sha256Digest) -> PathBuf {
        self.root.join("partial").join(format!("{}.synced", sha.to_hex()))
    }

    /// Where the download of a `size`-byte file resumes: the prefix last
    /// recorded as fsynced, no further than the file. Past that a power cut
    /// may have left the file longer than what reached the disk (blocks of
    /// zeros or of old data), so it is written again rather than trusted.
    pub fn resume_offset(&self, sha: &Sha256Digest, size: u64) -> u64 {
        let len = std::fs::metadata(self.partial_path(sha)).map_or(0, |m| m.len());
        let mut text = String::new();
        let synced = std::fs::File::open(self.synced_path(sha))
            .and_then(|f| f.take(32).read_to_string(&mut text))
            .ok()
            .and_then(|_| text.trim().parse::<u64>().ok());
        let at = synced.unwrap_or(0).min(len);
        if at > size { 0 } else { at }
    }

    /// Removes a download in progress and its record.
    pub fn drop_partial(&self, sha: &Sha256Digest) {
        let _ = std::fs::remove_file(self.partial_path(sha));
        let _ = std::fs::remove_file(self.synced_path(sha));
    }

    /// Moves a fully downloaded file into `models/` if its digest matches;
    /// otherwise deletes it and says what arrived. Reads the whole file:
    /// call it off the async runtime.
    pub fn promote(&self, sha: &Sha256Digest) -> Result<(), String> {
        let partial = self.partial_path(sha);
        let actual = digest_file(&partial).map_err(|e| format!("reading download: {e}"))?;
        if &actual != sha {
            self.drop_partial(sha);
            return Err(format!("artifact corrupt: sha256 is {actual}, manifest says {sha}"));
        }
        let dest = self.model_path(sha);
        std::fs::rename(&partial, &dest).map_err(|e| format!("storing artifact: {e}"))?;
        sync_dir(dest.parent().expect("has parent")).map_err(|e| format!("storing artifact: {e}"))?;
        let _ = std::fs::remove_file(self.synced_path(sha));
        Ok(())
    }

    /// Removes every file in `models/` and `partial/` whose digest neither
    /// `keep` nor `live` holds. Each file is checked with `live` locked and,
    /// if it goes, moved into `trash/` before the lock is let go (a rename:
    /// the main loop never waits for more than that); the trash is emptied
    /// after. Returns how many files it removed.
    pub fn collect(&self, keep: &BTreeSet<Sha256Digest>, live: &Mutex<BTreeSet<Sha256Digest>>) -> usize {
        let trash = self.root.join("trash");
        for sub in ["models", "partial"] {
            let dir = self.root.join(sub);
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_file()) {
                    continue;
                }
                let name = entry.file_name();
                // An atomic write under way (`.NAME.tmpPID`) is not ours to take.
                if name.as_encoded_bytes().starts_with(b".") {
                    continue;
                }
                // A download's record goes with its file.
                let digest = name
                    .to_str()
                    .map(|n| n.strip_suffix(".synced").unwrap_or(n))
                    .and_then(|n| n.parse::<Sha256Digest>().ok());
                let live = live.lock().expect("lock");
                if digest.is_some_and(|d| keep.contains(&d) || live.contains(&d)) {
                    continue;
                }
                let to = trash.join(format!("{sub}-{}", name.to_string_lossy()));
                if let Err(e) = std::fs::rename(entry.path(), &to) {
                    warn!(file = %entry.path().display(), "cannot remove an unreferenced artifact: {e}");
                }
            }
        }
        empty_trash(&trash)
    }
}

/// Deletes what is in `trash/`, logging each file; returns how many.
fn empty_trash(trash: &Path) -> usize {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(trash) else { return 0 };
    for entry in entries.flatten() {
        let size = entry.metadata().map_or(0, |m| m.len());
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                removed += 1;
                info!(file = %entry.file_name().to_string_lossy(), bytes = size, "removed an artifact no slot refers to");
            }
            Err(e) => warn!(file = %entry.path().display(), "cannot remove an unreferenced artifact: {e}"),
        }
    }
    removed
}

/// SHA-256 of a file, streamed.
pub fn digest_file(path: &Path) -> std::io::Result<Sha256Digest> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Sha256Digest(h.finalize().into()))
}

/// Where the persister writes: the store, or something else in tests.
pub trait SlotStore: Send + 'static {
    /// Writes the slots durably; `complete`: they name every artifact worth
    /// keeping.
    fn write(&mut self, p: &Persisted, complete: bool) -> Result<()>;
    /// Removes the artifacts neither `keep` nor `live` names.
    fn collect(&mut self, keep: &BTreeSet<Sha256Digest>, live: &Mutex<BTreeSet<Sha256Digest>>);
    /// Writes the update steps durably.
    fn write_history(&mut self, _h: &[tern_proto::UpdateEvent]) -> Result<()> {
        Ok(())
    }
}

impl SlotStore for Arc<Store> {
    fn write(&mut self, p: &Persisted, complete: bool) -> Result<()> {
        Store::write(self, p, complete)
    }
    fn write_history(&mut self, h: &[tern_proto::UpdateEvent]) -> Result<()> {
        Store::write_history(self, h)
    }
    fn collect(&mut self, keep: &BTreeSet<Sha256Digest>, live: &Mutex<BTreeSet<Sha256Digest>>) {
        Store::collect(self, keep, live);
    }
}

/// A snapshot to write (unless it is on disk already), and whether to
/// remove unreferenced artifacts after.
struct Job {
    slots: Persisted,
    write: bool,
    collect: bool,
    /// Update steps to write, the newest handed over.
    history: Option<Vec<tern_proto::UpdateEvent>>,
    /// The trust state to write before anything else, the newest handed over.
    trust: Option<TrustFiles>,
    /// Its place in the order snapshots were handed over.
    seq: u64,
}

/// How far writing has got: the newest snapshot written, and the newest
/// whose write failed (with why).
#[derive(Default)]
struct Written {
    ok: u64,
    failed: Option<(u64, String)>,
}

/// Writes the slots on a thread of its own, latest first: the main loop
/// hands over a snapshot and goes on; snapshots that pile up while a write
/// (an fsync on a slow SD card) is under way are skipped for the newest.
/// After each write it removes artifacts neither the written snapshot nor
/// the slots as they are now (`live`) refer to: a file is deleted only once
/// the state on disk no longer names it, and never while a download or load
/// the main loop started for it may still need it. Work that must not start
/// before a snapshot is on disk waits for it with [`Durable::wait`].
pub struct Persister {
    tx: mpsc::Sender<Job>,
    seq: u64,
    written: Arc<(Mutex<Written>, Condvar)>,
}

/// A handle to wait until a snapshot is on disk.
#[derive(Clone)]
pub struct Durable {
    seq: u64,
    written: Arc<(Mutex<Written>, Condvar)>,
}

impl Durable {
    /// Which snapshot this waits for: later snapshots have higher numbers.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Blocks until the snapshot (or a newer one) is written; an error if
    /// its write failed and none after it has succeeded.
    pub fn wait(&self) -> Result<(), String> {
        let (lock, cond) = &*self.written;
        let mut w = lock.lock().expect("lock");
        loop {
            if w.ok >= self.seq {
                return Ok(());
            }
            if let Some((at, why)) = &w.failed
                && *at >= self.seq
            {
                return Err(format!("cannot record the update on disk: {why}"));
            }
            w = cond.wait(w).expect("lock");
        }
    }
}

impl Persister {
    /// Starts the thread.
    pub fn spawn(mut store: impl SlotStore, live: Arc<Mutex<BTreeSet<Sha256Digest>>>) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let written = Arc::new((Mutex::new(Written::default()), Condvar::new()));
        let report = written.clone();
        std::thread::Builder::new()
            .name("persist".into())
            .spawn(move || {
                let done = |seq: u64, result: Result<(), String>| {
                    let (lock, cond) = &*report;
                    let mut w = lock.lock().expect("lock");
                    match result {
                        Ok(()) => w.ok = w.ok.max(seq),
                        Err(e) => w.failed = Some((seq, e)),
                    }
                    cond.notify_all();
                };
                let mut unwritten: Option<TrustFiles> = None;
                while let Ok(mut job) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        job = Job {
                            write: job.write || newer.write,
                            collect: job.collect || newer.collect,
                            history: newer.history.or(job.history),
                            trust: newer.trust.or(job.trust),
                            ..newer
                        };
                    }
                    // First, and kept for the next job if it fails: no slots
                    // reach the disk ahead of the trust that took them.
                    // A newer trust state replaces one that failed: never
                    // the older written after it.
                    if let Some(t) = job.trust.take() {
                        unwritten = Some(t);
                    }
                    if let Some(t) = unwritten.take()
                        && let Err(e) = t.write()
                    {
                        error!("cannot persist the trust state: {e}");
                        unwritten = Some(t);
                        if job.write {
                            done(job.seq, Err(format!("writing the trust state: {e}")));
                        }
                        continue;
                    }
                    if let Some(h) = job.history.take()
                        && let Err(e) = store.write_history(&h)
                    {
                        error!("cannot persist the update history: {e:#}");
                    }
                    let p = job.slots;
                    if job.write {
                        if let Err(e) = store.write(&p, job.collect) {
                            // Serving continues from memory; the next persist retries.
                            error!("cannot persist the agent's slots: {e:#}");
                            done(job.seq, Err(format!("{e:#}")));
                            continue;
                        }
                        done(job.seq, Ok(()));
                    }
                    if !job.collect {
                        continue;
                    }
                    // The main loop names a file in `live` before any work
                    // uses it, and each file is checked against `live` with
                    // it locked: nothing the loop starts can find a file
                    // that is about to go.
                    let mut keep = BTreeSet::new();
                    for s in &p.slots {
                        for m in [&s.active, &s.previous, &s.candidate].into_iter().flatten() {
                            keep.insert(m.sha256);
                            keep.extend(m.selftest.map(|t| t.sha256));
                            keep.extend(m.baseline.map(|b| b.sha256));
                        }
                    }
                    store.collect(&keep, &live);
                }
            })
            .context("starting the persist thread")?;
        Ok(Self { tx, seq: 0, written })
    }

    /// Queues a snapshot to write, after which unreferenced artifacts are
    /// removed; returns at once.
    pub fn persist(&mut self, p: Persisted) {
        self.seq += 1;
        // The thread only ends with the process.
        let _ = self.tx.send(Job { slots: p, write: true, collect: true, history: None, trust: None, seq: self.seq });
    }

    /// Queues the trust state to write before any slots queued after it;
    /// returns at once. `slots` is the current snapshot (written only if a
    /// persist is pending anyway).
    pub fn persist_trust(&self, slots: Persisted, t: TrustFiles) {
        let _ = self.tx.send(Job { slots, write: false, collect: false, history: None, trust: Some(t), seq: self.seq });
    }

    /// Queues the update steps to write; returns at once. `slots` is the
    /// current snapshot (written only if a persist is pending anyway).
    pub fn persist_history(&self, slots: Persisted, h: Vec<tern_proto::UpdateEvent>) {
        let _ = self.tx.send(Job { slots, write: false, collect: false, history: Some(h), trust: None, seq: self.seq });
    }

    /// What to wait on for every snapshot queued so far to be on disk.
    pub fn durable(&self) -> Durable {
        Durable { seq: self.seq, written: self.written.clone() }
    }

    /// Removes the artifacts slots read from disk (`p`) do not name, without
    /// writing them again: what the agent does at start.
    pub fn collect(&self, p: Persisted) {
        let _ = self.tx.send(Job { slots: p, write: false, collect: true, history: None, trust: None, seq: self.seq });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Condvar;
    use std::time::Duration;
    use tern_agent_core::PersistedSlot;

    fn m(name: &str, version: u32) -> ModelManifest {
        ModelManifest {
            name: name.into(),
            version,
            sha256: Sha256Digest::of(format!("{name}{version}").as_bytes()),
            size: 4,
            format: ModelFormat::Onnx,
            inputs: vec![TensorSpec { name: "X".into(), dtype: DType::F32, shape: vec![None, Some(4)] }],
            outputs: vec![],
            created_at: 1_700_000_000,
            selftest: None,
            update: None,
            alternative: None,
            baseline: None,
            capture: None,
        }
    }

    fn open(dir: &Path) -> Store {
        // sled releases its lock from a background thread after the last
        // handle drops: wait for it when reopening in the same process.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match Store::open(dir) {
                Ok(s) => return s,
                Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("{e:#}"),
            }
        }
    }

    #[test]
    fn schema_1_state_is_migrated_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Exactly what agents up to ae5a7d0 wrote: `slots/active`, a JSON
            // list of the serving manifests in the wire manifest's layout.
            let db = sled::open(dir.path().join("state")).unwrap();
            let v1 = serde_json::json!([{
                "name": "iris", "version": 3, "sha256": m("iris", 3).sha256, "size": 4, "format": "onnx",
                "inputs": [{ "name": "X", "dtype": "f32", "shape": [null, 4] }], "outputs": [],
                "created_at": 1_700_000_000u64
            }]);
            db.insert(ACTIVE_V1, serde_json::to_vec(&v1).unwrap()).unwrap();
            db.flush().unwrap();
        }
        let store = open(dir.path());
        let (p, complete) = store.load().unwrap();
        assert!(complete);
        assert_eq!(p.generation, 0);
        assert_eq!(
            p.slots,
            [PersistedSlot {
                name: "iris".into(),
                active: Some(m("iris", 3)),
                previous: None,
                candidate: None,
                stage: Stage::Pending,
                given_up: None,
                interrupted: 0,
            }]
        );
        assert!(!store.db.contains_key(ACTIVE_V1).unwrap());
        drop(store);
        // Migrated once: a second open reads schema 2 as it is.
        assert_eq!(open(dir.path()).load().unwrap().0, p);
    }

    #[test]
    fn slots_round_trip_and_unknown_fields_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let p = Persisted {
            generation: 9,
            slots: vec![PersistedSlot {
                name: "iris".into(),
                active: Some(m("iris", 2)),
                previous: Some(m("iris", 1)),
                candidate: Some(ModelManifest {
                    selftest: Some(SelfTestRef { sha256: Sha256Digest::of(b"golden"), size: 9, tolerance_ppm: 100 }),
                    update: Some(UpdatePolicy { probation_secs: 7, ..UpdatePolicy::default() }),
                    alternative: None,
                    baseline: None,
                    capture: None,
                    ..m("iris", 3)
                }),
                stage: Stage::GaveUp { reason: "self-test failed".into(), rolled_back: false },
                given_up: Some((m("iris", 4), Stage::GaveUp { reason: "probation: slow".into(), rolled_back: true })),
                interrupted: 2,
            }],
        };
        store.write(&p, true).unwrap();
        assert_eq!(store.load().unwrap(), (p.clone(), true));
        // A newer agent's fields do not stop this one from reading the rest.
        let mut newer: serde_json::Value = serde_json::from_slice(&store.db.get(SLOTS).unwrap().unwrap()).unwrap();
        newer["schema"] = 3.into();
        newer["update"] = serde_json::json!({ "state": "probation" });
        newer["slots"][0]["active"]["golden"] = serde_json::json!([1, 2]);
        store.db.insert(SLOTS, serde_json::to_vec(&newer).unwrap()).unwrap();
        assert_eq!(store.load().unwrap().0, p);
    }

    #[test]
    fn unreadable_slots_are_set_aside_and_nothing_is_removed_until_a_complete_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.write(&Persisted { generation: 7, slots: vec![] }, true).unwrap();
        store.db.insert(SLOTS, b"{not json".as_slice()).unwrap();
        assert!(store.load().is_err());
        store.set_aside(1_700_000_000).unwrap();
        // The anti-rollback generation outlives the slots it was stored with:
        // an older signed state stays refused.
        let floor = Persisted { generation: 7, slots: vec![] };
        assert_eq!(store.load().unwrap(), (floor.clone(), false));
        assert!(store.db.get(b"slots/corrupt/1700000000").unwrap().is_some());
        // Still incomplete after a restart, however the (empty) slots were written.
        store.write(&floor, false).unwrap();
        assert!(!store.load().unwrap().1);
        store.write(&floor, true).unwrap();
        assert!(store.load().unwrap().1);
    }

    #[test]
    fn collect_keeps_what_is_referenced_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, b, c) = (m("a", 1).sha256, m("b", 1).sha256, m("c", 1).sha256);
        std::fs::write(store.model_path(&a), b"a").unwrap();
        std::fs::write(store.model_path(&b), b"b").unwrap();
        std::fs::write(store.partial_path(&c), b"c").unwrap();
        std::fs::write(store.synced_path(&c), b"1").unwrap();
        std::fs::write(store.partial_path(&b), b"b").unwrap();
        std::fs::write(store.synced_path(&b), b"1").unwrap();
        std::fs::write(dir.path().join("models/stray.tmp"), b"x").unwrap();
        std::fs::write(dir.path().join("partial/.x.synced.tmp9"), b"1").unwrap();
        let live = Mutex::new(BTreeSet::from([c]));
        assert_eq!(store.collect(&[a].into_iter().collect(), &live), 4);
        assert!(store.model_path(&a).is_file() && store.partial_path(&c).is_file());
        assert!(store.synced_path(&c).is_file(), "a download's record stays with it");
        assert!(!store.model_path(&b).exists() && !store.partial_path(&b).exists());
        assert!(!store.synced_path(&b).exists());
        assert!(dir.path().join("partial/.x.synced.tmp9").exists(), "an atomic write under way is left alone");
        drop(store);
        let store = open(dir.path());
        assert!(!dir.path().join("partial/.x.synced.tmp9").exists(), "and removed at the next start");
        assert!(store.partial_path(&c).is_file());
        assert_eq!(std::fs::read_dir(dir.path().join("models")).unwrap().count(), 1);
        assert_eq!(std::fs::read_dir(dir.path().join("trash")).unwrap().count(), 0);
    }

    #[test]
    fn a_download_resumes_only_from_what_it_recorded_as_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let sha = m("big", 1).sha256;
        assert_eq!(store.resume_offset(&sha, 100), 0, "nothing there");
        // Ten bytes long, four recorded as fsynced: the six after may be
        // what a power cut left (zeros), not what was sent.
        std::fs::write(store.partial_path(&sha), [7u8; 10]).unwrap();
        assert_eq!(store.resume_offset(&sha, 100), 0, "no record: from the start");
        std::fs::write(store.synced_path(&sha), b"4").unwrap();
        assert_eq!(store.resume_offset(&sha, 100), 4);
        // A record past the file (it was cut shorter since) or past the size.
        std::fs::write(store.synced_path(&sha), b"50").unwrap();
        assert_eq!(store.resume_offset(&sha, 100), 10);
        assert_eq!(store.resume_offset(&sha, 8), 0);
        std::fs::write(store.synced_path(&sha), b"garbage").unwrap();
        assert_eq!(store.resume_offset(&sha, 100), 0);
        store.drop_partial(&sha);
        assert!(!store.partial_path(&sha).exists() && !store.synced_path(&sha).exists());
    }

    /// A store whose writes wait until the test lets them through.
    #[derive(Clone, Default)]
    struct Gated {
        open: Arc<(Mutex<bool>, Condvar)>,
        written: Arc<Mutex<Vec<u64>>>,
        collected: Arc<Mutex<Vec<BTreeSet<Sha256Digest>>>>,
    }

    impl SlotStore for Gated {
        fn write(&mut self, p: &Persisted, _complete: bool) -> Result<()> {
            let (lock, cv) = &*self.open;
            drop(cv.wait_while(lock.lock().unwrap(), |open| !*open).unwrap());
            self.written.lock().unwrap().push(p.generation);
            Ok(())
        }
        fn collect(&mut self, keep: &BTreeSet<Sha256Digest>, live: &Mutex<BTreeSet<Sha256Digest>>) {
            let mut all = keep.clone();
            all.extend(live.lock().unwrap().iter().copied());
            self.collected.lock().unwrap().push(all);
        }
    }

    #[test]
    fn persisting_never_waits_for_the_disk_and_the_newest_snapshot_wins() {
        let store = Gated::default();
        let live = Arc::new(Mutex::new(BTreeSet::from([m("live", 1).sha256])));
        let mut persister = Persister::spawn(store.clone(), live).unwrap();
        let started = std::time::Instant::now();
        for generation in 1..=100 {
            let slot = PersistedSlot {
                name: "a".into(),
                active: Some(m("a", 1)),
                previous: None,
                candidate: None,
                stage: Stage::Pending,
                given_up: None,
                interrupted: 0,
            };
            persister.persist(Persisted { generation, slots: vec![slot] });
        }
        // A hundred persists while the disk is stuck took no time at all.
        assert!(started.elapsed() < Duration::from_millis(100), "{:?}", started.elapsed());
        assert!(store.written.lock().unwrap().is_empty());
        *store.open.0.lock().unwrap() = true;
        store.open.1.notify_all();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.written.lock().unwrap().last() != Some(&100) {
            assert!(std::time::Instant::now() < deadline, "{:?}", store.written.lock().unwrap());
            std::thread::sleep(Duration::from_millis(5));
        }
        let written = store.written.lock().unwrap().clone();
        assert!(written.len() <= 2, "snapshots that piled up are skipped: {written:?}");
        while store.collected.lock().unwrap().len() < written.len() {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Collection keeps what the written state and the live slots name.
        let keep = store.collected.lock().unwrap().last().unwrap().clone();
        assert_eq!(keep, BTreeSet::from([m("live", 1).sha256, m("a", 1).sha256]));
    }
}

#[cfg(test)]
mod durable_tests {
    use super::*;
    use std::time::Duration;

    /// A store that fails its first `fails` writes (a full disk), and whose
    /// writes take 200 ms.
    struct Slow {
        fails: usize,
    }

    impl SlotStore for Slow {
        fn write(&mut self, _p: &Persisted, _complete: bool) -> Result<()> {
            std::thread::sleep(Duration::from_millis(200));
            if self.fails > 0 {
                self.fails -= 1;
                bail!("No space left on device (os error 28)");
            }
            Ok(())
        }
        fn collect(&mut self, _keep: &BTreeSet<Sha256Digest>, _live: &Mutex<BTreeSet<Sha256Digest>>) {}
    }

    #[test]
    fn work_that_waits_for_a_snapshot_starts_only_once_it_is_on_disk_or_fails_with_why() {
        let mut persister = Persister::spawn(Slow { fails: 1 }, Arc::default()).unwrap();
        // Nothing queued: nothing to wait for.
        persister.durable().wait().unwrap();
        // The first write fails: the waiter is told, with the reason.
        persister.persist(Persisted::default());
        let started = std::time::Instant::now();
        let e = persister.durable().wait().unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(150), "it waited for the write");
        assert_eq!(e, "cannot record the update on disk: No space left on device (os error 28)");
        // The next one succeeds: waiting for it (or anything before it) passes.
        persister.persist(Persisted { generation: 2, slots: vec![] });
        let started = std::time::Instant::now();
        persister.durable().wait().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150), "it waited for the write");
    }
}

#[cfg(test)]
mod trust_order_tests {
    use super::*;

    /// A store that records, at each slots write, what the trust files
    /// held then.
    struct Seen {
        dir: PathBuf,
        seen: Arc<Mutex<Vec<Saw>>>,
    }

    /// A generation written, with the TUF file and the signed marker then.
    type Saw = (u64, Option<Vec<u8>>, bool);

    /// A persister over a [`Seen`] store watching `dir`, and what it sees.
    fn watching(dir: &Path) -> (Persister, Arc<Mutex<Vec<Saw>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let store = Seen { dir: dir.to_path_buf(), seen: seen.clone() };
        (Persister::spawn(store, Arc::default()).unwrap(), seen)
    }

    impl SlotStore for Seen {
        fn write(&mut self, p: &Persisted, _complete: bool) -> Result<()> {
            let tuf = std::fs::read(self.dir.join("tuf.json")).ok();
            let signed = self.dir.join("signed-states").exists();
            self.seen.lock().unwrap().push((p.generation, tuf, signed));
            Ok(())
        }
        fn collect(&mut self, _keep: &BTreeSet<Sha256Digest>, _live: &Mutex<BTreeSet<Sha256Digest>>) {}
    }

    #[test]
    fn the_trust_state_reaches_the_disk_before_the_slots_queued_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut persister, seen) = watching(dir.path());
        for g in 1..=20u64 {
            let t = TrustFiles::new(dir.path(), Some(format!("tuf {g}").into_bytes()), true);
            persister.persist_trust(Persisted::default(), t);
            persister.persist(Persisted { generation: g, slots: vec![] });
        }
        persister.durable().wait().unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.last().unwrap().0, 20);
        for (g, tuf, signed) in seen.iter() {
            assert_eq!(tuf.as_deref(), Some(format!("tuf {g}").as_bytes()), "slots of generation {g}");
            assert!(signed);
        }
    }

    #[test]
    fn slots_are_not_written_while_the_trust_state_cannot_be() {
        let dir = tempfile::tempdir().unwrap();
        let (mut persister, seen) = watching(dir.path());
        // A folder that is not there: the trust write fails.
        let missing = dir.path().join("gone");
        persister.persist_trust(Persisted::default(), TrustFiles::new(&missing, Some(b"x".to_vec()), false));
        persister.persist(Persisted { generation: 1, slots: vec![] });
        let e = persister.durable().wait().unwrap_err();
        assert!(e.starts_with("cannot record the update on disk: writing the trust state: "), "{e}");
        assert!(seen.lock().unwrap().is_empty());
        // Once it can be written, it goes first, then the slots.
        std::fs::create_dir(&missing).unwrap();
        persister.persist(Persisted { generation: 2, slots: vec![] });
        persister.durable().wait().unwrap();
        assert_eq!(std::fs::read(missing.join("tuf.json")).unwrap(), b"x");
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_trust_state_that_failed_is_never_written_over_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut persister, _seen) = watching(dir.path());
        let trust = dir.path().join("identity");
        persister.persist_trust(Persisted::default(), TrustFiles::new(&trust, Some(b"old".to_vec()), false));
        persister.persist(Persisted { generation: 1, slots: vec![] });
        assert!(persister.durable().wait().is_err(), "no folder yet");
        std::fs::create_dir(&trust).unwrap();
        persister.persist_trust(Persisted::default(), TrustFiles::new(&trust, Some(b"new".to_vec()), false));
        persister.persist(Persisted { generation: 2, slots: vec![] });
        persister.durable().wait().unwrap();
        // A later job without trust writes nothing of the one that failed.
        persister.persist(Persisted { generation: 3, slots: vec![] });
        persister.durable().wait().unwrap();
        assert_eq!(std::fs::read(trust.join("tuf.json")).unwrap(), b"new");
    }
}
