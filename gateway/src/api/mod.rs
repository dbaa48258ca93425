//! The admin HTTP API: thin JSON handlers over the registry and
//! [`crate::admin`], on the admin listener ([`server`]) with the web console.
//! Who may call what is decided in [`auth`]; errors are [`error::ApiError`].

use axum::Router;
use axum::routing::{any, get, post};

pub mod auth;
pub mod error;
pub mod server;
pub mod state;

use auth::Principal;
use error::ApiError;
pub use state::{AdminSettings, AdminState};

/// The JSON API routes and the login/logout form handlers.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/login", post(auth::login_form))
        .route("/logout", post(auth::logout_form))
        .route("/api/v1/login", post(auth::login_json))
        .route("/api/v1/logout", post(auth::logout_json))
        .route("/api/v1/me", get(me))
        .route("/api/v1/{*rest}", any(unknown))
        .with_state(state)
}

/// `GET /api/v1/me`: who the caller is.
async fn me(principal: Principal) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "name": principal.name,
        "role": principal.role,
        "via": if principal.session().is_some() { "session" } else { "token" },
        "csrf_token": principal.session().map(auth::csrf_token),
    }))
}

async fn unknown() -> ApiError {
    ApiError::not_found("such API route")
}
