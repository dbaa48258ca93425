//! The gateway's codec (`idgate_pki::wire`) in both formats: JSON (serde_json
//! and base64) and CBOR. Every decoded message is re-encoded in the same format
//! and in the other one, and must decode back to the same value.
#![no_main]

use idgate_pki::protocol::{EnrollRequest, Format, Issued, MAX_CHAIN, Rejected};
use idgate_pki::wire::{
    EnrollRequestBuf, IssuedBuf, RejectedBuf, decode_enroll, decode_issued,
    decode_rejected, decode_renew, encode_enroll, encode_issued, encode_rejected, encode_renew,
};
use libfuzzer_sys::fuzz_target;

const FORMATS: [Format; 2] = [Format::Json, Format::Cbor];

fn enroll(buf: &EnrollRequestBuf) -> EnrollRequest<'_> {
    EnrollRequest {
        rid: &buf.rid,
        csr: &buf.csr,
        proof: &buf.proof,
    }
}

/// `None` if the chain is longer than the `no_std` type holds (JSON has no
/// such limit; the device would refuse it).
fn issued(buf: &IssuedBuf) -> Option<Issued<'_>> {
    let mut chain = heapless::Vec::<&[u8], MAX_CHAIN>::new();
    for c in &buf.chain {
        chain.push(c).ok()?;
    }
    Some(Issued {
        rid: &buf.rid,
        certificate: &buf.certificate,
        chain,
        serial: &buf.serial,
        not_before: buf.not_before,
        not_after: buf.not_after,
        time: buf.time,
        renew_after: buf.renew_after,
        renew_before: buf.renew_before,
    })
}

fn rejected(buf: &RejectedBuf) -> Rejected<'_> {
    Rejected {
        rid: &buf.rid,
        code: &buf.code,
        message: &buf.message,
    }
}

fuzz_target!(|data: &[u8]| {
    for format in FORMATS {
        if let Ok(request) = decode_enroll(format, data) {
            for to in FORMATS {
                let bytes = encode_enroll(to, &enroll(&request));
                let again = decode_enroll(to, &bytes)
                    .unwrap_or_else(|e| panic!("enroll {format:?}->{to:?}: {e:?}"));
                assert_eq!(request, again, "enroll {format:?}->{to:?}");
            }
        }
        if let Ok(request) = decode_renew(format, data) {
            for to in FORMATS {
                let bytes = encode_renew(to, &request.borrowed());
                let again = decode_renew(to, &bytes)
                    .unwrap_or_else(|e| panic!("renew {format:?}->{to:?}: {e:?}"));
                assert_eq!(request, again, "renew {format:?}->{to:?}");
            }
        }
        if let Ok(reply) = decode_issued(format, data) {
            if let Some(borrowed) = issued(&reply) {
                for to in FORMATS {
                    let bytes = encode_issued(to, &borrowed);
                    let again = decode_issued(to, &bytes)
                        .unwrap_or_else(|e| panic!("issued {format:?}->{to:?}: {e:?}"));
                    assert_eq!(reply, again, "issued {format:?}->{to:?}");
                }
            }
        }
        if let Ok(reply) = decode_rejected(format, data) {
            for to in FORMATS {
                let bytes = encode_rejected(to, &rejected(&reply));
                let again = decode_rejected(to, &bytes)
                    .unwrap_or_else(|e| panic!("rejected {format:?}->{to:?}: {e:?}"));
                assert_eq!(reply, again, "rejected {format:?}->{to:?}");
            }
        }
    }
});
