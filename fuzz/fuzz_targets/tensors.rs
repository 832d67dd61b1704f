//! Binary tensor bodies posted to the agent's local API.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::{decode_tensors, encode_tensors};

fuzz_target!(|data: &[u8]| {
    if let Ok(ts) = decode_tensors(data) {
        let again = encode_tensors(&ts).expect("decoded tensors re-encode");
        assert_eq!(again, data, "re-encoding changed the bytes");
    }
});
