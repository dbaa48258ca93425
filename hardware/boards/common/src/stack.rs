//! Stack painting: measure the deepest the stack ever went, on the device.
//!
//! At boot, before anything large runs, every word between the end of the
//! static data (`__sheap`, from `cortex-m-rt`'s linker script) and a little
//! below the current stack pointer is filled with a pattern; later, the lowest
//! word that no longer holds it marks the peak. The figure misses only what
//! was pushed and popped with the pattern's own value, which is negligible.

use core::ptr::{addr_of, read_volatile, write_volatile};

const PAINT: u32 = 0xC0DE_CAFE;
/// Words left unpainted below the stack pointer at the time of painting: the
/// painting function's own frame and the calls it makes stay out of the way.
const MARGIN_WORDS: usize = 64;

unsafe extern "C" {
    /// End of `.bss`/`.uninit`: the lowest address the stack may grow down to.
    static __sheap: u32;
    /// The initial stack pointer: the top of RAM.
    static _stack_start: u32;
}

fn bounds() -> (usize, usize) {
    // Only the symbols' addresses are used, never their (non-existent) values.
    (addr_of!(__sheap) as usize, addr_of!(_stack_start) as usize)
}

/// Paints the free stack. Call it first thing in `main`.
#[inline(never)]
pub fn paint() {
    let (bottom, _) = bounds();
    let sp = cortex_m::register::msp::read() as usize;
    let end = sp.saturating_sub(MARGIN_WORDS * 4);
    let mut at = (bottom + 3) & !3;
    while at < end {
        // SAFETY: [__sheap, sp - margin) is RAM that holds no live data: it is
        // below every frame (the stack grows down from _stack_start) and above
        // every static (which end at __sheap), and nothing else runs yet.
        unsafe { write_volatile(at as *mut u32, PAINT) };
        at += 4;
    }
}

/// The deepest the stack has gone since [`paint`], in bytes below its top.
pub fn peak() -> usize {
    let (bottom, top) = bounds();
    let mut at = (bottom + 3) & !3;
    while at < top {
        // SAFETY: reads words of RAM between the end of the statics and the
        // top of the stack; they are all mapped, and a stale read is harmless.
        if unsafe { read_volatile(at as *const u32) } != PAINT {
            break;
        }
        at += 4;
    }
    top - at
}

/// The size of the stack region (from the end of the statics to the top of RAM).
pub fn size() -> usize {
    let (bottom, top) = bounds();
    top - bottom
}
