//! One device's enrollment over a real MQTT connection, and what a finished
//! request leaves the device with ([`Enrolled`], also the result of a renewal).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use idgate_agent::{Config, Enrollment, RetryPolicy};
use p256::elliptic_curve::zeroize::Zeroizing;

use crate::SimError;
use crate::files::replace_file;
use crate::keystore::SoftKeyStore;
use crate::pem;
use crate::session;
use crate::tls::client_config;

/// What [`enroll`] needs.
#[derive(Clone)]
pub struct EnrollOptions {
    /// `HOST:PORT` of the gateway's MQTT front (TLS).
    pub broker: String,
    /// PEM with the CA certificate(s) to trust for the broker's TLS certificate;
    /// the first two are also the roots the device pins for its certificate chain.
    pub ca_pem: Vec<u8>,
    /// The device id registered at the gateway; also the MQTT client id.
    pub device_id: String,
    /// The one-time enrollment token.
    pub token: String,
    /// How long to try, from the first connection attempt to the certificate.
    pub timeout: Duration,
    /// The agent's retransmission policy.
    pub retry: RetryPolicy,
}

impl EnrollOptions {
    /// Options with a 60 s timeout and the agent's default retry policy.
    pub fn new(
        broker: impl Into<String>,
        ca_pem: impl Into<Vec<u8>>,
        device_id: impl Into<String>,
        token: impl Into<String>,
    ) -> EnrollOptions {
        EnrollOptions {
            broker: broker.into(),
            ca_pem: ca_pem.into(),
            device_id: device_id.into(),
            token: token.into(),
            timeout: Duration::from_secs(60),
            retry: RetryPolicy::DEFAULT,
        }
    }
}

impl fmt::Debug for EnrollOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollOptions")
            .field("broker", &self.broker)
            .field("device_id", &self.device_id)
            .field("token", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// A finished enrollment or renewal: the new key and what the gateway sent for it.
#[derive(Clone)]
pub struct Enrolled {
    /// The request id used.
    pub rid: String,
    /// The device's new private key, PKCS#8 PEM.
    pub key_pem: Zeroizing<String>,
    /// The device certificate, DER.
    pub certificate: Vec<u8>,
    /// The issuer certificates, DER, issuer of `certificate` first.
    pub chain: Vec<Vec<u8>>,
    /// Certificate serial, lowercase hex.
    pub serial: String,
    /// Validity start, unix seconds.
    pub not_before: u64,
    /// Validity end, unix seconds.
    pub not_after: u64,
    /// The gateway's clock when it answered, unix seconds.
    pub gateway_time: u64,
    /// Suggested renewal window start, unix seconds.
    pub renew_after: u64,
    /// Suggested renewal window end, unix seconds.
    pub renew_before: u64,
    /// How many times the request was sent.
    pub attempts: u32,
}

impl fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrolled")
            .field("rid", &self.rid)
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain", &self.chain.len())
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl Enrolled {
    /// The device certificate as PEM.
    pub fn certificate_pem(&self) -> String {
        pem::certificates([self.certificate.as_slice()])
    }

    /// The chain as PEM, issuer first.
    pub fn chain_pem(&self) -> String {
        pem::certificates(self.chain.iter().map(Vec::as_slice))
    }

    /// Writes `key.pem` (mode 0600), `cert.pem` and `chain.pem` into `dir`,
    /// creating it if needed. Each file is replaced atomically, the key first;
    /// the three together are not (see the crate's limitations).
    pub fn write_files(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        replace_file(&dir.join("key.pem"), self.key_pem.as_bytes(), true)?;
        replace_file(
            &dir.join("cert.pem"),
            self.certificate_pem().as_bytes(),
            false,
        )?;
        replace_file(&dir.join("chain.pem"), self.chain_pem().as_bytes(), false)
    }
}

/// Enrolls one simulated device: connects over TLS (MQTT 3.1.1, client id =
/// device id), subscribes to the reply topics, and runs the agent until it
/// reports an outcome or `options.timeout` passes.
pub async fn enroll(options: &EnrollOptions) -> Result<Enrolled, SimError> {
    let target = session::Target::new(&options.broker, &options.device_id, options.timeout)?;
    let tls = client_config(&options.ca_pem)?;
    let roots = crate::tls::pinned_roots(&options.ca_pem)?;
    let pinned_roots: Vec<&[u8]> = roots.iter().map(Vec::as_slice).collect();
    let config = Config {
        device_id: &options.device_id,
        token: options.token.as_bytes(),
        retry: options.retry,
        pinned_roots: &pinned_roots,
    };
    session::run(&target, tls, |now_ms, rid| {
        Enrollment::start(&config, SoftKeyStore::new(), rid, now_ms)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_hide_the_token() {
        let options = EnrollOptions::new("h:1", "", "d", "s3cret-token");
        assert!(!format!("{options:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn bad_options_fail_before_connecting() {
        let mut options = EnrollOptions::new("nohost", "", "d", "t");
        assert!(matches!(
            enroll(&options).await,
            Err(SimError::BadBroker(_))
        ));
        options.broker = "127.0.0.1:1".into();
        assert!(matches!(enroll(&options).await, Err(SimError::Ca(_))));
        options.device_id = "-bad".into();
        assert!(matches!(enroll(&options).await, Err(SimError::Agent(_))));
    }

    #[test]
    fn files_are_written_with_a_private_key_mode() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("new/sub");
        let enrolled = Enrolled {
            rid: "r".into(),
            key_pem: Zeroizing::new("-----BEGIN PRIVATE KEY-----\n".into()),
            certificate: vec![0x30, 0x00],
            chain: vec![vec![0x30, 0x01, 0x00], vec![0x30, 0x00]],
            serial: "01".into(),
            not_before: 0,
            not_after: 1,
            gateway_time: 0,
            renew_after: 0,
            renew_before: 1,
            attempts: 1,
        };
        enrolled.write_files(&out).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(out.join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let chain = std::fs::read_to_string(out.join("chain.pem")).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        assert_eq!(
            std::fs::read_to_string(out.join("cert.pem")).unwrap(),
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n"
        );
    }
}
