//! The admin HTTP API: thin JSON handlers over the registry and
//! [`crate::admin`], served on the admin listener ([`server`]) together with
//! the web console. Who may call what is decided in [`auth`]; every error is
//! an [`error::ApiError`]; the routes are listed once in [`routes`] and
//! described in the OpenAPI document at `/api/v1/openapi.json`.

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, header};
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, any, get, patch, post};

mod accounts;
pub mod auth;
mod batches;
pub(crate) mod devices;
pub mod error;
mod extract;
pub mod login_gate;
mod records;
pub mod server;
pub mod state;

use auth::Principal;
use error::ApiError;
pub use state::{AdminSettings, AdminState};

/// The longest free-text filter (a search text, a site, an owner, a
/// cursor…) a list request may send, in characters, in the API and the
/// console alike: anything longer is refused with 400 rather than searched.
pub const MAX_FILTER_CHARS: usize = 200;

/// The name of the first of `filters` longer than [`MAX_FILTER_CHARS`].
pub(crate) fn too_long<'a>(filters: &[(&'a str, Option<&str>)]) -> Option<&'a str> {
    filters
        .iter()
        .find(|(_, value)| value.is_some_and(|v| v.chars().count() > MAX_FILTER_CHARS))
        .map(|(name, _)| *name)
}

/// 400 `invalid_request` if one of `filters` is longer than [`MAX_FILTER_CHARS`].
fn check_filters(filters: &[(&str, Option<&str>)]) -> Result<(), ApiError> {
    match too_long(filters) {
        None => Ok(()),
        Some(name) => Err(ApiError::bad_request(
            "invalid_request",
            format!("`{name}` is too long (at most {MAX_FILTER_CHARS} characters)"),
        )),
    }
}

/// The OpenAPI 3.1 document of the JSON API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route of the admin API: method, path (axum syntax, which is also
/// OpenAPI's) and handler. The form handlers `/login` and `/logout` are
/// the console's and not in the OpenAPI document.
fn table() -> Vec<(Method, &'static str, MethodRouter<AdminState>)> {
    vec![
        (Method::POST, "/login", post(auth::login_form)),
        (Method::POST, "/logout", post(auth::logout_form)),
        (Method::GET, "/api/v1/openapi.json", get(openapi)),
        (Method::POST, "/api/v1/login", post(auth::login_json)),
        (Method::POST, "/api/v1/logout", post(auth::logout_json)),
        (Method::GET, "/api/v1/me", get(me)),
        (Method::GET, "/api/v1/devices", get(devices::list)),
        (Method::POST, "/api/v1/devices", post(devices::add)),
        (Method::GET, "/api/v1/devices/{id}", get(devices::show)),
        (Method::PATCH, "/api/v1/devices/{id}", patch(devices::edit)),
        (
            Method::POST,
            "/api/v1/devices/{id}/revoke",
            post(devices::revoke),
        ),
        (
            Method::POST,
            "/api/v1/devices/{id}/suspend",
            post(devices::suspend),
        ),
        (
            Method::POST,
            "/api/v1/devices/{id}/resume",
            post(devices::resume),
        ),
        (
            Method::POST,
            "/api/v1/devices/{id}/retire",
            post(devices::retire),
        ),
        (
            Method::GET,
            "/api/v1/devices/{id}/certificates",
            get(devices::certificates),
        ),
        (
            Method::GET,
            "/api/v1/devices/{id}/audit",
            get(devices::audit),
        ),
        (
            Method::GET,
            "/api/v1/certificates/{serial}",
            get(records::certificate),
        ),
        (Method::GET, "/api/v1/batches", get(batches::list)),
        (
            Method::POST,
            "/api/v1/batches",
            post(batches::import).layer(DefaultBodyLimit::max(batches::MAX_BATCH_BODY)),
        ),
        (Method::GET, "/api/v1/batches/{id}", get(batches::show)),
        (Method::GET, "/api/v1/audit", get(records::audit)),
        (Method::GET, "/api/v1/ca", get(records::ca)),
        (Method::GET, "/api/v1/accounts", get(accounts::list)),
        (Method::POST, "/api/v1/accounts", post(accounts::add)),
        (
            Method::POST,
            "/api/v1/accounts/{name}/disable",
            post(accounts::disable),
        ),
        (
            Method::POST,
            "/api/v1/accounts/{name}/enable",
            post(accounts::enable),
        ),
        (Method::GET, "/api/v1/tokens", get(accounts::tokens)),
        (Method::POST, "/api/v1/tokens", post(accounts::create_token)),
        (
            Method::POST,
            "/api/v1/tokens/{name}/revoke",
            post(accounts::revoke_token),
        ),
    ]
}

/// The routes [`router`] serves, as (method, path).
pub fn routes() -> Vec<(Method, &'static str)> {
    table()
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect()
}

/// The JSON API routes and the login/logout form handlers; any other path
/// under `/api/` answers 404 `not_found` in JSON.
pub fn router(state: AdminState) -> Router {
    table()
        .into_iter()
        .fold(Router::new(), |router, (_, path, handler)| {
            router.route(path, handler)
        })
        .route("/api/{*rest}", any(unknown))
        .layer(axum::middleware::map_response(no_store))
        .with_state(state)
}

/// API answers hold registry data and tokens: never cached, never sniffed
/// as another type, never framed.
async fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers
            .entry(name)
            .or_insert(header::HeaderValue::from_static(value));
    }
    response
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    fn document() -> Value {
        serde_json::from_str(OPENAPI).expect("the OpenAPI document is JSON")
    }

    /// Every `$ref` in `value`.
    fn references(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("$ref", Value::String(target)) => found.push(target.clone()),
                        _ => references(value, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| references(v, found)),
            _ => {}
        }
    }

    #[test]
    fn openapi_describes_exactly_the_served_routes() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        let mut operation_ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("path item") {
                if method == "parameters" {
                    continue;
                }
                documented.insert((method.to_uppercase(), path.clone()));
                let id = operation["operationId"].as_str().expect("operationId");
                assert!(operation_ids.insert(id.to_owned()), "{id} twice");
                assert!(
                    operation["responses"]
                        .as_object()
                        .is_some_and(|r| !r.is_empty()),
                    "{method} {path} has no responses"
                );
            }
        }
        let served: BTreeSet<(String, String)> = routes()
            .into_iter()
            .filter(|(_, path)| path.starts_with("/api/"))
            .map(|(method, path)| (method.to_string(), path.to_owned()))
            .collect();
        assert_eq!(
            served.difference(&documented).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "served but not documented"
        );
        assert_eq!(
            documented.difference(&served).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "documented but not served"
        );
    }

    #[test]
    fn openapi_references_resolve() {
        let doc = document();
        let mut found = Vec::new();
        references(&doc, &mut found);
        assert!(!found.is_empty());
        for target in found {
            let pointer = target.strip_prefix('#').expect("local reference");
            assert!(doc.pointer(pointer).is_some(), "{target} does not resolve");
        }
    }
}
