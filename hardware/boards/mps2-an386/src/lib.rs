//! Board support for Arm's MPS2 with the AN386 Cortex-M4 image (and QEMU's
//! model of it): the CMSDK APB UART0 (the line), SysTick (the millisecond
//! clock), the factory page and the RAM stand-in for the credential store's
//! flash. Everything above the registers is in `idgate-board`; compare
//! `hardware/boards/lm3s6965evb/src/lib.rs` for the same on a TI part.
#![no_std]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::SYST;
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::exception;
use idgate_board::device::{Board, StoreLayout};
use idgate_board::factory::FACTORY_PAGE;
use idgate_board::ramflash::RamFlash;
use idgate_hal::Clock;

/// The FPGA's system clock (the CPU and the APB peripherals), in Hz.
pub const CORE_HZ: u32 = 25_000_000;

/// Two credential slots of 4 KiB.
pub const STORE: StoreLayout = StoreLayout {
    base: 0,
    slot_size: 4096,
};

/// SysTick interrupts since boot: milliseconds with the 1 kHz setup.
static MILLIS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    MILLIS.fetch_add(1, Ordering::Relaxed);
}

/// How many times SysTick has interrupted since boot.
pub fn systick_wraps() -> u32 {
    MILLIS.load(Ordering::Relaxed)
}

const UART0: usize = 0x4000_4000;
const UART_DATA: usize = 0x000;
const UART_STATE: usize = 0x004;
const UART_CTRL: usize = 0x008;
const UART_BAUDDIV: usize = 0x010;
const STATE_TX_FULL: u32 = 1 << 0;
const STATE_RX_FULL: u32 = 1 << 1;

fn reg_read(address: usize) -> u32 {
    // SAFETY: only called with addresses of this board's memory-mapped UART
    // registers above, which are always mapped and 4-byte aligned.
    unsafe { read_volatile(address as *const u32) }
}

fn reg_write(address: usize, value: u32) {
    // SAFETY: as in `reg_read`; the UART registers have no effect on memory.
    unsafe { write_volatile(address as *mut u32, value) }
}

/// The board: CMSDK UART0 at 115200 baud, SysTick at 1 kHz.
#[derive(Debug)]
pub struct Mps2An386 {
    _private: (),
}

impl Mps2An386 {
    /// Starts SysTick and UART0. Call once.
    pub fn new(mut syst: SYST) -> Mps2An386 {
        syst.set_clock_source(SystClkSource::Core);
        syst.set_reload(CORE_HZ / 1000 - 1);
        syst.clear_current();
        syst.enable_interrupt();
        syst.enable_counter();
        reg_write(UART0 + UART_BAUDDIV, CORE_HZ / 115_200);
        reg_write(UART0 + UART_CTRL, 0b11); // TX and RX enabled, no interrupts
        Mps2An386 { _private: () }
    }
}

impl Clock for Mps2An386 {
    fn now_ms(&mut self) -> u64 {
        u64::from(MILLIS.load(Ordering::Relaxed))
    }
}

impl Board for Mps2An386 {
    fn read_byte(&mut self) -> Option<u8> {
        if reg_read(UART0 + UART_STATE) & STATE_RX_FULL == 0 {
            return None;
        }
        Some(reg_read(UART0 + UART_DATA) as u8)
    }

    fn write_all(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            while reg_read(UART0 + UART_STATE) & STATE_TX_FULL != 0 {}
            reg_write(UART0 + UART_DATA, u32::from(byte));
        }
    }

    fn idle(&mut self) {
        // The CMSDK UART holds one received byte; SysTick wakes the core
        // every millisecond to take it (the sender waits meanwhile).
        cortex_m::asm::wfi();
    }

    fn jitter(&mut self) -> u32 {
        // SYST_CVR: the SysTick current value (25 000 counts per ms).
        reg_read(0xE000_E018) ^ MILLIS.load(Ordering::Relaxed).rotate_left(16)
    }
}

unsafe extern "C" {
    /// Start of the factory page (memory.x).
    static _factory_page: [u8; FACTORY_PAGE];
}

/// The factory page the programming station wrote.
pub fn factory_page() -> &'static [u8; FACTORY_PAGE] {
    // SAFETY: memory.x places `_factory_page` at a 4 KiB region that nothing
    // writes while the firmware runs.
    unsafe { &*addr_of!(_factory_page) }
}

#[unsafe(link_section = ".flashsim")]
static mut FLASH_MEMORY: [u8; 8192] = [0; 8192];

/// The credential store's flash: 8 KiB of RAM with NOR rules, erased at
/// boot. Returns `None` if called twice.
pub fn credential_flash() -> Option<RamFlash<'static>> {
    static TAKEN: AtomicU32 = AtomicU32::new(0);
    if TAKEN.swap(1, Ordering::Relaxed) != 0 {
        return None;
    }
    // SAFETY: the flag above hands out the only reference, once.
    let memory = unsafe { &mut *addr_of_mut!(FLASH_MEMORY) };
    Some(RamFlash::new(memory, true))
}

/// Boot-time entropy this board offers: the SysTick value after the clocks
/// came up (next to nothing; see docs/firmware.md on the RNG).
pub fn boot_entropy(board: &mut Mps2An386) -> [u8; 4] {
    board.jitter().to_le_bytes()
}
