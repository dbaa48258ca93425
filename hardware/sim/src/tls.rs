//! The simulator's side of TLS: which server to trust (only the CA file we were
//! given), what name to check (the host part of the broker address, which may
//! be an IP address), and which client certificate to present, if any.

use std::sync::Arc;

use rustls::client::WantsClientCert;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ConfigBuilder, RootCertStore};

use crate::SimError;

/// A broker address split into host and port; the host is valid as a TLS
/// server name (a DNS name or an IP address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAddress {
    /// DNS name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl BrokerAddress {
    /// Parses `HOST:PORT`, with IPv6 literals in brackets (`[::1]:8883`).
    pub fn parse(address: &str) -> Result<BrokerAddress, SimError> {
        let bad = || SimError::BadBroker(address.to_owned());
        let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
        let host = match host.strip_prefix('[') {
            Some(inner) => inner.strip_suffix(']').ok_or_else(bad)?,
            None if host.contains(':') => return Err(bad()),
            None => host,
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        ServerName::try_from(host).map_err(|_| bad())?;
        Ok(BrokerAddress {
            host: host.to_owned(),
            port,
        })
    }
}

/// A rustls client configuration that trusts exactly the certificates in
/// `ca_pem` (every one of them, so a bundle covering a CA rollover works) and
/// presents no client certificate.
pub fn client_config(ca_pem: &[u8]) -> Result<Arc<ClientConfig>, SimError> {
    Ok(Arc::new(trusting(ca_pem)?.with_no_client_auth()))
}

/// Like [`client_config`], presenting `certificate_pem` (the device certificate
/// first, then any issuers to send along) with the private key in `key_pem`
/// (PKCS#8) as the client certificate: mutual TLS.
pub fn client_config_with_certificate(
    ca_pem: &[u8],
    certificate_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<ClientConfig>, SimError> {
    let chain = certificates(certificate_pem).map_err(SimError::Identity)?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| SimError::Identity(format!("unreadable key PEM: {e}")))?
        .ok_or_else(|| SimError::Identity("no PRIVATE KEY in the key PEM".to_owned()))?;
    Ok(Arc::new(
        trusting(ca_pem)?.with_client_auth_cert(chain, key)?,
    ))
}

/// The `CERTIFICATE` blocks of a PEM text, in order; at least one.
pub(crate) fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("unreadable PEM: {e}"))?;
    if certificates.is_empty() {
        return Err("no CERTIFICATE in the PEM".to_owned());
    }
    Ok(certificates)
}

/// The roots the device pins for its certificate chain: the first
/// [`MAX_PINNED_ROOTS`](idgate_agent::MAX_PINNED_ROOTS) certificates of the CA
/// PEM, which the simulated device trusts for TLS as well.
pub(crate) fn pinned_roots(ca_pem: &[u8]) -> Result<Vec<Vec<u8>>, SimError> {
    Ok(certificates(ca_pem)
        .map_err(SimError::Ca)?
        .into_iter()
        .take(idgate_agent::MAX_PINNED_ROOTS)
        .map(|certificate| certificate.to_vec())
        .collect())
}

/// A configuration builder that trusts the CAs in `ca_pem`. The crypto provider
/// is chosen here rather than taken from a process default, so the simulator
/// behaves the same whatever else is linked in.
fn trusting(ca_pem: &[u8]) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, SimError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(ca_pem).map_err(SimError::Ca)? {
        roots
            .add(certificate)
            .map_err(|e| SimError::Ca(format!("unusable CA certificate: {e}")))?;
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses() {
        let ok = |s: &str, host: &str, port| {
            assert_eq!(
                BrokerAddress::parse(s).unwrap(),
                BrokerAddress {
                    host: host.to_owned(),
                    port
                }
            )
        };
        ok("localhost:8883", "localhost", 8883);
        ok("127.0.0.1:1", "127.0.0.1", 1);
        ok("[::1]:8883", "::1", 8883);
        ok("gw.example.com:443", "gw.example.com", 443);
        for bad in [
            "localhost",
            ":8883",
            "host:0",
            "host:65536",
            "::1:8883",
            "[::1:8883",
            "bad host:1",
        ] {
            assert!(BrokerAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ca_files_need_a_certificate() {
        assert!(matches!(client_config(b""), Err(SimError::Ca(_))));
        assert!(matches!(
            client_config(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            Err(SimError::Ca(_))
        ));
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let bundle = format!("{}{}", ca.pem(), ca.pem());
        client_config(bundle.as_bytes()).unwrap();
    }
}
