//! Drift summaries a device sends, and baselines that travel with a
//! manifest: decoded, merged and compared as the coordinator does.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tern_drift::{Baseline, BaselineBuilder, ModelBaseline, Profile};
use tern_proto::{DType, Tensor, TensorData, TensorSpec};

fn baseline() -> &'static Baseline {
    static B: OnceLock<Baseline> = OnceLock::new();
    B.get_or_init(|| {
        let values: Vec<f64> = (0..300).map(|i| f64::from(i % 41) - 3.5).collect();
        let mut b = BaselineBuilder::new();
        b.numeric("x", &values, 6).unwrap();
        b.categorical("c", &[0.0, 1.0, 2.0]).unwrap();
        b.classes("out", 3, [[0.1f32, 0.6, 0.3].as_slice()]).unwrap();
        b.image("img", &[&[0.5f32]]).unwrap();
        b.build().unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let b = baseline();
    if let Ok(window) = Profile::decode(data, &b.layout) {
        let mut fleet = b.window(Some(32), 1);
        fleet.merge(&b.layout, &window).expect("a decoded window merges");
        b.compare(&fleet).expect("a merged window compares");
        // Counts near the top saturate: refused then, never a panic.
        fleet.merge(&b.layout, &window).expect("a decoded window merges twice");
        let _ = b.compare(&fleet);
        assert_eq!(Profile::decode(&window.encode(), &b.layout).as_ref().ok(), Some(&window));
    }
    if let Ok(other) = Baseline::decode(data) {
        let mut w = other.window(Some(8), 2);
        let own = other.profile.clone();
        w.merge(&other.layout, &own).expect("its own profile merges");
        other.compare(&w).expect("a baseline compares with itself");
    }
    if let Ok(model) = ModelBaseline::decode(data) {
        // Bound to a small signature, if it fits: a request never panics.
        let inputs = [TensorSpec { name: "x".into(), dtype: DType::F32, shape: vec![None, Some(4)] }];
        let outputs = [TensorSpec { name: "y".into(), dtype: DType::F32, shape: vec![None, Some(3)] }];
        if let Ok(binding) = model.bind(&inputs, &outputs) {
            let mut w = model.baseline.window(Some(8), 3);
            let x = Tensor::new(vec![2, 4], TensorData::F32(vec![0.5; 8])).unwrap();
            let y = Tensor::new(vec![2, 3], TensorData::F32(vec![0.2, 0.3, 0.5, 1.0, 0.0, 0.0])).unwrap();
            let _ = binding.observe(&model.baseline, &mut w, &[x], &[y]);
            model.baseline.compare(&w).expect("a window on the baseline compares");
        }
        assert_eq!(ModelBaseline::decode(&model.encode()).ok().as_ref(), Some(&model));
    }
});
