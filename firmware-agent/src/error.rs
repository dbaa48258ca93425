//! The agent's one error type. It keeps apart the three sources of failure,
//! because each calls for a different response: bad input from the network is
//! ignored (the agent keeps waiting), misuse by the firmware is a bug to fix, and a
//! key store fault is a hardware problem to report.

use core::fmt;

use idgate_hal::ErrorKind;

use crate::chain::ChainError;
use idgate_pki::der::DerError;
use idgate_pki::protocol::{DecodeError, IdError};

/// Everything that can go wrong in the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A message from the network was not a valid answer to our request. The
    /// message was ignored; the agent's state is unchanged.
    Peer(PeerError),
    /// The caller used the agent wrongly; nothing was done.
    Usage(UsageError),
    /// The key store failed.
    Hardware(HardwareError),
}

/// Why an incoming message was ignored. Any party on the broker can publish, so
/// none of these is trusted to change what the agent does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerError {
    /// The topic is not an idgate v1 topic.
    UnknownTopic,
    /// The topic belongs to another device.
    OtherDevice,
    /// The topic is ours but is not a reply to our request (another operation or
    /// format, or a request topic).
    NotOurReply,
    /// The payload could not be decoded.
    Decode(DecodeError),
    /// The reply answers another request id.
    OtherRid,
    /// The certificate could not be parsed far enough to find its public key.
    BadCertificate(DerError),
    /// The certificate is for a public key other than the one we asked for.
    WrongKey,
    /// The certificate does not lead through the chain to a pinned root.
    Chain(ChainError),
    /// The certificate is larger than [`MAX_CERTIFICATE`](crate::MAX_CERTIFICATE).
    CertificateTooLarge,
    /// The chain is larger than [`MAX_CHAIN_BYTES`](crate::MAX_CHAIN_BYTES).
    ChainTooLarge,
    /// The serial is empty, longer than 20 octets, or not lowercase hex.
    BadSerial,
    /// `not_before` is after `not_after`, or `renew_after` after `renew_before`.
    BadValidity,
    /// The request is already finished; a late or duplicate reply.
    Finished,
}

/// Ways the caller can misuse the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UsageError {
    /// The device id does not follow the protocol's syntax.
    BadDeviceId(IdError),
    /// The request id does not follow the protocol's syntax.
    BadRid(IdError),
    /// The enrollment token is empty.
    EmptyToken,
    /// The current certificate's serial given to a renewal is not 1–20 octets
    /// of lowercase hex.
    BadSerial(IdError),
    /// The retry policy is unusable (no attempts, or a zero initial timeout).
    BadRetryPolicy,
    /// No pinned root, more than [`MAX_PINNED_ROOTS`](crate::MAX_PINNED_ROOTS),
    /// or one that is not a P-256 certificate.
    BadPinnedRoots,
}

/// Which key store operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyOperation {
    /// Generating the staged key.
    Generate,
    /// Signing the CSR with the staged key.
    Sign,
    /// Signing a renewal request with the current key (or finding that key).
    SignRenewal,
    /// Promoting the staged key to current.
    Promote,
}

impl KeyOperation {
    const fn as_str(self) -> &'static str {
        match self {
            KeyOperation::Generate => "generating the next key",
            KeyOperation::Sign => "signing the CSR",
            KeyOperation::SignRenewal => "signing the renewal with the current key",
            KeyOperation::Promote => "promoting the next key",
        }
    }
}

/// A fault of the device's hardware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HardwareError {
    /// A key store operation failed.
    KeyStore {
        /// What the agent asked for.
        operation: KeyOperation,
        /// What went wrong, portably.
        kind: ErrorKind,
    },
    /// The key store returned a public key that is not an uncompressed P-256 point.
    BadPublicKey,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Peer(e) => write!(f, "ignored message: {e}"),
            Error::Usage(e) => write!(f, "misuse: {e}"),
            Error::Hardware(e) => write!(f, "hardware fault: {e}"),
        }
    }
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::UnknownTopic => f.write_str("not an idgate v1 topic"),
            PeerError::OtherDevice => f.write_str("topic of another device"),
            PeerError::NotOurReply => f.write_str("not a reply to our request"),
            PeerError::Decode(e) => write!(f, "undecodable payload: {e}"),
            PeerError::OtherRid => f.write_str("reply to another request id"),
            PeerError::BadCertificate(e) => write!(f, "unreadable certificate: {e}"),
            PeerError::WrongKey => f.write_str("certificate is not for our key"),
            PeerError::Chain(e) => write!(f, "certificate chain not trusted: {e}"),
            PeerError::CertificateTooLarge => f.write_str("certificate too large"),
            PeerError::ChainTooLarge => f.write_str("certificate chain too large"),
            PeerError::BadSerial => f.write_str("invalid serial number"),
            PeerError::BadValidity => f.write_str("validity or renewal window out of order"),
            PeerError::Finished => f.write_str("request already finished"),
        }
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageError::BadDeviceId(e) => write!(f, "device id {e}"),
            UsageError::BadRid(e) => write!(f, "request id {e}"),
            UsageError::EmptyToken => f.write_str("enrollment token is empty"),
            UsageError::BadSerial(_) => {
                f.write_str("serial must be 1 to 20 octets of lowercase hex")
            }
            UsageError::BadPinnedRoots => {
                f.write_str("pinned roots must be one or two P-256 CA certificates (DER)")
            }
            UsageError::BadRetryPolicy => {
                f.write_str("retry policy needs at least one attempt and a non-zero timeout")
            }
        }
    }
}

impl fmt::Display for HardwareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HardwareError::KeyStore { operation, kind } => {
                write!(f, "key store failed {}: {kind}", operation.as_str())
            }
            HardwareError::BadPublicKey => {
                f.write_str("key store returned an invalid P-256 public key")
            }
        }
    }
}

impl core::error::Error for Error {}
impl core::error::Error for PeerError {}
impl core::error::Error for UsageError {}
impl core::error::Error for HardwareError {}

impl From<PeerError> for Error {
    fn from(e: PeerError) -> Self {
        Error::Peer(e)
    }
}

impl From<UsageError> for Error {
    fn from(e: UsageError) -> Self {
        Error::Usage(e)
    }
}

impl From<HardwareError> for Error {
    fn from(e: HardwareError) -> Self {
        Error::Hardware(e)
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Error::Peer(PeerError::Decode(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sink([u8; 128], usize);

    impl fmt::Write for Sink {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let end = self.1 + s.len();
            self.0
                .get_mut(self.1..end)
                .ok_or(fmt::Error)?
                .copy_from_slice(s.as_bytes());
            self.1 = end;
            Ok(())
        }
    }

    fn display(e: Error) -> Sink {
        use fmt::Write;
        let mut sink = Sink([0; 128], 0);
        write!(sink, "{e}").unwrap();
        sink
    }

    #[test]
    fn messages_name_the_source() {
        let s = display(PeerError::WrongKey.into());
        assert_eq!(
            &s.0[..s.1],
            b"ignored message: certificate is not for our key"
        );
        let s = display(
            HardwareError::KeyStore {
                operation: KeyOperation::Promote,
                kind: ErrorKind::Busy,
            }
            .into(),
        );
        assert_eq!(
            &s.0[..s.1],
            b"hardware fault: key store failed promoting the next key: the device is busy"
        );
        let s = display(UsageError::EmptyToken.into());
        assert_eq!(&s.0[..s.1], b"misuse: enrollment token is empty");
    }
}
