//! A NOR flash region in RAM, with NOR rules (erase sets `0xFF` per 1 KiB
//! page, a write can only clear bits, 4-byte words): what the credential store
//! runs on in QEMU.
//!
//! Why RAM: QEMU's `lm3s6965evb` maps the on-chip flash as ROM and does not
//! model the flash controller (FMA/FMD/FMC), so programming it is impossible
//! in the emulator. The geometry is the LM3S6965's (1 KiB erase pages,
//! 32-bit program words), so the store is exercised with the real
//! alignment rules; on silicon a flash-controller driver implementing the same
//! traits replaces this type, and nothing else changes.

use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash, check_erase, check_read, check_write,
};

/// NOR flash semantics over a borrowed RAM buffer.
#[derive(Debug)]
pub struct RamFlash<'a> {
    memory: &'a mut [u8],
}

impl<'a> RamFlash<'a> {
    /// A flash over `memory`, in the erased state it had when it came from
    /// the factory (`memory` is filled with `0xFF` if `erase` is set).
    pub fn new(memory: &'a mut [u8], erase: bool) -> RamFlash<'a> {
        if erase {
            memory.fill(0xFF);
        }
        RamFlash { memory }
    }
}

impl ErrorType for RamFlash<'_> {
    type Error = NorFlashErrorKind;
}

impl ReadNorFlash for RamFlash<'_> {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        check_read(self, offset, bytes.len())?;
        let start = offset as usize;
        bytes.copy_from_slice(&self.memory[start..start + bytes.len()]);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.memory.len()
    }
}

impl NorFlash for RamFlash<'_> {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = 1024;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        check_erase(self, from, to)?;
        self.memory[from as usize..to as usize].fill(0xFF);
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        check_write(self, offset, bytes.len())?;
        let start = offset as usize;
        for (cell, byte) in self.memory[start..start + bytes.len()]
            .iter_mut()
            .zip(bytes)
        {
            // Programming only clears bits.
            *cell &= byte;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nor_rules() {
        let mut memory = [0u8; 2048];
        let mut flash = RamFlash::new(&mut memory, true);
        flash.write(4, &[0x0F, 0xF0, 0xFF, 0x00]).unwrap();
        flash.write(4, &[0xF3, 0xFF, 0x0F, 0xFF]).unwrap();
        let mut out = [0u8; 4];
        flash.read(4, &mut out).unwrap();
        assert_eq!(out, [0x03, 0xF0, 0x0F, 0x00]);
        assert_eq!(flash.write(2, &[0; 4]), Err(NorFlashErrorKind::NotAligned));
        assert_eq!(flash.erase(0, 512), Err(NorFlashErrorKind::NotAligned));
        flash.erase(0, 1024).unwrap();
        flash.read(4, &mut out).unwrap();
        assert_eq!(out, [0xFF; 4]);
        assert_eq!(
            flash.read(2047, &mut out),
            Err(NorFlashErrorKind::OutOfBounds)
        );
    }
}
