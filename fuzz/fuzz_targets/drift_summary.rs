//! Drift summaries a device sends, and baselines that travel with a
//! manifest: decoded, merged and compared as the coordinator does.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tern_drift::{Baseline, BaselineBuilder, Profile};

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
});
