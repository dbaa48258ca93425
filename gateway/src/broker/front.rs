//! The front door: TLS termination for MQTT clients, in front of rumqttd.
//!
//! One accept loop spawns a task per connection, so a client that never
//! finishes its handshake holds up nobody else; handshakes have a timeout and
//! a cap on how many run at once. After the handshake the first MQTT packet
//! (CONNECT) is read to learn the protocol level, and the connection is relayed
//! to rumqttd's 3.1.1 or 5 listener on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::embedded::Upstream;

/// Front door limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time a client has to finish TLS and send CONNECT.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; further connections wait their turn
    /// (their own timeout still runs).
    pub max_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 512,
        }
    }
}

/// The TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrontError {
    /// A certificate or key file is unreadable or malformed.
    #[error("{0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The listen address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Builds the server TLS configuration (TLS 1.2 and 1.3, ring) from a PEM
/// certificate chain and key.
pub fn server_config(chain_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, FrontError> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| FrontError::Pem(format!("TLS certificate: {e}")))?;
    if chain.is_empty() {
        return Err(FrontError::Pem(
            "TLS certificate file has no certificate".into(),
        ));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| FrontError::Pem(format!("TLS key: {e}")))?
        .ok_or_else(|| FrontError::Pem("TLS key file has no private key".into()))?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Binds the MQTT/TLS listener.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, FrontError> {
    TcpListener::bind(address)
        .await
        .map_err(|e| FrontError::Bind(address, e))
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    upstream: Upstream,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors, typically: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let handshakes = handshakes.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(reason) =
                connection(stream, acceptor, handshakes, upstream, limits, shutdown).await
            {
                debug!(%peer, %reason, "connection closed");
            }
        });
    }
    info!("MQTT front stopped accepting");
}

async fn connection(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    handshakes: Arc<Semaphore>,
    upstream: Upstream,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let started = async {
        let _turn = handshakes
            .acquire()
            .await
            .map_err(|_| "shutting down".to_owned())?;
        let mut tls = acceptor
            .accept(stream)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let connect = read_connect(&mut tls).await?;
        Ok::<_, String>((tls, connect))
    };
    let (mut tls, connect) = tokio::time::timeout(limits.handshake_timeout, started)
        .await
        .map_err(|_| "handshake timed out".to_owned())??;
    let target = match connect.level {
        5 => upstream.v5,
        _ => upstream.v4,
    };
    let mut broker = TcpStream::connect(target)
        .await
        .map_err(|e| format!("broker unreachable: {e}"))?;
    let _ = broker.set_nodelay(true);
    broker
        .write_all(&connect.bytes)
        .await
        .map_err(|e| format!("broker write: {e}"))?;
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut tls, &mut broker) => {
            result.map(|_| ()).map_err(|e| format!("relay: {e}"))
        }
        _ = shutdown.wait_for(|stop| *stop) => Ok(()),
    }
}

/// The start of a connection: the whole CONNECT packet and its protocol level.
struct Connect {
    bytes: Vec<u8>,
    level: u8,
}

/// Largest CONNECT packet accepted (client id, credentials, will message).
const MAX_CONNECT: usize = 64 * 1024;

/// Reads the first MQTT packet, which must be CONNECT, without interpreting
/// more than the protocol level.
async fn read_connect(stream: &mut (impl AsyncRead + Unpin)) -> Result<Connect, String> {
    let mut bytes = vec![0u8; 1];
    stream
        .read_exact(&mut bytes[..1])
        .await
        .map_err(|e| format!("reading CONNECT: {e}"))?;
    if bytes[0] != 0x10 {
        return Err(format!("first packet is not CONNECT (0x{:02x})", bytes[0]));
    }
    let mut remaining = 0usize;
    for shift in 0..4 {
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| format!("reading CONNECT: {e}"))?;
        bytes.push(byte[0]);
        remaining |= usize::from(byte[0] & 0x7f) << (7 * shift);
        if byte[0] & 0x80 == 0 {
            break;
        }
        if shift == 3 {
            return Err("malformed remaining length".into());
        }
    }
    if remaining > MAX_CONNECT {
        return Err("CONNECT too large".into());
    }
    let header_len = bytes.len();
    bytes.resize(header_len + remaining, 0);
    stream
        .read_exact(&mut bytes[header_len..])
        .await
        .map_err(|e| format!("reading CONNECT: {e}"))?;
    let variable = &bytes[header_len..];
    // Protocol name (2-byte length + "MQTT"), then the level byte.
    let name_len = variable
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or("CONNECT too short")?;
    let level = *variable.get(2 + name_len).ok_or("CONNECT too short")?;
    Ok(Connect { bytes, level })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_the_protocol_level_of_connect() {
        // MQTT 3.1.1 CONNECT, client id "a".
        let v4 = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'a',
        ];
        let connect = read_connect(&mut &v4[..]).await.unwrap();
        assert_eq!(connect.level, 4);
        assert_eq!(connect.bytes, v4);
        let mut v5 = v4.to_vec();
        v5[8] = 5;
        assert_eq!(read_connect(&mut &v5[..]).await.unwrap().level, 5);

        for bad in [
            &[0x30, 0][..],
            &[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f],
            &[0x10, 5, 0, 4, b'M'],
            &[0x10, 2, 0, 9],
            &[],
        ] {
            assert!(read_connect(&mut &bad[..]).await.is_err(), "{bad:?}");
        }
    }
}
