//! Counts the instructions of one P-256 signature (and of key generation and
//! one verification) on the emulated Cortex-M3. Run under QEMU with
//! `-icount shift=0`: virtual time then advances exactly one nanosecond per
//! guest instruction, so the SysTick counter measures instructions. The ratio
//! is calibrated against a loop of known length instead of trusting the
//! modelled clock frequency. Prints through semihosting and exits.
#![no_std]
#![no_main]

use cortex_m::peripheral::SYST;
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::entry;
use idgate_board::drbg::HmacDrbg;
use idgate_board::{report, stack};
use idgate_board_lm3s6965evb::systick_wraps;
use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use p256::ecdsa::{Signature, SigningKey};
use sha2::{Digest, Sha256};

const RELOAD: u32 = 0x00FF_FFFF;

/// SysTick counts since start, across wraps.
fn ticks() -> u64 {
    loop {
        let before = systick_wraps();
        let current = SYST::get_current();
        if systick_wraps() == before {
            return u64::from(before) * u64::from(RELOAD + 1) + u64::from(RELOAD - current);
        }
    }
}

/// Runs `f` and returns the SysTick counts it took.
fn measure(f: impl FnOnce()) -> u64 {
    let start = ticks();
    f();
    ticks() - start
}

/// Exactly `2 × iterations` instructions: `subs` and a taken `bne`, with
/// the last `bne` not taken.
#[inline(never)]
fn known_loop(iterations: u32) {
    // SAFETY: a register-only countdown; touches no memory.
    unsafe {
        core::arch::asm!(
            "1:",
            "subs {0}, {0}, #1",
            "bne 1b",
            inout(reg) iterations => _,
            options(nomem, nostack),
        );
    }
}

#[entry]
fn main() -> ! {
    stack::paint();
    let Some(mut peripherals) = cortex_m::Peripherals::take() else {
        report::exit(false);
    };
    idgate_board_lm3s6965evb::init_clock();
    let syst = &mut peripherals.SYST;
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(RELOAD);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();

    const CALIBRATION: u32 = 2_000_000;
    let calibration_ticks = measure(|| known_loop(CALIBRATION));
    let overhead_ticks = measure(|| known_loop(1));
    let per_tick = f64_ratio(
        2 * u64::from(CALIBRATION),
        calibration_ticks - overhead_ticks,
    );

    let mut drbg = HmacDrbg::new(&[b"sign-bench: a fixed seed, for repeatable counts"]);
    let mut key = None;
    let keygen = measure(|| key = Some(SigningKey::random(&mut drbg)));
    let Some(key) = key else {
        report::exit(false);
    };
    let digest: [u8; 32] = Sha256::digest(b"one P-256 signature").into();
    let mut signature: Option<Signature> = None;
    let sign = measure(|| signature = key.sign_prehash(&digest).ok());
    let Some(signature) = signature else {
        report::exit(false);
    };
    let mut verified = false;
    let verify = measure(|| {
        verified = key
            .verifying_key()
            .verify_prehash(&digest, &signature)
            .is_ok()
    });
    report!(
        "raw: calibration {} overhead {} wraps {} cvr {} ctrl {:x}",
        calibration_ticks,
        overhead_ticks,
        systick_wraps(),
        SYST::get_current(),
        unsafe { core::ptr::read_volatile(0xE000_E010 as *const u32) }
    );
    report!("calibration: {} instructions per SysTick count", per_tick);
    report!(
        "p256 key generation: {} instructions",
        scaled(keygen, per_tick)
    );
    report!("p256 signature: {} instructions", scaled(sign, per_tick));
    report!(
        "p256 verification: {} instructions",
        scaled(verify, per_tick)
    );
    report!("stack peak: {} bytes", stack::peak());
    report::exit(verified)
}

/// `a / b` to three decimals, as text-friendly fixed point (thousandths).
fn f64_ratio(a: u64, b: u64) -> Ratio {
    Ratio(a.saturating_mul(1000) / b.max(1))
}

/// A ratio in thousandths.
#[derive(Clone, Copy)]
struct Ratio(u64);

impl core::fmt::Display for Ratio {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

fn scaled(ticks: u64, per_tick: Ratio) -> u64 {
    ticks.saturating_mul(per_tick.0) / 1000
}
