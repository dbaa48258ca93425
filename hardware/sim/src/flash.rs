//! A simulated NOR flash with power-cut injection, for testing what survives a
//! power cut at any byte. NOR semantics: erase sets a whole sector to `0xFF`,
//! a write can only clear bits (it ANDs), and both count one operation per
//! byte. With a budget of N operations the operation number N+1 is torn: an
//! erase stops part-way through its range, a write leaves its byte with only
//! some bits cleared and the rest of the write undone; then the flash is
//! "off" and fails every further call until [`SimFlash::restart`].

use std::sync::{Arc, Mutex, MutexGuard};

use idgate_hal::flash::{ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash};

/// Why a simulated flash operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimFlashError {
    /// The power was cut (now or earlier); restart to go on.
    PowerCut,
    /// The offset or length is not aligned.
    NotAligned,
    /// The range lies outside the flash.
    OutOfBounds,
}

impl NorFlashError for SimFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            SimFlashError::PowerCut => NorFlashErrorKind::Other,
            SimFlashError::NotAligned => NorFlashErrorKind::NotAligned,
            SimFlashError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
        }
    }
}

/// A simulated NOR flash of 4 KiB sectors and 4-byte write units. Clones
/// share everything: the memory, the planned cut and the operation count, so
/// a test can hand a clone to a store and watch it.
#[derive(Clone, Debug)]
pub struct SimFlash {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    memory: Vec<u8>,
    /// Byte operations left before the power is cut; `None`: never.
    budget: Option<u64>,
    /// Byte operations done since the last (re)start.
    operations: u64,
    off: bool,
}

impl SimFlash {
    /// Erase sector size.
    pub const SECTOR: usize = 4096;

    /// A fresh (erased) flash of `sectors` sectors.
    pub fn new(sectors: usize) -> SimFlash {
        SimFlash::with_memory(vec![0xff; sectors * Self::SECTOR])
    }

    /// A flash holding `memory` (whose length should be a whole number of
    /// sectors), e.g. a [`snapshot`](Self::snapshot) to start many
    /// experiments from one state.
    pub fn with_memory(memory: Vec<u8>) -> SimFlash {
        SimFlash {
            state: Arc::new(Mutex::new(State {
                memory,
                budget: None,
                operations: 0,
                off: false,
            })),
        }
    }

    /// Reboots: the power is back on, no cut is planned, the operation count
    /// starts again; the memory is as the last operation left it.
    pub fn restart(&self) -> SimFlash {
        {
            let mut state = self.lock();
            state.budget = None;
            state.operations = 0;
            state.off = false;
        }
        self.clone()
    }

    /// Cuts the power once `n` more byte operations are done: the next one is torn.
    pub fn cut_after(self, n: u64) -> SimFlash {
        self.lock().budget = Some(n);
        self
    }

    /// Byte operations (erased plus written bytes) since the last (re)start.
    pub fn operations(&self) -> u64 {
        self.lock().operations
    }

    /// Whether the power was cut.
    pub fn is_off(&self) -> bool {
        self.lock().off
    }

    /// A copy of the memory.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().memory.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock leaves valid bytes.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(state: &State, offset: u32, len: usize, align: usize) -> Result<(), SimFlashError> {
        if state.off {
            return Err(SimFlashError::PowerCut);
        }
        if !(offset as usize).is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(SimFlashError::NotAligned);
        }
        if offset as usize + len > state.memory.len() {
            return Err(SimFlashError::OutOfBounds);
        }
        Ok(())
    }
}

impl State {
    /// Spends one operation; false if the power goes now.
    fn spend(&mut self) -> bool {
        if let Some(left) = self.budget.as_mut() {
            if *left == 0 {
                self.off = true;
                return false;
            }
            *left -= 1;
        }
        self.operations += 1;
        true
    }
}

impl ErrorType for SimFlash {
    type Error = SimFlashError;
}

impl ReadNorFlash for SimFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), SimFlashError> {
        let state = self.lock();
        SimFlash::check(&state, offset, bytes.len(), 1)?;
        let start = offset as usize;
        bytes.copy_from_slice(&state.memory[start..start + bytes.len()]);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.lock().memory.len()
    }
}

impl NorFlash for SimFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = SimFlash::SECTOR;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), SimFlashError> {
        let mut state = self.lock();
        if to < from {
            return Err(SimFlashError::OutOfBounds);
        }
        SimFlash::check(&state, from, (to - from) as usize, Self::ERASE_SIZE)?;
        for i in from as usize..to as usize {
            if !state.spend() {
                // Torn: this byte and the rest keep their old contents (this
                // one with a few bits set, as a half-erased cell might read).
                state.memory[i] |= 0x81;
                return Err(SimFlashError::PowerCut);
            }
            state.memory[i] = 0xff;
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), SimFlashError> {
        let mut state = self.lock();
        SimFlash::check(&state, offset, bytes.len(), Self::WRITE_SIZE)?;
        for (i, &b) in bytes.iter().enumerate() {
            let at = offset as usize + i;
            if !state.spend() {
                // Torn: only some of the bits that should clear did.
                state.memory[at] &= b | 0xf0;
                return Err(SimFlashError::PowerCut);
            }
            state.memory[at] &= b;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nor_semantics_and_power_cuts() {
        let mut flash = SimFlash::new(2);
        flash.write(0, &[0x0f, 0xf0, 0x00, 0xff]).unwrap();
        flash.write(0, &[0xf0, 0xff, 0xff, 0xff]).unwrap();
        let mut read = [0u8; 4];
        flash.read(0, &mut read).unwrap();
        assert_eq!(read, [0x00, 0xf0, 0x00, 0xff], "writes only clear bits");
        assert_eq!(flash.write(1, &[0; 4]), Err(SimFlashError::NotAligned));
        assert_eq!(flash.erase(0, 100), Err(SimFlashError::NotAligned));

        let mut cut = flash.restart().cut_after(2);
        assert_eq!(cut.erase(0, 4096), Err(SimFlashError::PowerCut));
        assert!(flash.is_off(), "clones share the power");
        assert_eq!(cut.read(0, &mut read), Err(SimFlashError::PowerCut));
        let mut on = cut.restart();
        on.read(0, &mut read).unwrap();
        assert_eq!(read[..2], [0xff, 0xff], "erased before the cut");
        assert_eq!(read[2], 0x81, "torn byte");
        on.erase(0, 4096).unwrap();
        assert_eq!(on.operations(), 4096);
    }
}
