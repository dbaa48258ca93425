//! Board-independent idgate firmware, shared by the board images in
//! `hardware/boards/<board>/`: everything but the registers.
//!
//! - [`device`]: the main loop on the line link around the agent's enrollment;
//! - [`drbg`]: HMAC_DRBG seeded from the factory seed and the board's entropy;
//! - [`keystore`]: a software P-256 key store (no secure element);
//! - [`factory`]: the per-device factory page (seed, pinned roots);
//! - [`ramflash`]: NOR flash semantics in RAM (QEMU has no flash controller);
//! - [`stack`]: stack painting, to measure the peak stack on the device;
//! - [`report`]: semihosting output and exit codes (feature `semihosting`);
//! - [`bench`]: the P-256 instruction-count image's body (`sign-bench`).
#![cfg_attr(not(test), no_std)]

#[cfg(target_arch = "arm")]
pub mod bench;
pub mod device;
pub mod drbg;
pub mod factory;
pub mod keystore;
pub mod ramflash;
pub mod report;
#[cfg(target_arch = "arm")]
pub mod stack;

/// On a panic (a bug: no input can cause one), say so on the debug channel
/// and stop; the station times the unit out.
#[cfg(all(target_arch = "arm", target_os = "none"))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    report!("panic: {}", info);
    report::exit(false)
}
