//! [`ApiError`]: every failed request, answered with AUTOMATIC1111's error JSON
//! (`{"error", "detail", "body", "errors"}`, plus `field` naming the request field at fault).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A request that cannot be served, with the HTTP status it is answered with.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {kind}: {detail}")]
pub struct ApiError {
    /// The HTTP status (4xx: the client's fault; 5xx: the server's).
    pub status: StatusCode,
    /// AUTOMATIC1111's `error` (the exception name there): `HTTPException`, `ValidationError`,
    /// `JSONDecodeError`, `Unauthorized`, `QueueFull`, `InternalError`...
    pub kind: &'static str,
    /// The request field at fault, when one is (`width`, `init_images[0]`, ...).
    pub field: Option<String>,
    /// What was received and what was expected.
    pub detail: String,
    /// `Retry-After` seconds (503 when the queue is full).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A 422: `field` has a value the server cannot use.
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            kind: "ValidationError",
            field: Some(field.into()),
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Any status with a kind and detail, no field.
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            field: None,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// A 500: something failed on the server's side.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            detail.into(),
        )
    }

    /// The same error with `field` set.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

impl From<sd_pipeline::core::Error> for ApiError {
    /// Invalid arguments and unsupported features are the request's fault (422, naming the
    /// argument); anything else (weights, tensors, I/O) is the server's (500).
    fn from(e: sd_pipeline::core::Error) -> Self {
        use sd_pipeline::core::Error as E;
        match &e {
            E::InvalidArgument { name, .. } => ApiError::invalid(name.clone(), e.to_string()),
            E::Unsupported { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "NotImplementedError",
                e.to_string(),
            ),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let errors = match &self.field {
            Some(f) => format!("{f}: {}", self.detail),
            None => self.detail.clone(),
        };
        let body = json!({
            "error": self.kind,
            "detail": self.detail,
            "body": "",
            "errors": errors,
            "field": self.field,
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"sd-rs\""),
            );
        }
        resp
    }
}
