//! API failures: one variant per kind, each mapped (exhaustively) to an HTTP status, OpenAI's
//! error `type` and a stable `code`. 5xx bodies say nothing about internals; the cause goes to
//! the log.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use graft_core::adapters::peft::AdapterError;

use crate::registry::RegistryError;
use crate::source::resolver::ResolveError;
use crate::source::SourceError;
use crate::wire::{ErrorObject, ErrorResponse, WireError};

#[derive(Debug)]
pub enum ApiError {
    /// A request the server cannot honour as sent; `param` names the field at fault.
    BadRequest {
        message: String,
        param: Option<String>,
    },
    /// An adapter's files are not a usable adapter for this model; `param` is the field that
    /// named it (`lora_path` on a load, `model` on a request that reloads it).
    InvalidAdapter {
        message: String,
        param: Option<String>,
    },
    Unauthorized,
    NotFound(String),
    /// A source the server depends on (an adapter store) failed: `message` is for the
    /// client, `cause` (which names the source and its answer) for the log.
    Upstream {
        message: String,
        cause: String,
    },
    TooManyRequests,
    Unavailable,
    /// Logged with its cause; the client sees only that it happened.
    Internal(String),
    /// The engine could not finish a request: `message` is meant for the client (the engine
    /// logged the cause), and the answer carries the request id to report.
    Failed {
        request_id: String,
        message: String,
    },
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// A bad value in the request field `param`.
    pub fn bad_field(param: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// Names `field` as the one at fault, unless the error already names one.
    pub fn in_field(mut self, field: &str) -> Self {
        if let ApiError::BadRequest { param, .. } | ApiError::InvalidAdapter { param, .. } =
            &mut self
        {
            param.get_or_insert_with(|| field.into());
        }
        self
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        ApiError::BadRequest {
            message: e.message,
            param: e.param,
        }
    }
}

impl From<ResolveError> for ApiError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::Registry(e) => e.into(),
            // Downloaded, but not an adapter for this model (or half of one): the adapter is
            // at fault.
            ResolveError::Invalid { .. }
            | ResolveError::Fetch {
                source: SourceError::Incomplete { .. },
                ..
            } => ApiError::InvalidAdapter {
                message: e.to_string(),
                param: None,
            },
            // The source answered with an error, or could not be reached.
            ResolveError::Fetch { ref name, .. } => ApiError::Upstream {
                message: format!(
                    "adapter '{name}' could not be downloaded from its source; try again later"
                ),
                cause: e.to_string(),
            },
            ResolveError::Local { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::BadName(_) | RegistryError::BaseName(_) => {
                ApiError::bad_field("lora_name", e.to_string())
            }
            RegistryError::OutsideRoots(_) => ApiError::bad_field("lora_path", e.to_string()),
            RegistryError::NotFound(_) => ApiError::NotFound(e.to_string()),
            RegistryError::Broken { .. } => ApiError::InvalidAdapter {
                message: e.to_string(),
                param: None,
            },
            RegistryError::Adapter(a) => match a {
                // A file the adapter needs is missing: the adapter is incomplete.
                AdapterError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    ApiError::InvalidAdapter {
                        message: e.to_string(),
                        param: None,
                    }
                }
                // The server could not read files that are there (permissions, a failing
                // disk): its problem, not the client's.
                AdapterError::Io { .. } => ApiError::Internal(e.to_string()),
                AdapterError::Config { .. }
                | AdapterError::Unsupported { .. }
                | AdapterError::Corrupt { .. }
                | AdapterError::Tensor { .. } => ApiError::InvalidAdapter {
                    message: e.to_string(),
                    param: None,
                },
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, code, message, param) = match self {
            ApiError::BadRequest { message, param } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad_request",
                message,
                param,
            ),
            ApiError::InvalidAdapter { message, param } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_adapter",
                message,
                param,
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
                "missing or wrong API key".into(),
                None,
            ),
            ApiError::NotFound(m) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                m,
                None,
            ),
            ApiError::Upstream { message, cause } => {
                tracing::error!(event = "upstream_error", cause = %cause, "{cause}");
                (
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "upstream_error",
                    message,
                    None,
                )
            }
            ApiError::TooManyRequests => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                "the server is at capacity; retry shortly".into(),
                None,
            ),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "unavailable",
                "the server is shutting down".into(),
                None,
            ),
            ApiError::Failed {
                request_id,
                message,
            } => {
                let mut resp = (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(ErrorResponse {
                        error: ErrorObject {
                            message,
                            kind: "server_error".into(),
                            param: None,
                            code: "internal_error".into(),
                        },
                    }),
                )
                    .into_response();
                if let Ok(id) = HeaderValue::from_str(&request_id) {
                    resp.headers_mut().insert("x-request-id", id);
                }
                return resp;
            }
            ApiError::Internal(cause) => {
                tracing::error!(event = "internal_error", cause = %cause, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal_error",
                    "internal error".into(),
                    None,
                )
            }
        };
        let body = ErrorResponse {
            error: ErrorObject {
                message,
                kind: kind.into(),
                param,
                code: code.into(),
            },
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}
