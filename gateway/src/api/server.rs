//! The admin listener: HTTPS (rustls, TLS 1.2 and 1.3) serving the JSON API
//! and the web console from one router, behind [`auth::authenticate`].
//!
//! TLS handshakes run in their own tasks with a timeout, so a client that
//! connects and says nothing holds up no one else.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, error, info};

use super::auth::{self, ClientAddr};
use super::state::AdminState;

/// How often ended sessions are deleted.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at most.
const MAX_HANDSHAKES: usize = 256;

/// The admin listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Binding failed.
    #[error("cannot listen for the admin API on {0}: {1}")]
    Bind(SocketAddr, io::Error),
    /// The certificate or key is unusable.
    #[error("admin TLS: {0}")]
    Tls(String),
}

/// The TLS configuration: the gateway's server certificate (signed by its
/// root, for `localhost`, the loopback addresses and the host name), no client
/// certificates, HTTP/1.1.
pub fn tls_config(chain_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, AdminError> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| AdminError::Tls(format!("certificate: {e}")))?;
    if chain.is_empty() {
        return Err(AdminError::Tls(
            "the certificate file has no certificate".into(),
        ));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| AdminError::Tls(format!("key: {e}")))?
        .ok_or_else(|| AdminError::Tls("the key file has no private key".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| AdminError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| AdminError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The one router of the admin listener: the JSON API, the login and logout
/// handlers and the web console, all behind [`auth::authenticate`].
pub fn app(state: AdminState) -> Router {
    Router::new()
        .merge(super::router(state.clone()))
        .merge(crate::web::router(state.clone()))
        .layer(axum::middleware::from_fn_with_state(
            state,
            auth::authenticate,
        ))
}

/// Connections whose TLS handshake has finished.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener` and shakes hands with `config` until `shutdown`.
    pub fn new(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (done, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            let stop = stopped(shutdown);
            tokio::pin!(stop);
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            debug!(error = %e, "admin accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = &mut stop => return,
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    debug!(%peer, "too many admin TLS handshakes; connection dropped");
                    continue;
                };
                let acceptor = acceptor.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = done.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "admin TLS handshake failed"),
                        Err(_) => debug!(%peer, "admin TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // Stopped: axum stops asking once its own shutdown signal fires.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

/// Deletes ended sessions now and every [`SWEEP_EVERY`] (a session is
/// refused once ended whether or not its row is gone; this keeps the table
/// small).
async fn sweep_sessions(state: AdminState, shutdown: watch::Receiver<bool>) {
    let stop = stopped(shutdown);
    tokio::pin!(stop);
    let mut ticker = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut stop => return,
        }
        match state
            .registry
            .delete_expired_sessions(crate::registry::now())
            .await
        {
            Ok(0) => {}
            Ok(deleted) => debug!(deleted, "deleted ended sessions"),
            Err(e) => error!(error = %e, "cannot delete ended sessions"),
        }
    }
}

/// Resolves once `shutdown` says stop (or its sender is gone).
async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Serves `state`'s router on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    state: AdminState,
    shutdown: watch::Receiver<bool>,
) {
    let tls = match TlsListener::new(listener, config, shutdown.clone()) {
        Ok(tls) => tls,
        Err(e) => {
            error!(error = %e, "admin listener failed");
            return;
        }
    };
    tokio::spawn(sweep_sessions(state.clone(), shutdown.clone()));
    let service = app(state).into_make_service_with_connect_info::<ClientAddr>();
    if let Err(e) = axum::serve(tls, service)
        .with_graceful_shutdown(stopped(shutdown))
        .await
    {
        error!(error = %e, "admin server failed");
    }
    info!("admin server stopped");
}
