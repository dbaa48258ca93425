//! The front door: TLS termination for MQTT clients, in front of rumqttd.
//!
//! One accept loop spawns a task per connection, so a client that never
//! finishes its handshake holds up nobody else. A connection takes a
//! handshake slot only once its first bytes arrive (a silent client holds
//! nothing but a socket until its timeout), and handshakes have a timeout and
//! a cap on how many run at once.
//!
//! Client certificates are verified against the issuing CA and the current
//! CRL (the configuration is swapped without a restart when revocation state
//! changes). A verified device may use only its own topics; a client without
//! a certificate only the enrollment and renewal topics ([`super::guard`]).
//! Past `max_connections`, new clients get an explicit CONNACK "server busy".
//! The first MQTT packet (CONNECT) picks rumqttd's 3.1.1 or 5 listener.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::direct;
use super::embedded::Upstream;
use super::guard::{self, Guard, Identity};

/// Front door limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time a client has to finish TLS and send CONNECT.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; further clients wait their turn
    /// (their own timeout still runs).
    pub max_handshakes: usize,
    /// Connections at once; beyond, CONNACK "server busy".
    pub max_connections: usize,
    /// Topic filters one connection may hold at once; beyond, the
    /// connection is closed (MQTT 5: DISCONNECT 0x97, quota exceeded).
    pub max_subscriptions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 512,
            max_connections: 100_000,
            max_subscriptions: guard::DEFAULT_MAX_SUBSCRIPTIONS,
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
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The listen address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// The parts of the server TLS configuration that do not change.
#[derive(Debug)]
pub struct TlsMaterial {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Arc<RootCertStore>,
}

impl TlsMaterial {
    /// The server's PEM certificate chain and key, and the DER certificate of
    /// the CA whose device certificates are accepted as client certificates.
    pub fn from_pem(
        chain_pem: &str,
        key_pem: &str,
        client_ca: &[u8],
    ) -> Result<TlsMaterial, FrontError> {
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| FrontError::Pem(format!("TLS certificate: {e}")))?;
        if chain.is_empty() {
            return Err(FrontError::Pem(
                "TLS certificate file has no certificate".into(),
            ));
        }
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|e| FrontError::Pem(format!("TLS key: {e}")))?
            .ok_or_else(|| FrontError::Pem("TLS key file has no private key".into()))?;
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(client_ca.to_vec()))?;
        Ok(TlsMaterial {
            chain,
            key,
            client_roots: Arc::new(roots),
        })
    }

    /// A server configuration (TLS 1.2 and 1.3, ring) that asks for a client
    /// certificate, accepts clients without one, and checks those that send
    /// one against the issuing CA and `crl`.
    pub fn server_config(&self, crl: &[u8]) -> Result<Arc<ServerConfig>, FrontError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(
            self.client_roots.clone(),
            provider.clone(),
        )
        .with_crls([CertificateRevocationListDer::from(crl.to_vec())])
        .only_check_end_entity_revocation()
        .allow_unauthenticated()
        .build()?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

/// Binds the MQTT/TLS listener.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, FrontError> {
    TcpListener::bind(address)
        .await
        .map_err(|e| FrontError::Bind(address, e))
}

/// A live connection authenticated by a device certificate.
#[derive(Debug)]
struct Live {
    device_id: String,
    serial: String,
    close: watch::Sender<bool>,
}

/// The connections in progress, so that a revoked certificate's sessions can
/// be closed at once.
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<u64, Live>>,
    next_id: AtomicU64,
    connections: AtomicUsize,
    broker_links: AtomicUsize,
    /// Devices that connected or disconnected since [`Sessions::take_seen`],
    /// and when (see [`super::presence`]).
    seen: Mutex<HashMap<String, i64>>,
    /// The connection holding each MQTT client id. A new connection with the
    /// same id closes the old one (MQTT 3.1.1 and 5, §3.1.4; an MQTT 5 one
    /// is told why first, see [`ToClient::relay`]): rumqttd does that for
    /// the connections it sees, but a connection that never needed rumqttd
    /// is known only here.
    clients: Mutex<HashMap<String, (u64, watch::Sender<bool>)>>,
}

impl Sessions {
    /// Closes every session whose certificate serial is in `revoked`;
    /// returns how many.
    pub fn close_revoked(&self, revoked: &HashSet<String>) -> usize {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for session in live.values().filter(|s| revoked.contains(&s.serial)) {
            info!(device_id = %session.device_id, serial = %session.serial, "closing the session of a revoked certificate");
            session.close.send_replace(true);
            closed += 1;
        }
        closed
    }

    /// Live sessions of `device_id` (authenticated by certificate).
    pub fn device_sessions(&self, device_id: &str) -> usize {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.values().filter(|s| s.device_id == device_id).count()
    }

    /// All connections past their handshake.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Connections that hold a loopback link to rumqttd.
    pub fn broker_links(&self) -> usize {
        self.broker_links.load(Ordering::Relaxed)
    }

    pub(crate) fn register(&self, device_id: &str, serial: &str) -> (u64, watch::Receiver<bool>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = watch::channel(false);
        self.mark_seen(device_id);
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.insert(
            id,
            Live {
                device_id: device_id.to_owned(),
                serial: serial.to_owned(),
                close,
            },
        );
        (id, closed)
    }

    pub(crate) fn unregister(&self, id: u64) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(gone) = live.remove(&id) {
            drop(live);
            self.mark_seen(&gone.device_id);
        }
    }

    /// Takes `client_id` for a new connection, closing the connection that
    /// held it; returns the claim and its "taken over" signal.
    fn claim_client_id(&self, client_id: &str) -> (u64, watch::Receiver<bool>) {
        let claim = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (taken, taken_over) = watch::channel(false);
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, previous)) = clients.insert(client_id.to_owned(), (claim, taken)) {
            previous.send_replace(true);
        }
        (claim, taken_over)
    }

    /// Gives `client_id` up, unless a newer connection has taken it.
    fn release_client_id(&self, client_id: &str, claim: u64) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients
            .get(client_id)
            .is_some_and(|(held, _)| *held == claim)
        {
            clients.remove(client_id);
        }
    }

    fn mark_seen(&self, device_id: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.insert(device_id.to_owned(), crate::registry::now());
    }

    /// The devices seen since the last call, and when; with `live`, also
    /// every device connected now, seen at `now`.
    pub fn take_seen(&self, live: bool, now: i64) -> Vec<(String, i64)> {
        let mut seen = std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()));
        if live {
            let connected = self.live.lock().unwrap_or_else(|e| e.into_inner());
            for session in connected.values() {
                seen.insert(session.device_id.clone(), now);
            }
        }
        let mut seen: Vec<_> = seen.into_iter().collect();
        seen.sort_unstable();
        seen
    }
}

/// Counts a connection for as long as it lives.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything a connection task needs.
#[derive(Clone)]
pub struct Front {
    /// The current TLS configuration (swapped on revocation changes).
    pub tls: watch::Receiver<Arc<ServerConfig>>,
    /// Where rumqttd listens.
    pub upstream: Upstream,
    /// Limits.
    pub limits: Limits,
    /// Live sessions.
    pub sessions: Arc<Sessions>,
    /// Serials revoked right now (checked again after the handshake, which
    /// may have used a configuration from just before a revocation).
    pub revoked: watch::Receiver<Arc<HashSet<String>>>,
    handshakes: Arc<Semaphore>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Front {
    /// A front door with these parts.
    pub fn new(
        tls: watch::Receiver<Arc<ServerConfig>>,
        upstream: Upstream,
        limits: Limits,
        sessions: Arc<Sessions>,
        revoked: watch::Receiver<Arc<HashSet<String>>>,
    ) -> Front {
        Front {
            tls,
            upstream,
            limits,
            sessions,
            revoked,
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
        }
    }
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(listener: TcpListener, front: Front, mut shutdown: watch::Receiver<bool>) {
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
        let front = front.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(reason) = connection(stream, &front, shutdown).await {
                debug!(%peer, %reason, "connection closed");
            }
        });
    }
    info!("MQTT front stopped accepting");
}

/// Who a verified client certificate names: a device (SAN URI
/// `urn:idgate:device:{id}`) or a line station (`urn:idgate:station:{id}`),
/// a label for logs and session lookups (the device id, or `station:{id}`),
/// and its serial.
fn certificate_identity(der: &[u8]) -> Option<(Identity, String, String)> {
    let (_, certificate) = X509Certificate::from_der(der).ok()?;
    let san = certificate.subject_alternative_name().ok()??;
    let serial = idgate_pki::ca::hex(certificate.raw_serial());
    san.value.general_names.iter().find_map(|name| {
        let GeneralName::URI(uri) = name else {
            return None;
        };
        if let Some(device_id) = uri.strip_prefix("urn:idgate:device:") {
            idgate_pki::protocol::check_device_id(device_id).ok()?;
            return Some((
                Identity::Device(device_id.to_owned()),
                device_id.to_owned(),
                serial.clone(),
            ));
        }
        let station_id = uri.strip_prefix(idgate_pki::station::STATION_URI_PREFIX)?;
        idgate_pki::protocol::check_device_id(station_id).ok()?;
        Some((
            Identity::Station(station_id.to_owned()),
            format!("station:{station_id}"),
            serial.clone(),
        ))
    })
}

async fn connection(
    stream: TcpStream,
    front: &Front,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let limits = front.limits;
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    let started = async {
        // A client that sends nothing takes no handshake slot.
        stream
            .readable()
            .await
            .map_err(|e| format!("socket: {e}"))?;
        let _turn = front
            .handshakes
            .acquire()
            .await
            .map_err(|_| "shutting down".to_owned())?;
        let acceptor = TlsAcceptor::from(front.tls.borrow().clone());
        let mut tls = acceptor
            .accept(stream)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let connect = read_connect(&mut tls).await?;
        Ok::<_, String>((tls, connect))
    };
    let (tls, connect) = tokio::time::timeout_at(deadline, started)
        .await
        .map_err(|_| "handshake timed out".to_owned())??;

    let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => None,
        Some(leaf) => Some(
            certificate_identity(leaf).ok_or("client certificate names no device or station")?,
        ),
    };
    session(tls, connect, identity, front, shutdown).await
}

/// One connection past its handshake: `tls`, the decrypted stream, has
/// delivered `connect`; `identity` is what the client certificate names (its
/// identity, label and serial), `None` without one.
async fn session(
    mut tls: impl AsyncRead + tokio::io::AsyncWrite + Unpin,
    connect: Connect,
    identity: Option<(Identity, String, String)>,
    front: &Front,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let limits = front.limits;
    let guard_identity = match &identity {
        Some((identity, _, _)) => identity.clone(),
        None => Identity::Anonymous,
    };

    front.sessions.connections.fetch_add(1, Ordering::Relaxed);
    let _counted = Counted(&front.sessions.connections);
    if front.sessions.connections() > limits.max_connections {
        let _ = tls.write_all(&busy_connack(connect.level)).await;
        let _ = tls.shutdown().await;
        return Err("server busy".into());
    }
    let connect_bytes = match guard::admit_connect(&guard_identity, &connect.bytes) {
        Ok(bytes) => bytes,
        Err(refusal) => {
            if let Some(connack) = guard::connack_refusal(connect.level, &refusal) {
                let _ = tls.write_all(&connack).await;
            }
            let _ = tls.shutdown().await;
            return Err(format!("CONNECT refused: {refusal}"));
        }
    };

    let terms = guard::session_terms(&connect_bytes).map_err(|e| format!("CONNECT: {e}"))?;
    let (claim, mut taken_over) = front.sessions.claim_client_id(&terms.client_id);
    let registration = identity
        .as_ref()
        .map(|(_, label, serial)| (front.sessions.register(label, serial), serial.clone()));
    // Anonymous sessions are never closed for revocation; their sender lives
    // as long as the connection so the receiver never reports it gone.
    let (_never, unrevocable) = watch::channel(false);
    let result = async {
        let mut closed = match &registration {
            Some(((_, closed), serial)) => {
                if front.revoked.borrow().contains(serial) {
                    return Err("certificate revoked".to_owned());
                }
                closed.clone()
            }
            None => unrevocable,
        };
        // A clean MQTT 3.1.1 session without a will leaves rumqttd nothing
        // to keep: its link is opened when the client first sends something
        // only rumqttd serves, and a device that only enrolls or renews
        // never costs one (two sockets, rumqttd's buffers and tasks). MQTT 5
        // clients get rumqttd's own CONNACK, whose properties describe it.
        // A clean connection of a client id whose persistent session
        // rumqttd may still hold must reach rumqttd, which then discards it.
        let held = front
            .upstream
            .direct
            .note_session(&terms.client_id, terms.persistent);
        let lazy = connect.level == 4 && !terms.stateful && !held;
        let (reader_tx, reader_rx) = tokio::sync::oneshot::channel();
        let mut reader_tx = Some(reader_tx);
        let mut broker_write = None;
        if lazy {
            write_client(&mut tls, &[0x20, 0x02, 0x00, 0x00]).await?;
            flush_client(&mut tls).await?;
        } else {
            let (read, write) = open_upstream(front, connect.level, &connect_bytes).await?;
            if let Some(reader_tx) = reader_tx.take() {
                let _ = reader_tx.send(read);
            }
            broker_write = Some(write);
        }
        let (mut client_read, mut client_write) = tokio::io::split(tls);
        let mut guard = Guard::new(guard_identity, connect.level)
            .with_max_subscriptions(limits.max_subscriptions);
        let mut refused = None;
        let (refuse, refused_rx) = watch::channel(None);
        // Reply subscriptions are held here, not in rumqttd, and requests go
        // to the service directly (see `direct`); the SUBACKs, PUBACKs and
        // replies come through `direct_rx`.
        let (direct_tx, direct_rx) = tokio::sync::mpsc::channel(direct::QUEUE);
        let mut routes = direct::ConnectionRoutes::new(
            &front.upstream.direct,
            connect.level,
            direct_tx.clone(),
            terms.persistent,
        )
        .with_max_packet_size(terms.max_packet_size);
        let broker_acks = routes.broker_acks();
        // Without rumqttd, the front enforces the keep-alive (1.5 times the
        // interval, as a broker does).
        let idle_limit = (terms.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(terms.keep_alive) * 1500));
        let waiting = Arc::new(Semaphore::new(WAITING_REQUESTS));
        let inbound = async {
            let mut buffer = vec![0u8; RELAY_BUFFER];
            let mut forward = Vec::new();
            let mut to_broker = Vec::new();
            let mut answers = Vec::new();
            let mut requests = Vec::new();
            loop {
                let read = client_read.read(&mut buffer);
                let n = match idle_limit.filter(|_| broker_write.is_none()) {
                    Some(limit) => tokio::time::timeout(limit, read)
                        .await
                        .map_err(|_| "keep-alive expired".to_owned())?,
                    None => read.await,
                }
                .map_err(|e| format!("client read: {e}"))?;
                if n == 0 {
                    return Ok::<_, String>(());
                }
                forward.clear();
                let fed = guard.feed(&buffer[..n], &mut forward);
                to_broker.clear();
                routes.route(&forward, &mut to_broker, &mut answers, &mut requests);
                let mut disconnect = false;
                if broker_write.is_none() && !to_broker.is_empty() && fed.is_ok() {
                    match direct::answer_locally(&to_broker, &mut answers) {
                        direct::Local::NeedsBroker => {
                            let (read, write) = open_upstream_lazily(front, &connect_bytes).await?;
                            if let Some(reader_tx) = reader_tx.take() {
                                let _ = reader_tx.send(read);
                            }
                            broker_write = Some(write);
                        }
                        direct::Local::Answered => to_broker.clear(),
                        direct::Local::Disconnect => {
                            to_broker.clear();
                            disconnect = true;
                        }
                    }
                }
                for answer in answers.drain(..) {
                    direct_tx
                        .send(answer)
                        .await
                        .map_err(|_| "connection closing".to_owned())?;
                }
                for request in requests.drain(..) {
                    let service = &front.upstream.requests;
                    match service.try_send(request.message) {
                        Ok(()) => {}
                        Err(TrySendError::Closed(_)) => {
                            return Err("the service has stopped".to_owned());
                        }
                        // The service is behind (a registry stall, a storm):
                        // a few requests of this connection wait on their
                        // own, so that it still reads — and answers PINGREQ
                        // — instead of dropping devices whose keep-alive is
                        // short. Past that, the connection waits too.
                        Err(TrySendError::Full(message)) => {
                            let turn = waiting
                                .clone()
                                .acquire_owned()
                                .await
                                .map_err(|_| "connection closing".to_owned())?;
                            let service = service.clone();
                            tokio::spawn(async move {
                                let _ = service.send(message).await;
                                drop(turn);
                            });
                        }
                    }
                    // Only now is the request the service's (in its queue,
                    // or with a task of its own that outlives the
                    // connection): a request dropped while the connection
                    // waited for a turn (taken over, revoked, shut down)
                    // is never acknowledged, and the client sends it again.
                    if let Some(puback) = request.puback {
                        direct_tx
                            .send(puback)
                            .await
                            .map_err(|_| "connection closing".to_owned())?;
                    }
                }
                let writer = broker_write.as_mut();
                if let Err(refusal) = fed {
                    // Forward what was allowed before the violation, then stop.
                    if let Some(writer) = writer {
                        let _ = writer.write.write_all(&to_broker).await;
                    }
                    let reason = format!("guard: {refusal}");
                    refused = Some(refusal);
                    return Err(reason);
                }
                if let Some(writer) = writer {
                    writer
                        .write
                        .write_all(&to_broker)
                        .await
                        .map_err(|e| format!("broker write: {e}"))?;
                }
                if disconnect {
                    return Ok(());
                }
            }
        };
        // A lazy connection had the front's CONNACK already.
        let outbound = ToClient {
            direct: direct_rx,
            link: Some(reader_rx),
            boundaries: if lazy {
                direct::Boundaries::default()
            } else {
                direct::Boundaries::before_connack()
            },
            broker_acks,
            taken_over: taken_over.clone(),
            goodbye: guard::taken_over_packet(connect.level),
            refused: refused_rx,
        }
        .relay(&mut client_write);
        // A connection taken over reads nothing more from its client.
        let mut stop_reading = taken_over.clone();
        let inbound = async {
            tokio::select! {
                biased;
                () = turns_true(&mut stop_reading) => {}
                result = inbound => return result,
            }
            std::future::pending().await
        };
        let outcome = {
            tokio::pin!(outbound);
            // The outcome, whether `outbound` has a last packet to write
            // for the client, and whether it has ended (it is not polled
            // again then).
            let (outcome, mut last_packet, relay_ended) = tokio::select! {
                result = inbound => (result, false, false),
                result = &mut outbound => (result, false, true),
                _ = closed.wait_for(|close| *close) => {
                    (Err("certificate revoked".to_owned()), false, false)
                }
                // `outbound` saw it too: it tells an MQTT 5 client; a 3.1.1
                // one is closed at once.
                () = turns_true(&mut taken_over) => {
                    (Err(TAKEN_OVER.to_owned()), connect.level == 5, false)
                }
                _ = shutdown.wait_for(|stop| *stop) => (Ok(()), false, false),
            };
            // The connection is ending: it stops counting now, not once its
            // close is done (the last packet and the TLS close_notify may
            // take CLOSE_TIMEOUT each, to a client that does not read). A
            // newer connection that took the client id over holds a claim
            // and a registration of its own.
            front.sessions.release_client_id(&terms.client_id, claim);
            if let Some(((id, _), _)) = &registration {
                front.sessions.unregister(*id);
            }
            // A refused MQTT 5 client is told why by `outbound` too, which
            // writes the DISCONNECT where the front writes its own packets
            // (never inside one of rumqttd's) and ends then.
            if let Some(packet) = refused
                .as_ref()
                .and_then(|refusal| guard::disconnect_packet(connect.level, refusal))
            {
                refuse.send_replace(Some(packet));
                last_packet = true;
            }
            // A client that does not take its last packet within
            // CLOSE_TIMEOUT is closed without it.
            if last_packet && !relay_ended {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut outbound).await;
            }
            outcome
        };
        // The relay is gone; the client's write half is ours again.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, client_write.shutdown()).await;
        outcome
    }
    .await;
    // Again, for a connection that ended before relaying (both are no-ops
    // the second time).
    front.sessions.release_client_id(&terms.client_id, claim);
    if let Some(((id, _), _)) = registration {
        front.sessions.unregister(id);
    }
    result
}

/// Why a connection ends when a newer one takes its client id.
const TAKEN_OVER: &str = "a new connection took over the client id";

/// Why the client-bound relay ends when the guard refuses the connection.
const REFUSED: &str = "the connection was refused";

/// The last packet a client gets as its connection ends, and why it ends.
struct Leaving {
    packet: Vec<u8>,
    reason: &'static str,
}

/// The client-bound direction of a connection: rumqttd's bytes, once the
/// connection has a rumqttd link, and the front's own packets (SUBACKs,
/// PUBACKs, replies, the goodbye), each of those only between two of
/// rumqttd's.
struct ToClient {
    /// The front's packets for the client.
    direct: tokio::sync::mpsc::Receiver<Vec<u8>>,
    /// The read half of the rumqttd link, when it opens.
    link: Option<tokio::sync::oneshot::Receiver<tokio::net::tcp::OwnedReadHalf>>,
    /// Where rumqttd's packets begin and end.
    boundaries: direct::Boundaries,
    /// QoS 1 PUBLISHes sent to rumqttd that it has not acknowledged yet.
    broker_acks: Arc<AtomicUsize>,
    /// Turns true when a newer connection takes the client id over.
    taken_over: watch::Receiver<bool>,
    /// The last packet the client gets then (MQTT 5: DISCONNECT 0x8E);
    /// `None`: the relay stops at once.
    goodbye: Option<Vec<u8>>,
    /// Turns to the DISCONNECT telling the client why the guard refused
    /// its connection (MQTT 5): the last packet it gets, as for a takeover.
    refused: watch::Receiver<Option<Vec<u8>>>,
}

impl ToClient {
    /// Relays until rumqttd closes the link, a write to the client fails,
    /// or the connection is taken over or refused. Then the client gets
    /// the last packet (the goodbye, or the refusal's DISCONNECT) after
    /// what was queued for it and before anything rumqttd sends later: at
    /// the end of the packet of rumqttd's being written (never inside it,
    /// and never before rumqttd's CONNACK), after the front's packets
    /// already queued, flushed. The client gets nothing after it (MQTT 5
    /// §3.14.4). A link that ends inside a packet leaves no place for it:
    /// the client is then closed without one.
    async fn relay(
        mut self,
        client: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Result<(), String> {
        let mut buffer = vec![0u8; RELAY_BUFFER];
        let mut broker_read: Option<tokio::net::tcp::OwnedReadHalf> = None;
        let mut leaving: Option<Leaving> = None;
        loop {
            if let Some(last) = &leaving
                && self.boundaries.at_boundary()
            {
                while let Ok(packet) = self.direct.try_recv() {
                    write_client(client, &packet).await?;
                }
                write_client(client, &last.packet).await?;
                flush_client(client).await?;
                return Err(last.reason.to_owned());
            }
            let n = tokio::select! {
                biased;
                () = turns_true(&mut self.taken_over), if leaving.is_none() => {
                    let Some(packet) = self.goodbye.take() else {
                        return Err(TAKEN_OVER.to_owned());
                    };
                    leaving = Some(Leaving { packet, reason: TAKEN_OVER });
                    continue;
                }
                packet = refusal(&mut self.refused), if leaving.is_none() => {
                    leaving = Some(Leaving { packet, reason: REFUSED });
                    continue;
                }
                // A direct packet goes out only between two of rumqttd's.
                Some(packet) = self.direct.recv(), if self.boundaries.at_boundary() => {
                    write_client(client, &packet).await?;
                    while let Ok(packet) = self.direct.try_recv() {
                        write_client(client, &packet).await?;
                    }
                    flush_client(client).await?;
                    continue;
                }
                Some(read) = next_link(&mut self.link) => {
                    broker_read = Some(read);
                    continue;
                }
                n = read_broker(broker_read.as_mut(), &mut buffer) => n.map_err(|e| format!("broker read: {e}"))?,
            };
            if n == 0 {
                return match leaving {
                    Some(last) => Err(last.reason.to_owned()),
                    None => Ok(()),
                };
            }
            // rumqttd's sockets use Nagle's algorithm: it holds a reply
            // back until its previous small segment (the PUBACK of the
            // request, say) is acknowledged, and a delayed ACK from us
            // would make every reply wait ~40 ms. Acknowledge at once.
            if let Some(read) = &broker_read {
                let _ = socket2::SockRef::from(read.as_ref()).set_tcp_quickack(true);
            }
            // Packet by packet: a direct packet already queued (the
            // PUBACK of a request, say) goes out at the first boundary,
            // before anything rumqttd sent after it.
            let mut rest = &buffer[..n];
            while !rest.is_empty() {
                let (used, pubacks) = self.boundaries.advance_to_boundary(rest);
                if pubacks > 0 {
                    let _ =
                        self.broker_acks
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                                Some(v.saturating_sub(pubacks))
                            });
                }
                write_client(client, &rest[..used]).await?;
                rest = &rest[used..];
                if leaving.is_some() && self.boundaries.at_boundary() {
                    // The last packet is next; rumqttd's later packets are
                    // not sent.
                    break;
                }
                if self.boundaries.at_boundary() {
                    while let Ok(packet) = self.direct.try_recv() {
                        write_client(client, &packet).await?;
                    }
                }
            }
            flush_client(client).await?;
        }
    }
}

/// Waits until `signal` is true; if its sender goes first, for ever.
async fn turns_true(signal: &mut watch::Receiver<bool>) {
    if signal.wait_for(|on| *on).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The packet `signal` turns to; if its sender goes first, never.
async fn refusal(signal: &mut watch::Receiver<Option<Vec<u8>>>) -> Vec<u8> {
    loop {
        if let Some(packet) = signal.borrow_and_update().clone() {
            return packet;
        }
        if signal.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// The rumqttd link once the connection has one; after that (or if it never
/// comes), never.
async fn next_link<T>(slot: &mut Option<tokio::sync::oneshot::Receiver<T>>) -> Option<T> {
    let Some(receiver) = slot.as_mut() else {
        return std::future::pending().await;
    };
    let link = receiver.await.ok();
    *slot = None;
    link
}

/// Requests of one connection that may wait for room in the service's
/// queue while the connection goes on reading.
const WAITING_REQUESTS: usize = 4;

/// How long a client may take to accept what we write; a client that stops
/// reading is closed instead of holding its connection (and a slot) for ever.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the goodbye (DISCONNECT, TLS close_notify) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes to the client, within [`CLIENT_WRITE_TIMEOUT`].
async fn write_client(
    client: &mut (impl tokio::io::AsyncWrite + Unpin),
    bytes: &[u8],
) -> Result<(), String> {
    tokio::time::timeout(CLIENT_WRITE_TIMEOUT, client.write_all(bytes))
        .await
        .map_err(|_| "client stopped reading".to_owned())?
        .map_err(|e| format!("client write: {e}"))
}

/// Pushes out what the TLS layer still holds: tokio-rustls takes bytes
/// into its buffer and reports them written even when the socket would
/// block, and only a flush (or the next write) sends the rest.
async fn flush_client(client: &mut (impl tokio::io::AsyncWrite + Unpin)) -> Result<(), String> {
    tokio::time::timeout(CLIENT_WRITE_TIMEOUT, client.flush())
        .await
        .map_err(|_| "client stopped reading".to_owned())?
        .map_err(|e| format!("client write: {e}"))
}

/// Reads from rumqttd once the link is open; until then, never.
async fn read_broker(
    broker: Option<&mut tokio::net::tcp::OwnedReadHalf>,
    buffer: &mut [u8],
) -> std::io::Result<usize> {
    match broker {
        Some(broker) => broker.read(buffer).await,
        None => std::future::pending().await,
    }
}

/// The two halves of a link to rumqttd; the write half is counted in
/// [`Sessions::broker_links`] for as long as it lives.
type BrokerLink<'a> = (tokio::net::tcp::OwnedReadHalf, LinkWriter<'a>);

/// The client → rumqttd half of a link.
struct LinkWriter<'a> {
    write: tokio::net::tcp::OwnedWriteHalf,
    _counted: Counted<'a>,
}

/// Opens the link to rumqttd's listener for protocol `level` and sends the
/// admitted CONNECT; rumqttd's CONNACK is the first thing the link reads.
async fn open_upstream<'a>(
    front: &'a Front,
    level: u8,
    connect: &[u8],
) -> Result<BrokerLink<'a>, String> {
    let target = match level {
        5 => front.upstream.v5,
        _ => front.upstream.v4,
    };
    let broker = connect_upstream(target)
        .await
        .map_err(|e| format!("broker unreachable: {e}"))?;
    let _ = broker.set_nodelay(true);
    let (read, mut write) = broker.into_split();
    write
        .write_all(connect)
        .await
        .map_err(|e| format!("broker write: {e}"))?;
    front.sessions.broker_links.fetch_add(1, Ordering::Relaxed);
    let write = LinkWriter {
        write,
        _counted: Counted(&front.sessions.broker_links),
    };
    Ok((read, write))
}

/// Opens the rumqttd link of an MQTT 3.1.1 connection the front has already
/// accepted: rumqttd's CONNACK is read here, not relayed (the client had
/// ours), and a refusal closes the connection.
async fn open_upstream_lazily<'a>(
    front: &'a Front,
    connect: &[u8],
) -> Result<BrokerLink<'a>, String> {
    let (mut read, write) = open_upstream(front, 4, connect).await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(
        front.limits.handshake_timeout,
        read.read_exact(&mut connack),
    )
    .await
    .map_err(|_| "broker did not answer CONNECT".to_owned())?
    .map_err(|e| format!("broker read: {e}"))?;
    match connack {
        [0x20, 0x02, _, 0x00] => Ok((read, write)),
        other => Err(format!("broker refused the session: CONNACK {other:02x?}")),
    }
}

/// Loopback source addresses the front's connections to rumqttd are spread
/// over. Every connected device holds one such connection to one of
/// rumqttd's two ports; from 127.0.0.1 alone the ephemeral port range
/// (about 28,000 ports) would cap the gateway near 28,000 devices.
const UPSTREAM_SOURCES: usize = 64;

/// Connects to rumqttd on loopback from the next of [`UPSTREAM_SOURCES`]
/// source addresses, or as the system chooses where those are not usable.
async fn connect_upstream(target: SocketAddr) -> std::io::Result<TcpStream> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    if let SocketAddr::V4(v4) = target
        && v4.ip().is_loopback()
    {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % UPSTREAM_SOURCES;
        let source = std::net::Ipv4Addr::new(127, 0, 0, 1 + n as u8);
        let bound = tokio::net::TcpSocket::new_v4()
            .and_then(|socket| socket.bind((source, 0).into()).map(|()| socket));
        if let Ok(socket) = bound
            && let Ok(stream) = socket.connect(target).await
        {
            return Ok(stream);
        }
    }
    TcpStream::connect(target).await
}

/// CONNACK "server busy" for the client's protocol level.
fn busy_connack(level: u8) -> Vec<u8> {
    match level {
        // MQTT 5: reason 0x89 Server busy, no properties.
        5 => vec![0x20, 0x03, 0x00, 0x89, 0x00],
        // MQTT 3.1.1: return code 3, server unavailable.
        _ => vec![0x20, 0x02, 0x00, 0x03],
    }
}

/// The start of a connection: the whole CONNECT packet and its protocol level.
struct Connect {
    bytes: Vec<u8>,
    level: u8,
}

/// Read buffer of each relay direction. Every connected device holds two, so
/// they are sized for what devices exchange (requests and replies of a few
/// KiB), not for bulk transfer: larger packets just take more reads.
const RELAY_BUFFER: usize = 4 * 1024;

/// Largest CONNECT packet accepted (client id, credentials, will message).
const MAX_CONNECT: usize = 64 * 1024;

/// Reads the first MQTT packet, which must be CONNECT, without interpreting
/// more than the protocol level (the guard checks the rest).
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

    #[tokio::test]
    async fn upstream_connections_spread_over_loopback_sources() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let mut sources = HashSet::new();
        for _ in 0..4 {
            let _client = connect_upstream(target).await.unwrap();
            let (_, peer) = listener.accept().await.unwrap();
            assert!(peer.ip().is_loopback());
            sources.insert(peer.ip());
        }
        assert!(sources.len() > 1, "all from {sources:?}");
    }

    /// A client-bound relay for protocol `level` whose rumqttd is a loopback
    /// socket; with rumqttd's end of it, the front's queue for the client
    /// and the takeover signal.
    async fn relay_for(
        level: u8,
    ) -> (
        ToClient,
        TcpStream,
        tokio::sync::mpsc::Sender<Vec<u8>>,
        watch::Sender<bool>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let broker = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (link, _) = listener.accept().await.unwrap();
        let (link_tx, link_rx) = tokio::sync::oneshot::channel();
        link_tx.send(link.into_split().0).unwrap();
        let (direct_tx, direct_rx) = tokio::sync::mpsc::channel(direct::QUEUE);
        let (taken, taken_over) = watch::channel(false);
        let relay = ToClient {
            direct: direct_rx,
            link: Some(link_rx),
            boundaries: direct::Boundaries::before_connack(),
            broker_acks: Arc::default(),
            taken_over,
            goodbye: guard::taken_over_packet(level),
            refused: watch::channel(None).1,
        };
        (relay, broker, direct_tx, taken)
    }

    /// rumqttd's CONNACK and the first 10 bytes of a 40-byte PUBLISH, sent
    /// by `broker` and seen by `device`; returns the whole PUBLISH.
    async fn connack_then_part_of_a_publish(
        broker: &mut (impl tokio::io::AsyncWrite + Unpin),
        device: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Vec<u8> {
        let mut publish = vec![0x30, 38, 0, 1, b't', 0];
        publish.resize(40, b'p');
        let connack = [0x20, 3, 0, 0, 0];
        broker.write_all(&connack).await.unwrap();
        broker.write_all(&publish[..10]).await.unwrap();
        let mut seen = [0u8; 15];
        device.read_exact(&mut seen).await.unwrap();
        assert_eq!(seen[..5], connack);
        assert_eq!(seen[5..], publish[..10]);
        publish
    }

    #[tokio::test]
    async fn a_taken_over_mqtt5_client_is_told_between_two_packets() {
        let (relay, mut broker, direct_tx, taken) = relay_for(5).await;
        let (mut client, mut device) = tokio::io::duplex(64 * 1024);
        let relaying = tokio::spawn(async move { relay.relay(&mut client).await });
        let publish = connack_then_part_of_a_publish(&mut broker, &mut device).await;
        // A reply queued by the front, then the takeover, both inside
        // rumqttd's packet; then the rest of it, and another one.
        let reply = vec![0x30, 4, 0, 1, b'r', 0];
        direct_tx.send(reply.clone()).await.unwrap();
        taken.send_replace(true);
        broker
            .write_all(&[&publish[10..], &publish].concat())
            .await
            .unwrap();

        let ended = tokio::time::timeout(Duration::from_secs(10), relaying).await;
        assert_eq!(ended.unwrap().unwrap(), Err(TAKEN_OVER.to_owned()));
        let mut rest = Vec::new();
        device.read_to_end(&mut rest).await.unwrap();
        let mut expected = publish[10..].to_vec();
        expected.extend_from_slice(&reply);
        expected.extend_from_slice(&[0xe0, 2, 0x8e, 0]);
        assert_eq!(
            rest, expected,
            "the packet ends, the queue, DISCONNECT, nothing else"
        );
    }

    #[tokio::test]
    async fn a_taken_over_mqtt311_client_is_just_closed() {
        let (relay, mut broker, direct_tx, taken) = relay_for(4).await;
        let (mut client, mut device) = tokio::io::duplex(64 * 1024);
        let relaying = tokio::spawn(async move { relay.relay(&mut client).await });
        let connack = [0x20, 2, 0, 0];
        broker.write_all(&connack).await.unwrap();
        let mut seen = [0u8; 4];
        device.read_exact(&mut seen).await.unwrap();
        direct_tx.send(vec![0x40, 2, 0, 1]).await.unwrap();
        let mut puback = [0u8; 4];
        device.read_exact(&mut puback).await.unwrap();
        taken.send_replace(true);
        let ended = tokio::time::timeout(Duration::from_secs(10), relaying).await;
        assert_eq!(ended.unwrap().unwrap(), Err(TAKEN_OVER.to_owned()));
        let mut rest = Vec::new();
        device.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    /// A front whose rumqttd listens at `broker` (both ports) and whose
    /// service queue is `requests`.
    fn front_for(
        broker: SocketAddr,
        requests: tokio::sync::mpsc::Sender<super::super::Message>,
    ) -> Front {
        front_and_trust(broker, requests).0
    }

    /// [`front_for`], and a TLS client configuration that trusts it.
    fn front_and_trust(
        broker: SocketAddr,
        requests: tokio::sync::mpsc::Sender<super::super::Message>,
    ) -> (Front, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let certificate = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![certificate.der().clone()],
                    PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )
                .unwrap();
        // No session tickets: the server would write them after the
        // handshake, into a small test pipe nobody reads yet.
        config.send_tls13_tickets = 0;
        let mut roots = RootCertStore::empty();
        roots.add(certificate.der().clone()).unwrap();
        let trust = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let (_, tls) = watch::channel(Arc::new(config));
        let (_, revoked) = watch::channel(Arc::default());
        let upstream = Upstream {
            v4: broker,
            v5: broker,
            direct: Arc::default(),
            requests,
        };
        let front = Front::new(tls, upstream, Limits::default(), Arc::default(), revoked);
        (front, Arc::new(trust))
    }

    /// A clean CONNECT for protocol `level` without keep-alive or
    /// properties.
    fn connect_for(level: u8, client_id: &str) -> Connect {
        connect_with(level, client_id, &[])
    }

    /// A clean CONNECT for protocol `level` without keep-alive, with MQTT 5
    /// `properties` (encoded, as they go in the block).
    fn connect_with(level: u8, client_id: &str, properties: &[u8]) -> Connect {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 0];
        if level == 5 {
            direct::remaining_length(properties.len(), &mut body);
            body.extend_from_slice(properties);
        }
        body.extend_from_slice(&u16::try_from(client_id.len()).unwrap().to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut bytes = vec![0x10];
        direct::remaining_length(body.len(), &mut bytes);
        bytes.extend_from_slice(&body);
        Connect { bytes, level }
    }

    /// A session of `front` after `connect`, from `identity`, over an
    /// in-memory pipe holding `capacity` bytes each way: the client's end,
    /// the session's task, and its shutdown switch (the session stops when
    /// the switch goes).
    fn start_session(
        front: &Front,
        connect: Connect,
        identity: Option<(Identity, String, String)>,
        capacity: usize,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<Result<(), String>>,
        watch::Sender<bool>,
    ) {
        let (client, server) = tokio::io::duplex(capacity);
        let (task, stop) = spawn_session(front, server, connect, identity);
        (client, task, stop)
    }

    /// A session of `front` on `stream`; its task and shutdown switch.
    fn spawn_session(
        front: &Front,
        stream: impl AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        connect: Connect,
        identity: Option<(Identity, String, String)>,
    ) -> (
        tokio::task::JoinHandle<Result<(), String>>,
        watch::Sender<bool>,
    ) {
        let (stop, shutdown) = watch::channel(false);
        let front = front.clone();
        let task =
            tokio::spawn(async move { session(stream, connect, identity, &front, shutdown).await });
        (task, stop)
    }

    /// [`start_session`] over TLS, the client trusting `trust`.
    async fn start_tls_session(
        front: &Front,
        trust: &Arc<rustls::ClientConfig>,
        connect: Connect,
        identity: Option<(Identity, String, String)>,
        capacity: usize,
    ) -> (
        tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<Result<(), String>>,
        watch::Sender<bool>,
    ) {
        let (client, server) = tokio::io::duplex(capacity);
        let config = front.tls.borrow().clone();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(
            tokio_rustls::TlsConnector::from(trust.clone()).connect(name, client),
            TlsAcceptor::from(config).accept(server),
        );
        let (task, stop) = spawn_session(front, server.unwrap(), connect, identity);
        (client.unwrap(), task, stop)
    }

    /// A device's certificate identity, as the handshake finds it.
    fn device(id: &str) -> Option<(Identity, String, String)> {
        Some((Identity::Device(id.into()), id.into(), "5e71a1".into()))
    }

    /// Leaves the front's writes to `client` blocked, as they are to a
    /// device that stopped reading: its PINGREQs' answers overflow the
    /// pipe. One raw byte read beneath TLS shows that the front has written.
    async fn leave_unread(client: &mut tokio_rustls::client::TlsStream<tokio::io::DuplexStream>) {
        client.write_all(&[0xc0, 0].repeat(40)).await.unwrap();
        client.flush().await.unwrap();
        let mut byte = [0u8; 1];
        client.get_mut().0.read_exact(&mut byte).await.unwrap();
    }

    /// Waits until `device_id` has `sessions` registered sessions; at most
    /// 2 s, well within the CLOSE_TIMEOUT a close may take.
    async fn registered(front: &Front, device_id: &str, sessions: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while front.sessions.device_sessions(device_id) != sessions {
            assert!(
                std::time::Instant::now() < deadline,
                "{device_id} still has {} sessions, not {sessions}",
                front.sessions.device_sessions(device_id)
            );
            tokio::task::yield_now().await;
        }
    }

    /// A QoS 1 PUBLISH of `payload` on `topic` with packet id `id`, MQTT
    /// 3.1.1.
    fn qos1_publish(topic: &str, id: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = u16::try_from(topic.len()).unwrap().to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(payload);
        let mut packet = vec![0x32];
        direct::remaining_length(body.len(), &mut packet);
        packet.extend_from_slice(&body);
        packet
    }

    /// A PUBACK tells the client the gateway has its request: a request
    /// still waiting for room in the service's queue when its connection is
    /// taken over is dropped, and must never have been acknowledged.
    #[tokio::test]
    async fn a_request_dropped_at_takeover_was_never_acknowledged() {
        const TOPIC: &str = "idgate/v1/devices/d-1/enroll/cbor";
        let (service, mut queue) = tokio::sync::mpsc::channel(1);
        let first = super::super::Message {
            topic: TOPIC.into(),
            payload: b"0".to_vec(),
            retain: false,
        };
        service.send(first).await.unwrap();
        let front = front_for(SocketAddr::from(([127, 0, 0, 1], 9)), service);
        let (mut device, session, _stop) =
            start_session(&front, connect_for(4, "dev"), None, 64 * 1024);
        let mut connack = [0u8; 4];
        device.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "the front's own CONNACK");

        // The queue is full: the first requests wait for room on their own,
        // the last one with the connection.
        let sent = u16::try_from(WAITING_REQUESTS).unwrap() + 1;
        let requests: Vec<u8> = (1..=sent)
            .flat_map(|id| qos1_publish(TOPIC, id, id.to_string().as_bytes()))
            .collect();
        device.write_all(&requests).await.unwrap();
        for id in 1..sent {
            let mut puback = [0u8; 4];
            device.read_exact(&mut puback).await.unwrap();
            assert_eq!(puback, [0x40, 2, 0, u8::try_from(id).unwrap()]);
        }
        // Taken over while the last one waits for its turn.
        front.sessions.claim_client_id("_anon.dev");
        let ended = tokio::time::timeout(Duration::from_secs(10), session).await;
        assert_eq!(ended.unwrap().unwrap(), Err(TAKEN_OVER.to_owned()));
        let mut rest = Vec::new();
        device.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest.is_empty(),
            "no PUBACK for the dropped request: {rest:?}"
        );

        // The service gets every acknowledged request, and only those.
        drop(front);
        let mut delivered = Vec::new();
        while let Some(request) = tokio::time::timeout(Duration::from_secs(10), queue.recv())
            .await
            .unwrap()
        {
            delivered.push(String::from_utf8(request.payload).unwrap());
        }
        delivered.sort();
        let acknowledged: Vec<String> = (0..sent).map(|id| id.to_string()).collect();
        assert_eq!(delivered, acknowledged);
    }

    /// A CONNECT that breaks a rule MQTT 5 calls a Protocol Error is
    /// refused with CONNACK 0x82, not 0x81 (Malformed Packet).
    #[tokio::test]
    async fn protocol_errors_in_connect_are_refused_as_such() {
        let (service, _queue) = tokio::sync::mpsc::channel(1);
        let front = front_for(SocketAddr::from(([127, 0, 0, 1], 9)), service);
        for properties in [
            // Maximum Packet Size 0 (§3.1.2.11.4).
            &[0x27, 0, 0, 0, 0][..],
            // A property given twice (§2.2.2.2).
            &[0x11, 0, 0, 0, 0, 0x11, 0, 0, 0, 0],
            // Receive Maximum 0 (§3.1.2.11.3).
            &[0x21, 0, 0],
            // Request Response, Request Problem Information not 0 or 1
            // (§3.1.2.11.6, §3.1.2.11.7).
            &[0x19, 2],
            &[0x17, 2],
            // Authentication Data without a method (§3.1.2.11.10).
            &[0x16, 0, 1, b'x'],
        ] {
            let connect = connect_with(5, "dev", properties);
            let (mut device, session, _stop) = start_session(&front, connect, None, 1024);
            let ended = tokio::time::timeout(Duration::from_secs(10), session).await;
            assert!(ended.unwrap().unwrap().is_err());
            let mut answer = Vec::new();
            device.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, [0x20, 3, 0, 0x82, 0], "{properties:02x?}");
        }
    }

    /// A CONNECT asking for enhanced authentication is refused with
    /// CONNACK 0x8C, Bad authentication method.
    #[tokio::test]
    async fn an_authentication_method_is_refused() {
        let (service, _queue) = tokio::sync::mpsc::channel(1);
        let front = front_for(SocketAddr::from(([127, 0, 0, 1], 9)), service);
        let properties = [0x15, 0, 5, b'S', b'C', b'R', b'A', b'M', 0x16, 0, 1, b'x'];
        let connect = connect_with(5, "dev", &properties);
        let (mut device, session, _stop) = start_session(&front, connect, None, 1024);
        let ended = tokio::time::timeout(Duration::from_secs(10), session).await;
        assert!(ended.unwrap().unwrap().is_err());
        let mut answer = Vec::new();
        device.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, [0x20, 3, 0, 0x8c, 0]);
    }

    /// An MQTT 3.1.1 CONNECT that is malformed or breaks a rule of the
    /// protocol is answered by closing the connection, without a CONNACK
    /// (MQTT 3.1.1 §3.1.4); a well-formed one that is refused gets its
    /// return code.
    #[tokio::test]
    async fn a_malformed_mqtt311_connect_gets_no_connack() {
        let (service, _queue) = tokio::sync::mpsc::channel(1);
        let front = front_for(SocketAddr::from(([127, 0, 0, 1], 9)), service);
        // The flags byte of `connect_for`, after the fixed header, protocol
        // name and level.
        const FLAGS: usize = 9;
        let mut cases = Vec::new();
        for (flags, why) in [
            (0x01, "the reserved flag"),
            (0x40, "a password without a user name"),
            (0x08, "a will QoS without a will"),
        ] {
            let mut connect = connect_for(4, "dev");
            connect.bytes[FLAGS] |= flags;
            cases.push((connect, None, Vec::new(), why));
        }
        let mut utf8 = connect_for(4, "dev");
        *utf8.bytes.last_mut().unwrap() = 0xff;
        cases.push((utf8, None, Vec::new(), "a client id not UTF-8"));
        // Well-formed: a will from a client without a certificate is not
        // authorized (5), another device's client id is rejected (2), an
        // unknown protocol level is unacceptable (1).
        let mut will = connect_for(4, "dev");
        will.bytes[FLAGS] |= 0x04;
        for text in ["idgate/v1/devices/dev/w", "gone"] {
            will.bytes
                .extend_from_slice(&[0, u8::try_from(text.len()).unwrap()]);
            will.bytes.extend_from_slice(text.as_bytes());
            will.bytes[1] += 2 + u8::try_from(text.len()).unwrap();
        }
        cases.push((will, None, vec![0x20, 2, 0, 5], "a will, anonymous"));
        let other = connect_for(4, "dev-2");
        cases.push((other, device("dev"), vec![0x20, 2, 0, 2], "another id"));
        // A level the front does not speak: unacceptable protocol version.
        let level = connect_for(3, "dev");
        cases.push((level, None, vec![0x20, 2, 0, 1], "protocol level 3"));
        for (connect, identity, connack, why) in cases {
            let (mut device, session, _stop) = start_session(&front, connect, identity, 1024);
            let ended = tokio::time::timeout(Duration::from_secs(10), session).await;
            assert!(ended.unwrap().unwrap().is_err(), "{why}");
            let mut answer = Vec::new();
            device.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, connack, "{why}");
        }
    }

    /// The DISCONNECT telling a refused MQTT 5 client why goes out at the
    /// end of the rumqttd packet being relayed, never inside it, and
    /// nothing of rumqttd's after it.
    #[tokio::test]
    async fn a_refused_mqtt5_client_is_told_between_two_packets() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (service, _queue) = tokio::sync::mpsc::channel(1);
        let front = front_for(listener.local_addr().unwrap(), service);
        let (mut device, session, _stop) =
            start_session(&front, connect_for(5, "dev"), None, 64 * 1024);
        let (mut broker, _) = listener.accept().await.unwrap();
        let mut connect = [0u8; 2];
        broker.read_exact(&mut connect).await.unwrap();
        assert_eq!(connect[0], 0x10, "CONNECT");
        broker
            .read_exact(&mut vec![0u8; usize::from(connect[1])])
            .await
            .unwrap();
        let publish = connack_then_part_of_a_publish(&mut broker, &mut device).await;
        // A PINGREQ, then a SUBSCRIBE to `#`, which a client without a
        // certificate may not ask for: the PINGREQ still reaches rumqttd,
        // once the guard has refused the connection.
        let subscribe = [0x82, 7, 0, 1, 0, 0, 1, b'#', 0];
        device
            .write_all(&[&[0xc0, 0][..], &subscribe].concat())
            .await
            .unwrap();
        let mut ping = [0u8; 2];
        broker.read_exact(&mut ping).await.unwrap();
        assert_eq!(ping, [0xc0, 0]);
        // The rest of rumqttd's packet, and another one.
        broker
            .write_all(&[&publish[10..], &publish].concat())
            .await
            .unwrap();

        let ended = tokio::time::timeout(Duration::from_secs(10), session).await;
        let reason = ended.unwrap().unwrap().unwrap_err();
        assert!(reason.starts_with("guard: "), "{reason}");
        let mut rest = Vec::new();
        device.read_to_end(&mut rest).await.unwrap();
        let mut expected = publish[10..].to_vec();
        expected.extend_from_slice(&[0xe0, 2, 0x87, 0]);
        assert_eq!(
            rest, expected,
            "the packet ends, then DISCONNECT 0x87, nothing else"
        );
    }

    /// A session stops counting as soon as its client has closed, not once
    /// the front's close is done: here the client reads nothing, and the
    /// front's close (TLS close_notify) waits CLOSE_TIMEOUT for room.
    #[tokio::test]
    async fn a_closed_connection_stops_counting_at_once() {
        let (service, _queue) = tokio::sync::mpsc::channel(1);
        let (front, trust) = front_and_trust(SocketAddr::from(([127, 0, 0, 1], 9)), service);
        let connect = connect_for(4, "d-1");
        let (mut device, session, _stop) =
            start_tls_session(&front, &trust, connect, device("d-1"), 64).await;
        let mut connack = [0u8; 4];
        device.read_exact(&mut connack).await.unwrap();
        assert_eq!(front.sessions.device_sessions("d-1"), 1);
        leave_unread(&mut device).await;

        device.shutdown().await.unwrap();
        registered(&front, "d-1", 0).await;
        assert!(!session.is_finished(), "the close is still under way");
        drop(device);
        let ended = tokio::time::timeout(Duration::from_secs(10), session).await;
        assert_eq!(ended.unwrap().unwrap(), Ok(()));
    }

    /// Taken over, a session stops counting at once, and the newer one
    /// stays registered after the older one's close is done.
    #[tokio::test]
    async fn a_takeover_leaves_one_session_counted() {
        let (service, _queue) = tokio::sync::mpsc::channel(1);
        let (front, trust) = front_and_trust(SocketAddr::from(([127, 0, 0, 1], 9)), service);
        let (mut older, older_session, _stop) =
            start_tls_session(&front, &trust, connect_for(4, "d-1"), device("d-1"), 64).await;
        let mut connack = [0u8; 4];
        older.read_exact(&mut connack).await.unwrap();
        leave_unread(&mut older).await;

        let (mut newer, newer_session, _stop) =
            start_session(&front, connect_for(4, "d-1"), device("d-1"), 1024);
        newer.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0]);
        registered(&front, "d-1", 1).await;
        assert!(!older_session.is_finished(), "the close is still under way");
        drop(older);
        let ended = tokio::time::timeout(Duration::from_secs(10), older_session).await;
        assert_eq!(ended.unwrap().unwrap(), Err(TAKEN_OVER.to_owned()));
        assert_eq!(front.sessions.device_sessions("d-1"), 1, "the newer one");
        newer.write_all(&[0xc0, 0]).await.unwrap();
        let mut pong = [0u8; 2];
        newer.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0xd0, 0], "the newer one is served");
        assert!(!newer_session.is_finished());
    }

    #[test]
    fn busy_connacks_are_well_formed() {
        assert_eq!(busy_connack(4), [0x20, 2, 0, 3]);
        assert_eq!(busy_connack(5), [0x20, 3, 0, 0x89, 0]);
    }
}
