//! What every admin-listener handler (the JSON API and the web console)
//! shares: the registry, the CA, the revocation state and the settings. Kept
//! small and stable: `crate::web` builds on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use idgate_pki::ca::IssuingCa;
use tokio::sync::watch;

use crate::provisioner::token::Tokens;
use crate::registry::Registry;
use crate::revocation::RevocationState;

/// How the admin listener behaves.
#[derive(Clone, Debug)]
pub struct AdminSettings {
    /// Where the admin listener (HTTPS: JSON API and web console) binds.
    pub listen: SocketAddr,
    /// A session ends this long after login, used or not.
    pub session_lifetime: Duration,
    /// A session ends after this long without a request.
    pub session_idle: Duration,
    /// Failed logins are counted over this window.
    pub login_window: Duration,
    /// Failed logins to one account from one client address within the
    /// window before that address's logins to that account are refused.
    /// Counted per address so that guesses from elsewhere cannot lock staff
    /// out of their own account.
    pub max_failures_per_account_client: u32,
    /// Failed logins per client address within the window before its logins are refused.
    pub max_failures_per_client: u32,
    /// Largest page a list request may ask for; larger requests are refused.
    pub max_page_size: u32,
    /// The page size when a request does not say.
    pub default_page_size: u32,
}

impl Default for AdminSettings {
    /// 127.0.0.1:8443; sessions of 12 h ending after 1 h idle; 5 failed
    /// logins per account and address and 20 per address in 15 minutes; pages of 50,
    /// at most 200.
    fn default() -> Self {
        AdminSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            session_lifetime: Duration::from_secs(12 * 3600),
            session_idle: Duration::from_secs(3600),
            login_window: Duration::from_secs(15 * 60),
            max_failures_per_account_client: 5,
            max_failures_per_client: 20,
            max_page_size: 200,
            default_page_size: 50,
        }
    }
}

/// The state of the admin listener's handlers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// The registry.
    pub registry: Arc<Registry>,
    /// The issuing CA (for CA information).
    pub ca: Arc<IssuingCa>,
    /// The root CA certificate, PEM (what devices and browsers trust).
    pub root_certificate_pem: Arc<str>,
    /// Makes and seals one-time enrollment tokens for devices added here.
    pub tokens: Tokens,
    /// The revocation state in force.
    pub revocation: watch::Receiver<Arc<RevocationState>>,
    /// Where the public CRL and OCSP endpoints listen (plain HTTP).
    pub http_address: SocketAddr,
    /// Settings.
    pub settings: Arc<AdminSettings>,
    /// Login attempts under way and the cap on argon2 verifications.
    pub logins: Arc<crate::api::login_gate::LoginGate>,
}
