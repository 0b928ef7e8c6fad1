//! The API's one error type, [`ApiError`], its JSON envelope, and what the OpenAPI document
//! says each kind of route may answer.

use std::fmt;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// What a request gets when it cannot be served.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<&'static str>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A field of the request that is not acceptable (422).
    pub(super) fn field(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
        }
    }

    /// A query parameter that is not acceptable (400).
    pub(super) fn query(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_query", message)
        }
    }

    pub(super) fn internal(err: impl fmt::Display) -> Self {
        tracing::error!(%err, "the request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server could not complete the request",
        )
    }
}

/// An error's answer: `{"error": {"code", "message", "field"?}}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = super::examples::error)]
pub(super) struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ErrorDetail {
    /// A stable word to act on: `unauthorized`, `forbidden`, `not_found`, `malformed_body`,
    /// `invalid_body`, `invalid_field`, `invalid_query`, `invalid_header`, `body_too_large`,
    /// `idempotency_key_reused`, `already_finished`, `timeout`, `internal`.
    code: &'static str,
    /// For people: what was wrong, and what to do.
    message: String,
    /// The field, query parameter or header at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'static str>,
}

/// What every route that takes a key may answer besides its own answers.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // read only by the OpenAPI document
pub(super) enum KeyErrors {
    /// No key, or a wrong one (`unauthorized`).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The database failed (`internal`; logged, and the answer says nothing of it).
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The request took too long (`timeout`); what it had under way is rolled back.
    #[response(status = 503)]
    Timeout(ErrorBody),
}

/// What an admin route answers the device key.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // read only by the OpenAPI document
pub(super) enum AdminErrors {
    /// The device key on an admin route (`forbidden`).
    #[response(status = 403)]
    Forbidden(ErrorBody),
}

/// What a route with path or query parameters answers a bad one.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // read only by the OpenAPI document
pub(super) enum ParamErrors {
    /// A query parameter is not acceptable (`invalid_query`, `field` says which), or the path
    /// is not UTF-8 (`invalid_path`).
    #[response(status = 400)]
    BadParameter(ErrorBody),
}

/// What a route that takes a JSON body answers a bad one.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // read only by the OpenAPI document
pub(super) enum BodyErrors {
    /// The body is not JSON (`malformed_body`), or a push's `Idempotency-Key` is not
    /// acceptable (`invalid_header`).
    #[response(status = 400)]
    Malformed(ErrorBody),
    /// The body is over 2 MiB (`body_too_large`).
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// A field is missing, unknown, of the wrong type (`invalid_body`), or breaks a rule
    /// (`invalid_field`, `field` says which).
    #[response(status = 422)]
    Invalid(ErrorBody),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                field: self.field,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        Self::internal(err)
    }
}
