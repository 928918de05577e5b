//! Every error the API answers with is JSON carrying `errormsg` (the original's
//! `ErrorResult`); validation errors (422) also carry FastAPI's `detail` list, which ASVO
//! may already parse. No error body ever holds a stack trace or a database message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// FastAPI-style validation detail, for 422.
    pub detail: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            detail: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// A 422 shaped like FastAPI's: `loc` names where the bad value was.
    pub fn unprocessable(kind: &str, loc: Vec<Value>, msg: impl Into<String>) -> Self {
        let msg = msg.into();
        let where_ = loc
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(".");
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!("{where_}: {msg}"),
            detail: Some(json!([{ "type": kind, "loc": loc, "msg": msg }])),
        }
    }

    /// A store failure: logged in full, answered without internals.
    pub fn internal(context: &str, err: StoreError) -> Self {
        tracing::error!(error = %err, "{context}");
        let status = match err {
            StoreError::Closed => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(
            status,
            format!("{context}: internal error, see the daemon's log"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.detail {
            Some(detail) => json!({ "errormsg": self.message, "detail": detail }),
            None => json!({ "errormsg": self.message }),
        };
        (self.status, axum::Json(body)).into_response()
    }
}
