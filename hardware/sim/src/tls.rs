//! The simulator's side of TLS: which server to trust (only the CA file we were
//! given) and what name to check (the host part of the broker address, which may
//! be an IP address).

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};

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
/// `ca_pem` (every one of them, so a bundle covering a CA rollover works). The
/// crypto provider is chosen here rather than taken from a process default, so
/// the simulator behaves the same whatever else is linked in.
pub fn client_config(ca_pem: &[u8]) -> Result<Arc<ClientConfig>, SimError> {
    let mut roots = RootCertStore::empty();
    let mut reader = ca_pem;
    for certificate in rustls_pemfile::certs(&mut reader) {
        let certificate = certificate.map_err(|e| SimError::Ca(format!("unreadable PEM: {e}")))?;
        roots
            .add(certificate)
            .map_err(|e| SimError::Ca(format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(SimError::Ca("no CERTIFICATE in the CA file".to_owned()));
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
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
