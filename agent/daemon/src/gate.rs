//! Admission to one model: at most `threads` runs at once (the model's
//! thread budget) and at most `queue` requests waiting for one; a request
//! beyond that is refused at once ("busy") instead of letting memory grow.
//! The run itself happens on the caller's thread: the connection's own
//! (see `serve`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tern_runtime::{Backend, RuntimeError, Tensor, run_guarded};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Where a request's time went inside the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timing {
    /// Waiting for a free run slot.
    pub queued: Duration,
    /// The model run itself.
    pub ran: Duration,
}

/// A request refused because every run slot is taken and the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// The queue's capacity.
    pub queued: usize,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "busy: {} requests already queued", self.queued)
    }
}

/// Run slots and a bounded queue for one model.
pub struct Gate {
    slots: Semaphore,
    waiting: AtomicUsize,
    threads: usize,
    queue: usize,
}

/// Gives a queue place back however the wait ends (admitted, or the
/// request dropped because its client went away).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    /// `threads` concurrent runs (at least one) and `queue` waiting places.
    pub fn new(threads: usize, queue: usize) -> Self {
        let threads = threads.max(1);
        Self { slots: Semaphore::new(threads), waiting: AtomicUsize::new(0), threads, queue }
    }

    /// Runs `inputs` on `backend` when a slot is free, holding what
    /// `running` returns while it runs. The run blocks this thread: call it
    /// from a thread of its own (a connection's), never from a runtime
    /// others share.
    pub async fn run<G>(
        &self,
        backend: &dyn Backend,
        inputs: Vec<Tensor>,
        running: impl FnOnce() -> G,
    ) -> Result<(Result<Vec<Tensor>, RuntimeError>, Timing), Busy> {
        let arrived = Instant::now();
        let _slot = self.admit().await?;
        let _running = running();
        let started = Instant::now();
        let result = run_guarded(backend, inputs);
        Ok((result, Timing { queued: started - arrived, ran: started.elapsed() }))
    }

    async fn admit(&self) -> Result<SemaphorePermit<'_>, Busy> {
        if let Ok(slot) = self.slots.try_acquire() {
            return Ok(slot);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy { queued: self.queue });
        }
        let _place = Waiting(&self.waiting);
        Ok(self.slots.acquire().await.expect("the semaphore is never closed"))
    }

    /// Concurrent runs allowed.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queue places.
    pub fn queue(&self) -> usize {
        self.queue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use tern_proto::TensorSpec;
    use tern_runtime::TensorData;

    /// Sleeps, then echoes; counts the runs in flight, the most seen, and
    /// the runs started (which a test can wait for).
    struct Slow {
        pause: Duration,
        running: AtomicUsize,
        most: AtomicUsize,
        started: (std::sync::Mutex<usize>, std::sync::Condvar),
    }

    impl Slow {
        /// Blocks until `n` runs have started.
        fn wait_started(&self, n: usize) {
            let (lock, cv) = &self.started;
            drop(cv.wait_while(lock.lock().unwrap(), |s| *s < n).unwrap());
        }
    }

    impl Backend for Slow {
        fn inputs(&self) -> &[TensorSpec] {
            &[]
        }
        fn outputs(&self) -> &[TensorSpec] {
            &[]
        }
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
            assert!(!inputs.is_empty(), "no input");
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            *self.started.0.lock().unwrap() += 1;
            self.started.1.notify_all();
            std::thread::sleep(self.pause);
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(inputs)
        }
    }

    fn slow(ms: u64) -> Arc<Slow> {
        Arc::new(Slow {
            pause: Duration::from_millis(ms),
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            started: Default::default(),
        })
    }

    fn t() -> Vec<Tensor> {
        vec![Tensor::new(vec![1], TensorData::F32(vec![1.0])).unwrap()]
    }

    /// Runs `fut` on a thread of its own, as a connection does.
    fn on_own_thread<T: Send + 'static>(
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(fut)
        })
    }

    /// Fires `n` requests at once, each from its own thread; returns how
    /// many ran and how many were refused.
    fn burst(gate: &Arc<Gate>, model: &Arc<Slow>, n: usize) -> (usize, usize) {
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let (gate, model) = (gate.clone(), model.clone());
                on_own_thread(async move { gate.run(model.as_ref(), t(), || ()).await.map(|(r, _)| r.is_ok()) })
            })
            .collect();
        let (mut ran, mut busy) = (0, 0);
        for thread in threads {
            match thread.join().unwrap() {
                Ok(ok) => {
                    assert!(ok);
                    ran += 1
                }
                Err(Busy { queued }) => {
                    assert_eq!(queued, 2);
                    busy += 1
                }
            }
        }
        (ran, busy)
    }

    #[test]
    fn a_full_queue_is_busy_not_unbounded_and_runs_keep_to_the_budget() {
        let gate = Arc::new(Gate::new(1, 2));
        let model = slow(200);
        let (ran, busy) = burst(&gate, &model, 10);
        // One running and two queued; the rest refused at once.
        assert_eq!(ran + busy, 10);
        assert!((1..=3).contains(&ran), "{ran} ran");
        assert_eq!(model.most.load(Ordering::SeqCst), 1);
        // Places come back: a later request is admitted.
        let (gate2, model2) = (gate.clone(), model.clone());
        assert!(
            on_own_thread(async move { gate2.run(model2.as_ref(), t(), || ()).await.unwrap().0.is_ok() })
                .join()
                .unwrap()
        );
        assert_eq!(gate.waiting.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn two_slots_run_two_at_once() {
        let gate = Arc::new(Gate::new(2, 2));
        let model = slow(200);
        let (ran, _) = burst(&gate, &model, 2);
        assert_eq!(ran, 2);
        assert_eq!(model.most.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_dropped_waiter_gives_its_place_back() {
        let gate = Arc::new(Gate::new(1, 1));
        let model = slow(300);
        let running = {
            let (gate, model) = (gate.clone(), model.clone());
            on_own_thread(async move { gate.run(model.as_ref(), t(), || ()).await.is_ok() })
        };
        // The first request holds the only slot before the second arrives.
        model.wait_started(1);
        let (gate2, model2) = (gate.clone(), model.clone());
        let waiter = on_own_thread(async move {
            tokio::time::timeout(Duration::from_millis(50), gate2.run(model2.as_ref(), t(), || ())).await.is_err()
        });
        assert!(waiter.join().unwrap(), "the waiter should still have been waiting");
        assert_eq!(gate.waiting.load(Ordering::SeqCst), 0);
        assert!(running.join().unwrap());
    }

    #[test]
    fn a_panicking_run_is_an_error_and_the_gate_carries_on() {
        let gate = Arc::new(Gate::new(1, 1));
        let model = slow(0);
        let (g, m) = (gate.clone(), model.clone());
        let (result, _) = on_own_thread(async move { g.run(m.as_ref(), vec![], || ()).await.unwrap() }).join().unwrap();
        assert!(result.unwrap_err().to_string().contains("runtime panicked: no input"));
        assert!(
            on_own_thread(async move { gate.run(model.as_ref(), t(), || ()).await.unwrap().0.is_ok() }).join().unwrap()
        );
    }
}
