//! Frames from the network, in every wire version: one-shot and incremental
//! decoding must never panic, whatever decoded must re-encode to the same
//! message, and `want` must never ask for more than the frame in progress.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::{FrameDecoder, HEADER_LEN, MAX_FRAME_LEN, WireVersion, decode_frame, encode_frame};

fuzz_target!(|data: &[u8]| {
    for &v in WireVersion::SUPPORTED {
        if let Ok(Some((msg, used))) = decode_frame(data, MAX_FRAME_LEN, v) {
            assert!(used <= data.len());
            let again = encode_frame(&msg, v).expect("a decoded message re-encodes");
            let (back, _) =
                decode_frame(&again, MAX_FRAME_LEN, v).expect("re-encoded frame decodes").expect("complete");
            // Compared as bytes: a NaN (an alert's value, a quality sum)
            // is not equal to itself.
            assert_eq!(encode_frame(&back, v).expect("re-encodes"), again);
        }
        // The same bytes arriving in uneven pieces, never more than wanted.
        let mut dec = FrameDecoder::new(4096, v);
        let mut rest = data;
        while !rest.is_empty() {
            let want = dec.want();
            if want == 0 {
                if dec.next_message().is_err() {
                    break;
                }
                continue;
            }
            assert!(dec.buffered() + want <= HEADER_LEN + 4096);
            let n = want.min(7).min(rest.len());
            dec.push(&rest[..n]);
            rest = &rest[n..];
        }
    }
});
