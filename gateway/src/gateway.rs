//! A running gateway: data directory, registry, authority, revocation state,
//! embedded broker, TLS front, enrollment service and HTTP endpoints, started
//! together and stopped together. `idgate serve` and the end-to-end tests both
//! use this.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{error, info};

use crate::authority::{Authority, Policy};
use crate::broker::front::{self, Front, Sessions, TlsMaterial};
use crate::broker::{CRL_TOPIC, Message, embedded};
use crate::datadir::{DataDir, DataDirError, read_text};
use crate::registry::{Registry, RegistryError};
use crate::revocation::{self, RevocationError, RevocationState};

/// How to run a gateway.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The data directory.
    pub data: DataDir,
    /// The registry URL (default: the SQLite file in the data directory).
    pub database_url: Option<String>,
    /// Where devices connect (MQTT over TLS).
    pub mqtt_listen: SocketAddr,
    /// Where the CRL and the OCSP responder are served (plain HTTP).
    pub http_listen: SocketAddr,
    /// What the authority allows (certificate lifetime, renewal grace).
    pub policy: Policy,
    /// Front door limits.
    pub limits: front::Limits,
    /// The admin listener (HTTPS: JSON API and web console) and its sessions.
    pub admin: crate::api::AdminSettings,
}

impl Settings {
    /// Defaults for `data`: MQTT/TLS on 0.0.0.0:8883, HTTP on 0.0.0.0:8080,
    /// the admin API on 127.0.0.1:8443, 24 h certificates.
    pub fn new(data: DataDir) -> Settings {
        Settings {
            data,
            database_url: None,
            mqtt_listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            policy: Policy::default(),
            limits: front::Limits::default(),
            admin: crate::api::AdminSettings::default(),
        }
    }
}

/// The gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Data directory problem.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// Registry problem.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// The first CRL could not be built.
    #[error(transparent)]
    Revocation(#[from] RevocationError),
    /// Embedded broker problem.
    #[error(transparent)]
    Broker(#[from] embedded::EmbeddedError),
    /// TLS front problem.
    #[error(transparent)]
    Front(#[from] front::FrontError),
    /// HTTP listener problem.
    #[error("cannot listen for HTTP on {0}: {1}")]
    Http(SocketAddr, std::io::Error),
    /// Admin listener problem.
    #[error(transparent)]
    Admin(#[from] crate::api::server::AdminError),
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    mqtt_address: SocketAddr,
    http_address: SocketAddr,
    admin_address: SocketAddr,
    initialized: bool,
    registry: Arc<Registry>,
    sessions: Arc<Sessions>,
    revocation: watch::Receiver<Arc<RevocationState>>,
    /// The service's request queue (only its depth is read here).
    service_queue: tokio::sync::mpsc::Sender<crate::broker::Message>,
    /// The front's reply routes (only their counters are read here).
    direct: Arc<crate::broker::direct::DirectRoutes>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Gateway {
    /// Starts everything; creates the CA first if the data directory has none.
    pub async fn start(settings: Settings) -> Result<Gateway, StartError> {
        let data = &settings.data;
        let initialized = !data.has_ca();
        if initialized {
            data.init_ca()?;
            info!(data = %data.root().display(), "initialised a new data directory");
        }
        let database_url = settings
            .database_url
            .clone()
            .unwrap_or_else(|| data.default_database_url());
        let registry = Arc::new(Registry::open(&database_url).await?);
        let (ca, chain) = data.load_issuing_ca()?;
        let ca = Arc::new(ca);
        let material = TlsMaterial::from_pem(
            &read_text(&data.tls_certificate())?,
            &read_text(&data.tls_key())?,
            ca.certificate(),
        )?;
        let first = Arc::new(revocation::build(&registry, &ca).await?);
        let (state_tx, state_rx) = watch::channel(first.clone());
        let (tls_tx, tls_rx) = watch::channel(material.server_config(&first.crl)?);
        let (revoked_tx, revoked_rx) = watch::channel(first.revoked.clone());
        let (applied_tx, applied_rx) = watch::channel(first.clone());

        let authority = Arc::new(Authority::new(
            ca.clone(),
            chain,
            settings.policy,
            registry.clone(),
            data.tokens()?,
        ));
        let listener = front::bind(settings.mqtt_listen).await?;
        let mqtt_address = listener
            .local_addr()
            .map_err(|e| front::FrontError::Bind(settings.mqtt_listen, e))?;
        let http_listener = tokio::net::TcpListener::bind(settings.http_listen)
            .await
            .map_err(|e| StartError::Http(settings.http_listen, e))?;
        let http_address = http_listener
            .local_addr()
            .map_err(|e| StartError::Http(settings.http_listen, e))?;
        let admin_listen = settings.admin.listen;
        let admin_listener = tokio::net::TcpListener::bind(admin_listen)
            .await
            .map_err(|e| crate::api::server::AdminError::Bind(admin_listen, e))?;
        let admin_address = admin_listener
            .local_addr()
            .map_err(|e| crate::api::server::AdminError::Bind(admin_listen, e))?;
        let admin_tls = crate::api::server::tls_config(
            &read_text(&data.tls_certificate())?,
            &read_text(&data.tls_key())?,
        )?;
        let admin_state = crate::api::AdminState {
            registry: registry.clone(),
            ca: ca.clone(),
            root_certificate_pem: read_text(&data.root_certificate())?.into(),
            tokens: data.tokens()?,
            revocation: state_rx.clone(),
            http_address,
            settings: Arc::new(settings.admin.clone()),
            logins: Default::default(),
        };
        let (upstream, bus) = embedded::start().await?;
        let publisher = bus.replies.clone();
        let sessions = Arc::new(Sessions::default());
        let (stop, stopped) = watch::channel(false);

        let mut tasks = JoinSet::new();
        tasks.spawn(revocation::maintain(
            registry.clone(),
            ca.clone(),
            state_tx,
            stopped.clone(),
        ));
        tasks.spawn(apply_revocations(
            state_rx.clone(),
            material,
            Appliers {
                tls: tls_tx,
                revoked: revoked_tx,
                sessions: sessions.clone(),
                publisher,
                applied: applied_tx,
            },
            stopped.clone(),
        ));
        let service_queue = upstream.requests.clone();
        let direct = upstream.direct.clone();
        let front = Front::new(
            tls_rx,
            upstream,
            settings.limits,
            sessions.clone(),
            revoked_rx,
        );
        tasks.spawn(front::serve(listener, front, stopped.clone()));
        tasks.spawn(crate::http::serve(
            http_listener,
            crate::http::Context {
                registry: registry.clone(),
                ca: ca.clone(),
                revocation: state_rx.clone(),
            },
            stopped.clone(),
        ));
        tasks.spawn(crate::broker::presence::record(
            registry.clone(),
            sessions.clone(),
            stopped.clone(),
        ));
        tasks.spawn(crate::api::server::serve(
            admin_listener,
            admin_tls,
            admin_state,
            stopped.clone(),
        ));
        tasks.spawn(crate::service::run(authority, bus, stopped));
        info!(%mqtt_address, %http_address, %admin_address, "gateway listening");
        Ok(Gateway {
            mqtt_address,
            http_address,
            admin_address,
            initialized,
            registry,
            sessions,
            revocation: applied_rx,
            service_queue,
            direct,
            stop,
            tasks,
        })
    }

    /// Where devices connect.
    pub fn mqtt_address(&self) -> SocketAddr {
        self.mqtt_address
    }

    /// Where `GET /crl` and the OCSP responder are served.
    pub fn http_address(&self) -> SocketAddr {
        self.http_address
    }

    /// Where the admin API and the web console are served (HTTPS).
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address
    }

    /// Whether this start created the data directory's CA.
    pub fn initialized(&self) -> bool {
        self.initialized
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Live MQTT sessions.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// Requests waiting for the enrollment service (a registry that is
    /// slow or gone shows here first).
    pub fn waiting_requests(&self) -> usize {
        self.service_queue.max_capacity() - self.service_queue.capacity()
    }

    /// Replies the front did not send because they exceed the MQTT 5
    /// Maximum Packet Size of the connection waiting for them (a device
    /// that asked for less than its certificate takes).
    pub fn oversize_replies(&self) -> u64 {
        self.direct.oversize_replies()
    }

    /// The revocation state in force: it changes once a rebuilt state has
    /// been applied (TLS verifier swapped, sessions closed, CRL published).
    pub fn revocation(&self) -> watch::Receiver<Arc<RevocationState>> {
        self.revocation.clone()
    }

    /// Stops accepting connections and requests, finishes the requests in
    /// progress (their certificates are recorded and answered), and closes the
    /// registry.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        self.registry.close().await;
        info!("gateway stopped");
    }
}

/// Where a new revocation state takes effect.
struct Appliers {
    tls: watch::Sender<Arc<rustls::ServerConfig>>,
    revoked: watch::Sender<Arc<HashSet<String>>>,
    sessions: Arc<Sessions>,
    publisher: mpsc::Sender<Message>,
    applied: watch::Sender<Arc<RevocationState>>,
}

/// Applies each new revocation state: a TLS configuration with the new CRL
/// for new handshakes, the revoked set for the post-handshake check, closing
/// the live sessions of revoked certificates, and the CRL on its MQTT topic;
/// then announces it as applied.
async fn apply_revocations(
    mut state: watch::Receiver<Arc<RevocationState>>,
    material: TlsMaterial,
    to: Appliers,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let current = state.borrow_and_update().clone();
        match material.server_config(&current.crl) {
            Ok(config) => {
                to.tls.send_replace(config);
            }
            Err(e) => error!(error = %e, "cannot rebuild the TLS configuration with the new CRL"),
        }
        to.revoked.send_replace(current.revoked.clone());
        let closed = to.sessions.close_revoked(&current.revoked);
        if closed > 0 {
            info!(closed, "closed sessions of revoked certificates");
        }
        let crl = Message {
            topic: CRL_TOPIC.to_owned(),
            payload: current.crl.to_vec(),
            retain: true,
        };
        if to.publisher.send(crl).await.is_err() {
            return;
        }
        to.applied.send_replace(current);
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
