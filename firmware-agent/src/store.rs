//! The power-safe credential store: two slots (A and B) in a NOR flash region,
//! each holding one CRC-protected record (certificate, chain, key blob or key
//! handle, generation, renewal counter, `not_earlier_than`). A write goes to the
//! slot that does not hold the credential to protect, is read back and checked,
//! and only then counts; a power cut at any byte of an erase or a write leaves
//! the other slot as it was.
//!
//! ```text
//!             write(Pending)                confirm()
//!   Confirmed ─────────────► Pending(new) ───────────► Confirmed(new)
//!   (old)                    + Confirmed(old)          (old slot free)
//!                                 │ discard_pending()
//!                                 ▼
//!                            Confirmed(old)
//! ```
//!
//! A pending credential is booted (it is the newest) but the old one stays in
//! flash, as the fallback, until the firmware has seen the new one work once
//! and calls [`CredentialStore::confirm`]. The slot layout is in
//! `docs/firmware.md`.

use core::fmt;

use idgate_hal::ErrorKind;
use idgate_hal::flash::{NorFlash, error_kind};

use crate::exchange::{MAX_CERTIFICATE, MAX_CHAIN_BYTES};

/// Largest key blob (a wrapped private key, or a secure element's key handle).
pub const MAX_KEY_BLOB: usize = 64;
/// Record magic, first bytes of the record.
const MAGIC: [u8; 4] = *b"IDGC";
/// Record layout version.
const VERSION: u8 = 1;
/// Flash is read and written in blocks of this many bytes; the flash's read
/// and write sizes must divide it.
const BLOCK: usize = 32;
/// The confirmation marker: the first block of a slot, erased (all `0xFF`)
/// while the record is pending, programmed to zeros to confirm it.
const MARKER: u32 = 0;
/// The record starts after the marker block.
const RECORD: u32 = BLOCK as u32;
/// Fixed header: magic 4, version 1, reserved 3, generation 4, certificate,
/// chain and key lengths 2 each, reserved 2, counter 8, not_earlier_than 8.
const HEADER: usize = 36;
/// The largest slot content: marker, header, payload, CRC.
pub const MAX_RECORD: usize = BLOCK + HEADER + MAX_CERTIFICATE + MAX_CHAIN_BYTES + MAX_KEY_BLOB + 4;

/// What the store keeps of one credential, in RAM. About 3 KiB: keep it in a
/// `static` or the firmware's main state, not on a small stack.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credential {
    /// The device certificate, DER.
    pub certificate: heapless::Vec<u8, MAX_CERTIFICATE>,
    /// The issuer certificates, DER, concatenated, issuer first.
    pub chain: heapless::Vec<u8, MAX_CHAIN_BYTES>,
    /// The private key (software key store, ideally wrapped) or the key handle
    /// of a secure element.
    pub key: heapless::Vec<u8, MAX_KEY_BLOB>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key blob may be a private key: never print it.
        f.debug_struct("Credential")
            .field("certificate", &self.certificate.len())
            .field("chain", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Why the store failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// The flash failed; the operation may have been cut short, but the
    /// credential the store protects is untouched.
    Flash(ErrorKind),
    /// What was written did not read back the same; the slot is not used.
    Verify,
    /// The region is unusable: slots not aligned to the erase size, too small
    /// for [`MAX_RECORD`], or a flash read/write size that does not divide 32.
    Layout,
    /// There is no credential (nothing was ever written, or nothing survived).
    Empty,
    /// `confirm` or `discard_pending` without a pending credential, or a
    /// counter reservation while one is pending.
    NoPending,
    /// A renewal was requested while a pending credential awaits confirmation.
    Pending,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Flash(kind) => write!(f, "flash failed: {kind}"),
            StoreError::Verify => f.write_str("written record did not read back"),
            StoreError::Layout => f.write_str("flash region unusable for two slots"),
            StoreError::Empty => f.write_str("no credential stored"),
            StoreError::NoPending => f.write_str("no pending credential"),
            StoreError::Pending => f.write_str("a pending credential awaits confirmation"),
        }
    }
}

impl core::error::Error for StoreError {}

/// Whether a freshly written credential is pending (keep the old one until it
/// has worked once) or confirmed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Keep the previous credential as the fallback until [`CredentialStore::confirm`].
    Pending,
    /// The new credential replaces the previous one at once.
    Confirmed,
}

/// Which of the stored credentials to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The newest valid credential (pending or confirmed).
    Newest,
    /// The newest confirmed credential (the fallback while one is pending).
    Confirmed,
}

/// What one slot holds, from its header (CRC checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SlotInfo {
    generation: u32,
    confirmed: bool,
    counter: u64,
    not_earlier_than: u64,
    certificate_len: u16,
    chain_len: u16,
    key_len: u16,
}

/// The store's view of the two slots after [`CredentialStore::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Generation of the newest valid record (0: none).
    pub generation: u32,
    /// Whether the newest valid record awaits confirmation.
    pub pending: bool,
    /// Whether a confirmed credential exists (the newest, or the fallback).
    pub has_confirmed: bool,
    /// The highest renewal counter in any valid record.
    pub counter: u64,
    /// The highest `not_earlier_than` in any valid record, unix seconds.
    pub not_earlier_than: u64,
}

/// The A/B credential store over a flash region of two equal slots starting
/// at `base`.
pub struct CredentialStore<F> {
    flash: F,
    base: u32,
    slot_size: u32,
    slots: [Option<SlotInfo>; 2],
}

impl<F: NorFlash> CredentialStore<F> {
    /// Opens the store over `flash`: slot A at `base`, slot B at
    /// `base + slot_size`. Both must be aligned to the flash's erase size and
    /// hold [`MAX_RECORD`] bytes. Reads and checks both slots.
    pub fn open(flash: F, base: u32, slot_size: u32) -> Result<Self, StoreError> {
        let erase = F::ERASE_SIZE as u32;
        let fits = BLOCK.is_multiple_of(F::READ_SIZE)
            && BLOCK.is_multiple_of(F::WRITE_SIZE)
            && erase > 0
            && base.is_multiple_of(erase)
            && slot_size.is_multiple_of(erase)
            && slot_size as usize >= MAX_RECORD
            && (base as usize).is_multiple_of(BLOCK)
            && (slot_size as usize).is_multiple_of(BLOCK)
            && (base as usize)
                .checked_add(2 * slot_size as usize)
                .is_some_and(|end| end <= flash.capacity());
        if !fits {
            return Err(StoreError::Layout);
        }
        let mut store = CredentialStore {
            flash,
            base,
            slot_size,
            slots: [None, None],
        };
        store.slots = [store.scan(0)?, store.scan(1)?];
        Ok(store)
    }

    /// The state of the store.
    pub fn status(&self) -> Status {
        let valid = self.slots.iter().flatten();
        let newest = self.newest();
        Status {
            generation: newest.map_or(0, |i| self.info(i).generation),
            pending: newest.is_some_and(|i| !self.info(i).confirmed),
            has_confirmed: self.newest_confirmed().is_some(),
            counter: valid.clone().map(|s| s.counter).max().unwrap_or(0),
            not_earlier_than: valid.map(|s| s.not_earlier_than).max().unwrap_or(0),
        }
    }

    /// Gives the flash back.
    pub fn into_flash(self) -> F {
        self.flash
    }

    /// Loads a credential into `out`.
    pub fn load(&mut self, choice: Choice, out: &mut Credential) -> Result<(), StoreError> {
        let index = match choice {
            Choice::Newest => self.newest(),
            Choice::Confirmed => self.newest_confirmed(),
        }
        .ok_or(StoreError::Empty)?;
        let info = self.info(index);
        let start = self.slot_start(index) + RECORD + HEADER as u32;
        out.certificate.clear();
        out.chain.clear();
        out.key.clear();
        let certificate_len = usize::from(info.certificate_len);
        let chain_len = usize::from(info.chain_len);
        let key_len = usize::from(info.key_len);
        // Lengths were checked against the capacities by `scan`.
        let _ = out.certificate.resize(certificate_len, 0);
        let _ = out.chain.resize(chain_len, 0);
        let _ = out.key.resize(key_len, 0);
        let mut at = start;
        for field in [
            &mut out.certificate[..],
            &mut out.chain[..],
            &mut out.key[..],
        ] {
            let mut filled = 0;
            self.stream(at, field.len(), |bytes| {
                field[filled..filled + bytes.len()].copy_from_slice(bytes);
                filled += bytes.len();
            })?;
            at += field.len() as u32;
        }
        // Read once more and check the CRC: what was valid at `open` may have
        // been disturbed since (a bad read, a marginal cell).
        if self.scan(index)? != Some(info) {
            self.slots[index] = None;
            return Err(StoreError::Verify);
        }
        Ok(())
    }

    /// Writes `credential` as the next generation, into the slot that does not
    /// hold the credential to protect (the newest confirmed one, or with none
    /// confirmed the newest one), reads it back, and with
    /// [`Commit::Confirmed`] confirms it. The record carries the highest
    /// renewal counter stored so far and `max(not_earlier_than, stored)`.
    ///
    /// When this returns `Ok`, the credential survives any later power cut.
    /// Writing over a pending credential abandons it.
    pub fn write(
        &mut self,
        credential: &Credential,
        commit: Commit,
        not_earlier_than: u64,
    ) -> Result<(), StoreError> {
        let status = self.status();
        self.write_record(
            credential,
            commit,
            status.counter,
            not_earlier_than.max(status.not_earlier_than),
        )
    }

    /// Reserves the next renewal counter: writes the newest confirmed
    /// credential again with the counter one higher, confirmed. Call it, and
    /// wait for `Ok`, before sending a renewal request with the counter it
    /// returns; a power cut can then never make the counter go back.
    ///
    /// Refused while a credential is pending: confirm or discard it first (its
    /// slot is the one this write would have to reuse).
    pub fn reserve_counter(
        &mut self,
        scratch: &mut Credential,
        not_earlier_than: u64,
    ) -> Result<u64, StoreError> {
        let status = self.status();
        if status.pending {
            return Err(StoreError::Pending);
        }
        self.load(Choice::Confirmed, scratch)?;
        let counter = status.counter.saturating_add(1);
        self.write_record(
            scratch,
            Commit::Confirmed,
            counter,
            not_earlier_than.max(status.not_earlier_than),
        )?;
        Ok(counter)
    }

    /// Confirms the pending credential: it has worked once. The old one's slot
    /// becomes the target of the next write.
    pub fn confirm(&mut self) -> Result<(), StoreError> {
        let index = self
            .newest()
            .filter(|&i| !self.info(i).confirmed)
            .ok_or(StoreError::NoPending)?;
        self.program_marker(index)?;
        Ok(())
    }

    /// Drops the pending credential (it did not work): erases its slot, so the
    /// confirmed one is the newest again. The renewal counter does not go back
    /// (the confirmed record carries it too); the generation does.
    pub fn discard_pending(&mut self) -> Result<(), StoreError> {
        let index = self
            .newest()
            .filter(|&i| !self.info(i).confirmed && self.newest_confirmed().is_some())
            .ok_or(StoreError::NoPending)?;
        self.slots[index] = None;
        let start = self.slot_start(index);
        self.flash
            .erase(start, start + self.slot_size)
            .map_err(|e| StoreError::Flash(error_kind(&e)))
    }

    fn write_record(
        &mut self,
        credential: &Credential,
        commit: Commit,
        counter: u64,
        not_earlier_than: u64,
    ) -> Result<(), StoreError> {
        let protect = self.newest_confirmed().or_else(|| self.newest());
        let target = match protect {
            Some(i) => 1 - i,
            None => 0,
        };
        let generation = self
            .slots
            .iter()
            .flatten()
            .map(|s| s.generation)
            .max()
            .unwrap_or(0)
            .wrapping_add(1)
            .max(1);
        let info = SlotInfo {
            generation,
            confirmed: false,
            counter,
            not_earlier_than,
            certificate_len: credential.certificate.len() as u16,
            chain_len: credential.chain.len() as u16,
            key_len: credential.key.len() as u16,
        };
        // From here on the target slot holds nothing we rely on.
        self.slots[target] = None;
        let start = self.slot_start(target);
        let flash_error = |e: F::Error| StoreError::Flash(error_kind(&e));
        self.flash
            .erase(start, start + self.slot_size)
            .map_err(flash_error)?;
        let header = encode_header(&info);
        let mut crc = Crc32::new();
        let mut out = BlockWriter::new(start + RECORD);
        for part in [
            &header[..],
            &credential.certificate,
            &credential.chain,
            &credential.key,
        ] {
            crc.update(part);
            out.push(&mut self.flash, part).map_err(flash_error)?;
        }
        out.push(&mut self.flash, &crc.finish().to_le_bytes())
            .map_err(flash_error)?;
        out.finish(&mut self.flash).map_err(flash_error)?;
        // Read back: the record must check out exactly as intended.
        if self.scan(target)? != Some(info) {
            return Err(StoreError::Verify);
        }
        self.slots[target] = Some(info);
        if commit == Commit::Confirmed {
            self.program_marker(target)?;
        }
        Ok(())
    }

    fn program_marker(&mut self, index: usize) -> Result<(), StoreError> {
        let start = self.slot_start(index);
        self.flash
            .write(start + MARKER, &[0u8; BLOCK])
            .map_err(|e| StoreError::Flash(error_kind(&e)))?;
        match self.scan(index)? {
            Some(info) if info.confirmed => {
                self.slots[index] = Some(info);
                Ok(())
            }
            _ => Err(StoreError::Verify),
        }
    }

    fn info(&self, index: usize) -> SlotInfo {
        // Only called with indices that `newest*` found populated.
        self.slots[index].unwrap_or(SlotInfo {
            generation: 0,
            confirmed: false,
            counter: 0,
            not_earlier_than: 0,
            certificate_len: 0,
            chain_len: 0,
            key_len: 0,
        })
    }

    /// The valid slot with the higher generation (wrapping comparison, so a
    /// counter that wraps after 2^31 writes still orders correctly).
    fn newest_of(&self, filter: impl Fn(&SlotInfo) -> bool) -> Option<usize> {
        let a = self.slots[0].filter(&filter);
        let b = self.slots[1].filter(&filter);
        match (a, b) {
            (Some(a), Some(b)) => {
                if (b.generation.wrapping_sub(a.generation) as i32) > 0 {
                    Some(1)
                } else {
                    Some(0)
                }
            }
            (Some(_), None) => Some(0),
            (None, Some(_)) => Some(1),
            (None, None) => None,
        }
    }

    fn newest(&self) -> Option<usize> {
        self.newest_of(|_| true)
    }

    fn newest_confirmed(&self) -> Option<usize> {
        self.newest_of(|s| s.confirmed)
    }

    fn slot_start(&self, index: usize) -> u32 {
        self.base + index as u32 * self.slot_size
    }

    /// Reads and checks one slot: magic, version, lengths, CRC.
    fn scan(&mut self, index: usize) -> Result<Option<SlotInfo>, StoreError> {
        let start = self.slot_start(index);
        let mut marker = [0u8; BLOCK];
        self.flash
            .read(start + MARKER, &mut marker)
            .map_err(|e| StoreError::Flash(error_kind(&e)))?;
        let mut header = [0u8; HEADER];
        let mut filled = 0;
        self.stream(start + RECORD, HEADER, |bytes| {
            header[filled..filled + bytes.len()].copy_from_slice(bytes);
            filled += bytes.len();
        })?;
        let Some(mut info) = decode_header(&header) else {
            return Ok(None);
        };
        let payload = usize::from(info.certificate_len)
            + usize::from(info.chain_len)
            + usize::from(info.key_len);
        let mut crc = Crc32::new();
        self.stream(start + RECORD, HEADER + payload, |bytes| crc.update(bytes))?;
        let mut stored = [0u8; 4];
        let mut filled = 0;
        self.stream(start + RECORD + (HEADER + payload) as u32, 4, |bytes| {
            stored[filled..filled + bytes.len()].copy_from_slice(bytes);
            filled += bytes.len();
        })?;
        if crc.finish() != u32::from_le_bytes(stored) {
            return Ok(None);
        }
        // Any programmed byte confirms: the marker is only ever written to
        // confirm, so even a write cut short meant it.
        info.confirmed = marker.iter().any(|&b| b != 0xff);
        Ok(Some(info))
    }

    /// Reads `len` bytes at `offset` in aligned blocks, handing them out in
    /// order (no buffer larger than one block).
    fn stream(
        &mut self,
        offset: u32,
        len: usize,
        mut f: impl FnMut(&[u8]),
    ) -> Result<(), StoreError> {
        let end = offset as usize + len;
        let mut block_start = offset as usize / BLOCK * BLOCK;
        let mut block = [0u8; BLOCK];
        while block_start < end {
            self.flash
                .read(block_start as u32, &mut block)
                .map_err(|e| StoreError::Flash(error_kind(&e)))?;
            let from = (offset as usize).max(block_start) - block_start;
            let to = end.min(block_start + BLOCK) - block_start;
            f(&block[from..to]);
            block_start += BLOCK;
        }
        Ok(())
    }
}

impl<F> fmt::Debug for CredentialStore<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialStore")
            .field("base", &self.base)
            .field("slot_size", &self.slot_size)
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

fn encode_header(info: &SlotInfo) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[8..12].copy_from_slice(&info.generation.to_le_bytes());
    h[12..14].copy_from_slice(&info.certificate_len.to_le_bytes());
    h[14..16].copy_from_slice(&info.chain_len.to_le_bytes());
    h[16..18].copy_from_slice(&info.key_len.to_le_bytes());
    h[20..28].copy_from_slice(&info.counter.to_le_bytes());
    h[28..36].copy_from_slice(&info.not_earlier_than.to_le_bytes());
    h
}

fn decode_header(h: &[u8; HEADER]) -> Option<SlotInfo> {
    if h[0..4] != MAGIC || h[4] != VERSION {
        return None;
    }
    let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let info = SlotInfo {
        generation: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
        confirmed: false,
        certificate_len: u16_at(12),
        chain_len: u16_at(14),
        key_len: u16_at(16),
        counter: u64_at(20),
        not_earlier_than: u64_at(28),
    };
    let fits = usize::from(info.certificate_len) <= MAX_CERTIFICATE
        && usize::from(info.chain_len) <= MAX_CHAIN_BYTES
        && usize::from(info.key_len) <= MAX_KEY_BLOB;
    fits.then_some(info)
}

/// Collects bytes into aligned blocks and programs each full block.
struct BlockWriter {
    block: [u8; BLOCK],
    fill: usize,
    offset: u32,
}

impl BlockWriter {
    fn new(offset: u32) -> Self {
        BlockWriter {
            block: [0xff; BLOCK],
            fill: 0,
            offset,
        }
    }

    fn push<F: NorFlash>(&mut self, flash: &mut F, mut bytes: &[u8]) -> Result<(), F::Error> {
        while !bytes.is_empty() {
            let n = (BLOCK - self.fill).min(bytes.len());
            self.block[self.fill..self.fill + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
            if self.fill == BLOCK {
                flash.write(self.offset, &self.block)?;
                self.offset += BLOCK as u32;
                self.block = [0xff; BLOCK];
                self.fill = 0;
            }
        }
        Ok(())
    }

    fn finish<F: NorFlash>(self, flash: &mut F) -> Result<(), F::Error> {
        if self.fill > 0 {
            // The rest of the block stays 0xFF: programming 0xFF changes nothing.
            flash.write(self.offset, &self.block)?;
        }
        Ok(())
    }
}

/// CRC-32 (IEEE 802.3, reflected, as in zip and Ethernet), bit by bit: no
/// table, a few dozen bytes of code, fast enough for a few KiB per boot.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Crc32(u32);

impl Crc32 {
    pub(crate) fn new() -> Self {
        Crc32(0xffff_ffff)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u32::from(b);
            for _ in 0..8 {
                let mask = (self.0 & 1).wrapping_neg();
                self.0 = (self.0 >> 1) ^ (0xedb8_8320 & mask);
            }
        }
    }

    pub(crate) fn finish(self) -> u32 {
        !self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_standard_check_value() {
        let mut crc = Crc32::new();
        crc.update(b"1234");
        crc.update(b"56789");
        assert_eq!(crc.finish(), 0xcbf4_3926);
    }

    #[test]
    fn headers_round_trip_and_refuse_oversized_lengths() {
        let info = SlotInfo {
            generation: 7,
            confirmed: false,
            counter: 1 << 40,
            not_earlier_than: 1_700_000_000,
            certificate_len: 500,
            chain_len: 400,
            key_len: 32,
        };
        let h = encode_header(&info);
        assert_eq!(decode_header(&h), Some(info));
        let mut bad = h;
        bad[12..14].copy_from_slice(&(MAX_CERTIFICATE as u16 + 1).to_le_bytes());
        assert_eq!(decode_header(&bad), None);
        let mut bad = h;
        bad[4] = 2;
        assert_eq!(decode_header(&bad), None);
    }
}
