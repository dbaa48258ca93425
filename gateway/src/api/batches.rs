//! `/api/v1/batches…`: manufacturing batches with their counts, and batch
//! registration for line tooling (admin), checked whole before anything is
//! written, as `idgate batch import` does with a CSV file.

use std::collections::HashSet;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use idgate_pki::protocol::check_device_id;
use serde_json::{Value, json};

use super::auth::{Principal, Role};
use super::error::ApiError;
use super::extract::Body;
use super::state::AdminState;
use crate::batch::{check_batch_id, check_label, check_owner, new_batch_id};
use crate::registry::{BatchError, NewBatch, NewDevice, now};

/// Most devices in one request; larger batches are several requests or a
/// CSV file (`idgate batch import`).
pub const MAX_BATCH_DEVICES: usize = 10_000;
/// Largest request body of a batch registration.
pub const MAX_BATCH_BODY: usize = 4 * 1024 * 1024;

pub(super) async fn list(
    State(state): State<AdminState>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Viewer)?;
    Ok(Json(json!({ "batches": state.registry.batches().await? })))
}

pub(super) async fn show(
    State(state): State<AdminState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Viewer)?;
    let batch = state
        .registry
        .batch(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format_args!("batch `{id}`")))?;
    let pending = state.registry.batch_pending(&id).await?;
    Ok(Json(json!({ "batch": batch, "pending_devices": pending })))
}

/// One device of a batch; absent fields take the batch's.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchDevice {
    id: String,
    owner: Option<String>,
    site: Option<String>,
    model: Option<String>,
    label: Option<String>,
}

/// `POST /api/v1/batches` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewBatchBody {
    id: Option<String>,
    owner: String,
    site: String,
    model: Option<String>,
    devices: Vec<BatchDevice>,
}

fn invalid(index: usize, message: String) -> ApiError {
    ApiError::bad_request("invalid_request", format!("devices[{index}]: {message}"))
}

pub(super) async fn import(
    State(state): State<AdminState>,
    principal: Principal,
    Body(body): Body<NewBatchBody>,
) -> Result<Response, ApiError> {
    principal.require(Role::Admin)?;
    check_owner(&body.owner).map_err(|e| ApiError::bad_request("invalid_owner", e))?;
    check_label("site", &body.site).map_err(|e| ApiError::bad_request("invalid_site", e))?;
    if let Some(model) = &body.model {
        check_label("model", model).map_err(|e| ApiError::bad_request("invalid_request", e))?;
    }
    let id = match body.id {
        Some(id) => {
            check_batch_id(&id).map_err(|e| ApiError::bad_request("invalid_request", e))?;
            id
        }
        None => new_batch_id(now()),
    };
    if body.devices.is_empty() || body.devices.len() > MAX_BATCH_DEVICES {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "a batch holds 1 to {MAX_BATCH_DEVICES} devices, got {}",
                body.devices.len()
            ),
        ));
    }
    let actor = principal.actor();
    let mut seen = HashSet::with_capacity(body.devices.len());
    let mut devices = Vec::with_capacity(body.devices.len());
    let mut tokens = Vec::with_capacity(body.devices.len());
    for (index, device) in body.devices.into_iter().enumerate() {
        check_device_id(&device.id)
            .map_err(|e| invalid(index, format!("device id {:?} {e}", device.id)))?;
        if !seen.insert(device.id.clone()) {
            return Err(invalid(
                index,
                format!("device id {:?} appears twice", device.id),
            ));
        }
        let owner = device.owner.unwrap_or_else(|| body.owner.clone());
        check_owner(&owner).map_err(|e| invalid(index, e))?;
        let site = device.site.unwrap_or_else(|| body.site.clone());
        check_label("site", &site).map_err(|e| invalid(index, e))?;
        let model = device.model.or_else(|| body.model.clone());
        for (what, value) in [("model", &model), ("label", &device.label)] {
            if let Some(value) = value {
                check_label(what, value).map_err(|e| invalid(index, e))?;
            }
        }
        let new = state.tokens.generate(&device.id);
        tokens.push(json!({ "id": device.id, "token": new.token }));
        devices.push((
            NewDevice {
                id: device.id,
                owner,
                site,
                model,
                label: device.label,
                created_by: actor.clone(),
            },
            new.sealed,
        ));
    }
    let batch = NewBatch {
        id: id.clone(),
        owner: body.owner,
        site: body.site,
        model: body.model,
        created_by: actor,
    };
    match state
        .registry
        .import_batch(&batch, &devices, now(), &|_| {})
        .await
    {
        Ok(()) => {}
        Err(BatchError::BatchExists(id)) => {
            return Err(ApiError::conflict(
                "batch_exists",
                format!("batch `{id}` already exists; nothing was registered"),
            ));
        }
        Err(BatchError::DeviceExists { index, id }) => {
            return Err(ApiError::conflict(
                "device_exists",
                format!("devices[{index}]: `{id}` is already registered; nothing was registered"),
            ));
        }
        Err(BatchError::Registry(e)) => return Err(e.into()),
    }
    let summary = state
        .registry
        .batch(&id)
        .await?
        .ok_or_else(|| ApiError::internal("the batch just registered is gone"))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "batch": summary, "tokens": tokens })),
    )
        .into_response())
}
