//! Board support for the LM3S6965 evaluation board (and QEMU's model of it):
//! UART0 (the line), SysTick (the millisecond clock), the factory page, and
//! the RAM stand-in for the credential store's flash. Everything above the
//! registers is in `idgate-board`.
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

/// The core clock after [`init_clock`], in Hz: QEMU's model derives it from
/// RCC as 200 MHz / (SYSDIV + 1) = 12.5 MHz with SYSDIV = 15.
pub const CORE_HZ: u32 = 12_500_000;

const SYSCTL_RCC: usize = 0x400F_E060;
const RCC_USESYSDIV: u32 = 1 << 22;
const RCC_SYSDIV_16: u32 = 0xF << 23;

/// Sets the system clock divider. QEMU 7.2 leaves the core clock (and with
/// it SysTick) stopped until the firmware writes RCC; on silicon this is also
/// where the PLL would be configured.
pub fn init_clock() {
    let rcc = reg_read(SYSCTL_RCC) & !(0xF << 23);
    reg_write(SYSCTL_RCC, rcc | RCC_USESYSDIV | RCC_SYSDIV_16);
}

/// Two credential slots of 4 KiB (four 1 KiB flash pages each).
pub const STORE: StoreLayout = StoreLayout {
    base: 0,
    slot_size: 4096,
};

/// SysTick interrupts since boot: milliseconds with the agent's 1 kHz setup.
static MILLIS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    MILLIS.fetch_add(1, Ordering::Relaxed);
}

/// How many times SysTick has wrapped (interrupted) since boot.
pub fn systick_wraps() -> u32 {
    MILLIS.load(Ordering::Relaxed)
}

/// UART0 of the LM3S6965 (a PL011 with TI's register names), 115200 8N1.
#[derive(Debug)]
pub struct Uart0 {
    _private: (),
}

const UART0: usize = 0x4000_C000;
const UART_DR: usize = 0x000;
const UART_FR: usize = 0x018;
const UART_IBRD: usize = 0x024;
const UART_FBRD: usize = 0x028;
const UART_LCRH: usize = 0x02C;
const UART_CTL: usize = 0x030;
const FR_RXFE: u32 = 1 << 4;
const FR_TXFF: u32 = 1 << 5;
const SYSCTL_RCGC1: usize = 0x400F_E104;
const SYSCTL_RCGC2: usize = 0x400F_E108;
const GPIOA: usize = 0x4000_4000;
const GPIO_AFSEL: usize = 0x420;
const GPIO_DEN: usize = 0x51C;

fn reg_read(address: usize) -> u32 {
    // SAFETY: only called with addresses of this board's memory-mapped
    // peripheral registers above, which are always mapped and 4-byte aligned.
    unsafe { read_volatile(address as *const u32) }
}

fn reg_write(address: usize, value: u32) {
    // SAFETY: as in `reg_read`; the registers written have no effect on
    // memory safety (clock gates, pin muxing, the UART).
    unsafe { write_volatile(address as *mut u32, value) }
}

impl Uart0 {
    /// Clocks UART0 and GPIO port A, routes PA0/PA1 to the UART, and
    /// enables it at 115200 baud, 8N1, FIFOs on. Call once.
    pub fn new() -> Uart0 {
        reg_write(SYSCTL_RCGC1, reg_read(SYSCTL_RCGC1) | 1);
        reg_write(SYSCTL_RCGC2, reg_read(SYSCTL_RCGC2) | 1);
        reg_write(GPIOA + GPIO_AFSEL, reg_read(GPIOA + GPIO_AFSEL) | 0b11);
        reg_write(GPIOA + GPIO_DEN, reg_read(GPIOA + GPIO_DEN) | 0b11);
        reg_write(UART0 + UART_CTL, 0);
        // 12.5 MHz / (16 × 115200) = 6.78: integer 6, fraction 0.78 × 64 ≈ 50.
        reg_write(UART0 + UART_IBRD, 6);
        reg_write(UART0 + UART_FBRD, 50);
        reg_write(UART0 + UART_LCRH, 0x60 | 0x10); // 8 bits, FIFOs enabled
        reg_write(UART0 + UART_CTL, 0x301); // UARTEN | TXE | RXE
        Uart0 { _private: () }
    }
}

impl Default for Uart0 {
    fn default() -> Self {
        Uart0::new()
    }
}

/// The board: UART0, SysTick.
#[derive(Debug)]
pub struct Lm3s6965 {
    uart: Uart0,
}

impl Lm3s6965 {
    /// Starts the 1 kHz SysTick and UART0.
    pub fn new(mut syst: SYST) -> Lm3s6965 {
        init_clock();
        syst.set_clock_source(SystClkSource::Core);
        syst.set_reload(CORE_HZ / 1000 - 1);
        syst.clear_current();
        syst.enable_interrupt();
        syst.enable_counter();
        Lm3s6965 { uart: Uart0::new() }
    }
}

impl Clock for Lm3s6965 {
    fn now_ms(&mut self) -> u64 {
        u64::from(MILLIS.load(Ordering::Relaxed))
    }
}

impl Board for Lm3s6965 {
    fn read_byte(&mut self) -> Option<u8> {
        let _ = &self.uart;
        if reg_read(UART0 + UART_FR) & FR_RXFE != 0 {
            return None;
        }
        Some(reg_read(UART0 + UART_DR) as u8)
    }

    fn write_all(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            while reg_read(UART0 + UART_FR) & FR_TXFF != 0 {}
            reg_write(UART0 + UART_DR, u32::from(byte));
        }
    }

    fn idle(&mut self) {
        // SysTick wakes the core every millisecond; the 16-byte receive FIFO
        // holds what arrives meanwhile at up to 115200 baud (1.4 ms).
        cortex_m::asm::wfi();
    }

    fn jitter(&mut self) -> u32 {
        // SYST_CVR: the SysTick current value (12 500 counts per ms).
        reg_read(0xE000_E018) ^ MILLIS.load(Ordering::Relaxed).rotate_left(16)
    }
}

unsafe extern "C" {
    /// Start of the factory page (memory.x).
    static _factory_page: [u8; FACTORY_PAGE];
}

/// The factory page the programming station wrote (flash, read-only).
pub fn factory_page() -> &'static [u8; FACTORY_PAGE] {
    // SAFETY: memory.x places `_factory_page` at a 4 KiB flash region that
    // nothing writes while the firmware runs.
    unsafe { &*addr_of!(_factory_page) }
}

#[unsafe(link_section = ".flashsim")]
static mut FLASH_MEMORY: [u8; 8192] = [0; 8192];

/// The credential store's flash: 8 KiB of RAM with NOR rules (QEMU does not
/// model the LM3S flash controller). Erased at boot, like a fresh device.
/// Returns `None` if called twice.
pub fn credential_flash() -> Option<RamFlash<'static>> {
    static TAKEN: AtomicU32 = AtomicU32::new(0);
    if TAKEN.swap(1, Ordering::Relaxed) != 0 {
        return None;
    }
    // SAFETY: the flag above hands out the only reference, once.
    let memory = unsafe { &mut *addr_of_mut!(FLASH_MEMORY) };
    Some(RamFlash::new(memory, true))
}

/// Boot-time entropy this board offers: the SysTick value after the UART and
/// clocks came up (a few bits at best on silicon, none in QEMU with `-icount`).
pub fn boot_entropy(board: &mut Lm3s6965) -> [u8; 4] {
    board.jitter().to_le_bytes()
}
