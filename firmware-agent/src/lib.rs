//! The idgate device agent: the device side of the enrollment and renewal
//! protocol as sans-IO state machines. They take bytes and the current time in
//! and hand messages and deadlines out; the firmware (or `idgate-sim` on a host)
//! owns the MQTT connection and the clock. `no_std`, no heap: every buffer is a
//! fixed `heapless` one whose size is a public constant.
//!
//! Only P-256 keys and the CBOR encoding are spoken. The keys never leave the
//! [`KeyStore`](idgate_hal::KeyStore): the agent asks it for a new key, has it sign
//! the CSR digest (and, to renew, the renewal message with the current key), and
//! promotes the new key once a certificate for it has arrived.
//!
//! [`Enrollment`] and [`Renewal`] are the two kinds of one request/reply machine,
//! [`Exchange`], and are driven the same way. A certificate is taken only if
//! its chain verifies to a pinned root ([`ChainError`]).
//!
//! Around them: [`CredentialStore`], the power-safe A/B store of the
//! credential, renewal counter and time floor in NOR flash; [`Scheduler`],
//! which decides when to renew (inside the gateway's window, with jitter,
//! backing off on failure) and [`TimeKeeper`], the device's sense of time.
#![no_std]

#[macro_use]
mod fmt;

mod chain;
mod enrollment;
mod error;
mod exchange;
mod renewal;
mod retry;
mod rid;
mod schedule;
mod store;

pub use chain::{ChainError, MAX_PINNED_ROOTS};
pub use enrollment::{Config, Enroll, Enrollment};
pub use error::{Error, HardwareError, KeyOperation, PeerError, UsageError};
pub use exchange::{
    Certified, Event, Exchange, Keep, KeepCopy, KeepSerial, MAX_CERTIFICATE, MAX_CHAIN_BYTES,
    MAX_REJECT_CODE, MAX_REJECT_MESSAGE, MAX_REQUEST, MAX_SERIAL, Rejection, RequestKind, Serial,
    TopicName, Transmit,
};
pub use renewal::{Renew, RenewConfig, Renewal};
pub use retry::RetryPolicy;
pub use rid::Rid;
pub use schedule::{CertificateTimes, ScheduleEvent, SchedulePolicy, Scheduler, TimeKeeper};
pub use store::{
    Choice, Commit, Credential, CredentialStore, MAX_KEY_BLOB, MAX_RECORD, Status, StoreError,
};
