//! A running gateway: data directory, registry, authority, embedded broker,
//! TLS front and enrollment service, started together and stopped together.
//! `idgate serve` and the end-to-end tests both use this.

use std::net::SocketAddr;
use std::sync::Arc;

use idgate_pki::profile::Profile;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::authority::Authority;
use crate::broker::{embedded, front};
use crate::datadir::{DataDir, DataDirError, read_text};
use crate::registry::{Registry, RegistryError};

/// How to run a gateway.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The data directory.
    pub data: DataDir,
    /// The registry URL (default: the SQLite file in the data directory).
    pub database_url: Option<String>,
    /// Where devices connect (MQTT over TLS).
    pub mqtt_listen: SocketAddr,
    /// The device certificate profile.
    pub profile: Profile,
    /// Front door limits.
    pub limits: front::Limits,
}

impl Settings {
    /// Defaults for `data`: MQTT/TLS on 0.0.0.0:8883, 24 h certificates.
    pub fn new(data: DataDir) -> Settings {
        Settings {
            data,
            database_url: None,
            mqtt_listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            profile: Profile::default(),
            limits: front::Limits::default(),
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
    /// Embedded broker problem.
    #[error(transparent)]
    Broker(#[from] embedded::EmbeddedError),
    /// TLS front problem.
    #[error(transparent)]
    Front(#[from] front::FrontError),
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    mqtt_address: SocketAddr,
    initialized: bool,
    registry: Arc<Registry>,
    stop: watch::Sender<bool>,
    front: JoinHandle<()>,
    service: JoinHandle<()>,
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
        let authority = Arc::new(Authority::new(
            ca,
            chain,
            settings.profile,
            registry.clone(),
            data.tokens()?,
        ));
        let tls = front::server_config(
            &read_text(&data.tls_certificate())?,
            &read_text(&data.tls_key())?,
        )?;
        let listener = front::bind(settings.mqtt_listen).await?;
        let mqtt_address = listener
            .local_addr()
            .map_err(|e| front::FrontError::Bind(settings.mqtt_listen, e))?;
        let (upstream, bus) = embedded::start().await?;
        let (stop, stopped) = watch::channel(false);
        let front = tokio::spawn(front::serve(
            listener,
            tls,
            upstream,
            settings.limits,
            stopped.clone(),
        ));
        let service = tokio::spawn(crate::service::run(authority, bus, stopped));
        info!(%mqtt_address, "gateway listening for devices (MQTT over TLS)");
        Ok(Gateway {
            mqtt_address,
            initialized,
            registry,
            stop,
            front,
            service,
        })
    }

    /// Where devices connect.
    pub fn mqtt_address(&self) -> SocketAddr {
        self.mqtt_address
    }

    /// Whether this start created the data directory's CA.
    pub fn initialized(&self) -> bool {
        self.initialized
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Stops accepting connections and requests, finishes the requests in
    /// progress (their certificates are recorded and answered), and closes the
    /// registry.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.front.await;
        let _ = self.service.await;
        self.registry.close().await;
        info!("gateway stopped");
    }
}
