//! JSON predict bodies from local apps: decoding must never panic, and never
//! yield more elements than the model's limits allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::{DType, Limits, RequestLimits, TensorSpec, decode_json};

fuzz_target!(|data: &[u8]| {
    let specs = [
        TensorSpec { name: "X".into(), dtype: DType::F32, shape: vec![None, Some(4)] },
        TensorSpec { name: "ids".into(), dtype: DType::I64, shape: vec![None, None] },
        TensorSpec { name: "mask".into(), dtype: DType::Bool, shape: vec![Some(2)] },
        TensorSpec { name: "half".into(), dtype: DType::F16, shape: vec![None, Some(3)] },
    ];
    let limits = RequestLimits::new(&specs, Limits { max_batch: 8, max_elements: 64 });
    if let Ok(tensors) = decode_json(data, &specs, &limits) {
        for (t, max) in tensors.iter().zip(limits.elements.iter().chain(std::iter::repeat(&0))) {
            assert!(t.data.len() <= (*max).max(64), "{} elements", t.data.len());
        }
    }
});
