//! Who is asking, and may they: staff sessions (cookie), API tokens (bearer),
//! roles, CSRF protection, login with rate limiting, logout.
//!
//! # For handlers (the JSON API and `crate::web`)
//!
//! [`authenticate`] runs before every route of the admin listener. It puts a
//! [`Principal`] in the request when a valid session cookie or bearer token
//! came with it, and refuses with 403 `csrf` any cookie-authenticated
//! `POST`/`PUT`/`PATCH`/`DELETE` that does not carry the session's CSRF token,
//! either in the `X-CSRF-Token` header ([`CSRF_HEADER`]) or, for
//! `application/x-www-form-urlencoded` bodies, in the form field `csrf`
//! ([`CSRF_FIELD`]). Bearer-token requests are exempt (no ambient credential
//! a browser could send on its own). So a handler only has to:
//!
//! ```ignore
//! async fn revoke(principal: Principal, ...) -> Result<_, ApiError> {
//!     principal.require(Role::Operator)?;      // 403 `forbidden` below operator
//!     admin::revoke(&registry, id, reason, &principal.actor(), now()).await ...
//! }
//! ```
//!
//! - `Principal` as an extractor answers 401 (`unauthenticated` or
//!   `session_expired`) when nobody is logged in; `Option<Principal>` never
//!   refuses (a page handler redirects to `/login` itself).
//! - Every HTML form that changes something must carry
//!   `<input type="hidden" name="csrf" value="{csrf_token(session)}">`, where
//!   the session is [`Principal::session`]; JavaScript sends the header.
//! - [`Principal::actor`] is what goes into the audit log
//!   (`user:NAME` or `token:NAME`).
//!
//! # Login and logout
//!
//! - `POST /login` ([`login_form`]): form fields `username`, `password` and an
//!   optional `next` (a local path). Success: 303 to `next` (default `/`) with
//!   the session cookie. Failure: 303 to `/login?error=CODE` (plus `&next=…`),
//!   where CODE is `invalid_credentials`, `rate_limited`, `busy` or
//!   `invalid_request`;
//!   the console's `GET /login` page shows the matching message. Scripts use
//!   `POST /api/v1/login` instead, which answers 401 and 429 directly.
//! - `POST /logout` ([`logout_form`]): ends the session, clears the cookie,
//!   303 to `/login`. Needs the CSRF token like any change.
//! - [`log_in`] is the function behind both, for a page that wants to render
//!   its own answer.

use std::net::SocketAddr;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Form, FromRequestParts, OptionalFromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::error::ApiError;
use super::state::AdminState;
pub use crate::registry::Role;
use crate::registry::{AuditEntry, NewSession, check_account_name, now};

/// The session cookie. `__Host-` makes browsers insist on Secure, Path=/ and
/// no Domain, so no other host or plain-HTTP page can set or read it.
pub const SESSION_COOKIE: &str = "__Host-idgate-session";
/// The request header carrying the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The form field carrying the CSRF token.
pub const CSRF_FIELD: &str = "csrf";
/// Prefix of every API token (lets secret scanners recognise one).
pub const TOKEN_PREFIX: &str = "idgate_";
/// Largest form body read to find the CSRF field.
const MAX_FORM: usize = 64 * 1024;
/// Last-use times are written at most this often (seconds).
const TOUCH_EVERY: i64 = 60;

/// A logged-in browser session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The account.
    pub account: String,
    /// The session's CSRF token (see [`csrf_token`]).
    pub csrf_token: String,
    /// When it ends at the latest, unix seconds.
    pub expires_at: i64,
    id_sha256: Vec<u8>,
}

/// The CSRF token to put in every form of this session (field [`CSRF_FIELD`])
/// or in the [`CSRF_HEADER`] header.
pub fn csrf_token(session: &Session) -> &str {
    &session.csrf_token
}

/// How a principal proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// A session cookie (a staff member in a browser, or a script that logged in).
    Session(Session),
    /// An API token.
    Token,
}

/// Who is making the request: an account (by session) or an API token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Account name, or the token's name.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// How it authenticated.
    pub via: Via,
}

impl Principal {
    /// The audit log's actor: `user:NAME` or `token:NAME`.
    pub fn actor(&self) -> String {
        match self.via {
            Via::Session(_) => format!("user:{}", self.name),
            Via::Token => format!("token:{}", self.name),
        }
    }

    /// Whether it holds `role` or a higher one.
    pub fn has(&self, role: Role) -> bool {
        self.role >= role
    }

    /// 403 `forbidden` unless it holds `role` or a higher one.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.has(role) {
            Ok(())
        } else {
            Err(ApiError::forbidden(role))
        }
    }

    /// The browser session, if it came with one.
    pub fn session(&self) -> Option<&Session> {
        match &self.via {
            Via::Session(session) => Some(session),
            Via::Token => None,
        }
    }
}

/// Why a request has no principal although it brought a credential; read by
/// the `Principal` extractor to say so.
#[derive(Clone, Copy, Debug)]
struct StaleSession;

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(principal.clone());
        }
        if parts.extensions.get::<StaleSession>().is_some() {
            return Err(ApiError::session_expired());
        }
        Err(ApiError::unauthenticated())
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Principal {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Principal>().cloned())
    }
}

/// The client's address as the admin listener saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// The client's IP address as text (`unknown` outside a real listener), as
/// an extractor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Client(
            parts
                .extensions
                .get::<ConnectInfo<ClientAddr>>()
                .map_or_else(|| "unknown".to_owned(), |info| info.0.0.ip().to_string()),
        ))
    }
}

fn client_of(request: &Request<Body>) -> String {
    request
        .extensions()
        .get::<ConnectInfo<ClientAddr>>()
        .map(|info| info.0.0.ip().to_string())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A new API token (shown once) and the digest to store.
pub fn new_api_token() -> (String, Vec<u8>) {
    let token = format!("{TOKEN_PREFIX}{}", random_secret());
    let stored = digest(&token);
    (token, stored)
}

/// Hashes a password with argon2id (default parameters: 19 MiB, 2 passes).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Checks a password against a stored PHC string; a malformed one never matches.
pub fn verify_password(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored).is_ok_and(|hash| {
        Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

/// Rules for a new password: at least 12 characters, at most 1024.
pub fn check_password(password: &str) -> Result<(), String> {
    match password.chars().count() {
        n if n < 12 => Err("the password must have at least 12 characters".into()),
        n if n > 1024 => Err("the password must have at most 1024 characters".into()),
        _ => Ok(()),
    }
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn set_cookie(value: &str, max_age: i64) -> HeaderValue {
    let cookie = format!(
        "{SESSION_COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    );
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn clear_cookie() -> HeaderValue {
    set_cookie("", 0)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The login endpoints need no session, so no session's CSRF token; they
/// refuse cross-site posts by their `Origin` instead.
fn is_login(path: &str) -> bool {
    matches!(path, "/login" | "/api/v1/login")
}

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The middleware of the admin listener: finds the principal, enforces CSRF
/// on cookie-authenticated changes, and refuses bad bearer tokens (see the
/// module documentation).
pub async fn authenticate(
    State(state): State<AdminState>,
    mut request: Request<Body>,
    next: Next,
) -> Response {
    let at = now();
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or("").to_owned());
    if let Some(authorization) = bearer {
        let Some(token) = authorization
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return ApiError::bad_request(
                "invalid_request",
                "the Authorization header must be `Bearer <API token>`",
            )
            .into_response();
        };
        let record = match state.registry.api_token_by_digest(&digest(token)).await {
            Ok(record) => record,
            Err(e) => return ApiError::internal(e).into_response(),
        };
        let Some(record) = record
            .filter(|r| r.revoked_at.is_none() && r.expires_at.is_none_or(|expires| expires > at))
        else {
            warn!(client = %client_of(&request), "request with an unknown, revoked or expired API token");
            return ApiError::invalid_token().into_response();
        };
        match creator_in_force(&state, &record.created_by, at).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(token = %record.name, creator = %record.created_by, "request with an API token whose creator is disabled or gone");
                return ApiError::invalid_token().into_response();
            }
            Err(e) => return ApiError::internal(e).into_response(),
        }
        if record
            .last_used_at
            .is_none_or(|last| at - last >= TOUCH_EVERY)
            && let Err(e) = state.registry.touch_api_token(&record.name, at).await
        {
            warn!(error = %e, "cannot record an API token's use");
        }
        request.extensions_mut().insert(Principal {
            name: record.name,
            role: record.role,
            via: Via::Token,
        });
        return next.run(request).await;
    }

    let mut clear = false;
    let cookie = cookie_value(request.headers(), SESSION_COOKIE).map(str::to_owned);
    if let Some(cookie) = cookie.filter(|c| !c.is_empty()) {
        let id_sha256 = digest(&cookie);
        let record = match state.registry.session(&id_sha256).await {
            Ok(record) => record,
            Err(e) => return ApiError::internal(e).into_response(),
        };
        let idle = state.settings.session_idle.as_secs() as i64;
        match record {
            Some(record)
                if !record.disabled
                    && record.expires_at > at
                    && record.last_used_at + idle > at =>
            {
                if at - record.last_used_at >= TOUCH_EVERY
                    && let Err(e) = state.registry.touch_session(&id_sha256, at).await
                {
                    warn!(error = %e, "cannot record a session's use");
                }
                let session = Session {
                    account: record.account.clone(),
                    csrf_token: record.csrf_token,
                    expires_at: record.expires_at.min(at + idle),
                    id_sha256,
                };
                if changes_state(request.method()) && !is_login(request.uri().path()) {
                    let (checked, passed) = check_csrf(request, &session.csrf_token).await;
                    request = checked;
                    if !passed {
                        warn!(account = %session.account, path = %request.uri().path(), "refused a change without its CSRF token");
                        return ApiError::csrf().into_response();
                    }
                }
                request.extensions_mut().insert(Principal {
                    name: record.account,
                    role: record.role,
                    via: Via::Session(session),
                });
            }
            _ => {
                clear = true;
                request.extensions_mut().insert(StaleSession);
            }
        }
    }
    let mut response = next.run(request).await;
    if clear && !response.headers().contains_key(header::SET_COOKIE) {
        response
            .headers_mut()
            .insert(header::SET_COOKIE, clear_cookie());
    }
    response
}

/// Whether `request` carries `expected` in the header or the form body; the
/// request comes back whole (its body re-assembled if it was read).
/// Whether whoever created a token still could: a token made by an account
/// stops working when the account is disabled or removed, one made by a
/// token when that token is revoked or expired (and so on up the chain);
/// one made on the host (`cli:…`) depends on nobody.
async fn creator_in_force(
    state: &AdminState,
    created_by: &str,
    at: i64,
) -> Result<bool, crate::registry::RegistryError> {
    let mut creator = created_by.to_owned();
    // A chain is as long as tokens made by tokens; names are unique, so a
    // longer one than there are tokens is a loop.
    for _ in 0..16 {
        if let Some(name) = creator.strip_prefix("user:") {
            let account = state.registry.account(name).await?;
            return Ok(account.is_some_and(|a| a.disabled_at.is_none()));
        }
        let Some(name) = creator.strip_prefix("token:") else {
            return Ok(true);
        };
        let tokens = state.registry.api_tokens().await?;
        let Some(token) = tokens.into_iter().find(|t| t.name == name) else {
            return Ok(false);
        };
        if token.revoked_at.is_some() || token.expires_at.is_some_and(|e| e <= at) {
            return Ok(false);
        }
        creator = token.created_by;
    }
    Ok(false)
}

async fn check_csrf(request: Request<Body>, expected: &str) -> (Request<Body>, bool) {
    if let Some(sent) = request.headers().get(CSRF_HEADER) {
        let passed = constant_time_eq(sent.as_bytes(), expected.as_bytes());
        return (request, passed);
    }
    let is_form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return (request, false);
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
        return (Request::from_parts(parts, Body::empty()), false);
    };
    let passed = form_field(&bytes, CSRF_FIELD)
        .is_some_and(|sent| constant_time_eq(sent.as_bytes(), expected.as_bytes()));
    (Request::from_parts(parts, Body::from(bytes)), passed)
}

/// The first value of `name` in a URL-encoded form.
fn form_field(body: &[u8], name: &str) -> Option<String> {
    form_urlencoded::parse(body)
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// Why a login failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoginError {
    /// Unknown account, wrong password or disabled account (not told apart).
    #[error("wrong user name or password")]
    InvalidCredentials,
    /// Too many failures for the account or the client address.
    #[error("too many failed logins; try again in {0} seconds")]
    RateLimited(u64),
    /// Too many logins are being checked at once; try again in a moment.
    #[error("too many logins at once; try again in a few seconds")]
    Busy,
    /// The registry failed (logged).
    #[error("internal error")]
    Internal,
}

impl LoginError {
    /// The stable code (as in [`ApiError`]).
    pub fn code(&self) -> &'static str {
        match self {
            LoginError::InvalidCredentials => "invalid_credentials",
            LoginError::RateLimited(_) => "rate_limited",
            LoginError::Busy => "busy",
            LoginError::Internal => "internal",
        }
    }
}

impl From<LoginError> for ApiError {
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::InvalidCredentials => {
                ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string())
            }
            LoginError::RateLimited(seconds) => ApiError::rate_limited(seconds),
            LoginError::Busy => ApiError {
                retry_after: Some(5),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.code(), e.to_string())
            },
            LoginError::Internal => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; the gateway's log has the cause",
            ),
        }
    }
}

/// A session just created by [`log_in`].
#[derive(Clone, Debug)]
pub struct NewLogin {
    /// The session.
    pub session: Session,
    /// The account's role.
    pub role: Role,
    /// The `Set-Cookie` header value that hands the session to the browser.
    pub set_cookie: HeaderValue,
}

/// What a login with an unknown name is checked against, so that a wrong
/// name costs the same argon2 work (same parameters) as a wrong password.
/// The hash of a random password nobody kept; a match would not log anyone
/// in anyway, as there is no account.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$Lruvqc+tLbo+57AujfVZ3g$xth4cZ6eocnsnmxo+K3aF77ZUnxtqnMLsQN26G3oAh0";

/// Checks a name and password and opens a session. Refuses with
/// [`LoginError::RateLimited`] (before checking the password) once the
/// account has too many recent failures from this client address, or the
/// address too many in all; attempts under way count as failures until they
/// are decided, so parallel guesses cannot overrun the limit. At most
/// [`super::login_gate::MAX_VERIFYING`] passwords are verified at once.
pub async fn log_in(
    state: &AdminState,
    client: &str,
    username: &str,
    password: &str,
) -> Result<NewLogin, LoginError> {
    let at = now();
    let settings = &state.settings;
    let window = settings.login_window.as_secs() as i64;
    let valid_name = check_account_name(username).is_ok();
    // What goes in the log: a name typed into the wrong field may be a
    // password, or anything at all.
    let logged_name = if valid_name { username } else { "-" };
    let pair_subject = format!("account:{username}@{client}");
    let client_subject = format!("ip:{client}");
    let mut limits = vec![(client_subject.as_str(), settings.max_failures_per_client)];
    if valid_name {
        limits.push((
            pair_subject.as_str(),
            settings.max_failures_per_account_client,
        ));
    }
    let reservation = state
        .logins
        .reserve(&limits, async |subjects: &[&str]| {
            state.registry.login_failures(subjects, at - window).await
        })
        .await
        .map_err(|e| {
            ApiError::internal(e);
            LoginError::Internal
        })?
        .map_err(|_| {
            warn!(account = %logged_name, %client, "login refused: rate limited");
            LoginError::RateLimited(window as u64)
        })?;
    let slot = state.logins.verification_slot().await.map_err(|_| {
        warn!(account = %logged_name, %client, "login refused: too many at once");
        LoginError::Busy
    })?;
    let account = if valid_name {
        state.registry.account(username).await.map_err(|e| {
            ApiError::internal(e);
            LoginError::Internal
        })?
    } else {
        None
    };
    let stored = account
        .as_ref()
        .map_or_else(|| DUMMY_HASH.to_owned(), |a| a.password_hash.clone());
    let password = password.to_owned();
    let matches = tokio::task::spawn_blocking(move || verify_password(&password, &stored))
        .await
        .unwrap_or(false);
    drop(slot);
    let account = account.filter(|a| matches && a.disabled_at.is_none());
    let Some(account) = account else {
        let actor = if valid_name {
            format!("user:{username}")
        } else {
            "anonymous".to_owned()
        };
        let audit = AuditEntry::new(at, actor, "account.login")
            .outcome("invalid_credentials")
            .detail(format!("client={client}"));
        let subjects: Vec<&str> = limits.iter().map(|(s, _)| *s).collect();
        if let Err(e) = state
            .registry
            .record_login_failure(&subjects, &audit, at - window)
            .await
        {
            ApiError::internal(e);
        }
        drop(reservation);
        warn!(account = %logged_name, %client, "login failed");
        return Err(LoginError::InvalidCredentials);
    };
    drop(reservation);
    let cookie = random_secret();
    let session = Session {
        account: account.name.clone(),
        csrf_token: random_secret(),
        expires_at: at + settings.session_lifetime.as_secs() as i64,
        id_sha256: digest(&cookie),
    };
    state
        .registry
        .create_session(&NewSession {
            id_sha256: session.id_sha256.clone(),
            account: account.name.clone(),
            csrf_token: session.csrf_token.clone(),
            created_at: at,
            expires_at: session.expires_at,
            client: client.to_owned(),
        })
        .await
        .map_err(|e| {
            ApiError::internal(e);
            LoginError::Internal
        })?;
    if let Err(e) = state.registry.clear_login_failures(&pair_subject).await {
        warn!(error = %e, "cannot clear failed logins");
    }
    info!(account = %account.name, %client, "logged in");
    Ok(NewLogin {
        set_cookie: set_cookie(&cookie, settings.session_lifetime.as_secs() as i64),
        role: account.role,
        session,
    })
}

/// Ends `session` (logout).
pub async fn log_out(state: &AdminState, session: &Session) -> Result<(), ApiError> {
    state
        .registry
        .delete_session(&session.id_sha256, now())
        .await?;
    info!(account = %session.account, "logged out");
    Ok(())
}

/// The login form's fields.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct LoginForm {
    /// Account name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Where to go after login (a local path); default `/`.
    #[serde(default)]
    pub next: Option<String>,
}

/// `next` if it is a path on this site, else `None` (the caller goes to `/`).
///
/// Browsers are lenient about what follows the first `/`: they drop tabs and
/// newlines and read `\\` as `/`, so `/\tevil.example` or `/\\evil.example`
/// become `//evil.example`, another host. Rather than list what is
/// dangerous, accept only one `/` followed by plain path and query
/// characters, and check the percent-decoded form too (`/%2F/evil`).
pub(crate) fn local_path(next: &str) -> Option<&str> {
    fn plain(path: &[u8]) -> bool {
        path.first() == Some(&b'/')
            && path.get(1) != Some(&b'/')
            && path.iter().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'/' | b'.' | b'_' | b'~' | b'%' | b'?' | b'=' | b'&' | b'-' | b'+'
                    )
            })
    }
    fn decoded_safe(path: &[u8]) -> bool {
        path.first() == Some(&b'/')
            && path.get(1) != Some(&b'/')
            && !path.iter().any(|&b| b == b'\\' || b.is_ascii_control())
    }
    if !plain(next.as_bytes()) {
        return None;
    }
    // Twice, for a proxy or browser that decodes once more (`%252F`).
    let once = percent_decode(next.as_bytes());
    let twice = percent_decode(&once);
    (decoded_safe(&once) && decoded_safe(&twice)).then_some(next)
}

/// `%XX` decoded; a `%` not followed by two hex digits is kept as is.
fn percent_decode(text: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%'
            && let (Some(high), Some(low)) = (
                text.get(i + 1).and_then(|&b| hex(b)),
                text.get(i + 2).and_then(|&b| hex(b)),
            )
        {
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A browser must not be logged in to someone else's account by another
/// site's form: a login whose `Origin` names another host is refused.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority == host)
}

/// `POST /login` (form): see the module documentation.
pub async fn login_form(
    State(state): State<AdminState>,
    Client(client): Client,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return Redirect::to("/login?error=invalid_request").into_response();
    };
    let next = form.next.as_deref().and_then(local_path);
    let failed = |code: &str| {
        let mut to = format!("/login?error={code}");
        if let Some(next) = next {
            to.push_str(&format!("&next={}", percent_encode(next)));
        }
        Redirect::to(&to).into_response()
    };
    if !same_origin(&headers) {
        return failed("invalid_request");
    }
    match log_in(&state, &client, &form.username, &form.password).await {
        Ok(login) => {
            let mut response = Redirect::to(next.unwrap_or("/")).into_response();
            response
                .headers_mut()
                .insert(header::SET_COOKIE, login.set_cookie);
            response
        }
        Err(e) => failed(e.code()),
    }
}

/// `POST /logout` (form, CSRF-checked): ends the session, 303 to `/login`.
pub async fn logout_form(
    State(state): State<AdminState>,
    principal: Option<Principal>,
) -> Response {
    if let Some(session) = principal.as_ref().and_then(Principal::session)
        && let Err(e) = log_out(&state, session).await
    {
        return e.into_response();
    }
    let mut response = Redirect::to("/login").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, clear_cookie());
    response
}

/// `POST /api/v1/login` body.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Account name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// `POST /api/v1/login`: JSON login for scripts; sets the session cookie and
/// returns the CSRF token the script must send with changes.
pub async fn login_json(
    State(state): State<AdminState>,
    Client(client): Client,
    headers: HeaderMap,
    body: Result<Json<LoginRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))?;
    if !same_origin(&headers) {
        return Err(ApiError::csrf());
    }
    let login = log_in(&state, &client, &body.username, &body.password).await?;
    let mut response = Json(serde_json::json!({
        "account": login.session.account,
        "role": login.role,
        "csrf_token": login.session.csrf_token,
        "expires_at": login.session.expires_at,
    }))
    .into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, login.set_cookie);
    Ok(response)
}

/// `POST /api/v1/logout`: ends the session; 204.
pub async fn logout_json(
    State(state): State<AdminState>,
    principal: Principal,
) -> Result<Response, ApiError> {
    if let Some(session) = principal.session() {
        log_out(&state, session).await?;
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, clear_cookie());
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        let viewer = Principal {
            name: "v".into(),
            role: Role::Viewer,
            via: Via::Token,
        };
        assert_eq!(viewer.require(Role::Viewer), Ok(()));
        assert_eq!(
            viewer.require(Role::Operator).map_err(|e| e.code),
            Err("forbidden")
        );
        assert_eq!(viewer.actor(), "token:v");
    }

    #[test]
    fn the_dummy_hash_costs_what_a_real_one_costs() {
        let real = hash_password("any password at all").unwrap();
        let parameters = |phc: &str| phc.split('$').take(4).collect::<Vec<_>>().join("$");
        assert_eq!(parameters(DUMMY_HASH), parameters(&real));
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
        assert!(!verify_password("", DUMMY_HASH));
    }

    #[test]
    fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse batterY", &hash));
        assert!(!verify_password("anything", "not a PHC string"));
        assert!(check_password("short").is_err());
        assert!(check_password("long enough password").is_ok());
    }

    #[test]
    fn cookies_and_form_fields_are_found() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-idgate-session=abc; b=2"),
        );
        assert_eq!(cookie_value(&headers, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie_value(&headers, "c"), None);
        assert_eq!(
            form_field(b"reason=lost&csrf=a%2Bb+c&x=1", "csrf").as_deref(),
            Some("a+b c")
        );
        assert_eq!(form_field(b"reason=lost", "csrf"), None);
        assert_eq!(form_field(&[0xff, b'='], "csrf"), None);
        assert_eq!(form_field(b"csrf=1&csrf=2", "csrf").as_deref(), Some("1"));
    }

    #[test]
    fn only_local_paths_are_followed() {
        for good in [
            "/",
            "/devices/d1",
            "/devices?q=sensor-1&state=active",
            "/devices?q=hall+b",
            "/audit?before=01J%3A5",
            "/devices/a%20b",
        ] {
            assert_eq!(local_path(good), Some(good), "{good}");
        }
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "/\tevil.example",
            "/\t/evil.example",
            "/%09/evil.example",
            "/%2F/evil.example",
            "/%2f/evil.example",
            "/%252F/evil.example",
            "/%5Cevil.example",
            "/%0D%0ALocation:x",
            "/\r\nSet-Cookie:x",
            "https://evil.example",
            "http:/evil.example",
            "devices",
            "",
            " /devices",
            "/devices/é",
        ] {
            assert_eq!(local_path(bad), None, "{bad:?}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8443"));
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://127.0.0.1:8443"),
        );
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&headers));
    }
}
