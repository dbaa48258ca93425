//! Diagnostics for tests and measurements: lines and an exit code through ARM
//! semihosting (QEMU's `-semihosting`, or a debugger), never the protocol.
//! Without the `semihosting` feature every call does nothing (`exit` parks
//! the core), so an image for a real device carries none of it.

/// Writes one line to the host's stdout.
#[cfg(all(feature = "semihosting", target_arch = "arm"))]
pub fn line(args: core::fmt::Arguments<'_>) {
    cortex_m_semihosting::hprintln!("{}", args);
}

/// Writes one line to the host's stdout (disabled: no semihosting).
#[cfg(not(all(feature = "semihosting", target_arch = "arm")))]
pub fn line(_args: core::fmt::Arguments<'_>) {}

/// Ends the program: QEMU exits with `success`'s code; on a device without
/// semihosting the core sleeps forever.
#[cfg(target_arch = "arm")]
pub fn exit(success: bool) -> ! {
    #[cfg(feature = "semihosting")]
    {
        use cortex_m_semihosting::debug::{EXIT_FAILURE, EXIT_SUCCESS, exit};
        exit(if success { EXIT_SUCCESS } else { EXIT_FAILURE });
    }
    #[cfg(not(feature = "semihosting"))]
    let _ = success;
    #[allow(clippy::empty_loop)]
    loop {
        cortex_m::asm::wfi();
    }
}

/// Formats and writes one line through [`line`].
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => { $crate::report::line(format_args!($($arg)*)) };
}
