//! The agent image: waits for a line station on UART0, enrolls, stores the
//! credential, and (with semihosting) reports and exits.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use idgate_board::device::{self, Outcome};
use idgate_board::{report, stack};
use idgate_board_mps2_an386::{Mps2An386, STORE, boot_entropy, credential_flash, factory_page};

#[entry]
fn main() -> ! {
    stack::paint();
    let Some(peripherals) = cortex_m::Peripherals::take() else {
        report::exit(false);
    };
    let mut board = Mps2An386::new(peripherals.SYST);
    let entropy = boot_entropy(&mut board);
    let Some(flash) = credential_flash() else {
        report::exit(false);
    };
    report!("idgate agent on mps2-an386: waiting for the station");
    let outcome = device::run(board, flash, STORE, factory_page(), &entropy);
    let ok = matches!(outcome, Outcome::Enrolled { .. });
    report!("outcome: {:?}", outcome);
    report!(
        "clock: {} ms since boot",
        idgate_board_mps2_an386::systick_wraps()
    );
    report!(
        "footprint: stack peak {} bytes of {}",
        stack::peak(),
        stack::size()
    );
    report::exit(ok)
}
