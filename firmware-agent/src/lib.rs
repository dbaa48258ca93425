//! The idgate device agent: the device side of the enrollment protocol as a
//! sans-IO state machine. It takes bytes and the current time in and hands
//! messages and deadlines out; the firmware (or `idgate-sim` on a host) owns the
//! MQTT connection and the clock. `no_std`, no heap: every buffer is a fixed
//! `heapless` one whose size is a public constant.
//!
//! Only P-256 keys and the CBOR encoding are spoken. The key never leaves the
//! [`KeyStore`](idgate_hal::KeyStore): the agent asks it for a new key, has it sign
//! the CSR digest, and promotes the key once a certificate for it has arrived.
#![no_std]

#[macro_use]
mod fmt;

mod enrollment;
mod error;
mod retry;
mod rid;

pub use enrollment::{
    Config, Enrollment, Event, MAX_CERTIFICATE, MAX_CHAIN_BYTES, MAX_REJECT_CODE,
    MAX_REJECT_MESSAGE, MAX_REQUEST, MAX_SERIAL, Rejection, Serial, TopicName, Transmit,
};
pub use error::{Error, HardwareError, KeyOperation, PeerError, UsageError};
pub use retry::RetryPolicy;
pub use rid::Rid;
