//! Built-in model artifacts (`.tbm`) arrive from the coordinator and are
//! decoded on the device: arbitrary bytes, and arbitrary weights behind a
//! valid header, must be refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_models::{Artifact, Family, Head, MlpSpec, cpu_device};

fuzz_target!(|data: &[u8]| {
    let device = cpu_device();
    let _ = Artifact::decode(data, &device);
    let family = Family::Mlp(MlpSpec { inputs: 4, hidden: vec![16], outputs: 3, head: Head::Softmax });
    let header = postcard::to_allocvec(&family).unwrap();
    let mut bytes = b"TBM\x01".to_vec();
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(data);
    let _ = Artifact::decode(bytes, &device);
});
