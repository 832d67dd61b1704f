//! Signed manifests from the coordinator, in both encodings: verification of
//! arbitrary bytes must fail cleanly, and the manifest decoders must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::{ManifestEncoding, ModelManifest, SignedManifest, canonical_json};
use tern_trust::VerifyingKey;

fuzz_target!(|data: &[u8]| {
    for encoding in [ManifestEncoding::Postcard, ManifestEncoding::CanonicalJson] {
        if let Ok(m) = ModelManifest::from_signed_bytes(data, encoding) {
            // What decodes has a form to sign in, and it decodes the same.
            if let Ok(bytes) = m.signed_bytes(encoding) {
                assert_eq!(ModelManifest::from_signed_bytes(&bytes, encoding).unwrap(), m);
            }
        }
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = canonical_json(&value);
    }
    if let Ok(signed) = postcard::from_bytes::<SignedManifest>(data) {
        let key = VerifyingKey([7; 32]);
        assert!(key.verify(&signed).is_err(), "a random key verified fuzzed bytes");
    }
});
