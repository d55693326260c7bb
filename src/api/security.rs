//! Who may call the management API, and the routes that manage that: the guard every
//! management request passes (token, role, audit), `/tokens` and `/audit`
//! (docs/security.md).

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::extract::{Body, Path, Query, decode};
use super::{ApiError, AppState};
use crate::audit::{self, Entry};
use crate::auth::{self, Denied, NewToken, Role, TokenView};

/// Checks a management request's token against the role its route needs, answers 401 or
/// 403 when it falls short, and records every call that changes something (refused ones
/// too) in the audit log before answering.
pub async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let Some(needed) = auth::http_role(&method, &path) else {
        return next.run(req).await;
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.to_string());
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let (response, caller) = match s.tokens.check(header, needed) {
        Ok(caller) => (next.run(req).await, caller),
        Err(denied) => (refusal(&denied), denied.caller().cloned()),
    };
    if auth::mutates(&method) {
        s.audit
            .record(audit::Record {
                caller,
                protocol: "http",
                method: method.to_string(),
                target: path,
                status: response.status().as_u16().to_string(),
                peer,
            })
            .await;
    }
    response
}

/// The answer to a refused request: 401 with `WWW-Authenticate: Bearer`, or 403 naming the
/// role needed.
fn refusal(denied: &Denied) -> Response {
    match denied {
        Denied::Unauthenticated(_) => {
            let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", denied.message())
                .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"metalgraph\""),
            );
            r
        }
        Denied::Forbidden { .. } => {
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", denied.message()).into_response()
        }
    }
}

/// A token to make.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    /// A name for it (1 to 64 letters, digits, `.`, `_`, `-`), unique.
    #[schema(example = "ci-pipeline")]
    name: String,
    /// What it may do.
    role: Role,
}

/// Makes a token. The answer is the only time its secret is shown; the server keeps only
/// its hash.
#[utoipa::path(
    post,
    path = "/tokens",
    tag = "security",
    request_body(content = TokenSpec, description = "The token's name and role"),
    responses(
        (status = 201, description = "The token, with its secret", body = NewToken),
        (status = 400, description = "A bad name or role", body = ErrorBody),
        (status = 409, description = "A token of this name exists, or there are as many as the server keeps", body = ErrorBody),
    )
)]
pub async fn create_token(
    State(s): State<AppState>,
    Body(body): Body,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    let spec: TokenSpec = decode(body, "token")?;
    Ok((
        StatusCode::CREATED,
        Json(s.tokens.create(&spec.name, spec.role).await?),
    ))
}

/// Every token: names, roles, when made and last used; never a secret.
#[utoipa::path(
    get,
    path = "/tokens",
    tag = "security",
    responses((status = 200, description = "The tokens", body = Vec<TokenView>))
)]
pub async fn list_tokens(State(s): State<AppState>) -> Json<Vec<TokenView>> {
    Json(s.tokens.list())
}

/// Revokes a token: it is refused from this moment.
#[utoipa::path(
    delete,
    path = "/tokens/{name}",
    tag = "security",
    params(("name" = String, Path, description = "The token's name")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No token has this name", body = ErrorBody),
    )
)]
pub async fn revoke_token(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.tokens.revoke(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The audit log's paging.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Entries to pass over first, newest first.
    #[serde(rename = "$skip")]
    skip: Option<usize>,
    /// The page size.
    #[serde(rename = "$top")]
    #[param(minimum = 1, maximum = 1000, default = 100)]
    top: Option<usize>,
}

/// The audit log, newest first: every call that changed something or tried to (docs/security.md).
#[utoipa::path(
    get,
    path = "/audit",
    tag = "security",
    params(AuditQuery),
    responses(
        (status = 200, description = "One page of entries", body = Vec<Entry>),
        (status = 400, description = "$top outside 1 to 1000, or $skip beyond what the log keeps", body = ErrorBody),
    )
)]
pub async fn list_audit(
    State(s): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<Entry>>, ApiError> {
    let top = q.top.unwrap_or(100);
    if !(1..=1000).contains(&top) {
        return Err(ApiError::bad_request(format!(
            "$top must be 1 to 1000, got {top}"
        )));
    }
    let skip = q.skip.unwrap_or(0);
    if skip as u64 > audit::RETAINED {
        return Err(ApiError::bad_request(format!(
            "$skip must be at most {}, the entries the log keeps",
            audit::RETAINED
        )));
    }
    Ok(Json(s.audit.page(skip, top).await?))
}

/// A gRPC service behind the same checks as [`guard`]: the `authorization` metadata, the
/// role [`auth::grpc_role`] names for the method, and an audit entry for every call that
/// changes something. Refusals are UNAUTHENTICATED or PERMISSION_DENIED with the HTTP API's
/// message.
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    tokens: auth::Tokens,
    audit: audit::Audit,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, state: &AppState) -> Self {
        Guarded {
            inner,
            tokens: state.tokens.clone(),
            audit: state.audit.clone(),
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

type GrpcRequest = axum::http::Request<tonic::body::Body>;
type GrpcResponse = axum::http::Response<tonic::body::Body>;

impl<S> tower::Service<GrpcRequest> for Guarded<S>
where
    S: tower::Service<GrpcRequest, Response = GrpcResponse, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = GrpcResponse;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<GrpcResponse, std::convert::Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), std::convert::Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: GrpcRequest) -> <Self as tower::Service<GrpcRequest>>::Future {
        // The clone that was made ready is the one called (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (tokens, audit) = (self.tokens.clone(), self.audit.clone());
        Box::pin(async move {
            let path = req.uri().path().to_owned();
            let Some(needed) = auth::grpc_role(&path) else {
                return inner.call(req).await;
            };
            let peer = req
                .extensions()
                .get::<tonic::transport::server::TcpConnectInfo>()
                .and_then(|i| i.remote_addr())
                .map(|a| a.to_string());
            let header = req
                .headers()
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes);
            let (response, caller) = match tokens.check(header, needed) {
                Ok(caller) => (inner.call(req).await?, caller),
                Err(denied) => {
                    let status = match &denied {
                        Denied::Unauthenticated(m) => tonic::Status::unauthenticated(m),
                        Denied::Forbidden { .. } => {
                            tonic::Status::permission_denied(denied.message())
                        }
                    };
                    (status.into_http(), denied.caller().cloned())
                }
            };
            if needed >= Role::Operator {
                // A unary call that failed is answered with its status in the headers; one
                // that succeeded carries no status until its trailers.
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32);
                audit
                    .record(audit::Record {
                        caller,
                        protocol: "grpc",
                        method: path.clone(),
                        target: path,
                        status: format!("{code:?}"),
                        peer,
                    })
                    .await;
            }
            Ok(response)
        })
    }
}
