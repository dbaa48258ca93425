//! Public HTTP endpoints: the CRL (`GET /crl`, DER) and the OCSP responder for
//! the issuing CA (RFC 6960: `POST /ocsp` and `GET /ocsp/{base64 request}`).
//! Plain HTTP on purpose: both answers are signed, and a relying party must
//! not need TLS (which needs revocation checking) to check revocation.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use idgate_pki::ca::{IssuingCa, hex};
use idgate_pki::revocation::RevocationReason;
use idgate_pki::revocation::ocsp::{CertStatus, OcspResponseStatus, ocsp_error, parse_request};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info};

use crate::registry::{Registry, now};
use crate::revocation::RevocationState;

/// Largest OCSP request accepted.
const MAX_OCSP_REQUEST: usize = 4096;
/// How long an OCSP answer may be cached.
const OCSP_VALIDITY: i64 = 3600;

/// What the handlers need.
#[derive(Clone, Debug)]
pub struct Context {
    /// The registry (the truth for OCSP).
    pub registry: Arc<Registry>,
    /// The issuing CA (signs OCSP responses).
    pub ca: Arc<IssuingCa>,
    /// The current CRL.
    pub revocation: watch::Receiver<Arc<RevocationState>>,
}

/// The routes.
pub fn router(context: Context) -> Router {
    Router::new()
        .route("/crl", get(crl))
        .route("/ocsp", post(ocsp_post))
        .route("/ocsp/{*request}", get(ocsp_get))
        .layer(DefaultBodyLimit::max(MAX_OCSP_REQUEST))
        .with_state(context)
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, context: Context, mut shutdown: watch::Receiver<bool>) {
    let stopped = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(listener, router(context))
        .with_graceful_shutdown(stopped)
        .await
    {
        error!(error = %e, "HTTP server failed");
    }
    info!("HTTP server stopped");
}

async fn crl(State(context): State<Context>) -> Response {
    let crl = context.revocation.borrow().crl.clone();
    (
        [(header::CONTENT_TYPE, "application/pkix-crl")],
        crl.to_vec(),
    )
        .into_response()
}

async fn ocsp_post(State(context): State<Context>, body: Bytes) -> Response {
    ocsp_reply(answer(&context, &body).await)
}

async fn ocsp_get(State(context): State<Context>, Path(request): Path<String>) -> Response {
    // RFC 6960 appendix A.1: the base64 DER request, URL-encoded, as the path.
    let reply =
        match base64::engine::general_purpose::STANDARD.decode(request.trim_start_matches('/')) {
            Ok(der) if der.len() <= MAX_OCSP_REQUEST => answer(&context, &der).await,
            _ => ocsp_error(OcspResponseStatus::MalformedRequest),
        };
    ocsp_reply(reply)
}

fn ocsp_reply(body: Vec<u8>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/ocsp-response")],
        body,
    )
        .into_response()
}

/// The OCSP response for a DER request: `malformedRequest` for garbage,
/// `unknown` for certificates of another issuer or serials never issued,
/// `internalError` when the registry cannot be read.
async fn answer(context: &Context, der: &[u8]) -> Vec<u8> {
    let Ok(request) = parse_request(der) else {
        return ocsp_error(OcspResponseStatus::MalformedRequest);
    };
    let mut answers = Vec::with_capacity(request.certs.len());
    for id in request.certs {
        let status = if !context.ca.ocsp_issued_by_me(&id) {
            CertStatus::Unknown
        } else {
            let serial = hex(&id.serial);
            // Line station certificates come from the same issuing CA.
            let record = match context.registry.certificate(&serial).await {
                Ok(None) => context.registry.station_certificate_record(&serial).await,
                found => found,
            };
            match record {
                Ok(None) => CertStatus::Unknown,
                Ok(Some(record)) => match record.revoked_at {
                    None => CertStatus::Good,
                    Some(revoked_at) => CertStatus::Revoked {
                        revoked_at,
                        reason: record
                            .revocation_reason
                            .as_deref()
                            .and_then(|r| r.parse::<RevocationReason>().ok()),
                    },
                },
                Err(e) => {
                    error!(error = %e, "OCSP: registry unavailable");
                    return ocsp_error(OcspResponseStatus::InternalError);
                }
            }
        };
        answers.push((id, status));
    }
    let at = now();
    match context.ca.ocsp_response(
        &answers,
        at,
        at,
        Some(at + OCSP_VALIDITY),
        request.nonce.as_deref(),
    ) {
        Ok(response) => response,
        Err(e) => {
            error!(error = %e, "OCSP: signing failed");
            ocsp_error(OcspResponseStatus::InternalError)
        }
    }
}
