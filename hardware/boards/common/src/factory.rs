//! The factory page: what the programming station writes into the last
//! 4 KiB of flash along with the firmware, different for every device.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "IDGF"
//!      4     1  layout version (1)
//!      5     1  number of pinned roots (1 or 2)
//!      6     2  reserved (0)
//!      8    32  device seed: 32 bytes from the station's CSPRNG (the DRBG's seed)
//!     40     4  the roots' DER lengths, u16 little-endian each (0 for an absent second)
//!     44     …  the roots' DER, concatenated
//!      …    32  SHA-256 of everything before it
//! ```
//!
//! The pinned roots are the trust anchors the agent checks every certificate
//! chain against; they come from the factory, never over the line (a station
//! could otherwise pin a CA of its choosing). The device id and the one-time
//! token, on the other hand, arrive over the line (`Provision`), because the
//! station assigns them from its batch.

use sha2::{Digest, Sha256};

/// The size of the factory page.
pub const FACTORY_PAGE: usize = 4096;
/// Page magic.
pub const MAGIC: [u8; 4] = *b"IDGF";
/// Layout version.
pub const VERSION: u8 = 1;
const HEADER: usize = 44;

/// Why the factory page is unusable; the device then refuses to enroll
/// (`Failed` with code `not_provisioned` on the line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactoryError {
    /// No page: erased flash (`FF…`) or something else.
    Missing,
    /// A layout version this firmware does not know.
    Version(u8),
    /// Lengths out of range or a bad checksum.
    Corrupt,
}

impl core::fmt::Display for FactoryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FactoryError::Missing => f.write_str("no factory page"),
            FactoryError::Version(v) => write!(f, "factory page layout {v} not supported"),
            FactoryError::Corrupt => f.write_str("factory page corrupt"),
        }
    }
}

/// The parsed factory page, borrowing from flash.
#[derive(Clone, Copy)]
pub struct Factory<'a> {
    /// The per-device DRBG seed.
    pub seed: &'a [u8; 32],
    roots: [&'a [u8]; 2],
    count: usize,
}

impl core::fmt::Debug for Factory<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Factory")
            .field("seed", &"<redacted>")
            .field("roots", &self.count)
            .finish()
    }
}

impl<'a> Factory<'a> {
    /// Parses and checks a factory page.
    pub fn parse(page: &'a [u8]) -> Result<Factory<'a>, FactoryError> {
        let header = page.get(..HEADER).ok_or(FactoryError::Missing)?;
        if header[..4] != MAGIC {
            return Err(FactoryError::Missing);
        }
        if header[4] != VERSION {
            return Err(FactoryError::Version(header[4]));
        }
        let count = usize::from(header[5]);
        if !(1..=2).contains(&count) || header[6..8] != [0, 0] {
            return Err(FactoryError::Corrupt);
        }
        let lengths = [
            usize::from(u16::from_le_bytes([header[40], header[41]])),
            usize::from(u16::from_le_bytes([header[42], header[43]])),
        ];
        if lengths[..count].contains(&0) || lengths[count..].iter().any(|&l| l != 0) {
            return Err(FactoryError::Corrupt);
        }
        let end = HEADER + lengths[0] + lengths[1];
        let body = page.get(..end).ok_or(FactoryError::Corrupt)?;
        let digest = page.get(end..end + 32).ok_or(FactoryError::Corrupt)?;
        if Sha256::digest(body)[..] != *digest {
            return Err(FactoryError::Corrupt);
        }
        let seed = header[8..40]
            .try_into()
            .map_err(|_| FactoryError::Corrupt)?;
        let first = &body[HEADER..HEADER + lengths[0]];
        let second = &body[HEADER + lengths[0]..end];
        Ok(Factory {
            seed,
            roots: [first, second],
            count,
        })
    }

    /// The pinned root certificates (DER), one or two.
    pub fn roots(&self) -> &[&'a [u8]] {
        &self.roots[..self.count]
    }
}

/// Writes a factory page for `seed` and `roots` into `page` (the programming
/// station's side; used by the host tools and tests). Returns its length.
pub fn write_factory_page(
    seed: &[u8; 32],
    roots: &[&[u8]],
    page: &mut [u8; FACTORY_PAGE],
) -> Result<usize, FactoryError> {
    if !(1..=2).contains(&roots.len()) {
        return Err(FactoryError::Corrupt);
    }
    let total: usize = roots.iter().map(|r| r.len()).sum();
    if roots
        .iter()
        .any(|r| r.is_empty() || r.len() > usize::from(u16::MAX))
        || HEADER + total + 32 > FACTORY_PAGE
    {
        return Err(FactoryError::Corrupt);
    }
    page.fill(0xFF);
    page[..4].copy_from_slice(&MAGIC);
    page[4] = VERSION;
    page[5] = roots.len() as u8;
    page[6..8].fill(0);
    page[8..40].copy_from_slice(seed);
    page[40..44].fill(0);
    let mut at = HEADER;
    for (i, root) in roots.iter().enumerate() {
        page[40 + 2 * i..42 + 2 * i].copy_from_slice(&(root.len() as u16).to_le_bytes());
        page[at..at + root.len()].copy_from_slice(root);
        at += root.len();
    }
    let digest = Sha256::digest(&page[..at]);
    page[at..at + 32].copy_from_slice(&digest);
    Ok(at + 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut page = [0u8; FACTORY_PAGE];
        let len = write_factory_page(&[7; 32], &[b"root one", b"two"], &mut page).unwrap();
        let factory = Factory::parse(&page).unwrap();
        assert_eq!(factory.seed, &[7; 32]);
        assert_eq!(factory.roots(), &[&b"root one"[..], &b"two"[..]]);
        for i in 0..len {
            let mut damaged = page;
            damaged[i] ^= 0x01;
            assert!(Factory::parse(&damaged).is_err(), "byte {i}");
        }
        assert_eq!(
            Factory::parse(&[0xFF; 64]).err(),
            Some(FactoryError::Missing)
        );
        assert_eq!(
            Factory::parse(&page[..10]).err(),
            Some(FactoryError::Missing)
        );
        let mut huge = [0u8; FACTORY_PAGE];
        let big = [1u8; FACTORY_PAGE];
        assert!(write_factory_page(&[0; 32], &[&big], &mut huge).is_err());
    }
}
