//! What loading a built-in model costs in memory beyond the artifact the
//! caller already holds: the model's own weights, and little else. Measured
//! with a counting allocator, so this test binary runs alone in its process.

#![allow(unsafe_code)] // a GlobalAlloc is unsafe by definition; it only counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use tern_proto::ModelFormat;

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = NOW.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        NOW.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn loading_a_built_in_model_holds_about_one_copy_of_its_weights() {
    let (inputs, hidden, outputs) = (512, 2048, 512);
    let layer = |i: usize, o: usize| tern_models::LayerWeights {
        weight: (0..i).map(|r| (0..o).map(|c| ((r * 7 + c) % 13) as f32 / 13.0).collect()).collect(),
        bias: vec![0.5; o],
    };
    let weights = tern_models::Weights {
        family: tern_models::Family::Mlp(tern_models::MlpSpec {
            inputs,
            hidden: vec![hidden],
            outputs,
            head: tern_models::Head::Identity,
        }),
        layers: vec![layer(inputs, hidden), layer(hidden, outputs)],
    };
    let bytes = weights.into_artifact(&tern_models::cpu_device()).unwrap();
    let size = bytes.len();
    assert!(size > 8 << 20, "{size}");

    let before = NOW.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let model = tern_runtime::load(ModelFormat::Burn, bytes).unwrap();
    let peak = PEAK.load(Ordering::SeqCst) - before;
    let kept = NOW.load(Ordering::SeqCst).saturating_sub(before);
    eprintln!(
        "artifact {size} B; peak while loading {peak} B ({:.2}x); held after {kept} B",
        peak as f64 / size as f64
    );
    // The artifact itself is handed over and freed; the model holds its
    // weights once; decoding may hold one more copy of a layer at a time.
    assert!(peak <= size * 3 / 2, "loading a {size}-byte model peaked at {peak} extra bytes");
    assert!(model.outputs().len() == 1);
}
