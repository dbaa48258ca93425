//! The P-256 operations of the agent, one each, between calls to `mark`:
//! key generation, one signature, one verification. `footprint.sh` runs it
//! under QEMU with one instruction per translation block and an execution
//! trace, and counts the instructions between consecutive `mark` calls, so
//! the counts are exact and repeatable (the same seed gives the same key).
//! The image itself reports its peak stack through semihosting and exits.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use idgate_board::drbg::HmacDrbg;
use idgate_board::{report, stack};
use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use p256::ecdsa::{Signature, SigningKey};
use sha2::{Digest, Sha256};

/// The trace's landmark: each call ends one measured phase and starts the next.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn idgate_bench_mark(phase: u32) {
    core::hint::black_box(phase);
}

#[entry]
fn main() -> ! {
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
