//! Enrollment tokens typed or pasted by a person.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::EnrollTokenText;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = EnrollTokenText::decode(text) {
            assert_eq!(EnrollTokenText::decode(&t.encode()).unwrap(), t);
        }
        let _ = EnrollTokenText::decode(&format!("tern1_{text}"));
    }
});
