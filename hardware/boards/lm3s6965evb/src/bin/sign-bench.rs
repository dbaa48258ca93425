//! The P-256 instruction-count image (`footprint.sh`): key generation, one
//! signature and one verification between trace marks; the body is shared
//! by every board (`idgate_board::bench`).
#![no_std]
#![no_main]

use cortex_m_rt::entry;

#[entry]
fn main() -> ! {
    idgate_board::bench::sign_bench()
}
