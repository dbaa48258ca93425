//! idgate's certificate machinery and the wire protocol shared with devices.
//!
//! The core ([`protocol`], [`csr`], [`der`]) is `no_std` and heap-free so the
//! firmware agent uses the very same code as the gateway. The `std` feature adds
//! the issuer side: CA creation, CSR checks and the device certificate profile.
#![cfg_attr(not(feature = "std"), no_std)]

pub mod csr;
pub mod der;
pub mod link;
pub mod protocol;

#[cfg(feature = "std")]
pub mod ca;
#[cfg(feature = "std")]
pub mod check;
#[cfg(feature = "std")]
pub mod profile;
#[cfg(feature = "std")]
pub mod revocation;
#[cfg(feature = "std")]
pub mod station;
#[cfg(feature = "std")]
pub mod wire;
