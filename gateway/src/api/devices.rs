//! `/api/v1/devices…`: list, show, add, edit owner/site/label, revoke,
//! suspend, resume, retire; a device's certificates and audit trail.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use idgate_pki::protocol::check_device_id;
use serde_json::{Value, json};

use super::auth::{Principal, Role};
use super::error::ApiError;
use super::extract::{Body, Params};
use super::state::AdminState;
use crate::admin::{self, RevokeReason};
use crate::batch::{check_label, check_owner};
use crate::registry::{
    CertificateRecord, Device, DeviceEdit, DeviceListFilter, DeviceStatus, NewDevice,
    RegistryError, StatusError, now,
};

/// A page size from `limit`: the default when absent, 400 when 0 or above
/// the maximum (a client asking for a million rows learns the limit rather
/// than getting a silently shorter page).
pub(super) fn page_size(state: &AdminState, limit: Option<u64>) -> Result<u32, ApiError> {
    let max = state.settings.max_page_size;
    match limit {
        None => Ok(state.settings.default_page_size.min(max)),
        Some(n) if n >= 1 && n <= u64::from(max) => Ok(n as u32),
        Some(n) => Err(ApiError::bad_request(
            "invalid_page_size",
            format!("limit must be 1 to {max}, got {n}"),
        )),
    }
}

/// `GET /api/v1/devices` parameters.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListParams {
    site: Option<String>,
    owner: Option<String>,
    model: Option<String>,
    status: Option<String>,
    batch: Option<String>,
    q: Option<String>,
    limit: Option<u64>,
    after: Option<String>,
}

pub(super) async fn list(
    State(state): State<AdminState>,
    principal: Principal,
    Params(params): Params<ListParams>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Viewer)?;
    super::check_filters(&[
        ("site", params.site.as_deref()),
        ("owner", params.owner.as_deref()),
        ("model", params.model.as_deref()),
        ("status", params.status.as_deref()),
        ("batch", params.batch.as_deref()),
        ("q", params.q.as_deref()),
        ("after", params.after.as_deref()),
    ])?;
    let limit = page_size(&state, params.limit)?;
    let status = params
        .status
        .map(|s| s.parse::<DeviceStatus>())
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_status", e))?;
    let filter = DeviceListFilter {
        site: params.site,
        owner: params.owner,
        model: params.model,
        status,
        batch: params.batch,
        text: params.q,
    };
    let page = state
        .registry
        .device_list_page(&filter, params.after.as_deref(), limit)
        .await?;
    Ok(Json(json!({
        "devices": page.devices,
        "total": page.total,
        "next": page.next,
    })))
}

async fn device_or_404(state: &AdminState, id: &str) -> Result<Device, ApiError> {
    state
        .registry
        .device(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format_args!("device `{id}`")))
}

/// A certificate as the API shows it: the record and its state now.
pub(super) fn certificate_json(certificate: &CertificateRecord, at: i64) -> Value {
    let state = match (&certificate.revoked_at, &certificate.revocation_reason) {
        (Some(_), Some(reason)) if reason == "certificateHold" => "on_hold",
        (Some(_), _) => "revoked",
        (None, _) if certificate.not_after <= at => "expired",
        (None, _) => "valid",
    };
    let mut value = json!(certificate);
    value["state"] = json!(state);
    value
}

pub(super) async fn show(
    State(state): State<AdminState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Viewer)?;
    let device = device_or_404(&state, &id).await?;
    let certificates = state.registry.certificates(&id).await?;
    let audit = state.registry.audit_trail(&id).await?;
    let batch = state.registry.device_batch(&id).await?;
    let at = now();
    Ok(Json(json!({
        "device": device,
        "batch": batch,
        "certificates": certificates.iter().map(|c| certificate_json(c, at)).collect::<Vec<_>>(),
        "audit": audit,
    })))
}

pub(super) async fn certificates(
    State(state): State<AdminState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Viewer)?;
    device_or_404(&state, &id).await?;
    let at = now();
    let certificates = state.registry.certificates(&id).await?;
    Ok(Json(json!({
        "certificates": certificates.iter().map(|c| certificate_json(c, at)).collect::<Vec<_>>(),
    })))
}

pub(super) async fn audit(
    State(state): State<AdminState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Viewer)?;
    device_or_404(&state, &id).await?;
    Ok(Json(
        json!({ "entries": state.registry.audit_trail(&id).await? }),
    ))
}

/// `POST /api/v1/devices` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddDevice {
    id: String,
    owner: String,
    site: String,
    model: Option<String>,
    label: Option<String>,
}

pub(super) async fn add(
    State(state): State<AdminState>,
    principal: Principal,
    Body(body): Body<AddDevice>,
) -> Result<Response, ApiError> {
    principal.require(Role::Admin)?;
    check_device_id(&body.id)
        .map_err(|e| ApiError::bad_request("invalid_device_id", format!("device id {e}")))?;
    check_owner(&body.owner).map_err(|e| ApiError::bad_request("invalid_owner", e))?;
    check_label("site", &body.site).map_err(|e| ApiError::bad_request("invalid_site", e))?;
    for (what, value) in [("model", &body.model), ("label", &body.label)] {
        if let Some(value) = value {
            check_label(what, value).map_err(|e| ApiError::bad_request("invalid_request", e))?;
        }
    }
    let new = state.tokens.generate(&body.id);
    let device = NewDevice {
        id: body.id.clone(),
        owner: body.owner,
        site: body.site,
        model: body.model,
        label: body.label,
        created_by: principal.actor(),
    };
    match state.registry.add_device(&device, &new.sealed, now()).await {
        Ok(()) => {}
        Err(RegistryError::DeviceExists(id)) => {
            return Err(ApiError::conflict(
                "device_exists",
                format!("device `{id}` is already registered"),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let device = device_or_404(&state, &body.id).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "device": device, "token": new.token })),
    )
        .into_response())
}

/// `PATCH /api/v1/devices/{id}` body: the fields to change.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EditDevice {
    owner: Option<String>,
    site: Option<String>,
    /// A string sets the label; `null` removes it; absent leaves it.
    #[serde(default, deserialize_with = "present")]
    label: Option<Option<String>>,
}

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

/// What is wrong with an edit: the field, the API's error code and a
/// message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EditProblem {
    /// `owner`, `site` or `label`.
    pub field: &'static str,
    /// The API's stable code.
    pub code: &'static str,
    /// What is wrong, in words.
    pub message: String,
}

/// The checks of an owner, site and label edit, shared by the API and the
/// console: the owner is an email address, site and label are 1–128
/// printable characters (the same rules as a batch import).
pub(crate) fn check_edit(edit: &DeviceEdit) -> Result<(), EditProblem> {
    let problem = |field, code, message| EditProblem {
        field,
        code,
        message,
    };
    if let Some(owner) = &edit.owner {
        check_owner(owner).map_err(|e| problem("owner", "invalid_owner", e))?;
    }
    if let Some(site) = &edit.site {
        check_label("site", site).map_err(|e| problem("site", "invalid_site", e))?;
    }
    if let Some(Some(label)) = &edit.label {
        check_label("label", label).map_err(|e| problem("label", "invalid_request", e))?;
    }
    Ok(())
}

pub(super) async fn edit(
    State(state): State<AdminState>,
    principal: Principal,
    Path(id): Path<String>,
    Body(body): Body<EditDevice>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Operator)?;
    let edit = DeviceEdit {
        owner: body.owner,
        site: body.site,
        label: body.label,
    };
    check_edit(&edit).map_err(|p| ApiError::bad_request(p.code, p.message))?;
    let device = state
        .registry
        .edit_device(&id, &edit, &principal.actor(), now())
        .await?
        .ok_or_else(|| ApiError::not_found(format_args!("device `{id}`")))?;
    Ok(Json(json!({ "device": device })))
}

/// `POST /api/v1/devices/{id}/revoke` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeBody {
    reason: String,
}

fn status_error(e: StatusError) -> ApiError {
    match e {
        StatusError::UnknownDevice(id) => ApiError::not_found(format_args!("device `{id}`")),
        e @ StatusError::NotAllowed { .. } => {
            ApiError::conflict("invalid_transition", e.to_string())
        }
        StatusError::Registry(e) => e.into(),
    }
}

async fn changed(
    state: &AdminState,
    id: &str,
    result: Result<Vec<String>, StatusError>,
) -> Result<Json<Value>, ApiError> {
    let serials = result.map_err(status_error)?;
    let device = device_or_404(state, id).await?;
    Ok(Json(json!({ "device": device, "certificates": serials })))
}

pub(super) async fn revoke(
    State(state): State<AdminState>,
    principal: Principal,
    Path(id): Path<String>,
    Body(body): Body<RevokeBody>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Operator)?;
    let reason: RevokeReason = body
        .reason
        .parse()
        .map_err(|e: String| ApiError::bad_request("invalid_reason", e))?;
    let result = admin::revoke(&state.registry, &id, reason, &principal.actor(), now()).await;
    changed(&state, &id, result).await
}

pub(super) async fn retire(
    State(state): State<AdminState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Operator)?;
    let result = admin::revoke(
        &state.registry,
        &id,
        RevokeReason::Retired,
        &principal.actor(),
        now(),
    )
    .await;
    changed(&state, &id, result).await
}

pub(super) async fn suspend(
    State(state): State<AdminState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Operator)?;
    let result = admin::suspend(&state.registry, &id, &principal.actor(), now()).await;
    changed(&state, &id, result).await
}

pub(super) async fn resume(
    State(state): State<AdminState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Operator)?;
    let result = admin::resume(&state.registry, &id, &principal.actor(), now()).await;
    changed(&state, &id, result).await
}
