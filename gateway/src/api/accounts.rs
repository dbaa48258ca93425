//! `/api/v1/accounts…` and `/api/v1/tokens…` (admin only): staff accounts
//! and API tokens, as `idgate user` and `idgate token` manage them.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::auth::{Principal, Role, check_password, hash_password, new_api_token};
use super::error::ApiError;
use super::extract::Body;
use super::state::AdminState;
use crate::registry::{Account, AccountError, NewApiToken, check_account_name, now};

fn account_error(e: AccountError) -> ApiError {
    match e {
        AccountError::Exists(name) => {
            ApiError::conflict("exists", format!("`{name}` already exists"))
        }
        AccountError::Unknown(name) => ApiError::not_found(format_args!("`{name}`")),
        AccountError::Registry(e) => e.into(),
    }
}

pub(super) async fn list(
    State(state): State<AdminState>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Admin)?;
    Ok(Json(
        json!({ "accounts": state.registry.accounts().await? }),
    ))
}

/// `POST /api/v1/accounts` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewAccount {
    name: String,
    role: Role,
    password: String,
}

pub(super) async fn add(
    State(state): State<AdminState>,
    principal: Principal,
    // Who asks is checked before what they sent: a non-admin learns nothing
    // about the body's rules.
    body: Result<Body<NewAccount>, ApiError>,
) -> Result<Response, ApiError> {
    principal.require(Role::Admin)?;
    let Body(body) = body?;
    check_account_name(&body.name).map_err(|e| ApiError::bad_request("invalid_name", e))?;
    check_password(&body.password).map_err(|e| ApiError::bad_request("weak_password", e))?;
    let password = body.password;
    let password_hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let account = Account {
        name: body.name,
        role: body.role,
        password_hash,
        created_by: principal.actor(),
        created_at: now(),
        disabled_at: None,
    };
    state
        .registry
        .add_account(&account, &principal.actor())
        .await
        .map_err(account_error)?;
    Ok((StatusCode::CREATED, Json(json!({ "account": account }))).into_response())
}

async fn set_disabled(
    state: &AdminState,
    principal: &Principal,
    name: &str,
    disabled: bool,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Admin)?;
    state
        .registry
        .set_account_disabled(name, disabled, &principal.actor(), now())
        .await
        .map_err(account_error)?;
    let account = state
        .registry
        .account(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format_args!("`{name}`")))?;
    Ok(Json(json!({ "account": account })))
}

pub(super) async fn disable(
    State(state): State<AdminState>,
    principal: Principal,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_disabled(&state, &principal, &name, true).await
}

pub(super) async fn enable(
    State(state): State<AdminState>,
    principal: Principal,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_disabled(&state, &principal, &name, false).await
}

pub(super) async fn tokens(
    State(state): State<AdminState>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Admin)?;
    Ok(Json(
        json!({ "tokens": state.registry.api_tokens().await? }),
    ))
}

/// `POST /api/v1/tokens` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewToken {
    name: String,
    role: Role,
    /// Lifetime in days, 1 to [`MAX_TOKEN_DAYS`] (default
    /// [`DEFAULT_TOKEN_DAYS`]). A token made over the API always expires;
    /// only `idgate token create --expires-in never` on the host makes one
    /// that does not.
    expires_in_days: Option<u32>,
}

/// An API token's lifetime when the request does not say.
const DEFAULT_TOKEN_DAYS: u32 = 90;
/// The longest lifetime a token made over the API may have.
const MAX_TOKEN_DAYS: u32 = 3650;

pub(super) async fn create_token(
    State(state): State<AdminState>,
    principal: Principal,
    // Who asks is checked before what they sent: a non-admin learns nothing
    // about the body's rules.
    body: Result<Body<NewToken>, ApiError>,
) -> Result<Response, ApiError> {
    principal.require(Role::Admin)?;
    let Body(body) = body?;
    check_account_name(&body.name).map_err(|e| ApiError::bad_request("invalid_name", e))?;
    let days = body.expires_in_days.unwrap_or(DEFAULT_TOKEN_DAYS);
    if !(1..=MAX_TOKEN_DAYS).contains(&days) {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("expires_in_days must be 1 to {MAX_TOKEN_DAYS}, got {days}"),
        ));
    }
    let (token, token_sha256) = new_api_token();
    let at = now();
    let new = NewApiToken {
        name: body.name.clone(),
        token_sha256,
        role: body.role,
        created_by: principal.actor(),
        created_at: at,
        expires_at: Some(at.saturating_add(i64::from(days) * 86_400)),
    };
    state
        .registry
        .add_api_token(&new)
        .await
        .map_err(account_error)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "name": new.name,
            "role": new.role,
            "expires_at": new.expires_at,
            "token": token,
        })),
    )
        .into_response())
}

pub(super) async fn revoke_token(
    State(state): State<AdminState>,
    principal: Principal,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Role::Admin)?;
    state
        .registry
        .revoke_api_token(&name, &principal.actor(), now())
        .await
        .map_err(account_error)?;
    Ok(StatusCode::NO_CONTENT)
}
