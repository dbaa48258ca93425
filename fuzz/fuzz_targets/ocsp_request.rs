//! The OCSP responder's request parser
//! (`idgate_pki::revocation::ocsp::parse_request`): public, unauthenticated
//! HTTP input. A parsed request is rebuilt from its parts (the CertIDs as the
//! responder would echo them, and the nonce) and must parse to the same value.
#![no_main]

use idgate_pki::revocation::ocsp::{MAX_CERT_IDS, MAX_NONCE_LEN, parse_request};
use libfuzzer_sys::fuzz_target;

/// One DER element with a definite, minimal length.
fn tlv(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = vec![tag];
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend([0x81, len as u8]),
        0x100..=0xffff => out.extend([0x82, (len >> 8) as u8, len as u8]),
        _ => out.extend([0x83, (len >> 16) as u8, (len >> 8) as u8, len as u8]),
    }
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// id-pkix-ocsp-nonce
const OID_NONCE: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x02];

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_request(data) else {
        return;
    };
    assert!((1..=MAX_CERT_IDS).contains(&request.certs.len()));
    if let Some(nonce) = &request.nonce {
        assert!((1..=MAX_NONCE_LEN).contains(&nonce.len()));
    }
    let requests: Vec<Vec<u8>> = request
        .certs
        .iter()
        .map(|id| tlv(0x30, &[&id.der()]))
        .collect();
    let list: Vec<&[u8]> = requests.iter().map(Vec::as_slice).collect();
    let list = tlv(0x30, &list);
    let extensions = request.nonce.as_ref().map(|nonce| {
        let extension = tlv(0x30, &[&tlv(0x06, &[OID_NONCE]), &tlv(0x04, &[nonce])]);
        tlv(0xa2, &[&tlv(0x30, &[&extension])])
    });
    let tbs = tlv(0x30, &[&list, extensions.as_deref().unwrap_or_default()]);
    let rebuilt = tlv(0x30, &[&tbs]);
    // The rebuilt request is never longer than the original (no requestor
    // name, signature, version or other extensions), so the size limit holds.
    let again = parse_request(&rebuilt)
        .unwrap_or_else(|e| panic!("rebuilt request does not parse: {e:?}"));
    assert_eq!(request, again);
});
