//! The web console for facilities staff: server-rendered HTML pages on the
//! admin listener (no JavaScript at all), built on the admin API's sessions,
//! roles and CSRF protection ([`crate::api::auth`]).
//!
//! Pages: the fleet overview (`/`), device search and lists (`/devices`), a
//! device (`/devices/{id}`) with its revoke confirmation
//! (`/devices/{id}/revoke`) and its owner/site/label form
//! (`/devices/{id}/edit`), batches (`/batches`, `/batches/{id}`), the audit
//! log (`/audit`) and the login form (`/login`; the admin API handles its
//! `POST`). Everyone logged in may read; revoking, suspending, resuming and
//! editing need the operator role, which the pages check before showing a button and
//! the handlers check again before acting.

mod edit;
pub mod pages;

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Form, FromRequestParts, OptionalFromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::Markup;
use tracing::info;

use crate::admin::{self, RevokeReason};
use crate::api::auth::{Principal, Role, SESSION_COOKIE};
use crate::api::state::AdminState;
use crate::registry::console::{Condition, DeviceQuery};
use crate::registry::{DeviceStatus, StatusError, now};
use pages::{Done, ListView, device_href};

/// Rows on one page of devices.
const PER_PAGE: i64 = 50;
/// Rows on one page of the audit log.
const AUDIT_PER_PAGE: i64 = 100;
/// Default windows of the fleet overview, in days.
const EXPIRING_DAYS: i64 = 1;
const NOT_SEEN_DAYS: i64 = 7;
/// The stylesheet, compiled in.
const CSS: &str = include_str!("console.css");
/// No script, no frames, no foreign origins: a markup bug that slipped past
/// escaping still could not run anything.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// The console's routes, merged into the admin listener's router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login))
        .route("/console.css", get(stylesheet))
        .route("/devices", get(devices))
        .route("/devices/{id}", get(device))
        .route("/devices/{id}/revoke", get(revoke_form).post(revoke))
        .route("/devices/{id}/edit", get(edit::edit_form).post(edit::edit))
        .route("/devices/{id}/suspend", post(suspend))
        .route("/devices/{id}/resume", post(resume))
        .route("/batches", get(batches))
        .route("/batches/{id}", get(batch))
        .route("/audit", get(audit))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// The answer that replaces the page asked for: an error page or a redirect.
#[derive(Debug)]
struct Refusal(Box<Response>);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        *self.0
    }
}

impl From<Response> for Refusal {
    fn from(response: Response) -> Self {
        Refusal(Box::new(response))
    }
}

/// A page, or the answer that replaces it.
type Page = Result<Markup, Refusal>;

/// An HTML error page.
fn fail(status: StatusCode, who: Option<&Principal>, title: &str, message: &str) -> Refusal {
    (status, pages::error(who, title, message))
        .into_response()
        .into()
}

fn internal(who: &Principal, cause: impl std::fmt::Display) -> Refusal {
    tracing::error!(error = %cause, "console request failed");
    fail(
        StatusCode::INTERNAL_SERVER_ERROR,
        Some(who),
        "Something went wrong",
        "The gateway could not answer. Its log has the cause; try again in a moment.",
    )
}

/// The signed-in principal of a console page. Anyone else is sent to the
/// login page, which comes back here afterwards; a browser whose session
/// ended is told so there.
#[derive(Debug)]
struct Staff(Principal);

impl<S: Send + Sync> FromRequestParts<S> for Staff {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let principal =
            <Principal as OptionalFromRequestParts<S>>::from_request_parts(parts, state).await;
        if let Ok(Some(principal)) = principal {
            return Ok(Staff(principal));
        }
        let next = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let ended = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains(&format!("{SESSION_COOKIE}=")));
        let error = if ended { "&error=session_expired" } else { "" };
        Err(Redirect::to(&format!("/login?next={}{error}", pages::encode(next))).into_response())
    }
}

/// 403 unless `who` holds `role`.
fn require(who: &Principal, role: Role, what: &str) -> Result<(), Refusal> {
    if who.has(role) {
        return Ok(());
    }
    Err(fail(
        StatusCode::FORBIDDEN,
        Some(who),
        "Not allowed",
        &format!(
            "Your role ({}) cannot {what}; it needs the {role} role. Ask an operator or an administrator.",
            who.role
        ),
    ))
}

/// A 400 page if a query parameter (a search text, a cursor…) is longer
/// than [`crate::api::MAX_FILTER_CHARS`].
fn short_filters(who: &Principal, params: &HashMap<String, String>) -> Result<(), Refusal> {
    let filters: Vec<(&str, Option<&str>)> = params
        .iter()
        .map(|(name, value)| (name.as_str(), Some(value.as_str())))
        .collect();
    match crate::api::too_long(&filters) {
        None => Ok(()),
        Some(name) => Err(fail(
            StatusCode::BAD_REQUEST,
            Some(who),
            "Bad request",
            &format!(
                "The {} is too long (at most {} characters).",
                if name == "q" { "search text" } else { name },
                crate::api::MAX_FILTER_CHARS
            ),
        )),
    }
}

/// A whole number from a query parameter within `range`, or a 400 page.
fn number(
    who: &Principal,
    params: &HashMap<String, String>,
    name: &str,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
) -> Result<i64, Refusal> {
    let Some(raw) = params.get(name).filter(|v| !v.is_empty()) else {
        return Ok(default);
    };
    match raw.trim().parse::<i64>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(fail(
            StatusCode::BAD_REQUEST,
            Some(who),
            "Bad request",
            &format!(
                "`{name}` must be a whole number from {} to {}.",
                range.start(),
                range.end()
            ),
        )),
    }
}

async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        CSS,
    )
}

async fn login(who: Option<Principal>, Query(params): Query<HashMap<String, String>>) -> Response {
    let next = params
        .get("next")
        .and_then(|n| crate::api::auth::local_path(n))
        .unwrap_or("/");
    if who.is_some() {
        return Redirect::to(next).into_response();
    }
    pages::login(params.get("error").map(String::as_str), next).into_response()
}

async fn overview(
    State(state): State<AdminState>,
    Staff(who): Staff,
    Query(params): Query<HashMap<String, String>>,
) -> Page {
    let expiring_days = number(&who, &params, "expiring_days", EXPIRING_DAYS, 1..=365)?;
    let not_seen_days = number(&who, &params, "not_seen_days", NOT_SEEN_DAYS, 1..=3650)?;
    let counts = state
        .registry
        .fleet_counts(now(), expiring_days * 86_400, not_seen_days * 86_400)
        .await
        .map_err(|e| internal(&who, e))?;
    Ok(pages::overview(&who, &counts, expiring_days, not_seen_days))
}

async fn devices(
    State(state): State<AdminState>,
    Staff(who): Staff,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    let at = now();
    short_filters(&who, &params)?;
    let query = params
        .get("q")
        .map(|q| q.trim().to_owned())
        .unwrap_or_default();
    let page = number(&who, &params, "page", 1, 1..=1_000_000)?;
    let status =
        match params.get("status").filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(s.parse::<DeviceStatus>().map_err(|e: String| {
                fail(StatusCode::BAD_REQUEST, Some(&who), "Bad request", &e)
            })?),
        };
    let days = number(&who, &params, "days", 0, 1..=3650);
    let (condition, view, heading) = match params.get("view").map(String::as_str) {
        None | Some("") => match status {
            Some(status) => (
                Condition::Status(status),
                None,
                format!("Devices: {status}"),
            ),
            None => (Condition::All, None, "Devices".to_owned()),
        },
        Some("expiring") => {
            let days = days.map(|d| if d == 0 { EXPIRING_DAYS } else { d })?;
            (
                Condition::Expiring {
                    now: at,
                    before: at + days * 86_400,
                },
                Some(("expiring".to_owned(), days)),
                format!("Certificate ends within {days} day(s)"),
            )
        }
        Some("expired") => (
            Condition::Expired { now: at },
            Some(("expired".to_owned(), 0)),
            "Certificate ended, not renewed".to_owned(),
        ),
        Some("not_seen") => {
            let days = days.map(|d| if d == 0 { NOT_SEEN_DAYS } else { d })?;
            (
                Condition::NotSeenSince {
                    since: at - days * 86_400,
                },
                Some(("not_seen".to_owned(), days)),
                format!("Not seen for {days} day(s)"),
            )
        }
        Some(other) => {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                Some(&who),
                "Bad request",
                &format!("Unknown view `{other}` (expiring, expired, not_seen)."),
            ));
        }
    };
    let heading = if query.is_empty() {
        heading
    } else {
        format!("{heading} matching “{query}”")
    };
    let result = state
        .registry
        .search_devices(&DeviceQuery {
            text: Some(query.clone()).filter(|q| !q.is_empty()),
            condition,
            offset: (page - 1) * PER_PAGE,
            limit: PER_PAGE,
        })
        .await
        .map_err(|e| internal(&who, e))?;
    // Typing the label on a case finds one device: go straight to it.
    if !query.is_empty()
        && result.total == 1
        && page == 1
        && status.is_none()
        && view.is_none()
        && let Some(only) = result.devices.first()
    {
        return Ok(Redirect::to(&device_href(&only.id)).into_response());
    }
    let list = ListView {
        query,
        status,
        view,
        heading,
        page,
        per_page: PER_PAGE,
    };
    Ok(pages::devices(&who, &list, &result, at).into_response())
}

async fn device(
    State(state): State<AdminState>,
    Staff(who): Staff,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Page {
    let registry = &state.registry;
    let device = registry
        .device(&id)
        .await
        .map_err(|e| internal(&who, e))?
        .ok_or_else(|| unknown_device(&who, &id))?;
    let certificates = registry
        .certificates(&id)
        .await
        .map_err(|e| internal(&who, e))?;
    let audit = registry
        .audit_trail(&id)
        .await
        .map_err(|e| internal(&who, e))?;
    let batch = registry
        .device_batch(&id)
        .await
        .map_err(|e| internal(&who, e))?;
    let done = match params.get("done").map(String::as_str) {
        Some("revoked") => Some(Done::Revoked),
        Some("suspended") => Some(Done::Suspended),
        Some("resumed") => Some(Done::Resumed),
        Some("edited") => Some(Done::Edited),
        Some("unchanged") => Some(Done::Unchanged),
        _ => None,
    };
    let view = pages::DeviceView {
        device: &device,
        batch: batch.as_deref(),
        certificates: &certificates,
        audit: &audit,
        done,
    };
    Ok(pages::device(&who, &view, now()))
}

fn unknown_device(who: &Principal, id: &str) -> Refusal {
    fail(
        StatusCode::NOT_FOUND,
        Some(who),
        "No such device",
        &format!("No device “{id}” is registered. Search by label, site or owner instead."),
    )
}

async fn revoke_form(
    State(state): State<AdminState>,
    Staff(who): Staff,
    Path(id): Path<String>,
) -> Page {
    require(&who, Role::Operator, "revoke devices")?;
    let device = state
        .registry
        .device(&id)
        .await
        .map_err(|e| internal(&who, e))?
        .ok_or_else(|| unknown_device(&who, &id))?;
    Ok(pages::revoke(&who, &device, None))
}

/// The fields of the console's action forms (the CSRF field is checked by
/// the admin listener before the handler runs).
#[derive(Debug, serde::Deserialize)]
struct ActionForm {
    reason: Option<String>,
}

async fn revoke(
    State(state): State<AdminState>,
    Staff(who): Staff,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Refusal> {
    require(&who, Role::Operator, "revoke devices")?;
    let reason = match form.reason.as_deref().map(str::parse::<RevokeReason>) {
        Some(Ok(reason)) => reason,
        problem => {
            let device = state
                .registry
                .device(&id)
                .await
                .map_err(|e| internal(&who, e))?
                .ok_or_else(|| unknown_device(&who, &id))?;
            let message = match problem {
                None => "Choose why the device is revoked.".to_owned(),
                Some(Err(e)) => e,
                Some(Ok(_)) => String::new(),
            };
            return Err((
                StatusCode::BAD_REQUEST,
                pages::revoke(&who, &device, Some(&message)),
            )
                .into_response()
                .into());
        }
    };
    let outcome = admin::revoke(&state.registry, &id, reason, &who.actor(), now()).await;
    acted(&who, &id, outcome, "revoked")?;
    info!(device_id = %id, actor = %who.actor(), %reason, "device revoked from the console");
    Ok(Redirect::to(&format!("{}?done=revoked", device_href(&id))).into_response())
}

async fn suspend(
    State(state): State<AdminState>,
    Staff(who): Staff,
    Path(id): Path<String>,
) -> Result<Redirect, Refusal> {
    require(&who, Role::Operator, "suspend devices")?;
    let outcome = admin::suspend(&state.registry, &id, &who.actor(), now()).await;
    acted(&who, &id, outcome, "suspended")?;
    info!(device_id = %id, actor = %who.actor(), "device suspended from the console");
    Ok(Redirect::to(&format!(
        "{}?done=suspended",
        device_href(&id)
    )))
}

async fn resume(
    State(state): State<AdminState>,
    Staff(who): Staff,
    Path(id): Path<String>,
) -> Result<Redirect, Refusal> {
    require(&who, Role::Operator, "resume devices")?;
    let outcome = admin::resume(&state.registry, &id, &who.actor(), now()).await;
    acted(&who, &id, outcome, "resumed")?;
    info!(device_id = %id, actor = %who.actor(), "device resumed from the console");
    Ok(Redirect::to(&format!("{}?done=resumed", device_href(&id))))
}

/// Turns a status change's refusal into a page.
fn acted(
    who: &Principal,
    id: &str,
    outcome: Result<Vec<String>, StatusError>,
    done: &str,
) -> Result<(), Refusal> {
    match outcome {
        Ok(_) => Ok(()),
        Err(StatusError::UnknownDevice(_)) => Err(unknown_device(who, id)),
        Err(StatusError::NotAllowed { status, .. }) => Err(fail(
            StatusCode::CONFLICT,
            Some(who),
            "Not possible",
            &format!("Device “{id}” cannot be {done}: it is {status}."),
        )),
        Err(e) => Err(internal(who, e)),
    }
}

async fn batches(State(state): State<AdminState>, Staff(who): Staff) -> Page {
    let all = state
        .registry
        .batches()
        .await
        .map_err(|e| internal(&who, e))?;
    Ok(pages::batches(&who, &all))
}

async fn batch(
    State(state): State<AdminState>,
    Staff(who): Staff,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Page {
    let page = number(&who, &params, "page", 1, 1..=1_000_000)?;
    let summary = state
        .registry
        .batch(&id)
        .await
        .map_err(|e| internal(&who, e))?
        .ok_or_else(|| {
            fail(
                StatusCode::NOT_FOUND,
                Some(&who),
                "No such batch",
                &format!("No batch “{id}” was imported."),
            )
        })?;
    let devices = state
        .registry
        .search_devices(&DeviceQuery {
            text: None,
            condition: Condition::Batch(id),
            offset: (page - 1) * PER_PAGE,
            limit: PER_PAGE,
        })
        .await
        .map_err(|e| internal(&who, e))?;
    Ok(pages::batch(
        &who,
        &summary,
        &devices,
        page,
        PER_PAGE,
        now(),
    ))
}

async fn audit(
    State(state): State<AdminState>,
    Staff(who): Staff,
    Query(params): Query<HashMap<String, String>>,
) -> Page {
    short_filters(&who, &params)?;
    let query = params
        .get("q")
        .map(|q| q.trim().to_owned())
        .unwrap_or_default();
    let before = params.get("before").filter(|b| !b.is_empty());
    let entries = state
        .registry
        .audit_log(
            Some(query.as_str()).filter(|q| !q.is_empty()),
            before.map(String::as_str),
            AUDIT_PER_PAGE,
        )
        .await
        .map_err(|e| internal(&who, e))?;
    let older = (entries.len() as i64 == AUDIT_PER_PAGE)
        .then(|| entries.last().map(|e| e.id.clone()))
        .flatten();
    Ok(pages::audit(&who, &query, &entries, older.as_deref()))
}
