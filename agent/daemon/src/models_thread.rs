//! The thread where models are verified, loaded, self-tested and freed,
//! one job at a time.
//!
//! Not tokio's blocking pool: a model loaded and freed on a new thread each
//! time leaves memory in a new malloc arena each time (measured: RSS
//! doubled over ten swaps and stayed there). A model is also freed here,
//! whichever thread let go of it last (the runner, a request, the shadow),
//! so that its chunks return to this thread's cache and are reused by the
//! next load instead of being held in the cache of a thread that never
//! loads; and the heap is trimmed after each load and each free.

use std::sync::Arc;
use std::sync::mpsc::{Sender, channel};

use tern_proto::TensorSpec;
use tern_runtime::{Backend, RuntimeError, Tensor};
use tracing::error;

type Job = Box<dyn FnOnce() + Send>;

/// A handle to the models thread.
#[derive(Clone)]
pub struct ModelsThread {
    tx: Sender<Job>,
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
        Self { tx }
    }

    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        // The thread ends only with the process; a job sent after that is
        // dropped with it.
        let _ = self.tx.send(Box::new(job));
    }

    /// Takes a model just loaded on this thread, trims what loading it
    /// left, and returns a handle that frees the model here once the last
    /// clone of it is dropped, wherever that is.
    pub fn adopt(&self, backend: Arc<dyn Backend>) -> Arc<dyn Backend> {
        trim_heap();
        Arc::new(Homed { inner: Some(backend), home: self.clone() })
    }
}

/// A model that is freed on the models thread.
struct Homed {
    /// Taken only by `drop`.
    inner: Option<Arc<dyn Backend>>,
    home: ModelsThread,
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
        let free: Job = Box::new(move || {
            drop(model);
            trim_heap();
        });
        // Only at exit is the thread gone; then the model goes here.
        if let Err(unsent) = self.home.tx.send(free) {
            (unsent.0)();
        }
    }
}

/// Limits glibc to its main arena unless the operator chose otherwise
/// (`MALLOC_ARENA_MAX`, or `arena_max` in `GLIBC_TUNABLES`). Called before
/// any thread starts. With an arena per thread, each model that a swap
/// frees leaves free pages at the top of a thread's arena that
/// `malloc_trim` does not return (it trims only the main arena's top), and
/// RSS climbed 9-20 % over 1,000 swaps; in one arena it stays within 2.3 %
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
    fn a_model_is_freed_on_the_models_thread_wherever_its_last_handle_goes() {
        let thread = ModelsThread::spawn();
        let dropped_on = Arc::new(Mutex::new(None));
        let model = thread.adopt(Arc::new(Probe(dropped_on.clone())));
        let request = model.clone();
        drop(model);
        assert_eq!(*dropped_on.lock().unwrap(), None, "a request still holds it");
        std::thread::Builder::new().name("api-conn".into()).spawn(move || drop(request)).unwrap().join().unwrap();
        // Freed by a job behind the drop: wait for the thread to reach it.
        let (tx, rx) = std::sync::mpsc::channel();
        thread.run(move || tx.send(()).unwrap());
        rx.recv().unwrap();
        assert_eq!(dropped_on.lock().unwrap().as_deref(), Some("models"));
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
