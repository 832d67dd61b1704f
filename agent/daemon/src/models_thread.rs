//! The thread where models are verified, loaded and self-tested, one job
//! at a time, the thread that frees them, and how their memory goes back
//! to the system.
//!
//! Not tokio's blocking pool: a model loaded and freed on a new thread each
//! time leaves memory in a new malloc arena each time (measured: RSS
//! doubled over ten swaps and stayed there). The heap is trimmed after each
//! load and after each model is freed, and glibc is held to one arena
//! (`one_malloc_arena`); docs/performance.md has the swap benchmark.

use std::sync::Arc;
use std::sync::mpsc::{Sender, channel};

use tern_proto::TensorSpec;
use tern_runtime::{Backend, RuntimeError, Tensor};
use tracing::error;

type Job = Box<dyn FnOnce() + Send>;

/// A handle to the models thread, and to the thread that frees models.
#[derive(Clone)]
pub struct ModelsThread {
    tx: Sender<Job>,
    free: Sender<Arc<dyn Backend>>,
}

impl ModelsThread {
    pub fn spawn() -> Self {
        let (tx, rx) = channel::<Job>();
        std::thread::Builder::new()
            .name("models".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    // A job that panics (where panics unwind) must not take
                    // the thread, and every later load, with it.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        error!("a model job panicked");
                    }
                }
            })
            .expect("starting the models thread");
        let (free, freed) = channel::<Arc<dyn Backend>>();
        std::thread::Builder::new()
            .name("models-free".into())
            .spawn(move || {
                while let Ok(model) = freed.recv() {
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(model))).is_err() {
                        error!("freeing a model panicked");
                    }
                    trim_heap();
                }
            })
            .expect("starting the thread that frees models");
        Self { tx, free }
    }

    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        // The thread ends only with the process.
        let _ = self.tx.send(Box::new(job));
    }

    /// Takes a model just loaded, trims what loading it left, and returns a
    /// handle that has the model freed on the freeing thread once the last
    /// clone of it is dropped, wherever that is.
    pub fn adopt(&self, backend: Arc<dyn Backend>) -> Arc<dyn Backend> {
        trim_heap();
        Arc::new(Homed { inner: Some(backend), free: self.free.clone() })
    }
}

/// A model freed on the thread that only frees models, and at once: not on
/// the models thread, where the free would wait behind a running load and
/// two models would be held through it; not on whichever thread let go of
/// it last (the runner, a request), whose thread cache would keep the
/// model's small chunks and hand them out for that thread's own longer-lived
/// allocations, pinning the pages a model left.
struct Homed {
    /// Taken only by `drop`.
    inner: Option<Arc<dyn Backend>>,
    free: Sender<Arc<dyn Backend>>,
}

impl Homed {
    fn inner(&self) -> &dyn Backend {
        self.inner.as_deref().expect("a model is taken only when dropped")
    }
}

impl Backend for Homed {
    fn inputs(&self) -> &[TensorSpec] {
        self.inner().inputs()
    }

    fn outputs(&self) -> &[TensorSpec] {
        self.inner().outputs()
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        self.inner().run(inputs)
    }
}

impl Drop for Homed {
    fn drop(&mut self) {
        let Some(model) = self.inner.take() else { return };
        // The freeing thread outlives every model (each holds a sender);
        // should it be gone, the model is freed here.
        let _ = self.free.send(model);
    }
}

/// Limits glibc to its main arena unless the operator chose otherwise
/// (`MALLOC_ARENA_MAX`, or `arena_max` in `GLIBC_TUNABLES`). Called before
/// any thread starts. With an arena per thread, a freed model leaves free
/// pages at the top of a thread's arena that `malloc_trim` does not return
/// (it trims only the main arena's top); `scripts/swap-bench` measured
/// +10.2 % after 300 swaps that way, and +1.1 % after 1,000 in one arena
/// (docs/performance.md). Small allocations still come from each thread's
/// cache without the arena's lock.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn one_malloc_arena() {
    let tunables = std::env::var("GLIBC_TUNABLES").ok();
    if !arenas_chosen(std::env::var_os("MALLOC_ARENA_MAX").is_some(), tunables.as_deref()) {
        // SAFETY: mallopt takes plain integers; no thread has started yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn one_malloc_arena() {}

/// Whether the operator set glibc's arena count: `MALLOC_ARENA_MAX`, or
/// `glibc.malloc.arena_max` among the `GLIBC_TUNABLES`.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
fn arenas_chosen(malloc_arena_max: bool, tunables: Option<&str>) -> bool {
    malloc_arena_max
        || tunables.is_some_and(|t| {
            t.split(':').any(|kv| kv.split_once('=').is_some_and(|(k, _)| k == "glibc.malloc.arena_max"))
        })
}

/// Gives the heap's free memory back to the system: glibc keeps freed
/// chunks otherwise, and a device's RSS would climb by a model's size over
/// the first swaps.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim takes no pointers and is thread-safe in glibc;
    // it only returns free pages of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records the name of the thread that drops it.
    struct Probe(Arc<Mutex<Option<String>>>);

    impl Backend for Probe {
        fn inputs(&self) -> &[TensorSpec] {
            &[]
        }

        fn outputs(&self) -> &[TensorSpec] {
            &[]
        }

        fn run(&self, _: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
            Ok(Vec::new())
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = std::thread::current().name().map(str::to_string);
        }
    }

    #[test]
    fn a_model_is_freed_on_the_freeing_thread_at_once_even_while_the_models_thread_is_busy() {
        let thread = ModelsThread::spawn();
        let dropped_on = Arc::new(Mutex::new(None));
        let model = thread.adopt(Arc::new(Probe(dropped_on.clone())));
        let request = model.clone();
        drop(model);
        assert_eq!(*dropped_on.lock().unwrap(), None, "a request still holds it");
        // A long load holds the models thread meanwhile.
        let (release, held) = std::sync::mpsc::channel::<()>();
        thread.run(move || held.recv().unwrap());
        std::thread::Builder::new().name("api-conn".into()).spawn(move || drop(request)).unwrap().join().unwrap();
        let freed = (0..500).find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            dropped_on.lock().unwrap().clone()
        });
        assert_eq!(freed.as_deref(), Some("models-free"));
        release.send(()).unwrap();
    }

    #[test]
    fn the_operator_s_arena_setting_wins() {
        assert!(!arenas_chosen(false, None));
        assert!(!arenas_chosen(false, Some("glibc.malloc.tcache_count=0")));
        assert!(!arenas_chosen(false, Some("glibc.malloc.arena_test=2")));
        assert!(arenas_chosen(true, None));
        assert!(arenas_chosen(false, Some("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=4")));
    }
}
