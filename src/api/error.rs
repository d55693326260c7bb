//! The one error type of the HTTP API, and the one place where engine errors become HTTP
//! statuses.
//!
//! Every error response, whether a handler's or an extractor's, reads
//! `{"error": {"code", "message", "details"}}`. Store failures are logged in full and
//! answered with a generic message, since their detail may reveal internals.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use metalgraph_engine::definitions::{self, Problem, Problems};
use metalgraph_engine::nodes;
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

/// An error answered to an API client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable, snake_case word clients can match on.
    pub code: &'static str,
    pub message: String,
    /// Problems with a definition, each naming its graph, task label and field.
    pub details: Vec<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(kind: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{kind} {id} not found"),
        )
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// An internal failure: the detail is logged, the client gets a generic message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error while serving a request");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the server log has the details",
        )
    }

    /// A definition is invalid (422), with one detail per problem.
    pub fn invalid(problems: Problems) -> Self {
        let details = problems.0.iter().map(problem_json).collect();
        Self {
            details,
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_definition",
                problems.to_string(),
            )
        }
    }

    /// One problem with a definition (422).
    pub fn invalid_one(problem: Problem) -> Self {
        Self::invalid(Problems(vec![problem]))
    }
}

fn problem_json(p: &Problem) -> Value {
    serde_json::to_value(p).unwrap_or_else(|_| json!({ "message": p.message }))
}

impl From<metalgraph_engine::Error> for ApiError {
    fn from(e: metalgraph_engine::Error) -> Self {
        use metalgraph_engine::Error as E;
        match e {
            E::NotFound { kind, id } => Self::not_found(kind, &id),
            E::Invalid(problems) => Self::invalid(problems),
            E::BadRequest(message) => Self::bad_request(message),
            E::BadOptions(problems) => Self {
                details: problems.0.iter().map(problem_json).collect(),
                ..Self::new(StatusCode::BAD_REQUEST, "bad_request", problems.to_string())
            },
            // Every conflict with current state is a 409 `conflict`; the message says which.
            e @ (E::Conflict(_) | E::NodeBusy { .. } | E::AlreadyExists(_)) => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            E::Unavailable(message) => Self::unavailable(message),
            E::Store(detail) => Self::internal(format_args!("store: {detail}")),
        }
    }
}

impl From<definitions::Error> for ApiError {
    fn from(e: definitions::Error) -> Self {
        metalgraph_engine::Error::from(e).into()
    }
}

impl From<nodes::Error> for ApiError {
    fn from(e: nodes::Error) -> Self {
        metalgraph_engine::Error::from(e).into()
    }
}

/// The body of every error response: `{"error": {"code", "message", "details"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorInfo,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorInfo {
    /// A stable, snake_case word clients can match on (`bad_request`, `not_found`,
    /// `conflict`, `invalid_definition`, ...).
    #[schema(example = "not_found")]
    pub code: String,
    /// What is at fault, naming the graph, task label, field or node.
    pub message: String,
    /// Problems with a definition, each naming its graph, task label and field; empty
    /// otherwise.
    #[schema(value_type = Vec<Object>)]
    pub details: Vec<Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorInfo {
                code: self.code.to_owned(),
                message: self.message,
                details: self.details,
            },
        };
        (self.status, Json(body)).into_response()
    }
}
