//! The line link decoder (`idgate_pki::link`) both the station and the device
//! firmware run on bytes from the serial line. The input is fed byte by byte to
//! a `Decoder` with a small and a full-size buffer; every frame it yields must
//! re-encode with `Frame::encode` and decode back equal, and `decode_body` on
//! the raw input must agree with itself after a round trip too.
#![no_main]

use idgate_pki::link::{Decoder, Frame, MAX_BODY, MAX_FRAME, wire_len_max};
use libfuzzer_sys::fuzz_target;

fn round_trip(frame: &Frame<'_>) {
    let mut out = vec![0u8; MAX_FRAME];
    let n = frame.encode(&mut out).expect("a decoded frame re-encodes");
    assert!(n <= wire_len_max(frame.body_len()));
    assert_eq!(out[n - 1], 0, "the frame ends with its delimiter");
    assert!(!out[..n - 1].contains(&0), "no zero inside a frame");
    let mut decoder = Decoder::new(vec![0u8; MAX_BODY]);
    let mut seen = 0;
    for &b in &out[..n] {
        if let Some(r) = decoder.push(b) {
            assert_eq!(r.as_ref(), Ok(frame), "round trip");
            seen += 1;
        }
    }
    assert_eq!(seen, 1);
}

fuzz_target!(|data: &[u8]| {
    // As a body (after COBS): whatever decodes round-trips.
    if let Ok(frame) = Frame::decode_body(data) {
        round_trip(&frame);
    }
    // As a byte stream, with a full receive buffer and a tiny one.
    let mut full = Decoder::new([0u8; MAX_BODY]);
    let mut tiny = Decoder::new([0u8; 16]);
    for &b in data {
        if let Some(Ok(frame)) = full.push(b) {
            round_trip(&frame);
        }
        if let Some(Ok(frame)) = tiny.push(b) {
            assert!(frame.body_len() <= 16);
            round_trip(&frame);
        }
    }
});
