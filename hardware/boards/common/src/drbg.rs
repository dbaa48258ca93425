//! The device's random numbers: HMAC_DRBG with SHA-256 (NIST SP 800-90A,
//! section 10.1.2), seeded at every boot from the per-device seed written at
//! programming, a boot-unique value and whatever entropy the board has.
//!
//! Why a DRBG and not the board's entropy directly: the LM3S6965 has no TRNG
//! (neither has QEMU's model of it), and most cheap MCUs have at best a noisy
//! ADC. A secret seed injected at programming (from the programming
//! station's CSPRNG) makes the output unpredictable to anyone who did not see
//! the device being programmed, whatever the board's entropy is worth;
//! the board's entropy then only has to add, never to carry the load alone.
//! HMAC_DRBG reuses the SHA-256 and HMAC code the agent links anyway, so it
//! costs almost no flash.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// After this many requests SP 800-90A wants a reseed; a sensor makes a few
/// per renewal, so in practice the device reboots long before.
const RESEED_INTERVAL: u64 = 1 << 48;

/// HMAC_DRBG (SHA-256). Implements `rand_core`'s `RngCore + CryptoRng`.
pub struct HmacDrbg {
    key: [u8; 32],
    value: [u8; 32],
    requests: u64,
}

impl core::fmt::Debug for HmacDrbg {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The state is the secret: never print it.
        f.debug_struct("HmacDrbg")
            .field("requests", &self.requests)
            .finish_non_exhaustive()
    }
}

impl HmacDrbg {
    /// Instantiates the DRBG from seed material given in parts (they are
    /// concatenated): entropy input, nonce, personalization string.
    pub fn new(seed_material: &[&[u8]]) -> HmacDrbg {
        let mut drbg = HmacDrbg {
            key: [0; 32],
            value: [1; 32],
            requests: 0,
        };
        drbg.update(seed_material);
        drbg
    }

    /// Mixes more entropy in (SP 800-90A reseed without the counter reset
    /// mattering here).
    pub fn reseed(&mut self, entropy: &[&[u8]]) {
        self.update(entropy);
        self.requests = 0;
    }

    /// Fills `out` with output (one "generate" request, no additional input).
    pub fn generate(&mut self, out: &mut [u8]) {
        if self.requests >= RESEED_INTERVAL {
            // Cannot happen on a device that reboots more often than every
            // 2^48 requests; stirring the state keeps the output usable anyway.
            self.update(&[b"reseed interval"]);
            self.requests = 0;
        }
        for chunk in out.chunks_mut(32) {
            self.value = self.hmac(&[&self.value]);
            chunk.copy_from_slice(&self.value[..chunk.len()]);
        }
        self.update(&[]);
        self.requests += 1;
    }

    fn hmac(&self, parts: &[&[u8]]) -> [u8; 32] {
        // HMAC accepts keys of any length: this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// HMAC_DRBG_Update.
    fn update(&mut self, provided: &[&[u8]]) {
        let provided_empty = provided.iter().all(|p| p.is_empty());
        for round in [0u8, 1] {
            if round == 1 && provided_empty {
                break;
            }
            let value = self.value;
            let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key)
                .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
            mac.update(&value);
            mac.update(&[round]);
            for part in provided {
                mac.update(part);
            }
            self.key = mac.finalize().into_bytes().into();
            self.value = self.hmac(&[&self.value]);
        }
    }
}

impl rand_core::RngCore for HmacDrbg {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0; 4];
        self.generate(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.generate(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.generate(dest);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.generate(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for HmacDrbg {}

impl Drop for HmacDrbg {
    fn drop(&mut self) {
        // Best effort: the optimiser may keep copies elsewhere.
        self.key = [0; 32];
        self.value = [0; 32];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// NIST CAVP HMAC_DRBG.rsp, [SHA-256] [PredictionResistance = False]
    /// [EntropyInputLen = 256] [NonceLen = 128] [PersonalizationStringLen = 0]
    /// [AdditionalInputLen = 0] [ReturnedBitsLen = 1024], COUNT = 0: two
    /// generate calls, the second one's output is the answer.
    #[test]
    fn nist_cavp_vector() {
        let entropy = hex("ca851911349384bffe89de1cbdc46e6831e44d34a4fb935ee285dd14b71a7488");
        let nonce = hex("659ba96c601dc69fc902940805ec0ca8");
        let mut drbg = HmacDrbg::new(&[&entropy, &nonce]);
        let mut out = [0u8; 128];
        drbg.generate(&mut out);
        drbg.generate(&mut out);
        let expected = hex(concat!(
            "e528e9abf2dece54d47c7e75e5fe302149f817ea9fb4bee6f4199697d04d5b89",
            "d54fbb978a15b5c443c9ec21036d2460b6f73ebad0dc2aba6e624abf07745bc1",
            "07694bb7547bb0995f70de25d6b29e2d3011bb19d27676c07162c8b5ccde0668",
            "961df86803482cb37ed6d5c0bb8d50cf1f50d476aa0458bdaba806f48be9dcb8"
        ));
        assert_eq!(out.to_vec(), expected);
    }

    #[test]
    fn different_seeds_different_streams() {
        let mut a = HmacDrbg::new(&[b"seed", b"boot 1"]);
        let mut b = HmacDrbg::new(&[b"seed", b"boot 2"]);
        let (mut x, mut y) = ([0u8; 32], [0u8; 32]);
        a.generate(&mut x);
        b.generate(&mut y);
        assert_ne!(x, y);
        // Parts are concatenated: the split does not matter.
        let mut c = HmacDrbg::new(&[b"seedboot 1"]);
        c.generate(&mut y);
        assert_eq!(x, y);
    }
}
