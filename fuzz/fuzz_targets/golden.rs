//! Golden-vector files: checked against the signed digest before the agent
//! decodes them, but decoded by the same bounded code whatever they hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::{compare_outputs, decode_golden, encode_golden};

fuzz_target!(|data: &[u8]| {
    if let Ok(cases) = decode_golden(data) {
        let again = encode_golden(&cases).expect("decoded cases re-encode");
        assert_eq!(again, data, "re-encoding changed the bytes");
        for c in &cases {
            let _ = compare_outputs(&c.inputs, &c.outputs, 100);
        }
    }
});
