//! Read-only records: certificates by serial, the audit log, and the
//! CA (certificates, CRL state, where CRL and OCSP are served).

use axum::Json;
use axum::extract::{Path, State};
use idgate_pki::ca::{Summary, summarize, to_pem};
use serde_json::{Value, json};

use super::auth::{Principal, Role};
use super::devices::{certificate_json, page_size};
use super::error::ApiError;
use super::extract::Params;
use super::state::AdminState;
use crate::registry::now;

pub(super) async fn certificate(
    State(state): State<AdminState>,
    principal: Principal,
    Path(serial): Path<String>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Viewer)?;
    let serial = serial.to_ascii_lowercase();
    let record =
        state.registry.certificate(&serial).await?.ok_or_else(|| {
            ApiError::not_found(format_args!("certificate with serial `{serial}`"))
        })?;
    let mut value = certificate_json(&record, now());
    value["pem"] = json!(to_pem(&[&record.der]));
    Ok(Json(value))
}

/// `GET /api/v1/audit` parameters.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditParams {
    q: Option<String>,
    before: Option<String>,
    limit: Option<u64>,
}

pub(super) async fn audit(
    State(state): State<AdminState>,
    principal: Principal,
    Params(params): Params<AuditParams>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Viewer)?;
    super::check_filters(&[
        ("q", params.q.as_deref()),
        ("before", params.before.as_deref()),
    ])?;
    let limit = page_size(&state, params.limit)?;
    let entries = state
        .registry
        .audit_log(
            params.q.as_deref(),
            params.before.as_deref(),
            i64::from(limit),
        )
        .await?;
    let next = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id.clone()))
        .flatten();
    Ok(Json(json!({ "entries": entries, "next": next })))
}

fn summary_json(summary: &Summary) -> Value {
    json!({
        "subject": summary.subject,
        "issuer": summary.issuer,
        "serial": summary.serial,
        "fingerprint_sha256": summary.fingerprint_sha256,
        "not_before": summary.not_before,
        "not_after": summary.not_after,
        "path_length": summary.ca.flatten(),
    })
}

pub(super) async fn ca(
    State(state): State<AdminState>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Viewer)?;
    let issuing = summarize(state.ca.certificate()).map_err(ApiError::internal)?;
    let root_der = idgate_pki::ca::pem_certificates(&state.root_certificate_pem)
        .map_err(ApiError::internal)?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("the root certificate file holds no certificate"))?;
    let root = summarize(&root_der).map_err(ApiError::internal)?;
    let revocation = state.revocation.borrow().clone();
    Ok(Json(json!({
        "root": summary_json(&root),
        "root_pem": &*state.root_certificate_pem,
        "issuing": summary_json(&issuing),
        "issuing_pem": to_pem(&[state.ca.certificate()]),
        "crl": {
            "this_update": revocation.this_update,
            "next_update": revocation.next_update,
            "entries": revocation.revoked.len(),
            "path": "/crl",
        },
        "ocsp": { "path": "/ocsp" },
        "public_http": state.http_address.to_string(),
    })))
}
