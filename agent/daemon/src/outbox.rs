//! Telemetry store-and-forward: drift windows and alert changes queued in
//! sled on their own thread (numbered, fsynced), sent to the coordinator in
//! id order while a session is up, and removed once it acknowledges them.
//! The buffer is bounded: when full the oldest record goes and the count of
//! those dropped travels as a record of its own.

use crate::store::Store;
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tern_proto::{TelemetryBody, TelemetryRecord};
use tokio::sync::Notify;
use tracing::{error, warn};

const NEXT: &[u8] = b"m/next";
const STREAM: &[u8] = b"m/stream";
const DROPPED: &[u8] = b"m/dropped";
const RECORD: u8 = b'r';

/// Records queued for the outbox thread before new ones are dropped (and
/// counted) at once: the request path never waits on the disk.
const QUEUE: usize = 1024;

fn record_key(id: u64) -> [u8; 9] {
    let mut k = [RECORD; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<Option<u64>> {
    Ok(tree.get(key)?.map(|v| v.as_ref().try_into().map(u64::from_be_bytes)).transpose().ok().flatten())
}

/// The buffer.
pub struct Outbox {
    tree: sled::Tree,
    stream: u64,
    queue: std::sync::mpsc::SyncSender<(u64, TelemetryBody)>,
    /// Signalled when a record is on disk, ready to send.
    pub ready: Arc<Notify>,
    /// Records dropped before they reached the disk (the queue full).
    unqueued: Arc<AtomicU64>,
    /// Records on disk.
    held: Arc<AtomicU64>,
    /// Serializes removals with the thread's bound enforcement.
    lock: Arc<Mutex<()>>,
}

impl Outbox {
    /// Opens the buffer in the agent's store, holding at most `max` records.
    pub fn open(store: Arc<Store>, max: u64) -> Result<Arc<Self>> {
        let tree = store.telemetry()?;
        let stream = match read_u64(&tree, STREAM)? {
            Some(s) => s,
            None => {
                let mut b = [0u8; 8];
                getrandom(&mut b)?;
                let s = u64::from_le_bytes(b);
                tree.insert(STREAM, &s.to_be_bytes())?;
                store.sync()?;
                s
            }
        };
        let held = tree.scan_prefix([RECORD]).count() as u64;
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, TelemetryBody)>(QUEUE);
        let outbox = Arc::new(Self {
            tree: tree.clone(),
            stream,
            queue: tx,
            ready: Arc::new(Notify::new()),
            unqueued: Arc::new(AtomicU64::new(0)),
            held: Arc::new(AtomicU64::new(held)),
            lock: Arc::new(Mutex::new(())),
        });
        let (ready, unqueued, held, lock) =
            (outbox.ready.clone(), outbox.unqueued.clone(), outbox.held.clone(), outbox.lock.clone());
        std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // What else is waiting goes to disk with it, in one sync.
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter().take(QUEUE));
                    let _guard = lock.lock().expect("lock");
                    if let Err(e) = write(&tree, &store, batch, max, &unqueued, &held) {
                        error!("telemetry buffer: {e:#}");
                    }
                    drop(_guard);
                    ready.notify_one();
                }
            })
            .context("starting the outbox thread")?;
        Ok(outbox)
    }

    /// The stream its ids belong to.
    pub fn stream(&self) -> u64 {
        self.stream
    }

    /// Queues a record, stamped now. Never blocks: with the queue full it
    /// is dropped and counted.
    pub fn push(&self, body: TelemetryBody) {
        let at_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        if self.queue.try_send((at_ms, body)).is_err() {
            self.unqueued.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records on disk.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// The oldest records on disk: at most `max` of them, together at most
    /// `max_bytes` encoded (at least one).
    pub fn oldest(&self, max: usize, max_bytes: usize) -> Vec<TelemetryRecord> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for kv in self.tree.scan_prefix([RECORD]).take(max) {
            let Ok((k, v)) = kv else { break };
            match postcard::from_bytes::<TelemetryRecord>(&v) {
                Ok(r) => {
                    bytes += v.len();
                    if bytes > max_bytes && !out.is_empty() {
                        break;
                    }
                    out.push(r);
                }
                Err(e) => {
                    // Written by this agent: only a damaged disk gets here.
                    warn!("telemetry buffer: dropping an unreadable record: {e}");
                    let _ = self.tree.remove(k);
                    self.held.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        out
    }

    /// Removes every record up to `up_to` (the coordinator has them). Not
    /// synced: a power cut sends them again, and the coordinator keeps each
    /// once.
    pub fn acknowledged(&self, up_to: u64) {
        let _guard = self.lock.lock().expect("lock");
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in self.tree.range(record_key(0)..=record_key(up_to)).keys().flatten() {
            batch.remove(k);
            n += 1;
        }
        if let Err(e) = self.tree.apply_batch(batch) {
            error!("telemetry buffer: removing acknowledged records: {e}");
            return;
        }
        self.held.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Numbers, bounds and writes a batch of records, durably.
fn write(
    tree: &sled::Tree,
    store: &Store,
    bodies: Vec<(u64, TelemetryBody)>,
    max: u64,
    unqueued: &AtomicU64,
    held: &AtomicU64,
) -> Result<()> {
    let mut next = read_u64(tree, NEXT)?.unwrap_or(1);
    let mut dropped = read_u64(tree, DROPPED)?.unwrap_or(0) + unqueued.swap(0, Ordering::Relaxed);
    let mut batch = sled::Batch::default();
    let mut added = 0u64;
    let mut records = Vec::new();
    for (at_ms, body) in bodies {
        if dropped > 0 {
            records.push(TelemetryRecord { id: next, at_ms, body: TelemetryBody::Dropped(dropped) });
            next += 1;
            dropped = 0;
        }
        records.push(TelemetryRecord { id: next, at_ms, body });
        next += 1;
    }
    for r in &records {
        batch.insert(&record_key(r.id), postcard::to_stdvec(r)?);
        added += 1;
    }
    // Over the bound: the oldest go, counted for the next record to say.
    let over = (held.load(Ordering::Relaxed) + added).saturating_sub(max);
    let mut removed = 0;
    for k in tree.scan_prefix([RECORD]).keys().flatten().take(over as usize) {
        batch.remove(k);
        removed += 1;
    }
    // Still over (the batch itself is larger than the bound): its own oldest.
    let mut own = records.iter();
    while removed < over {
        let Some(r) = own.next() else { break };
        batch.remove(&record_key(r.id));
        removed += 1;
    }
    dropped += removed;
    batch.insert(NEXT, &next.to_be_bytes());
    batch.insert(DROPPED, &dropped.to_be_bytes());
    tree.apply_batch(batch)?;
    store.sync()?;
    held.store(held.load(Ordering::Relaxed) + added - removed, Ordering::Relaxed);
    Ok(())
}

/// Random bytes from the kernel.
fn getrandom(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf).context("reading /dev/urandom")
}
