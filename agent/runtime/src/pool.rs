//! A model's worker pool: a fixed number of threads (the model's thread
//! budget) fed by a bounded queue. A full queue answers "busy" at once
//! instead of letting memory grow; a run that panics is an error for that
//! request, not for the process.

use crate::{Backend, RuntimeError, Tensor};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Called with the outcome of a run and its timing, on the worker thread.
pub type Reply = Box<dyn FnOnce(Result<Vec<Tensor>, RuntimeError>, Timing) + Send>;

/// Where a request's time went inside the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timing {
    /// From submission until a worker took it.
    pub queued: Duration,
    /// The model run itself.
    pub ran: Duration,
}

type Job = (Vec<Tensor>, Reply, Instant);

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Every worker is busy and the queue is full.
    #[error("busy: {queued} requests already queued")]
    Busy {
        /// The queue's capacity.
        queued: usize,
    },
    /// The pool's workers have stopped.
    #[error("model is unloading")]
    Stopped,
}

/// Worker threads running one model.
pub struct Pool {
    tx: SyncSender<Job>,
    threads: usize,
    queue: usize,
}

impl Pool {
    /// Starts `threads` workers (at least one) behind a queue of `queue` slots.
    pub fn new(name: &str, backend: Arc<dyn Backend>, threads: usize, queue: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let (rx, backend) = (rx.clone(), backend.clone());
            std::thread::Builder::new()
                .name(format!("model-{name}-{i}"))
                .stack_size(1 << 20)
                .spawn(move || worker(&rx, backend.as_ref()))?;
        }
        Ok(Self { tx, threads, queue })
    }

    /// Queues a run; `reply` gets its outcome. Never blocks.
    pub fn try_submit(&self, inputs: Vec<Tensor>, reply: Reply) -> Result<(), SubmitError> {
        self.tx.try_send((inputs, reply, Instant::now())).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Busy { queued: self.queue },
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queue slots.
    pub fn queue(&self) -> usize {
        self.queue
    }
}

fn worker(rx: &Mutex<Receiver<Job>>, backend: &dyn Backend) {
    loop {
        // The lock is held only while waiting for the next job.
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((inputs, reply, submitted)) = job else { return };
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| backend.run(inputs))).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(RuntimeError::Run(format!("runtime panicked: {what}")))
        });
        reply(result, Timing { queued: started - submitted, ran: started.elapsed() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorData;
    use std::sync::mpsc::channel;
    use std::time::Duration;
    use tern_proto::TensorSpec;

    /// Sleeps, then echoes; panics on an empty input.
    struct Slow(Duration);

    impl Backend for Slow {
        fn inputs(&self) -> &[TensorSpec] {
            &[]
        }
        fn outputs(&self) -> &[TensorSpec] {
            &[]
        }
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
            assert!(!inputs.is_empty(), "no input");
            std::thread::sleep(self.0);
            Ok(inputs)
        }
    }

    fn t() -> Vec<Tensor> {
        vec![Tensor::new(vec![1], TensorData::F32(vec![1.0])).unwrap()]
    }

    #[test]
    fn full_queue_is_busy_not_unbounded() {
        let pool = Pool::new("slow", Arc::new(Slow(Duration::from_millis(300))), 1, 2).unwrap();
        let (tx, rx) = channel();
        let mut busy = 0;
        for _ in 0..10 {
            let tx = tx.clone();
            match pool.try_submit(t(), Box::new(move |r, _| tx.send(r.is_ok()).unwrap())) {
                Ok(()) => {}
                Err(SubmitError::Busy { queued: 2 }) => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        // One running, two queued, the rest refused at once.
        assert!(busy >= 6, "only {busy} refused");
        drop(tx);
        assert!(rx.iter().all(|ok| ok));
    }

    #[test]
    fn a_panicking_run_is_an_error_and_the_pool_carries_on() {
        let pool = Pool::new("p", Arc::new(Slow(Duration::ZERO)), 2, 4).unwrap();
        let (tx, rx) = channel();
        let tx2 = tx.clone();
        pool.try_submit(vec![], Box::new(move |r, _| tx2.send(r).unwrap())).unwrap();
        let err = rx.recv().unwrap().unwrap_err();
        assert!(err.to_string().contains("runtime panicked: no input"), "{err}");
        pool.try_submit(t(), Box::new(move |r, _| tx.send(r).unwrap())).unwrap();
        assert!(rx.recv().unwrap().is_ok());
    }
}
