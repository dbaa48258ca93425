//! One device's renewal over a real MQTT connection: the current key signs off
//! a CSR for a new one. The connection presents the current certificate as a
//! TLS client certificate while it is valid by the local clock; once it has
//! expired the device connects anonymously (the gateway allows renewal within
//! its grace period, the request's signature being the proof).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idgate_agent::{RenewConfig, Renewal, RetryPolicy};
use idgate_hal::{KeySlot, KeyStore};
use idgate_pki::csr::p256_spki;
use p256::elliptic_curve::zeroize::Zeroizing;

use crate::SimError;
use crate::enroll::Enrolled;
use crate::keystore::SoftKeyStore;
use crate::session;
use crate::tls::{certificates, client_config, client_config_with_certificate};

/// What [`renew`] needs: the device's current identity and the next counter.
#[derive(Clone)]
pub struct RenewOptions {
    /// `HOST:PORT` of the gateway's MQTT front (TLS).
    pub broker: String,
    /// PEM with the CA certificate(s) to trust for the broker's TLS certificate;
    /// the first two are also the roots the device pins for its certificate chain.
    pub ca_pem: Vec<u8>,
    /// The device id; also the MQTT client id.
    pub device_id: String,
    /// The current private key, PKCS#8 PEM.
    pub key_pem: Zeroizing<String>,
    /// The current certificate, PEM, optionally followed by its issuers (sent
    /// along in the TLS handshake).
    pub certificate_pem: Vec<u8>,
    /// The renewal counter to use: greater than every earlier one of this
    /// device. The caller stores it durably **before** calling [`renew`].
    pub counter: u64,
    /// How long to try, from the first connection attempt to the certificate.
    pub timeout: Duration,
    /// The agent's retransmission policy.
    pub retry: RetryPolicy,
    /// Never present the certificate in the TLS handshake, even while it is
    /// valid (as a device whose clock says it expired would connect).
    pub anonymous: bool,
}

impl RenewOptions {
    /// Options with a 60 s timeout and the agent's default retry policy.
    pub fn new(
        broker: impl Into<String>,
        ca_pem: impl Into<Vec<u8>>,
        device_id: impl Into<String>,
        key_pem: impl Into<String>,
        certificate_pem: impl Into<Vec<u8>>,
        counter: u64,
    ) -> RenewOptions {
        RenewOptions {
            broker: broker.into(),
            ca_pem: ca_pem.into(),
            device_id: device_id.into(),
            key_pem: Zeroizing::new(key_pem.into()),
            certificate_pem: certificate_pem.into(),
            counter,
            timeout: Duration::from_secs(60),
            retry: RetryPolicy::DEFAULT,
            anonymous: false,
        }
    }
}

impl fmt::Debug for RenewOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RenewOptions")
            .field("broker", &self.broker)
            .field("device_id", &self.device_id)
            .field("key_pem", &"<redacted>")
            .field("counter", &self.counter)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// A finished renewal. Derefs to the new key and certificate, so
/// `renewed.serial` is the new serial.
#[derive(Clone, Debug)]
pub struct Renewed {
    /// The new key and certificate.
    pub certified: Enrolled,
    /// The serial of the certificate that was renewed.
    pub previous_serial: String,
    /// The counter the request carried.
    pub counter: u64,
    /// Whether the connection presented the current certificate (mutual TLS);
    /// `false` if it had expired by the local clock and the device connected
    /// anonymously.
    pub client_certificate: bool,
}

impl std::ops::Deref for Renewed {
    type Target = Enrolled;

    fn deref(&self) -> &Enrolled {
        &self.certified
    }
}

/// Renews one simulated device's certificate: checks that the key and the
/// certificate belong together, connects (with the certificate as TLS client
/// certificate while it is valid, anonymously otherwise), subscribes to the
/// renew reply topics and runs the agent until it reports an outcome or
/// `options.timeout` passes.
pub async fn renew(options: &RenewOptions) -> Result<Renewed, SimError> {
    let target = session::Target::new(&options.broker, &options.device_id, options.timeout)?;
    let chain = certificates(&options.certificate_pem).map_err(SimError::Identity)?;
    let current = idgate_pki::ca::summarize(&chain[0])
        .map_err(|e| SimError::Identity(format!("current certificate: {e}")))?;
    let key_store = SoftKeyStore::from_current_key_pem(&options.key_pem)
        .map_err(|e| SimError::Identity(format!("current key: {e}")))?;
    let spki = idgate_pki::der::certificate_spki(&chain[0])
        .map_err(|e| SimError::Identity(format!("current certificate: {e}")))?;
    if spki != p256_spki(&key_store.public_key(KeySlot::Current)?) {
        return Err(SimError::Identity(
            "the key does not belong to the certificate".to_owned(),
        ));
    }

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let client_certificate =
        !options.anonymous && (current.not_before..=current.not_after).contains(&now);
    let tls = if client_certificate {
        client_config_with_certificate(
            &options.ca_pem,
            &options.certificate_pem,
            options.key_pem.as_bytes(),
        )?
    } else {
        tracing::info!(
            serial = %current.serial,
            not_after = current.not_after,
            "certificate expired by the local clock: renewing anonymously"
        );
        client_config(&options.ca_pem)?
    };
    let roots = crate::tls::pinned_roots(&options.ca_pem)?;
    let pinned_roots: Vec<&[u8]> = roots.iter().map(Vec::as_slice).collect();
    let config = RenewConfig {
        device_id: &options.device_id,
        serial: &current.serial,
        counter: options.counter,
        retry: options.retry,
        pinned_roots: &pinned_roots,
    };
    let certified = session::run(&target, tls, |now_ms, rid| {
        Renewal::start(&config, key_store, rid, now_ms)
    })
    .await?;
    Ok(Renewed {
        certified,
        previous_serial: current.serial,
        counter: options.counter,
        client_certificate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_hide_the_key() {
        let options = RenewOptions::new("h:1", "", "d", "s3cret-key", "", 1);
        assert!(!format!("{options:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn unusable_identities_fail_before_connecting() {
        let mut store = SoftKeyStore::new();
        store.generate_next().unwrap();
        store.promote_next().unwrap();
        let key_pem = store.current_key_pem().unwrap().to_string();
        let mut gateway = crate::FakeGateway::new("t");
        let public_key = store.public_key(KeySlot::Current).unwrap();
        let (certificate, _) = gateway.issue("d", &public_key, (0, i64::from(u32::MAX)));
        let certificate_pem = crate::pem::certificates([certificate.as_slice()]);
        let (other, _) = gateway.issue("d", &[&[4u8][..], &[1; 64]].concat(), (0, 1));
        let other_pem = crate::pem::certificates([other.as_slice()]);

        let options = |key: &str, certificate: &str| {
            RenewOptions::new("127.0.0.1:1", gateway.ca_pem(), "d", key, certificate, 1)
        };
        for (options, expected) in [
            (options(&key_pem, ""), "no CERTIFICATE"),
            (options("", &certificate_pem), "current key"),
            (options(&key_pem, &other_pem), "does not belong"),
        ] {
            match renew(&options).await {
                Err(SimError::Identity(why)) => assert!(why.contains(expected), "{why}"),
                other => panic!("expected an identity error, got {other:?}"),
            }
        }
    }
}
