//! Signed manifests from the coordinator: verification of arbitrary bytes
//! must fail cleanly, and the manifest decoder must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::{ModelManifest, SignedManifest};
use tern_trust::VerifyingKey;

fuzz_target!(|data: &[u8]| {
    let _ = postcard::from_bytes::<ModelManifest>(data);
    if let Ok(signed) = postcard::from_bytes::<SignedManifest>(data) {
        let key = VerifyingKey([7; 32]);
        assert!(key.verify(&signed).is_err(), "a random key verified fuzzed bytes");
    }
});
