//! Frames from the network: one-shot and incremental decoding must never
//! panic, and whatever decodes must re-encode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::{FrameDecoder, MAX_FRAME_LEN, decode_frame, encode_frame};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, used))) = decode_frame(data, MAX_FRAME_LEN) {
        assert!(used <= data.len());
        let again = encode_frame(&msg).expect("a decoded message re-encodes");
        let (back, _) = decode_frame(&again, MAX_FRAME_LEN).expect("re-encoded frame decodes").expect("complete");
        assert_eq!(back, msg);
    }
    // The same bytes arriving in uneven pieces.
    let mut dec = FrameDecoder::new(4096);
    for chunk in data.chunks(7) {
        dec.push(chunk);
        while let Ok(Some(_)) = dec.next_message() {}
    }
});
