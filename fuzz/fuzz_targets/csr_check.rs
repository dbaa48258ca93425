//! The gateway's PKCS#10 checks (`idgate_pki::check::check_csr`), run on every
//! CSR a device sends before anything is signed.
#![no_main]

use idgate_pki::check::check_csr;
use idgate_pki::der::{Reader, tag};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    if let Ok(checked) = check_csr(data) {
        // What the registry keys on must describe what goes into the certificate.
        assert_eq!(
            checked.key_fingerprint,
            <[u8; 32]>::from(Sha256::digest(&checked.spki))
        );
        // The SPKI is one whole DER SEQUENCE.
        let mut r = Reader::new(&checked.spki);
        r.expect(tag::SEQUENCE).expect("SPKI is a SEQUENCE");
        assert!(r.is_empty(), "nothing after the SPKI");
        // Accepting is a pure function of the bytes.
        assert_eq!(check_csr(data).ok(), Some(checked));
    }
});
