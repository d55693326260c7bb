//! Request extractors whose rejections are [`ApiError`]s, so that axum's plain-text
//! rejections never reach a client.

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use metalgraph_engine::text;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{ApiError, AppState};

/// A request body parsed as JSON or YAML, chosen by its `Content-Type`
/// (`application/json`, `application/yaml`, `application/x-yaml`, `text/yaml`). An empty
/// body is `Value::Null` whatever its type, so that endpoints whose body is optional accept
/// a bare request; a body that parses to null (`null`, `~`) is a 400.
#[derive(Debug)]
pub struct Body(pub Value);

/// The formats a body may come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Yaml,
}

fn format_of(content_type: Option<&str>) -> Result<Format, ApiError> {
    let Some(ct) = content_type else {
        return Err(ApiError::unsupported_media_type(
            "the request has no Content-Type; send application/json or application/yaml",
        ));
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(Format::Json),
        t if t.starts_with("application/") && t.ends_with("+json") => Ok(Format::Json),
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" => Ok(Format::Yaml),
        _ => Err(ApiError::unsupported_media_type(format!(
            "Content-Type {ct} is not supported; send application/json or application/yaml"
        ))),
    }
}

impl FromRequest<AppState> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(state.body_limit)
            } else {
                ApiError::bad_request(format!("cannot read the request body: {}", r.body_text()))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(Value::Null));
        }
        let format = format_of(content_type.as_deref())?;
        // Parsing is CPU work a hostile body can make long: it runs on the blocking pool,
        // and the parsers refuse deep nesting and duplicate keys (engine `text`).
        let parsed = tokio::task::spawn_blocking(move || match format {
            Format::Json => {
                text::parse_json(&bytes).map_err(|e| format!("malformed JSON body: {e}"))
            }
            Format::Yaml => match std::str::from_utf8(&bytes) {
                Ok(t) => text::parse_yaml(t).map_err(|e| format!("malformed YAML body: {e}")),
                Err(_) => Err("malformed YAML body: not UTF-8".to_owned()),
            },
        })
        .await
        .map_err(|e| ApiError::internal(format_args!("parsing a body did not complete: {e}")))?;
        match parsed.map_err(ApiError::bad_request)? {
            // Only an empty body means "nothing"; a document that says null is not a body
            // any endpoint takes.
            Value::Null => Err(ApiError::bad_request(
                "the request body is null; send a mapping, or no body at all",
            )),
            value => Ok(Body(value)),
        }
    }
}

/// Decodes a body, a mapping (or nothing, read as an empty one), into a request type; a
/// mismatch is a 400 naming what was expected.
pub fn decode<T: DeserializeOwned>(value: Value, what: &str) -> Result<T, ApiError> {
    let value = match value {
        Value::Null => Value::Object(Default::default()),
        // serde would build a struct from a list of its fields in order; a body is a mapping.
        Value::Object(_) => value,
        other => {
            return Err(ApiError::bad_request(format!(
                "invalid {what}: expected a mapping, got {}",
                metalgraph_engine::job::json_kind(&other)
            )));
        }
    };
    serde_json::from_value(value).map_err(|e| ApiError::bad_request(format!("invalid {what}: {e}")))
}

/// Query parameters; a bad one is a 400 naming it.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| Query(q.0))
            .map_err(|e| {
                ApiError::bad_request(format!("invalid query parameters: {}", e.body_text()))
            })
    }
}

/// The address of the connection's peer, when the server knows it: the accept loop puts it
/// on every request (`ConnectInfo<SocketAddr>`); a request handed to the router directly
/// (tests with `oneshot`) has none unless the test adds it.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_canonical()),
        ))
    }
}

/// Path parameters; a bad one is a 400 naming it.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))
    }
}
