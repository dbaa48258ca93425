//! Request ids (`rid`): valid by construction, and made from 8 random bytes when
//! the firmware does not bring its own.

use core::fmt;

use idgate_pki::protocol::{MAX_ID, check_rid};
use rand_core::{CryptoRng, RngCore};

use crate::error::UsageError;

/// A request id that follows the protocol's syntax.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Rid(heapless::String<MAX_ID>);

impl Rid {
    /// Checks and copies `rid`.
    pub fn new(rid: &str) -> Result<Rid, UsageError> {
        check_rid(rid).map_err(UsageError::BadRid)?;
        let mut s = heapless::String::new();
        // check_rid bounds the length by MAX_ID, the capacity.
        s.push_str(rid)
            .map_err(|_| UsageError::BadRid(idgate_pki::protocol::IdError::TooLong))?;
        Ok(Rid(s))
    }

    /// 16 lowercase hex digits from 8 random bytes: unique enough that two
    /// requests of one device never collide, which is all a rid must be.
    pub fn random(rng: &mut (impl RngCore + CryptoRng)) -> Rid {
        let mut bytes = [0u8; 8];
        rng.fill_bytes(&mut bytes);
        Rid::from_bytes(bytes)
    }

    fn from_bytes(bytes: [u8; 8]) -> Rid {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = heapless::String::new();
        for b in bytes {
            for nibble in [b >> 4, b & 0x0f] {
                // 16 characters always fit in MAX_ID.
                let _ = s.push(char::from(HEX[usize::from(nibble)]));
            }
        }
        Rid(s)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Rid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Rid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rid({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idgate_pki::protocol::IdError;

    #[test]
    fn random_rids_are_sixteen_hex_digits() {
        let rid = Rid::from_bytes([0x00, 0x01, 0xab, 0xcd, 0xef, 0x10, 0x99, 0xff]);
        assert_eq!(rid.as_str(), "0001abcdef1099ff");
        assert!(check_rid(rid.as_str()).is_ok());
    }

    #[test]
    fn bad_rids_are_refused() {
        assert_eq!(Rid::new(""), Err(UsageError::BadRid(IdError::Empty)));
        assert_eq!(
            Rid::new("a/b"),
            Err(UsageError::BadRid(IdError::BadCharacter))
        );
        assert_eq!(Rid::new("r-1").unwrap().as_str(), "r-1");
    }
}
