//! Telemetry store-and-forward: drift windows and alert changes queued in
//! sled on their own thread (numbered, fsynced), sent to the coordinator in
//! id order while a session is up (only records already fsynced, so no id
//! is ever sent that a power cut could hand out again), and removed once it
//! acknowledges them. The buffer is bounded: when full the oldest records
//! go, and a running count of those dropped travels with every batch.
//! Captured samples have a bound of their own within it (an index of their
//! ids beside the records; the agent holds it to half the whole bound),
//! and when the whole buffer is full the oldest captures go before any
//! window or alert.

use crate::store::Store;
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tern_proto::{TelemetryBody, TelemetryRecord, WireVersion};
use tokio::sync::Notify;
use tracing::{error, warn};

const NEXT: &[u8] = b"m/next";
const STREAM: &[u8] = b"m/stream";
const DROPPED: &[u8] = b"m/dropped";
const RECORD: u8 = b'r';
const CAPTURE: u8 = b'c';
/// `m/cday/<model>`: the UTC day and the capture bytes written on it (two
/// u64), so a restart or a new version keeps the day's budget.
const CAPTURE_DAY: &[u8] = b"m/cday/";

fn capture_day_key(model: &str) -> Vec<u8> {
    [CAPTURE_DAY, model.as_bytes()].concat()
}

/// The (day, bytes) stored under `key`.
fn read_day(tree: &sled::Tree, key: &[u8]) -> (u64, u64) {
    match tree.get(key) {
        Ok(Some(v)) if v.len() == 16 => {
            let (d, b) = v.split_at(8);
            (u64::from_be_bytes(d.try_into().expect("8")), u64::from_be_bytes(b.try_into().expect("8")))
        }
        _ => (0, 0),
    }
}

/// Records queued for the outbox thread before new ones are dropped (and
/// counted) at once: the request path never waits on the disk.
const QUEUE: usize = 1024;

fn record_key(id: u64) -> [u8; 9] {
    let mut k = [RECORD; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn capture_key(id: u64) -> [u8; 9] {
    let mut k = [CAPTURE; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The id of a record or capture key.
fn key_id(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.get(1..9)?.try_into().ok()?))
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<Option<u64>> {
    match tree.get(key)? {
        None => Ok(None),
        Some(v) => match <[u8; 8]>::try_from(v.as_ref()) {
            Ok(b) => Ok(Some(u64::from_be_bytes(b))),
            Err(_) => anyhow::bail!("telemetry buffer: {} is not 8 bytes", String::from_utf8_lossy(key)),
        },
    }
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
    /// Of those, captured samples.
    captures: Arc<AtomicU64>,
    /// Records queued for the thread and not yet written (or dropped).
    queued: Arc<AtomicU64>,
    /// The highest id fsynced: what may be sent.
    durable: Arc<AtomicU64>,
    /// Serializes removals with the thread's writes.
    lock: Arc<Mutex<()>>,
}

impl Outbox {
    /// Opens the buffer in the agent's store, holding at most `max` records
    /// and of those at most `max_captures` captured samples.
    pub fn open(store: Arc<Store>, max: u64, max_captures: u64) -> Result<Arc<Self>> {
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
        // An index entry whose record is gone (removed by a build without
        // the index) is dropped.
        for k in tree.scan_prefix([CAPTURE]).keys().flatten() {
            if key_id(&k).is_none_or(|id| !tree.contains_key(record_key(id)).unwrap_or(false)) {
                tree.remove(k)?;
            }
        }
        let captures = tree.scan_prefix([CAPTURE]).count() as u64;
        // After a restart what is there is what the disk kept: ids below
        // the next one (written with the records). Not found by iterating
        // backwards: sled's reverse scan brings a 1 MiB constant into the
        // binary.
        let durable = Arc::new(AtomicU64::new(read_u64(&tree, NEXT)?.unwrap_or(1).saturating_sub(1)));
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, TelemetryBody)>(QUEUE);
        let outbox = Arc::new(Self {
            tree: tree.clone(),
            stream,
            queue: tx,
            ready: Arc::new(Notify::new()),
            unqueued: Arc::new(AtomicU64::new(0)),
            held: Arc::new(AtomicU64::new(held)),
            captures: Arc::new(AtomicU64::new(captures)),
            queued: Arc::new(AtomicU64::new(0)),
            durable: durable.clone(),
            lock: Arc::new(Mutex::new(())),
        });
        let (ready, unqueued, held, lock) =
            (outbox.ready.clone(), outbox.unqueued.clone(), outbox.held.clone(), outbox.lock.clone());
        let (queued, captures) = (outbox.queued.clone(), outbox.captures.clone());
        std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // What else is waiting goes to disk with it, in one sync.
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter().take(QUEUE));
                    let n = batch.len() as u64;
                    let _guard = lock.lock().expect("lock");
                    let pending = unqueued.swap(0, Ordering::Relaxed);
                    let bound = Bound { max, max_captures };
                    match write(&tree, &store, batch, bound, pending, &held, &captures) {
                        Ok(last) => durable.store(last, Ordering::Release),
                        Err(e) => {
                            // Counted as dropped with the next write.
                            unqueued.fetch_add(n + pending, Ordering::Relaxed);
                            error!("telemetry buffer: {e:#}");
                        }
                    }
                    drop(_guard);
                    queued.fetch_sub(n, Ordering::Relaxed);
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
        // A burst of captures leaves the queue's other half to windows and
        // alerts.
        if matches!(body, TelemetryBody::Capture(_)) && self.queued() >= QUEUE as u64 / 2 {
            self.unqueued.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Counted before it is sent: the thread may take it at once.
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.queue.try_send((at_ms, body)).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.unqueued.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The bytes of `model`'s captures written on UTC day `day`.
    pub fn captured_on(&self, model: &str, day: u64) -> u64 {
        match read_day(&self.tree, &capture_day_key(model)) {
            (d, bytes) if d == day => bytes,
            _ => 0,
        }
    }

    /// Records pushed and not yet written to disk.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Records on disk.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Records dropped so far on this stream (a running count).
    pub fn dropped(&self) -> u64 {
        read_u64(&self.tree, DROPPED).ok().flatten().unwrap_or(0)
    }

    /// The oldest records fsynced: at most `max` of them, together at most
    /// `max_bytes` encoded, each one `wire` has. A record larger than
    /// `max_bytes` alone, or one `wire` does not have (a quality window or
    /// a capture for a coordinator older than wire 9), is dropped (and
    /// counted): the coordinator could never take it.
    pub fn oldest(&self, max: usize, max_bytes: usize, wire: WireVersion) -> Vec<TelemetryRecord> {
        let _guard = self.lock.lock().expect("lock");
        let durable = self.durable.load(Ordering::Acquire);
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut drop_keys = Vec::new();
        // Of those, the ones this wire version cannot carry: gone, but not
        // counted as dropped (no buffer overflowed).
        let mut unsendable = 0;
        for kv in self.tree.range(record_key(0)..=record_key(durable)).take(max) {
            let Ok((k, v)) = kv else { break };
            if v.len() > max_bytes {
                warn!(bytes = v.len(), "telemetry buffer: dropping a record too large to send");
                drop_keys.push(k);
                continue;
            }
            match postcard::from_bytes::<TelemetryRecord>(&v) {
                Ok(r) if r.body.since() > wire => {
                    unsendable += 1;
                    drop_keys.push(k);
                }
                Ok(r) => {
                    bytes += v.len();
                    if bytes > max_bytes {
                        break;
                    }
                    out.push(r);
                }
                Err(e) => {
                    // Written by this agent: only a damaged disk gets here.
                    warn!("telemetry buffer: dropping an unreadable record: {e}");
                    drop_keys.push(k);
                }
            }
        }
        if !drop_keys.is_empty() {
            let n = drop_keys.len() as u64;
            let mut batch = sled::Batch::default();
            let mut c = 0;
            for k in drop_keys {
                if let Some(id) = key_id(&k)
                    && self.tree.contains_key(capture_key(id)).unwrap_or(false)
                {
                    batch.remove(&capture_key(id));
                    c += 1;
                }
                batch.remove(k);
            }
            let dropped = self.dropped() + n - unsendable;
            batch.insert(DROPPED, &dropped.to_be_bytes());
            if self.tree.apply_batch(batch).is_ok() {
                sub(&self.held, n);
                sub(&self.captures, c);
                // More may wait behind the ones dropped.
                self.ready.notify_one();
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
        let mut c = 0;
        for k in self.tree.range(capture_key(0)..=capture_key(up_to)).keys().flatten() {
            batch.remove(k);
            c += 1;
        }
        if let Err(e) = self.tree.apply_batch(batch) {
            error!("telemetry buffer: removing acknowledged records: {e}");
            return;
        }
        sub(&self.held, n);
        sub(&self.captures, c);
    }
}

/// How many records, and captured samples among them, the buffer holds.
#[derive(Clone, Copy)]
struct Bound {
    max: u64,
    max_captures: u64,
}

/// Numbers, bounds and writes a batch of records, durably; returns the
/// highest id now on disk.
fn write(
    tree: &sled::Tree,
    store: &Store,
    bodies: Vec<(u64, TelemetryBody)>,
    bound: Bound,
    unqueued: u64,
    held: &AtomicU64,
    captures: &AtomicU64,
) -> Result<u64> {
    let mut next = read_u64(tree, NEXT)?.unwrap_or(1);
    let mut dropped = read_u64(tree, DROPPED)?.unwrap_or(0) + unqueued;
    let mut batch = sled::Batch::default();
    // This batch's ids, and whether each is a capture.
    let mut ids = Vec::new();
    let mut days: std::collections::BTreeMap<Vec<u8>, (u64, u64)> = Default::default();
    for (at_ms, body) in bodies {
        let capture = matches!(body, TelemetryBody::Capture(_));
        if let TelemetryBody::Capture(c) = &body {
            let key = capture_day_key(&c.model);
            let day = at_ms / 86_400_000;
            let entry = days.entry(key.clone()).or_insert_with(|| read_day(tree, &key));
            if entry.0 != day {
                *entry = (day, 0);
            }
            entry.1 += (c.inputs.len() + c.outputs.len()) as u64;
        }
        let r = TelemetryRecord { id: next, at_ms, body };
        batch.insert(&record_key(r.id), postcard::to_stdvec(&r)?);
        if capture {
            batch.insert(&capture_key(r.id), &[]);
        }
        ids.push((r.id, capture));
        next += 1;
    }
    let added = ids.len() as u64;
    let added_captures = ids.iter().filter(|(_, c)| *c).count() as u64;
    // Removed: (id, whether a capture).
    let mut gone: std::collections::BTreeMap<u64, bool> = Default::default();
    // Captures over their own bound: the oldest captures go.
    let over = (captures.load(Ordering::Relaxed) + added_captures).saturating_sub(bound.max_captures);
    let on_disk = tree.scan_prefix([CAPTURE]).keys().flatten().filter_map(|k| key_id(&k));
    let own = ids.iter().filter(|(_, c)| *c).map(|(id, _)| *id);
    for id in on_disk.chain(own).take(over as usize) {
        gone.insert(id, true);
    }
    // Still over the whole bound: the oldest captures go first, then the
    // oldest records, whatever they are.
    let over = (held.load(Ordering::Relaxed) + added).saturating_sub(bound.max + gone.len() as u64);
    let captures_first = tree.scan_prefix([CAPTURE]).keys().flatten().filter_map(|k| key_id(&k));
    let own_captures = ids.iter().filter(|(_, c)| *c).map(|(id, _)| *id);
    let on_disk = tree.scan_prefix([RECORD]).keys().flatten().filter_map(|k| key_id(&k));
    let own = ids.iter().map(|(id, _)| *id);
    let mut more = 0;
    for id in captures_first.chain(own_captures).chain(on_disk).chain(own) {
        if more == over {
            break;
        }
        if gone.contains_key(&id) {
            continue;
        }
        let capture = ids.iter().any(|(i, c)| *i == id && *c) || tree.contains_key(capture_key(id))?;
        gone.insert(id, capture);
        more += 1;
    }
    for (id, capture) in &gone {
        batch.remove(&record_key(*id));
        if *capture {
            batch.remove(&capture_key(*id));
        }
    }
    let removed = gone.len() as u64;
    let removed_captures = gone.values().filter(|c| **c).count() as u64;
    dropped += removed;
    for (key, (day, bytes)) in days {
        batch.insert(key, [day.to_be_bytes(), bytes.to_be_bytes()].concat());
    }
    batch.insert(NEXT, &next.to_be_bytes());
    batch.insert(DROPPED, &dropped.to_be_bytes());
    tree.apply_batch(batch)?;
    store.sync()?;
    held.store((held.load(Ordering::Relaxed) + added).saturating_sub(removed), Ordering::Relaxed);
    captures
        .store((captures.load(Ordering::Relaxed) + added_captures).saturating_sub(removed_captures), Ordering::Relaxed);
    Ok(next - 1)
}

/// Takes `n` off a count, never below zero.
fn sub(count: &AtomicU64, n: u64) {
    let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some(c.saturating_sub(n)));
}

/// Random bytes from the kernel.
fn getrandom(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf).context("reading /dev/urandom")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::MonitorStarted;

    fn body(i: u32) -> TelemetryBody {
        TelemetryBody::Started(MonitorStarted { model: format!("m{i}"), version: i })
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{what}");
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_and_counts_them_and_ids_go_on_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let outbox = Outbox::open(store.clone(), 3, 3).unwrap();
        let stream = outbox.stream();
        for i in 0..5 {
            outbox.push(body(i));
        }
        wait_until("five records written", || {
            outbox.oldest(10, 1 << 20, WireVersion::CURRENT).last().is_some_and(|r| r.id == 5)
        });
        let ids: Vec<u64> = outbox.oldest(10, 1 << 20, WireVersion::CURRENT).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![3, 4, 5], "the oldest two went");
        assert_eq!((outbox.held(), outbox.dropped()), (3, 2));
        // At most `max` records, and within the byte budget (one record
        // alone over it is dropped, counted).
        assert_eq!(outbox.oldest(2, 1 << 20, WireVersion::CURRENT).len(), 2);
        outbox.acknowledged(4);
        let ids: Vec<u64> = outbox.oldest(10, 1 << 20, WireVersion::CURRENT).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![5]);
        assert!(outbox.oldest(10, 4, WireVersion::CURRENT).is_empty());
        assert_eq!((outbox.held(), outbox.dropped()), (0, 3));
        outbox.push(body(9));
        wait_until("the sixth record", || outbox.oldest(10, 1 << 20, WireVersion::CURRENT).len() == 1);
        drop(outbox);
        // The same store again, as after a restart: the stream, the count
        // and the numbering go on.
        let again = Outbox::open(store, 3, 3).unwrap();
        assert_eq!((again.stream(), again.held(), again.dropped()), (stream, 1, 3));
        again.push(body(10));
        wait_until("the seventh record", || again.oldest(10, 1 << 20, WireVersion::CURRENT).len() == 2);
        let ids: Vec<u64> = again.oldest(10, 1 << 20, WireVersion::CURRENT).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![6, 7]);
    }

    fn capture(i: u32) -> TelemetryBody {
        TelemetryBody::Capture(tern_proto::CapturedSample {
            model: "m".into(),
            version: i,
            inference_id: format!("{i}"),
            inputs: vec![1, 2],
            outputs: vec![3],
        })
    }

    #[test]
    fn captured_samples_have_a_bound_of_their_own_and_never_push_windows_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let outbox = Outbox::open(store.clone(), 5, 2).unwrap();
        // 1 window, 3 captures (ids 2..4), 1 window, 1 capture (6).
        for b in [body(1), capture(2), capture(3), capture(4), body(5), capture(6)] {
            outbox.push(b);
            wait_until("written", || outbox.queued() == 0);
        }
        let ids: Vec<u64> = outbox.oldest(10, 1 << 20, WireVersion::CURRENT).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 4, 5, 6], "only the oldest captures went");
        assert_eq!((outbox.held(), outbox.dropped()), (4, 2));
        outbox.acknowledged(4);
        // The day's capture bytes are kept with them (each capture 3 bytes).
        let today = crate::feedback::today();
        assert_eq!((outbox.captured_on("m", today), outbox.captured_on("m", today + 1)), (12, 0));
        drop(outbox);
        // After a restart the index counts what is left: one capture; the
        // day's bytes stand.
        let again = Outbox::open(store, 5, 2).unwrap();
        assert_eq!((again.held(), again.captured_on("m", today)), (2, 12));
        again.push(capture(7));
        again.push(capture(8));
        wait_until("written", || {
            again.queued() == 0 && again.oldest(10, 1 << 20, WireVersion::CURRENT).last().is_some_and(|r| r.id == 8)
        });
        let ids: Vec<u64> = again.oldest(10, 1 << 20, WireVersion::CURRENT).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![5, 7, 8]);
        // Windows past the whole bound push the oldest captures out first.
        again.push(body(9));
        again.push(body(10));
        again.push(body(11));
        wait_until("written", || {
            again.queued() == 0 && again.oldest(10, 1 << 20, WireVersion::CURRENT).last().is_some_and(|r| r.id == 11)
        });
        let ids: Vec<u64> = again.oldest(10, 1 << 20, WireVersion::CURRENT).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![5, 8, 9, 10, 11]);
        assert_eq!(again.captures.load(Ordering::Relaxed), 1);
        // A session of wire 8 cannot carry the capture: gone, and not
        // counted as dropped (no buffer overflowed).
        let dropped = again.dropped();
        let ids: Vec<u64> = again.oldest(10, 1 << 20, WireVersion::V8).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![5, 9, 10, 11]);
        assert_eq!((again.dropped(), again.captures.load(Ordering::Relaxed)), (dropped, 0));
    }
}
