//! The `no_std` CBOR codec of the enrollment protocol (`idgate_pki::protocol`),
//! which both the gateway and the device run on bytes from the other side.
//! Whatever decodes must re-encode, and the encoding must decode to the same
//! value (and re-encode to the same bytes).
#![no_main]

use idgate_pki::protocol::{EnrollRequest, Issued, Rejected, RenewRequest};
use libfuzzer_sys::fuzz_target;

/// Room for any re-encoding of a decoded `data`: dropped unknown fields only
/// shrink it, and the defaults a decoder fills in (`rid`, `message` of a
/// rejection) add a few bytes.
fn buffer(data: &[u8]) -> Vec<u8> {
    vec![0u8; data.len() * 2 + 128]
}

macro_rules! round_trip {
    ($ty:ident, $data:expr) => {
        if let Ok(value) = $ty::decode_cbor($data) {
            let mut out = buffer($data);
            let n = value
                .encode_cbor(&mut out)
                .expect(concat!(stringify!($ty), ": a decoded value re-encodes"));
            let again = $ty::decode_cbor(&out[..n])
                .expect(concat!(stringify!($ty), ": our own encoding decodes"));
            assert_eq!(value, again, concat!(stringify!($ty), ": round trip"));
            let mut out2 = buffer($data);
            let n2 = again.encode_cbor(&mut out2).expect("re-encodes twice");
            assert_eq!(&out[..n], &out2[..n2], concat!(stringify!($ty), ": stable encoding"));
        }
    };
}

fuzz_target!(|data: &[u8]| {
    round_trip!(EnrollRequest, data);
    round_trip!(RenewRequest, data);
    round_trip!(Issued, data);
    round_trip!(Rejected, data);
    // The unchecked decoders run on every request (to name the rid in a
    // rejection); they must not panic either, and a checked success implies
    // an unchecked one with the same value.
    if let Ok(unchecked) = EnrollRequest::decode_cbor_unchecked(data) {
        if let Ok(checked) = EnrollRequest::decode_cbor(data) {
            assert_eq!(unchecked, checked);
        }
    }
    if let Ok(unchecked) = RenewRequest::decode_cbor_unchecked(data) {
        if let Ok(checked) = RenewRequest::decode_cbor(data) {
            assert_eq!(unchecked, checked);
        }
    }
});
