//! The P-256 operations of the agent, one each, between calls to
//! [`idgate_bench_mark`]: key generation, one signature, one verification.
//! Each board's `sign-bench` image runs [`sign_bench`]; `footprint.sh` runs
//! it under QEMU with one instruction per translation block and an execution
//! trace, and counts the instructions between consecutive marks, so the
//! counts are exact and repeatable (the same seed gives the same key). The
//! image reports its peak stack through semihosting and exits.

use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use p256::ecdsa::{Signature, SigningKey};
use sha2::{Digest, Sha256};

use crate::drbg::HmacDrbg;
use crate::{report, stack};

/// The trace's landmark: each call ends one measured phase and starts the
/// next. `footprint.sh` finds it by this name in the image's symbols.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn idgate_bench_mark(phase: u32) {
    core::hint::black_box(phase);
}

/// Paints the stack, runs the three phases between marks, reports and exits
/// (with success if the signature verified).
pub fn sign_bench() -> ! {
    stack::paint();
    let mut drbg = HmacDrbg::new(&[b"sign-bench: a fixed seed, for repeatable counts"]);
    let digest: [u8; 32] = Sha256::digest(b"one P-256 signature").into();

    idgate_bench_mark(0);
    let key = SigningKey::random(&mut drbg);
    idgate_bench_mark(1);
    let signature: Result<Signature, _> = key.sign_prehash(&digest);
    idgate_bench_mark(2);
    let verified = signature
        .map(|signature| {
            key.verifying_key()
                .verify_prehash(&digest, &signature)
                .is_ok()
        })
        .unwrap_or(false);
    idgate_bench_mark(3);

    report!("phases: key generation, signature, verification");
    report!("verified: {}", verified);
    report!("stack peak: {} bytes", stack::peak());
    report::exit(verified)
}
